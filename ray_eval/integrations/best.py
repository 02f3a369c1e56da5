"""Keep the best checkpoint: the evaluated weights, their env-part state, result and step.

``KeepBest(directory)`` is fed each result with the weights that result was
evaluated with (``update(result, weights, weights_dict=...)``). On a new best
it writes, atomically:

* ``directory/best-<step, 12 digits>/``: a ``torchrl.checkpoint`` directory with
  the policy's state dict under ``"policy"`` and each env part of
  ``weights_dict`` (a ``VecNormV2``'s statistics, ...) under its model id
  (``"env.transform[0]"``); its manifest's metadata holds the step, the
  criterion, its value and the whole result;
* ``directory/best.json``: the same metadata and the checkpoint's name.

The new checkpoint is complete before the previous one is removed, so a reader
always finds one. ``load_best(directory)`` gives everything back, and
``Evaluator.evaluate(best.weights, step=best.step, weights_dict=best.weights_dict)``
then reproduces ``best.result`` exactly (the episodes' seeds derive from the
evaluator's seed and the step). Without the env parts saved beside the
weights, a best model evaluated with running normalization statistics cannot
be reproduced (stable-baselines3 issue #1556).

"Best" is by ``metric`` (default: the lower bound of the mean's 95% interval,
``reward_ci_low``, so a mean pulled up by a few lucky episodes does not win)
and ``mode`` (``"max"``/``"min"``); ``metric="reward"`` picks by the mean.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import TensorDictBase
from torch import nn

from ray_eval.integrations.criteria import DEFAULT_METRIC, Criterion, result_step
from ray_eval.integrations.torchrl_checkpoints import (
    detached,
    manifest,
    read_components,
    write_components,
)

log = logging.getLogger("ray_eval")

POLICY = "policy"
SUMMARY = "best.json"
PREFIX = "best"
_NAME = re.compile(rf"^{PREFIX}-(\d+)$")


def state_of(weights: Any) -> dict[str, Any]:
    """A detached CPU copy of ``weights`` as a state dict.

    An ``nn.Module`` gives its ``state_dict``; a TensorDict (``from_module``) its
    flat ``"a.b"`` keys; a mapping is copied as it is (nested ones stay nested).
    """
    if isinstance(weights, nn.Module):
        return detached(weights.state_dict())
    if isinstance(weights, TensorDictBase):
        return detached(dict(weights.flatten_keys(".").items()))
    if isinstance(weights, Mapping):
        return detached({k: _as_tensor(v) for k, v in weights.items()})
    raise TypeError(
        f"weights must be an nn.Module, a TensorDict or a state dict, got {type(weights).__name__}"
    )


def _as_tensor(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, Mapping):
        return {k: _as_tensor(v) for k, v in value.items()}
    return value


def states_of(weights: Any, weights_dict: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``{component: state dict}`` of one evaluation request, as ``Evaluator.evaluate``
    takes it: ``weights`` fills ``"policy"`` unless ``weights_dict`` has it."""
    parts = dict(weights_dict or {})
    if weights is not None:
        parts.setdefault(POLICY, weights)
    if POLICY not in parts:
        raise ValueError("KeepBest needs the evaluated weights: pass weights= (or 'policy')")
    return {name: state_of(value) for name, value in parts.items()}


@dataclass
class BestCheckpoint:
    """What ``load_best`` returns: pass ``weights``, ``weights_dict`` and ``step``
    to ``Evaluator.evaluate`` to reproduce ``result``."""

    path: Path
    step: int
    metric: str
    mode: str
    value: float
    result: dict[str, Any]
    weights: dict[str, Any]  # the policy's state dict
    weights_dict: dict[str, Any] = field(default_factory=dict)  # env parts by model id
    source: str | None = None  # where the weights came from, if known (a checkpoint path)


class KeepBest:
    """Saves the weights of the best result so far (see the module docstring).

    ``resume=True`` starts from the best already in ``directory`` (same
    metric), so a restarted run keeps a better old best; by default the first
    result of this run replaces whatever is there.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        metric: str = DEFAULT_METRIC,
        *,
        mode: str = "max",
        min_delta: float = 0.0,
        prefix: str = "eval",
        resume: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.criterion = Criterion(metric, mode, min_delta, prefix)
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.best_result: dict[str, Any] | None = None
        self.path: Path | None = None
        self.saves = 0
        if resume:
            self._resume()

    def is_better(self, result: Mapping[str, Any]) -> bool:
        """Whether ``result`` would be a new best."""
        return self.criterion.better(self.criterion.value(result), self.best_value)

    def update(
        self,
        result: Mapping[str, Any],
        weights: Any = None,
        *,
        weights_dict: Mapping[str, Any] | None = None,
        source: str | None = None,
    ) -> bool:
        """Take a result and the weights it was evaluated with; save them if it is a new
        best. Returns whether it was. ``weights``/``weights_dict`` as ``Evaluator.evaluate``
        takes them (or state dicts already copied, e.g. by ``EvalSchedule``). ``source``:
        where the weights came from (a checkpoint's path), kept in the metadata."""
        if not self.is_better(result):
            return False
        self.save(result, states_of(weights, weights_dict), source=source)
        return True

    def save(
        self,
        result: Mapping[str, Any],
        states: Mapping[str, Mapping[str, Any]],
        *,
        source: str | None = None,
    ) -> Path:
        """Write ``states`` (``{"policy": ..., "env.transform[0]": ...}``) as the new best."""
        value = self.criterion.value(result)
        step = result_step(result, self.criterion.prefix)
        plain = _plain(result)
        metadata = {
            "step": step,
            "metric": self.criterion.key,
            "mode": self.criterion.mode,
            "value": _finite_or_none(value),
            "result": plain,
        }
        if source is not None:
            metadata["source"] = str(source)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = write_components(self.directory / f"{PREFIX}-{step:012d}", states, metadata)
        self._write_summary({**metadata, "checkpoint": path.name})
        self._remove_others(path)
        self.best_value, self.best_step, self.best_result = value, step, plain
        self.path = path
        self.saves += 1
        log.info("new best %s = %.6g at step %d: %s", self.criterion.key, value, step, path)
        return path

    def _write_summary(self, summary: dict[str, Any]) -> None:
        target = self.directory / SUMMARY
        tmp = target.with_name(f".{SUMMARY}.tmp")
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, target)

    def _remove_others(self, keep: Path) -> None:
        # by name: TorchRL returns the saved path absolute, the directory may be relative
        for other in self.directory.iterdir():
            if other.name != keep.name and _NAME.match(other.name) and other.is_dir():
                shutil.rmtree(other, ignore_errors=True)

    def _resume(self) -> None:
        try:
            best = load_best(self.directory, with_weights=False)
        except FileNotFoundError:
            return
        if best.metric != self.criterion.key or best.mode != self.criterion.mode:
            log.warning(
                "the best checkpoint in %s was chosen by %s (%s), not %s: starting afresh",
                self.directory,
                best.metric,
                best.mode,
                self.criterion.describe(),
            )
            return
        self.best_value, self.best_step, self.best_result = best.value, best.step, best.result
        self.path = best.path

    def summary(self) -> dict[str, Any] | None:
        """The best so far: its step, value, path and result (``None`` before any)."""
        if self.best_step is None:
            return None
        return {
            "step": self.best_step,
            "metric": self.criterion.key,
            "value": self.best_value,
            "path": str(self.path),
            "result": self.best_result,
        }

    def state_dict(self) -> dict[str, Any]:
        """The best value and step so far (the checkpoint itself stays on disk)."""
        return {"best_value": self.best_value, "best_step": self.best_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` saved."""
        self.best_value = state.get("best_value")
        self.best_step = state.get("best_step")


def load_best(directory: str | os.PathLike, *, with_weights: bool = True) -> BestCheckpoint:
    """The best checkpoint ``KeepBest`` left in ``directory``.

    ``FileNotFoundError`` if there is none. The one named in ``best.json`` is
    taken; if that is gone (a crash between two writes), the newest complete one.
    """
    directory = Path(directory)
    path = _best_path(directory)
    if path is None:
        raise FileNotFoundError(f"no best checkpoint in {directory} (no {PREFIX}-<step> entry)")
    if with_weights:
        states, found = read_components(path)
    else:
        states, found = {}, manifest(path)
    meta = found.get("metadata") or {}
    value = meta.get("value")
    return BestCheckpoint(
        path=path,
        step=int(meta["step"]),
        metric=str(meta.get("metric", "")),
        mode=str(meta.get("mode", "max")),
        value=float("nan") if value is None else float(value),
        result=dict(meta.get("result") or {}),
        weights=states.pop(POLICY, {}),
        weights_dict=states,
        source=meta.get("source"),
    )


def _best_path(directory: Path) -> Path | None:
    try:
        named = json.loads((directory / SUMMARY).read_text()).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        named = None
    if named and (directory / named / "manifest.json").is_file():
        return directory / named
    if not directory.is_dir():
        return None
    complete = [
        p for p in directory.iterdir() if _NAME.match(p.name) and (p / "manifest.json").is_file()
    ]
    return max(complete, key=lambda p: (p / "manifest.json").stat().st_mtime_ns, default=None)


def _plain(result: Mapping[str, Any]) -> dict[str, Any]:
    """The result's scalars as JSON values (NaN and infinities as ``None``)."""
    out = {}
    for key, value in result.items():
        if hasattr(value, "item"):
            value = value.item()
        out[str(key)] = _finite_or_none(value) if isinstance(value, float) else value
    return out


def _finite_or_none(value: float) -> float | None:
    return value if np.isfinite(value) else None
