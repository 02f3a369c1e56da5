"""Where evaluations run: a Ray worker pool, or this process.

``start_backend`` picks and starts one: the Ray pool (``ray_backend``) unless
``num_workers=0`` or ``backend="local"``/``"thread"`` asks for this process
(``local_backend``). Both take numbered requests and give a handle per request.
"""

from __future__ import annotations

from typing import Any

from ray_eval.backends import ray_session
from ray_eval.backends.local_backend import LocalBackend
from ray_eval.backends.pickling import check_picklable
from ray_eval.backends.worker import WorkerConfig
from ray_eval.options import pool_config
from ray_eval.planning import EvaluationPlan


def start_backend(
    args: dict[str, Any],
    factories: dict[str, Any],
    worker_config: WorkerConfig,
    plan: EvaluationPlan,
    *,
    use_ray: bool,
):
    """Start the backend the Evaluator's arguments ``args`` ask for; returns it started."""
    if not use_ray:
        return LocalBackend(plan, worker_config, args["policy"])
    # Everything the workers build from must pickle: fail here, naming the part.
    for what in ("policy", "policy_factory", "metrics_fn", "episode_metrics_fn", "init_fn"):
        check_picklable(args[what], what)
    check_picklable(factories, "env")
    ray_session.connect()
    from ray_eval.backends.ray_backend import RayBackend  # imports Ray's actor machinery

    return RayBackend(pool_config(args, factories), plan, worker_config, args["policy"])
