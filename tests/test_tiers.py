"""Test tiers: `bash scripts/test.sh` runs every test; `bash scripts/test.sh --quick`
(pytest -m "not slow") leaves out the tests marked slow and must still start a real ComfyUI.
Read from the test files' source, so this needs no second collection of the suite."""
from __future__ import annotations

import ast
import configparser
from pathlib import Path

from conftest import REPO

# pytest's own marks, which need no registration.
BUILTIN_MARKS = {"parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings"}
# Fixtures (tests/conftest.py) that start a ComfyUI server process.
SERVER_FIXTURES = {"comfy", "comfy_server", "models_server", "start_server"}


def _mark_name(node: ast.AST) -> str | None:
    """'slow' for `pytest.mark.slow` (called or not), else None."""
    if isinstance(node, ast.Call):
        node = node.func
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "mark" and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "pytest"):
        return node.attr
    return None


def _module_marks(tree: ast.Module) -> set[str]:
    """Marks of `pytestmark = pytest.mark.x` or `pytestmark = [pytest.mark.x, ...]`."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            values = node.value.elts if isinstance(node.value, (ast.List, ast.Tuple)) else [node.value]
            return {name for name in map(_mark_name, values) if name}
    return set()


def _test_files() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(encoding="utf-8"))) for path in sorted((REPO / "tests").glob("test_*.py"))]


def _tests() -> list[tuple[str, set[str], set[str]]]:
    """(file::test, its marks, the fixtures it names) for every test function."""
    found = []
    for path, tree in _test_files():
        module = _module_marks(tree)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
                marks = module | {name for name in map(_mark_name, node.decorator_list) if name}
                found.append((f"{path.name}::{node.name}", marks, {a.arg for a in node.args.args}))
    return found


def _ini() -> configparser.ConfigParser:
    ini = configparser.ConfigParser()
    ini.read(REPO / "pytest.ini")
    return ini


def test_every_mark_used_is_registered_and_strict():
    registered = {line.split(":")[0].strip() for line in _ini()["pytest"]["markers"].splitlines() if line.strip()}
    assert "--strict-markers" in _ini()["pytest"]["addopts"].split()
    used = {(path.name, name) for path, tree in _test_files()
            for name in map(_mark_name, ast.walk(tree)) if name and name not in BUILTIN_MARKS}
    assert {name for _, name in used} <= registered, sorted(used)


def test_quick_tier_keeps_a_real_server_and_leaves_out_the_slow_runs():
    tests = _tests()
    quick_server = [name for name, marks, fixtures in tests if "slow" not in marks and fixtures & SERVER_FIXTURES]
    assert quick_server, "the quick tier must start a real ComfyUI at least once"
    slow = {name for name, marks, _ in tests if "slow" in marks}
    # The runs that take minutes each (see README, Tests): never in the quick tier.
    for expensive in ("test_training_distributed.py::test_torchrun_two_processes_match_one_process",
                      "test_evidence.py::test_stea_carries_identity_and_fails_without_it"):
        assert expensive in slow, expensive


def test_test_script_passes_quick_on_as_not_slow():
    script = (REPO / "scripts" / "test.sh").read_text()
    assert '--quick' in script and '-m "not slow"' in script
    assert "bash scripts/test.sh --quick" in (REPO / "README.md").read_text()
