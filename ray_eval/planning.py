"""Which episodes an evaluation runs, with which seeds, in which chunks; which request runs next.

An evaluation is planned up front: episode ``i`` of the evaluation at step
``s`` gets a seed derived only from ``(seed, s, i)``. Seeds belong to episodes,
not to workers, so the plan - and, for a deterministic policy, every number an
evaluation reports - does not depend on how many workers run it, on which
worker runs which chunk, or on a chunk being run again after a worker died.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ray_eval.results.episodes import EpisodeData
from ray_eval.results.metrics import (
    EvalResult,
    aggregate,
    custom_metrics,
    unreported_info_keys,
)
from ray_eval.rollout.chunk import Chunk


def episode_seeds(seed: int, step: int, num_episodes: int) -> np.ndarray:
    """Reset seeds of episodes ``0..num_episodes-1`` of the evaluation at ``step``.

    ``numpy.random.SeedSequence`` hashes the whole entropy tuple, so nearby
    ``(seed, step, i)`` give unrelated seeds. Every member of a suite gets the
    same seeds (common random numbers): member differences are not seed noise,
    and a member evaluated alone gives the same episodes as within the suite.
    """
    return np.array([episode_seed(seed, step, i) for i in range(num_episodes)], dtype=np.int64)


def episode_seed(seed: int, step: int, episode: int) -> int:
    """The reset seed of one episode (see ``episode_seeds``)."""
    return int(np.random.SeedSequence([seed, step, episode]).generate_state(1)[0])


def chunk_size(num_episodes: int, num_workers: int, envs_per_worker: int) -> int:
    """Episodes per chunk.

    Every worker gets work (``ceil(n / workers)`` at most), and when there are
    many more episodes than env slots, chunks stay small enough (about four per
    worker) that a worker that finishes early takes the next chunk instead of
    idling while another works through a long queue. Within a chunk a worker
    refills each env slot as soon as its episode ends, so chunks larger than
    ``envs_per_worker`` cost nothing.
    """
    per_worker = math.ceil(num_episodes / max(num_workers, 1))
    balanced = max(envs_per_worker, math.ceil(num_episodes / (4 * max(num_workers, 1))))
    return max(1, min(per_worker, balanced))


VECTOR_CHUNKS = 8  # chunks per evaluation (and suite member) on a native vector env


def vector_chunk_size(num_episodes: int, envs_per_worker: int) -> int:
    """Episodes per chunk on a native vector env (``vector_rollout``).

    A chunk seeds its vector env once, so how episodes are cut into chunks
    decides the numbers: this depends on ``num_episodes`` and
    ``envs_per_worker`` only, never on the number of workers, so that 1 worker,
    4 workers and in-process give the same numbers. Each slot runs the same
    number of the chunk's episodes (a multiple of ``envs_per_worker``), about
    ``VECTOR_CHUNKS`` chunks in all: enough to share among a few workers, few
    enough that each slot runs several episodes per chunk (a chunk lasts as
    long as its slowest slot).
    """
    per_slot = max(1, math.ceil(num_episodes / (envs_per_worker * VECTOR_CHUNKS)))
    return envs_per_worker * per_slot


def plan_chunks(
    members: dict[str, int],
    *,
    seed: int,
    step: int,
    num_workers: int,
    envs_per_worker: int,
    record_episodes: int = 0,
    vector_members: tuple[str, ...] = (),
    member_batches: dict[str, int] | None = None,
) -> list[Chunk]:
    """Split every member's episodes into chunks, in episode order.

    ``members`` maps a suite member's name to its number of episodes (one entry,
    ``""``, for a plain evaluator). The first ``record_episodes`` episodes of
    each member are marked for video recording.

    Members in ``vector_members`` run on a native vector env, which is seeded
    once per chunk: they are cut by ``vector_chunk_size``, and every episode of
    a chunk carries the chunk's seed, the seed of its first episode (one hash
    per chunk, not per episode: such evaluations run 10^5 episodes and more).
    ``member_batches`` gives a member's own batch where it is not ``envs_per_worker``
    (a batched TorchRL env fixes its batch itself).
    """
    member_batches = member_batches or {}
    chunks: list[Chunk] = []
    total = sum(members.values())
    for member, count in members.items():
        vector = member in vector_members
        if vector:
            size = vector_chunk_size(count, member_batches.get(member, envs_per_worker))
        else:
            seeds = episode_seeds(seed, step, count)
            # Share the workers between members in proportion to their episodes.
            workers_here = max(1, round(num_workers * count / max(total, 1)))
            size = chunk_size(count, workers_here, envs_per_worker)
        for start in range(0, count, size):
            idx = np.arange(start, min(start + size, count), dtype=np.int64)
            chunk_seeds = (
                np.full(len(idx), episode_seed(seed, step, start), dtype=np.int64)
                if vector
                else seeds[idx]
            )
            chunks.append(
                Chunk(member=member, indices=idx, seeds=chunk_seeds, record=idx < record_episodes)
            )
    return chunks


@dataclass
class EvaluationPlan:
    """What every evaluation of one evaluator runs and reports, whoever runs it.

    Both backends, the Ray pool and in-process, plan chunks and summarize
    results through this one object, so they give the same numbers.
    """

    members: dict[str, int]  # suite member -> episodes ("" for a single env)
    envs_per_worker: int = 64
    seed: int = 0
    prefix: str = "eval"
    record_episodes: int = 0
    # Seconds of evaluation time: while some worker runs a chunk. The workers' (re)starts,
    # replacements included, are bounded by startup_timeout instead (see WorkerPool).
    timeout: float | None = None
    episode_metrics_fn: Any = None  # fn(EpisodeData) -> {name: scalar}
    metrics_fn: Any = None  # TorchRL's: fn(trajectories TensorDict) -> {name: value}
    traj_format: str = "pad"  # how metrics_fn gets the trajectories: "pad" [N, T] or "cat"
    dump_video: bool = False  # dump the envs' video transforms after each evaluation
    vector_members: tuple[str, ...] = ()  # members on a native vector env (envs.is_vector_source)
    # members on a batched TorchRL env -> the env's batch (reported by the workers)
    member_batches: dict[str, int] = field(default_factory=dict)
    # info_keys that no episode reported, warned about once (by whoever summarizes)
    unreported_warned: set[str] = field(default_factory=set, repr=False, compare=False)

    def chunks(self, step: int, num_workers: int) -> list[Chunk]:
        """The chunks of the evaluation at ``step``."""
        return plan_chunks(
            self.members,
            seed=self.seed,
            step=step,
            num_workers=num_workers,
            envs_per_worker=self.envs_per_worker,
            record_episodes=self.record_episodes,
            vector_members=self.vector_members,
            member_batches=self.member_batches,
        )

    def adopt_batches(self, batches: dict[str, int]) -> None:
        """Members the workers found to be batched TorchRL envs (``WorkerInfo.batches``):
        planned from now on as native vector envs with the env's own batch."""
        if batches:
            self.member_batches = {**self.member_batches, **batches}
            self.vector_members = tuple(dict.fromkeys((*self.vector_members, *batches)))

    def summarize(
        self, batches: list, step: int, *, seconds: float, worker_restarts: int
    ) -> EvalResult:
        """The evaluation's result from its chunks' episodes."""
        episodes = EpisodeData.from_batches(batches, list(self.members))
        metrics = aggregate(
            episodes,
            prefix=self.prefix,
            step=step,
            seconds=seconds,
            worker_restarts=worker_restarts,
            seed=self.seed,
            metrics_fn=self.episode_metrics_fn,
        )
        self._warn_unreported(episodes)
        # What the weights cost the workers: 0 and 0 when every worker had them already.
        metrics[f"{self.prefix}/weights_loads"] = sum(b.weights_loads for b in batches)
        metrics[f"{self.prefix}/weights_loaded_bytes"] = sum(
            b.weights_loaded_bytes for b in batches
        )
        if self.metrics_fn is not None:
            from ray_eval.rollout.trajectories import trajectories

            batches = sorted(
                batches, key=lambda b: (list(self.members).index(b.member), b.indices[0])
            )
            custom = self.metrics_fn(trajectories(batches, self.traj_format))
            metrics.update(custom_metrics(custom, self.prefix, "metrics_fn"))
        return EvalResult(metrics, episodes)

    def _warn_unreported(self, episodes: EpisodeData) -> None:
        """One warning per info key that the env never reported (its metric is NaN)."""
        for key in unreported_info_keys(episodes):
            if key not in self.unreported_warned:
                self.unreported_warned.add(key)
                warnings.warn(
                    f"info_keys: the env never reported {key!r} (not in its step info or "
                    f"TensorDict in any episode): {self.prefix}/info/{key} is NaN",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def video_makers(self, batches: list) -> dict[int, list[str]]:
        """Which worker dumps which members' videos: the one that ran episode 0."""
        makers: dict[int, list[str]] = {}
        for batch in batches:
            if int(batch.indices[0]) == 0:
                makers.setdefault(batch.worker, []).append(batch.member)
        return makers


@dataclass
class EvalRequest:
    """One evaluation the driver asked for."""

    seq: int  # the driver's numbering: requests run in this order
    step: int
    weights: list | None = None  # [ObjectRef] of the weights payload, or None
    env_state: list | None = None  # [ObjectRef] of env parts' states (weights_dict), or None
    replaceable: bool = False  # busy_policy="latest": a newer request may replace it


class RequestOrder:
    """Which request runs next: one at a time, in the driver's numbering.

    A number that will never run (its request was cancelled, or finished) is
    passed over, so a cancelled request never holds up the ones behind it. A
    replaceable request (``busy_policy="latest"``) that has not started when a
    newer replaceable one arrives is dropped.
    """

    def __init__(self) -> None:
        self.next_seq = 0
        self._finished: set[int] = set()
        self._newest_replaceable = -1

    def arrived(self, request: EvalRequest) -> None:
        if request.replaceable:
            self._newest_replaceable = max(self._newest_replaceable, request.seq)

    def is_turn(self, seq: int) -> bool:
        return seq == self.next_seq

    def is_passed(self, seq: int) -> bool:
        """True for a number already passed over (its request arrived too late to run)."""
        return seq < self.next_seq or seq in self._finished

    def is_replaced(self, request: EvalRequest) -> bool:
        return request.replaceable and self._newest_replaceable > request.seq

    def finish(self, seq: int) -> None:
        """``seq`` ran, failed, was cancelled or will never arrive: let the next one go."""
        if seq >= self.next_seq:
            self._finished.add(seq)
        while self.next_seq in self._finished:
            self._finished.remove(self.next_seq)
            self.next_seq += 1
