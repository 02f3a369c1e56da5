"""A TorchRL ``Trainer`` hook that evaluates on a ray_eval pool, in the background.

``RayEvalHook`` takes the place of TorchRL's ``LogValidationReward``::

    hook = RayEvalHook(evaluator, policy=actor, interval=10_000,
                       env_parts={"env.transform[0]": train_env.transform[0]},
                       keep_best=KeepBest("best"), stop=StopOnThreshold(-200, "reward"))
    hook.register(trainer)

Every ``interval`` collected frames it hands the policy's weights (and the env
parts' state, e.g. a ``VecNormV2``'s statistics) to the evaluator and training
goes on; each result, when it arrives, is logged through the trainer's logger
at the frame count of the weights it evaluated (``eval/reward``,
``eval/reward_ci_low``, ... and ``r_evaluation``/``total_r_evaluation``, the
names ``LogValidationReward`` uses: the mean reward per step and the mean
episode return), and goes to ``keep_best``, ``stop`` and ``record`` (see
``EvalSchedule``; a stop calls ``trainer.request_stop``). The first
evaluation (the initial weights) is waited for, so that hooks reading the
metric from the first iteration on (TorchRL's ``EarlyStopping``) find it. At
the trainer's shutdown the pending evaluations are waited for and handled.

With ``torchrl.checkpoint``: pass ``checkpoint_metadata=hook.checkpoint_metadata``
to the ``Trainer`` so a ``CheckpointRotation(keep_best=("eval/reward", "max"))``
can rank its checkpoints. The metadata is the latest result, whose weights are
those of its ``eval/step``, at or before the checkpoint's frame count; only
``KeepBest`` saves exactly the weights a result evaluated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torchrl.trainers import TrainerHookBase

from ray_eval.integrations.best import KeepBest
from ray_eval.integrations.record import EpisodeRecord
from ray_eval.integrations.schedule import Delivered, EvalSchedule


class RayEvalHook(TrainerHookBase):
    """Evaluate ``policy`` every ``interval`` frames on ``evaluator`` (see the module docstring).

    ``env_parts``: ``{model id: module}`` of the training env whose state the
    evaluation envs must share (``weights_dict``). ``frame_skip`` divides
    ``r_evaluation`` as in ``LogValidationReward``. ``log_pbar`` shows
    ``r_evaluation`` on the progress bar.
    """

    def __init__(
        self,
        evaluator,
        *,
        policy,
        interval: int,
        env_parts: Mapping[str, Any] | None = None,
        keep_best: KeepBest | None = None,
        stop: Any = None,
        record: EpisodeRecord | None = None,
        when_busy: str = "wait",
        wait_first: bool = True,
        frame_skip: int = 1,
        log_pbar: bool = False,
        prefix: str = "eval",
    ) -> None:
        self.evaluator = evaluator
        self.policy = policy
        self.env_parts = dict(env_parts) if env_parts else None
        self.schedule = EvalSchedule(
            evaluator,
            interval,
            keep_best=keep_best,
            stop=stop,
            record=record,
            when_busy=when_busy,
            at_start=True,
            prefix=prefix,
        )
        self.wait_first = wait_first
        self.frame_skip = frame_skip
        self.log_pbar = log_pbar
        self.prefix = prefix
        self._trainer = None

    def register(self, trainer, name: str = "ray_eval") -> None:
        """Run on ``trainer``: after each logging step (``post_steps_log``), its state
        saved with the trainer's (module ``name``), the pending results handled at its
        ``shutdown``."""
        self._trainer = trainer
        trainer.register_module(name, self)
        trainer.register_op("post_steps_log", self)
        trainer.register_op("shutdown", self.finish)

    def __call__(self, batch=None) -> None:
        trainer = self._require_trainer()
        frames = int(trainer.collected_frames)
        first = self.schedule.triggered == 0
        delivered = self.schedule.step(frames, self.policy, weights_dict=self.env_parts)
        if first and self.wait_first:
            delivered += self.schedule.drain()
        for item in delivered:
            self._log(trainer, item)
        if self.schedule.should_stop and not trainer._stop_training:
            trainer.request_stop(f"ray_eval: {self.schedule.stop_reason}")
        return None

    def finish(self) -> list[Delivered]:
        """Wait for the pending evaluations and log them (the trainer's ``shutdown`` op)."""
        delivered = self.schedule.finish()
        if self._trainer is not None:
            for item in delivered:
                self._log(self._trainer, item)
        return delivered

    def _log(self, trainer, item: Delivered) -> None:
        values = self.scalars(item.result)
        logger = trainer.logger
        for key, value in values.items():
            # EarlyStopping and the progress bar read the trainer's history
            trainer._log_dict[key].append(value)
            if logger is not None:
                logger.log_scalar(key, value, step=item.step)
        if self.log_pbar and trainer.progress_bar and hasattr(trainer, "_pbar_str"):
            trainer._pbar_str["r_evaluation"] = values["r_evaluation"]

    def scalars(self, result) -> dict[str, float]:
        """What is logged of a result: its numbers, and LogValidationReward's two names."""
        out = {
            key: float(value)
            for key, value in result.items()
            if isinstance(value, int | float | np.number) and not isinstance(value, bool)
        }
        episodes = getattr(result, "episodes", None)
        steps = int(episodes.lengths.sum()) if episodes is not None else 0
        per_step = float(episodes.returns.sum()) / steps if steps else float("nan")
        out["r_evaluation"] = per_step / self.frame_skip
        out["total_r_evaluation"] = float(result[f"{self.prefix}/reward"])
        return out

    def checkpoint_metadata(self, trainer=None) -> dict[str, float]:
        """The latest result, for ``Trainer(checkpoint_metadata=...)`` (see the module
        docstring); empty before the first one."""
        if not self.schedule.history:
            return {}
        return self.scalars(self.schedule.history[-1].result)

    def _require_trainer(self):
        if self._trainer is None:
            raise RuntimeError("RayEvalHook is not registered: call hook.register(trainer)")
        return self._trainer

    def state_dict(self) -> dict[str, Any]:
        """The schedule's state (``EvalSchedule.state_dict``), saved with the trainer's."""
        return self.schedule.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` saved."""
        self.schedule.load_state_dict(state_dict)
