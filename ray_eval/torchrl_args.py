"""TorchRL ``Evaluator`` arguments: taken with TorchRL's meaning, or refused by name.

ray_eval runs its own rollout loop on Ray actors rather than a TorchRL
collector, so a few of TorchRL's arguments have nothing to configure here.
Each one is either honoured, accepted with the (lack of) effect it has in
TorchRL itself, or refused with a message that says why and what to do
instead. The docs page "Coming from TorchRL" lists every difference.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
from torchrl.envs import EnvBase

TRAJ_FORMATS = ("pad", "cat")
EPISODE_SAMPLING = ("first_done", "per_env")
REFUSED = {
    "collector_cls": "ray_eval steps envs in its own rollout loop on Ray actors, not in a "
    "TorchRL collector",
    "weight_sync_schemes": "weights travel through Ray's object store, one ray.put per "
    "evaluation shared by every worker; send env-side state (e.g. VecNorm statistics) in "
    "weights_dict={'env.transform[0]': ...}",
}


def check_torchrl_arguments(a: dict[str, Any]) -> None:
    """Check the TorchRL-only arguments; TorchRL's own rules keep TorchRL's wording."""
    if a["backend"] == "process" and not isinstance(a["env"], Mapping):
        env = a["env"]
        if not callable(env) or isinstance(env, EnvBase | gym.Env):
            raise ValueError(
                "The 'process' backend requires `env` to be a callable (factory function) "
                "because the env is created inside a child process (here: each Ray "
                "worker); pass e.g. functools.partial(GymEnv, 'Pendulum-v1'), or use "
                "backend='ray', which also accepts env instances."
            )
        if a["policy_factory"] is None:
            raise ValueError(
                "The 'process' backend requires `policy_factory` (a callable "
                "`(env) -> policy`) because the policy is created inside a child process; "
                "or use backend='ray', which ships `policy` to the workers."
            )
    for name, why in REFUSED.items():
        if a[name] is not None:
            raise ValueError(f"{name} is not supported by ray_eval: {why}")
    kwargs = a["collector_kwargs"] or {}
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"collector_kwargs must be a dict, got {type(kwargs).__name__}")
    unknown = sorted(set(kwargs) - {"traj_format"})
    if unknown:
        raise ValueError(
            f"collector_kwargs {unknown} not supported: ray_eval has no TorchRL collector; "
            f"it takes only 'traj_format' ({' or '.join(map(repr, TRAJ_FORMATS))}), the "
            f"layout of the trajectories metrics_fn receives"
        )
    if kwargs.get("traj_format", "pad") not in TRAJ_FORMATS:
        raise ValueError(
            f"collector_kwargs['traj_format'] must be one of {TRAJ_FORMATS}, "
            f"got {kwargs['traj_format']!r}"
        )
    if a["episode_sampling"] not in EPISODE_SAMPLING:
        raise ValueError(
            f"Unknown episode_sampling {a['episode_sampling']!r}: must be one of "
            f"{EPISODE_SAMPLING}, got {a['episode_sampling']!r}"
        )
    if a["frames_per_batch"] is not None and not (
        isinstance(a["frames_per_batch"], int) and a["frames_per_batch"] > 0
    ):
        raise ValueError(f"frames_per_batch must be a positive int, got {a['frames_per_batch']!r}")
    if a["num_gpus"] is not None and not (
        isinstance(a["num_gpus"], numbers.Real) and a["num_gpus"] >= 0
    ):
        raise ValueError(f"num_gpus must be a number >= 0, got {a['num_gpus']!r}")
    if a["ray_kwargs"] is not None and not isinstance(a["ray_kwargs"], Mapping):
        raise TypeError(f"ray_kwargs must be a dict, got {type(a['ray_kwargs']).__name__}")
    if a["init_fn"] is not None and not callable(a["init_fn"]):
        raise TypeError(f"init_fn must be callable, got {type(a['init_fn']).__name__}")


def traj_format(a: dict[str, Any]) -> str:
    return (a["collector_kwargs"] or {}).get("traj_format", "pad")
