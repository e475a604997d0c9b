"""The package's layering, as docs/architecture.md draws it: each folder imports only the
layers below it, library code never imports the package face, and no import sits inside a
function. Read from the sources with ast, not by running them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import slimtune

ROOT = Path(slimtune.__file__).parent
# Each layer and the layers it may import (besides itself). `errors`, `configs` and `version`
# are the floor every layer stands on.
FLOOR = {"errors", "configs", "version"}
MAY_IMPORT = {
    "models": set(),
    "adapters": {"models"},
    "formats": {"models", "adapters"},
    "data": set(),
    "eval": {"models", "data"},
    "train": {"models", "adapters", "formats", "data"},
    "recipes": {"models", "adapters", "formats", "data", "eval", "train"},
    "serve": {"models", "adapters", "formats", "data", "eval", "recipes"},
    "cli": {"models", "adapters", "formats", "data", "eval", "train", "recipes", "serve"},
}


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        name = ".".join(("slimtune",) + path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def imports(name: str, tree: ast.Module, inside_functions: bool) -> set[str]:
    """The slimtune modules `name` imports (at module level, or only inside functions)."""
    package = name if name.endswith("__init__") or (ROOT / Path(*name.split(".")[1:]) / "__init__.py").exists() \
        else name.rsplit(".", 1)[0]
    found = set()
    nodes = [n for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)] if inside_functions else tree.body
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("slimtune"):
                submodules = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES}
                if node.module or not submodules:  # `from . import sub` imports sub, not the package
                    found.add(target)
                found |= submodules
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("slimtune")}
    return {f for f in found if f in MODULES}


MODULES = modules()


def layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "slimtune"


@pytest.mark.parametrize("name", [n for n in MODULES if n != "slimtune"])
def test_each_module_imports_only_the_layers_below_it(name):
    own = layer(name)
    allowed = MAY_IMPORT.get(own, set()) | FLOOR | {own}
    for target in imports(name, MODULES[name], inside_functions=False):
        assert target != "slimtune", f"{name} imports the package face"
        assert layer(target) in allowed, f"{name} ({own}) imports {target} ({layer(target)})"


def test_no_import_inside_a_function():
    for name, tree in MODULES.items():
        assert not imports(name, tree, inside_functions=True), name


def test_no_import_cycles():
    graph = {n: imports(n, t, inside_functions=False) - {n} for n, t in MODULES.items()}
    state: dict[str, int] = {}

    def visit(n, path):
        if state.get(n) == 1:
            pytest.fail("import cycle: " + " -> ".join(path + [n]))
        if state.get(n) == 2:
            return
        state[n] = 1
        for m in sorted(graph[n]):
            if m in graph:
                visit(m, path + [n])
        state[n] = 2

    for n in sorted(graph):
        visit(n, [])
