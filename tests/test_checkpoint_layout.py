"""Where checkpoints go: each run's in its own ``<save_dir>/<name>/version_N/checkpoints``; ``fit --ckpt_path
last`` resumes the newest ``last*.ckpt`` and continues that version; ``fit`` prints its best and last
checkpoint paths."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import pytest
import torch

from lightning_convnets.checkpointing import AtomicModelCheckpoint, atomic_torch_save, find_last_checkpoint
from lightning_convnets.cli import ConvNetsCLI

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def _args(root: Path) -> list[str]:
    # The quickstart's own checkpoint callbacks (best + last every 2 steps here), without the monitors.
    return [
        "--config", str(QUICKSTART),
        "--trainer.max_epochs=2", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0", "--trainer.accelerator=cpu", "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.callbacks=lightning_convnets.checkpointing.AtomicModelCheckpoint",
        "--trainer.callbacks.monitor=val/acc", "--trainer.callbacks.mode=max",
        "--trainer.callbacks.filename=best-epoch{epoch:02d}", "--trainer.callbacks.auto_insert_metric_name=false",
        "--trainer.callbacks+=lightning_convnets.checkpointing.AtomicModelCheckpoint",
        "--trainer.callbacks.save_last=true", "--trainer.callbacks.save_top_k=0",
        "--trainer.callbacks.every_n_train_steps=2",
        f"--trainer.logger.init_args.save_dir={root / 'logs'}",
        f"--data.init_args.root={root / 'shapes'}",
        "--data.init_args.num_train=8", "--data.init_args.num_val=4", "--data.init_args.num_test=4",
        "--data.init_args.batch_size=4",
        "--model.init_args.backbone_kwargs={stem: cifar, width: 4}",
        "--model.init_args.lr_scheduler=null",
        "--model.init_args.figure_every_n_epochs=0", "--model.init_args.num_sample_figures=0",
    ]  # fmt: skip


def test_each_run_keeps_its_checkpoints_and_fit_prints_them(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "logs" / "quickstart"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            ConvNetsCLI(args=["fit", *_args(tmp_path)])
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]  # no shared folder
    for version in ("version_0", "version_1"):
        names = sorted(p.name for p in (runs / version / "checkpoints").iterdir())
        assert names == ["best-epoch00.ckpt", "last.ckpt"] or names == ["best-epoch01.ckpt", "last.ckpt"]
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    out = capsys.readouterr().out
    for version in ("version_0", "version_1"):
        best = next((runs / version / "checkpoints").glob("best*.ckpt"))
        assert f"best checkpoint: {os.path.relpath(best)} (val/acc " in out
        assert f"last checkpoint: {os.path.relpath(runs / version / 'checkpoints' / 'last.ckpt')}" in out


def test_ckpt_path_last_resumes_the_newest_run_in_its_own_folder(tmp_path, capsys):
    runs = tmp_path / "logs" / "quickstart"
    ConvNetsCLI(args=["fit", *_args(tmp_path), "--trainer.max_steps=2"])  # a run that stopped early
    stopped = torch.load(runs / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert stopped["global_step"] == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = ConvNetsCLI(args=["fit", *_args(tmp_path), "--ckpt_path", "last"])
    assert resumed.trainer.ckpt_path == str(runs / "version_0" / "checkpoints" / "last.ckpt")
    assert resumed.trainer.global_step == 4
    assert sorted(p.name for p in runs.iterdir()) == ["version_0"]  # continued in its own version
    assert torch.load(runs / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "exists and is not empty" in m or "dirpath has changed" in m], messages


def test_ckpt_path_last_without_any_last_checkpoint_warns_and_starts_from_scratch(tmp_path):
    with pytest.warns(UserWarning, match=r"--ckpt_path last: no last\*\.ckpt in .*version_\*/checkpoints"):
        cli = ConvNetsCLI(args=["fit", *_args(tmp_path), "--trainer.max_steps=1", "--ckpt_path", "last"])
    assert cli.trainer.ckpt_path is None and cli.trainer.global_step == 1


def test_find_last_checkpoint_takes_the_newest_over_versions(tmp_path):
    for version in ("version_2", "version_10", "version_1"):
        atomic_torch_save({}, tmp_path / version / "checkpoints" / "last.ckpt")
        time.sleep(0.02)
    atomic_torch_save({}, tmp_path / "version_10" / "checkpoints" / "best.ckpt")
    found = find_last_checkpoint([tmp_path / "version_*" / "checkpoints", tmp_path / "missing"])
    assert found == tmp_path / "version_1" / "checkpoints" / "last.ckpt"
    assert find_last_checkpoint([tmp_path / "missing"]) is None


def test_lightning_keeps_the_model_checkpoint_members_the_save_last_adapter_reads():
    import inspect

    from lightning.pytorch.callbacks import ModelCheckpoint

    # AtomicModelCheckpoint.save_last_now is the one reader of these (no public way to write last.ckpt now)
    for name in ("_should_skip_saving_checkpoint", "_save_last_checkpoint", "_monitor_candidates"):
        assert callable(getattr(ModelCheckpoint, name, None)), f"Lightning renamed ModelCheckpoint.{name}"
    assert list(inspect.signature(ModelCheckpoint._save_last_checkpoint).parameters)[1:] == [
        "trainer",
        "monitor_candidates",
    ]
    assert hasattr(ModelCheckpoint(every_n_train_steps=3), "_every_n_train_steps")


def test_lightning_keeps_the_member_the_resumed_step_adapter_writes():
    """AtomicModelCheckpoint.mark_saved_at writes ModelCheckpoint._last_global_step_saved (no public way to
    say the checkpoint's step is saved); ModelCheckpoint must still read it to skip a save at that step."""
    import inspect

    from lightning.pytorch.callbacks import ModelCheckpoint

    assert ModelCheckpoint()._last_global_step_saved == 0, "Lightning renamed ModelCheckpoint._last_global_step_saved"
    source = inspect.getsource(ModelCheckpoint._should_skip_saving_checkpoint)
    assert "_last_global_step_saved" in source, "ModelCheckpoint no longer skips a step it saved already"
    checkpoint = AtomicModelCheckpoint(save_last=True, every_n_train_steps=3)
    checkpoint.mark_saved_at(21)
    assert checkpoint._last_global_step_saved == 21
