"""Can the user's objects travel to the Ray workers? Errors that name the part that cannot.

Everything the workers build from (env factories, policies, policy factories,
metric functions) is pickled with Ray's cloudpickle on the driver. Two things
are done here before that:

* ``register_user_modules`` finds the modules the user's objects come from that
  are not installed (a test file, a script's sibling module, a notebook helper
  on a path added by hand) and registers them to be pickled *by value*: a worker
  could not import them by name, so their functions and classes travel with
  the objects instead.
* ``check_picklable`` pickles the object once and, when that fails, walks it and
  names the deepest parts that fail, by their path (``policy.lock (_thread.lock)``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import inspect
import logging
import os
import site
import sys
import sysconfig
import types
from typing import Any

import ray

log = logging.getLogger("ray_eval")

# The workers run ray_eval itself: never ship it by value.
_ALWAYS_IMPORTABLE = frozenset({"ray_eval", "__main__"})  # __main__: cloudpickle ships it anyway
_WALK_BUDGET = 20_000  # objects visited per registration walk, at most


def check_picklable(obj: Any, what: str) -> None:
    """Make ``obj`` ready for the workers, or raise ``TypeError`` naming what cannot go.

    First registers the not-installed modules ``obj`` is made of to be pickled by
    value (``register_user_modules``). The error names the object's parts that
    fail, by their path, e.g. ``policy.lock (_thread.lock)`` or
    ``env.<closure>.conn (socket.socket)``.
    """
    if obj is None:
        return
    if isinstance(obj, dict) and list(obj) == [""]:  # a plain (non-suite) env
        obj = obj[""]
    registered = register_user_modules(obj)
    error = _pickle_error(obj)
    if error is not None and registered and _by_reference_works(obj, registered):
        return
    if error is not None:
        culprits = unpicklable_parts(obj, what)
        raise TypeError(
            f"{what} cannot be pickled for the Ray workers: {type(error).__name__}: {error}"
            + (f"; not picklable: {', '.join(culprits)}" if culprits else "")
            + ". Pass a factory that builds it inside the worker, or use backend='local'."
        ) from None


def _pickle_error(obj: Any) -> Exception | None:
    try:
        ray.cloudpickle.dumps(obj)
    except Exception as error:
        return error
    return None


def _by_reference_works(obj: Any, modules: list[str]) -> bool:
    """Fall back to pickling ``modules`` by name when by value cannot work (e.g. a
    function of theirs uses a module-level lock): as before, the workers then
    need to import them."""
    _unregister(modules)
    if _pickle_error(obj) is not None:
        _register(modules)  # by value is the way that can work once the user fixes it
        return False
    log.warning(
        "modules %s cannot be pickled by value; the Ray workers must be able to import them",
        ", ".join(modules),
    )
    return True


# -- modules the workers cannot import ---------------------------------------------------


def register_user_modules(*objs: Any) -> list[str]:
    """Register the not-installed modules that ``objs`` are made of to be pickled by value.

    Walks functions (their closures, defaults and the globals they use),
    ``functools.partial``, bound methods, classes (their bases and methods),
    instances (their attributes, ``nn.Module`` children included) and containers.
    Registers, with Ray's cloudpickle and plain ``cloudpickle``, every module met
    that ``is_user_module``. Returns the names newly registered.
    """
    modules: set[str] = set()
    walker = _ModuleWalker(modules)
    for obj in objs:
        walker.visit(obj)
    new = sorted(m for m in modules if m not in _registered)
    _register(new)
    return new


_registered: set[str] = set()


def _picklers() -> list:
    picklers = [ray.cloudpickle]
    try:
        import cloudpickle

        if cloudpickle is not ray.cloudpickle:
            picklers.append(cloudpickle)
    except ImportError:
        pass
    return picklers


def _register(names: list[str]) -> None:
    for name in names:
        module = sys.modules.get(name)
        if module is None:
            continue
        for pickler in _picklers():
            pickler.register_pickle_by_value(module)
        _registered.add(name)


def _unregister(names: list[str]) -> None:
    for name in names:
        module = types.ModuleType(name)  # only its name matters to cloudpickle here
        for pickler in _picklers():
            with contextlib.suppress(ValueError, TypeError):  # not registered
                pickler.unregister_pickle_by_value(module)
        _registered.discard(name)


def is_user_module(name: str) -> bool:
    """True when module ``name`` is the user's own code, not installed.

    Installed means: in the standard library, in a site-packages/dist-packages
    folder, or the top-level package of an installed distribution (which covers
    editable installs, whose files lie outside site-packages). ray_eval itself
    and ``__main__`` (which cloudpickle always ships by value) are never registered.
    """
    top = name.partition(".")[0]
    if top in _ALWAYS_IMPORTABLE or name in _ALWAYS_IMPORTABLE:
        return False
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return False
    path = getattr(sys.modules.get(name), "__file__", None)
    return bool(path) and _is_user_file(top, path)


@functools.lru_cache(maxsize=4096)
def _is_user_file(top: str, path: str) -> bool:
    path = os.path.realpath(path)
    if any(path.startswith(root) for root in _installed_roots()):
        return False
    return top not in _distribution_packages()


@functools.lru_cache(maxsize=1)
def _installed_roots() -> tuple[str, ...]:
    roots = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            roots.add(path)
    roots.update(getattr(site, "getsitepackages", list)())
    if site.ENABLE_USER_SITE:
        roots.add(site.getusersitepackages())
    return tuple(os.path.join(os.path.realpath(r), "") for r in roots)


@functools.lru_cache(maxsize=1)
def _distribution_packages() -> frozenset[str]:
    return frozenset(importlib.metadata.packages_distributions())


class _ModuleWalker:
    """Visits an object graph once and collects the user modules it is made of."""

    def __init__(self, found: set[str]) -> None:
        self.found = found
        self.seen: set[int] = set()
        self.budget = _WALK_BUDGET
        self._leaves = _leaf_types()

    def visit(self, obj: Any) -> None:
        stack = [obj]
        while stack and self.budget > 0:
            item = stack.pop()
            if id(item) in self.seen or isinstance(item, self._leaves):
                continue
            self.seen.add(id(item))
            self.budget -= 1
            stack.extend(self._children(item))

    def _note(self, module_name: str | None) -> bool:
        """Record ``module_name`` if it is the user's; True if its code must be walked."""
        if not module_name:
            return False
        if is_user_module(module_name):
            self.found.add(module_name)
            return True
        return module_name == "__main__"

    def _children(self, obj: Any) -> list:
        if isinstance(obj, dict):
            return [*obj.keys(), *obj.values()]
        if isinstance(obj, list | tuple | set | frozenset):
            return list(obj)
        if isinstance(obj, types.ModuleType):
            self._note(obj.__name__)
            return []
        if isinstance(obj, functools.partial):
            return [obj.func, *obj.args, *obj.keywords.values()]
        if inspect.ismethod(obj):
            return [obj.__func__, obj.__self__]
        if isinstance(obj, types.FunctionType):
            return self._function_parts(obj)
        if isinstance(obj, type):
            return self._class_parts(obj)
        if isinstance(obj, staticmethod | classmethod):
            return [obj.__func__]
        if isinstance(obj, property):
            return [obj.fget, obj.fset, obj.fdel]
        children: list = [type(obj)]
        state = getattr(obj, "__dict__", None)
        if isinstance(state, dict):
            children.append(state)
        return children

    def _function_parts(self, fn: types.FunctionType) -> list:
        parts = [c.cell_contents for c in fn.__closure__ or () if _has_contents(c)]
        parts.extend(fn.__defaults__ or ())
        parts.extend((fn.__kwdefaults__ or {}).values())
        if self._note(fn.__module__):
            names = _global_names(fn.__code__)
            parts.extend(fn.__globals__[n] for n in names if n in fn.__globals__)
        return parts

    def _class_parts(self, cls: type) -> list:
        if not self._note(cls.__module__):
            return []
        return [*cls.__bases__, *vars(cls).values()]


def _leaf_types() -> tuple[type, ...]:
    """Types with nothing of the user's inside: skipped by the walk."""
    leaves: list[type] = [str, bytes, bytearray, int, float, complex, bool, type(None), range]
    torch = sys.modules.get("torch")
    if torch is not None:
        leaves += [torch.Tensor, torch.dtype, torch.device, torch.Size]
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        leaves += [numpy.ndarray, numpy.generic, numpy.dtype]
    return tuple(leaves)


def _has_contents(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # an empty cell
        return False
    return True


def _global_names(code: types.CodeType) -> set[str]:
    """Names a code object (and the code nested in it) may read as globals."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


# -- naming what cannot be pickled ------------------------------------------------------


def unpicklable_parts(obj: Any, path: str, depth: int = 6, budget: list | None = None) -> list:
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
            deeper = unpicklable_parts(child, where, depth - 1, budget) if depth > 0 else []
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
