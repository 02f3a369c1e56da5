"""Which number of a result decides "best" and "stop": a metric, a direction, a margin.

A result is the flat dict an ``Evaluator`` returns (``{"eval/reward": ...}``), or
the flat TensorDict ``on_result`` receives: ``Criterion.value`` reads either.
Metric names are given with or without the prefix (``"reward_ci_low"`` or
``"eval/reward_ci_low"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MODES = ("max", "min")
# The lower bound of the mean's 95% bootstrap interval: a checkpoint whose mean is high
# only because a few lucky episodes pulled it up has a wide interval and a low bound.
DEFAULT_METRIC = "reward_ci_low"


@dataclass(frozen=True)
class Criterion:
    """``metric`` of a result, better when higher (``mode="max"``) or lower (``"min"``).

    ``min_delta``: how much better a value must be to count as an improvement.
    """

    metric: str = DEFAULT_METRIC
    mode: str = "max"
    min_delta: float = 0.0
    prefix: str = "eval"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'max' or 'min', got {self.mode!r}")
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"metric must be a non-empty metric name, got {self.metric!r}")
        if not (isinstance(self.min_delta, int | float) and self.min_delta >= 0):
            raise ValueError(f"min_delta must be a number >= 0, got {self.min_delta!r}")

    @property
    def key(self) -> str:
        """The metric's key in a result (``"eval/reward_ci_low"``)."""
        if self.metric.startswith(f"{self.prefix}/"):
            return self.metric
        return f"{self.prefix}/{self.metric}"

    def value(self, result: Mapping[str, Any]) -> float:
        """The metric's value in ``result``; ``KeyError`` naming the keys it has if absent."""
        return scalar(result, self.key)

    def better(self, value: float, than: float | None) -> bool:
        """Whether ``value`` improves on ``than`` (``None``: nothing yet) by more than
        ``min_delta``. NaN never improves."""
        if math.isnan(value):
            return False
        if than is None or math.isnan(than):
            return True
        if self.mode == "max":
            return value > than + self.min_delta
        return value < than - self.min_delta

    def describe(self) -> str:
        """``"eval/reward_ci_low (max)"``: the key and the direction, for messages."""
        return f"{self.key} ({self.mode})"


def scalar(result: Mapping[str, Any], key: str) -> float:
    """``result[key]`` as a float, from a dict of numbers or a flat TensorDict."""
    try:
        value = result[key]
    except KeyError:
        keys = sorted(str(k) for k in result.keys())
        raise KeyError(
            f"the result has no {key!r}; its keys are {keys[:12]}{' ...' if len(keys) > 12 else ''}"
        ) from None
    if hasattr(value, "item"):
        value = value.item()
    return float(value)


def result_step(result: Mapping[str, Any], prefix: str = "eval") -> int:
    """The training step a result belongs to (``<prefix>/step``)."""
    return int(scalar(result, f"{prefix}/step"))
