"""Per-episode outcomes: what a chunk produced, and all episodes of an evaluation.

Plain numpy containers (no torch), so the pool actor can aggregate them
without importing the ML stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

SUCCESS_KEY = "is_success"


@dataclass
class EpisodeBatch:
    """Per-episode outcomes of one chunk (arrays are in the chunk's episode order)."""

    member: str
    indices: np.ndarray
    seeds: np.ndarray
    returns: np.ndarray  # float64 sum of rewards
    lengths: np.ndarray  # int64 env steps
    infos: dict[str, np.ndarray] = field(default_factory=dict)  # per-episode scalars
    frames: dict[int, np.ndarray] = field(default_factory=dict)  # episode index -> (T, H, W, C)
    seconds: float = 0.0  # wall time of the chunk's rollout
    worker: int = -1  # filled in by whoever ran it
    weights_id: str = ""  # object-store id of the weights it ran with ("" for the initial ones)
    weights_loads: int = 0  # weights payloads its worker read for it (0: they were in already)
    weights_loaded_bytes: int = 0  # bytes its worker wrote into its policy for it
    trajectories: list | None = None  # per episode, a TensorDict of its steps (metrics_fn)
    # multi-agent envs: per agent group, each episode's per-agent returns ([episode, agent])
    agent_returns: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def env_steps(self) -> int:
        return int(self.lengths.sum())


@dataclass
class EpisodeData:
    """Every episode of one evaluation, in plan order (suite members in order)."""

    members: np.ndarray  # suite member name per episode ("" for a single env)
    indices: np.ndarray  # episode index within its member
    seeds: np.ndarray
    returns: np.ndarray
    lengths: np.ndarray
    workers: np.ndarray  # which worker ran the episode (-1: in-process)
    weights_ids: np.ndarray  # object-store id of the weights each episode ran with
    infos: dict[str, np.ndarray] = field(default_factory=dict)
    frames: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    # multi-agent envs: per agent group, each episode's per-agent returns ([episode, agent],
    # NaN for episodes of a suite member without that group)
    agent_returns: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_batches(
        cls, batches: Sequence[EpisodeBatch], member_order: Sequence[str]
    ) -> EpisodeData:
        """The episodes of the workers' batches, in plan order: members in
        ``member_order``, then episode index."""
        rank = {m: i for i, m in enumerate(member_order)}
        batches = sorted(batches, key=lambda b: (rank[b.member], int(b.indices[0])))
        n = [len(b.indices) for b in batches]
        info_keys = sorted({k for b in batches for k in b.infos})
        return cls(
            members=np.concatenate(
                [np.full(k, b.member, dtype=object) for k, b in zip(n, batches)]
            ),
            indices=np.concatenate([b.indices for b in batches]),
            seeds=np.concatenate([b.seeds for b in batches]),
            returns=np.concatenate([b.returns for b in batches]),
            lengths=np.concatenate([b.lengths for b in batches]),
            workers=np.concatenate([np.full(k, b.worker) for k, b in zip(n, batches)]),
            weights_ids=np.concatenate(
                [np.full(k, b.weights_id, dtype=object) for k, b in zip(n, batches)]
            ),
            infos={
                key: np.concatenate(
                    [b.infos.get(key, np.full(len(b.indices), np.nan)) for b in batches]
                )
                for key in info_keys
            },
            frames={(b.member, i): f for b in batches for i, f in b.frames.items()},
            agent_returns=_agent_returns(batches),
        )

    def select(self, member: str) -> EpisodeData:
        """The episodes of one suite member (``""`` for a single env)."""
        mask = self.members == member
        return EpisodeData(
            members=self.members[mask],
            indices=self.indices[mask],
            seeds=self.seeds[mask],
            returns=self.returns[mask],
            lengths=self.lengths[mask],
            workers=self.workers[mask],
            weights_ids=self.weights_ids[mask],
            infos={k: v[mask] for k, v in self.infos.items()},
            frames={k: v for k, v in self.frames.items() if k[0] == member},
            agent_returns={
                k: v[mask] for k, v in self.agent_returns.items() if not np.isnan(v[mask]).all()
            },
        )

    def __len__(self) -> int:
        return len(self.returns)


def _agent_returns(batches: Sequence[EpisodeBatch]) -> dict[str, np.ndarray]:
    """Per group, every batch's per-agent returns in order (NaN rows where a batch has none)."""
    agents: dict[str, int] = {}
    for b in batches:
        for name, values in b.agent_returns.items():
            agents[name] = max(agents.get(name, 0), values.shape[1])
    out = {}
    for name, count in agents.items():
        rows = []
        for b in batches:
            values = b.agent_returns.get(name)
            block = np.full((len(b.indices), count), np.nan)
            if values is not None:
                block[:, : values.shape[1]] = values
            rows.append(block)
        out[name] = np.concatenate(rows)
    return out
