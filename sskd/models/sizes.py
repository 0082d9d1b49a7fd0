"""Size presets of the Mask2Former family (DINOv2 encoder + DPT neck + Mask2Former decoder).

Parameter counts measured with ``build_model("mask2former", K, size=...)`` (``K = 3``; ``K = 8``
adds 5 x (hidden_dim + 1) to the class head); projection heads included, the EMA strong head too
although it is not trainable. "enc" is the DINOv2 encoder's share.

============= ========== ===== ======================================= =================================
size          params     enc   encoder (Dinov2Model)                   Mask2Former decoder
============= ========== ===== ======================================= =================================
tiny          0.176 M    19 %  32-d, 2 blocks, 2 heads, patch 8        hidden 32, 4 queries, 3 layers
student_demo  0.571 M    28 %  64-d, 3 blocks, 2 heads, patch 8        hidden 64, 10 queries, 3 layers
teacher_demo  6.367 M    75 %  256-d, 6 blocks, 4 heads, patch 8       hidden 96, 12 queries, 4 layers
student_paper 51.24 M    43 %  ViT-S/14 (DINOv2-S), taps [2,5,8,11]   hidden 384, 100 queries, 9 layers
teacher_paper 346.8 M    88 %  ViT-L/14 (DINOv2-L), taps [5,11,17,23]  hidden 384, 100 queries, 9 layers
============= ========== ===== ======================================= =================================

Training step (forward + loss + backward + AdamW, batch 8, 64 px, ``benchmarks/efficiency.py
--train-step``, 2 threads, quiet machine, median of 8): student_demo 0.093 s, teacher_demo 0.26 s;
tiny 0.05 s (batch 2, 64 px). (An earlier 1.05M / 12.8M pair took 0.15 / 0.45 s and learned no
more per step, so the demo pair was shrunk to fit more steps into its 20-minute budget.)

teacher_demo / student_demo = 11.2x params (the paper: 568M / 52M = 10.9x); with the demo
preset's 32-channel outline class heads (``silhouette_channels``) in both, 6.43M / 0.636M =
10.1x. The paper student comes to 51.2M (the paper: about 52M) with a 4 x hidden decoder FFN
(1536). Paper sizes store position embeddings for 518 px (37 x 37 patches) so the
``facebook/dinov2-small`` / ``facebook/dinov2-large`` checkpoints load as is; any multiple of 14
works as input.

Every key of a size can be overridden by keyword (``build_model(..., hidden_dim=64)``); see
:data:`DEFAULTS` for the meaning of each key.
"""

from __future__ import annotations

import copy
from typing import Any

#: Every architecture/loss option with its default and a one-line meaning.
DEFAULTS: dict[str, Any] = {
    # -- encoder (transformers.Dinov2Model) --
    "encoder_hidden": 384,          # ViT width C
    "encoder_layers": 12,           # number of ViT blocks
    "encoder_heads": 6,             # attention heads per ViT block
    "patch_size": 14,               # ViT patch size in px; input H, W must be multiples of it
    "encoder_image_size": 518,      # image size the position embeddings are stored for (518: HF DINOv2)
    "out_layers": [2, 5, 8, 11],    # ViT blocks (0-based) reassembled into strides 4/8/16/32
    "trainable": ["default"],       # parts that train (Segmenter.set_trainable; default: all)
    "encoder_weights": "",          # local HF Dinov2 dir or hub id to load into the encoder ("" = random)
    # -- DPT neck --
    "neck_channels": [48, 96, 192, 384],  # channels of the reassembled stride 4/8/16/32 maps
    "readout": "ignore",            # [CLS] handling in the neck: "ignore" | "add" | "project"
    # -- Mask2Former pixel decoder --
    "feature_size": 256,            # pixel-decoder width (multiple of 32: GroupNorm(32, .))
    "mask_feature_size": 256,       # channels of the stride-4 mask features
    "pixel_decoder_layers": 6,      # deformable-attention encoder layers in the pixel decoder
    "pixel_decoder_ffn": 1024,      # FFN width of those layers
    # -- Mask2Former transformer decoder --
    "hidden_dim": 384,              # query width
    "num_queries": 100,             # object queries Q
    "num_heads": 8,                 # attention heads (decoder and deformable attention)
    "dec_layers": 9,                # masked-attention decoder layers (>= 3, each deep-supervised)
    "dim_feedforward": 1536,        # decoder FFN width (4 x hidden_dim; 2048 gives 54.8M for the paper student)
    "silhouette_channels": 0,       # > 0: a mask-outline CNN of this width adds to the final
                                    # layer's class logits (heads.SilhouetteClassHead; off in
                                    # every size, on in the demo preset: docs/method.md)
    "silhouette_only": False,       # True: classes from the silhouette head alone; the linear
                                    # head keeps only the no-object logit
    "mask_upsampler_channels": 0,   # > 0: masks at the input's resolution, the stride-4 mask
                                    # features lifted by an image-guided convex upsampler of
                                    # this width (upsampler.ConvexMaskUpsampler; off in every
                                    # size and preset: docs/method.md, "Mask resolution")
    # -- projection heads for L_pxl --
    "embed_dim": 128,               # pixel-embedding dimension D
    "ema_momentum": 0.99,           # strong head <- m * strong + (1 - m) * weak after each step
    # -- set-prediction loss (Mask2FormerLoss) --
    "class_weight": 2.0,            # weight of the class cross-entropy
    "no_object_weight": 0.1,        # cross-entropy weight of the no-object class
    "mask_weight": 5.0,             # weight of the point-sampled mask BCE
    "dice_weight": 5.0,             # weight of the point-sampled dice loss
    "train_num_points": 12544,      # points sampled per mask for matching and the mask losses
    "oversample_ratio": 3.0,        # candidate points per sampled point (importance sampling)
    "importance_sample_ratio": 0.75,  # share of points picked by mask uncertainty
}

SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(encoder_hidden=32, encoder_layers=2, encoder_heads=2, patch_size=8,
                 encoder_image_size=64, out_layers=[0, 0, 1, 1], neck_channels=[16, 16, 32, 32],
                 feature_size=64, mask_feature_size=32, pixel_decoder_layers=1,
                 pixel_decoder_ffn=64, hidden_dim=32, num_queries=4, num_heads=2, dec_layers=3,
                 dim_feedforward=64, embed_dim=16, train_num_points=256),
    # demo pair at 64 px (patch 8 -> 8x8 tokens): teacher ~12x the student, 78% of it in the
    # encoder (frozen while the stand-in foundation teacher adapts); 512 loss points suffice
    # for 16x16 mask logits and cut ~12% of a student step vs 1024
    # The demo pair is sized for learning per CPU-second (docs/method.md, 'Training on a CPU': small models learn
    # as much per second; the teacher is 11x the student, most of it in its ViT encoder).
    "student_demo": dict(encoder_hidden=64, encoder_layers=3, encoder_heads=2, patch_size=8,
                         encoder_image_size=64, out_layers=[0, 1, 1, 2],
                         neck_channels=[32, 32, 64, 64], feature_size=64, mask_feature_size=64,
                         pixel_decoder_layers=2, pixel_decoder_ffn=128, hidden_dim=64,
                         num_queries=10, num_heads=4, dec_layers=3, dim_feedforward=128,
                         embed_dim=128, train_num_points=512),
    "teacher_demo": dict(encoder_hidden=256, encoder_layers=6, encoder_heads=4, patch_size=8,
                         encoder_image_size=64, out_layers=[1, 2, 4, 5],
                         neck_channels=[48, 96, 128, 192], feature_size=96,
                         mask_feature_size=96, pixel_decoder_layers=2, pixel_decoder_ffn=192,
                         hidden_dim=96, num_queries=12, num_heads=4, dec_layers=4,
                         dim_feedforward=384, embed_dim=128, train_num_points=512),
    "student_paper": dict(),  # the DEFAULTS are the paper student (DINOv2-S)
    "teacher_paper": dict(encoder_hidden=1024, encoder_layers=24, encoder_heads=16,
                          out_layers=[5, 11, 17, 23], neck_channels=[256, 512, 1024, 1024]),
}


def list_sizes() -> list[str]:
    return list(SIZES)


def resolve_size(size: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """DEFAULTS <- SIZES[size] <- overrides, with a clear error for unknown names."""
    if size not in SIZES:
        raise KeyError(f"unknown mask2former size {size!r}; available: {list_sizes()}")
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown mask2former option(s) {unknown}; valid options: {sorted(DEFAULTS)}")
    cfg = copy.deepcopy(DEFAULTS)
    cfg.update(copy.deepcopy(SIZES[size]))
    cfg.update(copy.deepcopy(overrides))
    return cfg
