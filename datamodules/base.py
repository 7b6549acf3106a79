"""The shared LightningDataModule base: loader settings, transforms, dataset metadata, seeded splits.

Start with :class:`ConvDataModule`: it declares every argument the data modules share (they forward them
with ``**kwargs``), builds the loaders in one place and calls the two methods a subclass implements,
``resolve_class_names`` and ``build_datasets`` (``docs/data.md``, "Write your own data module").
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from .datasets import ImageListDataset, detection_collate
from .io import DataValidationError, scan_predict_folder
from .sampling import ResumableSampler
from .transforms import TransformSpec, build_pipeline

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_UNUSED_BY_TASK = {
    "classification": ("ignore_index", "min_visibility", "min_area"),
    "segmentation": ("min_visibility", "min_area"),
    "detection": ("ignore_index",),
}


def _fit_stats(
    values: Sequence[float] | None, in_channels: int, default: Sequence[float], name: str
) -> tuple:
    values = tuple(default) if values is None else tuple(float(v) for v in values)
    if in_channels == 1 and len(values) == 3:
        # Grayscale input with RGB statistics (e.g. the ImageNet defaults): use their average.
        values = (sum(values) / 3,)
    if len(values) != in_channels:
        raise ValueError(f"{name} has {len(values)} values but in_channels={in_channels}")
    return values


def seeded_split(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split ``range(n)`` into consecutive parts of a seeded permutation.

    ``fractions`` are the shares of all parts but the first, which takes the rest (so rounding never
    loses an example). Returns sorted index arrays, first part first.

    Example:
        >>> parts = seeded_split(10, [0.2, 0.1], seed=0)
        >>> [len(part) for part in parts], sorted(i for part in parts for i in part.tolist()) == list(range(10))
        ([7, 2, 1], True)
    """
    order = np.random.default_rng(seed).permutation(n)
    sizes = [round(f * n) for f in fractions]
    if sum(sizes) > n:
        raise ValueError(f"split fractions {list(fractions)} leave no examples out of {n}")
    parts, start = [], n - sum(sizes)
    parts.append(np.sort(order[:start]))
    for size in sizes:
        parts.append(np.sort(order[start : start + size]))
        start += size
    return parts


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Like :func:`seeded_split` but keeping the class balance in every part.

    Part sizes match :func:`seeded_split` (``round(fraction * n)``); each class contributes its share,
    the rounding remainders going to the classes with the largest fractional shares.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    members = [
        np.random.default_rng([seed, offset]).permutation(np.flatnonzero(labels == cls))
        for offset, cls in enumerate(classes)
    ]
    counts = np.array([len(m) for m in members])
    taken = np.zeros(len(classes), np.int64)
    parts: list[np.ndarray] = []
    for fraction in fractions:
        quota = fraction * counts
        sizes = np.floor(quota).astype(np.int64)
        missing = round(fraction * len(labels)) - int(sizes.sum())
        room = counts - taken - sizes
        for i in np.argsort(-(quota - sizes), kind="stable"):
            if missing <= 0:
                break
            if room[i] > 0:
                sizes[i] += 1
                missing -= 1
        sizes = np.minimum(sizes, counts - taken)
        parts.append(np.concatenate([m[t : t + k] for m, t, k in zip(members, taken, sizes)]))
        taken += sizes
    rest = np.concatenate([m[t:] for m, t in zip(members, taken)])
    return [np.sort(p).astype(np.int64) for p in [rest, *parts]]


def carve_splits(
    samples: dict[str, list],
    fractions: Mapping[str, float],
    seed: int,
    label: Callable[[Any], int] | None = None,
) -> dict[str, list]:
    """Fill the splits missing from ``samples`` by carving ``fractions`` out of ``samples["train"]``.

    A split already in ``samples`` (it had its own folder or file) or with a fraction of 0 is left
    alone. With ``label`` (a sample's class), the carving keeps the class balance
    (:func:`stratified_split`), else it is a plain :func:`seeded_split`. Returns ``samples``, updated.

    Example:
        >>> out = carve_splits({"train": list("abcdefghij")}, {"val": 0.2, "test": 0.0}, seed=0)
        >>> {split: len(items) for split, items in out.items()}
        {'train': 8, 'val': 2}
    """
    carve = [(split, f) for split, f in fractions.items() if split not in samples and f > 0]
    if carve:
        pool = samples["train"]
        shares = [f for _, f in carve]
        if label is None:
            parts = seeded_split(len(pool), shares, seed)
        else:
            parts = stratified_split([label(item) for item in pool], shares, seed)
        samples["train"] = [pool[i] for i in parts[0]]
        for (split, _), idx in zip(carve, parts[1:]):
            samples[split] = [pool[i] for i in idx]
    return samples


def describe_change(saved: Sequence[Any], now: Sequence[Any]) -> str:
    """``"removed [...], added [...]"`` or ``"reordered"``: how ``now`` differs from ``saved``.

    Example:
        >>> describe_change(["cat", "dog"], ["cat", "dog", "fox"]), describe_change([1, 2], [2, 1])
        ("added ['fox']", 'same entries, reordered')
    """
    removed = [c for c in saved if c not in now]
    added = [c for c in now if c not in saved]
    parts = ([f"removed {removed}"] if removed else []) + ([f"added {added}"] if added else [])
    return ", ".join(parts) or "same entries, reordered"


def _world_and_rank(trainer: Any) -> tuple[int, int]:
    """``(trainer.world_size, trainer.global_rank)``, ``(1, 0)`` without a trainer."""
    if trainer is None:
        return 1, 0
    return max(1, int(getattr(trainer, "world_size", 1) or 1)), int(getattr(trainer, "global_rank", 0) or 0)


def auto_num_workers(cpus: int | None = None, processes: int = 1) -> int:
    """DataLoader workers for ``num_workers="auto"``: ``0`` when a training process has at most two CPUs of
    its own, else ``min(8, cpus_per_process - 1)`` (one core stays with the training step).

    Two CPUs are the line because a worker then takes one of the two cores the step's own threads use:
    on a 2-core machine one worker delivered fewer images/s than the main process for every task's
    shapes loader, which alone ran 4-10x faster than the step (``benchmarks/bench_data.py``). The environment variable ``LIGHTNING_CONVNETS_NUM_WORKERS`` (an int)
    overrides the rule.

    Args:
        cpus: CPUs this process may run on (default: its affinity set, else ``os.cpu_count()``).
        processes: training processes sharing them (DDP ranks on this machine).

    Example:
        >>> auto_num_workers(cpus=2), auto_num_workers(cpus=4), auto_num_workers(cpus=64), auto_num_workers(16, 4)
        (0, 3, 8, 3)
    """
    override = os.environ.get("LIGHTNING_CONVNETS_NUM_WORKERS")
    if override is not None and cpus is None:
        try:
            value = int(override)
        except ValueError:
            value = -1
        if value < 0:
            raise ValueError(f"LIGHTNING_CONVNETS_NUM_WORKERS must be an int >= 0, got {override!r}")
        return value
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cpus // max(1, processes)
    return 0 if per_process <= 2 else min(8, per_process - 1)


class ConvDataModule(LightningDataModule):
    """Base of every data module here: loaders, transforms, and the metadata tasks read.

    Subclasses set ``task`` and implement the two extension points, :meth:`resolve_class_names` and
    :meth:`build_datasets` (usually with :func:`carve_splits` and :meth:`assign_datasets`); they take their
    own arguments and forward the ones below with ``**kwargs``. (The old private names
    ``_resolve_class_names`` and ``_build_datasets`` still work for one release, with a
    ``DeprecationWarning`` when the class is defined.) After ``setup`` (and before it wherever the
    constructor arguments tell), the module exposes ``num_classes``, ``class_names``,
    ``in_channels``, ``mean``, ``std``, ``num_train_examples``.

    Args:
        batch_size: examples per batch (all splits).
        num_workers: DataLoader worker processes, or ``"auto"`` (:func:`auto_num_workers`: none on a machine
            of one or two CPUs, where a worker takes a core from the training step, else
            ``min(8, cpus - 1)`` per training process; the environment variable
            ``LIGHTNING_CONVNETS_NUM_WORKERS`` overrides it).
        pin_memory: pin host memory (useful with a GPU).
        persistent_workers: keep workers between epochs; ``None``: whenever there are workers (they
            start once, not at every epoch and validation).
        image_size: side of the square images the loaders return; ``None`` keeps file sizes.
        in_channels: 1 (grayscale) or 3 (RGB); files are converted on load.
        mean, std: normalisation statistics (0..1 scale), one per channel.
        train_transforms, eval_transforms: augmentation specs (see ``transforms``).
        resize: ``"resize"`` (stretch) or ``"letterbox"`` (keep aspect, pad).
        verify_images: check every file cheaply in ``setup`` (PIL ``verify``) so a broken file fails
            before training; turn off for very large datasets (errors then surface when loaded).
        seed: seed of the train/val/test splits.
        drop_last: drop the last incomplete training batch.
        ignore_index: segmentation mask value meaning "no label".
        min_visibility, min_area: detection box dropping rule (see ``transforms.build_pipeline``).
        allow_symlinks_outside_root: follow image (and mask) symlinks that lead outside the data root
            (COCO ``file_name`` entries, image and mask folders); by default such a link is refused with a
            :class:`DataValidationError`.
        predict_dir: a folder of new images (any sizes, no labels) that ``predict`` reads instead of the
            test split: every image file directly inside it, sorted by name (other files are skipped,
            subfolders not searched), each checked in ``setup``, with the test split's ``mean``/``std`` and
            ``eval_transforms``. A missing or empty folder or an unreadable file raises a
            :class:`DataValidationError` naming it. The training data is not read (the shapes are not
            generated); only the class names are needed. Detection batches carry ``image_id`` (the
            file's position in the sorted folder) and ``orig_size`` (the file's height, width).
        predict_resize: bring the ``predict_dir`` images to ``image_size`` like the test split (``True``)
            or keep each file's size (``False``); ``None``: resize for classification, keep the size for
            segmentation and detection (masks and boxes then come out in the file's pixels; for images
            much larger than the training ones set the model's ``tile_size``). Images kept at their size
            are batched ``batch_size`` at a time when they all share one size (detection: always, as
            lists), else one per batch.
        default_mean, default_std: the statistics used when ``mean``/``std`` are not given; ``None``:
            the class's ``default_mean``/``default_std`` attributes (ImageNet's; CIFAR-10's or the shapes
            generator's in those modules).

    Example (a sketch, not run by the doctests: ``make_dataset`` stands for your own dataset class):
        >>> class TinyFolder(ConvDataModule):  # doctest: +SKIP
        ...     def resolve_class_names(self):
        ...         return ["a", "b"]
        ...     def build_datasets(self, splits):
        ...         for split in splits:
        ...             dataset = make_dataset(split, self.pipeline(split == "train"))
        ...             setattr(self, f"{split}_dataset", dataset)
    """

    task: Literal["classification", "segmentation", "detection"] = "classification"
    default_mean: tuple[float, ...] = IMAGENET_MEAN
    default_std: tuple[float, ...] = IMAGENET_STD

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _adopt_old_extension_names(cls)

    def __init__(
        self,
        batch_size: int = 32,
        num_workers: int | Literal["auto"] = "auto",
        pin_memory: bool = False,
        persistent_workers: bool | None = None,
        image_size: int | None = None,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        train_transforms: TransformSpec = "default",
        eval_transforms: TransformSpec = "default",
        resize: Literal["resize", "letterbox"] = "resize",
        verify_images: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        ignore_index: int = 255,
        min_visibility: float = 0.3,
        min_area: float = 1.0,
        allow_symlinks_outside_root: bool = False,
        predict_dir: str | None = None,
        predict_resize: bool | None = None,
        default_mean: Sequence[float] | None = None,
        default_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        # Every __init__ frame up the subclass chain is read: the subclass's own arguments are saved too.
        # Arguments this kind of data does not use stay out (Lightning refuses module and datamodule
        # hyperparameters that share a key with different values, e.g. a segmenter's ignore_index).
        self.save_hyperparameters(ignore=["default_mean", "default_std", *_UNUSED_BY_TASK[self.task]])
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers != "auto" and (
            isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0
        ):
            raise ValueError(f"num_workers must be an int >= 0 or 'auto', got {num_workers!r}")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be positive or None, got {image_size}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.image_size = image_size
        self._in_channels = in_channels
        self._mean = _fit_stats(mean, in_channels, default_mean or self.default_mean, "mean")
        self._std = _fit_stats(std, in_channels, default_std or self.default_std, "std")
        self.train_transforms = train_transforms
        self.eval_transforms = eval_transforms
        self.resize = resize
        self.verify_images = verify_images
        self.seed = seed
        self.drop_last = drop_last
        self.ignore_index = ignore_index
        self.min_visibility = min_visibility
        self.min_area = min_area
        self.allow_symlinks_outside_root = allow_symlinks_outside_root
        self.predict_dir = Path(predict_dir).expanduser() if predict_dir is not None else None
        self.predict_resize = predict_resize
        self._predict_batch_size = batch_size
        self._class_names: list[str] | None = None
        self._shuffle_seed: int | None = None  # seed of the training order (drawn once, checkpointed)
        # (epoch, positions of its order consumed by all ranks) and the world size that wrote them
        self._resume_position: tuple[int, int] | None = None
        self._resume_world_size = 1
        self.train_sampler: ResumableSampler | None = None
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self.predict_dataset: ImageListDataset | None = None

    # ----------------------------------------------------------------- metadata the tasks read
    @property
    def class_names(self) -> list[str]:
        """Class names in label order (index i is label i)."""
        if self._class_names is None:
            self._class_names = list(self.resolve_class_names())
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        """Number of classes (for segmentation, including the background class when the data has one)."""
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        """Image channels of the batches (1 or 3)."""
        return self._in_channels

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel normalisation mean (0..1 scale)."""
        return self._mean

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel normalisation standard deviation (0..1 scale)."""
        return self._std

    @property
    def num_train_examples(self) -> int:
        """Number of training examples (images); exact after ``setup('fit')``."""
        if self.train_dataset is None:
            self.setup("fit")
        return len(self.train_dataset)  # type: ignore[arg-type]

    def resolve_class_names(self) -> Sequence[str]:
        """Extension point: the class names in label order, read from the data (folder names, a COCO
        json, mask values) or from the module's arguments.

        Called once, on the first access to :attr:`class_names`, unless the constructor already set
        ``self._class_names`` (names given as an argument, or fixed by the dataset). Called before any
        dataset is built, so that :meth:`build_datasets` can use ``self.num_classes``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement resolve_class_names()")

    _resolve_class_names = resolve_class_names  # the old name (deprecated): see _adopt_old_extension_names

    # ----------------------------------------------------------------------- transforms, loaders
    def pipeline(self, train: bool, keep_size: bool = False) -> Callable[..., dict[str, Any]]:
        """The albumentations pipeline for the training (``train=True``) or evaluation splits;
        ``keep_size=True`` leaves out the resize to ``image_size``."""
        return build_pipeline(
            self.train_transforms if train else self.eval_transforms,
            kind=self.task,
            train=train,
            image_size=None if keep_size else self.image_size,
            mean=self.mean,
            std=self.std,
            resize=self.resize,
            ignore_index=self.ignore_index,
            min_visibility=self.min_visibility,
            min_area=self.min_area,
        )

    def setup(self, stage: str | None = None) -> None:
        """Index and check the files of the splits ``stage`` needs (idempotent); for ``predict``, the
        ``predict_dir`` images when given, else the test split."""
        needed = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("test",),
            None: ("train", "val", "test"),
        }.get(stage, ("train", "val", "test"))
        if stage == "predict" and self.predict_dir is not None:
            needed = ()
            if self.predict_dataset is None:
                self.predict_dataset = self.build_predict_dataset()
        missing = [s for s in needed if getattr(self, f"{s}_dataset") is None]
        if missing:
            self.build_datasets(missing)
        self._record_num_classes()

    def _record_num_classes(self) -> None:
        # A num_classes argument left None (the count is read from the data) is recorded as the count found:
        # the task records the count it uses too, and Lightning refuses to log module and datamodule
        # hyperparameters that share a key with different values (None against 5).
        if "num_classes" in self.hparams and self.hparams["num_classes"] is None:
            self.save_hyperparameters({"num_classes": self.num_classes})

    def build_predict_dataset(self) -> Dataset:
        """The :class:`ImageListDataset` of ``predict_dir`` (see the ``predict_dir`` and ``predict_resize``
        arguments); also decides its batch size. For segmentation and detection, TIFF files and ``.zarr``
        stores are not loaded: the dataset (a ``datasets.PredictImages``) gives them as
        ``datasets.StreamedImage`` items, one per batch, which the task reads window by window.

        Raises:
            DataValidationError: naming ``predict_dir`` when it is unset, missing or holds no image, or the
                file that is unreadable; naming two images that share a file stem where their outputs
                would: for segmentation (``<stem>.png``/``<stem>.tif``), for streamed detection
                (``<stem>.json``).
        """
        if self.predict_dir is None:
            raise DataValidationError(f"{type(self).__name__}: predict_dir is not set")
        from .datasets import PredictImages
        from .io import is_streamed_image

        streams = self.task in ("segmentation", "detection")
        found = scan_predict_folder(self.predict_dir, "predict_dir", streamed=streams)
        paths = [path for path, _ in found]
        if streams:
            stems: dict[str, Path] = {}
            named = paths if self.task == "segmentation" else [p for p in paths if is_streamed_image(p)]
            for path in named:
                if path.stem in stems:
                    raise DataValidationError(
                        f"{path}: predict_dir holds two images with the stem {path.stem!r} ({stems[path.stem].name}); "
                        "their predictions would both be written to the same file: rename one"
                    )
                stems[path.stem] = path
        resize = self.task == "classification" if self.predict_resize is None else bool(self.predict_resize)
        same_size = (resize and self.image_size is not None) or len({size for _, size in found}) == 1
        self._predict_batch_size = self.batch_size if same_size or self.task == "detection" else 1
        pipeline = self.pipeline(train=False, keep_size=not resize)
        dataset = ImageListDataset(paths, pipeline, self.in_channels, detection=self.task == "detection")
        streamed = [streams and is_streamed_image(path) for path in paths]
        if not any(streamed):
            return dataset
        self._predict_batch_size = 1
        collate = detection_collate if self.task == "detection" else None
        return PredictImages(dataset, streamed, self.mean, self.std, collate)

    def build_datasets(self, splits: Sequence[str]) -> None:
        """Extension point: set ``self.<split>_dataset`` for each split of ``splits`` (a subset of
        ``"train"``, ``"val"``, ``"test"``).

        :meth:`setup` calls it with the splits its stage needs that are not built yet, and
        :meth:`load_state_dict` again when a checkpoint's split seed differs. Scan and check the files
        here (raise :class:`DataValidationError` naming a bad file), carve the splits the data has no files
        for (:func:`carve_splits`, seeded by ``self.seed``) and wrap each split in a dataset whose
        transform is ``self.pipeline(train=split == "train")``; :meth:`assign_datasets` does the last step
        and refuses an empty split.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement build_datasets(splits)")

    _build_datasets = build_datasets  # the old name (deprecated): see _adopt_old_extension_names

    def assign_datasets(
        self,
        splits: Sequence[str],
        samples: Mapping[str, Sequence[Any]],
        make_dataset: Callable[[str, Sequence[Any]], Dataset],
        where: Any,
    ) -> None:
        """Set ``<split>_dataset`` to ``make_dataset(split, samples[split])`` for each requested split
        that ``samples`` has; an empty split raises a :class:`DataValidationError` naming ``where``."""
        for split in splits:
            if split not in samples:
                continue
            if not samples[split]:
                raise DataValidationError(f"{where}: the {split} split is empty")
            setattr(self, f"{split}_dataset", make_dataset(split, samples[split]))

    # --------------------------------------------------------------------- checkpoint state (resume)
    def identity_state(self) -> dict[str, Any]:
        """What a resumed run must find unchanged: class names in label order (and, where the data has
        them, ``category_ids``). Plain data only (checkpoints load with ``weights_only=True``)."""
        state: dict[str, Any] = {"class_names": [str(n) for n in self.class_names]}
        ids = getattr(self, "category_ids", None) if self.task == "detection" else None
        if ids is not None:
            state["category_ids"] = [int(i) for i in ids]
        return state

    def state_dict(self) -> dict[str, Any]:
        """The state a resume needs: split seed, label mapping, class names, and the position in the
        training order (epoch, images consumed) for an exact mid-epoch resume."""
        state: dict[str, Any] = {"version": 1, "seed": int(self.seed), **self.identity_state()}
        trainer = getattr(self, "trainer", None)
        if trainer is not None and self._shuffle_seed is not None:
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            world = _world_and_rank(trainer)[0]
            state["shuffle_seed"] = int(self._shuffle_seed)
            state["epoch"] = int(trainer.current_epoch)
            # positions of the epoch's order consumed by all ranks together (each rank took as many)
            state["images_consumed"] = int(done) * self.batch_size * world
            state["world_size"] = world
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the split seed and training position; refuse data whose classes changed.

        Raises:
            DataValidationError: naming the classes (or category ids) added, removed or reordered.
        """
        saved_seed = state_dict.get("seed")
        if saved_seed is not None and int(saved_seed) != int(self.seed):
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint's split seed is {saved_seed}, this run's {self.seed}; "
                f"using the checkpoint's (the splits are rebuilt so that they match the trained model's)"
            )
            self.seed = int(saved_seed)
            built = [s for s in ("train", "val", "test") if getattr(self, f"{s}_dataset") is not None]
            for split in built:
                setattr(self, f"{split}_dataset", None)
            if built:
                self.build_datasets(built)
        now = self.identity_state()
        for key in ("class_names", "category_ids"):
            if key in state_dict and key in now and list(state_dict[key]) != list(now[key]):
                raise DataValidationError(
                    f"{type(self).__name__}: the checkpoint was trained with {key} {list(state_dict[key])} but "
                    f"the data now gives {now[key]} ({describe_change(list(state_dict[key]), now[key])}); a "
                    f"resume needs the same {key} in the same order: restore the data, or start a new run"
                )
        if "shuffle_seed" in state_dict:
            self._shuffle_seed = int(state_dict["shuffle_seed"])
            self._resume_position = (int(state_dict["epoch"]), int(state_dict["images_consumed"]))
            self._resume_world_size = int(state_dict.get("world_size", 1))

    def _training_sampler(self, dataset: Dataset) -> ResumableSampler:
        """The training loader's sampler: the seeded order of :class:`ResumableSampler`, dealt to the ranks
        under DDP (rank and world size from the trainer; a ``DistributedSampler``, so Lightning keeps it),
        starting where a checkpoint left off."""
        trainer = getattr(self, "trainer", None)
        world, rank = _world_and_rank(trainer)
        if self._shuffle_seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
            if world > 1:  # every rank must deal the same order: rank zero's seed
                seed = int(trainer.strategy.broadcast(seed, src=0))
            self._shuffle_seed = seed
        sampler = ResumableSampler(
            len(dataset),
            self._shuffle_seed,
            seeded_indices=getattr(dataset, "accepts_seeded_index", False),
            num_replicas=world,
            rank=rank,
        )
        if self._resume_position is not None:
            epoch, consumed = self._resume_position
            self._resume_position = None
            finished = consumed >= len(dataset)
            if self._resume_world_size != world and not finished:
                rank_zero_warn(
                    f"{type(self).__name__}: the checkpoint was written mid-epoch by {self._resume_world_size} process(es) "
                    f"and this run has {world}: the rest of epoch {epoch} (from position {consumed} of "
                    f"{len(dataset)}) is dealt to the new ranks, and the resumed run may see a few images "
                    "of that epoch once more or once less than an uninterrupted one"
                )
            # Lightning may iterate the loader before it calls set_epoch (workers start eagerly): start
            # at the epoch the resumed run continues, skipping what that epoch already consumed.
            if finished:
                sampler.set_epoch(epoch + 1)
            else:
                sampler.set_epoch(epoch)
                sampler.resume(epoch, consumed)
        self.train_sampler = sampler
        return sampler

    @property
    def loader_workers(self) -> int:
        """The worker processes the loaders use: ``num_workers``, with ``"auto"`` resolved for this machine
        and the number of training processes on it (:func:`auto_num_workers`)."""
        if self.num_workers != "auto":
            return int(self.num_workers)
        trainer = getattr(self, "trainer", None)
        processes = 1
        if trainer is not None:
            processes = max(1, int(getattr(trainer, "num_devices", 1) or 1))
        return auto_num_workers(processes=processes)

    def _loader(
        self, dataset: Dataset | None, split: str, shuffle: bool, batch_size: int | None = None
    ) -> DataLoader:
        if dataset is None:
            raise RuntimeError(
                f"{type(self).__name__} has no {split} split: call setup() first, or, if it ran, "
                f"{type(self).__name__}.build_datasets built no {split}_dataset (the data has no {split} split)"
            )
        sampler = self._training_sampler(dataset) if shuffle else None
        workers = self.loader_workers
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=workers > 0 and self.persistent_workers is not False,
            drop_last=self.drop_last and shuffle,
            collate_fn=detection_collate if self.task == "detection" else None,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled loader of the training split."""
        return self._loader(self.train_dataset, "train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Loader of the validation split."""
        return self._loader(self.val_dataset, "val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Loader of the test split."""
        return self._loader(self.test_dataset, "test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Loader of the ``predict_dir`` images when given (built here if ``setup`` has not run), else of
        the test split."""
        if self.predict_dir is None:
            return self._loader(self.test_dataset, "test", shuffle=False)
        if self.predict_dataset is None:
            self.predict_dataset = self.build_predict_dataset()
        if getattr(self.predict_dataset, "streams_images", False):  # datasets.PredictImages: one file a batch
            return DataLoader(
                self.predict_dataset,  # type: ignore[arg-type]
                batch_size=1,
                shuffle=False,
                num_workers=self.loader_workers,
                collate_fn=self.predict_dataset.collate_fn,  # type: ignore[attr-defined]
            )
        return self._loader(
            self.predict_dataset, "predict", shuffle=False, batch_size=self._predict_batch_size
        )


# The extension points' old private names, kept for one release: new name -> old name.
_OLD_EXTENSION_NAMES = {"build_datasets": "_build_datasets", "resolve_class_names": "_resolve_class_names"}


def _adopt_old_extension_names(cls: type) -> None:
    """Keep a subclass written against the old private names working, with one ``DeprecationWarning`` per
    class: its ``_build_datasets`` / ``_resolve_class_names`` becomes its ``build_datasets`` /
    ``resolve_class_names`` (when it defines both names, the new one is used). A class defining a new name
    gets the old one as an alias, so that an old-style subclass calling ``super()._build_datasets(splits)``
    reaches it."""
    own = vars(cls)
    renamed = []
    for new, old in _OLD_EXTENSION_NAMES.items():
        if old in own and new not in own:
            setattr(cls, new, own[old])
            renamed.append(f"{old} -> {new}")
        elif old in own:
            renamed.append(f"{old} -> {new} (both defined: {old} is not called)")
        elif new in own:
            setattr(cls, old, own[new])
    if renamed:
        warnings.warn(
            f"{cls.__qualname__} overrides the deprecated private extension points of ConvDataModule; "
            f"rename them ({', '.join(renamed)}): the old names stop being called in the next release",
            DeprecationWarning,
            stacklevel=3,
        )
