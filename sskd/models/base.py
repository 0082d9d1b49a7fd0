"""The one interface every segmenter implements, and the registry that builds them by name.

Tensor conventions:

* images: ``B x 3 x H x W`` float in ``[0, 1]`` (RGB); models normalise internally.
* targets: a list of ``B`` dicts ``{"masks": N x H x W float/bool, "labels": N long}``
  (``N`` may be 0: an image with no instances, e.g. an empty pseudo-label set).
* :class:`SegmenterOutput`: per-query class logits ``B x Q x (C+1)`` (last = no-object) and mask
  logits ``B x Q x h x w`` at the model's mask resolution (stride 4 for Mask2Former-style models),
  plus optional weak/strong pixel embeddings ``B x D x h' x w'`` (L2-normalised over ``D``).
"""

from __future__ import annotations

import json
import os
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "model.json"


@dataclass
class SegmenterOutput:
    class_logits: torch.Tensor                 # B x Q x (C+1)
    mask_logits: torch.Tensor                  # B x Q x h x w
    aux: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per decoder layer
    embed_weak: torch.Tensor | None = None     # B x D x h' x w'
    embed_strong: torch.Tensor | None = None   # B x D x h' x w'
    # model-specific per-image tensors that compute_losses needs (batch first), e.g. the
    # grounded_sam detector's boxes "pred_boxes" (B x Q x 4) and SAM's "iou_scores" (B x Q)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def select(self, index: slice | torch.Tensor) -> "SegmenterOutput":
        """The same outputs for a subset of the batch (every tensor field, ``aux`` and ``extras``)."""
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index]
        return SegmenterOutput(
            class_logits=self.class_logits[index], mask_logits=self.mask_logits[index],
            aux=[(c[index], m[index]) for c, m in self.aux],
            embed_weak=pick(self.embed_weak), embed_strong=pick(self.embed_strong),
            extras={k: v[index] for k, v in self.extras.items()})


@dataclass
class Prediction:
    """Instances predicted for one image, at the input image's resolution."""

    masks: torch.Tensor      # N x H x W bool
    class_ids: torch.Tensor  # N long, in [0, C)
    scores: torch.Tensor     # N float, in [0, 1]
    # N x C: the class distribution p(c | object) of the query behind each instance (sums to
    # 1; class_ids is one of its ranked hypotheses); None when the model has none to give
    class_probs: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.class_ids.numel())


class Segmenter(nn.Module, ABC):
    """Base class: predict, training losses, pixel embeddings/probabilities, save/load."""

    #: registry name the model was built under (set by :func:`build_model`)
    registry_name: str = ""

    def __init__(self, num_classes: int, **config: Any) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.config = {"num_classes": self.num_classes, **config}

    # -- required ----------------------------------------------------------------------------
    @abstractmethod
    def forward(self, images: torch.Tensor, embeddings: str = "none") -> SegmenterOutput:
        """``B x 3 x H x W`` -> outputs. ``embeddings``: "none" | "weak" | "strong" | "both"."""

    @abstractmethod
    def compute_losses(self, outputs: SegmenterOutput, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Set-prediction losses vs ``targets``; the key ``"loss"`` is the weighted total."""

    # -- shared behaviour --------------------------------------------------------------------
    def losses(self, images: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Forward + losses in one call (the supervised step)."""
        return self.compute_losses(self(images), targets)

    @torch.no_grad()
    def forward_eval(self, images: torch.Tensor) -> SegmenterOutput:
        """Forward in eval mode (no dropout, frozen norms), restoring the training flag after."""
        was_training = self.training
        self.eval()
        try:
            return self(images)
        finally:
            self.train(was_training)

    def pixel_embeddings(self, images: torch.Tensor, head: str = "weak") -> torch.Tensor:
        """``B x 3 x H x W`` -> ``B x D x h x w`` L2-normalised embeddings of one projection head.

        Subclasses may skip work the embeddings do not need (Mask2Former: the query decoder);
        the strong branch of L_pxl calls this under ``torch.no_grad()``.
        """
        out = self(images, embeddings=head)
        return out.embed_weak if head == "weak" else out.embed_strong

    def pixel_probabilities(self, outputs: SegmenterOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Detached ``P_m``: ``B x Q x h x w`` (softmax over queries) and ``P_c``: ``B x Q x (C+1)``.

        These are the inputs of the fused negative sampler (y = [P_m || F_c], docs/method.md).
        """
        pm = outputs.mask_logits.detach().float().softmax(dim=1)
        pc = outputs.class_logits.detach().float().softmax(dim=-1)
        return pm, pc

    @torch.no_grad()
    def predict(self, images: torch.Tensor, score_threshold: float = 0.3, max_instances: int = 100,
                mask_threshold: float = 0.5, overlapping: bool = False,
                mask_refiner=None) -> list[Prediction]:
        """``B x 3 x H x W`` -> one :class:`Prediction` per image.

        ``overlapping=False``: each pixel belongs to at most one instance (pseudo-labels, views);
        ``True``: every kept (query, class) pair keeps its whole mask, as COCO instance AP expects.
        ``mask_refiner``: ``(images, B x Q x H x W probabilities) -> probabilities``, applied
        before scoring and binarising (:mod:`sskd.engine.mask_refinement`).
        """
        out = self.forward_eval(images)
        return postprocess_instances(out.class_logits, out.mask_logits, images.shape[-2:],
                                     score_threshold, max_instances, mask_threshold, overlapping,
                                     refine=None if mask_refiner is None
                                     else (lambda p: mask_refiner(images, p)))

    def param_groups(self, lr: float, backbone_lr_mult: float) -> list[dict]:
        """AdamW parameter groups: encoder parameters get ``lr * backbone_lr_mult``."""
        enc, rest = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (enc if self.is_encoder_parameter(name) else rest).append(p)
        groups = [{"params": rest, "lr": lr, "name": "heads"}]
        if enc:
            groups.append({"params": enc, "lr": lr * backbone_lr_mult, "name": "encoder"})
        return groups

    def is_encoder_parameter(self, name: str) -> bool:
        return name.startswith(("encoder.", "backbone."))

    # -- what trains -------------------------------------------------------------------------
    #: named parts -> parameter-name prefixes (first matching part wins). A parameter in no part
    #: never trains (the EMA strong head; parts no loss reaches). Each family defines its own.
    PARTS: dict[str, tuple[str, ...]] = {}
    #: parts that ``trainable: [default]`` selects (empty: every part); each family documents why
    DEFAULT_TRAINABLE: tuple[str, ...] = ()

    def part_of(self, name: str) -> str | None:
        """The part parameter ``name`` belongs to (None: it never trains)."""
        for part, prefixes in self.PARTS.items():
            if name.startswith(prefixes):
                return part
        return None

    def parts(self) -> dict[str, list[str]]:
        """``{part: [parameter names]}`` for every part of :attr:`PARTS` (shared weights once)."""
        out: dict[str, list[str]] = {p: [] for p in self.PARTS}
        for name, _ in self.named_parameters():
            part = self.part_of(name)
            if part is not None:
                out[part].append(name)
        return out

    def resolve_trainable(self, selection: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
        """``["default"]`` / ``["all"]`` / part names (combinable) -> part names in PARTS order."""
        items = [selection] if isinstance(selection, str) else list(selection)
        valid = list(self.PARTS)
        chosen: set[str] = set()
        unknown = []
        for item in items:
            if item == "default":
                chosen |= set(self.DEFAULT_TRAINABLE or valid)
            elif item == "all":
                chosen |= set(valid)
            elif item in self.PARTS:
                chosen.add(item)
            else:
                unknown.append(item)
        if unknown:
            name = self.registry_name or type(self).__name__
            raise ValueError(f"{name} trainable={items}: unknown part(s) {unknown}; valid: "
                             f"{valid}, 'default' (= {list(self.DEFAULT_TRAINABLE or valid)}) or "
                             "'all' (see docs/method.md, 'What trains')")
        return tuple(p for p in valid if p in chosen)

    def set_trainable(self, selection: str | list[str] | tuple[str, ...] = ("default",)
                      ) -> tuple[str, ...]:
        """Train exactly the selected parts (the one place that sets ``requires_grad``).

        Every other parameter is frozen, and sub-modules of frozen parts whose parameters are
        all frozen run in eval mode while training (fixed features: no dropout, fixed norms).
        Recorded in ``config["trainable"]``, so a saved model reloads with the same selection.
        Returns the resolved part names.
        """
        parts = self.resolve_trainable(selection)
        for name, p in self.named_parameters(remove_duplicate=False):
            p.requires_grad_(self.part_of(name) in parts)
        self.trainable = parts
        self.config["trainable"] = list(parts)
        self.train(self.training)
        return parts

    def trainable_parameter_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> "Segmenter":
        super().train(mode)
        if mode:
            for part in set(self.PARTS) - set(getattr(self, "trainable", self.PARTS)):
                for prefix in self.PARTS[part]:
                    if not prefix.endswith("."):
                        continue  # a bare parameter, not a module
                    try:
                        module = self.get_submodule(prefix[:-1])
                    except AttributeError:
                        continue  # e.g. a head only some checkpoints have
                    if not any(p.requires_grad for p in module.parameters()):
                        module.eval()
        return self

    def after_optimizer_step(self) -> None:
        """Hook for EMA updates (the strong projection head follows the weak one)."""

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # -- persistence ---------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``model.json`` (registry name + builder config) and ``model.pt`` atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"name": self.registry_name, "config": self.config}
        unique = f"{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"   # concurrent savers never share one
        tmp = directory / f".{WEIGHTS_FILE}.{unique}"
        torch.save(self.state_dict(), tmp)
        tmp.replace(directory / WEIGHTS_FILE)
        tmp = directory / f".{CONFIG_FILE}.{unique}"
        tmp.write_text(json.dumps(meta, indent=2))
        tmp.replace(directory / CONFIG_FILE)
        return directory


# --------------------------------------------------------------------------- post-processing


def postprocess_instances(class_logits: torch.Tensor, mask_logits: torch.Tensor,
                          image_size: tuple[int, int], score_threshold: float = 0.3,
                          max_instances: int = 100, mask_threshold: float = 0.5,
                          overlapping: bool = False, refine=None) -> list[Prediction]:
    """Mask2Former instance inference: the top ``max_instances`` (query, class) pairs.

    ``class_logits``: ``B x Q x (C+1)``; ``mask_logits``: ``B x Q x h x w``. Score of a
    pair = class probability x mean mask probability inside its binary mask. With
    ``overlapping=False`` pixels claimed by several kept instances go to the highest-scoring
    one, so a query's second-best class and lower-scored duplicates vanish (what a hard
    pseudo-label needs); ``True`` keeps every mask whole, Mask2Former's protocol for COCO
    instance AP (a query's class hypotheses are ranked, not discarded).
    """
    H, W = int(image_size[0]), int(image_size[1])
    probs = class_logits.float().softmax(-1)[..., :-1]          # B x Q x C
    B, Q, C = probs.shape
    masks = torch.nn.functional.interpolate(mask_logits.float(), size=(H, W), mode="bilinear",
                                            align_corners=False).sigmoid()  # B x Q x H x W
    if refine is not None:  # ``B x Q x H x W`` probabilities -> the same, e.g. edge-aware
        masks = refine(masks)
    results = []
    for b in range(B):
        scores, idx = probs[b].flatten().topk(min(max_instances, Q * C))
        q_idx, cls = idx // C, idx % C
        m = masks[b, q_idx]                                       # N x H x W
        binary = m > mask_threshold
        mask_score = (m * binary).flatten(1).sum(1) / binary.flatten(1).sum(1).clamp(min=1)
        final = scores * mask_score
        dist = probs[b, q_idx]
        dist = dist / dist.sum(-1, keepdim=True).clamp(min=1e-12)  # p(c | object) per query
        keep = (final >= score_threshold) & binary.flatten(1).any(1)
        final, cls, binary, dist = final[keep], cls[keep], binary[keep], dist[keep]
        order = final.argsort(descending=True)
        final, cls, binary, dist = final[order], cls[order], binary[order], dist[order]
        if not overlapping:
            binary = resolve_overlaps(binary)
        nonempty = binary.flatten(1).any(1)
        results.append(Prediction(binary[nonempty], cls[nonempty].long(),
                                  final[nonempty].clamp(0, 1), dist[nonempty]))
    return results


#: an instance left with less than this fraction of its own mask by higher-scoring instances is
#: dropped when masks are made disjoint (Mask2Former's ``overlap_threshold`` in its panoptic
#: inference). Without it a lower-scored duplicate's leftover rim becomes an instance of its own:
#: on the striped demo target the zero-shot teacher's pseudo-labels had 3.9 instances per image
#: against 1.9 in the ground truth, 1.6 with the rule.
MIN_KEPT_FRACTION = 0.8


def resolve_overlaps(masks: torch.Tensor, min_kept_fraction: float = MIN_KEPT_FRACTION) -> torch.Tensor:
    """``N x H x W`` bool masks sorted by decreasing score -> each pixel kept only by the first.

    An instance that keeps less than ``min_kept_fraction`` of its pixels comes back empty (callers
    drop empty masks), so no instance is a sliver another one left over.
    """
    if masks.shape[0] <= 1:
        return masks
    # a pixel is kept by the first mask claiming it among the masks that survive; a dropped
    # mask frees its pixels for the masks after it, so this runs in score order
    taken = torch.zeros_like(masks[0])
    out = torch.zeros_like(masks)
    for i in range(masks.shape[0]):
        own = masks[i]
        kept = own & ~taken
        area = int(own.sum())
        if area and int(kept.sum()) >= min_kept_fraction * area:
            out[i] = kept
            taken |= kept
    return out


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[..., Segmenter]] = {}
# Models whose module needs an optional dependency register when first built (or loaded), so
# that importing sskd never imports that dependency; a missing one gives a clear ImportError.
_LAZY_MODULES = {"detectron2": "sskd.integrations.detectron2_model"}


def register_model(name: str) -> Callable:
    """Decorator: ``@register_model("mask2former")`` on a builder ``f(num_classes, size, **kw)``."""

    def deco(fn: Callable[..., Segmenter]) -> Callable[..., Segmenter]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def unregister_model(name: str) -> None:
    """Remove a registered builder (for test doubles and notebooks that re-run a cell)."""
    _REGISTRY.pop(name, None)


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, num_classes: int, **kwargs: Any) -> Segmenter:
    """Build a registered segmenter by name (see :func:`list_models`)."""
    if name not in _REGISTRY and name in _LAZY_MODULES:
        import importlib
        importlib.import_module(_LAZY_MODULES[name])  # registers it (or explains the install)
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {list_models()}")
    model = _REGISTRY[name](num_classes=num_classes, **kwargs)
    model.registry_name = name
    return model


def load_model(directory: str | Path, map_location: str | torch.device = "cpu") -> Segmenter:
    """Rebuild a model saved by :meth:`Segmenter.save` and load its weights."""
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    missing = [p.name for p in (cfg_path, w_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"model dir {directory} lacks {missing}; expected {CONFIG_FILE} "
                                f"and {WEIGHTS_FILE} as written by Segmenter.save()")
    from sskd.safe_load import CorruptFileError, load_json, load_torch
    fix = (f"delete {directory} and re-run the stage that trains it (a stand-in in the cache "
           "is pretrained again)")
    meta = load_json(cfg_path, fix)
    config = meta.get("config")
    if not isinstance(meta.get("name"), str) or not isinstance(config, dict) \
            or "num_classes" not in config:
        raise CorruptFileError(cfg_path, "needs 'name' and 'config' with 'num_classes', as "
                                         "Segmenter.save() writes", fix)
    config = dict(config)
    num_classes = config.pop("num_classes")
    model = build_model(meta["name"], num_classes=num_classes, **config)
    state = load_torch(w_path, fix, map_location=map_location)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CorruptFileError(w_path, f"its weights do not match model {meta['name']!r} built "
                                       f"from {cfg_path.name}: {str(e).splitlines()[0]}", fix) from e
    return model
