"""Delivery that cannot die: bad metrics, callbacks that raise anything, trigger_eval
from inside on_result under every busy_policy, and handles that settle at shutdown.

Every call that could hang runs through ``within``, so a regression fails the test
in seconds instead of wedging the suite.
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest
import ray
import torch
from ray.exceptions import RayActorError, TaskCancelledError

from ray_eval import Evaluator
from tests import torchrl_parts as parts
from tests.checks import small_policy, wait_no_evaluator_threads
from tests.envs import SeedLengthEnv, take_fault


def within(seconds: float, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, failing the test if it has not returned after ``seconds``."""
    box: dict = {}

    def call():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as error:  # handed to the test's thread
            box["error"] = error

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} still blocked after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


# -- 1. a metric that is not a number ---------------------------------------------------------

JUNK = {
    "a string": "v1",
    "None": None,
    "several numbers": np.arange(3.0),
    "a complex number": 1j,
    "a dict": {"a": 1.0},
    "a 2-element tensor": torch.ones(2),
}


def junk_once(episodes, *, marker: str, junk):
    """An ``episode_metrics_fn`` that returns ``junk`` the first time only (across processes)."""
    return {"tag": junk if take_fault(marker) else 1.5, "episodes": len(episodes.returns)}


def trajectories_junk_once(td, *, marker: str, junk):
    """TorchRL's ``metrics_fn`` shape: a dict from the trajectories TensorDict."""
    return {"tag": junk if take_fault(marker) else torch.tensor(2.5), "steps": td.numel()}


@pytest.mark.parametrize("junk", list(JUNK), ids=list(JUNK))
def test_a_junk_episode_metric_is_that_requests_error_and_the_evaluator_stays_usable(
    tmp_path, junk
):
    seen = []
    with Evaluator(
        SeedLengthEnv,
        small_policy(),
        num_workers=0,
        num_trajectories=2,
        busy_policy="error",
        on_result=lambda td: seen.append({k: v.item() for k, v in td.items()}),
        episode_metrics_fn=functools.partial(
            junk_once, marker=str(tmp_path / "junk"), junk=JUNK[junk]
        ),
    ) as ev:
        with pytest.raises(TypeError, match=r"episode_metrics_fn returned .* for metric 'tag'"):
            within(30, ev.evaluate, step=1)
        assert not ev.pending  # delivered, not wedged
        ev.trigger_eval(step=2)  # no EvaluatorBusyError: nothing is pending
        result = within(30, ev.wait, 30)
    assert result["eval/tag"] == 1.5 and result["eval/episodes"] == 2
    assert [s["eval/step"] for s in seen] == [2]  # on_result saw the good one only


def test_a_junk_torchrl_metric_fails_its_async_request_on_ray_and_the_next_one_works(
    ray_local, tmp_path
):
    seen = []
    with Evaluator(
        parts.env_var_pendulum,
        parts.pendulum_policy(),
        num_workers=1,
        num_trajectories=2,
        max_steps=5,
        busy_policy="queue",
        on_result=lambda td: seen.append(td["eval/tag"].item()),
        metrics_fn=functools.partial(
            trajectories_junk_once, marker=str(tmp_path / "junk"), junk="v1"
        ),
    ) as ev:
        ev.trigger_eval(step=0)
        ev.trigger_eval(step=1)
        with pytest.raises(TypeError, match=r"metrics_fn returned 'v1' \(str\) for metric 'tag'"):
            within(60, ev.wait, 60)
        result = within(60, ev.wait, 60)
        assert not ev.pending
    assert result["eval/step"] == 1 and result["eval/tag"] == 2.5 and result["eval/steps"] == 10
    assert isinstance(result["eval/tag"], float) and seen == [2.5]


class Abort(BaseException):
    """Not an ``Exception``: what a callback may raise that ``except Exception`` misses."""


def test_an_on_result_raising_a_base_exception_still_delivers_every_result():
    calls = []

    def callback(td):
        calls.append(int(td["eval/step"].item()))
        raise Abort("the callback gave up")

    with Evaluator(
        SeedLengthEnv,
        small_policy(),
        num_workers=0,
        num_trajectories=2,
        busy_policy="queue",
        on_result=callback,
    ) as ev:
        first = within(30, ev.evaluate, step=0)
        ev.trigger_eval(step=1)
        second = within(30, ev.wait, 30)
        assert not ev.pending
    assert first["eval/step"] == 0 and second["eval/step"] == 1 and calls == [0, 1]


# -- 2. trigger_eval from inside on_result -----------------------------------------------------


@pytest.mark.parametrize(
    "busy_policy, num_workers",
    [("error", 0), ("skip", 0), ("queue", 0), ("latest", 0), ("error", 1)],
)
def test_trigger_eval_from_on_result_is_accepted_under_every_busy_policy(
    request, busy_policy, num_workers
):
    """The README's advice: a callback that asks for the next evaluation itself."""
    if num_workers:
        request.getfixturevalue("ray_local")
    handles, errors = [], []

    def callback(td):
        step = int(td["eval/step"].item())
        if step < 2:
            try:
                handles.append(ev.trigger_eval(step=step + 1))
            except Exception as error:
                errors.append(error)

    ev = Evaluator(
        SeedLengthEnv,
        small_policy(),
        num_workers=num_workers,
        num_trajectories=2,
        busy_policy=busy_policy,
        on_result=callback,
    )
    with ev:
        first = within(60, ev.evaluate, step=0)
        results = [within(60, ev.wait, 60) for _ in range(2)]
        assert within(5, ev.wait, 1) is None and not ev.pending
    assert errors == [] and all(h is not None for h in handles) and len(handles) == 2
    assert [first["eval/step"], *(r["eval/step"] for r in results)] == [0, 1, 2]


# -- 3. every handle settles at shutdown -------------------------------------------------------


def test_shutdown_cancels_every_queued_and_running_future_in_process():
    ev = Evaluator(
        functools.partial(SeedLengthEnv, step_sleep=0.02),
        small_policy(),
        num_workers=0,
        num_trajectories=4,
        envs_per_worker=1,
        busy_policy="queue",
    )
    futures = [ev.trigger_eval(step=s) for s in range(3)]
    time.sleep(0.2)  # the first is running, the others wait their turn
    assert not any(f.done() for f in futures)
    ev.shutdown()
    _, not_done = within(10, concurrent.futures.wait, futures, timeout=5)
    assert not not_done
    for future in futures:
        with pytest.raises(CancelledError):
            within(5, future.result)  # no timeout: it must not hang
    assert not wait_no_evaluator_threads(timeout=15)


def test_shutdown_settles_every_queued_and_running_ref_on_ray(ray_local):
    ev = Evaluator(
        functools.partial(SeedLengthEnv, step_sleep=0.02),
        small_policy(),
        num_workers=1,
        num_trajectories=4,
        envs_per_worker=1,
        busy_policy="queue",
    )
    refs = [ev.trigger_eval(step=s) for s in range(3)]
    time.sleep(0.5)
    assert not ray.wait(refs, num_returns=1, timeout=0)[0]  # none finished yet
    ev.shutdown()
    ready, _ = within(20, ray.wait, refs, num_returns=3, timeout=15)
    assert len(ready) == 3
    for ref in refs:
        with pytest.raises((TaskCancelledError, RayActorError)):
            within(10, ray.get, ref)
    assert not wait_no_evaluator_threads(timeout=15)
