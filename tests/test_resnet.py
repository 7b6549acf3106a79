"""ResNet family: shapes and strides, torchvision parity (parameter counts, state dict, outputs), the
seed's 18C^2 + 4C block count, the plain twin, the stem adaptation, norms and zero init."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torchvision
from torch import nn

from lightning_convnets.backbones import check_contract, create_backbone, list_backbones
from lightning_convnets.backbones.resnet import (
    BasicBlock,
    Bottleneck,
    PreActBasicBlock,
    PreActBottleneck,
    ResNet,
    adapt_stem_weight,
    load_torchvision_state_dict,
    weights_normalization,
)
from lightning_convnets.nn import ResidualAdd

RESNET_NAMES = [f"resnet{d}" for d in (18, 34, 50, 101, 152, 200)]
PREACT_NAMES = [f"preact_{n}" for n in RESNET_NAMES]
BLOCKS = (BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convs spend more time in thread hand-offs than in arithmetic, badly so on a shared machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_every_family_member_is_registered():
    # Equality, so a depth registered later must join the shape test below.
    family = {n for n in list_backbones() if n.startswith(("resnet", "preact_resnet"))}
    assert family == set(RESNET_NAMES + PREACT_NAMES)


@pytest.mark.parametrize("name", RESNET_NAMES + PREACT_NAMES)
@pytest.mark.parametrize("stem,reductions", [("imagenet", [4, 8, 16, 32]), ("cifar", [1, 2, 4, 8])])
def test_shapes_and_strides_at_width_8(name, stem, reductions):
    torch.manual_seed(0)
    net = create_backbone(name, width=8, stem=stem)
    check_contract(net)
    expansion = 4 if any(d in name for d in ("50", "101", "152", "200")) else 1
    assert net.out_channels == [8 * expansion * m for m in (1, 2, 4, 8)]
    assert net.reductions == reductions
    with torch.no_grad():
        features = net(torch.randn(2, 3, 32, 32))
    assert len(features) == 4
    for f, c, r in zip(features, net.out_channels, net.reductions):
        assert f.shape == (2, c, 32 // r, 32 // r)
        assert torch.isfinite(f).all()
    if name.startswith("preact"):
        # v2 ends with BN-ReLU: the last map is non-negative and normalised.
        assert (features[-1] >= 0).all()
        assert isinstance(net.final_norm, nn.BatchNorm2d)


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_parameter_count_matches_torchvision(depth):
    # Meta tensors: shapes and counts without allocating or initialising 60M weights.
    with torch.device("meta"):
        ours = create_backbone(f"resnet{depth}")
        theirs = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    classifier = ours.out_channels[-1] * 1000 + 1000
    assert n_params(ours) + classifier == n_params(theirs)
    # Identical names and shapes: the state dict maps one to one.
    their_shapes = {k: v.shape for k, v in theirs.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == their_shapes
    if depth == 50:
        assert n_params(ours) + classifier == 25_557_032


@pytest.mark.parametrize("channels", [1, 8, 64, 256])
def test_basic_block_has_18c2_plus_4c_parameters(channels):
    block = BasicBlock(channels, channels)
    assert block.downsample is None
    assert n_params(block) == 18 * channels**2 + 4 * channels


def _projection_params(net: ResNet) -> int:
    """Count the projection shortcuts from the architecture: one per stage whose first block changes
    the channel count or stride, a 1x1 conv (Cin*Cout) plus, for v1, a norm (2*Cout)."""
    total = 0
    channels = net.conv1.out_channels
    for index, out in enumerate(net.out_channels):
        stride = 1 if index == 0 else 2
        if stride != 1 or channels != out:
            total += channels * out + (0 if net.preact else 2 * out)
        channels = out
    return total


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "preact_resnet34", "preact_resnet101"])
def test_plain_twin_drops_exactly_the_projection_shortcuts(name):
    with torch.device("meta"):
        residual = create_backbone(name)
        plain = create_backbone(name, skip=False)
    projections = _projection_params(residual)
    assert projections == sum(
        n_params(m.downsample) for m in residual.modules() if isinstance(m, BLOCKS) and m.downsample
    )
    assert n_params(plain) == n_params(residual) - projections
    if name == "resnet18":
        # Layers 2-4 project 64->128, 128->256, 256->512 with conv + BN.
        assert projections == (64 * 128 + 256) + (128 * 256 + 512) + (256 * 512 + 1024)
    assert not any(isinstance(m, ResidualAdd) for m in plain.modules())
    assert not any(getattr(m, "downsample", None) is not None for m in plain.modules())
    blocks = [m for m in residual.modules() if isinstance(m, BLOCKS)]
    assert sum(isinstance(m, ResidualAdd) for m in residual.modules()) == len(blocks)


def test_plain_twin_output_ignores_the_shortcut():
    torch.manual_seed(0)
    block = PreActBasicBlock(4, 4, skip=False).eval()
    x = torch.randn(1, 4, 8, 8)
    pre = block.relu(block.bn1(x))
    expected = block.conv2(block.relu(block.bn2(block.conv1(pre))))
    assert torch.equal(block(x), expected)


def test_residual_add_hook_sees_shortcut_and_branch():
    torch.manual_seed(0)
    net = create_backbone("preact_resnet18", width=4, stem="cifar")
    seen = []
    net.layer1[0].add.register_forward_hook(lambda m, inputs, out: seen.append((inputs, out)))
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        net(x)
        stem = net.forward_stem(x)
    (shortcut, branch), out = seen[0]
    assert torch.equal(shortcut + branch, out)
    # layer1's first pre-act block keeps the channels: its shortcut is the linear stem output itself.
    assert torch.equal(shortcut, stem)
    assert branch.shape == (1, 4, 16, 16) and not torch.equal(branch, torch.zeros_like(branch))


def _randomized_torchvision(arch: str) -> nn.Module:
    """A torchvision ResNet with random weights and non-trivial BN statistics (so stats must map too)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _torchvision_stages(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = stage(x)
        out.append(x)
    return out


@pytest.mark.parametrize("arch,size", [("resnet18", 64), ("resnet50", 32)])
def test_torchvision_state_dict_gives_identical_outputs(arch, size):
    theirs = _randomized_torchvision(arch)
    ours = create_backbone(arch).eval()
    state = theirs.state_dict()
    # The names are identical: besides fc, a strict load needs no mapping at all.
    ours.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=True)
    fresh = create_backbone(arch).eval()
    load_torchvision_state_dict(fresh, state)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = _torchvision_stages(theirs, x)
        for model in (ours, fresh):
            got = model(x)
            for a, b in zip(got, expected):
                assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_stem_adaptation_for_grayscale_and_multispectral():
    theirs = _randomized_torchvision("resnet18")
    state = theirs.state_dict()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        gray = torch.randn(1, 1, 64, 64)
        mono = load_torchvision_state_dict(create_backbone("resnet18", in_channels=1).eval(), state)
        assert torch.allclose(mono.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
        # Summed RGB kernels on a gray image == the RGB network on that image repeated three times.
        assert torch.allclose(
            mono(gray)[-1], _torchvision_stages(theirs, gray.repeat(1, 3, 1, 1))[-1], atol=1e-4
        )

        six = load_torchvision_state_dict(create_backbone("resnet18", in_channels=6).eval(), state)
        assert six.conv1.weight.shape == (64, 6, 7, 7)
        # Repeat-and-rescale: the RGB image stacked twice gives the RGB network's response.
        assert torch.allclose(six(torch.cat([x, x], 1))[-1], _torchvision_stages(theirs, x)[-1], atol=1e-4)

    two = adapt_stem_weight(state["conv1.weight"], 2)
    assert torch.allclose(two, state["conv1.weight"][:, :2] * 1.5)
    with pytest.raises(ValueError, match="conv kernel"):
        adapt_stem_weight(torch.zeros(8, 3, 7), 1)


def test_normalization_constants_follow_the_stem_adaptation():
    rgb = weights_normalization("resnet50", "IMAGENET1K_V2")
    assert rgb == {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    gray = weights_normalization("resnet18", "DEFAULT", in_channels=1)
    assert gray["mean"] == pytest.approx((sum(rgb["mean"]) / 3,))
    assert weights_normalization("resnet18", in_channels=4)["std"] == (0.229, 0.224, 0.225, 0.229)
    assert create_backbone("resnet18", width=8).normalization is None


def test_weights_option_loads_through_the_torchvision_enum(monkeypatch):
    """The ``weights=`` path end to end, with torchvision's download replaced by a random state dict."""
    from torchvision.models._api import WeightsEnum

    theirs = _randomized_torchvision("resnet18")
    requested = []

    def fake_download(self, *args, **kwargs):
        requested.append(str(self))
        return theirs.state_dict()

    monkeypatch.setattr(WeightsEnum, "get_state_dict", fake_download)
    net = create_backbone("resnet18", weights="DEFAULT", in_channels=1).eval()
    assert requested == ["ResNet18_Weights.IMAGENET1K_V1"]
    assert net.weights == "ResNet18_Weights.IMAGENET1K_V1"
    assert net.normalization == weights_normalization("resnet18", "IMAGENET1K_V1", in_channels=1)
    assert torch.allclose(net.conv1.weight, theirs.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(net.layer4[1].bn2.running_var, theirs.layer4[1].bn2.running_var)


def test_weights_option_fails_fast_without_downloading():
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        create_backbone("resnet18", weights="IMAGENET21K")
    with pytest.raises(ValueError, match="only for"):
        create_backbone("preact_resnet18", width=8, weights="DEFAULT")
    with pytest.raises(ValueError, match="width=64"):
        create_backbone("resnet18", width=8, weights="DEFAULT")
    with pytest.raises(ValueError, match="stem='imagenet'"):
        create_backbone("resnet18", stem="cifar", weights="DEFAULT")
    with pytest.raises(ValueError, match="depth"):
        load_torchvision_state_dict(
            create_backbone("resnet34"), _randomized_torchvision("resnet18").state_dict()
        )


def test_group_and_no_norm():
    group = create_backbone("resnet50", width=8, norm="group")
    norms = [m for m in group.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and not any(isinstance(m, nn.BatchNorm2d) for m in group.modules())
    # 32 groups where the channels allow it, fewer (gcd) on narrow layers.
    assert {(m.num_channels, m.num_groups) for m in norms} >= {(8, 8), (256, 32)}

    plain = create_backbone("preact_resnet18", width=8, norm="none")
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in plain.modules())
    convs = [m for m in plain.modules() if isinstance(m, nn.Conv2d)]
    # Without a norm to shift activations, every conv carries its own (zero-initialised) bias.
    assert all(c.bias is not None and not c.bias.any() for c in convs)
    for net in (group, plain):
        features = net(torch.randn(2, 3, 32, 32))
        assert [f.shape[1] for f in features] == net.out_channels


def test_he_init_doubles_variance_per_block_without_norm():
    torch.manual_seed(0)
    net = create_backbone("preact_resnet18", width=32, stem="cifar", norm="none")
    ratios = []
    for block in (net.layer1[0], net.layer1[1]):
        block.add.register_forward_hook(
            lambda m, inputs, out: ratios.append((out.var() / inputs[0].var()).item())
        )
    with torch.no_grad():
        net(torch.randn(16, 3, 16, 16))
    # Var(x + F(x)) = Var(x) + Var(F(x)) with Var(F(x)) ~ Var(x) under He (fan_in) init.
    assert all(1.5 < r < 2.6 for r in ratios), ratios


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "preact_resnet18", "preact_resnet50"])
def test_zero_init_residual(name):
    torch.manual_seed(0)
    net = create_backbone(name, width=8, stem="cifar", zero_init_residual=True).eval()
    blocks = [m for m in net.modules() if isinstance(m, BLOCKS)]
    for block in blocks:
        if isinstance(block, BasicBlock):
            assert not block.bn2.weight.any() and block.bn1.weight.all()
        elif isinstance(block, Bottleneck):
            assert not block.bn3.weight.any() and block.bn2.weight.all()
        else:
            last = block.conv2 if isinstance(block, PreActBasicBlock) else block.conv3
            assert not last.weight.any() and block.conv1.weight.any()
    # A block without projection starts as the identity (v2) or relu of it (v1).
    block = net.layer2[1]
    x = torch.randn(1, block.conv1.in_channels, 8, 8)
    with torch.no_grad():
        assert torch.equal(block(x), x if net.preact else torch.relu(x))
    with pytest.raises(ValueError, match="skip=False"):
        create_backbone(name, width=8, skip=False, zero_init_residual=True)


def test_stages_view_and_torchvision_names():
    net = create_backbone("resnet18", width=8)
    assert net.stages == (net.layer1, net.layer2, net.layer3, net.layer4)
    keys = set(net.state_dict())
    assert not any(k.startswith("stages") for k in keys)
    assert {
        "conv1.weight",
        "bn1.running_var",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.bias",
    } <= keys
    preact = create_backbone("preact_resnet50", width=8)
    assert "bn1.weight" not in set(preact.state_dict())  # v2's stem is a bare conv
    assert "final_norm.weight" in set(preact.state_dict())
    assert "layer1.0.downsample.1.weight" not in set(preact.state_dict())  # projection is a bare conv


@pytest.mark.parametrize("name", ["resnet50", "preact_resnet18"])
def test_symbolic_trace_keeps_outputs_and_input_check(name):
    # torch.fx is what BN fusion and torchvision's feature extractors build on.
    net = create_backbone(name, width=4, stem="cifar").eval()
    traced = torch.fx.symbolic_trace(net)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        for a, b in zip(traced(x), net(x)):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        traced(torch.zeros(1, 16, 16))


def test_bad_arguments_name_the_argument():
    with pytest.raises(KeyError, match="resnet18"):
        create_backbone("resnet81")
    with pytest.raises(ValueError, match="stem"):
        create_backbone("resnet18", stem="tiny")
    with pytest.raises(ValueError, match="norm"):
        create_backbone("resnet18", norm="layer")
    with pytest.raises(ValueError, match="width"):
        create_backbone("resnet18", width=0)
    with pytest.raises(ValueError, match="layers"):
        ResNet(BasicBlock, (2, 2, 2))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        create_backbone("resnet18", width=4, in_channels=1)(torch.zeros(1, 3, 32, 32))
