"""Export a trained task for deployment: ONNX (run by onnxruntime) or a ``torch.export`` program.

:func:`export_model` exports the eval-mode network with BatchNorm folded into the convolutions, one
input ``images``, dynamic batch (and height/width where the network allows); :func:`export_cli` is the
``lightning-convnets export`` subcommand. Outputs per task, formats and metadata: ``docs/export.md``.

Example (not run as a doctest: it writes a file and needs onnx; ``tests/test_export.py`` runs it):
    >>> from lightning_convnets import ImageClassifier
    >>> task = ImageClassifier("resnet18", num_classes=3, backbone_kwargs={"width": 8})  # doctest: +SKIP
    >>> export_model(task, "onnx", torch.randn(2, 3, 64, 64), "classifier.onnx")  # doctest: +SKIP
    PosixPath('classifier.onnx')
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_convnets.nn.fusion import _same, fuse_for_inference

__all__ = [
    "DEFAULT_OPSET",
    "FORMATS",
    "ExportError",
    "default_example",
    "export_model",
    "fuse_for_inference",
    "inference_module",
    "onnx_runner",
    "read_metadata",
    "same_detections",
]

FORMATS = ("onnx", "torch_export")
#: ONNX opset of the exported files (onnxruntime >= 1.14 runs it).
DEFAULT_OPSET = 18
_SUFFIX = {"onnx": ".onnx", "torch_export": ".pt2"}


class ExportError(RuntimeError):
    """The model cannot be exported in the asked format (the message says what is supported)."""


# ---------------------------------------------------------------------------------------- graphs
class ClassifierGraph(nn.Module):
    """``images -> logits [N, num_classes]`` of an :class:`~lightning_convnets.ImageClassifier`."""

    output_names = ("logits",)

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images)[-1])


class SegmenterGraph(nn.Module):
    """``images -> logits [N, K, H, W]`` of a :class:`~lightning_convnets.SemanticSegmenter` (last map)."""

    output_names = ("logits",)

    def __init__(
        self,
        backbone: nn.Module,
        decoder: nn.Module | None,
        heads: nn.ModuleList,
        border: int,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.heads = heads
        self.border = border
        reductions = list(getattr(backbone, "reductions", [1]))
        finest = min(reductions)
        self._maps = [i for i, r in enumerate(reductions) if r == finest]

    def forward(self, images: Tensor) -> Tensor:
        if self.decoder is not None:
            maps = list(self.decoder(images))
        else:
            features = self.backbone(images)
            maps = [features[i] for i in self._maps]
        last = min(len(self.heads), len(maps)) - 1
        logits = self.heads[last](maps[last])
        if self.border == 0 and logits.shape[-2:] != images.shape[-2:]:
            logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits


class CenterNetGraph(nn.Module):
    """``images -> (boxes, scores, labels)`` of a CenterNet :class:`~lightning_convnets.ObjectDetector`.

    The decoding of :func:`lightning_convnets.nn.centernet.decode_detections` without the per-image
    threshold (a fixed ``top_k`` per image keeps the outputs rectangular): sigmoid, 3x3 max-pool peaks,
    top-K over classes and cells, centre + offset +- size / 2, times the stride, clipped to the image.
    """

    output_names = ("boxes", "scores", "labels")

    def __init__(self, detector: nn.Module, stride: int, top_k: int) -> None:
        super().__init__()
        self.detector = detector
        self.stride = int(stride)
        self.top_k = int(top_k)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.detector(images)[-1]
        heatmap, size, offset = out["heatmap"], out["size"], out["offset"]
        batch, _, height, width = heatmap.shape
        prob = torch.sigmoid(heatmap.float())
        peaks = prob * (F.max_pool2d(prob, 3, stride=1, padding=1) == prob).to(prob.dtype)
        scores, flat = peaks.reshape(batch, -1).topk(self.top_k, dim=1)
        cells = height * width
        labels = torch.div(flat, cells, rounding_mode="floor")
        cell = flat - labels * cells
        ys = torch.div(cell, width, rounding_mode="floor")
        xs = cell - ys * width
        index = cell.unsqueeze(1).expand(batch, 2, self.top_k)
        wh = size.float().reshape(batch, 2, -1).gather(2, index)
        off = offset.float().reshape(batch, 2, -1).gather(2, index)
        cx = xs.to(prob.dtype) + off[:, 0]
        cy = ys.to(prob.dtype) + off[:, 1]
        half_w = wh[:, 0].clamp(min=0) / 2
        half_h = wh[:, 1].clamp(min=0) / 2
        boxes = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1) * self.stride
        # Clip to the image (its height and width may be symbolic: no Python float of them).
        x = boxes[..., 0::2].clamp(min=0)
        y = boxes[..., 1::2].clamp(min=0)
        x = torch.minimum(x, torch.ones_like(x) * images.shape[-1])
        y = torch.minimum(y, torch.ones_like(y) * images.shape[-2])
        boxes = torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)
        return boxes, scores, labels


class TorchvisionGraph(nn.Module):
    """``images -> (boxes, scores, labels)`` lists of a torchvision detector (0-based labels)."""

    output_names = ("detections",)

    def __init__(self, detector: nn.Module, label_shift: int) -> None:
        super().__init__()
        self.detector = detector
        self.label_shift = label_shift

    def forward(self, images: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        detections = self.detector(list(images.unbind(0)))
        return [(d["boxes"], d["scores"], d["labels"] - self.label_shift) for d in detections]


# ------------------------------------------------------------------------------------ building
def _uncompile(module: nn.Module) -> nn.Module:
    # nn.Module.compile() keeps the compiled call in _compiled_call_impl: exports trace the eager one.
    for m in module.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    return module


def inference_module(task: nn.Module) -> nn.Module:
    """An eval-mode, CPU, float32, uncompiled copy of ``task``'s network as a one-input graph module.

    The copy holds only the network (no metrics, no loss), and its output is what :func:`export_model`
    exports (see the module docstring). BatchNorm is not fused yet (:func:`fuse_for_inference` does).

    Args:
        task: an ``ImageClassifier``, ``SemanticSegmenter`` or ``ObjectDetector`` with its head built
            (``num_classes`` known).

    Raises:
        TypeError: for another kind of module.
        ValueError: when the task's head is not built yet.
    """
    from lightning_convnets.tasks.classification import ImageClassifier
    from lightning_convnets.tasks.detection import ObjectDetector
    from lightning_convnets.tasks.segmentation import SemanticSegmenter

    if not isinstance(task, ImageClassifier | SemanticSegmenter | ObjectDetector):
        raise TypeError(
            "export: task must be an ImageClassifier, SemanticSegmenter or ObjectDetector, got "
            f"{type(task).__name__}"
        )
    if getattr(task, "num_classes", None) is None:
        raise ValueError(
            f"export: this {type(task).__name__} has no head yet (num_classes unknown): load it from a "
            "checkpoint or build it with num_classes=..."
        )
    if isinstance(task, ImageClassifier):
        graph: nn.Module = ClassifierGraph(task.backbone, task.head)
    elif isinstance(task, SemanticSegmenter):
        graph = SegmenterGraph(task.backbone, task.decoder, task.heads, task.border)
    elif task.family == "centernet":
        graph = CenterNetGraph(task.detector, task.detector.stride, task.hparams.top_k)
    else:
        graph = TorchvisionGraph(task.detector, 1 if task.family == "fasterrcnn" else 0)
    graph = _uncompile(copy.deepcopy(graph))
    return graph.to(device="cpu", dtype=torch.float32, memory_format=torch.contiguous_format).eval()


def default_example(task: nn.Module, batch_size: int = 2, size: int = 64) -> Tensor:
    """Random ``[batch_size, in_channels, size, size]`` images (size rounded up to what the task needs)."""
    channels = int(getattr(task, "hparams", {}).get("in_channels", 3))
    divisor = int(getattr(task, "size_divisor", 1) or 1)
    size = math.ceil(size / divisor) * divisor
    return torch.randn(batch_size, channels, size, size)


# ------------------------------------------------------------------------------------- metadata
def _metadata(
    task: nn.Module, graph: nn.Module, fused: int, extra: Mapping[str, Any] | None
) -> dict[str, Any]:
    num_classes = int(task.num_classes)
    meta: dict[str, Any] = {
        "producer": "lightning_convnets.export",
        "task": type(task).__name__,
        "input": "images float32 [N, C, H, W], normalised as in training",
        "outputs": list(graph.output_names),
        "num_classes": num_classes,
        "class_names": task.class_names(num_classes),
        "fused_batchnorm": fused,
    }
    hp = task.hparams
    if type(task).__name__ == "SemanticSegmenter":
        meta.update(binary=bool(task.binary), threshold=hp.threshold, border=task.border)
        if task.binary:
            meta["class_names"] = task.class_names(2)
    if type(task).__name__ == "ObjectDetector":
        meta.update(family=task.family, score_threshold=hp.score_threshold, top_k=hp.top_k)
        meta["size_divisor"] = int(getattr(task, "size_divisor", 1))
        if hp.get("label_category_ids") is not None:
            meta["label_category_ids"] = list(hp.label_category_ids)
    meta.update(dict(extra or {}))
    # Plain JSON values (numbers stay numbers): fail here, not in a reader, on a value JSON cannot hold.
    return json.loads(json.dumps(meta))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an exported file, with its JSON types (numbers, lists, strings, booleans).

    ``.onnx``: the model's ``metadata_props`` (each value is JSON text, as ONNX stores strings only);
    ``.pt2``: the archive's ``extra_files["metadata.json"]`` (one JSON object). Keys: ``docs/export.md``.

    Example (not run as a doctest: it needs an exported file):
        >>> meta = read_metadata("detector.pt2")  # doctest: +SKIP
        >>> keep = scores >= meta["score_threshold"]  # doctest: +SKIP
    """
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        return {p.key: json.loads(p.value) for p in model.metadata_props}
    extra = {"metadata.json": ""}
    torch.export.load(path, extra_files=extra)
    return json.loads(extra["metadata.json"])


# ---------------------------------------------------------------------------------------- export
def _check_example(task: nn.Module, example: Tensor | None) -> Tensor:
    if example is None:
        return default_example(task)
    if not isinstance(example, Tensor) or example.ndim != 4 or not example.is_floating_point():
        raise ValueError(
            "export: example must be a float tensor of images [N, C, H, W], got "
            f"{type(example).__name__}{tuple(example.shape) if isinstance(example, Tensor) else ''}"
        )
    divisor = int(getattr(task, "size_divisor", 1) or 1)
    if type(task).__name__ == "ObjectDetector" and (
        example.shape[-2] % divisor or example.shape[-1] % divisor
    ):
        raise ValueError(
            f"export: CenterNet takes images whose height and width are multiples of its size_divisor "
            f"({divisor}); got example {tuple(example.shape)} (pad at the bottom/right, as the task does)"
        )
    example = example.detach().to("cpu", torch.float32).contiguous()
    if example.shape[0] == 1:
        # A batch of one would be specialised to 1 (torch.export's 0/1 rule): export with two.
        example = example.repeat(2, 1, 1, 1)
    return example


def _spatial_multiple(task: nn.Module) -> int:
    """What height and width must be a multiple of: CenterNet's ``size_divisor``, else the backbone's
    ``multiple`` attribute (1 when it has none)."""
    if type(task).__name__ == "ObjectDetector":
        return int(getattr(task, "size_divisor", 1) or 1)
    multiple = getattr(task.backbone, "multiple", None)
    return int(multiple) if isinstance(multiple, int) and multiple > 0 else 1


def _dynamic_shapes(task: nn.Module, example: Tensor, spatial: bool) -> tuple[dict[int, Any]]:
    """Batch always dynamic. With ``spatial``, height and width too: as ``multiple * Dim`` when the network
    needs a multiple (the shape solver then sees every pooling divide exactly), else ``Dim.AUTO`` (kept
    fixed where the network needs a fixed size)."""
    from torch.export import Dim

    if not spatial:
        return ({0: Dim.DYNAMIC},)
    multiple = _spatial_multiple(task)
    if multiple > 1 and not (example.shape[-2] % multiple or example.shape[-1] % multiple):
        height = Dim("height_blocks", min=1, max=16384 // multiple)
        width = Dim("width_blocks", min=1, max=16384 // multiple)
        return ({0: Dim.DYNAMIC, 2: multiple * height, 3: multiple * width},)
    return ({0: Dim.DYNAMIC, 2: Dim.AUTO, 3: Dim.AUTO},)


def _with_fallback(trace: Any, task: nn.Module, example: Tensor, format: str) -> Any:
    """``trace(dynamic_shapes)`` with dynamic height/width, else with only the batch dynamic."""
    try:
        return trace(_dynamic_shapes(task, example, True))
    except Exception as first:
        try:
            return trace(_dynamic_shapes(task, example, False))
        except Exception:
            raise _unsupported(task, format, first) from first


def _export_program(graph: nn.Module, example: Tensor, task: nn.Module) -> Any:
    return _with_fallback(
        lambda shapes: torch.export.export(graph, (example,), dynamic_shapes=shapes, strict=False),
        task,
        example,
        "torch_export",
    )


def _unsupported(task: nn.Module, format: str, err: BaseException) -> ExportError:
    what = type(task).__name__
    if type(task).__name__ == "ObjectDetector":
        what += f" (family={task.family!r})"
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    return ExportError(
        f"export: {what} cannot be exported as {format!r}: {type(err).__name__}: {first}. Supported: "
        "ImageClassifier, SemanticSegmenter and ObjectDetector(family='centernet') in both formats "
        "('onnx', 'torch_export'); torchvision's fasterrcnn/retinanet/fcos only where torch.export "
        "traces them (format='torch_export')."
    )


def _static_dims(shape: Sequence[Any]) -> list[str]:
    axes = ("batch", "channels", "height", "width")
    return [axes[i] for i in (0, 2, 3) if isinstance(shape[i], int)]


def export_model(
    task: nn.Module,
    format: str = "onnx",
    example: Tensor | None = None,
    path: str | Path | None = None,
    *,
    fuse: bool = True,
    opset: int = DEFAULT_OPSET,
    metadata: Mapping[str, Any] | None = None,
    check: bool = True,
) -> Path:
    """Export ``task``'s eval network (BatchNorm fused, dynamic batch) to ``path``.

    Args:
        task: an ``ImageClassifier``, ``SemanticSegmenter`` or ``ObjectDetector`` with its head built
            (e.g. from ``load_from_checkpoint``). It is not modified.
        format: ``"onnx"`` or ``"torch_export"``.
        example: an input batch ``[N, C, H, W]`` (float; normalised like training data) that fixes the
            channel count and, where the network needs it, the size; default: two random 64x64 images.
            A batch of one is exported as two (the batch stays dynamic).
        path: output file; default ``<task>.onnx`` / ``<task>.pt2`` in the working directory. Its folder
            must exist (it is not created).
        fuse: fold BatchNorm into the convolutions (checked on ``example``; see
            :func:`fuse_for_inference`).
        opset: ONNX opset (``format="onnx"``).
        metadata: extra entries for the metadata, JSON values (e.g. the datamodule's ``mean``/``std``);
            read them back typed with :func:`read_metadata`.
        check: run the exported model on ``example`` and compare with the eager one (1e-4 relative);
            ONNX is checked with onnxruntime when it is installed.

    Returns:
        The written path.

    Raises:
        ValueError: unknown ``format``, malformed ``example``, or a head that is not built.
        FileNotFoundError: the folder of ``path`` does not exist.
        TypeError: ``task`` is not one of the three tasks.
        ExportError: the network cannot be traced for ``format`` (torchvision detectors in ONNX...),
            or the exported outputs differ from the eager ones.
        ImportError: ``format="onnx"`` without ``onnx``/``onnxscript`` (the ``export`` extra).

    Example:
        >>> from lightning_convnets import SemanticSegmenter
        >>> task = SemanticSegmenter("unet", num_classes=3, backbone_kwargs={"width": 8})  # doctest: +SKIP
        >>> export_model(task, "torch_export", torch.randn(2, 3, 64, 64), "seg.pt2")  # doctest: +SKIP
        PosixPath('seg.pt2')
    """
    if format not in FORMATS:
        raise ValueError(f"export: format must be one of {FORMATS}, got {format!r}")
    if path is not None and format == "torch_export" and Path(path).suffix != ".pt2":
        raise ValueError(
            f"export: a torch_export program is a .pt2 archive; path must end in .pt2, got {path}"
        )
    graph = inference_module(task)
    if format == "onnx" and isinstance(graph, TorchvisionGraph):
        raise _unsupported(
            task,
            "onnx",
            NotImplementedError(
                "torchvision detectors' data-dependent post-processing has no ONNX path here; try "
                "format='torch_export'"
            ),
        )
    example = _check_example(task, example)
    fused = 0
    if fuse:
        graph, fused = fuse_for_inference(graph, example)
    out = Path(path) if path is not None else Path(type(task).__name__.lower() + _SUFFIX[format])
    if not out.parent.is_dir():
        raise FileNotFoundError(
            f"export: the folder of path {out} does not exist ({out.parent}); create it first"
        )
    with torch.no_grad():
        reference = graph(example)
    if format == "torch_export":
        program = _export_program(graph, example, task)
        meta = _metadata(task, graph, fused, metadata)
        input_shape = [n.meta["val"].shape for n in program.graph.nodes if n.op == "placeholder"][-1]
        dims = _static_dims(list(input_shape))
        meta["static_dims"] = dims
        torch.export.save(program, out, extra_files={"metadata.json": json.dumps(meta)})
        if check:
            _check_outputs(torch.export.load(out).module(), example, reference, task, format)
        _warn_static(dims, task)
        return out
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"export: format='onnx' needs onnx and onnxscript ({err}); install the export extra: "
            'pip install "lightning-convnets[export]"'
        ) from err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = _with_fallback(
            lambda shapes: torch.onnx.export(
                graph,
                (example,),
                dynamo=True,
                dynamic_shapes=shapes,
                input_names=["images"],
                output_names=list(graph.output_names),
                opset_version=opset,
                verbose=False,
            ),
            task,
            example,
            "onnx",
        )
    dims = _static_dims(list(program.model.graph.inputs[0].shape))
    meta = _metadata(task, graph, fused, metadata)
    meta["static_dims"] = dims
    meta["opset"] = int(opset)
    for key, value in meta.items():
        program.model.metadata_props[key] = json.dumps(value)
    program.save(str(out))
    if check:
        try:
            runner = onnx_runner(out)
        except ImportError:
            runner = None
        if runner is not None:
            _check_outputs(runner, example, reference, task, format)
    _warn_static(dims, task)
    return out


def onnx_runner(path: str | Path) -> Any:
    """A callable ``images (Tensor) -> tuple of Tensors`` running ``path`` with onnxruntime on the CPU.

    Raises:
        ImportError: without onnxruntime (the ``export`` extra).
    """
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ImportError(
            'onnxruntime is not installed; install the export extra: pip install "lightning-convnets[export]"'
        ) from err
    options = ort.SessionOptions()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(images: Tensor) -> tuple[Tensor, ...]:
        outputs = session.run(None, {name: images.detach().cpu().float().contiguous().numpy()})
        return tuple(torch.from_numpy(o) for o in outputs)

    run.session = session  # type: ignore[attr-defined]
    return run


def same_detections(
    got: Sequence[Tensor], reference: Sequence[Tensor], score_threshold: float = 0.0, tol: float = 1e-4
) -> bool:
    """Whether two ``(boxes, scores, labels)`` outputs of :class:`CenterNetGraph` hold the same detections.

    Per image, the entries scoring above ``score_threshold`` are compared as sets (the order of
    equal scores, e.g. the zero-score tail of top-K, is arbitrary): same count, and each reference entry
    has a partner with the same label and boxes and scores within ``tol`` (relative to the image size).
    """
    boxes_a, scores_a, labels_a = (t.detach().cpu() for t in got)
    boxes_b, scores_b, labels_b = (t.detach().cpu() for t in reference)
    if boxes_a.shape != boxes_b.shape or scores_a.shape != scores_b.shape:
        return False
    scale = max(1.0, float(boxes_b.abs().max())) if boxes_b.numel() else 1.0
    for i in range(scores_b.shape[0]):
        keep_a, keep_b = scores_a[i] > score_threshold, scores_b[i] > score_threshold
        if int(keep_a.sum()) != int(keep_b.sum()):
            return False
        ba, sa, la = boxes_a[i][keep_a], scores_a[i][keep_a], labels_a[i][keep_a]
        used = torch.zeros(len(sa), dtype=torch.bool)
        for box, score, label in zip(boxes_b[i][keep_b], scores_b[i][keep_b], labels_b[i][keep_b]):
            close = (
                ~used
                & (la == label)
                & ((sa - score).abs() <= tol)
                & ((ba - box).abs().amax(dim=-1) <= tol * scale)
            )
            if not close.any():
                return False
            used[int(close.nonzero()[0])] = True
    return True


def _check_outputs(run: Any, example: Tensor, reference: Any, task: nn.Module, format: str) -> None:
    with torch.no_grad():
        got = run(example)
    if type(task).__name__ == "ObjectDetector" and task.family == "centernet":
        ok = same_detections(got, reference, 0.0)
    else:
        ok = _same(got, reference, 1e-4)
    if not ok:
        raise ExportError(
            f"export: the {format} model of {type(task).__name__} disagrees with the eager model on the "
            "example (more than 1e-4 relative); please report it"
        )


def _warn_static(dims: list[str], task: nn.Module) -> None:
    if "batch" in dims:
        raise ExportError(f"export: the batch dimension of {type(task).__name__} could not be made dynamic")
    if dims:
        warnings.warn(
            f"export: {type(task).__name__}'s {' and '.join(dims)} stayed fixed at the example's size "
            "(the network needs that size); the batch size is dynamic",
            stacklevel=3,
        )


# ------------------------------------------------------------------------------------------ CLI
_CLI_HELP = """\
lightning-convnets export: export a trained task (BatchNorm fused, dynamic batch) from its config and
checkpoint.

  lightning-convnets export --config CONFIG.yaml --ckpt_path BEST.ckpt --format onnx|torch_export
                            [--output PATH] [--image_size N] [--opset 18] [--no_fuse]
                            [other LightningCLI arguments, e.g. --model.init_args.top_k 50]

The config is read by the same LightningCLI as fit/test/predict (model and data are built, nothing
runs) and, as with `test --ckpt_path`, the model's architecture comes from the checkpoint's saved
hyperparameters while prediction options (top_k, score_threshold, threshold) given in the config or
on the command line win; the checkpoint's weights are loaded into the model. A checkpoint of another
task or backbone than the config's is refused in one line. The example images that fix the traced
shapes are random, image_size x image_size (default: the data module's image_size, else 64).
The output defaults to the checkpoint's path with .onnx / .pt2; the folder of --output must exist. The data module's class names,
mean and std go into the metadata.
"""


def export_cli(argv: Sequence[str]) -> Path:
    """The ``lightning-convnets export`` subcommand (see ``lightning-convnets export --help``).

    Args:
        argv: the arguments after ``export``.

    Returns:
        The written path (printed too).
    """
    import argparse

    from lightning_convnets.checkpointing import (
        CheckpointMismatchError,
        describe_checkpoint,
        read_checkpoint,
        weights_mismatch,
    )
    from lightning_convnets.cli import ConvNetsCLI

    parser = argparse.ArgumentParser(
        prog="lightning-convnets export", description=_CLI_HELP, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", action="append", required=True, help="config file (repeatable)")
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by fit")
    parser.add_argument("--format", choices=FORMATS, default="onnx")
    parser.add_argument("--output", default=None, help="output file (default: checkpoint path + suffix)")
    parser.add_argument("--image_size", type=int, default=None, help="example image side in pixels")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    parser.add_argument("--no_fuse", action="store_true", help="keep BatchNorm layers unfused")
    args, rest = parser.parse_known_args(list(argv))
    ckpt = Path(args.ckpt_path)
    if not ckpt.is_file():
        raise FileNotFoundError(f"export: --ckpt_path {ckpt} is not a file")
    cli_args = [a for c in args.config for a in ("--config", c)] + rest
    # Built as `test --ckpt_path` builds it: the architecture from the checkpoint's hyperparameters, the
    # prediction options (top_k, score_threshold, threshold...) from the config and the command line.
    cli = ConvNetsCLI(args=cli_args, run=False, ckpt_path=ckpt)
    model, datamodule = cli.model, cli.datamodule
    checkpoint = read_checkpoint(ckpt)
    if "state_dict" not in checkpoint:
        raise ValueError(f"export: {ckpt} has no 'state_dict': is it a Lightning checkpoint?")
    model.on_load_checkpoint(checkpoint)  # rebuilds a head sized from the data (num_classes)
    problem = weights_mismatch(model, checkpoint["state_dict"])
    if problem is not None:
        _, _, holds = describe_checkpoint(checkpoint)
        raise CheckpointMismatchError(
            f"export: --ckpt_path {ckpt} holds {holds} whose weights do not fit the "
            f"{type(model).__name__} built from the config ({problem})"
        )
    model.load_state_dict(checkpoint["state_dict"])
    metadata: dict[str, Any] = {"checkpoint": ckpt.name}
    for key in ("mean", "std"):
        value = getattr(datamodule, key, None)
        if value is not None:
            metadata[key] = [float(v) for v in value]
    try:
        names = list(getattr(datamodule, "class_names", None) or [])
    except Exception:  # a data module that must scan its files first: names stay indices
        names = []
    if names and model.num_classes is not None and len(names) == model.num_classes:
        metadata["class_names"] = [str(n) for n in names]
    size = args.image_size or getattr(datamodule, "image_size", None) or 64
    example = default_example(model, batch_size=2, size=int(size))
    output = args.output or ckpt.with_suffix(_SUFFIX[args.format])
    path = export_model(
        model.eval(),
        args.format,
        example,
        output,
        fuse=not args.no_fuse,
        opset=args.opset,
        metadata=metadata,
    )
    print(f"exported {type(model).__name__} ({args.format}) to {path}")
    return path
