"""The results file: one JSON object per line, appended atomically.

A line is whole or absent. Each append takes an exclusive ``flock`` on the
file, cuts off a partial last line a crashed writer may have left, writes the
new line with ``O_APPEND`` and ``fsync``s it. Readers skip anything that does
not parse, so a file is always usable. Appends carry a key (config hash and
checkpoint): a line whose key is already in the file is not written twice,
even by two writers at once.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHUNK = 1 << 16


def record_key(record: dict) -> tuple[str, str | None]:
    """What identifies an evaluation in a results file: (config hash, checkpoint path)."""
    return record.get("config_hash", ""), record.get("checkpoint")


def read_results(path: str | Path) -> list[dict]:
    """Every whole result line of ``path`` (none if it does not exist)."""
    return list(_iter_records(Path(path)))


def _iter_records(path: Path) -> Iterator[dict]:
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return
    with handle:
        for line in handle:
            if not line.endswith(b"\n"):
                return  # a partial last line: not written yet, or cut by a crash
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


def append_result(path: str | Path, record: dict, *, dedupe: bool = True) -> bool:
    """Append ``record`` as one line; False if a line with its key was already there."""
    path = Path(path)
    data = (json.dumps(_json_safe(record), separators=(", ", ": ")) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _drop_partial_tail(fd)
        if dedupe and _has_key(path, record_key(record)):
            return False
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
        return True
    finally:
        os.close(fd)  # releases the lock


def _has_key(path: Path, key: tuple) -> bool:
    return any(record_key(r) == key for r in _iter_records(path))


def _drop_partial_tail(fd: int) -> None:
    """Truncate the file after its last newline (a line cut short by a crash)."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    end = size
    while end > 0:
        start = max(0, end - CHUNK)
        block = os.pread(fd, end - start, start)
        cut = block.rfind(b"\n")
        if cut >= 0:
            os.ftruncate(fd, start + cut + 1)
            return
        end = start
    os.ftruncate(fd, 0)


def _json_safe(value: Any) -> Any:
    """Plain JSON: NaN and infinities become null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
