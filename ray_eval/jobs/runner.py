"""One config's evaluation job: the evaluator, and checkpoint in -> result record out.

``EvalJob`` builds the ``Evaluator`` from a config on first use (connecting to
Ray, or starting a local instance), loads a checkpoint's weights, evaluates them
at the checkpoint's step (the episode seeds derive from ``(seed, step, episode)``,
so a result is reproducible) and returns the record the results file keeps.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from ray_eval.backends.ray_session import connect
from ray_eval.errors import one_line
from ray_eval.jobs.checkpoints import CheckpointError, WithEnvParts, load_weights, step_of
from ray_eval.jobs.config import EvalConfig
from ray_eval.jobs.loggers import build_loggers, close_loggers, logging_callback
from ray_eval.results.display import progress, result_line

log = logging.getLogger("ray_eval")
_NO_CLUSTER = {"nodes": 0, "cpus": 0, "gpus": 0}


class EvaluationFailed(RuntimeError):
    """The evaluator could not be built, or an evaluation raised; the message is one line."""


class EvalJob:
    """Evaluates checkpoints for one config; ``close()`` stops everything it started."""

    def __init__(
        self, config: EvalConfig, *, address: str | None = None, tty: bool = False
    ) -> None:
        self.config = config
        self.config_hash = config.config_hash()
        self._address = address
        self._tty = tty
        self._loggers = build_loggers(config)  # a missing logger package fails before Ray starts
        self._evaluator = None
        self._connected = False

    # -- checkpoints -------------------------------------------------------------

    def load(self, checkpoint: str | Path) -> tuple[Any, int | None]:
        """Weights of ``checkpoint`` and the step it carries (metadata, name or content)."""
        path = Path(checkpoint)
        weights, inner_step = load_weights(
            path, allow_pickle=self.config.checkpoint.allow_pickle, key=self.config.checkpoint.key
        )
        step = step_of(path)
        return weights, inner_step if step is None else step

    # -- evaluation ----------------------------------------------------------------

    @property
    def evaluator(self):
        """The ``Evaluator`` (built on first use)."""
        if self._evaluator is None:
            self._evaluator = self._build_evaluator()
        return self._evaluator

    def evaluate(
        self,
        checkpoint: str | Path | None = None,
        *,
        step: int | None = None,
        weights: Any = None,
    ) -> dict:
        """Evaluate ``checkpoint`` (``None``: the policy as built) and return its record.

        ``step`` defaults to the checkpoint's own step, else 0. Pass ``weights``
        when they are loaded already.
        """
        path = Path(checkpoint).resolve() if checkpoint is not None else None
        if path is not None and weights is None:
            weights, found_step = self.load(path)
            step = found_step if step is None else step
        if step is None:
            step = 0
            if path is not None:
                log.warning(
                    "checkpoint %s carries no step (name or metadata); using step 0", path.name
                )
        evaluator = self.evaluator
        what = f"{path.name} (step {step})" if path else f"initial weights (step {step})"
        started = time.perf_counter()
        with progress(
            f"evaluating {what}: {self.config.num_trajectories} episodes of {self.config.env.label}",
            tty=self._tty,
        ):
            weights_dict = None
            if isinstance(weights, WithEnvParts):  # saved with env parts (KeepBest's best)
                weights, weights_dict = weights.policy, weights.env_parts
            try:
                result = evaluator.evaluate(weights=weights, step=step, weights_dict=weights_dict)
            except Exception as error:
                from ray_eval.errors import WeightsMismatchError

                if isinstance(error, WeightsMismatchError):
                    raise CheckpointError(
                        f"checkpoint {path} does not fit the policy: {error}"
                    ) from None
                raise EvaluationFailed(
                    f"evaluation of {what} failed: {type(error).__name__}: {one_line(error)}"
                ) from error
        record = self._record(result, path, step, time.perf_counter() - started)
        log.info("%s", result_line(record))
        return record

    def _record(self, result: dict, path: Path | None, step: int, seconds: float) -> dict:
        return {
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": self.config.name,
            "config_hash": self.config_hash,
            "env": self.config.env.label,
            "checkpoint": str(path) if path is not None else None,
            "step": int(step),
            "prefix": self.config.log_prefix,
            "metrics": dict(result),
            "seconds": round(seconds, 4),
            "num_workers": self._evaluator.num_workers,
            "cluster": cluster_size() if self._evaluator.num_workers else _NO_CLUSTER,
            "ray_eval_version": _version(),
        }

    def _build_evaluator(self):
        from torchrl.envs.utils import ExplorationType

        from ray_eval.evaluator import Evaluator

        config, workers = self.config, self.config.workers
        if workers.num_workers != 0:
            self._connected = connect(self._address, log_to_driver=False)
        try:
            evaluator = Evaluator(
                config.env.build(),
                policy_factory=config.policy.build(),
                num_workers=workers.num_workers,
                num_trajectories=config.num_trajectories,
                max_steps=config.max_steps,
                seed=config.seed,
                busy_policy=config.busy_policy,
                on_result=logging_callback(self._loggers, config.log_prefix),
                log_prefix=config.log_prefix,
                exploration_type=ExplorationType[config.exploration_type.upper()],
                envs_per_worker=workers.envs_per_worker,
                num_cpus_per_worker=workers.num_cpus,
                num_gpus_per_worker=workers.num_gpus,
                resources_per_worker=dict(workers.resources) or None,
                max_restarts=workers.max_restarts,
                placement=workers.placement,
                timeout=config.timeout,
                startup_timeout=workers.startup_timeout,
            )
        except Exception as error:
            raise EvaluationFailed(
                f"could not start the evaluator: {type(error).__name__}: {one_line(error)}"
            ) from error
        where = f"{evaluator.num_workers} Ray worker(s)" if evaluator.num_workers else "in-process"
        log.info("evaluator ready: %s, %s episodes per evaluation", where, config.num_trajectories)
        return evaluator

    def close(self) -> None:
        """Stop the evaluator's workers, flush the loggers, stop a Ray this job started."""
        if self._evaluator is not None:
            self._evaluator.shutdown()
            self._evaluator = None
        close_loggers(self._loggers)
        if self._connected:
            import ray

            ray.shutdown()
            self._connected = False

    def __enter__(self) -> EvalJob:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cluster_size() -> dict:
    """Alive nodes, CPUs and GPUs of the Ray cluster (zeros in-process)."""
    import ray

    if not ray.is_initialized():
        return dict(_NO_CLUSTER)
    resources = ray.cluster_resources()
    return {
        "nodes": sum(1 for node in ray.nodes() if node.get("Alive")),
        "cpus": resources.get("CPU", 0),
        "gpus": resources.get("GPU", 0),
    }


def _version() -> str:
    try:
        return metadata.version("ray_eval")
    except metadata.PackageNotFoundError:
        return "unknown"
