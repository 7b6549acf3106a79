"""Looking up torchvision's pretrained weights by name, for every backbone that can load them."""

from __future__ import annotations

from typing import Any


class UnknownWeightsError(KeyError, ValueError):
    """A weights name torchvision does not publish for that model (a ``KeyError`` and a ``ValueError``)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


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
