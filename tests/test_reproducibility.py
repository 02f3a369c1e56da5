"""The same numbers, to the last bit, whatever the worker layout; and a config hash to match.

Episode ``i`` of the evaluation at step ``s`` is seeded from ``(seed, s, i)`` only and every
policy call sees a full batch of ``envs_per_worker`` rows (or of the evaluation's episodes,
if fewer), so a deterministic policy gives
bit-identical episodes on 4 workers and in-process, although the two split the episodes
into different chunks. ``envs_per_worker`` itself changes the batch, hence the bits: it is
part of the config hash.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ray_eval import Evaluator
from ray_eval.jobs.config import load_config
from tests.procs import ROOT

# 300 episodes, 64 env slots per worker (the default). In-process (one "worker") the plan
# has 4 chunks of 75, so slots are refilled as episodes end; on 4 workers it has chunks of
# 64, 64, 64, 64 and 44, the last with 20 idle slots. Episode 64, say, runs in a refilled
# slot of the first chunk in-process and in a fresh slot of the second chunk on 4 workers.
NUM_EPISODES = 300


def cartpole_logits_policy() -> nn.Module:
    """A fixed, untrained MLP: CartPole observation -> 2 logits (the action is the argmax).

    Its episodes last from ~60 to ~200 steps (97 distinct lengths in 300 episodes). A
    CartPole return is the episode's length, so this case checks the plan: seeds, chunks,
    slot refills and the order of the episodes.
    """
    generator = torch.Generator().manual_seed(15)
    policy = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 2))
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return policy


def mountain_car_policy() -> nn.Module:
    """A fixed MLP that pushes the car the way it moves, plus small random weights.

    The push makes episodes end at the goal after 79 to 118 steps, depending on the start;
    every action is continuous, so each bit of every policy output reaches the return
    (-0.1 a^2 per step). With this policy a batch of 7 instead of 64 rows changes the last
    bits of about 40% of the returns: this case catches batch-dependent arithmetic.
    """
    generator = torch.Generator().manual_seed(0)
    policy = nn.Sequential(
        nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1), nn.Tanh()
    )
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        policy[0].weight[0] = torch.tensor([0.0, 20.0])  # unit 0 follows the velocity
        policy[0].bias[0] = 0.0
        policy[2].weight[0, 0] = 3.0
        policy[4].weight[0, 0] = 5.0
    return policy


CASES = {
    "CartPole-v1": (cartpole_logits_policy, 50),  # policy, distinct episode lengths at least
    "MountainCarContinuous-v0": (mountain_car_policy, 15),
}


@pytest.mark.parametrize("env_id", list(CASES))
def test_four_workers_and_in_process_give_bit_identical_variable_length_episodes(ray_local, env_id):
    make_policy, distinct_lengths = CASES[env_id]
    policy = make_policy()
    results = {}
    for workers in (0, 4):
        with Evaluator(
            env_id, policy, num_workers=workers, num_trajectories=NUM_EPISODES, seed=11
        ) as ev:
            assert ev.num_workers == workers
            results[workers] = ev.evaluate(step=2)
    local, pooled = results[0].episodes, results[4].episodes
    # the layouts really differ: four workers shared the episodes, in-process ran them all
    assert set(pooled.workers.tolist()) == {0, 1, 2, 3}
    assert set(local.workers.tolist()) == {-1}
    # variable-length episodes, as the test needs
    assert len(np.unique(local.lengths)) >= distinct_lengths, np.unique(local.lengths)
    np.testing.assert_array_equal(pooled.indices, np.arange(NUM_EPISODES))
    np.testing.assert_array_equal(pooled.indices, local.indices)
    np.testing.assert_array_equal(pooled.seeds, local.seeds)
    np.testing.assert_array_equal(pooled.lengths, local.lengths)
    np.testing.assert_array_equal(pooled.returns, local.returns)
    timing = {"eval/fps", "eval/wall_time"}
    assert {k: v for k, v in results[4].items() if k not in timing} == {
        k: v for k, v in results[0].items() if k not in timing
    }


def test_the_mountain_car_case_sees_the_batch_size():
    """The case above could fail: another batch size gives other bits, in-process already."""
    returns = {}
    for envs_per_worker in (64, 7):
        with Evaluator(
            "MountainCarContinuous-v0",
            mountain_car_policy(),
            num_workers=0,
            num_trajectories=100,
            seed=11,
            envs_per_worker=envs_per_worker,
        ) as ev:
            returns[envs_per_worker] = ev.evaluate(step=2).episodes.returns
    assert (returns[64] != returns[7]).sum() >= 10
    np.testing.assert_allclose(returns[64], returns[7], rtol=1e-5)  # only the last bits


class CalledOn(nn.Module):
    """``policy``, refusing any batch but ``rows`` rows."""

    def __init__(self, policy: nn.Module, rows: int) -> None:
        super().__init__()
        self.policy, self.rows = policy, rows

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        if observation.shape[0] != self.rows:
            raise ValueError(f"policy called on {observation.shape[0]} rows, not {self.rows}")
        return self.policy(observation)


def test_a_short_evaluation_batches_its_episodes_not_envs_per_worker(ray_local):
    """20 episodes, envs_per_worker 64: every policy call has 20 rows, not 64, whether one
    process runs all 20 or 2 workers run 10 each (padding them to 64 rows made a short
    evaluation on 2 workers 10% slower), and the numbers stay bit-identical."""
    returns = {}
    for workers in (0, 2):
        with Evaluator(
            "MountainCarContinuous-v0",
            CalledOn(mountain_car_policy(), rows=20),
            num_workers=workers,
            num_trajectories=20,
            seed=11,
        ) as ev:
            episodes = ev.evaluate(step=2).episodes
        if workers:
            assert set(episodes.workers.tolist()) == {0, 1}
        returns[workers] = episodes.returns
    np.testing.assert_array_equal(returns[2], returns[0])


def test_envs_per_worker_is_part_of_the_config_hash():
    config = ROOT / "configs" / "cartpole.yaml"  # sets workers.envs_per_worker: 32

    def config_hash(*overrides: str) -> str:
        return load_config(config, overrides).config_hash()

    base = config_hash()
    assert config_hash("workers.envs_per_worker=32") == base
    hashes = {config_hash(f"workers.envs_per_worker={n}") for n in (1, 8, 32, 64)}
    assert len(hashes) == 4 and base in hashes
    # the number of workers and their resources do not change the numbers, nor the hash
    same = ["workers.num_workers=3", "workers.num_cpus=0.5", "workers.max_restarts=0"]
    assert config_hash(*same) == base
