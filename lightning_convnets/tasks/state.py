"""What a task keeps in its checkpoints beyond the weights and hyperparameters: the class count (it may
come from the datamodule), the random generators' states of every rank (a resumed run draws the same
numbers on each rank, dropout included) and the skipped-step count of ``nonfinite="skip"``; and
``load_from_checkpoint`` with ``weights_only=True``.
"""

from __future__ import annotations

from typing import Any

from lightning_convnets.checkpointing import rng_state, set_rng_state

__all__ = ["CheckpointStateHooks", "gather_rank_states", "own_rank_state"]


def gather_rank_states(state: Any) -> list[Any] | None:
    """Every rank's ``state`` (plain data, tensors on the CPU), in rank order, under an initialised
    process group of several ranks (one ``all_gather_object``); ``None`` in a single process.

    Every rank must call it at the same point: the task does so in ``on_save_checkpoint``, which Lightning
    calls on every rank at each save (``trainer.save_checkpoint`` is collective).

    Example:
        >>> gather_rank_states({"seed": 1}) is None  # no process group
        True
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)
    return gathered


def own_rank_state(state: Any, ranks: Any) -> Any:
    """This rank's entry of ``ranks`` (what :func:`gather_rank_states` saved) when it holds one per rank
    of the current process group, else ``state`` (rank zero's: a single-process checkpoint, an older one,
    or a resume on another number of ranks).

    Example:
        >>> own_rank_state("rank zero's", ["rank zero's", "rank one's"])  # no process group: rank zero
        "rank zero's"
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if isinstance(ranks, list | tuple) and distributed and len(ranks) == dist.get_world_size():
        return ranks[dist.get_rank()]
    return state


class CheckpointStateHooks:
    """The checkpoint side of a task (mixed into :class:`~lightning_convnets.tasks.ConvNetTask`, which
    holds ``num_classes``, ``nonfinite_guard`` and builds its head with ``_build``). Saved under the
    checkpoint's ``"lightning_convnets"`` key."""

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        """On a resumed run's first training batch, continue every random stream where the checkpoint
        left it (this rank's own: :func:`own_rank_state`), just before the batch trains: in the
        uninterrupted run nothing drew from them between the checkpoint and this batch's step (its loader
        iterator was made and this batch fetched before the checkpoint)."""
        state = self.__dict__.pop("_rng_to_restore", None)
        if state is not None:
            set_rng_state(state)
        return super().on_train_batch_start(batch, batch_idx)  # type: ignore[misc]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the class count (it may come from the datamodule, not the hyperparameters), the random
        generators' states and the skipped-step count; refuse to save after a non-finite step."""
        if self.nonfinite_guard.mode == "stop":
            self.check_nonfinite()  # raises: the last good checkpoint stays as it is
        state = rng_state()
        checkpoint["lightning_convnets"] = {
            "num_classes": self.num_classes,
            "rng": state,
            "skipped_steps": self.nonfinite_guard.skipped,
            "nonfinite": self.nonfinite_guard.state_dict(),  # skips, rollbacks, the spike rule's history
        }
        ranks = gather_rank_states(state)
        if ranks is not None:
            checkpoint["lightning_convnets"]["rng_ranks"] = ranks

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Build the head for the checkpoint's class count before its weights load (so
        ``load_from_checkpoint`` needs no datamodule)."""
        ours = checkpoint.get("lightning_convnets") or {}
        self.__dict__["_rng_to_restore"] = own_rank_state(ours.get("rng"), ours.get("rng_ranks"))
        self.nonfinite_guard.load_state_dict(ours.get("nonfinite") or {"skipped": ours.get("skipped_steps", 0)})
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
