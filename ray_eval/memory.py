"""This process's memory: unmapping object-store pages, returning free heap pages.

Plain ctypes and /proc, no torch: the pool actor, which never imports torch
for itself, uses it too.
"""

from __future__ import annotations

import ctypes
import os
import sys


def libc_function(name: str, argtypes: list, restype):
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError, TypeError):  # no C library to load (e.g. Windows)
        return None
    function.argtypes, function.restype = argtypes, restype
    return function


_madvise = libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int)
_MADV_DONTNEED = 4  # Linux


def release_store_pages() -> int:
    """Unmap the object store's pages from this process; the resident bytes it released.

    Ray maps its whole object store into every worker and never unmaps it: a
    page of a weights object that a worker read stays in the worker's resident
    memory (``RssShmem``) long after the object is gone, and each new object
    Ray places elsewhere adds its size. ``MADV_DONTNEED`` on a shared file
    mapping drops this process's page-table entries only: the data stays in
    the store, and a later read maps it in again. Linux only (0 elsewhere); only
    shared mappings of the store's files (``plasma*``) are touched, never this
    process's private memory.
    """
    if not sys.platform.startswith("linux") or _madvise is None:
        return 0
    before = _resident_shared()
    for start, end in _store_mappings():
        _madvise(start, end - start, _MADV_DONTNEED)
    return before - _resident_shared()


_malloc_trim = libc_function("malloc_trim", [ctypes.c_size_t], ctypes.c_int)  # glibc


def release_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``).

    Tensors up to 32 MiB freed after a transient use (e.g. unpickling a policy)
    otherwise stay in the process's private memory.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


def _store_mappings() -> list[tuple[int, int]]:
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or parts[1][3:4] != "s":  # shared mappings only
                continue
            name = os.path.basename(parts[5].strip().removesuffix(" (deleted)"))
            if name.startswith("plasma"):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((start, end))
    return ranges


def _resident_shared() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
    return 0
