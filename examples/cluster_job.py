"""The same evaluator in a cluster job: connect to the running cluster first.

Submit it to a cluster with
    ray job submit --working-dir . -- python examples/cluster_job.py
or run it on a node of the cluster. Workers are spread over the nodes.
"""

from __future__ import annotations

import functools

import ray
import torch
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.envs import GymEnv

from ray_eval import Evaluator

if __name__ == "__main__":
    ray.init(address="auto")  # the cluster this job runs on
    print("cluster resources:", ray.cluster_resources())

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 1))
    policy = TensorDictModule(net, in_keys=["observation"], out_keys=["action"])
    n_cpus = int(ray.cluster_resources().get("CPU", 1))
    with Evaluator(
        functools.partial(GymEnv, "Pendulum-v1"),
        policy,
        num_workers=max(1, n_cpus),
        num_trajectories=64,
        placement="spread" if len(ray.nodes()) > 1 else None,
    ) as evaluator:
        for step in range(3):
            result = evaluator.evaluate(weights=policy, step=step)
            print(
                f"step {step}: reward {result['eval/reward']:.1f} "
                f"over {result['eval/num_episodes']} episodes, {result['eval/fps']:,.0f} steps/s"
            )
        print("workers ran on nodes:", sorted({w.node_id[:8] for w in evaluator.workers}))
