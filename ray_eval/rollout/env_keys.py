"""Which keys of a TorchRL env a rollout reads and writes: actions, rewards, dones, agent groups.

Multi-agent envs (VMAS, PettingZoo through TorchRL) nest their keys by agent
group: ``("agents", "action")``, ``("agents", "reward")``, several groups in
one env (``("agent", ...)`` and ``("adversary", ...)``). So a loop never
assumes one ``"action"``/``"reward"``/``"done"`` at the root:

* **Actions** go under every key of ``env.action_keys``; each is checked
  against its own leaf spec, ``env.full_action_spec[key]`` (``env.action_spec``
  is a ``Composite`` when the key is nested).
* **Rewards**: an episode's return is the sum of every reward key
  (``env.reward_keys``, or TorchRL's ``reward_keys=`` argument) over its
  agents and its steps, the quantity TorchRL's ``Evaluator`` reports. Each
  nested reward key is also an agent **group** (its parent key, ``"agents"``):
  per agent of the group, its return.
* **Dones**: an episode of one batch element ends when any of the done keys
  is set for that element, for any agent, as TorchRL's collectors split
  trajectories (``_aggregate_end_of_traj``). By default the done keys are the
  root ``"done"`` when the env has one (VMAS, PettingZoo: the env's own
  aggregate over agents, e.g. PettingZoo's ``done_on_any``), else every
  ``"done"`` leaf of ``env.done_keys`` (per-agent dones). TorchRL's
  ``done_keys=`` argument replaces them.

No Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tensordict import TensorDictBase

NestedKey = str | tuple[str, ...]


def as_key(key) -> NestedKey:
    """A nested key in one form: ``("a",)`` is ``"a"``."""
    if isinstance(key, tuple) and len(key) == 1:
        return key[0]
    return key


def key_list(keys) -> list:
    """TorchRL's key argument: one key (a str or a tuple of str) or a list of keys."""
    if isinstance(keys, str) or (isinstance(keys, tuple) and all(isinstance(k, str) for k in keys)):
        return [keys]
    return list(keys)


def under_next(key) -> NestedKey:
    """A step key as read from the ``"next"`` TensorDict: ``("next", "reward")`` -> ``"reward"``."""
    if isinstance(key, tuple) and key and key[0] == "next":
        return as_key(key[1:])
    return as_key(key)


def group_name(key: NestedKey) -> str | None:
    """The agent group of a nested reward key (``("agents", "reward")`` -> ``"agents"``)."""
    if isinstance(key, tuple) and len(key) > 1:
        return "/".join(key[:-1])
    return None


@dataclass(frozen=True)
class EnvKeys:
    """The keys a loop uses on one TorchRL env, and the shapes it reads them in."""

    action_keys: tuple  # where the policy's actions go
    reward_keys: tuple  # under "next": summed over agents and steps into the return
    done_keys: tuple  # under "next": any of them set ends an element's episode
    groups: dict  # group name -> (its reward key, its number of agents)

    @classmethod
    def of(cls, env, reward_keys=None, done_keys=None) -> EnvKeys:
        """The keys of ``env``; ``reward_keys``/``done_keys`` are TorchRL's arguments
        (``("next", ...)`` keys, one or a list), ``None`` for the env's own."""
        batch_dims = len(env.batch_size)
        if reward_keys is None:
            rewards = tuple(as_key(k) for k in env.reward_keys)
        else:
            rewards = tuple(under_next(k) for k in key_list(reward_keys))
        if done_keys is None:
            own = [as_key(k) for k in env.done_keys]
            if "done" in own:
                dones = ("done",)
            else:
                dones = tuple(k for k in own if (k[-1] if isinstance(k, tuple) else k) == "done")
                dones = dones or tuple(own)
        else:
            dones = tuple(under_next(k) for k in key_list(done_keys))
        own_rewards = [as_key(k) for k in env.full_reward_spec.keys(True, True)]
        # a reward may also be an observation a transform adds (RewardSum's episode_reward)
        known_rewards = {*own_rewards, *(as_key(k) for k in env.observation_spec.keys(True, True))}
        for key in rewards:
            if key not in known_rewards:
                raise ValueError(
                    f"reward_keys: the env has no reward key {('next', *_tuple(key))!r}; "
                    f"its reward keys are {sorted(('next', *_tuple(k)) for k in own_rewards)}"
                )
        known_dones = {as_key(k) for k in env.full_done_spec.keys(True, True)}
        for key in dones:
            if key not in known_dones:
                raise ValueError(
                    f"done_keys: the env has no done key {('next', *_tuple(key))!r}; "
                    f"its done keys are {sorted(('next', *_tuple(k)) for k in known_dones)}"
                )
        groups = {}
        for key in rewards:
            name = group_name(key)
            if name is None:
                continue
            spec = env.full_reward_spec if key in env.full_reward_spec.keys(True, True) else None
            parent = (spec if spec is not None else env.observation_spec)[key[:-1]]
            agents = int(np.prod(tuple(parent.shape)[batch_dims:], dtype=np.int64))
            groups[name] = (key, agents)
        return cls(
            action_keys=tuple(as_key(k) for k in env.action_keys),
            reward_keys=rewards,
            done_keys=dones,
            groups=groups,
        )

    def step_rewards(self, nxt: TensorDictBase, batch: int) -> torch.Tensor:
        """Each element's reward of this step, summed over reward keys and agents ([batch])."""
        total = None
        for key in self.reward_keys:
            value = nxt.get(key).reshape(batch, -1).sum(-1, dtype=torch.float64)
            total = value if total is None else total + value
        return total

    def agent_rewards(self, nxt: TensorDictBase, batch: int) -> dict[str, torch.Tensor]:
        """Per group, each agent's reward of this step (``[batch, agents]``)."""
        return {
            name: nxt.get(key).reshape(batch, agents, -1).sum(-1, dtype=torch.float64)
            for name, (key, agents) in self.groups.items()
        }

    def episode_ends(self, nxt: TensorDictBase, batch: int) -> torch.Tensor:
        """Which elements' episodes ended at this step ([batch] bool)."""
        ended = None
        for key in self.done_keys:
            value = nxt.get(key).reshape(batch, -1).any(-1)
            ended = value if ended is None else ended | value
        return ended


def _tuple(key) -> tuple:
    return key if isinstance(key, tuple) else (key,)
