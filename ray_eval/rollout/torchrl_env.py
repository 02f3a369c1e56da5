"""What the TorchRL loop must know of an ``EnvBase`` it did not write: how to
seed it, and where a wrapped gymnasium env's ``info`` goes.

Seeding. ``env.reset(seed=s)`` passes ``seed`` on to the env's ``_reset``,
which only some envs use: TorchRL's gymnasium wrappers hand it to gymnasium's
``reset``, custom envs may take a ``seed`` parameter. Most TorchRL-native envs
(mock envs, custom ``EnvBase`` subclasses, other simulators' wrappers) swallow
it in ``**kwargs`` or reject it; TorchRL seeds those with ``env.set_seed(s)``
before ``reset()``. Which of the two an env needs is read once, from the env's
classes, when the loop is built, not found out by failing episodes.

Info. TorchRL's gymnasium wrappers drop ``info`` unless an info-dict reader is
set. ``attach_info_tap`` adds a reader that writes nothing and keeps the last
``info`` dict, so the loop reads ``is_success`` and ``info_keys`` from it as
the gymnasium loop does (keys in the step TensorDict take precedence).

TorchRL is imported only where a TorchRL object is at hand: ``is_torchrl_env``
answers False without importing it, so a worker that evaluates a gymnasium env
never pays TorchRL's import (about 1 s of its start-up).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from tensordict import TensorDictBase

if TYPE_CHECKING:
    from torchrl.envs import EnvBase

log = logging.getLogger("ray_eval")

SeededReset = Callable[["EnvBase", int], TensorDictBase]


def torchrl_loaded() -> bool:
    """Whether this process has imported TorchRL's envs. A TorchRL env, transform or
    policy cannot exist before that (their classes live there), so an object can be
    checked against TorchRL's classes without importing them."""
    return "torchrl.envs" in sys.modules


def is_torchrl(obj, name: str, module: str = "torchrl.envs") -> bool:
    """``isinstance(obj, module.name)`` for a TorchRL class, without importing TorchRL
    when it is not loaded (``obj`` cannot be one then)."""
    return torchrl_loaded() and isinstance(obj, getattr(importlib.import_module(module), name))


def is_torchrl_env(env) -> bool:
    """Whether ``env`` is a TorchRL ``EnvBase`` (without importing TorchRL)."""
    return is_torchrl(env, "EnvBase")


def base_env(env: EnvBase) -> EnvBase:
    """The env under all ``TransformedEnv`` layers."""
    from torchrl.envs import TransformedEnv

    while isinstance(env, TransformedEnv):
        env = env.base_env
    return env


def reset_takes_seed(env: EnvBase) -> bool:
    """Does ``env.reset(seed=...)`` reach code that seeds the env?

    True for TorchRL's gymnasium wrappers (they forward it to gymnasium's
    ``reset``) and for envs whose ``_reset`` has a ``seed`` parameter. A
    ``_reset(tensordict, **kwargs)`` that does not name it would silently ignore it.
    """
    from torchrl.envs import GymWrapper

    base = base_env(env)
    if isinstance(base, GymWrapper):
        return True
    try:
        return "seed" in inspect.signature(type(base)._reset).parameters
    except (TypeError, ValueError):
        return False


def seeded_reset(env: EnvBase) -> SeededReset:
    """A ``reset(env, seed)`` function that fits ``env`` (and its copies)."""
    return _reset_with_seed if reset_takes_seed(env) else SetSeedThenReset()


def _reset_with_seed(env: EnvBase, seed: int) -> TensorDictBase:
    return env.reset(seed=seed)


class SetSeedThenReset:
    """TorchRL's way: ``env.set_seed(seed)`` then ``env.reset()``.

    An env without ``_set_seed`` (it raises ``NotImplementedError``) cannot be
    seeded at all: it is then reset unseeded, with one warning.
    """

    def __init__(self) -> None:
        self.seedable = True

    def __call__(self, env: EnvBase, seed: int) -> TensorDictBase:
        if self.seedable:
            try:
                env.set_seed(int(seed))
            except NotImplementedError:
                self.seedable = False
                log.warning(
                    "%s implements no _set_seed: its episodes are not seeded, so an "
                    "evaluation's numbers are not reproducible",
                    type(base_env(env)).__name__,
                )
        return env.reset()


class InfoTap:
    """An info-dict reader for TorchRL's gymnasium wrappers: keeps the last ``info``."""

    def __init__(self) -> None:
        self.info: dict = {}

    def __call__(self, info: dict, tensordict: TensorDictBase) -> None:
        self.info = info
        return None  # the TensorDict is left as it is


def attach_info_tap(env: EnvBase) -> InfoTap | None:
    """An ``InfoTap`` on ``env``'s gymnasium-like base env (``None`` for other envs)."""
    from torchrl.envs.gym_like import GymLikeEnv

    base = base_env(env)
    if not isinstance(base, GymLikeEnv):
        return None
    tap = InfoTap()
    base.set_info_dict_reader(tap)
    return tap
