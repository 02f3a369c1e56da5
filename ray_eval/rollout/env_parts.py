"""Stateful parts of a TorchRL env that an evaluation must handle: normalization and video.

* Normalization (``VecNormV2``, ``VecNorm``) is frozen in every evaluation env,
  as TorchRL's Evaluator does: evaluating must never update the statistics a
  trainer relies on. The trainer's current statistics reach the workers
  through ``weights_dict={"env.transform[0]": vecnorm}`` (see ``weights``).
* Video transforms (``VideoRecorder``, or any transform with a ``dump``) are
  dumped after each evaluation with its step (``dump_video=True``), by one env
  copy only, so each evaluation logs one video, as with TorchRL's single env.
  The frames the other copies buffered are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torchrl.envs import Compose, Transform, TransformedEnv


def transforms(env) -> Iterator[Transform]:
    """Every transform of ``env``, nested ``Compose`` and ``TransformedEnv`` included."""
    while isinstance(env, TransformedEnv):
        yield from _flatten(env.transform)
        env = env.base_env


def _flatten(transform) -> Iterator[Transform]:
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
