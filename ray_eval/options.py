"""The Evaluator's arguments: checked up front, in ray_eval's words, then turned into configs.

Every check here runs in the constructor (or in the call that takes the value),
before any Ray actor starts: a bad value fails at the call that is wrong,
naming the argument and the value.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from typing import Any

import ray
import torch
from torchrl.envs import EnvBase
from torchrl.envs.utils import ExplorationType

from ray_eval.backends.pool import PLACEMENT_STRATEGIES, PoolConfig
from ray_eval.backends.worker import WorkerConfig
from ray_eval.env_input import as_env_factory
from ray_eval.planning import EvaluationPlan
from ray_eval.results.video import VIDEO_FORMATS
from ray_eval.rollout.env_parts import freeze_normalization
from ray_eval.rollout.vector_sources import vector_members

BUSY_POLICIES = ("error", "skip", "queue", "latest")
# "process" and "thread" are TorchRL's names: every Ray worker is its own process,
# and the in-process backend runs on a background thread.
BACKENDS = {"ray": "ray", "process": "ray", "local": "local", "thread": "local"}


def check_int(name: str, value: Any, *, minimum: int | None) -> int:
    """``value`` as an int, or a ``TypeError``/``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral | torch.SymInt):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_seconds(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds or None, got {value!r}")


def check_callable(name: str, value: Any) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}")


def check_choice(name: str, value: Any, choices, what: str) -> None:
    if value not in choices:
        raise ValueError(
            f"Unknown {name} {value!r}: {what} must be one of {tuple(choices)}, got {value!r}"
        )


def check_arguments(a: dict[str, Any]) -> None:
    """Check the constructor's arguments (``a``: their names and values)."""
    check_int("num_trajectories", a["num_trajectories"], minimum=1)
    if a["envs_per_worker"] is not None:
        check_int("envs_per_worker", a["envs_per_worker"], minimum=1)
    check_int("max_restarts", a["max_restarts"], minimum=0)
    check_int("seed", a["seed"], minimum=0)
    check_int("record_video", a["record_video"], minimum=0)
    for name in ("num_workers", "max_steps", "max_unread_results"):
        if a[name] is not None:
            check_int(name, a[name], minimum=0 if name == "num_workers" else 1)
    check_choice("busy_policy", a["busy_policy"], BUSY_POLICIES, "busy_policy")
    check_choice("backend", a["backend"], BACKENDS, "backend")
    if a["placement"] is not None:
        check_choice("placement", a["placement"], PLACEMENT_STRATEGIES, "placement (or None)")
    check_choice("video_format", a["video_format"], VIDEO_FORMATS, "video_format")
    if a["policy"] is not None and a["policy_factory"] is not None:
        raise ValueError("pass either policy or policy_factory, not both")
    if a["policy"] is None and a["policy_factory"] is None:
        raise ValueError(
            "policy or policy_factory must be provided: pass policy=... (a TensorDict "
            "module, an nn.Module or a callable) or policy_factory=... (built inside "
            "each worker)"
        )
    for name in ("policy_factory", "on_result", "metrics_fn", "episode_metrics_fn"):
        check_callable(name, a[name])
    check_seconds("timeout", a["timeout"])
    check_seconds("startup_timeout", a["startup_timeout"])
    if not isinstance(a["wait_for_workers"], bool):
        raise TypeError(f"wait_for_workers must be True or False, got {a['wait_for_workers']!r}")
    for name in ("num_cpus_per_worker", "num_gpus_per_worker"):
        if not isinstance(a[name], numbers.Real) or a[name] < 0:
            raise ValueError(f"{name} must be a number >= 0, got {a[name]!r}")
    logger = a["video_logger"]
    if logger is not None and not callable(getattr(logger, "log_video", None)):
        raise TypeError("video_logger must have a log_video(name, video, step=...) method")


def check_step(step: Any) -> int:
    """A request's ``step``: an int >= 0 (it seeds the evaluation's episodes)."""
    return check_int("step", step, minimum=0)


def env_factories(env: Any, *, render: bool) -> dict[str, Any]:
    """``{member: factory}``: ``{"": factory}`` for one env, one entry per suite member."""
    is_suite = isinstance(env, Mapping)
    members = dict(env) if is_suite else {"": env}
    if not members:
        raise ValueError("env: an evaluation suite needs at least one member")
    factories = {}
    for name, member_env in members.items():
        if is_suite and (not isinstance(name, str) or not name or "/" in name):
            raise ValueError(
                f"env: suite member names must be non-empty strings without '/', got {name!r}"
            )
        if isinstance(member_env, EnvBase):
            # As TorchRL does: the instance given for evaluation is frozen too, so
            # that nothing evaluated through it updates its statistics.
            freeze_normalization(member_env)
        factories[name] = as_env_factory(member_env, render_mode="rgb_array" if render else None)
    return factories


def default_num_workers(cpus_per_worker: float, episodes: int) -> int:
    """As many workers as the cluster has free CPUs for, at least 1, at most ``episodes``."""
    available = ray.available_resources().get("CPU", os.cpu_count() or 1)
    fit = int(available // cpus_per_worker) if cpus_per_worker > 0 else (os.cpu_count() or 1)
    return max(1, min(fit, episodes))


SINGLE_ENV_BATCH = 64  # envs_per_worker=None for single envs: 64 copies per worker
VECTOR_BATCH_MIN, VECTOR_BATCH_MAX = 64, 1024
EPISODES_PER_SLOT = 4  # envs_per_worker=None for native vector envs: see default_vector_batch


def default_vector_batch(episodes: int) -> int:
    """``envs_per_worker=None`` on a native vector env: slots per worker from the episodes.

    The largest power of two no larger than ``episodes / EPISODES_PER_SLOT``, within
    ``[VECTOR_BATCH_MIN, VECTOR_BATCH_MAX]``. A vector env steps every slot at once, so
    its rate grows with its slots until the policy call and the env step stop being
    dominated by per-call overhead (measured with ``benchmarks/vector_envs.py --sweep``,
    docs/envs.md); a chunk lasts as long as its slowest slot, so each slot should still
    run a few episodes. It depends on the episodes only, never on the number of
    workers, so the numbers stay the same on any number of workers.
    """
    target = max(1, episodes // EPISODES_PER_SLOT)
    power = 1 << (target.bit_length() - 1)
    return max(VECTOR_BATCH_MIN, min(VECTOR_BATCH_MAX, power))


def batch_sizes(a: dict[str, Any], factories: dict[str, Any]) -> tuple[int, int]:
    """``(envs_per_worker for single envs, slots per worker for native vector envs)``:
    both ``envs_per_worker`` when it is given; for ``None``, 64 and ``default_vector_batch``.
    (A batched TorchRL env's batch is its own: see ``WorkerInfo.batches``.)"""
    given = a["envs_per_worker"]
    if given is not None:
        return given, given
    return SINGLE_ENV_BATCH, default_vector_batch(a["num_trajectories"])


def slots_for(factories: dict[str, Any], episodes: int, envs_per_worker: int) -> dict[str, int]:
    """Env slots per member: the batch the policy is called on at every step.

    It must not depend on the number of workers (a batched matrix product gives
    bit-for-bit different rows for different batch sizes), and every chunk fits
    in it: no chunk has more episodes than its member. A batch no larger than
    the member's episodes keeps a short evaluation on many workers from paying
    for ``envs_per_worker`` rows at every step (32 HalfCheetah episodes on 2
    workers: 16 running slots in a batch of 32, not of 64).
    """
    return {member: min(envs_per_worker, episodes) for member in factories}


def build_configs(
    a: dict[str, Any], factories: dict[str, Any], *, use_ray: bool
) -> tuple[WorkerConfig, EvaluationPlan]:
    """What each worker builds (``WorkerConfig``) and what each evaluation runs (the plan)."""
    single, vector = batch_sizes(a, factories)
    vectors = vector_members(factories)
    slots = slots_for(factories, a["num_trajectories"], single)
    slots.update(slots_for(dict.fromkeys(vectors), a["num_trajectories"], vector))
    worker_config = WorkerConfig(
        env_factories=factories,
        policy_factory=a["policy_factory"],
        exploration_type=ExplorationType(a["exploration_type"]).name,
        envs_per_worker=single,
        vector_slots=min(vector, a["num_trajectories"]),
        slots=slots,
        max_steps=a["max_steps"],
        fast_path=a["fast_path"],
        device=a["device"],
        info_keys=tuple(a["info_keys"]),
        render=a["record_video"] > 0,
        torch_threads=1 if use_ray else None,  # in-process: 1 while a rollout runs
        init_fn=a["init_fn"],
        record_trajectories=a["metrics_fn"] is not None,
        reward_keys=a["reward_keys"],
        done_keys=a["done_keys"],
    )
    plan = EvaluationPlan(
        members={name: a["num_trajectories"] for name in factories},
        envs_per_worker=single,
        seed=a["seed"],
        prefix=a["log_prefix"],
        record_episodes=a["record_video"],
        timeout=a["timeout"],
        episode_metrics_fn=a["episode_metrics_fn"],
        metrics_fn=a["metrics_fn"],
        traj_format=(a["collector_kwargs"] or {}).get("traj_format", "pad"),
        dump_video=bool(a["dump_video"]),
        vector_members=vectors,
        member_batches=dict.fromkeys(vectors, vector),
    )
    return worker_config, plan


def pool_config(a: dict[str, Any], factories: dict[str, Any]) -> PoolConfig:
    """How many workers, with which resources, placed how (connects to Ray first)."""
    cpus = a["num_cpus_per_worker"]
    gpus = a["num_gpus_per_worker"] if a["num_gpus"] is None else a["num_gpus"]  # TorchRL's name
    resources = {"CPU": cpus, "GPU": gpus}
    return PoolConfig(
        num_workers=a["num_workers"]
        or default_num_workers(cpus, a["num_trajectories"] * len(factories)),
        worker_resources={**resources, **(a["resources_per_worker"] or {})},
        actor_options={**(a["ray_kwargs"] or {}), **(a["actor_options"] or {})},
        max_restarts=a["max_restarts"],
        startup_timeout=a["startup_timeout"],
        placement=a["placement"],
    )
