"""Fold each BatchNorm into the convolution before it (at inference BN is a per-channel affine map).

Start with :func:`fuse_conv_bn` (the model, fused) and :func:`find_conv_bn_pairs` (which pairs fold).
The algebra, the structural rule for a pair, and what fuses in post- and pre-activation ResNets are in
``docs/fusion.md``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from copy import deepcopy
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from lightning_convnets.nn.norm import BATCHNORMS

__all__ = [
    "find_conv_bn_pairs",
    "fuse_conv_bn",
    "fuse_for_inference",
    "runtime_conv_bn_pairs",
    "same_outputs",
    "tensor_leaves",
]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _check_pair(model: nn.Module, conv_name: str, bn_name: str) -> str | None:
    """Why ``(conv_name, bn_name)`` cannot fold, or ``None`` when it can."""
    conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
    if not isinstance(conv, _CONVS + _TRANSPOSED):
        return f"{conv_name!r} is a {type(conv).__name__}, not a convolution"
    if not isinstance(bn, BATCHNORMS):
        return f"{bn_name!r} is a {type(bn).__name__}, not a BatchNorm"
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return f"{bn_name!r} has no running statistics (track_running_stats=False): it is not linear in eval"
    if bn.num_features != conv.out_channels:
        return f"{bn_name!r} has {bn.num_features} channels but {conv_name!r} outputs {conv.out_channels}"
    return None


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """The ``(conv, bn)`` module-name pairs of ``model`` that fold (the rule in the module docstring).

    Args:
        model: any module torch.fx can trace symbolically.

    Returns:
        The pairs in graph order.

    Raises:
        TypeError: when torch.fx cannot trace ``model`` (name the pairs for :func:`fuse_conv_bn` instead).

    Example:
        >>> from torch import nn
        >>> find_conv_bn_pairs(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
        [('0', '1')]
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as err:  # fx raises several types (TraceError, TypeError, NotImplementedError...)
        raise TypeError(
            f"fuse_conv_bn: torch.fx cannot trace {type(model).__name__} ({type(err).__name__}: {err}); "
            "pass pairs=[('conv_name', 'bn_name'), ...] to name the conv -> BN pairs explicitly"
        ) from err
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), BATCHNORMS):
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if not isinstance(source, torch.fx.Node) or source.op != "call_module":
            continue
        if not isinstance(modules.get(source.target), _CONVS + _TRANSPOSED):
            continue
        if len(source.users) != 1 or calls[source.target] != 1 or calls[node.target] != 1:
            continue
        if _check_pair(model, source.target, node.target) is None:
            pairs.append((str(source.target), str(node.target)))
    return pairs


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


def fuse_conv_bn(
    model: nn.Module, pairs: Sequence[tuple[str, str]] | None = None, inplace: bool = False
) -> nn.Module:
    """An eval-mode copy of ``model`` with every BN that directly follows a convolution folded into it.

    Outputs equal those of the unfused model in eval mode up to float rounding (about 1e-6 relative in
    fp32). BNs that follow no convolution stay: for pre-activation ResNets (and any ``BN -> ReLU -> conv``
    design) fusion is partial, see the module docstring. Fused BNs become :class:`torch.nn.Identity`, so
    the model's class, attributes and ``forward`` are kept.

    Args:
        model: the model, already in eval mode (``model.eval()``): fusion freezes the running statistics,
            which only an eval-mode model uses.
        pairs: explicit ``(conv_name, bn_name)`` pairs (qualified module names) for models torch.fx cannot
            trace; default: found with :func:`find_conv_bn_pairs`. Named pairs must really be adjacent
            (the conv output used only by that BN): only types and channel counts are checked.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The fused model (in eval mode).

    Raises:
        ValueError: when ``model`` (or any submodule) is in training mode, or a named pair is invalid.
        TypeError: when torch.fx cannot trace ``model`` and no ``pairs`` are given.

    Example:
        >>> import torch
        >>> from lightning_convnets.backbones import create_backbone
        >>> net = create_backbone("resnet18", width=8).eval()
        >>> fused = fuse_conv_bn(net)
        >>> sum(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
        0
        >>> x = torch.randn(2, 3, 64, 64)
        >>> torch.allclose(fused(x)[-1], net(x)[-1], atol=1e-4)
        True
    """
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            f"fuse_conv_bn: the model is in training mode ({len(training)} modules, e.g. {training[:3]}); "
            "BN folds its running statistics, which only eval mode uses: call model.eval() first"
        )
    if pairs is None:
        pairs = find_conv_bn_pairs(model)
    else:
        pairs = [tuple(p) for p in pairs]
        for pair in pairs:
            if len(pair) != 2:
                raise ValueError(f"fuse_conv_bn: pairs entries must be (conv_name, bn_name), got {pair!r}")
            try:
                problem = _check_pair(model, *pair)
            except AttributeError as err:
                raise ValueError(
                    f"fuse_conv_bn: pair {pair!r} names no submodule of the model: {err}"
                ) from err
            if problem is not None:
                raise ValueError(f"fuse_conv_bn: pair {pair!r} cannot fold: {problem}")
    fused = model if inplace else deepcopy(model)
    for conv_name, bn_name in pairs:
        conv, bn = fused.get_submodule(conv_name), fused.get_submodule(bn_name)
        folded = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, _TRANSPOSED))
        _set_submodule(fused, conv_name, folded)
        _set_submodule(fused, bn_name, nn.Identity())
    return fused.eval()


def tensor_leaves(output: Any) -> list[Tensor]:
    """The tensors of a (nested) output: a tensor, or dicts, lists and tuples of them, in order.

    Example:
        >>> [t.tolist() for t in tensor_leaves({"a": [torch.zeros(1), (torch.ones(1), "x")]})]
        [[0.0], [1.0]]
    """
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for v in output.values() for t in tensor_leaves(v)]
    if isinstance(output, list | tuple):
        return [t for v in output for t in tensor_leaves(v)]
    return []


def same_outputs(a: Any, b: Any, tol: float) -> bool:
    """Whether two (nested) outputs have the same tensors: floating ones within ``tol`` relative to the
    largest magnitude of ``b`` (at least 1), the others exactly."""
    return _same(a, b, tol)


def _same(a: Any, b: Any, tol: float) -> bool:
    la, lb = tensor_leaves(a), tensor_leaves(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if x.shape != y.shape:
            return False
        if x.is_floating_point():
            scale = max(1.0, float(y.abs().max())) if y.numel() else 1.0
            if not torch.allclose(x, y, rtol=0, atol=tol * scale):
                return False
        elif not torch.equal(x, y):
            return False
    return True


def runtime_conv_bn_pairs(model: nn.Module, example: Tensor) -> list[tuple[str, str]]:
    """``(conv, bn)`` pairs seen in one forward pass: the BN's input is the very tensor the conv returned,
    and each module runs once (models torch.fx cannot trace; outputs are checked afterwards)."""
    names = {m: n for n, m in model.named_modules()}
    calls: Counter[str] = Counter()
    produced: dict[int, tuple[str, Tensor]] = {}
    candidates: list[tuple[str, str]] = []
    handles = []

    def conv_hook(module: nn.Module, args: Any, output: Any) -> None:
        calls[names[module]] += 1
        if isinstance(output, Tensor):
            produced[id(output)] = (names[module], output)

    def bn_pre_hook(module: nn.Module, args: Any) -> None:
        calls[names[module]] += 1
        if args and isinstance(args[0], Tensor):
            source = produced.get(id(args[0]))
            if source is not None and source[1] is args[0]:
                candidates.append((source[0], names[module]))

    for module, _name in names.items():
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, BATCHNORMS):
            handles.append(module.register_forward_pre_hook(bn_pre_hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return [(c, b) for c, b in candidates if calls[c] == 1 and calls[b] == 1]


def fuse_for_inference(model: nn.Module, example: Tensor, tol: float = 1e-5) -> tuple[nn.Module, int]:
    """Fold every ``conv -> BatchNorm`` pair of an eval-mode ``model`` and check the outputs did not move.

    Pairs come from :func:`lightning_convnets.nn.fusion.find_conv_bn_pairs` (torch.fx) when the model
    traces, else from one forward pass on ``example`` (the BN's input is the conv's output tensor, each
    module called once). Each fold is then verified on ``example``: a pair whose fold changes the outputs
    by more than ``tol`` (relative to their largest magnitude) is left unfused.

    Args:
        model: an eval-mode module (not modified: a fused copy is returned).
        example: an input batch.
        tol: largest output change allowed, relative.

    Returns:
        ``(fused_model, number_of_folded_pairs)``.
    """
    try:
        pairs = find_conv_bn_pairs(model)
    except TypeError:
        pairs = runtime_conv_bn_pairs(model, example)
    if not pairs:
        return model, 0
    with torch.no_grad():
        reference = model(example)
        fused = fuse_conv_bn(model, pairs=pairs)
        if _same(fused(example), reference, tol):
            return fused, len(pairs)
        # Some named pair was not a pure conv -> BN chain (the conv output also feeds something else).
        kept = [p for p in pairs if _same(fuse_conv_bn(model, pairs=[p])(example), reference, tol)]
        fused = fuse_conv_bn(model, pairs=kept)
        if not _same(fused(example), reference, tol):
            return model, 0
    return fused, len(kept)
