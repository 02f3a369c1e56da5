"""Float64 observations (MuJoCo's) for a float32 policy, on the gymnasium fast path.

The loop hands observations to the policy in the dtype of its parameters, as
TorchRL's ``DoubleToFloat`` would: without that, a float32 ``nn.Module`` fails on
float64 input ("mat1 and mat2 must have the same dtype").
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.envs import GymWrapper, StepCounter, TransformedEnv

from ray_eval import Evaluator
from tests.envs import Float64ObservationEnv


def seeded_policy(seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    policy = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1), nn.Tanh())
    return policy.to(dtype)


def replay(policy: nn.Module, seeds, dtype: torch.dtype) -> np.ndarray:
    """Each episode's return, stepped by hand, observations cast to ``dtype``.

    All episodes run side by side with one policy call per step on all of them,
    as the evaluator's loop runs them (one slot per episode, every episode 5
    steps long). The same batch layout gives the same bits: a matrix product on
    1 row differs from one on 6 rows in the last bits, and a return near zero
    then fails any relative tolerance.
    """
    envs = [Float64ObservationEnv() for _ in seeds]
    obs = np.stack([env.reset(seed=int(seed))[0] for env, seed in zip(envs, seeds)])
    returns = np.zeros(len(seeds))
    done = False
    while not done:
        with torch.no_grad():
            actions = policy(torch.as_tensor(obs, dtype=dtype)).numpy()
        for slot, env in enumerate(envs):
            obs[slot], reward, done, _, _ = env.step(actions[slot])
            returns[slot] += float(np.float32(reward))
    return returns


def test_float64_observations_reach_a_float32_policy_as_float32(ray_local):
    policy = seeded_policy(0)
    with Evaluator(
        Float64ObservationEnv(), policy, num_workers=1, num_trajectories=6, timeout=120
    ) as evaluator:
        result = evaluator.evaluate()
        episodes = evaluator.last_episodes
        assert evaluator.workers[0].rollouts[""] == "GymnasiumRollout"
    assert result["eval/num_episodes"] == 6
    np.testing.assert_array_equal(episodes.returns, replay(policy, episodes.seeds, torch.float32))


def test_a_float64_policy_gets_float64_observations(ray_local):
    policy = seeded_policy(0, torch.float64)
    with Evaluator(Float64ObservationEnv, policy, num_workers=0, num_trajectories=3) as evaluator:
        evaluator.evaluate()
        episodes = evaluator.last_episodes
    np.testing.assert_array_equal(episodes.returns, replay(policy, episodes.seeds, torch.float64))


def half_precision_replay(policy: nn.Module, seeds, dtype: torch.dtype) -> list[float]:
    """``replay`` for a bfloat16/float16 policy: its actions go to the env as float32."""
    returns = []
    env = Float64ObservationEnv()
    for seed in seeds:
        obs, _ = env.reset(seed=int(seed))
        total, done = 0.0, False
        while not done:
            with torch.no_grad():
                action = policy(torch.as_tensor(obs, dtype=dtype)[None])[0].float().numpy()
            obs, reward, done, _, _ = env.step(action)
            total += float(np.float32(reward))
        returns.append(total)
    return returns


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["gymnasium", "torchrl"])
def test_half_precision_policies_get_observations_in_their_dtype(dtype, kind):
    """bf16 failed at construction ("Got unsupported ScalarType BFloat16": numpy has no
    bf16), and on a TorchRL env both failed on float64 observations. Observations are
    cast to the policy's dtype, actions back to the env's, returns summed in float64."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1), nn.Tanh()).to(dtype)
    if kind == "gymnasium":
        env, policy, loop = Float64ObservationEnv, net, "GymnasiumRollout"
    else:
        env = TransformedEnv(GymWrapper(Float64ObservationEnv()), StepCounter())
        policy = TensorDictModule(net, in_keys=["observation"], out_keys=["action"])
        loop = "TorchRLRollout"
    with Evaluator(env, policy, num_workers=0, num_trajectories=4) as evaluator:
        result = evaluator.evaluate()
        episodes = evaluator.last_episodes
        assert evaluator.workers[0].rollouts[""] == loop
    assert result["eval/num_episodes"] == 4 and episodes.returns.dtype == np.float64
    # the same actions within the rounding of a half-precision batch (5 steps of |a| <= 1)
    expected = half_precision_replay(net, episodes.seeds, dtype)
    np.testing.assert_allclose(episodes.returns, expected, atol=5 * 2**-7)
    assert np.abs(episodes.returns).max() > 0.1  # the policy ran: the reward is its action
