"""The import layering of docs/architecture.md: no module imports across a forbidden line, and no import
cycle between the package's modules.

Imports are read with ``ast`` (top-level, inside functions and under ``TYPE_CHECKING`` alike), relative
imports resolved against the installed package names (``datamodules/`` is ``lightning_convnets.datamodules``,
``callbacks/`` is ``lightning_convnets.callbacks``). The cycle check also follows the imports made by name:
a call given a literal module or class path of the package (``importlib.import_module("<name>")``, a
deprecated module's ``alias_module(__name__, "<new module>")``), and a package's lazy ``_LAZY`` table
(``from lightning_convnets import ImageClassifier`` imports ``lightning_convnets.tasks.classification``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source directory -> the package it is installed as.
SOURCES = {
    "lightning_convnets": "lightning_convnets",
    "datamodules": "lightning_convnets.datamodules",
    "callbacks": "lightning_convnets.callbacks",
}
GLUE = {"cli", "demo", "export"}  # the entry points (and the exporter, which knows every task) may import anything
# The prediction side: the predict package (tiling, TTA, writers, export) and the deprecated aliases of its
# modules' old homes (lightning_convnets.tiling, .tta, .writers, .detection_writers).
PREDICTION = {"predict", "writers", "detection_writers", "tiling", "tta"}
# Layer (second component of the module name) -> layers it must not import.
FORBIDDEN: dict[str, set[str]] = {
    "nn": {"backbones", "tasks", "callbacks", "datamodules", "figures", "drawing", *PREDICTION, *GLUE},
    "backbones": {"tasks", "callbacks", "datamodules", "figures", "drawing", *PREDICTION, *GLUE},
    "datamodules": {"tasks", "callbacks", "backbones", "nn", "figures", "drawing", *PREDICTION, *GLUE},
    "callbacks": {"tasks", "datamodules", *PREDICTION, *GLUE},
    "tasks": {"callbacks", "datamodules", *GLUE},
    "figures": {"tasks", "callbacks", "datamodules", "backbones", *PREDICTION, *GLUE},
    # the one drawing module (mask and box overlays, image display) of the tasks' figures and the writers
    "drawing": {"tasks", "callbacks", "datamodules", "backbones", "figures", *PREDICTION, *GLUE},
    "batch": {"tasks", "callbacks", "datamodules", "backbones", *PREDICTION, *GLUE},
    # prediction helpers the tasks call (tiled prediction, TTA, writers, export): model-agnostic
    **{layer: {"tasks", "callbacks", "datamodules", "backbones", *GLUE} for layer in PREDICTION},
    # metrics the tasks log (torchmetrics Metric subclasses): model-agnostic
    "metrics": {"tasks", "callbacks", "datamodules", "backbones", "drawing", *PREDICTION, *GLUE},
    "checkpointing": {
        "tasks", "callbacks", "datamodules", "backbones", "nn", "figures", "drawing", *PREDICTION, *GLUE,
    },
    # the helper behind the deprecated aliases of moved modules: imports nothing of the package
    "_deprecated": {
        "nn", "backbones", "tasks", "callbacks", "datamodules", "figures", "drawing", "batch", "metrics",
        "checkpointing", *PREDICTION, *GLUE,
    },
}


def module_name(path: Path) -> str:
    """Installed dotted name of a source file."""
    top = path.relative_to(ROOT).parts[0]
    rel = path.relative_to(ROOT / top).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([SOURCES[top], *parts])


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Absolute names of every module ``source`` imports (relative imports resolved)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names.add(stem)
            # ``from package import submodule`` imports the submodule.
            names.update(f"{stem}.{alias.name}" for alias in node.names)
    return names


def layer_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "lightning_convnets" else None


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """``"<module> imports <name>"`` for each import across a forbidden line."""
    layer = layer_of(module)
    forbidden = FORBIDDEN.get(layer or "", set())
    return sorted(
        f"{module} imports {name}"
        for name in imported_modules(source, module, is_package)
        if layer_of(name) in forbidden and layer_of(name) != layer
    )


def _files() -> list[Path]:
    files = []
    for top in SOURCES:
        files += [p for p in sorted((ROOT / top).rglob("*.py")) if "__pycache__" not in p.parts]
    return files


def test_every_layer_of_the_package_is_covered():
    layers = {layer_of(module_name(p)) for p in _files()} - {None}
    assert layers <= set(FORBIDDEN) | GLUE, layers - set(FORBIDDEN) - GLUE


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_crosses_a_forbidden_line(path):
    assert violations(path.read_text(), module_name(path), path.name == "__init__.py") == []


def test_the_checker_sees_forbidden_imports_in_every_form():
    source = (
        "from lightning_convnets.tasks import ImageClassifier\n"
        "def f():\n    import lightning_convnets.callbacks.core\n"
        "from ..tasks.base import ConvNetTask\n"
        "from lightning_convnets import datamodules\n"
    )
    found = {line.split(" imports ")[1] for line in violations(source, "lightning_convnets.backbones.resnet")}
    assert {
        "lightning_convnets.tasks",
        "lightning_convnets.callbacks.core",
        "lightning_convnets.tasks.base",
        "lightning_convnets.datamodules",
    } <= found
    # Relative imports of the mapped directories resolve to their installed names.
    assert "lightning_convnets.datamodules.base imports lightning_convnets.tasks" in violations(
        "from ..tasks import x\n", "lightning_convnets.datamodules.base"
    )
    assert violations("from .core import MonitorCallback\n", "lightning_convnets.callbacks.shattering") == []


# ------------------------------------------------------------------------------------------ import cycles
# Cycles that exist today, each as the modules in order starting from the smallest name (the check prints
# any other cycle in that form), with the reason it is tolerated. Remove an entry when its cycle goes:
# test_known_cycles_still_exist fails until it is removed, so the list only shrinks. The last two went with
# the prediction package: cli -> export -> cli (the export command built its parser from cli.ConvNetsCLI)
# and tiling -> tta -> tiling (tiling ran TTA per tile; tta merged flipped boxes with tiling's merge).
KNOWN_CYCLES: dict[tuple[str, ...], str] = {}
# A literal module or class path of the package, given to a call (an import by name).
DOTTED = re.compile(r"lightning_convnets(?:\.\w+)+")


def _lazy_table(tree: ast.Module) -> dict[str, str]:
    """A package's module-level ``_LAZY = {"Name": "module"}`` (what its ``__getattr__`` imports)."""
    table: dict[str, str] = {}
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets)
            and isinstance(node.value, ast.Dict)
        ):
            for key, value in zip(node.value.keys, node.value.values):
                if isinstance(key, ast.Constant) and isinstance(value, ast.Constant):
                    table[str(key.value)] = str(value.value)
    return table


def _owner(name: str, known: set[str]) -> str | None:
    """The package module that importing ``name`` executes (its longest known prefix), else ``None``."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in known:
            return ".".join(parts)
        parts.pop()
    return None


def import_targets(
    tree: ast.Module, module: str, is_package: bool, known: set[str], lazy: dict[str, dict[str, str]]
) -> set[str]:
    """The modules of ``known`` that ``module`` imports, wherever the import is (module level, functions,
    ``TYPE_CHECKING``): ``from pkg import sub`` is an edge to ``pkg.sub`` when that is a module, else to
    ``pkg``; a name of ``pkg``'s lazy table is an edge to the module it loads; a call's literal argument
    ``"lightning_convnets.x.y"`` is an edge to the module it names (or the module holding the class it
    names). The parent packages that Python runs first are not edges (every submodule would otherwise
    form a cycle with its package)."""
    found: set[str | None] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(_owner(alias.name, known) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            for alias in node.names:
                if f"{stem}.{alias.name}" in known:
                    found.add(f"{stem}.{alias.name}")
                elif alias.name in lazy.get(stem, {}):
                    found.add(_owner(lazy[stem][alias.name], known))
                else:
                    found.add(_owner(stem, known))
        elif isinstance(node, ast.Call):  # import by name: import_module("..."), alias_module(__name__, "...")
            for arg in [*node.args, *(keyword.value for keyword in node.keywords)]:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and DOTTED.fullmatch(arg.value):
                    found.add(_owner(arg.value, known))
    found.discard(module)
    return {name for name in found if name is not None}


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """``{module: modules it imports}`` from ``{module: (source, is_package)}``."""
    trees = {module: ast.parse(source) for module, (source, _) in sources.items()}
    lazy = {module: _lazy_table(tree) for module, tree in trees.items()}
    known = set(sources)
    return {
        module: import_targets(tree, module, sources[module][1], known, lazy)
        for module, tree in trees.items()
    }


def find_cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """Every elementary cycle of ``graph``, each starting at its smallest module name."""
    cycles: set[tuple[str, ...]] = set()

    def walk(start: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == start:
                cycles.add(tuple(path))
            elif nxt > start and nxt not in path:
                walk(start, [*path, nxt])

    for start in sorted(graph):
        walk(start, [start])
    return cycles


def _show(cycle: tuple[str, ...]) -> str:
    return " -> ".join([*cycle, cycle[0]])


def _package_cycles() -> set[tuple[str, ...]]:
    sources = {module_name(p): (p.read_text(), p.name == "__init__.py") for p in _files()}
    return find_cycles(import_graph(sources))


def test_no_import_cycle_beyond_the_known_ones():
    new = sorted(_show(c) for c in _package_cycles() - set(KNOWN_CYCLES))
    assert not new, "import cycles (function-level imports included):\n" + "\n".join(new)


@pytest.mark.parametrize("cycle", sorted(KNOWN_CYCLES), ids=_show)  # skipped while the list is empty
def test_known_cycles_still_exist(cycle):
    assert cycle in _package_cycles(), f"this cycle is gone: remove it from KNOWN_CYCLES: {_show(cycle)}"


def test_the_cycle_check_sees_every_import_form():
    pkg = "lightning_convnets"
    sources = {
        pkg: ('_LAZY = {"Thing": "lightning_convnets.c"}\n', True),
        f"{pkg}.a": ("def f():\n    from .b import g\n", False),  # relative, inside a function
        f"{pkg}.b": ("import importlib\nimportlib.import_module('lightning_convnets.a')\n", False),
        f"{pkg}.c": ("from lightning_convnets import Thing\n", False),  # the lazy table: c -> c, no cycle
        f"{pkg}.d": ("from lightning_convnets import e\n", False),  # a submodule imported by name
        f"{pkg}.e": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import lightning_convnets.d.x\n",
            False,
        ),
        f"{pkg}.f": ("from lightning_convnets import Thing\n", False),
        # a deprecated alias resolving its new module by name; the new module imports it back
        f"{pkg}.g": ("__getattr__ = alias_module(__name__, new='lightning_convnets.h')\n", False),
        f"{pkg}.h": ("def f():\n    from lightning_convnets.g import Old\n    return load_class('lightning_convnets.c.Thing')\n", False),
    }
    graph = import_graph(sources)
    assert graph[f"{pkg}.c"] == set() and graph[f"{pkg}.f"] == {f"{pkg}.c"}
    assert graph[f"{pkg}.h"] == {f"{pkg}.g", f"{pkg}.c"}  # a class path given to a call: its module
    assert find_cycles(graph) == {(f"{pkg}.a", f"{pkg}.b"), (f"{pkg}.d", f"{pkg}.e"), (f"{pkg}.g", f"{pkg}.h")}
    assert _show((f"{pkg}.a", f"{pkg}.b")) == f"{pkg}.a -> {pkg}.b -> {pkg}.a"
    # A three-module cycle is found once, from its smallest name, whichever module it is entered from.
    assert find_cycles({"z": {"x"}, "x": {"y"}, "y": {"z"}}) == {("x", "y", "z")}
