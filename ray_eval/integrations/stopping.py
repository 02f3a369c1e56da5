"""Early stopping on evaluation results: a threshold, or no improvement for N evaluations.

Each stopper is fed every result in order (``update(result)``) and answers
whether training should stop; once it says so it keeps saying so, with a
``reason``. Feed it from a loop, from ``on_result`` (it reads the flat
TensorDict too), or let ``EvalSchedule`` do it.

With asynchronous evaluation a decision is about the weights of the result's
step, and reaches the trainer when the result is read: ``EvalSchedule``
bounds how late (see its docstring).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping
from typing import Any

from ray_eval.integrations.criteria import DEFAULT_METRIC, Criterion, result_step

_COMPARISONS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_CONDITION = re.compile(
    r"^\s*([A-Za-z_][\w./-]*)\s*(>=|<=|>|<)\s*([-+]?[\d.]+(?:[eE][-+]?\d+)?)\s*$"
)


class StopOnThreshold:
    """Stop once ``metric`` (``op``) ``threshold``, e.g. ``eval/reward_ci_low >= 450``.

    The default metric is the lower bound of the mean's 95% interval: the
    threshold is then met only when the evaluation is confident of it, not by a
    lucky mean of a few episodes. ``metric="reward"`` compares the mean, as
    stable-baselines3's ``StopTrainingOnRewardThreshold`` does.
    """

    def __init__(
        self,
        threshold: float,
        metric: str = DEFAULT_METRIC,
        *,
        op: str = ">=",
        prefix: str = "eval",
    ) -> None:
        if op not in _COMPARISONS:
            raise ValueError(f"op must be one of {sorted(_COMPARISONS)}, got {op!r}")
        if not isinstance(threshold, int | float) or math.isnan(threshold):
            raise ValueError(f"threshold must be a number, got {threshold!r}")
        self.threshold = float(threshold)
        self.op = op
        self.criterion = Criterion(metric, "max" if op.startswith(">") else "min", prefix=prefix)
        self.stopped = False
        self.reason: str | None = None
        self.step: int | None = None  # the step of the result that met the threshold

    @classmethod
    def parse(cls, condition: str, *, prefix: str = "eval") -> StopOnThreshold:
        """From ``"eval/reward_ci_low >= 450"`` (``>=``, ``>``, ``<=`` or ``<``)."""
        match = _CONDITION.match(condition) if isinstance(condition, str) else None
        if match is None:
            raise ValueError(
                f"stop condition {condition!r} must look like 'METRIC OP NUMBER', "
                f"e.g. 'eval/reward_ci_low >= 450' (OP: >=, >, <=, <)"
            )
        metric, op, number = match.groups()
        return cls(float(number), metric, op=op, prefix=prefix)

    def update(self, result: Mapping[str, Any]) -> bool:
        """Take one result; True once the threshold was met (now or before)."""
        if self.stopped:
            return True
        value = self.criterion.value(result)
        if _COMPARISONS[self.op](value, self.threshold):
            self.stopped = True
            self.step = result_step(result, self.criterion.prefix)
            self.reason = (
                f"{self.criterion.key} = {value:.6g} {self.op} {self.threshold:g} "
                f"(the weights of step {self.step})"
            )
        return self.stopped

    def __str__(self) -> str:
        return f"{self.criterion.key} {self.op} {self.threshold:g}"

    def state_dict(self) -> dict[str, Any]:
        """The decision so far (and what it rests on), for a resumed run."""
        return {"stopped": self.stopped, "reason": self.reason, "step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` saved."""
        self.stopped = bool(state.get("stopped", False))
        self.reason = state.get("reason")
        self.step = state.get("step")


class StopOnNoImprovement:
    """Stop after ``patience`` evaluations in a row without a new best ``metric``.

    The first ``min_evals`` evaluations only set the best. An improvement must
    beat the best by more than ``min_delta``. (stable-baselines3's
    ``StopTrainingOnNoModelImprovement(max_no_improvement_evals=k)`` stops after
    ``k + 1`` such evaluations: ``patience=k + 1`` here.)
    """

    def __init__(
        self,
        patience: int,
        metric: str = DEFAULT_METRIC,
        *,
        mode: str = "max",
        min_delta: float = 0.0,
        min_evals: int = 0,
        prefix: str = "eval",
    ) -> None:
        for name, value, least in (("patience", patience, 1), ("min_evals", min_evals, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        self.patience = patience
        self.min_evals = min_evals
        self.criterion = Criterion(metric, mode, min_delta, prefix)
        self.best: float | None = None
        self.best_step: int | None = None
        self.evaluations = 0
        self.without_improvement = 0
        self.stopped = False
        self.reason: str | None = None
        self.step: int | None = None

    def update(self, result: Mapping[str, Any]) -> bool:
        """Take one result; True once ``patience`` results in a row did not improve."""
        if self.stopped:
            return True
        value = self.criterion.value(result)
        step = result_step(result, self.criterion.prefix)
        self.evaluations += 1
        if self.criterion.better(value, self.best):
            self.best, self.best_step = value, step
            self.without_improvement = 0
        elif self.evaluations > self.min_evals:
            self.without_improvement += 1
        if self.without_improvement >= self.patience:
            self.stopped = True
            self.step = step
            self.reason = (
                f"no improvement of {self.criterion.key} in {self.without_improvement} "
                f"evaluations (best {self.best:.6g} at step {self.best_step}; last "
                f"evaluated step {step})"
            )
        return self.stopped

    def __str__(self) -> str:
        return f"no improvement of {self.criterion.key} in {self.patience} evaluations"

    def state_dict(self) -> dict[str, Any]:
        """The decision so far (and what it rests on), for a resumed run."""
        return {
            "best": self.best,
            "best_step": self.best_step,
            "evaluations": self.evaluations,
            "without_improvement": self.without_improvement,
            "stopped": self.stopped,
            "reason": self.reason,
            "step": self.step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` saved."""
        for name in self.state_dict():
            if name in state:
                setattr(self, name, state[name])
