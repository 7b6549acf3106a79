"""The one drawing module (lightning_convnets/drawing.py): one palette for the mask PNGs, the mask and box
overlays of the writers and the tasks' sample figures; images shown with the data's normalisation undone."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from lightning_convnets import drawing

PACKAGE = Path(drawing.__file__).parent


def test_the_palette_is_pascal_voc_and_every_class_colour_comes_from_it():
    colours = np.asarray(drawing.palette(256)).reshape(256, 3)
    assert colours[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert len({tuple(c) for c in colours}) == 256
    for label in (0, 1, 7, 255):
        assert drawing.class_colour(label) == pytest.approx(tuple(colours[label] / 255))


def test_display_images_undo_the_normalisation_or_stretch():
    images = torch.tensor([[[[-1.0, 1.0]]], [[[0.0, 2.0]]]])  # (2, 1, 1, 2)
    shown = drawing.display_images(images, mean=[0.5], std=[0.5])
    assert shown.shape == (2, 1, 2, 1) and shown[0, 0, :, 0].tolist() == [0.0, 1.0]
    stretched = drawing.display_images(images)  # no statistics: each image to [0, 1]
    assert stretched[1, 0, :, 0].tolist() == [0.0, 1.0]
    assert drawing.display_images(torch.rand(1, 5, 4, 4), rgb=True).shape == (
        1,
        4,
        4,
        3,
    )  # extra channels dropped
    assert drawing.display_images(torch.rand(1, 1, 4, 4), rgb=True).shape == (1, 4, 4, 3)  # gray repeated


def test_a_mask_tints_its_classes_in_their_colours_and_leaves_background_and_ignore_alone():
    fig, ax = plt.subplots()
    mask = np.array([[0, 1], [2, 255]])
    drawing.draw_mask(ax, mask, num_classes=3)
    image = ax.get_images()[-1]
    assert image.get_array().mask.tolist() == [[True, False], [False, True]]
    rgba = image.cmap(image.norm(np.array([1, 2])))
    assert rgba[0][:3] == pytest.approx(drawing.class_colour(1)) and rgba[1][:3] == pytest.approx(
        drawing.class_colour(2)
    )
    plt.close(fig)


def test_boxes_below_the_threshold_are_left_out_and_true_boxes_are_dashed():
    fig, ax = plt.subplots()
    boxes = np.array([[0, 0, 4, 4], [1, 1, 5, 5]], dtype=float)
    drawn = drawing.draw_boxes(
        ax, boxes, labels=[0, 1], scores=[0.9, 0.1], names=["cat", "dog"], score_threshold=0.5
    )
    assert drawn == 1 and [t.get_text() for t in ax.texts] == ["cat 0.90"]
    assert ax.patches[0].get_edgecolor()[:3] == pytest.approx(
        drawing.class_colour(1)
    )  # label 0: mask colour 1
    assert drawing.draw_boxes(ax, boxes, truth=True) == 2 and ax.patches[-1].get_linestyle() == "--"
    plt.close(fig)


def test_the_overlay_figures_have_a_panel_per_image_and_a_legend_of_the_classes():
    picture = np.zeros((8, 8, 3))
    mask = np.zeros((8, 8), dtype=np.int64)
    mask[2:4, 2:4] = 1
    fig = drawing.plot_mask_overlays([(picture, mask, mask), (picture, None, mask)], ["background", "square"])
    assert len(fig.axes) == 6 and [t.get_text() for t in fig.legends[0].get_texts()] == ["square"]
    plt.close(fig)
    det = {"boxes": np.array([[1.0, 1, 5, 5]]), "labels": np.array([0]), "scores": np.array([0.8])}
    fig = drawing.plot_box_overlays(
        [(picture, det, {"boxes": det["boxes"]}), (picture, det, None)], ["square"]
    )
    assert [ax.get_title() for ax in fig.axes[:2]] == ["1 boxes >= 0.3 (dashed: true)", "1 boxes >= 0.3"]
    plt.close(fig)


def test_drawing_happens_only_in_the_drawing_module():
    # overlays (masked tints, box patches) and the palette have one home; other modules call it
    for path in PACKAGE.rglob("*.py"):
        if path.name == "drawing.py":
            continue
        text = path.read_text()
        for pattern in (r"\bRectangle\(", r"masked_where", r"putpalette\(_", r"def _palette", r"get_cmap\("):
            assert not re.search(pattern, text), f"{path.relative_to(PACKAGE)} draws itself ({pattern})"
