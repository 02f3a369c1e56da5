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


def plot_results(
    files: Sequence[str | Path],
    output: str | Path,
    *,
    metric: str = "reward",
    title: str | None = None,
) -> Path:
    """Draw ``metric`` against step for every config/env in ``files`` into ``output``."""
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
