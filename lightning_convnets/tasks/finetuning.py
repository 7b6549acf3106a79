"""Fine-tuning controls of the tasks: freezing the backbone (for good or for the first epochs), keeping
BatchNorm statistics frozen, the ``head`` / ``backbone`` parameter groups with their learning-rate
factor and the parameter counts logged at fit start (``freeze_backbone``, ``freeze_bn``, ``backbone_lr_mult`` of :class:`~lightning_convnets.tasks.ConvNetTask`).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_convnets.nn.norm import BATCHNORMS

__all__ = [
    "BackboneFreezer",
    "FineTuningHooks",
    "check_freeze_options",
    "parameter_groups",
    "parameter_report",
]


def check_freeze_options(freeze_backbone: Any, backbone_lr_mult: float) -> None:
    """Raise a ``ValueError`` naming the option unless ``freeze_backbone`` is a bool or an epoch count
    >= 0 and ``backbone_lr_mult`` >= 0."""
    if not isinstance(freeze_backbone, bool) and (
        not isinstance(freeze_backbone, int) or freeze_backbone < 0
    ):
        raise ValueError(f"freeze_backbone must be a bool or an epoch count >= 0, got {freeze_backbone!r}")
    if backbone_lr_mult < 0:
        raise ValueError(f"backbone_lr_mult must be >= 0, got {backbone_lr_mult}")


class BackboneFreezer:
    """Freezes and unfreezes a backbone as ``freeze_backbone`` asks, and keeps the eval-mode rules.

    Args:
        freeze_backbone: ``True`` for the whole run, ``N`` for the first ``N`` epochs, ``False`` never.
        freeze_bn: keep every BatchNorm layer of the backbone in eval mode while training.

    Example:
        >>> backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> freezer = BackboneFreezer(2)
        >>> [freezer.wanted(epoch) for epoch in range(3)]
        [True, True, False]
        >>> freezer.update(backbone, epoch=0), backbone[0].weight.requires_grad
        (True, False)
    """

    def __init__(self, freeze_backbone: bool | int = False, freeze_bn: bool = False) -> None:
        self.freeze_backbone = freeze_backbone
        self.freeze_bn = freeze_bn
        self.frozen = False

    def wanted(self, epoch: int) -> bool:
        """Whether the backbone is frozen during ``epoch``."""
        if self.freeze_backbone is True:
            return True
        return bool(self.freeze_backbone) and epoch < int(self.freeze_backbone)

    def set_frozen(self, backbone: nn.Module, frozen: bool) -> None:
        """Freeze (no gradients) or unfreeze every parameter of ``backbone``."""
        for param in backbone.parameters():
            param.requires_grad_(not frozen)
        self.frozen = frozen

    def update(self, backbone: nn.Module, epoch: int) -> bool:
        """Apply :meth:`wanted` for ``epoch``; returns whether the state changed."""
        wanted = self.wanted(epoch)
        if wanted == self.frozen:
            return False
        self.set_frozen(backbone, wanted)
        return True

    def apply_eval_rules(self, backbone: nn.Module) -> None:
        """After ``train()``: a frozen backbone runs in eval mode; with ``freeze_bn`` its BatchNorm layers."""
        if self.frozen:
            backbone.eval()
        elif self.freeze_bn:
            for layer in backbone.modules():
                if isinstance(layer, BATCHNORMS):
                    layer.eval()


def parameter_groups(
    model: nn.Module, backbone: nn.Module, freeze_backbone: bool | int, backbone_lr_mult: float
) -> list[dict[str, Any]]:
    """Parameter groups ``head`` (everything of ``model`` outside ``backbone``) and ``backbone`` (with
    ``lr_mult=backbone_lr_mult``; left out when the backbone is frozen for the whole run); empty groups
    are dropped."""
    backbone_ids = {id(p) for p in backbone.parameters()}
    head = [p for p in model.parameters() if id(p) not in backbone_ids]
    groups = [{"params": head, "name": "head", "lr_mult": 1.0}]
    if freeze_backbone is not True:
        groups.append(
            {"params": list(backbone.parameters()), "name": "backbone", "lr_mult": backbone_lr_mult}
        )
    return [g for g in groups if g["params"]]


def parameter_report(model: nn.Module, num_train_examples: int = 0) -> tuple[dict[str, float], str]:
    """``model``'s parameter counts as metrics (``model/params``, ``model/trainable_params`` and, with
    training examples, ``model/params_per_train_example``) and as one line.

    Example:
        >>> parameter_report(nn.Linear(3, 2), 4)[1]
        'Linear: 8 parameters (8 trainable), 2.0 per training example (4 examples)'
    """
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stats = {"model/params": float(n_params), "model/trainable_params": float(n_trainable)}
    message = f"{type(model).__name__}: {n_params:,} parameters ({n_trainable:,} trainable)"
    if num_train_examples:
        stats["model/params_per_train_example"] = n_params / num_train_examples
        message += (
            f", {n_params / num_train_examples:.1f} per training example ({num_train_examples:,} examples)"
        )
    return stats, message


class FineTuningHooks:
    """The fine-tuning side of a task (mixed into :class:`~lightning_convnets.tasks.ConvNetTask`, which
    holds a :class:`BackboneFreezer` as ``freezer`` and its network as ``backbone``)."""

    freezer: BackboneFreezer
    backbone: nn.Module

    def train(self, mode: bool = True) -> Any:
        """Switch modes, keeping a frozen backbone (or, with ``freeze_bn``, its BatchNorm layers) in eval."""
        super().train(mode)  # type: ignore[misc]
        if mode:
            self.freezer.apply_eval_rules(self.backbone)
        return self

    def apply_freeze_schedule(self, epoch: int) -> None:
        """Freeze or unfreeze the backbone as ``freeze_backbone`` says for ``epoch`` (said once on a change)."""
        if self.freezer.update(self.backbone, epoch):
            rank_zero_info(f"epoch {epoch}: backbone {'frozen' if self.freezer.frozen else 'unfrozen'}")
        self.train(True)  # re-apply eval-mode rules after a freeze change

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Parameter groups ``head`` (everything outside the backbone) and ``backbone`` (left out when the
        backbone is frozen for the whole run; its ``lr_mult`` scales the optimizer's learning rate)."""
        hp: Any = self.hparams  # type: ignore[attr-defined]
        return parameter_groups(self, self.backbone, hp.freeze_backbone, hp.backbone_lr_mult)  # type: ignore[arg-type]
