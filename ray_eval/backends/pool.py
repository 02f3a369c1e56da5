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
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ray_eval.backends.resources import (
    free_text,
    nodes_that_fit,
    requested_resources,
    resources_text,
)
from ray_eval.backends.worker import RemoteWorker, WorkerInfo
from ray_eval.errors import (
    EvaluationTimeout,
    ResourceUnavailableError,
    WorkerDiedError,
    WorkerStartupError,
    remote_cause,
)
from ray_eval.memory import release_store_pages
from ray_eval.planning import Chunk, EvalRequest, EvaluationPlan, RequestOrder
from ray_eval.results.metrics import EvalResult

# A pickled policy at least this large has its built weights put once by the pool for
# all workers (see ``WorkerPool.initial_weights``); a smaller one, by each worker, which
# is faster the first time (the pool would import torch for it: about 2 s).
SHARED_INITIAL_WEIGHTS_MIN_BYTES = 32 * 1024**2

PLACEMENT_STRATEGIES = {
    "pack": "PACK",
    "spread": "SPREAD",
    "strict_spread": "STRICT_SPREAD",
    "strict_pack": "STRICT_PACK",
}


@dataclass
class PoolConfig:
    """How the pool creates and keeps its workers (what they run is the ``EvaluationPlan``)."""

    num_workers: int
    worker_resources: dict[str, float]  # per worker: {"CPU": 1, "GPU": 0.5, "my_resource": 1}
    actor_options: dict[str, Any] = field(default_factory=dict)  # extra .options()
    max_restarts: int = 3
    startup_timeout: float = 60.0
    placement: str | None = None


class WorkerPool:
    """Owns ``num_workers`` ``RemoteWorker`` actors and runs evaluations on them."""

    def __init__(
        self,
        config: PoolConfig,
        plan: EvaluationPlan,
        worker_config_blob: bytes,
        policy_blob: bytes | None,
    ) -> None:
        self._config = config
        self._plan = plan
        # The workers' start-up arguments stay here for the pool's whole life; a
        # worker, at every (re)start, asks the pool for them. Passed as constructor
        # arguments, large ones would sit in the object store, and a worker that
        # Ray restarts later could find them gone (ray#53727).
        self._startup_args = [ray.put(worker_config_blob), ray.put(policy_blob)]
        release_store_pages()  # the pages just written: the store has them, not this actor
        self._shares_initial = (
            policy_blob is not None and len(policy_blob) >= SHARED_INITIAL_WEIGHTS_MIN_BYTES
        )
        self._initial_weights: asyncio.Future | None = None  # see initial_weights
        self._handle = ray.get_runtime_context().current_actor
        self._pg = None
        if config.placement is not None:
            # A bundle holds what a worker really asks for (actor_options applied).
            request = requested_resources(config.worker_resources, config.actor_options)
            bundles = [{k: v for k, v in request.items() if v} for _ in range(config.num_workers)]
            self._pg = placement_group(bundles, strategy=PLACEMENT_STRATEGIES[config.placement])
        self._workers = [self._create_worker(i) for i in range(config.num_workers)]
        self._deaths = [0] * config.num_workers  # deaths seen while running a chunk
        self._causes = [""] * config.num_workers  # what killed each one last
        self._where = [(0, "")] * config.num_workers  # (pid, node id) when last seen
        self._recovering: dict[int, asyncio.Future] = {}  # worker -> wait for its restart
        self._order = RequestOrder()
        self._turn = asyncio.Condition()
        self._dumps_video = False  # some worker's env has a video transform to dump

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
        return actor_cls.options(**options).remote(self._handle)

    def _replace_worker(self, index: int) -> None:
        task = self._recovering.pop(index, None)
        if task is not None:
            task.cancel()
        ray.kill(self._workers[index], no_restart=True)
        self._workers[index] = self._create_worker(index)
        self._deaths[index] = 0
        self._causes[index] = ""
        self._where[index] = (0, "")
        # Chunks go to the other workers until this one has started.
        self._recovering[index] = asyncio.ensure_future(self._until_back(index))

    async def start(self, autoscaler: str | None = None) -> list[WorkerInfo]:
        """Wait until every worker has built its envs and policy (bounded).

        ``autoscaler``: the cluster's autoscaler (``"the cluster's autoscaler (v2)"``)
        when it can add nodes; the wait then includes theirs, and a timeout says so.
        """
        timeout = self._config.startup_timeout
        request = requested_resources(self._config.worker_resources, self._config.actor_options)
        # Where the workers' nodes may still be on their way, say who was late.
        late = f"{autoscaler} did not provide the nodes in time; " if autoscaler else ""
        if self._pg is not None:
            try:
                await asyncio.wait_for(self._pg.ready(), timeout)
            except asyncio.TimeoutError:
                raise ResourceUnavailableError(
                    f"placement group of {self._config.num_workers} bundles of "
                    f"{resources_text(self._config.worker_resources)} "
                    f"({self._config.placement}) could not be placed within {timeout:g} s; "
                    + late
                    + free_text(self._config.worker_resources)
                    + f"; {nodes_that_fit(self._config.worker_resources)} node(s) can hold "
                    f"a bundle"
                ) from None
        calls = [asyncio.wrap_future(w.describe.remote().future()) for w in self._workers]
        _, pending = await asyncio.wait(calls, timeout=timeout)
        if pending:
            for call in pending:
                call.cancel()
            waiting = [i for i, c in enumerate(calls) if c in pending]
            raise ResourceUnavailableError(
                f"{len(waiting)} of {len(calls)} workers did not start within {timeout:g} s "
                f"(worker indices {waiting}); {late}each asks for {resources_text(request)}; "
                + free_text(request)
                + (
                    " (or the nodes or the workers are slow to start: then raise startup_timeout)"
                    if autoscaler
                    else " (or the workers are only slow to build their envs: then raise "
                    "startup_timeout)"
                )
            )
        infos = []
        for index, call in enumerate(calls):
            try:
                infos.append(call.result())
            except RayTaskError as error:
                raise remote_cause(error) from None
            except RayActorError as error:
                if error.actor_init_failed:  # its constructor raised: Ray does not restart it
                    raise WorkerStartupError(
                        f"worker {index} failed in its constructor (not restarted). "
                        f"Cause: {_death_cause(error)}"
                    ) from None
                raise WorkerStartupError(
                    f"worker {index} died while building its env and policy (its process "
                    f"exited; it was restarted up to max_restarts={self._config.max_restarts} "
                    f"times). Cause: {_death_cause(error)}"
                ) from None
            self._where[index] = (infos[-1].pid, infos[-1].node_id)
        self._dumps_video = any(info.dumps_video for info in infos)
        if infos:
            self._plan.adopt_batches(infos[0].batches)
        return infos

    def startup_args(self) -> list:
        """Refs to the workers' pickled config and policy (asked for by each worker)."""
        return self._startup_args

    async def initial_weights(self) -> list | None:
        """``[ref]`` of the weights of the pickled policy every worker was built from,
        put once, on the first worker's request (``weights=None`` after other weights),
        and kept for the pool's life; ``None`` if there is no pickled policy, if it is
        smaller than ``SHARED_INITIAL_WEIGHTS_MIN_BYTES``, or if this process cannot
        read it (e.g. CUDA tensors: the pool has no GPU): each worker reads its own."""
        if not self._shares_initial:
            return None
        if self._initial_weights is None:
            # In a thread: unpickling a large policy must not stall the evaluations.
            self._initial_weights = asyncio.ensure_future(asyncio.to_thread(self._put_initial))
        return await asyncio.shield(self._initial_weights)

    def _put_initial(self) -> list | None:
        import pickle

        from ray_eval.memory import release_heap
        from ray_eval.weights import to_payload

        try:
            policy = pickle.loads(ray.get(self._startup_args[1]))
            ref = ray.put(to_payload(policy, copy=False))
        except Exception:
            return None
        finally:
            policy = None
            release_store_pages()  # the pages of the pickled policy and of the put
            release_heap()  # the unpickled policy's tensors
        return [ref]

    def actor_ids(self) -> list[str]:
        return [w._actor_id.hex() for w in self._workers]

    async def shutdown(self) -> None:
        for task in self._recovering.values():
            task.cancel()
        self._recovering.clear()
        for worker in self._workers:
            ray.kill(worker, no_restart=True)
        if self._pg is not None:
            remove_placement_group(self._pg)

    # -- evaluations -------------------------------------------------------------

    async def evaluate(self, request: EvalRequest) -> EvalResult | None:
        """Run one evaluation, after every earlier-numbered request.

        Returns ``None`` if a newer request replaced it before it started
        (``busy_policy="latest"``). Cancelling it (``ray.cancel`` on its ref)
        while it waits or runs lets the next request go.
        """
        self._order.arrived(request)
        if self._order.is_passed(request.seq):
            return None  # the driver gave up on it (cancelled before it got here)
        try:
            async with self._turn:
                await self._turn.wait_for(lambda: self._order.is_turn(request.seq))
            if self._order.is_replaced(request):
                return None
            started = time.perf_counter()
            chunks = self._plan.chunks(request.step, num_workers=len(self._workers))
            batches, restarts = await self._run_chunks(chunks, request)
            result = self._plan.summarize(
                batches,
                request.step,
                seconds=time.perf_counter() - started,
                worker_restarts=restarts,
            )
            if self._plan.dump_video and self._dumps_video:
                makers = self._plan.video_makers(batches)
                await asyncio.gather(
                    *(
                        worker.dump_videos.remote(request.step, makers.get(index, []))
                        for index, worker in enumerate(self._workers)
                    )
                )
            return result
        finally:
            await self.skip(request.seq)

    async def skip(self, seq: int) -> None:
        """Request ``seq`` is over, or will never come (the driver saw it cancelled)."""
        async with self._turn:
            self._order.finish(seq)
            self._turn.notify_all()

    async def _run_chunks(self, chunks: list[Chunk], request: EvalRequest):
        """Hand chunks to workers as they free up; re-run a dead worker's chunk.

        A worker whose process died is given no chunk until Ray has restarted
        it (``_until_back``): a call to a restarting actor fails at once, and
        must not count as another death.
        """
        deadline = self._plan.deadline(time.monotonic())
        self._collect_recovered()
        queue = deque(chunks)
        free = deque(i for i in range(len(self._workers)) if i not in self._recovering)
        running: dict[asyncio.Future, tuple[int, Chunk]] = {}
        refs: dict[asyncio.Future, ray.ObjectRef] = {}
        try:
            return await self._run_queue(queue, free, running, refs, request, deadline)
        except asyncio.CancelledError:
            # The evaluation was cancelled: chunks not started yet are dropped,
            # running ones finish on their worker and are discarded.
            for ref in refs.values():
                ray.cancel(ref)
            raise

    async def _run_queue(self, queue, free, running, refs, request, deadline):
        timeout = self._plan.timeout
        batches, restarts = [], 0
        while queue or running:
            while queue and free:
                index, chunk = free.popleft(), queue.popleft()
                ref = self._workers[index].run_chunk.remote(
                    chunk, request.weights, request.env_state
                )
                future = asyncio.wrap_future(ref.future())
                running[future], refs[future] = (index, chunk), ref
            recovering = {task: index for index, task in self._recovering.items()}
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = await asyncio.wait(
                [*running, *(recovering if queue else ())],
                timeout=remaining,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not done:
                unfinished = sum(len(c) for _, c in running.values()) + sum(map(len, queue))
                stuck = sorted(index for index, _ in running.values())
                starting = sorted(self._recovering)
                self._abandon(running)
                raise EvaluationTimeout(
                    f"evaluation at step {request.step} did not finish within {timeout:g} s "
                    f"({unfinished} episodes unfinished); "
                    + (f"the stuck workers {stuck} were replaced by fresh ones" if stuck else "")
                    + ("; " if stuck and starting else "")
                    + (f"workers {starting} were still (re)starting" if starting else "")
                )
            for future in done:
                if future in recovering:
                    index = recovering[future]
                    if self._recovering.get(index) is not future:
                        continue  # replaced meanwhile: its successor is being waited for
                    del self._recovering[index]
                    if future.exception() is not None:
                        self._fail(running, index, future.exception(), "could not be restarted")
                    free.append(index)
                    continue
                index, chunk = running.pop(future)
                del refs[future]
                try:
                    batch = future.result()
                except RayActorError as error:
                    restarts += 1
                    self._deaths[index] += 1
                    self._causes[index] = _death_cause(error)
                    if self._deaths[index] > self._config.max_restarts:
                        self._fail(
                            running,
                            index,
                            error,
                            f"died {self._deaths[index]} time(s), more than "
                            f"max_restarts={self._config.max_restarts} allows",
                        )
                    queue.appendleft(chunk)  # same seeds: the re-run gives the same episodes
                    self._recovering[index] = asyncio.ensure_future(self._until_back(index))
                except RayTaskError as error:
                    raise remote_cause(error) from None
                else:
                    batch.worker = index
                    batches.append(batch)
                    free.append(index)
        return batches, restarts

    async def _until_back(self, index: int) -> None:
        """Return once Ray has restarted worker ``index`` (raises if it cannot)."""
        worker = self._workers[index]
        while True:
            try:
                pid, node_id = await worker.ping.remote()
            except ActorUnavailableError:  # restarting, or not reachable yet
                await asyncio.sleep(0.2)
                continue
            self._where[index] = (pid, node_id)
            return

    def _collect_recovered(self) -> None:
        """Between evaluations: take back restarted workers, replace lost ones."""
        for index, task in list(self._recovering.items()):
            if task.done():
                del self._recovering[index]
                if task.cancelled() or task.exception() is not None:
                    self._replace_worker(index)

    def _fail(self, running: dict, index: int, error: BaseException, what: str) -> None:
        """Give up on this evaluation: worker ``index`` is lost for good."""
        for other in running:
            other.cancel()  # the other workers' results are dropped
        who = self._describe(index)
        cause = self._causes[index] or _death_cause(error)
        self._replace_worker(index)
        raise WorkerDiedError(
            f"worker {who} {what}; it was replaced by a fresh worker for the next "
            f"evaluation. Cause: {cause}",
            worker=index,
            cause=cause,
        ) from None

    def _describe(self, index: int) -> str:
        pid, node_id = self._where[index]
        where = f", pid {pid}" if pid else ""
        where += f", node {node_id[:12]}" if node_id else ""
        return f"{index} (actor {self._workers[index]._actor_id.hex()[:16]}{where})"

    def _abandon(self, running: dict) -> None:
        """Replace the workers still busy on this evaluation: they may be stuck."""
        for future, (index, _chunk) in running.items():
            future.cancel()
            self._replace_worker(index)


def _death_cause(error: BaseException) -> str:
    """Ray's account of why an actor died, without its boilerplate: the error
    type, why the actor is gone, and the worker's exit type and detail."""
    lines = [line.strip() for line in str(error).strip().splitlines()]
    # Drop the actor's identity (class_name, actor_id, pid, namespace, ip): named already.
    keep = [
        line
        for line in lines
        if line and not line.startswith(("class_name:", "actor_id:", "pid:", "namespace:", "ip:"))
    ]
    text = " ".join(keep).split(" If the process was killed by the kernel OOM killer")[0]
    return f"{type(error).__name__}: {text}"
