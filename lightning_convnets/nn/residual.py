"""The residual sum as a module, so observers can see both of its terms."""

from __future__ import annotations

from torch import Tensor, nn


class ResidualAdd(nn.Module):
    """``shortcut + branch`` as a module: ``h_{l+1} = h_l + F(h_l)``.

    Blocks of our own call it for their sum, so a forward hook on it receives ``(shortcut, branch)`` as
    inputs and ``shortcut + branch`` as output: the three quantities Var(x), Var(F(x)) and Var(x + F(x))
    that :class:`lightning_convnets.callbacks.ActivationVarianceMonitor` records for residual blocks.

    Example:
        >>> import torch
        >>> ResidualAdd()(torch.ones(2), torch.ones(2))
        tensor([2., 2.])
    """

    def forward(self, shortcut: Tensor, branch: Tensor) -> Tensor:
        return shortcut + branch
