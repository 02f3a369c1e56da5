"""The unit of work a rollout loop runs: a contiguous run of planned episodes.

``planning`` makes chunks (which episodes, which seeds); the loops here run them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Chunk:
    """A contiguous run of planned episodes handed to one worker in one call."""

    member: str  # suite member the episodes belong to ("" for a single env)
    indices: np.ndarray  # episode indices within the evaluation (int64)
    seeds: np.ndarray  # one reset seed per episode (int64, fits in uint32)
    record: np.ndarray  # per episode: record video frames?

    def __len__(self) -> int:
        return len(self.indices)
