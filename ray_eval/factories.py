"""Small importable env and policy factories for configs.

Configs name factories by import path (``module:function``) because each Ray
worker builds its own env and policy: what it builds must be importable there.
The built-in policies are sized from the env a worker builds: ``MLPPolicy``
(vector observations) and ``NatureCNNPolicy`` (stacked Atari frames). A trainer
that makes its policy with ``MLPPolicy(...)(env)`` or ``NatureCNNPolicy(...)(env)``
writes checkpoints whose keys fit the config's policy exactly.

Env factories for the heavy workloads: ``AtariEnv`` / ``atari_env`` (ALE with
gymnasium's standard DQN preprocessing), ``atari_torchrl_env`` (the same frames
stacked by TorchRL transforms) and ``mujoco_env`` (a MuJoCo env that can render
on a machine without a display).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
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


class _ActionHead(nn.Module):
    """Turns a network's output rows into actions that fit the env's action space:
    continuous actions squashed into finite bounds, greedy indices or one-hot rows."""

    def __init__(self, layout: ActionLayout) -> None:
        super().__init__()
        self.layout = layout
        self._bounds: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _to_action(self, out: torch.Tensor) -> torch.Tensor:
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


class MLPActor(_ActionHead):
    """Observation batch -> action batch: an MLP with a head that fits the action space."""

    def __init__(
        self, obs_size: int, layout: ActionLayout, hidden_sizes: tuple[int, ...], activation: str
    ) -> None:
        super().__init__(layout)
        layers: list[nn.Module] = []
        width = obs_size
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), ACTIVATIONS[activation]()]
            width = size
        layers.append(nn.Linear(width, layout.size))
        self.net = nn.Sequential(*layers)

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self._to_action(self.net(observation.flatten(1).to(torch.float32)))


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


class NatureCNN(nn.Module):
    """The Nature-DQN network: stacked frames -> one output per action.

    Three conv layers (32 8x8/4, 64 4x4/2, 64 3x3/1), a 512-unit layer and a
    linear head, ReLU between them. Input: a ``(batch, frames, height, width)``
    batch of uint8 frames (84x84 by default), scaled by 1/255 here. As a plain
    policy on a discrete-action gymnasium env its output rows are greedy
    Q-values/logits: ray_eval takes their ``argmax``.
    """

    def __init__(self, num_actions: int, in_channels: int = 4, screen_size: int = 84) -> None:
        super().__init__()
        side = _conv_out(_conv_out(_conv_out(screen_size, 8, 4), 4, 2), 3, 1)
        if side < 1:
            raise ValueError(f"screen_size {screen_size} is too small for the Nature CNN")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(64 * side * side, 512), nn.ReLU(), nn.Linear(512, num_actions)
        )

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        dtype = self.head[0].weight.dtype
        return self.head(self.features(frames.to(dtype) / 255.0))


def _conv_out(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


class CNNActor(_ActionHead):
    """Frame stack batch -> action batch: a ``NatureCNN`` with a head that fits the
    action space (greedy indices for gymnasium, one-hot rows for TorchRL's ``GymEnv``)."""

    def __init__(self, frames_shape: tuple[int, int, int], layout: ActionLayout) -> None:
        super().__init__(layout)
        channels, height, width = frames_shape
        if height != width:
            raise ValueError(f"the Nature CNN takes square frames, got {height}x{width}")
        self.net = NatureCNN(layout.size, in_channels=channels, screen_size=height)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self._to_action(self.net(frames))


@dataclass(frozen=True)
class NatureCNNPolicy:
    """A policy factory: ``NatureCNNPolicy()(env)`` builds a ``TensorDictModule`` of a
    ``NatureCNN`` sized from the env's ``(frames, height, width)`` observations.

    It reads the env's one observation key (``"observation"`` for a gymnasium
    env) and writes its action key. Weights come from ``init_seed`` alone, so
    every worker (and the trainer) builds the same initial policy; save
    ``policy.state_dict()`` for checkpoints that fit ``policy: {type: nature_cnn}``.
    """

    init_seed: int = 0

    def __call__(self, env: Any) -> TensorDictModule:
        frames_shape, obs_key, layout, action_key = _image_env_layout(env)
        if layout.kind == "continuous":
            raise TypeError(
                "the Nature CNN policy is for discrete actions; the env's action space is "
                "continuous: use a policy factory (policy.type: factory)"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            actor = CNNActor(frames_shape, layout)
        return TensorDictModule(actor, in_keys=[obs_key], out_keys=[action_key])


def nature_cnn_policy(env: Any, init_seed: int = 0) -> TensorDictModule:
    """The Nature CNN as a plain policy factory
    (``policy.factory: ray_eval.factories:nature_cnn_policy``)."""
    return NatureCNNPolicy(init_seed)(env)


def _image_env_layout(env: Any) -> tuple[tuple[int, int, int], Any, ActionLayout, Any]:
    """Frame-stack shape, observation key, action layout and action key of an env
    with ``(frames, height, width)`` observations."""
    if isinstance(env, gym.Env):
        space = env.observation_space
        if not isinstance(space, gym.spaces.Box) or len(space.shape) != 3:
            raise TypeError(
                f"the Nature CNN policy needs (frames, height, width) observations, the env has "
                f"{space}; stack frames with AtariEnv (ray_eval.factories) or "
                f"gymnasium's FrameStackObservation"
            )
        return tuple(space.shape), "observation", _gym_action_layout(env.action_space), "action"
    from torchrl.envs import EnvBase

    if not isinstance(env, EnvBase):
        raise TypeError(f"expected a gymnasium.Env or a TorchRL EnvBase, got {type(env).__name__}")
    spec = env.observation_spec
    keys = [k for k in spec.keys(True, True) if len(spec[k].shape) == 3]
    if len(keys) != 1:
        shapes = {k: tuple(spec[k].shape) for k in spec.keys(True, True)}
        raise TypeError(
            f"the Nature CNN policy needs exactly one (frames, height, width) observation; "
            f"the env has {shapes}: use a policy factory (policy.type: factory)"
        )
    return (
        tuple(spec[keys[0]].shape),
        keys[0],
        _torchrl_action_layout(env.action_spec),
        env.action_key,
    )


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


def _register_ale() -> None:
    try:
        import ale_py
    except ImportError:  # pragma: no cover - ale-py is in the 'envs' extra
        raise ImportError(
            "Atari envs need ale-py and opencv-python-headless: pip install 'ray_eval[envs]'"
        ) from None
    gym.register_envs(ale_py)


@dataclass(frozen=True)
class AtariEnv:
    """An ALE env with gymnasium's standard DQN preprocessing, as a picklable
    zero-argument factory: ``Evaluator(AtariEnv("ALE/Pong-v5"), ...)`` builds the env
    in each worker.

    ``gymnasium.make(env_id, frameskip=1)``, then ``AtariPreprocessing`` (up to
    ``noop_max`` no-ops at reset, ``frame_skip`` with the max of the last two
    frames, ``screen_size``-square grayscale) and a stack of ``frame_stack``
    frames: observations are ``(frame_stack, 84, 84)`` uint8, what ``NatureCNN``
    takes. ``repeat_action_probability`` (sticky actions) keeps the env id's
    default (0.25 for ``-v5``) unless given. ``render_mode="rgb_array"`` renders
    the full-size colour screen, for video. ``make_kwargs``: more arguments for
    ``gymnasium.make``.
    """

    env_id: str = "ALE/Pong-v5"
    frame_stack: int = 4
    frame_skip: int = 4
    screen_size: int = 84
    noop_max: int = 30
    terminal_on_life_loss: bool = False
    repeat_action_probability: float | None = None
    render_mode: str | None = None
    make_kwargs: tuple[tuple[str, Any], ...] = ()  # (name, value) pairs: keeps it hashable

    def __call__(self) -> gym.Env:
        """The gymnasium env (``FrameStackObservation``)."""
        from gymnasium.wrappers import FrameStackObservation

        return FrameStackObservation(self._preprocessed(), self.frame_stack)

    def torchrl_env(self):
        """The same env as a TorchRL env: a ``GymWrapper`` over the preprocessed ALE
        env, with TorchRL transforms for the channel axis and the frame stack
        (``UnsqueezeTransform``, ``CatFrames``). It runs on TorchRL's general rollout
        path; its ``"observation"`` is ``(frame_stack, 84, 84)`` uint8 and its actions
        are one-hot (TorchRL's default). (TorchRL's own ``Resize`` needs torchvision,
        which is not a dependency, so the resize and grayscale stay gymnasium's.)
        """
        from torchrl.envs import CatFrames, Compose, GymWrapper, TransformedEnv, UnsqueezeTransform

        transforms = Compose(
            UnsqueezeTransform(dim=-3, in_keys=["observation"]),
            CatFrames(N=self.frame_stack, dim=-3, in_keys=["observation"]),
        )
        return TransformedEnv(GymWrapper(self._preprocessed()), transforms)

    def _preprocessed(self) -> gym.Env:
        from gymnasium.wrappers import AtariPreprocessing

        _register_ale()
        kwargs = dict(self.make_kwargs)
        if self.repeat_action_probability is not None:
            kwargs["repeat_action_probability"] = self.repeat_action_probability
        # Frame skipping happens in AtariPreprocessing (with the max over the last two
        # frames), so the ALE env itself must not skip.
        env = gym.make(self.env_id, frameskip=1, render_mode=self.render_mode, **kwargs)
        return AtariPreprocessing(
            env,
            noop_max=self.noop_max,
            frame_skip=self.frame_skip,
            screen_size=self.screen_size,
            terminal_on_life_loss=self.terminal_on_life_loss,
            grayscale_obs=True,  # (84, 84) frames, no channel axis: the stack makes the channels
            scale_obs=False,
        )

    def __str__(self) -> str:
        return self.env_id


def _atari(env_id: str, options: dict[str, Any]) -> AtariEnv:
    """``AtariEnv`` of ``options``; the ones it does not name go to ``gymnasium.make``."""
    names = {f.name for f in fields(AtariEnv)}
    make_kwargs = tuple((k, v) for k, v in options.items() if k not in names)
    return AtariEnv(
        env_id, **{k: v for k, v in options.items() if k in names}, make_kwargs=make_kwargs
    )


def atari_env(env_id: str = "ALE/Pong-v5", **options: Any) -> gym.Env:
    """``AtariEnv(env_id, **options)()``: the preprocessed, frame-stacked ALE env, for
    configs (``env.factory: ray_eval.factories:atari_env`` with ``env.kwargs``)."""
    return _atari(env_id, options)()


def atari_torchrl_env(env_id: str = "ALE/Pong-v5", **options: Any):
    """``AtariEnv(env_id, **options).torchrl_env()``: the same env as a TorchRL env."""
    return _atari(env_id, options).torchrl_env()
