"""Env copies and a policy, turned into a rollout loop that calls the policy once per step.

Gymnasium envs with array observations take the vectorized fast path
(``GymnasiumRollout``); so does a bare TorchRL ``GymEnv`` or ``GymWrapper`` (the
tutorial's ``partial(GymEnv, "Pendulum-v1")``), whose wrapper adds nothing an
evaluation needs but about 0.3 ms per step. Every other TorchRL env, transforms
included, takes the general ``TorchRLRollout``. Native vector envs
(``rollout.vector_sources``) take ``VectorRollout``. Here too: the action check
that runs once when a worker starts. No Ray here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch
from tensordict import TensorDictBase

from ray_eval.errors import ActionMismatchError
from ray_eval.rollout.batched_loop import BatchedRollout, check_batch, is_batched_env
from ray_eval.rollout.env_keys import EnvKeys
from ray_eval.rollout.loops import GymnasiumRollout, TorchRLRollout
from ray_eval.rollout.policies import (
    is_tensordict_policy,
    observation_to_action,
    parameter_dtype,
    tensordict_to_action,
)
from ray_eval.rollout.torchrl_env import is_torchrl_env, torchrl_loaded
from ray_eval.rollout.vector_loop import VectorRollout
from ray_eval.rollout.vector_sources import (
    VectorEnvSpaces,
    VectorFactory,
    callable_name,
    is_vector_env,
    takes,
)

if TYPE_CHECKING:
    from torchrl.envs import EnvBase


def build_env(factory: Callable[[], Any]):
    """Call ``factory`` and check it gave an env."""
    env = factory()
    if not isinstance(env, VectorEnvSpaces) and is_vector_env(env):
        if takes(factory, "num_envs"):
            # What it returns says it: a vector env factory whose num_envs has a default.
            env.close()
            return VectorFactory(factory)()
        raise TypeError(
            f"env factory {callable_name(factory)} returned a vector env ({type(env).__name__}) "
            f"and takes no num_envs: give it a num_envs parameter (and seed, to seed it "
            f"when it is built, as EnvPool needs), e.g. `lambda num_envs, seed: "
            f"envpool.make_gymnasium('CartPole-v1', num_envs=num_envs, seed=seed)`, or pass "
            f"'envpool:<task id>' or 'vector:<gymnasium id>'; each worker builds one vector "
            f"env of envs_per_worker slots"
        )
    if not (isinstance(env, gym.Env) or is_torchrl_env(env)):
        raise TypeError(
            f"env factory {callable_name(factory)} returned {type(env).__name__}, "
            f"expected a gymnasium.Env or a torchrl EnvBase"
        )
    return env


def unwrap_bare_gym_env(env) -> gym.Env | None:
    """The gymnasium env inside a TorchRL ``GymEnv``/``GymWrapper`` that adds nothing
    but the wrapper."""
    if not torchrl_loaded():
        return None
    from torchrl.envs import GymEnv, GymWrapper

    if type(env) not in (GymEnv, GymWrapper):
        return None
    if getattr(env, "from_pixels", False) or getattr(env, "frame_skip", 1) != 1:
        return None
    inner = env._env
    return inner if _has_array_observations(inner) else None


def _has_array_observations(env: gym.Env) -> bool:
    return isinstance(env.observation_space, gym.spaces.Box)


def observation_dtype(space: gym.spaces.Box, policy) -> np.dtype:
    """The dtype of the fast path's observation buffer for ``policy``.

    Floating observations take the dtype of the policy's floating parameters, as
    TorchRL's ``DoubleToFloat`` would do for a float32 policy on a float64 env
    (MuJoCo's): the loop's observation buffer has that dtype, so each step's
    observations are cast as they are stored, at no extra cost. numpy has no
    bfloat16: for a bfloat16 policy the buffer is float32, and ``to_policy_dtype``
    casts the batch in torch. Other observations, and policies without
    parameters, keep the env's dtype.
    """
    dtype = parameter_dtype(policy)
    if dtype is None or not np.issubdtype(space.dtype, np.floating):
        return space.dtype
    return _numpy_dtype(dtype)


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """numpy's equivalent of a floating torch dtype; float32 for those numpy lacks."""
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:  # bfloat16
        return np.dtype(np.float32)


def to_policy_dtype(policy) -> Callable[[torch.Tensor], torch.Tensor]:
    """Casts a floating observation batch to the policy's dtype (bfloat16, float16, ...)."""
    dtype = parameter_dtype(policy)

    def cast(obs: torch.Tensor) -> torch.Tensor:
        if dtype is not None and obs.is_floating_point() and obs.dtype != dtype:
            return obs.to(dtype)
        return obs

    return cast


def to_numpy_ready(actions: torch.Tensor) -> torch.Tensor:
    """Actions numpy can take: bfloat16 ones become float32 (numpy has no bfloat16)."""
    return actions.float() if actions.dtype == torch.bfloat16 else actions


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
    done_keys=None,
):
    """The rollout loop that fits ``first_env`` (built by ``factory``) and ``policy``.

    ``record_trajectories`` (TorchRL's ``metrics_fn``) takes the TorchRL loop,
    which has every step as a TensorDict already; the fast path stays lean. A
    batched TorchRL env (``batch_size=[N]``) takes ``BatchedRollout``: the env's
    batch is the batch. ``reward_keys``/``done_keys`` are TorchRL's arguments.
    """
    if is_batched_env(first_env):
        if record_trajectories:
            raise TypeError(
                f"metrics_fn (TorchRL's, on every step) needs single envs; env "
                f"{callable_name(factory)} is a batched TorchRL env "
                f"(batch_size={tuple(first_env.batch_size)}): use episode_metrics_fn"
            )
        return batched_rollout(
            first_env,
            policy,
            name=callable_name(factory),
            max_steps=max_steps,
            device=device,
            info_keys=info_keys,
            reward_keys=reward_keys,
            done_keys=done_keys,
        )
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
    elif fast_path and is_torchrl_env(first_env):
        gym_env = unwrap_bare_gym_env(first_env)
        if gym_env is not None:
            make_gym_env = _UnwrappedGymFactory(factory)

    if gym_env is not None:
        to_action = observation_to_action(policy)
        adapt = gym_action_adapter(
            gym_env.action_space, gym_env.spec.id if gym_env.spec else callable_name(factory)
        )
        cast = to_policy_dtype(policy)

        def act(obs: np.ndarray):
            return adapt(to_numpy_ready(to_action(cast(torch.from_numpy(obs).to(device))).cpu()))

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
        from torchrl.envs import GymWrapper

        first_env = GymWrapper(first_env)
        factory = _WrappedGymFactory(factory)
    obs_keys = list(first_env.observation_spec.keys(True, True))
    action_keys = list(first_env.action_keys)
    if len(action_keys) > 1:  # several agent groups: the policy writes each group's actions
        if not is_tensordict_policy(policy):
            raise TypeError(
                f"env {callable_name(factory)} has {len(action_keys)} action keys "
                f"{action_keys}: its policy must be a TensorDict module that writes them all"
            )

        def to_action(td):
            return policy(td).select(*action_keys)

    else:
        to_action = tensordict_to_action(
            policy, first_env.action_key, obs_keys[0] if len(obs_keys) == 1 else None
        )

    policy_dtype = parameter_dtype(policy)
    obs_dtypes = {spec.dtype for spec in first_env.observation_spec.values(True, True)}
    # Floating observations in another dtype than the policy's (a bfloat16 policy): cast.
    cast = None
    if policy_dtype is not None and any(
        d.is_floating_point and d != policy_dtype for d in obs_dtypes
    ):
        cast = to_policy_dtype(policy)
    action_dtype = first_env.full_action_spec[first_env.action_key].dtype

    def act_td(td):
        td = td.to(device)
        actions = to_action(td if cast is None else td.apply(cast)).cpu()
        floating = isinstance(actions, torch.Tensor) and actions.is_floating_point()
        if floating and action_dtype.is_floating_point:
            actions = actions.to(action_dtype)  # a bfloat16 policy's actions, for the env
        return actions

    return TorchRLRollout(
        factory,
        first_env,
        act_td,
        batch_size=batch_size,
        max_steps=max_steps,
        info_keys=info_keys,
        record_trajectories=record_trajectories,
        reward_keys=reward_keys,
        done_keys=done_keys,
    )


def batched_rollout(
    env: EnvBase,
    policy,
    *,
    name: str,
    max_steps: int | None,
    device: torch.device,
    info_keys=(),
    reward_keys=None,
    done_keys=None,
) -> BatchedRollout:
    """The loop for a batched TorchRL env: one policy call per step on the env's batch."""
    check_batch(env, name)
    keys = EnvKeys.of(env, reward_keys, done_keys)
    action_keys = list(keys.action_keys)
    float_actions = {
        key: env.full_action_spec[key].dtype
        for key in action_keys
        if env.full_action_spec[key].dtype.is_floating_point
    }
    if is_tensordict_policy(policy):
        if device.type == "cpu":
            call = policy
        else:

            def call(td):
                return td.update(policy(td.to(device)).select(*action_keys).cpu())

    else:
        obs_keys = list(env.observation_spec.keys(True, True))
        if len(obs_keys) != 1 or len(action_keys) != 1:
            raise TypeError(
                f"a plain (non-TensorDict) policy needs an env with one observation key and "
                f"one action key; env {name!r} has observation keys {obs_keys} and action "
                f"keys {action_keys}: wrap the policy in a TensorDictModule with explicit "
                f"in_keys and out_keys"
            )
        if not callable(policy):
            raise TypeError(f"policy must be callable, got {type(policy).__name__}")
        (obs_key,), (action_key,) = obs_keys, action_keys

        spec = env.full_action_spec[action_key]

        def call(td):
            actions = policy(td.get(obs_key).to(device)).cpu()
            if tuple(actions.shape[:1]) != tuple(td.batch_size):
                _check_action_tensor(actions, spec, action_key, name, ())  # raises, saying why
            return td.set(action_key, actions)

    def act(td):
        td = call(td)
        for key, dtype in float_actions.items():
            action = td.get(key, None)
            if action is not None and action.is_floating_point() and action.dtype != dtype:
                td.set(key, action.to(dtype))  # a bfloat16 policy's actions, for the env
        return td

    return BatchedRollout(env, act, keys, max_steps=max_steps, info_keys=info_keys)


@dataclass
class _UnwrappedGymFactory:
    factory: Callable[[], Any]

    def __call__(self) -> gym.Env:
        return self.factory()._env


@dataclass
class _WrappedGymFactory:
    factory: Callable[[], Any]

    def __call__(self):
        from torchrl.envs import GymWrapper

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
    if isinstance(rollout, BatchedRollout):
        env = rollout._env
        td = rollout._act(rollout.first_batch())
        for key in rollout.keys.action_keys:
            _check_action_tensor(td.get(key, None), env.full_action_spec[key], key, env_name, ())
        return
    env = rollout._envs[0]
    td = env.reset().select(*rollout._observation_keys)
    batch = torch.stack([td] * rollout.batch_size)
    actions = rollout._act(batch)
    if isinstance(actions, TensorDictBase):
        for key in env.action_keys:
            _check_action_tensor(
                actions.get(key, None), env.full_action_spec[key], key, env_name, (len(batch),)
            )
        return
    spec = env.full_action_spec[env.action_key]
    _check_action_tensor(actions, spec, env.action_key, env_name, (len(batch),))


def _check_action_tensor(actions, spec, key, env_name: str, lead: tuple) -> None:
    """The policy's actions under ``key`` fit the leaf action spec ``spec`` after ``lead``
    dims (the slots ray_eval stacks; none for a batched env, whose spec has its batch)."""
    if actions is None:
        raise ActionMismatchError(
            f"policy wrote no action under key {key!r}; env {env_name!r} expects one there "
            f"({type(spec).__name__}, shape {tuple(spec.shape)}, dtype {spec.dtype})"
        )
    where = f" under key {key!r}" if key != "action" else ""
    per_env = tuple(actions.shape[len(lead) :])
    if tuple(actions.shape[: len(lead)]) != lead or per_env != tuple(spec.shape):
        if lead:
            raise ActionMismatchError(
                f"policy returned actions{where} of shape {tuple(actions.shape)} (per env "
                f"{per_env}); env {env_name!r} expects per-env shape "
                f"{tuple(spec.shape)} ({type(spec).__name__}, dtype {spec.dtype})"
            )
        raise ActionMismatchError(
            f"policy returned actions{where} of shape {tuple(actions.shape)}; batched env "
            f"{env_name!r} expects shape {tuple(spec.shape)} (its batch, then each element's "
            f"action; {type(spec).__name__}, dtype {spec.dtype})"
        )
    if actions.dtype != spec.dtype and not (
        actions.is_floating_point() and spec.dtype.is_floating_point
    ):
        raise ActionMismatchError(
            f"policy returned actions{where} of dtype {actions.dtype}; env {env_name!r} "
            f"expects {spec.dtype}"
        )


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
    cast = to_policy_dtype(policy)

    if device.type == "cpu":

        def act(obs: np.ndarray) -> np.ndarray:
            return adapt(to_numpy_ready(to_action(cast(torch.from_numpy(obs)))))

    else:

        def act(obs: np.ndarray) -> np.ndarray:
            return adapt(to_numpy_ready(to_action(cast(torch.from_numpy(obs).to(device))).cpu()))

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
