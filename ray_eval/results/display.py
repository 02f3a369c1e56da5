"""What the command prints: summary tables, per-evaluation progress, log lines.

In an interactive terminal an evaluation shows a live spinner with its elapsed
time (rich); in job logs and pipes there is no animation, only plain
timestamped log lines on stderr. Tables go to stdout either way.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator, Sequence

from rich import box
from rich.console import Console
from rich.table import Table

log = logging.getLogger("ray_eval")


def interactive() -> bool:
    """True when stderr is a terminal (progress display), False in job logs and pipes."""
    return sys.stderr.isatty()


def setup_logging(*, verbose: bool = False, tty: bool = False) -> None:
    """Plain ``time level message`` lines on stderr (rich-rendered on a terminal)."""
    level = logging.DEBUG if verbose else logging.INFO
    if tty:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(
            console=Console(stderr=True), show_path=False, rich_tracebacks=False
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)s ray-eval: %(message)s", "%Y-%m-%d %H:%M:%S"
            )
        )
    logger = logging.getLogger("ray_eval")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


@contextlib.contextmanager
def progress(description: str, *, tty: bool) -> Iterator[None]:
    """A spinner with elapsed time on a terminal; a start log line otherwise."""
    if not tty:
        log.info("%s ...", description)
        yield
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        bar.add_task(description, total=None)
        yield


def _metric(record: dict, name: str):
    return record.get("metrics", {}).get(f"{record.get('prefix', 'eval')}/{name}")


def _num(value, spec: str = ",.2f") -> str:
    return "n/a" if value is None else format(value, spec)


def result_line(record: dict) -> str:
    """One line for logs: step, reward with its CI, episodes, time."""
    return (
        f"step {record.get('step')}: reward {_num(_metric(record, 'reward'))} "
        f"[95% CI {_num(_metric(record, 'reward_ci_low'))}, {_num(_metric(record, 'reward_ci_high'))}] "
        f"over {_metric(record, 'num_episodes')} episodes "
        f"in {_num(record.get('seconds'), '.2f')} s"
    )


def summary_table(record: dict) -> Table:
    """A two-column table of one result."""
    m = lambda name: _metric(record, name)  # noqa: E731
    table = Table(
        title=f"ray-eval: {record.get('config')} on {record.get('env')}",
        box=box.SIMPLE_HEAVY,
        show_header=True,
        title_justify="left",
    )
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    rows = [
        ("reward (mean ± std)", f"{_num(m('reward'))} ± {_num(m('reward_std'))}"),
        ("reward 95% CI", f"[{_num(m('reward_ci_low'))}, {_num(m('reward_ci_high'))}]"),
        (
            "reward IQM [95% CI]",
            f"{_num(m('reward_iqm'))} [{_num(m('reward_iqm_ci_low'))}, {_num(m('reward_iqm_ci_high'))}]",
        ),
        ("reward median", _num(m("reward_median"))),
        ("reward min / max", f"{_num(m('reward_min'))} / {_num(m('reward_max'))}"),
    ]
    if m("success_rate") is not None:
        rows.append(("success rate", _num(m("success_rate"), ".1%")))
    cluster = record.get("cluster") or {}
    workers = record.get("num_workers")
    where = (
        "in-process"
        if not workers
        else f"{workers} worker(s) on {cluster.get('nodes', '?')} node(s), {_num(cluster.get('cpus'), 'g')} CPUs"
    )
    rows += [
        ("episode length", _num(m("episode_length"), ",.1f")),
        ("episodes", str(m("num_episodes"))),
        ("env steps", _num(m("env_steps"), ",d")),
        ("throughput", f"{_num(m('fps'), ',.0f')} steps/s"),
        ("wall time", f"{_num(record.get('seconds'), '.2f')} s"),
        ("step", str(record.get("step"))),
        ("checkpoint", record.get("checkpoint") or "none (initial weights)"),
        ("workers", where),
    ]
    for label, value in rows:
        table.add_row(label, value)
    return table


def steps_table(records: Sequence[dict]) -> Table:
    """One row per evaluated checkpoint, in step order (the end of a watch)."""
    table = Table(title="ray-eval watch", box=box.SIMPLE_HEAVY, title_justify="left")
    for name, justify in (
        ("step", "right"),
        ("reward", "right"),
        ("95% CI", "right"),
        ("episodes", "right"),
        ("checkpoint", "left"),
    ):
        table.add_column(name, justify=justify)
    for record in sorted(records, key=lambda r: r.get("step") or 0):
        table.add_row(
            str(record.get("step")),
            _num(_metric(record, "reward")),
            f"[{_num(_metric(record, 'reward_ci_low'))}, {_num(_metric(record, 'reward_ci_high'))}]",
            str(_metric(record, "num_episodes")),
            str(record.get("checkpoint") or "-").rsplit("/", 1)[-1],
        )
    return table


def best_table(record: dict, best_by: str, saved=None) -> Table:
    """The best checkpoint of a watch: which one, its step, its numbers, where it was kept."""
    table = Table(title="best checkpoint", box=box.SIMPLE_HEAVY, title_justify="left")
    table.add_column("", style="bold")
    table.add_column("", justify="left")
    metric = best_by.split("/")[-1]
    rows = [
        ("checkpoint", str(record.get("checkpoint") or "-")),
        ("step", str(record.get("step"))),
        (f"{metric} (best by)", _num(_metric(record, metric))),
        ("reward (mean)", _num(_metric(record, "reward"))),
        (
            "reward 95% CI",
            f"[{_num(_metric(record, 'reward_ci_low'))}, {_num(_metric(record, 'reward_ci_high'))}]",
        ),
    ]
    if saved is not None:
        rows.append(("kept as", str(saved)))
    for label, value in rows:
        table.add_row(label, value)
    return table


def print_table(table: Table) -> None:
    """Print to stdout; wide enough not to wrap in job logs (no terminal width there)."""
    console = Console(width=None if sys.stdout.isatty() else 120, highlight=False)
    console.print(table)


def elapsed(start: float) -> float:
    return time.perf_counter() - start
