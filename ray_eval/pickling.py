"""Can the user's objects travel to the Ray workers? Errors that name the part that cannot.

Everything the workers build from (env factories, policies, policy factories,
metric functions) is pickled with Ray's cloudpickle on the driver. When that
fails, ``check_picklable`` walks the object and names the deepest parts that
fail, by their path (``policy.lock (_thread.lock)``).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import ray


def check_picklable(obj: Any, what: str) -> None:
    """Raise ``TypeError`` naming what in ``obj`` cannot be sent to the workers.

    The message names the object's parts that fail, by their path, e.g.
    ``policy.lock (_thread.lock)`` or ``env.<closure>.conn (socket.socket)``.
    """
    if obj is None:
        return
    if isinstance(obj, dict) and list(obj) == [""]:  # a plain (non-suite) env
        obj = obj[""]
    try:
        ray.cloudpickle.dumps(obj)
    except Exception as error:
        culprits = _unpicklable_parts(obj, what)
        raise TypeError(
            f"{what} cannot be pickled for the Ray workers: {type(error).__name__}: {error}"
            + (f"; not picklable: {', '.join(culprits)}" if culprits else "")
            + ". Pass a factory that builds it inside the worker, or use backend='local'."
        ) from None


def _unpicklable_parts(obj: Any, path: str, depth: int = 6, budget: list | None = None) -> list:
    """The deepest parts of ``obj`` that cannot be pickled, as ``"path (type)"``."""
    budget = [500] if budget is None else budget  # objects to try, in all
    found = []
    for name, child in _parts(obj):
        budget[0] -= 1
        if budget[0] < 0:
            break
        try:
            ray.cloudpickle.dumps(child)
        except Exception:
            where = f"{path}{name}"
            deeper = _unpicklable_parts(child, where, depth - 1, budget) if depth > 0 else []
            found.extend(deeper or [f"{where} ({_type_name(child)})"])
    return found


def _parts(obj: Any) -> list[tuple[str, Any]]:
    """``obj``'s direct parts, as (path suffix, part)."""
    if isinstance(obj, dict):
        return [(f"[{k!r}]", v) for k, v in obj.items()]
    if isinstance(obj, list | tuple | set | frozenset):
        return [(f"[{i}]", v) for i, v in enumerate(obj)]
    if isinstance(obj, functools.partial):
        return [
            (".func", obj.func),
            *((f".args[{i}]", v) for i, v in enumerate(obj.args)),
            *((f".keywords[{k!r}]", v) for k, v in obj.keywords.items()),
        ]
    if inspect.ismethod(obj):
        return [(".__self__", obj.__self__)]
    if inspect.isfunction(obj):
        try:
            closure = inspect.getclosurevars(obj)
        except Exception:
            return []
        return [
            *((f".<closure>.{k}", v) for k, v in closure.nonlocals.items()),
            *((f".<global>.{k}", v) for k, v in closure.globals.items()),
            *((f".<default>[{i}]", v) for i, v in enumerate(obj.__defaults__ or ())),
        ]
    if hasattr(obj, "_modules") and isinstance(obj._modules, dict):  # an nn.Module
        state = {k: v for k, v in vars(obj).items() if not k.startswith("_")}
        return [*((f".{k}", v) for k, v in obj._modules.items()), *_attrs(state)]
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return _attrs(vars(obj))
    return []


def _attrs(state: dict) -> list[tuple[str, Any]]:
    return [(f".{k}", v) for k, v in state.items()]


def _type_name(obj: Any) -> str:
    cls = type(obj)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )
