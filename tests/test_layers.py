"""The installed tree's imports run downward only and form no circle (read from the source, no import run)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from module_map import APART, BOTTOM, FOLDERS, layer as _layer, modules as _modules


def _imports(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {module for module in out if module.startswith("img2prompt")}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {target for target in _imports(path, name) if target in modules} for name, path in modules.items()}


def test_imports_run_downward_and_stages_stay_apart(graph):
    wrong = []
    for module, targets in graph.items():
        layer, group = _layer(module)
        for target in targets:
            target_layer, target_group = _layer(target)
            if module == "img2prompt" or target == "img2prompt":
                continue  # the package's lazy __getattr__ names the API; kit/template.py imports the package
            if target_layer > layer or (target_layer == layer and layer in APART and target_group != group):
                wrong.append(f"{module} → {target}")
    assert wrong == []


def test_no_import_circles(graph):
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if target == "img2prompt":
                continue
            if state.get(target) == 1:
                cycles.append(" → ".join(path[path.index(target):] + [target]) if target in path else target)
            elif state.get(target) is None:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_every_module_has_a_layer_and_no_front_end_sits_at_the_top(graph):
    """Front ends live in their packages (cli/, serve/, kit/); img2prompt/ itself holds only the bottom utilities,
    the API trunk, the package's own entry points and the stand-in model writer (a tool beside encoders/)."""
    top_level = {"img2prompt", "img2prompt.api", "img2prompt.__main__", "img2prompt.stand_in"} | BOTTOM
    unplaced = sorted(module for module in graph if _layer(module)[1] == "front end")
    stray = sorted(module for module, path in _modules().items()
                   if path.parent == FOLDERS["img2prompt"] and module not in top_level)
    assert (unplaced, stray) == ([], [])
