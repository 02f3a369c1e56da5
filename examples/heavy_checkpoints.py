"""Checkpoints that fit configs/halfcheetah.yaml and configs/pong.yaml, then evaluated.

A trainer builds its policy with the same builder the config names (``MLPPolicy`` for
``policy.type: mlp``, ``NatureCNNPolicy`` for ``policy.type: nature_cnn``) and saves its
``state_dict``; ``ray-eval run`` loads it into the policy each worker builds. Here the
"training" is a small random change of the initial weights, so that the checkpoints
differ from the configs' initial policies.

Run: python examples/heavy_checkpoints.py [--out ckpt] [--step 0] [--no-eval]
Then: ray-eval run configs/halfcheetah.yaml --checkpoint ckpt/halfcheetah/policy_step_0.pt
      ray-eval run configs/pong.yaml --checkpoint ckpt/pong/policy_step_0.pt
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import torch

from ray_eval.factories import MLPPolicy, NatureCNNPolicy, atari_env

ROOT = Path(__file__).resolve().parents[1]


def policies() -> dict:
    """Each config's policy, built as the config builds it in every worker."""
    return {
        "halfcheetah": MLPPolicy((256, 256), "tanh")(gym.make("HalfCheetah-v5")),
        "pong": NatureCNNPolicy(init_seed=0)(atari_env("ALE/Pong-v5")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="ckpt", help="directory for the checkpoints")
    parser.add_argument("--step", type=int, default=0, help="the step in the file names")
    parser.add_argument("--no-eval", action="store_true", help="only write the checkpoints")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(args.step)
    written = {}
    for name, policy in policies().items():
        with torch.no_grad():  # stands in for training
            for param in policy.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
        path = Path(args.out) / name / f"policy_step_{args.step}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(policy.state_dict(), path)
        written[name] = path
        print(f"wrote {path}")
    if args.no_eval:
        return
    # A short evaluation of each checkpoint, in-process (workers.num_workers=0).
    for name, path in written.items():
        command = [
            sys.executable, "-m", "ray_eval", "run", str(ROOT / "configs" / f"{name}.yaml"),
            "--checkpoint", str(path), "--output", str(Path(args.out) / "results.jsonl"),
            "num_trajectories=2", "max_steps=200", "workers.num_workers=0",
        ]  # fmt: skip
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
