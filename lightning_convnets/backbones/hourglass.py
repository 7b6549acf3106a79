"""Stacked hourglass networks (Newell, Yang and Deng 2016): :class:`StackedHourglass`, registered as ``hourglass``.

A dense backbone that returns one map per stack at 1/4 resolution (every stack is supervised by the
task). The layout, and how the merge between stacks works without the task's heads, are in
``docs/backbones.md``.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

from lightning_convnets.backbones.base import Backbone
from lightning_convnets.backbones.registry import register_backbone
from lightning_convnets.nn import ResidualAdd
from lightning_convnets.nn.norm import check_norm, make_norm


class ResidualModule(nn.Module):
    """The hourglass paper's bottleneck residual module, pre-activation style (norm-ReLU-conv).

    Branch: norm, ReLU, 1x1 conv to ``out_channels // 2``; norm, ReLU, 3x3 conv; norm, ReLU, 1x1 conv to
    ``out_channels``. Shortcut: identity, or a 1x1 conv when the channel count changes. The sum goes
    through :class:`~lightning_convnets.nn.ResidualAdd` so monitors see both terms.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        norm: ``"batch"`` (the paper), ``"group"`` or ``"none"``.

    Example:
        >>> import torch
        >>> ResidualModule(8, 16)(torch.zeros(1, 8, 4, 4)).shape
        torch.Size([1, 16, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch") -> None:
        super().__init__()
        mid = max(out_channels // 2, 1)
        self.branch = nn.Sequential(
            make_norm(norm, in_channels),
            nn.ReLU(),  # not in place: with norm="none" it would overwrite x, the shortcut term
            nn.Conv2d(in_channels, mid, 1),
            make_norm(norm, mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1),
            make_norm(norm, mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, 1),
        )
        self.shortcut = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        )
        self.add = ResidualAdd()

    def forward(self, x: Tensor) -> Tensor:
        return self.add(self.shortcut(x), self.branch(x))


def _residuals(channels: int, count: int, norm: str) -> nn.Sequential:
    return nn.Sequential(*(ResidualModule(channels, channels, norm) for _ in range(count)))


class Hourglass(nn.Module):
    """One hourglass of ``order`` poolings, built recursively (order 1 has a residual stack at the bottom).

    ``out = skip(x) + up(inner(pool(x)))``; the sum is a :class:`~lightning_convnets.nn.ResidualAdd` with
    the full-resolution branch as the shortcut term.

    Args:
        order: number of 2x2 poolings (4 in the paper: 64 -> 4 px).
        channels: feature channels, constant throughout.
        num_blocks: residual modules per position (1 in the paper).
        norm: normalisation of the residual modules.

    Example:
        >>> import torch
        >>> Hourglass(order=2, channels=8)(torch.zeros(1, 8, 16, 16)).shape
        torch.Size([1, 8, 16, 16])
    """

    def __init__(self, order: int, channels: int, num_blocks: int = 1, norm: str = "batch") -> None:
        super().__init__()
        self.order = order
        self.skip = _residuals(channels, num_blocks, norm)
        self.pool = nn.MaxPool2d(2)
        self.down = _residuals(channels, num_blocks, norm)
        self.inner = (
            Hourglass(order - 1, channels, num_blocks, norm)
            if order > 1
            else _residuals(channels, num_blocks, norm)
        )
        self.after = _residuals(channels, num_blocks, norm)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.merge = ResidualAdd()

    def forward(self, x: Tensor) -> Tensor:
        low = self.after(self.inner(self.down(self.pool(x))))
        return self.merge(self.skip(x), self.up(low))


class StackedHourglass(Backbone):
    """Stacked hourglass backbone: one ``width``-channel map at 1/4 resolution per stack.

    ``forward`` returns ``num_stacks`` maps, first to last stack, for intermediate supervision (a task
    applies its head to each and sums the losses; at inference the last map is the refined one).

    Args:
        in_channels: image channels.
        num_stacks: number of hourglasses (2 by default; the paper uses 8).
        order: poolings inside each hourglass (4 in the paper); input sides must be multiples of
            ``4 * 2**order`` (64 for order 4).
        width: feature channels (256 in the paper); the stem uses ``width // 4`` and ``width // 2``.
        num_blocks: residual modules at each position (1 in the paper).
        merge_channels: channels of the internal 1x1 pair standing in for the paper's intermediate
            predictions in the merge between stacks (16: the MPII keypoints); see the module docstring.
        norm: ``"batch"`` (the paper), ``"group"`` or ``"none"``.

    Raises:
        ValueError: for bad options; in ``forward`` for a side that is not a multiple of ``4 * 2**order``.

    Example:
        >>> import torch
        >>> net = StackedHourglass(num_stacks=2, order=2, width=8)
        >>> [tuple(m.shape) for m in net(torch.zeros(1, 3, 32, 32))]
        [(1, 8, 8, 8), (1, 8, 8, 8)]
    """

    dense = True

    def __init__(
        self,
        in_channels: int = 3,
        num_stacks: int = 2,
        order: int = 4,
        width: int = 256,
        num_blocks: int = 1,
        merge_channels: int = 16,
        norm: Literal["batch", "group", "none"] = "batch",
    ) -> None:
        super().__init__()
        for name, value, low in [
            ("in_channels", in_channels, 1),
            ("num_stacks", num_stacks, 1),
            ("order", order, 1),
            ("width", width, 4),
            ("num_blocks", num_blocks, 1),
            ("merge_channels", merge_channels, 1),
        ]:
            if not isinstance(value, int) or value < low:
                raise ValueError(f"StackedHourglass: {name} must be an int >= {low}, got {value!r}")
        check_norm(norm, "StackedHourglass")
        self.in_channels = in_channels
        self.num_stacks = num_stacks
        self.order = order
        self.width = width
        self.multiple = 4 * 2**order

        quarter, half = width // 4, width // 2
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, quarter, 7, stride=2, padding=3),
            make_norm(norm, quarter),
            nn.ReLU(inplace=True),
            ResidualModule(quarter, half, norm),
            nn.MaxPool2d(2),
            ResidualModule(half, half, norm),
            ResidualModule(half, width, norm),
        )
        self.hourglasses = nn.ModuleList(Hourglass(order, width, num_blocks, norm) for _ in range(num_stacks))
        self.post = nn.ModuleList(_residuals(width, num_blocks, norm) for _ in range(num_stacks))
        self.features = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 1), make_norm(norm, width), nn.ReLU(inplace=True))
            for _ in range(num_stacks)
        )
        # Merges exist between stacks only: the last stack's map goes straight to the task.
        self.merge_features = nn.ModuleList(nn.Conv2d(width, width, 1) for _ in range(num_stacks - 1))
        self.merge_remap = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, merge_channels, 1), nn.Conv2d(merge_channels, width, 1))
            for _ in range(num_stacks - 1)
        )
        self.merge = nn.ModuleList(ResidualAdd() for _ in range(num_stacks - 1))

        self.out_channels = [width] * num_stacks
        self.reductions = [4] * num_stacks

    def check_input_size(self, height: int, width: int) -> None:
        """Raise a ``ValueError`` naming the side and the multiple when the network cannot take the size."""
        for axis, side in (("height", height), ("width", width)):
            if side < 1 or side % self.multiple:
                below = side // self.multiple * self.multiple
                above = below + self.multiple
                nearest = f"{below} or {above}" if below else f"{above}"
                raise ValueError(
                    f"StackedHourglass(order={self.order}): input {axis} {side} px is not a multiple of "
                    f"{self.multiple} (stem 4 x 2**order); use {nearest}"
                )

    def output_size(self, input_size: tuple[int, int]) -> tuple[int, int]:
        """``(height, width)`` of every stack's map for an input size (a quarter of it); checks the size."""
        height, width = input_size
        self.check_input_size(height, width)
        return height // 4, width // 4

    def forward(self, images: Tensor) -> list[Tensor]:
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"StackedHourglass expects images of shape (N, {self.in_channels}, H, W), "
                f"got {tuple(images.shape)}"
            )
        self.check_input_size(images.shape[-2], images.shape[-1])
        x = self.stem(images)
        maps = []
        for i in range(self.num_stacks):
            feats = self.features[i](self.post[i](self.hourglasses[i](x)))
            maps.append(feats)
            if i < self.num_stacks - 1:
                x = self.merge[i](x, self.merge_features[i](feats) + self.merge_remap[i](feats))
        return maps


register_backbone("hourglass")(StackedHourglass)


@register_backbone("hourglass_stack1")
def hourglass_stack1(**kwargs: Any) -> StackedHourglass:
    """A single hourglass (no intermediate supervision); kwargs as :class:`StackedHourglass`."""
    return StackedHourglass(num_stacks=1, **kwargs)


@register_backbone("hourglass_stack2")
def hourglass_stack2(**kwargs: Any) -> StackedHourglass:
    """Two stacks (the default); kwargs as :class:`StackedHourglass`."""
    return StackedHourglass(num_stacks=2, **kwargs)


@register_backbone("hourglass_stack8")
def hourglass_stack8(**kwargs: Any) -> StackedHourglass:
    """The paper's eight stacks; kwargs as :class:`StackedHourglass`."""
    return StackedHourglass(num_stacks=8, **kwargs)
