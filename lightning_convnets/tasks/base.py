"""The contract and shared steps of every task: :class:`ConvNetTask`.

``ConvNetTask.__init__`` declares every argument the tasks share (the tasks forward them with
``**kwargs``), resolves the backbone (:func:`~lightning_convnets.backbones.resolve_backbone`) and calls
the task's hooks ``configure_models`` / ``configure_losses`` / ``configure_metrics``. This module owns the
steps, the epoch logging and the hooks' order; the concepts around them have modules of their own:
:mod:`~lightning_convnets.tasks.nonfinite` (the ``nonfinite`` policy), :mod:`~lightning_convnets.tasks.fused_predict`
(``fast_predict``), :mod:`~lightning_convnets.tasks.finetuning` (freezing, parameter groups),
:mod:`~lightning_convnets.tasks.optim` (optimizer and schedule), :mod:`~lightning_convnets.tasks.samples`
(the sample figures). The hooks are listed in ``docs/architecture.md``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MetricCollection

from lightning_convnets.backbones.registry import BackboneSpec, none_strings_to_none, resolve_backbone
from lightning_convnets.backbones.weights import WeightsDownloadError, download_failure, download_message
from lightning_convnets.batch import split_batch
from lightning_convnets.metrics import BatchMean, LoggedValues
from lightning_convnets.nn.compile import check_compile_option, is_compiled
from lightning_convnets.tasks.adapters import attached_trainer, logger_writes_this_step
from lightning_convnets.tasks.finetuning import (
    BackboneFreezer,
    FineTuningHooks,
    check_freeze_options,
    parameter_report,
)
from lightning_convnets.tasks.fused_predict import FastPredictHooks
from lightning_convnets.tasks.nonfinite import NonFiniteHooks, NonFiniteLossError
from lightning_convnets.tasks.optim import WarmupCosineLR, configure_optimization
from lightning_convnets.tasks.samples import SampleFigureHooks
from lightning_convnets.tasks.state import CheckpointStateHooks

__all__ = ["BackboneSpec", "ConvNetTask", "NonFiniteLossError", "WarmupCosineLR", "resolve_backbone"]


def _batch_size(images: Tensor | Sequence[Tensor]) -> int:
    # A tensor batch (N, C, H, W), or a list of images (detection).
    return int(images.shape[0]) if isinstance(images, Tensor) else len(images)


def _first_conv_in_channels(module: nn.Module) -> int | None:
    return next((m.in_channels for m in module.modules() if isinstance(m, nn.Conv2d)), None)


class ConvNetTask(
    CheckpointStateHooks,
    FineTuningHooks,
    NonFiniteHooks,
    FastPredictHooks,
    SampleFigureHooks,
    LightningModule,
    metaclass=abc.ABCMeta,
):
    """Base LightningModule of the tasks: a backbone, a task head, metrics per stage, fine-tuning controls.

    Every argument below is declared here once; the tasks take their own arguments and forward the rest
    with ``**kwargs`` (LightningCLI still lists them all, with types and defaults).

    Hooks a task implements: :meth:`configure_models`, :meth:`configure_losses` and
    :meth:`configure_metrics` (head, loss and metrics for the class count; the base calls them once, through
    :meth:`build_task`, from ``__init__`` when ``num_classes`` is given, else from ``setup`` with the
    datamodule's count, or from ``load_from_checkpoint``), :meth:`shared_step` (``(loss, predictions,
    targets, images)`` of a batch) and :meth:`plot_samples`. Hooks it may override:
    :meth:`evaluate_batch` (what a validation/test batch updates), :meth:`epoch_metrics` (what is logged at
    an epoch's end), :meth:`compute_metrics`, :meth:`progress_bar_metrics_for`, :meth:`default_monitor`,
    :meth:`accepts_data_num_classes`, :meth:`check_datamodule` and :meth:`default_prediction_writer`.

    Checkpoints: ``load_from_checkpoint(path)`` rebuilds the model from the saved hyperparameters when the
    backbone was given as a name or a ``class_path`` dict. A backbone given as a module instance is not a
    hyperparameter, so pass an identically built module again:
    ``ImageClassifier.load_from_checkpoint(path, backbone=MyNet())`` (the weights then come from the file).

    Args:
        backbone: a registry name (``"preact_resnet18"``, ``"unet"``, ``"timm:resnet18"``...), a
            ``{"class_path": ..., "init_args": ...}`` dict, or an ``nn.Module`` honouring the backbone
            contract (see "Checkpoints" above for module instances).
        backbone_kwargs: keyword arguments for the backbone builder (``{"stem": "cifar", "width": 16}``).
        num_classes: number of classes the head predicts (its meaning per task: see the task); ``None``
            takes the datamodule's ``num_classes`` at setup (the checkpoint records it, so
            ``load_from_checkpoint`` rebuilds the head without the datamodule).
        in_channels: image channels; forwarded to registry builders and checked against the datamodule.
        optimizer: optimizer factory taking the parameter groups (LightningCLI ``OptimizerCallable``).
        lr_scheduler: scheduler factory taking the optimizer, or ``None`` for a constant rate. A scheduler
            with an unset ``total_steps`` (``WarmupCosineLR``, ``OneCycleLR``) is given
            ``trainer.estimated_stepping_batches``.
        lr_scheduler_interval: ``"step"`` or ``"epoch"``; ``"auto"`` steps per batch exactly when
            ``total_steps`` was filled in.
        monitor: metric a ``ReduceLROnPlateau`` scheduler watches; ``None``: the task's
            :meth:`default_monitor`, a metric it logs (``val/loss``; ``val/map`` for torchvision detectors).
        freeze_backbone: ``True`` freezes the backbone for the whole run (it is left out of the
            optimizer), an int ``N`` freezes it for the first ``N`` epochs. A frozen backbone runs in eval
            mode (its BatchNorm statistics do not move). Under DDP, a temporary freeze needs
            ``strategy="ddp_find_unused_parameters_true"``.
        freeze_bn: keep every BatchNorm layer of the backbone in eval mode during training (running
            statistics frozen; affine parameters still learn).
        backbone_lr_mult: learning-rate factor of the backbone parameter group relative to the head's
            (e.g. 0.1 when fine-tuning a pretrained backbone).
        num_sample_figures: images per sample-prediction figure (0: no sample figures).
        figure_every_n_epochs: log validation figures every N epochs (0: never; test figures always).
        channels_last: convert the weights to the channels-last memory format at setup (convolutions then
            run NHWC: faster on CPUs and on GPU tensor cores, same numbers).
        compile: ``True`` or a dict of :func:`torch.compile` keyword arguments (``{"mode": "max-autotune"}``):
            the network is compiled in place at setup (:meth:`torch.nn.Module.compile`, after the monitors'
            hooks exist), so checkpoints keep plain parameter names and load with or without compilation.
        nonfinite: what a NaN/Inf training loss or gradient does: ``"stop"`` (default) ends the fit with a
            :class:`NonFiniteLossError` naming the step, the loss and the first non-finite module (with an
            ``ActivationVarianceMonitor``), the last good checkpoint kept; ``"skip"`` drops that optimizer
            step on every rank (logged as ``train/skipped_steps``); ``"warn"`` warns once; ``"rollback"``
            restores the last good snapshot, lowers the learning rate, goes on. See ``docs/reliability.md``.
        max_skipped_steps: consecutive skipped steps that stop the fit (``nonfinite="skip"``).
        spike_threshold: ``"skip"``/``"rollback"`` also act on a loss above this many robust standard
            deviations (median/MAD) of its recent history; ``None``: only on NaN/Inf.
        max_rollbacks, rollback_lr_factor, snapshot_every_n_steps: ``"rollback"`` gives up with
            ``RollbackLimitError`` after this many; multiplies the learning rate by this at each; snapshots
            the weights and optimizer state (in memory) every this many healthy steps.
        fast_predict: ``trainer.predict`` runs a copy of the networks with every BatchNorm that alone reads a
            convolution's output folded into it (2-3x the images/s on a CPU), checked at the first batch
            against the unfused networks (within 1024 epsilons of their dtype; else they run, said once).
            Costs one more copy of the weights during ``predict``; off under ``compile``. See
            :mod:`lightning_convnets.tasks.fused_predict`.
    Example:
        >>> from lightning_convnets import ImageClassifier  # a ConvNetTask
        >>> model = ImageClassifier("resnet18", num_classes=10, freeze_backbone=2, backbone_lr_mult=0.1,
        ...                         optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9))
        >>> [g["name"] for g in model.parameter_groups()]
        ['head', 'backbone']
    """

    def __init__(
        self,
        backbone: BackboneSpec = "resnet18",
        num_classes: int | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        in_channels: int = 3,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        lr_scheduler_interval: Literal["auto", "step", "epoch"] = "auto",
        monitor: str | None = None,
        freeze_backbone: bool | int = False,
        freeze_bn: bool = False,
        backbone_lr_mult: float = 1.0,
        num_sample_figures: int = 8,
        figure_every_n_epochs: int = 1,
        channels_last: bool = False,
        compile: bool | dict[str, Any] = False,
        nonfinite: Literal["stop", "skip", "warn", "rollback"] = "stop",
        max_skipped_steps: int = 10,
        spike_threshold: float | None = None,
        max_rollbacks: int = 5,
        rollback_lr_factor: float = 0.5,
        snapshot_every_n_steps: int = 50,
        fast_predict: bool = True,
    ) -> None:
        super().__init__()
        check_compile_option(compile)
        self.configure_nonfinite(
            nonfinite,
            max_skipped_steps,
            spike_threshold,
            max_rollbacks,
            rollback_lr_factor,
            snapshot_every_n_steps,
        )
        check_freeze_options(freeze_backbone, backbone_lr_mult)
        if num_classes is not None and int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if lr_scheduler_interval not in ("auto", "step", "epoch"):
            raise ValueError(
                f"lr_scheduler_interval must be auto, step or epoch, got {lr_scheduler_interval!r}"
            )
        # A module instance cannot be a hyperparameter (load_from_checkpoint then needs backbone=...), nor a
        # Python callable (a lambda, a class: neither YAML nor always picklable) given as optimizer or
        # scheduler; the config dicts that YAML / LightningCLI give can.
        ignore = ["backbone"] if isinstance(backbone, nn.Module) else []
        self.save_hyperparameters(ignore=ignore)
        drop = [
            k
            for k in ("optimizer", "lr_scheduler")
            if not isinstance(self.hparams.get(k), str | Mapping | None)
        ]
        if drop:
            self.save_hyperparameters(ignore=ignore + drop)
        kwargs = none_strings_to_none(dict(backbone_kwargs or {}))
        if isinstance(backbone, str) or (isinstance(backbone, Mapping) and "class_path" not in backbone):
            kwargs.setdefault("in_channels", in_channels)  # registry builders all take it; a class may not
        try:
            self.backbone = resolve_backbone(backbone, **kwargs)
        except Exception as err:
            failure = download_failure(err)
            if failure is None:
                raise
            raise WeightsDownloadError(download_message(type(self).__name__, failure, kwargs)) from None
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.freezer = BackboneFreezer(freeze_backbone, freeze_bn)
        # Keys carry a trailing underscore: ModuleDict refuses names of Module methods such as "train".
        # BatchMean: the loss summed on the device (no per-batch NaN check on the host, as MeanMetric's)
        self.stage_loss = nn.ModuleDict({f"{s}_": BatchMean() for s in ("train", "val", "test")})
        self.metrics = nn.ModuleDict()
        self.logged_values = LoggedValues()  # no parameters, no saved state: checkpoints unchanged
        self.num_classes: int | None = None
        if freeze_backbone is True:
            self.freezer.set_frozen(self.backbone, True)
        # Subclass arguments are in self.hparams already (save_hyperparameters reads every __init__ frame).
        if num_classes is not None:
            self._build(int(num_classes))

    # ------------------------------------------------------------------------------------ the contract
    def build_task(self, num_classes: int) -> None:
        """Build the task for ``num_classes`` (the base calls it exactly once): :meth:`configure_models`,
        :meth:`configure_losses`, :meth:`configure_metrics`, in that order."""
        self.configure_models(num_classes)
        self.configure_losses()
        self.configure_metrics(num_classes)

    def configure_models(self, num_classes: int) -> None:
        """Hook: the networks on the backbone for ``num_classes`` (head, decoder, detector)."""
        raise NotImplementedError(f"{type(self).__name__} must implement configure_models (or build_task)")

    def configure_losses(self) -> None:
        """Hook: the loss (default: none to build; a task may compute it in ``shared_step``)."""

    def configure_metrics(self, num_classes: int) -> None:
        """Hook: ``self.metrics["<stage>_"]`` for ``train``, ``val`` and ``test`` (default: none)."""
        self.metrics = nn.ModuleDict({f"{s}_": MetricCollection({}) for s in ("train", "val", "test")})

    @abc.abstractmethod
    def shared_step(self, batch: Any, stage: str) -> tuple[Tensor | None, Any, Any, Any]:
        """Return ``(loss, predictions_for_metrics, targets_for_metrics, images)`` of a batch.

        ``loss`` may be ``None`` outside training (a model that computes no loss in eval mode) and
        ``predictions`` ``None`` in training (no training metrics)."""

    def _build(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)
        self.build_task(self.num_classes)

    def accepts_data_num_classes(self, count: int) -> bool:
        """Whether a datamodule with ``count`` classes fits this model (default: the same count)."""
        return count == self.num_classes

    @property
    def default_monitor(self) -> str:
        """The metric a ``ReduceLROnPlateau`` scheduler watches when ``monitor`` is unset."""
        return "val/loss"

    @property
    def monitored_metric(self) -> str:
        """``monitor`` if given, else :attr:`default_monitor`."""
        return self.hparams.get("monitor") or self.default_monitor

    # ------------------------------------------------------------------------- optimizer and schedule
    def on_train_epoch_start(self) -> None:
        """Freeze or unfreeze the backbone for this epoch (a resumed run's random streams come back at its
        first training batch: :class:`~lightning_convnets.tasks.state.CheckpointStateHooks`)."""
        self.apply_freeze_schedule(self.current_epoch)

    def configure_optimizers(self) -> Any:
        """The optimizer over :meth:`parameter_groups` and the scheduler (``total_steps`` filled in)."""
        return configure_optimization(
            self.optimizer_factory,
            self.parameter_groups(),
            self.lr_scheduler_factory,
            lambda: self.trainer.estimated_stepping_batches,
            self.hparams.lr_scheduler_interval,
            self.monitored_metric,
        )

    # ------------------------------------------------------------------------------ data and checks
    @property
    def datamodule(self) -> Any:
        """The trainer's datamodule, or ``None``."""
        return getattr(attached_trainer(self), "datamodule", None)

    def check_datamodule(self) -> None:
        """Raise a ``ValueError`` before training when the datamodule disagrees with the model: image
        channels vs the backbone's first convolution, class count (:meth:`accepts_data_num_classes`).
        Subclasses extend it with checks of their own arguments."""
        dm = self.datamodule
        data_channels = getattr(dm, "in_channels", None)
        model_channels = _first_conv_in_channels(self.backbone)
        if data_channels is not None and model_channels is not None and int(data_channels) != model_channels:
            raise ValueError(
                f"{type(dm).__name__}.in_channels is {data_channels} but the backbone's first convolution "
                f"takes {model_channels} channels; set model in_channels (or the backbone's) to {data_channels}"
            )
        count = getattr(dm, "num_classes", None)
        if count is not None and not self.accepts_data_num_classes(int(count)):
            names = getattr(dm, "class_names", None)
            listed = f" ({', '.join(str(n) for n in list(names)[:20])})" if names else ""
            raise ValueError(
                f"{type(dm).__name__}.num_classes is {count} but the model was built for {self.num_classes} "
                f"classes: the model predicts {self.num_classes} classes and the data has {count}{listed}; "
                f"set model num_classes to {count} (or leave it unset to take it from the data)"
            )

    def setup(self, stage: str) -> None:
        """Build the task from the datamodule's class count if needed, check the data, apply
        ``channels_last`` and ``compile``."""
        if self.num_classes is None:
            count = getattr(self.datamodule, "num_classes", None)
            if count is None:
                raise ValueError(
                    f"{type(self).__name__}: num_classes was not given and the datamodule "
                    f"({type(self.datamodule).__name__}) has no num_classes attribute to take it from"
                )
            self._build(int(count))
            # Recorded as if given, so the checkpoint says how many classes it predicts and Lightning (which
            # refuses module and datamodule hparams sharing a key with other values) sees the count a
            # datamodule given num_classes holds. A datamodule keeping None keeps ours None.
            if getattr(self.datamodule, "hparams_initial", {}).get("num_classes", count) is not None:
                self.save_hyperparameters({"num_classes": int(count)})
        self.check_datamodule()
        if self.hparams.get("channels_last"):
            self.to(memory_format=torch.channels_last)
        option = self.hparams.get("compile")
        for module in self.compile_modules() if option else []:
            if not is_compiled(module):  # setup runs once per stage
                module.compile(**({} if option is True else dict(option)))

    def compile_modules(self) -> list[nn.Module]:
        """The modules ``compile`` compiles in place: the task itself (its ``forward`` is the network)."""
        return [self]

    def on_fit_start(self) -> None:
        """Log the parameter count and its ratio to the number of training examples."""
        n_train = getattr(self.datamodule, "num_train_examples", None)
        n_train = n_train or len(getattr(self.trainer.train_dataloader, "dataset", None) or ())
        self.model_stats, message = parameter_report(self, int(n_train or 0))
        rank_zero_info(message)
        if self.trainer.is_global_zero:
            for logger in self.trainer.loggers:
                logger.log_metrics(self.model_stats, step=0)

    # --------------------------------------------------------------------------------------- steps
    #: ``(images, targets)`` of a batch (:func:`lightning_convnets.batch.split_batch`).
    unpack_batch = staticmethod(split_batch)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Log ``train/loss`` per step and update the epoch's training loss and metrics."""
        loss, preds, target, images = self.shared_step(batch, "train")
        if loss is None:
            raise RuntimeError(f"{type(self).__name__}.shared_step returned no loss for a training batch")
        n = _batch_size(images)
        self.nonfinite_guard.note_loss(loss)
        if self.logging_step():
            # Only where the loggers write: the progress bar reads every value it shows on the host at
            # every step (a device sync), and Lightning would discard the value on the other steps.
            self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
        self.stage_loss["train_"].update(loss.detach(), n)
        if preds is not None:
            self.metrics["train_"].update(preds, target)
        return loss

    def logging_step(self) -> bool:
        """Whether the loggers write this training step: values logged ``on_step`` only are computed then
        (Lightning discards them on the other steps, and each ``self.log`` costs about a millisecond)."""
        return logger_writes_this_step(attached_trainer(self))

    def evaluate_batch(self, batch: Any, batch_idx: int, stage: str) -> None:
        """Hook: what a validation or test batch updates (loss, metrics, the samples of the figure)."""
        loss, preds, target, images = self.shared_step(batch, stage)
        if loss is not None:
            self.stage_loss[f"{stage}_"].update(loss.detach(), _batch_size(images))
        self.metrics[f"{stage}_"].update(preds, target)
        self.remember_samples(stage, batch_idx, images, preds, target)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Evaluate a validation batch (:meth:`evaluate_batch`)."""
        self.evaluate_batch(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Evaluate a test batch (:meth:`evaluate_batch`)."""
        self.evaluate_batch(batch, batch_idx, "test")

    # ----------------------------------------------------------------------------- epoch-end logging
    def epoch_metrics(self, stage: str) -> dict[str, Tensor]:
        """Hook: the values logged at the end of a ``stage`` epoch (``<stage>/loss`` and
        :meth:`compute_metrics`); called once per epoch, before the stage's metrics are reset."""
        return {f"{stage}/loss": self.stage_loss[f"{stage}_"].compute(), **self.compute_metrics(stage)}

    def log_epoch_metrics(self, stage: str) -> None:
        """Log :meth:`epoch_metrics` (progress-bar ones on the bar) and reset the stage's metrics."""
        # One compute per epoch: torchmetrics syncs its states across ranks there, so every rank logs the
        # same values and no per-key sync_dist reduction is needed.
        values = self.epoch_metrics(stage)
        self.stage_loss[f"{stage}_"].reset()
        self.metrics[f"{stage}_"].reset()
        prog_bar = self.progress_bar_metrics_for(stage)
        for name, value in values.items():
            # Handed to Lightning as a Metric (LoggedValue), not a tensor: the value is already the same on
            # every rank, and Lightning would otherwise ask for sync_dist=True under DDP.
            holder, key = self.logged_values.holding(name, value)
            self.log(name, holder, prog_bar=name in prog_bar, metric_attribute=f"logged_values.{key}")

    def compute_metrics(self, stage: str) -> dict[str, Tensor]:
        """Scalar metrics of ``stage`` as ``{"<stage>/<name>": value}`` (per-class entries flattened)."""
        return {f"{stage}/{name}": value for name, value in self.metrics[f"{stage}_"].compute().items()}

    def progress_bar_metrics_for(self, stage: str) -> set[str]:
        """Names of the epoch metrics shown on the progress bar."""
        return {f"{stage}/loss"}

    def on_train_epoch_end(self) -> None:
        """Log the training epoch's metrics."""
        self.log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        """Log the validation figures and metrics (nothing during the sanity check)."""
        if self.trainer.sanity_checking:
            self.stage_loss["val_"].reset()
            self.metrics["val_"].reset()
            self.forget_samples("val")
            return
        self.log_figures("val")
        self.log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        """Log the test figures and metrics."""
        self.log_figures("test")
        self.log_epoch_metrics("test")

    # ------------------------------------------------------------------------------------ prediction
    def default_prediction_writer(self) -> Callback | None:
        """The writer attached automatically in ``predict`` when none is configured (subclasses)."""
        return None

    def configure_callbacks(self) -> list[Callback]:
        """In ``predict``, the task's default prediction writer unless a writer is configured."""
        trainer = attached_trainer(self)
        if trainer is None or trainer.state.fn != "predict":
            return []
        if any(isinstance(cb, BasePredictionWriter) for cb in trainer.callbacks):
            return []
        writer = self.default_prediction_writer()
        return [writer] if writer is not None else []
