"""The gymnasium loop steps below ``gym.make``'s bookkeeping wrappers, with the same episodes."""

from __future__ import annotations

import functools
import math

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from ray_eval import Evaluator
from ray_eval.rollout.loops import _direct_step

LIMIT = 37  # an unusual TimeLimit, so that the loop must take it from the wrapper


class PassThrough(gym.Wrapper):
    """A user's wrapper: the loop must keep the whole stack."""


def pendulum_with_user_wrapper() -> gym.Env:
    return PassThrough(gym.make("Pendulum-v1", max_episode_steps=LIMIT))


def test_direct_step_skips_only_bookkeeping_wrappers_once_checked():
    env = gym.make("Pendulum-v1", max_episode_steps=LIMIT)
    assert _direct_step(env, math.inf) == (env.step, math.inf)  # the checker has not run yet
    env.reset(seed=0)
    for _ in range(2):  # PassiveEnvChecker checks the first two steps
        env.step(env.action_space.sample())
    assert _direct_step(env, math.inf) == (env.unwrapped.step, LIMIT)
    assert _direct_step(env, 10) == (env.unwrapped.step, 10)  # max_steps below the TimeLimit
    wrapped = PassThrough(env)
    assert _direct_step(wrapped, math.inf) == (wrapped.step, math.inf)


def test_same_episodes_as_through_the_whole_wrapper_stack():
    torch.manual_seed(0)
    policy = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
    factories = {
        "direct": functools.partial(gym.make, "Pendulum-v1", max_episode_steps=LIMIT),
        "stack": pendulum_with_user_wrapper,
    }
    results = {}
    for name, factory in factories.items():
        with Evaluator(
            factory, policy, num_workers=0, num_trajectories=10, envs_per_worker=4, seed=2
        ) as ev:
            # the first evaluation lets gymnasium's checker run, the next ones step directly
            results[name] = [ev.evaluate(step=step).episodes for step in (0, 1, 2)]
    for direct, stack in zip(results["direct"], results["stack"]):
        np.testing.assert_array_equal(direct.lengths, np.full(10, LIMIT))
        np.testing.assert_array_equal(direct.lengths, stack.lengths)
        np.testing.assert_array_equal(direct.returns, stack.returns)
