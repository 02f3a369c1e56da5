"""Training throughput with ray_eval's async EvalCallback vs SB3's blocking one, side by side.

The same stable-baselines3 run (PPO, or SAC, on MuJoCo's HalfCheetah-v5, seed 0,
one torch thread) three ways: without evaluation; with SB3's ``EvalCallback``,
which stops training for each evaluation; with ``ray_eval.sb3.EvalCallback``,
which hands the weights to Ray workers and trains on. Each evaluation point
runs ``--episodes`` episodes of 1,000 steps; a list of episode counts runs
the two callbacks once per count (more episodes: slower evaluations). The
table gives training timesteps per second over the whole ``learn()`` (the
workers' start-up included, and shown apart), and each rate against the run
without evaluation.

Needs the envs and sb3 extras:  pip install -e ".[envs,sb3]"
Run:  python benchmarks/sb3_callback.py [--algo ppo|sac] [--timesteps 16384] [--episodes 5 20]
The default run takes about 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import gymnasium as gym
import torch
from harness import load_average, print_table, start_ray
from stable_baselines3 import PPO, SAC
from stable_baselines3.common.callbacks import EvalCallback as SB3EvalCallback

from ray_eval.sb3 import EvalCallback as RayEvalCallback

ENV_ID = "HalfCheetah-v5"


def make_model(algo: str):
    if algo == "ppo":
        return PPO("MlpPolicy", ENV_ID, n_steps=2048, seed=0, verbose=0)
    return SAC("MlpPolicy", ENV_ID, learning_starts=1000, seed=0, verbose=0)


def train(algo: str, timesteps: int, callback) -> dict:
    model = make_model(algo)
    started = time.perf_counter()
    model.learn(timesteps, callback=callback)
    seconds = time.perf_counter() - started
    evaluations = len(callback.evaluations_timesteps) if callback is not None else 0
    last = callback.last_mean_reward if callback is not None else float("nan")
    return {
        "seconds": seconds,
        "rate": model.num_timesteps / seconds,
        "evaluations": evaluations,
        "last": last,
        "startup": getattr(callback, "startup_seconds", 0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algo", choices=("ppo", "sac"), default="ppo")
    parser.add_argument("--timesteps", type=int, default=16_384)
    parser.add_argument("--eval-freq", type=int, default=2_048)
    parser.add_argument("--episodes", type=int, nargs="+", default=[5, 20])
    parser.add_argument(
        "--workers", type=int, default=1, help="ray_eval workers (1 leaves a core to training on 2)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    start_ray()
    log = tempfile.mkdtemp(prefix="sb3_callback_")
    rows = []
    base = train(args.algo, args.timesteps, None)
    rows.append(("no evaluation", base))
    for episodes in args.episodes:
        common = dict(
            eval_freq=args.eval_freq, n_eval_episodes=episodes, log_path=log, verbose=0, warn=False
        )
        sb3 = SB3EvalCallback(gym.make(ENV_ID), **common)
        rows.append(
            (
                f"SB3 EvalCallback (blocking), {episodes} episodes",
                train(args.algo, args.timesteps, sb3),
            )
        )
        ours = RayEvalCallback(gym.make(ENV_ID), num_workers=args.workers, **common)
        rows.append(
            (
                f"ray_eval EvalCallback (async, {args.workers} worker), {episodes} episodes",
                train(args.algo, args.timesteps, ours),
            )
        )
    print_table(
        f"{args.algo.upper()} on {ENV_ID}, {args.timesteps:,} timesteps, evaluation every "
        f"{args.eval_freq:,} (load {load_average()})",
        [
            "run",
            "timesteps/s",
            "vs none",
            "learn s",
            "of it worker start s",
            "evaluations",
            "last eval reward",
        ],
        [
            (
                name,
                f"{r['rate']:,.0f}",
                f"{r['rate'] / base['rate']:.2f}x",
                f"{r['seconds']:.1f}",
                f"{r['startup']:.1f}" if r["startup"] else "-",
                r["evaluations"],
                f"{r['last']:.1f}" if r["evaluations"] else "-",
            )
            for name, r in rows
        ],
    )


if __name__ == "__main__":
    main()
