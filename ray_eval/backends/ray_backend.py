"""Evaluations on a Ray worker pool: the one ``ray.put`` of the weights happens here.

``RayBackend`` starts a ``WorkerPool`` actor on the driver's node, which starts
the workers in the background; reading ``workers`` waits for them. Each request
becomes a ``WorkerPool.evaluate`` call, whose ``ObjectRef`` is the handle
``trigger_eval`` returns. Every call checks that Ray is still up first: a Ray
call after ``ray.shutdown()`` would start a new Ray instance, which at
interpreter exit means a process that never ends.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError, TaskCancelledError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ray_eval.backends.pool import PoolConfig, WorkerPool
from ray_eval.backends.resources import (
    FIRST_REPORT_WAIT,
    Autoscaler,
    check_resources,
    find_autoscaler,
    requested_resources,
)
from ray_eval.backends.worker import WorkerConfig, WorkerInfo
from ray_eval.errors import (
    EvaluationCancelled,
    ResourceUnavailableError,
    WorkerDiedError,
    remote_cause,
)
from ray_eval.planning import EvalRequest, EvaluationPlan
from ray_eval.results.metrics import EvalResult
from ray_eval.weights import EnvState, Payload


class RayBackend:
    """Evaluations on a ``WorkerPool`` actor and its workers."""

    waits_for_caller = False  # the workers' process state is their own (see LocalBackend)

    def __init__(
        self, config: PoolConfig, plan: EvaluationPlan, worker_config: WorkerConfig, policy
    ) -> None:
        # What each worker really asks for (actor_options override the per-worker
        # amounts). Where an autoscaler can add nodes, too little now is normal:
        # the workers are requested and waited for instead.
        request = requested_resources(config.worker_resources, config.actor_options)
        autoscaler = find_autoscaler()
        if autoscaler is None:
            try:
                check_resources(request, config.num_workers)
            except ResourceUnavailableError:
                # A cluster started moments ago: its autoscaler may not have reported yet.
                autoscaler = find_autoscaler(wait=FIRST_REPORT_WAIT)
                if autoscaler is None:
                    raise
        # Pickled here and unpickled only by the workers: the pool actor passes
        # them on without importing torch, TorchRL or the user's env code.
        config_blob = ray.cloudpickle.dumps(worker_config)
        policy_blob = ray.cloudpickle.dumps(policy) if policy is not None else None
        here = ray.get_runtime_context().get_node_id()
        self._pool = (
            ray.remote(WorkerPool)
            .options(
                num_cpus=0,
                max_concurrency=1000,  # shutdown, skips and queued requests while one runs
                # On the driver's node, which it shares fate with anyway: a node that
                # dies then takes workers only, which are restarted elsewhere. (Soft
                # affinity is not enough: Ray places a zero-CPU actor on another node
                # when the driver's node has no CPU, e.g. a head started with 0 CPUs.)
                scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
            )
            .remote(config, plan, config_blob, policy_blob)
        )
        self._pool_id = self._pool._actor_id.hex()
        # The env state last put, and its ref: every request carries the evaluator's
        # current env state, put once for all the requests that share it.
        self._env_state: tuple[EnvState, ray.ObjectRef] | None = None
        self._worker_ids: list[str] = []
        # The pool bounds the workers' start by startup_timeout; this bounds the
        # pool's own start (a zero-CPU actor, so only a broken cluster delays it).
        self._start = (config.startup_timeout + 60, autoscaler, request)
        self._started = self._pool.start.remote(str(autoscaler) if autoscaler else None)
        self._workers: list[WorkerInfo] | None = None
        self._start_error: BaseException | None = None
        self._start_lock = threading.Lock()

    @property
    def workers(self) -> list[WorkerInfo]:
        """What each worker reported at start-up. The first call waits for the start
        (up to ``startup_timeout``) and raises what stopped it, as does every later one."""
        with self._start_lock:
            if self._workers is None and self._start_error is None:
                self._await_start()
            if self._start_error is not None:
                raise self._start_error
            return self._workers

    def _await_start(self) -> None:
        bound, autoscaler, request = self._start
        try:
            workers = _await_start(self._started, bound, autoscaler, request)
            self._worker_ids = ray.get(self._pool.actor_ids.remote(), timeout=60)
            self._workers = workers
            return
        except GetTimeoutError:
            error = ResourceUnavailableError(
                f"the evaluator's pool actor did not start within {bound:g} s"
            )
        except BaseException as cause:
            error = remote_cause(cause)
        self.shutdown(timeout=5)
        # A Ctrl-C stops this start, not the next call: that one says the workers are gone.
        self._start_error = (
            error
            if isinstance(error, Exception)
            else RuntimeError("the evaluator's workers did not start: interrupted")
        )
        raise error from None

    @property
    def actor_ids(self) -> list[str]:
        """The pool actor and its current workers (a replaced worker's successor included)."""
        if self._pool is None or not ray.is_initialized():
            return []
        with contextlib.suppress(Exception):
            self._worker_ids = ray.get(self._pool.actor_ids.remote(), timeout=30)
        return [self._pool_id, *self._worker_ids]

    def submit(
        self, request: EvalRequest, payload: Payload | None, env_state: EnvState | None = None
    ) -> ray.ObjectRef:
        _check_ray_up()
        if payload is not None:
            # One put per evaluation; every worker gets this same ref.
            request.weights = [ray.put(payload)]
        if env_state is not None:
            if self._env_state is None or self._env_state[0] is not env_state:
                self._env_state = (env_state, ray.put(env_state))
            request.env_state = [self._env_state[1]]
        return self._pool.evaluate.remote(request)

    @staticmethod
    def ready(handles: list, timeout: float | None) -> list:
        if not handles:
            return []
        _check_ray_up()
        done, _ = ray.wait(handles, num_returns=len(handles), timeout=timeout, fetch_local=False)
        return done

    @staticmethod
    def result(handle: ray.ObjectRef) -> EvalResult | None:
        """The finished evaluation's result; raises what it raised."""
        _check_ray_up()
        try:
            return ray.get(handle)
        except TaskCancelledError:
            raise EvaluationCancelled("the evaluation was cancelled") from None
        except RayActorError as error:  # the pool actor itself is gone
            raise WorkerDiedError(
                f"the evaluator's pool actor died, and its workers with it; create a new "
                f"Evaluator. Cause: {' '.join(str(error).split())}",
                cause=str(error),
            ) from None
        except BaseException as error:
            raise remote_cause(error) from None

    def skip(self, seq: int) -> None:
        """Tell the pool that request ``seq`` will not come (it was cancelled on its way)."""
        if self._pool is not None and ray.is_initialized():
            self._pool.skip.remote(seq)

    def shutdown(self, timeout: float = 10.0, handles: Sequence[ray.ObjectRef] = ()) -> None:
        """Stop the pool and its workers (waits up to ``timeout`` for a clean stop).

        ``handles``, the requests still pending, are cancelled first, so that each
        settles as cancelled (``TaskCancelledError``); one the pool's end beats
        raises ``RayActorError``. Either way none is left waiting.
        """
        pool, self._pool = getattr(self, "_pool", None), None
        if pool is None or not ray.is_initialized():
            return
        if handles:
            for ref in handles:
                with contextlib.suppress(Exception):
                    ray.cancel(ref)
            with contextlib.suppress(Exception):
                ray.wait(
                    list(handles),
                    num_returns=len(handles),
                    timeout=min(timeout, 2.0),
                    fetch_local=False,
                )
        # Killing the pool below takes its workers with it (they share its fate).
        with contextlib.suppress(Exception):
            ray.get(pool.shutdown.remote(), timeout=timeout)
        with contextlib.suppress(Exception):
            ray.kill(pool, no_restart=True)

    def abandon(self, handles: Sequence[ray.ObjectRef] = ()) -> None:
        """Stop without waiting for anything (finalizers, interpreter exit): the
        pending ``handles`` settle with ``RayActorError`` as the pool dies."""
        pool, self._pool = getattr(self, "_pool", None), None
        if pool is not None and ray.is_initialized():
            with contextlib.suppress(Exception):
                ray.kill(pool, no_restart=True)


def _await_start(started: ray.ObjectRef, bound: float, autoscaler: Autoscaler | None, request):
    """``WorkerPool.start``'s result; meanwhile, on an autoscaling cluster, fail as soon
    as the autoscaler says no node it can add would host a worker."""
    if autoscaler is None:
        return ray.get(started, timeout=bound)
    deadline = time.monotonic() + bound
    while not ray.wait([started], timeout=min(1.0, max(0.0, deadline - time.monotonic())))[0]:
        if time.monotonic() >= deadline:
            raise GetTimeoutError
        reason = autoscaler.infeasible(request)
        if reason is not None:
            raise ResourceUnavailableError(reason)
    return ray.get(started)


def _check_ray_up() -> None:
    if not ray.is_initialized():
        raise RuntimeError(
            "Ray was shut down while this Evaluator was alive; create a new Evaluator "
            "(ray_eval never starts Ray again behind your back)"
        )
