"""Native vector envs: sources that build a whole batch of env slots in one object.

Each worker builds one vector env of ``envs_per_worker`` slots. They are asked for
as ``"envpool:<task id>"`` (EnvPool), ``"vector:<gymnasium id>"`` (gymnasium's
``vector_entry_point``, e.g. ``CartPoleVectorEnv``), or a callable with a
``num_envs`` parameter (and, optionally, ``seed``) that returns a gymnasium
``VectorEnv`` or an EnvPool env: marked as such with ``ray_eval.VectorFactory(fn)``,
or with ``num_envs`` required (no default). A callable whose ``num_envs`` has a
default is a plain env factory (a TorchRL factory's ``num_envs`` keeps its own
meaning); if what it returns is a gymnasium ``VectorEnv``, the worker takes it
for a vector factory then. No Ray here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

from ray_eval.rollout.vector_loop import autoreset_mode

ENVPOOL_PREFIX = "envpool:"
VECTOR_PREFIX = "vector:"


class VectorSource:
    """How a worker builds a native vector env: ``make(num_envs, seed, max_steps)``.

    ``seeds_at_creation``: the env takes its seed when built (EnvPool), so a new
    one is built per chunk; otherwise one is kept and ``reset(seed=...)``.
    ``applies_max_steps``: ``make`` cuts episodes at ``max_steps`` itself.
    Called with no argument (what a worker does with any env factory), it gives
    the env's one-slot spaces (``VectorEnvSpaces``), for policy factories and checks.
    """

    seeds_at_creation = False
    applies_max_steps = False

    def make(self, num_envs: int, seed: int, max_steps: int | None = None):
        raise NotImplementedError

    def __call__(self) -> VectorEnvSpaces:
        return VectorEnvSpaces(self)


@dataclass
class EnvPoolMake(VectorSource):
    """``envpool.make_gymnasium(task_id, num_envs=..., seed=..., **kwargs)``.

    ``num_threads`` defaults to 1: a Ray worker holds one CPU (``num_cpus_per_worker``);
    pass ``EnvPoolMake(task_id, {"num_threads": k})`` for more.
    """

    task_id: str
    kwargs: dict = field(default_factory=dict)
    seeds_at_creation = True
    applies_max_steps = True

    def make(self, num_envs: int, seed: int, max_steps: int | None = None):
        import envpool

        kwargs = {"num_threads": 1, **self.kwargs}
        if max_steps is not None:
            own = envpool.make_spec(self.task_id, **self.kwargs).config.max_episode_steps
            kwargs["max_episode_steps"] = min(int(max_steps), int(own))
        return envpool.make_gymnasium(self.task_id, num_envs=num_envs, seed=seed, **kwargs)

    def __str__(self) -> str:
        return ENVPOOL_PREFIX + self.task_id


@dataclass
class GymVectorMake(VectorSource):
    """``gymnasium.make_vec(env_id, num_envs, vectorization_mode="vector_entry_point")``."""

    env_id: str
    kwargs: dict = field(default_factory=dict)

    def make(self, num_envs: int, seed: int, max_steps: int | None = None):
        return gym.make_vec(
            self.env_id,
            num_envs=num_envs,
            vectorization_mode="vector_entry_point",
            **self.kwargs,
        )

    def __str__(self) -> str:
        return VECTOR_PREFIX + self.env_id


@dataclass
class VectorFactory(VectorSource):
    """Marks ``factory`` as a native vector env factory: ``factory(num_envs=n[, seed=s])``
    returns a gymnasium ``VectorEnv`` or an EnvPool env of ``n`` slots.

    Pass ``Evaluator(ray_eval.VectorFactory(make), ...)``: each worker builds one
    vector env of ``envs_per_worker`` slots (``seed`` is passed when ``factory``
    takes one, for envs that are seeded when built, as EnvPool). Without the
    marker, a callable is a vector factory only if its ``num_envs`` is required.
    """

    factory: Callable[..., Any]

    @property
    def seeds_at_creation(self) -> bool:  # type: ignore[override]
        """Does ``factory`` take a ``seed`` (the env is seeded when built, as EnvPool)?"""
        return takes(self.factory, "seed")

    def make(self, num_envs: int, seed: int, max_steps: int | None = None):
        """``factory(num_envs=num_envs[, seed=seed])``: one vector env of ``num_envs`` slots."""
        if self.seeds_at_creation:
            return self.factory(num_envs=num_envs, seed=seed)
        return self.factory(num_envs=num_envs)

    def __str__(self) -> str:
        return callable_name(self.factory)


def vector_source_from_id(env_id: str, kwargs: dict | None = None) -> VectorSource | None:
    """``"envpool:<task id>"`` or ``"vector:<gymnasium id>"`` as a source (built with
    ``kwargs``, e.g. a config's); ``None`` for any other id. Raises ``ValueError`` for
    an unknown task or id."""
    if env_id.startswith(ENVPOOL_PREFIX):
        task = env_id[len(ENVPOOL_PREFIX) :]
        try:
            import envpool
        except ImportError:
            raise ValueError(
                f"env {env_id!r} needs EnvPool: pip install envpool (Linux, x86-64/arm64)"
            ) from None
        if task not in envpool.list_all_envs():
            raise ValueError(f"env {env_id!r}: {task!r} is not an EnvPool task id")
        return EnvPoolMake(task, dict(kwargs or {}))
    if env_id.startswith(VECTOR_PREFIX):
        name = env_id[len(VECTOR_PREFIX) :]
        if name not in gym.registry:
            raise ValueError(f"env {env_id!r}: {name!r} is not a registered gymnasium id")
        if not gym.registry[name].vector_entry_point:
            raise ValueError(
                f"env {env_id!r}: gymnasium's {name!r} has no vector_entry_point (a native "
                f"vector env); pass {name!r} itself, which ray_eval batches on its own"
            )
        return GymVectorMake(name, dict(kwargs or {}))
    return None


def is_vector_source(factory: Any) -> bool:
    """Does this env factory (from ``as_env_factory``) build native vector envs?"""
    return isinstance(factory, VectorSource)


def vector_members(factories: dict[str, Any]) -> tuple[str, ...]:
    """The suite members (``""`` for one env) on native vector envs, for the plan."""
    return tuple(name for name, factory in factories.items() if is_vector_source(factory))


def is_vector_env(env: Any) -> bool:
    """A gymnasium ``VectorEnv`` or an EnvPool env (a batch of slots in one object)."""
    return isinstance(env, gym.vector.VectorEnv) or bool(getattr(env, "is_vector_env", False))


def no_video(source: VectorSource, render_mode: str | None) -> VectorSource:
    if render_mode is not None:
        raise ValueError(
            f"record_video needs single envs; env {str(source)!r} is a native vector env"
        )
    return source


def takes(fn: Callable, name: str) -> bool:
    """Does ``fn`` have a parameter ``name`` that can be passed by keyword?"""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    param = params.get(name)
    return param is not None and param.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


def requires(fn: Callable, name: str) -> bool:
    """Does ``fn`` have a parameter ``name``, passable by keyword, with no default?"""
    try:
        param = inspect.signature(fn).parameters.get(name)
    except (TypeError, ValueError):
        return False
    return (
        param is not None
        and param.default is inspect.Parameter.empty
        and param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )


def _seeded_when_built(env: Any) -> bool:
    """EnvPool: the seed is in the config it was built with."""
    config = getattr(env, "config", None)
    return isinstance(config, dict) and "seed" in config


class VectorEnvSpaces(gym.Env):
    """One slot of a native vector env, as a policy factory and the action check see it.

    Built from a one-slot vector env (then closed): its single-slot spaces, its
    autoreset mode and a first observation. It cannot step.
    """

    def __init__(self, source: VectorSource) -> None:
        self.source = source
        self.name = str(source)
        env = source.make(1, 0)
        try:
            if not is_vector_env(env) or getattr(env, "num_envs", None) != 1:
                raise TypeError(
                    f"env factory {self.name} returned {type(env).__name__} for num_envs=1, "
                    f"expected a gymnasium VectorEnv or an EnvPool env with 1 slot"
                )
            self.observation_space = env.single_observation_space
            self.action_space = env.single_action_space
            if not isinstance(self.observation_space, gym.spaces.Box):
                raise TypeError(
                    f"env {self.name!r} has observations {self.observation_space}: native "
                    f"vector envs need array (Box) observations"
                )
            if not source.seeds_at_creation and _seeded_when_built(env):
                raise TypeError(
                    f"env factory {self.name} returned {type(env).__name__}, which takes its "
                    f"seed when it is built (EnvPool ignores reset(seed=...)): give the "
                    f"factory a seed parameter and pass it on, e.g. `lambda num_envs, seed: "
                    f"envpool.make_gymnasium(..., num_envs=num_envs, seed=seed)`"
                )
            self.autoreset = autoreset_mode(env)
            obs, _ = env.reset() if source.seeds_at_creation else env.reset(seed=0)
            self.first_observation = np.asarray(obs)[0]
        finally:
            env.close()

    def reset(self, *, seed=None, options=None):
        raise TypeError(f"{self.name!r}: the spaces of a native vector env's slot cannot step")

    def step(self, action):
        raise TypeError(f"{self.name!r}: the spaces of a native vector env's slot cannot step")

    def __str__(self) -> str:
        return self.name


def callable_name(obj) -> str:
    return getattr(obj, "__qualname__", None) or repr(obj)
