"""Native vector envs (EnvPool, gymnasium ``vector_entry_point``, a ``num_envs`` factory).

Each worker steps one vector env of ``envs_per_worker`` slots with one policy
call per step. The accounting is checked against independent replays: an
EnvPool loop written out slot by slot, and a vector env whose episode lengths
come from per-slot generators the test reads itself.
"""

from __future__ import annotations

import functools
import importlib.util

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector.utils import batch_space
from torch import nn

from ray_eval import Evaluator
from ray_eval.backends.worker import EvalWorker, WorkerConfig
from ray_eval.env_input import as_env_factory
from ray_eval.factories import MLPPolicy
from ray_eval.planning import episode_seed, plan_chunks
from ray_eval.rollout.vector_loop import NEXT_STEP, SAME_STEP, chunk_seed
from tests.checks import chunk_of

LONG = 40  # CoinFlipVectorEnv's long episodes

# EnvPool is in the test extras where it has wheels (Python >= 3.11, Linux).
needs_envpool = pytest.mark.skipif(
    importlib.util.find_spec("envpool") is None, reason="EnvPool is not installed"
)


def cartpole_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2)
    )


class CoinFlipVectorEnv(gym.vector.VectorEnv):
    """Episodes of 1 or ``LONG`` steps, reward 1 per step, whatever the actions.

    Slot ``k``'s episode lengths are drawn in turn from ``default_rng(seed + k)``,
    so the test knows every slot's episodes without stepping.
    """

    def __init__(self, num_envs: int, autoreset: str = NEXT_STEP) -> None:
        self.num_envs = num_envs
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.single_action_space = gym.spaces.Discrete(2)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.metadata = {"autoreset_mode": gym.vector.AutoresetMode(autoreset)}
        self._same_step = autoreset == SAME_STEP

    def reset(self, *, seed=None, options=None):
        self._rngs = [np.random.default_rng(seed + k) for k in range(self.num_envs)]
        self._left = np.array([draw(rng) for rng in self._rngs])
        self._resetting = np.zeros(self.num_envs, dtype=bool)
        return self._obs(), {}

    def step(self, actions):
        assert actions.shape == (self.num_envs,)
        reward = np.where(self._resetting, 0.0, 1.0).astype(np.float32)
        self._left -= ~self._resetting
        terminated = (self._left == 0) & ~self._resetting
        for k in np.flatnonzero(self._resetting | (terminated & self._same_step)):
            self._left[k] = draw(self._rngs[k])
        self._resetting = terminated & (not self._same_step)
        return self._obs(), reward, terminated, np.zeros(self.num_envs, dtype=bool), {}

    def _obs(self) -> np.ndarray:
        return np.stack([self._left, np.arange(self.num_envs)], axis=1).astype(np.float32)


def draw(rng: np.random.Generator) -> int:
    return 1 if rng.random() < 0.5 else LONG


def slot_lengths(seed: int, slots: int, per_slot: int) -> np.ndarray:
    """``[k, j]``: the length of slot ``k``'s ``j``-th episode in a CoinFlipVectorEnv."""
    rngs = [np.random.default_rng(seed + k) for k in range(slots)]
    return np.array([[draw(rng) for _ in range(per_slot)] for rng in rngs])


def worker(env, policy, envs_per_worker: int, max_steps: int | None = None) -> EvalWorker:
    config = WorkerConfig(
        env_factories={"": as_env_factory(env)},
        envs_per_worker=envs_per_worker,
        max_steps=max_steps,
        torch_threads=None,
    )
    built = EvalWorker(config, policy)
    built.describe()  # raises what the build raised
    return built


@pytest.mark.parametrize("autoreset", [NEXT_STEP, SAME_STEP])
@pytest.mark.parametrize("max_steps", [None, 10])
def test_each_slot_counts_its_first_episodes_whatever_their_length(autoreset, max_steps):
    # 30 episodes on 8 slots: slots 0-5 run 4 episodes each, slots 6-7 run 3. Half the
    # episodes last 1 step, half LONG: counting the first 30 to finish would take almost
    # only 1-step ones. max_steps cuts the long ones; their slot then waits, uncounted,
    # until the env ends them, and counts its next episode.
    factory = functools.partial(CoinFlipVectorEnv, autoreset=autoreset)
    chunk = chunk_of(30)
    batch = worker(factory, nn.Linear(2, 2), 8, max_steps).run(chunk)
    lengths = slot_lengths(chunk_seed(chunk), 8, 4)
    expected = np.array([lengths[p % 8, p // 8] for p in range(30)])
    if max_steps is not None:
        expected = np.minimum(expected, max_steps)
    np.testing.assert_array_equal(batch.lengths, expected)
    np.testing.assert_array_equal(batch.returns, expected)
    assert 5 < (expected == 1).sum() < 25  # both kinds are there to be biased against


@needs_envpool
def test_envpool_chunk_matches_a_slot_by_slot_replay():
    import envpool

    policy = cartpole_mlp()
    chunk = chunk_of(30)
    batch = worker("envpool:CartPole-v1", policy, 8).run(chunk)

    # The replay: the same EnvPool env, seeded as the chunk says, stepped with the same
    # policy on the same batch; each slot's episodes read from EnvPool's own step counter.
    env = envpool.make_gymnasium("CartPole-v1", num_envs=8, seed=chunk_seed(chunk), num_threads=1)
    obs, _ = env.reset()
    episodes: list[list[tuple[float, int]]] = [[] for _ in range(8)]
    returns = [0.0] * 8
    with torch.no_grad():
        while min(len(e) for e in episodes) < 4:
            actions = policy(torch.from_numpy(obs)).argmax(1).numpy()
            obs, reward, terminated, truncated, info = env.step(actions)
            for k in range(8):
                if info["elapsed_step"][k] == 0:  # EnvPool's autoreset step: no episode's
                    continue
                returns[k] += float(reward[k])
                if terminated[k] or truncated[k]:
                    episodes[k].append((returns[k], int(info["elapsed_step"][k])))
                    returns[k] = 0.0
    expected = [episodes[p % 8][p // 8] for p in range(30)]
    np.testing.assert_array_equal(batch.returns, [r for r, _ in expected])
    np.testing.assert_array_equal(batch.lengths, [n for _, n in expected])
    assert batch.lengths.min() >= 8  # CartPole cannot fall sooner


@needs_envpool
def test_numbers_depend_on_episodes_and_slots_not_on_workers():
    # Vector chunks seed their env, so the chunking decides the numbers: it is the same
    # for 1 and 3 workers, and a chunk gives the same episodes on any worker, in any order.
    plans = [
        plan_chunks(
            {"": 300}, seed=1, step=2, num_workers=w, envs_per_worker=16, vector_members=("",)
        )
        for w in (1, 3)
    ]
    assert [c.indices.tolist() for c in plans[0]] == [c.indices.tolist() for c in plans[1]]
    assert len(plans[0]) > 1 and all(len(c) % 16 == 0 for c in plans[0][:-1])
    for c in plans[0]:  # one seed per chunk, from (seed, step, its first episode)
        np.testing.assert_array_equal(c.seeds, episode_seed(1, 2, int(c.indices[0])))
    first, second = (worker("envpool:CartPole-v1", cartpole_mlp(), 16) for _ in range(2))
    forward = [first.run(c) for c in plans[0]]
    backward = [second.run(c) for c in reversed(plans[1])][::-1]
    for a, b in zip(forward, backward):
        np.testing.assert_array_equal(a.returns, b.returns)
        np.testing.assert_array_equal(a.lengths, b.lengths)
    # the MLP's CartPole episodes differ from seed to seed
    assert len(set(np.concatenate([b.lengths for b in forward]).tolist())) > 1


@needs_envpool
def test_two_ray_workers_count_exactly_and_reproducibly(ray_local):
    env = {"envpool": "envpool:CartPole-v1", "gymnasium": "vector:CartPole-v1"}
    with Evaluator(
        env,
        policy_factory=MLPPolicy((64, 64), init_seed=0),  # built from one slot's spaces
        num_workers=2,
        num_trajectories=200,
        envs_per_worker=16,
        seed=7,
    ) as ev:
        assert {w.rollouts[m] for w in ev.workers for m in env} == {"VectorRollout"}
        first, again, later = (ev.evaluate(step=s) for s in (3, 3, 4))
    for member in env:
        assert first[f"eval/{member}/num_episodes"] == 200
        episodes = first.episodes.select(member)
        np.testing.assert_array_equal(np.sort(episodes.indices), np.arange(200))
        np.testing.assert_array_equal(episodes.returns, episodes.lengths)  # reward 1 per step
        assert episodes.lengths.min() >= 8 and episodes.lengths.max() <= 500
        repeat = again.episodes.select(member)
        np.testing.assert_array_equal(episodes.returns, repeat.returns)
        assert not np.array_equal(episodes.returns, later.episodes.select(member).returns)
    # The contract: the numbers depend on (seed, step, episodes, envs_per_worker), not on
    # the number of workers.
    with Evaluator(
        env,
        policy_factory=MLPPolicy((64, 64), init_seed=0),
        num_workers=0,
        num_trajectories=200,
        envs_per_worker=16,
        seed=7,
    ) as ev:
        in_process = ev.evaluate(step=3)
    for member in env:
        np.testing.assert_array_equal(
            in_process.episodes.select(member).returns, first.episodes.select(member).returns
        )


def envpool_without_seed(num_envs):
    import envpool

    return envpool.make_gymnasium("CartPole-v1", num_envs=num_envs)


def envpool_without_num_envs():
    import envpool

    return envpool.make_gymnasium("CartPole-v1", num_envs=4)


def gym_vector_without_num_envs():
    return gym.make_vec("CartPole-v1", num_envs=4, vectorization_mode="vector_entry_point")


@pytest.mark.parametrize(
    ("env", "kwargs", "error", "words"),
    [
        ("envpool:NoSuchTask-v0", {}, ValueError, "not an EnvPool task id"),
        ("vector:Pendulum-v1", {}, ValueError, "no vector_entry_point"),
        ("envpool:CartPole-v1", {"record_video": 1}, ValueError, "native vector env"),
        (envpool_without_num_envs, {}, TypeError, "give it a num_envs parameter"),
        (gym_vector_without_num_envs, {}, TypeError, "give it a num_envs parameter"),
        (envpool_without_seed, {}, TypeError, "give the factory a seed parameter"),
        ("envpool:CartPole-v1", {"metrics_fn": lambda td: {}}, TypeError, "episode_metrics_fn"),
        ("vector:CartPole-v1", {"policy": nn.Linear(4, 3)}, TypeError, r"\(10, 2\) one-hot"),
        ("envpool:CartPole-v1", {"policy": lambda obs: obs[:, 0] * 0 + 2}, TypeError, "outside"),
    ],
)
@needs_envpool
def test_what_cannot_run_on_a_vector_env_says_why_at_construction(env, kwargs, error, words):
    kwargs = {"policy": cartpole_mlp(), "envs_per_worker": 16, **kwargs}
    with pytest.raises(error, match=words):
        Evaluator(env, num_workers=0, **kwargs)
