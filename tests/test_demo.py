"""The demo (``make demo``): argument handling, the summary table, and each task's fit -> test -> predict
run in-process with tiny settings (classification in the fast suite; segmentation and detection slow)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from lightning_convnets import demo


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_parse_args_selects_tasks_and_passes_the_rest_through():
    assert demo.parse_args([]) == (list(demo.TASKS), False, [])
    assert demo.parse_args(["--task", "detection"]) == (["detection"], False, [])
    assert demo.parse_args(["--task", ""]) == (list(demo.TASKS), False, [])  # make demo TASK=
    assert demo.parse_args(["--task=Segmentation", "--full", "--trainer.max_epochs", "1"]) == (
        ["segmentation"],
        True,
        ["--trainer.max_epochs", "1"],
    )
    with pytest.raises(SystemExit):
        demo.parse_args(["--task", "regression"])


def test_every_quickstart_config_exists_and_the_demo_shortens_it():
    for task, spec in demo.QUICKSTARTS.items():
        assert demo.find_config(spec.config).is_file(), task
        assert "--trainer.max_epochs" in spec.demo_args and spec.shortened and spec.promise
    with pytest.raises(ValueError, match="task must be one of"):
        demo.run_task("regression", [])


def test_busy_machine_uses_one_thread_unless_told():
    assert demo.busy_machine_threads(load=6.0, cores=2, env={}) == 1
    assert demo.busy_machine_threads(load=0.3, cores=2, env={}) is None
    assert demo.busy_machine_threads(load=6.0, cores=2, env={"OMP_NUM_THREADS": "2"}) is None


def test_summary_table_names_every_place_and_says_the_runs_are_shortened(tmp_path):
    logs = tmp_path / "lightning_logs" / "shapes_segmentation" / "version_3"
    (logs / "checkpoints").mkdir(parents=True)
    (logs / "predictions" / "masks").mkdir(parents=True)
    ckpt = logs / "checkpoints" / "best-epoch02.ckpt"
    overlay = logs / "predictions" / "masks_overlay.png"
    for f in (ckpt, overlay):
        f.write_bytes(b"x")
    result = {
        "task": "segmentation",
        "model": "U-Net",
        "metric": "test/miou",
        "score": 0.9123,
        "fit_seconds": 61.2,
        "fit_cpu_seconds": 58.0,
        "best_checkpoint": str(ckpt),
        "log_dir": str(logs),
        "figures": ["a.png", "b.png"],
        "predictions": [str(overlay), str(logs / "predictions" / "masks")],
        "shortened": "3 epochs instead of 5",
    }
    text = demo.format_summary(
        [result, {**result, "task": "detection", "score": None, "shortened": ""}], 100.0
    )
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| task"))
    for column in ("model", "test metric", "fit (CPU)", "logs", "checkpoint", "figures", "predictions"):
        assert column in header
    row = next(line for line in lines if line.startswith("| segmentation"))
    assert "miou 0.912" in row and "61 s (58 s)" in row and str(logs) in row
    assert "<logs>/checkpoints/best-epoch02.ckpt" in row and "(2 PNG)" in row
    assert "<logs>/predictions/masks_overlay.png" in row and "<logs>/predictions/masks/" in row
    assert "n/a" in next(line for line in lines if line.startswith("| detection"))
    assert "shortened" in text and demo.QUICKSTARTS["segmentation"].promise in text
    assert "Total demo time: 100 s" in text
    assert demo.format_summary([]) == "No quickstart ran."


def _tiny(tmp_path: Path) -> list[str]:
    return [
        "--trainer.max_epochs=1",
        "--trainer.check_val_every_n_epoch=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
        "--trainer.limit_predict_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.precision=32",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--data.init_args.batch_size=4",
        f"--data.init_args.root={tmp_path / 'shapes'}",
        "--data.init_args.num_train=8",
        "--data.init_args.num_val=4",
        "--data.init_args.num_test=4",
    ]


TINY_MODELS = {
    "classification": ["--model.init_args.backbone_kwargs={stem: cifar, width: 4}"],
    "segmentation": [
        "--model.init_args.backbone_kwargs={width: 4, depth: 2, norm: batch}",
        "--data.init_args.image_size=32",
    ],
    "detection": [
        '--model.init_args.backbone_kwargs={"num_stacks": 2, "order": 2, "width": 8}',
        "--model.init_args.head_channels=4",
    ],
}


@pytest.mark.parametrize(
    "task",
    [
        "classification",
        pytest.param("segmentation", marks=pytest.mark.slow),
        pytest.param("detection", marks=pytest.mark.slow),
    ],
)
def test_run_task_fits_tests_predicts_into_one_folder(tmp_path, monkeypatch, capsys, task):
    monkeypatch.chdir(tmp_path)
    result = demo.run_task(task, [*_tiny(tmp_path), *TINY_MODELS[task]])
    log_dir = Path(result["log_dir"])
    # the checkpoints sit beside the version folders (<save_dir>/<name>/checkpoints: AtomicModelCheckpoint)
    best = Path(result["best_checkpoint"])
    assert best.is_file() and best.parent == log_dir.parent / "checkpoints"
    # test and predict wrote into the fit's folder: no second logger version, the fit's config kept.
    assert sorted(p.name for p in log_dir.parent.iterdir()) == ["checkpoints", log_dir.name]
    assert (log_dir / "config.yaml").is_file()
    metric = demo.QUICKSTARTS[task].metric
    assert result["metric"] == metric and result["score"] == result["test_metrics"][metric]
    assert 0.0 <= result["score"] <= 1.0 and result["fit_seconds"] > 0
    assert result["figures"] and all(Path(f).parent == log_dir / "figures" for f in result["figures"])
    predictions = log_dir / "predictions"
    if task == "classification":
        with open(predictions / "probabilities.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 4 and {"predicted", "p_circle", "p_cross"} <= set(rows[0])
        assert set(result["test_metrics"]) >= {"test/acc", "test/loss", "test/f1"}
        names = [Path(f).name for f in result["figures"]]
        assert any("confusion_matrix" in n for n in names) and any("samples" in n for n in names)
    elif task == "segmentation":
        assert len(list((predictions / "masks").glob("*.png"))) == 4
        assert (predictions / "masks_overlay.png").is_file()
    else:
        entries = json.loads((predictions / "coco_results.json").read_text())
        assert all(e["category_id"] in (1, 2, 3, 4) for e in entries)
        assert (predictions / "boxes_overlay.png").is_file()
    assert {str(p) for p in predictions.iterdir()} <= set(result["predictions"]) | {
        str(predictions / "masks")
    }

    text = demo.format_summary([result])
    assert task in text and "checkpoints/best" in text  # beside the version folder, shown relative


def test_main_runs_the_chosen_task_and_prints_the_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    results = demo.main(["--task", "classification", *_tiny(tmp_path), *TINY_MODELS["classification"]])
    assert [r["task"] for r in results] == ["classification"]
    out = capsys.readouterr().out
    assert "Demo summary" in out and "| classification" in out and "Total demo time" in out
