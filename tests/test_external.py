"""The timm / smp / torchvision adapters: contract shapes, in_channels, dense smp models, errors, no download."""

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torchvision
from torch import nn

from lightning_convnets.backbones import check_contract, create_backbone, list_backbones
from lightning_convnets.backbones.external import (
    SmpDenseBackbone,
    SmpEncoderBackbone,
    TimmBackbone,
    TorchvisionResNet,
    _adapt_first_conv,
)

SIZE = 64


class DownloadAttempted(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    """Every weight-loading entry point of the three libraries fails loudly: nothing may be fetched."""

    def refuse(*args, **kwargs):
        raise DownloadAttempted(f"download attempted: {args} {kwargs}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(timm.models._builder, "load_pretrained", refuse)
    monkeypatch.setattr(smp.encoders, "hf_hub_download", refuse)


def _check_maps(net, maps, batch=2, size=SIZE):
    check_contract(net)
    assert isinstance(maps, list) and len(maps) == len(net.out_channels) == len(net.reductions)
    for f, c, r in zip(maps, net.out_channels, net.reductions, strict=True):
        assert f.shape == (batch, c, size // r, size // r)


def test_list_backbones_shows_the_adapter_prefixes():
    names = list_backbones()
    for prefix in ("timm", "smp", "torchvision"):
        assert f"{prefix}:<name>" in names
    assert list_backbones("timm:*") == ["timm:<name>"]


PYRAMIDS = [
    ("timm:resnet18", {}, TimmBackbone),
    ("timm:efficientnet_b0", {"out_indices": (1, 2, 3, 4)}, TimmBackbone),
    ("timm:mobilenetv3_small_050", {}, TimmBackbone),
    ("smp:resnet18", {}, SmpEncoderBackbone),
    ("smp:mobilenet_v2", {}, SmpEncoderBackbone),
    ("torchvision:resnet18", {}, TorchvisionResNet),
]


@pytest.mark.parametrize("in_channels", [1, 5])
@pytest.mark.parametrize(("name", "kwargs", "cls"), PYRAMIDS, ids=[p[0] for p in PYRAMIDS])
def test_pyramid_maps_match_out_channels_and_reductions(name, kwargs, cls, in_channels):
    net = create_backbone(name, in_channels=in_channels, **kwargs)
    assert isinstance(net, cls) and not net.dense and net.mean is None
    maps = net(torch.randn(2, in_channels, SIZE, SIZE))
    _check_maps(net, maps)
    assert net.reductions == sorted(net.reductions), "pyramids go from fine to coarse"
    assert net.reductions[0] > 1


def test_timm_reads_feature_info():
    net = create_backbone("timm:efficientnet_b0", out_indices=(1, 2, 3, 4))
    assert net.out_channels == [24, 40, 112, 320]
    assert net.reductions == [4, 8, 16, 32]


def test_smp_encoder_drops_identity_and_empty_stages():
    net = create_backbone("smp:resnet18")
    # smp's raw encoder returns the input itself first (reduction 1, 3 channels): dropped.
    assert net.out_channels == [64, 64, 128, 256, 512]
    assert net.reductions == [2, 4, 8, 16, 32]
    # mit_b0 returns a 0-channel placeholder at reduction 2 as well: dropped.
    assert create_backbone("smp:mit_b0").reductions == [4, 8, 16, 32]
    # output_stride=16 dilates the last stage: its reduction is capped.
    dilated = create_backbone("smp:resnet18", output_stride=16)
    assert dilated.reductions == [2, 4, 8, 16, 16]
    _check_maps(dilated, dilated(torch.randn(2, 3, SIZE, SIZE)))


def test_torchvision_keeps_blocks_and_state_dict_names():
    tv = torchvision.models.resnet18()
    net = create_backbone("torchvision:resnet18")
    assert isinstance(net.layer1[0], torchvision.models.resnet.BasicBlock)
    missing, unexpected = net.load_state_dict(tv.state_dict(), strict=False)
    assert missing == [] and sorted(unexpected) == ["fc.bias", "fc.weight"]
    tv.eval(), net.eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    body = nn.Sequential(tv.conv1, tv.bn1, tv.relu, tv.maxpool, tv.layer1, tv.layer2, tv.layer3, tv.layer4)
    with torch.no_grad():
        torch.testing.assert_close(net(x)[-1], body(x))
    assert not hasattr(net, "fc") and not hasattr(net, "avgpool")


def test_torchvision_out_indices_and_dilation():
    net = create_backbone("torchvision:resnet18", out_indices=(0, 1, 2))
    assert net.out_channels == [64, 64, 128] and net.reductions == [2, 4, 8]
    assert not hasattr(net, "layer3"), "stages after the last requested one are dropped"
    _check_maps(net, net(torch.randn(2, 3, SIZE, SIZE)))
    wide = create_backbone("torchvision:resnet50", replace_stride_with_dilation=[False, True, True])
    assert isinstance(wide.layer1[0], torchvision.models.resnet.Bottleneck)
    assert wide.out_channels == [256, 512, 1024, 2048] and wide.reductions == [4, 8, 8, 8]
    _check_maps(wide, wide(torch.randn(2, 3, 32, 32)), size=32)
    with pytest.raises(ValueError, match="out_indices"):
        create_backbone("torchvision:resnet18", out_indices=(5,))


def test_adapted_pretrained_stem_keeps_grayscale_response():
    conv = nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False)
    gray = torch.randn(2, 1, 16, 16)
    one = _adapt_first_conv(conv, 1, keep_weights=True)
    torch.testing.assert_close(one(gray), conv(gray.expand(-1, 3, -1, -1)))
    five = _adapt_first_conv(conv, 5, keep_weights=True)
    assert five.weight.shape == (8, 5, 7, 7) and five.stride == (2, 2)
    torch.testing.assert_close(five.weight[:, 3], conv.weight[:, 0] * 3 / 5)


def test_smp_unet_returns_one_dense_map_at_input_size():
    net = create_backbone("smp:Unet/resnet18", decoder_channels=(32, 16, 16, 8, 8))
    assert isinstance(net, SmpDenseBackbone) and net.dense
    assert net.out_channels == [8] and net.reductions == [1]
    _check_maps(net, net(torch.randn(2, 3, SIZE, SIZE)))
    for in_channels in (1, 5):
        net = create_backbone("smp:Unet/resnet18", in_channels=in_channels, decoder_channels=(16, 8, 8, 8, 8))
        _check_maps(net, net(torch.randn(2, in_channels, SIZE, SIZE)))
    assert not hasattr(net, "segmentation_head")


def test_smp_fpn_upsamples_like_smp_head():
    small = {"decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32}
    net = create_backbone("smp:FPN/resnet18", **small)
    assert net.native_reduction == 4 and net.reductions == [1] and net.out_channels == [32]
    x = torch.randn(2, 3, SIZE, SIZE)
    _check_maps(net, net(x))

    coarse = create_backbone("smp:fpn/resnet18", upsample=False, **small)
    assert coarse.reductions == [4]
    _check_maps(coarse, coarse(x))

    # A 1x1 conv commutes with bilinear upsampling: our map + smp's head conv == smp's logits.
    ref = smp.FPN(encoder_name="resnet18", encoder_weights=None, classes=3, **small).eval()
    net.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("segmentation_head")})
    with torch.no_grad():
        torch.testing.assert_close(ref.segmentation_head[0](net.eval()(x)[0]), ref(x), atol=1e-5, rtol=1e-4)

    with pytest.raises(ValueError, match="multiples of 32"):
        net(torch.randn(1, 3, 48, 40))


UNKNOWN = [
    ("timm:resnet19", "resnet18"),
    ("smp:resnt18", "resnet18"),
    ("smp:tu-resnet19", "resnet18"),
    ("smp:Unett/resnet18", "Unet"),
    ("smp:deeplab/resnet18", "DeepLabV3Plus"),
    ("smp:Unet/resnt34", "resnet34"),
    ("torchvision:resnet19", "resnet18"),
    ("torchvision:vgg16", "timm:vgg16"),
]


@pytest.mark.parametrize(("name", "hint"), UNKNOWN, ids=[u[0] for u in UNKNOWN])
def test_unknown_names_suggest_close_matches(name, hint):
    with pytest.raises(KeyError, match=r"Did you mean|try") as info:
        create_backbone(name)
    assert hint in str(info.value)


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="decoder_channels"):
        create_backbone("smp:Unet/resnet18", decoder_channel=(8, 8, 8, 8, 8))
    with pytest.raises(TypeError, match="classes"):
        create_backbone("smp:Unet/resnet18", classes=3)
    with pytest.raises(KeyError, match="IMAGENET1K_V1"):
        create_backbone("torchvision:resnet18", weights="IMAGENET1K_V9")
    with pytest.raises(KeyError, match="imagenet"):
        create_backbone("smp:resnet18", weights="foo")
    with pytest.raises(ValueError, match="in_channels"):
        create_backbone("timm:resnet18", in_channels=0)


def _spy(monkeypatch, owner, attr, calls, fail=False):
    real = getattr(owner, attr)

    def spy(*args, **kwargs):
        calls.append(kwargs)
        if fail:
            raise DownloadAttempted("weights requested")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attr, spy)


def test_defaults_request_no_weights(monkeypatch):
    calls = {"timm": [], "tv": [], "enc": [], "unet": []}
    _spy(monkeypatch, timm, "create_model", calls["timm"])
    _spy(monkeypatch, torchvision.models, "get_model", calls["tv"])
    _spy(monkeypatch, smp.encoders, "get_encoder", calls["enc"])
    _spy(monkeypatch, smp.decoders.unet.model, "get_encoder", calls["unet"])
    create_backbone("timm:resnet18")
    create_backbone("torchvision:resnet18")
    create_backbone("smp:resnet18")
    create_backbone("smp:Unet/resnet18")
    assert calls["timm"][0]["pretrained"] is False
    assert calls["tv"][0]["weights"] is None
    assert calls["enc"][0]["weights"] is None
    assert calls["unet"][0]["weights"] is None


def test_pretrained_true_asks_each_library_for_its_default_weights(monkeypatch):
    calls = {"timm": [], "tv": [], "enc": [], "unet": []}
    _spy(monkeypatch, timm, "create_model", calls["timm"], fail=True)
    _spy(monkeypatch, torchvision.models, "get_model", calls["tv"], fail=True)
    _spy(monkeypatch, smp.encoders, "get_encoder", calls["enc"], fail=True)
    _spy(monkeypatch, smp.decoders.unet.model, "get_encoder", calls["unet"], fail=True)
    for name in ("timm:resnet18", "torchvision:resnet18", "smp:resnet18", "smp:Unet/resnet18"):
        with pytest.raises(DownloadAttempted):
            create_backbone(name, pretrained=True)
    assert calls["timm"][0]["pretrained"] is True
    assert calls["tv"][0]["weights"] == torchvision.models.ResNet18_Weights.DEFAULT
    assert calls["enc"][0]["weights"] == "imagenet"
    assert calls["unet"][0]["weights"] == "imagenet"
    with pytest.raises(DownloadAttempted):
        create_backbone("smp:resnet18", weights="ssl")
    assert calls["enc"][-1]["weights"] == "ssl"


@pytest.mark.slow
def test_timm_channels_last_features_are_permuted():
    net = create_backbone("timm:swin_tiny_patch4_window7_224", img_size=SIZE)
    assert net._channels_last
    _check_maps(net, net(torch.randn(2, 3, SIZE, SIZE)))
