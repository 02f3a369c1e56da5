"""Checkpoints on disk: finding them, their step, whether they are complete, their weights.

Four formats are read:

* a ``torch.save``d ``state_dict`` (``.pt``/``.pth``/``.ckpt``), loaded with
  ``weights_only=True``; ``checkpoint.key`` picks the policy's entry out of a
  training checkpoint dict such as ``{"policy": ..., "optimizer": ..., "step": ...}``;
* a TensorDict saved with ``TensorDict.save``/``memmap`` (a directory);
* a whole pickled ``nn.Module``, only with ``allow_pickle`` (unpickling runs code);
* a ``torchrl.checkpoint`` (a directory with a ``manifest.json``, or a ``.torchrl``
  archive): the component ``checkpoint.key`` (default ``"policy"``, where TorchRL's
  ``Trainer`` puts its policy), and components named ``env...`` (``KeepBest``'s env
  parts), which are loaded into the evaluation envs as ``weights_dict``.

The step comes from metadata beside the checkpoint (``<name>.json`` holding
``{"step": 1000}``), else from a TorchRL checkpoint's manifest (``step``, or a
``Trainer``'s ``collected_frames``), else from the name (``policy_step_1000.pt``,
TorchRL's rotated ``checkpoint-000000001000``), else from a ``step`` entry inside
a training checkpoint dict.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_eval.errors import one_line

SUFFIXES = (".pt", ".pth", ".ckpt")
STEP_IN_NAME = re.compile(r"(?:^|[_\-.])step[_\-=]?(\d+)(?![\d])", re.IGNORECASE)
IGNORED_NAME = re.compile(r"^\.|(\.tmp|\.part|\.partial|~)$|\.tmp\.", re.IGNORECASE)
# TorchRL's CheckpointRotation names: <prefix>-<step, 12 digits>[.torchrl]
TORCHRL_ROTATED_NAME = re.compile(r"^.+-(\d+)(?:\.torchrl)?$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or not weights; the message is one line."""


@dataclass(frozen=True)
class WithEnvParts:
    """A checkpoint's policy weights and the env parts' states saved with them
    (``Evaluator.evaluate(policy, weights_dict=env_parts)``)."""

    policy: Any
    env_parts: dict[str, Any]


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file or directory and its training step (``None``: unknown)."""

    path: Path
    step: int | None

    @property
    def name(self) -> str:
        return self.path.name


def metadata_path(path: Path) -> Path:
    """Where a checkpoint's metadata lies: ``<checkpoint>.json`` beside it."""
    return path.with_name(path.name + ".json")


def step_of(path: str | Path) -> int | None:
    """The step from the metadata beside ``path``, else from its name; ``None`` if neither."""
    path = Path(path)
    meta = metadata_path(path)
    if meta.is_file():
        try:
            data = json.loads(meta.read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(
                f"checkpoint metadata {meta} is not valid JSON: {error}"
            ) from None
        step = data.get("step") if isinstance(data, dict) else None
        if isinstance(step, bool) or not isinstance(step, int):
            raise CheckpointError(
                f"checkpoint metadata {meta} needs an integer 'step', got {step!r}"
            )
        return step
    if _is_torchrl(path):
        step = _torchrl_step(path)
        if step is not None:
            return step
        rotated = TORCHRL_ROTATED_NAME.match(path.name)
        return int(rotated.group(1)) if rotated else None
    stem = path.name
    for suffix in SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    matches = STEP_IN_NAME.findall(stem)
    return int(matches[-1]) if matches else None


def is_checkpoint(path: Path) -> bool:
    """A ``.pt``/``.pth``/``.ckpt`` file, a TensorDict directory (with ``meta.json``) or a
    TorchRL checkpoint (a directory with ``manifest.json``, a ``.torchrl`` archive)."""
    if IGNORED_NAME.search(path.name):
        return False
    if _is_torchrl(path):
        return True
    if path.is_dir():
        return (path / "meta.json").exists()
    return path.is_file() and path.name.lower().endswith(SUFFIXES)


def _is_torchrl(path: Path) -> bool:
    from ray_eval.integrations.torchrl_checkpoints import looks_like_torchrl_checkpoint

    return looks_like_torchrl_checkpoint(path)


def _torchrl_step(path: Path) -> int | None:
    from ray_eval.integrations.torchrl_checkpoints import manifest, manifest_step

    try:
        return manifest_step(manifest(path))
    except Exception as error:
        raise CheckpointError(
            f"TorchRL checkpoint {path} has no readable manifest: {one_line(error)}"
        ) from None


def find_checkpoints(directory: str | Path) -> tuple[list[Checkpoint], list[Path]]:
    """Checkpoints in ``directory`` with a known step, in step order, and those without one."""
    directory = Path(directory)
    found, stepless = [], []
    for path in sorted(directory.iterdir()):
        if not is_checkpoint(path):
            continue
        try:
            step = step_of(path)
        except CheckpointError:
            step = None  # metadata being written: looked at again on the next scan
            continue
        if step is None:
            stepless.append(path)
        else:
            found.append(Checkpoint(path.resolve(), step))
    found.sort(key=lambda c: (c.step, c.name))
    return found, stepless


def signature(path: Path) -> tuple:
    """Sizes and modification times of the checkpoint (every file of a directory)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    meta = metadata_path(path)
    if meta.exists():
        files.append(meta)
    out = []
    for file in files:
        try:
            st = file.stat()
        except FileNotFoundError:
            continue
        out.append((str(file), st.st_size, st.st_mtime_ns))
    return tuple(out)


def quiet_for(sig: tuple) -> float:
    """Seconds since the newest modification in a signature."""
    if not sig:
        return 0.0
    newest = max(mtime for _, _, mtime in sig) / 1e9
    return time.time() - newest


def load_weights(
    path: str | Path, *, allow_pickle: bool = False, key: str | None = None
) -> tuple[Any, int | None]:
    """The weights in a checkpoint, and the step stored inside it (if any).

    Raises ``CheckpointError`` (one line) for a missing, truncated or corrupt
    file, a pickled module without ``allow_pickle``, or content that is not
    weights.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if _is_torchrl(path):
        return _load_torchrl(path, key or "policy")
    if path.is_dir():
        return _load_tensordict_dir(path), None
    obj = _torch_load(path, allow_pickle)
    return _weights_in(obj, path, key)


def _load_torchrl(path: Path, key: str) -> tuple[Any, int | None]:
    from ray_eval.integrations.torchrl_checkpoints import manifest, manifest_step, read_components

    try:
        found = manifest(path)
        names = [
            key,
            *(n for n in found["components"] if n == "env" or n.startswith(("env.", "env["))),
        ]
        if key not in found["components"]:
            raise CheckpointError(
                f"TorchRL checkpoint {path} has no component {key!r} (checkpoint.key); "
                f"its components are {sorted(found['components'])}"
            )
        states, _ = read_components(path, names)
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(
            f"TorchRL checkpoint {path} cannot be read: {type(error).__name__}: {one_line(error)}"
        ) from None
    policy = states.pop(key)
    if not isinstance(policy, Mapping):
        raise CheckpointError(f"TorchRL checkpoint {path}: component {key!r} is not a state dict")
    _check_tensors(policy, path, key)
    step = manifest_step(found)
    return (WithEnvParts(policy, states) if states else policy), step


def _load_tensordict_dir(path: Path):
    from tensordict import TensorDict

    if not (path / "meta.json").exists():
        raise CheckpointError(
            f"checkpoint directory {path} is not a saved TensorDict (no meta.json); "
            f"save one with TensorDict.save(path) or td.memmap(path)"
        )
    try:
        return TensorDict.load_memmap(path).to_tensordict()
    except Exception as error:
        raise CheckpointError(
            f"checkpoint {path} cannot be read as a TensorDict: {one_line(error)}"
        ) from None


def _torch_load(path: Path, allow_pickle: bool):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as error:
        # A class to import (GLOBAL) is what a pickled object needs; garbage fails otherwise.
        if not allow_pickle and "Unsupported global" in str(error):
            raise CheckpointError(
                f"checkpoint {path} holds pickled Python objects (e.g. a whole nn.Module); "
                f"unpickling runs code from the file: set checkpoint.allow_pickle=true if you trust it"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} is corrupt or incomplete: {type(error).__name__}: {one_line(error)}"
        ) from None


def _weights_in(obj: Any, path: Path, key: str | None) -> tuple[Any, int | None]:
    from tensordict import TensorDictBase
    from torch import nn

    inner_step = None
    if key is not None:
        if not isinstance(obj, Mapping | TensorDictBase) or key not in obj.keys():
            keys = sorted(map(str, obj.keys())) if isinstance(obj, Mapping | TensorDictBase) else []
            raise CheckpointError(
                f"checkpoint {path} has no entry {key!r} (checkpoint.key); its keys are {keys[:10]}"
            )
        step = obj.get("step") if isinstance(obj, Mapping) else None
        if isinstance(step, int) and not isinstance(step, bool):
            inner_step = step
        obj = obj[key]
    if isinstance(obj, nn.Module | TensorDictBase):
        return obj, inner_step
    if isinstance(obj, Mapping):
        _check_tensors(obj, path, key)
        return obj, inner_step
    raise CheckpointError(
        f"checkpoint {path} holds a {type(obj).__name__}, not weights "
        f"(expected a state_dict, a TensorDict or an nn.Module)"
    )


def _check_tensors(mapping: Mapping, path: Path, key: str | None) -> None:
    bad = _first_non_tensor(mapping)
    if bad is None:
        return
    name, value = bad
    candidates = [str(k) for k, v in mapping.items() if isinstance(v, Mapping)]
    hint = (
        f"; set checkpoint.key to the entry with the policy's weights (one of {candidates})"
        if candidates and key is None
        else ""
    )
    raise CheckpointError(
        f"checkpoint {path} is not a state_dict: entry {name} holds a {type(value).__name__}{hint}"
    )


def _first_non_tensor(mapping: Mapping, prefix: str = "") -> tuple[str, Any] | None:
    import torch

    for name, value in mapping.items():
        if isinstance(value, Mapping):
            found = _first_non_tensor(value, f"{prefix}{name}.")
            if found is not None:
                return found
        elif not isinstance(value, torch.Tensor):
            return f"{prefix}{name}", value
    return None


def write_metadata(path: str | Path, step: int, **extra: Any) -> Path:
    """Write ``<checkpoint>.json`` with the step (atomically), for writers that keep names free."""
    meta = metadata_path(Path(path))
    tmp = meta.with_name(meta.name + ".tmp")
    tmp.write_text(json.dumps({"step": int(step), **extra}))
    os.replace(tmp, meta)
    return meta
