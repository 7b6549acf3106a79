"""What a task keeps in its checkpoints beyond the weights and hyperparameters: the class count (it may
come from the datamodule), the random generators' states (a resumed run draws the same numbers) and the
skipped-step count of ``nonfinite="skip"``; and ``load_from_checkpoint`` with ``weights_only=True``.
"""

from __future__ import annotations

from typing import Any

from lightning_convnets.checkpointing import rng_state, set_rng_state

__all__ = ["CheckpointStateHooks"]


class CheckpointStateHooks:
    """The checkpoint side of a task (mixed into :class:`~lightning_convnets.tasks.ConvNetTask`, which
    holds ``num_classes``, ``nonfinite_guard`` and builds its head with ``_build``). Saved under the
    checkpoint's ``"lightning_convnets"`` key."""

    def restore_random_streams(self) -> None:
        """On a resumed run, continue the random streams where the checkpoint left them (called at the
        first training epoch's start, after the data loaders were made, which draw from them)."""
        state = self.__dict__.pop("_rng_to_restore", None)
        if state is not None:
            set_rng_state(state)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the class count (it may come from the datamodule, not the hyperparameters), the random
        generators' states and the skipped-step count; refuse to save after a non-finite step."""
        if self.nonfinite_guard.mode == "stop":
            self.check_nonfinite()  # raises: the last good checkpoint stays as it is
        checkpoint["lightning_convnets"] = {
            "num_classes": self.num_classes,
            "rng": rng_state(),
            "skipped_steps": self.nonfinite_guard.skipped,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Build the head for the checkpoint's class count before its weights load (so
        ``load_from_checkpoint`` needs no datamodule)."""
        ours = checkpoint.get("lightning_convnets") or {}
        self.__dict__["_rng_to_restore"] = ours.get("rng")
        self.nonfinite_guard.skipped = int(ours.get("skipped_steps", 0))
        saved = ours.get("num_classes")
        if saved is None:
            return
        if self.num_classes is None:
            self._build(int(saved))
        elif int(saved) != self.num_classes:
            raise ValueError(
                f"the checkpoint was trained for {saved} classes but this {type(self).__name__} has "
                f"{self.num_classes}; leave num_classes unset or set it to {saved}"
            )

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: Any,
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        weights_only: bool = True,
        **kwargs: Any,
    ) -> Any:
        """``LightningModule.load_from_checkpoint`` with ``weights_only=True`` by default: a checkpoint
        holding a pickled object of another class is refused (pass ``weights_only=False`` only for a
        file you trust: unpickling can run code)."""
        return super().load_from_checkpoint(  # type: ignore[misc]
            checkpoint_path, map_location, hparams_file, strict, weights_only=weights_only, **kwargs
        )
