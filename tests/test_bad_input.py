"""Bad input: a clear error at the call that is wrong, before any rollout, nothing left running.

Checked against a real Ray instance: after each failed construction, Ray's
state API shows no actor of it left, and no evaluator thread is running.
"""

from __future__ import annotations

import functools
import os
import re
import threading
import time

import pytest
import ray
import torch
from tensordict import TensorDict
from torch import nn
from torchrl.envs import GymEnv

from ray_eval import Evaluator, ResourceUnavailableError, WeightsMismatchError, WorkerStartupError
from tests.checks import (
    evaluator_threads,
    live_actor_ids,
    small_policy,
    wait_no_evaluator_threads,
    wait_until_gone,
)
from tests.envs import NotAnEnv, SeedLengthEnv


@pytest.fixture
def nothing_left(ray_local):
    """Asserts, after the test, that it left no actor and no evaluator thread running."""
    before = live_actor_ids()
    threads = set(threading.enumerate())
    yield
    assert not wait_until_gone(live_actor_ids() - before)
    assert not wait_no_evaluator_threads()
    assert not set(evaluator_threads()) - threads


def construct(*args, **kwargs):
    """Build an Evaluator that is expected to fail; returns the seconds it took."""
    started = time.perf_counter()
    try:
        Evaluator(*args, **kwargs)
    finally:
        elapsed = time.perf_counter() - started
        construct.elapsed = elapsed
    pytest.fail("Evaluator(...) did not raise")


# -- arguments checked before anything starts ------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_trajectories": 0}, ValueError, "num_trajectories must be >= 1, got 0"),
        ({"num_trajectories": -3}, ValueError, "num_trajectories must be >= 1, got -3"),
        ({"num_trajectories": 2.5}, TypeError, "num_trajectories must be an int, got float"),
        ({"num_trajectories": "10"}, TypeError, "num_trajectories must be an int, got str"),
        ({"num_trajectories": True}, TypeError, "num_trajectories must be an int, got bool"),
        ({"num_workers": -1}, ValueError, "num_workers must be >= 0, got -1"),
        ({"num_workers": 1.0}, TypeError, "num_workers must be an int, got float"),
        ({"max_steps": 0}, ValueError, "max_steps must be >= 1, got 0"),
        ({"max_steps": -10}, ValueError, "max_steps must be >= 1, got -10"),
        ({"busy_policy": "wait"}, ValueError, "busy_policy must be one of"),
        ({"backend": "dask"}, ValueError, "backend must be one of"),
        ({"timeout": 0}, ValueError, "timeout must be a positive number of seconds"),
        ({"max_restarts": -1}, ValueError, "max_restarts must be >= 0"),
    ],
)
def test_invalid_arguments_raise_at_construction(nothing_left, kwargs, error, message):
    before = live_actor_ids()
    with pytest.raises(error, match=re.escape(message)):
        construct(SeedLengthEnv, small_policy(), **kwargs)
    assert construct.elapsed < 1  # checked before any worker starts
    assert live_actor_ids() <= before  # no actor was started
    if "busy_policy" in kwargs:
        with pytest.raises(error, match=r"'error', 'skip', 'queue', 'latest'.*got 'wait'"):
            construct(SeedLengthEnv, small_policy(), **kwargs)
    if "backend" in kwargs:
        with pytest.raises(error, match=r"'ray', 'process', 'local', 'thread'.*got 'dask'"):
            construct(SeedLengthEnv, small_policy(), **kwargs)


def test_policy_and_policy_factory_both_or_neither(nothing_left):
    with pytest.raises(ValueError, match="either policy or policy_factory, not both"):
        construct(SeedLengthEnv, small_policy(), policy_factory=small_policy)
    with pytest.raises(
        ValueError,
        match=r"policy or policy_factory must be provided: pass policy=.*or policy_factory=",
    ):
        construct(SeedLengthEnv)
    with pytest.raises(TypeError, match="policy_factory must be callable, got int"):
        construct(SeedLengthEnv, policy_factory=3)


def test_env_that_is_not_an_env_id_or_factory(nothing_left):
    with pytest.raises(ValueError, match="'NoSuchEnv-v9' is not a registered gymnasium id"):
        construct("NoSuchEnv-v9", small_policy())
    with pytest.raises(TypeError, match="zero-argument callable, got int"):
        construct(42, small_policy())


# -- weights -------------------------------------------------------------------------------


def test_weights_with_wrong_keys_or_shapes_name_the_key_and_both_shapes(ray_local):
    policy = small_policy()  # 0: Linear(2, 8), 2: Linear(8, 1)
    wrong_shape = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    with Evaluator(SeedLengthEnv, policy, num_workers=1, num_trajectories=1) as ev:
        with pytest.raises(
            WeightsMismatchError,
            match=re.escape("weights key '0.weight' has shape (8, 3), the policy expects (8, 2)"),
        ):
            ev.evaluate(weights=wrong_shape)
        with pytest.raises(WeightsMismatchError, match=r"missing keys \['2.bias', '2.weight'\]"):
            ev.trigger_eval(weights=nn.Sequential(nn.Linear(2, 8)))
        extra = TensorDict.from_module(policy).flatten_keys(".").to_dict()
        extra["head.weight"] = torch.zeros(1)
        with pytest.raises(WeightsMismatchError, match=r"unexpected keys \['head.weight'\]"):
            ev.trigger_eval(weights=extra)
        assert isinstance(WeightsMismatchError("x"), ValueError)
        # Rejected on the driver before anything was sent: nothing pending, no step used.
        assert not ev.pending and ev.poll() is None
        assert ev.evaluate()["eval/step"] == 0
    # A policy without parameters cannot take weights.
    with (
        Evaluator(SeedLengthEnv, lambda obs: obs[:, :1], num_workers=0, num_trajectories=1) as ev,
        pytest.raises(WeightsMismatchError, match="no parameters"),
    ):
        ev.evaluate(weights=policy)


# -- policy / env mismatch and broken factories (found when the workers build them) ---------


@pytest.mark.parametrize("num_workers", [0, 1])
def test_policy_action_that_does_not_fit_the_action_space(nothing_left, num_workers):
    kwargs = {"num_workers": num_workers, "num_trajectories": 1}
    with pytest.raises(
        TypeError, match=re.escape("per env (3,)); env") + ".*per-env shape \\(1,\\)"
    ):
        construct(SeedLengthEnv, nn.Linear(2, 3), **kwargs)
    assert construct.elapsed < 60

    def int_actions(obs):
        return torch.zeros(obs.shape[0], 1, dtype=torch.int64)

    if num_workers == 0:  # dtype, other action spaces and the TorchRL path, in-process
        with pytest.raises(TypeError, match=r"dtype torch.int64; env .* expects float32"):
            construct(SeedLengthEnv, int_actions, **kwargs)
        with pytest.raises(TypeError, match=r"non-integer actions .*Discrete\(2\)"):
            construct("CartPole-v1", lambda obs: torch.full((obs.shape[0],), 0.5), **kwargs)
        pendulum = functools.partial(GymEnv, "Pendulum-v1")
        with pytest.raises(TypeError, match=r"per env \(2,\)\); env .*per-env shape \(1,\)"):
            construct(pendulum, nn.Linear(3, 2), fast_path=False, **kwargs)
        with pytest.raises(TypeError, match=r"dtype torch.int64; env .* expects torch.float32"):
            construct(pendulum, int_actions, fast_path=False, **kwargs)


def failing_factory():
    raise FileNotFoundError("no ROM at /roms/pong.bin")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_env_factory_that_raises_or_returns_a_non_env(nothing_left, num_workers):
    kwargs = {"num_workers": num_workers, "num_trajectories": 2, "startup_timeout": 60}
    with pytest.raises(
        WorkerStartupError,
        match=re.escape(
            "could not build its env or policy: FileNotFoundError: no ROM at /roms/pong.bin"
        ),
    ) as info:
        construct(failing_factory, small_policy(), **kwargs)
    assert construct.elapsed < 45  # an error, not a hang
    assert "failing_factory" in info.value.remote_traceback
    with pytest.raises(
        TypeError, match=re.escape("returned NotAnEnv, expected a gymnasium.Env or")
    ):
        construct(NotAnEnv, small_policy(), **kwargs)
    if num_workers == 0:
        with pytest.raises(TypeError, match=r"factory .*<lambda> returned int"):
            construct(lambda: 42, small_policy(), **kwargs)
    else:
        # Started in the background, the constructor returns; the first call that needs
        # the workers raises the same error, and so does every later one.
        evaluator = Evaluator(failing_factory, small_policy(), wait_for_workers=False, **kwargs)
        try:
            for call in (evaluator.evaluate, evaluator.trigger_eval, lambda: evaluator.workers):
                with pytest.raises(WorkerStartupError, match=re.escape("no ROM at /roms/pong.bin")):
                    call()
        finally:
            evaluator.shutdown()


def test_env_factory_that_kills_its_process(nothing_left):
    with pytest.raises(
        WorkerStartupError, match=r"worker 0 died while building its env and policy"
    ) as info:
        construct(functools.partial(os._exit, 3), small_policy(), num_workers=1, max_restarts=0)
    assert "worker process has died" in str(info.value)
    assert construct.elapsed < 45


def test_policy_factory_that_raises(nothing_left):
    def factory():
        raise RuntimeError("checkpoint missing")

    with pytest.raises(WorkerStartupError, match="RuntimeError: checkpoint missing"):
        construct(SeedLengthEnv, policy_factory=factory, num_workers=1, num_trajectories=1)


# -- what cannot be pickled for the workers ------------------------------------------------


class LockedPolicy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(2, 1)
        self.lock = threading.Lock()

    def forward(self, obs):
        return self.net(obs)


def test_unpicklable_policy_or_factory_names_what_cannot_be_pickled(nothing_left):
    with pytest.raises(
        TypeError,
        match=re.escape("policy cannot be pickled for the Ray workers: TypeError: cannot pickle")
        + ".*"
        + re.escape("not picklable: policy.lock (_thread.lock)"),
    ):
        construct(SeedLengthEnv, LockedPolicy(), num_workers=1)
    assert construct.elapsed < 5

    lock = threading.Lock()

    def make_env():
        with lock:
            return SeedLengthEnv()

    with pytest.raises(
        TypeError, match=re.escape("env cannot be pickled") + ".*<closure>.lock \\(_thread.lock\\)"
    ):
        construct(make_env, small_policy(), num_workers=1)
    stream = (i for i in range(3))
    with pytest.raises(TypeError, match=re.escape("env.keywords['crash_file'] (generator)")):
        construct(functools.partial(SeedLengthEnv, crash_file=stream), small_policy())

    def policy_factory():
        with lock:
            return small_policy()

    with pytest.raises(TypeError, match=r"policy_factory cannot be pickled.*_thread.lock"):
        construct(SeedLengthEnv, policy_factory=policy_factory, num_workers=1)
    # In-process nothing is pickled: the same policy is fine there.
    with Evaluator(SeedLengthEnv, LockedPolicy(), num_workers=0, num_trajectories=1) as ev:
        assert ev.evaluate()["eval/num_episodes"] == 1


# -- resources the cluster cannot give ----------------------------------------------------


def test_gpu_per_worker_on_a_cpu_only_cluster(nothing_left):
    assert ray.cluster_resources().get("GPU", 0) == 0
    with pytest.raises(
        ResourceUnavailableError,
        match=re.escape("each worker asks for {CPU: 1, GPU: 1}, and no node has {GPU: 1}"),
    ):
        construct(SeedLengthEnv, small_policy(), num_workers=1, num_gpus_per_worker=1)
    assert construct.elapsed < 5
    with pytest.raises(ResourceUnavailableError, match=re.escape("no node has {TPU: 1}")):
        construct(SeedLengthEnv, small_policy(), num_workers=1, resources_per_worker={"TPU": 1})


def test_more_one_cpu_workers_than_the_cluster_has_cpus(nothing_left):
    cpus = int(ray.cluster_resources()["CPU"])
    with pytest.raises(
        ResourceUnavailableError,
        match=re.escape(
            f"{cpus + 1} workers x 1 CPU = {cpus + 1} CPU, but the cluster has {cpus} CPU in all"
        ),
    ):
        construct(SeedLengthEnv, small_policy(), num_workers=cpus + 1)
    assert construct.elapsed < 5


@ray.remote
class CpuHog:
    def ready(self) -> bool:
        return True


def test_worker_that_never_gets_a_cpu_fails_after_startup_timeout(nothing_left):
    """The cluster has CPUs in all, but they are taken: one worker starts, the other never."""
    cpus = int(ray.cluster_resources()["CPU"])
    hog = CpuHog.options(num_cpus=cpus - 1).remote()
    try:
        ray.get(hog.ready.remote(), timeout=60)
        with pytest.raises(ResourceUnavailableError) as info:
            construct(
                SeedLengthEnv, small_policy(), num_workers=2, num_trajectories=2, startup_timeout=3
            )
        message = str(info.value)
        # Worker 1 never gets a CPU (worker 0 may be slow to build on a loaded machine too).
        assert re.search(
            r"[12] of 2 workers did not start within 3 s \(worker indices \[(0, )?1\]", message
        )
        assert "each asks for {CPU: 1}" in message
        assert f"the cluster has {{CPU: 0}} free of {{CPU: {cpus}}}: not enough free CPU" in message
        assert 3 <= construct.elapsed < 3 + 20
        print(f"\n[no CPU left] ResourceUnavailableError after {construct.elapsed:.2f} s")
    finally:
        ray.kill(hog)


def test_placement_group_that_cannot_be_placed(nothing_left):
    # One node: two bundles on two different nodes can never be placed.
    assert len([n for n in ray.nodes() if n["Alive"]]) == 1
    with pytest.raises(
        ResourceUnavailableError, match=re.escape("placement group of 2 bundles of {CPU: 1}")
    ) as info:
        construct(
            SeedLengthEnv,
            small_policy(),
            num_workers=2,
            placement="strict_spread",
            startup_timeout=2,
        )
    assert construct.elapsed < 2 + 15
    assert "1 of 1 node(s) can hold a bundle" in str(info.value)
