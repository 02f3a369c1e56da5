"""Where evaluations run: a Ray worker pool, or this process.

Both backends take numbered requests and return a handle per request: a
``ray.ObjectRef`` of the pool's ``evaluate`` call, or a
``concurrent.futures.Future`` in-process. The façade waits on handles through
``wait``/``get`` and never needs to know which it holds.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ray_eval.errors import EvaluationTimeout, ResourceUnavailableError, WorkerDiedError
from ray_eval.metrics import EvalResult
from ray_eval.pool import EvalRequest, PoolConfig, WorkerPool
from ray_eval.resources import check_resources
from ray_eval.weights import Payload
from ray_eval.worker import EvalWorker, WorkerConfig, WorkerInfo

log = logging.getLogger("ray_eval")


def ensure_ray() -> bool:
    """Connect to Ray, starting a quiet local instance if none is running.

    Returns True when this call started it. A cluster job calls ``ray.init()``
    (or ``ray.init(address="auto")``) first and the evaluator uses that cluster.
    """
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
        return False
    ray.init(
        address="local",  # a new instance, not one an earlier `ray start` left running
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        logging_level=logging.WARNING,
        configure_logging=True,
    )
    return True


class RayBackend:
    """Evaluations on a ``WorkerPool`` actor and its workers."""

    def __init__(self, pool_config: PoolConfig, worker_config: WorkerConfig, policy) -> None:
        self.started_ray = ensure_ray()
        check_resources(pool_config.worker_resources, pool_config.num_workers)
        # Pickled here and unpickled only by the workers: the pool actor passes
        # them on without importing torch, TorchRL or the user's env code.
        config_blob = ray.cloudpickle.dumps(worker_config)
        policy_blob = ray.cloudpickle.dumps(policy) if policy is not None else None
        here = ray.get_runtime_context().get_node_id()
        self._pool = (
            ray.remote(WorkerPool)
            .options(
                num_cpus=0,
                max_concurrency=1000,  # shutdown and queued requests while one runs
                # On the driver's node, which it shares fate with anyway: a node that
                # dies then takes workers only, which are restarted elsewhere. (Soft
                # affinity is not enough: Ray places a zero-CPU actor on another node
                # when the driver's node has no CPU, e.g. a head started with 0 CPUs.)
                scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
            )
            .remote(pool_config, config_blob, policy_blob)
        )
        self._pool_id = self._pool._actor_id.hex()
        self._worker_ids: list[str] = []
        # The pool bounds the workers' start by startup_timeout; this bounds the
        # pool's own start (a zero-CPU actor, so only a broken cluster delays it).
        bound = pool_config.startup_timeout + 60
        try:
            self.workers: list[WorkerInfo] = ray.get(self._pool.start.remote(), timeout=bound)
            self._worker_ids = ray.get(self._pool.actor_ids.remote(), timeout=60)
        except GetTimeoutError:
            self.shutdown(timeout=5)
            raise ResourceUnavailableError(
                f"the evaluator's pool actor did not start within {bound:g} s"
            ) from None
        except BaseException as error:
            self.shutdown(timeout=5)
            raise unwrap(error) from None

    @property
    def actor_ids(self) -> list[str]:
        """The pool actor and its current workers (a replaced worker's successor included)."""
        if self._pool is None:
            return []
        with contextlib.suppress(Exception):
            self._worker_ids = ray.get(self._pool.actor_ids.remote(), timeout=30)
        return [self._pool_id, *self._worker_ids]

    def submit(self, request: EvalRequest, payload: Payload | None) -> ray.ObjectRef:
        if payload is not None:
            # One put per evaluation; every worker gets this same ref.
            request.weights = [ray.put(payload)]
        return self._pool.evaluate.remote(request)

    @staticmethod
    def ready(handles: list, timeout: float | None) -> list:
        if not handles:
            return []
        done, _ = ray.wait(handles, num_returns=len(handles), timeout=timeout, fetch_local=False)
        return done

    @staticmethod
    def get(handle, timeout: float | None = None) -> EvalResult | None:
        try:
            return ray.get(handle, timeout=timeout)
        except GetTimeoutError:
            raise
        except RayActorError as error:  # the pool actor itself is gone
            raise WorkerDiedError(
                f"the evaluator's pool actor died, and its workers with it; create a new "
                f"Evaluator. Cause: {' '.join(str(error).split())}",
                cause=str(error),
            ) from None
        except BaseException as error:
            raise unwrap(error) from None

    def shutdown(self, timeout: float = 10.0) -> None:
        pool, self._pool = getattr(self, "_pool", None), None
        if pool is None:
            return
        # Killing the pool below takes its workers with it (they share its fate).
        with contextlib.suppress(Exception):
            ray.get(pool.shutdown.remote(), timeout=timeout)
        ray.kill(pool, no_restart=True)


class LocalBackend:
    """Evaluations in this process, on a background thread: no Ray, same numbers.

    For debugging (breakpoints and prints in the env work) and for tests. The
    episodes are planned and seeded exactly as on the Ray pool.
    """

    def __init__(self, pool_config: PoolConfig, worker_config: WorkerConfig, policy) -> None:
        self.started_ray = False
        self._config = pool_config
        self._worker = EvalWorker(worker_config, policy)
        self.workers = [self._worker.describe()]
        self.actor_ids: list[str] = []
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="ray-eval-local"
        )
        self._newest_replaceable = -1

    def submit(self, request: EvalRequest, payload: Payload | None) -> concurrent.futures.Future:
        if request.replaceable:
            self._newest_replaceable = max(self._newest_replaceable, request.seq)
        return self._executor.submit(self._evaluate, request, payload)

    def _evaluate(self, request: EvalRequest, payload: Payload | None) -> EvalResult | None:
        if request.replaceable and self._newest_replaceable > request.seq:
            return None
        config = self._config
        started = time.perf_counter()
        deadline = None if config.timeout is None else started + config.timeout
        self._worker.load_weights(payload, identity=("local", request.seq))
        batches = []
        for chunk in config.plan(request.step, num_workers=1):
            if deadline is not None and time.perf_counter() > deadline:
                raise EvaluationTimeout(
                    f"evaluation at step {request.step} did not finish within {config.timeout:g} s"
                )
            batches.append(self._worker.run(chunk))
        return config.summarize(
            batches, request.step, seconds=time.perf_counter() - started, worker_restarts=0
        )

    @staticmethod
    def ready(handles: list, timeout: float | None) -> list:
        done, _ = concurrent.futures.wait(handles, timeout=timeout)
        return [h for h in handles if h in done]

    @staticmethod
    def get(handle, timeout: float | None = None) -> EvalResult | None:
        return handle.result(timeout=timeout)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._worker.close()


def unwrap(error: BaseException) -> BaseException:
    """The exception a worker or the pool raised, without Ray's wrapper."""
    if isinstance(error, RayTaskError):
        cause = getattr(error, "cause", None)
        if isinstance(cause, BaseException):
            return cause
    return error
