"""Reading and writing ``torchrl.checkpoint`` checkpoints as plain state dicts.

A TorchRL checkpoint (a directory with a ``manifest.json``, or a ``.torchrl``
archive of one) holds named components, each the ``state_dict`` of an object.
ray_eval reads and writes them without the objects: a holder that keeps the
state dict stands in for each component. TorchRL's ``Trainer`` names its
policy's component ``"policy"``; ``KeepBest`` writes ``"policy"`` and one
component per env part (``"env.transform[0]"``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"
ARCHIVE_SUFFIX = ".torchrl"
FORMAT_NAME = "torchrl.checkpoint"


class StateHolder:
    """Stands in for a component: its state dict is kept, or received on load."""

    def __init__(self, state: Mapping[str, Any] | None = None) -> None:
        self.state = state

    def state_dict(self) -> Mapping[str, Any]:
        return self.state if self.state is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.state = detached(state)


def detached(state: Any) -> Any:
    """A copy of a (nested) state dict whose tensors own their memory on the CPU
    (loaded tensors may map the checkpoint's files)."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, Mapping):
        return {key: detached(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(detached(value) for value in state)
    return state


def looks_like_torchrl_checkpoint(path: Path) -> bool:
    """A directory with TorchRL's manifest, or a ``.torchrl`` archive (cheap: no parsing)."""
    if path.is_dir():
        return (path / MANIFEST).is_file()
    return path.is_file() and path.name.endswith(ARCHIVE_SUFFIX)


def manifest(path: str | Path) -> dict[str, Any]:
    """The checkpoint's manifest (``torchrl.checkpoint.CheckpointError`` if it has none)."""
    from torchrl.checkpoint import Checkpoint

    return Checkpoint.manifest(path)


def read_components(
    path: str | Path, names: Iterable[str] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state dicts of ``names`` (default: every component) and the manifest."""
    from torchrl.checkpoint import Checkpoint

    found = manifest(path)
    available = list(found["components"])
    wanted = available if names is None else list(names)
    missing = [name for name in wanted if name not in available]
    if missing:
        raise KeyError(
            f"TorchRL checkpoint {path} has no component {missing[0]!r}; "
            f"its components are {sorted(available)}"
        )
    holders = {name: StateHolder() for name in wanted}
    Checkpoint(**holders).load(path, components=wanted)
    return {name: holder.state for name, holder in holders.items()}, found


def write_components(
    path: str | Path, states: Mapping[str, Mapping[str, Any]], metadata: Mapping[str, Any]
) -> Path:
    """Save ``{component: state dict}`` as a TorchRL checkpoint directory, atomically
    (TorchRL stages it beside ``path`` and renames it into place)."""
    from torchrl.checkpoint import Checkpoint

    holders = {name: StateHolder(state) for name, state in states.items()}
    return Checkpoint(**holders).save(path, metadata=dict(metadata))


def manifest_step(found: Mapping[str, Any]) -> int | None:
    """The training step a manifest records: ``step``, else a Trainer's ``collected_frames``."""
    metadata = found.get("metadata") or {}
    for key in ("step", "collected_frames"):
        value = metadata.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
