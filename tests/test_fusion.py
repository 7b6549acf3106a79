"""fuse_conv_bn: equality with the unfused eval model for our v1 ResNet (full fusion), the pre-activation
ResNet (partial: the BN before each block's ReLU stays) and torchvision's ResNet-18; the structural rule
(conv outputs with other users, shared modules); explicit pairs for untraceable models; refusals."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_convnets.backbones import create_backbone
from lightning_convnets.nn.fusion import find_conv_bn_pairs, fuse_conv_bn


def _trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, as after training, then eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _BatchNorm) and module.running_mean is not None:
                c = module.num_features
                module.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                module.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.2)
                module.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(c, generator=gen) * 0.2)
    return model.eval()


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


def _outputs(model, x):
    out = model(x)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _assert_equal_outputs(model, fused, x):
    with torch.no_grad():
        for got, want in zip(_outputs(fused, x), _outputs(model, x), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_v1_resnet_fuses_every_bn():
    torch.manual_seed(0)
    net = _trained_like(create_backbone("resnet18", width=8))
    pairs = find_conv_bn_pairs(net)
    assert ("conv1", "bn1") in pairs and ("layer2.0.downsample.0", "layer2.0.downsample.1") in pairs
    assert len(pairs) == _bn_count(net) == 20
    fused = fuse_conv_bn(net)
    assert _bn_count(fused) == 0 and type(fused) is type(net) and fused.out_channels == net.out_channels
    assert _bn_count(net) == 20  # the original is untouched (a copy was fused)
    _assert_equal_outputs(net, fused, torch.randn(2, 3, 64, 64))


def test_preact_resnet_fuses_partially():
    torch.manual_seed(0)
    net = _trained_like(create_backbone("preact_resnet18", width=8))
    fused = fuse_conv_bn(net)
    # per block conv1 -> bn2 folds; bn1 (BN -> ReLU -> conv, after the sum) and the final BN follow no conv
    assert sorted(b for _, b in find_conv_bn_pairs(net)) == sorted(
        f"layer{s}.{i}.bn2" for s in range(1, 5) for i in range(2)
    )
    remaining = [n for n, m in fused.named_modules() if isinstance(m, _BatchNorm)]
    assert len(remaining) == 9 and "final_norm" in remaining and "layer1.0.bn1" in remaining
    _assert_equal_outputs(net, fused, torch.randn(2, 3, 64, 64))


def test_torchvision_resnet18_fuses_completely():
    torch.manual_seed(0)
    net = _trained_like(torchvision.models.resnet18(num_classes=10))
    fused = fuse_conv_bn(net).to(memory_format=torch.channels_last)
    assert _bn_count(fused) == 0
    _assert_equal_outputs(net, fused, torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last))


class TwoUsers(nn.Module):
    """A conv whose output also feeds a shortcut, a shared BN, a transposed conv, a BN without stats."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.shared = nn.BatchNorm2d(4)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.up_bn = nn.BatchNorm2d(2)
        self.conv3 = nn.Conv2d(2, 2, 1)
        self.no_stats = nn.BatchNorm2d(2, track_running_stats=False)

    def forward(self, x):
        y = self.conv(x)
        y = self.bn(y) + y  # y has two users: the BN cannot replace it
        y = self.shared(self.conv2(y))
        y = self.shared(y)  # called twice: folding it once would change the second call
        y = self.up_bn(self.up(y))
        return self.no_stats(self.conv3(y))


def test_structural_rule_skips_what_cannot_fold():
    torch.manual_seed(0)
    model = _trained_like(TwoUsers())
    assert find_conv_bn_pairs(model) == [("up", "up_bn")]  # the transposed conv folds too
    fused = fuse_conv_bn(model)
    assert isinstance(fused.up_bn, nn.Identity) and isinstance(fused.bn, nn.BatchNorm2d)
    _assert_equal_outputs(model, fused, torch.randn(2, 3, 8, 8))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.bn(self.conv(x))


def test_untraceable_model_needs_explicit_pairs():
    model = _trained_like(Untraceable())
    with pytest.raises(TypeError, match=r"cannot trace Untraceable.*pairs="):
        fuse_conv_bn(model)
    fused = fuse_conv_bn(model, pairs=[("conv", "bn")])
    _assert_equal_outputs(model, fused, torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="'bn' is a BatchNorm2d, not a convolution"):
        fuse_conv_bn(model, pairs=[("bn", "conv")])
    with pytest.raises(ValueError, match="names no submodule"):
        fuse_conv_bn(model, pairs=[("conv", "missing")])


def test_refuses_a_model_in_training_mode():
    net = create_backbone("resnet18", width=8)
    with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
        fuse_conv_bn(net)
    net.eval()
    net.layer1[0].bn1.train()  # one stray training-mode submodule is enough to refuse
    with pytest.raises(ValueError, match=r"layer1\.0\.bn1"):
        fuse_conv_bn(net)


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, nn.SyncBatchNorm])
def test_inplace_fuses_the_model_itself(norm):
    net = _trained_like(nn.Sequential(nn.Conv2d(3, 4, 3), norm(4), nn.ReLU()))
    x = torch.randn(1, 3, 8, 8)
    expected = net(x)
    assert fuse_conv_bn(net, inplace=True) is net and isinstance(net[1], nn.Identity)
    torch.testing.assert_close(net(x), expected, rtol=1e-4, atol=1e-5)
