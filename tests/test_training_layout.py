"""training/ reads as its stages: no import circle between its modules (imports inside
functions count), and each stage folder imports only the stages before it."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

TRAINING = REPO / "training"
# The order of the stages in training/__init__.py's map; a folder may import those before it.
STAGES = ["config", "dataset", "models", "build", "run", "api", "__main__"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Modules of training/ that `path` imports, anywhere in the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [source] + [f"{source}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            if target == "training" or target.startswith("training."):
                file = REPO / Path(*target.split("."))
                if file.with_suffix(".py").is_file() or (file / "__init__.py").is_file():
                    found.add(target)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(TRAINING.rglob("*.py"))}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node], _ = 2, stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_training_has_no_import_circle_counting_imports_inside_functions():
    graph = import_graph()
    assert len(graph) > 30  # the whole package was read
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_check_finds_a_circle_hidden_inside_a_function():
    graph = import_graph()
    graph["training.dataset.storage"] = graph["training.dataset.storage"] | {"training.run.trainer"}
    assert _cycle(graph) is not None


def test_each_stage_imports_only_the_stages_before_it():
    wrong = []
    for module, imported in import_graph().items():
        mine = _stage(module)
        if mine not in STAGES:
            continue
        for target in imported:
            theirs = _stage(target)
            if theirs in STAGES and STAGES.index(theirs) > STAGES.index(mine):
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_the_package_map_names_every_stage_folder_and_module_there():
    text = (TRAINING / "__init__.py").read_text()
    folders = sorted(p.name for p in TRAINING.iterdir() if (p / "__init__.py").is_file())
    assert folders == sorted(s for s in STAGES if (TRAINING / s).is_dir())
    for folder in folders:
        assert f"{folder}/" in text, folder
        listing = (TRAINING / folder / "__init__.py").read_text()
        for module in sorted((TRAINING / folder).glob("*.py")):
            if not module.name.startswith("_"):
                assert module.stem in listing, f"training/{folder}/__init__.py does not name {module.stem}"
