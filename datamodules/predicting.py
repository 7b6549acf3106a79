"""What a data module's ``predict`` reads from a folder of new images (the ``predict_dir`` argument): the
folder's checks, its dataset (streamed TIFF/Zarr items for segmentation and detection) and its loader
(:class:`PredictFolder`, a base of ``ConvDataModule``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset

from .datasets import ImageListDataset, PredictImages, detection_collate
from .io import DataValidationError, is_streamed_image, scan_predict_folder


class PredictFolder:
    """The ``predict_dir`` side of a ``ConvDataModule`` (one of its bases): :meth:`build_predict_dataset`
    and :meth:`predict_dataloader` (the ``predict_dir`` images when given, else the test split).

    It reads the module's ``predict_dir``, ``predict_resize``, ``task``, ``batch_size``, ``image_size``,
    ``in_channels``, ``mean``, ``std``, ``pipeline`` and the loader builder ``_loader`` of
    :class:`~.loading.SplitLoaders`.

    Example:
        >>> import shutil
        >>> import tempfile
        >>> import numpy as np
        >>> from pathlib import Path
        >>> from PIL import Image
        >>> from lightning_convnets.datamodules import ImageFolderDataModule
        >>> folder = Path(tempfile.mkdtemp())
        >>> for i, side in enumerate((20, 30, 40)):
        ...     Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(folder / f"{i}.png")
        >>> dm = ImageFolderDataModule(class_names=["a", "b"], image_size=16, predict_dir=str(folder),
        ...                            batch_size=2, num_workers=0)
        >>> dm.setup("predict")
        >>> [tuple(batch.shape) for batch in dm.predict_dataloader()]
        [(2, 3, 16, 16), (1, 3, 16, 16)]
        >>> shutil.rmtree(folder)
    """

    # the host's arguments and state (ConvDataModule sets them)
    task: str
    batch_size: int
    image_size: int | None
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    predict_dir: Path | None
    predict_resize: bool | None
    predict_dataset: Dataset | None
    test_dataset: Dataset | None
    _predict_batch_size: int
    loader_workers: int
    pipeline: Callable[..., Callable[..., dict[str, Any]]]
    _loader: Callable[..., DataLoader]

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

    def predict_dataloader(self) -> DataLoader:
        """Loader of the ``predict_dir`` images when given (built here if ``setup`` has not run), else of
        the test split."""
        if self.predict_dir is None:
            return self._loader(self.test_dataset, "test", shuffle=False)
        if self.predict_dataset is None:
            self.predict_dataset = self.build_predict_dataset()
        if getattr(self.predict_dataset, "streams_images", False):  # datasets.PredictImages: one file a batch
            return DataLoader(
                self.predict_dataset,
                batch_size=1,
                shuffle=False,
                num_workers=self.loader_workers,
                collate_fn=self.predict_dataset.collate_fn,  # type: ignore[attr-defined]
            )
        return self._loader(
            self.predict_dataset, "predict", shuffle=False, batch_size=self._predict_batch_size
        )
