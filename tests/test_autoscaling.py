"""Autoscaling clusters: the workers wait for the nodes an autoscaler adds.

Ray's fake autoscaler runs here: a head with no CPU for workers, started with
an autoscaling config whose provider (``fake_multinode``, the one
``ray.cluster_utils.AutoscalingCluster`` drives) "launches" a node by starting
its raylet as processes on this machine. Nothing is mocked: the evaluator sees
too few CPUs, the autoscaler sees the pending workers and adds nodes, and a
shape that no node type has is refused by Ray's own autoscaler logic. Both
autoscalers run: v1 (``AutoscalingCluster``'s default) and v2 (the default for
KubeRay and ``ray up`` in Ray 2.60), which report what they know differently.

``AutoscalingCluster`` itself cannot run here as it is: it reads an
``example.yaml`` that Ray's wheel does not ship, and both its ``start`` and its
``shutdown`` run ``ray stop --force``, which ends every Ray process on the
machine, other people's too. ``LocalAutoscalingCluster`` keeps its interface,
writes the whole config itself, and runs ``ray start --head --block`` in a
session of its own on free ports and its own temp dir; the autoscaler starts
each node inside that session, so stopping it ends exactly those processes, by
pid, and checks that none is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from pathlib import Path

import pytest
import ray
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID
from ray.cluster_utils import AutoscalingCluster

from ray_eval import Evaluator, ResourceUnavailableError
from ray_eval.backends.resources import find_autoscaler, requested_resources
from tests.checks import small_policy
from tests.envs import SeedLengthEnv
from tests.procs import RayHead, env_for_subprocess

ENV = SeedLengthEnv  # episodes of 1 to 37 steps
ONE_CPU_NODES = {"cpu1": {"resources": {"CPU": 1}, "min_workers": 0, "max_workers": 2}}
NODE_OBJECT_STORE = 80 * 1024**2  # bytes: small, several "nodes" share this machine's memory
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
FAKE_HEAD = FAKE_HEAD_NODE_ID  # the node id the fake provider gives the head
# Autoscaler v2 (the default for KubeRay and `ray up` in Ray 2.60) on the fake provider.
V2_ENV = {
    "RAY_enable_autoscaler_v2": "1",
    "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD,
    "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD,
}


class LocalAutoscalingCluster(AutoscalingCluster):
    """``AutoscalingCluster`` that stops only what it started (see the module docstring)."""

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **extra):
        node_types = {
            name: {
                "node_config": {},
                "min_workers": 0,
                **spec,
                "resources": {"object_store_memory": NODE_OBJECT_STORE, **spec["resources"]},
            }
            for name, spec in worker_node_types.items()
        }
        node_types["ray.head.default"] = {
            "resources": dict(head_resources),
            "node_config": {},
            "max_workers": 0,
        }
        return {
            "cluster_name": "ray-eval-test",
            "max_workers": sum(t.get("max_workers", 0) for t in node_types.values()),
            "provider": {
                "type": "fake_multinode",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
                "launch_multiple": True,  # start every node a launch asks for, not one
                # v2 reads the provider's defaults from that missing example.yaml unless
                # the provider is "external": the same fake provider, named by module.
                **(
                    {"type": "external", "module": FAKE_PROVIDER, "head_node_id": FAKE_HEAD}
                    if autoscaler_v2
                    else {}
                ),
            },
            "available_node_types": node_types,
            "head_node_type": "ray.head.default",
            "idle_timeout_minutes": 10,  # the nodes stay for all the tests on a cluster
            "upscaling_speed": 2.0,
            **{key: {} for key in ("auth", "docker", "file_mounts")},
            **{
                key: []
                for key in (
                    "initialization_commands",
                    "setup_commands",
                    "head_setup_commands",
                    "worker_setup_commands",
                    "head_start_ray_commands",
                    "worker_start_ray_commands",
                    "cluster_synced_files",
                    "rsync_exclude",
                    "rsync_filter",
                )
            },
            "file_mounts_sync_continuously": False,
            **extra,
        }

    def start(self, timeout: float = 120.0) -> None:
        self.head = RayHead(Path(tempfile.mkdtemp(prefix="rayas-", dir="/tmp")))
        self.address = f"{ray.util.get_node_ip_address()}:{self.head.gcs_port}"
        # The autoscaler starts each node's raylet with this GCS address.
        self._config["provider"]["gcs_address"] = self.address
        config = self.head.temp_dir / "autoscaling.json"
        config.write_text(json.dumps(self._config))
        self.head.start(
            [
                f"--autoscaling-config={config}",
                f"--num-cpus={self._head_resources.get('CPU', 0)}",
                f"--object-store-memory={2 * NODE_OBJECT_STORE}",
                "--include-dashboard=false",
            ],
            env=env_for_subprocess(
                **V2_ENV if self._autoscaler_v2 else {},
                RAY_FAKE_CLUSTER="1",  # the fake provider refuses to run without it
                AUTOSCALER_UPDATE_INTERVAL_S="1",
                # The driver's auth mode, which it cannot change once set: a local
                # ray.init() earlier in this process turned token auth on for good (in
                # RAY_AUTH_MODE), and a driver whose gRPC server wants a token cannot own
                # actors on a cluster that sends none (they die at once).
                RAY_AUTH_MODE="token" if os.environ.get("RAY_AUTH_MODE") == "token" else "disabled",
            ),
            timeout=timeout,
        )

    def shutdown(self) -> None:
        """Stop the head and every node the autoscaler started (all in its session)."""
        self.head.stop(grace=3)


@contextlib.contextmanager
def running_cluster(*, autoscaler_v2: bool):
    """A head with 0 CPUs; nodes of 1 CPU, at most 2, added on demand."""
    if ray.is_initialized():
        ray.shutdown()  # the shared local instance: these tests use their own cluster
    cluster = LocalAutoscalingCluster(
        head_resources={"CPU": 0}, worker_node_types=ONE_CPU_NODES, autoscaler_v2=autoscaler_v2
    )
    started = time.perf_counter()
    try:
        cluster.start()
        print(f"\n[autoscaling] fake cluster up in {time.perf_counter() - started:.1f} s")
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="class")
def v1_cluster():
    with running_cluster(autoscaler_v2=False) as cluster:
        yield cluster


@pytest.fixture
def on_v1(v1_cluster, no_ray):
    ray.init(address=v1_cluster.address, log_to_driver=False)
    return v1_cluster


@pytest.fixture
def on_v2(no_ray):
    with running_cluster(autoscaler_v2=True) as cluster:
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster


def construct_failing(**kwargs) -> tuple[ResourceUnavailableError, float]:
    started = time.perf_counter()
    with pytest.raises(ResourceUnavailableError) as info:
        Evaluator(ENV, small_policy(), **kwargs)
    return info.value, time.perf_counter() - started


# -- what a worker really asks for ------------------------------------------------------


def test_actor_options_override_the_worker_resources_as_options_does():
    base = {"CPU": 1, "GPU": 0, "eval_slot": 1}
    assert requested_resources(base, {}) == base
    assert requested_resources(base, {"num_cpus": 4, "num_gpus": 0.5}) == {
        "CPU": 4,
        "GPU": 0.5,
        "eval_slot": 1,
    }
    # ``resources`` replaces the custom resources as a whole, as in ``.options()``.
    assert requested_resources(base, {"resources": {"TPU": 2}}) == {"CPU": 1, "GPU": 0, "TPU": 2}
    assert requested_resources(base, {"memory": 2**30, "max_restarts": 5}) == {
        **base,
        "memory": 2**30,
    }


def test_actor_options_resources_are_what_the_checks_use(ray_local):
    """A fixed cluster (no autoscaler): actor_options' amounts fail fast, or fit."""
    assert find_autoscaler() is None  # a plain local instance cannot add nodes
    error, seconds = construct_failing(num_workers=1, actor_options={"num_cpus": 64})
    assert "each worker asks for {CPU: 64}, and no node has {CPU: 64}" in str(error)
    assert seconds < 5
    error, seconds = construct_failing(num_workers=1, ray_kwargs={"resources": {"TPU": 1}})
    assert "no node has {TPU: 1}" in str(error)
    assert seconds < 5
    # 64 CPUs per worker by argument, 1 by actor_options: the worker asks for 1 and starts.
    with Evaluator(
        ENV,
        small_policy(),
        num_workers=1,
        num_trajectories=2,
        num_cpus_per_worker=64,
        actor_options={"num_cpus": 1},
    ) as ev:
        assert ev.evaluate()["eval/num_episodes"] == 2


# -- an autoscaling cluster ---------------------------------------------------------------


class TestAutoscalerV1:
    """Autoscaler v1 (``AutoscalingCluster``'s default): one cluster for these tests."""

    def test_workers_wait_for_the_nodes_the_autoscaler_adds(self, on_v1):
        # A fixed cluster would fail fast here. The autoscaler may not have reported
        # yet either: the cluster has just started, as when a job starts with it.
        assert ray.cluster_resources().get("CPU", 0) == 0
        head = ray.get_runtime_context().get_node_id()
        started = time.perf_counter()
        with Evaluator(
            ENV, small_policy(), num_workers=2, num_trajectories=4, startup_timeout=120
        ) as ev:
            start_s = time.perf_counter() - started
            nodes = {w.node_id for w in ev.workers}
            assert len(nodes) == 2 and head not in nodes  # one worker on each added node
            result = ev.evaluate(step=1)
            assert result["eval/num_episodes"] == 4
            assert sorted(result.episodes.indices.tolist()) == [0, 1, 2, 3]
        assert ray.cluster_resources().get("CPU", 0) == 2
        assert str(find_autoscaler()) == "the cluster's autoscaler (v1)"
        print(f"\n[autoscaling] 2 workers started on 2 added nodes in {start_s:.1f} s")

    @pytest.mark.parametrize(
        ("kwargs", "named"),
        [
            ({"num_cpus_per_worker": 8}, "{CPU: 8}"),
            ({"actor_options": {"resources": {"TPU": 1}}}, "{TPU: 1}"),
        ],
        ids=["8-cpus", "custom-resource"],
    )
    def test_a_shape_no_node_type_has_fails_fast(self, on_v1, kwargs, named):
        error, seconds = construct_failing(num_workers=2, startup_timeout=120, **kwargs)
        message = str(error)
        assert "no node type of this autoscaling cluster can host one worker" in message
        assert f"no node has {named}" in message
        assert "the cluster's autoscaler (v1) saw this request" in message
        assert seconds < 30  # far below startup_timeout: the autoscaler's verdict, not a timeout
        print(f"\n[autoscaling] v1, {named}: refused after {seconds:.1f} s: {message}")

    def test_more_workers_than_the_autoscaler_provides_time_out_naming_it(self, on_v1):
        """3 one-CPU workers, at most 2 one-CPU nodes: a shape the nodes fit, so no
        early verdict, however long no node is added."""
        error, seconds = construct_failing(num_workers=3, num_trajectories=3, startup_timeout=5)
        message = str(error)
        assert re.search(r"[123] of 3 workers did not start within 5 s", message), message
        assert "the cluster's autoscaler (v1) did not provide the nodes in time" in message
        assert "each asks for {CPU: 1}" in message
        assert 5 <= seconds < 5 + 20
        print(f"\n[autoscaling] v1, 3 workers: {message}")


def test_autoscaler_v2_says_which_shape_no_node_type_has(on_v2):
    """Autoscaler v2 reports infeasible requests itself: the evaluator fails on its word."""
    assert ray.cluster_resources().get("CPU", 0) == 0
    error, seconds = construct_failing(num_workers=2, num_cpus_per_worker=8, startup_timeout=120)
    message = str(error)
    assert "no node type of this autoscaling cluster can host one worker" in message
    assert "the cluster's autoscaler (v2) reports this request as infeasible" in message
    assert "no node has {CPU: 8}" in message
    assert seconds < 30
    print(f"\n[autoscaling] v2, {{CPU: 8}}: refused after {seconds:.1f} s")
