"""Prediction: tiled prediction of large images (:mod:`~lightning_convnets.predict.tiling`), test-time
augmentation (:mod:`~lightning_convnets.predict.tta`), the prediction writers the tasks attach
(:mod:`~lightning_convnets.predict.writers`), images larger than memory (windows read by
:mod:`~lightning_convnets.predict.readers`, masks written tile by tile by
:mod:`~lightning_convnets.predict.large`: ``predict_large``) and export for deployment
(:mod:`~lightning_convnets.predict.export`).

Model-agnostic: these modules take networks and options, never a task's hyperparameters; the tasks call
them with explicit options (:class:`~lightning_convnets.predict.tiling.TilingOptions`).
"""
