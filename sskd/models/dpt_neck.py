"""DPT-style neck: reassemble intermediate ViT layers into a stride 4/8/16/32 feature pyramid.

A plain ViT keeps one token grid at the patch stride (8 or 14 px); Mask2Former's pixel decoder
wants a pyramid with a stride-4 level for its mask features. DPT (Ranftl et al., 2021) solves
this by "reassembling" tokens of several encoder layers: drop or project the [CLS] token,
project channels with a 1x1 conv and resample with a transposed conv (up) or strided conv
(down). We reuse transformers' :class:`DPTReassembleStage` for exactly that and add one
bilinear resize where the patch size is not a power of two (patch 14: 16x16 tokens at 224 px
reassemble to 64x64, and the pyramid must be 56x56 = H/4 so that masks sit at stride 4).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import DPTConfig
from transformers.models.dpt.modeling_dpt import DPTReassembleStage

STRIDES = (4, 8, 16, 32)


def reassemble_factors(patch_size: int) -> list[int | float]:
    """Resampling factor of each pyramid level, a power of two near ``patch_size / stride``.

    patch 8 -> [2, 1, 0.5, 0.25] (exact); patch 14 -> [4, 2, 1, 0.5] (then resized);
    patch 16 -> [4, 2, 1, 0.5] (exact, the original DPT setting).
    """
    exps = [round(math.log2(patch_size / s)) for s in STRIDES]
    return [2 ** e if e >= 0 else 2.0 ** e for e in exps]  # ints up (ConvTranspose kernel size)


class DPTNeck(nn.Module):
    """``L`` ViT hidden states -> 4 feature maps at strides 4, 8, 16, 32.

    Args:
        hidden_size: ViT width ``C``.
        out_channels: channels of the 4 output levels (stride 4 first).
        patch_size: ViT patch size (token stride).
        readout: what to do with the [CLS] token: "ignore" (drop), "add" or "project"
            (concatenate to every token and project, adds ``4 x 2C x C`` parameters).
    """

    def __init__(self, hidden_size: int, out_channels: list[int], patch_size: int,
                 readout: str = "ignore") -> None:
        super().__init__()
        if len(out_channels) != 4:
            raise ValueError(f"neck_channels must list 4 widths (strides 4/8/16/32), got {out_channels}")
        self.patch_size = int(patch_size)
        cfg = DPTConfig(hidden_size=hidden_size, readout_type=readout, hidden_act="gelu",
                        reassemble_factors=reassemble_factors(patch_size),
                        neck_hidden_sizes=list(out_channels))
        self.reassemble = DPTReassembleStage(cfg)
        self.out_channels = list(out_channels)

    def forward(self, hidden_states: list[torch.Tensor], image_hw: tuple[int, int]) -> list[torch.Tensor]:
        """4 x ``B x (1 + h*w) x C`` (CLS first, ``h = H / patch``) -> ``B x C_i x ceil(H/s) x ceil(W/s)``."""
        H, W = image_hw
        h, w = H // self.patch_size, W // self.patch_size
        feats = self.reassemble(list(hidden_states), patch_height=h, patch_width=w)
        out = []
        for f, s in zip(feats, STRIDES):
            size = (math.ceil(H / s), math.ceil(W / s))
            if tuple(f.shape[-2:]) != size:  # only for non power-of-two patches (e.g. 14)
                f = nn.functional.interpolate(f, size=size, mode="bilinear", align_corners=False)
            out.append(f)
        return out
