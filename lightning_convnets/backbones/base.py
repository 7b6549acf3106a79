"""The backbone contract shared by every family.

A backbone is an ``nn.Module`` whose ``forward(images)`` returns a ``list[Tensor]`` of feature maps and
which exposes, for each map, ``out_channels[i]`` and ``reductions[i]`` (its stride w.r.t. the input).

* Pyramid encoders (ResNet, timm, smp encoders, torchvision) return maps from fine to coarse.
* Dense networks (U-Net, stacked hourglass) return full- or quarter-resolution maps; a stacked
  hourglass returns one map per stack (for intermediate supervision).

``border`` is the number of pixels a valid-padding network removes on each side (top/left; an odd
difference is cut from the bottom/right, see :func:`lightning_convnets.nn.center_crop`); it is 0 for
every same-padding network.
"""

from __future__ import annotations

from torch import Tensor, nn


class Backbone(nn.Module):
    """Base class for backbones: subclasses set ``out_channels`` and ``reductions`` in ``__init__``.

    Attributes:
        out_channels: channels of each returned map.
        reductions: stride of each returned map w.r.t. the input image.
        dense: True for networks whose maps are meant to be read densely at one resolution (U-Net,
            hourglass), False for pyramid encoders.
        border: pixels removed at the top/left by valid convolutions (0 with same padding).
        mean, std: per-input-channel normalisation constants of loaded pretrained weights, ``None``
            for a randomly initialised backbone (data presets read them; see ``normalization``).
    """

    out_channels: list[int]
    reductions: list[int]
    dense: bool = False
    border: int = 0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def normalization(self) -> dict[str, tuple[float, ...]] | None:
        """``{"mean": ..., "std": ...}`` of the loaded pretrained weights, or ``None``."""
        if self.mean is None or self.std is None:
            return None
        return {"mean": tuple(self.mean), "std": tuple(self.std)}

    def forward(self, images: Tensor) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


def check_contract(backbone: nn.Module) -> None:
    """Raise a ``TypeError`` naming what is missing when ``backbone`` does not honour the contract."""
    for attr in ("out_channels", "reductions"):
        value = getattr(backbone, attr, None)
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, int) for v in value):
            raise TypeError(
                f"backbone {type(backbone).__name__} must expose {attr!r} as a non-empty list of ints "
                f"(got {value!r}); see lightning_convnets.backbones.base.Backbone"
            )
    if len(backbone.out_channels) != len(backbone.reductions):
        raise TypeError(
            f"backbone {type(backbone).__name__}: out_channels ({len(backbone.out_channels)} maps) and "
            f"reductions ({len(backbone.reductions)} maps) disagree"
        )
