"""The training objective J = L_sup + l_semi L_semi + l_pxl L_pxl of one batch, without the loop.

* L_sup: the model's set-prediction loss on the labeled images of the batch (weight 1);
* L_semi: the same loss on the pseudo-labeled images (hard pseudo-labels), weight ``l_semi``;
* L_pxl: the instance-aware pixel-wise contrastive loss between the weak view's embeddings and
  the stop-gradient embeddings of the strong view, weight ``l_pxl``.

Crowd regions (``targets[i]["ignore"]``) are passed to the model's loss (they are neither object
nor background there) and are never anchors or negatives of L_pxl (removed from ``valid``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sskd.config import PixelContrastConfig, PseudoLabelConfig
from sskd.engine.data import instance_id_map
from sskd.models.base import Segmenter, SegmenterOutput


def step_seed(seed: int, step: int, slot: int = 0) -> int:
    """Independent, reproducible 63-bit seed for (run seed, step, slot)."""
    import numpy as np
    return int(np.random.SeedSequence([seed, step, slot]).generate_state(2, np.uint64)[0] >> 1)


@dataclass
class Batch:
    """One step's images for one rank: labeled images first, then pseudo-labeled ones.

    ``weak``/``strong``: ``B x 3 x h x w`` float in [0, 1] (one geometry, the strong view with
    photometric changes); ``valid``: ``B x h x w`` bool (False on padding); ``targets``: ``B``
    dicts ``{"masks": N x h x w float, "labels": N long}`` plus ``"ignore": h x w bool`` where the
    image has crowd regions; ``kinds``: "l" (labeled) or "u" (pseudo-labeled) per image.
    """

    weak: torch.Tensor
    strong: torch.Tensor
    valid: torch.Tensor
    targets: list[dict]
    kinds: list[str]

    def to(self, device: torch.device) -> "Batch":
        targets = [{k: v.to(device) for k, v in t.items()} for t in self.targets]
        return Batch(self.weak.to(device), self.strong.to(device), self.valid, targets, self.kinds)


@dataclass
class Objective:
    """Loss weights of J for one stage (L_sup always has weight 1 when labels are given)."""

    l_semi: float = 0.0
    l_pxl: float = 0.0
    pixel_contrast: PixelContrastConfig = field(default_factory=PixelContrastConfig)
    pseudo_label: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)

    def __call__(self, model: Segmenter, batch: Batch, *, step: int = 0, total_steps: int = 1,
                 seed: int = 0, rank: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
        """J of ``batch`` (on the model's device) -> (scalar total with its graph, logged terms).

        ``step``/``total_steps`` set the temperature schedule; ``seed``/``step``/``rank`` seed
        the contrastive sampler. The caller seeds the global RNG (the loss's point sampling).
        """
        use_pxl = self.l_pxl > 0
        out = model(batch.weak, embeddings="weak" if use_pxl else "none")
        kinds, targets = batch.kinds, batch.targets
        n_l = kinds.count("l")
        logs: dict[str, float] = {}
        total = batch.weak.new_zeros(())
        if n_l:
            sup = model.compute_losses(out.select(slice(0, n_l)), targets[:n_l])
            total = total + sup["loss"]
            logs["loss_sup"] = float(sup["loss"].detach())
        if n_l < len(kinds) and self.l_semi > 0:
            semi = model.compute_losses(out.select(slice(n_l, None)), targets[n_l:])
            total = total + self.l_semi * semi["loss"]
            logs["loss_semi"] = float(semi["loss"].detach())
        if use_pxl:
            valid = batch.valid
            if any("ignore" in t for t in targets):  # crowd: never an anchor or a negative
                ignore = torch.stack([t["ignore"].cpu() if "ignore" in t else
                                      torch.zeros_like(valid[0]) for t in targets])
                valid = valid & ~ignore
            loss_pxl, diag = pixel_loss(model, out, batch.strong, targets, valid,
                                        self.pixel_contrast, step, total_steps, seed, rank)
            total = total + self.l_pxl * loss_pxl
            logs.update({"loss_pxl": float(loss_pxl.detach()), **diag})
        return total, logs


def pixel_loss(model: Segmenter, out: SegmenterOutput, strong: torch.Tensor, targets: list[dict],
               valid: torch.Tensor, pc: PixelContrastConfig, step: int, total_steps: int,
               seed: int, rank: int):
    """L_pxl of the batch: weak embeddings vs stop-gradient strong ones, negatives by ``pc.sampler``.

    FNR is measured against the instances of the batch's targets (labels or hard pseudo-labels).
    """
    from sskd.losses.pixel_contrastive import (fused_pseudo_probabilities, pixel_contrastive_loss,
                                               temperature_at)
    with torch.no_grad():
        z_strong = model.pixel_embeddings(strong, "strong")
    z_weak = out.embed_weak
    y = None
    if pc.sampler != "uniform":
        pm, pcls = model.pixel_probabilities(out)
        y = fused_pseudo_probabilities(pm, pcls, mode=pc.sampler)
    ids = instance_id_map([t["masks"].cpu() for t in targets], tuple(z_weak.shape[-2:])).to(z_weak.device)
    temp = pc.temperature if pc.temperature_start <= 0 else \
        temperature_at(step, total_steps, pc.temperature_start, pc.temperature)
    g = torch.Generator(device=z_weak.device).manual_seed(step_seed(seed, step, 20_000 + rank))
    loss, diag = pixel_contrastive_loss(
        z_weak.float(), z_strong.float(), None if y is None else y.float(),
        num_anchors=pc.num_anchors, num_negatives=pc.num_negatives, temperature=temp,
        sampler=pc.sampler, generator=g, instance_ids=ids, valid=valid.to(z_weak.device),
        candidates=pc.candidates)
    keep = {k: float(v) for k, v in diag.items() if k in ("margin", "fnr") and v is not None}
    keep["temperature"] = float(temp)
    return loss, keep
