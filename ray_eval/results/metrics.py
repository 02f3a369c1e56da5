"""Aggregation: per-episode outcomes in, a flat dict of plain scalars out.

Statistics follow rliable's definitions: the interquartile mean (IQM) is the
25%-trimmed mean, confidence intervals are percentile bootstrap intervals drawn
with a generator seeded from the evaluation, so a result is reproducible.
(Plain numpy: the pool actor aggregates, and importing scipy.stats would add
half a second to every evaluator's start.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
    """One statistic, computed the ways an interval may need it."""

    name: str
    # (samples, n) sorted resamples -> samples estimates
    of_sorted_rows: Callable[[np.ndarray], np.ndarray]
    # distinct sorted values (k,), counts (samples, k), n -> samples estimates
    of_counts: Callable[[np.ndarray, np.ndarray, int], np.ndarray]
    # sorted values -> (estimate, its large-sample standard error)
    with_standard_error: Callable[[np.ndarray], tuple[float, float]]
    # sorted values, rng, samples -> samples estimates of bootstrap resamples, past both
    # exact limits; None: the normal-theory interval from ``with_standard_error``
    of_large_resamples: Callable[[np.ndarray, np.random.Generator, int], np.ndarray] | None = None


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


# Extreme values at each end that a large resample of the mean draws one by one.
EXACT_TAIL = 1024


def _mean_of_large_resamples(
    ordered: np.ndarray, rng: np.random.Generator, samples: int
) -> np.ndarray:
    """Bootstrap means of many distinct returns, exact where heavy tails matter.

    A resample's mean is lumpy and skewed when a few extreme returns weigh on it
    (how many times the largest is drawn: 0, 1, 2, ...), which a normal
    approximation misses by far (a Pareto 1.5 sample whose largest return is a
    third of the sum). So the ``EXACT_TAIL`` smallest and largest returns are
    drawn one by one, as a full bootstrap draws them: the number of draws that
    land among them is binomial, and each draw picks one of them uniformly. Only
    the sum of the draws that land in the bulk between them, bounded values of
    which there are many draws, is drawn from its normal distribution (mean and
    variance of that many draws from the bulk). Cost: about ``samples * 2 *
    EXACT_TAIL`` draws, whatever the number of episodes.
    """
    n = len(ordered)
    tails = np.concatenate([ordered[:EXACT_TAIL], ordered[n - EXACT_TAIL :]])
    bulk = ordered[EXACT_TAIL : n - EXACT_TAIL]
    in_bulk = rng.binomial(n, len(bulk) / n, size=samples)
    in_tails = n - in_bulk
    draws = tails[rng.integers(0, len(tails), size=int(in_tails.sum()))]
    tail_sums = np.bincount(
        np.repeat(np.arange(samples), in_tails), weights=draws, minlength=samples
    )
    bulk_sums = rng.normal(in_bulk * bulk.mean(), np.sqrt(in_bulk * bulk.var()))
    return (tail_sums + bulk_sums) / n


MEAN = Statistic(
    "mean",
    of_sorted_rows=lambda rows: rows.mean(axis=1),
    of_counts=lambda values, counts, n: counts @ values / n,
    with_standard_error=_mean_with_se,
    of_large_resamples=_mean_of_large_resamples,
)
IQM = Statistic(
    "iqm",
    of_sorted_rows=_iqm_of_sorted_rows,
    of_counts=_iqm_of_counts,
    with_standard_error=_iqm_with_se,
)

# Up to this many episodes, or this many distinct returns, an interval is bootstrapped
# exactly; beyond both, in large-sample forms (see bootstrap_ci).
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
    * else (more episodes and more distinct returns than that), for the mean,
      resamples whose ``EXACT_TAIL`` extreme returns at each end are drawn one by
      one and whose bulk's sum is drawn from its normal distribution
      (``_mean_of_large_resamples``): heavy tails stay exact; for the IQM, which
      trims the tails, the normal-theory interval with the Winsorized standard
      error (Tukey and McLaughlin), which the percentile bootstrap converges to.
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
        if len(distinct) <= EXACT_LIMIT:
            resampled = rng.multinomial(n, counts / n, size=samples)
            estimates = statistic.of_counts(distinct, resampled, n)
        elif statistic.of_large_resamples is not None:
            estimates = statistic.of_large_resamples(ordered, rng, samples)
        else:
            estimate, se = statistic.with_standard_error(ordered)
            z = NormalDist().inv_cdf(1 - alpha)
            return estimate - z * se, estimate + z * se
    low, high = np.quantile(estimates, [alpha, 1 - alpha])
    return float(low), float(high)


def bootstrap_rng(seed: int, step: int) -> np.random.Generator:
    """A fresh generator for one set of bootstrap intervals of the evaluation ``(seed, step)``."""
    return np.random.default_rng([seed, step, 0xB007])


def episode_metrics(episodes: EpisodeData, rng: np.random.Generator) -> dict[str, float]:
    """Reward and length statistics of a set of episodes (keys without prefix).

    Multi-agent envs add, per agent group, the same statistics of the group's mean
    per-agent return (``<group>/reward``, ``<group>/reward_ci_low``, ...), drawn
    after the episode return's, which they leave as they were.
    """
    r = episodes.returns
    if len(r) == 0:
        return {"reward": float("nan"), "num_episodes": 0}
    stats = reward_statistics(r, rng)
    out = {
        "reward": stats.pop("reward"),
        "reward_std": stats.pop("reward_std"),
        "num_episodes": len(r),
        "episode_length": float(episodes.lengths.mean()),
        **stats,
        "env_steps": int(episodes.lengths.sum()),
    }
    for key, values in episodes.infos.items():
        known = values[~np.isnan(values)]
        if key == SUCCESS_KEY:
            if len(known):
                out["success_rate"] = float(known.mean())
        else:  # an info key asked for: NaN if no episode reported it (see unreported_info_keys)
            out[f"info/{key}"] = float(known.mean()) if len(known) else float("nan")
    for group, per_agent in episodes.agent_returns.items():
        rows = per_agent[~np.isnan(per_agent).all(axis=1)]
        if len(rows):
            means = np.nanmean(rows, axis=1)
            out.update({f"{group}/{k}": v for k, v in reward_statistics(means, rng).items()})
    return out


def reward_statistics(r: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
    """Mean, spread and intervals of returns ``r`` (``reward``, ``reward_std``, ...)."""
    ci_low, ci_high = bootstrap_ci(r, MEAN, rng)
    iqm_low, iqm_high = bootstrap_ci(r, IQM, rng)
    return {
        "reward": float(r.mean()),
        # Population std (ddof=0), as stable-baselines3 reports it; 0.0 for one episode.
        "reward_std": float(r.std()),
        "reward_min": float(r.min()),
        "reward_max": float(r.max()),
        "reward_median": float(np.median(r)),
        "reward_ci_low": ci_low,
        "reward_ci_high": ci_high,
        "reward_iqm": iqm(r),
        "reward_iqm_ci_low": iqm_low,
        "reward_iqm_ci_high": iqm_high,
    }


def unreported_info_keys(episodes: EpisodeData) -> list[str]:
    """The ``info_keys`` that no episode reported (their metric is NaN)."""
    return [
        key
        for key, values in episodes.infos.items()
        if key != SUCCESS_KEY and np.isnan(values).all()
    ]


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
        result.update(custom_metrics(metrics_fn(episodes), prefix, "episode_metrics_fn"))
    return result


def custom_metrics(returned, prefix: str, source: str) -> dict[str, float | int | bool]:
    """The metrics a user's function returned, each checked and made a plain number.

    ``source`` names the function in the error: a value that is not one real
    number fails the evaluation here, where it was made, with a ``TypeError``
    naming the key, rather than anywhere downstream (a logger, ``on_result``).
    """
    if not isinstance(returned, Mapping):
        raise TypeError(
            f"{source} must return a dict of {{name: number}}, got {type(returned).__name__}"
        )
    return {
        f"{prefix}/{key}": metric_number(value, key=key, source=source)
        for key, value in returned.items()
    }


def metric_number(value, *, key: str, source: str) -> float | int | bool:
    """``value`` as a plain Python real number (a one-element tensor or array counts as one).

    Raises ``TypeError`` naming ``key`` and ``source`` for anything else: a string,
    ``None``, a complex number, a container, several numbers.
    """
    number = value
    if hasattr(value, "numel") and hasattr(value, "item"):  # a tensor, without importing torch
        number = value.item() if value.numel() == 1 else None
    else:
        try:
            array = np.asarray(value)
        except Exception:
            array = None
        ok = array is not None and array.size == 1 and array.dtype.kind in "biuf"
        number = array.item() if ok else None
    if isinstance(number, bool | int | float):
        return number
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise TypeError(
        f"{source} returned {shown} ({type(value).__name__}) for metric {key!r}: a metric "
        f"must be one real number (int, float, bool, or a one-element tensor or array)"
    )


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
    """``BOOTSTRAP_SAMPLES`` bootstrap means of ``values``, in the forms of ``bootstrap_ci``."""
    n = len(values)
    if n <= EXACT_LIMIT:
        return values[rng.integers(0, n, (BOOTSTRAP_SAMPLES, n))].mean(axis=1)
    distinct, counts = np.unique(values, return_counts=True)
    if len(distinct) <= EXACT_LIMIT:
        resampled = rng.multinomial(n, counts / n, size=BOOTSTRAP_SAMPLES)
        return MEAN.of_counts(distinct, resampled, n)
    return MEAN.of_large_resamples(np.sort(values), rng, BOOTSTRAP_SAMPLES)


def _returns_of(x, name: str) -> np.ndarray:
    episodes = getattr(x, "episodes", x)
    returns = np.asarray(getattr(episodes, "returns", episodes), dtype=np.float64)
    if returns.ndim != 1 or len(returns) < 2:
        raise ValueError(
            f"compare_results needs at least 2 episode returns in {name}, got shape {returns.shape}"
        )
    return returns
