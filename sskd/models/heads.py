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


class SilhouetteClassHead(nn.Module):
    """Class logits from the outline of each query's predicted mask.

    ``B x Q x h x w`` mask logits -> ``B x Q x K`` class logits, added to the linear class
    head's foreground logits (``Mask2FormerSegmenter._factorised``).
    A small CNN (two 3x3 conv pairs, a 2x2 max-pool between them, global max-pool, linear) reads
    ``sigmoid(mask logits)``, so it is translation-invariant and blind to colour and texture:
    it sees only the shape the decoder drew.

    Why it exists (``silhouette_channels``, off in every size, on in the demo preset): at 64 px
    on a CPU, Mask2Former's query features hardly learn which class a shape is; the stand-ins
    found 75-85% of the target's objects but named the right class barely more often than
    always answering the commonest one. A silhouette CNN of this kind learns the three classes
    from ground-truth masks area-pooled to the mask logits' 16 x 16 in a few hundred steps
    (82-86% right on the target's). The input is detached, so the class loss never bends masks
    toward class templates; the head learns from the target masks themselves
    (``Mask2FormerSegmenter._silhouette_loss``) and from the final layer's matched queries. The
    last layer starts at zero. What it changes in the demo is measured in docs/method.md.
    """

    def __init__(self, num_logits: int, channels: int = 32) -> None:
        super().__init__()
        c = int(channels)
        # replicate padding: the empty border looks like the empty interior, so a shape's
        # logits do not depend on where in the image it is (exactly, for even shifts)
        conv = lambda i, o: nn.Conv2d(i, o, 3, padding=1, padding_mode="replicate")
        self.features = nn.Sequential(
            conv(1, c), nn.ReLU(inplace=True), conv(c, c), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            conv(c, 2 * c), nn.ReLU(inplace=True), conv(2 * c, 2 * c), nn.ReLU(inplace=True),
            nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.classify = nn.Linear(2 * c, num_logits)
        nn.init.zeros_(self.classify.weight)
        nn.init.zeros_(self.classify.bias)

    def forward(self, mask_logits: torch.Tensor) -> torch.Tensor:
        return self.from_probabilities(mask_logits.detach().sigmoid())

    def from_probabilities(self, masks: torch.Tensor) -> torch.Tensor:
        """``B x N x h x w`` mask probabilities (or area fractions) in [0, 1] -> ``B x N x K``."""
        B, N, h, w = masks.shape
        return self.classify(self.features(masks.reshape(B * N, 1, h, w))).reshape(B, N, -1)
