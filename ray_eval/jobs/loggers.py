"""TorchRL loggers (CSV, TensorBoard, wandb offline) fed by the evaluator's ``on_result``."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ray_eval.jobs.config import ConfigError, EvalConfig

log = logging.getLogger("ray_eval")

_EXTRA = {"tensorboard": "tensorboard", "wandb": "wandb"}


def build_loggers(config: EvalConfig) -> list[Any]:
    """One TorchRL logger per ``loggers`` entry; ``ConfigError`` if its package is missing."""
    loggers = []
    for index, entry in enumerate(config.loggers):
        exp_name = entry.exp_name or config.name or "ray-eval"
        try:
            loggers.append(_make(entry.type, exp_name, entry.log_dir, entry.project))
        except ImportError as error:
            package = _EXTRA.get(entry.type, entry.type)
            raise ConfigError(
                f"loggers[{index}].type: the {entry.type} logger needs the {package!r} package "
                f"(pip install 'ray_eval[loggers]'): {error}"
            ) from None
    return loggers


def _make(kind: str, exp_name: str, log_dir: str, project: str):
    from torchrl.record import loggers as torchrl_loggers

    if kind == "csv":
        return torchrl_loggers.CSVLogger(exp_name=exp_name, log_dir=log_dir)
    if kind == "tensorboard":
        import tensorboard  # noqa: F401  - a clear ImportError before TorchRL's

        return torchrl_loggers.TensorboardLogger(exp_name=exp_name, log_dir=log_dir)
    if kind == "wandb":
        import wandb  # noqa: F401

        Path(log_dir).mkdir(parents=True, exist_ok=True)
        return torchrl_loggers.WandbLogger(
            exp_name=exp_name,
            offline=True,
            save_dir=log_dir,
            project=project,
            log_env_packages=False,
        )
    raise ValueError(f"unknown logger type {kind!r}")


def logging_callback(loggers: Sequence[Any], prefix: str) -> Callable[[Any], None] | None:
    """An ``on_result`` that writes each finite scalar of a result to every logger at its step."""
    if not loggers:
        return None
    step_key = f"{prefix}/step"

    def on_result(result) -> None:
        values = {key: value.item() for key, value in result.items()}
        step = int(values.get(step_key, 0))
        for logger in loggers:
            for key, value in values.items():
                if key != step_key and isinstance(value, int | float) and math.isfinite(value):
                    logger.log_scalar(key, float(value), step=step)

    return on_result


def close_loggers(loggers: Sequence[Any]) -> None:
    """Flush what loggers buffer (TensorBoard's writer, wandb's run)."""
    for logger in loggers:
        try:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "finish"):  # a wandb run
                experiment.finish()
            elif hasattr(experiment, "close"):  # a TensorBoard SummaryWriter
                experiment.close()
        except Exception:
            log.warning("could not close the %s logger", type(logger).__name__, exc_info=True)
