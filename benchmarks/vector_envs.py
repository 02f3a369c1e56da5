"""CartPole through ray_eval's native vector path, beside EnvPool's own loop (issue 11, part 2).

    python benchmarks/vector_envs.py            # about 2 minutes on 2 cores
    python benchmarks/vector_envs.py --quick    # a smoke run
    python benchmarks/vector_envs.py --sweep    # ray_eval over envs_per_worker, and its default

Every runner evaluates the same policy, a 4-64-64-2 tanh MLP whose argmax is
the action, called once per step on the whole batch, on the same cores. Its
weights (``--policy``): ``random`` (torch seed 0: every episode lasts 8-11
steps), ``balancing`` (one unit per layer set to a linear controller that keeps
the pole up: every episode lasts 500 steps, as a trained agent's would) or
``wobbly`` (a worse controller: episodes of about 100 to 500 steps). Runners:

* ray_eval, 2 workers, ``env="envpool:CartPole-v1"``: each worker steps one EnvPool
  env of ``--envs-per-worker`` slots (one EnvPool thread, one torch thread);
* ray_eval, 2 workers, ``env="vector:CartPole-v1"``: gymnasium's numpy-batched
  ``CartPoleVectorEnv`` instead;
* EnvPool's own loop, in this process: one EnvPool env of 2 x ``--envs-per-worker``
  slots on 2 threads (every core), the policy in this process on one torch thread
  (two torch threads are many times slower on a shared 2-core machine), in
  EnvPool's synchronous mode, in it with 1 thread (sometimes faster on a loaded
  machine), and in its asynchronous mode (half the slots step while the policy
  acts on the other half); ray_eval is compared with the fastest of the three;
* gymnasium's ``CartPoleVectorEnv`` stepped in this process (one core).

Steps are env steps that belong to an episode: a step that only resets a slot
(next-step autoreset, one per episode) is not one. ray_eval counts exactly
these, over exactly ``--episodes`` episodes; the loops count them as they go, and
their "raw" rate counts every slot of every ``step()`` call, as EnvPool's own
benchmarks do. Each figure is the median over ``--repeats`` runs after a warm-up,
the runners taking turns run by run so that a drift in the machine's load
touches them alike; the load average is printed beside every figure. Nothing
here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import envpool
import gymnasium as gym
import numpy as np
import ray
import torch
from harness import start_ray
from torch import nn

WORKERS = 2


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# Linear controllers: push right when w . (x, x_dot, theta, theta_dot) > 0.
CONTROLLERS = {"balancing": (0.0, 0.0, 1.0, 0.5), "wobbly": (0.0, -0.2, 1.0, 0.3)}
DEFAULT_EPISODES = {"random": 20_000, "balancing": 4_096, "wobbly": 4_096}


def cartpole_mlp(policy: str) -> nn.Module:
    """The 4-64-64-2 tanh MLP, random (torch seed 0) or with a controller in unit 0 of
    each layer (the other units keep their random weights and are computed, unused)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2)
        ).eval()
    if policy in CONTROLLERS:
        with torch.no_grad():
            net[0].weight[0] = 0.1 * torch.tensor(CONTROLLERS[policy])
            net[0].bias[0] = 0.0
            net[2].weight[0] = 0.0
            net[2].weight[0, 0] = 1.0
            net[2].bias[0] = 0.0
            net[4].weight.zero_()
            net[4].bias.zero_()
            net[4].weight[1, 0] = 1.0  # logits (0, unit 0): right when unit 0 > 0
    return net


@dataclass
class Runs:
    """Per-run (seconds, episode steps, raw slot steps) of one runner."""

    seconds: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    raw: list[int] = field(default_factory=list)
    rollout: list[float] = field(default_factory=list)  # ray_eval's eval/fps: before statistics
    load: str = ""

    def rate(self) -> float:
        return statistics.median(n / s for n, s in zip(self.steps, self.seconds))

    def raw_rate(self) -> float:
        return statistics.median(n / s for n, s in zip(self.raw, self.seconds))

    def best(self) -> float:
        return max(n / s for n, s in zip(self.steps, self.seconds))

    def rollout_rate(self) -> float | None:
        return statistics.median(self.rollout) if self.rollout else None


# A runner runs once and returns (episode steps, raw slot steps, its own rate or None).
Runner = Callable[[], tuple[int, int, float | None]]


def ray_eval_runner(evaluator) -> Runner:
    def run() -> tuple[int, int, float | None]:
        result = evaluator.evaluate()
        steps = int(result["eval/env_steps"])
        # ray_eval reports episode steps only; eval/fps is its rate before the statistics
        return steps, steps, float(result["eval/fps"])

    return run


def envpool_loop(
    policy: nn.Module, slots: int, target_steps: int, asynchronous: bool, threads: int = WORKERS
) -> Runner:
    """EnvPool's own loop until ``target_steps`` episode steps have run."""
    env = envpool.make_gymnasium(
        "CartPole-v1",
        num_envs=slots,
        batch_size=slots // 2 if asynchronous else slots,
        num_threads=threads,
        seed=0,
    )

    def act(obs: np.ndarray) -> np.ndarray:
        return policy(torch.from_numpy(obs)).argmax(1).numpy()

    def run_sync() -> tuple[int, int, None]:
        obs, _ = env.reset()
        resetting = np.zeros(slots, dtype=bool)
        steps = raw = 0
        while steps < target_steps:
            obs, _, terminated, truncated, _ = env.step(act(obs))
            steps += slots - int(np.count_nonzero(resetting))
            raw += slots
            resetting = terminated | truncated
        return steps, raw, None

    def run_async() -> tuple[int, int, None]:
        env.async_reset()
        resetting = np.zeros(slots, dtype=bool)
        steps = raw = 0
        while steps < target_steps:
            obs, _, terminated, truncated, info = env.recv()
            ids = info["env_id"]
            steps += len(ids) - int(np.count_nonzero(resetting[ids]))
            raw += len(ids)
            resetting[ids] = terminated | truncated
            env.send(act(obs), ids)
        for _ in range(2):  # both halves are in flight: take them, so the next run starts clean
            env.recv()
        return steps, raw, None

    return run_async if asynchronous else run_sync


def gym_vector_loop(policy: nn.Module, slots: int, target_steps: int) -> Runner:
    """gymnasium's ``CartPoleVectorEnv`` stepped in this process, the same way."""
    env = gym.make_vec("CartPole-v1", num_envs=slots, vectorization_mode="vector_entry_point")

    def run() -> tuple[int, int, None]:
        obs, _ = env.reset(seed=0)
        resetting = np.zeros(slots, dtype=bool)
        steps = raw = 0
        while steps < target_steps:
            obs, _, terminated, truncated, _ = env.step(
                policy(torch.from_numpy(obs)).argmax(1).numpy()
            )
            steps += slots - int(np.count_nonzero(resetting))
            raw += slots
            resetting = terminated | truncated
        return steps, raw, None

    return run


def timed(runners: dict[str, Runner], repeats: int) -> dict[str, Runs]:
    for run in runners.values():  # warm-up
        run()
    runs = {name: Runs() for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            started = time.perf_counter()
            steps, raw, rollout = run()
            runs[name].seconds.append(time.perf_counter() - started)
            runs[name].steps.append(steps)
            runs[name].raw.append(raw)
            if rollout is not None:
                runs[name].rollout.append(rollout)
    for r in runs.values():
        r.load = load_average()
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: small, 1 repeat")
    parser.add_argument("--episodes", type=int, default=None, help="episodes per evaluation")
    parser.add_argument("--envs-per-worker", type=int, default=1024)
    parser.add_argument("--policy", choices=["random", *CONTROLLERS], default="balancing")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="ray_eval (2 workers) at each envs_per_worker of --sweep-sizes, and at its "
        "default (envs_per_worker=None)",
    )
    parser.add_argument("--sweep-sizes", default="64,128,256,512,1024,2048")
    parser.add_argument("--sweep-env", default="vector:CartPole-v1")
    args = parser.parse_args(argv)
    if args.sweep:
        return sweep(args)
    episodes = args.episodes or (512 if args.quick else DEFAULT_EPISODES[args.policy])
    repeats = args.repeats or (1 if args.quick else 5)
    slots = args.envs_per_worker
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # the loops in this process: one torch thread, like a worker

    from ray_eval import Evaluator

    policy = cartpole_mlp(args.policy)
    print(
        f"CartPole-v1 through native vector envs: {episodes:,} episodes per evaluation, "
        f"4-64-64-2 tanh MLP ({args.policy}), {WORKERS} workers x {slots} slots; "
        f"{os.cpu_count()} CPUs, load average {load_average()}"
    )
    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, ray {ray.__version__}, "
        f"envpool {envpool.__version__}, gymnasium {gym.__version__}"
    )
    start_ray()  # Ray's workers at nice 0, as this process
    evaluators = {}
    try:
        for label, env in (("envpool", "envpool:CartPole-v1"), ("gymnasium", "vector:CartPole-v1")):
            evaluators[label] = Evaluator(
                env,
                policy,
                num_workers=WORKERS,
                num_trajectories=episodes,
                envs_per_worker=slots,
            )
        first = evaluators["envpool"].evaluate()
        target = int(first["eval/env_steps"])
        print(
            f"one evaluation: {target:,} env steps, mean episode length "
            f"{first['eval/episode_length']:.1f}"
        )
        runners = {
            "ray_eval, 2 workers, envpool:CartPole-v1": ray_eval_runner(evaluators["envpool"]),
            "ray_eval, 2 workers, vector:CartPole-v1": ray_eval_runner(evaluators["gymnasium"]),
            "EnvPool's own loop, sync": envpool_loop(policy, WORKERS * slots, target, False),
            "EnvPool's own loop, sync, 1 thread": envpool_loop(
                policy, WORKERS * slots, target, False, threads=1
            ),
            "EnvPool's own loop, async": envpool_loop(policy, WORKERS * slots, target, True),
            "CartPoleVectorEnv loop, 1 process": gym_vector_loop(policy, slots, target),
        }
        with torch.no_grad():
            runs = timed(runners, repeats)
    finally:
        for evaluator in evaluators.values():
            evaluator.shutdown()
        ray.shutdown()

    envpool_best = max(runs[n].rate() for n in runs if n.startswith("EnvPool"))
    print(
        f"\n{'runner':<42} {'steps/s':>11} {'best run':>11} {'raw':>11} "
        f"{'vs EnvPool':>10} {'rollout':>11}  load average"
    )
    for name, r in runs.items():
        rollout = r.rollout_rate()
        print(
            f"{name:<42} {r.rate():>11,.0f} {r.best():>11,.0f} {r.raw_rate():>11,.0f} "
            f"{r.rate() / envpool_best:>9.2f}x "
            f"{f'{rollout:,.0f}' if rollout else '':>11}  {r.load}"
        )
    print(
        "steps/s: episode steps (no autoreset steps) per second of wall time, median of runs; "
        "raw: every slot of every step() call;\nvs EnvPool: against the fastest of EnvPool's "
        "loops; rollout: ray_eval's eval/fps, its rate before the statistics are computed"
    )
    return 0


def sweep(args) -> int:
    """ray_eval on 2 workers at each envs_per_worker, and at the default; one table."""
    from ray_eval import Evaluator
    from ray_eval.options import default_vector_batch

    episodes = args.episodes or (512 if args.quick else DEFAULT_EPISODES[args.policy])
    repeats = args.repeats or (1 if args.quick else 3)
    sizes = [int(x) for x in args.sweep_sizes.split(",")]
    warnings.filterwarnings("ignore")
    policy = cartpole_mlp(args.policy)
    chosen = default_vector_batch(episodes)
    print(
        f"{args.sweep_env}: {episodes:,} episodes per evaluation, 4-64-64-2 tanh MLP "
        f"({args.policy}), {WORKERS} workers; default envs_per_worker for it: {chosen}; "
        f"{os.cpu_count()} CPUs, load average {load_average()}"
    )
    start_ray()
    rows = {}
    try:
        for size in [*sizes, None]:
            label = f"envs_per_worker={size}" if size else f"default (None -> {chosen})"
            with (
                Evaluator(
                    args.sweep_env,
                    policy,
                    num_workers=WORKERS,
                    num_trajectories=episodes,
                    envs_per_worker=size,
                    startup_timeout=600,  # a loaded machine starts workers slowly
                ) as evaluator,
                torch.no_grad(),
            ):
                rows[label] = timed({label: ray_eval_runner(evaluator)}, repeats)[label]
            print(f"  {label:<32} {rows[label].rate():>11,.0f} steps/s  load {rows[label].load}")
    finally:
        ray.shutdown()
    best = max(r.rate() for r in rows.values())
    print(f"\n{'ray_eval, 2 workers':<32} {'steps/s':>11} {'vs best':>8}  load average")
    for label, r in rows.items():
        print(f"{label:<32} {r.rate():>11,.0f} {r.rate() / best:>7.2f}x  {r.load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
