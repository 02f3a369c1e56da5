"""Policy adapters: whatever the user passed, called once per step on a batch.

Three kinds of policy are accepted:

* TensorDict policies (``TensorDictModule``, ``ProbabilisticActor``, TorchRL's
  ``RandomPolicy``, ...) read and write a TensorDict;
* a plain ``nn.Module`` or callable maps an observation tensor to an action
  tensor;
* a ``policy_factory`` builds one of the above inside each worker.

On the vectorized gymnasium path a plain ``TensorDictModule`` that maps
``"observation"`` to ``"action"`` is called through its inner module on the
observation batch directly: wrapping every step in a TensorDict costs about
three times the MLP itself at batch 64.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule, TensorDictModuleBase
from torch import nn

from ray_eval.rollout.torchrl_env import is_torchrl

TensorPolicy = Callable[[torch.Tensor], torch.Tensor]

OBSERVATION_KEY = "observation"
ACTION_KEY = "action"


def is_tensordict_policy(policy) -> bool:
    return isinstance(policy, TensorDictModuleBase) or _is_random_policy(policy)


def _is_random_policy(policy) -> bool:
    return is_torchrl(policy, "RandomPolicy", "torchrl.collectors")


def build_policy(policy, policy_factory, env):
    """The worker's policy: ``policy`` itself, or ``policy_factory`` called with
    ``env`` when it has a required positional parameter, with nothing otherwise."""
    if policy is not None:
        return policy
    if _needs_env_argument(policy_factory):
        return policy_factory(env)
    return policy_factory()


def _needs_env_argument(factory) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return any(
        p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        for p in params
    )


def prepare_policy(policy, device: torch.device):
    """Evaluation mode on ``device`` (dropout off, batch norm frozen)."""
    if isinstance(policy, nn.Module):
        policy = policy.to(device)
        policy.eval()
    return policy


def parameter_dtype(policy) -> torch.dtype | None:
    """The dtype of the policy's first floating parameter (``None``: it has none)."""
    if not isinstance(policy, nn.Module):
        return None
    for param in policy.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


def observation_to_action(policy) -> TensorPolicy:
    """A function from an observation batch to an action batch, for gymnasium envs."""
    if type(policy) is TensorDictModule and _maps_observation_to_action(policy):
        return policy.module
    if _is_random_policy(policy):
        spec = policy.action_spec
        return lambda obs: spec.rand(obs.shape[:1]).to(obs.device)
    if is_tensordict_policy(policy):

        def call(obs: torch.Tensor) -> torch.Tensor:
            td = TensorDict({OBSERVATION_KEY: obs}, batch_size=obs.shape[:1], device=obs.device)
            return policy(td).get(ACTION_KEY)

        return call
    if callable(policy):
        return policy
    raise TypeError(f"policy must be callable, got {type(policy).__name__}")


def _maps_observation_to_action(module: TensorDictModule) -> bool:
    return list(module.in_keys) == [OBSERVATION_KEY] and list(module.out_keys) == [ACTION_KEY]


def tensordict_to_action(
    policy, action_key, observation_key
) -> Callable[[TensorDictBase], torch.Tensor]:
    """A function from a batch TensorDict of observations to an action batch, for TorchRL envs."""
    if _is_random_policy(policy):
        spec = policy.action_spec
        return lambda td: spec.rand(td.batch_size)
    if is_tensordict_policy(policy):
        return lambda td: policy(td).get(action_key)
    if not callable(policy):
        raise TypeError(f"policy must be callable, got {type(policy).__name__}")
    if observation_key is None:
        raise TypeError(
            "a plain (non-TensorDict) policy needs an env with a single observation key; "
            "wrap it in a TensorDictModule with explicit in_keys"
        )
    return lambda td: policy(td.get(observation_key))
