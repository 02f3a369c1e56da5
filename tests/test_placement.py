"""Worker placement on a real multi-node cluster (ray.cluster_utils.Cluster on this machine)."""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster
from torch import nn

from ray_eval import Evaluator


@pytest.fixture
def three_node_cluster(no_ray):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [cluster.add_node(num_cpus=2, resources={"eval_slot": 2}) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def test_spread_puts_workers_on_different_nodes_and_pack_on_one(three_node_cluster):
    _, nodes = three_node_cluster
    with Evaluator(
        "CartPole-v1",
        nn.Linear(4, 2),
        num_workers=2,
        num_trajectories=4,
        placement="spread",
        resources_per_worker={"eval_slot": 1},
    ) as ev:
        spread_nodes = [w.node_id for w in ev.workers]
        result = ev.evaluate()
    assert len(set(spread_nodes)) == 2
    assert set(spread_nodes) == {n.node_id for n in nodes}  # only nodes with the custom resource
    assert set(result.episodes.workers.tolist()) == {0, 1}

    with Evaluator(
        "CartPole-v1",
        nn.Linear(4, 2),
        num_workers=2,
        num_trajectories=4,
        placement="strict_pack",
        resources_per_worker={"eval_slot": 1},
    ) as ev:
        packed_nodes = {w.node_id for w in ev.workers}
        assert ev.evaluate()["eval/num_episodes"] == 4
    assert len(packed_nodes) == 1


def test_workers_run_on_cpu_by_default_and_report_their_device(three_node_cluster):
    with Evaluator(
        "CartPole-v1", nn.Linear(4, 2), num_workers=2, num_trajectories=2, num_cpus_per_worker=0.5
    ) as ev:
        assert {w.device for w in ev.workers} == {"cpu"}
        assert ev.evaluate()["eval/num_episodes"] == 2
