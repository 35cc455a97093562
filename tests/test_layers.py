"""The installed tree's imports run downward only and form no circle (read from the source, no import run)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Package → folder, as pyproject.toml installs them.
FOLDERS = {"img2prompt": ROOT / "img2prompt", "img2prompt.index": ROOT / "index",
           "img2prompt.build_index": ROOT / "build_index", "img2prompt.query": ROOT / "query"}
BOTTOM = {"img2prompt.errors", "img2prompt.atomic", "img2prompt.progress", "img2prompt.memory",
          "img2prompt.output_paths", "img2prompt.storage"}
# Higher number = higher layer; a module may import only its own layer or lower ones (stages: not each other).
LAYERS = [("img2prompt.encoders", 1), ("img2prompt.index", 2), ("img2prompt.build_index", 3),
          ("img2prompt.query", 3), ("img2prompt.api", 4)]
FRONT_END = 5


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[0] in FOLDERS and package == "img2prompt":  # a subpackage listed on its own
                continue
            if package == "img2prompt" and parts[0] in ("index", "build_index", "query"):
                continue
            name = ".".join([package, *parts])
            found[name.removesuffix(".__init__")] = path
    return found


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


def _layer(module: str) -> tuple[int, str]:
    if module in BOTTOM or module == "img2prompt":
        return 0, "bottom"
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer, prefix
    return FRONT_END, "front end"


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
                continue  # the package's lazy __getattr__ names the API; kit_template imports the package
            if target_layer > layer or (target_layer == layer == 3 and target_group != group):
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
