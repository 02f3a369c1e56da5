"""Live envs as ``env``: TorchRL ``EnvBase`` (transformed, batched) and ``gymnasium.Env``.

Each worker builds its env copies from the instance. A ``SerialEnv``/``ParallelEnv``
is evaluated as its sub-envs: finished episodes are counted per sub-env and the
numbers equal those of a factory of one sub-env. A ``ParallelEnv``'s processes
are never pickled; the user's instance stays open and usable.
"""

from __future__ import annotations

import functools
import threading
import time

import gymnasium as gym
import numpy as np
import pytest
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.envs import GymEnv, ParallelEnv, SerialEnv, TransformedEnv
from torchrl.envs.transforms import RewardSum, StepCounter
from torchrl.testing.mocking_classes import ContinuousActionVecMockEnv, MockBatchedLockedEnv

from ray_eval import Evaluator
from ray_eval.env_input import as_env_factory
from tests.envs import SeededCountdownEnv, SeedLengthEnv

MAX_STEPS = 5  # the StepCounter limit of the batched envs' sub-envs


def linear_policy(obs_dim: int, act_dim: int) -> TensorDictModule:
    net = nn.Linear(obs_dim, act_dim)
    nn.init.constant_(net.weight, 0.2)
    nn.init.constant_(net.bias, 0.0)
    return TensorDictModule(net, in_keys=["observation"], out_keys=["action"])


def capped_countdown():
    """One sub-env of the batched envs below (a module-level function of this test file)."""
    return TransformedEnv(SeededCountdownEnv(), StepCounter(max_steps=MAX_STEPS))


def evaluate(env, policy, **kwargs):
    with Evaluator(env, policy, timeout=120, **kwargs) as evaluator:
        result = evaluator.evaluate(step=0)
        return result, evaluator.last_episodes, evaluator.workers


@pytest.mark.parametrize(
    ("make_env", "obs_dim", "act_dim", "loop"),
    [
        (ContinuousActionVecMockEnv, 7, 7, "TorchRLRollout"),
        (lambda: TransformedEnv(ContinuousActionVecMockEnv(), StepCounter(3)), 7, 7, "TorchRL"),
        (lambda: TransformedEnv(GymEnv("Pendulum-v1"), StepCounter(4)), 3, 1, "TorchRLRollout"),
        (lambda: GymEnv("Pendulum-v1"), 3, 1, "GymnasiumRollout"),  # bare: the fast path
        (lambda: gym.make("Pendulum-v1", max_episode_steps=6), 3, 1, "GymnasiumRollout"),
    ],
    ids=["mock", "transformed-mock", "transformed-gymenv", "gymenv", "gymnasium"],
)
def test_live_env_runs_on_ray_workers(ray_local, make_env, obs_dim, act_dim, loop):
    env = make_env()
    result, episodes, workers = evaluate(
        env, linear_policy(obs_dim, act_dim), num_workers=2, num_trajectories=4, max_steps=8
    )
    assert result["eval/num_episodes"] == 4
    assert all(w.rollouts[""].startswith(loop) for w in workers)
    assert set(episodes.workers.tolist()) == {0, 1}
    assert (episodes.lengths >= 1).all() and (episodes.lengths <= 8).all()


def test_live_env_is_copied_not_used(ray_local):
    env = SeedLengthEnv()
    env.reset(seed=5)
    evaluate(env, lambda obs: obs[:, :1], num_workers=0, num_trajectories=3)
    assert env._seed == 5  # the user's instance was never reset by the evaluation


def batched_expectation(seeds) -> tuple[list, list]:
    """(lengths, returns) of one capped sub-env per seed, run in-process from a factory."""
    _, episodes, _ = evaluate(
        capped_countdown, linear_policy(3, 1), num_workers=0, num_trajectories=len(seeds)
    )
    np.testing.assert_array_equal(episodes.seeds, seeds)
    return episodes.lengths, episodes.returns


def test_serial_env_is_evaluated_as_its_sub_envs(ray_local):
    env = TransformedEnv(SerialEnv(4, capped_countdown), RewardSum())
    result, episodes, _ = evaluate(env, linear_policy(3, 1), num_workers=2, num_trajectories=5)
    assert result["eval/num_episodes"] == 5  # exactly num_trajectories, not 4 or 8
    lengths, returns = batched_expectation(episodes.seeds)
    np.testing.assert_array_equal(episodes.lengths, lengths)
    np.testing.assert_array_equal(episodes.returns, returns)
    assert (episodes.lengths <= MAX_STEPS).all() and len(set(episodes.lengths.tolist())) > 1


def test_live_parallel_env_is_not_pickled_and_stays_usable(ray_local):
    env = ParallelEnv(2, capped_countdown)
    env.reset()  # its worker processes are running
    try:
        started = time.monotonic()
        result, episodes, _ = evaluate(
            TransformedEnv(env, RewardSum()),
            linear_policy(3, 1),
            num_workers=2,
            num_trajectories=6,
        )
        assert time.monotonic() - started < 120
        assert result["eval/num_episodes"] == 6
        lengths, returns = batched_expectation(episodes.seeds)
        np.testing.assert_array_equal(episodes.lengths, lengths)
        np.testing.assert_array_equal(episodes.returns, returns)
        assert not env.is_closed  # pickling a ParallelEnv would have closed it
        assert env.rollout(3)["next", "reward"].shape == (2, 3, 1)
    finally:
        if not env.is_closed:
            env.close()


class LockedEnv(SeedLengthEnv):
    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()


def test_unserializable_live_env_is_named_and_a_factory_suggested(ray_local):
    started = time.monotonic()
    with pytest.raises(TypeError) as raised:
        Evaluator(LockedEnv(), lambda obs: obs[:, :1], num_workers=1)
    message = str(raised.value)
    assert "live LockedEnv" in message and "env.lock (_thread.lock)" in message
    assert "factory" in message
    assert time.monotonic() - started < 10


def test_multi_task_batched_envs_are_refused_and_native_batches_copied_whole():
    multi_task = SerialEnv(
        2, SeededCountdownEnv, create_env_kwargs=[{"max_length": 5}, {"max_length": 9}]
    )
    with pytest.raises(TypeError, match=r"multi-task SerialEnv.*suite"):
        as_env_factory(multi_task)
    # Other batched envs are copied whole: each worker steps its copy as one batch.
    natively_batched = MockBatchedLockedEnv(batch_size=[3])
    copy = as_env_factory(natively_batched)()
    assert type(copy) is MockBatchedLockedEnv and tuple(copy.batch_size) == (3,)
    assert copy is not natively_batched


def test_same_sub_envs_built_alike_count_as_one_task():
    env = SerialEnv(3, [functools.partial(GymEnv, "Pendulum-v1") for _ in range(3)])
    copy = as_env_factory(env)()
    assert type(copy) is GymEnv and copy.batch_size == ()


def test_process_backend_keeps_torchrls_rule_for_live_envs():
    with pytest.raises(ValueError, match="requires `env` to be a callable"):
        as_env_factory(ContinuousActionVecMockEnv(), backend="process")
    assert callable(as_env_factory(ContinuousActionVecMockEnv, backend="process"))
