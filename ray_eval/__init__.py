"""ray_eval: evaluate RL policies on a pool of Ray actors, with TorchRL's Evaluator API.

The names below are imported on first use: the pool actor imports
``ray_eval.backends.pool`` and must not pay for torch and TorchRL, which it never uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ray_eval.lazy import lazy_exports

_EXPORTS = {
    "Evaluator": "ray_eval.evaluator",
    "EvalResult": "ray_eval.results.metrics",
    "EpisodeData": "ray_eval.results.episodes",
    "Comparison": "ray_eval.results.metrics",
    "compare_results": "ray_eval.results.metrics",
    "RayEvalError": "ray_eval.errors",
    "ActionMismatchError": "ray_eval.errors",
    "EnvError": "ray_eval.errors",
    "EvaluationTimeout": "ray_eval.errors",
    "EvaluatorBusyError": "ray_eval.errors",
    "ResourceUnavailableError": "ray_eval.errors",
    "WeightsMismatchError": "ray_eval.errors",
    "WorkerDiedError": "ray_eval.errors",
    "WorkerStartupError": "ray_eval.errors",
    "VectorFactory": "ray_eval.rollout.vector_sources",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:
    from ray_eval.errors import (
        ActionMismatchError,
        EnvError,
        EvaluationTimeout,
        EvaluatorBusyError,
        RayEvalError,
        ResourceUnavailableError,
        WeightsMismatchError,
        WorkerDiedError,
        WorkerStartupError,
    )
    from ray_eval.evaluator import Evaluator
    from ray_eval.results.episodes import EpisodeData
    from ray_eval.results.metrics import Comparison, EvalResult, compare_results
    from ray_eval.rollout.vector_sources import VectorFactory
