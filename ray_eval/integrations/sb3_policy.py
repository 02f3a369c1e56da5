"""A stable-baselines3 policy as ray_eval's workers run it, and its eval env.

``SB3Actor`` maps an observation batch to the action batch that SB3's
``policy.predict(obs, deterministic=...)`` returns: SB3's own preprocessing,
action clipping (``Box`` actions) or unscaling (squashed policies, e.g. SAC),
and ``VecNormalize``'s observation normalization with the statistics it holds
(frozen: evaluation never updates them). The statistics are parameters of the
module, so they travel to the workers with the policy's weights, in the same
object-store copy.

The workers step the gymnasium env inside the callback's ``DummyVecEnv``
(copied, never the instance itself). Observations that are not arrays
(``Discrete``, ``Dict``) are carried as a flat float64 array
(``ArrayObservation``) and given back to SB3 in their own form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from torch import nn


class ArrayObservation(gym.ObservationWrapper):
    """Discrete or Dict (of Box, Discrete, MultiBinary, MultiDiscrete) observations as one
    flat float64 array; ``unflatten_batch`` restores them exactly."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.original_space = env.observation_space
        size = sum(int(np.prod(s.shape)) for s in _leaves(self.original_space).values())
        self.observation_space = spaces.Box(-np.inf, np.inf, (size,), np.float64)

    def observation(self, observation) -> np.ndarray:
        if isinstance(self.original_space, spaces.Dict):
            parts = [
                np.asarray(observation[key], np.float64).ravel() for key in self.original_space
            ]
            return np.concatenate(parts)
        return np.asarray(observation, np.float64).reshape(1)


def _leaves(space: spaces.Space) -> dict[str, spaces.Space]:
    if isinstance(space, spaces.Dict):
        out = {}
        for key, sub in space.spaces.items():
            if not isinstance(
                sub, spaces.Box | spaces.Discrete | spaces.MultiBinary | spaces.MultiDiscrete
            ):
                raise TypeError(
                    f"observation key {key!r} has a {type(sub).__name__} space; ray_eval.sb3 "
                    f"evaluates Dict observations of Box, Discrete, MultiBinary, MultiDiscrete"
                )
            out[key] = sub
        return out
    return {"": space}


def unflatten_batch(space: spaces.Space, flat: np.ndarray) -> Any:
    """A batch of ``ArrayObservation`` rows back in ``space``'s own form."""
    batch = flat.shape[0]
    if not isinstance(space, spaces.Dict):
        return flat[:, 0].astype(space.dtype)
    out, start = {}, 0
    for key, sub in _leaves(space).items():
        size = int(np.prod(sub.shape))
        out[key] = flat[:, start : start + size].reshape(batch, *sub.shape).astype(sub.dtype)
        start += size
    return out


def needs_array_observation(space: spaces.Space) -> bool:
    return not isinstance(space, spaces.Box)


class SB3Actor(nn.Module):
    """``obs batch -> action batch`` as ``policy.predict(obs, deterministic)`` gives it.

    ``obs_mean``/``obs_var`` (float64, ``VecNormalize``'s ``obs_rms``) come first
    among the parameters: ray_eval hands observations to a policy in its first
    parameter's dtype, and SB3 normalizes unrounded observations in float64.
    """

    def __init__(
        self,
        policy: nn.Module,
        *,
        deterministic: bool = True,
        normalization: ObsNormalization | None = None,
        original_space: spaces.Space | None = None,
    ) -> None:
        super().__init__()
        shape = normalization.mean.shape if normalization is not None else (1,)
        self.obs_mean = nn.Parameter(torch.zeros(shape, dtype=torch.float64), requires_grad=False)
        self.obs_var = nn.Parameter(torch.ones(shape, dtype=torch.float64), requires_grad=False)
        self.normalize = normalization is not None
        if normalization is not None:
            self.clip_obs = float(normalization.clip_obs)
            self.epsilon = float(normalization.epsilon)
            with torch.no_grad():
                self.obs_mean.copy_(torch.as_tensor(normalization.mean))
                self.obs_var.copy_(torch.as_tensor(normalization.var))
        self.policy = policy
        self.deterministic = deterministic
        self.original_space = original_space

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        array = obs.detach().cpu().numpy()
        if self.original_space is not None:
            array = unflatten_batch(self.original_space, array)
        if self.normalize:
            mean, var = self.obs_mean.detach().numpy(), self.obs_var.detach().numpy()
            # VecNormalize.normalize_obs: float64 arithmetic, then float32
            array = np.clip(
                (array - mean) / np.sqrt(var + self.epsilon), -self.clip_obs, self.clip_obs
            ).astype(np.float32)
        actions, _ = self.policy.predict(array, deterministic=self.deterministic)
        return torch.as_tensor(actions)


@dataclass(frozen=True)
class ObsNormalization:
    """``VecNormalize``'s observation statistics and settings, as evaluated."""

    mean: np.ndarray
    var: np.ndarray
    clip_obs: float
    epsilon: float

    @classmethod
    def of(cls, vec_normalize) -> ObsNormalization | None:
        if vec_normalize is None or not vec_normalize.norm_obs:
            return None
        if isinstance(vec_normalize.obs_rms, dict):
            raise TypeError(
                "ray_eval.sb3 evaluates VecNormalize with array observations; this one "
                "normalizes Dict observations"
            )
        rms = vec_normalize.obs_rms
        return cls(
            np.array(rms.mean, np.float64),
            np.array(rms.var, np.float64),
            float(vec_normalize.clip_obs),
            float(vec_normalize.epsilon),
        )


@dataclass
class EvalEnvParts:
    """What the workers need of SB3's eval ``VecEnv``."""

    env: gym.Env  # the gymnasium env to copy on the workers (wrapped if need be)
    num_envs: int
    vec_normalize: Any  # the VecNormalize wrapper, or None
    original_space: spaces.Space | None  # set when observations travel flattened


def eval_env_parts(vec_env) -> EvalEnvParts:
    """Split SB3's eval ``VecEnv`` into a gymnasium env and its normalization.

    Supported: a ``DummyVecEnv`` (what ``EvalCallback`` wraps a plain env in),
    under ``VecNormalize`` and ``VecMonitor``. Other wrappers change what the
    policy sees in ways the workers do not reproduce: a ``TypeError`` names them.
    """
    from stable_baselines3.common.vec_env import (
        DummyVecEnv,
        VecEnvWrapper,
        VecMonitor,
        VecNormalize,
    )

    vec_normalize = None
    inner = vec_env
    while isinstance(inner, VecEnvWrapper):
        if isinstance(inner, VecNormalize):
            vec_normalize = inner
        elif not isinstance(inner, VecMonitor):
            raise TypeError(
                f"ray_eval.sb3.EvalCallback: eval_env is wrapped in {type(inner).__name__}, "
                f"which the Ray workers do not reproduce (VecNormalize and VecMonitor are "
                f"supported); move it into the gymnasium env, or use SB3's EvalCallback"
            )
        inner = inner.venv
    if not isinstance(inner, DummyVecEnv):
        raise TypeError(
            f"ray_eval.sb3.EvalCallback: eval_env is a {type(inner).__name__}; pass a "
            f"gymnasium env or a DummyVecEnv (the workers copy its env; a "
            f"{type(inner).__name__}'s envs live in other processes)"
        )
    env = inner.envs[0]
    original = env.observation_space if needs_array_observation(env.observation_space) else None
    if original is not None:
        _leaves(original)  # unsupported spaces fail here, at the callback's start
        env = ArrayObservation(env)
    return EvalEnvParts(env, inner.num_envs, vec_normalize, original)


def worker_actor(policy: nn.Module, parts: EvalEnvParts, deterministic: bool) -> SB3Actor:
    """A CPU copy of ``policy`` for the workers, rebuilt as SB3's ``BasePolicy.load`` does
    (a deep copy would drag the optimizer and the last step's autograd graph along)."""
    copied = type(policy)(**policy._get_constructor_parameters())
    copied.load_state_dict(policy.state_dict())
    copied.optimizer = None
    return SB3Actor(
        copied,
        deterministic=deterministic,
        normalization=ObsNormalization.of(parts.vec_normalize),
        original_space=parts.original_space,
    )


def actor_weights(policy: nn.Module, parts: EvalEnvParts) -> dict[str, Any]:
    """The weights of ``SB3Actor`` now: the policy's and the normalization statistics."""
    weights: dict[str, Any] = {f"policy.{k}": v for k, v in policy.state_dict().items()}
    norm = ObsNormalization.of(parts.vec_normalize)
    if norm is not None:
        weights["obs_mean"], weights["obs_var"] = norm.mean, norm.var
    else:
        weights["obs_mean"] = np.zeros(1, np.float64)
        weights["obs_var"] = np.ones(1, np.float64)
    return weights
