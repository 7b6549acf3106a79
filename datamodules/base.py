"""The shared LightningDataModule base: its arguments, the metadata tasks read, transforms, setup, the
extension points and the checkpoint state.

Start with :class:`ConvDataModule`: it declares every argument the data modules share (they forward them
with ``**kwargs``) and calls the two methods a subclass implements, ``resolve_class_names`` and
``build_datasets`` (``docs/data.md``, "Write your own data module"). Its loaders come from
``loading.SplitLoaders`` (with ``auto_num_workers``), the training order and its resume from
``sampling.TrainingOrder``, the ``predict_dir`` side from ``predicting.PredictFolder``; the seeded
splits a subclass carves (``carve_splits``) live in ``splits``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset

from .io import DataValidationError
from .loading import SplitLoaders
from .loading import auto_num_workers as auto_num_workers  # its old home: kept importable from here
from .predicting import PredictFolder
from .sampling import ResumableSampler, TrainingOrder
from .splits import carve_splits as carve_splits  # the splits' old home: kept importable from here
from .splits import seeded_split as seeded_split
from .splits import stratified_split as stratified_split
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


class ConvDataModule(SplitLoaders, PredictFolder, LightningDataModule):
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
        self.set_loader_options(batch_size, num_workers, pin_memory, persistent_workers)
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be positive or None, got {image_size}")
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
        # the training order's seed and the position a checkpoint recorded (sampling.TrainingOrder)
        self.training_order = TrainingOrder(type(self).__name__)
        self.train_sampler: ResumableSampler | None = None
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self.predict_dataset: Dataset | None = None

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

    # ------------------------------------------------------------------------- transforms, setup
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
        state.update(self.training_order.state(getattr(self, "trainer", None), self.batch_size))
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
        self.training_order.load_state(state_dict)


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
