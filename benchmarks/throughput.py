"""Throughput of ray_eval beside TorchRL's own Evaluator and the raw one-process loop.

    python benchmarks/throughput.py           # the full run (a few minutes on 2 cores)
    python benchmarks/throughput.py --quick   # a smoke run (16 episodes, fewer pools)

Every figure comes from this one run, on this machine, on the same workloads:

* Pendulum-v1: 128 episodes of 200 steps, a 3-64-64-1 tanh MLP
  (a ``TensorDictModule`` from ``"observation"`` to ``"action"``);
* CartPole-v1: 256 episodes of a randomly initialised 4-64-64-2 tanh MLP whose
  argmax (one-hot) is the action; its episodes last from about 30 to 200 steps.

Throughput is env steps per second of wall time of a blocking ``evaluate()``
(the driver's clock), the median over repeated runs after a warm-up run; the
fast runners (ray_eval's pools and the raw loop) take turns run by run, so a
drift in the machine's load touches them alike. The raw loop is the single-core
ceiling: a gymnasium ``SyncVectorEnv`` of 64 copies and one batched MLP call per
step, in this process. Ray's workers run at nice 0 like it (``--worker-niceness``;
Ray's default, 15, puts them behind every other process on a shared machine).

Also measured: the scaling over 1, 2 and 4 workers (and a plot of it), the time
``trigger_eval`` takes to return for a policy of about one million parameters,
the object-store bytes one evaluation puts (Ray's state API), and an evaluation
after the pool sat idle against a back-to-back one.

This is a benchmark, not a test: nothing here asserts a speed. The machine's
load average is printed beside every group of measurements; other processes on
the machine make the numbers noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import ray
import torch
from harness import (
    RESULTS_DIR,
    Rate,
    RawLoopInProcesses,
    fmt_rate,
    load_average,
    print_table,
    ratio,
    start_ray,
    timed,
    wait_until_quiet,
)
from harness import jsonable as _jsonable
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.envs import GymEnv

STARTED = time.perf_counter()
INLINE_LIMIT = 100 * 1024  # Ray's max_direct_call_object_size: smaller returns are inlined


# -- workloads and policies ------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    env_id: str
    episodes: int
    obs_dim: int
    act_dim: int
    discrete: bool
    init_seed: int  # torch seed of the policy's initial weights

    def describe(self) -> str:
        kind = "argmax of a random MLP" if self.discrete else "tanh MLP"
        return (
            f"{self.env_id}: {self.episodes} episodes, {kind} {self.obs_dim}-64-64-{self.act_dim}"
        )


PENDULUM = Workload("Pendulum-v1", 128, 3, 1, discrete=False, init_seed=0)
# init_seed=3 gives CartPole episodes of very different lengths (about 30 to 200 steps).
CARTPOLE = Workload("CartPole-v1", 256, 4, 2, discrete=True, init_seed=3)


class OneHotArgmax(nn.Module):
    """Logits to a one-hot action: what TorchRL's ``GymEnv`` expects for a discrete env
    (ray_eval and the raw loop take its argmax)."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)


def mlp(workload: Workload, hidden: int = 64) -> nn.Sequential:
    torch.manual_seed(workload.init_seed)
    layers = [
        nn.Linear(workload.obs_dim, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.Tanh(),
        nn.Linear(hidden, workload.act_dim),
    ]
    if workload.discrete:
        layers.append(OneHotArgmax())
    return nn.Sequential(*layers)


def make_policy(workload: Workload, env=None, hidden: int = 64) -> TensorDictModule:
    """The benchmark's policy; ``env`` is ignored (TorchRL may pass it to a policy_factory)."""
    return TensorDictModule(mlp(workload, hidden), in_keys=["observation"], out_keys=["action"])


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- measurements ------------------------------------------------------------------------


@contextlib.contextmanager
def raw_loop(workload: Workload, copies: int = 64) -> Iterator[Callable[[], int]]:
    """The one-core ceiling: ``SyncVectorEnv`` of ``copies`` envs, one batched MLP call per
    step, stepping every copy (finished ones reset themselves) until enough episodes ended."""
    net = mlp(workload).eval()
    envs = gym.vector.SyncVectorEnv(
        [functools.partial(gym.make, workload.env_id) for _ in range(copies)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )

    def run() -> int:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # like a ray_eval worker
        obs, _ = envs.reset(seed=list(range(copies)))
        finished = steps = 0
        try:
            with torch.no_grad():
                while finished < workload.episodes:
                    actions = net(torch.from_numpy(obs))
                    actions = actions.argmax(-1) if workload.discrete else actions
                    obs, _, terminated, truncated, _ = envs.step(actions.numpy())
                    finished += int(np.count_nonzero(terminated | truncated))
                    steps += copies
        finally:
            torch.set_num_threads(threads)
        return steps

    try:
        yield run
    finally:
        envs.close()


def raw_loop_for_process(workload: Workload, copies: int) -> Callable[[], int]:
    """``raw_loop`` for a process of its own (``RawLoopInProcesses``): its envs live as
    long as the process."""
    return contextlib.ExitStack().enter_context(raw_loop(workload, copies))


def evaluations(evaluator, weights=None) -> Callable[[], int]:
    """A runner: one blocking ``evaluate()`` on a ray_eval ``evaluator``."""

    def run() -> int:
        return evaluator.evaluate(weights=weights)["eval/env_steps"]

    return run


@contextlib.contextmanager
def ray_eval_pool(env, workload: Workload, workers: int) -> Iterator[tuple[object, nn.Module]]:
    """A ray_eval ``Evaluator`` on ``workload`` with ``workers`` workers, and its policy."""
    from ray_eval import Evaluator

    policy = make_policy(workload)
    with Evaluator(
        env, policy, num_workers=workers, num_trajectories=workload.episodes
    ) as evaluator:
        yield evaluator, policy


def torchrl_throughput(workload: Workload, backend: str, repeats: int) -> Rate:
    """TorchRL 0.14's own ``torchrl.collectors.Evaluator`` on the same workload."""
    from torchrl.collectors import Evaluator as TorchRLEvaluator

    env = functools.partial(GymEnv, workload.env_id)
    if backend == "process":  # the process backend builds the policy in its child process
        kwargs = {"policy_factory": functools.partial(make_policy, workload)}
    else:
        kwargs = {"policy": make_policy(workload)}
    evaluator = TorchRLEvaluator(
        env, num_trajectories=workload.episodes, backend=backend, busy_policy="queue", **kwargs
    )

    def run() -> int:
        result = evaluator.evaluate()
        return round(result["eval/num_episodes"] * result["eval/episode_length"])

    try:
        return timed({backend: run}, repeats)[backend]
    finally:
        evaluator.shutdown()


def cold_start(evaluator, policy, pairs: int, idle_s: float) -> list[tuple[float, float]]:
    """Pairs of (seconds of an evaluation after ``idle_s`` of idling, seconds of the one
    right after it): taken together, both see the same background load."""

    def seconds() -> float:
        started = time.perf_counter()
        evaluator.evaluate(weights=policy)
        return time.perf_counter() - started

    seconds()  # warm-up
    timings = []
    for _ in range(pairs):
        time.sleep(idle_s)
        after_idle = seconds()
        timings.append((after_idle, seconds()))
    return timings


def trigger_eval_latency(evaluator, policy, repeats: int) -> list[float]:
    """Seconds ``trigger_eval(weights=policy)`` takes to return (the evaluation it starts
    is waited for before the next call, as a trainer would poll it)."""
    wait_until_quiet()
    times = []
    for i in range(repeats + 3):  # the first 3 are warm-up
        with torch.no_grad():  # a training step changed the weights
            policy.module[0].bias.add_(1e-3)
        started = time.perf_counter()
        evaluator.trigger_eval(weights=policy)
        elapsed = time.perf_counter() - started
        evaluator.wait()
        if i >= 3:
            times.append(elapsed)
    return times


def object_store_bytes(evaluator, policy) -> dict[str, int]:
    """Objects (id -> bytes) that one evaluation with new weights adds to Ray's shared-memory
    object store, seen through Ray's state API while it runs (needs Ray's dashboard).

    Task returns under Ray's inline limit (100 KiB) travel inside the reply, not through
    the store, and are left out.
    """
    from ray.util.state import list_objects

    address = ray.get_runtime_context().gcs_address

    def sizes() -> dict[str, int]:
        objects = list_objects(address=address, detail=True, limit=10_000, timeout=30)
        return {o.object_id: o.object_size for o in objects}

    evaluator.evaluate(weights=policy)  # warm-up
    before = set(sizes())
    evaluator.trigger_eval(weights=policy)
    seen: dict[str, int] = {}
    while True:
        done = not evaluator.pending
        seen.update(
            {k: v for k, v in sizes().items() if k not in before and (v or 0) >= INLINE_LIMIT}
        )
        if done:
            break
        time.sleep(0.02)
    evaluator.wait()
    return seen


def big_policy(store_workers: Sequence[int], trigger_repeats: int, hidden: int = 1000):
    """trigger_eval latency and object-store bytes for a ~1M-parameter policy."""
    from ray_eval import Evaluator

    policy = make_policy(PENDULUM, hidden=hidden)
    latencies: list[float] = []
    store: dict[int, dict[str, int]] = {}
    for workers in store_workers:
        with Evaluator(
            "Pendulum-v1",
            policy,
            num_workers=workers,
            num_trajectories=4 * workers,
            envs_per_worker=4,
            busy_policy="queue",
        ) as evaluator:
            store[workers] = object_store_bytes(evaluator, policy)
            if not latencies:
                latencies = trigger_eval_latency(evaluator, policy, trigger_repeats)
    return num_params(policy), latencies, store


# -- output ------------------------------------------------------------------------------


def save_plot(
    path: Path, scaling: dict[int, Rate], raw: Rate, torchrl_thread: Rate, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    counts = sorted(scaling)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    values = [scaling[c].steps_per_s for c in counts]
    ax.bar([str(c) for c in counts], values, color="tab:blue", label="ray_eval")
    for x, v in enumerate(values):
        ax.text(x, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=9)
    ax.axhline(raw.steps_per_s, color="tab:green", ls="--", label="raw loop, 1 process")
    ax.axhline(
        torchrl_thread.steps_per_s, color="tab:red", ls=":", label="TorchRL Evaluator (thread)"
    )
    ax.set_ylim(0, 1.25 * max([*values, raw.steps_per_s]))
    ax.yaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
    ax.set_xlabel("workers")
    ax.set_ylabel("env steps / s")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8, ncols=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the run -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    quick: bool
    repeats: int  # ray_eval and raw-loop runs per median
    torchrl_repeats: int
    worker_counts: tuple[int, ...]
    store_workers: tuple[int, ...]
    trigger_repeats: int
    idle_s: float
    idle_pairs: int  # cold start: evaluations after idling, each with a back-to-back one
    pendulum: Workload
    cartpole: Workload
    torchrl_process: bool  # also TorchRL's process backend (Pendulum)
    gymenv_factory: tuple[str, ...]  # env ids also run through a GymEnv factory pool


FULL = Settings(
    quick=False,
    repeats=7,
    torchrl_repeats=2,
    worker_counts=(1, 2, 4),
    store_workers=(1, 4),
    trigger_repeats=30,
    idle_s=5.0,
    idle_pairs=5,
    pendulum=PENDULUM,
    cartpole=CARTPOLE,
    torchrl_process=True,
    gymenv_factory=(PENDULUM.env_id, CARTPOLE.env_id),
)
# The smoke run prints every table, on small workloads and fewer worker pools
# (starting one costs seconds: each worker imports torch and TorchRL).
QUICK = Settings(
    quick=True,
    repeats=2,
    torchrl_repeats=1,
    worker_counts=(2,),
    store_workers=(2,),  # one put shared by 2 workers shows as one object
    trigger_repeats=5,
    idle_s=1.0,
    idle_pairs=1,
    pendulum=dataclasses.replace(PENDULUM, episodes=16),
    cartpole=dataclasses.replace(CARTPOLE, episodes=16),
    torchrl_process=False,
    gymenv_factory=(),  # one pool fewer: the factory path has its own tests
)


def compare(
    workload: Workload, cfg: Settings, pair: RawLoopInProcesses, also: Callable | None = None
) -> dict[str, Rate]:
    """Every runner on one workload, and the table of steps/s and ratios.

    The fast runners (ray_eval's pools, the raw loop) run interleaved; TorchRL's
    Evaluator, at seconds a run, runs after them. ``pair``: the two plain processes
    of the 2-process raw loop, loaded with this workload. ``also(evaluator, policy)``
    measures more on the pool of the gymnasium id.
    """
    with contextlib.ExitStack() as stack:
        gym_id, policy = stack.enter_context(ray_eval_pool(workload.env_id, workload, 2))
        runners = {"ray_eval, 2 workers, gymnasium id": evaluations(gym_id)}
        if workload.env_id in cfg.gymenv_factory:
            factory = functools.partial(GymEnv, workload.env_id)
            gym_env, _ = stack.enter_context(ray_eval_pool(factory, workload, 2))
            runners["ray_eval, 2 workers, GymEnv factory"] = evaluations(gym_env)
        runners[RAW] = stack.enter_context(raw_loop(workload))
        # The same loop in 2 plain processes, half the episodes and copies each: what 2
        # cores really give here (two vCPUs of a virtual machine may make less than 2x).
        half = dataclasses.replace(workload, episodes=workload.episodes // 2)
        pair.load(functools.partial(raw_loop_for_process, half, 32))
        runners[RAW_PAIR] = pair
        rates = timed(runners, cfg.repeats)
        if also is not None:
            also(gym_id, policy)
    rates["TorchRL Evaluator, thread backend"] = torchrl_throughput(
        workload, "thread", cfg.torchrl_repeats
    )
    if workload is cfg.pendulum and cfg.torchrl_process:
        rates["TorchRL Evaluator, process backend"] = torchrl_throughput(
            workload, "process", cfg.torchrl_repeats
        )
    rates[RAW] = rates.pop(RAW)  # last rows
    rates[RAW_PAIR] = rates.pop(RAW_PAIR)
    thread, raw = rates["TorchRL Evaluator, thread backend"], rates[RAW]
    print_table(
        workload.describe(),
        ["runner", "steps/s", "best run", "vs TorchRL thread", "vs raw loop", "load"],
        [
            [name, fmt_rate(r), f"{r.best:,.0f}", ratio(r, thread), ratio(r, raw), r.load]
            for name, r in rates.items()
        ],
    )
    return rates


RAW = "raw loop, 1 process (SyncVectorEnv x64)"
RAW_PAIR = "raw loop, 2 processes (x32 each)"


def scaling(cfg: Settings, measured: dict[int, Rate], raw: Rate) -> dict[int, Rate]:
    """ray_eval over ``cfg.worker_counts`` workers (``measured`` ones are not run again)."""
    rates = dict(measured)
    for workers in cfg.worker_counts:
        if workers not in rates:
            with ray_eval_pool(cfg.pendulum.env_id, cfg.pendulum, workers) as (evaluator, _):
                rates[workers] = timed({"": evaluations(evaluator)}, cfg.repeats)[""]
    rates = {w: rates[w] for w in cfg.worker_counts}
    one = rates[min(rates)]
    print_table(
        f"Scaling, {cfg.pendulum.describe()}, gymnasium id, 64 envs per worker",
        ["workers", "steps/s", "best run", "vs 1 worker", "vs raw loop", "load"],
        [
            [w, fmt_rate(r), f"{r.best:,.0f}", ratio(r, one), ratio(r, raw), r.load]
            for w, r in rates.items()
        ],
    )
    return rates


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run, small workloads")
    parser.add_argument(
        "--worker-niceness",
        type=int,
        default=0,
        help="nice value of the Ray workers (Ray's own default is 15, below this process)",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS_DIR,
        help=f"where the plot and JSON go ({RESULTS_DIR})",
    )
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torchrl")
    suffix = "_quick" if cfg.quick else ""

    print(f"ray_eval throughput benchmark ({'quick smoke run' if cfg.quick else 'full run'})")
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load_average()}; python "
        f"{sys.version.split()[0]}, torch {torch.__version__}, ray {ray.__version__}, "
        f"gymnasium {gym.__version__}; Ray workers at nice {args.worker_niceness}"
    )
    print(
        "steps/s: env steps per second of wall time of a blocking evaluate(), median of runs "
        "after a warm-up (ratios are of medians); load: load average after the runs"
    )
    # Ray starts its workers at nice 15, below the driver, where the raw loop and TorchRL's
    # thread backend run: on a machine shared with other work they would get a fraction of
    # a core. Every runner competes on equal terms at the same niceness.
    start_ray(args.worker_niceness, dashboard=True)  # the state API (object-store bytes)
    pair = RawLoopInProcesses()  # the 2-process raw loop, loaded with each workload in turn
    try:
        cold: list[tuple[float, float]] = []

        def measure_cold_start(evaluator, policy) -> None:
            cold.extend(cold_start(evaluator, policy, cfg.idle_pairs, cfg.idle_s))

        pendulum = compare(cfg.pendulum, cfg, pair, also=measure_cold_start)
        cartpole = compare(cfg.cartpole, cfg, pair)
        by_workers = scaling(cfg, {2: pendulum["ray_eval, 2 workers, gymnasium id"]}, pendulum[RAW])
        plot = args.results / f"throughput{suffix}.png"
        save_plot(
            plot,
            by_workers,
            pendulum[RAW],
            pendulum["TorchRL Evaluator, thread backend"],
            f"{cfg.pendulum.describe()}, {os.cpu_count()} CPUs",
        )
        print(f"  plot: {plot}")

        params, latencies, store = big_policy(cfg.store_workers, cfg.trigger_repeats)
        ms = sorted(t * 1e3 for t in latencies)
        print(
            f"\ntrigger_eval(weights=policy), {params:,}-parameter policy: "
            f"median {statistics.median(ms):.2f} ms, min {ms[0]:.2f}, max {ms[-1]:.2f} "
            f"over {len(ms)} calls (load {load_average()})"
        )
        print_table(
            f"Object store per evaluation, {params:,}-parameter policy, new weights",
            ["workers", "objects", "bytes"],
            [[w, len(objs), f"{sum(objs.values()):,}"] for w, objs in store.items()],
        )
        counts = " and ".join(map(str, store))
        one_put = all(len(objs) == 1 for objs in store.values())
        print(f"  one object per evaluation for {counts} workers: {one_put}")
        if len(store) > 1:
            sizes = {sum(objs.values()) for objs in store.values()}
            print(f"  equal for {counts} workers: {len(sizes) == 1}")

        idle = statistics.median(i for i, _ in cold)
        back = statistics.median(b for _, b in cold)
        print(
            f"\nCold start, {cfg.pendulum.describe()}, 2 workers, new weights each time: "
            f"after {cfg.idle_s:g} s idle {idle * 1e3:.0f} ms, back-to-back {back * 1e3:.0f} ms: "
            f"{statistics.median(i / b for i, b in cold):.2f}x "
            f"(median of {len(cold)} pairs; load {load_average()})"
        )
    finally:
        pair.close()
        ray.shutdown()
    results = {
        "quick": cfg.quick,
        cfg.pendulum.env_id: pendulum,
        cfg.cartpole.env_id: cartpole,
        "scaling": by_workers,
        "trigger_eval_ms": ms,
        "object_store": store,
        "cold_start_s": cold,
    }
    summary = args.results / f"throughput{suffix}.json"
    summary.write_text(json.dumps(results, indent=1, default=_jsonable))
    print(f"\nresults: {summary}")
    print(f"benchmark run time: {time.perf_counter() - STARTED:.0f} s (load {load_average()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
