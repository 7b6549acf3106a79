"""ResNet family: post-activation (v1), pre-activation (v2) and their skip-free "plain" twins.

Start with :class:`ResNet` and the registered builders (``resnet18``... ``preact_resnet200``). Parameter
names are torchvision's, so its ImageNet weights load (``weights=``); every residual sum goes through
:class:`lightning_convnets.nn.ResidualAdd` so hooks see ``(shortcut, branch)``. The block layouts and
why ReLUs are not in-place: ``docs/backbones.md``.

Example:
    >>> import torch
    >>> from lightning_convnets.backbones import create_backbone
    >>> net = create_backbone("resnet18", width=8, stem="cifar")
    >>> [tuple(f.shape) for f in net(torch.zeros(1, 3, 32, 32))]
    [(1, 8, 32, 32), (1, 16, 16, 16), (1, 32, 8, 8), (1, 64, 4, 4)]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.fx
from torch import Tensor, nn

from lightning_convnets.backbones.base import Backbone
from lightning_convnets.backbones.registry import register_backbone
from lightning_convnets.backbones.weights import torchvision_weights
from lightning_convnets.nn.norm import check_norm, make_norm
from lightning_convnets.nn.residual import ResidualAdd
from lightning_convnets.nn.stem import adapt_stem_weight

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BasicBlock",
    "Bottleneck",
    "PreActBasicBlock",
    "PreActBottleneck",
    "ResNet",
    "adapt_stem_weight",
    "load_torchvision_state_dict",
    "preact_resnet18",
    "preact_resnet34",
    "preact_resnet50",
    "preact_resnet101",
    "preact_resnet152",
    "preact_resnet200",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet200",
    "weights_normalization",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

STEMS = ("imagenet", "cifar")
# Stage depths per network depth; 200 is the pre-activation paper's ImageNet model (no torchvision twin).
DEPTHS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """3x3 convolution with padding 1 (size-preserving at stride 1)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """1x1 convolution: mixes channels, changes their number, or subsamples with ``stride``."""
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias)


def _zero_branch_end(norm: nn.Module | None, conv: nn.Conv2d) -> None:
    # The closing norm's scale when it has one (torchvision's zero_init_residual), else the conv itself.
    if norm is not None and getattr(norm, "weight", None) is not None:
        nn.init.zeros_(norm.weight)
    else:
        nn.init.zeros_(conv.weight)


def _needs_projection(in_channels: int, out_channels: int, stride: int) -> bool:
    return stride != 1 or in_channels != out_channels


class _Block(nn.Module):
    """What every residual block shares: the ReLU, the sum (``skip``) and the projection shortcut, and the
    zero initialisation of the branch's end (``_last``: the closing norm and conv attributes)."""

    expansion = 1
    preact = False
    _last: tuple[str | None, str] = ("bn2", "conv2")

    def __init__(
        self, in_channels: int, planes: int, stride: int = 1, norm: str = "batch", skip: bool = True
    ) -> None:
        super().__init__()
        # the branch's convs and norms first, then the shortcut: the order of the state_dict's keys
        self.build(in_channels, planes, planes * self.expansion, stride, norm, bias=norm == "none")
        self._add_shortcut(in_channels, planes * self.expansion, stride, norm, skip)

    def build(
        self, in_channels: int, planes: int, out_channels: int, stride: int, norm: str, bias: bool
    ) -> None:
        """Create the branch's convs and norms (``bias``: convs get a bias where no norm follows)."""
        raise NotImplementedError

    def _add_shortcut(self, in_channels: int, out_channels: int, stride: int, norm: str, skip: bool) -> None:
        # A stride or a channel change needs a 1x1 projection: conv + norm after a post-activation block,
        # a bare conv in a pre-activation one (the next block normalises).
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        self.add: ResidualAdd | None = ResidualAdd() if skip else None
        if skip and _needs_projection(in_channels, out_channels, stride):
            layers = [conv1x1(in_channels, out_channels, stride, bias=norm == "none")]
            if not self.preact:
                layers.append(make_norm(norm, out_channels))
            self.downsample = nn.Sequential(*layers)

    def zero_init_last(self) -> None:
        """Make the branch output zero (the block starts as its shortcut): zero the closing norm's scale,
        or the closing conv where no norm follows it (``norm="none"``, pre-activation)."""
        norm, conv = self._last
        _zero_branch_end(None if norm is None else getattr(self, norm), getattr(self, conv))

    def branch(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if self.preact:
            pre = self.relu(self.bn1(x))
            out = self.branch(pre)
            if self.add is None:
                return out
            return self.add(x if self.downsample is None else self.downsample(pre), out)
        out = self.branch(x)
        if self.add is not None:
            out = self.add(x if self.downsample is None else self.downsample(x), out)
        return self.relu(out)


class BasicBlock(_Block):
    """Post-activation basic block: ``relu(x + bn2(conv2(relu(bn1(conv1(x))))))``.

    With C channels, batch norm and no conv bias it has ``2 * 9C^2`` weights and ``2 * 2C`` norm
    parameters: ``18C^2 + 4C``.

    Args:
        in_channels: channels of the block input.
        planes: channels of the branch (and of the output: ``expansion`` is 1).
        stride: stride of the first 3x3 conv; a stride or a channel change adds a 1x1 projection.
        norm: ``"batch"``, ``"group"`` or ``"none"`` (``"none"`` gives the convs a bias).
        skip: ``False`` drops the shortcut and the sum: the plain block ``relu(bn2(conv2(...)))``.

    Example:
        >>> import torch
        >>> BasicBlock(8, 16, stride=2)(torch.zeros(1, 8, 8, 8)).shape
        torch.Size([1, 16, 4, 4])
    """

    expansion = 1
    preact = False

    def build(
        self, in_channels: int, planes: int, out_channels: int, stride: int, norm: str, bias: bool
    ) -> None:
        self.conv1 = conv3x3(in_channels, planes, stride, bias=bias)
        self.bn1 = make_norm(norm, planes)
        self.conv2 = conv3x3(planes, out_channels, bias=bias)
        self.bn2 = make_norm(norm, out_channels)

    def branch(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class Bottleneck(_Block):
    """Post-activation bottleneck: 1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4.

    Args:
        in_channels: channels of the block input.
        planes: channels of the two inner convs; the output has ``4 * planes``.
        stride: stride of the 3x3 conv (torchvision's "v1.5" placement); with a channel change it adds a
            1x1 projection shortcut.
        norm: ``"batch"``, ``"group"`` or ``"none"`` (``"none"`` gives the convs a bias).
        skip: ``False`` drops the shortcut and the sum.

    Example:
        >>> import torch
        >>> Bottleneck(16, 8, stride=2)(torch.zeros(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    expansion = 4
    preact = False
    _last = ("bn3", "conv3")

    def build(
        self, in_channels: int, planes: int, out_channels: int, stride: int, norm: str, bias: bool
    ) -> None:
        self.conv1 = conv1x1(in_channels, planes, bias=bias)
        self.bn1 = make_norm(norm, planes)
        self.conv2 = conv3x3(planes, planes, stride, bias=bias)
        self.bn2 = make_norm(norm, planes)
        self.conv3 = conv1x1(planes, out_channels, bias=bias)
        self.bn3 = make_norm(norm, out_channels)

    def branch(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class PreActBasicBlock(_Block):
    """Pre-activation basic block: ``x + conv2(relu(bn2(conv1(relu(bn1(x))))))``.

    Nothing follows the sum, so the identity path runs unchanged from block to block. A projection
    shortcut (a bare 1x1 conv: the next block normalises) reads the pre-activated ``relu(bn1(x))``.

    Args:
        in_channels: channels of the block input.
        planes: channels of the branch and of the output.
        stride: stride of the first 3x3 conv.
        norm, skip: as in :class:`BasicBlock`.

    Example:
        >>> import torch
        >>> PreActBasicBlock(8, 16, stride=2)(torch.zeros(1, 8, 8, 8)).shape
        torch.Size([1, 16, 4, 4])
    """

    expansion = 1
    preact = True
    _last = (None, "conv2")

    def build(
        self, in_channels: int, planes: int, out_channels: int, stride: int, norm: str, bias: bool
    ) -> None:
        self.bn1 = make_norm(norm, in_channels)
        self.conv1 = conv3x3(in_channels, planes, stride, bias=bias)
        self.bn2 = make_norm(norm, planes)
        self.conv2 = conv3x3(planes, out_channels, bias=bias)

    def branch(self, pre: Tensor) -> Tensor:
        return self.conv2(self.relu(self.bn2(self.conv1(pre))))


class PreActBottleneck(_Block):
    """Pre-activation bottleneck: ``BN-ReLU-1x1``, ``BN-ReLU-3x3`` (stride), ``BN-ReLU-1x1`` (x4 channels).

    Args:
        in_channels: channels of the block input.
        planes: channels of the two inner convs; the output has ``4 * planes``.
        stride: stride of the 3x3 conv.
        norm, skip: as in :class:`BasicBlock`.

    Example:
        >>> import torch
        >>> PreActBottleneck(16, 8, stride=2)(torch.zeros(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    expansion = 4
    preact = True
    _last = (None, "conv3")

    def build(
        self, in_channels: int, planes: int, out_channels: int, stride: int, norm: str, bias: bool
    ) -> None:
        self.bn1 = make_norm(norm, in_channels)
        self.conv1 = conv1x1(in_channels, planes, bias=bias)
        self.bn2 = make_norm(norm, planes)
        self.conv2 = conv3x3(planes, planes, stride, bias=bias)
        self.bn3 = make_norm(norm, planes)
        self.conv3 = conv1x1(planes, out_channels, bias=bias)

    def branch(self, pre: Tensor) -> Tensor:
        out = self.conv2(self.relu(self.bn2(self.conv1(pre))))
        return self.conv3(self.relu(self.bn3(out)))


def _check_images(images: Tensor, channels: int) -> None:
    if images.dim() != 4 or images.shape[1] != channels:
        raise ValueError(f"ResNet expects images of shape (N, {channels}, H, W), got {tuple(images.shape)}")


# A leaf for torch.fx: the check stays in traced graphs (BN fusion, feature extractors) without tracing
# control flow on shapes.
torch.fx.wrap("_check_images")


Block = type[BasicBlock] | type[Bottleneck] | type[PreActBasicBlock] | type[PreActBottleneck]


class ResNet(Backbone):
    """A four-stage ResNet encoder returning ``[layer1, layer2, layer3, layer4]`` outputs, fine to coarse.

    The block class decides the variant: :class:`BasicBlock` / :class:`Bottleneck` give v1 (stem
    ``conv1 -> bn1 -> relu [-> maxpool]``), :class:`PreActBasicBlock` / :class:`PreActBottleneck` give v2
    (linear stem ``conv1 [-> maxpool]``, and ``final_norm -> relu`` applied to the last stage's output).

    Args:
        block: the block class.
        layers: number of blocks in each of the four stages, e.g. ``(3, 4, 6, 3)``.
        in_channels: image channels (1 for grayscale, more for multispectral).
        stem: ``"imagenet"`` (7x7 stride-2 conv + 3x3 stride-2 max-pool: reductions 4..32) or ``"cifar"``
            (3x3 stride-1 conv, no pool: reductions 1..8, for 32 px images).
        width: channels of the first stage; stages have ``width * (1, 2, 4, 8) * block.expansion``.
        norm: ``"batch"``, ``"group"`` (32 groups, fewer for narrow layers) or ``"none"`` (convs then
            carry a bias).
        skip: ``False`` builds the plain twin: identical branch layers, no shortcut path, no sum.
        zero_init_residual: start every block with a zero branch (Goyal et al. 2017): zero the scale of
            the norm closing each v1 branch, or the closing conv's weight where no norm closes it (every
            v2 branch, v1 with ``norm="none"``).

    Attributes:
        stages: ``(layer1, layer2, layer3, layer4)``.
        mean, std: normalisation constants of the loaded pretrained weights (one value per input
            channel), ``None`` when randomly initialised; ``normalization`` gives both as a dict.
        weights: name of the loaded torchvision weights (``"ResNet50_Weights.IMAGENET1K_V2"``) or ``None``.

    Raises:
        ValueError: for an unknown ``stem`` or ``norm``, a non-positive ``width`` / ``in_channels``, a
            ``layers`` that is not four positive ints, or ``zero_init_residual`` with ``skip=False``
            (every plain block would output zeros).

    Example:
        >>> import torch
        >>> net = ResNet(Bottleneck, (1, 1, 1, 1), width=8, in_channels=1)
        >>> net.out_channels, net.reductions
        ([32, 64, 128, 256], [4, 8, 16, 32])
        >>> [f.shape[-1] for f in net(torch.zeros(2, 1, 64, 64))]
        [16, 8, 4, 2]
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        *,
        in_channels: int = 3,
        stem: str = "imagenet",
        width: int = 64,
        norm: str = "batch",
        skip: bool = True,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"ResNet: stem must be one of {STEMS}, got {stem!r}")
        check_norm(norm, "ResNet")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"ResNet: width must be a positive int, got {width!r}")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"ResNet: in_channels must be a positive int, got {in_channels!r}")
        if len(layers) != 4 or not all(isinstance(n, int) and n >= 1 for n in layers):
            raise ValueError(f"ResNet: layers must be four positive ints (blocks per stage), got {layers!r}")
        if zero_init_residual and not skip:
            raise ValueError(
                "ResNet: zero_init_residual=True with skip=False would make every plain block output "
                "zeros; use it only with skip=True"
            )
        self.block = block
        self.preact = block.preact
        self.stem_type = stem
        self.skip = skip
        self.weights: str | None = None
        bias = norm == "none"

        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=bias)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            stem_reduction = 4
        else:
            self.conv1 = conv3x3(in_channels, width, bias=bias)
            self.maxpool = nn.Identity()
            stem_reduction = 1
        # v2's stem stays linear (the first block's BN-ReLU is its activation): an all-non-negative input
        # to the first sum would let the identity path carry only one sign (the lecture's argument).
        if not self.preact:
            self.bn1 = make_norm(norm, width)
            self.relu = nn.ReLU()

        channels = width
        stage_channels = []
        for index, (blocks, stride) in enumerate(zip(layers, (1, 2, 2, 2)), start=1):
            planes = width * 2 ** (index - 1)
            stage = []
            for position in range(blocks):
                stage.append(block(channels, planes, stride if position == 0 else 1, norm=norm, skip=skip))
                channels = planes * block.expansion
            setattr(self, f"layer{index}", nn.Sequential(*stage))
            stage_channels.append(channels)

        if self.preact:
            self.final_norm = make_norm(norm, channels)
            self.final_relu = nn.ReLU()

        self.out_channels = stage_channels
        self.reductions = [stem_reduction * 2**i for i in range(4)]
        self.reset_parameters(zero_init_residual)

    @property
    def stages(self) -> tuple[nn.Sequential, nn.Sequential, nn.Sequential, nn.Sequential]:
        """The four stages ``(layer1, layer2, layer3, layer4)`` (a view: not registered twice)."""
        return (self.layer1, self.layer2, self.layer3, self.layer4)

    def reset_parameters(self, zero_init_residual: bool = False) -> None:
        """He init (normal, ReLU gain) for convs; norms start at gamma 1, beta 0; biases at 0.

        ``fan_in`` keeps the forward variance of a conv after a ReLU: a branch ``conv(relu(.))`` returns
        the variance it receives, so a no-norm pre-activation block doubles the variance (Var(x) +
        Var(F(x))), the effect the variance monitors measure.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, (BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck)):
                    module.zero_init_last()

    def forward_stem(self, images: Tensor) -> Tensor:
        """The stem alone: the input of ``layer1``."""
        x = self.conv1(images)
        if not self.preact:
            x = self.relu(self.bn1(x))
        return self.maxpool(x)

    def forward(self, images: Tensor) -> list[Tensor]:
        _check_images(images, self.conv1.in_channels)
        x = self.forward_stem(images)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        if self.preact:
            # The last stage's sum is unnormalised; v2 closes the network with BN-ReLU.
            features[-1] = self.final_relu(self.final_norm(x))
        return features


# ----------------------------------------------------------------------------------------------------
# torchvision ImageNet weights


def _adapt_stats(values: Sequence[float], in_channels: int) -> tuple[float, ...]:
    # Mirrors adapt_stem_weight: the mean over RGB for one channel, the cyclic repeat for more.
    if in_channels == 1:
        return (sum(values) / len(values),)
    return tuple(float(values[i % len(values)]) for i in range(in_channels))


def weights_normalization(
    arch: str = "resnet50", weights: str = "DEFAULT", in_channels: int = 3
) -> dict[str, tuple[float, ...]]:
    """Normalisation ``{"mean", "std"}`` the torchvision weights expect, adapted to ``in_channels``.

    Reads torchvision's weight metadata only: nothing is downloaded.

    Args:
        arch: a torchvision ResNet name (``resnet18`` ... ``resnet152``).
        weights: a member of that model's weights enum (``"DEFAULT"``, ``"IMAGENET1K_V1"``...).
        in_channels: input channels of the adapted model (see :func:`adapt_stem_weight`).

    Example:
        >>> weights_normalization("resnet18", "DEFAULT", in_channels=1)["std"]
        (0.226,)
    """
    transforms = torchvision_weights(arch, weights, f"{arch}: weights").transforms()
    return {
        "mean": tuple(round(v, 6) for v in _adapt_stats(transforms.mean, in_channels)),
        "std": tuple(round(v, 6) for v in _adapt_stats(transforms.std, in_channels)),
    }


def _check_torchvision_compatible(model: ResNet) -> None:
    if (
        model.preact
        or model.stem_type != "imagenet"
        or not model.skip
        or not isinstance(model.bn1, nn.BatchNorm2d)
    ):
        raise ValueError(
            "torchvision weights need a v1 ResNet (resnet18..152) with stem='imagenet', norm='batch', "
            f"skip=True and width=64; got preact={model.preact}, stem={model.stem_type!r}, "
            f"norm={type(model.bn1).__name__}, skip={model.skip}"
        )


def load_torchvision_state_dict(model: ResNet, state_dict: Mapping[str, Tensor]) -> ResNet:
    """Load a torchvision ResNet state dict into ``model`` (v1 layout, ImageNet stem, batch norm).

    Names are identical, so the mapping is: drop ``fc.*`` and adapt ``conv1.weight`` to the model's input
    channels (:func:`adapt_stem_weight`); everything else loads with ``strict=True``.

    Raises:
        ValueError: when ``model`` cannot hold torchvision weights (pre-activation, CIFAR stem, no skip,
            a norm other than batch) or when the state dict does not match (missing/unexpected keys,
            shapes: e.g. a ``width`` other than 64 or another depth).
    """
    _check_torchvision_compatible(model)
    own = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    if "conv1.weight" in own:
        own["conv1.weight"] = adapt_stem_weight(own["conv1.weight"], model.conv1.in_channels)
    expected = model.state_dict()
    shapes = [k for k, v in own.items() if k in expected and expected[k].shape != v.shape]
    if shapes:
        raise ValueError(
            f"torchvision state dict does not fit this ResNet: shapes differ for {shapes[:3]} "
            f"(width must be 64 and the depth must match)"
        )
    result = model.load_state_dict(own, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            "torchvision state dict does not fit this ResNet (another depth?): "
            f"missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    return model


# ----------------------------------------------------------------------------------------------------
# factories


def _build(arch: str, block: Block, depth: int, weights: str | None, kwargs: dict[str, Any]) -> ResNet:
    model = ResNet(block, DEPTHS[depth], **kwargs)
    if weights is not None:
        if block.preact or depth not in (18, 34, 50, 101, 152):
            raise ValueError(
                f"{arch}: weights={weights!r} but torchvision publishes ImageNet weights only for "
                "resnet18/34/50/101/152"
            )
        enum_member = torchvision_weights(arch, weights, f"{arch}: weights")
        # Checked before the download so a wrong option fails at once.
        if kwargs.get("width", 64) != 64:
            raise ValueError(f"{arch}: weights={weights!r} needs width=64, got {kwargs['width']}")
        _check_torchvision_compatible(model)
        load_torchvision_state_dict(model, enum_member.get_state_dict(progress=True))
        model.weights = str(enum_member)
        stats = weights_normalization(arch, weights, model.conv1.in_channels)
        model.mean, model.std = stats["mean"], stats["std"]
    return model


@register_backbone()
def resnet18(*, weights: str | None = None, **kwargs: Any) -> ResNet:
    """ResNet-18 v1 (basic blocks 2-2-2-2). ``weights``: torchvision name, e.g. ``"DEFAULT"``.

    Other keyword arguments go to :class:`ResNet` (``in_channels``, ``stem``, ``width``, ``norm``, ``skip``,
    ``zero_init_residual``).
    """
    return _build("resnet18", BasicBlock, 18, weights, kwargs)


@register_backbone()
def resnet34(*, weights: str | None = None, **kwargs: Any) -> ResNet:
    """ResNet-34 v1 (basic blocks 3-4-6-3); arguments as :func:`resnet18`."""
    return _build("resnet34", BasicBlock, 34, weights, kwargs)


@register_backbone()
def resnet50(*, weights: str | None = None, **kwargs: Any) -> ResNet:
    """ResNet-50 v1 (bottlenecks 3-4-6-3); arguments as :func:`resnet18`."""
    return _build("resnet50", Bottleneck, 50, weights, kwargs)


@register_backbone()
def resnet101(*, weights: str | None = None, **kwargs: Any) -> ResNet:
    """ResNet-101 v1 (bottlenecks 3-4-23-3); arguments as :func:`resnet18`."""
    return _build("resnet101", Bottleneck, 101, weights, kwargs)


@register_backbone()
def resnet152(*, weights: str | None = None, **kwargs: Any) -> ResNet:
    """ResNet-152 v1 (bottlenecks 3-8-36-3); arguments as :func:`resnet18`."""
    return _build("resnet152", Bottleneck, 152, weights, kwargs)


@register_backbone()
def resnet200(*, weights: str | None = None, **kwargs: Any) -> ResNet:
    """ResNet-200 v1 (bottlenecks 3-24-36-3); no torchvision weights exist for it."""
    return _build("resnet200", Bottleneck, 200, weights, kwargs)


@register_backbone()
def preact_resnet18(*, weights: str | None = None, **kwargs: Any) -> ResNet:
    """Pre-activation ResNet-18 (He et al. 2016); keyword arguments as :class:`ResNet`, no weights."""
    return _build("preact_resnet18", PreActBasicBlock, 18, weights, kwargs)


@register_backbone()
def preact_resnet34(*, weights: str | None = None, **kwargs: Any) -> ResNet:
    """Pre-activation ResNet-34; keyword arguments as :class:`ResNet`."""
    return _build("preact_resnet34", PreActBasicBlock, 34, weights, kwargs)


@register_backbone()
def preact_resnet50(*, weights: str | None = None, **kwargs: Any) -> ResNet:
    """Pre-activation ResNet-50; keyword arguments as :class:`ResNet`."""
    return _build("preact_resnet50", PreActBottleneck, 50, weights, kwargs)


@register_backbone()
def preact_resnet101(*, weights: str | None = None, **kwargs: Any) -> ResNet:
    """Pre-activation ResNet-101; keyword arguments as :class:`ResNet`."""
    return _build("preact_resnet101", PreActBottleneck, 101, weights, kwargs)


@register_backbone()
def preact_resnet152(*, weights: str | None = None, **kwargs: Any) -> ResNet:
    """Pre-activation ResNet-152; keyword arguments as :class:`ResNet`."""
    return _build("preact_resnet152", PreActBottleneck, 152, weights, kwargs)


@register_backbone()
def preact_resnet200(*, weights: str | None = None, **kwargs: Any) -> ResNet:
    """Pre-activation ResNet-200, the paper's ImageNet model; keyword arguments as :class:`ResNet`."""
    return _build("preact_resnet200", PreActBottleneck, 200, weights, kwargs)
