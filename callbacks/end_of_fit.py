"""A monitor's part of the end-of-fit diagnosis, assembled once per monitor in ``on_fit_end``.

Owns :func:`contribute`: the monitor's figures (logged, and embedded in the HTML page on rank zero), its
report tables (its own :meth:`~lightning_convnets.callbacks.core.MonitorCallback.tables`, or its latest
history entry per layer: :func:`~lightning_convnets.callbacks.report.history_tables`), its findings, its
notes and its ``error`` row, then the task's rows about skipped and rolled-back steps
(:func:`~lightning_convnets.callbacks.nonfinite.training_findings`, added by the last monitor to finish),
and the hand-over to :meth:`Diagnosis.contribute <lightning_convnets.callbacks.diagnosis.Diagnosis.contribute>`,
which prints and writes the report once every monitor has added its part. A problem drawing or tabulating
is a warning (it must not hide the diagnosis); one in ``diagnose`` switches the monitor off; ``strict``
re-raises either. Which monitors there are is the core's to say (it passes them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from lightning.pytorch.utilities import rank_zero_warn

from lightning_convnets.figures import log_figure

from . import diagnosis, nonfinite, report

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl
    from matplotlib.figure import Figure

    from .diagnosis import Finding

__all__ = ["Contributor", "contribute"]


class Contributor(Protocol):
    """What :func:`contribute` reads of a monitor (a
    :class:`~lightning_convnets.callbacks.core.MonitorCallback` has all of it)."""

    monitor_name: ClassVar[str]
    strict: bool
    failure: Finding | None
    notes: list[Finding]
    history: list[dict[str, float]]

    def figures(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Figure]: ...

    def tables(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, list[dict[str, Any]]]: ...

    def diagnose(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Finding]: ...

    def fail(self, hook: str, error: BaseException, trainer: pl.Trainer | None = None) -> None: ...


def contribute(
    monitor: Contributor,
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    monitors: Sequence[object],
    own_tables: bool = True,
) -> None:
    """Add ``monitor``'s part to the trainer's diagnosis (:func:`~lightning_convnets.callbacks.diagnosis.diagnosis_for`).

    A monitor that is still on adds its figures, its tables (global rank zero) and its findings; every
    monitor adds its notes and its ``error`` row if it switched off. The last of ``monitors`` to contribute
    also adds the task's rows about bad steps (``nonfinite="skip"``/``"rollback"``), and its contribution
    prints and writes the report.

    Args:
        monitor: the monitor finishing its fit.
        trainer: the trainer (its diagnosis, loggers and rank).
        pl_module: the trained module (the task's non-finite guard, if any).
        monitors: every monitor of the trainer, ``monitor`` included.
        own_tables: whether the monitor writes its own :meth:`tables`; ``False``: its latest history
            entry, one row per layer (:func:`~lightning_convnets.callbacks.report.history_tables`).
    """
    diag = diagnosis.diagnosis_for(trainer)
    if monitor.failure is None:
        try:
            for key, fig in monitor.figures(trainer, pl_module).items():
                png = log_figure(trainer, f"monitors/{monitor.monitor_name}/{key}", fig)
                if png is not None:  # rank zero: the PNG copy just written, embedded in the HTML page
                    diag.add_figure(monitor.monitor_name, key, png)
        except Exception as err:  # a plotting problem must not hide the diagnosis
            if monitor.strict:
                raise
            rank_zero_warn(f"{type(monitor).__name__}: could not draw its figures: {err}")
        if trainer.is_global_zero:
            try:
                if own_tables:
                    tables = monitor.tables(trainer, pl_module)
                else:
                    tables = report.history_tables(monitor.history, monitor.monitor_name)
                diag.add_tables(monitor.monitor_name, tables)
            except Exception as err:  # a table problem must not hide the diagnosis either
                if monitor.strict:
                    raise
                rank_zero_warn(f"{type(monitor).__name__}: could not build its report tables: {err}")
        try:
            diag.add(monitor.diagnose(trainer, pl_module))
        except Exception as err:
            if monitor.strict:
                raise
            monitor.fail("diagnose", err, trainer)
    diag.add(monitor.notes)
    if monitor.failure is not None:
        diag.add([monitor.failure])
    if all(id(m) in diag.contributors for m in monitors if m is not monitor):
        # the last monitor to finish adds what the task did about bad steps (nonfinite="skip"/"rollback")
        diag.add(nonfinite.training_findings(pl_module))
    diag.contribute(trainer, monitor, monitors, strict=monitor.strict)
