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
# Higher number = higher layer; a module may import only its own layer or lower ones. Two packages on one
# layer stay apart: the stages (build_index, query), and the server and the kit (front ends the CLI runs).
LAYERS = [("img2prompt.encoders", 1), ("img2prompt.stand_in", 1), ("img2prompt.index", 2),
          ("img2prompt.build_index", 3), ("img2prompt.query", 3), ("img2prompt.api", 4), ("img2prompt.serve", 5), ("img2prompt.kit", 5),
          ("img2prompt.cli", 6), ("img2prompt.__main__", 6)]
APART = {3, 5}
FRONT_END = 7  # anything else: a module no layer names


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
