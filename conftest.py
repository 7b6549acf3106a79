"""Pytest setup for the whole tree: offline and CPU only, and the package's doctests under their real names.

The doctests run with ``--doctest-modules`` over ``lightning_convnets/``, ``datamodules/`` and
``callbacks/`` (``testpaths`` in ``pyproject.toml``). The last two directories are installed as
``lightning_convnets.datamodules`` and ``lightning_convnets.callbacks``; pytest would import
``datamodules/base.py`` a second time as ``datamodules.base`` (a copy with its own classes). Aliasing
the short names to the installed modules makes pytest find the one real module for each file.
"""

import importlib
import os
import pkgutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm / smp must never reach the hub
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("LIGHTNING_CONVNETS_STRICT_MONITORS", "1")  # monitors re-raise in this suite

MAPPED_PACKAGES = ("datamodules", "callbacks")


def _alias_mapped_packages() -> None:
    for short in MAPPED_PACKAGES:
        package = importlib.import_module(f"lightning_convnets.{short}")
        sys.modules.setdefault(short, package)
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"lightning_convnets.{short}.{info.name}")
            sys.modules.setdefault(f"{short}.{info.name}", module)


_alias_mapped_packages()
