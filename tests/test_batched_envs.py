"""Batched TorchRL envs (``batch_size=[N]``): one env per worker, stepped as one batch.

A user ``EnvBase`` whose elements' episode lengths come from per-element generators
the test reads itself checks the accounting (exact quotas, ``_reset`` masks,
``max_steps`` cuts, an env whose elements all end and reset together); TorchRL's
``GymEnv("CartPole-v1", num_envs=8)``, from a factory and live, checks the contract
on a real batched env: exact episode counts, the same numbers in-process and on 2
Ray workers.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.data import Categorical, Composite, Unbounded
from torchrl.envs import EnvBase, GymEnv

from ray_eval import Evaluator
from ray_eval.backends.worker import EvalWorker, WorkerConfig
from ray_eval.env_input import as_env_factory
from ray_eval.planning import plan_chunks
from ray_eval.rollout.vector_loop import chunk_seed
from tests.checks import chunk_of

LONG = 30  # CountdownBatchEnv's long episodes


def draw(rng: np.random.Generator) -> int:
    return 1 + int(rng.integers(0, 3)) if rng.random() < 0.5 else LONG


class CountdownBatchEnv(EnvBase):
    """``batch_size=[n]``; element ``k`` earns ``k + 1`` per step (its agent reward).

    Element ``k``'s episode lengths are drawn in turn from ``default_rng(seed + k)``
    (``partial=True``: a ``_reset`` mask resets only the masked elements), or, with
    ``partial=False``, one shared generator draws one length for all elements at
    every reset, which ignores the mask and restarts every element: they all end
    together.
    """

    def __init__(self, n: int = 4, partial: bool = True) -> None:
        super().__init__(batch_size=torch.Size([n]))
        self.n, self.partial = n, partial
        self.observation_spec = Composite(
            observation=Unbounded((n, 2), dtype=torch.float32), shape=(n,)
        )
        self.action_spec = Categorical(2, shape=(n,), dtype=torch.int64)
        self.reward_spec = Unbounded((n, 1), dtype=torch.float32)
        self._seed = 0
        self._left = torch.zeros(n, dtype=torch.int64)

    def _set_seed(self, seed: int | None) -> None:
        self._seed = int(seed or 0)
        self._rngs = None

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        mask = None if tensordict is None else tensordict.get("_reset", None)
        if self._rngs is None or mask is None:
            count = self.n if self.partial else 1
            self._rngs = [np.random.default_rng(self._seed + k) for k in range(count)]
            mask = torch.ones(self.n, dtype=torch.bool)
        mask = mask.reshape(self.n)
        if self.partial:
            for k in torch.nonzero(mask).flatten().tolist():
                self._left[k] = draw(self._rngs[k])
        else:  # resets everything, whatever the mask says
            self._left[:] = draw(self._rngs[0])
        return TensorDict(
            {"observation": self._obs(), "done": torch.zeros(self.n, 1, dtype=torch.bool)},
            batch_size=self.batch_size,
        )

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        self._left -= 1
        done = (self._left <= 0).reshape(self.n, 1)
        reward = torch.arange(1, self.n + 1, dtype=torch.float32).reshape(self.n, 1)
        return TensorDict(
            {"observation": self._obs(), "reward": reward, "done": done, "terminated": done},
            batch_size=self.batch_size,
        )

    def _obs(self) -> torch.Tensor:
        return torch.stack([self._left.float(), torch.arange(self.n).float()], 1)


def expected_lengths(seed: int, n: int, per_slot: int, partial: bool) -> np.ndarray:
    """``[k, j]``: element ``k``'s ``j``-th episode length."""
    if partial:
        rngs = [np.random.default_rng(seed + k) for k in range(n)]
        return np.array([[draw(rng) for _ in range(per_slot)] for rng in rngs])
    rng = np.random.default_rng(seed)
    together = [draw(rng) for _ in range(per_slot)]
    return np.array([together] * n)


def worker(env, policy, max_steps: int | None = None) -> EvalWorker:
    config = WorkerConfig(
        env_factories={"": as_env_factory(env)}, max_steps=max_steps, torch_threads=None
    )
    built = EvalWorker(config, policy)
    info = built.describe()  # raises what the build raised
    assert info.rollouts == {"": "BatchedRollout"}
    return built


def constant_action(obs: torch.Tensor) -> torch.Tensor:
    """A plain policy: observations in, actions out."""
    return torch.zeros(obs.shape[0], dtype=torch.int64)


@pytest.mark.parametrize(
    ("partial", "max_steps", "cut_resets"),
    [(True, None, True), (True, 2, True), (True, 2, False), (False, None, True)],
    ids=["reset-mask", "max-steps-resets-the-element", "max-steps-waits", "reset-all-together"],
)
def test_each_element_counts_its_first_episodes_whatever_their_length(
    partial, max_steps, cut_resets
):
    # 14 episodes on 4 elements: elements 0-1 run 4 episodes, elements 2-3 run 3. Half the
    # episodes last LONG steps: counting the first 14 to end would take mostly short ones.
    # max_steps=2 cuts an element's episode and resets that element alone (its _reset mask),
    # or, for an env that cannot restart one element (GymEnv's num_envs batch), steps it
    # uncounted until the env ends that episode: the same episodes count either way here.
    env = functools.partial(CountdownBatchEnv, 4, partial)
    chunk = chunk_of(14)
    policy = TensorDictModule(constant_action, in_keys=["observation"], out_keys=["action"])
    built = worker(env, policy, max_steps)
    built.rollouts[""]._resets_elements = cut_resets
    batch = built.run(chunk)
    lengths = expected_lengths(chunk_seed(chunk), 4, 4, partial)
    expected = np.array([lengths[p % 4, p // 4] for p in range(14)])
    if max_steps is not None:
        expected = np.minimum(expected, max_steps)
    np.testing.assert_array_equal(batch.lengths, expected)
    # element k earns k + 1 per step: episode p ran on element p % 4
    np.testing.assert_array_equal(batch.returns, expected * (np.arange(14) % 4 + 1))
    if max_steps is None:
        assert 2 < (expected == LONG).sum() < 12  # both kinds are there to be biased against


def test_numbers_depend_on_the_batch_not_on_how_chunks_are_shared():
    # The plan cuts a batched env's episodes as a native vector env's, with the env's batch;
    # the same chunks come out for 1 and 3 workers, and a chunk gives the same episodes
    # whichever worker runs it, in whatever order.
    plans = [
        plan_chunks(
            {"": 50},
            seed=1,
            step=2,
            num_workers=w,
            envs_per_worker=64,
            vector_members=("",),
            member_batches={"": 4},
        )
        for w in (1, 3)
    ]
    assert [c.indices.tolist() for c in plans[0]] == [c.indices.tolist() for c in plans[1]]
    assert all(len(c) % 4 == 0 for c in plans[0][:-1]) and len(plans[0]) > 1
    env = functools.partial(CountdownBatchEnv, 4)
    first, second = worker(env, constant_action), worker(env, constant_action)
    forward = [first.run(c) for c in plans[0]]
    backward = [second.run(c) for c in reversed(plans[1])][::-1]
    for a, b in zip(forward, backward):
        np.testing.assert_array_equal(a.lengths, b.lengths)


class OneHotArgmax(nn.Module):
    """A deterministic CartPole policy for TorchRL's ``GymEnv`` (one-hot actions)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 2))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(self.net(obs).argmax(-1), 2)


def cartpole_policy() -> TensorDictModule:
    return TensorDictModule(OneHotArgmax(), in_keys=["observation"], out_keys=["action"])


def cartpole_batch(num_envs: int = 8):
    """A factory whose own ``num_envs`` is TorchRL's: it is not a vector factory."""
    return GymEnv("CartPole-v1", num_envs=num_envs)


def test_gym_env_batch_from_a_factory_and_live_in_process_and_on_two_workers(ray_local):
    common = {"num_trajectories": 20, "seed": 3}
    with Evaluator(cartpole_batch, cartpole_policy(), num_workers=2, **common) as ev:
        assert {w.rollouts[""] for w in ev.workers} == {"BatchedRollout"}
        on_ray = ev.evaluate(step=1)
    with Evaluator(cartpole_batch, cartpole_policy(), num_workers=0, **common) as ev:
        in_process = ev.evaluate(step=1)
    live = GymEnv("CartPole-v1", num_envs=8)
    try:
        with Evaluator(live, cartpole_policy(), num_workers=0, **common) as ev:
            from_live = ev.evaluate(step=1)
    finally:
        live.close()
    for result in (on_ray, in_process, from_live):
        assert result["eval/num_episodes"] == 20
        np.testing.assert_array_equal(np.sort(result.episodes.indices), np.arange(20))
        np.testing.assert_array_equal(result.episodes.returns, result.episodes.lengths)
    np.testing.assert_array_equal(on_ray.episodes.returns, in_process.episodes.returns)
    np.testing.assert_array_equal(from_live.episodes.returns, in_process.episodes.returns)
    assert on_ray["eval/reward"] == in_process["eval/reward"]
    assert len(set(in_process.episodes.lengths.tolist())) > 1


def test_a_factory_with_a_num_envs_default_keeps_its_meaning():
    # partial(make, num_envs=4) and make(num_envs=4) are env factories: the env they
    # build is the batch (4 elements), whatever envs_per_worker says.
    factory = functools.partial(CountdownBatchEnv, n=4)
    with Evaluator(
        factory, constant_action, num_workers=0, num_trajectories=6, envs_per_worker=64
    ) as ev:
        result = ev.evaluate(step=0)
        assert ev._backend.workers[0].batches == {"": 4}
    assert result["eval/num_episodes"] == 6


def test_wrong_actions_for_a_batched_env_name_the_key_and_shape():
    from ray_eval import ActionMismatchError

    def wrong(obs):
        return torch.zeros(2, dtype=torch.int64)

    with pytest.raises(ActionMismatchError, match=r"shape \(2,\).*expects shape \(4,\)"):
        Evaluator(CountdownBatchEnv, wrong, num_workers=0, num_trajectories=4)


def gym_vector(num_envs: int = 4):
    """A gymnasium vector factory whose num_envs has a default: what it returns decides."""
    import gymnasium as gym

    return gym.make_vec("CartPole-v1", num_envs=num_envs, vectorization_mode="vector_entry_point")


@pytest.mark.parametrize("marked", [True, False], ids=["VectorFactory", "by-what-it-returns"])
def test_a_gymnasium_vector_factory_is_one_marked_or_by_what_it_returns(marked):
    from ray_eval import VectorFactory

    env = VectorFactory(gym_vector) if marked else gym_vector
    policy = nn.Sequential(nn.Linear(4, 2))
    with Evaluator(env, policy, num_workers=0, num_trajectories=16, seed=2) as ev:
        worker = ev._backend.workers[0]
        assert worker.rollouts == {"": "VectorRollout"}
        result = ev.evaluate(step=0)
    assert result["eval/num_episodes"] == 16
    # the default batch for 16 episodes: 64 slots at most, the episodes if fewer
    assert result.episodes.lengths.min() >= 8
