"""Stateful parts of a TorchRL env that an evaluation must handle: normalization and video.

* Normalization (``VecNormV2``, ``VecNorm``) is frozen in every evaluation env,
  as TorchRL's Evaluator does: evaluating must never update the statistics a
  trainer relies on. The trainer's current statistics reach the workers
  through ``weights_dict={"env.transform[0]": vecnorm}`` (see ``weights``).
* What ``weights_dict`` may load into an env: its ``nn.Module`` parts by model
  id (``EnvParts``, plain data in ``env_part_names``), reported by each worker so
  that a request is checked at the call, before anything is sent.
* Video transforms (``VideoRecorder``, or any transform with a ``dump``) are
  dumped after each evaluation with its step (``dump_video=True``), by one env
  copy only, so each evaluation logs one video, as with TorchRL's single env.
  The frames the other copies buffered are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from ray_eval.rollout.env_part_names import EnvParts
from ray_eval.rollout.torchrl_env import is_torchrl, torchrl_loaded

if TYPE_CHECKING:
    from torchrl.envs import Transform


def transforms(env) -> Iterator[Transform]:
    """Every transform of ``env``, nested ``Compose`` and ``TransformedEnv`` included
    (none without importing TorchRL if it is not loaded: see torchrl_env)."""
    if not torchrl_loaded():
        return
    from torchrl.envs import TransformedEnv

    while isinstance(env, TransformedEnv):
        yield from _flatten(env.transform)
        env = env.base_env


def _flatten(transform) -> Iterator[Transform]:
    from torchrl.envs import Compose

    if isinstance(transform, Compose):
        for child in transform.transforms:
            yield from _flatten(child)
    else:
        yield transform


def freeze_normalization(env) -> int:
    """Freeze every running normalization of ``env``; returns how many were frozen."""
    frozen = 0
    for transform in transforms(env):
        freeze = getattr(transform, "freeze", None)
        if callable(freeze) and hasattr(transform, "frozen"):
            freeze()
            frozen += 1
    return frozen


@dataclass
class FrozenNormalization:
    """An env factory whose envs come with their normalization frozen."""

    factory: Callable[[], Any]

    def __call__(self):
        env = self.factory()
        freeze_normalization(env)
        return env

    def __str__(self) -> str:
        return str(self.factory)


def video_dumpers(env) -> list[Transform]:
    """The transforms of ``env`` whose own ``dump`` does something (``Transform.dump`` does not)."""
    if not torchrl_loaded():
        return []
    from torchrl.envs import Transform

    return [
        t for t in transforms(env) if getattr(type(t), "dump", Transform.dump) is not Transform.dump
    ]


def dump_videos(env, step: int) -> None:
    """What the copy recorded goes to its loggers, at ``step``."""
    for transform in video_dumpers(env):
        transform.dump(step=step)


def discard_videos(env) -> None:
    """Drop the frames a copy buffered (a ``VideoRecorder``'s ``obs``) without logging them."""
    for transform in video_dumpers(env):
        if isinstance(getattr(transform, "obs", None), list):
            transform.obs = []


# Model ids are paths below the env; no real env nests its parts deeper than this.
MAX_PART_DEPTH = 32


def env_parts_of(env, loop: str) -> EnvParts:
    """The ``EnvParts`` of a live env that the rollout loop ``loop`` runs."""
    return EnvParts(type(env).__name__, loop, loadable_parts(env))


def loadable_parts(env) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every ``nn.Module`` part of ``env`` by each model id that ``weights.resolve_part``
    resolves to it: child modules (``.name``), the public property of a private child
    (TorchRL's ``transform`` for ``_transform``), and items of ``Compose``,
    ``ModuleList`` and ``Sequential`` (``[i]``); with its type and state_dict keys."""
    if not isinstance(env, nn.Module):
        return {}
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    stack = [("env", env, 0)]
    while stack:
        name, module, depth = stack.pop()
        if name in found:
            continue
        found[name] = (type(module).__name__, tuple(module.state_dict().keys()))
        if depth >= MAX_PART_DEPTH:
            continue
        for child_name, child in module.named_children():
            stack.append((f"{name}.{child_name}", child, depth + 1))
            public = child_name.lstrip("_")
            if public != child_name and _is_property_for(module, public, child):
                stack.append((f"{name}.{public}", child, depth + 1))
        if isinstance(module, nn.ModuleList | nn.Sequential) or is_torchrl(module, "Compose"):
            for index in range(len(module)):
                stack.append((f"{name}[{index}]", module[index], depth + 1))
    return found


def _is_property_for(module: nn.Module, name: str, child: nn.Module) -> bool:
    """True if ``module.name`` is a property that gives ``child``."""
    if not isinstance(getattr(type(module), name, None), property):
        return False
    try:
        return getattr(module, name) is child
    except Exception:
        return False
