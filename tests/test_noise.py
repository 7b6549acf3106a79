"""A documented run prints none of the messages that alarmed users (issue 24, point 10): a tiny ``fit``, its
resume with ``--ckpt_path last`` and an ``export``, in-process through ``main`` with ``sys.argv`` as a
console script leaves it, capturing warnings, log records and stderr."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import pytest

from lightning_convnets.cli import main

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
NOISE = (
    "not recommended to provide both args and command line arguments",
    "dataloader is\n not resumable",
    "dataloader is not resumable",
    "isinstance(treespec, LeafSpec)",
    "litlogger",
    "exists and is not empty",
    "The dirpath has changed",
)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _args(root: Path) -> list[str]:
    return [
        "--config", str(QUICKSTART),
        "--trainer.max_epochs=2", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0", "--trainer.accelerator=cpu", "--trainer.log_every_n_steps=1",
        f"--trainer.logger.init_args.save_dir={root / 'logs'}",
        f"--data.init_args.root={root / 'shapes'}",
        "--data.init_args.num_train=12", "--data.init_args.num_val=4", "--data.init_args.num_test=4",
        "--data.init_args.batch_size=4",
        "--model.init_args.backbone_kwargs={stem: cifar, width: 4}",
        "--model.init_args.lr_scheduler=null",
        "--model.init_args.figure_every_n_epochs=0",
    ]  # fmt: skip


@pytest.mark.slow
def test_fit_resume_and_export_print_no_alarming_message(tmp_path, monkeypatch, capfd):
    pytest.importorskip("onnx")
    monkeypatch.chdir(tmp_path)
    handler = _Records()
    logging.getLogger().addHandler(handler)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import lightning_convnets

            lightning_convnets.install_warning_filters()  # catch_warnings reset the import-time filters
            # a console script: sys.argv holds the command line while main() gets the same arguments
            monkeypatch.setattr(sys, "argv", ["lightning-convnets", "fit", *_args(tmp_path)])
            # stop mid-epoch 1 (step 4 of 6; last.ckpt every 50 steps and after validation: here
            # at step 3, the end of epoch 0), then resume
            main(["fit", *_args(tmp_path), "--trainer.max_steps=4"])
            main(["fit", *_args(tmp_path), "--ckpt_path", "last"])
            last = tmp_path / "logs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
            best = next(last.parent.glob("best*.ckpt"))
            main(["export", "--config", str(QUICKSTART), "--ckpt_path", str(best), "--format", "onnx"])
    finally:
        for name in ("", "lightning", "lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).removeHandler(handler)
    assert best.with_suffix(".onnx").is_file()
    printed = capfd.readouterr()
    texts = [str(w.message) for w in caught] + handler.messages + [printed.out, printed.err]
    found = sorted({needle for needle in NOISE for text in texts if needle in text})
    assert not found, found
