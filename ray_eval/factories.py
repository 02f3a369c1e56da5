"""Small importable env and policy factories for configs.

Configs name factories by import path (``module:function``) because each Ray
worker builds its own env and policy: what it builds must be importable there.
The built-in MLP policy is ``MLPPolicy``, sized from the env a worker builds;
a trainer that makes its policy with ``MLPPolicy(...)(env)`` writes
checkpoints whose keys fit the config's policy exactly.

``mujoco_env`` makes a MuJoCo env that can render on a machine without a display.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tensordict.nn import TensorDictModule
from torch import nn

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU}


@dataclass(frozen=True)
class ActionLayout:
    """What the policy's head produces for an env's action space."""

    kind: str  # "continuous" | "index" | "one_hot"
    size: int  # action dims, or the number of discrete actions
    shape: tuple[int, ...] = ()  # per-env action shape (continuous)
    low: tuple[float, ...] | None = None  # finite bounds: the output is squashed into them
    high: tuple[float, ...] | None = None
    dtype: torch.dtype = torch.float32


class MLPActor(nn.Module):
    """Observation batch -> action batch: an MLP with a head that fits the action space."""

    def __init__(
        self, obs_size: int, layout: ActionLayout, hidden_sizes: tuple[int, ...], activation: str
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = obs_size
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), ACTIVATIONS[activation]()]
            width = size
        layers.append(nn.Linear(width, layout.size))
        self.net = nn.Sequential(*layers)
        self.layout = layout
        self._bounds: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        out = self.net(observation.flatten(1).to(torch.float32))
        layout = self.layout
        if layout.kind == "continuous":
            if layout.low is not None:
                low, high = self._bounds_on(out.device)
                out = low + (torch.tanh(out) + 1) * 0.5 * (high - low)
            return out.reshape(out.shape[0], *layout.shape)
        index = out.argmax(dim=-1)
        if layout.kind == "one_hot":
            return nn.functional.one_hot(index, layout.size).to(layout.dtype)
        return index.to(layout.dtype)

    def _bounds_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Plain tensors (not buffers) so a state_dict holds only the learned weights.
        if device not in self._bounds:
            low = torch.tensor(self.layout.low, dtype=torch.float32, device=device)
            high = torch.tensor(self.layout.high, dtype=torch.float32, device=device)
            self._bounds[device] = (low, high)
        return self._bounds[device]


@dataclass(frozen=True)
class MLPPolicy:
    """A policy factory: ``MLPPolicy((64, 64))(env)`` builds a ``TensorDictModule``.

    Its weights are initialized from ``init_seed`` alone, so every worker (and
    the trainer) builds the same initial policy.
    """

    hidden_sizes: tuple[int, ...] = (64, 64)
    activation: str = "tanh"
    init_seed: int = 0

    def __call__(self, env: Any) -> TensorDictModule:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )
        obs_size, layout, action_key = _env_layout(env)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            actor = MLPActor(obs_size, layout, tuple(self.hidden_sizes), self.activation)
        return TensorDictModule(actor, in_keys=["observation"], out_keys=[action_key])


def mlp_policy(
    env: Any, hidden_sizes: tuple[int, ...] = (64, 64), activation: str = "tanh", init_seed: int = 0
) -> TensorDictModule:
    """The built-in MLP as a plain policy factory (``policy.factory: ray_eval.factories:mlp_policy``)."""
    return MLPPolicy(tuple(hidden_sizes), activation, init_seed)(env)


def _env_layout(env: Any) -> tuple[int, ActionLayout, Any]:
    """Observation size, action layout and action key of a gymnasium or TorchRL env."""
    if isinstance(env, gym.Env):
        space = env.observation_space
        if not isinstance(space, gym.spaces.Box):
            raise TypeError(
                f"the built-in MLP policy needs a Box observation space, the env has {space}; "
                f"use a policy factory (policy.type: factory)"
            )
        return int(np.prod(space.shape)), _gym_action_layout(env.action_space), "action"
    from torchrl.envs import EnvBase

    if not isinstance(env, EnvBase):
        raise TypeError(f"expected a gymnasium.Env or a TorchRL EnvBase, got {type(env).__name__}")
    spec = env.observation_spec
    if "observation" not in spec.keys():
        raise TypeError(
            f"the built-in MLP policy reads the 'observation' key; the env's observation keys "
            f"are {list(spec.keys(True, True))}: use a policy factory (policy.type: factory)"
        )
    obs_shape = spec["observation"].shape
    return (
        int(np.prod(obs_shape)) if obs_shape else 1,
        _torchrl_action_layout(env.action_spec),
        env.action_key,
    )


def _gym_action_layout(space: gym.Space) -> ActionLayout:
    if isinstance(space, gym.spaces.Discrete):
        return ActionLayout("index", int(space.n), dtype=torch.int64)
    if isinstance(space, gym.spaces.Box):
        return _continuous(tuple(space.shape), space.low, space.high)
    raise TypeError(
        f"the built-in MLP policy supports Box and Discrete action spaces, got {space}; "
        f"use a policy factory (policy.type: factory)"
    )


def _torchrl_action_layout(spec) -> ActionLayout:
    from torchrl.data import Bounded, Categorical, OneHot

    if isinstance(spec, OneHot):
        return ActionLayout("one_hot", int(spec.shape[-1]), dtype=spec.dtype)
    if isinstance(spec, Categorical):
        return ActionLayout("index", int(spec.space.n), dtype=spec.dtype)
    shape = tuple(spec.shape)
    if isinstance(spec, Bounded):
        return _continuous(shape, spec.space.low.cpu().numpy(), spec.space.high.cpu().numpy())
    return _continuous(shape, None, None)


def _continuous(shape: tuple[int, ...], low, high) -> ActionLayout:
    size = int(np.prod(shape)) if shape else 1
    if low is None or high is None:
        return ActionLayout("continuous", size, shape)
    low = np.broadcast_to(np.asarray(low, dtype=np.float64), shape).reshape(-1)
    high = np.broadcast_to(np.asarray(high, dtype=np.float64), shape).reshape(-1)
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        return ActionLayout("continuous", size, shape)
    return ActionLayout("continuous", size, shape, tuple(low.tolist()), tuple(high.tolist()))


def gym_env_with_transforms(
    env_id: str,
    *,
    reward_scale: float = 1.0,
    max_episode_steps: int | None = None,
):
    """A TorchRL ``GymEnv`` with transforms: float observations, scaled rewards, a step cap.

    An example of a TorchRL env factory for configs (``env.factory``); it runs
    on TorchRL's general rollout path, transforms included.
    """
    from torchrl.envs import (
        Compose,
        DoubleToFloat,
        GymEnv,
        RewardScaling,
        StepCounter,
        TransformedEnv,
    )

    if not (
        isinstance(reward_scale, int | float) and math.isfinite(reward_scale) and reward_scale > 0
    ):
        raise ValueError(f"reward_scale must be a positive number, got {reward_scale!r}")
    transforms = [DoubleToFloat(), RewardScaling(loc=0.0, scale=float(reward_scale))]
    if max_episode_steps is not None:
        transforms.append(StepCounter(max_steps=int(max_episode_steps)))
    return TransformedEnv(GymEnv(env_id), Compose(*transforms))


def headless_mujoco_rendering() -> None:
    """Let MuJoCo render without a display: ``MUJOCO_GL=egl`` unless it is set already.

    Gymnasium's MuJoCo renderer tries GLFW first when ``MUJOCO_GL`` is unset, and
    GLFW needs a display; EGL (Mesa's ``libegl1``/``libegl-mesa0``, or a GPU
    driver) renders off-screen. Call it in the process that renders (a Ray
    worker) before the env is made; an explicit ``MUJOCO_GL`` (``osmesa``,
    ``glfw``) is left alone.
    """
    if "MUJOCO_GL" in os.environ:
        return
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return
    os.environ["MUJOCO_GL"] = "egl"


def mujoco_env(
    env_id: str = "HalfCheetah-v5", *, render_mode: str | None = None, **kwargs: Any
) -> gym.Env:
    """``gymnasium.make(env_id, ...)`` for a MuJoCo env, able to render where there is
    no display (``headless_mujoco_rendering``). Observations are float64; ray_eval
    hands them to a float32 policy as float32."""
    if render_mode is not None:
        headless_mujoco_rendering()
    return gym.make(env_id, render_mode=render_mode, **kwargs)
