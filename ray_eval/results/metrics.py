"""Aggregation: per-episode outcomes in, a flat dict of plain scalars out.

Statistics follow rliable's definitions: the interquartile mean (IQM) is the
25%-trimmed mean, confidence intervals are percentile bootstrap intervals drawn
with a generator seeded from the evaluation, so a result is reproducible.
(Plain numpy: the pool actor aggregates, and importing scipy.stats would add
half a second to every evaluator's start.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from ray_eval.results.episodes import SUCCESS_KEY, EpisodeData

BOOTSTRAP_SAMPLES = 2000
CONFIDENCE = 0.95


def iqm(values: np.ndarray) -> float:
    """Interquartile mean: the mean of the middle 50% (25% trimmed from each end)."""
    return float(IQM.of_sorted_rows(np.sort(values)[None, :])[0])


def _trim(n: int) -> int:
    """Values cut from each end of ``n`` for the IQM (scipy's ``trim_mean(x, 0.25)``)."""
    return int(0.25 * n)


@dataclass(frozen=True)
class Statistic:
    """One statistic, computed the three ways an interval may need it."""

    name: str
    # (samples, n) sorted resamples -> samples estimates
    of_sorted_rows: Callable[[np.ndarray], np.ndarray]
    # distinct sorted values (k,), counts (samples, k), n -> samples estimates
    of_counts: Callable[[np.ndarray, np.ndarray, int], np.ndarray]
    # sorted values -> (estimate, its large-sample standard error)
    with_standard_error: Callable[[np.ndarray], tuple[float, float]]


def _mean_with_se(ordered: np.ndarray) -> tuple[float, float]:
    # The plug-in (ddof=0) standard deviation: the bootstrap distribution's own spread.
    return float(ordered.mean()), float(ordered.std() / np.sqrt(len(ordered)))


def _iqm_of_sorted_rows(rows: np.ndarray) -> np.ndarray:
    n = rows.shape[1]
    cut = _trim(n)
    return rows[:, cut : n - cut].mean(axis=1)


def _iqm_of_counts(values: np.ndarray, counts: np.ndarray, n: int) -> np.ndarray:
    # Value j fills sorted positions [start_j, end_j); the IQM keeps [cut, n - cut).
    cut = _trim(n)
    end = np.cumsum(counts, axis=1)
    kept = np.clip(np.minimum(end, n - cut) - np.maximum(end - counts, cut), 0, None)
    return kept @ values / (n - 2 * cut)


def _iqm_with_se(ordered: np.ndarray) -> tuple[float, float]:
    # Tukey and McLaughlin (1963): a trimmed mean's standard error is the Winsorized
    # standard deviation over (1 - 2 * trimmed fraction) * sqrt(n).
    n = len(ordered)
    cut = _trim(n)
    winsorized = np.clip(ordered, ordered[cut], ordered[n - cut - 1])
    estimate = float(ordered[cut : n - cut].mean())
    return estimate, float(winsorized.std() / ((n - 2 * cut) / n) / np.sqrt(n))


MEAN = Statistic(
    "mean",
    of_sorted_rows=lambda rows: rows.mean(axis=1),
    of_counts=lambda values, counts, n: counts @ values / n,
    with_standard_error=_mean_with_se,
)
IQM = Statistic(
    "iqm",
    of_sorted_rows=_iqm_of_sorted_rows,
    of_counts=_iqm_of_counts,
    with_standard_error=_iqm_with_se,
)

# Up to this many episodes, or this many distinct returns, an interval is bootstrapped;
# beyond both it is the normal-theory interval the bootstrap converges to (see bootstrap_ci).
EXACT_LIMIT = 2048


def bootstrap_ci(
    values: np.ndarray,
    statistic: Statistic,
    rng: np.random.Generator,
    samples: int = BOOTSTRAP_SAMPLES,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over resamples of ``values``.

    Drawing ``samples`` resamples of every episode costs ``samples * n``: seconds
    and gigabytes for the 10^5-10^6 short episodes of a vector-env evaluation.
    So the resamples take the cheapest exact form that fits:

    * up to ``EXACT_LIMIT`` episodes, sorted indices into the sorted values (the
      rows come sorted: order statistics need no sort per row);
    * else, up to ``EXACT_LIMIT`` distinct returns (integer scores, capped
      episodes), how often each distinct value is drawn: a multinomial count per
      value, the same resampling distribution at ``samples * distinct`` cost;
    * else (more episodes and more distinct returns than that), the
      normal-theory interval with the plug-in standard error (the Winsorized one
      for the IQM), which the percentile bootstrap converges to: at 2048
      episodes they differ by less than the bootstrap's own Monte-Carlo noise.
    """
    n = len(values)
    if n < 2:
        v = float(statistic.of_sorted_rows(values[None, :])[0]) if n else float("nan")
        return v, v
    alpha = (1 - confidence) / 2
    ordered = np.sort(values)
    if n <= EXACT_LIMIT:
        draws = rng.integers(0, n, size=(samples, n))
        draws.sort(axis=1)
        estimates = statistic.of_sorted_rows(ordered[draws])
    else:
        distinct, counts = np.unique(ordered, return_counts=True)
        if len(distinct) > EXACT_LIMIT:
            estimate, se = statistic.with_standard_error(ordered)
            z = NormalDist().inv_cdf(1 - alpha)
            return estimate - z * se, estimate + z * se
        resampled = rng.multinomial(n, counts / n, size=samples)
        estimates = statistic.of_counts(distinct, resampled, n)
    low, high = np.quantile(estimates, [alpha, 1 - alpha])
    return float(low), float(high)


def bootstrap_rng(seed: int, step: int) -> np.random.Generator:
    """A fresh generator for one set of bootstrap intervals of the evaluation ``(seed, step)``."""
    return np.random.default_rng([seed, step, 0xB007])


def episode_metrics(episodes: EpisodeData, rng: np.random.Generator) -> dict[str, float]:
    """Reward and length statistics of a set of episodes (keys without prefix)."""
    r = episodes.returns
    if len(r) == 0:
        return {"reward": float("nan"), "num_episodes": 0}
    ci_low, ci_high = bootstrap_ci(r, MEAN, rng)
    iqm_low, iqm_high = bootstrap_ci(r, IQM, rng)
    out = {
        "reward": float(r.mean()),
        # Population std (ddof=0), as stable-baselines3 reports it; 0.0 for one episode.
        "reward_std": float(r.std()),
        "num_episodes": len(r),
        "episode_length": float(episodes.lengths.mean()),
        "reward_min": float(r.min()),
        "reward_max": float(r.max()),
        "reward_median": float(np.median(r)),
        "reward_ci_low": ci_low,
        "reward_ci_high": ci_high,
        "reward_iqm": iqm(r),
        "reward_iqm_ci_low": iqm_low,
        "reward_iqm_ci_high": iqm_high,
        "env_steps": int(episodes.lengths.sum()),
    }
    for key, values in episodes.infos.items():
        known = values[~np.isnan(values)]
        if len(known):
            name = "success_rate" if key == SUCCESS_KEY else f"info/{key}"
            out[name] = float(known.mean())
    return out


def aggregate(
    episodes: EpisodeData,
    *,
    prefix: str,
    step: int,
    seconds: float,
    worker_restarts: int,
    seed: int,
    metrics_fn: Callable[[EpisodeData], dict] | None = None,
) -> dict[str, float | int]:
    """The evaluation's flat result dict, tutorial keys first.

    Every set of statistics (the whole evaluation, and each suite member) draws
    its bootstrap resamples from its own generator, seeded from ``(seed, step)``
    only: a suite member's intervals are those of an evaluation of that member
    alone, whatever the other members are, their order or their number.
    """
    stats_all = episode_metrics(episodes, bootstrap_rng(seed, step))
    steps = stats_all.pop("env_steps", 0)
    head = ("reward", "reward_std", "num_episodes", "episode_length")
    result: dict[str, float | int] = {
        f"{prefix}/{k}": stats_all.pop(k) for k in head if k in stats_all
    }
    result[f"{prefix}/fps"] = steps / seconds if seconds > 0 else float("nan")
    result[f"{prefix}/step"] = int(step)
    result.update({f"{prefix}/{k}": v for k, v in stats_all.items()})
    result[f"{prefix}/env_steps"] = steps
    result[f"{prefix}/wall_time"] = seconds
    result[f"{prefix}/worker_restarts"] = int(worker_restarts)
    members = [m for m in dict.fromkeys(episodes.members.tolist()) if m]
    for member in members:
        sub = episode_metrics(episodes.select(member), bootstrap_rng(seed, step))
        sub.pop("env_steps", None)
        result.update({f"{prefix}/{member}/{k}": v for k, v in sub.items()})
    if metrics_fn is not None:
        for key, value in metrics_fn(episodes).items():
            result[f"{prefix}/{key}"] = _scalar(key, value)
    return result


def _scalar(key: str, value) -> float | int:
    try:
        array = np.asarray(value)
        if array.size != 1:
            raise ValueError
        return array.item()
    except (TypeError, ValueError):
        raise TypeError(
            f"episode_metrics_fn returned a non-scalar for {key!r}: {value!r}"
        ) from None


class EvalResult(dict):
    """The result: a flat dict of plain scalars, with the episodes behind it.

    ``result.episodes`` holds per-episode returns, lengths, seeds (and frames of
    recorded episodes); it is an attribute, not a key, so iterating the dict -
    as the tutorial's ``on_result`` lambda does - sees only scalars.
    """

    episodes: EpisodeData | None = None
    videos: list[str]  # files written for recorded episodes (see ``record_video``)

    def __init__(self, metrics: dict, episodes: EpisodeData | None = None) -> None:
        super().__init__(metrics)
        self.episodes = episodes
        self.videos = []

    def __reduce__(self):
        return (_rebuild_result, (dict(self), self.episodes, self.videos))


def _rebuild_result(metrics: dict, episodes: EpisodeData | None, videos: list) -> EvalResult:
    result = EvalResult(metrics, episodes)
    result.videos = list(videos)
    return result


@dataclass(frozen=True)
class Comparison:
    """Is ``b``'s mean return different from ``a``'s? (see ``compare_results``)."""

    difference: float  # mean(b) - mean(a)
    ci_low: float  # bootstrap 95% interval of the difference
    ci_high: float
    p_value: float  # Welch's t-test, two-sided
    significant: bool  # at level ``alpha``, by the chosen method
    method: str

    def __str__(self) -> str:
        verdict = "significant" if self.significant else "not significant"
        return (
            f"difference of mean return {self.difference:+.3f} "
            f"(95% CI [{self.ci_low:+.3f}, {self.ci_high:+.3f}], Welch p={self.p_value:.3g}): "
            f"{verdict} ({self.method})"
        )


def compare_results(
    a, b, *, method: str = "welch", alpha: float = 0.05, seed: int = 0
) -> Comparison:
    """Compare the mean episode return of two evaluations (e.g. two checkpoints).

    ``a`` and ``b`` are results (``EvalResult``), ``EpisodeData`` or arrays of
    returns. ``method="welch"`` decides by Welch's t-test (unequal variances),
    ``method="bootstrap"`` by whether the percentile bootstrap interval of the
    difference excludes zero; both numbers are reported either way.
    """
    if method not in ("welch", "bootstrap"):
        raise ValueError(f"method must be 'welch' or 'bootstrap', got {method!r}")
    ra, rb = _returns_of(a, "a"), _returns_of(b, "b")
    rng = np.random.default_rng(seed)
    diffs = _resampled_means(rb, rng) - _resampled_means(ra, rng)
    low, high = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    if ra.std() == 0 and rb.std() == 0:
        p_value = 1.0 if ra.mean() == rb.mean() else 0.0
    else:
        from scipy import stats  # imported here: the pool actor never needs it

        p_value = float(stats.ttest_ind(rb, ra, equal_var=False).pvalue)
    significant = p_value < alpha if method == "welch" else bool(low > 0 or high < 0)
    return Comparison(
        float(rb.mean() - ra.mean()), float(low), float(high), p_value, significant, method
    )


def _resampled_means(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``BOOTSTRAP_SAMPLES`` bootstrap means of ``values``, in the forms of ``bootstrap_ci``
    (past both limits, draws from the normal distribution the bootstrap converges to)."""
    n = len(values)
    if n <= EXACT_LIMIT:
        return values[rng.integers(0, n, (BOOTSTRAP_SAMPLES, n))].mean(axis=1)
    distinct, counts = np.unique(values, return_counts=True)
    if len(distinct) <= EXACT_LIMIT:
        resampled = rng.multinomial(n, counts / n, size=BOOTSTRAP_SAMPLES)
        return MEAN.of_counts(distinct, resampled, n)
    mean, se = MEAN.with_standard_error(values)
    return rng.normal(mean, se, BOOTSTRAP_SAMPLES)


def _returns_of(x, name: str) -> np.ndarray:
    episodes = getattr(x, "episodes", x)
    returns = np.asarray(getattr(episodes, "returns", episodes), dtype=np.float64)
    if returns.ndim != 1 or len(returns) < 2:
        raise ValueError(
            f"compare_results needs at least 2 episode returns in {name}, got shape {returns.shape}"
        )
    return returns
