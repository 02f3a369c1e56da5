"""The episode loop for native vector envs (EnvPool, gymnasium ``vector_entry_point``). No Ray.

A native vector env is one object that steps all its slots at once and resets a
slot by itself when its episode ends (autoreset); it cannot start one slot on a
given episode seed. So this loop differs from ``rollout.py``'s in two ways:

* **Seeding per chunk.** The vector env is seeded once at the start of each
  chunk with the chunk's seed, the planned seed of the chunk's first episode
  (derived from ``(seed, step, episode index)``; every episode of the chunk
  carries it as its seed); the vector env derives its slots' seeds from it
  (EnvPool and gymnasium's ``SyncVectorEnv`` give slot ``k`` seed ``+ k``). A
  chunk, run again on any worker, gives the same episodes; the numbers depend
  on how episodes are cut into chunks, which for vector envs depends on
  ``num_trajectories`` and ``envs_per_worker`` only
  (``planning.vector_chunk_size``), not on the number of workers.
* **Per-slot quotas.** Which episodes count is fixed before anything runs:
  slot ``k`` of ``n`` runs the chunk's episodes ``k, k + n, k + 2n, ...``, i.e.
  its first ``ceil((C - k) / n)`` episodes (``C``: the chunk's episode count),
  as stable-baselines3's ``evaluate_policy`` does. A slot that met its quota
  keeps being stepped (the vector env steps every slot) but its later episodes
  are ignored. Counting "the first ``C`` episodes to finish" instead would
  favour short episodes: the slots that finish first are the ones whose
  episodes are short. With a quota, whether an episode counts depends only on
  its position in its slot, never on its own or anyone's length, so exactly
  ``C`` episodes count, each once, each run to its end.

One policy call per step on the whole batch; the per-step accounting is numpy
on arrays of slots, with no Python loop over slots.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ray_eval.results.episodes import SUCCESS_KEY, EpisodeBatch
from ray_eval.rollout.chunk import Chunk
from ray_eval.rollout.loops import _EpisodeLog

NEXT_STEP = "NextStep"  # gymnasium >= 1.0 and EnvPool: the step after the last one resets
SAME_STEP = "SameStep"  # the last step already returns the next episode's first observation
AUTORESET_MODES = (NEXT_STEP, SAME_STEP)

SEED_RANGE = 2**30  # EnvPool takes int32 seeds and adds the slot index to them


def autoreset_mode(env: Any) -> str:
    """The vector env's autoreset convention (gymnasium's ``metadata["autoreset_mode"]``).

    Without one, the convention of gymnasium >= 1.0 and EnvPool: next-step autoreset.
    """
    mode = getattr(env, "metadata", {}).get("autoreset_mode", NEXT_STEP)
    return str(getattr(mode, "value", mode))


def slot_quotas(num_episodes: int, num_slots: int) -> np.ndarray:
    """Episodes slot ``k`` runs: the chunk's episodes ``k, k + n, ...`` below ``num_episodes``."""
    slots = np.arange(num_slots, dtype=np.int64)
    return (num_episodes - slots + num_slots - 1) // num_slots


def chunk_seed(chunk: Chunk) -> int:
    """The seed a chunk's vector env is seeded with (in int32 with room for the slot index)."""
    return int(chunk.seeds[0]) % SEED_RANGE


class VectorRollout:
    """Chunks of episodes on one native vector env of up to ``batch_size`` slots.

    ``make(num_envs, seed)`` builds the vector env. With ``seeds_at_creation``
    (EnvPool fixes its seeds when it is built) a new env is built for each chunk
    with the chunk's seed; otherwise one env per slot count is kept and reset
    with the chunk's seed (``reset(seed=...)`` must then fully reseed it).

    ``act(obs)`` maps the observation batch to the action batch the env takes.
    ``max_steps`` cuts an episode short: it counts as ended there, and its slot
    is stepped without counting until the env ends the episode by itself (a
    vector env cannot restart one slot), unless ``make`` applies the cut itself
    (``make.applies_max_steps``).
    """

    def __init__(
        self,
        make: Callable[[int, int], Any],
        act: Callable[[np.ndarray], Any],
        *,
        batch_size: int,
        max_steps: int | None,
        seeds_at_creation: bool,
        autoreset: str = NEXT_STEP,
        info_keys: Sequence[str] = (),
        obs_dtype: np.dtype | None = None,
    ) -> None:
        if autoreset not in AUTORESET_MODES:
            raise TypeError(
                f"vector env has autoreset mode {autoreset!r}; ray_eval steps native vector "
                f"envs that reset finished slots themselves ({' or '.join(AUTORESET_MODES)})"
            )
        self._make = make
        self._act = act
        self.batch_size = batch_size
        self._max_steps = max_steps or math.inf
        self._seeds_at_creation = seeds_at_creation
        self._next_step = autoreset == NEXT_STEP
        self._info_keys = tuple(info_keys)
        self._obs_dtype = obs_dtype
        self._env = None
        self._env_slots = 0
        self._envs: list = []  # no per-slot env copies (weights_dict, video transforms)
        self.spaces = None  # one slot's spaces (envs.VectorEnvSpaces), for the action check

    def _env_copies(self, count: int) -> list:
        return self._envs

    def copies_for(self, chunk: Chunk) -> int:
        return 0

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    def _seeded_env(self, num_slots: int, seed: int):
        """The vector env of ``num_slots`` slots, seeded with ``seed``; its first observations."""
        if self._seeds_at_creation or self._env_slots != num_slots:
            self.close()
            self._env = self._make(num_slots, seed)
            self._env_slots = num_slots
        if self._seeds_at_creation:
            obs, _ = self._env.reset()
        else:
            obs, _ = self._env.reset(seed=seed)
        return self._env, obs

    def _observations(self, obs) -> np.ndarray:
        if self._obs_dtype is not None and obs.dtype != self._obs_dtype:
            return obs.astype(self._obs_dtype)
        return obs

    def run(self, chunk: Chunk) -> EpisodeBatch:
        started = time.perf_counter()
        log = _EpisodeLog(chunk, self._info_keys)
        num_episodes = len(chunk)
        n = min(num_episodes, self.batch_size)
        try:
            env, obs = self._seeded_env(n, chunk_seed(chunk))
        except Exception as error:
            raise log.fail(error, 0) from None
        step = env.step
        act = self._act
        observations = self._observations
        info_keys = self._info_keys
        max_steps = self._max_steps
        cuts = max_steps != math.inf
        next_step = self._next_step

        quota = slot_quotas(num_episodes, n)
        finished = np.zeros(n, dtype=np.int64)  # episodes each slot ended, counted or not
        returns = np.zeros(n, dtype=np.float64)
        lengths = np.zeros(n, dtype=np.int64)
        # Steps that belong to no episode: a next-step autoreset, or the rest of an episode
        # that max_steps cut short.
        outside = np.zeros(n, dtype=bool)
        cut_short = np.zeros(n, dtype=bool)
        sums = {key: np.zeros(n, dtype=np.float64) for key in info_keys}
        reported = {key: np.zeros(n, dtype=bool) for key in info_keys}  # in the running episode
        remaining = num_episodes
        obs = observations(obs)
        while remaining:
            try:
                actions = act(obs)
            except Exception as error:
                raise log.fail(error, first_open(finished, quota, n)) from None
            try:
                obs, reward, terminated, truncated, info = step(actions)
            except Exception as error:
                raise log.fail(error, first_open(finished, quota, n)) from None
            obs = observations(obs)
            ended = terminated | truncated
            # float32 like TorchRL's reward spec, so every loop sums the same numbers.
            reward = reward.astype(np.float32, copy=False)
            if outside.any():
                inside = ~outside
                np.add(returns, reward, out=returns, where=inside)
                lengths += inside
                over = ended & inside
            else:
                inside = None
                returns += reward
                lengths += 1
                over = ended
            for key in info_keys:
                if key in info:
                    values = np.asarray(info[key], dtype=np.float64)
                    # gymnasium's vector envs mark the slots that reported a key in "_<key>"
                    where = np.asarray(info.get("_" + key, True), dtype=bool)
                    if inside is not None:
                        where = where & inside
                    np.add(sums[key], values, out=sums[key], where=where)
                    reported[key] |= where
            if cuts:
                cut = lengths >= max_steps
                if inside is not None:
                    cut &= inside
                cut &= ~ended
                if cut.any():
                    over = over | cut
                    cut_short |= cut
            if over.any():
                slots, counted, positions = record_ended(
                    log, over, finished, quota, returns, lengths
                )
                if len(counted):
                    _record_infos(log, info, positions, counted, sums, reported, lengths)
                    remaining -= len(counted)
                finished[slots] += 1
                returns[slots] = 0.0
                lengths[slots] = 0
                for key in info_keys:
                    sums[key][slots] = 0.0
                    reported[key][slots] = False
            if cuts:
                cut_short &= ~ended  # the env ended the cut episode: its slot starts the next
                outside = (ended | cut_short) if next_step else cut_short.copy()
            elif next_step:
                outside = ended
        return log.batch(time.perf_counter() - started)


def record_ended(
    log: _EpisodeLog,
    over: np.ndarray,
    finished: np.ndarray,
    quota: np.ndarray,
    returns: np.ndarray,
    lengths: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Log the return and length of each episode that ended in a slot still within its
    quota. Returns the slots that ended, those counted, and their chunk positions."""
    slots = np.flatnonzero(over)
    counted = slots[finished[slots] < quota[slots]]
    # slot k's j-th episode is the chunk's episode j * n + k
    positions = finished[counted] * len(finished) + counted
    log.returns[positions] = returns[counted]
    log.lengths[positions] = lengths[counted]
    return slots, counted, positions


def first_open(finished: np.ndarray, quota: np.ndarray, n: int) -> int:
    """A chunk position of an episode still running (for error messages)."""
    open_slots = np.flatnonzero(finished < quota)
    if not len(open_slots):
        return 0
    k = int(open_slots[0])
    return int(finished[k]) * n + k


def _record_infos(
    log: _EpisodeLog,
    info: dict,
    positions: np.ndarray,
    counted: np.ndarray,
    sums: dict[str, np.ndarray],
    reported: dict[str, np.ndarray],
    lengths: np.ndarray,
) -> None:
    """``is_success`` at an episode's last step, and the per-step mean of ``info_keys``
    (NaN for an episode that never reported the key)."""
    if SUCCESS_KEY in info:
        log.infos[SUCCESS_KEY][positions] = np.asarray(info[SUCCESS_KEY], dtype=np.float64)[counted]
    for key, total in sums.items():
        means = total[counted] / lengths[counted]
        log.infos[key][positions] = np.where(reported[key][counted], means, np.nan)
