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
from ray_eval.backends.worker import BEAT_SECONDS, RemoteWorker, WorkerInfo
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

# After a timeout, a worker still running a chunk that has not called its policy for
# this long (half the timeout, within these bounds) is stuck, and replaced; any other
# has its chunk cancelled and is kept.
STALL_MIN_SECONDS = 2.0
STALL_MAX_SECONDS = 10.0

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
        self._beats = [0.0] * config.num_workers  # when each last showed progress (monotonic)
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
        return actor_cls.options(**options).remote(self._handle, index)

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

    def beat(self, index: int) -> None:
        """Worker ``index`` progresses (it called its policy since its last beat)."""
        self._beats[index] = time.monotonic()

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
        self._collect_recovered()
        queue = deque(chunks)
        free = deque(i for i in range(len(self._workers)) if i not in self._recovering)
        running: dict[asyncio.Future, tuple[int, Chunk]] = {}
        refs: dict[asyncio.Future, tuple[ray.ObjectRef, float]] = {}
        try:
            return await self._run_queue(queue, free, running, refs, request)
        except asyncio.CancelledError:
            # The evaluation was cancelled: chunks not started yet are dropped,
            # running ones stop at their next step (their worker is kept, unless stuck).
            self._release(running, refs)
            raise

    async def _run_queue(self, queue, free, running, refs, request):
        """Run the chunks. The plan's ``timeout`` counts evaluation time: the time
        while workers run chunks and none that chunks wait for is (re)starting. While
        a worker is starting (a replacement), restarting (Ray, after a crash) or ending
        a cancelled chunk, and chunks wait for it, the clock stops: each of those waits
        is bounded by ``startup_timeout`` instead (``_until_back``, ``_drain``)."""
        timeout = self._plan.timeout
        batches, restarts = [], 0
        used = 0.0  # evaluation time so far
        while queue or running:
            while queue and free:
                index, chunk = free.popleft(), queue.popleft()
                ref = self._workers[index].run_chunk.remote(
                    chunk, request.weights, request.env_state
                )
                future = asyncio.wrap_future(ref.future())
                running[future], refs[future] = (index, chunk), (ref, time.monotonic())
            recovering = {task: index for index, task in self._recovering.items()}
            ticking = bool(running) and not (queue and self._recovering)
            remaining = None if timeout is None or not ticking else max(0.0, timeout - used)
            waited = time.monotonic()
            done, _ = await asyncio.wait(
                [*running, *(recovering if queue else ())],
                timeout=remaining,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if ticking:
                used += time.monotonic() - waited
            if not done:
                unfinished = sum(len(c) for _, c in running.values()) + sum(map(len, queue))
                starting = sorted(self._recovering)
                stuck, kept = self._release(running, refs)
                raise EvaluationTimeout(
                    f"evaluation at step {request.step} did not finish within {timeout:g} s "
                    f"({unfinished} episodes unfinished); "
                    + "; ".join(
                        part
                        for part in (
                            f"the stuck workers {stuck} were replaced by fresh ones"
                            if stuck
                            else "",
                            f"workers {kept} were still stepping: their chunks were "
                            f"cancelled and they were kept"
                            if kept
                            else "",
                            f"workers {starting} were still (re)starting" if starting else "",
                        )
                        if part
                    )
                )
            for future in done:
                if future in recovering:
                    index = recovering[future]
                    if self._recovering.get(index) is not future:
                        continue  # replaced meanwhile: its successor is being waited for
                    del self._recovering[index]
                    error = None if future.cancelled() else future.exception()
                    if isinstance(error, _Stuck):
                        self._replace_worker(index)  # its cancelled chunk hung: it is stuck
                        continue
                    if error is not None:
                        self._fail(running, index, error, "could not be restarted")
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
                    self._release(running, refs)
                    raise remote_cause(error) from None
                else:
                    batch.worker = index
                    batches.append(batch)
                    free.append(index)
        return batches, restarts

    def _stall_seconds(self) -> float:
        """How long a worker running a chunk may go without a beat before it counts as stuck."""
        timeout = self._plan.timeout or STALL_MAX_SECONDS
        return max(STALL_MIN_SECONDS, min(STALL_MAX_SECONDS, timeout / 2))

    def _release(self, running: dict, refs: dict) -> tuple[list[int], list[int]]:
        """The evaluation ends with chunks still running: replace the workers that are
        stuck (no beat for ``_stall_seconds``), cancel the others' chunks and keep them;
        each is given no new chunk until its cancelled one has ended (``_drain``).
        Returns (stuck, kept) worker indices."""
        now, stall = time.monotonic(), self._stall_seconds()
        stuck, kept = [], []
        for future, (index, _chunk) in list(running.items()):
            ref, given = refs.get(future, (None, now))
            since = max(self._beats[index], given)
            if now - since > stall:
                future.cancel()
                self._replace_worker(index)
                stuck.append(index)
            else:
                if ref is not None:
                    ray.cancel(ref)
                self._recovering[index] = asyncio.ensure_future(self._drain(index, future, given))
                kept.append(index)
        running.clear()
        refs.clear()
        return sorted(stuck), sorted(kept)

    async def _drain(self, index: int, future: asyncio.Future, given: float) -> None:
        """Return once worker ``index``'s cancelled chunk has ended (it stops at its
        next step); raise ``_Stuck`` if the worker stops beating meanwhile, or if the
        chunk is still running after ``startup_timeout``."""
        stall = self._stall_seconds()
        deadline = time.monotonic() + self._config.startup_timeout
        while True:
            done, _ = await asyncio.wait([future], timeout=BEAT_SECONDS)
            if done:
                if not future.cancelled():
                    future.exception()  # retrieved: what a cancelled chunk raised is no news
                return
            now = time.monotonic()
            if now - max(self._beats[index], given) > stall or now > deadline:
                raise _Stuck(index)

    async def _until_back(self, index: int) -> None:
        """Return once worker ``index`` is up: restarted by Ray, or newly created
        (a replacement builds its envs and policy first). Raises if it cannot be,
        or if that takes longer than ``startup_timeout``."""
        worker = self._workers[index]
        limit = self._config.startup_timeout
        deadline = time.monotonic() + limit
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                pid, node_id = await asyncio.wait_for(
                    asyncio.wrap_future(worker.ping.remote().future()), left
                )
            except ActorUnavailableError:  # restarting, or not reachable yet
                await asyncio.sleep(0.2)
                continue
            except asyncio.TimeoutError:
                raise WorkerStartupError(
                    f"worker {index} did not (re)start within startup_timeout={limit:g} s"
                ) from None
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


class _Stuck(Exception):
    """A worker kept after a timeout stopped beating before its cancelled chunk ended."""


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
