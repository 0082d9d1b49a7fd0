"""A detectron2 R-CNN (e.g. Mask R-CNN) behind sskd's :class:`~sskd.models.base.Segmenter` interface.

Built with ``sskd.models.build_model("detectron2", K, size=..., config=..., overrides=...)``
(registered when this module is imported; ``sskd.models.build_model`` imports it on demand).

How the interface maps onto an R-CNN (images ``B x 3 x H x W`` RGB in ``[0, 1]``):

* ``forward`` runs the backbone (ResNet + FPN) once and keeps its maps in
  ``SegmenterOutput.extras`` (``feat_p2`` ... ``feat_p6``, each ``B x C x H/s x W/s``, plus
  ``image_size``: ``B x 2``), so ``compute_losses`` can run the RPN and ROI heads on any batch
  slice (``SegmenterOutput.select`` keeps extras).
* ``compute_losses(outputs, targets)`` = detectron2's own training losses (``loss_rpn_cls``,
  ``loss_rpn_loc``, ``loss_cls``, ``loss_box_reg``, ``loss_mask``; ``loss`` = their sum, each
  already weighted by the detectron2 config), targets converted to gt ``Instances``. This is
  L_sup on labels and L_semi on hard pseudo-labels.
* ``class_logits`` (``B x Q x (K+1)``) and ``mask_logits`` (``B x Q x H/4 x W/4``) hold the
  R-CNN's *detections*, ``Q = cfg.TEST.DETECTIONS_PER_IMAGE`` slots: detection ``q`` with score
  ``s`` and class ``c`` gets ``log s`` at ``c``, ``log(1 - s)`` at no-object (last) and
  ``log eps`` elsewhere (so a softmax gives back ``s``), and the logit of its pasted mask
  probability; unused slots are no-object with mask logit ``logit(eps)``. Detections are made
  in eval mode, without gradient; in training mode they are computed only when weak embeddings
  are requested (the L_pxl path samples negatives from them), otherwise ``Q = 0`` (the
  training losses do not use them).
* ``predict`` uses detectron2's own inference (box NMS, score threshold, masks pasted at the
  image size), then sskd's convention: each pixel belongs to the best-scoring instance only.
* Pixel embeddings for L_pxl: a trainable projection head (1x1 conv, ReLU, 1x1 conv) on the FPN
  ``p2`` map (stride 4) gives ``embed_weak``; ``embed_strong`` is its EMA copy, no gradient.
* ``pixel_probabilities``: Mask R-CNN has no per-pixel softmax over queries, so ``P_m`` is
  derived from the detections: query ``q`` claims pixel ``p`` with weight ``s_q * m_q(p)``
  (``s_q`` = 1 - no-object probability, ``m_q`` = mask probability), and one extra
  *background slot* gets ``prod_q (1 - s_q m_q(p))``; the weights are normalised over the
  ``Q + 1`` slots. ``P_c`` is the detections' class distribution plus a one-hot no-object
  row for the background slot. Shapes: ``B x (Q+1) x h x w`` and ``B x (Q+1) x (K+1)``.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from sskd.integrations.detectron2_require import require_detectron2

require_detectron2()

import torch  # noqa: E402
from detectron2.config import CfgNode, get_cfg  # noqa: E402
from detectron2.layers import paste_masks_in_image  # noqa: E402
from detectron2.modeling import build_model as d2_build_model  # noqa: E402
from detectron2.structures import ImageList  # noqa: E402
from detectron2.utils.events import EventStorage, get_event_storage  # noqa: E402

from sskd.integrations.detectron2_convert import targets_to_instances  # noqa: E402
from sskd.models.base import (Prediction, Segmenter, SegmenterOutput, register_model,  # noqa: E402
                              resolve_overlaps)
from sskd.models.heads import ProjectionHead, ema_update  # noqa: E402

DEFAULT_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
EMBEDDING_MODES = ("none", "weak", "strong", "both")
EPS = 1e-4  # probability floor of the detection -> logits encoding (logit range about +-9.2)

# Size presets: detectron2 config keys applied on top of the config file. "tiny"/"demo" are
# for small images (64-128 px, objects of 5-50 px) trained from scratch: narrow ResNet-50
# (same block layout), BatchNorm (FrozenBN would be an identity without pretrained weights),
# nothing frozen, small anchors and few proposals/detections.
_SMALL_IMAGES = {
    "MODEL.RESNETS.NORM": "BN",                          # trainable BatchNorm (from scratch)
    "MODEL.BACKBONE.FREEZE_AT": 0,                       # train the stem and every stage
    "MODEL.ANCHOR_GENERATOR.SIZES": [[8], [16], [32], [64], [128]],  # anchor side (px) on p2..p6
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 500,                 # proposals kept before NMS, per level
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": 200,                # proposals per image after NMS (train)
    "MODEL.RPN.PRE_NMS_TOPK_TEST": 500,                  # same at test time
    "MODEL.RPN.POST_NMS_TOPK_TEST": 100,                 # same at test time
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE": 64,                # anchors sampled per image for RPN loss
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 64,          # RoIs sampled per image for head losses
}
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {**_SMALL_IMAGES,
             "MODEL.RESNETS.STEM_OUT_CHANNELS": 16,      # stem width
             "MODEL.RESNETS.RES2_OUT_CHANNELS": 32,      # res2 output width (x2 per stage)
             "MODEL.RESNETS.WIDTH_PER_GROUP": 8,         # bottleneck width of res2
             "MODEL.FPN.OUT_CHANNELS": 32,               # FPN width (also the embedding input)
             "MODEL.ROI_BOX_HEAD.FC_DIM": 64,            # box head FC width
             "MODEL.ROI_MASK_HEAD.CONV_DIM": 32,         # mask head conv width
             "MODEL.ROI_MASK_HEAD.NUM_CONV": 2,          # mask head convs
             "TEST.DETECTIONS_PER_IMAGE": 20},           # Q: detection slots per image
    "demo": {**_SMALL_IMAGES,
             "MODEL.RESNETS.STEM_OUT_CHANNELS": 32,
             "MODEL.RESNETS.RES2_OUT_CHANNELS": 64,
             "MODEL.RESNETS.WIDTH_PER_GROUP": 16,
             "MODEL.FPN.OUT_CHANNELS": 64,
             "MODEL.ROI_BOX_HEAD.FC_DIM": 256,
             "MODEL.ROI_MASK_HEAD.CONV_DIM": 64,
             "TEST.DETECTIONS_PER_IMAGE": 50},
    "full": {},  # the config file as it is (e.g. R-50-FPN Mask R-CNN, 44M params)
}


def zoo_config_path(name: str) -> Path:
    """Path of a model-zoo yaml shipped inside the detectron2 package (no download, no pkg_resources)."""
    import detectron2
    base = Path(detectron2.__file__).parent / "model_zoo" / "configs"
    path = base / name
    if not path.is_file():
        raise FileNotFoundError(f"model-zoo config {name!r} not found under {base}; give a yaml path "
                                f"or a name like {DEFAULT_CONFIG!r}")
    return path


def _flatten(overrides: Mapping[str, Any] | Sequence[Any] | None) -> list[Any]:
    if not overrides:
        return []
    if isinstance(overrides, Mapping):
        return [x for kv in overrides.items() for x in kv]
    items = list(overrides)
    if len(items) % 2:
        raise ValueError(f"overrides list must alternate KEY, VALUE; got {items}")
    return items


def build_d2_config(config: str | Path | CfgNode = DEFAULT_CONFIG, size: str = "tiny",
                    overrides: Mapping[str, Any] | Sequence[Any] | None = None,
                    num_classes: int | None = None) -> CfgNode:
    """detectron2 config: the file (model-zoo name, yaml path or yaml text, or a ``CfgNode``),
    then ``SIZES[size]``, then ``overrides`` (``{"MODEL.FPN.OUT_CHANNELS": 64}`` or a
    KEY, VALUE list). ``MODEL.WEIGHTS`` is cleared (weights load only from a local file, see
    :class:`Detectron2Segmenter`) and ``MODEL.DEVICE`` is "cpu" (move the module with ``.to``)."""
    if size not in SIZES:
        raise ValueError(f"unknown detectron2 size {size!r}; available: {sorted(SIZES)}")
    cfg = get_cfg()
    if isinstance(config, CfgNode):
        cfg.merge_from_other_cfg(config)
    elif isinstance(config, str) and "\n" in config:  # yaml text (how a CfgNode is saved)
        cfg.merge_from_other_cfg(CfgNode.load_cfg(config))
    else:
        path = Path(config) if Path(config).is_file() else zoo_config_path(str(config))
        if path.suffix != ".yaml":
            raise ValueError(f"{path}: only yaml configs are supported (LazyConfig .py files "
                             "build models without a CfgNode)")
        cfg.merge_from_file(str(path))
    try:
        cfg.merge_from_list(_flatten(SIZES[size]) + _flatten(overrides))
    except (KeyError, AssertionError, ValueError) as e:
        raise ValueError(f"bad detectron2 override in {dict(overrides or {})}: {e}") from e
    if num_classes is not None:
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = int(num_classes)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    if not cfg.MODEL.MASK_ON:
        raise ValueError("the detectron2 config has MODEL.MASK_ON = False: sskd needs an instance-"
                         "segmentation model (e.g. a COCO-InstanceSegmentation/mask_rcnn_* config)")
    return cfg


@contextlib.contextmanager
def _event_storage():
    """detectron2's training heads log to an ``EventStorage``; open one unless a trainer did."""
    try:
        get_event_storage()
        outer = True
    except AssertionError:
        outer = False
    if outer:
        yield
    else:
        with EventStorage(0):
            yield


@contextlib.contextmanager
def _mode(modules: Sequence[torch.nn.Module], training: bool):
    """Temporarily put ``modules`` in train/eval mode (R-CNN heads branch on ``self.training``)."""
    before = [m.training for m in modules]
    for m in modules:
        m.train(training)
    try:
        yield
    finally:
        for m, t in zip(modules, before):
            m.train(t)


class Detectron2Segmenter(Segmenter):
    """Any detectron2 ``GeneralizedRCNN`` with a mask head, as an sskd segmenter.

    Args:
        num_classes: ``K`` (sets ``MODEL.ROI_HEADS.NUM_CLASSES``).
        size: "tiny" | "demo" | "full" (see :data:`SIZES`).
        config: model-zoo name (e.g. :data:`DEFAULT_CONFIG`), yaml path, yaml text or ``CfgNode``.
        overrides: detectron2 config keys, ``{"MODEL.RESNETS.DEPTH": 101}``.
        weights: a local detectron2 checkpoint (``.pth``/``.pkl``) to load; never downloaded.
            (``encoder_weights`` is accepted as an alias, as the stages pass it.)
        embed_dim: pixel-embedding dimension ``D``.
        ema_momentum: strong head <- m * strong + (1 - m) * weak after each optimizer step.
        freeze_encoder: keep the ResNet (``backbone.bottom_up``) fixed (when ``trainable`` is
            None: the same as ``trainable=[fpn, proposal_generator, roi_heads, projection_head]``).
        trainable: the parts that train (see below; None: every part, or as freeze_encoder).

    Parts (:meth:`Segmenter.set_trainable`): ``backbone`` (the ResNet), ``fpn``,
    ``proposal_generator`` (RPN), ``roi_heads`` (box and mask heads), ``projection_head``
    (the weak L_pxl head). Default: every part (detectron2 fine-tunes end to end).
    """

    PARTS = {"backbone": ("detector.backbone.bottom_up.",), "fpn": ("detector.backbone.",),
             "proposal_generator": ("detector.proposal_generator.",),
             "roi_heads": ("detector.roi_heads.",), "projection_head": ("embed_weak.",)}

    def __init__(self, num_classes: int, size: str = "tiny", config: str | CfgNode = DEFAULT_CONFIG,
                 overrides: Mapping[str, Any] | None = None, weights: str = "", embed_dim: int = 128,
                 ema_momentum: float = 0.99, freeze_encoder: bool = False,
                 encoder_weights: str = "", trainable: list[str] | None = None) -> None:
        if isinstance(config, CfgNode):
            config = config.dump()  # saved as yaml text, so load_model can rebuild it
        overrides = {str(k): v for k, v in dict(overrides or {}).items()}
        super().__init__(num_classes, size=size, config=str(config), overrides=overrides,
                         embed_dim=int(embed_dim), ema_momentum=float(ema_momentum),
                         freeze_encoder=bool(freeze_encoder))
        self.d2_cfg = build_d2_config(config, size, overrides, self.num_classes)
        self.detector = d2_build_model(self.d2_cfg)
        for part in ("backbone", "proposal_generator", "roi_heads"):
            if getattr(self.detector, part, None) is None:
                raise ValueError(f"detectron2 meta-architecture {self.d2_cfg.MODEL.META_ARCHITECTURE} "
                                 f"has no {part}: sskd wraps GeneralizedRCNN-style models")
        shapes = self.detector.backbone.output_shape()
        if "p2" not in shapes:
            raise ValueError(f"backbone outputs {sorted(shapes)} lack 'p2': use an FPN config "
                             "(pixel embeddings come from the stride-4 FPN level)")
        self.mask_stride = int(shapes["p2"].stride)
        self.num_queries = int(self.d2_cfg.TEST.DETECTIONS_PER_IMAGE)
        self.input_format = self.d2_cfg.INPUT.FORMAT
        self.embed_weak = ProjectionHead(shapes["p2"].channels, int(embed_dim))
        self.embed_strong = ProjectionHead(shapes["p2"].channels, int(embed_dim))
        self.embed_strong.load_state_dict(self.embed_weak.state_dict())
        self.embed_strong.requires_grad_(False)  # EMA of embed_weak (stop-gradient branch)
        self.ema_momentum = float(ema_momentum)
        weights = weights or encoder_weights
        if weights:
            self.load_detectron2_weights(weights)
        if trainable is None:
            trainable = list(self.PARTS)[1:] if freeze_encoder else ["default"]
        self.set_trainable(trainable)

    # ------------------------------------------------------------------------------ weights
    def load_detectron2_weights(self, path: str | Path) -> None:
        """Load a local detectron2 checkpoint into the detector (class heads may mismatch K)."""
        from detectron2.checkpoint import DetectionCheckpointer
        text = str(path)
        if "://" in text:
            raise ValueError(f"weights {text!r} is a URL: sskd never downloads at run time; fetch it "
                             "once and pass the local file path")
        if not Path(text).is_file():
            raise FileNotFoundError(f"detectron2 weights file {text} does not exist")
        DetectionCheckpointer(self.detector).load(text)

    # ------------------------------------------------------------------------------ forward
    def _images(self, images: torch.Tensor) -> ImageList:
        """``B x 3 x H x W`` RGB [0, 1] -> detectron2-normalised, padded ``ImageList``."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be B x 3 x H x W, got shape {tuple(images.shape)}")
        x = images.float() * 255.0
        if self.input_format == "BGR":
            x = x.flip(1)
        x = (x - self.detector.pixel_mean) / self.detector.pixel_std
        bb = self.detector.backbone
        return ImageList.from_tensors(list(x), bb.size_divisibility,
                                      padding_constraints=bb.padding_constraints)

    def _detect(self, il: ImageList, feats: dict[str, torch.Tensor]) -> list:
        """Eval-mode RPN + ROI heads without gradient -> per-image ``Instances`` (raw masks)."""
        heads = [self.detector.proposal_generator, self.detector.roi_heads]
        with torch.no_grad(), _mode(heads, False):
            proposals, _ = self.detector.proposal_generator(il, feats, None)
            dets, _ = self.detector.roi_heads(il, feats, proposals, None)
        return dets

    def _encode(self, dets: list, image_size: tuple[int, int], mask_size: tuple[int, int]):
        """Detections -> (``B x Q x (K+1)`` class logits, ``B x Q x h x w`` mask logits)."""
        B, Q, K = len(dets), self.num_queries, self.num_classes
        H, W = image_size
        h, w = mask_size
        dev = self.detector.pixel_mean.device
        low, high = math.log(EPS), math.log(1 - EPS)
        cls = torch.full((B, Q, K + 1), low, device=dev)
        cls[..., K] = high  # unused slot: no-object
        msk = torch.full((B, Q, h, w), math.log(EPS / (1 - EPS)), device=dev)
        for b, inst in enumerate(dets):
            n = min(len(inst), Q)
            if not n:
                continue
            s = inst.scores[:n].float().clamp(EPS, 1 - EPS)
            cls[b, :n, K] = torch.log1p(-s)
            cls[b, torch.arange(n, device=dev), inst.pred_classes[:n]] = s.log()
            boxes = inst.pred_boxes.tensor[:n].clone()
            boxes[:, 0::2] *= w / W
            boxes[:, 1::2] *= h / H
            # threshold -1: soft masks as uint8 0..255 (detectron2's public paste; 1/255 steps)
            soft = paste_masks_in_image(inst.pred_masks[:n, 0], boxes, (h, w), threshold=-1).float() / 255
            msk[b, :n] = torch.logit(soft.clamp(EPS, 1 - EPS))
        return cls, msk

    def forward(self, images: torch.Tensor, embeddings: str = "none") -> SegmenterOutput:
        """``B x 3 x H x W`` -> outputs; masks at ``ceil(H/4) x ceil(W/4)`` (see the module doc)."""
        if embeddings not in EMBEDDING_MODES:
            raise ValueError(f"embeddings must be one of {EMBEDDING_MODES}, got {embeddings!r}")
        B, (H, W) = images.shape[0], tuple(int(v) for v in images.shape[-2:])
        il = self._images(images)
        feats = self.detector.backbone(il.tensor)
        h, w = math.ceil(H / self.mask_stride), math.ceil(W / self.mask_stride)
        if not self.training or embeddings in ("weak", "both"):
            cls, msk = self._encode(self._detect(il, feats), (H, W), (h, w))
        else:  # training losses come from the heads in compute_losses, not from detections;
            # a strong-view pass only needs its embeddings
            cls = images.new_zeros((B, 0, self.num_classes + 1))
            msk = images.new_zeros((B, 0, h, w))
        extras = {f"feat_{k}": v for k, v in feats.items()}
        extras["image_size"] = torch.tensor([[H, W]] * B, device=images.device)
        out = SegmenterOutput(class_logits=cls, mask_logits=msk, extras=extras)
        p2 = feats["p2"][..., :h, :w]  # drop the padding added for size divisibility
        if embeddings in ("weak", "both"):
            out.embed_weak = self.embed_weak(p2)
        if embeddings in ("strong", "both"):
            with torch.no_grad():
                out.embed_strong = self.embed_strong(p2.detach())
        return out

    # ------------------------------------------------------------------------------- losses
    def compute_losses(self, outputs: SegmenterOutput, targets: list[dict]) -> dict[str, torch.Tensor]:
        """detectron2's R-CNN training losses on the backbone maps kept in ``outputs.extras``.

        ``targets``: ``B`` dicts ``{"masks": N x H x W, "labels": N}`` (``N`` may be 0).
        Returns ``loss`` (sum) and each detectron2 loss term.
        """
        feats = {k[5:]: v for k, v in outputs.extras.items() if k.startswith("feat_")}
        if not feats or "image_size" not in outputs.extras:
            raise ValueError("outputs.extras lacks the detectron2 backbone maps ('feat_p2', ..., "
                             "'image_size'): pass this model's own forward output; slice a batch "
                             "with SegmenterOutput.select(), which keeps extras")
        sizes = [tuple(int(v) for v in s) for s in outputs.extras["image_size"].tolist()]
        if len(targets) != len(sizes):
            raise ValueError(f"got {len(targets)} targets for a batch of {len(sizes)} images")
        dev = feats["p2"].device
        gt = [targets_to_instances(t, sizes[i], self.num_classes, f"target {i}").to(dev)
              for i, t in enumerate(targets)]
        il = ImageList(feats["p2"].new_zeros((len(sizes), 0, 0, 0)), sizes)  # heads read sizes only
        heads = [self.detector.proposal_generator, self.detector.roi_heads]
        with _mode(heads, True), _event_storage():
            proposals, rpn_losses = self.detector.proposal_generator(il, feats, gt)
            _, det_losses = self.detector.roi_heads(il, feats, proposals, gt)
        losses = {**rpn_losses, **det_losses}
        total = sum(losses.values(), feats["p2"].new_zeros(()))
        return {"loss": total, **losses}

    def pixel_probabilities(self, outputs: SegmenterOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Detached ``P_m``: ``B x (Q+1) x h x w`` and ``P_c``: ``B x (Q+1) x (K+1)`` from the
        detections, the last slot being background (see the module doc)."""
        pc_det = outputs.class_logits.detach().float().softmax(-1)          # B x Q x (K+1)
        fg = 1.0 - pc_det[..., -1]                                           # B x Q
        claim = fg[..., None, None] * outputs.mask_logits.detach().float().sigmoid()  # B x Q x h x w
        bg = torch.prod(1.0 - claim, dim=1, keepdim=True)                    # B x 1 x h x w
        weights = torch.cat([claim, bg], 1)
        pm = weights / weights.sum(1, keepdim=True).clamp_min(1e-12)
        B, _, K1 = pc_det.shape
        bg_cls = pc_det.new_zeros((B, 1, K1))
        bg_cls[..., -1] = 1.0
        return pm, torch.cat([pc_det, bg_cls], 1)

    # ------------------------------------------------------------------------------ predict
    @torch.no_grad()
    def predict(self, images: torch.Tensor, score_threshold: float = 0.3, max_instances: int = 100,
                mask_threshold: float = 0.5, overlapping: bool = False) -> list[Prediction]:
        """detectron2 inference -> one :class:`Prediction` per image (masks overlap only with
        ``overlapping``, as for COCO evaluation)."""
        H, W = (int(v) for v in images.shape[-2:])
        predictor = self.detector.roi_heads.box_predictor
        saved = (predictor.test_score_thresh, predictor.test_topk_per_image)
        was_training = self.training
        self.eval()
        try:
            predictor.test_score_thresh, predictor.test_topk_per_image = float(score_threshold), int(max_instances)
            il = self._images(images)
            dets = self._detect(il, self.detector.backbone(il.tensor))
        finally:
            predictor.test_score_thresh, predictor.test_topk_per_image = saved
            self.train(was_training)
        out = []
        for inst in dets:
            scores, order = inst.scores.float().sort(descending=True)
            masks = paste_masks_in_image(inst.pred_masks[order, 0], inst.pred_boxes[order], (H, W),
                                         threshold=mask_threshold)
            masks = masks.bool() if overlapping else resolve_overlaps(masks.bool())
            keep = masks.flatten(1).any(1)
            out.append(Prediction(masks[keep], inst.pred_classes[order][keep].long(),
                                  scores[keep].clamp(0, 1)))
        return out

    # ----------------------------------------------------------------------------- training
    def is_encoder_parameter(self, name: str) -> bool:
        return name.startswith("detector.backbone.bottom_up.")

    def after_optimizer_step(self) -> None:
        """EMA: the strong projection head follows the weak one."""
        ema_update(self.embed_strong, self.embed_weak, self.ema_momentum)


@register_model("detectron2")
def build_detectron2(num_classes: int, size: str = "tiny", **kwargs: Any) -> Detectron2Segmenter:
    """Builder of the "detectron2" registry entry; keyword arguments as :class:`Detectron2Segmenter`."""
    return Detectron2Segmenter(num_classes, size=size, **kwargs)
