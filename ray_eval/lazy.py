"""Names a package exports but imports only on first use (PEP 562).

The pool actor imports ``ray_eval.backends.pool`` and must not pay for torch and
TorchRL, and ``ray_eval.integrations`` must not pull SB3 or TorchRL's Trainer
until they are asked for: so the packages' ``__init__`` modules export lazily.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``, whose ``exports`` map each
    public name to the module that defines it; a name is cached in ``namespace``
    (the package's ``globals()``) once imported."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
