"""The predict fast path (``fast_predict``): a BatchNorm-folded copy of a task's networks for ``predict``.

:class:`FusedPredictCopy` holds the copy of one ``predict`` run. At the run's first batch
(:meth:`~FusedPredictCopy.swapped_in`) it copies every child network of the task holding BatchNorm
together (shared submodules stay shared), folds the ``conv -> BN`` pairs one forward shows
(:func:`~lightning_convnets.nn.fusion.runtime_conv_bn_pairs`; a pair only where the BN is the convolution
output's sole reader, :func:`conv_output_readers`), checks each network's outputs against the unfused
ones (:func:`outputs_agree`) and swaps the copies in for the body of the ``with``; the originals come back
on exit, exceptions included.
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_convnets.nn.fusion import fuse_conv_bn, runtime_conv_bn_pairs, tensor_leaves
from lightning_convnets.nn.norm import BATCHNORMS
from lightning_convnets.tasks.adapters import attached_trainer

__all__ = [
    "FOLD_TOLERANCE_EPS",
    "FastPredictHooks",
    "FusedPredictCopy",
    "build_fused_networks",
    "conv_output_readers",
    "outputs_agree",
    "swapped_children",
]

#: fast_predict's check: a folded network's outputs may differ from the unfused ones by this many units of
#: rounding (the machine epsilon of the dtype the check runs in) times each output's largest magnitude.
#: Folding changes only where rounding happens (``(w * s) @ x`` for ``s * (w @ x)``): measured 5 to 40
#: epsilons (under 5e-6 relative in float32) on the tasks' networks (the trained quickstart ResNet, ResNets,
#: U-Nets, hourglasses with BatchNorm statistics far from the identity). 1024 epsilons is 1.2e-4 relative
#: in float32; a wrong fold (a convolution whose output another layer also reads) moves outputs by percents.
FOLD_TOLERANCE_EPS = 1024
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)


def outputs_agree(got: Any, want: Any, eps: float) -> bool:
    """Whether two (nested) outputs hold the same tensors: floating ones within
    ``FOLD_TOLERANCE_EPS * eps`` times the largest magnitude of each ``want`` tensor, the others exactly.

    Example:
        >>> y = torch.tensor([1.0, 3.0])
        >>> outputs_agree([y + 1e-6], [y], torch.finfo(torch.float32).eps), outputs_agree(y + 1e-2, y, 1e-7)
        (True, False)
    """
    a, b = tensor_leaves(got), tensor_leaves(want)
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return False
            continue
        if not y.numel():
            continue
        scale = y.abs().max().clamp_min(torch.finfo(y.dtype).tiny)
        if not bool(((x - y).abs().max() <= FOLD_TOLERANCE_EPS * eps * scale).item()):
            return False
    return True


def _is_image_batch(images: Any) -> bool:
    """A 4-D image tensor, or a list of 3-D images (detection batches)."""
    if isinstance(images, Tensor):
        return images.dim() == 4
    return (
        isinstance(images, list | tuple)
        and bool(images)
        and all(isinstance(i, Tensor) and i.dim() == 3 for i in images)
    )


def _autocast_off(example: Any) -> Any:
    """A context without autocast on the example's device (the check compares in one dtype)."""
    leaves = tensor_leaves(example)
    return torch.autocast(leaves[0].device.type if leaves else "cpu", enabled=False)


def _requiring_grad(value: Any) -> Any:
    """Floating tensors of ``value`` as fresh leaves requiring grad (so that every layer has a graph
    node, frozen weights or not); copies, so that tensors made under ``inference_mode`` can enter a graph."""
    if isinstance(value, Tensor):
        return value.detach().clone().requires_grad_() if value.is_floating_point() else value.clone()
    if isinstance(value, list | tuple):
        return type(value)(_requiring_grad(v) for v in value)
    return value


@contextlib.contextmanager
def swapped_children(model: nn.Module, networks: Mapping[str, nn.Module]) -> Iterator[None]:
    """These modules in place of ``model``'s children of the same names, the originals back on exit."""
    originals = {name: getattr(model, name) for name in networks}
    try:
        for name, module in networks.items():
            setattr(model, name, module)
        yield
    finally:
        for name, module in originals.items():
            setattr(model, name, module)


def conv_output_readers(model: nn.Module, example: Any) -> dict[str, int]:
    """How many operations read each convolution's output in one forward of ``example``, counted in
    its autograd graph. A BatchNorm folds into a convolution only when it is the one reader: folding
    it into a convolution whose output another layer also reads (a pre-activation ResNet's stem feeds
    its first block's BatchNorm and its identity shortcut) would change what that layer reads."""
    produced: dict[str, Any] = {}

    def hook(name: str) -> Any:
        def record(_module: nn.Module, _args: Any, output: Any) -> None:
            if isinstance(output, Tensor) and output.grad_fn is not None:
                produced[name] = output.grad_fn

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, _CONVS)]
    try:
        with torch.inference_mode(False), torch.enable_grad():  # (predict runs in inference mode)
            outputs = model(_requiring_grad(example))
    finally:
        for handle in handles:
            handle.remove()
    readers: Counter[Any] = Counter()
    stack = [t.grad_fn for t in tensor_leaves(outputs) if t.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for parent, _ in node.next_functions:
            if parent is not None:
                readers[parent] += 1
                stack.append(parent)
    return {name: readers[node] for name, node in produced.items()}


def _network_outputs(model: nn.Module, networks: nn.ModuleDict, images: Any) -> dict[str, list[Any]]:
    """Outputs of every network in ``networks`` (each call) during one ``model(images)``."""
    outputs: dict[str, list[Any]] = {name: [] for name in networks}
    handles = [
        module.register_forward_hook(lambda _m, _a, out, name=name: outputs[name].append(out))
        for name, module in networks.items()
    ]
    try:
        model(images)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def _folding_moved(
    model: nn.Module, originals: nn.ModuleDict, fused: nn.ModuleDict, example: Any
) -> dict[str, str]:
    """``{network: dtype}`` of the networks whose folded outputs differ from the unfused ones by more
    than rounding in the dtype they run in (autocast off: mixed-precision rounding would hide a wrong fold)."""
    with _autocast_off(example):
        reference = _network_outputs(model, originals, example)
        with swapped_children(model, fused):
            got = _network_outputs(model, fused, example)
    moved = {}
    for name in originals:
        dtype = next((p.dtype for p in originals[name].parameters() if p.is_floating_point()), torch.float32)
        if not outputs_agree(got.get(name), reference.get(name), torch.finfo(dtype).eps):
            moved[name] = str(dtype).replace("torch.", "")
    return moved


@torch.no_grad()
def build_fused_networks(model: nn.Module, images: Any) -> dict[str, nn.Module]:
    """``model``'s networks (children holding BatchNorm) copied together with the ``conv -> BN`` pairs one
    forward of ``images`` shows folded, or ``{}`` when nothing folds, folding fails or a network's outputs
    moved by more than rounding allows (:data:`FOLD_TOLERANCE_EPS`; said once). The check runs on the first
    image of ``images`` (the tasks pass a tile under tiled prediction), without autocast."""
    owner = type(model).__name__
    names = [n for n, c in model.named_children() if any(isinstance(m, BATCHNORMS) for m in c.modules())]
    if not names:
        return {}
    example = images[:1]
    try:
        with _autocast_off(example):
            # first (before any inference-mode forward could leave a cached tensor the graph refuses)
            readers = conv_output_readers(model, example)
            pairs = [
                (conv, bn)
                for conv, bn in runtime_conv_bn_pairs(model, example)
                if conv.split(".", 1)[0] in names and readers.get(conv) == 1
            ]
        if not pairs:
            return {}
        originals = nn.ModuleDict({n: getattr(model, n) for n in names}).eval()  # (eval already)
        fused = fuse_conv_bn(copy.deepcopy(originals), pairs=pairs, inplace=True)
        if _is_image_batch(example):  # NHWC convolutions: the folded detector runs 1.7x faster again
            fused = fused.to(memory_format=torch.channels_last)
        moved = _folding_moved(model, originals, fused, example)
    except Exception as err:  # a network the folding cannot handle: predict runs it unfused
        rank_zero_info(
            f"{owner}: fast_predict off for this run, BatchNorm folding failed ({type(err).__name__}: {err}); "
            "predicting with the unfused networks"
        )
        return {}
    if moved:
        rank_zero_info(
            f"{owner}: fast_predict off for this run: folding BatchNorm changed the outputs of {sorted(moved)} "
            f"by more than {FOLD_TOLERANCE_EPS} x the rounding of their dtype ({moved}) relative to the "
            "outputs' scale; predicting with the unfused networks"
        )
        return {}
    return dict(fused.items())


class FusedPredictCopy:
    """The folded networks of one ``predict`` run (built at its first batch, dropped at its end).

    Example:
        >>> net = nn.Sequential()
        >>> net.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
        >>> copy_ = FusedPredictCopy()
        >>> with copy_.swapped_in(net, torch.rand(2, 3, 8, 8)):
        ...     type(net.body[1]).__name__
        'Identity'
        >>> type(net.body[1]).__name__
        'BatchNorm2d'
    """

    def __init__(self) -> None:
        self.networks: dict[str, nn.Module] | None = None

    def reset(self) -> None:
        """Drop the copy (a new run rebuilds it from the current weights)."""
        self.networks = None

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module, images: Any) -> Iterator[None]:
        """Run the body with the folded copy in place of ``model``'s networks (built on ``images`` first)."""
        if self.networks is None:
            self.networks = build_fused_networks(model, images)
        with swapped_children(model, self.networks):
            yield


class FastPredictHooks:
    """The ``fast_predict`` side of a task (mixed into :class:`~lightning_convnets.tasks.ConvNetTask`): a
    :class:`FusedPredictCopy` per ``predict`` run and the :meth:`fused_for_predict` context its
    ``predict_step`` runs in."""

    @property
    def fused_predict_copy(self) -> FusedPredictCopy:
        """The folded copy of the current ``predict`` run (empty outside one)."""
        found = self.__dict__.get("_fused_predict_copy")
        if found is None:
            found = self.__dict__["_fused_predict_copy"] = FusedPredictCopy()
        return found

    def on_predict_start(self) -> None:
        """A new ``predict`` run: the fused copy is rebuilt from the current weights at its first batch."""
        self.fused_predict_copy.reset()

    def on_predict_end(self) -> None:
        """Drop the fused copy (its memory, and any chance of it outliving the weights it was made of)."""
        self.fused_predict_copy.reset()

    @contextlib.contextmanager
    def fused_for_predict(self, images: Any) -> Iterator[None]:
        """Run the body with the BatchNorm-folded copy of the networks in place of the networks
        (``fast_predict``; only inside ``trainer.predict``, in eval mode, without ``compile``).
        ``images`` is what the task's ``forward`` takes: the first batch builds and checks the copy."""
        hp: Any = self.hparams  # type: ignore[attr-defined]
        predicting = getattr(attached_trainer(self), "predicting", False)
        if not hp.get("fast_predict", True) or self.training or not predicting or hp.get("compile"):  # type: ignore[attr-defined]
            yield
            return
        with self.fused_predict_copy.swapped_in(self, images):  # type: ignore[arg-type]
            yield
