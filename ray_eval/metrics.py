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

import numpy as np

from ray_eval.episodes import SUCCESS_KEY, EpisodeData

BOOTSTRAP_SAMPLES = 2000
CONFIDENCE = 0.95


def iqm(values: np.ndarray) -> float:
    """Interquartile mean: the mean of the middle 50% (25% trimmed from each end)."""
    return float(_iqm_of_sorted_rows(np.sort(values)[None, :])[0])


def _iqm_of_sorted_rows(rows: np.ndarray) -> np.ndarray:
    """Trimmed means of rows that are already sorted (scipy's ``trim_mean(x, 0.25)``)."""
    n = rows.shape[1]
    cut = int(0.25 * n)
    return rows[:, cut : n - cut].mean(axis=1)


def _mean_rows(rows: np.ndarray) -> np.ndarray:
    return rows.mean(axis=1)


def bootstrap_ci(
    values: np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray],
    rng: np.random.Generator,
    samples: int = BOOTSTRAP_SAMPLES,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over resamples of ``values``.

    ``statistic`` maps a ``(samples, n)`` array to ``samples`` estimates. Each
    resample is drawn as sorted indices into the sorted values, so its rows come
    sorted and order statistics (the IQM) need no sort or partition per row.
    """
    if len(values) < 2:
        v = float(statistic(values[None, :])[0]) if len(values) else float("nan")
        return v, v
    ordered = np.sort(values)
    draws = rng.integers(0, len(values), size=(samples, len(values)))
    draws.sort(axis=1)
    estimates = statistic(ordered[draws])
    alpha = (1 - confidence) / 2
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
    ci_low, ci_high = bootstrap_ci(r, _mean_rows, rng)
    iqm_low, iqm_high = bootstrap_ci(r, _iqm_of_sorted_rows, rng)
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
    diffs = rb[rng.integers(0, len(rb), (BOOTSTRAP_SAMPLES, len(rb)))].mean(axis=1) - ra[
        rng.integers(0, len(ra), (BOOTSTRAP_SAMPLES, len(ra)))
    ].mean(axis=1)
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


def _returns_of(x, name: str) -> np.ndarray:
    episodes = getattr(x, "episodes", x)
    returns = np.asarray(getattr(episodes, "returns", episodes), dtype=np.float64)
    if returns.ndim != 1 or len(returns) < 2:
        raise ValueError(
            f"compare_results needs at least 2 episode returns in {name}, got shape {returns.shape}"
        )
    return returns
