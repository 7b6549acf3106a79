"""Deprecated alias of :mod:`lightning_convnets.predict.tiling` (kept for one release)."""

from lightning_convnets._deprecated import alias_module

__getattr__, __dir__ = alias_module(__name__, "lightning_convnets.predict.tiling")
