"""ray_eval inside the training loops people already have.

* ``KeepBest``, ``load_best``: the best checkpoint with the env-part state it was
  evaluated with, reloadable to the same number;
* ``StopOnThreshold``, ``StopOnNoImprovement``: early stopping;
* ``EpisodeRecord``: every evaluation's episodes, one JSON line each;
* ``EvalSchedule``: when to evaluate in a loop, and the above on each result;
* ``RayEvalHook`` (``ray_eval.integrations.torchrl_trainer``): a TorchRL ``Trainer`` hook;
* ``ray_eval.sb3.EvalCallback``: stable-baselines3's ``EvalCallback`` on Ray workers.

Names are imported on first use (the SB3 and Trainer parts pull their libraries).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ray_eval.lazy import lazy_exports

_EXPORTS = {
    "BestCheckpoint": "ray_eval.integrations.best",
    "Criterion": "ray_eval.integrations.criteria",
    "Delivered": "ray_eval.integrations.schedule",
    "EpisodeRecord": "ray_eval.integrations.record",
    "EvalSchedule": "ray_eval.integrations.schedule",
    "KeepBest": "ray_eval.integrations.best",
    "RayEvalHook": "ray_eval.integrations.torchrl_trainer",
    "StopOnNoImprovement": "ray_eval.integrations.stopping",
    "StopOnThreshold": "ray_eval.integrations.stopping",
    "load_best": "ray_eval.integrations.best",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:
    from ray_eval.integrations.best import BestCheckpoint, KeepBest, load_best
    from ray_eval.integrations.criteria import Criterion
    from ray_eval.integrations.record import EpisodeRecord
    from ray_eval.integrations.schedule import Delivered, EvalSchedule
    from ray_eval.integrations.stopping import StopOnNoImprovement, StopOnThreshold
    from ray_eval.integrations.torchrl_trainer import RayEvalHook
