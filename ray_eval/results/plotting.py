"""``ray-eval plot``: a metric against the training step, with its 95% confidence band.

One line per (config, env) found in the results files; when a step was
evaluated more than once for a line, the latest result is drawn. Runs on
matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ray_eval.results.results_file import read_results


def curves(
    records: Sequence[dict], metric: str = "reward"
) -> dict[str, list[tuple[int, float, float, float]]]:
    """``{label: [(step, value, ci_low, ci_high), ...]}`` in step order, one per config/env."""
    by_label: dict[str, dict[int, tuple[float, float, float]]] = {}
    for record in records:
        prefix = record.get("prefix", "eval")
        metrics = record.get("metrics") or {}
        value = metrics.get(f"{prefix}/{metric}")
        step = record.get("step")
        if value is None or step is None:
            continue
        low = metrics.get(f"{prefix}/{metric}_ci_low", value)
        high = metrics.get(f"{prefix}/{metric}_ci_high", value)
        label = f"{record.get('config', '?')} ({record.get('env', '?')})"
        by_label.setdefault(label, {})[int(step)] = (
            float(value),
            float(value if low is None else low),
            float(value if high is None else high),
        )
    return {
        label: [(step, *points[step]) for step in sorted(points)]
        for label, points in by_label.items()
    }


def best_points(
    records: Sequence[dict],
    metric: str = "reward",
    best_by: str = "reward_ci_low",
    mode: str = "max",
) -> dict[str, tuple[int, float]]:
    """``{label: (step, metric value)}``: each line's best checkpoint by ``best_by``."""
    by_by = curves(records, best_by.split("/")[-1])
    values = {
        label: dict((p[0], p[1]) for p in points)
        for label, points in curves(records, metric).items()
    }
    out = {}
    for label, points in by_by.items():
        scored = [p for p in points if p[0] in values.get(label, {})]
        if not scored:
            continue
        pick = max if mode == "max" else min
        step = pick(scored, key=lambda p: (p[1], -p[0]))[0]
        out[label] = (step, values[label][step])
    return out


def plot_results(
    files: Sequence[str | Path],
    output: str | Path,
    *,
    metric: str = "reward",
    title: str | None = None,
    best_by: str | None = "reward_ci_low",
    best_mode: str = "max",
) -> Path:
    """Draw ``metric`` against step for every config/env in ``files`` into ``output``;
    each line's best checkpoint by ``best_by`` is marked with a star (``None``: no mark)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [record for file in files for record in read_results(file)]
    lines = curves(records, metric)
    if not lines:
        missing = [str(f) for f in files if not Path(f).exists()]
        where = (
            f"{', '.join(missing)} not found" if missing else f"no results with a {metric!r} metric"
        )
        raise ValueError(f"nothing to plot: {where}")
    best = best_points(records, metric, best_by, best_mode) if best_by else {}
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    try:
        for label, points in lines.items():
            steps = [p[0] for p in points]
            line = ax.plot(steps, [p[1] for p in points], marker="o", markersize=3, label=label)[0]
            ax.fill_between(
                steps,
                [p[2] for p in points],
                [p[3] for p in points],
                color=line.get_color(),
                alpha=0.2,
            )
            if label in best:
                step, value = best[label]
                ax.plot([step], [value], marker="*", markersize=14, color=line.get_color())
                ax.annotate(
                    f"best by {best_by.split('/')[-1]}: step {step}",
                    (step, value),
                    textcoords="offset points",
                    xytext=(6, 8),
                    fontsize="small",
                )
        ax.set_xlabel("step")
        ax.set_ylabel(f"{metric} (mean, 95% CI)")
        ax.set_title(title or f"{metric} vs step")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(output, dpi=120)
    finally:
        plt.close(fig)
    return output
