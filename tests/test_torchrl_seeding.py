"""Seeding TorchRL envs that take no ``reset(seed=...)``: the same numbers for any worker count.

TorchRL-native envs (its mock envs, custom ``EnvBase`` subclasses) are seeded
with ``env.set_seed(seed)`` before ``reset()``; gymnasium-backed ones with
``reset(seed=...)``. ``SeededCountdownEnv``'s ``_reset`` swallows a ``seed``
keyword without using it, so an evaluator that passed ``reset(seed=...)`` to it
would run unseeded episodes: the lengths below would not be the ones its seeds give.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.envs import GymEnv, TransformedEnv
from torchrl.envs.transforms import StepCounter
from torchrl.testing.mocking_classes import ContinuousActionVecMockEnv

from ray_eval import Evaluator
from ray_eval.rollout.torchrl_env import reset_takes_seed
from tests.envs import SeededCountdownEnv


class SeedKeywordEnv(SeededCountdownEnv):
    """Takes the seed as ``_reset``'s own keyword."""

    def _reset(self, tensordict=None, seed=None, **kwargs):
        if seed is not None:
            self._set_seed(seed)
        return super()._reset(tensordict)


def countdown_policy(seed: int = 0) -> TensorDictModule:
    net = nn.Linear(3, 1)
    nn.init.constant_(net.weight, 0.3)
    nn.init.constant_(net.bias, -0.1)
    return TensorDictModule(net, in_keys=["observation"], out_keys=["action"])


def expected_length(seed: int) -> int:
    env = SeededCountdownEnv()
    env.set_seed(int(seed))
    env.reset()
    return env._length


@pytest.mark.parametrize(
    ("make_env", "takes_seed"),
    [
        (functools.partial(GymEnv, "Pendulum-v1"), True),
        (lambda: TransformedEnv(GymEnv("Pendulum-v1"), StepCounter()), True),
        (SeedKeywordEnv, True),
        (SeededCountdownEnv, False),  # _reset(tensordict, **kwargs): a seed would be lost
        (lambda: TransformedEnv(SeededCountdownEnv(), StepCounter()), False),
        (ContinuousActionVecMockEnv, False),  # _reset(tensordict): a seed would raise
    ],
)
def test_how_an_env_is_seeded_is_read_from_its_classes(make_env, takes_seed):
    assert reset_takes_seed(make_env()) is takes_seed


def test_live_set_seed_env_gives_the_same_numbers_for_any_worker_count(ray_local):
    env = SeededCountdownEnv()  # a live instance
    results = {}
    for workers in (0, 1, 2):
        with Evaluator(
            env,
            countdown_policy(),
            num_workers=workers,
            num_trajectories=12,
            envs_per_worker=4,  # several chunks per worker, slots reused
            seed=7,
        ) as evaluator:
            evaluator.evaluate(step=3)
            results[workers] = evaluator.last_episodes
    local = results[0]
    # Seeded for real: every episode has the length its own seed gives.
    np.testing.assert_array_equal(local.lengths, [expected_length(s) for s in local.seeds])
    assert len(set(local.lengths.tolist())) > 3  # lengths vary with the seed
    for workers in (1, 2):
        np.testing.assert_array_equal(results[workers].seeds, local.seeds)
        np.testing.assert_array_equal(results[workers].lengths, local.lengths)
        np.testing.assert_array_equal(results[workers].returns, local.returns)
    assert set(results[2].workers.tolist()) == {0, 1}  # both workers ran episodes


def test_seed_keyword_env_is_seeded_through_reset(ray_local):
    with Evaluator(
        SeedKeywordEnv(), countdown_policy(), num_workers=1, num_trajectories=6
    ) as evaluator:
        evaluator.evaluate()
        episodes = evaluator.last_episodes
    np.testing.assert_array_equal(episodes.lengths, [expected_length(s) for s in episodes.seeds])
