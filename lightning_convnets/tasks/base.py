"""The shared base of every task (:class:`ConvNetTask`) and the default LR schedule (:class:`WarmupCosineLR`).

Start with :class:`ConvNetTask`: its ``__init__`` declares every argument the tasks share (the tasks
forward them with ``**kwargs``), resolves the backbone (:func:`resolve_backbone`) and calls the
subclass's :meth:`ConvNetTask.build_task`. The hooks a task implements or overrides are listed in
its docstring and in ``docs/architecture.md``.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import functools
import importlib
import inspect
import math
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from lightning_convnets.backbones import check_contract, create_backbone
from lightning_convnets.backbones.weights import WeightsDownloadError, download_failure
from lightning_convnets.batch import INPUT_KEYS
from lightning_convnets.metrics import BatchMean, LoggedValue
from lightning_convnets.nn.fusion import fuse_conv_bn, runtime_conv_bn_pairs

BackboneSpec = str | dict[str, Any] | nn.Module
NONFINITE_MODES = ("stop", "skip", "warn")


#: fast_predict's check: a folded network's outputs may differ from the unfused ones by this many units of
#: rounding (the machine epsilon of the dtype the check runs in) times each output's largest magnitude.
#: Folding changes only where rounding happens (``(w * s) @ x`` for ``s * (w @ x)``): measured 5 to 40
#: epsilons (under 5e-6 relative in float32) on the tasks' networks (the trained quickstart ResNet, ResNets,
#: U-Nets, hourglasses with BatchNorm statistics far from the identity). 1024 epsilons is 1.2e-4 relative
#: in float32; a wrong fold (a convolution whose output another layer also reads) moves outputs by percents.
FOLD_TOLERANCE_EPS = 1024


def _float_leaves(output: Any) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for v in output.values() for t in _float_leaves(v)]
    if isinstance(output, list | tuple):
        return [t for v in output for t in _float_leaves(v)]
    return []


def _outputs_agree(got: Any, want: Any, eps: float) -> bool:
    """Whether two (nested) outputs hold the same tensors: floating ones within
    ``FOLD_TOLERANCE_EPS * eps`` times the largest magnitude of each ``want`` tensor, the others exactly."""
    a, b = _float_leaves(got), _float_leaves(want)
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return False
            continue
        if not y.numel():
            continue
        scale = y.abs().max().clamp_min(torch.finfo(y.dtype).tiny)
        if not bool(((x - y).abs().max() <= FOLD_TOLERANCE_EPS * eps * scale).item()):
            return False
    return True


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss or gradient (``nonfinite="stop"``, or too many skipped steps).

    The message names the optimizer step, the loss value and, when an ``ActivationVarianceMonitor`` is
    attached, the first module whose output was non-finite.
    """


class WarmupCosineLR(LambdaLR):
    """Linear warmup to the base learning rate, then cosine decay to ``min_lr_ratio`` times it.

    Meant to be stepped every optimizer step. Leave ``total_steps`` unset inside a task: the task fills
    it with ``trainer.estimated_stepping_batches``.

    Args:
        optimizer: the wrapped optimizer.
        total_steps: length of the schedule in optimizer steps.
        warmup: warmup length, as a fraction of ``total_steps`` when < 1, else as a step count.
        min_lr_ratio: final learning rate as a fraction of the base one.

    Example:
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> sched = WarmupCosineLR(opt, total_steps=10, warmup=0.2)
        >>> [round(sched.lr_lambda(s), 2) for s in (0, 1, 2, 6, 10)]
        [0.33, 0.67, 1.0, 0.5, 0.0]
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int | None = None,
        warmup: float = 0.05,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if total_steps is None or total_steps < 1:
            raise ValueError(
                f"WarmupCosineLR needs total_steps >= 1 (got {total_steps}); inside a task it is filled from "
                "trainer.estimated_stepping_batches, so set trainer.max_epochs or trainer.max_steps"
            )
        if warmup < 0 or not 0 <= min_lr_ratio <= 1:
            raise ValueError(
                f"WarmupCosineLR: warmup must be >= 0 and min_lr_ratio in [0, 1], got {warmup}, {min_lr_ratio}"
            )
        self.total_steps = int(total_steps)
        self.warmup_steps = round(warmup * total_steps) if warmup < 1 else int(warmup)
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, self.lr_lambda, last_epoch=last_epoch)

    def lr_lambda(self, step: int) -> float:
        """Learning-rate factor at optimizer step ``step``."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def resolve_backbone(spec: BackboneSpec, **kwargs: Any) -> nn.Module:
    """Turn a backbone specification into a module honouring the backbone contract.

    Args:
        spec: a registry name (see :func:`lightning_convnets.backbones.list_backbones`), a dict with
            ``class_path`` (and optional ``init_args``) as written in YAML, a dict with ``name`` (and builder
            keyword arguments) for the registry, or an ``nn.Module`` (used as is).
        **kwargs: extra keyword arguments for the builder (ignored for a module instance).

    Raises:
        TypeError: for another type, or a module that lacks ``out_channels`` / ``reductions``.

    Example:
        >>> net = resolve_backbone("preact_resnet18", stem="cifar", width=8)
        >>> net.out_channels, net.reductions
        ([8, 16, 32, 64], [1, 2, 4, 8])
    """
    if isinstance(spec, nn.Module):
        backbone = spec
    elif isinstance(spec, str):
        backbone = create_backbone(spec, **kwargs)
    elif isinstance(spec, Mapping) and "class_path" in spec:
        class_path = spec["class_path"]
        module_name, _, class_name = str(class_path).rpartition(".")
        if not module_name:
            raise TypeError(f"backbone class_path must be 'package.module.Class', got {class_path!r}")
        cls = getattr(importlib.import_module(module_name), class_name, None)
        if cls is None:
            raise TypeError(f"backbone class_path {class_path!r}: {module_name} has no {class_name!r}")
        backbone = cls(**{**dict(spec.get("init_args") or {}), **kwargs})
    elif isinstance(spec, Mapping) and "name" in spec:
        options = {k: v for k, v in spec.items() if k != "name"}
        backbone = create_backbone(spec["name"], **{**options, **kwargs})
    else:
        raise TypeError(
            "backbone must be a registry name (str), a {'class_path': ..., 'init_args': ...} dict, a "
            f"{{'name': ...}} dict or an nn.Module; got {type(spec).__name__}: {spec!r}"
        )
    check_contract(backbone)
    return backbone


def _none_strings_to_none(value: Any) -> Any:
    """``value`` with every string ``"None"`` inside dicts and lists turned into ``None``.

    jsonargparse (4.53) turns a ``null`` given on the command line for a key inside a dict argument of a
    subclass (``--model.init_args.backbone_kwargs.encoder_kwargs.weights null``) into the string
    ``"None"``; no backbone option takes that string, and ``null`` (from scratch) is what was meant.
    ``tests/test_tasks_units.py`` fails once jsonargparse keeps the ``None``.
    """
    if isinstance(value, Mapping):
        return {k: _none_strings_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_none_strings_to_none(v) for v in value]
    return None if isinstance(value, str) and value == "None" else value


_WEIGHT_OPTIONS = {"weights": "null", "encoder_weights": "null", "pretrained": "false"}


def _weight_options(kwargs: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``path=value`` of every option in ``kwargs`` (nested) that asks for pretrained weights, with the
    value that turns it off (``weights=null``, ``pretrained=false``)."""
    found = []
    for key, value in kwargs.items():
        if isinstance(value, Mapping):
            found += _weight_options(value, f"{prefix}{key}.")
        elif key in _WEIGHT_OPTIONS and value not in (None, False):
            found.append(f"{prefix}{key}={_WEIGHT_OPTIONS[key]}")
    return found


def _download_message(task: str, failure: BaseException, kwargs: Mapping[str, Any]) -> str:
    """One line: which download failed, where weights are cached, how to train from scratch."""
    reason = getattr(failure, "reason", None) or failure
    options = _weight_options(kwargs)
    scratch = (
        " or ".join(f"--model.init_args.backbone_kwargs.{o}" for o in options)
        if options
        else "the backbone's weights option set to null (pretrained: false)"
    )
    return (
        f"{task}: the backbone's pretrained weights could not be downloaded ({type(failure).__name__}: "
        f"{reason}). Connect once to download them (torchvision caches them under "
        f"{Path(torch.hub.get_dir()) / 'checkpoints'}, timm/smp under the Hugging Face cache), or train from scratch with {scratch}"
    )


def _first_conv_in_channels(module: nn.Module) -> int | None:
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            return layer.in_channels
    return None


def _scheduler_accepts_total_steps(factory: Any) -> bool:
    """True when ``factory`` (a class, or the ``functools.partial`` LightningCLI builds) has an unset
    ``total_steps`` argument that the task should fill."""
    if isinstance(factory, functools.partial):
        keywords = factory.keywords
        if "total_steps" in keywords:
            # OneCycleLR may instead be configured by epochs * steps_per_epoch.
            return keywords["total_steps"] is None and not (
                keywords.get("epochs") and keywords.get("steps_per_epoch")
            )
        target = next((a for a in reversed(factory.args) if inspect.isclass(a)), factory.func)
    else:
        target = factory
    try:
        param = inspect.signature(target).parameters.get("total_steps")
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is None


def _check_compile_option(option: Any) -> None:
    if isinstance(option, bool):
        return
    if not isinstance(option, Mapping):
        raise TypeError(f"compile must be a bool or a dict of torch.compile arguments, got {option!r}")
    allowed = set(inspect.signature(torch.compile).parameters) - {"model"}
    unknown = sorted(set(option) - allowed)
    if unknown:
        raise ValueError(f"compile: unknown torch.compile arguments {unknown}; allowed: {sorted(allowed)}")


def _rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python generator states, as plain data (weights-only loadable)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _batch_size(images: Tensor | Sequence[Tensor]) -> int:
    # A tensor batch (N, C, H, W), or a list of images (detection).
    return int(images.shape[0]) if isinstance(images, Tensor) else len(images)


def _is_image_batch(images: Any) -> bool:
    """A 4-D image tensor, or a list of 3-D images (detection batches)."""
    if isinstance(images, Tensor):
        return images.dim() == 4
    return isinstance(images, list | tuple) and bool(images) and all(
        isinstance(i, Tensor) and i.dim() == 3 for i in images
    )


def _first_device_type(value: Any) -> str:
    leaves = _float_leaves(value)
    return leaves[0].device.type if leaves else "cpu"


def _autocast_off(example: Any) -> Any:
    """A context without autocast on the example's device (the check compares in one dtype)."""
    return torch.autocast(_first_device_type(example), enabled=False)


def _requiring_grad(value: Any) -> Any:
    """Floating tensors of ``value`` as fresh leaves requiring grad (so that every layer has a graph
    node, frozen weights or not); copies, so that tensors made under ``inference_mode`` (``predict``'s)
    can enter a graph."""
    if isinstance(value, Tensor):
        return value.detach().clone().requires_grad_() if value.is_floating_point() else value.clone()
    if isinstance(value, list | tuple):
        return type(value)(_requiring_grad(v) for v in value)
    return value


def _any_nonfinite(tensors: list[Tensor]) -> Tensor:
    """On the device, without a sync: whether any element of ``tensors`` is NaN or Inf (a 0-d bool).

    One fused pass: the check-and-unscale kernel of mixed-precision training (``GradScaler``'s) with a
    scale of 1, which leaves every value as it is; 4x faster than a norm per tensor on a CPU, where the
    ``_foreach`` ops loop over the tensors one dispatch at a time. Falls back to the per-tensor norms where
    the kernel refuses the tensors (mixed devices or dtypes it does not take)."""
    device = tensors[0].device
    try:
        found = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, torch.ones(1, device=device))
        return found[0] > 0
    except (RuntimeError, TypeError):  # the norm of a tensor holding NaN/Inf is NaN/Inf
        return ~torch.isfinite(torch.stack(torch._foreach_norm(tensors)).float().sum())


class ConvNetTask(LightningModule, metaclass=abc.ABCMeta):
    """Base LightningModule of the tasks: a backbone, a task head, metrics per stage, fine-tuning controls.

    Every argument below is declared here once; the tasks take their own arguments and forward the rest
    with ``**kwargs`` (LightningCLI still lists them all, with types and defaults).

    Hooks a task implements: :meth:`build_task` (head, loss and metrics for the class count; the base
    calls it once, from ``__init__`` when ``num_classes`` is given, else from ``setup`` with the
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
            takes the datamodule's ``num_classes`` at setup. A count taken from the datamodule is not
            written into the hyperparameters (which keep ``None``): the checkpoint stores it separately,
            so ``load_from_checkpoint`` rebuilds the head without the datamodule.
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
        compile: ``True`` or a dict of :func:`torch.compile` keyword arguments (``{"mode": "max-autotune"}``,
            ``{"backend": "aot_eager"}``): the network is compiled in place at setup
            (:meth:`torch.nn.Module.compile`, after the monitors' hooks exist), so checkpoints keep plain
            parameter names (no ``_orig_mod.``) and load with or without compilation.
        nonfinite: what a NaN/Inf training loss or gradient does. ``"stop"`` (default): the fit ends with a
            :class:`NonFiniteLossError` naming the step, the loss and (with an ``ActivationVarianceMonitor``)
            the first non-finite module; no checkpoint is written after that step, so the last good one
            stays. ``"skip"``: that optimizer step is dropped (weights and optimizer state untouched),
            counted and logged as ``train/skipped_steps``; ``max_skipped_steps`` in a row stop the fit.
            ``"warn"``: one warning, training goes on. ``"stop"`` and ``"warn"`` keep a flag on the device
            and read it every ``log_every_n_steps`` (and before each checkpoint): no per-step host sync;
            ``"skip"`` must decide before each optimizer step, so it reads one flag per step.
        max_skipped_steps: consecutive skipped steps that stop the fit (``nonfinite="skip"``).
        fast_predict: ``trainer.predict`` runs a copy of the networks with every BatchNorm that directly
            follows a convolution folded into it, its weights in the channels-last memory format (2-3x
            the images/s of the unfused network on a CPU, ``benchmarks/bench_inference.py``). The copy is
            made at the first predict batch (on its first image, or first tile under tiled prediction) and
            checked there: a BatchNorm is folded only into a convolution whose output it alone reads, and
            each network's outputs equal the unfused ones within 1024 machine epsilons of the networks'
            dtype (1.2e-4 in float32, autocast off) relative to each output's largest magnitude, else the
            unfused networks run (said once). It costs one more copy of the weights during ``predict``; training, validation and
            test never use it. Off under ``compile``.

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
        nonfinite: Literal["stop", "skip", "warn"] = "stop",
        max_skipped_steps: int = 10,
        fast_predict: bool = True,
    ) -> None:
        super().__init__()
        _check_compile_option(compile)
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        if max_skipped_steps < 1:
            raise ValueError(f"max_skipped_steps must be >= 1, got {max_skipped_steps}")
        if isinstance(freeze_backbone, bool):
            pass
        elif not isinstance(freeze_backbone, int) or freeze_backbone < 0:
            raise ValueError(
                f"freeze_backbone must be a bool or an epoch count >= 0, got {freeze_backbone!r}"
            )
        if backbone_lr_mult < 0:
            raise ValueError(f"backbone_lr_mult must be >= 0, got {backbone_lr_mult}")
        if num_classes is not None and int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if lr_scheduler_interval not in ("auto", "step", "epoch"):
            raise ValueError(
                f"lr_scheduler_interval must be auto, step or epoch, got {lr_scheduler_interval!r}"
            )
        # A module instance cannot be a hyperparameter (load_from_checkpoint then needs backbone=...);
        # names and the class_path dicts that YAML / LightningCLI give can.
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        # Python callables (a lambda, a class) are neither YAML nor always picklable: keep only the config
        # dicts LightningCLI records for optimizer and scheduler.
        drop = [
            k
            for k in ("optimizer", "lr_scheduler")
            if not isinstance(self.hparams.get(k), str | Mapping | None)
        ]
        if drop:
            self.remove_ignored_hparams(drop)
            for key in drop:
                getattr(self, "_hparams_initial", {}).pop(key, None)
        kwargs = _none_strings_to_none(dict(backbone_kwargs or {}))
        if isinstance(backbone, str) or (isinstance(backbone, Mapping) and "class_path" not in backbone):
            # Registry builders all take in_channels; an arbitrary class_path class may not.
            kwargs.setdefault("in_channels", in_channels)
        try:
            self.backbone = resolve_backbone(backbone, **kwargs)
        except Exception as err:
            failure = download_failure(err)
            if failure is None:
                raise
            raise WeightsDownloadError(_download_message(type(self).__name__, failure, kwargs)) from None
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self._backbone_frozen = False
        self._samples: dict[str, tuple[Tensor, Tensor, Tensor | None]] = {}
        # Keys carry a trailing underscore: ModuleDict refuses names of Module methods such as "train".
        # BatchMean: the loss summed on the device (no per-batch NaN check on the host, as MeanMetric's)
        self.stage_loss = nn.ModuleDict({f"{s}_": BatchMean() for s in ("train", "val", "test")})
        self.metrics = nn.ModuleDict()
        self.num_classes: int | None = None
        self._reset_nonfinite_state()
        self._rng_to_restore: dict[str, Any] | None = None
        if freeze_backbone is True:
            self._set_backbone_frozen(True)
        # Subclass arguments are in self.hparams already (save_hyperparameters reads every __init__ frame).
        if num_classes is not None:
            self._build(int(num_classes))

    # ----------------------------------------------------------------------------- fine-tuning controls
    def _freeze_wanted(self, epoch: int) -> bool:
        freeze = self.hparams.freeze_backbone
        if freeze is True:
            return True
        return bool(freeze) and epoch < int(freeze)

    def _set_backbone_frozen(self, frozen: bool) -> None:
        for param in self.backbone.parameters():
            param.requires_grad_(not frozen)
        self._backbone_frozen = frozen

    def train(self, mode: bool = True) -> ConvNetTask:
        """Switch modes, keeping a frozen backbone (or, with ``freeze_bn``, its BatchNorm layers) in eval."""
        super().train(mode)
        if mode and self._backbone_frozen:
            self.backbone.eval()
        elif mode and self.hparams.freeze_bn:
            for layer in self.backbone.modules():
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    layer.eval()
        return self

    def on_train_epoch_start(self) -> None:
        """Freeze or unfreeze the backbone as ``freeze_backbone`` says for this epoch."""
        wanted = self._freeze_wanted(self.current_epoch)
        if wanted != self._backbone_frozen:
            self._set_backbone_frozen(wanted)
            rank_zero_info(f"epoch {self.current_epoch}: backbone {'frozen' if wanted else 'unfrozen'}")
        self.train(True)  # re-apply eval-mode rules after a freeze change
        if self._rng_to_restore is not None:
            # A resumed run continues the random streams where the checkpoint left them (after the data
            # loaders were made, which draw from them), so what follows draws the same numbers.
            _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    # ------------------------------------------------------------------------ optimizer and scheduler
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Parameter groups ``head`` (everything outside the backbone) and ``backbone``.

        The backbone group is left out when the backbone is frozen for the whole run; its ``lr_mult`` is
        applied to the optimizer's learning rate once the optimizer exists.
        """
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        head = [p for p in self.parameters() if id(p) not in backbone_ids]
        groups = [{"params": head, "name": "head", "lr_mult": 1.0}]
        if self.hparams.freeze_backbone is not True:
            groups.append(
                {
                    "params": list(self.backbone.parameters()),
                    "name": "backbone",
                    "lr_mult": self.hparams.backbone_lr_mult,
                }
            )
        return [g for g in groups if g["params"]]

    def configure_optimizers(self) -> Any:
        """The optimizer over :meth:`parameter_groups` and the scheduler (``total_steps`` filled in)."""
        optimizer = self.optimizer_factory(self.parameter_groups())
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * group.get("lr_mult", 1.0)
            if "initial_lr" in group:
                group["initial_lr"] = group["lr"]
        factory = self.lr_scheduler_factory
        if factory is None:
            return optimizer
        filled = _scheduler_accepts_total_steps(factory)
        if filled:
            total = self.trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError(
                    "lr_scheduler needs the run length (total_steps) but the trainer has no max_epochs or "
                    "max_steps; set one of them or pass total_steps to the scheduler"
                )
            try:
                scheduler = factory(optimizer, total_steps=int(total))
            except ZeroDivisionError as err:
                # OneCycleLR divides by each phase's length: a run too short for pct_start makes one zero.
                raise ValueError(
                    f"lr_scheduler: total_steps={int(total)} is too short for the schedule (a phase such as "
                    "OneCycleLR's pct_start warm-up would last zero steps); train longer (max_epochs / "
                    "max_steps) or change pct_start"
                ) from err
        else:
            scheduler = factory(optimizer)
        interval = self.hparams.lr_scheduler_interval
        if interval == "auto":
            interval = "step" if filled else "epoch"
        config: dict[str, Any] = {"scheduler": scheduler, "interval": interval}
        if isinstance(scheduler, ReduceLROnPlateau):
            config["monitor"] = self.monitored_metric
        return {"optimizer": optimizer, "lr_scheduler": config}

    # ------------------------------------------------------------------------------ data and checks
    @property
    def datamodule(self) -> Any:
        """The trainer's datamodule, or ``None``."""
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

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

    @abc.abstractmethod
    def build_task(self, num_classes: int) -> None:
        """Build the head, loss and metric collections for ``num_classes`` (the base calls it once)."""

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

    def setup(self, stage: str) -> None:
        """Build the task from the datamodule's class count if needed, check the data, apply ``channels_last``."""
        if self.num_classes is None:
            count = getattr(self.datamodule, "num_classes", None)
            if count is None:
                raise ValueError(
                    f"{type(self).__name__}: num_classes was not given and the datamodule "
                    f"({type(self.datamodule).__name__}) has no num_classes attribute to take it from"
                )
            self._build(int(count))
            # Recorded as if given (hparams and hparams_initial), so the checkpoint says how many classes it
            # predicts, and Lightning, which refuses to log module and datamodule hparams sharing a key with
            # different values, sees the count a datamodule given num_classes holds (ours record the count
            # found for a num_classes left None, at their setup). A datamodule keeping None keeps ours None.
            if getattr(self.datamodule, "hparams_initial", {}).get("num_classes", count) is not None:
                self.save_hyperparameters({"num_classes": int(count)})
        self.check_datamodule()
        if self.hparams.get("channels_last"):
            self.to(memory_format=torch.channels_last)
        self._apply_compile()

    def compile_modules(self) -> list[nn.Module]:
        """The modules ``compile`` compiles in place: the task itself (its ``forward`` is the network)."""
        return [self]

    def _apply_compile(self) -> None:
        option = self.hparams.get("compile")
        if not option:
            return
        kwargs = {} if option is True else dict(option)
        for module in self.compile_modules():
            if getattr(module, "_compiled_call_impl", None) is None:  # setup runs once per stage
                module.compile(**kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the class count (it may come from the datamodule, not the hyperparameters), the random
        generators' states and the skipped-step count; refuse to save after a non-finite step."""
        if self.hparams.get("nonfinite", "stop") == "stop":
            self._check_nonfinite()  # raises: the last good checkpoint stays as it is
        checkpoint["lightning_convnets"] = {
            "num_classes": self.num_classes,
            "rng": _rng_state(),
            "skipped_steps": self._nf_skipped,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Build the head for the checkpoint's class count before its weights load."""
        # Runs before the weights are loaded, so a head whose size came from the datamodule is rebuilt
        # here by load_from_checkpoint (no datamodule needed).
        ours = checkpoint.get("lightning_convnets") or {}
        self._rng_to_restore = ours.get("rng")
        self._nf_skipped = int(ours.get("skipped_steps", 0))
        saved = ours.get("num_classes")
        if saved is None:
            return
        if self.num_classes is None:
            self._build(int(saved))
        elif int(saved) != self.num_classes:
            raise ValueError(
                f"the checkpoint was trained for {saved} classes but this {type(self).__name__} has "
                f"{self.num_classes}; leave num_classes unset or set it to {saved}"
            )

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: Any,
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        weights_only: bool = True,
        **kwargs: Any,
    ) -> Any:
        """``LightningModule.load_from_checkpoint`` with ``weights_only=True`` by default: a checkpoint
        holding a pickled object of another class is refused (pass ``weights_only=False`` only for a
        file you trust: unpickling can run code)."""
        return super().load_from_checkpoint(
            checkpoint_path, map_location, hparams_file, strict, weights_only=weights_only, **kwargs
        )

    def on_fit_start(self) -> None:
        """Log the parameter count and its ratio to the number of training examples."""
        n_params = sum(p.numel() for p in self.parameters())
        n_trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        n_train = self._num_train_examples()
        stats = {"model/params": float(n_params), "model/trainable_params": float(n_trainable)}
        message = f"{type(self).__name__}: {n_params:,} parameters ({n_trainable:,} trainable)"
        if n_train:
            stats["model/params_per_train_example"] = n_params / n_train
            message += f", {n_params / n_train:.1f} per training example ({n_train:,} examples)"
        self.model_stats = stats
        rank_zero_info(message)
        if self.trainer.is_global_zero:
            for logger in self.trainer.loggers:
                logger.log_metrics(stats, step=0)

    def _num_train_examples(self) -> int | None:
        dm = self.datamodule
        count = getattr(dm, "num_train_examples", None)
        if count:
            return int(count)
        try:
            return len(self.trainer.train_dataloader.dataset)
        except (AttributeError, TypeError):
            return None

    # --------------------------------------------------------------------------------------- steps
    @staticmethod
    def unpack_batch(batch: Any) -> tuple[Tensor, Any]:
        """``(images, targets)`` from a tensor, a ``(images, targets, ...)`` sequence or a dict with one of
        :data:`lightning_convnets.batch.INPUT_KEYS` (``image``, ``images``, ``pixel_values``...) and
        ``label``/``labels``/``mask``/``masks``/``target``; targets may be None."""
        if isinstance(batch, Tensor):
            return batch, None
        if isinstance(batch, Mapping):
            images = next((batch[k] for k in INPUT_KEYS if k in batch), None)
            if images is None:
                raise KeyError(f"batch dict needs one of the keys {list(INPUT_KEYS)}, got keys {sorted(batch)}")
            target = next(
                (batch[k] for k in ("label", "labels", "mask", "masks", "target") if k in batch), None
            )
            return images, target
        if isinstance(batch, list | tuple) and batch:
            return batch[0], (batch[1] if len(batch) > 1 else None)
        raise TypeError(f"cannot read images from a batch of type {type(batch).__name__}")

    # ------------------------------------------------------------------ predict: BatchNorm folded
    def on_predict_start(self) -> None:
        """A new ``predict`` run: the fused copy is rebuilt from the current weights at its first batch."""
        self._predict_fused = None

    def on_predict_end(self) -> None:
        """Drop the fused copy (its memory, and any chance of it outliving the weights it was made of)."""
        self._predict_fused = None

    @contextlib.contextmanager
    def fused_for_predict(self, images: Any) -> Iterator[None]:
        """Run the body with the BatchNorm-folded copy of the networks in place of the networks
        (``fast_predict``; only inside ``trainer.predict``, in eval mode). ``images`` is what the task's
        ``forward`` takes: the first batch builds and checks the copy."""
        trainer = self._trainer
        if (
            not self.hparams.get("fast_predict", True)
            or self.training
            or trainer is None
            or not getattr(trainer, "predicting", False)
            or self.hparams.get("compile")
        ):
            yield
            return
        if getattr(self, "_predict_fused", None) is None:
            self._predict_fused = self._build_predict_fused(images)
        with self._networks_swapped(self._predict_fused):
            yield

    @contextlib.contextmanager
    def _networks_swapped(self, networks: Mapping[str, nn.Module]) -> Iterator[None]:
        """These modules in place of the task's children of the same names, the originals back on exit."""
        originals = {name: getattr(self, name) for name in networks}
        try:
            for name, module in networks.items():
                setattr(self, name, module)
            yield
        finally:
            for name, module in originals.items():
                setattr(self, name, module)

    @torch.no_grad()
    def _build_predict_fused(self, images: Any) -> dict[str, nn.Module]:
        """The task's networks (children holding BatchNorm) copied together (shared submodules stay shared)
        with the ``conv -> BN`` pairs one forward of ``images`` shows folded (a pair only where the BN is
        the convolution output's sole reader), or ``{}`` when nothing folds or a network's outputs moved
        by more than rounding allows (:data:`FOLD_TOLERANCE_EPS`). The check runs on the first image of
        ``images`` (the tasks pass a tile under tiled prediction), without autocast, in the networks'
        dtype."""
        names = [n for n, c in self.named_children() if any(isinstance(m, _BatchNorm) for m in c.modules())]
        if not names:
            return {}
        example = images[:1]
        try:
            with _autocast_off(example):
                # first (before any inference-mode forward could leave a cached tensor the graph refuses)
                readers = self._conv_output_readers(example)
                pairs = [
                    (conv, bn)
                    for conv, bn in runtime_conv_bn_pairs(self, example)
                    if conv.split(".", 1)[0] in names and readers.get(conv) == 1
                ]
            if not pairs:
                return {}
            originals = nn.ModuleDict({n: getattr(self, n) for n in names}).eval()  # (eval already)
            fused = fuse_conv_bn(copy.deepcopy(originals), pairs=pairs, inplace=True)
            if _is_image_batch(example):  # NHWC convolutions: the folded detector runs 1.7x faster again
                fused = fused.to(memory_format=torch.channels_last)
            moved = self._folding_moved(originals, fused, example)
        except Exception as err:  # a network the folding cannot handle: predict runs it unfused
            rank_zero_info(
                f"{type(self).__name__}: fast_predict off for this run, BatchNorm folding failed "
                f"({type(err).__name__}: {err}); predicting with the unfused networks"
            )
            return {}
        if moved:
            rank_zero_info(
                f"{type(self).__name__}: fast_predict off for this run: folding BatchNorm changed the outputs "
                f"of {sorted(moved)} by more than {FOLD_TOLERANCE_EPS} x the rounding of their dtype "
                f"({moved}) relative to the outputs' scale; predicting with the unfused networks"
            )
            return {}
        return dict(fused.items())

    def _folding_moved(self, originals: nn.ModuleDict, fused: nn.ModuleDict, example: Any) -> dict[str, str]:
        """``{network: dtype}`` of the networks whose folded outputs differ from the unfused ones by more
        than rounding in the dtype they run in (autocast off: a mixed-precision rounding would hide a
        wrong fold)."""
        with _autocast_off(example):
            reference = self._network_outputs(originals, example)
            with self._networks_swapped(fused):
                got = self._network_outputs(fused, example)
        moved = {}
        for name in originals:
            dtype = next((p.dtype for p in originals[name].parameters() if p.is_floating_point()), torch.float32)
            if not _outputs_agree(got.get(name), reference.get(name), torch.finfo(dtype).eps):
                moved[name] = str(dtype).replace("torch.", "")
        return moved

    def _conv_output_readers(self, example: Any) -> dict[str, int]:
        """How many operations read each convolution's output in one forward of ``example``, counted in
        its autograd graph. A BatchNorm folds into a convolution only when it is the one reader: folding
        it into a convolution whose output another layer also reads (a pre-activation ResNet's stem feeds
        its first block's BatchNorm and its identity shortcut) would change what that layer reads."""
        produced: dict[str, Any] = {}

        def hook(name: str) -> Any:
            def record(_module: nn.Module, _args: Any, output: Any) -> None:
                if isinstance(output, Tensor) and output.grad_fn is not None:
                    produced[name] = output.grad_fn

            return record

        handles = [
            module.register_forward_hook(hook(name))
            for name, module in self.named_modules()
            if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d)
        ]
        try:
            with torch.inference_mode(False), torch.enable_grad():  # (predict runs in inference mode)
                outputs = self(_requiring_grad(example))
        finally:
            for handle in handles:
                handle.remove()
        readers: Counter[Any] = Counter()
        stack = [t.grad_fn for t in _float_leaves(outputs) if t.grad_fn is not None]
        seen: set[int] = set()
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            for parent, _ in node.next_functions:
                if parent is not None:
                    readers[parent] += 1
                    stack.append(parent)
        return {name: readers[node] for name, node in produced.items()}

    def _network_outputs(self, networks: nn.ModuleDict, images: Any) -> dict[str, list[Any]]:
        """Outputs of every network in ``networks`` (each call) during one ``forward`` of ``images``."""
        outputs: dict[str, list[Any]] = {name: [] for name in networks}
        handles = [
            module.register_forward_hook(lambda _m, _a, out, name=name: outputs[name].append(out))
            for name, module in networks.items()
        ]
        try:
            self(images)
        finally:
            for handle in handles:
                handle.remove()
        return outputs

    def _logging_step(self) -> bool:
        """Whether the loggers write this training step (``Trainer(log_every_n_steps=...)``): values logged
        with ``on_step=True, on_epoch=False`` on other steps are discarded by Lightning, and each
        ``self.log`` call costs about a millisecond on a CPU. ``True`` outside a trainer."""
        trainer = self._trainer
        connector = getattr(trainer, "_logger_connector", None) if trainer is not None else None
        try:
            return bool(connector.should_update_logs) if connector is not None else True
        except Exception:  # a Lightning version without it: log every step, as before
            return True

    @abc.abstractmethod
    def shared_step(self, batch: Any, stage: str) -> tuple[Tensor | None, Any, Any, Any]:
        """Return ``(loss, predictions_for_metrics, targets_for_metrics, images)`` of a batch.

        ``loss`` may be ``None`` outside training (a model that computes no loss in eval mode) and
        ``predictions`` ``None`` in training (no training metrics)."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Log ``train/loss`` per step and update the epoch's training loss and metrics."""
        loss, preds, target, images = self.shared_step(batch, "train")
        if loss is None:
            raise RuntimeError(f"{type(self).__name__}.shared_step returned no loss for a training batch")
        n = _batch_size(images)
        self._note_loss(loss)
        if self._logging_step():
            # Only where the loggers write: the progress bar reads every value it shows on the host at
            # every step (a device sync), and Lightning would discard the value on the other steps.
            self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
        self.stage_loss["train_"].update(loss.detach(), n)
        if preds is not None:
            self.metrics["train_"].update(preds, target)
        return loss

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

    # ------------------------------------------------------------------ non-finite loss or gradients
    def _reset_nonfinite_state(self) -> None:
        self._nf_pending: Tensor | None = None  # this optimizer step's micro-batches had a bad loss
        self._nf_pending_loss: Tensor | None = None
        self._nf_step: Tensor | None = None  # first bad optimizer step (-1: none), on the device
        self._nf_loss: Tensor | None = None  # the loss at that step
        self._nf_checked_step = -1
        self._nf_skipped = 0
        self._nf_consecutive = 0
        self._nf_warned = False

    def _note_loss(self, loss: Tensor) -> None:
        value = loss.detach().float()
        bad = ~torch.isfinite(value)
        if self._nf_pending is None:
            self._nf_pending, self._nf_pending_loss = bad, value
        else:  # gradient accumulation: keep a non-finite micro-batch loss over later finite ones
            self._nf_pending_loss = torch.where(bad | ~self._nf_pending, value, self._nf_pending_loss)
            self._nf_pending = self._nf_pending | bad

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Check the step's loss and gradients for NaN/Inf; ``"skip"`` drops the step here."""
        if self._nf_pending is None:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        bad = self._nf_pending
        if grads:
            bad = bad | _any_nonfinite(grads)
        loss, step = self._nf_pending_loss, self.trainer.global_step
        self._nf_pending = self._nf_pending_loss = None
        if self.hparams.get("nonfinite", "stop") == "skip":
            self._skip_if_nonfinite(optimizer, bool(bad), step, loss)
            return
        if self._nf_step is None:
            self._nf_step = torch.full((), -1, dtype=torch.int64, device=bad.device)
            self._nf_loss = torch.zeros((), dtype=torch.float32, device=bad.device)
        first = bad & (self._nf_step < 0)
        self._nf_step = torch.where(first, torch.full_like(self._nf_step, step), self._nf_step)
        self._nf_loss = torch.where(first, loss, self._nf_loss)

    def _skip_if_nonfinite(self, optimizer: Optimizer, bad: bool, step: int, loss: Tensor) -> None:
        if not bad:
            self._nf_consecutive = 0
            return
        # No gradient, no update: the optimizer leaves these parameters and their state as they are.
        optimizer.zero_grad(set_to_none=True)
        self._nf_skipped += 1
        self._nf_consecutive += 1
        self.log("train/skipped_steps", float(self._nf_skipped), on_step=True, on_epoch=False)
        rank_zero_warn(
            f"{type(self).__name__}: optimizer step {step} skipped: non-finite loss or gradient (loss "
            f"{float(loss):.6g}); {self._nf_consecutive} in a row, {self._nf_skipped} in all"
        )
        if self._nf_consecutive >= int(self.hparams.get("max_skipped_steps", 10)):
            raise NonFiniteLossError(
                f"{self._nf_consecutive} optimizer steps in a row had a non-finite loss or gradient (last: "
                f"step {step}, loss {float(loss):.6g}){self._monitor_says()}; nonfinite='skip' stops after "
                f"max_skipped_steps={self.hparams.get('max_skipped_steps', 10)}. Lower the learning rate or "
                "add gradient clipping (trainer.gradient_clip_val)"
            )

    def _monitor_says(self) -> str:
        """What an attached activation monitor found (duck-typed: any callback with ``nonfinite``)."""
        trainer = self._trainer
        for callback in getattr(trainer, "callbacks", []) if trainer is not None else []:
            if hasattr(callback, "nonfinite") and not isinstance(callback, LightningModule):
                found = callback.nonfinite
                name = type(callback).__name__
                if found:
                    return (
                        f"; {name}: the first non-finite activation came from module {found['layer']!r} "
                        f"at step {found['step']}"
                    )
                return f"; {name}: no non-finite activation up to its last reduction"
        return ""

    def _check_nonfinite(self) -> None:
        """Read the device flag (a host sync) and act on it: raise for ``"stop"``, warn for ``"warn"``."""
        if self._nf_step is None:
            return
        step_t = self._nf_step
        trainer = self._trainer
        if trainer is not None and getattr(trainer, "world_size", 1) > 1:
            steps = self.all_gather(step_t).reshape(-1)
            bad = steps[steps >= 0]
            step = int(bad.min()) if bad.numel() else -1
        else:
            step = int(step_t)
        if step < 0:
            return
        loss = float(self._nf_loss) if int(step_t) == step else float("nan")
        what = "loss" if not math.isfinite(loss) else "gradient (the loss was finite)"
        message = (
            f"{type(self).__name__}: non-finite training {what} at optimizer step {step}: loss {loss:.6g}"
            f"{self._monitor_says()}"
        )
        if self.hparams.get("nonfinite", "stop") == "stop":
            raise NonFiniteLossError(
                f"{message}. The fit stops (nonfinite='stop'); checkpoints written before this step are "
                "untouched. Lower the learning rate, add gradient clipping (trainer.gradient_clip_val), or "
                "use nonfinite='skip'"
            )
        if not self._nf_warned:
            self._nf_warned = True
            rank_zero_warn(f"{message}; training goes on (nonfinite='warn')")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Every ``log_every_n_steps`` optimizer steps, read the non-finite flag (``"stop"``/``"warn"``)."""
        trainer = self.trainer
        step = trainer.global_step
        every = max(1, int(getattr(trainer, "log_every_n_steps", 50) or 50))
        if step != self._nf_checked_step and step % every == 0:
            self._nf_checked_step = step
            self._check_nonfinite()

    def on_train_end(self) -> None:
        """A last read of the non-finite flag (the tail of the run after the last logging step)."""
        self._check_nonfinite()

    # ----------------------------------------------------------------------------- epoch-end logging
    def epoch_metrics(self, stage: str) -> dict[str, Tensor]:
        """Hook: the values logged at the end of a ``stage`` epoch (``<stage>/loss`` and
        :meth:`compute_metrics`); called once per epoch, before the stage's metrics are reset."""
        values = {f"{stage}/loss": self.stage_loss[f"{stage}_"].compute()}
        values.update(self.compute_metrics(stage))
        return values

    def log_epoch_metrics(self, stage: str) -> None:
        """Log :meth:`epoch_metrics` (progress-bar ones on the bar) and reset the stage's metrics."""
        # One compute per epoch: torchmetrics syncs its states across ranks there, so every rank logs the
        # same values and no per-key sync_dist reduction is needed.
        values = self.epoch_metrics(stage)
        self.stage_loss[f"{stage}_"].reset()
        self.metrics[f"{stage}_"].reset()
        prog_bar = self.progress_bar_metrics_for(stage)
        for name, value in values.items():
            # Handed to Lightning as a Metric (LoggedValue) rather than a tensor: the value is already the
            # same on every rank, and Lightning would otherwise ask for sync_dist=True under DDP.
            holder, attribute = self._logged_value(name)
            holder.update(torch.as_tensor(value))
            self.log(name, holder, prog_bar=name in prog_bar, metric_attribute=attribute)

    def _logged_value(self, name: str) -> tuple[LoggedValue, str]:
        """The :class:`~lightning_convnets.metrics.LoggedValue` that carries ``name`` to ``self.log`` (made at
        its first use) and its attribute path (``self.log`` needs it for a Metric made after the first)."""
        holders = self.__dict__.get("_logged_holders")
        if holders is None:
            holders = self._logged_holders = {}
            self.logged_values = nn.ModuleDict()  # no parameters, no saved state: checkpoints unchanged
        if name not in holders:
            key = f"v{len(holders)}"  # metric names hold '.' and '/', which module names may not
            self.logged_values[key] = LoggedValue()
            holders[name] = key
        key = holders[name]
        return self.logged_values[key], f"logged_values.{key}"

    def compute_metrics(self, stage: str) -> dict[str, Tensor]:
        """Scalar metrics of ``stage`` as ``{"<stage>/<name>": value}`` (per-class entries flattened)."""
        out = {}
        for name, value in self.metrics[f"{stage}_"].compute().items():
            out[f"{stage}/{name}"] = value
        return out

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
            self._samples.pop("val", None)
            return
        self.log_figures("val")
        self.log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        """Log the test figures and metrics."""
        self.log_figures("test")
        self.log_epoch_metrics("test")

    # ------------------------------------------------------------------------------------- figures
    def _figures_due(self, stage: str) -> bool:
        trainer = self._trainer
        if trainer is None or not trainer.loggers:
            return False
        if stage == "test":
            return True
        every = self.hparams.figure_every_n_epochs
        return bool(every) and (self.current_epoch + 1) % every == 0

    def remember_samples(
        self, stage: str, batch_idx: int, images: Tensor, preds: Tensor, target: Any
    ) -> None:
        """Keep the first batch's first images, predictions and targets (on the CPU) for the figure."""
        k = self.hparams.num_sample_figures
        if batch_idx != 0 or not k or stage in self._samples or not self._figures_due(stage):
            return
        if self._trainer is not None and self.trainer.sanity_checking:
            return
        self._samples[stage] = (
            images[:k].detach().float().cpu(),
            preds[:k].detach().cpu(),
            None if target is None else target[:k].detach().cpu(),
        )

    def log_figures(self, stage: str) -> None:
        """Send this stage's figures through :func:`lightning_convnets.figures.log_figure`."""
        samples = self._samples.pop(stage, None)
        if samples is None or not self._figures_due(stage):
            return
        from lightning_convnets.figures import log_figure

        figure = self.plot_samples(*samples)
        if figure is not None:
            log_figure(self.trainer, f"{stage}/samples", figure, step=self.global_step)

    def plot_samples(self, images: Tensor, preds: Tensor, target: Tensor | None) -> Any:
        """Return a matplotlib figure of sample predictions (subclasses)."""
        return None

    def display_images(self, images: Tensor) -> Tensor:
        """Undo the datamodule's normalisation (``mean``/``std`` attributes) for display; ``(N, H, W, C)``
        in [0, 1] (grayscale kept single-channel, extra channels dropped)."""
        dm = self.datamodule
        mean, std = getattr(dm, "mean", None), getattr(dm, "std", None)
        x = images.float()
        if mean is not None and std is not None:
            mean_t = torch.as_tensor(mean, dtype=x.dtype).reshape(1, -1, 1, 1)
            std_t = torch.as_tensor(std, dtype=x.dtype).reshape(1, -1, 1, 1)
            if mean_t.shape[1] in (1, x.shape[1]):
                x = x * std_t + mean_t
        else:
            # Unknown normalisation: stretch each image to [0, 1] so it is at least visible.
            lo = x.amin(dim=(1, 2, 3), keepdim=True)
            hi = x.amax(dim=(1, 2, 3), keepdim=True)
            x = (x - lo) / (hi - lo).clamp_min(1e-6)
        x = x[:, :3] if x.shape[1] >= 3 else x[:, :1]
        return x.clamp(0, 1).permute(0, 2, 3, 1)

    def class_names(self, num_classes: int) -> list[str]:
        """The datamodule's class names when it has ``num_classes`` of them, else the label numbers."""
        names = getattr(self.datamodule, "class_names", None)
        if names is not None and len(names) == num_classes:
            return [str(n) for n in names]
        return [str(i) for i in range(num_classes)]

    # ------------------------------------------------------------------------------------ prediction
    def default_prediction_writer(self) -> Callback | None:
        """The writer attached automatically in ``predict`` when none is configured (subclasses)."""
        return None

    def configure_callbacks(self) -> list[Callback]:
        """In ``predict``, the task's default prediction writer unless a writer is configured."""
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "predict":
            return []
        if any(isinstance(cb, BasePredictionWriter) for cb in trainer.callbacks):
            return []
        writer = self.default_prediction_writer()
        return [writer] if writer is not None else []
