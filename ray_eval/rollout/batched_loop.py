"""The episode loop for batched TorchRL envs: one ``EnvBase`` with ``batch_size=[N]``. No Ray.

VMAS, ``GymEnv(..., num_envs=N)``, ``MultiThreadedEnv``, Brax, IsaacLab or a
user's ``EnvBase`` with a batch step N elements at once. Such an env is a
native vector env (``vector_loop``), with TorchRL's conventions, so it is run
under the same contract:

* **One env per worker, one policy call per step** on the whole batch (a
  TensorDict of batch ``[N]``); the env's own batch is the batch, whatever
  ``envs_per_worker`` says (a factory's ``num_envs`` keeps its meaning).
* **Seeding per chunk**: the env is seeded once at the start of each chunk
  with the chunk's seed (``reset(seed=...)`` for TorchRL's gymnasium
  wrappers, ``set_seed`` then ``reset()`` for the others, as TorchRL does).
* **Per-element quotas** (``vector_loop.slot_quotas``): element ``k`` of
  ``N`` runs the chunk's episodes ``k, k + N, ...``; exactly the chunk's
  episodes count, each once, whatever their lengths. So an evaluation's
  numbers depend on ``(seed, step, episodes, batch layout)`` only, never on
  the number of workers.
* **Episode ends per element**, from the done keys (``env_keys``). After each
  step, ``step_and_maybe_reset`` resets the elements that are done, through
  the env's ``_reset`` mask (TorchRL's contract): an env that resets only
  those elements, and one whose elements all end together (VMAS with its
  ``max_steps``), both count exactly. ``max_steps`` cuts an element's episode:
  it counts as ended there and that element alone is reset (a ``_reset`` mask
  with only it set), as TorchRL's ``StepCounter`` truncation does. An env that
  cannot restart one element on request (``GymEnv(..., num_envs=N)``, whose
  gymnasium vector env resets its slots itself) steps the cut element,
  uncounted, until it ends that episode by itself, as native vector envs do.

Returns are summed over reward keys, agents and steps (``env_keys``); each
agent group's per-agent returns are kept too (``EpisodeBatch.agent_returns``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from tensordict import TensorDictBase

from ray_eval.results.episodes import SUCCESS_KEY, EpisodeBatch
from ray_eval.rollout.chunk import Chunk
from ray_eval.rollout.env_keys import EnvKeys
from ray_eval.rollout.loops import _close_quietly, _EpisodeLog
from ray_eval.rollout.torchrl_env import is_torchrl_env, seeded_reset
from ray_eval.rollout.vector_loop import chunk_seed, first_open, record_ended, slot_quotas

if TYPE_CHECKING:
    from torchrl.envs import EnvBase


def is_batched_env(env) -> bool:
    """A TorchRL env whose batch has more than one element (``batch_size=[N]``, N > 1)."""
    return is_torchrl_env(env) and env.batch_size.numel() > 1


def check_batch(env, name: str) -> int:
    """The number of elements of a batched env; raises for a batch of several dimensions."""
    if len(env.batch_size) != 1:
        raise TypeError(
            f"env {name!r} has batch_size={tuple(env.batch_size)}: ray_eval steps batched "
            f"TorchRL envs with one batch dimension (batch_size=[N])"
        )
    return int(env.batch_size[0])


def autoresets_itself(env) -> bool:
    """An env that resets its elements by itself when they end and cannot restart one on
    request (``GymEnv(..., num_envs=N)``: gymnasium's vector env under TorchRL's
    ``VecGymEnvTransform``). A ``max_steps`` cut there waits, uncounted, for the env to end
    the element's episode, as on native vector envs."""
    from torchrl.envs import VecGymEnvTransform

    from ray_eval.rollout.env_parts import transforms

    return any(isinstance(t, VecGymEnvTransform) for t in transforms(env))


class BatchedRollout:
    """Chunks of episodes on one batched TorchRL env (see the module's docstring).

    ``act(td)`` writes the policy's actions into the batch TensorDict ``td`` (under
    every action key) and returns it.
    """

    def __init__(
        self,
        env: EnvBase,
        act: Callable[[TensorDictBase], TensorDictBase],
        keys: EnvKeys,
        *,
        max_steps: int | None,
        info_keys: Sequence[str] = (),
    ) -> None:
        self._env = env
        self._envs = [env]  # env parts (weights_dict) and video transforms live here
        self._act = act
        self.keys = keys
        self.batch_size = int(env.batch_size[0])
        self._max_steps = max_steps or math.inf
        self._info_keys = tuple(info_keys)
        self._reset = seeded_reset(env)
        self._reset_keys = list(env.reset_keys)
        self._done_leaves = set(env.full_done_spec.keys(True, True))
        self._resets_elements = not autoresets_itself(env)

    def _env_copies(self, count: int) -> list:
        return self._envs

    def copies_for(self, chunk: Chunk) -> int:
        return 1

    def close(self) -> None:
        if not self._env.is_closed:
            _close_quietly(self._env)

    def first_batch(self) -> TensorDictBase:
        """The env's first observations (seed 0), for the action check."""
        return self._reset(self._env, 0)

    def _reset_elements(self, td: TensorDictBase, cut: np.ndarray) -> TensorDictBase:
        """Reset only the elements in ``cut`` (``max_steps``), through ``_reset`` masks."""
        env = self._env
        n = self.batch_size
        mask = torch.as_tensor(cut)
        request = td.exclude(*self._reset_keys)
        for key in self._reset_keys:
            parent = key[:-1] if isinstance(key, tuple) else ()
            done = (*parent, "done") if parent else "done"
            shape = tuple(env.full_done_spec[done].shape) if done in self._done_leaves else (n,)
            request.set(key, mask.reshape(n, *([1] * (len(shape) - 1))).expand(shape))
        return env.reset(request)

    def run(self, chunk: Chunk) -> EpisodeBatch:
        started = time.perf_counter()
        log = _EpisodeLog(chunk, self._info_keys)
        num_episodes = len(chunk)
        n = self.batch_size
        keys = self.keys
        env = self._env
        try:
            td = self._reset(env, chunk_seed(chunk))
        except Exception as error:
            raise log.fail(error, 0) from None
        quota = slot_quotas(num_episodes, n)
        finished = np.zeros(n, dtype=np.int64)
        returns = np.zeros(n, dtype=np.float64)
        lengths = np.zeros(n, dtype=np.int64)
        groups = {name: np.zeros((n, agents)) for name, (_, agents) in keys.groups.items()}
        log.agent_returns = {
            name: np.full((num_episodes, agents), np.nan)
            for name, (_, agents) in keys.groups.items()
        }
        info_sums = {key: np.zeros(n) for key in self._info_keys}
        info_seen = {key: np.zeros(n, dtype=bool) for key in self._info_keys}
        max_steps = self._max_steps
        waiting = np.zeros(n, dtype=bool)  # cut by max_steps, stepped until the env ends it
        remaining = num_episodes
        while remaining:
            try:
                td = self._act(td)
            except Exception as error:
                raise log.fail(error, first_open(finished, quota, n)) from None
            try:
                stepped, following = env.step_and_maybe_reset(td)
            except Exception as error:
                raise log.fail(error, first_open(finished, quota, n)) from None
            nxt = stepped.get("next")
            ended = keys.episode_ends(nxt, n).numpy()
            inside = ~waiting  # steps of an episode that max_steps cut belong to none
            returns += np.where(inside, keys.step_rewards(nxt, n).numpy(), 0.0)
            for name, rewards in keys.agent_rewards(nxt, n).items():
                groups[name] += np.where(inside[:, None], rewards.numpy(), 0.0)
            lengths += inside
            for key in self._info_keys:
                if key in nxt.keys(True):
                    values = nxt.get(key).reshape(n, -1).double().mean(-1).numpy()
                    info_sums[key] += np.where(inside, values, 0.0)
                    info_seen[key] |= inside
            if waiting.any():
                waiting &= ~ended  # the env ended the cut episode: the next one counts
                ended = ended & inside
            cut = (lengths >= max_steps) & ~ended
            over = ended | cut
            if over.any():
                slots, counted, positions = record_ended(
                    log, over, finished, quota, returns, lengths
                )
                if len(counted):
                    for name, values in groups.items():
                        log.agent_returns[name][positions] = values[counted]
                    if SUCCESS_KEY in nxt.keys():
                        success = nxt.get(SUCCESS_KEY).reshape(n, -1).any(-1).double().numpy()
                        log.infos[SUCCESS_KEY][positions] = success[counted]
                    for key in self._info_keys:
                        means = info_sums[key][counted] / lengths[counted]
                        log.infos[key][positions] = np.where(info_seen[key][counted], means, np.nan)
                    remaining -= len(counted)
                finished[slots] += 1
                returns[slots] = 0.0
                lengths[slots] = 0
                for values in groups.values():
                    values[slots] = 0.0
                for key in self._info_keys:
                    info_sums[key][slots] = 0.0
                    info_seen[key][slots] = False
            if remaining and cut.any():
                if not self._resets_elements:
                    waiting |= cut
                else:
                    try:
                        following = self._reset_elements(following, cut)
                    except Exception as error:
                        raise log.fail(error, first_open(finished, quota, n)) from None
            td = following
        return log.batch(time.perf_counter() - started)
