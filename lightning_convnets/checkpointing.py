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
import glob
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

__all__ = [
    "AtomicCheckpointIO",
    "AtomicModelCheckpoint",
    "CheckpointMismatchError",
    "atomic_torch_save",
    "describe_checkpoint",
    "find_last_checkpoint",
    "read_checkpoint",
    "weights_mismatch",
]

TEMP_MARKER = ".tmp-"
_NOT_EMPTY = r"Checkpoint directory .* exists and is not empty"
_DIRPATH_CHANGED = r"The dirpath has changed from"
_LAST = re.compile(r"^last(-v?\d+)?\.ckpt$")


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

    Another: without ``dirpath`` the files go where ``ModelCheckpoint`` puts them, the run's own folder
    ``<save_dir>/<name>/version_N/checkpoints``, so a run's best checkpoint is never confused with another
    run's. A resume continues its run in that folder (``lightning-convnets fit --ckpt_path last`` finds
    the newest ``last*.ckpt`` of every version with :func:`find_last_checkpoint` and continues that
    version), so Lightning's "Checkpoint directory ... exists and is not empty" warning, meant for a
    folder that several runs share, is not raised for a per-run folder.

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
        self._fitting = stage == "fit"
        if self.dirpath is not None:
            super().setup(trainer, pl_module, stage)
            return
        # The per-version folder holds this run's files only: it is non-empty exactly when the run
        # resumes itself, which is no reason to warn.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NOT_EMPTY, category=UserWarning)
            super().setup(trainer, pl_module, stage)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``ModelCheckpoint.load_state_dict``; outside ``fit`` (``test``/``predict --ckpt_path``, which run
        in a version folder of their own) without the "dirpath has changed" warning: nothing of the
        callback's state is used there."""
        if getattr(self, "_fitting", True):
            super().load_state_dict(state_dict)
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_DIRPATH_CHANGED, category=UserWarning)
            super().load_state_dict(state_dict)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Remember that the checkpoint's step is saved: Lightning's ``ModelCheckpoint`` starts counting
        from step 0 again, so a run resumed at step S under gradient accumulation would write ``last.ckpt``
        again after its first micro-batch, between the micro-batches of step S + 1 (a checkpoint that loses
        that micro-batch's gradient if the run dies right after it)."""
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        if "global_step" in checkpoint:
            self.mark_saved_at(int(checkpoint["global_step"]))

    def mark_saved_at(self, step: int) -> None:
        """Tell ``ModelCheckpoint`` that ``step`` is already saved. Lightning has no public call for it: this
        adapter is the one writer of its private ``_last_global_step_saved``
        (``tests/test_checkpoint_layout.py`` fails loudly if an upgrade renames it)."""
        self._last_global_step_saved = step

    def save_last_now(self, trainer: Trainer) -> None:
        """Write ``last.ckpt`` now when ``save_last`` is step-triggered. Lightning has no public call for it:
        this adapter is the one reader of ``ModelCheckpoint``'s private members
        (``tests/test_checkpoint_layout.py`` fails loudly if an upgrade renames them)."""
        if (
            self.save_last
            and self._every_n_train_steps >= 1
            and not self._should_skip_saving_checkpoint(trainer)
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``ModelCheckpoint``'s saves, then ``last.ckpt`` for a step-triggered ``save_last``."""
        super().on_validation_end(trainer, pl_module)
        self.save_last_now(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``ModelCheckpoint``'s saves, then ``last.ckpt`` for a step-triggered ``save_last``."""
        super().on_train_end(trainer, pl_module)
        self.save_last_now(trainer)


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


# ------------------------------------------------------------------------------ finding and checking
def find_last_checkpoint(folders: Iterable[str | os.PathLike]) -> Path | None:
    """The most recently written ``last*.ckpt`` (``last.ckpt``, ``last-v1.ckpt``...) in ``folders``.

    Folders may be glob patterns (``lightning_logs/quickstart/version_*/checkpoints``); missing ones are
    skipped. ``lightning-convnets fit --ckpt_path last`` resolves ``last`` with it over the run's version
    folders; in Python: ``trainer.fit(model, ckpt_path=find_last_checkpoint([...]))`` (``None`` starts from
    scratch).

    Example:
        >>> import tempfile, time
        >>> root = Path(tempfile.mkdtemp())
        >>> for version in ("version_0", "version_1"):
        ...     (root / version / "checkpoints").mkdir(parents=True)
        ...     atomic_torch_save({}, root / version / "checkpoints" / "last.ckpt")
        ...     time.sleep(0.01)
        >>> find_last_checkpoint([root / "version_*" / "checkpoints"]).parent.parent.name
        'version_1'
    """
    found: list[Path] = []
    for folder in folders:
        for match in glob.glob(os.path.expanduser(str(folder))):
            if os.path.isdir(match):
                found.extend(p for p in Path(match).iterdir() if _LAST.match(p.name) and p.is_file())
    if not found:
        return None
    return max(found, key=lambda p: (p.stat().st_mtime_ns, str(p)))


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint on the CPU, ``weights_only=True``, memory-mapped where the file allows it (reading
    its hyperparameters then costs no copy of the weights)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model asked for (another task, another backbone); the message says
    in one line what the checkpoint holds and what was asked for."""


def _short(class_path: Any) -> str:
    return str(class_path).rsplit(".", 1)[-1]


def _backbone_text(backbone: Any) -> str:
    if isinstance(backbone, Mapping):
        if "class_path" in backbone:
            return _short(backbone["class_path"])
        if "name" in backbone:
            return repr(backbone["name"])
    if isinstance(backbone, str):
        return repr(backbone)
    if backbone is None:
        return "a module instance (not recorded in its hyperparameters)"
    return type(backbone).__name__


def describe_checkpoint(checkpoint: Mapping[str, Any]) -> tuple[str | None, Any, str]:
    """``(task class name or None, backbone hyperparameter or None, one-phrase description)``.

    The task comes from the ``_class_path`` LightningCLI records (or the ``lightning_convnets.task`` entry a
    task may record); the backbone from the ``backbone`` hyperparameter (absent for a module instance).

    Example:
        >>> describe_checkpoint({"hyper_parameters": {"_class_path": "pkg.ImageClassifier", "backbone": "unet"}})
        ('ImageClassifier', 'unet', "an ImageClassifier with backbone 'unet'")
    """
    hparams = checkpoint.get("hyper_parameters") or {}
    ours = checkpoint.get("lightning_convnets") or {}
    class_path = hparams.get("_class_path") or ours.get("task")
    task = _short(class_path) if class_path else None
    backbone = hparams.get("backbone", ours.get("backbone"))
    article = "an" if task and task[0] in "AEIOU" else "a"
    what = f"{article} {task}" if task else "a model of an unrecorded task"
    return task, backbone, f"{what} with backbone {_backbone_text(backbone)}"


def weights_mismatch(module: torch.nn.Module, state_dict: Mapping[str, Any], prefix: str = "") -> str | None:
    """``None`` when ``state_dict``'s entries under ``prefix`` have exactly ``module``'s names and shapes,
    else a short summary (counts and the first difference).

    Example:
        >>> net = torch.nn.Linear(2, 3)
        >>> weights_mismatch(net, {"weight": torch.zeros(3, 2), "bias": torch.zeros(3)}) is None
        True
        >>> weights_mismatch(net, {"weight": torch.zeros(4, 2), "bias": torch.zeros(4)})
        '2 of another shape (first: bias [4] in the checkpoint, [3] here)'
    """
    mine = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    theirs = {
        k[len(prefix) :]: tuple(getattr(v, "shape", ()))
        for k, v in state_dict.items()
        if k.startswith(prefix)
    }
    missing = sorted(set(mine) - set(theirs))
    unexpected = sorted(set(theirs) - set(mine))
    shapes = sorted(k for k in set(mine) & set(theirs) if mine[k] != theirs[k])
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (first: {prefix}{missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first: {prefix}{unexpected[0]})")
    if shapes:
        k = shapes[0]
        parts.append(
            f"{len(shapes)} of another shape (first: {prefix}{k} {list(theirs[k])} in the checkpoint, "
            f"{list(mine[k])} here)"
        )
    return "; ".join(parts) or None


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python generator states, as plain data (weights-only loadable):
    what a checkpoint needs for a resumed run to draw the same numbers (:func:`set_rng_state`).

    Example:
        >>> state = rng_state(); a = torch.rand(1); set_rng_state(state); bool(torch.rand(1) == a)
        True
    """
    import random

    import numpy as np

    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the generator states :func:`rng_state` recorded (CUDA's when the device count matches)."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
