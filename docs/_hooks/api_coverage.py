"""mkdocs hook: the API reference documents every public name of ``ray_eval``.

``mkdocs build --strict`` fails when a name in ``ray_eval.__all__`` has no entry on an
``api/`` page, or when it, or a public method or property of it, has no docstring. The
same holds for the training integrations (``ray_eval.integrations.__all__`` and
``ray_eval.sb3.__all__``), whose entries are under their defining module's path
(``ray_eval.integrations.best.KeepBest``); those whose library (stable-baselines3,
TorchRL's trainers) is not installed are not checked.
"""

from __future__ import annotations

import importlib
import inspect
import re

from mkdocs.exceptions import PluginError

import ray_eval

_anchors: set[str] = set()


def on_pre_build(config, **kwargs) -> None:
    _anchors.clear()  # `mkdocs serve` rebuilds in the same process


def on_page_content(html: str, page, **kwargs) -> str:
    if page.file.src_uri.startswith("api/"):
        _anchors.update(re.findall(r'id="(ray_eval[\w.]*)"', html))
    return html


def _undocumented(name: str, obj) -> list[str]:
    missing = [] if inspect.getdoc(obj) else [name]
    if inspect.isclass(obj):
        for member, value in vars(obj).items():
            function = value.fget if isinstance(value, property) else value
            function = getattr(function, "__func__", function)  # static/class methods
            public = not member.startswith("_") and inspect.isfunction(function)
            if public and not function.__doc__:
                missing.append(f"{name}.{member}")
    return missing


def _integrations() -> dict[str, object]:
    """``{anchor: object}`` of the integrations' public names that import here."""
    found = {}
    for module_name in ("ray_eval.integrations", "ray_eval.sb3"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in module.__all__:
            try:
                obj = getattr(module, name)
            except ImportError:  # its library is not installed
                continue
            found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def on_post_build(config, **kwargs) -> None:
    absent = [n for n in ray_eval.__all__ if f"ray_eval.{n}" not in _anchors]
    undocumented = [m for n in ray_eval.__all__ for m in _undocumented(n, getattr(ray_eval, n))]
    for anchor, obj in _integrations().items():
        if anchor not in _anchors:
            absent.append(anchor)
        undocumented += _undocumented(anchor, obj)
    problems = []
    if absent:
        problems.append(f"public names with no entry on an api/ page: {', '.join(absent)}")
    if undocumented:
        problems.append(f"public names without a docstring: {', '.join(undocumented)}")
    if problems:
        raise PluginError("API reference: " + "; ".join(problems))
