"""The import layering of docs/architecture.md: no module imports across a forbidden line.

Imports are read with ``ast`` (top-level, inside functions and under ``TYPE_CHECKING`` alike), relative
imports resolved against the installed package names (``datamodules/`` is ``lightning_convnets.datamodules``,
``callbacks/`` is ``lightning_convnets.callbacks``).
"""

from __future__ import annotations

import ast
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
# Layer (second component of the module name) -> layers it must not import.
FORBIDDEN: dict[str, set[str]] = {
    "nn": {
        "backbones",
        "tasks",
        "callbacks",
        "datamodules",
        "writers",
        "detection_writers",
        "figures",
        *GLUE,
    },
    "backbones": {"tasks", "callbacks", "datamodules", "writers", "detection_writers", "figures", *GLUE},
    "datamodules": {
        "tasks",
        "callbacks",
        "backbones",
        "nn",
        "writers",
        "detection_writers",
        "figures",
        *GLUE,
    },
    "callbacks": {"tasks", "datamodules", "writers", "detection_writers", *GLUE},
    "tasks": {"callbacks", "datamodules", *GLUE},
    "figures": {"tasks", "callbacks", "datamodules", "backbones", *GLUE},
    "batch": {"tasks", "callbacks", "datamodules", "backbones", "writers", "detection_writers", *GLUE},
    "writers": {"tasks", "callbacks", "datamodules", "backbones", *GLUE},
    "detection_writers": {"tasks", "callbacks", "datamodules", "backbones", *GLUE},
    # inference helpers the tasks call (tiled prediction, test-time augmentation): model-agnostic
    "tiling": {"tasks", "callbacks", "datamodules", "backbones", "writers", "detection_writers", *GLUE},
    "tta": {"tasks", "callbacks", "datamodules", "backbones", "writers", "detection_writers", *GLUE},
    # metrics the tasks log (torchmetrics Metric subclasses): model-agnostic
    "metrics": {"tasks", "callbacks", "datamodules", "backbones", "writers", "detection_writers", *GLUE},
    "checkpointing": {
        "tasks",
        "callbacks",
        "datamodules",
        "backbones",
        "nn",
        "writers",
        "detection_writers",
        "figures",
        *GLUE,
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
