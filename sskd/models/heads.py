"""Pixel-embedding projection heads for the contrastive loss L_pxl (docs/method.md).

The weak head is an MLP of 1x1 convolutions trained by gradient. The strong head has the same
architecture but is a stop-gradient branch: its weights are an exponential moving average (EMA)
of the weak head, updated after each optimizer step (:func:`ema_update`). Its parameters have
``requires_grad=False`` because no loss ever back-propagates into them (they would otherwise
be "trainable parameters without gradient" and AdamW weight decay would shrink them).
"""

from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """``B x C x h x w`` -> L2-normalised ``B x D x h x w`` (1x1 conv, ReLU, 1x1 conv)."""

    def __init__(self, in_channels: int, embed_dim: int = 128, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or in_channels
        self.mlp = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, embed_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.mlp(x), dim=1)


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * source`` for every parameter/buffer."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
    for t, s in zip(target.buffers(), source.buffers()):
        t.copy_(s)
