"""What the user passes as ``env``, turned into a picklable factory of env copies.

``env`` may be a gymnasium id, a zero-argument callable returning a
``gymnasium.Env`` or a TorchRL ``EnvBase``, a live env of either kind (copied
per env slot, see ``backends.env_instances``), or a native vector env source
(``"envpool:<task id>"``, ``"vector:<gymnasium id>"``, ``ray_eval.VectorFactory(fn)``, or a callable whose
``num_envs`` parameter is required, see ``rollout.vector_sources``). A factory
whose ``num_envs`` has a value (``partial(make_env, num_envs=4)``) is an env
factory like any other: what it returns decides (a batched TorchRL env is
stepped as one batch, see ``rollout.batched_loop``).
This runs on the driver, when the Evaluator is built; the workers call the factory.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym

from ray_eval.backends.env_instances import instance_factory, is_env_instance
from ray_eval.rollout.vector_sources import (
    VectorFactory,
    VectorSource,
    no_video,
    requires,
    vector_source_from_id,
)

EnvLike = str | Callable[[], Any]


@dataclass
class GymMake:
    """A picklable ``gymnasium.make(env_id, **kwargs)``.

    ``package`` registers ``env_id`` when imported (``ale_py`` for ``"ALE/..."``):
    a worker process imports it first, as the driver did. A MuJoCo env made to
    render gets an off-screen renderer (``MUJOCO_GL=egl``) on a headless worker.
    """

    env_id: str
    kwargs: dict = field(default_factory=dict)
    package: str | None = None

    def __call__(self) -> gym.Env:
        if self.package:
            importlib.import_module(self.package)
        if self.kwargs.get("render_mode") == "rgb_array" and "mujoco" in (self.package or ""):
            from ray_eval.factories import headless_mujoco_rendering

            headless_mujoco_rendering()
        return gym.make(self.env_id, **self.kwargs)

    def __str__(self) -> str:
        return self.env_id


def as_env_factory(
    env: EnvLike, *, render_mode: str | None = None, backend: str | None = None
) -> Callable[[], Any]:
    """A zero-argument, picklable factory for ``env``; raises ``TypeError`` otherwise.

    A live env becomes a factory of copies of it (``render_mode`` is then the
    env's own). ``backend="process"`` keeps TorchRL's rule that the env be a
    factory, and its message.
    """
    if isinstance(env, str):
        vector = vector_source_from_id(env)
        if vector is not None:
            return no_video(vector, render_mode)
        if env not in gym.registry:
            raise ValueError(
                f"env {env!r} is not a registered gymnasium id "
                f"(did you forget to import the package that registers it?)"
            )
        entry = gym.spec(env).entry_point
        package = entry.split(":")[0] if isinstance(entry, str) else None
        return GymMake(env, {"render_mode": render_mode} if render_mode else {}, package)
    if is_env_instance(env):
        if backend == "process":
            raise ValueError(
                "The 'process' backend requires `env` to be a callable (factory function) "
                "because the env is created inside a child process; got a live "
                f"{type(env).__name__}. Use the default backend to pass an env instance"
            )
        return instance_factory(env)
    if not callable(env):
        raise TypeError(
            f"env must be a gymnasium id, a live env or a zero-argument callable, "
            f"got {type(env).__name__}"
        )
    if isinstance(env, VectorSource):
        return no_video(env, render_mode)
    if requires(env, "num_envs"):
        # It cannot be called with no argument: its signature, not a guess from a
        # parameter's name, says it builds batches of num_envs (a native vector env).
        return no_video(VectorFactory(env), render_mode)
    return env
