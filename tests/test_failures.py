"""Failures during an evaluation, for real: process deaths, broken and hung envs.

Processes die by ``os._exit`` inside the env or by ``SIGKILL`` from the test;
nothing of Ray, torch or the envs is mocked. Timings are printed (``-s``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ray_eval import EnvError, EvaluationTimeout, Evaluator, WorkerDiedError
from ray_eval.planning import episode_seeds
from tests.checks import (
    fresh_weights,
    live_actor_ids,
    small_policy,
    wait_alive,
    wait_no_evaluator_threads,
    wait_until_gone,
)
from tests.envs import SeedLengthEnv


def slow_env(step_sleep: float = 0.0, **faults):
    return functools.partial(SeedLengthEnv, step_sleep=step_sleep, action_reward=True, **faults)


def reference(policy, weights, *, step: int, **kwargs):
    """The numbers of a fault-free run, in-process."""
    with Evaluator(slow_env(), policy, num_workers=0, **kwargs) as ev:
        return ev.evaluate(weights=weights, step=step)


def assert_same_episodes(result, expected):
    np.testing.assert_array_equal(result.episodes.indices, expected.episodes.indices)
    np.testing.assert_array_equal(result.episodes.seeds, expected.episodes.seeds)
    np.testing.assert_array_equal(result.episodes.lengths, expected.episodes.lengths)
    np.testing.assert_array_equal(result.episodes.returns, expected.episodes.returns)
    assert result["eval/reward"] == expected["eval/reward"]
    assert result["eval/num_episodes"] == expected["eval/num_episodes"]


def process_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_worker_process_death_mid_evaluation_reruns_its_episodes_with_the_same_numbers(
    ray_local, tmp_path
):
    """A worker dies twice: by ``os._exit`` inside the env, then by ``SIGKILL`` from here."""
    policy = small_policy()
    weights = fresh_weights(policy, seed=1)  # the restarted worker must load them again
    plan = {"num_trajectories": 8, "envs_per_worker": 4, "seed": 4}
    expected = reference(policy, weights, step=2, **plan)
    crash = tmp_path / "crash"
    with Evaluator(
        slow_env(0.01, crash_file=str(crash)), policy, num_workers=2, max_restarts=3, **plan
    ) as ev:
        pids = {w.pid for w in ev.workers}
        # 1. os._exit(17) in the env, at step 3 of the first episode to get there.
        started = time.perf_counter()
        crashed = ev.evaluate(weights=weights, step=2)
        crashed_s = time.perf_counter() - started
        exited = int(crash.read_text())
        assert exited in pids and process_gone(exited)
        # 2. Fault-free, for the timing.
        started = time.perf_counter()
        clean = ev.evaluate(weights=weights, step=2)
        clean_s = time.perf_counter() - started
        # 3. SIGKILL of the other worker's process, mid-evaluation (async API).
        victim = next(pid for pid in pids if pid != exited)
        started = time.perf_counter()
        ev.trigger_eval(weights=weights, step=2)
        time.sleep(clean_s / 3)
        os.kill(victim, signal.SIGKILL)
        killed = time.perf_counter()
        killed_result = ev.wait(timeout=120)
        done = time.perf_counter()
        assert process_gone(victim)
    assert crashed["eval/worker_restarts"] == 1
    assert clean["eval/worker_restarts"] == 0
    assert killed_result["eval/worker_restarts"] == 1
    for result in (crashed, clean, killed_result):
        assert_same_episodes(result, expected)
    print(
        f"\n[worker death] fault-free evaluation {clean_s:.2f} s; with os._exit in the env "
        f"{crashed_s:.2f} s (recovery cost {crashed_s - clean_s:.2f} s); with SIGKILL "
        f"{done - started:.2f} s, the result {done - killed:.2f} s after the kill"
    )


def test_restarts_exhausted_raise_worker_died_error_then_the_evaluator_recovers(
    ray_local, tmp_path
):
    policy = small_policy()
    plan = {"num_trajectories": 4, "envs_per_worker": 2, "seed": 1}
    expected = reference(policy, None, step=0, **plan)
    crash = tmp_path / "crash"
    before = live_actor_ids()
    ev = Evaluator(
        slow_env(crash_file=str(crash), crash_times=2),
        policy,
        num_workers=1,
        max_restarts=1,
        **plan,
    )
    first_pid = ev.workers[0].pid
    started = time.perf_counter()
    ev.trigger_eval(step=0)
    with pytest.raises(WorkerDiedError) as info:
        ev.wait(timeout=120)
    failed_s = time.perf_counter() - started
    error = info.value
    message = str(error)
    assert error.worker == 0 and message.startswith("worker 0 (actor ")
    assert "died 2 time(s), more than max_restarts=1 allows" in message
    assert "pid " in message and str(first_pid) not in message  # the pid of its last life
    assert "Cause: ActorDiedError" in message and "worker process has died" in message
    assert "Worker exit type: SYSTEM_ERROR" in error.cause
    print(f"\n[restarts exhausted] WorkerDiedError after {failed_s:.2f} s: {message[:400]}")
    # The dead worker was replaced: the same evaluator runs the next evaluation.
    result = ev.evaluate(step=0)
    assert result["eval/worker_restarts"] == 0
    assert_same_episodes(result, expected)
    ids = set(ev.actor_ids)
    started = time.perf_counter()
    ev.shutdown()
    assert time.perf_counter() - started < 15
    assert not wait_until_gone((live_actor_ids() - before) | ids)
    assert not wait_no_evaluator_threads()


def test_env_exception_fails_with_type_message_traceback_and_seed_without_retry(
    ray_local, tmp_path
):
    policy = small_policy()
    plan = {"num_trajectories": 6, "envs_per_worker": 1, "seed": 3}
    expected = reference(policy, None, step=1, **plan)
    marker = tmp_path / "raise"
    with Evaluator(slow_env(raise_file=str(marker)), policy, num_workers=2, **plan) as ev:
        ev.trigger_eval(step=1)
        with pytest.raises(EnvError) as info:
            ev.wait(timeout=60)
        error = info.value
        assert error.seed in episode_seeds(3, 1, 6).tolist()
        assert SeedLengthEnv.length_for(error.seed) >= 3  # the episode reached its step 3
        assert error.exc_type == "RuntimeError"
        assert error.exc_message == f"boom at step 3 (seed {error.seed})"
        assert f"(seed {error.seed})" in str(error) and "RuntimeError" in str(error)
        assert error.remote_traceback.startswith("Traceback (most recent call last)")
        assert "in step" in error.remote_traceback and "tests/envs.py" in error.remote_traceback
        assert int(marker.read_text()) in {w.pid for w in ev.workers}
        # Not retried: a retry would have succeeded (the fault is spent) and hidden the bug.
        # The pool is usable for the next evaluation, with the fault-free numbers.
        result = ev.evaluate(step=1)
        assert result["eval/worker_restarts"] == 0
        assert_same_episodes(result, expected)
    # In-process, the same error type with the same details.
    with (
        Evaluator(slow_env(raise_at=2), policy, num_workers=0, num_trajectories=1, seed=3) as local,
        pytest.raises(EnvError, match=r"RuntimeError in episode 0 \(seed \d+\)"),
    ):
        local.evaluate(step=1)


def test_hung_env_times_out_stuck_workers_are_replaced_and_the_next_evaluation_works(
    ray_local, tmp_path
):
    policy = small_policy()
    # Two one-episode chunks, one per worker; every episode reaches the fault step.
    plan = {"num_trajectories": 2, "envs_per_worker": 1, "seed": 5}
    expected = reference(policy, None, step=2, **plan)
    hang = tmp_path / "hang"
    markers = [hang, Path(f"{hang}.1"), Path(f"{hang}.2")]
    timeout = 3.0
    with Evaluator(
        slow_env(hang_file=str(hang), hang_times=3, fault_step=1),
        policy,
        num_workers=2,
        timeout=timeout,
        **plan,
    ) as ev:
        first = set(ev.actor_ids)
        # 1. Both workers hang (async API): both are replaced.
        started = time.perf_counter()
        ev.trigger_eval(step=0)
        with pytest.raises(EvaluationTimeout, match="did not finish within 3 s") as info:
            ev.wait(timeout=60)
        async_s = time.perf_counter() - started
        assert "the stuck workers [0, 1] were replaced" in str(info.value)
        assert all(process_gone(int(m.read_text())) for m in markers[:2])  # killed, not asleep
        second = set(ev.actor_ids)
        assert len(first - second) == 2 and not wait_until_gone(first - second)
        assert wait_alive(second)
        # 2. One worker hangs (blocking API): only that one is replaced.
        started = time.perf_counter()
        with pytest.raises(EvaluationTimeout, match=r"the stuck workers \[\d\] were replaced"):
            ev.evaluate(step=1)
        sync_s = time.perf_counter() - started
        assert process_gone(int(markers[2].read_text()))
        third = set(ev.actor_ids)
        assert len(second - third) == 1 and not wait_until_gone(second - third)
        # 3. No fault left: the next evaluation works, with the fault-free numbers.
        started = time.perf_counter()
        result = ev.evaluate(step=2)
        next_s = time.perf_counter() - started
        assert result["eval/worker_restarts"] == 0
        assert_same_episodes(result, expected)
    assert timeout <= async_s < timeout + 20 and timeout <= sync_s < timeout + 20
    print(
        f"\n[hung env] EvaluationTimeout after {async_s:.2f} s (wait) and {sync_s:.2f} s "
        f"(evaluate) with timeout={timeout:g}; the next evaluation took {next_s:.2f} s"
    )


@contextlib.contextmanager
def busy_processes(count: int):
    """``count`` processes spinning a CPU each (load from other work), killed at the end."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(600)  # a loaded machine: the replacement's start takes its time
def test_timeout_under_load_replaces_only_the_hung_worker_and_the_next_evaluation_works(
    ray_local, tmp_path
):
    """One worker hangs; the other is still stepping at the timeout. Only the hung one
    is replaced; the other stops its chunk and is kept. The next evaluation is given its
    whole timeout for the episodes: the replacement's start counts against
    startup_timeout, even on a machine loaded by other work."""
    policy = small_policy()
    step_sleep, timeout, seed, n = 0.05, 15.0, 13, 20
    plan = {"num_trajectories": n, "envs_per_worker": 1, "seed": seed}
    hung_eval = [SeedLengthEnv.length_for(s) * step_sleep for s in episode_seeds(seed, 0, n)]
    next_eval = [SeedLengthEnv.length_for(s) * step_sleep for s in episode_seeds(seed, 1, n)]
    # The worker left alone in the hung evaluation is still busy at the timeout (its
    # sleeps alone outlast it); the next evaluation's sleeps fit well within it.
    assert sum(hung_eval) - max(hung_eval) > timeout + 3
    assert sum(next_eval) / 2 + max(next_eval) < timeout - 3
    expected = reference(policy, None, step=1, **plan)
    hang = tmp_path / "hang"
    with (
        Evaluator(
            slow_env(step_sleep, hang_file=str(hang), fault_step=2),
            policy,
            num_workers=2,
            timeout=timeout,
            startup_timeout=300,
            **plan,
        ) as ev,
        busy_processes(2),  # from here on: the evaluations and the replacement's start
    ):
        pids = {w.pid for w in ev.workers}
        first = set(ev.actor_ids)
        started = time.perf_counter()
        with pytest.raises(EvaluationTimeout, match="did not finish within 15 s") as info:
            ev.evaluate(step=0)
        timeout_s = time.perf_counter() - started
        message = str(info.value)
        stuck = re.search(r"the stuck workers \[(\d)\] were replaced by fresh ones", message)
        kept = re.search(r"workers \[(\d)\] were still stepping: their chunks were ", message)
        assert stuck and kept and stuck[1] != kept[1], message
        hung_pid = int(hang.read_text())
        assert process_gone(hung_pid)  # the hung worker was killed
        (kept_pid,) = pids - {hung_pid}
        os.kill(kept_pid, 0)  # the stepping one lives on: raises if it is gone
        second = set(ev.actor_ids)
        assert len(first - second) == 1 and len(second - first) == 1
        load = os.getloadavg()[0]
        started = time.perf_counter()
        result = ev.evaluate(step=1)
        next_s = time.perf_counter() - started
        assert result["eval/worker_restarts"] == 0
        assert_same_episodes(result, expected)
        os.kill(kept_pid, 0)
    assert timeout <= timeout_s < timeout + 20
    print(
        f"\n[timeout under load] load average {load:.1f}: EvaluationTimeout after "
        f"{timeout_s:.2f} s (timeout={timeout:g}); only worker {stuck[1]} was replaced; "
        f"the next evaluation took {next_s:.2f} s and gave the fault-free numbers"
    )


def test_on_result_exception_is_logged_with_traceback_and_the_result_delivered(ray_local, caplog):
    calls = []

    def broken_logger(td):
        calls.append(td["eval/step"].item())
        raise ZeroDivisionError("metrics backend is down")

    with (
        caplog.at_level(logging.ERROR, logger="ray_eval"),
        Evaluator(
            slow_env(),
            small_policy(),
            num_workers=1,
            num_trajectories=2,
            on_result=broken_logger,
            busy_policy="queue",
        ) as ev,
    ):
        sync = ev.evaluate(step=1)
        ev.trigger_eval(step=2)
        ev.trigger_eval(step=3)
        delivered = [ev.wait(timeout=60), ev.poll(timeout=60)]
        assert ev.last_result is delivered[-1]
    assert sync["eval/step"] == 1 and [r["eval/step"] for r in delivered] == [2, 3]
    assert calls == [1, 2, 3]
    records = [r for r in caplog.records if "on_result" in r.getMessage()]
    assert len(records) == 3
    assert all(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in records)
    assert "Traceback (most recent call last)" in caplog.text
    assert "in broken_logger" in caplog.text and "metrics backend is down" in caplog.text


def test_shutdown_with_work_in_flight_is_prompt_and_leaves_no_actor_or_thread(ray_local):
    before = live_actor_ids()
    ev = Evaluator(
        slow_env(hang_at=2),  # every episode hangs: the work never finishes by itself
        small_policy(),
        num_workers=2,
        num_trajectories=4,
        busy_policy="queue",
    )
    ids = set(ev.actor_ids)
    assert len(ids) == 3 and ids <= live_actor_ids()
    for step in range(3):
        ev.trigger_eval(step=step)
    returned = []
    waiter = threading.Thread(target=lambda: returned.append(ev.wait()), name="test-waiter")
    waiter.start()  # a caller blocked in wait() with no timeout
    time.sleep(1.0)
    assert ev.pending and waiter.is_alive()
    started = time.perf_counter()
    ev.shutdown()
    shutdown_s = time.perf_counter() - started
    waiter.join(timeout=15)
    assert not waiter.is_alive() and returned == [None]
    assert shutdown_s < 12
    left = wait_until_gone((live_actor_ids() - before) | ids)
    assert not left
    assert not wait_no_evaluator_threads()
    with pytest.raises(RuntimeError, match="shut down"):
        ev.trigger_eval()
    print(f"\n[shutdown in flight] shutdown() returned in {shutdown_s:.2f} s")
