"""The package layout: wings that import only downward, and a Ray-free rollout wing."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ray_eval"

# Each module's rank: a module may import modules of its own rank or lower, never higher.
# Top-level modules that several wings share sit between the wings they serve.
SHARED_LEAVES = {"errors", "factories", "lazy", "memory"}  # rank 0: import no other ray_eval module
SHARED_CORE = {"planning", "weights"}  # rank 3: between rollout (below) and backends (above)
FACADE = {"evaluator", "options", "torchrl_args", "delivery", "env_input", "backend_choice"}
# integrations: ray_eval inside training loops (SB3, TorchRL's Trainer), built on the façade;
# the jobs (ray-eval watch) use its best/stop pieces.
WING_RANKS = {"results": 1, "rollout": 2, "backends": 4, "integrations": 6, "jobs": 7}
TOP = {"__init__", "__main__", "sb3"}  # the package's entry points: import anything


def rank(module: str) -> int:
    parts = module.split(".")[1:]  # drop "ray_eval"
    if not parts or parts[0] in TOP:
        return 8
    head = parts[0]
    if head in WING_RANKS:
        return WING_RANKS[head]
    if head in SHARED_LEAVES:
        return 0
    if head in SHARED_CORE:
        return 3
    if head in FACADE:
        return 5
    raise AssertionError(f"{module} has no place in the layout: add it to tests/test_layout.py")


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        found[name.removesuffix(".__init__") if path.name == "__init__.py" else name] = path
    return found


def imports(path: Path, *, top_level_only: bool) -> set[str]:
    """The ray_eval modules ``path`` imports (function-level ones too, unless asked not to)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # imports under `if TYPE_CHECKING:` do not run
        nodes = [n for n in nodes if not isinstance(n, ast.If)]
    known = modules()
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ray_eval"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ray_eval"))
    return found & set(known)


def test_every_module_has_a_place_and_imports_only_downward():
    wrong = []
    for module, path in modules().items():
        for target in imports(path, top_level_only=False):
            if rank(target) > rank(module):
                wrong.append(f"{module} (rank {rank(module)}) imports {target} ({rank(target)})")
    assert not wrong, "\n".join(wrong)


def test_module_level_imports_have_no_cycles():
    graph = {m: imports(p, top_level_only=True) for m, p in modules().items()}
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])


def test_the_layout_check_catches_an_upward_import(tmp_path):
    # The rank rule must be able to fail: a rollout module importing a backend is wrong.
    assert rank("ray_eval.backends.worker") > rank("ray_eval.rollout.loops")
    assert rank("ray_eval.jobs.cli") > rank("ray_eval.evaluator") > rank("ray_eval.backends.pool")
    assert rank("ray_eval.results.metrics") < rank("ray_eval.rollout.loops")


def test_the_rollout_wing_imports_without_ray():
    rollout = sorted(m for m in modules() if m.startswith("ray_eval.rollout"))
    script = f"""
import importlib, sys
sys.modules["ray"] = None  # `import ray` now raises ImportError; find_spec("ray") gives None
for name in {rollout!r}:
    importlib.import_module(name)
assert not [m for m, v in sys.modules.items() if m.startswith("ray") and not m.startswith("ray_eval") and v is not None], "ray got imported"
print("imported", len({rollout!r}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"imported {len(rollout)}" in out.stdout
