"""The backbone registry's resolution of a task's ``backbone`` argument (backbones/registry.py):
resolve_backbone, the one dotted-path import (import_object) and the command line's "None" strings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_convnets.tasks
from lightning_convnets.backbones import import_object, resolve_backbone
from lightning_convnets.backbones.registry import none_strings_to_none


def test_resolve_backbone_lives_with_the_registry_and_the_tasks_reexport_it():
    assert lightning_convnets.tasks.resolve_backbone is resolve_backbone
    net = resolve_backbone({"name": "preact_resnet18", "stem": "cifar", "width": 4})
    assert net.out_channels == [4, 8, 16, 32]


def test_a_class_path_is_imported_once_with_errors_that_name_it():
    built = resolve_backbone(
        {"class_path": "lightning_convnets.backbones.unet.UNet", "init_args": {"width": 2, "depth": 2}}
    )
    assert type(built).__name__ == "UNet" and built(torch.zeros(1, 3, 16, 16))[0].shape[-1] == 16
    with pytest.raises(
        TypeError, match=r"'lightning_convnets\.backbones\.unet\.Nope'.*has no attribute 'Nope'"
    ):
        resolve_backbone({"class_path": "lightning_convnets.backbones.unet.Nope"})
    with pytest.raises(TypeError, match=r"must be 'package\.module\.Class'"):
        resolve_backbone({"class_path": "UNet"})
    with pytest.raises(TypeError, match="no_such_package"):
        resolve_backbone({"class_path": "no_such_package.Net"})


def test_import_object_reads_modules_and_their_attributes():
    assert import_object("torch.nn.Conv2d") is nn.Conv2d
    assert import_object("lightning_convnets.tasks") is lightning_convnets.tasks
    with pytest.raises(ValueError, match="expected a dotted name"):
        import_object("not a path")
    with pytest.raises(ImportError):
        import_object("no_such_package.thing")


def test_none_strings_from_the_command_line_become_none():
    assert none_strings_to_none(
        {"encoder_kwargs": {"weights": "None"}, "depth": [1, "None"], "name": "x"}
    ) == {
        "encoder_kwargs": {"weights": None},
        "depth": [1, None],
        "name": "x",
    }
