"""Train a small CartPole policy while ``ray-eval watch`` evaluates its checkpoints.

The trainer (augmented random search on the MLP that ``configs/cartpole.yaml``
describes) writes ``policy_step_<env steps>.pt`` after every iteration; a
``ray-eval watch`` subprocess evaluates each one on Ray workers as it appears
and appends a result line; at the end ``ray-eval plot`` draws the learning curve.

Run:  python examples/train_and_watch.py [--iterations 30] [--out outputs/train_and_watch]
Then: outputs/train_and_watch/results.jsonl and outputs/curve.png
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ray_eval.factories import MLPPolicy

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cartpole.yaml"


def episode_return(
    actor: torch.nn.Module, env: gym.Env, seed: int, max_steps: int = 500
) -> tuple[float, int]:
    """Return and length of one deterministic episode."""
    obs, _ = env.reset(seed=seed)
    total, steps = 0.0, 0
    with torch.no_grad():
        for steps in range(1, max_steps + 1):  # noqa: B007 - the length is read after the loop
            action = int(actor(torch.as_tensor(obs)[None])[0])
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
    return total, steps


def save_checkpoint(policy: torch.nn.Module, directory: Path, step: int) -> Path:
    """Write atomically (temporary name, then rename): the watcher never sees half a file."""
    path = directory / f"policy_step_{step}.pt"
    tmp = directory / f".{path.name}.tmp"
    torch.save(policy.state_dict(), tmp)
    os.replace(tmp, path)
    return path


def train(directory: Path, iterations: int, seed: int = 0, pace: float = 0.0) -> int:
    """Augmented random search; one checkpoint per iteration. Returns the number written."""
    env = gym.make("CartPole-v1")
    # The same factory the config uses, so the checkpoint keys fit the evaluated policy.
    policy = MLPPolicy(hidden_sizes=(32,), activation="tanh", init_seed=0)(env)
    actor = policy.module
    theta = parameters_to_vector(actor.parameters()).detach()
    rng = np.random.default_rng(seed)
    directions, noise, lr = 8, 0.1, 0.05
    env_steps = 0
    save_checkpoint(policy, directory, env_steps)
    for iteration in range(1, iterations + 1):
        started = time.monotonic()
        deltas = torch.as_tensor(
            rng.standard_normal((directions, theta.numel())), dtype=theta.dtype
        )
        returns = []
        for k, delta in enumerate(deltas):
            pair = []
            for sign in (1.0, -1.0):
                vector_to_parameters(theta + sign * noise * delta, actor.parameters())
                ret, length = episode_return(actor, env, seed=1000 * iteration + k)
                pair.append(ret)
                env_steps += length
            returns.append(pair)
        r = np.asarray(returns)
        std = r.std() or 1.0
        weights = torch.as_tensor(r[:, 0] - r[:, 1], dtype=theta.dtype)
        theta = theta + lr / (directions * std) * (weights @ deltas)
        vector_to_parameters(theta, actor.parameters())
        path = save_checkpoint(policy, directory, env_steps)
        print(f"iteration {iteration}: mean return {r.mean():.1f}, wrote {path.name}", flush=True)
        time.sleep(max(0.0, pace - (time.monotonic() - started)))
    return iterations + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument(
        "--pace",
        type=float,
        default=0.5,
        help="least seconds per iteration, as a real (slower) training loop would take",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/train_and_watch"))
    parser.add_argument("--plot", type=Path, default=Path("outputs/curve.png"))
    args = parser.parse_args()

    shutil.rmtree(args.out, ignore_errors=True)
    checkpoints = args.out / "checkpoints"
    checkpoints.mkdir(parents=True)
    results = args.out / "results.jsonl"
    ray_eval = [sys.executable, "-m", "ray_eval"]
    watcher = subprocess.Popen(
        [
            *ray_eval,
            "watch",
            str(CONFIG),
            "--checkpoint-dir",
            str(checkpoints),
            "--output",
            str(results),
            "--poll-interval",
            "1",
            "--max-checkpoints",
            str(args.iterations + 1),
            "--unreadable-timeout",
            "120",
        ]
    )
    try:
        train(checkpoints, args.iterations, pace=args.pace)
        print("training done; waiting for the watcher to evaluate the last checkpoints", flush=True)
        code = watcher.wait(timeout=600)
    finally:
        if watcher.poll() is None:
            watcher.terminate()
            watcher.wait(timeout=60)
    if code != 0:
        sys.exit(f"ray-eval watch failed with exit code {code}")
    subprocess.run([*ray_eval, "plot", str(results), "-o", str(args.plot)], check=True)
    print(f"learning curve: {args.plot}")


if __name__ == "__main__":
    main()
