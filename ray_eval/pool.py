"""The worker pool: a long-lived Ray actor that owns the evaluation workers.

One ``WorkerPool`` actor per evaluator creates the worker actors (resources,
placement group, restarts), and runs each evaluation: it plans the episodes,
hands chunks to workers as they free up, re-runs the chunk of a worker that
died, and aggregates the result. ``Evaluator.trigger_eval`` returns the
``ObjectRef`` of a ``WorkerPool.evaluate`` call, so the ref resolves to the
result dict itself, and every hop of an evaluation stays on long-lived actors
(a fresh Ray task would pay Ray's worker start-up after every idle gap).

Requests run one at a time, in the order the driver numbered them.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ray_eval.errors import (
    EvaluationTimeout,
    ResourceUnavailableError,
    WorkerDiedError,
)
from ray_eval.metrics import EpisodeData, EvalResult, aggregate
from ray_eval.planning import Chunk, plan_chunks
from ray_eval.worker import RemoteWorker, WorkerInfo

PLACEMENT_STRATEGIES = {
    "pack": "PACK",
    "spread": "SPREAD",
    "strict_spread": "STRICT_SPREAD",
    "strict_pack": "STRICT_PACK",
}


@dataclass
class PoolConfig:
    num_workers: int
    worker_resources: dict[str, float]  # per worker: {"CPU": 1, "GPU": 0.5, "my_resource": 1}
    actor_options: dict[str, Any] = field(default_factory=dict)  # extra .options()
    max_restarts: int = 3
    startup_timeout: float = 60.0
    timeout: float | None = None  # per evaluation
    placement: str | None = None
    members: dict[str, int] = field(default_factory=lambda: {"": 10})  # member -> episodes
    envs_per_worker: int = 64
    seed: int = 0
    prefix: str = "eval"
    record_episodes: int = 0
    metrics_fn: Any = None


@dataclass
class EvalRequest:
    seq: int  # the driver's numbering: requests run in this order
    step: int
    weights: list | None  # [ObjectRef] of the weights payload, or None
    replaceable: bool = False  # busy_policy="latest": a newer request may replace it


class WorkerPool:
    """Owns ``num_workers`` ``RemoteWorker`` actors and runs evaluations on them."""

    def __init__(
        self, config: PoolConfig, worker_config_blob: bytes, policy_blob: bytes | None
    ) -> None:
        self._config = config
        self._worker_config_blob = worker_config_blob
        self._policy_blob = policy_blob
        self._pg = None
        if config.placement is not None:
            bundles = [dict(config.worker_resources) for _ in range(config.num_workers)]
            self._pg = placement_group(bundles, strategy=PLACEMENT_STRATEGIES[config.placement])
        self._workers = [self._create_worker(i) for i in range(config.num_workers)]
        self._deaths = [0] * config.num_workers
        self._next_seq = 0
        self._newest_replaceable = -1
        self._turn = asyncio.Condition()

    # -- workers ---------------------------------------------------------------

    def _create_worker(self, index: int):
        resources = dict(self._config.worker_resources)
        options = {
            "num_cpus": resources.pop("CPU", 0),
            "num_gpus": resources.pop("GPU", 0),
            "resources": resources or None,
            "max_restarts": self._config.max_restarts,
            "max_task_retries": 0,  # the pool re-runs a dead worker's chunk itself
            **self._config.actor_options,
        }
        if self._pg is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self._pg, placement_group_bundle_index=index
            )
        actor_cls = ray.remote(RemoteWorker)
        return actor_cls.options(**options).remote(self._worker_config_blob, self._policy_blob)

    def _replace_worker(self, index: int) -> None:
        ray.kill(self._workers[index], no_restart=True)
        self._workers[index] = self._create_worker(index)
        self._deaths[index] = 0

    async def start(self) -> list[WorkerInfo]:
        """Wait until every worker has built its envs and policy (bounded)."""
        if self._pg is not None:
            try:
                await asyncio.wait_for(self._pg.ready(), self._config.startup_timeout)
            except asyncio.TimeoutError:
                raise ResourceUnavailableError(
                    f"placement group of {self._config.num_workers} bundles "
                    f"{self._config.worker_resources} ({self._config.placement}) could not be "
                    f"placed within {self._config.startup_timeout:g} s; cluster has "
                    f"{ray.available_resources()} available"
                ) from None
        calls = [asyncio.wrap_future(w.describe.remote().future()) for w in self._workers]
        _, pending = await asyncio.wait(calls, timeout=self._config.startup_timeout)
        if pending:
            for call in pending:
                call.cancel()
            waiting = [i for i, c in enumerate(calls) if c in pending]
            raise ResourceUnavailableError(
                f"{len(waiting)} of {len(calls)} workers did not start within "
                f"{self._config.startup_timeout:g} s (worker indices {waiting}); each asks for "
                f"{self._config.worker_resources} and the cluster has "
                f"{_resources_text(ray.available_resources())} available of "
                f"{_resources_text(ray.cluster_resources())}"
            )
        infos = []
        for call in calls:
            try:
                infos.append(call.result())
            except RayTaskError as error:
                raise _cause(error) from None
        return infos

    def actor_ids(self) -> list[str]:
        return [w._actor_id.hex() for w in self._workers]

    async def shutdown(self) -> None:
        for worker in self._workers:
            ray.kill(worker, no_restart=True)
        if self._pg is not None:
            remove_placement_group(self._pg)

    # -- evaluations -------------------------------------------------------------

    async def evaluate(self, request: EvalRequest) -> EvalResult | None:
        """Run one evaluation; ``None`` if a newer request replaced it before it started."""
        if request.replaceable:
            self._newest_replaceable = max(self._newest_replaceable, request.seq)
        async with self._turn:
            await self._turn.wait_for(lambda: self._next_seq == request.seq)
        try:
            if request.replaceable and self._newest_replaceable > request.seq:
                return None
            return await self._evaluate(request)
        finally:
            async with self._turn:
                self._next_seq = request.seq + 1
                self._turn.notify_all()

    async def _evaluate(self, request: EvalRequest) -> EvalResult:
        config = self._config
        started = time.perf_counter()
        chunks = plan_chunks(
            config.members,
            seed=config.seed,
            step=request.step,
            num_workers=len(self._workers),
            envs_per_worker=config.envs_per_worker,
            record_episodes=config.record_episodes,
        )
        batches, restarts = await self._run_chunks(chunks, request)
        episodes = EpisodeData.from_batches(batches, list(config.members))
        metrics = aggregate(
            episodes,
            prefix=config.prefix,
            step=request.step,
            seconds=time.perf_counter() - started,
            worker_restarts=restarts,
            seed=config.seed,
            metrics_fn=config.metrics_fn,
        )
        return EvalResult(metrics, episodes)

    async def _run_chunks(self, chunks: list[Chunk], request: EvalRequest):
        """Hand chunks to workers as they free up; re-run a dead worker's chunk."""
        timeout = self._config.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        queue = deque(chunks)
        free = deque(range(len(self._workers)))
        running: dict[asyncio.Future, tuple[int, Chunk]] = {}
        batches, restarts = [], 0
        while queue or running:
            while queue and free:
                index, chunk = free.popleft(), queue.popleft()
                ref = self._workers[index].run_chunk.remote(chunk, request.weights)
                running[asyncio.wrap_future(ref.future())] = (index, chunk)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = await asyncio.wait(
                running, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                self._abandon(running)
                raise EvaluationTimeout(
                    f"evaluation at step {request.step} did not finish within {timeout:g} s "
                    f"({sum(len(c) for _, c in running.values()) + sum(map(len, queue))} episodes "
                    f"unfinished); the stuck workers were replaced"
                )
            for future in done:
                index, chunk = running.pop(future)
                try:
                    batch = future.result()
                except RayActorError as error:
                    restarts += 1
                    self._deaths[index] += 1
                    if self._deaths[index] > self._config.max_restarts or (
                        isinstance(error, ActorDiedError) and self._config.max_restarts == 0
                    ):
                        for other in running:
                            other.cancel()  # the other workers' results are dropped
                        self._replace_worker(index)
                        raise WorkerDiedError(
                            f"worker {index} died {self._deaths[index] or 'again'} time(s), more "
                            f"than max_restarts={self._config.max_restarts} allows; it was replaced "
                            f"by a fresh worker for the next evaluation. Cause: "
                            f"{_first_lines(error)}"
                        ) from None
                    queue.appendleft(chunk)  # same seeds: the re-run gives the same episodes
                    free.append(index)  # Ray holds calls until the actor is back
                except RayTaskError as error:
                    raise _cause(error) from None
                else:
                    batch.worker = index
                    batches.append(batch)
                    free.append(index)
        return batches, restarts

    def _abandon(self, running: dict) -> None:
        """Replace the workers still busy on this evaluation: they may be stuck."""
        for future, (index, _chunk) in running.items():
            future.cancel()
            self._replace_worker(index)


def check_resources(worker_resources: dict[str, float], num_workers: int) -> None:
    """Fail fast when the cluster can never host the workers (no node fits one, or
    the cluster's total is short)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fits_one = [
        n
        for n in nodes
        if all(n["Resources"].get(k, 0) >= v for k, v in worker_resources.items() if v > 0)
    ]
    if not fits_one:
        missing = {
            k: v
            for k, v in worker_resources.items()
            if v > 0 and not any(n["Resources"].get(k, 0) >= v for n in nodes)
        }
        raise ResourceUnavailableError(
            f"no node of the cluster can host one worker: each worker asks for "
            f"{_resources_text(worker_resources)}, and no node has "
            f"{_resources_text(missing or worker_resources)} (cluster total: "
            f"{_resources_text(ray.cluster_resources())})"
        )
    total = ray.cluster_resources()
    for key, amount in worker_resources.items():
        if amount > 0 and amount * num_workers > total.get(key, 0) + 1e-9:
            raise ResourceUnavailableError(
                f"{num_workers} workers x {amount:g} {key} = {amount * num_workers:g} {key}, "
                f"but the cluster has {total.get(key, 0):g} {key} in all; use fewer workers "
                f"(num_workers) or less per worker (num_cpus_per_worker / num_gpus_per_worker)"
            )


def _resources_text(resources: dict) -> str:
    shown = {
        k: v for k, v in resources.items() if not k.startswith(("node:", "object_store", "memory"))
    }
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


def _cause(error: RayTaskError) -> BaseException:
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


def _first_lines(error: BaseException, n: int = 6) -> str:
    return " ".join(str(error).strip().splitlines()[:n])
