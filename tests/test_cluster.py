"""A node disappears mid-evaluation, on a real multi-node Ray cluster on this machine.

``ray.cluster_utils.Cluster`` runs a head and extra nodes, each with its own
raylet and resources; ``remove_node`` kills a node's processes (its raylet and
every worker on it). Nothing is mocked.
"""

from __future__ import annotations

import functools
import time

import numpy as np
import ray
from ray.cluster_utils import Cluster

from ray_eval import Evaluator
from tests.checks import fresh_weights, small_policy
from tests.envs import SeedLengthEnv


def test_node_removed_mid_evaluation_completes_with_every_episode(no_ray):
    policy = small_policy()
    weights = fresh_weights(policy, seed=3)
    plan = {"num_trajectories": 8, "envs_per_worker": 4, "seed": 2}
    make_env = functools.partial(SeedLengthEnv, step_sleep=0.01, action_reward=True)
    with Evaluator(make_env, policy, num_workers=0, **plan) as local:
        expected = local.evaluate(weights=weights, step=1)

    # The head holds the driver and the pool actor and no CPU; two one-CPU nodes
    # hold the two workers. No spare room until a third node joins.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False},
    )
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        with Evaluator(make_env, policy, num_workers=2, max_restarts=2, **plan) as ev:
            head_id = ray.get_runtime_context().get_node_id()
            placed = {w.node_id for w in ev.workers}
            assert placed == {n.node_id for n in nodes}  # one worker on each extra node
            victim = next(n for n in nodes if n.node_id == ev.workers[0].node_id)
            clean = ev.evaluate(weights=weights, step=1)

            ev.trigger_eval(weights=weights, step=1)
            time.sleep(0.4)  # both workers are in the middle of their chunk
            removed_at = time.perf_counter()
            cluster.remove_node(victim)
            result = ev.wait(timeout=120)
            recovered_s = time.perf_counter() - removed_at
            alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            assert victim.node_id not in alive and head_id in alive
            # The surviving worker ran the lost chunk: every episode, same numbers.
            assert set(result.episodes.workers.tolist()) == {1}

            # A node with room joins: the lost worker is restarted there and works again.
            joined_at = time.perf_counter()
            newcomer = cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            deadline = time.monotonic() + 90
            while True:
                after = ev.evaluate(weights=weights, step=1)
                if set(after.episodes.workers.tolist()) == {0, 1} or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            back_s = time.perf_counter() - joined_at
            assert set(after.episodes.workers.tolist()) == {0, 1}
            assert newcomer.node_id in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert result["eval/worker_restarts"] == 1
        assert after["eval/worker_restarts"] == 0
        for got in (clean, result, after):
            assert got["eval/num_episodes"] == 8
            assert sorted(got.episodes.indices.tolist()) == list(range(8))
            np.testing.assert_array_equal(got.episodes.returns, expected.episodes.returns)
            np.testing.assert_array_equal(got.episodes.lengths, expected.episodes.lengths)
        print(
            f"\n[node removed] evaluation completed {recovered_s:.2f} s after remove_node "
            f"(fault-free evaluation: {clean['eval/wall_time']:.2f} s, "
            f"{result['eval/worker_restarts']} worker restart); the lost worker ran again "
            f"{back_s:.2f} s after a node with room joined"
        )
    finally:
        ray.shutdown()
        cluster.shutdown()
