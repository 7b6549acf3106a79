"""Adapters that turn timm, segmentation-models-pytorch and torchvision models into backbones.

Four prefixes honour the :class:`~lightning_convnets.backbones.base.Backbone` contract: ``timm:<model>``,
``smp:<encoder>``, ``smp:<Architecture>/<encoder>`` (one dense map) and ``torchvision:<name>`` (ResNets).
Nothing is downloaded unless asked (``pretrained=True`` or ``weights=...``); the libraries are imported
lazily, inside the builders. Details (weights, normalisation constants, hookable blocks):
``docs/backbones.md``.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_convnets.backbones.base import Backbone
from lightning_convnets.backbones.registry import register_prefix
from lightning_convnets.backbones.weights import torchvision_weights
from lightning_convnets.nn.stem import adapt_stem_weight

__all__ = [
    "SmpDenseBackbone",
    "SmpEncoderBackbone",
    "TimmBackbone",
    "TorchvisionResNet",
    "smp_backbone",
]

# torchvision classification models built as torchvision.models.resnet.ResNet: the only ones whose
# layer1..layer4 pyramid this adapter knows how to read without re-tracing the graph.
_TORCHVISION_RESNET_PREFIXES = ("resnet", "resnext", "wide_resnet")


def _suggest(name: str, candidates: Iterable[str], n: int = 5) -> str:
    """``" Did you mean: a, b?"`` for the closest candidates (case-insensitive), or ``""``."""
    by_lower: dict[str, str] = {}
    for c in candidates:
        by_lower.setdefault(c.lower(), c)
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=n, cutoff=0.5)
    # Substring hits catch what edit distance misses ("resnet" -> "resnet18", "resnet34"...).
    contains = [c for c in by_lower if name.lower() in c and c not in close]
    picks = [by_lower[c] for c in (close + sorted(contains, key=len))[:n]]
    return f" Did you mean: {', '.join(picks)}?" if picks else ""


def _check_in_channels(in_channels: int, where: str) -> None:
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise ValueError(f"{where}: in_channels must be a positive int, got {in_channels!r}")


# --------------------------------------------------------------------------------------------- timm


@register_prefix("timm")
class TimmBackbone(Backbone):
    """A timm model with ``features_only=True`` as a pyramid backbone (maps from fine to coarse).

    ``out_channels`` and ``reductions`` come from timm's ``feature_info``. Models whose features timm
    returns channels-last (Swin...) are permuted to ``NCHW`` so every map follows the contract.

    Args:
        model_name: a timm model name (``timm.list_models()``), optionally with a pretrained tag
            (``resnet18.a1_in1k``).
        in_channels: input channels; timm adapts the stem (and its pretrained weights) itself.
        pretrained: load timm's default pretrained weights (downloads them once). Default False.
        weights: a pretrained tag (``"a1_in1k"``); implies ``pretrained=True``.
        out_indices: which feature stages to return (timm's numbering; default: all of them).
        **kwargs: forwarded to ``timm.create_model`` (``drop_path_rate``, ``output_stride``...).

    Example:
        >>> from lightning_convnets.backbones import create_backbone
        >>> net = create_backbone("timm:resnet18", in_channels=1)
        >>> net.reductions
        [2, 4, 8, 16, 32]
        >>> [f.shape[1] for f in net(torch.zeros(2, 1, 64, 64))] == net.out_channels
        True
    """

    def __init__(
        self,
        model_name: str,
        in_channels: int = 3,
        pretrained: bool = False,
        weights: str | None = None,
        out_indices: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        import timm

        where = f"timm:{model_name}"
        _check_in_channels(in_channels, where)
        arch, tag = model_name.split(".", 1) if "." in model_name else (model_name, "")
        if not timm.is_model(arch):
            raise KeyError(
                f"unknown timm model {arch!r} (in backbone name {where!r})."
                + _suggest(arch, timm.list_models())
                + f" See timm.list_models('*{arch[:6]}*')."
            )
        if weights is not None:
            if tag and tag != weights:
                raise ValueError(f"{where}: the name already carries tag {tag!r}, but weights={weights!r}")
            tag, pretrained = weights, True
        name = f"{arch}.{tag}" if tag else arch
        if pretrained and tag and name not in timm.list_pretrained(name):
            raise KeyError(
                f"{where}: timm has no pretrained weights {name!r}."
                + _suggest(name, timm.list_pretrained(f"{arch}.*"))
            )
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        try:
            self.model = timm.create_model(
                name, features_only=True, pretrained=bool(pretrained), in_chans=in_channels, **kwargs
            )
        except IndexError as err:  # timm's own message for a bad out_indices is a bare IndexError
            raise ValueError(f"{where}: out_indices={out_indices!r} selects a stage the model lacks") from err
        except RuntimeError as err:
            if "feature" not in str(err).lower():
                raise
            raise RuntimeError(f"{where}: timm cannot build it with features_only=True: {err}") from err

        info = self.model.feature_info
        self.out_channels = [int(c) for c in info.channels()]
        self.reductions = [int(r) for r in info.reduction()]
        fmt = getattr(self.model, "output_fmt", "NCHW")
        self._channels_last = getattr(fmt, "value", fmt) == "NHWC"
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        self.mean = tuple(cfg["mean"]) if pretrained and "mean" in cfg else None
        self.std = tuple(cfg["std"]) if pretrained and "std" in cfg else None

    def forward(self, images: Tensor) -> list[Tensor]:
        features = list(self.model(images))
        if self._channels_last:
            features = [f.permute(0, 3, 1, 2) for f in features]
        return features


# ---------------------------------------------------------------------------------------------- smp


def _smp_architectures() -> dict[str, type[nn.Module]]:
    import segmentation_models_pytorch as smp

    return dict(smp.MODEL_ARCHITECTURES_MAPPING)


def _check_smp_encoder(encoder: str, where: str) -> None:
    """Raise a KeyError naming close matches for an encoder neither smp nor (``tu-``) timm knows."""
    from segmentation_models_pytorch import encoders as smp_encoders

    if encoder.startswith("tu-"):
        import timm

        arch = encoder[3:].split(".", 1)[0]
        if not timm.is_model(arch):
            raise KeyError(
                f"unknown timm model {arch!r} for smp's tu- encoder (in {where!r})."
                + _suggest(arch, timm.list_models())
            )
        return
    names = smp_encoders.get_encoder_names()
    if encoder not in names:
        raise KeyError(
            f"unknown smp encoder {encoder!r} (in {where!r})."
            + _suggest(encoder, names)
            + " Any timm model works as 'tu-<timm name>'; see"
            " segmentation_models_pytorch.encoders.get_encoder_names()."
        )


def _check_smp_kwargs(kwargs: dict[str, Any], encoder: str, init: Any, where: str) -> None:
    """Refuse keyword arguments smp would silently drop.

    smp forwards unknown keywords to the encoder, and only ``tu-`` (timm) encoders use them: for the
    others a typo such as ``decoder_channel=`` would vanish without a word.
    """
    if encoder.startswith("tu-"):
        return
    params = set(inspect.signature(init).parameters) if init is not None else set()
    # Names this adapter sets itself are not suggestions for a misspelt option.
    params -= {"self", "kwargs", "encoder_name", "encoder_weights", "in_channels", "classes", "activation"}
    unknown = sorted(set(kwargs) - params)
    if unknown:
        hints = "".join(_suggest(k, params, n=3) for k in unknown)
        raise TypeError(
            f"{where}: unexpected argument(s) {unknown} (smp would ignore them for the non-timm encoder "
            f"{encoder!r}).{hints}"
        )


def _smp_weights(encoder: str, pretrained: bool, weights: str | None, where: str) -> str | bool | None:
    """The ``weights``/``encoder_weights`` value to give smp: None unless the caller asked."""
    if weights is None and not pretrained:
        return None
    if encoder.startswith("tu-"):
        # smp's tu- encoders take True; a specific timm weight goes in the name (tu-resnet18.a1_in1k).
        if weights not in (None, True):
            raise ValueError(
                f"{where}: for tu- encoders choose the timm weights in the name "
                f"('tu-<model>.<tag>') and pass pretrained=True, not weights={weights!r}"
            )
        return True
    from segmentation_models_pytorch import encoders as smp_encoders

    available = list(smp_encoders.encoders[encoder]["pretrained_settings"])
    if weights is None:
        weights = "imagenet" if "imagenet" in available else (available[0] if available else None)
    if weights not in available:
        raise KeyError(f"{where}: smp has no weights {weights!r} for {encoder!r}; available: {available}")
    return weights


def _smp_normalisation(encoder: str, weights: str | bool | None) -> tuple[tuple | None, tuple | None]:
    if weights is None:
        return None, None
    from segmentation_models_pytorch import encoders as smp_encoders

    params = smp_encoders.get_preprocessing_params(encoder, pretrained=weights if weights is not True else "")
    return tuple(params["mean"]), tuple(params["std"])


class SmpEncoderBackbone(Backbone):
    """An smp encoder (``segmentation_models_pytorch.encoders.get_encoder``) as a pyramid backbone.

    smp encoders return ``depth + 1`` maps, the first being the input itself (reduction 1); some
    (``mit_b*``, ``tu-`` transformers) also return a 0-channel placeholder at reduction 2. Neither carries
    features, so both are dropped: this backbone returns only the real stages, fine to coarse.

    Args:
        encoder_name: an smp encoder (``get_encoder_names()``) or ``"tu-<timm model>"``.
        in_channels: input channels (smp patches the first conv; pretrained kernels are adapted).
        pretrained: load the encoder's ``"imagenet"`` weights (downloads them). Default False.
        weights: a specific smp weight name (``"imagenet"``, ``"ssl"``...); implies pretrained.
        depth: number of stages (smp's ``depth``, 1-5).
        output_stride: 32, or 16 / 8 to dilate the last stages (their reduction is then capped).
        **kwargs: forwarded to ``get_encoder``.

    Example:
        >>> from lightning_convnets.backbones import create_backbone
        >>> net = create_backbone("smp:resnet18")
        >>> net.out_channels, net.reductions
        ([64, 64, 128, 256, 512], [2, 4, 8, 16, 32])
    """

    def __init__(
        self,
        encoder_name: str,
        in_channels: int = 3,
        pretrained: bool = False,
        weights: str | None = None,
        depth: int = 5,
        output_stride: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        from segmentation_models_pytorch import encoders as smp_encoders

        where = f"smp:{encoder_name}"
        _check_in_channels(in_channels, where)
        _check_smp_encoder(encoder_name, where)
        _check_smp_kwargs(kwargs, encoder_name, None, where)
        smp_weights = _smp_weights(encoder_name, pretrained, weights, where)
        self.encoder = smp_encoders.get_encoder(
            encoder_name,
            in_channels=in_channels,
            depth=depth,
            weights=smp_weights,
            output_stride=output_stride,
            **kwargs,
        )
        stride = int(self.encoder.output_stride)
        channels = list(self.encoder.out_channels)
        self._keep = [i for i in range(1, len(channels)) if channels[i] > 0]
        self.out_channels = [int(channels[i]) for i in self._keep]
        self.reductions = [min(2**i, stride) for i in self._keep]
        self.mean, self.std = _smp_normalisation(encoder_name, smp_weights)

    def forward(self, images: Tensor) -> list[Tensor]:
        features = self.encoder(images)
        return [features[i] for i in self._keep]


def _first_conv(module: nn.Module) -> nn.Conv2d:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            return m
    raise TypeError(f"no Conv2d in smp segmentation head {type(module).__name__}")  # pragma: no cover


def _head_upsampling(head: nn.Module) -> int:
    """The factor by which an smp segmentation head upsamples the decoder's output (1 if none)."""
    factor = getattr(head, "upsampling_factor", None)  # DPT's head interpolates in forward
    if factor is None:
        ups = [m for m in head.modules() if isinstance(m, nn.Upsample)]
        factor = ups[0].scale_factor if ups else 1
    if isinstance(factor, tuple):
        factor = factor[0]
    return round(float(factor))


class SmpDenseBackbone(Backbone):
    """An smp encoder-decoder (``Unet``, ``FPN``, ``DeepLabV3Plus``...) without its segmentation head.

    Returns one dense map (``dense=True``): the decoder's output, ``out_channels[0]`` channels. Several
    decoders stop short of full resolution (FPN, PAN, DeepLabV3+, Segformer, UPerNet at 1/4, PSPNet at
    1/8, DPT at 1/2): smp's head then upsamples its logits bilinearly (``align_corners=True``). With
    ``upsample=True`` (default) this adapter upsamples the *features* the same way, to the input size,
    so ``reductions == [1]``; because a 1x1 conv and bilinear interpolation commute, a 1x1 conv head on
    this output reproduces smp's FPN/DeepLab logits exactly. ``upsample=False`` returns the decoder's
    native resolution (``reductions == [4]`` for FPN) and leaves resizing to the task.

    Submodules keep smp's names (``encoder``, ``decoder``), so an smp checkpoint loads with
    ``load_state_dict(sd, strict=False)`` after removing its ``segmentation_head.*`` keys.

    Args:
        architecture: an smp architecture (``Unet``, ``UnetPlusPlus``, ``MAnet``, ``Linknet``, ``FPN``,
            ``PSPNet``, ``DeepLabV3``, ``DeepLabV3Plus``, ``PAN``, ``UPerNet``, ``Segformer``, ``DPT``;
            case-insensitive).
        encoder_name: an smp encoder or ``"tu-<timm model>"``.
        in_channels: input channels.
        pretrained: load the encoder's ``"imagenet"`` weights (downloads them). Default False; the
            decoder is always randomly initialised.
        weights: a specific smp encoder weight name; implies pretrained. ``encoder_weights=`` is
            accepted as an alias, for configs written for smp.
        upsample: resize a coarser decoder output to the input size (see above).
        **kwargs: forwarded to the smp architecture (``decoder_channels``, ``encoder_depth``...). Head
            options (``classes``, ``activation``, ``aux_params``) are refused: the task adds its head.

    Example:
        >>> from lightning_convnets.backbones import create_backbone
        >>> net = create_backbone("smp:Unet/resnet18", decoder_channels=(32, 16, 8, 8, 4))
        >>> net.out_channels, net.reductions, net.dense
        ([4], [1], True)
        >>> net(torch.zeros(1, 3, 64, 64))[0].shape
        torch.Size([1, 4, 64, 64])
    """

    dense = True

    def __init__(
        self,
        architecture: str,
        encoder_name: str,
        in_channels: int = 3,
        pretrained: bool = False,
        weights: str | None = None,
        upsample: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        where = f"smp:{architecture}/{encoder_name}"
        _check_in_channels(in_channels, where)
        archs = _smp_architectures()
        cls = archs.get(architecture.lower())
        if cls is None:
            names = [c.__name__ for c in archs.values()]
            raise KeyError(
                f"unknown smp architecture {architecture!r} (in {where!r})."
                + _suggest(architecture, names)
                + f" Known: {', '.join(names)}."
            )
        refused = sorted({"classes", "activation", "aux_params"} & set(kwargs))
        if refused:
            raise TypeError(
                f"{where}: {refused} configure smp's segmentation/classification head, which this backbone "
                "drops; set the number of classes on the task instead"
            )
        if "encoder_weights" in kwargs:
            alias = kwargs.pop("encoder_weights")
            if weights is not None and alias != weights:
                raise ValueError(f"{where}: weights={weights!r} and encoder_weights={alias!r} disagree")
            weights = alias
        _check_smp_encoder(encoder_name, where)
        _check_smp_kwargs(kwargs, encoder_name, cls.__init__, where)
        smp_weights = _smp_weights(encoder_name, pretrained, weights, where)
        try:
            model = cls(
                encoder_name=encoder_name,
                encoder_weights=smp_weights,
                in_channels=in_channels,
                classes=1,
                **kwargs,
            )
        except TypeError as err:
            raise TypeError(f"{where}: smp.{cls.__name__} rejected the arguments: {err}") from err

        self.architecture = cls.__name__
        self.encoder = model.encoder
        self.decoder = model.decoder
        # DPT's encoder returns (features, prefix tokens) and its decoder takes both.
        self._takes_prefix_tokens = cls.__name__ == "DPT"
        self._divisible_by = int(self.encoder.output_stride) if model.requires_divisible_input_shape else 1
        self.native_reduction = _head_upsampling(model.segmentation_head)
        self.upsample = bool(upsample)
        self.out_channels = [int(_first_conv(model.segmentation_head).in_channels)]
        self.reductions = [1 if self.upsample else self.native_reduction]
        self.mean, self.std = _smp_normalisation(encoder_name, smp_weights)

    def forward(self, images: Tensor) -> list[Tensor]:
        h, w = images.shape[-2:]
        k = self._divisible_by
        if h % k or w % k:
            raise ValueError(
                f"smp {self.architecture} backbone: input height and width must be multiples of {k} "
                f"(the encoder's output stride), got {h}x{w}; pad or resize to "
                f"{-(-h // k) * k}x{-(-w // k) * k}"
            )
        if self._takes_prefix_tokens:
            features, prefix_tokens = self.encoder(images)
            out = self.decoder(features, prefix_tokens)
        else:
            out = self.decoder(self.encoder(images))
        if self.upsample and tuple(out.shape[-2:]) != (h, w):
            # Same interpolation as smp's own heads, so the head-less model stays equivalent.
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=True)
        return [out]


@register_prefix("smp")
def smp_backbone(name: str, **kwargs: Any) -> Backbone:
    """Builder for ``smp:<encoder>`` (a :class:`SmpEncoderBackbone` pyramid) and
    ``smp:<Architecture>/<encoder>`` (a :class:`SmpDenseBackbone` dense map)."""
    if "/" in name:
        architecture, encoder = name.split("/", 1)
        if not architecture or not encoder:
            raise ValueError(f"smp backbone name must be 'smp:<Architecture>/<encoder>', got 'smp:{name}'")
        return SmpDenseBackbone(architecture, encoder, **kwargs)
    return SmpEncoderBackbone(name, **kwargs)


# -------------------------------------------------------------------------------------- torchvision


def _adapt_first_conv(conv: nn.Conv2d, in_channels: int, keep_weights: bool) -> nn.Conv2d:
    """A copy of ``conv`` taking ``in_channels`` inputs.

    With pretrained kernels, grayscale sums the RGB kernels (a gray image is R=G=B, so the response is
    unchanged) and other counts cycle through RGB scaled by ``3 / in_channels`` (keeping the activation
    scale for inputs of similar statistics). Otherwise a fresh kernel initialised like torchvision's.
    """
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    if keep_weights:
        with torch.no_grad():
            new.weight.copy_(adapt_stem_weight(conv.weight, in_channels))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    else:
        nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
        if new.bias is not None:
            nn.init.zeros_(new.bias)
    return new


@register_prefix("torchvision")
class TorchvisionResNet(Backbone):
    """A torchvision ResNet / ResNeXt / Wide ResNet as a pyramid backbone (``layer1..layer4``).

    The torchvision modules are kept under torchvision's own names (``conv1``, ``bn1``, ``layer1``...),
    so its ``BasicBlock``/``Bottleneck`` blocks stay hookable and a torchvision state dict loads with
    ``load_state_dict(sd, strict=False)`` (only ``fc.*`` is unused). ``avgpool``/``fc`` and any stage
    after the last requested one are dropped: parameters that never get gradients would trip DDP.

    Args:
        model_name: ``resnet18/34/50/101/152``, ``resnext50_32x4d``, ``resnext101_32x8d``,
            ``resnext101_64x4d``, ``wide_resnet50_2``, ``wide_resnet101_2``.
        in_channels: input channels; ``!= 3`` replaces ``conv1`` (pretrained kernels are adapted:
            summed for grayscale, cycled and rescaled otherwise).
        pretrained: load torchvision's ``DEFAULT`` ImageNet weights (downloads them). Default False.
        weights: a weights name (``"IMAGENET1K_V2"``, ``"ResNet50_Weights.IMAGENET1K_V2"``) or enum
            member; implies pretrained.
        out_indices: stages to return, timm's numbering: 0 = stem (after ReLU, reduction 2),
            1..4 = ``layer1..layer4``. Default ``(1, 2, 3, 4)``.
        **kwargs: forwarded to the torchvision builder (``replace_stride_with_dilation``,
            ``zero_init_residual``, ``norm_layer``...).

    Example:
        >>> from lightning_convnets.backbones import create_backbone
        >>> net = create_backbone("torchvision:resnet18", in_channels=5)
        >>> net.out_channels, net.reductions
        ([64, 128, 256, 512], [4, 8, 16, 32])
    """

    def __init__(
        self,
        model_name: str,
        in_channels: int = 3,
        pretrained: bool = False,
        weights: str | None = None,
        out_indices: Sequence[int] = (1, 2, 3, 4),
        **kwargs: Any,
    ) -> None:
        super().__init__()
        from torchvision import models

        where = f"torchvision:{model_name}"
        _check_in_channels(in_channels, where)
        available = models.list_models(module=models)
        supported = [n for n in available if n.startswith(_TORCHVISION_RESNET_PREFIXES)]
        if model_name not in supported:
            extra = (
                f" {model_name!r} is a torchvision model but not a ResNet; try 'timm:{model_name}'."
                if model_name in available
                else _suggest(model_name, supported + available)
            )
            raise KeyError(
                f"unknown torchvision ResNet {model_name!r} (in {where!r}).{extra} Supported: {supported}."
            )
        indices = sorted(set(out_indices))
        if not indices or indices[0] < 0 or indices[-1] > 4:
            raise ValueError(f"{where}: out_indices must be a non-empty subset of 0..4, got {out_indices!r}")
        if weights is None and not pretrained:
            weight_enum = None
        else:
            weight_enum = torchvision_weights(model_name, weights or "DEFAULT", where)
        model = models.get_model(model_name, weights=weight_enum, **kwargs)

        conv1 = model.conv1
        if in_channels != conv1.in_channels:
            conv1 = _adapt_first_conv(conv1, in_channels, keep_weights=weight_enum is not None)
        self.conv1, self.bn1, self.relu, self.maxpool = conv1, model.bn1, model.relu, model.maxpool
        self._out_indices = indices
        self.out_channels, self.reductions = [], []
        if 0 in indices:
            self.out_channels.append(conv1.out_channels)
            self.reductions.append(2)
        reduction = 4
        for i in range(1, indices[-1] + 1):
            layer = getattr(model, f"layer{i}")
            setattr(self, f"layer{i}", layer)
            if i > 1:
                # torchvision blocks record their stride; dilated stages (replace_stride_with_dilation)
                # have 1 there.
                reduction *= int(layer[0].stride)
            if i in indices:
                last = layer[-1]
                bn = last.bn3 if hasattr(last, "bn3") else last.bn2
                self.out_channels.append(int(bn.num_features))
                self.reductions.append(reduction)
        if weight_enum is not None:
            preset = weight_enum.transforms()
            self.mean, self.std = tuple(preset.mean), tuple(preset.std)
        else:
            self.mean = self.std = None

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.relu(self.bn1(self.conv1(images)))
        out = [x] if 0 in self._out_indices else []
        x = self.maxpool(x)
        for i in range(1, self._out_indices[-1] + 1):
            x = getattr(self, f"layer{i}")(x)
            if i in self._out_indices:
                out.append(x)
        return out
