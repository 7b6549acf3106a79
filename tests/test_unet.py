"""U-Net backbone: the paper's shapes and parameter count, crop alignment, size errors, options, encoders."""

import pytest
import torch
from torch import nn

from lightning_convnets.backbones import Backbone, check_contract, create_backbone, list_backbones
from lightning_convnets.backbones.unet import UNet
from lightning_convnets.nn import center_crop, crop_offsets


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_parameter_count_without_forward():
    net = UNet(
        in_channels=1, width=64, depth=4, padding="valid", upsample="transpose", norm="none", bias=True
    )
    assert n_params(net) == 31_030_528
    classifier = nn.Conv2d(net.out_channels[0], 2, kernel_size=1)
    assert n_params(net) + n_params(classifier) == 31_030_658
    # Padding changes shapes, never weights.
    assert n_params(UNet(in_channels=1, width=64, padding="same")) == 31_030_528


def test_valid_padding_reproduces_paper_shapes_572_to_388():
    net = UNet(in_channels=1, width=4, padding="valid")
    check_contract(net)
    assert net.dense and net.out_channels == [4] and net.reductions == [1]
    assert net.output_size(572) == 388 and net.output_size((572, 572)) == (388, 388)
    assert net.border == 92 == (572 - 388) // 2
    with torch.no_grad():
        (out,) = net(torch.randn(1, 1, 572, 572))
    assert out.shape == (1, 4, 388, 388)


def test_target_crop_follows_the_network_border():
    net = UNet(in_channels=1, width=4, depth=2, padding="valid")
    size = net.valid_input_size(40)
    with torch.no_grad():
        (out,) = net(torch.randn(1, 1, size, size + 8))
    mask = torch.arange(size * (size + 8)).reshape(1, size, size + 8)
    cropped = center_crop(mask, *out.shape[-2:])
    assert cropped.shape[-2:] == out.shape[-2:]
    assert crop_offsets(size, out.shape[-2]) == (net.border, net.border)
    assert torch.equal(cropped, mask[:, net.border : net.border + out.shape[-2], net.border : -net.border])
    # A target one pixel taller than the input: the odd extra row is cut from the bottom, not the top.
    tall = torch.arange((size + 1) * size).reshape(1, size + 1, size)
    cropped = center_crop(tall, out.shape[-2], out.shape[-1] - 8)
    assert cropped[0, 0, 0] == tall[0, net.border, net.border]
    assert cropped[0, -1, 0] == tall[0, net.border + out.shape[-2] - 1, net.border]


def _positive_weights(net: nn.Module) -> None:
    # All-positive weights keep every ReLU open, so a gradient's support is exactly the receptive field.
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.constant_(module.weight, 0.01)
            nn.init.zeros_(module.bias)


def test_first_skip_crop_is_centred_on_the_border():
    net = UNet(in_channels=1, width=2, depth=2, padding="valid")
    _positive_weights(net)
    # Cut everything below level 0: the output then sees the input only through the first skip, whose
    # crop must sit in the middle (two 3x3 convs before the skip, two after: a 9x9 window at the border).
    nn.init.zeros_(net.ups[-1].weight)
    size = net.valid_input_size(48)
    x = torch.rand(1, 1, size, size, requires_grad=True)
    (out,) = net(x)
    out[0, :, 0, 0].sum().backward()
    rows = x.grad[0, 0].abs().sum(1).nonzero().flatten()
    cols = x.grad[0, 0].abs().sum(0).nonzero().flatten()
    for idx in (rows, cols):
        assert (idx.min().item(), idx.max().item()) == (net.border - 4, net.border + 4)


def test_every_skip_crop_is_centred():
    # With flip-symmetric (constant) kernels the network commutes with flips only if every crop is
    # centred: a crop taken off-centre at any level would shift one side's features against the other's.
    net = UNet(in_channels=1, width=2, depth=3, padding="valid")
    _positive_weights(net)
    size = net.valid_input_size(100)
    x = torch.rand(1, 1, size, size + 16, dtype=torch.float64)
    net = net.double()
    with torch.no_grad():
        out = net(x)[0]
        for dims in ((-1,), (-2,)):
            assert torch.allclose(net(x.flip(dims))[0], out.flip(dims))


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_valid_unet_is_the_same_padding_unet_on_the_pixels_it_sees_whole(depth):
    # With shared weights, the valid network must compute exactly the same-padding network's output on the
    # pixels whose receptive field holds no zero padding, and output pixel (i, j) must be the one at input
    # pixel (i + border, j + border): the pixel the task's centre-cropped target puts there. A crop off by one
    # at any skip, a shifted up-convolution or a wrong border breaks the equality for every pooling phase.
    torch.manual_seed(depth)
    valid = UNet(width=2, depth=depth, padding="valid", norm="batch", upsample="transpose").double().eval()
    for module in valid.modules():
        if isinstance(module, nn.BatchNorm2d):  # non-trivial eval statistics and affine parameters
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    same = UNet(width=2, depth=depth, padding="same", norm="batch", upsample="transpose").double().eval()
    same.load_state_dict(valid.state_dict())
    step, b = 2**depth, valid.border
    h = valid.valid_input_size(40)
    w = h + step  # not square
    out_h, out_w = valid.output_size((h, w))
    margin = 2 * b + 2 * step  # the same network's zero padding never reaches the compared pixels
    big_h, big_w = (-(-(s + 2 * margin) // step) * step for s in (h, w))
    x = torch.randn(1, 3, big_h, big_w, dtype=torch.float64)
    with torch.no_grad():
        reference = same(x)[0]
        matches = []
        for o in range(margin, margin + step):  # every phase of the valid network's pooling grid
            (out,) = valid(x[..., o : o + h, o : o + w])
            assert out.shape[-2:] == (out_h, out_w) == (h - 2 * b, w - 2 * b)
            window = reference[..., o + b : o + b + out_h, o + b : o + b + out_w]
            matches.append(torch.allclose(out, window, rtol=0, atol=1e-10))
    assert matches.count(True) == 1, matches  # one pooling phase: the one whose grids coincide


def test_up_convolutions_get_he_init_so_both_halves_of_a_concatenation_start_at_one_scale():
    # The paper's std sqrt(2/N): a 2x2 stride-2 up-convolution feeds each output pixel from one input
    # pixel, N = in_channels. PyTorch's default for ConvTranspose2d is ~3.5x smaller, and the up-path then
    # entered every concatenation at 0.4x the skip map's scale (the valid U-Net on shapes stalled at mIoU
    # 0.42); with He init it enters at ~1.4x (a linear map of post-ReLU features next to post-ReLU ones).
    torch.manual_seed(0)
    for norm in ("none", "batch"):
        net = UNet(width=16, depth=3, padding="valid", norm=norm, upsample="transpose")
        for up in net.ups:
            assert up.weight.std().item() == pytest.approx((2 / up.in_channels) ** 0.5, rel=0.1)
            assert up.bias is None or not up.bias.any()
    seen: dict[str, list[torch.Tensor]] = {"skip": [], "up": []}
    for level in range(net.depth):
        net.down[level].register_forward_hook(lambda m, i, o: seen["skip"].append(o))
    for up in net.ups:
        up.register_forward_hook(lambda m, i, o: seen["up"].append(o))
    with torch.no_grad():
        net(torch.randn(4, 3, net.valid_input_size(100), net.valid_input_size(100)))
    for skip, up in zip(reversed(seen["skip"]), seen["up"]):  # coarse to fine, as the decoder goes
        ratio = up.pow(2).mean().sqrt() / skip.pow(2).mean().sqrt()
        assert 0.7 <= ratio.item() <= 2.5, f"up-path RMS / skip RMS = {ratio.item():.2f}"


def test_valid_padding_size_errors_name_size_and_neighbours():
    net = UNet(in_channels=1, width=4, padding="valid")
    with pytest.raises(ValueError, match=r"570 px gives an odd side.*556 and 572"):
        net.output_size(570)
    with pytest.raises(ValueError, match=r"input side 100 px is too small.*smallest valid size is 188"):
        net.output_size(100)
    with pytest.raises(ValueError, match=r"input width 570 px"):
        net(torch.zeros(1, 1, 572, 570))
    for size in range(150, 700, 7):
        valid = net.valid_input_size(size)
        assert valid >= size and (valid - 60) % 16 == 0
        net.output_size(valid)  # accepted
    assert net.valid_input_size(572) == 572 and net.valid_input_size(573) == 588


@pytest.mark.parametrize("depth", [2, 3])
def test_same_padding_keeps_size_and_rejects_other_sides(depth):
    net = UNet(in_channels=3, width=4, depth=depth)
    assert net.border == 0 and net.multiple == 2**depth
    with torch.no_grad():
        (out,) = net(torch.randn(2, 3, 32, 48))
    assert out.shape == (2, 4, 32, 48)
    with pytest.raises(ValueError, match=rf"input width 34 px is not a multiple of {2**depth}"):
        net(torch.zeros(1, 3, 32, 34))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        net(torch.zeros(1, 1, 32, 32))


def test_bilinear_upsampling_replaces_up_convolutions():
    kwargs = dict(in_channels=1, width=4, depth=3)
    transpose, bilinear = UNet(**kwargs), UNet(upsample="bilinear", **kwargs)
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in bilinear.modules())
    assert sum(isinstance(m, nn.Upsample) for m in bilinear.modules()) == 3
    # A 2x2 up-conv has 4 c_in*c_out weights, the 1x1 conv one: the only difference in size.
    pairs = [(32, 16), (16, 8), (8, 4)]
    assert n_params(transpose) - n_params(bilinear) == sum(3 * a * b for a, b in pairs)
    with torch.no_grad():
        assert bilinear(torch.randn(1, 1, 24, 40))[0].shape == (1, 4, 24, 40)
    valid = UNet(upsample="bilinear", padding="valid", **kwargs)
    assert (
        valid.output_size(valid.valid_input_size(60))
        == valid(torch.zeros(1, 1, valid.valid_input_size(60), 92))[0].shape[-2]
    )


def test_norm_bias_and_dropout_options():
    group = UNet(width=4, depth=2, norm="group")
    assert sum(isinstance(m, nn.GroupNorm) for m in group.modules()) == 2 * 5  # two per DoubleConv
    assert all(
        m.bias is None for m in group.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
    )
    batch = UNet(width=4, depth=2, norm="batch", bias=True)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in batch.modules()) == 10
    assert all(m.bias is not None for m in batch.modules() if isinstance(m, nn.Conv2d))
    drop = UNet(width=4, depth=2, dropout=0.5)
    x = torch.randn(1, 3, 16, 16)
    drop.train()
    torch.manual_seed(0)
    a = drop(x)[0]
    b = drop(x)[0]
    assert not torch.allclose(a, b)
    drop.eval()
    assert torch.equal(drop(x)[0], drop(x)[0])
    for bad, match in [
        (dict(norm="layer"), "norm must be one of"),
        (dict(padding="full"), "padding must be"),
        (dict(upsample="nearest"), "upsample must be"),
        (dict(dropout=1.0), "dropout"),
        (dict(depth=0), "depth"),
    ]:
        with pytest.raises(ValueError, match=match):
            UNet(**bad)


def test_registered_as_unet():
    assert "unet" in list_backbones()
    net = create_backbone("unet", in_channels=2, width=4, depth=2, padding="valid")
    assert isinstance(net, UNet) and net.border == 6 * 2**2 - 4


class TinyPyramid(Backbone):
    """A stand-in encoder: maps at reductions 4 and 8, like a ResNet stem plus one stage."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 6, 3, stride=2, padding=1), nn.MaxPool2d(2))
        self.stage = nn.Conv2d(6, 10, 3, stride=2, padding=1)
        self.out_channels = [6, 10]
        self.reductions = [4, 8]

    def forward(self, images):
        c4 = self.stem(images)
        return [c4, self.stage(c4)]


def test_encoder_module_as_contracting_path():
    net = UNet(width=4, encoder=TinyPyramid(in_channels=2))
    check_contract(net)
    assert net.out_channels == [4] and net.reductions == [1] and net.multiple == 8
    # Three up-steps (8 -> 4 -> 2 -> 1); only the first finds an encoder map to concatenate.
    assert net.skip_reductions == [4, None, None]
    assert [block[0].in_channels for block in net.up_blocks] == [16 + 6, 8, 4]
    x = torch.randn(2, 2, 32, 40)
    (out,) = net(x)
    assert out.shape == (2, 4, 32, 40)
    out.mean().backward()
    assert net.encoder.stem[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="not a multiple of 8"):
        net(torch.zeros(1, 2, 36, 40))


def test_encoder_errors():
    with pytest.raises(ValueError, match="depth=3 cannot be combined"):
        UNet(depth=3, encoder=TinyPyramid())
    with pytest.raises(ValueError, match="requires padding='same'"):
        UNet(padding="valid", encoder=TinyPyramid())
    bad = TinyPyramid()
    bad.reductions = [4, 12]
    with pytest.raises(ValueError, match="power-of-two reductions"):
        UNet(encoder=bad)
    with pytest.raises(ValueError, match="never downsamples"):
        UNet(encoder="unet", encoder_kwargs=dict(width=2, depth=1))


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_resnet18_encoder_by_name(stem):
    net = create_backbone(
        "unet", in_channels=1, width=4, encoder="resnet18", encoder_kwargs=dict(width=8, stem=stem)
    )
    assert net.encoder.reductions == ([4, 8, 16, 32] if stem == "imagenet" else [1, 2, 4, 8])
    # The imagenet stem leaves reductions 2 and 1 without an encoder map; the cifar stem has them all.
    expected = [16, 8, 4, None, None] if stem == "imagenet" else [4, 2, 1]
    assert net.skip_reductions == expected and net.multiple == net.encoder.reductions[-1]
    with torch.no_grad():
        (out,) = net(torch.randn(2, 1, 32, 64))
    assert out.shape == (2, 4, 32, 64)
    with pytest.raises(ValueError, match=rf"not a multiple of {net.multiple}"):
        net(torch.zeros(1, 1, 36, 64))


@pytest.mark.slow  # importing timm alone takes ~10 s on a loaded 2-core machine
def test_timm_encoder_with_a_map_at_every_reduction_but_one():
    net = UNet(in_channels=1, width=4, encoder="timm:resnet18")
    assert net.encoder.reductions == [2, 4, 8, 16, 32]
    assert net.skip_reductions == [16, 8, 4, 2, None]
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 1, 32, 64))[0].shape == (1, 4, 32, 64)
