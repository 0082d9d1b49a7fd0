"""The Mask2Former-family segmenter: DINOv2 encoder + DPT neck + Mask2Former decoder + L_pxl heads.

One class serves the student, the trainable teacher and the stand-in foundation teacher; they
differ only by size (:mod:`sskd.models.sizes`) and options (``trainable``). Data flow for
``images: B x 3 x H x W`` in ``[0, 1]`` (``H, W`` multiples of the patch size ``p``):

1. ImageNet normalisation, then ``transformers.Dinov2Model`` -> hidden states of the
   ``out_layers`` blocks, each ``B x (1 + H/p * W/p) x C`` passed through the encoder's final
   LayerNorm (as DINOv2 backbones do for dense heads).
2. :class:`~sskd.models.dpt_neck.DPTNeck` -> maps at strides 4, 8, 16, 32.
3. ``Mask2FormerPixelDecoder`` (multi-scale deformable attention over strides 8-32, FPN to
   stride 4) -> mask features ``B x M x H/4 x W/4`` and 3 multi-scale maps.
4. ``Mask2FormerTransformerModule`` (masked attention, ``dec_layers`` layers) + a linear class
   head -> per-layer class logits ``B x Q x (K+1)`` and mask logits ``B x Q x H/4 x W/4``.
5. Weak/strong projection heads on the mask features -> ``B x D x H/4 x W/4`` (L2-normalised).

Option ``silhouette_channels > 0`` (off in every size; the demo preset turns it on): a CNN reads
the outline of each final-layer mask (:class:`~sskd.models.heads.SilhouetteClassHead`) and adds
to the class logits, which then become factorised log-probabilities
``[log p(obj) + log p(c | obj), log p(no obj)]`` in every layer; its own loss classifies the
target masks' outlines (``loss_silhouette``, class weight). With ``silhouette_only`` the classes
come from the outline alone (the linear head keeps only the no-object logit).

Option ``mask_upsampler_channels > 0`` (off in every size and preset; measured in the demo,
docs/method.md "Mask resolution"): the
stride-4 mask features are lifted to ``H x W`` by an image-guided convex upsampler
(:class:`~sskd.models.upsampler.ConvexMaskUpsampler`) before the query decoder reads them, so
every layer's mask logits are ``B x Q x H x W``; the projection heads and the silhouette head
still read stride 4 (the silhouette head the full-resolution mask probabilities area-pooled).

Losses: transformers' ``Mask2FormerLoss`` (Hungarian matching, class CE weight 2.0 with
no-object 0.1, point-sampled mask BCE 5.0 and dice 5.0) on the final layer and, as deep
supervision, on every earlier prediction (the query-only one and each intermediate layer).

Initialisation: the decoder pieces are plain ``nn.Module``s here (not a ``PreTrainedModel``), so
transformers' ``_init_weights`` never runs on them. That avoids its BatchNorm/GroupNorm gamma
~ N(0, 0.02) (norms keep PyTorch's gamma = 1: docs/method.md, 'Deviations'), but leaves a few
tensors that Mask2Former needs initialised by hand (:func:`init_mask2former_weights`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn
from transformers import Dinov2Config, Dinov2Model, Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerMaskedAttentionDecoderLayer, Mask2FormerPixelDecoder,
    Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention, Mask2FormerTransformerModule)

from sskd.losses.crowd import ignore_maps
from sskd.losses.soft_classes import SoftClassMask2FormerLoss, soft_class_cross_entropy
from sskd.models.base import Segmenter, SegmenterOutput, register_model
from sskd.models.dpt_neck import DPTNeck
from sskd.models.heads import ProjectionHead, SilhouetteClassHead, ema_update
from sskd.models.sizes import resolve_size
from sskd.models.upsampler import ConvexMaskUpsampler

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EMBEDDING_MODES = ("none", "weak", "strong", "both")


def _encoder_config(cfg: dict) -> Dinov2Config:
    # use_mask_token=False: the iBOT mask token is only used in DINOv2 pretraining; keeping it
    # would leave a trainable parameter that never receives a gradient.
    return Dinov2Config(hidden_size=cfg["encoder_hidden"], num_hidden_layers=cfg["encoder_layers"],
                        num_attention_heads=cfg["encoder_heads"], patch_size=cfg["patch_size"],
                        image_size=cfg["encoder_image_size"], use_mask_token=False)


def _decoder_config(cfg: dict, num_classes: int) -> Mask2FormerConfig:
    return Mask2FormerConfig(
        num_labels=num_classes, feature_size=cfg["feature_size"],
        mask_feature_size=cfg["mask_feature_size"], hidden_dim=cfg["hidden_dim"],
        encoder_layers=cfg["pixel_decoder_layers"], encoder_feedforward_dim=cfg["pixel_decoder_ffn"],
        decoder_layers=cfg["dec_layers"] + 1,  # HF counts the query-only prediction as a layer
        num_attention_heads=cfg["num_heads"], dim_feedforward=cfg["dim_feedforward"],
        num_queries=cfg["num_queries"], no_object_weight=cfg["no_object_weight"],
        class_weight=cfg["class_weight"], mask_weight=cfg["mask_weight"],
        dice_weight=cfg["dice_weight"], train_num_points=cfg["train_num_points"],
        oversample_ratio=cfg["oversample_ratio"],
        importance_sample_ratio=cfg["importance_sample_ratio"], dropout=0.0,
        feature_strides=[4, 8, 16, 32], common_stride=4)


@torch.no_grad()
def init_mask2former_weights(module: nn.Module) -> None:
    """Mask2Former's own initialisation for the decoder pieces built outside ``PreTrainedModel``.

    * deformable attention: zero offset weights with biases that start the ``n_points`` samples
      of each head on a ring of radius 1..n_points around the reference point (one direction per
      head), uniform attention weights, Xavier value/output projections;
    * masked-attention decoder layers: Xavier on every matrix, zero cross-attention in-bias;
    * pixel-decoder level embeddings: N(0, 1) (they are allocated uninitialised upstream).
    """
    for m in module.modules():
        if isinstance(m, Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention):
            nn.init.zeros_(m.sampling_offsets.weight)
            angle = torch.arange(m.n_heads, dtype=torch.float32) * (2 * math.pi / m.n_heads)
            direction = torch.stack([angle.cos(), angle.sin()], -1)
            direction = direction / direction.abs().amax(-1, keepdim=True)  # on the unit square
            radius = torch.arange(1, m.n_points + 1, dtype=torch.float32)
            ring = direction[:, None, None, :] * radius[None, None, :, None]  # heads x 1 x pts x 2
            m.sampling_offsets.bias.copy_(ring.expand(m.n_heads, m.n_levels, m.n_points, 2).reshape(-1))
            nn.init.zeros_(m.attention_weights.weight)
            nn.init.zeros_(m.attention_weights.bias)
            for lin in (m.value_proj, m.output_proj):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
        elif isinstance(m, Mask2FormerMaskedAttentionDecoderLayer):
            for p in m.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            nn.init.zeros_(m.cross_attn.in_proj_bias)
        elif isinstance(m, Mask2FormerPixelDecoder):
            nn.init.normal_(m.level_embed)


class Mask2FormerSegmenter(Segmenter):
    """DINOv2 + DPT neck + Mask2Former. Build it with ``build_model("mask2former", K, size=...)``.

    Args:
        num_classes: ``K`` foreground classes (class logits have ``K + 1`` entries, last =
            no-object).
        size: a key of :data:`sskd.models.sizes.SIZES`.
        **overrides: any key of :data:`sskd.models.sizes.DEFAULTS`, e.g. ``num_queries=50``,
            ``trainable=["neck", "pixel_decoder", "decoder", "class_head", "projection_head"]``,
            ``encoder_weights="weights/dinov2-small"``.

    Parts (:meth:`set_trainable`): ``encoder`` (DINOv2), ``neck`` (DPT), ``pixel_decoder`` (and
    the mask upsampler), ``decoder`` (masked-attention query decoder), ``class_head``,
    ``projection_head`` (the weak L_pxl head; the strong one is its EMA and never trains).
    Default: every part, as a Mask2Former is fine-tuned end to end (the encoder at
    ``train.backbone_lr_mult`` of the lr).
    """

    PARTS = {"encoder": ("encoder.",), "neck": ("neck.",),
             "pixel_decoder": ("pixel_decoder.", "mask_upsampler."),
             "decoder": ("transformer.",), "class_head": ("class_head.", "silhouette_head."),
             "projection_head": ("embed_weak.",)}

    def __init__(self, num_classes: int, size: str = "tiny", **overrides: Any) -> None:
        if "freeze_encoder" in overrides:  # the option trainable replaced (old model.json files)
            if overrides.pop("freeze_encoder"):
                if "trainable" in overrides:
                    raise TypeError("mask2former: give trainable=[...] or the deprecated "
                                    "freeze_encoder=True, not both")
                warnings.warn("mask2former freeze_encoder=True is deprecated: use trainable="
                              f"{list(self.PARTS)[1:]}", DeprecationWarning, stacklevel=3)
                overrides["trainable"] = list(self.PARTS)[1:]
        cfg = resolve_size(size, overrides)
        saved = {k: v for k, v in overrides.items() if k != "encoder_weights"}
        # encoder_weights is not part of the saved config: a saved model carries its own
        # weights, and reloading must not need the original checkpoint directory.
        super().__init__(num_classes, size=size, **saved)
        self.size = size
        self.cfg = cfg
        self.patch_size = int(cfg["patch_size"])
        self.out_layers = [int(i) for i in cfg["out_layers"]]
        n_layers = int(cfg["encoder_layers"])
        if len(self.out_layers) != 4 or not all(0 <= i < n_layers for i in self.out_layers):
            raise ValueError(f"out_layers must be 4 block indices in [0, {n_layers}), got {self.out_layers}")
        if max(self.out_layers) != n_layers - 1:
            # blocks after the last tapped one would get no gradient: fail early instead
            raise ValueError(f"out_layers {self.out_layers} must include the last encoder block "
                             f"{n_layers - 1}; reduce encoder_layers or tap the last block")
        if cfg["dec_layers"] < 3:
            # decoder layer i cross-attends to pyramid level i % 3: fewer layers leave a level
            # (and its input projection) unused, i.e. trainable parameters without gradient
            raise ValueError(f"dec_layers must be >= 3 (one per feature level), got {cfg['dec_layers']}")
        if cfg["feature_size"] % 32:
            raise ValueError(f"feature_size must be a multiple of 32 (GroupNorm(32)), got {cfg['feature_size']}")

        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

        self.encoder = Dinov2Model(_encoder_config(cfg))
        self.neck = DPTNeck(cfg["encoder_hidden"], list(cfg["neck_channels"]), self.patch_size,
                            readout=cfg["readout"])
        m2f = _decoder_config(cfg, self.num_classes)
        self.pixel_decoder = Mask2FormerPixelDecoder(m2f, feature_channels=list(cfg["neck_channels"]))
        self.transformer = Mask2FormerTransformerModule(in_features=cfg["feature_size"], config=m2f)
        if cfg["silhouette_only"] and not cfg["silhouette_channels"]:
            raise ValueError("silhouette_only=True reads classes from the silhouette head: set "
                             "silhouette_channels > 0 too (e.g. 32)")
        # silhouette_only: the linear head decides object vs no object only
        self.class_head = nn.Linear(cfg["hidden_dim"],
                                    1 if cfg["silhouette_only"] else self.num_classes + 1)
        self.silhouette_head = (SilhouetteClassHead(self.num_classes, cfg["silhouette_channels"])
                                if cfg["silhouette_channels"] else None)
        if int(cfg["mask_upsampler_channels"]) < 0:
            raise ValueError("mask_upsampler_channels must be >= 0 (0: masks at stride 4), got "
                             f"{cfg['mask_upsampler_channels']}")
        self.mask_upsampler = (ConvexMaskUpsampler(cfg["mask_feature_size"],
                                                   cfg["mask_upsampler_channels"])
                               if cfg["mask_upsampler_channels"] else None)
        # crowd regions: ignored points; soft class targets when pseudo-labels carry them
        self.criterion = SoftClassMask2FormerLoss(m2f, weight_dict={})
        self.loss_weights = {"loss_cross_entropy": float(cfg["class_weight"]),
                             "loss_mask": float(cfg["mask_weight"]),
                             "loss_dice": float(cfg["dice_weight"])}
        init_mask2former_weights(self)

        self.embed_weak = ProjectionHead(cfg["mask_feature_size"], cfg["embed_dim"])
        self.embed_strong = ProjectionHead(cfg["mask_feature_size"], cfg["embed_dim"])
        self.embed_strong.load_state_dict(self.embed_weak.state_dict())
        self.embed_strong.requires_grad_(False)  # EMA of embed_weak, see after_optimizer_step
        self.ema_momentum = float(cfg["ema_momentum"])

        if cfg["encoder_weights"]:
            from sskd.models.pretrained import load_dinov2_weights
            load_dinov2_weights(self.encoder, cfg["encoder_weights"])
        self.encoder_weights = str(cfg["encoder_weights"])  # informational, not saved
        self.set_trainable(cfg["trainable"])

    # ---------------------------------------------------------------------------------- forward
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``B x 3 x H x W`` in [0, 1] -> 4 neck maps ``B x C_i x H/s x W/s`` (s = 4, 8, 16, 32)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be B x 3 x H x W, got shape {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size "
                             f"{self.patch_size}: resize/pad inputs (data.input_size)")
        x = self.normalise(images)
        # a frozen encoder runs without autograd (no activations kept for a backward pass)
        frozen = not any(p.requires_grad for p in self.encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            hidden = self.encoder(pixel_values=x, output_hidden_states=True).hidden_states
            # hidden[0] is the embedding output, hidden[i + 1] the output of block i
            taps = [self.encoder.layernorm(hidden[i + 1]) for i in self.out_layers]
        return self.neck(taps, (H, W))

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` in [0, 1] -> ImageNet-normalised."""
        return (images - self.pixel_mean) / self.pixel_std

    def forward(self, images: torch.Tensor, embeddings: str = "none") -> SegmenterOutput:
        """``B x 3 x H x W`` -> :class:`SegmenterOutput` (masks at ``H/4 x W/4``, or at
        ``H x W`` with ``mask_upsampler_channels``).

        ``embeddings``: "none" | "weak" | "strong" | "both" selects the projection heads run;
        ``embed_strong`` is always detached (stop-gradient branch).
        """
        if embeddings not in EMBEDDING_MODES:
            raise ValueError(f"embeddings must be one of {EMBEDDING_MODES}, got {embeddings!r}")
        pyramid = self.encode(images)
        pix = self.pixel_decoder(pyramid, return_dict=True)
        mask_features = pix.mask_features
        if self.mask_upsampler is not None:
            mask_features = self.mask_upsampler(mask_features, self.normalise(images))
        dec = self.transformer(multi_scale_features=pix.multi_scale_features,
                               mask_features=mask_features)
        class_logits = [self.class_head(h.transpose(0, 1)) for h in dec.intermediate_hidden_states]
        mask_logits = list(dec.masks_queries_logits)
        if self.silhouette_head is not None:
            # the silhouette head reads the final masks only (the ones inference uses; it
            # learns from the targets' own masks, see _silhouette_loss); every layer shares the
            # linear head, so every layer gets the same factorised output
            last = len(class_logits) - 1
            class_logits = [self._factorised(c, mask_logits[i] if i == last else None)
                            for i, c in enumerate(class_logits)]
        out = SegmenterOutput(class_logits=class_logits[-1], mask_logits=mask_logits[-1],
                              aux=list(zip(class_logits[:-1], mask_logits[:-1])))
        if embeddings in ("weak", "both"):
            out.embed_weak = self.embed_weak(pix.mask_features)
        if embeddings in ("strong", "both"):
            with torch.no_grad():
                out.embed_strong = self.embed_strong(pix.mask_features.detach())
        return out

    def _factorised(self, class_logits: torch.Tensor, mask_logits: torch.Tensor | None) -> torch.Tensor:
        """``B x Q x (K+1)`` log-probabilities ``[log p(obj) + log p(c | obj), log p(no obj)]``.

        The linear head's last logit decides object vs no object; which class an object is
        comes from its other logits plus, given ``mask_logits``, the silhouette head's (with
        ``silhouette_only``, from the silhouette head alone: query features hold no class, so
        the class decision cannot drift with them when the teacher adapts). Factorised
        so, a query matched to no object (most of them, many drawing a copy of an object's
        mask) trains only p(obj): in a plain K+1 softmax its loss would push down the very class
        the outline shows, teaching the silhouette head to doubt itself.
        """
        no_obj = class_logits[..., -1:]
        if self.cfg["silhouette_only"]:  # earlier layers: uniform over the classes
            fg = no_obj.new_zeros(*no_obj.shape[:-1], self.num_classes)
        else:
            fg = class_logits[..., :-1]
        if mask_logits is not None:
            fg = fg + self.silhouette_head.from_probabilities(self._silhouette_input(mask_logits))
        return torch.cat([fg.log_softmax(-1) + nn.functional.logsigmoid(-no_obj),
                          nn.functional.logsigmoid(no_obj)], -1)

    def _silhouette_size(self, mask_logits: torch.Tensor) -> tuple[int, int]:
        """The stride-4 grid the silhouette head reads (its receptive field, and its cost, were
        sized for 16 x 16 masks at 64 px)."""
        h, w = mask_logits.shape[-2:]
        f = self.mask_upsampler.factor if self.mask_upsampler is not None else 1
        return h // f, w // f

    def _silhouette_input(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """Detached mask probabilities, area-pooled to the silhouette grid (the class loss never
        reaches the masks)."""
        probs = mask_logits.detach().float().sigmoid()
        size = self._silhouette_size(mask_logits)
        if tuple(probs.shape[-2:]) != size:
            probs = nn.functional.interpolate(probs, size=size, mode="area")
        return probs

    def pixel_embeddings(self, images: torch.Tensor, head: str = "weak") -> torch.Tensor:
        """Projection-head embeddings only: encoder, neck and pixel decoder, no query decoder."""
        if head not in ("weak", "strong"):
            raise ValueError(f"head must be 'weak' or 'strong', got {head!r}")
        feats = self.pixel_decoder(self.encode(images), return_dict=True).mask_features
        if head == "weak":
            return self.embed_weak(feats)
        with torch.no_grad():
            return self.embed_strong(feats.detach())

    # ----------------------------------------------------------------------------------- losses
    def compute_losses(self, outputs: SegmenterOutput, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Set-prediction loss with deep supervision.

        ``targets``: ``B`` dicts ``{"masks": N x H x W, "labels": N}`` (``N`` may be 0; masks at
        any resolution, usually the input's), optionally ``"ignore": H x W`` bool crowd regions
        (left out of the mask losses' sampled points) and ``"class_probs": N x K`` soft class
        targets (rows sum to 1; the class term's target for the matched queries and the
        silhouette head's, :mod:`sskd.losses.soft_classes`; matching keeps ``labels``).
        Returns ``loss`` (weighted sum over the final and every auxiliary prediction) and the
        final layer's unweighted ``loss_ce``, ``loss_mask``, ``loss_dice``; with
        ``silhouette_channels`` also ``loss_silhouette`` (in ``loss`` at the class weight).
        """
        B = outputs.class_logits.shape[0]
        if len(targets) != B:
            raise ValueError(f"got {len(targets)} targets for a batch of {B} images")
        device = outputs.class_logits.device
        masks, labels = [], []
        for i, t in enumerate(targets):
            m, lab = t["masks"], torch.as_tensor(t["labels"], device=device).long().reshape(-1)
            if m.dim() != 3 or m.shape[0] != lab.numel():
                raise ValueError(f"target {i}: masks must be N x H x W with N = len(labels) = "
                                 f"{lab.numel()}, got masks of shape {tuple(m.shape)}")
            if lab.numel() and (lab.min() < 0 or lab.max() >= self.num_classes):
                raise ValueError(f"target {i}: labels must be class ids in [0, {self.num_classes}), "
                                 f"got {lab.tolist()}")
            masks.append(m.to(device=device, dtype=torch.float32))
            labels.append(lab)
        soft = self._soft_targets(targets, labels)
        aux = [{"masks_queries_logits": m.float(), "class_queries_logits": c.float()}
               for c, m in outputs.aux]
        # matching costs and point losses in float32 even inside an AMP region (fp16 matmuls
        # of the pair-wise BCE/dice costs lose precision and can overflow)
        with torch.autocast(device_type=device.type, enabled=False):
            with self.criterion.ignoring(ignore_maps(targets)), self.criterion.soft_targets(soft):
                raw = self.criterion(masks_queries_logits=outputs.mask_logits.float(),
                                     class_queries_logits=outputs.class_logits.float(),
                                     mask_labels=masks, class_labels=labels,
                                     auxiliary_predictions=aux)
        total = outputs.class_logits.new_zeros((), dtype=torch.float32)
        for key, value in raw.items():
            base = key if key in self.loss_weights else key.rsplit("_", 1)[0]
            total = total + self.loss_weights[base] * value
        out = {"loss": total, "loss_ce": raw["loss_cross_entropy"], "loss_mask": raw["loss_mask"],
               "loss_dice": raw["loss_dice"]}
        if self.silhouette_head is not None:
            out["loss_silhouette"] = self._silhouette_loss(
                masks, labels, self._silhouette_size(outputs.mask_logits), soft)
            out["loss"] = total + self.loss_weights["loss_cross_entropy"] * out["loss_silhouette"]
        return out

    def _soft_targets(self, targets: list[dict], labels: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Per-image ``N x K`` class targets when any target has ``class_probs`` (the others'
        labels as one-hot rows), else None (hard labels everywhere)."""
        if not any("class_probs" in t for t in targets):
            return None
        out = []
        for i, (t, lab) in enumerate(zip(targets, labels)):
            if "class_probs" not in t:
                out.append(nn.functional.one_hot(lab, self.num_classes).float())
                continue
            p = torch.as_tensor(t["class_probs"], device=lab.device, dtype=torch.float32)
            if p.shape != (lab.numel(), self.num_classes):
                raise ValueError(f"target {i}: class_probs must be N x K = {lab.numel()} x "
                                 f"{self.num_classes}, got shape {tuple(p.shape)}")
            out.append(p)
        return out

    def _silhouette_loss(self, masks: list[torch.Tensor], labels: list[torch.Tensor],
                         size: tuple[int, int], soft: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Cross-entropy of the silhouette head on the target masks themselves.

        Through the queries alone the head learns too slowly: early masks are blobs, and a
        query's outline keeps changing as the decoder learns. The target masks (ground truth or
        pseudo-labels), area-pooled to the mask logits' ``h x w``, are clean outlines of known
        class from the first step, so the head learns what a class looks like as it would
        from a dataset of silhouettes.
        """
        fractions = [nn.functional.interpolate(m[:, None], size=tuple(size), mode="area")[:, 0]
                     for m in masks if len(m)]
        if not fractions:
            return masks[0].new_zeros(()) if masks else torch.zeros(())
        logits = self.silhouette_head.from_probabilities(torch.cat(fractions)[None])[0]
        if soft is not None:  # the teacher's class distribution of each pseudo-label
            return soft_class_cross_entropy(logits.float(), torch.cat(soft))
        return nn.functional.cross_entropy(logits.float(), torch.cat(labels))

    # ------------------------------------------------------------------------------ training
    def is_encoder_parameter(self, name: str) -> bool:
        return name.startswith("encoder.")

    def after_optimizer_step(self) -> None:
        """EMA: the strong projection head follows the weak one (momentum ``ema_momentum``)."""
        ema_update(self.embed_strong, self.embed_weak, self.ema_momentum)


@register_model("mask2former")
def build_mask2former(num_classes: int, size: str = "tiny", **overrides: Any) -> Mask2FormerSegmenter:
    """Build the Mask2Former-family segmenter; sizes and options in :mod:`sskd.models.sizes`."""
    return Mask2FormerSegmenter(num_classes, size=size, **overrides)
