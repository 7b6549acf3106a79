"""The ``lightning-convnets`` entry point: LightningCLI with ``fit|validate|test|predict`` subcommands, and
``export`` (ONNX / torch.export from the same config and a checkpoint: :mod:`lightning_convnets.export`).

Model and data are in subclass mode, so any ``LightningModule`` / ``LightningDataModule`` importable by
path works, and ours go by their short names: ``--model ImageClassifier --data ShapesDataModule``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

# Importing these registers our tasks and data modules as known subclasses (short names on the CLI).
_PLUGIN_MODULES = (
    "lightning_convnets.tasks",
    "lightning_convnets.datamodules",
    "lightning_convnets.callbacks",
)


def _import_plugins() -> None:
    for name in _PLUGIN_MODULES:
        importlib.import_module(name)


class ConvNetsCLI(LightningCLI):
    """LightningCLI for lightning-convnets (subclass mode for model and data).

    Example (not run by the doctests: it trains a model for a minute):
        >>> ConvNetsCLI(args=["fit", "--config", "configs/quickstart.yaml"])  # doctest: +SKIP
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _import_plugins()
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(LightningModule, LightningDataModule, *args, **kwargs)


def main(args: list[str] | None = None) -> None:
    """Console-script entry point; ``args=None`` reads ``sys.argv``.

    Returns nothing: the console script passes the return value to ``sys.exit``, which would turn any
    object into exit status 1. Use :class:`ConvNetsCLI` directly to get the trainer and model.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "export":  # lightning-convnets export --config ... --ckpt_path ... --format ...
        from lightning_convnets.export import export_cli

        export_cli(argv[1:])
        return
    ConvNetsCLI(args=args)


if __name__ == "__main__":  # pragma: no cover
    main()
