"""Live envs (``Evaluator(env_instance, ...)``) turned into factories of single-env copies.

Every worker runs its own copies of the env, one per env slot, so a live
instance is serialized once on the driver (Ray's cloudpickle) and each copy is
unpickled from those bytes where it is needed. The user's instance itself is
never stepped, reset or closed, in-process included.

A batched TorchRL env (``SerialEnv``/``ParallelEnv``, possibly inside
``TransformedEnv``s) is evaluated as its sub-envs: each copy is one sub-env,
built from the batched env's own sub-env factory and kwargs, with clones of the
transforms wrapped around the batched env. ray_eval batches copies itself, and
its slot loop then counts finished episodes per sub-env, runs exactly
``num_trajectories`` of them with planned seeds, and favours no short episode.
The batched env is never pickled: pickling a ``ParallelEnv`` closes it and its
worker processes cannot travel anyway. Other batched envs (``batch_size=[N]``:
VMAS, ``GymEnv(..., num_envs=N)``, a user's ``EnvBase``) are copied whole, like
any live env, and each worker steps its copy as one batch (``rollout.batched_loop``).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import ray

from ray_eval.backends.pickling import register_user_modules, unpicklable_parts
from ray_eval.rollout.torchrl_env import is_torchrl_env

if TYPE_CHECKING:
    from torchrl.envs import EnvBase
    from torchrl.envs.batched_envs import BatchedEnvBase

# TorchRL is imported where a TorchRL env is at hand: the workers unpickle this module's
# env copies, and one evaluating a gymnasium env need not import TorchRL (see torchrl_env).


def is_env_instance(obj: Any) -> bool:
    return isinstance(obj, gym.Env) or is_torchrl_env(obj)


def instance_factory(env: gym.Env | EnvBase) -> Callable[[], Any]:
    """A picklable zero-argument factory of single-env copies of the live ``env``.

    Raises ``TypeError`` when the env cannot be serialized (naming the part that
    cannot), for a multi-task batched env (sub-envs that differ), and for a
    batched env that is not a ``SerialEnv``/``ParallelEnv``.
    """
    kind = type(env).__name__
    if is_torchrl_env(env):
        from torchrl.envs.batched_envs import BatchedEnvBase

        transforms, base = _peel_transforms(env)
        if isinstance(base, BatchedEnvBase):
            recipe = _sub_env_recipe(base, transforms, kind)
            return EnvCopy(_serialize(recipe, kind), f"sub-env of a live {kind}")
        # Any other env, batched ones included (VMAS, GymEnv(..., num_envs=N), a user's
        # EnvBase with a batch): a copy of the whole env, stepped as one batch per worker.
        # One that cannot be pickled (GymEnv's num_envs batch holds subprocesses) is
        # rebuilt from the arguments TorchRL's wrapper kept, with clones of its transforms.
        try:
            return EnvCopy(_serialize(env, kind), f"copy of a live {kind}")
        except TypeError:
            recipe = _rebuild_recipe(env)
            if recipe is None:
                raise
            return EnvCopy(_serialize(recipe, kind), f"rebuilt copy of a live {kind}")
    return EnvCopy(_serialize(env, kind), f"copy of a live {kind}")


@dataclass
class SubEnv:
    """One sub-env of a batched env: its factory, kwargs, and the transforms
    (innermost first) that wrapped the batched env."""

    create_env_fn: Callable[..., EnvBase]
    create_env_kwargs: dict = field(default_factory=dict)
    transforms: list = field(default_factory=list)

    def __call__(self) -> EnvBase:
        from torchrl.envs import TransformedEnv

        env = self.create_env_fn(**self.create_env_kwargs)
        for transform in self.transforms:
            if isinstance(env, TransformedEnv):  # what TorchRL would unwrap to, without its warning
                env.append_transform(transform)
            else:
                env = TransformedEnv(env, transform)
        return env


@dataclass(repr=False)
class EnvCopy:
    """Builds one copy of a live env from its pickled bytes (a new copy per call)."""

    blob: bytes
    description: str

    def __call__(self):
        try:
            made = pickle.loads(self.blob)
        except Exception as error:
            raise TypeError(
                f"could not rebuild a {self.description} here: {type(error).__name__}: "
                f"{error}. Pass a zero-argument factory that builds the env instead"
            ) from error
        return made() if isinstance(made, SubEnv) else made

    def __repr__(self) -> str:
        return f"EnvCopy({self.description})"

    __str__ = __repr__


def _peel_transforms(env: EnvBase) -> tuple[list, EnvBase]:
    """(clones of the transforms, innermost first; the innermost base env)."""
    from torchrl.envs import TransformedEnv

    transforms = []
    while isinstance(env, TransformedEnv):
        # A clone is detached from its env: pickling the transform itself would
        # pickle its parent env too (a ParallelEnv closes when pickled).
        transforms.append(env.transform.clone())
        env = env.base_env
    return transforms[::-1], env


def _rebuild_recipe(env: EnvBase) -> SubEnv | None:
    """How to build ``env`` again: its wrapper's class and constructor arguments (TorchRL's
    ``_constructor_kwargs``), then clones of the transforms around it; ``None`` if unknown."""
    transforms, base = _peel_transforms(env)
    kwargs = getattr(base, "_constructor_kwargs", None)
    if not isinstance(kwargs, dict):
        return None
    own = _added_by_constructor(type(base), kwargs)
    return SubEnv(type(base), dict(kwargs), [t for t in transforms if not isinstance(t, own)])


def _added_by_constructor(cls: type, kwargs: dict) -> tuple[type, ...]:
    """Transforms the wrapper's constructor adds itself (``GymEnv(num_envs=N)``'s)."""
    if kwargs.get("num_envs", 0) and getattr(cls, "__name__", "") in ("GymEnv", "GymWrapper"):
        from torchrl.envs import VecGymEnvTransform

        return (VecGymEnvTransform,)
    return ()


def _sub_env_recipe(batched: BatchedEnvBase, transforms: list, kind: str) -> SubEnv:
    fns = list(batched.create_env_fn)
    kwargs = [dict(k or {}) for k in batched.create_env_kwargs]
    if not _all_same(list(zip(fns, kwargs))):
        raise TypeError(
            f"env is a live multi-task {kind}: its {len(fns)} sub-envs are built by "
            f"different factories or kwargs. ray_eval evaluates one kind of env per suite "
            f"member: pass a suite {{name: factory, ...}} with one member per task"
        )
    return SubEnv(fns[0], kwargs[0], transforms)


def _all_same(items: list) -> bool:
    first = items[0]
    try:
        if all(item[0] is first[0] and item[1] == first[1] for item in items):
            return True
    except Exception:  # kwargs that do not compare (tensors): compare their bytes
        pass
    try:
        blob = ray.cloudpickle.dumps(first)
        return all(ray.cloudpickle.dumps(item) == blob for item in items[1:])
    except Exception:
        return False


def _serialize(obj: Any, kind: str) -> bytes:
    register_user_modules(obj)
    try:
        return ray.cloudpickle.dumps(obj)
    except Exception as error:
        culprits = unpicklable_parts(obj, "env")
        raise TypeError(
            f"env is a live {kind} that cannot be serialized to build its copies on the "
            f"workers: {type(error).__name__}: {error}"
            + (f"; not picklable: {', '.join(culprits)}" if culprits else "")
            + ". Pass a zero-argument factory that builds the env instead, e.g. "
            f"functools.partial({kind}, ...)"
        ) from None
