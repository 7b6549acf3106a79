"""U-Net (Ronneberger et al. 2015): a contracting path, an expanding path and crop-and-concatenate skips.

Two padding modes:

* ``padding="valid"`` is the paper: every 3x3 convolution drops a 1-pixel rim, so the output is smaller
  than the input (572x572 -> 388x388 at depth 4) and each skip map is centre-cropped to the upsampled map
  before concatenation (:func:`lightning_convnets.nn.center_crop`, odd extra pixel cut at the
  bottom/right). ``UNet.border`` tells a task how many pixels the network removes at the top/left, so it can
  crop its target masks with the same rule.
* ``padding="same"`` keeps the input size; every side must be a multiple of ``2**depth``.

With ``encoder=`` any pyramid backbone (``"resnet18"``, ``"timm:resnet18"``, or a module) replaces the
contracting path, and the expanding path climbs back through the encoder's maps to reduction 1.
"""

from __future__ import annotations

from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

from lightning_convnets.backbones.base import Backbone, check_contract
from lightning_convnets.backbones.registry import create_backbone, register_backbone
from lightning_convnets.nn import center_crop
from lightning_convnets.nn.norm import NormKind, check_norm, make_norm


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by the optional norm and a ReLU (one U-Net level).

    Args:
        in_channels: input channels.
        out_channels: channels of both convolutions.
        padding: ``"valid"`` (no padding: each conv removes one pixel per side) or ``"same"``.
        norm: ``"none"`` (the paper), ``"batch"`` or ``"group"``.
        bias: whether the convolutions carry a bias.

    Example:
        >>> DoubleConv(1, 4, padding="valid")(torch.zeros(1, 1, 12, 12)).shape
        torch.Size([1, 4, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        padding: str = "same",
        norm: str = "none",
        bias: bool = True,
    ) -> None:
        pad = 1 if padding == "same" else 0
        layers: list[nn.Module] = []
        for c_in in (in_channels, out_channels):
            layers += [
                nn.Conv2d(c_in, out_channels, 3, padding=pad, bias=bias),
                make_norm(norm, out_channels),
                nn.ReLU(inplace=True),
            ]
        super().__init__(*layers)


def _upsampler(kind: str, in_channels: int, out_channels: int, bias: bool) -> nn.Module:
    if kind == "transpose":
        # The paper's 2x2 "up-convolution": doubles the resolution and sets the channel count.
        return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2, bias=bias)
    if kind == "bilinear":
        # Interpolation has no checkerboard artefacts; the 1x1 conv does the channel change.
        return nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=bias),
        )
    raise ValueError(f"upsample must be 'transpose' or 'bilinear', got {kind!r}")


class UNet(Backbone):
    """U-Net backbone returning ``[dense_map]``: the last decoder features at reduction 1, no classifier.

    The plain network has ``depth`` pooling steps; level ``k`` (reduction ``2**k``) has ``width * 2**k``
    channels, the bottleneck ``width * 2**depth``. Each up-step doubles the resolution (2x2 transposed conv
    or bilinear + 1x1 conv) while halving the channels, concatenates the skip map of the same level
    (centre-cropped with valid padding) and applies two 3x3 convolutions. A task puts its own 1x1
    classifier on the returned map (the paper's final layer).

    With ``encoder=`` the contracting path is that backbone's pyramid (maps fine to coarse, reductions
    powers of two). The decoder starts from the coarsest map and doubles the resolution until reduction 1;
    where the encoder has a map at the current reduction it is concatenated, otherwise the step has no skip
    (e.g. a ResNet's stem stops at 1/4, so the last two up-steps have no skip). Decoder channels at
    reduction ``r`` are ``width * r``.

    Args:
        in_channels: image channels (1 for the paper's grayscale microscopy).
        depth: number of poolings of the plain network (default 4, the paper). Not allowed with ``encoder``,
            whose maps define the depth.
        width: channels of the first level (64 in the paper); also the output channels.
        padding: ``"same"`` (output size = input size, sides multiple of ``2**depth``) or ``"valid"``
            (the paper's unpadded convolutions; see :meth:`output_size` and :attr:`border`).
        upsample: ``"transpose"`` (the paper's 2x2 up-convolution) or ``"bilinear"`` (+ 1x1 conv).
        norm: ``"none"`` (the paper), ``"batch"`` or ``"group"`` after every 3x3 convolution.
        dropout: probability of the dropout at the end of the contracting path (the paper uses dropout
            there; 0 disables it).
        bias: conv bias; ``None`` means "only without norm" (a bias before a norm layer is redundant).
        encoder: a registered backbone name or a pyramid backbone module used as the contracting path.
        encoder_kwargs: keyword arguments for ``create_backbone(encoder, ...)`` (``in_channels`` is passed
            automatically).

    Attributes:
        border: pixels removed at the top/left (and, the difference being even, at the bottom/right) with
            valid padding; 0 otherwise. Crop targets with ``center_crop(target, *output.shape[-2:])``.
        multiple: every input side must be a multiple of this (same padding, encoder).
        skip_reductions: for each up-step (coarse to fine), the reduction of the map concatenated there,
            or ``None`` for a step without skip.

    Raises:
        ValueError: for bad options, and in ``forward`` for an input size the network cannot take (the
            message names the size and the nearest valid sizes).

    Example:
        >>> net = UNet(in_channels=1, width=4, padding="valid")
        >>> net.output_size(572), net.border
        (388, 92)
        >>> [m.shape for m in UNet(in_channels=3, width=4, depth=2)(torch.zeros(1, 3, 32, 32))]
        [torch.Size([1, 4, 32, 32])]
    """

    dense = True

    def __init__(
        self,
        in_channels: int = 3,
        depth: int | None = None,
        width: int = 64,
        padding: Literal["same", "valid"] = "same",
        upsample: Literal["transpose", "bilinear"] = "transpose",
        norm: NormKind = "none",
        dropout: float = 0.0,
        bias: bool | None = None,
        encoder: str | nn.Module | None = None,
        encoder_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if padding not in ("same", "valid"):
            raise ValueError(f"UNet: padding must be 'same' or 'valid', got {padding!r}")
        if upsample not in ("transpose", "bilinear"):
            raise ValueError(f"UNet: upsample must be 'transpose' or 'bilinear', got {upsample!r}")
        check_norm(norm, "UNet")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"UNet: width must be a positive int, got {width!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"UNet: dropout must be in [0, 1), got {dropout!r}")
        if in_channels < 1:
            raise ValueError(f"UNet: in_channels must be >= 1, got {in_channels!r}")
        bias = norm == "none" if bias is None else bias
        self.in_channels: int | None = in_channels
        self.width = width
        self.padding = padding
        self.upsample = upsample
        self.norm = norm

        if encoder is None:
            if encoder_kwargs:
                raise ValueError("UNet: encoder_kwargs given without an encoder")
            depth = 4 if depth is None else depth
            if not isinstance(depth, int) or depth < 1:
                raise ValueError(f"UNet: depth must be an int >= 1, got {depth!r}")
            self.encoder: nn.Module | None = None
            self.down = nn.ModuleList()
            c_in = in_channels
            for level in range(depth + 1):  # the last one is the bottleneck
                self.down.append(DoubleConv(c_in, width * 2**level, padding, norm, bias))
                c_in = width * 2**level
            self.pool = nn.MaxPool2d(2)
            skip_channels = {2**level: width * 2**level for level in range(depth)}
            coarsest_channels, coarsest = width * 2**depth, 2**depth
        else:
            if depth is not None:
                raise ValueError(
                    f"UNet: depth={depth} cannot be combined with encoder=: the encoder's reductions "
                    "define the depth"
                )
            if padding != "same":
                raise ValueError(
                    "UNet: encoder= requires padding='same' (a pyramid encoder's maps are aligned on a "
                    f"regular grid, not cropped), got padding={padding!r}"
                )
            self.encoder = self._build_encoder(encoder, in_channels, encoder_kwargs or {})
            # A ready-made encoder module knows its own input channels better than our default.
            self.in_channels = (
                getattr(self.encoder, "in_channels", None) if isinstance(encoder, nn.Module) else in_channels
            )
            reductions = list(self.encoder.reductions)
            channels = list(self.encoder.out_channels)
            skip_channels = dict(zip(reductions, channels))
            coarsest = reductions[-1]
            coarsest_channels = skip_channels.pop(coarsest)
            depth = coarsest.bit_length() - 1
        self.depth = depth
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        # Decoder, coarse to fine: one up-step per halving of the reduction.
        self.ups = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        self.skip_reductions: list[int | None] = []
        c_in, reduction = coarsest_channels, coarsest
        while reduction > 1:
            reduction //= 2
            c_out = width * reduction
            skip = skip_channels.get(reduction)
            self.ups.append(_upsampler(upsample, c_in, c_out, bias))
            self.up_blocks.append(DoubleConv(c_out + (skip or 0), c_out, padding, norm, bias))
            self.skip_reductions.append(reduction if skip is not None else None)
            c_in = c_out

        self.out_channels = [width]
        self.reductions = [1]
        self.multiple = 2**depth
        self.border = (
            (self._min_valid_input() - self._trace(self._min_valid_input())) // 2 if padding == "valid" else 0
        )
        self._init_weights()

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _build_encoder(encoder: str | nn.Module, in_channels: int, kwargs: dict[str, Any]) -> nn.Module:
        if isinstance(encoder, str):
            module = create_backbone(encoder, **{"in_channels": in_channels, **kwargs})
        elif isinstance(encoder, nn.Module):
            if kwargs:
                raise ValueError("UNet: encoder_kwargs only apply when encoder is a name, not a module")
            module = encoder
        else:
            raise TypeError(
                f"UNet: encoder must be a backbone name or an nn.Module, got {type(encoder).__name__}"
            )
        check_contract(module)
        reductions = list(module.reductions)
        name = encoder if isinstance(encoder, str) else type(encoder).__name__
        if any(r < 1 or r & (r - 1) for r in reductions) or reductions != sorted(set(reductions)):
            raise ValueError(
                f"UNet: encoder {name!r} must return maps fine to coarse with strictly increasing "
                f"power-of-two reductions, got reductions={reductions}"
            )
        if reductions[-1] < 2:
            raise ValueError(f"UNet: encoder {name!r} never downsamples (reductions={reductions})")
        return module

    def _init_weights(self) -> None:
        # The paper's He initialisation (std sqrt(2/N), N = incoming nodes of one neuron) for our own
        # convolutions and up-convolutions; a given encoder keeps its own (possibly pretrained) weights.
        for name, module in self.named_modules():
            if name.startswith("encoder"):
                continue
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(module, nn.ConvTranspose2d):
                # ConvTranspose2d is no Conv2d, and kaiming_normal_ reads its weight (in, out, kh, kw) as
                # fan-in out*kh*kw. A 2x2 stride-2 up-convolution feeds each output pixel from one input
                # pixel: N = in_channels * (kh * kw) / (sh * sw). Left at PyTorch's default (std
                # 1/sqrt(3*out*4), ~3.5x smaller), the up-path entered each concatenation far below the
                # skip map, and the deep path barely learnt (valid U-Net on shapes: mIoU 0.42 vs 0.8+).
                taps = module.kernel_size[0] * module.kernel_size[1] / (module.stride[0] * module.stride[1])
                nn.init.normal_(module.weight, 0.0, (2.0 / (module.in_channels * taps)) ** 0.5)
            else:
                continue
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ sizes
    def _trace(self, size: int) -> int:
        """Output side for an input side with valid padding; raises ``_SizeError`` where it breaks."""
        shrink = 4  # two unpadded 3x3 convolutions per level
        s = size
        for level in range(self.depth):
            s -= shrink
            if s < 2:
                raise _SizeError(f"is too small: it shrinks to {s} px before pooling {level + 1}")
            if s % 2:
                raise _SizeError(f"gives an odd side of {s} px before pooling {level + 1} (2x2 max-pool)")
            s //= 2
        s -= shrink
        if s < 1:
            raise _SizeError(f"is too small: the bottleneck shrinks it to {s} px")
        for _ in range(self.depth):
            s = 2 * s - shrink
            if s < 1:
                raise _SizeError(f"is too small: the expanding path shrinks it to {s} px")
        return s

    def _is_valid(self, size: int) -> bool:
        try:
            self._trace(size)
        except _SizeError:
            return False
        return True

    def _min_valid_input(self) -> int:
        # Valid inputs are 2**depth * t + 4 * (2**depth - 1): even sides before each pooling.
        step, offset = 2**self.depth, 4 * (2**self.depth - 1)
        t = 1
        while not self._is_valid(step * t + offset):
            t += 1
        return step * t + offset

    def valid_input_size(self, size: int) -> int:
        """Smallest input side ``>= size`` the network accepts (the size to pad or tile to).

        With same padding (or an encoder) this is the next multiple of :attr:`multiple`.
        """
        if self.padding == "same":
            return max(-(-size // self.multiple), 1) * self.multiple
        step = 2**self.depth
        candidate = max(size, self._min_valid_input())
        candidate += (self._min_valid_input() - candidate) % step
        return candidate

    def _nearest_valid(self, size: int) -> str:
        above = self.valid_input_size(size + 1)
        below = above - 2**self.depth if self.padding == "valid" else above - self.multiple
        if self.padding == "valid" and below < self._min_valid_input():
            return f"the smallest valid size is {above}"
        if below < 1:
            return f"the nearest valid size is {above}"
        return f"nearest valid sizes: {below} and {above}"

    @overload
    def output_size(self, input_size: int) -> int: ...
    @overload
    def output_size(self, input_size: tuple[int, int]) -> tuple[int, int]: ...

    def output_size(self, input_size: int | tuple[int, int]) -> int | tuple[int, int]:
        """Output side(s) for an input side (or ``(height, width)``); raises ``ValueError`` if invalid."""
        if isinstance(input_size, (tuple, list, torch.Size)):
            return tuple(self._output_side(int(s), axis) for s, axis in zip(input_size, ("height", "width")))
        return self._output_side(int(input_size), "side")

    def _output_side(self, size: int, axis: str) -> int:
        where = f"UNet(padding={self.padding!r}, depth={self.depth})"
        if self.padding == "same":
            if size < 1 or size % self.multiple:
                reason = "an encoder's coarsest reduction" if self.encoder is not None else "2**depth"
                raise ValueError(
                    f"{where}: input {axis} {size} px is not a multiple of {self.multiple} ({reason}); "
                    f"{self._nearest_valid(size)}"
                )
            return size
        try:
            if size < self._min_valid_input():
                raise _SizeError(
                    f"is too small (the expanding path needs at least {self._min_valid_input()} px)"
                )
            return self._trace(size)
        except _SizeError as err:
            raise ValueError(
                f"{where}: input {axis} {size} px {err}; {self._nearest_valid(size)} "
                f"(valid sides are {2**self.depth}*t + {4 * (2**self.depth - 1)})"
            ) from None

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor) -> list[Tensor]:
        channels = self.in_channels if self.in_channels is not None else "C"
        if images.ndim != 4 or images.shape[1] != (self.in_channels or images.shape[1]):
            raise ValueError(f"UNet expects images of shape (N, {channels}, H, W), got {tuple(images.shape)}")
        if not torch.compiler.is_exporting():  # the check's int() would fix an exported graph's H and W
            self.output_size((images.shape[-2], images.shape[-1]))
        if self.encoder is None:
            skips: dict[int, Tensor] = {}
            x = images
            for level, block in enumerate(self.down):
                if level:
                    x = self.pool(x)
                x = block(x)
                skips[2**level] = x
            x = skips.pop(2**self.depth)
        else:
            maps = self.encoder(images)
            skips = dict(zip(self.encoder.reductions, maps))
            x = skips.pop(self.encoder.reductions[-1])
        x = self.dropout(x)
        for up, block, skip_reduction in zip(self.ups, self.up_blocks, self.skip_reductions):
            x = up(x)
            if skip_reduction is not None:
                skip = skips[skip_reduction]
                if skip.shape[-2:] != x.shape[-2:]:
                    skip = center_crop(skip, x.shape[-2], x.shape[-1])
                x = torch.cat([skip, x], dim=1)
            x = block(x)
        return [x]


class _SizeError(Exception):
    """Internal: why a side length does not fit the valid-padding network."""


register_backbone("unet")(UNet)
