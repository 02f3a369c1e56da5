"""Environments: what the user passes, turned into env copies and a rollout loop.

``env`` may be a gymnasium id, a zero-argument callable returning a
``gymnasium.Env`` or a TorchRL ``EnvBase``, or a live env of either kind (copied
per env slot, see ``env_instances``). Gymnasium envs with array observations
take the vectorized fast path (``GymnasiumRollout``); so does a bare TorchRL
``GymEnv`` or ``GymWrapper`` (the tutorial's ``partial(GymEnv, "Pendulum-v1")``),
whose wrapper adds nothing an evaluation needs but about 0.3 ms per step. Every
other TorchRL env, transforms included, takes the general ``TorchRLRollout``.

Native vector envs, which step a whole batch of slots in one call, take
``VectorRollout``: each worker builds one vector env of ``envs_per_worker``
slots. They are asked for as ``"envpool:<task id>"`` (EnvPool),
``"vector:<gymnasium id>"`` (gymnasium's ``vector_entry_point``, e.g.
``CartPoleVectorEnv``), or a callable with a ``num_envs`` parameter (and,
optionally, ``seed``) that returns a gymnasium ``VectorEnv`` or an EnvPool env.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torchrl.envs import EnvBase, GymEnv, GymWrapper

from ray_eval.backends.env_instances import instance_factory, is_env_instance
from ray_eval.errors import ActionMismatchError
from ray_eval.rollout.loops import GymnasiumRollout, TorchRLRollout
from ray_eval.rollout.policies import observation_to_action, parameter_dtype, tensordict_to_action
from ray_eval.rollout.vector_loop import VectorRollout, autoreset_mode

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
            return _no_video(vector, render_mode)
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
        return _no_video(env, render_mode)
    if _takes(env, "num_envs"):
        return _no_video(VectorFactory(env), render_mode)
    return env


def build_env(factory: Callable[[], Any]):
    """Call ``factory`` and check it gave an env."""
    env = factory()
    if not isinstance(env, VectorEnvSpaces) and is_vector_env(env):
        raise TypeError(
            f"env factory {_name(factory)} returned a vector env ({type(env).__name__}) "
            f"and takes no num_envs: give it a num_envs parameter (and seed, to seed it "
            f"when it is built, as EnvPool needs), e.g. `lambda num_envs, seed: "
            f"envpool.make_gymnasium('CartPole-v1', num_envs=num_envs, seed=seed)`, or pass "
            f"'envpool:<task id>' or 'vector:<gymnasium id>'; each worker builds one vector "
            f"env of envs_per_worker slots"
        )
    if not isinstance(env, gym.Env | EnvBase):
        raise TypeError(
            f"env factory {_name(factory)} returned {type(env).__name__}, "
            f"expected a gymnasium.Env or a torchrl EnvBase"
        )
    if isinstance(env, EnvBase) and env.batch_size.numel() != 1:
        raise TypeError(
            f"env factory {_name(factory)} returned a batched TorchRL env "
            f"(batch_size={tuple(env.batch_size)}); return a single env, "
            f"ray_eval batches copies itself (a live SerialEnv/ParallelEnv instance "
            f"is evaluated as its sub-envs)"
        )
    return env


def _name(obj) -> str:
    return getattr(obj, "__qualname__", None) or repr(obj)


def unwrap_bare_gym_env(env) -> gym.Env | None:
    """The gymnasium env inside a TorchRL ``GymEnv``/``GymWrapper`` that adds nothing
    but the wrapper."""
    if type(env) not in (GymEnv, GymWrapper):
        return None
    if getattr(env, "from_pixels", False) or getattr(env, "frame_skip", 1) != 1:
        return None
    inner = env._env
    return inner if _has_array_observations(inner) else None


def _has_array_observations(env: gym.Env) -> bool:
    return isinstance(env.observation_space, gym.spaces.Box)


def observation_dtype(space: gym.spaces.Box, policy) -> np.dtype:
    """The dtype the fast path hands observations to ``policy`` in.

    Floating observations take the dtype of the policy's floating parameters, as
    TorchRL's ``DoubleToFloat`` would do for a float32 policy on a float64 env
    (MuJoCo's): the loop's observation buffer has that dtype, so each step's
    observations are cast as they are stored, at no extra cost. Other
    observations, and policies without parameters, keep the env's dtype.
    """
    dtype = parameter_dtype(policy)
    if dtype is None or not np.issubdtype(space.dtype, np.floating):
        return space.dtype
    return torch.empty(0, dtype=dtype).numpy().dtype


def gym_action_adapter(
    space: gym.Space, env_name: str, *, as_array: bool = False
) -> Callable[[torch.Tensor], Any]:
    """Turns a policy's action batch into what ``space`` accepts, per slot.

    Discrete actions may come as indices or as one-hot/logit rows (TorchRL's
    ``GymEnv`` encodes them one-hot); a row is reduced with ``argmax``. They
    come as a list, or with ``as_array`` (a vector env's batch) a numpy array.
    """
    if isinstance(space, gym.spaces.Discrete):
        n, start = int(space.n), int(space.start)

        def discrete(actions: torch.Tensor) -> list[int]:
            if actions.dim() == 2 and actions.shape[1] == n and n > 1:
                actions = actions.argmax(dim=1)
            elif actions.numel() == actions.shape[0]:
                actions = actions.reshape(-1)
            else:
                raise ActionMismatchError(
                    f"policy returned actions of shape {tuple(actions.shape)}; env {env_name!r} "
                    f"has {space}: expected shape ({actions.shape[0]},) of indices or "
                    f"({actions.shape[0]}, {n}) one-hot/logits"
                )
            if actions.is_floating_point() and actions.dim() == 1 and not _integral(actions):
                raise ActionMismatchError(
                    f"policy returned non-integer actions (dtype {actions.dtype}) "
                    f"for env {env_name!r} with {space}"
                )
            actions = actions.long()
            if start:
                actions = actions + start
            return actions.numpy() if as_array else actions.tolist()

        return discrete
    if isinstance(space, gym.spaces.Box):
        shape, dtype = tuple(space.shape), space.dtype

        def box(actions: torch.Tensor) -> np.ndarray:
            if tuple(actions.shape[1:]) != shape:
                raise ActionMismatchError(
                    f"policy returned actions of shape {tuple(actions.shape)} "
                    f"(per env {tuple(actions.shape[1:])}); env {env_name!r} expects "
                    f"per-env shape {shape} ({space})"
                )
            if not (actions.is_floating_point() or np.issubdtype(dtype, np.integer)):
                raise ActionMismatchError(
                    f"policy returned actions of dtype {actions.dtype}; env {env_name!r} "
                    f"expects {dtype} ({space})"
                )
            return actions.numpy().astype(dtype, copy=False)

        return box
    shape = tuple(space.shape or ())

    def other(actions: torch.Tensor) -> np.ndarray:
        if tuple(actions.shape[1:]) != shape:
            raise ActionMismatchError(
                f"policy returned actions of shape {tuple(actions.shape)}; env {env_name!r} "
                f"expects per-env shape {shape} ({space})"
            )
        return actions.numpy().astype(space.dtype, copy=False)

    return other


def _integral(t: torch.Tensor) -> bool:
    return bool((t == t.round()).all())


def make_rollout(
    factory: Callable[[], Any],
    first_env,
    policy,
    *,
    batch_size: int,
    max_steps: int | None,
    device: torch.device,
    fast_path: bool = True,
    info_keys=(),
    record_trajectories: bool = False,
    reward_keys=None,
):
    """The rollout loop that fits ``first_env`` (built by ``factory``) and ``policy``.

    ``record_trajectories`` (TorchRL's ``metrics_fn``) takes the TorchRL loop,
    which has every step as a TensorDict already; the fast path stays lean.
    """
    if isinstance(first_env, VectorEnvSpaces):
        if record_trajectories:
            raise TypeError(
                f"metrics_fn (TorchRL's, on every step) needs single envs; env "
                f"{first_env.name!r} is a native vector env: use episode_metrics_fn"
            )
        return vector_rollout(
            first_env,
            policy,
            batch_size=batch_size,
            max_steps=max_steps,
            device=device,
            info_keys=info_keys,
        )
    gym_env = None
    make_gym_env = factory
    if record_trajectories:
        pass
    elif isinstance(first_env, gym.Env) and _has_array_observations(first_env):
        gym_env = first_env
    elif fast_path and isinstance(first_env, EnvBase):
        gym_env = unwrap_bare_gym_env(first_env)
        if gym_env is not None:
            make_gym_env = _UnwrappedGymFactory(factory)

    if gym_env is not None:
        to_action = observation_to_action(policy)
        adapt = gym_action_adapter(
            gym_env.action_space, gym_env.spec.id if gym_env.spec else _name(factory)
        )

        def act(obs: np.ndarray):
            return adapt(to_action(torch.from_numpy(obs).to(device)).cpu())

        return GymnasiumRollout(
            make_gym_env,
            gym_env,
            act,
            batch_size=batch_size,
            max_steps=max_steps,
            info_keys=info_keys,
            obs_dtype=observation_dtype(gym_env.observation_space, policy),
        )

    if isinstance(first_env, gym.Env):  # dict/discrete observations: let TorchRL map them
        first_env = GymWrapper(first_env)
        factory = _WrappedGymFactory(factory)
    obs_keys = list(first_env.observation_spec.keys(True, True))
    to_action = tensordict_to_action(
        policy, first_env.action_key, obs_keys[0] if len(obs_keys) == 1 else None
    )

    def act_td(td):
        return to_action(td.to(device)).cpu()

    return TorchRLRollout(
        factory,
        first_env,
        act_td,
        batch_size=batch_size,
        max_steps=max_steps,
        info_keys=info_keys,
        record_trajectories=record_trajectories,
        reward_keys=None
        if reward_keys is None
        else [_under_next(k) for k in _key_list(reward_keys)],
    )


def _key_list(keys) -> list:
    """TorchRL's key argument: one key (a str or a tuple of str) or a list of keys."""
    if isinstance(keys, str) or (isinstance(keys, tuple) and all(isinstance(k, str) for k in keys)):
        return [keys]
    return list(keys)


def _under_next(key):
    """A step key as read from the ``"next"`` TensorDict: ``("next", "reward")`` -> ``"reward"``."""
    if isinstance(key, tuple) and key and key[0] == "next":
        return key[1:] if len(key) > 2 else key[1]
    return key


@dataclass
class _UnwrappedGymFactory:
    factory: Callable[[], Any]

    def __call__(self) -> gym.Env:
        return self.factory()._env


@dataclass
class _WrappedGymFactory:
    factory: Callable[[], Any]

    def __call__(self):
        return GymWrapper(self.factory())


def check_action(rollout, env_name: str) -> None:
    """Run the policy once on the first env's reset observation (raises on a mismatch)."""
    if isinstance(rollout, VectorRollout):
        spaces = rollout.spaces
        obs = np.repeat(spaces.first_observation[None], rollout.batch_size, axis=0)
        actions = rollout._act(obs.astype(rollout._obs_dtype or obs.dtype, copy=False))
        if isinstance(spaces.action_space, gym.spaces.Discrete):
            start, n = int(spaces.action_space.start), int(spaces.action_space.n)
            bad = actions[(actions < start) | (actions >= start + n)]
            if len(bad):
                raise ActionMismatchError(
                    f"policy returned action {bad[0]} outside env {env_name!r}'s "
                    f"{spaces.action_space}"
                )
        return
    if isinstance(rollout, GymnasiumRollout):
        env = rollout._envs[0]
        obs, _ = env.reset(seed=0)
        rollout._obs[:] = obs
        actions = rollout._act(rollout._obs)  # the adapter checks shape and dtype
        if isinstance(env.action_space, gym.spaces.Discrete):
            bad = [a for a in actions if not env.action_space.contains(a)]
            if bad:
                raise ActionMismatchError(
                    f"policy returned action {bad[0]} outside env {env_name!r}'s {env.action_space}"
                )
        return
    env = rollout._envs[0]
    td = env.reset().select(*rollout._observation_keys)
    batch = torch.stack([td] * rollout.batch_size)
    actions = rollout._act(batch)
    spec = env.action_spec
    if tuple(actions.shape[1:]) != tuple(spec.shape):
        raise ActionMismatchError(
            f"policy returned actions of shape {tuple(actions.shape)} (per env "
            f"{tuple(actions.shape[1:])}); env {env_name!r} expects per-env shape "
            f"{tuple(spec.shape)} ({type(spec).__name__}, dtype {spec.dtype})"
        )
    if actions.dtype != spec.dtype and not (
        actions.is_floating_point() and spec.dtype.is_floating_point
    ):
        raise ActionMismatchError(
            f"policy returned actions of dtype {actions.dtype}; env {env_name!r} expects {spec.dtype}"
        )


# --- Native vector envs ------------------------------------------------------------------

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
    """A user's callable taking ``num_envs`` (and ``seed``, if it has one)."""

    factory: Callable[..., Any]

    @property
    def seeds_at_creation(self) -> bool:  # type: ignore[override]
        return _takes(self.factory, "seed")

    def make(self, num_envs: int, seed: int, max_steps: int | None = None):
        if self.seeds_at_creation:
            return self.factory(num_envs=num_envs, seed=seed)
        return self.factory(num_envs=num_envs)

    def __str__(self) -> str:
        return _name(self.factory)


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


def _no_video(source: VectorSource, render_mode: str | None) -> VectorSource:
    if render_mode is not None:
        raise ValueError(
            f"record_video needs single envs; env {str(source)!r} is a native vector env"
        )
    return source


def _takes(fn: Callable, name: str) -> bool:
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


def vector_rollout(
    spaces: VectorEnvSpaces,
    policy,
    *,
    batch_size: int,
    max_steps: int | None,
    device: torch.device,
    info_keys=(),
) -> VectorRollout:
    """The loop for a native vector env: one policy call per step on the whole batch."""
    to_action = observation_to_action(policy)
    adapt = gym_action_adapter(spaces.action_space, spaces.name, as_array=True)

    if device.type == "cpu":

        def act(obs: np.ndarray) -> np.ndarray:
            return adapt(to_action(torch.from_numpy(obs)))

    else:

        def act(obs: np.ndarray) -> np.ndarray:
            return adapt(to_action(torch.from_numpy(obs).to(device)).cpu())

    source = spaces.source
    applied = source.applies_max_steps and max_steps is not None
    rollout = VectorRollout(
        partial(source.make, max_steps=max_steps) if applied else source.make,
        act,
        batch_size=batch_size,
        max_steps=None if applied else max_steps,
        seeds_at_creation=source.seeds_at_creation,
        autoreset=spaces.autoreset,
        info_keys=info_keys,
        obs_dtype=observation_dtype(spaces.observation_space, policy),
    )
    rollout.spaces = spaces
    return rollout
