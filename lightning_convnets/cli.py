"""The ``lightning-convnets`` entry point: LightningCLI with ``fit|validate|test|predict`` subcommands, and
``export`` (ONNX / torch.export from the same config and a checkpoint: :func:`export_cli`, which calls
:func:`lightning_convnets.predict.export.export_model`).

Model and data are in subclass mode, so any ``LightningModule`` / ``LightningDataModule`` importable by
path works, and ours go by their short names: ``--model ImageClassifier --data ShapesDataModule``.

With ``--ckpt_path``, LightningCLI rebuilds the model from the hyperparameters saved in the checkpoint
(its architecture). :class:`ConvNetsCLI` adds three rules to that:

* the options that only change how a trained model predicts (:data:`PREDICTION_OPTIONS`: tiles, TTA,
  thresholds, ``top_k``, fast predict...) keep the values given in the config files or on the command
  line: they win over the checkpoint's, are checked by the task as without ``--ckpt_path``, and the run's
  ``config.yaml`` shows them;
* a checkpoint of another task or backbone than the config names is refused with one line saying what
  the checkpoint holds and what the config asks for (also weights that do not fit the built backbone);
* ``--ckpt_path last`` is the newest ``last*.ckpt`` of the logger's version folders
  (``<save_dir>/<name>/version_*/checkpoints``) and, for ``fit``, the run continues in that version.

``fit`` ends by printing the best and last checkpoint paths.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from lightning_convnets import install_warning_filters
from lightning_convnets.backbones.registry import import_object
from lightning_convnets.backbones.weights import WeightsDownloadError
from lightning_convnets.checkpointing import (
    CheckpointMismatchError,
    describe_checkpoint,
    find_last_checkpoint,
    read_checkpoint,
    weights_mismatch,
)
from lightning_convnets.predict.export import (
    DEFAULT_OPSET,
    EXPORT_SUFFIXES,
    FORMATS,
    default_example,
    export_model,
)

__all__ = ["PREDICTION_OPTIONS", "ConvNetsCLI", "export_cli", "main", "prediction_options"]

# Importing these registers our tasks and data modules as known subclasses (short names on the CLI).
_PLUGIN_MODULES = (
    "lightning_convnets.tasks",
    "lightning_convnets.datamodules",
    "lightning_convnets.callbacks",
)

#: Task arguments that change how a trained model predicts or evaluates, never its weights: given in a
#: config or on the command line, they win over a checkpoint's (a task class may declare its own set as
#: a ``prediction_options`` class attribute). Only those in the task's signature apply.
PREDICTION_OPTIONS: tuple[str, ...] = (
    "tile_size",
    "tile_overlap",
    "tile_batch_size",
    "tta",
    "threshold",
    "score_threshold",
    "top_k",
    "fast_predict",
    "channels_last",
    "compile",
    "num_sample_figures",
    "figure_every_n_epochs",
)
_VERSION = re.compile(r"^version_(\d+)$")


def _import_plugins() -> None:
    for name in _PLUGIN_MODULES:
        import_object(name)


def _import_class(class_path: Any) -> type | None:
    try:
        found = import_object(str(class_path))
    except (ImportError, AttributeError, ValueError):
        return None
    return found if isinstance(found, type) else None


def prediction_options(model_class: type | None) -> tuple[str, ...]:
    """The prediction-only arguments of ``model_class``: its ``prediction_options`` class attribute when it
    declares one, else :data:`PREDICTION_OPTIONS`.

    Example:
        >>> from lightning_convnets.tasks import ImageClassifier
        >>> "tta" in prediction_options(ImageClassifier) and "backbone" not in prediction_options(ImageClassifier)
        True
    """
    declared = getattr(model_class, "prediction_options", None)
    return tuple(declared) if declared is not None else PREDICTION_OPTIONS


def _same_backbone(a: Any, b: Any) -> bool:
    def key(spec: Any) -> Any:
        if isinstance(spec, Namespace):
            spec = spec.as_dict()
        if isinstance(spec, dict) and "class_path" in spec:
            return ("class", str(spec["class_path"]).rsplit(".", 1)[-1])
        if isinstance(spec, dict) and "name" in spec:
            return ("name", str(spec["name"]))
        return ("name", str(spec))

    return key(a) == key(b)


def _display(path: str | os.PathLike) -> str:
    text = os.path.abspath(path)
    cwd = os.getcwd()
    return os.path.relpath(text, cwd) if text.startswith(cwd + os.sep) else text


class ConvNetsCLI(LightningCLI):
    """LightningCLI for lightning-convnets (subclass mode for model and data).

    Args:
        *args: :class:`~lightning.pytorch.cli.LightningCLI`'s arguments (model and datamodule classes are
            set here).
        ckpt_path: for ``run=False`` only (``lightning-convnets export``): a checkpoint whose saved
            hyperparameters build the model, as ``--ckpt_path`` does for the subcommands.
        **kwargs: :class:`~lightning.pytorch.cli.LightningCLI`'s keyword arguments.

    Example (not run by the doctests: it trains a model for a minute):
        >>> ConvNetsCLI(args=["fit", "--config", "configs/quickstart.yaml"])  # doctest: +SKIP
    """

    def __init__(self, *args: Any, ckpt_path: str | os.PathLike | None = None, **kwargs: Any) -> None:
        _import_plugins()
        install_warning_filters()  # again: a caller's warnings.catch_warnings() may have reset them
        self._given_ckpt_path = None if ckpt_path is None else str(ckpt_path)
        self._ckpt_file: str | None = None
        self._explicit: dict[str, Any] = {}
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(LightningModule, LightningDataModule, *args, **kwargs)

    # ------------------------------------------------------------------------------------- parsing
    def _prefix(self) -> str:
        sub = self.config.get("subcommand")
        return f"{sub}." if sub else ""

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse ``args`` (``None``: ``sys.argv``) into ``self.config``; with a checkpoint, remember the
        prediction options given explicitly and check that the checkpoint holds the task and backbone the
        config names.

        Our entry points always pass ``args`` explicitly (``main``, the demo, ``export``), so LightningCLI's
        warning about ``args`` beside a non-empty ``sys.argv`` does not apply and is not raised.
        """
        dict_like = isinstance(args, dict | Namespace)
        self.config = parser.parse_object(args) if dict_like else parser.parse_args(args)
        prefix = self._prefix()
        ckpt = self.config.get(f"{prefix}ckpt_path") if prefix else self._given_ckpt_path
        if not ckpt or ckpt == "last":
            return
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"--ckpt_path {ckpt}: no such checkpoint file")
        self._ckpt_file = str(ckpt)
        given = (
            parser.parse_object(args, defaults=False)
            if dict_like
            else parser.parse_args(args, defaults=False)
        )
        self._remember_explicit(given, prefix)
        checkpoint = read_checkpoint(ckpt)
        self._check_task_and_backbone(checkpoint, given, prefix)
        if not prefix:  # export (run=False): LightningCLI only applies a checkpoint to a subcommand
            self._apply_checkpoint_hparams(checkpoint, prefix)

    def _remember_explicit(self, given: Namespace, prefix: str) -> None:
        model_class = _import_class(self.config.get(f"{prefix}model.class_path"))
        init = given.get(f"{prefix}model.init_args")
        if not isinstance(init, Namespace):
            return
        self._explicit = {name: init[name] for name in prediction_options(model_class) if name in init}

    def _check_task_and_backbone(self, checkpoint: dict[str, Any], given: Namespace, prefix: str) -> None:
        task, backbone, holds = describe_checkpoint(checkpoint)
        class_path = self.config.get(f"{prefix}model.class_path")
        wanted = str(class_path).rsplit(".", 1)[-1] if class_path else None
        wanted_backbone = self.config.get(f"{prefix}model.init_args.backbone")
        asked_backbone = given.get(f"{prefix}model.init_args.backbone")
        other_task = task is not None and wanted is not None and task != wanted
        other_backbone = (
            backbone is not None
            and asked_backbone is not None
            and not _same_backbone(backbone, asked_backbone)
        )
        if other_task or other_backbone:
            article = "an" if wanted and wanted[0] in "AEIOU" else "a"
            shown = wanted_backbone.as_dict() if isinstance(wanted_backbone, Namespace) else wanted_backbone
            _, _, asks = (
                describe_checkpoint({"hyper_parameters": {"_class_path": wanted, "backbone": shown}})
                if wanted
                else (None, None, f"{article} model")
            )
            raise CheckpointMismatchError(
                f"--ckpt_path {self._ckpt_file} holds {holds}, but the config asks for {asks}: use the config "
                "the checkpoint was trained with (the config.yaml in its run folder)"
            )

    def _apply_checkpoint_hparams(self, checkpoint: dict[str, Any], prefix: str) -> None:
        """What LightningCLI does with a subcommand's ``--ckpt_path``: the checkpoint's hyperparameters
        replace the model's init arguments. Hyperparameters saved without LightningCLI (no ``_class_path``,
        e.g. ``trainer.save_checkpoint`` in Python) are taken as init arguments of the config's class."""
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            model = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        else:
            model = {"class_path": self.config.get(f"{prefix}model.class_path"), "init_args": hparams}
        update: dict[str, Any] = {"model": model}
        if prefix:
            update = {prefix.rstrip("."): update}
        self.config = self.parser.parse_object(update, self.config)

    def _parse_ckpt_path(self) -> None:
        # Adapter over LightningCLI's private step (tests/test_cli_ckpt_path.py checks that LightningCLI
        # still calls it after parse_arguments): LightningCLI assumes hyperparameters saved by itself
        # (with `_class_path`) and fails on others in subclass mode ("Option 'num_classes' is not
        # accepted"); those are applied here as init arguments of the config's class.
        if self._ckpt_file is not None:
            checkpoint = read_checkpoint(self._ckpt_file)
            if "_class_path" not in (checkpoint.get("hyper_parameters") or {"_class_path": None}):
                self._apply_checkpoint_hparams(checkpoint, self._prefix())
                return
        super()._parse_ckpt_path()

    # ------------------------------------------------------------------------------- instantiation
    def before_instantiate_classes(self) -> None:
        """Give the explicit prediction options back their values (the checkpoint's hyperparameters
        replaced them) and resolve ``--ckpt_path last``."""
        prefix = self._prefix()
        for name, value in self._explicit.items():
            self.config[f"{prefix}model.init_args.{name}"] = value
        if prefix and self.config.get(f"{prefix}ckpt_path") == "last":
            self._resolve_last(prefix)

    def after_instantiate_classes(self) -> None:
        """Refuse a checkpoint whose backbone weights do not fit the built backbone, in one line."""
        super().after_instantiate_classes()
        model = getattr(self, "model", None)
        backbone = getattr(model, "backbone", None)
        if self._ckpt_file is None or backbone is None:
            return
        checkpoint = read_checkpoint(self._ckpt_file)
        problem = weights_mismatch(backbone, checkpoint.get("state_dict") or {}, "backbone.")
        if problem is None:
            return
        _, saved, holds = describe_checkpoint(checkpoint)
        built = type(backbone).__name__
        hint = (
            "; build the same module and load it in Python: "
            f"{type(model).__name__}.load_from_checkpoint(path, backbone=MyNet())"
            if saved is None
            else ""
        )
        raise CheckpointMismatchError(
            f"--ckpt_path {self._ckpt_file} holds {holds} whose weights do not fit the {built} backbone "
            f"built from the config ({problem}){hint}"
        )

    # --------------------------------------------------------------------------- --ckpt_path last
    def _logger_folder(self, prefix: str) -> tuple[Namespace | None, Path]:
        """The first logger's config (when it takes ``save_dir``, ``name`` and ``version``) and the folder
        holding its ``version_*`` folders."""
        trainer = self.config.get(f"{prefix}trainer") or Namespace()
        root = trainer.get("default_root_dir") or os.getcwd()
        logger = trainer.get("logger")
        if isinstance(logger, list):
            logger = logger[0] if logger else None
        if isinstance(logger, Namespace) and "class_path" in logger:
            init = logger.get("init_args") or Namespace()
            if {"save_dir", "name", "version"} <= set(init.keys()):
                save_dir = init.get("save_dir") or root
                return logger, Path(str(save_dir)).expanduser() / str(init.get("name") or "")
            return None, Path(str(root)) / "lightning_logs"
        return None, Path(str(root)) / "lightning_logs"

    def _checkpoint_dirpaths(self, prefix: str) -> list[str]:
        callbacks = self.config.get(f"{prefix}trainer.callbacks") or []
        if not isinstance(callbacks, list):
            callbacks = [callbacks]
        folders = []
        for callback in callbacks:
            if not isinstance(callback, Namespace):
                continue
            cls = _import_class(callback.get("class_path"))
            dirpath = (callback.get("init_args") or Namespace()).get("dirpath")
            if cls is not None and issubclass(cls, ModelCheckpoint) and dirpath:
                folders.append(str(dirpath))
        return folders

    def _resolve_last(self, prefix: str) -> None:
        logger, runs = self._logger_folder(prefix)
        folders: Iterable[str] = [str(runs / "version_*" / "checkpoints"), *self._checkpoint_dirpaths(prefix)]
        found = find_last_checkpoint(folders)
        if found is None:
            rank_zero_warn(
                f"--ckpt_path last: no last*.ckpt in {runs}/version_*/checkpoints"
                + "".join(f" or {f}" for f in self._checkpoint_dirpaths(prefix))
                + "; starting from scratch"
            )
            self.config[f"{prefix}ckpt_path"] = None
            return
        self.config[f"{prefix}ckpt_path"] = str(found)
        version = found.parent.parent
        if (
            prefix == "fit."
            and logger is not None
            and found.parent.name == "checkpoints"
            and version.parent == runs
        ):
            # The resumed run continues in its own version folder: its curves, figures and checkpoints.
            match = _VERSION.match(version.name)
            logger.init_args.version = int(match.group(1)) if match else version.name

    # ------------------------------------------------------------------------------------------ fit
    def after_fit(self) -> None:
        """Print where the best and the last checkpoints of the run are."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        lines = []
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint):
                continue
            if callback.best_model_path and callback.save_top_k != 0:
                score = callback.best_model_score
                metric = (
                    f" ({callback.monitor} {float(score):.4f})"
                    if callback.monitor and score is not None
                    else ""
                )
                lines.append(f"best checkpoint: {_display(callback.best_model_path)}{metric}")
            if callback.last_model_path:
                lines.append(f"last checkpoint: {_display(callback.last_model_path)}")
        for line in dict.fromkeys(lines):
            print(line)


def main(args: list[str] | None = None) -> None:
    """Console-script entry point; ``args=None`` reads ``sys.argv``.

    Returns nothing: the console script passes the return value to ``sys.exit``, which would turn any
    object into exit status 1. Use :class:`ConvNetsCLI` directly to get the trainer and model.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "export":  # lightning-convnets export --config ... --ckpt_path ... --format ...
        export_cli(argv[1:])
        return
    try:
        ConvNetsCLI(args=argv)
    except ValueError as error:  # jsonargparse wraps errors raised while building the model
        failed = _download_failure(error)
        if failed is None:
            raise
        print(f"error: {failed}", file=sys.stderr)  # one line, not a namespace dump and a urllib traceback
        raise SystemExit(1) from None


def _download_failure(error: BaseException) -> BaseException | None:
    seen: BaseException | None = error
    while seen is not None and not isinstance(seen, WeightsDownloadError):
        seen = seen.__cause__
    return seen


# --------------------------------------------------------------------------------------- export
_CLI_HELP = """\
lightning-convnets export: export a trained task (BatchNorm fused, dynamic batch) from its config and
checkpoint.

  lightning-convnets export --config CONFIG.yaml --ckpt_path BEST.ckpt --format onnx|torch_export
                            [--output PATH] [--image_size N] [--opset 18] [--no_fuse]
                            [other LightningCLI arguments, e.g. --model.init_args.top_k 50]

The config is read by the same LightningCLI as fit/test/predict (model and data are built, nothing
runs) and, as with `test --ckpt_path`, the model's architecture comes from the checkpoint's saved
hyperparameters while prediction options (top_k, score_threshold, threshold) given in the config or
on the command line win; the checkpoint's weights are loaded into the model. A checkpoint of another
task or backbone than the config's is refused in one line. The example images that fix the traced
shapes are random, image_size x image_size (default: the data module's image_size, else 64).
The output defaults to the checkpoint's path with .onnx / .pt2; the folder of --output must exist. The data module's class names,
mean and std go into the metadata.
"""


def export_cli(argv: Sequence[str]) -> Path:
    """The ``lightning-convnets export`` subcommand (see ``lightning-convnets export --help``).

    Args:
        argv: the arguments after ``export``.

    Returns:
        The written path (printed too).
    """
    parser = argparse.ArgumentParser(
        prog="lightning-convnets export", description=_CLI_HELP, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", action="append", required=True, help="config file (repeatable)")
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by fit")
    parser.add_argument("--format", choices=FORMATS, default="onnx")
    parser.add_argument("--output", default=None, help="output file (default: checkpoint path + suffix)")
    parser.add_argument("--image_size", type=int, default=None, help="example image side in pixels")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    parser.add_argument("--no_fuse", action="store_true", help="keep BatchNorm layers unfused")
    args, rest = parser.parse_known_args(list(argv))
    ckpt = Path(args.ckpt_path)
    if not ckpt.is_file():
        raise FileNotFoundError(f"export: --ckpt_path {ckpt} is not a file")
    cli_args = [a for c in args.config for a in ("--config", c)] + rest
    # Built as `test --ckpt_path` builds it: the architecture from the checkpoint's hyperparameters, the
    # prediction options (top_k, score_threshold, threshold...) from the config and the command line.
    cli = ConvNetsCLI(args=cli_args, run=False, ckpt_path=ckpt)
    model, datamodule = cli.model, cli.datamodule
    checkpoint = read_checkpoint(ckpt)
    if "state_dict" not in checkpoint:
        raise ValueError(f"export: {ckpt} has no 'state_dict': is it a Lightning checkpoint?")
    model.on_load_checkpoint(checkpoint)  # rebuilds a head sized from the data (num_classes)
    problem = weights_mismatch(model, checkpoint["state_dict"])
    if problem is not None:
        _, _, holds = describe_checkpoint(checkpoint)
        raise CheckpointMismatchError(
            f"export: --ckpt_path {ckpt} holds {holds} whose weights do not fit the "
            f"{type(model).__name__} built from the config ({problem})"
        )
    model.load_state_dict(checkpoint["state_dict"])
    metadata: dict[str, Any] = {"checkpoint": ckpt.name}
    for key in ("mean", "std"):
        value = getattr(datamodule, key, None)
        if value is not None:
            metadata[key] = [float(v) for v in value]
    try:
        names = list(getattr(datamodule, "class_names", None) or [])
    except Exception:  # a data module that must scan its files first: names stay indices
        names = []
    if names and model.num_classes is not None and len(names) == model.num_classes:
        metadata["class_names"] = [str(n) for n in names]
    size = args.image_size or getattr(datamodule, "image_size", None) or 64
    example = default_example(model, batch_size=2, size=int(size))
    output = args.output or ckpt.with_suffix(EXPORT_SUFFIXES[args.format])
    path = export_model(
        model.eval(),
        args.format,
        example,
        output,
        fuse=not args.no_fuse,
        opset=args.opset,
        metadata=metadata,
    )
    print(f"exported {type(model).__name__} ({args.format}) to {path}")
    return path


if __name__ == "__main__":  # pragma: no cover
    main()
