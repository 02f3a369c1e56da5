"""Heavy workloads: MuJoCo with an MLP, Atari with a Nature-DQN CNN.

    python benchmarks/heavy.py            # a few minutes on 2 cores
    python benchmarks/heavy.py --quick    # a smoke run

Each scenario runs, side by side in one run, on the same episodes:

* ray_eval with 2 workers (a blocking ``evaluate()``);
* the raw one-process loop: a gymnasium ``SyncVectorEnv`` of the same env copies,
  the same policy called once per step on the whole batch, torch on one thread
  (the single-core ceiling; 2 cores make about 2x of it the hardware limit);
* the raw loop split over 2 plain processes (half the episodes each, no Ray):
  what 2 cores really give here, the ceiling ray_eval is held to (two vCPUs of
  this virtual machine make about 1.8x one, not 2x);
* TorchRL's own ``Evaluator`` (thread backend) where it can run the scenario.

Scenarios: ``HalfCheetah-v5`` with a 17-256-256-6 tanh MLP, 32 episodes of 250
steps and 64 of 1,000; ``ALE/Pong-v5`` (gymnasium's DQN preprocessing, 4
stacked 84x84 frames) with the Nature CNN, 16 episodes of 500 steps, 8 env
copies per worker. Episodes are cut at ``max_steps`` in every runner, so each
runner steps the same number of env steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable
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
    jsonable,
    load_average,
    print_table,
    ratio,
    start_ray,
    timed,
)
from torch import nn

from ray_eval import Evaluator
from ray_eval.factories import AtariEnv, NatureCNN, mujoco_env


@dataclass(frozen=True)
class Scenario:
    name: str
    make_env: Callable[[], gym.Env]  # picklable
    make_policy: Callable[[], nn.Module]
    episodes: int
    max_steps: int
    envs_per_worker: int  # ray_eval's batch per worker; the raw loop steps min(episodes, 64)
    discrete: bool
    torchrl: bool  # also TorchRL's Evaluator (slow: about 1k steps/s)

    def describe(self) -> str:
        return f"{self.name}: {self.episodes} episodes of {self.max_steps} steps"


def cheetah_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(17, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 6), nn.Tanh()
    )


def pong_cnn() -> nn.Module:
    torch.manual_seed(0)
    return NatureCNN(num_actions=6)


CHEETAH = functools.partial(mujoco_env, "HalfCheetah-v5")
PONG = AtariEnv("ALE/Pong-v5")


def scenarios(quick: bool) -> list[Scenario]:
    if quick:
        return [
            Scenario("HalfCheetah-v5", CHEETAH, cheetah_mlp, 8, 50, 64, False, True),
            Scenario("ALE/Pong-v5, Nature CNN", PONG, pong_cnn, 4, 50, 8, True, False),
        ]
    return [
        Scenario("HalfCheetah-v5", CHEETAH, cheetah_mlp, 32, 250, 64, False, True),
        Scenario("HalfCheetah-v5", CHEETAH, cheetah_mlp, 64, 1000, 64, False, False),
        Scenario("ALE/Pong-v5, Nature CNN", PONG, pong_cnn, 16, 500, 8, True, False),
    ]


def raw_loop(scenario: Scenario) -> Callable[[], int]:
    """The single-core ceiling: every copy stepped, one batched policy call per step."""
    copies = min(scenario.episodes, 64)
    envs = gym.vector.SyncVectorEnv([scenario.make_env for _ in range(copies)])
    policy = scenario.make_policy().eval()
    dtype = next(policy.parameters()).dtype
    rounds = scenario.episodes // copies

    def run() -> int:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # like a ray_eval worker
        steps = 0
        try:
            with torch.no_grad():
                for r in range(rounds):
                    obs, _ = envs.reset(seed=[r * copies + i for i in range(copies)])
                    for _ in range(scenario.max_steps):
                        out = policy(torch.as_tensor(obs).to(dtype))
                        actions = out.argmax(-1) if scenario.discrete else out
                        obs, *_ = envs.step(actions.numpy())
                        steps += copies
        finally:
            torch.set_num_threads(threads)
        return steps

    return run


def ray_eval_runner(scenario: Scenario, workers: int) -> tuple[Callable[[], int], Evaluator]:
    evaluator = Evaluator(
        scenario.make_env,
        scenario.make_policy(),
        num_workers=workers,
        num_trajectories=scenario.episodes,
        max_steps=scenario.max_steps,
        envs_per_worker=scenario.envs_per_worker,
    )
    return (lambda: evaluator.evaluate()["eval/env_steps"]), evaluator


def torchrl_rate(scenario: Scenario, repeats: int) -> Rate:
    """TorchRL's Evaluator (thread backend) on the same env, as a TorchRL ``GymEnv``."""
    from tensordict.nn import TensorDictModule
    from torchrl.collectors import Evaluator as TorchRLEvaluator
    from torchrl.envs import DoubleToFloat, GymEnv, TransformedEnv

    def env():
        return TransformedEnv(GymEnv("HalfCheetah-v5"), DoubleToFloat())

    policy = TensorDictModule(scenario.make_policy(), in_keys=["observation"], out_keys=["action"])
    evaluator = TorchRLEvaluator(
        env,
        policy,
        num_trajectories=scenario.episodes,
        max_steps=scenario.max_steps,
        busy_policy="queue",
    )

    def run() -> int:
        result = evaluator.evaluate()
        return round(result["eval/num_episodes"] * result["eval/episode_length"])

    try:
        return timed({"torchrl": run}, repeats)["torchrl"]
    finally:
        evaluator.shutdown()


def save_plot(measured: dict, path: Path) -> None:
    """ray_eval's and the 2-process raw loop's steps/s over the raw loop's, per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(measured)

    def over_raw(name: str, key: str) -> float | None:
        rate = measured[name].get(key)
        return None if rate is None else rate["steps_per_s"] / measured[name]["raw"]["steps_per_s"]

    ratios = [over_raw(n, "ray_eval") for n in names]
    fig, ax = plt.subplots(figsize=(8.0, 3.8))
    ax.barh(names, ratios, color="tab:blue", label="ray_eval, 2 workers")
    for y, r in enumerate(ratios):
        ax.text(r, y, f" {r:.2f}x", va="center", fontsize=9)
    pairs = [(y, over_raw(n, "raw_pair")) for y, n in enumerate(names)]
    pairs = [(y, r) for y, r in pairs if r is not None]
    if pairs:
        ax.scatter(
            [r for _, r in pairs],
            [y for y, _ in pairs],
            marker="|",
            s=600,
            color="black",
            zorder=3,
            label="raw loop, 2 processes",
        )
    ax.axvline(1.0, color="tab:green", ls="--", label="raw loop, 1 process")
    ax.axvline(2.0, color="grey", ls=":", label="2 cores")
    ax.axvline(1.8, color="tab:red", ls="-.", lw=0.8, label="target 1.8x")
    ax.set_xlim(0, 2.3)
    ax.invert_yaxis()
    ax.set_xlabel("env steps/s relative to the raw one-process loop")
    ax.legend(loc="upper center", bbox_to_anchor=(0.4, -0.22), ncols=3, fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="runs per median")
    parser.add_argument("--results", type=Path)
    parser.add_argument("--plot", type=Path, help="only plot a results JSON of an earlier run")
    args = parser.parse_args(argv)
    if args.plot:
        save_plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        print(f"plot: {args.plot.with_suffix('.png')}")
        return 0
    repeats = args.repeats or (2 if args.quick else 5)
    results_dir = args.results or RESULTS_DIR
    print(f"ray_eval heavy-workload benchmark ({'quick' if args.quick else 'full'} run)")
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load_average()}; torch "
        f"{torch.__version__}, ray {ray.__version__}, gymnasium {gym.__version__}"
    )
    start_ray()
    measured = {}
    try:
        for scenario in scenarios(args.quick):
            run, evaluator = ray_eval_runner(scenario, workers=2)
            half = dataclasses.replace(scenario, episodes=scenario.episodes // 2)
            raw_pair = RawLoopInProcesses(functools.partial(raw_loop, half), processes=2)
            try:
                rates = timed(
                    {"ray_eval": run, "raw": raw_loop(scenario), "raw_pair": raw_pair}, repeats
                )
            finally:
                evaluator.shutdown()
                raw_pair.close()
            if scenario.torchrl:
                rates["torchrl"] = torchrl_rate(scenario, repeats=1 if args.quick else 2)
            measured[scenario.describe()] = rates
            raw, pair, torchrl = rates["raw"], rates["raw_pair"], rates.get("torchrl")
            print_table(
                scenario.describe(),
                ["runner", "steps/s", "best run", "vs raw loop", "vs 2 raw", "vs TorchRL", "load"],
                [
                    [
                        label,
                        fmt_rate(rates[key]),
                        f"{rates[key].best:,.0f}",
                        ratio(rates[key], raw),
                        ratio(rates[key], pair),
                        ratio(rates[key], torchrl),
                        rates[key].load,
                    ]
                    for key, label in (
                        ("ray_eval", "ray_eval, 2 workers"),
                        ("raw", "raw loop, 1 process"),
                        ("raw_pair", "raw loop, 2 processes"),
                        ("torchrl", "TorchRL Evaluator, thread"),
                    )
                    if key in rates
                ],
            )
    finally:
        ray.shutdown()
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"heavy{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps(measured, indent=1, default=jsonable))
    save_plot(json.loads(path.read_text()), path.with_suffix(".png"))
    print(f"\nresults: {path}\nplot: {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
