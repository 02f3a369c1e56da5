"""Evaluations in this process, on a background thread: no Ray, the same numbers.

For debugging (breakpoints and prints in the env work) and for tests. The
episodes are planned, seeded and summarized as on the Ray pool, and the policy
is a copy of the one given, as on a Ray worker: the trainer's module is not
touched. Handles are ``concurrent.futures.Future``s.

``timeout`` is real here too: when an evaluation overruns it, its future fails
with ``EvaluationTimeout`` at once, and the stuck thread is abandoned (a daemon
thread, so it never holds up interpreter exit, and it closes its own envs if it
ever returns); the next evaluation runs on a fresh worker.
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from concurrent.futures import CancelledError, Future

import torch

from ray_eval.backends.worker import EvalWorker, WorkerConfig
from ray_eval.errors import EvaluationCancelled, EvaluationTimeout
from ray_eval.planning import EvalRequest, EvaluationPlan, RequestOrder
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
        worker = self._new_worker()
        self.workers = [worker.describe()]
        self.actor_ids: list[str] = []
        self._order = RequestOrder()
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # settles each future once: runner or watchdog
        self._closed = False
        self._runner = _Runner(self, worker)

    def _new_worker(self) -> EvalWorker:
        return EvalWorker(self._worker_config, _copy_or_same(self._policy))

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
        if self.settle(future, error=error) and not self._closed:
            runner.abandoned = True
            self._runner = _Runner(self, None)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the runner; it closes its envs once it is not stepping them."""
        self._closed = True
        self._runner.abandoned = True
        self._requests.put(None)  # wakes the runner

    abandon = shutdown


class _Runner:
    """One daemon thread with one worker, taking requests until it is abandoned."""

    def __init__(self, backend: LocalBackend, worker: EvalWorker | None) -> None:
        self.backend = backend
        self.worker = worker
        self.abandoned = False
        self.thread = threading.Thread(target=self._loop, name="ray-eval-local", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        backend = self.backend
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
                if future.set_running_or_notify_cancel():
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
        if plan.timeout is not None:
            watchdog = threading.Timer(plan.timeout, backend.time_out, (self, future, request.step))
            watchdog.daemon = True
            watchdog.start()
        threads = torch.get_num_threads()
        try:
            # One torch thread while the rollout runs, as on a Ray worker: the same
            # kernels, so the same bits (this process's own count is restored after).
            torch.set_num_threads(1)
            if self.worker is None:
                self.worker = backend._new_worker()
            started = time.perf_counter()
            weights, env_state = payload
            worker = self.worker
            loads, loaded_bytes = worker.weights_loads, worker.weights_loaded_bytes
            worker.load_weights(weights, identity=("local", request.seq))
            worker.load_env_state(env_state)
            batches = [worker.run(chunk) for chunk in plan.chunks(request.step, 1)]
            batches[0].weights_loads = worker.weights_loads - loads
            batches[0].weights_loaded_bytes = worker.weights_loaded_bytes - loaded_bytes
            result = plan.summarize(
                batches, request.step, seconds=time.perf_counter() - started, worker_restarts=0
            )
            if plan.dump_video:
                self.worker.dump_videos(request.step, list(plan.members))
        except BaseException as error:
            backend.settle(future, error=error)
        else:
            backend.settle(future, result=result)
        finally:
            torch.set_num_threads(threads)
            if watchdog is not None:
                watchdog.cancel()


def _copy_or_same(policy):
    try:
        return copy.deepcopy(policy)
    except Exception:
        return policy
