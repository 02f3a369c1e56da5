"""What every benchmark here shares: timed runs, medians, load averages, tables, Ray.

Each scenario module (``throughput.py``, ``heavy.py``, ``vector_envs.py``,
``large_policy.py``) runs its runners side by side through ``timed``: a warm-up
run each, then rounds of one run each, interleaved, so a drift in the machine's
load touches every runner alike; the medians and the fastest runs are reported
with the load average.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import ray

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RAY_CPUS = max(4, os.cpu_count() or 1)  # logical CPUs, so that 4 one-CPU workers fit on 2 cores


@dataclass
class Rate:
    """Env steps per second over repeated runs."""

    steps_per_s: float  # median over the runs
    best: float  # the fastest run's (the least disturbed by other processes)
    seconds: list[float]  # per run
    steps: list[int]  # per run
    load: str  # load average when the runs ended

    @classmethod
    def of(cls, runs: Sequence[tuple[float, int]]) -> Rate:
        rates = [n / s for s, n in runs]
        return cls(
            statistics.median(rates),
            max(rates),
            [s for s, _ in runs],
            [n for _, n in runs],
            load_average(),
        )


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def timed(runners: dict[str, Callable[[], int]], repeats: int) -> dict[str, Rate]:
    """Run each of ``runners`` (which return the env steps they ran) once as a warm-up, then
    ``repeats`` rounds of one run each, interleaved: a slow drift in the machine's load
    touches every runner alike, so their ratios hold better than their absolute rates."""
    wait_until_quiet()
    for run in runners.values():
        run()
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            started = time.perf_counter()
            steps = run()
            runs[name].append((time.perf_counter() - started, steps))
    return {name: Rate.of(r) for name, r in runs.items()}


def wait_until_quiet(limit_s: float = 20.0, busy: float = 0.1, window_s: float = 0.5) -> None:
    """Wait (at most ``limit_s``) until this process and its children (the Ray instance:
    workers starting or exiting, the dashboard) use under ``busy`` of a core."""
    deadline = time.monotonic() + limit_s
    used = _family_cpu_seconds()
    while used is not None and time.monotonic() < deadline:
        time.sleep(window_s)
        now = _family_cpu_seconds()
        if now - used < busy * window_s:
            return
        used = now


def _family_cpu_seconds() -> float | None:
    """CPU seconds used so far by this process and its live descendants (Linux only)."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        stats = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    except (OSError, ValueError):
        return None
    family, grew = {os.getpid()}, True
    while grew:
        kids = {pid for pid, (ppid, _) in stats.items() if ppid in family} - family
        family |= kids
        grew = bool(kids)
    return sum(stats[pid][1] for pid in family if pid in stats) / ticks


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for n, row in enumerate(cells):
        print(
            "  "
            + "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
            )
        )
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))


def fmt_rate(rate: Rate | None) -> str:
    return "-" if rate is None else f"{rate.steps_per_s:,.0f}"


def ratio(a: Rate | None, b: Rate | None) -> str:
    return "-" if a is None or b is None else f"{a.steps_per_s / b.steps_per_s:.2f}x"


def start_ray(
    worker_niceness: int = 0,
    *,
    dashboard: bool = False,
    num_cpus: int = RAY_CPUS,
    free_objects_period_ms: int | None = 20,
) -> None:
    """A fresh local Ray instance of our own, its workers at ``worker_niceness``.

    Ray starts its workers at nice 15, below the driver, where the raw loops and
    TorchRL's thread backend run: on a machine shared with other work they would
    get a fraction of a core. At nice 0 every runner competes on equal terms.
    ``free_objects_period_ms``: how soon Ray frees unreferenced objects (20, as
    ray_eval's own instance; ``None``: Ray's default, 1000).
    """
    os.environ["RAY_worker_niceness"] = str(worker_niceness)  # noqa: SIM112 (Ray spells it so)
    system_config = {}
    if free_objects_period_ms is not None:
        system_config["free_objects_period_milliseconds"] = free_objects_period_ms
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=dashboard,
        logging_level=logging.WARNING,
        log_to_driver=False,
        _system_config=system_config or None,
    )


class RawLoopInProcesses:
    """The raw loop split over ``processes`` plain processes, no Ray: the most that
    ``processes`` cores give on this machine, measured, not assumed.

    ``make_run`` (picklable) builds, in each process, a raw loop over that process's
    share of the episodes. Calling the object runs every process's loop once, all
    at the same time, and returns their env steps. ``load`` swaps in another loop,
    so one pair of processes (each importing torch) serves several workloads. On a
    virtual machine two vCPUs are not always two whole cores (they may be
    hyperthreads of one, or share caches and memory bandwidth), so the ceiling can
    sit well below 2x the one-process loop; ray_eval cannot beat it.
    """

    def __init__(
        self, make_run: Callable[[], Callable[[], int]] | None = None, processes: int = 2
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipes = []
        self._processes = []
        for _ in range(processes):
            ours, theirs = context.Pipe()
            process = context.Process(target=_serve_runs, args=(theirs,), daemon=True)
            process.start()
            self._pipes.append(ours)
            self._processes.append(process)
        if make_run is not None:
            self.load(make_run)

    def load(self, make_run: Callable[[], Callable[[], int]]) -> None:
        """Build ``make_run``'s loop in every process (and warm it up) in place of the last."""
        for pipe in self._pipes:
            pipe.send(("load", make_run))
        for pipe in self._pipes:
            pipe.recv()  # built and warmed up

    def __call__(self) -> int:
        for pipe in self._pipes:
            pipe.send(("run", None))
        return sum(pipe.recv() for pipe in self._pipes)

    def close(self) -> None:
        for pipe in self._pipes:
            pipe.send(None)
        for process in self._processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


def _serve_runs(pipe) -> None:
    run = None
    while (message := pipe.recv()) is not None:
        command, make_run = message
        if command == "load":
            run = None  # the last loop's envs go before the next one's are built
            run = make_run()
            run()
            pipe.send("ready")
        else:
            pipe.send(run())


def jsonable(obj):
    if isinstance(obj, Rate):
        return dataclasses.asdict(obj)
    return str(obj)
