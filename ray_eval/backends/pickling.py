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
    if error is not None and registered and _by_reference_works(obj, registered, error):
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


def _by_reference_works(obj: Any, modules: list[str], error: Exception) -> bool:
    """Fall back to pickling ``modules`` by name when by value cannot work (e.g. a
    function of theirs uses a module-level lock): as before, the workers then
    need to import them."""
    _unregister(modules)
    if _pickle_error(obj) is not None:
        _register(modules)  # by value is the way that can work once the user fixes it
        return False
    log.warning(
        "modules %s cannot be pickled by value (%s: %s); they are pickled by name, so every "
        "Ray worker must be able to import them: install them on every node, or ship them "
        "with actor_options={'runtime_env': {'py_modules': [...]}}",
        ", ".join(modules),
        type(error).__name__,
        error,
    )
    return True


# -- modules the workers cannot import ---------------------------------------------------


def register_user_modules(*objs: Any) -> list[str]:
    """Register the not-installed modules that ``objs`` are made of to be pickled by value.

    The pickler itself finds them: ``objs`` are pickled (into nothing) by a
    cloudpickle pickler that notes the module of every class, function and module
    it meets, whatever the size of the object graph (no walk that stops after some
    number of objects). Every such module that ``is_user_module`` is registered,
    with Ray's cloudpickle and plain ``cloudpickle``, and the objects are pickled
    again: the functions and classes now pickled by value may use more modules
    (their globals), until no new one appears. Returns the names newly registered.
    """
    new: set[str] = set()
    while True:
        found = set()
        for obj in objs:
            found |= _modules_pickled(obj)
        fresh = sorted(
            name
            for name in found
            if name not in _registered and name in sys.modules and is_user_module(name)
        )
        if not fresh:
            return sorted(new)
        _register(fresh)
        new.update(fresh)


def _modules_pickled(obj: Any) -> set[str]:
    """The modules of the classes, functions and modules that pickling ``obj`` meets
    (up to the first part that cannot be pickled, if any: ``check_picklable`` names it)."""
    collector = _ModuleCollector(_Discard())
    with contextlib.suppress(Exception):
        collector.dump(obj)
    return collector.modules


class _Discard:
    """A file that keeps nothing: the collector's pickles are not needed."""

    def write(self, data) -> int:
        return len(data)


class _ModuleCollector(ray.cloudpickle.CloudPickler):
    """A cloudpickle pickler that notes the module of every class, function and module.

    Tensors and numeric arrays hold no code: their data is skipped (their class is
    noted), so a large policy costs a walk of its objects, not a copy of its weights.
    """

    def __init__(self, file) -> None:
        super().__init__(file)
        self.modules: set[str] = set()
        self._data_types = _data_types()

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.ModuleType):
            self.modules.add(obj.__name__)
        elif isinstance(obj, type | types.FunctionType):
            self.modules.add(getattr(obj, "__module__", None) or "")
        elif type(obj) in self._data_types and not _holds_objects(obj):
            self.modules.add(type(obj).__module__)
            return tuple, ()
        return super().reducer_override(obj)


def _holds_objects(array: Any) -> bool:
    """A numpy array of Python objects (which may be the user's): walked, not skipped."""
    return bool(getattr(getattr(array, "dtype", None), "hasobject", False))


def _data_types() -> frozenset[type]:
    """Exact types whose instances hold data only (a subclass may hold more: walked)."""
    kinds: list[type] = []
    torch = sys.modules.get("torch")
    if torch is not None:
        kinds += [torch.Tensor, torch.nn.Parameter]
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        kinds.append(numpy.ndarray)
    return frozenset(kinds)


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
