"""Every package the main job imports is a declared dependency.

The static half: every third-party module that slimtune's code imports at module level is
provided by a distribution listed in pyproject's `dependencies`; modules imported only inside a
function (optional features: bitsandbytes, datasets) are in an extra or named in the error that
the function raises without them. The dynamic half, the README's first command in a fresh
virtual environment with no test extras, runs in CI (.ci/run).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "slimtune"
# What transformers needs, without our importing it, to read the default model's GGUF file.
READ_BY_TRANSFORMERS = {"gguf": "transformers reads GGUF files with it",
                        "accelerate": "transformers >= 5.25 refuses to load a GGUF file without it"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _imports() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level imports, imports inside functions): top-level module -> files."""
    top, inner = {}, {}
    for file in SRC.rglob("*.py"):
        tree = ast.parse(file.read_text())
        nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for m in mods:
                root = m.split(".")[0]
                if root in sys.stdlib_module_names or root == "slimtune":
                    continue
                (inner if id(node) in nested else top).setdefault(root, set()).add(str(file.relative_to(ROOT)))
    return top, inner


def _distribution(module: str) -> str:
    dists = importlib.metadata.packages_distributions().get(module)
    if not dists:
        pytest.skip(f"{module} is not installed here, so its distribution cannot be looked up")
    return dists[0].lower().replace("_", "-")


def test_every_module_level_import_is_a_declared_dependency():
    declared = {_name(r) for r in _project()["dependencies"]}
    top, _ = _imports()
    assert top, "no third-party import found: the scan is broken"
    missing = {m: sorted(files) for m, files in top.items() if _distribution(m) not in declared}
    assert not missing, f"imported at module level but not in pyproject's dependencies: {missing}"


def test_optional_imports_name_their_install():
    """A module imported only inside a function is an optional feature's: the function's file
    tells the user what to install when it is missing."""
    declared = {_name(r) for r in _project()["dependencies"]}
    top, inner = _imports()
    for module, files in inner.items():
        dists = importlib.metadata.packages_distributions().get(module, [])
        if module not in top and not {_name(d) for d in dists} & declared:
            for f in files:
                assert "pip install" in (ROOT / f).read_text(), f"{module} in {f}: no install hint"


def test_the_gguf_readers_are_declared():
    """The default model is a GGUF file: the packages transformers reads it with are ours to
    declare (transformers 5.25 moved accelerate from optional to required for GGUF)."""
    declared = {_name(r) for r in _project()["dependencies"]}
    assert not set(READ_BY_TRANSFORMERS) - declared, {k: v for k, v in READ_BY_TRANSFORMERS.items() if k not in declared}


def test_ci_runs_the_readmes_first_command_verbatim():
    """CI's newcomer run reads the README's command rather than restating it."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_command.py 1" in ci and 'eval "$install"' in ci and "python -m venv" in ci
    import subprocess
    first = subprocess.run([sys.executable, str(ROOT / ".ci" / "readme_command.py"), "1"], capture_output=True,
                           text=True, check=True).stdout.strip()
    assert first.startswith("pip install") and first.endswith("&& slimtune train") and "[test]" not in first
