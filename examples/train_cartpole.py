"""A training loop that really learns, evaluated in the background by ray_eval.

REINFORCE on CartPole-v1 (a few hundred lines shorter than it sounds). Every few
iterations the trainer hands the latest weights to the evaluator and carries on;
results come back through ``poll()`` while training continues, and the greedy
policy's evaluation reward rises as the policy learns.

Run: python examples/train_cartpole.py
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from ray_eval import Evaluator

ITERATIONS = 60
EPISODES_PER_ITERATION = 8
EVAL_EVERY = 10


def collect_episode(env: gym.Env, policy: nn.Module, seed: int):
    """One episode with actions sampled from the policy: log-probs and rewards."""
    obs, _ = env.reset(seed=seed)
    log_probs, rewards, done = [], [], False
    while not done:
        logits = policy(torch.as_tensor(obs))
        dist = torch.distributions.Categorical(logits=logits)
        action = dist.sample()
        log_probs.append(dist.log_prob(action))
        obs, reward, terminated, truncated, _ = env.step(action.item())
        rewards.append(reward)
        done = terminated or truncated
    return torch.stack(log_probs), np.array(rewards)


def returns_to_go(rewards: np.ndarray, gamma: float = 0.99) -> np.ndarray:
    out, running = np.zeros_like(rewards), 0.0
    for t in reversed(range(len(rewards))):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


def main() -> None:
    torch.manual_seed(0)
    env = gym.make("CartPole-v1")
    policy = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 2))  # observation -> logits
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)

    # The evaluator acts greedily (argmax of the logits): the deterministic policy.
    evaluator = Evaluator("CartPole-v1", policy, num_trajectories=32, busy_policy="queue")
    for iteration in range(ITERATIONS):
        losses, train_returns = [], []
        for k in range(EPISODES_PER_ITERATION):
            log_probs, rewards = collect_episode(env, policy, seed=iteration * 100 + k)
            g = torch.as_tensor(returns_to_go(rewards), dtype=torch.float32)
            g = (g - g.mean()) / (g.std() + 1e-8)
            losses.append(-(log_probs * g).sum())
            train_returns.append(rewards.sum())
        optimizer.zero_grad()
        torch.stack(losses).mean().backward()
        optimizer.step()

        if iteration % EVAL_EVERY == 0 or iteration == ITERATIONS - 1:
            evaluator.trigger_eval(weights=policy, step=iteration)  # returns at once
        while (result := evaluator.poll()) is not None:
            print(
                f"  eval @ iteration {result['eval/step']:3d}: reward {result['eval/reward']:6.1f} "
                f"(95% CI {result['eval/reward_ci_low']:.1f}..{result['eval/reward_ci_high']:.1f}, "
                f"{result['eval/num_episodes']} episodes, {result['eval/fps']:,.0f} steps/s)"
            )
        print(f"iteration {iteration:3d}: train return {np.mean(train_returns):6.1f}")

    while (result := evaluator.wait(timeout=120)) is not None:
        print(f"  eval @ iteration {result['eval/step']:3d}: reward {result['eval/reward']:6.1f}")
    evaluator.shutdown()


if __name__ == "__main__":
    main()
