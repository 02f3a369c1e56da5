"""Training throughput with ray_eval's async EvalCallback vs SB3's blocking one, side by side.

The same stable-baselines3 run (PPO, or SAC, on MuJoCo's HalfCheetah-v5, seed 0,
one torch thread) three ways: without evaluation; with SB3's ``EvalCallback``,
which stops training for each evaluation; with ``ray_eval.sb3.EvalCallback``,
which hands the weights to Ray workers and trains on. Each evaluation point
runs ``--episodes`` episodes of 1,000 steps, in two cases:

* ``fast``: the plain env (evaluation costs CPU time only);
* ``slow``: the same env, each evaluation step ``--slow-ms`` ms longer (a
  ``time.sleep``: a slow simulator, a remote env, rendering), so an evaluation
  takes seconds whoever runs it; ray_eval runs it on ``--slow-workers`` workers
  (sleeping steps need no more CPU), SB3 on its one eval env.

The runs are interleaved, round after round (``--repeats``), so a drift in the
machine's load touches every one alike. The table gives the median of the
training timesteps per second over the whole ``learn()`` (the last evaluation,
waited for at its end, and the Ray workers' start-up included; the start-up is
also shown apart, and the rate without it), the slowest and fastest runs, and
each median against the run without evaluation.

Needs the envs and sb3 extras:  pip install -e ".[envs,sb3]"
Run:  python benchmarks/sb3_callback.py [--algo ppo|sac] [--timesteps 8192] [--repeats 3]
The default run took 15 minutes on 2 cores shared with other jobs (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import gymnasium as gym
import torch
from harness import RESULTS_DIR, load_average, print_table, start_ray
from stable_baselines3 import PPO, SAC
from stable_baselines3.common.callbacks import EvalCallback as SB3EvalCallback

from ray_eval.sb3 import EvalCallback as RayEvalCallback

ENV_ID = "HalfCheetah-v5"


class SlowStep(gym.Wrapper):
    """Each step takes ``seconds`` longer (sleeping: no CPU used)."""

    def __init__(self, env: gym.Env, seconds: float) -> None:
        super().__init__(env)
        self.seconds = seconds

    def step(self, action):
        time.sleep(self.seconds)
        return self.env.step(action)


def eval_env(case: str, slow_ms: float) -> gym.Env:
    env = gym.make(ENV_ID)
    return SlowStep(env, slow_ms / 1000) if case == "slow" else env


def make_model(algo: str):
    if algo == "ppo":
        return PPO("MlpPolicy", ENV_ID, n_steps=2048, seed=0, verbose=0)
    return SAC("MlpPolicy", ENV_ID, learning_starts=1000, seed=0, verbose=0)


def train(algo: str, timesteps: int, callback) -> dict:
    model = make_model(algo)
    started = time.perf_counter()
    model.learn(timesteps, callback=callback)
    seconds = time.perf_counter() - started
    startup = getattr(callback, "startup_seconds", 0.0)
    return {
        "seconds": seconds,
        "rate": model.num_timesteps / seconds,
        "rate_without_startup": model.num_timesteps / (seconds - startup),
        "startup": startup,
        "evaluations": len(callback.evaluations_timesteps) if callback is not None else 0,
        "last": callback.last_mean_reward if callback is not None else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algo", choices=("ppo", "sac"), default="ppo")
    parser.add_argument("--timesteps", type=int, default=8_192)
    parser.add_argument("--eval-freq", type=int, default=1_024)
    parser.add_argument("--episodes", type=int, default=2, help="episodes per evaluation")
    parser.add_argument(
        "--slow-ms", type=float, default=2.0, help="extra ms per evaluation step, 'slow' case"
    )
    parser.add_argument("--cases", nargs="+", choices=("fast", "slow"), default=["fast", "slow"])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument(
        "--workers", type=int, default=1, help="ray_eval workers (1 leaves a core to training on 2)"
    )
    parser.add_argument(
        "--slow-workers",
        type=int,
        default=2,
        help="ray_eval workers in the slow case (its steps sleep: more workers need no more CPU)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    start_ray()
    log = tempfile.mkdtemp(prefix="sb3_callback_")
    common = dict(
        eval_freq=args.eval_freq, n_eval_episodes=args.episodes, log_path=log, verbose=0, warn=False
    )
    runners = {"no evaluation": lambda: train(args.algo, args.timesteps, None)}
    for case in args.cases:
        runners[f"SB3 EvalCallback (blocking), {case} eval"] = lambda case=case: train(
            args.algo, args.timesteps, SB3EvalCallback(eval_env(case, args.slow_ms), **common)
        )
        workers = args.slow_workers if case == "slow" else args.workers
        runners[f"ray_eval EvalCallback (async, {workers} worker(s)), {case} eval"] = (
            lambda case=case, workers=workers: train(
                args.algo,
                args.timesteps,
                RayEvalCallback(eval_env(case, args.slow_ms), num_workers=workers, **common),
            )
        )
    runs: dict[str, list[dict]] = {name: [] for name in runners}
    loads = [load_average()]
    for _ in range(args.repeats):
        for name, run in runners.items():
            runs[name].append(run())
        loads.append(load_average())

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    base = median("no evaluation", "rate")
    rows = []
    for name, results in runs.items():
        rates = [r["rate"] for r in results]
        rows.append(
            (
                name,
                f"{median(name, 'rate'):,.0f}",
                f"{min(rates):,.0f}-{max(rates):,.0f}",
                f"{median(name, 'rate') / base:.2f}x",
                f"{median(name, 'rate_without_startup'):,.0f}" if results[0]["startup"] else "-",
                f"{median(name, 'startup'):.1f}" if results[0]["startup"] else "-",
                f"{median(name, 'seconds'):.1f}",
                results[0]["evaluations"],
            )
        )
    print_table(
        f"{args.algo.upper()} on {ENV_ID}, {args.timesteps:,} timesteps, {args.episodes} "
        f"episodes every {args.eval_freq:,}, slow eval +{args.slow_ms:g} ms/step, median of "
        f"{args.repeats} (load {' / '.join(loads)})",
        [
            "run",
            "timesteps/s",
            "min-max",
            "vs none",
            "without worker start",
            "worker start s",
            "learn s",
            "evaluations",
        ],
        rows,
    )
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"sb3_callback_{args.algo}.json"
    out.write_text(json.dumps({"args": vars(args), "loads": loads, "runs": runs}, indent=1))
    print(f"every run: {out}")


if __name__ == "__main__":
    main()
