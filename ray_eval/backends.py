"""Where evaluations run: a Ray worker pool, or this process.

Both backends take numbered requests and return a handle per request: a
``ray.ObjectRef`` of the pool's ``evaluate`` call, or a
``concurrent.futures.Future`` in-process. The façade waits on handles through
``wait``/``get`` and never needs to know which it holds.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import logging
import os
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ray_eval.episodes import EpisodeData
from ray_eval.errors import EvaluationTimeout
from ray_eval.metrics import EvalResult, aggregate
from ray_eval.planning import plan_chunks
from ray_eval.pool import EvalRequest, PoolConfig, WorkerPool, check_resources
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
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        logging_level=logging.WARNING,
        configure_logging=True,
    )
    return True


def check_picklable(obj: Any, what: str) -> None:
    """Raise ``TypeError`` naming what in ``obj`` cannot be sent to the workers."""
    if obj is None:
        return
    try:
        ray.cloudpickle.dumps(obj)
    except Exception as error:
        report = io.StringIO()
        with contextlib.redirect_stdout(report):
            _, failures = ray.util.inspect_serializability(obj, name=what)
        culprits = ", ".join(sorted({f"{f.name} ({type(f.obj).__name__})" for f in failures or []}))
        raise TypeError(
            f"{what} cannot be pickled for the Ray workers: {type(error).__name__}: {error}"
            + (f"; not serializable: {culprits}" if culprits else "")
            + ". Pass a factory that builds it inside the worker, or use backend='local'."
        ) from None


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
                scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
            )
            .remote(pool_config, config_blob, policy_blob)
        )
        try:
            self.workers: list[WorkerInfo] = ray.get(self._pool.start.remote())
            self.actor_ids = [self._pool._actor_id.hex(), *ray.get(self._pool.actor_ids.remote())]
        except BaseException as error:
            self.shutdown(timeout=5)
            raise unwrap(error) from None

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
        chunks = plan_chunks(
            config.members,
            seed=config.seed,
            step=request.step,
            num_workers=1,
            envs_per_worker=config.envs_per_worker,
            record_episodes=config.record_episodes,
        )
        batches = []
        for chunk in chunks:
            if deadline is not None and time.perf_counter() > deadline:
                raise EvaluationTimeout(
                    f"evaluation at step {request.step} did not finish within {config.timeout:g} s"
                )
            batches.append(self._worker.run(chunk))
        episodes = EpisodeData.from_batches(batches, list(config.members))
        metrics = aggregate(
            episodes,
            prefix=config.prefix,
            step=request.step,
            seconds=time.perf_counter() - started,
            worker_restarts=0,
            seed=config.seed,
            metrics_fn=config.metrics_fn,
        )
        return EvalResult(metrics, episodes)

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
