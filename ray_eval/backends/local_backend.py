"""Evaluations in this process, on a background thread: no Ray, the same numbers.

For debugging (breakpoints and prints in the env work) and for tests. The
episodes are planned, seeded and summarized as on the Ray pool, and the policy
is a copy of the one given, as on a Ray worker: the trainer's module is not
touched. Handles are ``concurrent.futures.Future``s.

``timeout`` is real here too: when an evaluation overruns it, its future fails
with ``EvaluationTimeout`` at once, and the stuck thread is abandoned (a daemon
thread, so it never holds up interpreter exit; if its stuck call ever returns, it
stops at its next step and closes its envs); the next evaluation runs on a fresh
worker, whose build is not counted in that evaluation's timeout (the watchdog
starts once the worker is built).

The trainer's process state is left alone (see ``process_state``): a policy
that uses neither torch's global generator nor TorchRL's exploration type runs
on the background thread and sets neither; one that does runs while the thread
that asked waits (``waits_for_caller``: ``trigger_eval`` returns once it is
done), on state lent to it and handed back first.
"""

from __future__ import annotations

import contextlib
import copy
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future

from ray_eval.backends.process_state import LentState, Probe, use_one_torch_thread_here
from ray_eval.backends.worker import ChunkCancelled, EvalWorker, WorkerConfig
from ray_eval.errors import EvaluationCancelled, EvaluationTimeout
from ray_eval.planning import Chunk, EvalRequest, EvaluationPlan, RequestOrder
from ray_eval.results.metrics import EvalResult
from ray_eval.weights import EnvState, Payload


class LocalBackend:
    """Runs requests one at a time, in order, on a daemon thread with its own worker."""

    def __init__(self, plan: EvaluationPlan, worker_config: WorkerConfig, policy) -> None:
        self._plan = plan
        self._worker_config = worker_config
        # Each worker gets its own copy, as on Ray: loading weights and eval() stay
        # off the trainer's module. (A policy that cannot be copied, e.g. one
        # holding a lock, is used as it is: in-process needs no pickling.)
        self._policy = _copy_or_same(policy)
        # Built here, on the caller's thread, which may set process state: the first
        # policy call shows whether evaluations need it (``waits_for_caller``).
        worker = LocalWorker(self._worker_config, _copy_or_same(self._policy), probe=True)
        self.workers = [worker.describe()]
        plan.adopt_batches(self.workers[0].batches)
        self.waits_for_caller = worker.touches_process_state
        self._exploration = worker._exploration
        if self._policy is None:  # built by policy_factory: replacements copy it, so that
            self._policy = _copy_or_same(worker.policy)  # building draws no random numbers
        self.actor_ids: list[str] = []
        self._order = RequestOrder()
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # settles each future once: runner or watchdog
        self._taken: weakref.WeakSet[Future] = weakref.WeakSet()  # see take()
        self._closed = False
        self._runner = _Runner(self, worker)

    def _new_worker(self) -> LocalWorker:
        """A replacement worker, built on the runner's thread."""
        return LocalWorker(self._worker_config, _copy_or_same(self._policy), probe=False)

    def submit(
        self, request: EvalRequest, payload: Payload | None, env_state: EnvState | None = None
    ) -> Future:
        future: Future = Future()
        self._order.arrived(request)
        self._requests.put((request, (payload, env_state), future))
        return future

    @staticmethod
    def ready(handles: list, timeout: float | None) -> list:
        deadline = None if timeout is None else time.monotonic() + timeout
        for handle in handles:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                handle.exception(timeout=remaining)
            except CancelledError:
                pass
            except TimeoutError:
                break
        return [h for h in handles if h.done()]

    @staticmethod
    def result(handle: Future) -> EvalResult | None:
        try:
            return handle.result()
        except CancelledError:
            raise EvaluationCancelled("the evaluation was cancelled") from None

    def skip(self, seq: int) -> None:
        """Nothing to do: a cancelled future is passed over by the runner."""

    def take(self, future: Future) -> bool:
        """``future.set_running_or_notify_cancel()``, once, whoever asks first (the
        runner, or ``shutdown``): True if it is now running, False if it was cancelled
        (everything waiting on it, ``concurrent.futures.wait`` included, is told)."""
        with self._lock:
            if future in self._taken:
                return False
            self._taken.add(future)
            return future.set_running_or_notify_cancel()

    def settle(self, future: Future, *, result=None, error: BaseException | None = None) -> bool:
        """Set ``future``'s outcome unless it has one already; True if this call set it."""
        with self._lock:
            if future.done():
                return False
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
            return True

    def time_out(self, runner: _Runner, future: Future, step: int) -> None:
        """The watchdog: fail the overrunning evaluation, replace the stuck runner."""
        error = EvaluationTimeout(
            f"evaluation at step {step} did not finish within {self._plan.timeout:g} s "
            f"(in-process); its thread was abandoned and a fresh worker runs the next one"
        )
        if runner.lent is not None:
            runner.lent.hand_back()  # before the caller goes on; the stuck thread never will
        if self.settle(future, error=error) and not self._closed:
            runner.abandoned = True
            self._runner = _Runner(self, None)

    def shutdown(self, timeout: float = 10.0, handles: Sequence[Future] = ()) -> None:
        """Stop the runner; it closes its envs once it is not stepping them.

        Every pending future in ``handles`` settles: a queued one is cancelled, the
        running one fails with ``CancelledError`` (its result, if the rollout ever
        ends, is dropped). ``result()`` raises ``CancelledError`` for each.
        """
        self._closed = True
        self._runner.abandoned = True
        self._requests.put(None)  # wakes the runner
        for future in handles:
            future.cancel()  # a queued one is cancelled,
            self.take(future)  # and everything waiting on it told;
            # the running one fails, with the same error a cancelled one raises.
            self.settle(future, error=CancelledError("the Evaluator was shut down"))

    abandon = shutdown


class _Runner:
    """One daemon thread with one worker, taking requests until it is abandoned."""

    def __init__(self, backend: LocalBackend, worker: EvalWorker | None) -> None:
        self.backend = backend
        self.worker = worker
        self.abandoned = False
        self.lent: LentState | None = None  # the caller's state, while lent to a request
        self._started = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="ray-eval-local", daemon=True)
        self.thread.start()
        # While its thread count is set (the process default changes for an instant),
        # the thread that builds this runner waits: no thread of its own starts torch then.
        self._started.wait()

    def _loop(self) -> None:
        backend = self.backend
        try:
            # One torch thread, as on a Ray worker: the same kernels, so the same bits.
            use_one_torch_thread_here()
        finally:
            self._started.set()
        try:
            while not self.abandoned:
                try:
                    item = backend._requests.get(timeout=0.5)
                except queue.Empty:
                    continue
                if item is None or self.abandoned:
                    if item is not None:
                        backend._requests.put(item)  # for the runner that replaced this one
                    break
                request, payload, future = item
                if backend.take(future):  # False: cancelled (its waiters are told)
                    self._run(request, payload, future)
        finally:
            if self.worker is not None:
                self.worker.close()

    def _run(self, request: EvalRequest, payload: Payload | None, future: Future) -> None:
        backend, plan = self.backend, self.backend._plan
        if backend._order.is_replaced(request):
            backend.settle(future, result=None)
            return
        watchdog = None
        if backend.waits_for_caller:
            self.lent = LentState(backend._exploration)
        outcome: dict = {}
        try:
            if self.worker is None:
                # A replacement (after a timeout) builds its envs and policy first: that
                # is start-up, not evaluation time, so the watchdog starts after it.
                self.worker = backend._new_worker()
            if plan.timeout is not None:
                watchdog = threading.Timer(
                    plan.timeout, backend.time_out, (self, future, request.step)
                )
                watchdog.daemon = True
                watchdog.start()
            outcome["result"] = self._evaluate(request, payload, future)
        except BaseException as error:
            outcome["error"] = error
        finally:
            if self.lent is not None:
                self.lent.hand_back()  # before the caller is told
            if watchdog is not None:
                watchdog.cancel()
            backend.settle(future, **outcome)

    def _evaluate(
        self, request: EvalRequest, payload: Payload | None, future: Future
    ) -> EvalResult | None:
        plan = self.backend._plan
        started = time.perf_counter()
        weights, env_state = payload
        worker = self.worker
        worker.lent = self.lent
        worker.settled = future.done
        loads, loaded_bytes = worker.weights_loads, worker.weights_loaded_bytes
        worker.load_weights(weights, identity=("local", request.seq))
        worker.load_env_state(env_state)
        batches = []
        for chunk in plan.chunks(request.step, 1):
            if future.done():  # cancelled (or timed out) meanwhile: stop here
                return None
            batches.append(worker.run(chunk))
        batches[0].weights_loads = worker.weights_loads - loads
        batches[0].weights_loaded_bytes = worker.weights_loaded_bytes - loaded_bytes
        result = plan.summarize(
            batches, request.step, seconds=time.perf_counter() - started, worker_restarts=0
        )
        if plan.dump_video:
            worker.dump_videos(request.step, list(plan.members))
        return result


class LocalWorker(EvalWorker):
    """A worker in the trainer's process: it sets no process state of its own.

    ``probe``: built on the caller's thread, which may set process state for the
    first policy call and see what it touched. A replacement, built on the
    runner's thread, does not. ``lent``: the caller's state, while lent to this
    worker's evaluation; chunks then seed torch's generator as a Ray worker does.
    """

    def __init__(self, config: WorkerConfig, policy, *, probe: bool) -> None:
        self._probe = probe
        self.lent: LentState | None = None
        self.settled: Callable[[], bool] = _never  # has the running request an outcome?
        super().__init__(config, policy)
        for rollout in self.rollouts.values():
            rollout._act = self._stoppable(rollout._act)

    def _stoppable(self, act):
        """``act``, stopping the chunk between two steps once its request has an outcome
        (timed out, or cancelled at shutdown): an abandoned thread whose hung step
        returns ends there, instead of running episodes nobody will read."""

        def act_unless_settled(obs):
            if self.settled():
                raise ChunkCancelled("the evaluation ended (timed out or cancelled)")
            return act(obs)

        return act_unless_settled

    def _probing(self):
        return super()._probing() if self._probe else contextlib.nullcontext(Probe())

    def _chunk_state(self, chunk: Chunk):
        if self.lent is not None:
            self.lent.seed(int(chunk.seeds[0]))
        return contextlib.nullcontext()


def _never() -> bool:
    return False


def _copy_or_same(policy):
    try:
        return copy.deepcopy(policy)
    except Exception:
        return policy
