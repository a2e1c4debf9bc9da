"""The package's boundaries as the README states them: each outside service behind one
module, and imports that flow one way (no module imports one that imports it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it (functions included), as dotted names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            if node.module == "pipeline":  # `from pipeline import train`
                names.update(f"pipeline.{alias.name}" for alias in node.names)
    return names


MODULES = {path.stem: _imports(path) for path in sorted(PACKAGE.glob("*.py"))}


@pytest.mark.parametrize(
    ("library", "door"),
    [("optuna", "studies"), ("mlflow", "tracking"), ("kaggle", "kaggle_client")],
)
def test_each_library_is_imported_by_one_module_alone(library, door):
    importers = {
        name
        for name, imports in MODULES.items()
        if any(i == library or i.startswith(library + ".") for i in imports)
    }
    assert importers == {door}


def test_no_module_imports_one_that_imports_it():
    graph = {
        name: {i.split(".")[1] for i in imports if i.startswith("pipeline.")} & MODULES.keys()
        for name, imports in MODULES.items()
    }

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            name = todo.pop()
            if name == goal:
                return True
            if name not in seen:
                seen.add(name)
                todo.extend(graph[name])
        return False

    cycles = sorted(name for name in graph if reaches(name, name))
    assert cycles == []
