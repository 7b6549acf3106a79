"""Export a trained task for deployment: ONNX (run by onnxruntime) or a ``torch.export`` program.

:func:`export_model` exports the eval-mode network (the graph the task's ``export_graph()`` returns) with
BatchNorm folded into the convolutions, one input ``images``, dynamic batch (and height/width where the
network allows). The ``lightning-convnets export`` subcommand is :func:`lightning_convnets.cli.export_cli`. Outputs per task, formats and metadata: ``docs/export.md``.

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

from lightning_convnets.nn.compile import clear_compiled
from lightning_convnets.nn.fusion import fuse_for_inference, same_outputs

__all__ = [
    "DEFAULT_OPSET",
    "EXPORT_SUFFIXES",
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
#: File suffix of each format.
EXPORT_SUFFIXES = {"onnx": ".onnx", "torch_export": ".pt2"}


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


# ------------------------------------------------------------------------------------ building
def inference_module(task: nn.Module) -> nn.Module:
    """An eval-mode, CPU, float32, uncompiled copy of ``task``'s network as a one-input graph module.

    The graph is what the task's ``export_graph()`` returns (the network without metrics or loss, with the
    decoding a deployment needs); its output is what :func:`export_model` exports (see the module
    docstring). BatchNorm is not fused yet (:func:`fuse_for_inference` does).

    Args:
        task: an ``ImageClassifier``, ``SemanticSegmenter`` or ``ObjectDetector`` (any module with an
            ``export_graph()`` method) with its head built (``num_classes`` known).

    Raises:
        TypeError: for another kind of module.
        ValueError: when the task's head is not built yet.
    """
    if not callable(getattr(task, "export_graph", None)):
        raise TypeError(
            "export: task must be an ImageClassifier, SemanticSegmenter or ObjectDetector, got "
            f"{type(task).__name__}"
        )
    if getattr(task, "num_classes", None) is None:
        raise ValueError(
            f"export: this {type(task).__name__} has no head yet (num_classes unknown): load it from a "
            "checkpoint or build it with num_classes=..."
        )
    graph = clear_compiled(copy.deepcopy(task.export_graph()))
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
    meta.update(getattr(task, "export_metadata", dict)())  # the task's own entries (thresholds, family...)
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
    if example.shape[-2] % divisor or example.shape[-1] % divisor:
        raise ValueError(
            f"export: {type(task).__name__} takes images whose height and width are multiples of its size_divisor "
            f"({divisor}); got example {tuple(example.shape)} (pad at the bottom/right, as the task does)"
        )
    example = example.detach().to("cpu", torch.float32).contiguous()
    if example.shape[0] == 1:
        # A batch of one would be specialised to 1 (torch.export's 0/1 rule): export with two.
        example = example.repeat(2, 1, 1, 1)
    return example


def _spatial_multiple(task: nn.Module) -> int:
    """What height and width must be a multiple of: the task's ``size_divisor`` (a detector pads its
    images to it), else the backbone's ``multiple`` attribute (1 when it has none)."""
    if getattr(task, "size_divisor", None) is not None:
        return int(task.size_divisor or 1)
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
    if getattr(task, "family", None) is not None:
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
    if format == "onnx" and not getattr(graph, "onnx_exportable", True):
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
    out = Path(path) if path is not None else Path(type(task).__name__.lower() + EXPORT_SUFFIXES[format])
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
            _check_outputs(torch.export.load(out).module(), example, reference, graph, task, format)
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
            _check_outputs(runner, example, reference, graph, task, format)
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
    """Whether two ``(boxes, scores, labels)`` outputs of a CenterNet export graph
    (:class:`~lightning_convnets.nn.detectors.CenterNetGraph`) hold the same detections.

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


def _check_outputs(
    run: Any, example: Tensor, reference: Any, graph: nn.Module, task: nn.Module, format: str
) -> None:
    with torch.no_grad():
        got = run(example)
    if tuple(graph.output_names) == ("boxes", "scores", "labels"):  # top-K detections: compared as sets
        ok = same_detections(got, reference, 0.0)
    else:
        ok = same_outputs(got, reference, 1e-4)
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
