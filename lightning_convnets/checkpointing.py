"""Checkpoints that are never half-written, and loaded without unpickling code.

Lightning 2.6's ``TorchCheckpointIO`` serialises into memory and then writes through an fsspec
transaction: on a local disk the bytes go to a temporary file made by ``tempfile.mkstemp()`` (the
system temp folder, often another filesystem), which is then ``shutil.move``-d over the target. When
the two folders are on different filesystems that move is a copy *into the target file*, and nothing
is ever ``fsync``-ed: a SIGKILL or a power loss during the copy leaves a truncated ``last.ckpt`` in
place of the last good one. :class:`AtomicCheckpointIO` writes next to the target instead (same folder,
so the rename is atomic), fsyncs the file, renames it over the target with ``os.replace`` and fsyncs the
folder. :class:`AtomicModelCheckpoint` is a ``ModelCheckpoint`` that installs it; every config uses it.

Loading defaults to ``weights_only=True`` (plain tensors, containers and numbers only): a checkpoint
carrying a pickled object of an unknown class is refused instead of running its code.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["AtomicCheckpointIO", "AtomicModelCheckpoint", "atomic_torch_save"]

TEMP_MARKER = ".tmp-"


def _fsync_dir(folder: Path) -> None:
    # A rename is durable only once the folder's entry is on disk (POSIX); Windows cannot open folders.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``.

    The bytes go to ``.<name>.tmp-<pid>`` in the same folder, are flushed and fsync-ed, then renamed
    over ``path`` (``os.replace``: atomic on POSIX and Windows) and the folder is fsync-ed. Until the
    rename, ``path`` still holds its previous content; a writer killed before it leaves at most a
    stray temporary file (removed on the next save in that folder by the same process id, harmless
    otherwise: its name never matches ``*.ckpt``).

    Args:
        obj: anything ``torch.save`` accepts.
        path: the target file; its folder is created if needed.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> atomic_torch_save({"w": torch.ones(2)}, folder / "a.ckpt")
        >>> torch.load(folder / "a.ckpt", weights_only=True)["w"].tolist(), sorted(os.listdir(folder))
        ([1.0, 1.0], ['a.ckpt'])
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}{TEMP_MARKER}{os.getpid()}")
    try:
        with open(temp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _fsync_dir(target.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic, durable local writes and ``weights_only=True`` loading.

    Local paths are written with :func:`atomic_torch_save`; remote (fsspec URL) paths fall back to
    Lightning's own transaction. ``load_checkpoint`` uses ``weights_only=True`` unless the caller passes
    ``weights_only=False`` explicitly (only for a checkpoint you trust: it may then run arbitrary code).

    Use it directly as a trainer plugin (``trainer.plugins: [lightning_convnets.checkpointing.
    AtomicCheckpointIO]``) or let :class:`AtomicModelCheckpoint` install it.

    Example:
        >>> import tempfile
        >>> io = AtomicCheckpointIO()
        >>> path = Path(tempfile.mkdtemp()) / "c.ckpt"
        >>> io.save_checkpoint({"state_dict": {"w": torch.zeros(1)}}, path)
        >>> io.load_checkpoint(path)["state_dict"]["w"].tolist()
        [0.0]
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options")
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self,
        path: Any,
        map_location: Any | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Load with ``weights_only=True`` unless ``weights_only=False`` is passed explicitly."""
        return super().load_checkpoint(
            path, map_location=map_location, weights_only=True if weights_only is None else weights_only
        )


def _is_local(path: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(get_filesystem(str(path)), LocalFileSystem) and "://" not in str(path)


class AtomicModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose files are written atomically (:class:`AtomicCheckpointIO`).

    At ``setup`` it replaces the strategy's plain ``TorchCheckpointIO`` (the default) with
    :class:`AtomicCheckpointIO`, so every save of the run (this callback's, other ``ModelCheckpoint``
    instances', ``trainer.save_checkpoint``) is atomic. A custom ``CheckpointIO`` set by the user is left
    alone (with an info line). Every argument is ``ModelCheckpoint``'s.

    One difference from ``ModelCheckpoint``: with ``save_last`` and ``every_n_train_steps``, ``last.ckpt``
    is also written after each validation and at the end of training (``ModelCheckpoint`` takes the
    step trigger as exclusive of the epoch trigger, so its ``last.ckpt`` would lag behind a finished
    epoch by up to ``every_n_train_steps`` steps).

    Another: without ``dirpath``, the files go to ``<logger save_dir>/<logger name>/checkpoints``, one
    folder for all versions of a run (``ModelCheckpoint`` uses ``.../version_N/checkpoints``, and a new run
    increments N, so ``--ckpt_path last`` would find nothing there and silently start from scratch).

    The configs use two of them: one keeping the best checkpoint of the monitored metric, and one
    (``save_last=True, save_top_k=0, every_n_train_steps=N``) writing ``last.ckpt`` every N optimizer
    steps and after each validation, so that ``lightning-convnets fit --config ... --ckpt_path last``
    resumes a killed run.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> last = AtomicModelCheckpoint(dirpath="checkpoints/demo", save_last=True, save_top_k=0,
        ...                              every_n_train_steps=100)
        >>> trainer = Trainer(callbacks=[last], logger=False, enable_progress_bar=False)
        >>> trainer.checkpoint_callback is last
        True
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Install :class:`AtomicCheckpointIO` on the strategy, then ``ModelCheckpoint.setup``."""
        install_atomic_io(trainer)
        self._use_run_folder(trainer)
        super().setup(trainer, pl_module, stage)

    def _use_run_folder(self, trainer: Trainer) -> None:
        if self.dirpath is not None:
            return
        if trainer.loggers:
            logger = trainer.loggers[0]
            root = logger.save_dir or trainer.default_root_dir
            name = logger.name
            folder = (
                os.path.join(str(root), str(name), "checkpoints")
                if name
                else os.path.join(str(root), "checkpoints")
            )
        else:
            folder = os.path.join(trainer.default_root_dir, "checkpoints")
        self.dirpath = os.path.realpath(os.path.expanduser(folder)) if _is_local(folder) else folder

    def _find_last_checkpoints(self, trainer: Trainer) -> set[str]:
        # Called by fit(ckpt_path="last") before setup: the folder must be the run folder already.
        self._use_run_folder(trainer)
        return super()._find_last_checkpoints(trainer)

    def _save_last_now(self, trainer: Trainer) -> None:
        if (
            self.save_last
            and self._every_n_train_steps >= 1
            and not self._should_skip_saving_checkpoint(trainer)
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``ModelCheckpoint``'s saves, then ``last.ckpt`` for a step-triggered ``save_last``."""
        super().on_validation_end(trainer, pl_module)
        self._save_last_now(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``ModelCheckpoint``'s saves, then ``last.ckpt`` for a step-triggered ``save_last``."""
        super().on_train_end(trainer, pl_module)
        self._save_last_now(trainer)


def install_atomic_io(trainer: Trainer) -> bool:
    """Replace ``trainer.strategy``'s plain ``TorchCheckpointIO`` by :class:`AtomicCheckpointIO`.

    Returns whether the strategy now writes atomically (``False`` for a custom CheckpointIO, which is
    left in place).
    """
    strategy = trainer.strategy
    try:
        current = strategy.checkpoint_io
    except (AttributeError, NotImplementedError):
        return False
    if isinstance(current, AtomicCheckpointIO):
        return True
    if type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
        return True
    rank_zero_info(
        f"AtomicModelCheckpoint: the strategy uses {type(current).__name__}, not TorchCheckpointIO; "
        "its checkpoint writes are left as they are (not made atomic)"
    )
    return False
