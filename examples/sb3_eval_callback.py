"""stable-baselines3 with ``ray_eval.sb3.EvalCallback``: evaluation on Ray workers while PPO trains.

PPO on CartPole-v1 with ``VecNormalize``. The callback is SB3's ``EvalCallback``
(same arguments, same ``best_mean_reward``, ``evaluations.npz``, child callbacks);
it evaluates in the background, keeps the best model as it was evaluated with
its ``VecNormalize`` statistics beside it, and, with ``best_by="reward_ci_low"``,
SB3's ``StopTrainingOnRewardThreshold`` stops on the lower bound of the reward's
95% interval rather than on a noisy mean.

At the end the best model and its statistics are reloaded and run through SB3's
own ``evaluate_policy`` on the evaluation's seeds: the same returns, episode by
episode (SB3 issue #1556 is what happens without the statistics).

Needs the sb3 extra:  pip install -e ".[sb3]"
Run:  python examples/sb3_eval_callback.py [--timesteps 30000] [--out outputs/sb3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gymnasium as gym
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import StopTrainingOnRewardThreshold
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from ray_eval.sb3 import EvalCallback


def make_env() -> gym.Env:
    return gym.make("CartPole-v1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--timesteps", type=int, default=30_000)
    parser.add_argument("--eval-freq", type=int, default=5_000)
    parser.add_argument("--episodes", type=int, default=10, help="episodes per evaluation")
    parser.add_argument(
        "--workers", type=int, default=None, help="Ray workers (default: free CPUs)"
    )
    parser.add_argument("--target", type=float, default=450.0, help="stop at reward_ci_low >= this")
    parser.add_argument("--out", type=Path, default=Path("outputs/sb3"))
    args = parser.parse_args()

    train_env = VecNormalize(DummyVecEnv([make_env]))
    eval_env = VecNormalize(DummyVecEnv([make_env]), training=False, norm_reward=False)
    model = PPO("MlpPolicy", train_env, seed=0, verbose=0)
    callback = EvalCallback(
        eval_env,
        callback_on_new_best=StopTrainingOnRewardThreshold(reward_threshold=args.target, verbose=1),
        n_eval_episodes=args.episodes,
        eval_freq=args.eval_freq,
        log_path=str(args.out),
        best_model_save_path=str(args.out),
        best_by="reward_ci_low",
        num_workers=args.workers,
        warn=False,
    )
    model.learn(args.timesteps, callback=callback)
    print(
        f"trained {model.num_timesteps} timesteps; best reward_ci_low {callback.best_mean_reward:.1f}"
    )

    best = json.loads((args.out / "best_model.json").read_text())
    evaluated = next(r for r in callback.results if r["eval/step"] == best["step"])
    reloaded = PPO.load(args.out / "best_model")
    same = True
    for seed, recorded in zip(evaluated.episodes.seeds, evaluated.episodes.returns):
        env = VecNormalize.load(str(args.out / "vecnormalize.pkl"), DummyVecEnv([make_env]))
        env.training, env.norm_reward = False, False
        env.seed(int(seed))
        rewards, _ = evaluate_policy(
            reloaded, env, n_eval_episodes=1, return_episode_rewards=True, warn=False
        )
        same &= rewards[0] == recorded
    print(
        f"best model: timestep {best['step']}, mean {evaluated['eval/reward']:.1f}, 95% CI "
        f"[{evaluated['eval/reward_ci_low']:.1f}, {evaluated['eval/reward_ci_high']:.1f}]; "
        f"reloaded with vecnormalize.pkl, SB3's evaluate_policy gives "
        f"{'the same returns, episode by episode' if same else 'DIFFERENT returns'}"
    )


if __name__ == "__main__":
    main()
