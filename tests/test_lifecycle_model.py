"""A model-based test of the whole request lifecycle, with faults (Hypothesis).

A ``RuleBasedStateMachine`` drives one Evaluator per example, in-process and on 2
Ray workers, under a ``busy_policy`` drawn per example, through random sequences of
``trigger_eval``/``evaluate``/``poll(t)``/``wait(t)``/cancel (``ray.cancel`` or
``future.cancel``)/``state_dict``/``load_state_dict``/``shutdown``, and injects
faults: ``on_result`` raising, slow, or calling ``trigger_eval``; an
``episode_metrics_fn`` returning junk; an env raising or hanging past ``timeout``;
a worker process killed (by the env, ``os._exit``, and by ``SIGKILL`` from here).

Every fault is real (marker files arm it: ``tests.envs.take_fault`` fires when its
marker is absent). A small model checks, after every step and at the end:

* no call blocks longer than its timeout plus ``SLACK``;
* every accepted request is delivered at most once, and, unless cancelled (or, under
  ``busy_policy="latest"``, replaced by a newer one), exactly once: a result or an
  error, to ``evaluate`` or to ``poll``/``wait``;
* results arrive in request order, each with its own step, and every result has the
  fault-free numbers of its step (faults give errors, never other numbers);
* after any fault, a healthy ``evaluate`` gives the fault-free numbers;
* after ``shutdown``, no thread of ours (``ray-eval*``) and no actor of ours is left,
  and every handle has settled.

Profiles: ``ci`` (default, about a minute on 2 cores) and ``long`` (about 10 minutes):
``RAY_EVAL_HYPOTHESIS=long`` or ``--hypothesis-profile=long``. Each run prints the
sequences run and the faults injected.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import ray
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from ray.util.state import list_actors

from ray_eval import EnvError, EvaluationTimeout, Evaluator, WorkerDiedError
from ray_eval.errors import EvaluatorBusyError, WorkerStartupError
from tests.checks import small_policy, wait_no_evaluator_threads, wait_until_gone
from tests.envs import SeedLengthEnv

TIMEOUT = 5.0  # the evaluators' timeout
HANG_SECONDS = TIMEOUT + 2  # a hung step ends by itself soon after (in-process threads)
SLACK = 3.0  # how much longer than asked a call may block (a loaded 2-core machine)
PLAN = {"num_trajectories": 4, "envs_per_worker": 2, "seed": 11}
# What a delivered error may be, each from one injected fault.
FAULT_ERRORS = (EnvError, EvaluationTimeout, WorkerDiedError, WorkerStartupError, TypeError)

# No shrinking: a failing example can leave a hung thread or a worker behind, which
# every shorter example tried after it would then trip over. The first failure, as it
# was drawn (every step printed), is the one to read.
NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate]
settings.register_profile(
    "ci",
    max_examples=3,
    stateful_step_count=8,
    deadline=None,
    database=None,
    phases=NO_SHRINK,
    suppress_health_check=list(HealthCheck),
)
settings.register_profile(
    "long",
    max_examples=20,  # per run: see LONG_EXAMPLES
    stateful_step_count=25,
    deadline=None,
    database=None,
    phases=NO_SHRINK,
    suppress_health_check=list(HealthCheck),
)
LONG = os.environ.get("RAY_EVAL_HYPOTHESIS") == "long" or (
    settings.get_current_profile_name() == "long"
)
LONG_SECONDS = 270.0  # per backend: about 10 minutes in all
LONG_EXAMPLES = {"local": 20, "ray": 4}  # per run, in the long mode
# Per backend, in the ci profile: (examples, steps at most per example). A Ray example
# costs an evaluator's start (2 workers) and its shutdown.
CI = {"local": (8, 15), "ray": (2, 12)}

STATS: collections.Counter = collections.Counter()


def thread_stacks(threads) -> str:
    """Where each of ``threads`` is: what a failure must show to be diagnosed."""
    frames = sys._current_frames()
    return "\n".join(
        f"{t.name}:\n" + "".join(traceback.format_stack(frames[t.ident]))
        for t in threads
        if t.ident in frames
    )


def metrics_fn(episodes, junk_file: str):
    """A custom metric; junk (a string) once each time ``junk_file`` is removed."""
    try:
        os.close(os.open(junk_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return {"custom": float(np.mean(episodes.returns))}
    return {"custom": "not a number"}


@functools.cache
def reference(step: int) -> tuple:
    """The fault-free numbers of ``step``: (episode returns, lengths, seeds, custom)."""
    with Evaluator(
        functools.partial(SeedLengthEnv, action_reward=True),
        small_policy(),
        num_workers=0,
        **PLAN,
    ) as ev:
        result = ev.evaluate(step=step)
    return numbers(result)


def numbers(result) -> tuple:
    e = result.episodes
    return (tuple(e.returns.tolist()), tuple(e.lengths.tolist()), tuple(e.seeds.tolist()))


class Timed:
    """Checks that the block takes at most ``limit`` s."""

    def __init__(self, what: str, limit: float) -> None:
        self.what, self.limit = what, limit

    def __enter__(self):
        self.started = time.monotonic()
        return self

    def __exit__(self, *exc):
        took = time.monotonic() - self.started
        assert took <= self.limit, f"{self.what} blocked {took:.2f} s (limit {self.limit:g} s)"


class Lifecycle(RuleBasedStateMachine):
    backend = "local"

    def __init__(self) -> None:
        super().__init__()
        self.ev = None
        self.closed = False
        self.dir = Path(tempfile.mkdtemp(prefix="ray-eval-model-"))
        self.faults = {name: str(self.dir / name) for name in ("raise", "hang", "crash", "junk")}
        for path in self.faults.values():
            Path(path).touch()  # disarmed
        self.lock = threading.Lock()  # serializes trigger_eval (main thread and on_result)
        self.next_step = 0
        self.counter = 0  # the evaluator's step counter, as the model sees it
        self.counter_base = 10**6
        # Accepted requests, in order: dict(step, sync, handle, cancelled, delivered).
        self.requests: list[dict] = []
        self.published: list[int] = []  # steps on_result saw, in order
        self.on_result_mode = "ok"
        self.on_result_failures: list[str] = []
        self.sync_in_flight = False
        self.handles: list = []

    # -- set-up and tear-down ------------------------------------------------------

    @initialize(busy_policy=st.sampled_from(["error", "skip", "queue", "latest"]))
    def start(self, busy_policy):
        self.busy_policy = busy_policy
        STATS["sequences"] += 1
        STATS[f"busy_policy={busy_policy}"] += 1
        env = functools.partial(
            SeedLengthEnv,
            action_reward=True,
            fault_step=2,
            raise_file=self.faults["raise"],
            hang_file=self.faults["hang"],
            hang_seconds=HANG_SECONDS,
            crash_file=self.faults["crash"] if self.backend == "ray" else None,
        )
        self.ev = Evaluator(
            env,
            small_policy(),
            num_workers=2 if self.backend == "ray" else 0,
            busy_policy=busy_policy,
            timeout=TIMEOUT,
            startup_timeout=300,
            on_result=self.on_result,
            episode_metrics_fn=functools.partial(metrics_fn, junk_file=self.faults["junk"]),
            **PLAN,
        )
        self.actor_ids = set(self.ev.actor_ids)
        # Default steps (the evaluator's counter) from a range of their own: every
        # request's step is unique, so each result names its request.
        self.ev.load_state_dict({"step_counter": self.counter_base})
        self.counter = self.counter_base

    def teardown(self):
        if self.ev is not None and not self.closed:
            self.do_shutdown()

    # -- on_result (the delivery thread) -------------------------------------------

    def on_result(self, td):
        step = int(td["eval/step"].item())
        self.published.append(step)
        mode = self.on_result_mode
        if mode == "raise":
            raise ZeroDivisionError("on_result fault")
        if mode == "slow":
            time.sleep(0.5)
        if mode == "trigger":
            self.on_result_mode = "ok"  # once
            try:
                with self.lock:
                    after = [r for r in self.requests if self.index_of(step) < r["index"]]
                    busy_ok = bool(after) or self.sync_in_flight
                    self.trigger(from_on_result=True, busy_ok=busy_ok)
            except BaseException as error:  # seen by the main thread's invariant
                self.on_result_failures.append(f"trigger_eval from on_result: {error!r}")

    def index_of(self, step: int) -> int:
        """Where an async request is in the order of acceptance (-1: a sync one, whose
        place relative to requests from on_result the model does not pin down)."""
        for r in self.requests:
            if r["step"] == step and not r["sync"]:
                return r["index"]
        return -1

    # -- requests ------------------------------------------------------------------

    def new_step(self) -> int:
        self.next_step += 1
        return self.next_step

    def trigger(self, *, from_on_result: bool = False, busy_ok: bool = True, default_step=False):
        """trigger_eval under self.lock; the model records what was accepted."""
        step = None if default_step else self.new_step()
        try:
            with Timed("trigger_eval", SLACK):
                handle = self.ev.trigger_eval(step=step)
        except EvaluatorBusyError:
            assert self.busy_policy == "error" and busy_ok, "EvaluatorBusyError when not busy"
            STATS["busy refusals"] += 1
            return None
        if handle is None:
            assert self.busy_policy == "skip" and busy_ok, "skipped when not busy"
            STATS["skips"] += 1
            return None
        if default_step:
            step = self.counter
            self.counter += 1
        # Under busy_policy="latest" only a request accepted while another was pending
        # may be replaced; one accepted while nothing was pending must run.
        self.record(step, sync=False, handle=handle)["replaceable"] = busy_ok
        STATS["on_result triggers" if from_on_result else "trigger_eval"] += 1
        return handle

    def record(self, step, *, sync, handle=None) -> dict:
        request = {
            "index": len(self.requests),
            "step": step,
            "sync": sync,
            "handle": handle,
            "cancelled": False,
            "delivered": 0,
            "replaceable": False,
        }
        self.requests.append(request)
        if handle is not None:
            self.handles.append(handle)
        return request

    def replaced(self, request: dict) -> bool:
        """Whether ``busy_policy="latest"`` allows ``request`` to have been replaced."""
        return self.busy_policy == "latest" and request["replaceable"]

    def undelivered_async(self) -> list[dict]:
        return [r for r in self.requests if not r["sync"] and not r["delivered"]]

    @precondition(lambda self: not self.closed)
    @rule(default_step=st.booleans())
    def trigger_eval(self, default_step):
        with self.lock:
            # Refused or skipped only while something is pending: an unread result is not.
            busy_ok = bool(self.undelivered_async()) or self.sync_in_flight
            self.trigger(default_step=default_step, busy_ok=busy_ok)

    @precondition(lambda self: not self.closed)
    @rule()
    def evaluate(self):
        """A blocking evaluate: its own result, or the error of a fault it met."""
        with self.lock:
            step = self.new_step()
            busy = bool(self.undelivered_async())
            self.sync_in_flight = True
        try:
            limit = (len(self.undelivered_async()) + 1) * (TIMEOUT + 20) + 60
            with Timed("evaluate", limit):
                result = self.ev.evaluate(step=step)
        except EvaluatorBusyError:
            assert self.busy_policy == "error" and busy
            STATS["busy refusals"] += 1
            return
        except FAULT_ERRORS as error:
            with self.lock:
                self.record(step, sync=True)["delivered"] = 1
            self.check_error(error)
            return
        finally:
            self.sync_in_flight = False
        with self.lock:
            self.record(step, sync=True)["delivered"] = 1
        STATS["evaluate"] += 1
        self.check_result(result, step)

    def check_result(self, result, step):
        assert result["eval/step"] == step
        assert numbers(result) == reference(step), f"step {step}: not the fault-free numbers"
        assert step in self.published, "a result was visible before on_result saw it"

    def check_error(self, error):
        assert isinstance(error, FAULT_ERRORS), repr(error)
        STATS[f"error {type(error).__name__}"] += 1

    def take_async(self, item_step: int | None, error: BaseException | None) -> None:
        """poll/wait delivered one item: the oldest undelivered async request, in order."""
        with self.lock:
            waiting = self.undelivered_async()
            assert waiting, "delivered something nobody asked for"
            if error is not None:
                item_step = getattr(error, "step", None)
                assert item_step is not None, f"an error that names no step: {error!r}"
            target = next((r for r in waiting if r["step"] == item_step), None)
            assert target is not None, f"outcome of step {item_step}: no such request waiting"
            skipped = [r for r in waiting if r["index"] < target["index"]]
            for r in skipped:  # passed over: each must have been cancelled or replaced
                assert r["cancelled"] or self.replaced(r), (
                    f"request of step {r['step']} was never delivered"
                )
                r["delivered"] = -1  # never, from now on
            target["delivered"] = 1

    @precondition(lambda self: not self.closed)
    @rule(timeout=st.sampled_from([0, 0.05, 0.5]), use_wait=st.booleans())
    def poll_or_wait(self, timeout, use_wait) -> None:
        self.read(timeout, use_wait)

    def read(self, timeout: float, use_wait: bool) -> bool:
        """One poll or wait; True if it delivered something."""
        call = self.ev.wait if use_wait else self.ev.poll
        try:
            with Timed("wait" if use_wait else "poll", timeout + SLACK):
                result = call(timeout)
        except FAULT_ERRORS as error:
            self.check_error(error)
            self.take_async(None, error)
            return True
        if result is None:
            return False
        step = result["eval/step"]
        self.take_async(step, None)
        self.check_result(result, step)
        STATS["results read"] += 1
        return True

    @precondition(lambda self: not self.closed)
    @rule(pick=st.integers(0, 15))
    def cancel(self, pick):
        # What is still waiting depends on timing: the draw must not (Hypothesis replays).
        waiting = [r for r in self.undelivered_async() if not r["cancelled"]]
        if not waiting:
            return
        request = waiting[pick % len(waiting)]
        with Timed("cancel", SLACK):
            if isinstance(request["handle"], concurrent.futures.Future):
                request["handle"].cancel()
            else:
                ray.cancel(request["handle"])
        request["cancelled"] = True
        STATS["cancels"] += 1

    @precondition(lambda self: not self.closed)
    @rule(load=st.booleans())
    def state_dict_round_trip(self, load):
        assert self.ev.state_dict() == {"step_counter": self.counter}
        if load:
            self.counter_base += 10**6  # a fresh range: steps stay unique
            with self.lock:
                self.ev.load_state_dict({"step_counter": self.counter_base})
                self.counter = self.counter_base
        STATS["state_dict"] += 1

    # -- faults ----------------------------------------------------------------------

    @precondition(lambda self: not self.closed)
    @rule(mode=st.sampled_from(["ok", "raise", "slow", "trigger"]))
    def set_on_result(self, mode):
        self.on_result_mode = mode
        if mode != "ok":
            STATS[f"fault on_result {mode}"] += 1

    @precondition(lambda self: not self.closed)
    @rule(fault=st.sampled_from(["raise", "hang", "crash", "junk"]), sync=st.booleans())
    def inject(self, fault, sync):
        """Arm one fault, and request an evaluation that may meet it."""
        if fault == "crash" and self.backend != "ray":
            fault = "raise"  # os._exit would end this process
        Path(self.faults[fault]).unlink(missing_ok=True)
        STATS[f"fault {fault}"] += 1
        if sync:
            self.evaluate()
        else:
            self.trigger_eval(default_step=False)

    @precondition(lambda self: not self.closed and self.backend == "ray")
    @rule()
    def kill_worker(self):
        """SIGKILL one live worker process, during an evaluation."""
        self.trigger_eval(default_step=False)
        pids = worker_pids(set(self.ev.actor_ids[1:]))
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            STATS["fault SIGKILL"] += 1

    # -- checks ----------------------------------------------------------------------

    def drain(self):
        """Read every pending async outcome (bounded); faults are disarmed first."""
        for path in self.faults.values():
            Path(path).touch()
        deadline = time.monotonic() + (len(self.undelivered_async()) + 1) * (TIMEOUT + 30)
        while self.ev.pending and time.monotonic() < deadline:
            self.read(0.5, True)
        assert not self.ev.pending, "requests still pending after the drain"
        # The last result may still be being published (on_result runs): it is not
        # pending any more, but not handed over yet. wait(t) returns it, and None at
        # once when nothing async is left.
        while self.read(SLACK, True):
            pass
        for r in self.undelivered_async():
            assert r["cancelled"] or self.replaced(r), (
                f"request of step {r['step']} was never delivered"
            )

    @precondition(lambda self: not self.closed)
    @rule()
    def healthy_evaluate(self):
        """After whatever came before: a fault-free evaluate gives the fault-free numbers."""
        self.drain()
        self.on_result_mode = "ok"
        step = self.new_step()
        with Timed("healthy evaluate", TIMEOUT + 60):
            result = self.ev.evaluate(step=step)
        with self.lock:
            self.record(step, sync=True)["delivered"] = 1
        self.check_result(result, step)
        STATS["healthy evaluate"] += 1

    @precondition(lambda self: not self.closed)
    @rule(timeout=st.sampled_from([2.0, 10.0]))
    def shutdown(self, timeout):
        self.do_shutdown(timeout)

    @precondition(lambda self: self.closed)
    @rule()
    def after_shutdown(self):
        """Shut down: shutdown again returns at once, nothing is delivered, requests fail."""
        with Timed("shutdown again", SLACK):
            self.ev.shutdown()
        with Timed("wait after shutdown", SLACK):
            assert self.ev.wait(5) is None and not self.ev.pending
        with pytest.raises(RuntimeError, match="shut down"):
            self.ev.evaluate()

    def do_shutdown(self, timeout: float = 10.0):
        with Timed("shutdown", timeout + SLACK + 5):
            self.ev.shutdown(timeout)
        self.closed = True
        STATS["shutdowns"] += 1
        # Every handle has settled.
        for handle in self.handles:
            if isinstance(handle, concurrent.futures.Future):
                assert handle.done(), "an in-process handle still pending after shutdown"
        refs = [h for h in self.handles if not isinstance(h, concurrent.futures.Future)]
        if refs:
            _, left = ray.wait(refs, num_returns=len(refs), timeout=30, fetch_local=False)
            assert not left, f"{len(left)} handles still pending 30 s after shutdown"
        # No thread of ours (an abandoned hung step ends within HANG_SECONDS) ...
        left_threads = wait_no_evaluator_threads(HANG_SECONDS + SLACK)
        assert not left_threads, thread_stacks(left_threads)
        # ... and no actor of ours (in-process there is none, and no Ray to ask).
        if self.backend == "ray":
            left = wait_until_gone(set(self.ev.actor_ids) | self.actor_ids, timeout=60)
            assert not left, f"actors left after shutdown: {left}"
            assert len(self.actor_ids) == 3
        with pytest.raises(RuntimeError, match="shut down"):
            self.ev.trigger_eval()

    @invariant()
    def on_result_never_failed(self):
        assert not self.on_result_failures, self.on_result_failures

    @invariant()
    def each_result_published_once(self):
        assert len(self.published) == len(set(self.published)), self.published
        # In request order: on_result sees steps in the order they were accepted.
        order = [self.index_of(s) for s in self.published]
        known = [i for i in order if i >= 0]
        assert known == sorted(known), (
            f"published out of order: {self.published}; requests (index, step, sync, "
            f"cancelled): {[(r['index'], r['step'], r['sync'], r['cancelled']) for r in self.requests]}"
        )


def worker_pids(actor_ids: set[str]) -> list[int]:
    actors = list_actors(
        address=ray.get_runtime_context().gcs_address,
        filters=[("state", "=", "ALIVE")],
        limit=10_000,
        raise_on_missing_output=False,
    )
    return [a.pid for a in actors if a.actor_id in actor_ids and a.pid]


class LocalLifecycle(Lifecycle):
    backend = "local"


class RayLifecycle(Lifecycle):
    backend = "ray"


def run(machine, backend: str) -> None:
    STATS.clear()
    started = time.monotonic()
    if LONG:
        # Runs of LONG_EXAMPLES examples each (a run starts with its simplest example,
        # then draws at random), until the time is up.
        profile = settings(settings.get_profile("long"), max_examples=LONG_EXAMPLES[backend])
        while time.monotonic() < started + LONG_SECONDS:
            run_state_machine_as_test(machine, settings=profile)
    else:
        examples, steps = CI[backend]
        profile = settings(
            settings.get_profile("ci"), max_examples=examples, stateful_step_count=steps
        )
        run_state_machine_as_test(machine, settings=profile)
    faults = {k: v for k, v in STATS.items() if k.startswith("fault")}
    print(
        f"\n[lifecycle model, {backend}] {STATS['sequences']} sequences in "
        f"{time.monotonic() - started:.0f} s; faults injected: {dict(sorted(faults.items()))}; "
        f"all: {dict(sorted(STATS.items()))}"
    )


@pytest.mark.timeout(900)
def test_lifecycle_in_process():
    run(LocalLifecycle, "local")


@pytest.mark.timeout(900)
def test_lifecycle_on_ray_workers(ray_module):
    run(RayLifecycle, "ray")
