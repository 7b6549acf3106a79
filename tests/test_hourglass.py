"""Stacked hourglass backbone: shapes per stack, stack/order options, residual sums, merges, errors."""

import pytest
import torch
from torch import nn

from lightning_convnets.backbones import check_contract, create_backbone, list_backbones
from lightning_convnets.backbones.hourglass import Hourglass, ResidualModule, StackedHourglass
from lightning_convnets.nn import ResidualAdd


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_256_input_gives_one_64_map_per_stack():
    net = StackedHourglass(width=8)  # defaults: order 4, two stacks
    check_contract(net)
    assert net.dense and net.out_channels == [8, 8] and net.reductions == [4, 4]
    with torch.no_grad():
        maps = net(torch.randn(1, 3, 256, 256))
    assert [tuple(m.shape) for m in maps] == [(1, 8, 64, 64)] * 2


@pytest.mark.parametrize(
    ("name", "kwargs", "stacks"),
    [
        ("hourglass_stack1", {}, 1),
        ("hourglass", {"num_stacks": 3}, 3),
        ("hourglass_stack2", {}, 2),
    ],
)
def test_stack_count(name, kwargs, stacks):
    assert name in list_backbones()
    net = create_backbone(name, in_channels=1, width=8, order=2, **kwargs)
    assert isinstance(net, StackedHourglass)
    assert len(net.hourglasses) == stacks and len(net.merge) == stacks - 1
    assert net.out_channels == [8] * stacks and net.reductions == [4] * stacks
    with torch.no_grad():
        maps = net(torch.randn(2, 1, 32, 48))
    assert [tuple(m.shape) for m in maps] == [(2, 8, 8, 12)] * stacks
    assert net.output_size((32, 48)) == (8, 12)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_order_sets_poolings_and_input_multiple(order):
    hourglass = Hourglass(order, channels=8)
    assert sum(isinstance(m, nn.MaxPool2d) for m in hourglass.modules()) == order
    # Per level: skip, down and after residual modules; one more at the bottom.
    assert sum(isinstance(m, ResidualModule) for m in hourglass.modules()) == 3 * order + 1
    net = StackedHourglass(num_stacks=1, order=order, width=8)
    side = 4 * 2**order
    assert net.multiple == side
    with torch.no_grad():
        assert net(torch.randn(1, 3, side, 2 * side))[0].shape[-2:] == (side // 4, side // 2)
    with pytest.raises(ValueError, match=rf"input width {side + 4} px is not a multiple of {side}"):
        net(torch.zeros(1, 3, side, side + 4))


def test_size_and_option_errors():
    net = StackedHourglass(width=8)
    with pytest.raises(
        ValueError, match=r"order=4\): input height 100 px is not a multiple of 64.*64 or 128"
    ):
        net(torch.zeros(1, 3, 100, 64))
    with pytest.raises(ValueError, match=r"input height 32 px.*use 64"):
        net(torch.zeros(1, 3, 32, 64))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        net(torch.zeros(1, 1, 64, 64))
    for bad, match in [
        ({"num_stacks": 0}, "num_stacks must be an int >= 1"),
        ({"order": 0}, "order must be an int >= 1"),
        ({"width": 2}, "width must be an int >= 4"),
        ({"norm": "layer"}, "norm must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            StackedHourglass(**bad)


@pytest.mark.parametrize("channels", [8, 256])
def test_residual_module_is_the_papers_bottleneck(channels):
    half = channels // 2
    module = ResidualModule(channels, channels)
    convs = channels * half + half + 9 * half * half + half + half * channels + channels
    norms = 2 * channels + 2 * half + 2 * half
    assert n_params(module) == convs + norms
    assert isinstance(module.shortcut, nn.Identity)
    assert isinstance(ResidualModule(4, 8).shortcut, nn.Conv2d)


def test_residual_sums_go_through_residual_add_and_keep_the_input():
    module = ResidualModule(8, 8, norm="none")
    seen = []
    module.add.register_forward_hook(lambda m, args, out: seen.append((args, out)))
    x = torch.randn(2, 8, 6, 6)
    x_before = x.clone()
    out = module(x)
    (shortcut, branch), hooked = seen[0]
    assert torch.equal(x, x_before), "an in-place op corrupted the shortcut"
    assert torch.equal(shortcut, x) and torch.allclose(branch, module.branch(x_before))
    assert torch.allclose(out, x + branch) and hooked is out
    order, stacks = 2, 2
    net = StackedHourglass(num_stacks=stacks, order=order, width=8)
    per_hourglass = (3 * order + 1) + order  # residual modules + up/skip merges
    expected = 3 + stacks * (per_hourglass + 1) + (stacks - 1)  # stem, hourglass + post module, merges
    assert sum(isinstance(m, ResidualAdd) for m in net.modules()) == expected


def test_stacks_are_merged_back_and_first_stack_ignores_the_merge():
    torch.manual_seed(0)
    net = StackedHourglass(num_stacks=2, order=2, width=8, merge_channels=3)
    assert net.merge_remap[0][0].out_channels == 3
    maps = net(torch.randn(2, 3, 32, 32))
    maps[0].sum().backward(retain_graph=True)
    assert net.merge_features[0].weight.grad is None
    maps[1].sum().backward()
    assert net.merge_features[0].weight.grad.abs().sum() > 0
    assert net.merge_remap[0][0].weight.grad.abs().sum() > 0
    assert net.hourglasses[0].skip[0].branch[2].weight.grad.abs().sum() > 0
