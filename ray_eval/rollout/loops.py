"""The episode loops. No Ray here: the same code runs in a worker actor and in-process.

Both loops run a chunk of planned episodes on a fixed number of env slots:
each slot runs one episode (reset with that episode's own seed) to its end,
then takes the next unstarted episode of the chunk, so every planned episode is
run to completion and counted exactly once, however long it is. Nothing favours
short episodes (the bias of "keep the first N episodes to finish").

The policy is called once per step on the whole batch of slots, idle slots
included (they keep their last observation). Keeping the batch size fixed makes
each episode's actions depend on its own observations only - batched matrix
products give bit-for-bit different rows for different batch sizes - so an
evaluation's numbers do not depend on how its episodes were grouped, i.e. on
the number of workers. Only slots whose episode is running are stepped.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from collections.abc import Callable, Sequence

import gymnasium as gym
import numpy as np
import torch
from gymnasium.wrappers import OrderEnforcing, PassiveEnvChecker, TimeLimit
from tensordict import TensorDictBase

from ray_eval.errors import EnvError
from ray_eval.results.episodes import SUCCESS_KEY, EpisodeBatch
from ray_eval.rollout.chunk import Chunk
from ray_eval.rollout.env_keys import EnvKeys
from ray_eval.rollout.torchrl_env import attach_info_tap, seeded_reset


class _EpisodeLog:
    """Accumulates what each slot's running episode scores, and finished episodes."""

    def __init__(self, chunk: Chunk, info_keys: Sequence[str]) -> None:
        n = len(chunk)
        self.chunk = chunk
        self.seeds = chunk.seeds.tolist()
        self.record = chunk.record.tolist()
        self.returns = np.zeros(n, dtype=np.float64)
        self.lengths = np.zeros(n, dtype=np.int64)
        self.info_keys = tuple(info_keys)
        self.infos = {k: np.full(n, np.nan) for k in (*self.info_keys, SUCCESS_KEY)}
        self.frames: dict[int, list] = {}
        self.trajectories: list | None = None  # per episode, every step (TorchRL's metrics_fn)
        self.agent_returns: dict[str, np.ndarray] = {}  # group -> [episode, agent] returns
        self.next_episode = 0

    def has_next(self) -> bool:
        return self.next_episode < len(self.seeds)

    def take_next(self) -> int:
        i = self.next_episode
        self.next_episode += 1
        return i

    def fail(self, error: BaseException, episode: int) -> EnvError:
        return EnvError(
            f"{type(error).__name__} in episode {int(self.chunk.indices[episode])} "
            f"(seed {self.seeds[episode]}"
            + (f", suite member {self.chunk.member!r}" if self.chunk.member else "")
            + f"): {error}",
            exc_type=type(error).__name__,
            exc_message=str(error),
            remote_traceback="".join(traceback.format_exception(error)),
            seed=self.seeds[episode],
            member=self.chunk.member or None,
        )

    def batch(self, seconds: float) -> EpisodeBatch:
        # Every info key asked for stays, NaN where an episode never reported it; the
        # success flag only where the env has one.
        infos = {k: v for k, v in self.infos.items() if k != SUCCESS_KEY or not np.isnan(v).all()}
        frames = {int(self.chunk.indices[i]): np.stack(f) for i, f in self.frames.items()}
        return EpisodeBatch(
            member=self.chunk.member,
            indices=self.chunk.indices,
            seeds=self.chunk.seeds,
            returns=self.returns,
            lengths=self.lengths,
            infos=infos,
            frames=frames,
            seconds=seconds,
            trajectories=self.trajectories,
            agent_returns=self.agent_returns,
        )


class _EnvSlots:
    """What both loops share: env copies, built when a chunk first needs them, one
    per slot; the batched policy call; the step limit; the info keys to average."""

    def __init__(
        self,
        make_env: Callable[[], object],
        first_env,
        act: Callable,
        *,
        batch_size: int,
        max_steps: int | None,
        info_keys: Sequence[str] = (),
    ) -> None:
        self._make_env = make_env
        self._envs = [first_env]
        self._act = act
        self.batch_size = batch_size
        self._max_steps = max_steps or math.inf
        self._info_keys = tuple(info_keys)
        self._setup(first_env)

    def _setup(self, first_env) -> None:
        """What a loop needs to know of the env before it runs."""

    def _adopt(self, env) -> None:
        """Prepare a new env copy (the first one is prepared by ``_setup``)."""

    def copies_for(self, chunk: Chunk) -> int:
        """How many env copies the chunk needs."""
        return min(len(chunk), self.batch_size)

    def _env_copies(self, count: int) -> list:
        while len(self._envs) < count:
            env = self._make_env()
            self._adopt(env)
            self._envs.append(env)
        return self._envs


class GymnasiumRollout(_EnvSlots):
    """Episodes on copies of a gymnasium env with a Box observation space.

    The gymnasium vector envs step every copy on every call and reset finished
    copies by themselves; here each copy must start a given episode with its
    own seed and idle copies must not be stepped, so the loop steps the copies
    itself (the cost of a ``SyncVectorEnv`` step without its per-copy overhead).

    ``obs_dtype``: the dtype observations are handed to the policy in; storing
    each step's observations in a buffer of that dtype casts them (float64
    MuJoCo observations for a float32 policy) at no extra cost.
    """

    def __init__(self, *args, obs_dtype: np.dtype | None = None, **kwargs) -> None:
        self._obs_dtype = obs_dtype
        super().__init__(*args, **kwargs)

    def _setup(self, first_env) -> None:
        space = first_env.observation_space
        dtype = self._obs_dtype or space.dtype
        self._obs = np.zeros((self.batch_size, *space.shape), dtype=dtype)

    def close(self) -> None:
        for env in self._envs:
            _close_quietly(env)

    def run(self, chunk: Chunk) -> EpisodeBatch:
        started = time.perf_counter()
        log = _EpisodeLog(chunk, self._info_keys)
        envs = self._env_copies(min(len(chunk), self.batch_size))
        env_step, limit = zip(*(_direct_step(env, self._max_steps) for env in envs))
        obs = self._obs
        info_keys = self._info_keys
        frames = log.frames
        float32 = np.float32
        slot_episode = [-1] * self.batch_size
        slot_return = [0.0] * self.batch_size
        slot_length = [0] * self.batch_size
        # Per slot, each info key's sum over the episode's steps (None: not reported yet).
        slot_info = [dict.fromkeys(info_keys) for _ in range(self.batch_size)]

        def start(slot: int) -> None:
            i = log.take_next()
            slot_episode[slot] = i
            slot_return[slot] = 0.0
            slot_length[slot] = 0
            if info_keys:
                slot_info[slot] = dict.fromkeys(info_keys)
            try:
                obs[slot], _ = envs[slot].reset(seed=log.seeds[i])
                if log.record[i]:
                    frames[i] = [envs[slot].render()]
            except Exception as error:
                raise log.fail(error, i) from None

        def finish(slot: int, info: dict) -> None:
            i, length = slot_episode[slot], slot_length[slot]
            log.returns[i] = slot_return[slot]
            log.lengths[i] = length
            if SUCCESS_KEY in info:
                log.infos[SUCCESS_KEY][i] = float(info[SUCCESS_KEY])
            for key in info_keys:
                log.infos[key][i] = _per_step(slot_info[slot][key], length)

        active = list(range(min(len(chunk), self.batch_size)))
        for slot in active:
            start(slot)
        while active:
            try:
                actions = self._act(obs)
            except Exception as error:
                raise log.fail(error, slot_episode[active[0]]) from None
            still_running = []
            for slot in active:
                try:
                    o, reward, terminated, truncated, info = env_step[slot](actions[slot])
                except Exception as error:
                    raise log.fail(error, slot_episode[slot]) from None
                # float32 like TorchRL's reward spec, so both paths sum the same numbers.
                slot_return[slot] += float(float32(reward))
                length = slot_length[slot] = slot_length[slot] + 1
                if info_keys:
                    acc = slot_info[slot]
                    for key in info_keys:
                        if key in info:
                            acc[key] = _add(acc[key], info[key])
                if frames and slot_episode[slot] in frames:
                    frames[slot_episode[slot]].append(envs[slot].render())
                if terminated or truncated or length >= limit[slot]:
                    finish(slot, info)
                    if not log.has_next():
                        continue
                    start(slot)
                else:
                    obs[slot] = o
                still_running.append(slot)
            active = still_running
        return log.batch(time.perf_counter() - started)


def _direct_step(env, max_steps: float) -> tuple[Callable, float]:
    """A copy's step function and step limit for the loop.

    ``gymnasium.make`` wraps an env in ``TimeLimit``, ``OrderEnforcing`` and
    ``PassiveEnvChecker``: bookkeeping that costs about 0.5 us a step (5% of a
    Pendulum step) and that this loop does itself (it resets before stepping
    and ends an episode at the time limit). Once the checker has made its
    first-steps checks, the loop steps the env below them, with the
    ``TimeLimit``'s limit; any other wrapper keeps the whole stack.
    Resets and renders always go through every wrapper.
    """
    limit, inner = max_steps, env
    while isinstance(inner, gym.Wrapper):
        kind = type(inner)
        if kind is TimeLimit and isinstance(getattr(inner, "_max_episode_steps", None), int):
            limit = min(limit, inner._max_episode_steps)
        elif kind is PassiveEnvChecker:
            if not (inner.checked_step and getattr(inner, "checked_data_reuse", True)):
                return env.step, max_steps
        elif kind is not OrderEnforcing:
            return env.step, max_steps
        inner = inner.env
    return inner.step, limit


class TorchRLRollout(_EnvSlots):
    """Episodes on copies of a TorchRL ``EnvBase`` (transforms and specs honoured).

    Each episode is seeded the way its env takes a seed (``reset(seed=...)`` or
    ``set_seed`` then ``reset()``, chosen once from the first copy). ``is_success``
    and ``info_keys`` are read from the step TensorDict, or else from the
    ``info`` of a wrapped gymnasium env.

    ``record_trajectories`` keeps every step of every episode (TorchRL's
    ``metrics_fn``); ``reward_keys`` and ``done_keys`` (TorchRL's, ``("next",
    "reward")`` style) are the rewards a return sums (over agents too) and the
    flags that end an episode, the env's own by default (``env_keys.EnvKeys``).
    A multi-agent env's agent groups also get per-agent returns.
    """

    def __init__(
        self,
        *args,
        record_trajectories: bool = False,
        reward_keys=None,
        done_keys=None,
        **kwargs,
    ) -> None:
        self.record_trajectories = record_trajectories
        self._reward_keys = reward_keys
        self._done_keys = done_keys
        super().__init__(*args, **kwargs)

    def _setup(self, first_env) -> None:
        self._observation_keys = list(first_env.observation_spec.keys(True, True))
        self.action_key = first_env.action_key
        self.keys = EnvKeys.of(first_env, self._reward_keys, self._done_keys)
        self._reset = seeded_reset(first_env)
        self._taps = [attach_info_tap(first_env)]
        self.reward_keys = list(self.keys.reward_keys)

    def _adopt(self, env) -> None:
        self._taps.append(attach_info_tap(env))

    def first_rows(self, chunk: Chunk) -> list[int]:
        """The batch rows of the chunk's first episodes: episode ``i`` starts in row
        ``i % batch_size``, the row it has in-process, so that its actions are computed
        in the same row of the same batch on any number of workers (a policy's output
        rows may differ in their last bits from one row to another)."""
        first = min(len(chunk), self.batch_size)
        return [int(i) % self.batch_size for i in chunk.indices[:first]]

    def copies_for(self, chunk: Chunk) -> int:
        """How many env copies the chunk needs: one per row up to its highest."""
        return max(self.first_rows(chunk)) + 1

    def close(self) -> None:
        for env in self._envs:
            if not env.is_closed:
                _close_quietly(env)

    def run(self, chunk: Chunk) -> EpisodeBatch:
        started = time.perf_counter()
        log = _EpisodeLog(chunk, self._info_keys)
        rows = self.first_rows(chunk)
        envs = self._env_copies(self.copies_for(chunk))
        taps = self._taps
        keys = self._observation_keys
        max_steps = self._max_steps
        slot_td: list[TensorDictBase | None] = [None] * self.batch_size
        slot_episode = [-1] * self.batch_size
        slot_return = [0.0] * self.batch_size
        slot_length = [0] * self.batch_size
        slot_info = [dict.fromkeys(self._info_keys) for _ in range(self.batch_size)]
        recording = self.record_trajectories
        slot_steps: list[list] = [[] for _ in range(self.batch_size)]
        if recording:
            log.trajectories = [None] * len(chunk)
        groups = self.keys.groups
        log.agent_returns = {
            name: np.full((len(chunk), agents), np.nan) for name, (_, agents) in groups.items()
        }
        slot_agents = [
            {name: np.zeros(agents) for name, (_, agents) in groups.items()}
            for _ in range(self.batch_size)
        ]

        def start(slot: int) -> None:
            i = log.take_next()
            slot_episode[slot] = i
            slot_return[slot] = 0.0
            slot_length[slot] = 0
            slot_steps[slot] = []
            for values in slot_agents[slot].values():
                values[:] = 0.0
            slot_info[slot] = dict.fromkeys(self._info_keys)
            try:
                slot_td[slot] = self._reset(envs[slot], log.seeds[i]).select(*keys)
                if log.record[i]:
                    log.frames[i] = [_render(envs[slot])]
            except Exception as error:
                raise log.fail(error, i) from None

        active = rows
        for slot in active:
            start(slot)
        while active:
            # Idle slots repeat a running slot's observation to keep the batch size fixed.
            filler = slot_td[active[0]]
            batch = torch.stack([td if td is not None else filler for td in slot_td])
            try:
                actions = self._act(batch)
            except Exception as error:
                raise log.fail(error, slot_episode[active[0]]) from None
            still_running = []
            for slot in active:
                i = slot_episode[slot]
                td = slot_td[slot].clone(False)
                if isinstance(actions, TensorDictBase):  # several action keys (agent groups)
                    td.update(actions[slot])
                else:
                    td.set(self.action_key, actions[slot])
                try:
                    stepped = envs[slot].step(td)
                except Exception as error:
                    raise log.fail(error, i) from None
                nxt = stepped.get("next")
                slot_return[slot] += sum(float(nxt.get(k).sum()) for k in self.reward_keys)
                if groups:
                    for name, rewards in self.keys.agent_rewards(nxt, 1).items():
                        slot_agents[slot][name] += rewards[0].numpy()
                slot_length[slot] += 1
                if recording:
                    slot_steps[slot].append(stepped)
                info = taps[slot].info if taps[slot] is not None else {}
                for key in self._info_keys:
                    if key in nxt.keys():
                        slot_info[slot][key] = _add(slot_info[slot][key], nxt.get(key))
                    elif key in info:
                        slot_info[slot][key] = _add(slot_info[slot][key], info[key])
                if i in log.frames:
                    log.frames[i].append(_render(envs[slot]))
                if bool(self.keys.episode_ends(nxt, 1)) or slot_length[slot] >= max_steps:
                    log.returns[i] = slot_return[slot]
                    for name, values in slot_agents[slot].items():
                        log.agent_returns[name][i] = values
                    log.lengths[i] = slot_length[slot]
                    if recording:
                        log.trajectories[i] = torch.stack(slot_steps[slot])
                    if SUCCESS_KEY in nxt.keys():
                        log.infos[SUCCESS_KEY][i] = float(nxt.get(SUCCESS_KEY))
                    elif SUCCESS_KEY in info:
                        log.infos[SUCCESS_KEY][i] = float(info[SUCCESS_KEY])
                    for key in self._info_keys:
                        log.infos[key][i] = _per_step(slot_info[slot][key], slot_length[slot])
                    if log.has_next():
                        start(slot)
                        still_running.append(slot)
                else:
                    slot_td[slot] = nxt.select(*keys)
                    still_running.append(slot)
            active = still_running
        return log.batch(time.perf_counter() - started)


def _add(total: float | None, value) -> float:
    """An info key's running sum over an episode (``None``: not reported yet)."""
    return float(value) if total is None else total + float(value)


def _per_step(total: float | None, length: int) -> float:
    """An info key's per-step mean over its episode; NaN if the env never reported it."""
    return math.nan if total is None else total / length


def _render(env) -> np.ndarray:
    """An RGB frame from a TorchRL env: its gymnasium env's ``render()`` when it has one."""
    base = env
    while hasattr(base, "base_env"):
        base = base.base_env
    inner = getattr(base, "_env", None)
    frame = inner.render() if inner is not None else env.render()
    return np.asarray(frame)


def _close_quietly(env) -> None:
    """Close an env copy; a failure (e.g. a renderer's ``EGLError``) is logged, not raised:
    the evaluation is over, and closing the other copies must go on."""
    try:
        env.close()
    except Exception:
        logging.getLogger("ray_eval").warning("closing an env copy failed", exc_info=True)
