"""A per-episode record of every evaluation: one JSON line each, appended as it arrives.

Each line holds the evaluation's step and, per episode, its return, length,
seed and success (``null`` where the env does not report ``is_success``), so
any tool can reload it without ray_eval::

    import json
    evaluations = [json.loads(line) for line in open("episodes.jsonl")]
    returns = [e["returns"] for e in evaluations]

Lines are appended atomically (a crash leaves whole lines only).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ray_eval.integrations.criteria import result_step
from ray_eval.results.results_file import append_result, read_results

SUCCESS_KEY = "is_success"


def episode_entry(result: Mapping[str, Any], prefix: str = "eval") -> dict[str, Any]:
    """The record line of one evaluation result (it must carry ``result.episodes``)."""
    episodes = getattr(result, "episodes", None)
    if episodes is None:
        raise TypeError(
            "a per-episode record needs the result with its episodes (what evaluate(), "
            "poll() or wait() return); on_result's TensorDict carries only the scalars"
        )
    successes = episodes.infos.get(SUCCESS_KEY)
    entry: dict[str, Any] = {
        "step": result_step(result, prefix),
        "time": round(time.time(), 3),
        "reward": float(result[f"{prefix}/reward"]),
        "num_episodes": len(episodes),
        "returns": episodes.returns.tolist(),
        "lengths": episodes.lengths.tolist(),
        "seeds": episodes.seeds.tolist(),
        "successes": None
        if successes is None
        else [None if np.isnan(s) else bool(s) for s in successes],
    }
    if any(episodes.members):
        entry["members"] = [str(m) for m in episodes.members]
    return entry


class EpisodeRecord:
    """Appends one line per evaluation result to ``path`` (JSON lines)."""

    def __init__(self, path: str | Path, *, prefix: str = "eval") -> None:
        self.path = Path(path)
        self.prefix = prefix

    def append(self, result: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
        """Append ``result``'s episodes (and ``extra`` fields); returns the line written."""
        entry = {**episode_entry(result, self.prefix), **extra}
        append_result(self.path, entry, dedupe=False)
        return entry

    def read(self) -> list[dict[str, Any]]:
        """Every whole line written so far."""
        return read_results(self.path)
