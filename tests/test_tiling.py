"""Tiled prediction: overlap-tile exactness (valid U-Net), blended tiles (same padding), tiled detection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from lightning_convnets.backbones import create_backbone
from lightning_convnets.predict import tiling
from lightning_convnets.predict.tiling import (
    BlendAccumulator,
    NetworkGeometry,
    TiledDetector,
    TiledPredictor,
    merge_detections,
    mirror_pad,
    network_geometry,
    reflect_indices,
    tile_starts,
)
from lightning_convnets.tasks import ObjectDetector, SemanticSegmenter


class DenseNet(nn.Module):
    """A backbone plus a 1x1 head, exposing the backbone's geometry."""

    def __init__(self, classes: int = 3, **unet: object) -> None:
        super().__init__()
        self.backbone = create_backbone("unet", **unet)
        self.head = nn.Conv2d(self.backbone.out_channels[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)[0])


def smooth_image(channels: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, channels, h // 8 + 2, w // 8 + 2, generator=g)
    image = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
    return image + 0.05 * torch.rand(channels, h, w, generator=g)


# ---------------------------------------------------------------------------------------- geometry
def test_mirror_pad_matches_reflect_padding_and_extends_beyond_it() -> None:
    x = torch.rand(2, 3, 9, 7)
    assert torch.equal(mirror_pad(x, 3, 2, 4, 6), F.pad(x, (4, 6, 3, 2), mode="reflect"))
    # Beyond one image size F.pad refuses; the mirror repeats (period 2 * (size - 1)).
    assert reflect_indices(-10, 14, 4).tolist() == [2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert reflect_indices(-3, 5, 1).tolist() == [0] * 5


def test_tile_starts_cover_the_image_and_shift_the_last_tile_inward() -> None:
    for size, tile, step, align in [(100, 32, 24, 1), (100, 32, 24, 8), (257, 64, 48, 16), (30, 32, 24, 1)]:
        starts = tile_starts(size, tile, step, align)
        covered = np.zeros(size, bool)
        for s in starts:
            assert s >= 0 and s + min(tile, size) <= size
            covered[s : s + tile] = True
        assert covered.all()
        assert all(s % align == 0 for s in starts[:-1])
        if size > tile:
            assert starts[-1] == size - tile  # reaches the edge, inside the image
    with pytest.raises(ValueError, match="tile and step"):
        tile_starts(10, 0, 1)


def test_network_geometry_of_a_valid_unet_and_of_a_segmenter() -> None:
    net = create_backbone("unet", padding="valid", width=2, depth=2)
    g = network_geometry(net)
    assert (g.border, g.multiple) == (net.border, 4) and g.valid_input_size is not None
    task = SemanticSegmenter("unet", num_classes=3, backbone_kwargs={"width": 2, "depth": 3})
    assert network_geometry(task) == NetworkGeometry(border=0, multiple=8, valid_input_size=None)


# ------------------------------------------------------------------------ valid padding: overlap-tile
@pytest.mark.parametrize(("depth", "size"), [(2, (70, 53)), (2, (37, 90)), (3, (61, 83))])
def test_overlap_tile_equals_one_forward_of_the_mirror_padded_image(
    depth: int, size: tuple[int, int]
) -> None:
    torch.manual_seed(0)
    net = DenseNet(3, padding="valid", width=2, depth=depth).eval()
    tiler = TiledPredictor(net, tile_size=20 if depth == 3 else 16, batch_size=3)
    assert tiler.mode == "overlap-tile" and tiler.tile_in == tiler.tile_out + 2 * net.backbone.border
    # depth 3: 20-px output tiles on a stride-8 grid, so neighbours overlap by 4 px
    assert tiler.step % 2**depth == 0 and tiler.step == (16 if depth == 3 else tiler.tile_out)
    h, w = size
    image = smooth_image(3, h, w)
    tiled = tiler.predict(image)
    assert tiled.shape == (3, h, w)
    assert tiler.num_tiles(h, w) >= 6
    top, bottom, left, right = tiler.whole_image_padding(h, w)
    assert top == left == net.backbone.border
    with torch.no_grad():
        whole = net(mirror_pad(image, top, bottom, left, right)[None])[0]
    whole = whole[:, :h, :w]
    assert torch.allclose(tiled, whole, atol=1e-5, rtol=1e-5), (tiled - whole).abs().max()
    # Per-pixel reduction while stitching gives the same mask without holding the logits.
    assert torch.equal(tiler.predict(image, reduce=lambda logits: logits.argmax(0)), tiled.argmax(0))


def test_overlap_tile_needs_stride_aligned_windows() -> None:
    # The same tiles with origins off the pooling grid (multiple=1) are no longer exact: the alignment
    # is what the exactness test above depends on.
    torch.manual_seed(0)
    net = DenseNet(3, padding="valid", width=2, depth=3).eval()
    exact = TiledPredictor(net, tile_size=20)
    geometry = NetworkGeometry(
        border=net.backbone.border, multiple=1, valid_input_size=net.backbone.valid_input_size
    )
    misaligned = TiledPredictor(net, tile_size=20, geometry=geometry)
    assert (exact.step, misaligned.step) == (16, 20)
    image = smooth_image(3, 64, 64)
    top, bottom, left, right = exact.whole_image_padding(64, 64)
    with torch.no_grad():
        whole = net(mirror_pad(image, top, bottom, left, right)[None])[0][:, :64, :64]
    assert torch.allclose(exact.predict(image), whole, atol=1e-5)
    assert not torch.allclose(misaligned.predict(image), whole, atol=1e-3)


def test_segmenter_with_valid_unet_predicts_every_pixel_with_tiles() -> None:
    torch.manual_seed(0)
    model = SemanticSegmenter(
        "unet", num_classes=3, backbone_kwargs={"padding": "valid", "width": 2, "depth": 2}, tile_size=16
    ).eval()
    images = torch.stack([smooth_image(3, 45, 61, seed=s) for s in range(2)])
    masks = model.predict_step(images, 0)
    assert masks.shape == (2, 45, 61) and masks.dtype == torch.int64
    assert int(masks.max()) < 3  # no "unknown" rim any more: every pixel has a class
    tiler = TiledPredictor(model, tile_size=16)
    assert torch.equal(masks[1], tiler.predict(images[1]).argmax(0))


def test_predict_dir_writes_full_resolution_masks_for_images_of_any_size(tmp_path) -> None:
    from lightning.pytorch import Trainer
    from lightning_convnets.datamodules import SegmentationFolderDataModule
    from PIL import Image

    rng = np.random.default_rng(0)
    for folder in ("images", "masks"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    for k in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            tmp_path / f"data/images/{k}.png"
        )
        Image.fromarray((rng.random((32, 32)) > 0.5).astype(np.uint8)).save(tmp_path / f"data/masks/{k}.png")
    (tmp_path / "big").mkdir()
    sizes = {"wide": (37, 90), "tall": (75, 41)}
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"big/{name}.png")
    dm = SegmentationFolderDataModule(
        str(tmp_path / "data"), num_classes=2, predict_dir=str(tmp_path / "big"), image_size=32
    )
    model = SemanticSegmenter("unet", num_classes=2, backbone_kwargs={"width": 2, "depth": 2}, tile_size=32)
    trainer = Trainer(
        logger=False, default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False
    )
    masks = trainer.predict(model, datamodule=dm)
    assert sorted(tuple(m.shape[-2:]) for m in masks) == sorted(sizes.values())
    for name, (h, w) in sizes.items():
        written = np.array(Image.open(tmp_path / "predictions" / "masks" / f"{name}.png"))
        assert written.shape == (h, w) and written.max() <= 1
    with pytest.raises(Exception, match="predict_dir"):
        SegmentationFolderDataModule(
            str(tmp_path / "data"), predict_dir=str(tmp_path / "nope")
        ).predict_dataloader()


# --------------------------------------------------------------------------- same padding: blending
def test_blended_tiles_match_whole_image_inference_in_the_interior() -> None:
    # A randomly initialised same-padding U-Net (He init everywhere) sees far: its receptive field is wider
    # than any affordable overlap, so tiles cannot match the whole image exactly; with tiles of twice the
    # overlap, blending brings them within a fraction of a percent on average.
    torch.manual_seed(0)
    net = DenseNet(3, width=4, depth=2, norm="batch").eval()
    image = smooth_image(3, 96, 128)
    with torch.no_grad():
        whole = net(image[None])[0]
    scale = whole.std()
    errors = {}
    for window, overlap in [("gaussian", 32), ("linear", 32), ("constant", 0)]:
        tiler = TiledPredictor(net, tile_size=64, overlap=overlap, batch_size=5, window=window)
        tiled = tiler.predict(image)
        assert tiled.shape == whole.shape
        interior = (tiled - whole)[:, 8:-8, 8:-8].abs() / scale
        errors[window] = (float(interior.mean()), float(interior.max()))
    # Blended overlapping tiles: on average within 1% (gaussian) / 3% (linear) of the logits' spread.
    assert errors["gaussian"][0] < 0.01 and errors["gaussian"][1] < 0.3, errors
    assert errors["linear"][0] < 0.03 and errors["linear"][1] < 0.6, errors
    # Abutting tiles without blending are visibly worse at the seams.
    assert errors["constant"][1] > 3 * errors["gaussian"][1], errors
    assert errors["constant"][0] > 3 * errors["gaussian"][0], errors


def test_blended_tiles_take_any_image_size_and_stream_the_reduction() -> None:
    torch.manual_seed(0)
    net = DenseNet(4, width=4, depth=2).eval()
    calls: list[tuple[int, ...]] = []

    def recording(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return net(x)

    tiler = TiledPredictor(recording, tile_size=24, overlap=8, batch_size=4, geometry=network_geometry(net))
    for h, w in [(70, 53), (13, 90), (24, 24)]:
        calls.clear()
        image = smooth_image(3, h, w)
        logits = tiler.predict(image)
        assert logits.shape == (4, h, w) and torch.isfinite(logits).all()
        mask = tiler.predict(image, reduce=lambda t: t.argmax(0))
        assert torch.equal(mask, logits.argmax(0))
        # Memory bound: never more than batch_size tiles of at most tile_size per forward.
        assert all(c[0] <= 4 and c[2] <= 24 and c[3] <= 24 and c[2] % 4 == 0 and c[3] % 4 == 0 for c in calls)
    assert tiler.predict(torch.rand(2, 3, 30, 40)).shape == (2, 4, 30, 40)


def test_the_blend_accumulator_gives_the_weighted_mean_of_covering_tiles_block_by_block() -> None:
    # Against a plain reference that holds the whole image: every pixel handed back exactly once, with the
    # weighted mean of the tiles covering it (the tiles added in the same order: equal to the last bit).
    torch.manual_seed(0)
    for h, w, tile, step in [(70, 53, 24, 16), (100, 90, 32, 4), (24, 24, 24, 16), (13, 90, 16, 12)]:
        ys, xs = tiling.tile_starts(h, tile, step), tiling.tile_starts(w, tile, step)
        weight = torch.rand(tile, tile) + 0.1
        tiles = {(r, c): torch.randn(2, 3, tile, tile) for r in range(len(ys)) for c in range(len(xs))}
        acc, wsum = torch.zeros(2, 3, h, w), torch.zeros(h, w)
        blender = BlendAccumulator(h, w, ys, xs, weight)
        out, seen = torch.full((2, 3, h, w), float("nan")), torch.zeros(h, w, dtype=torch.int64)
        for (r, c), value in tiles.items():
            hh, ww = min(tile, h - ys[r]), min(tile, w - xs[c])
            acc[..., ys[r] : ys[r] + hh, xs[c] : xs[c] + ww] += (value * weight)[..., :hh, :ww]
            wsum[ys[r] : ys[r] + hh, xs[c] : xs[c] + ww] += weight[:hh, :ww]
            for y, x, block in blender.add(r, c, value):
                out[..., y : y + block.shape[-2], x : x + block.shape[-1]] = block
                seen[y : y + block.shape[-2], x : x + block.shape[-1]] += 1
        assert torch.equal(seen, torch.ones(h, w, dtype=torch.int64)), (h, w)
        assert torch.equal(out, acc / wsum), (h, w)


def test_the_blend_accumulator_holds_the_overlap_band_not_a_strip_of_tile_rows() -> None:
    # What grows with the image width is the band of rows the next tile row overlaps (overlap x width),
    # not tile rows x width: a 64-px tile with 16 px of overlap on a 4096-px-wide image holds under a
    # third of the strip of tile rows, and the same whatever the height.
    tile, overlap, classes = 64, 16, 3
    held = {}
    for h, w in [(256, 4096), (1024, 4096), (256, 512)]:
        ys, xs = tiling.tile_starts(h, tile, tile - overlap), tiling.tile_starts(w, tile, tile - overlap)
        blender = BlendAccumulator(h, w, ys, xs, torch.ones(tile, tile))
        most = 0
        for r in range(len(ys)):
            for c in range(len(xs)):
                blender.add(r, c, torch.zeros(classes, tile, tile))
                most = max(most, blender.held_values)
        held[h, w] = most
        assert most <= (classes + 1) * (overlap * w + tile * 2 * tile), (h, w, most)
    assert held[256, 4096] == held[1024, 4096] < (classes + 1) * tile * 4096 / 3
    assert held[256, 512] < held[256, 4096] / 4


def test_tiled_predictor_rejects_bad_options() -> None:
    net = DenseNet(2, width=2, depth=1).eval()
    with pytest.raises(ValueError, match="tile_size"):
        TiledPredictor(net, tile_size=0)
    with pytest.raises(ValueError, match="overlap"):
        TiledPredictor(net, tile_size=16, overlap=16)
    with pytest.raises(ValueError, match="batch_size"):
        TiledPredictor(net, tile_size=16, batch_size=0)
    with pytest.raises(ValueError, match="window"):
        TiledPredictor(net, tile_size=16, window="hann")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"the image has shape \(8, 8\); expected \(3, H, W\) or \(N, 3, H, W\)"):
        TiledPredictor(net, tile_size=16).predict(torch.rand(8, 8))
    with pytest.raises(ValueError, match="tile_overlap"):
        SemanticSegmenter(
            "unet", num_classes=2, backbone_kwargs={"width": 2, "depth": 1}, tile_size=8, tile_overlap=8
        )


# ------------------------------------------------------------------------------------- detection
def components_detector(images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """A deterministic toy detector: one box per connected component of each channel (= class)."""
    out = []
    for image in images:
        boxes, labels = [], []
        for cls, channel in enumerate(image.numpy() > 0.5):
            labelled, _ = ndimage.label(channel)
            for sl in ndimage.find_objects(labelled):
                boxes.append([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop])
                labels.append(cls)
        boxes_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        out.append(
            {"boxes": boxes_t, "scores": torch.ones(len(boxes)) * 0.9, "labels": torch.tensor(labels).long()}
        )
    return out


def make_scene(
    size: int = 300, seed: int = 0, count: int = 60
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rectangles of 3 classes, 6..24 px, no two closer than 3 px, many across the tile borders."""
    rng = np.random.default_rng(seed)
    image = torch.zeros(3, size, size)
    occupied = np.zeros((size, size), bool)
    boxes, labels = [], []
    for _attempt in range(100 * count):
        if len(boxes) == count:
            break
        bw, bh = (int(v) for v in rng.integers(6, 25, size=2))
        x0, y0 = int(rng.integers(0, size - bw)), int(rng.integers(0, size - bh))
        if occupied[max(0, y0 - 3) : y0 + bh + 3, max(0, x0 - 3) : x0 + bw + 3].any():
            continue
        occupied[y0 : y0 + bh, x0 : x0 + bw] = True
        cls = int(rng.integers(3))
        image[cls, y0 : y0 + bh, x0 : x0 + bw] = 1.0
        boxes.append([x0, y0, x0 + bw, y0 + bh])
        labels.append(cls)
    assert len(boxes) == count, f"only {len(boxes)} of {count} objects fit"
    return image, torch.tensor(boxes, dtype=torch.float32), torch.tensor(labels)


def match_counts(det: dict[str, torch.Tensor], boxes: torch.Tensor, labels: torch.Tensor) -> list[int]:
    """For each true object, how many detections of its class cover it with IoU > 0.9."""
    from torchvision.ops import box_iou

    iou = box_iou(boxes, det["boxes"])
    same = labels[:, None] == det["labels"][None]
    return ((iou > 0.9) & same).sum(1).tolist()


@pytest.mark.parametrize("merge", ["nms", "wbf"])
def test_tiled_detection_finds_every_object_once(merge: str) -> None:
    image, boxes, labels = make_scene()
    tiler = TiledDetector(components_detector, tile_size=100, overlap=40, batch_size=4, merge=merge)
    tiles = tiler.tiles(300, 300)
    assert len(tiles) == 25
    inner_edges = sorted({y for y, *_ in tiles if y > 0} | {y + th for y, _, th, _ in tiles if y + th < 300})
    crossing = [b for b in boxes.tolist() if any(b[0] < e < b[2] or b[1] < e < b[3] for e in inner_edges)]
    assert len(crossing) >= 20  # the scene does put objects across tile borders
    whole = components_detector([image])[0]
    tiled = tiler(image)
    assert match_counts(whole, boxes, labels) == [1] * len(boxes)  # whole-image recall: every object
    assert match_counts(tiled, boxes, labels) == [1] * len(boxes)  # tiled: the same recall, each once
    assert len(tiled["boxes"]) == len(boxes)  # and nothing else (no cut halves, no duplicates)
    # Without dropping boxes cut by inner tile borders, halves of objects survive the merge.
    naive = TiledDetector(components_detector, tile_size=100, overlap=40, merge=merge, edge_margin=-(10**6))
    assert len(naive(image)["boxes"]) > len(boxes)


def test_merge_detections_is_class_wise() -> None:
    det = {
        "boxes": torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 10], [1.0, 1, 10, 10]]),
        "scores": torch.tensor([0.9, 0.8, 0.7]),
        "labels": torch.tensor([0, 1, 0]),
    }
    for method in ("nms", "wbf"):
        merged = merge_detections([det], method)  # type: ignore[arg-type]
        assert sorted(merged["labels"].tolist()) == [0, 1]
    fused = merge_detections([det], "wbf", num_sources=2)
    # WBF: the class-0 cluster is the score-weighted mean box, its score the mean over 2 sources.
    k = int((fused["labels"] == 0).nonzero()[0])
    expected = (torch.tensor([0.0, 0, 10, 10]) * 0.9 + torch.tensor([1.0, 1, 10, 10]) * 0.7) / 1.6
    assert torch.allclose(fused["boxes"][k], expected) and abs(float(fused["scores"][k]) - 0.8) < 1e-6
    with pytest.raises(ValueError, match="nms"):
        merge_detections([det], "soft")  # type: ignore[arg-type]


def test_object_detector_tiles_through_predict_step() -> None:
    torch.manual_seed(0)
    model = ObjectDetector(
        "resnet18",
        num_classes=2,
        backbone_kwargs={"width": 4},
        neck_channels=8,
        head_channels=8,
        tile_size=32,
        tile_overlap=8,
        score_threshold=0.0,
    ).eval()
    image = torch.rand(3, 80, 72)
    (det,) = model.predict_step([image], 0)
    assert det["image_size"].tolist() == [80, 72]
    expected = TiledDetector(model, tile_size=32, overlap=8, max_detections=100, multiple=model.size_divisor)(
        image
    )
    assert torch.equal(det["boxes"], expected["boxes"]) and torch.equal(det["labels"], expected["labels"])
    assert (det["boxes"][:, 2] <= 72 + 1e-4).all() and (det["boxes"][:, 3] <= 80 + 1e-4).all()


# ------------------------------------------------------------------------------- bad image shapes
@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((1, 1, 100, 80), r"the image has shape \(1, 1, 100, 80\); expected \(N, 3, H, W\) \(channels first, 3 channels"),
        ((3, 300, 128, 16), r"the image has shape \(3, 300, 128, 16\); expected \(N, 3, H, W\)"),
        ((2, 100, 80, 3), r"shape \(2, 100, 80, 3\).*It looks channels-last \(\.\.\., H, W, C\): image\.permute\(0, 3, 1, 2\)"),
    ],
    ids=["one-channel", "wrong-layout", "hwc"],
)
def test_tiled_segmentation_names_the_image_shape_and_what_was_expected(shape, expected, tmp_path, monkeypatch):
    import lightning.pytorch as pl

    monkeypatch.chdir(tmp_path)
    task = SemanticSegmenter("unet", num_classes=2, backbone_kwargs={"width": 2, "depth": 2}, tile_size=32)
    with pytest.raises(ValueError, match=expected):  # the image's shape, never the tile batch's
        tiling.segmentation_logits(task.eval(), torch.rand(*shape), task.tiling_options)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=expected):  # the same through predict (fast_predict's check included)
        trainer.predict(task, torch.utils.data.DataLoader(torch.rand(*shape), batch_size=shape[0]))


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((1, 100, 80), r"the image has shape \(1, 100, 80\); expected \(3, H, W\) \(channels first, 3 channels"),
        ((100, 80, 3), r"the image has shape \(100, 80, 3\).*channels-last.*image\.permute\(2, 0, 1\)"),
    ],
    ids=["one-channel", "hwc"],
)
def test_tiled_detection_names_the_image_shape_and_what_was_expected(shape, expected):
    task = ObjectDetector(
        "hourglass", num_classes=2, backbone_kwargs={"num_stacks": 1, "order": 2, "width": 8}, tile_size=32
    ).eval()
    with pytest.raises(ValueError, match=expected):
        tiling.detect(task, [torch.rand(*shape)], task.tiling_options)
    with pytest.raises(ValueError, match=expected):
        TiledDetector(task, tile_size=32)(torch.rand(*shape))
