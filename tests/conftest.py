"""Fixtures shared by the test modules.

Starting Ray instances and worker pools is most of the suite's time: every worker
actor is a new process that imports torch, tensordict and TorchRL (seconds of CPU),
and the suite runs on 2 cores. So tests share what they do not need of their own:

- ``ray_local``: this test process's Ray instance (``NUM_CPUS`` logical CPUs, the
  dashboard for the state API), started on first use, shut down at the session's end.
  ``ray_module`` is the same for module-scoped fixtures.
- ``no_ray``: for tests that start their own Ray (a multi-node ``Cluster``).
- ``pendulum_pool``: one ``Evaluator`` per test module on Pendulum-v1 with 2 Ray
  workers (built as ``tests.checks.PENDULUM_POOL`` says), for tests that only
  evaluate. Each test gets it with nothing pending or unread and its
  ``.delivered`` (the ``on_result`` log) emptied; what it leaves pending is drained.
  Tests that kill processes, shut an evaluator down or need other arguments build
  their own. Make a module's own shared evaluator the same way (``shared_turn``).

Test envs and test modules travel to the Ray workers by value, as any module that
is not installed does (ray_eval.backends.pickling): the workers need no tests/ on
their path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator

import pytest
import ray

from tests.checks import PENDULUM_POOL, pendulum_policy

NUM_CPUS = 4  # logical CPUs of the shared test instance (the CI machine has 2 cores)

# Every Ray instance the suite starts (its own, scripts', `ray start`, clusters) runs its
# workers at nice 0, as the instance ray_eval starts itself does: at Ray's default of
# nice 15, a busy process on each core leaves workers a few percent of a core, and the
# suite's timeouts would measure the scheduler (issue 20: green beside two busy loops).
os.environ["RAY_worker_niceness"] = "0"  # noqa: SIM112 (Ray spells it so)


def start_test_ray() -> None:
    """This process's test Ray instance, started if it is not running."""
    if not ray.is_initialized():
        ray.init(
            address="local",  # our own instance, never another one running on the machine
            num_cpus=NUM_CPUS,
            include_dashboard=True,  # the state API (list_actors) needs it
            logging_level=logging.WARNING,
            log_to_driver=False,
        )


@pytest.fixture
def ray_local():
    """A Ray instance shared by the tests that use it, started on first use."""
    start_test_ray()
    yield
    # left running for the next test; shut down at the end of the session


@pytest.fixture(scope="module")
def ray_module():
    """``ray_local`` for module-scoped fixtures."""
    start_test_ray()
    yield


@pytest.fixture
def no_ray():
    """For tests that start their own Ray (a multi-node Cluster)."""
    if ray.is_initialized():
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()


def pytest_sessionfinish(session, exitstatus):
    if ray.is_initialized():
        ray.shutdown()


# -- shared evaluators ---------------------------------------------------------------------


class Deliveries(list):
    """An ``on_result`` that keeps ``(step, thread name)`` of each result it is given,
    reading every value as the tutorial's logger does (``v.item()``)."""

    def __call__(self, td) -> None:
        values = {key: value.item() for key, value in td.items()}
        self.append((int(values["eval/step"]), threading.current_thread().name))


def drain(evaluator, timeout: float = 120.0) -> None:
    """Read every result ``evaluator`` has pending or unread (bounded), errors included:
    a result whose ``on_result`` ran but that nobody read is still next for ``wait``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if evaluator.wait(timeout=max(0.0, deadline - time.monotonic())) is None:
                return  # nothing pending, nothing unread
        except Exception:
            continue  # an evaluation that failed: read, so drained


@contextlib.contextmanager
def shared_turn(evaluator, delivered: list | None = None) -> Iterator:
    """One test's turn on a module's shared evaluator: it starts with nothing pending
    or unread (and ``delivered`` emptied), and what it leaves behind (a failure
    mid-way) is drained, so the next test never inherits it."""
    drain(evaluator)
    assert not evaluator.pending, "the shared evaluator is still busy from an earlier test"
    if delivered is not None:
        delivered.clear()
    yield evaluator
    drain(evaluator)


@pytest.fixture(scope="module")
def _pendulum_pool(ray_module):
    from ray_eval import Evaluator

    delivered = Deliveries()
    with Evaluator(
        "Pendulum-v1",
        pendulum_policy(),
        busy_policy="queue",
        on_result=delivered,
        **PENDULUM_POOL,
    ) as evaluator:
        evaluator.delivered = delivered
        yield evaluator


@pytest.fixture
def pendulum_pool(_pendulum_pool):
    """The module's Pendulum-v1 evaluator on 2 Ray workers (see ``PENDULUM_POOL``):
    ``pendulum_policy()``, ``busy_policy="queue"``, ``.delivered`` lists the
    ``(step, thread)`` of each result its ``on_result`` got during this test."""
    with shared_turn(_pendulum_pool, _pendulum_pool.delivered) as evaluator:
        yield evaluator
