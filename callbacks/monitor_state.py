"""A monitor's checkpointed state: its layout and version, the per-rank gather under DDP, the resume.

Owns :class:`MonitorState` (what :meth:`MonitorCallback.state_dict
<lightning_convnets.callbacks.core.MonitorCallback.state_dict>` saves and ``load_state_dict`` reads back:
the history, where the logging interval stands and the monitor's own ``extra`` state, with
:data:`STATE_VERSION`), :func:`share_rank_states` (every rank's ``extra`` gathered into the checkpoint as
``extra_ranks``, one ``all_gather_object`` per monitor and save), :func:`own_rank_entry` (the entry a
process resumes with) and :func:`cached_state_key` (a monitor's ``state_key``, formatted once). The guard
that runs the gather on every rank, and what a monitor puts into ``extra``, are the core's and the
monitors'. It imports nothing else of the package.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.callbacks import Callback
from torch import Tensor

__all__ = [
    "STATE_VERSION",
    "MonitorState",
    "cached_state_key",
    "distributed",
    "own_rank_entry",
    "share_rank_states",
    "to_cpu",
]

STATE_VERSION = 2
"""Version of a monitor's checkpointed state. Version 1 has no ``last_flush_step`` / ``batches_since_flush``
(a resume from it restarts the logging interval: at most one duplicate history row)."""


@dataclass
class MonitorState:
    """A monitor's checkpointed state, as :meth:`to_dict` writes it into the checkpoint.

    Args:
        history: the history entries, oldest first.
        extra: this rank's :meth:`~lightning_convnets.callbacks.core.MonitorCallback.extra_state`.
        last_flush_step: the optimizer step of the last flush (``-1``: none yet), so a resumed run flushes
            on the same steps, and under gradient accumulation never flushes the checkpoint's step twice.
        batches_since_flush: training batches since that flush.

    Example:
        >>> state = MonitorState([{"step": 4.0}], {"n": 1}, last_flush_step=4, batches_since_flush=2)
        >>> saved = state.to_dict()
        >>> saved["version"], MonitorState.from_dict(saved) == state
        (2, True)
        >>> MonitorState.from_dict({"history": []})  # a version 1 checkpoint: the interval restarts
        MonitorState(history=[], extra={}, last_flush_step=-1, batches_since_flush=0)
    """

    history: list[dict[str, float]]
    extra: dict[str, Any] = field(default_factory=dict)
    last_flush_step: int = -1
    batches_since_flush: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's entry: ``version``, ``history``, ``extra``, ``last_flush_step``,
        ``batches_since_flush`` (under DDP :func:`share_rank_states` adds ``extra_ranks``)."""
        return {
            "version": STATE_VERSION,
            "history": list(self.history),
            "extra": self.extra,
            "last_flush_step": int(self.last_flush_step),
            "batches_since_flush": int(self.batches_since_flush),
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any], owner: str = "MonitorCallback") -> MonitorState:
        """Read a checkpoint's entry (any version); ``extra`` is this process's own
        (:func:`own_rank_entry`).

        Raises:
            KeyError: ``state`` has no ``history`` (the message names ``owner`` and the keys it has).
        """
        if "history" not in state:
            raise KeyError(
                f"{owner}.load_state_dict: checkpoint state has no 'history' (keys: {sorted(state)})"
            )
        return cls(
            history=list(state["history"]),
            extra=own_rank_entry(state),
            last_flush_step=int(state.get("last_flush_step", -1)),
            batches_since_flush=int(state.get("batches_since_flush", 0)),
        )


def share_rank_states(checkpoint: Mapping[str, Any], state_key: str) -> None:
    """Under DDP, gather every rank's ``extra`` (what the monitor's ``state_dict`` put into this rank's
    ``checkpoint["callbacks"][state_key]``) and store the list, in rank order, as that entry's
    ``extra_ranks``: one ``all_gather_object``, which every rank must call (Lightning builds the checkpoint
    on every rank at each save). A no-op without an initialised process group; what the gather raises
    propagates.

    Example:
        >>> checkpoint = {"callbacks": {"m": {"history": [], "extra": {"n": 1}}}}
        >>> share_rank_states(checkpoint, "m")  # a single process: nothing to gather
        >>> "extra_ranks" in checkpoint["callbacks"]["m"]
        False
    """
    if not distributed():
        return
    import torch.distributed as dist

    states = checkpoint.get("callbacks") if isinstance(checkpoint, Mapping) else None
    entry = states.get(state_key) if isinstance(states, Mapping) else None
    own = entry.get("extra") if isinstance(entry, dict) else None
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, to_cpu(own))
    if isinstance(entry, dict):
        entry["extra_ranks"] = gathered


def own_rank_entry(state: Mapping[str, Any]) -> dict[str, Any]:
    """The ``extra`` state this process resumes with from a monitor's checkpointed ``state``: its own
    rank's entry of ``extra_ranks`` when the checkpoint has one per rank of the current world, else
    ``extra`` (rank zero's: a single-process checkpoint, an older one, or another world size).

    Example:
        >>> own_rank_entry({"history": [], "extra": {"n": 0}, "extra_ranks": [{"n": 0}, {"n": 1}]})  # one process
        {'n': 0}
    """
    extra = state.get("extra") or {}
    ranks = state.get("extra_ranks")
    if distributed() and isinstance(ranks, list | tuple):
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        if len(ranks) == world and isinstance(ranks[rank], dict):
            return ranks[rank]
    return extra


def distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def to_cpu(value: Any) -> Any:
    """``value`` with every tensor moved to the CPU (what travels in ``all_gather_object``: a pickled device
    tensor would be unpickled onto the sender's device).

    Example:
        >>> import torch
        >>> to_cpu({"a": [torch.ones(1)], "b": 2})
        {'a': [tensor([1.])], 'b': 2}
    """
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple) and not hasattr(value, "_fields"):
        return type(value)(to_cpu(v) for v in value)
    return value


def cached_state_key(callback: Callback, **key: Any) -> str:
    """``callback._generate_state_key(**key)``, formatted once per distinct ``key``: Lightning reads
    ``state_key`` around every callback hook call (several per step and callback), and formatting it costs
    about a microsecond each time.

    Example:
        >>> cached_state_key(Callback(), monitor="m", every=10)
        "Callback{'monitor': 'm', 'every': 10}"
    """
    values = tuple(key.values())
    cached = callback.__dict__.get("_state_key_cache")
    if cached is None or cached[0] != values:
        cached = callback.__dict__["_state_key_cache"] = (values, callback._generate_state_key(**key))
    return cached[1]
