"""Looking up torchvision's pretrained weights by name, for every backbone that can load them, and telling a
failed download (offline) apart from other errors."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


class UnknownWeightsError(KeyError, ValueError):
    """A weights name torchvision does not publish for that model (a ``KeyError`` and a ``ValueError``)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class WeightsDownloadError(RuntimeError):
    """Pretrained weights could not be downloaded (no network, a proxy, a server error).

    The message says what failed, where the weights are cached once downloaded and which option trains
    from scratch instead.
    """


def download_failure(error: BaseException) -> BaseException | None:
    """The network error behind ``error`` (itself, or along its ``__cause__`` / ``__context__`` chain) when
    it is a failed download: ``urllib``'s ``URLError`` (torchvision and ``torch.hub`` offline), a
    connection or timeout error, or the Hugging Face hub's offline errors (timm, smp); else ``None``.

    Example:
        >>> import urllib.error
        >>> try:
        ...     try:
        ...         raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        ...     except urllib.error.URLError as err:
        ...         raise RuntimeError("loading failed") from err
        ... except RuntimeError as outer:
        ...     print(download_failure(outer))
        <urlopen error [Errno -3] Temporary failure in name resolution>
        >>> download_failure(ValueError("unknown weights")) is None
        True
    """
    import urllib.error

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, urllib.error.URLError | ConnectionError | TimeoutError):
            return current
        kind = type(current)
        if kind.__module__.startswith("huggingface_hub") and (
            "LocalEntryNotFound" in kind.__name__ or "Offline" in kind.__name__
        ):
            return current
        current = current.__cause__ or current.__context__
    return None


def torchvision_weights(model_name: str, weights: Any, where: str) -> Any:
    """The member of torchvision's weights enum of ``model_name`` that ``weights`` names.

    Args:
        model_name: a torchvision model name (``"resnet50"``).
        weights: an enum member, its name (``"IMAGENET1K_V2"``, ``"DEFAULT"``) or ``"Enum.NAME"``.
        where: what to name in the error (the backbone and argument).

    Raises:
        UnknownWeightsError: for a model without weights, or a name that is not one of its members.

    Example:
        >>> str(torchvision_weights("resnet18", "DEFAULT", "resnet18"))
        'ResNet18_Weights.IMAGENET1K_V1'
    """
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(model_name)
    except ValueError as err:
        raise UnknownWeightsError(
            f"{where}: torchvision has no pretrained weights for {model_name!r}"
        ) from err
    if isinstance(weights, enum):
        return weights
    if isinstance(weights, str):
        member = weights.split(".", 1)[1] if weights.startswith(enum.__name__ + ".") else weights
        if member in enum.__members__:
            return enum[member]
    raise UnknownWeightsError(
        f"{where}: unknown weights {weights!r}; available: {list(enum.__members__)} (or a {enum.__name__} member)"
    )


_WEIGHT_OPTIONS = {"weights": "null", "encoder_weights": "null", "pretrained": "false"}


def _weight_options(kwargs: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``path=value`` of every option in ``kwargs`` (nested) that asks for pretrained weights, with the
    value that turns it off (``weights=null``, ``pretrained=false``)."""
    found = []
    for key, value in kwargs.items():
        if isinstance(value, Mapping):
            found += _weight_options(value, f"{prefix}{key}.")
        elif key in _WEIGHT_OPTIONS and value not in (None, False):
            found.append(f"{prefix}{key}={_WEIGHT_OPTIONS[key]}")
    return found


def download_message(owner: str, failure: BaseException, kwargs: Mapping[str, Any]) -> str:
    """One line for a :class:`WeightsDownloadError`: which download failed, where weights are cached, and
    which of the backbone options ``kwargs`` trains from scratch instead.

    Example:
        >>> download_message("ImageClassifier", OSError("offline"), {"weights": "DEFAULT"}).split(". ")[-1]
        'Connect once ... or train from scratch with --model.init_args.backbone_kwargs.weights=null'
    """
    import torch

    reason = getattr(failure, "reason", None) or failure
    options = _weight_options(kwargs)
    scratch = (
        " or ".join(f"--model.init_args.backbone_kwargs.{o}" for o in options)
        if options
        else "the backbone's weights option set to null (pretrained: false)"
    )
    return (
        f"{owner}: the backbone's pretrained weights could not be downloaded ({type(failure).__name__}: "
        f"{reason}). Connect once to download them (torchvision caches them under "
        f"{Path(torch.hub.get_dir()) / 'checkpoints'}, timm/smp under the Hugging Face cache), or train from "
        f"scratch with {scratch}"
    )
