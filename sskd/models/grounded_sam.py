"""The paper's foundation teacher: Grounding DINO boxes prompting SAM / SAM2 for masks.

Pipeline of :meth:`GroundedSamTeacher.forward` for ``B x 3 x H x W`` images in [0, 1]:

1. The class names form a text prompt ``"circle . rectangle . triangle ."`` (several prompts
   when the names exceed the detector's ``max_text_len``). Grounding DINO returns, per query,
   a box (``cx, cy, w, h`` in [0, 1]) and one logit per prompt token. The logit of class ``c`` is
   the max over the tokens of its name (how Grounding DINO's post-processing scores a phrase),
   then a learnable affine calibration ``scale * x + bias_c`` (the "class_head"; identity for
   pretrained weights). ``class_logits`` is ``B x Q x (C+1)``: those sigmoid logits plus a
   constant 0 no-object column, so softmax over ``C+1`` reduces to the detector's sigmoid score
   when ``C = 1`` (what :meth:`Segmenter.pixel_probabilities` uses for the fused sampler).
2. Each query's box (detached: the cascade does not train boxes through SAM) prompts SAM /
   SAM2 with ``multimask_output=False``: one mask per query, ``mask_logits`` ``B x Q x h x w``
   at SAM's low-res mask resolution (256 x 256 for 1024 px SAM input, cropped to the image).
   ``Q`` is the detector's query count times the number of prompts; ``num_mask_queries > 0``
   keeps only that many top-scoring queries (the "paper" size keeps 100 of 900).
3. The two projection heads for L_pxl attach to SAM's image-encoder embedding (``B x 256 x 64 x
   64`` for SAM ViT / SAM2's stride-16 FPN level; cropped to the image), i.e. the frozen
   foundation features every mask is decoded from.

Sizes: "tiny" runs SAM at 64 px (32 x 32 masks, 8 x 8 embeddings) whatever the input size;
its detector needs inputs >= 64 px (GroupNorm on the coarsest level needs more than 1 x 1).

What trains (:meth:`Segmenter.set_trainable`, ``teacher.trainable`` in a run): the parts of
:data:`TRAINABLE_GROUPS`. ``class_head`` (the calibration, plus MM-Grounding-DINO's contrastive
biases), ``box_head`` (the detector's box MLPs), ``decoder`` (detector decoder layers + query
embeddings), ``fusion_encoder`` (detector feature enhancer, input projections, text projection),
``backbone`` (the detector's Swin / ResNet), ``text_encoder`` (BERT), ``image_encoder`` (SAM's
ViT / SAM2's Hiera + FPN, and SAM2's no-memory embedding), ``prompt_encoder`` (SAM's box-corner
and no-mask embeddings, positional encoding), ``mask_decoder`` (SAM mask decoder minus the
multimask-only hypernetworks and SAM2's object-score head, which single-mask box prompting never
uses), ``projection_head`` (the weak L_pxl head). Never trained: the EMA strong head, the
two-stage proposal head (``enc_output*``: it only ranks proposals through a non-differentiable
top-k), SAM's mask-input, point-label and padding-point embeddings (box prompts never
use them).

Default (:data:`DEFAULT_TRAINABLE`): the detector's decoder and heads, SAM's mask decoder and the
projection head; the image backbones, BERT, the fusion encoder and SAM's prompt encoder stay
frozen and in eval mode. That is the common recipe for adapting these models with little data
(SAM: train the mask decoder on frozen image features; Grounding DINO: keep the text encoder and
the image backbone fixed), and it bounds memory (no backward pass through Swin-L or Hiera-L).
Consequence: the projection heads read SAM's *frozen* image embedding, so in stage 1 L_pxl trains
only the projection head and cannot change the teacher's masks; select ``image_encoder`` to let
it act (docs/method.md, 'What trains').
"""

from __future__ import annotations

import logging
import math
import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sskd.models import grounded_sam_configs as gc
from sskd.models.base import (Prediction, Segmenter, SegmenterOutput, register_model,
                              resolve_overlaps)
from sskd.models.grounded_sam_loss import LossWeights, set_prediction_loss
from sskd.models.heads import ProjectionHead, ema_update

log = logging.getLogger(__name__)

EMBEDDING_MODES = ("none", "weak", "strong", "both")
#: named parts (see the module docstring), first matching prefix wins
PARTS: dict[str, tuple[str, ...]] = {
    "class_head": ("class_calibration.", "detector.class_embed.",
                   "detector.model.decoder.class_embed."),
    "box_head": ("detector.bbox_embed.", "detector.model.decoder.bbox_embed."),
    "decoder": ("detector.model.decoder.", "detector.model.query_position_embeddings."),
    "fusion_encoder": ("detector.model.encoder.", "detector.model.input_proj_vision.",
                       "detector.model.level_embed", "detector.model.text_projection."),
    "backbone": ("detector.model.backbone.",),
    "text_encoder": ("detector.model.text_backbone.",),
    "image_encoder": ("sam.vision_encoder.", "sam.no_memory_embedding"),
    # box corners only: SAM's point_embed.{2,3} (SAM2 keeps all four in one table); point
    # labels 0/1, padding points and mask inputs are never used by box prompts
    "prompt_encoder": ("sam.prompt_encoder.point_embed.2.", "sam.prompt_encoder.point_embed.3.",
                       "sam.prompt_encoder.point_embed.weight", "sam.prompt_encoder.no_mask_embed.",
                       "sam.prompt_encoder.shared_embedding.", "sam.shared_image_embedding."),
    "mask_decoder": ("sam.mask_decoder.",),
    "projection_head": ("embed_weak.",),
}
TRAINABLE_GROUPS = tuple(PARTS)
DEFAULT_TRAINABLE = ("class_head", "box_head", "decoder", "mask_decoder", "projection_head")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # Grounding DINO, SAM and SAM2 processors all use these
IMAGENET_STD = (0.229, 0.224, 0.225)
FILL_LOGIT = -30.0  # class logit of a class absent from a query's prompt (sigmoid ~ 1e-13)

#: size -> builder defaults that differ by size (every other option has one default)
SIZE_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"detector_size": 0, "num_mask_queries": 0, "num_points": 2048},
    "paper": {"detector_size": 800, "num_mask_queries": 100, "num_points": 12544},
}


class ClassCalibration(nn.Module):
    """``B x Q x C`` raw class logits -> ``scale * x + bias`` (shared scale, per-class bias)."""

    def __init__(self, num_classes: int, scale: float = 1.0, bias: float = 0.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.bias = nn.Parameter(torch.full((num_classes,), float(bias)))

    def forward(self, x: torch.Tensor, class_ids: list[int] | None = None) -> torch.Tensor:
        """``x``: ``B x Q x K`` logits of classes ``class_ids`` (all ``C`` when None)."""
        bias = self.bias if class_ids is None or len(class_ids) == self.bias.numel() \
            else self.bias[torch.as_tensor(class_ids, device=x.device)]
        return x * self.scale + bias


class GroundedSamTeacher(Segmenter):
    """Grounding DINO + SAM/SAM2 behind the :class:`Segmenter` interface (see module docstring)."""

    def __init__(self, num_classes: int, detector: nn.Module, tokenizer, mask_model: nn.Module,
                 classes: list[str], *, mask_model_name: str, score_threshold: float,
                 max_instances: int, detector_size: int, num_mask_queries: int, num_points: int,
                 trainable: tuple[str, ...], embed_dim: int, ema_momentum: float,
                 calibration_init: tuple[float, float], config: dict) -> None:
        super().__init__(num_classes, **config)
        if len(classes) != num_classes:
            raise ValueError(f"grounded_sam: classes has {len(classes)} names but num_classes="
                             f"{num_classes}; pass one name per class id")
        self.classes = list(classes)
        self.detector = detector
        self.sam = mask_model
        self.mask_model_name = mask_model_name
        self.score_threshold, self.max_instances = float(score_threshold), int(max_instances)
        self.detector_size, self.num_mask_queries = int(detector_size), int(num_mask_queries)
        self.num_points, self.ema_momentum = int(num_points), float(ema_momentum)
        self.loss_weights = LossWeights()
        self.prompts = gc.build_prompts(tokenizer, self.classes, detector.config.max_text_len)
        # Grounding DINO's phrase delimiters default to bert-base ids; use this tokenizer's
        detector.model.special_tokens = gc.delimiter_token_ids(tokenizer)
        self.class_calibration = ClassCalibration(num_classes, *calibration_init)
        for key, value in (("pixel_mean", IMAGENET_MEAN), ("pixel_std", IMAGENET_STD)):
            self.register_buffer(key, torch.tensor(value).view(1, 3, 1, 1), persistent=False)
        channels = self._embedding_channels()
        self.embed_weak = ProjectionHead(channels, embed_dim)
        self.embed_strong = ProjectionHead(channels, embed_dim)
        self.embed_strong.load_state_dict(self.embed_weak.state_dict())
        self.set_trainable(trainable)  # the EMA strong head is in no part: never trains

    # -- trainable parts ---------------------------------------------------------------------
    PARTS = PARTS
    DEFAULT_TRAINABLE = DEFAULT_TRAINABLE

    def part_of(self, name: str) -> str | None:
        """Part of parameter ``name``; None for parts no loss reaches (they never train)."""
        if name.startswith("sam.mask_decoder."):
            hyper = "sam.mask_decoder.output_hypernetworks_mlps."
            multimask_only = name.startswith(hyper) and not name.startswith(hyper + "0.")
            if multimask_only or name.startswith("sam.mask_decoder.pred_obj_score_head."):
                return None  # multimask-only / object-score parts: unused by single-mask prompts
        return super().part_of(name)

    def is_encoder_parameter(self, name: str) -> bool:
        return name.startswith(("detector.model.backbone.", "detector.model.text_backbone.",
                                "sam.vision_encoder."))

    def after_optimizer_step(self) -> None:
        ema_update(self.embed_strong, self.embed_weak, self.ema_momentum)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, embeddings: str = "none") -> SegmenterOutput:
        """``B x 3 x H x W`` in [0, 1] -> class logits ``B x Q x (C+1)``, mask logits
        ``B x Q x h x w``; ``extras``: ``pred_boxes`` ``B x Q x 4`` (cxcywh in [0, 1]) and
        ``iou_scores`` ``B x Q`` (SAM's predicted mask IoU). ``embed_weak/strong``:
        ``B x D x h' x w'`` on SAM's image embedding (strong always detached)."""
        if embeddings not in EMBEDDING_MODES:
            raise ValueError(f"embeddings must be one of {EMBEDDING_MODES}, got {embeddings!r}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"grounded_sam expects B x 3 x H x W images, got "
                             f"{tuple(images.shape)}")
        class_logits, boxes = self._detect(images)
        if 0 < self.num_mask_queries < class_logits.shape[1]:
            keep = class_logits.max(-1).values.topk(self.num_mask_queries, dim=1).indices
            class_logits = class_logits.gather(
                1, keep[..., None].expand(-1, -1, class_logits.shape[-1]))
            boxes = boxes.gather(1, keep[..., None].expand(-1, -1, 4))
        feats, embed = self._image_features(images)
        mask_logits, iou = self._prompt_masks(feats, boxes, images.shape[-2:])
        no_object = class_logits.new_zeros(class_logits.shape[:-1] + (1,))
        out = SegmenterOutput(class_logits=torch.cat([class_logits, no_object], -1),
                              mask_logits=mask_logits,
                              extras={"pred_boxes": boxes, "iou_scores": iou})
        if embeddings in ("weak", "both"):
            out.embed_weak = self.embed_weak(embed)
        if embeddings in ("strong", "both"):
            with torch.no_grad():
                out.embed_strong = self.embed_strong(embed.detach())
        return out

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)

    def _detect(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> calibrated class logits ``B x Q x C``, boxes ``B x Q x 4`` (all prompts' queries)."""
        B, _, H, W = images.shape
        x = images
        if self.detector_size > 0:  # the processor's "shortest edge" resize (longest <= 1333)
            s = min(self.detector_size / min(H, W), 1333 / max(H, W))
            x = F.interpolate(x, size=(round(H * s), round(W * s)), mode="bilinear",
                              align_corners=False, antialias=s < 1)
        x = self._normalise(x)
        all_logits, all_boxes = [], []
        for chunk in self.prompts:
            ids = chunk.input_ids.to(images.device)[None].expand(B, -1)
            out = self.detector(pixel_values=x, input_ids=ids, attention_mask=torch.ones_like(ids))
            tok = out.logits[..., :ids.shape[1]]                          # B x Q x T
            tmap = chunk.token_map.to(images.device)                      # K x T
            per_class = tok[:, :, None, :].masked_fill(~tmap[None, None], float("-inf")).amax(-1)
            all_logits.append(self._scatter_classes(
                self.class_calibration(per_class, chunk.class_ids), chunk.class_ids))
            all_boxes.append(out.pred_boxes)
        return torch.cat(all_logits, 1), torch.cat(all_boxes, 1)

    def _scatter_classes(self, per_class: torch.Tensor, class_ids: list[int]) -> torch.Tensor:
        """``B x Q x K`` logits of a prompt's classes -> ``B x Q x C`` (others: FILL_LOGIT)."""
        if len(class_ids) == self.num_classes:
            return per_class
        full = per_class.new_full(per_class.shape[:2] + (self.num_classes,), FILL_LOGIT)
        idx = torch.as_tensor(class_ids, device=per_class.device)
        return full.index_copy(2, idx, per_class)

    # -- SAM / SAM2 ----------------------------------------------------------------------------
    def _sam_frame(self, H: int, W: int) -> tuple[int, int, int]:
        """(S, h, w): SAM's square input side and the image's extent inside it.

        SAM resizes the longest side to S and pads bottom/right; SAM2 resizes to S x S.
        """
        S = int(self.sam.config.prompt_encoder_config.image_size)
        if self.mask_model_name == "sam2":
            return S, S, S
        s = S / max(H, W)
        return S, round(H * s), round(W * s)

    def _embedding_channels(self) -> int:
        cfg = self.sam.config
        return cfg.vision_config.output_channels if self.mask_model_name == "sam" \
            else cfg.vision_config.fpn_hidden_size

    def _image_features(self, images: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """-> (what SAM's decoder takes as ``image_embeddings``, ``B x Cs x e_h x e_w`` embedding
        cropped to the image, the projection heads' input)."""
        H, W = images.shape[-2:]
        S, h, w = self._sam_frame(H, W)
        x = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False,
                          antialias=max(H, W) > S)
        x = F.pad(self._normalise(x), (0, S - w, 0, S - h))
        frozen = not any(p.requires_grad for p in self.sam.vision_encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            vis = self.sam.vision_encoder(x)
        if self.mask_model_name == "sam":
            feats = emb = vis.last_hidden_state                           # B x Cs x S/p x S/p
        else:  # SAM2: FPN levels 0/1 feed the decoder's high-res path (as get_image_features)
            f0, f1, f2 = vis.fpn_hidden_states[:3]
            dec = self.sam.mask_decoder
            emb = f2 + self.sam.no_memory_embedding.view(1, -1, 1, 1)
            feats = [dec.conv_s0(f0), dec.conv_s1(f1), emb]
        e = emb.shape[-1]
        return feats, emb[..., :math.ceil(h * e / S), :math.ceil(w * e / S)]

    def _prompt_masks(self, feats: Any, boxes: torch.Tensor,
                      image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes ``B x Q x 4`` (cxcywh, [0, 1]) -> mask logits ``B x Q x h x w``, IoU ``B x Q``."""
        S, h, w = self._sam_frame(*image_size)
        b = boxes.detach().float()
        xyxy = torch.stack([b[..., 0] - b[..., 2] / 2, b[..., 1] - b[..., 3] / 2,
                            b[..., 0] + b[..., 2] / 2, b[..., 1] + b[..., 3] / 2], -1).clamp(0, 1)
        xyxy = xyxy * xyxy.new_tensor([w, h, w, h])
        out = self.sam(image_embeddings=feats, input_boxes=xyxy, multimask_output=False)
        masks = out.pred_masks[:, :, 0]                                   # B x Q x L x L
        L = masks.shape[-1]
        masks = masks[..., :math.ceil(h * L / S), :math.ceil(w * L / S)]
        return masks, out.iou_scores[:, :, 0]

    # -- losses and inference -----------------------------------------------------------------
    def compute_losses(self, outputs: SegmenterOutput,
                       targets: list[dict]) -> dict[str, torch.Tensor]:
        """Set-prediction loss (:mod:`sskd.models.grounded_sam_loss`); ``loss`` is the total."""
        missing = [k for k in ("pred_boxes", "iou_scores") if k not in outputs.extras]
        if missing:
            raise KeyError(f"grounded_sam compute_losses needs outputs.extras {missing} (the "
                           "detector's boxes and SAM's IoU); slice a batch with "
                           "SegmenterOutput.select(), which keeps extras")
        return set_prediction_loss(outputs.class_logits, outputs.extras["pred_boxes"],
                                   outputs.mask_logits, outputs.extras["iou_scores"], targets,
                                   self.loss_weights, self.num_points)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, score_threshold: float | None = None,
                max_instances: int | None = None, mask_threshold: float = 0.5,
                overlapping: bool = False, mask_refiner=None) -> list[Prediction]:
        """Grounded-SAM inference: ``B x 3 x H x W`` -> one :class:`Prediction` per image.

        Score of a box = max over classes of the sigmoid class score (the detector's box score),
        label = that class; boxes below ``score_threshold`` are dropped, at most
        ``max_instances`` kept (defaults: the builder's). Masks are SAM's, upsampled to ``H x W``
        and binarised at ``mask_threshold``; overlaps go to the higher score unless
        ``overlapping`` (COCO evaluation); empty masks dropped. ``mask_refiner``: as
        :meth:`Segmenter.predict`, on the kept masks' probabilities.
        """
        thr = self.score_threshold if score_threshold is None else float(score_threshold)
        k = self.max_instances if max_instances is None else int(max_instances)
        out = self.forward_eval(images)
        H, W = images.shape[-2:]
        scores, classes = out.class_logits[..., :-1].float().sigmoid().max(-1)   # B x Q
        results = []
        for b in range(images.shape[0]):
            order = scores[b].argsort(descending=True)
            order = order[scores[b][order] >= thr][:k]
            if order.numel() == 0:
                empty = torch.zeros(0, H, W, dtype=torch.bool, device=images.device)
                results.append(Prediction(empty, order.new_zeros(0), scores.new_zeros(0)))
                continue
            m = F.interpolate(out.mask_logits[b, order][None].float(), size=(H, W), mode="bilinear",
                              align_corners=False).sigmoid()
            if mask_refiner is not None:
                m = mask_refiner(images[b:b + 1], m)
            m = m[0] > mask_threshold
            if not overlapping:
                m = resolve_overlaps(m)
            keep = m.flatten(1).any(1)
            results.append(Prediction(m[keep], classes[b, order][keep].long(),
                                      scores[b, order][keep].clamp(0, 1)))
        return results


@register_model("grounded_sam")
def build_grounded_sam(num_classes: int, size: str = "tiny", classes: list[str] | None = None,
                       mask_model: str = "sam2", score_threshold: float = 0.3,
                       max_instances: int = 100, detector_weights: str = "", sam_weights: str = "",
                       trainable: tuple[str, ...] | list[str] = ("default",),
                       embed_dim: int = 128, ema_momentum: float = 0.99,
                       detector_size: int | None = None, num_mask_queries: int | None = None,
                       num_points: int | None = None, vocab_dir: str = "") -> GroundedSamTeacher:
    """Build the Grounding DINO + SAM/SAM2 teacher.

    Args (one line each, as saved in ``model.json``):
        num_classes: number of classes C (``classes[class_id]`` names class ``class_id``).
        size: "tiny" (offline random, seconds on CPU) | "paper" (Swin-L GDINO + SAM ViT-H /
            SAM2.1 Hiera-L, random init, for efficiency numbers); ignored for the halves loaded
            from weights.
        classes: class names forming the text prompt (default ``class0 .. class{C-1}``).
        mask_model: "sam2" (the paper's SAM2.1, default) | "sam" (SAM ViT).
        score_threshold: default box-score threshold of :meth:`predict` (paper: 0.3).
        max_instances: default cap on instances per image in :meth:`predict` (paper: 100).
        detector_weights: local save_pretrained dir or hub id of Grounding DINO ("" = random).
        sam_weights: local dir or hub id of SAM / SAM2 matching ``mask_model`` ("" = random).
        trainable: parts that train: names of :data:`TRAINABLE_GROUPS`, "default"
            (:data:`DEFAULT_TRAINABLE`) or "all".
        embed_dim: pixel-embedding dimension D of the projection heads.
        ema_momentum: strong head <- m * strong + (1 - m) * weak after each optimizer step.
        detector_size: detector input shortest edge in px (0 = as given; default: 0 tiny, the
            checkpoint's processor / 800 otherwise).
        num_mask_queries: keep this many top queries for SAM prompting (0 = all; paper: 100).
        num_points: points sampled per mask for matching and mask losses.
        vocab_dir: where the generated tiny vocab.txt is written ("" = a temporary dir).
    """
    if size not in gc.SIZES:
        raise ValueError(f"unknown grounded_sam size {size!r}; valid: {list(gc.SIZES)}")
    if mask_model not in gc.MASK_MODELS:
        raise ValueError(f"grounded_sam mask_model must be one of {list(gc.MASK_MODELS)}, got "
                         f"{mask_model!r}")
    if classes is None:
        if detector_weights:
            raise ValueError("grounded_sam with detector_weights needs the class names "
                             "(classes=[...]) to build its text prompt")
        classes = [f"class{i}" for i in range(num_classes)]
    classes = [str(c) for c in classes]
    config = {"size": size, "classes": classes, "mask_model": mask_model,
              "score_threshold": score_threshold, "max_instances": max_instances,
              "detector_weights": detector_weights, "sam_weights": sam_weights,
              "trainable": list(trainable), "embed_dim": embed_dim, "ema_momentum": ema_momentum,
              "detector_size": detector_size, "num_mask_queries": num_mask_queries,
              "num_points": num_points, "vocab_dir": vocab_dir}
    defaults = SIZE_DEFAULTS[size]
    edge = None
    if detector_weights:
        detector, tokenizer, edge = gc.load_detector(detector_weights)
        calib = (1.0, 0.0)  # identity: keep the pretrained detector's zero-shot scores
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = gc.load_vocab_tokenizer(gc.write_tiny_vocab(classes, vocab_dir or tmp))
        detector = gc.build_detector(size, tokenizer)
        # random contrastive logits are O(sqrt(d)) large: rescale and start at the focal-loss
        # prior p = 0.01 so an untrained detector does not fire on every query
        calib = (1.0 / math.sqrt(detector.config.d_model), -math.log((1 - 0.01) / 0.01))
    if sam_weights:
        sam = gc.load_mask_model(sam_weights, mask_model)
    else:
        if detector_weights:
            log.warning("grounded_sam: detector_weights given but no sam_weights; the %s mask "
                        "model is randomly initialised (size=%r)", mask_model, size)
        sam = gc.build_mask_model(size, mask_model)
    if detector_size is None:
        detector_size = (edge or 800) if detector_weights else defaults["detector_size"]
    return GroundedSamTeacher(
        num_classes, detector, tokenizer, sam, classes, mask_model_name=mask_model,
        score_threshold=score_threshold, max_instances=max_instances, detector_size=detector_size,
        num_mask_queries=(defaults["num_mask_queries"] if num_mask_queries is None
                          else num_mask_queries),
        num_points=defaults["num_points"] if num_points is None else num_points,
        trainable=tuple(trainable), embed_dim=embed_dim, ema_momentum=ema_momentum,
        calibration_init=calib, config=config)
