"""Architectures, text prompt and checkpoint loading of the Grounding DINO + SAM/SAM2 teacher.

Three ways to get the two halves of :class:`~sskd.models.grounded_sam.GroundedSamTeacher`:

* ``size="tiny"``: tiny random configs built fully offline (ResNet-ish backbone, 1-layer BERT,
  2-layer ViT SAM or 5-block Hiera SAM2); the BERT WordPiece vocabulary is *generated* from the
  class names (:func:`write_tiny_vocab`) so that the same classes always give the same tokenizer.
* ``size="paper"``: the paper's architectures with random init (Grounding DINO with a Swin-L
  backbone and BERT-base text encoder; SAM ViT-H or SAM2.1 Hiera-L), only for efficiency numbers.
* pretrained: ``detector_weights`` / ``sam_weights`` are local ``save_pretrained`` dirs or hub
  ids (fetched only when online and ``HF_HUB_OFFLINE`` is unset). Missing or mismatched files
  raise :class:`TeacherWeightsError`, naming the expected files and how to get them.

The paper's teacher is Grounding-DINO-L (Swin-L) + SAM2.1-L. IDEA Research released Grounding
DINO weights for Swin-T and Swin-B only; the public Swin-L Grounding DINO is OpenMMLab's
MM-Grounding-DINO-L (``openmmlab-community/mm_grounding_dino_large_all``, transformers model type
``mm-grounding-dino``), which the paper presets name. The cheaper variant is IDEA Research's
Grounding-DINO-B (``IDEA-Research/grounding-dino-base``, model type ``grounding-dino``); both
load here (see :data:`DETECTOR_CHECKPOINTS`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import normalizers, pre_tokenizers
from transformers import (AutoConfig, AutoTokenizer, BertConfig, BertTokenizer,
                          GroundingDinoConfig, GroundingDinoForObjectDetection,
                          MMGroundingDinoForObjectDetection, ResNetConfig, Sam2Config, Sam2Model,
                          SamConfig, SamModel, SwinConfig)
from transformers.models.bert.tokenization_bert import load_vocab
from transformers.models.sam2.configuration_sam2 import Sam2HieraDetConfig

SIZES = ("tiny", "paper")
MASK_MODELS = ("sam", "sam2")
#: vocabulary head of a generated tokenizer: BERT specials, then the prompt delimiters
TINY_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?"]
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")
#: where the paper's checkpoints live on the hub (used in error messages only)
HUB_HINTS = {"detector": "openmmlab-community/mm_grounding_dino_large_all",
             "sam": "facebook/sam-vit-huge", "sam2": "facebook/sam2.1-hiera-large"}
#: detector checkpoints: hub id -> what it is (the paper's Swin-L first, then the cheaper B)
DETECTOR_CHECKPOINTS = {
    "openmmlab-community/mm_grounding_dino_large_all": "Grounding-DINO-L (Swin-L), the paper's",
    "IDEA-Research/grounding-dino-base": "Grounding-DINO-B (Swin-B), cheaper",
}
#: accepted transformers model types per part, and the class that loads each
MODEL_TYPES = {"detector": ("grounding-dino", "mm-grounding-dino"), "sam": ("sam",),
               "sam2": ("sam2",)}
DETECTOR_CLASSES = {"grounding-dino": GroundingDinoForObjectDetection,
                    "mm-grounding-dino": MMGroundingDinoForObjectDetection}


class TeacherWeightsError(FileNotFoundError):
    """A teacher checkpoint is missing, incomplete or of the wrong architecture."""


# --------------------------------------------------------------------------- tokenizer


def class_words(classes: list[str]) -> list[str]:
    """The lower-cased words/punctuation BERT's pre-tokenizer splits the class names into."""
    norm = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    words = []
    for name in classes:
        words += [w for w, _ in pre.pre_tokenize_str(norm.normalize_str(name))]
    return words


def write_tiny_vocab(classes: list[str], directory: str | Path) -> Path:
    """Write a WordPiece ``vocab.txt``: BERT specials, ``.`` ``?``, then the sorted class words.

    Deterministic in ``classes`` (the vocabulary, hence the text embedding rows, are the same
    every time the tiny model is rebuilt from ``model.json``).
    """
    if not classes:
        raise ValueError("grounded_sam needs at least one class name to build its text prompt")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    words = sorted(set(class_words(classes)) - set(TINY_SPECIALS))
    path = directory / "vocab.txt"
    path.write_text("\n".join(TINY_SPECIALS + words) + "\n", encoding="utf-8")
    return path


def load_vocab_tokenizer(vocab_file: str | Path) -> BertTokenizer:
    """A lower-casing BERT WordPiece tokenizer from a ``vocab.txt`` (no other files needed)."""
    return BertTokenizer(vocab=load_vocab(str(vocab_file)), do_lower_case=True)


@dataclass
class PromptChunk:
    """One text prompt ``"name . name . ..."`` and which tokens belong to which class.

    ``input_ids``: ``T`` long ([CLS] ... [SEP]); ``class_ids``: the ``K`` dataset class ids in
    this prompt; ``token_map``: ``K x T`` bool, row k marks the tokens of ``class_ids[k]``.
    """

    input_ids: torch.Tensor
    class_ids: list[int]
    token_map: torch.Tensor


def build_prompts(tokenizer, classes: list[str], max_text_len: int) -> list[PromptChunk]:
    """Class names -> one or more prompts of at most ``max_text_len`` tokens each.

    Built token by token (``[CLS] tok(name_0) . tok(name_1) . ... [SEP]``, identical to
    tokenising ``"name_0 . name_1 ."``) so the class of every token is known exactly. Long class
    lists (e.g. ADE20K) are split into several prompts, each run through the detector.
    """
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    dot_id = tokenizer.convert_tokens_to_ids(".")
    if None in (cls_id, sep_id) or dot_id == tokenizer.unk_token_id:
        raise ValueError("the detector tokenizer lacks [CLS]/[SEP] or '.'; use a BERT WordPiece "
                         "tokenizer (vocab.txt) as Grounding DINO does")
    pieces = []
    for c, name in enumerate(classes):
        ids = tokenizer(name, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"class name {name!r} (class_id {c}) gives no tokens; give every "
                             "class a non-empty name")
        if len(ids) + 3 > max_text_len:
            raise ValueError(f"class name {name!r} is longer than the detector's max_text_len "
                             f"({max_text_len} tokens); shorten it")
        pieces.append(ids)
    chunks, start = [], 0
    while start < len(classes):
        ids, spans, c = [cls_id], [], start
        while c < len(classes) and len(ids) + len(pieces[c]) + 2 <= max_text_len:
            spans.append((c, len(ids), len(ids) + len(pieces[c])))
            ids += pieces[c] + [dot_id]
            c += 1
        ids.append(sep_id)
        token_map = torch.zeros(len(spans), len(ids), dtype=torch.bool)
        for k, (_, a, b) in enumerate(spans):
            token_map[k, a:b] = True
        chunks.append(PromptChunk(torch.tensor(ids, dtype=torch.long), [s[0] for s in spans],
                                  token_map))
        start = c
    return chunks


def delimiter_token_ids(tokenizer) -> torch.Tensor:
    """Ids of [CLS] [SEP] . ? : Grounding DINO's phrase delimiters for text self-attention.

    transformers hard-codes bert-base-uncased's ids (101, 102, 1012, 1029); a generated
    vocabulary has other ids, so the model's buffer is overwritten with these.
    """
    ids = [tokenizer.cls_token_id, tokenizer.sep_token_id,
           tokenizer.convert_tokens_to_ids("."), tokenizer.convert_tokens_to_ids("?")]
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- architectures


def detector_config(size: str, vocab_size: int) -> GroundingDinoConfig:
    """Grounding DINO config: "tiny" (about 0.2M params) or "paper" (Swin-L + BERT-base)."""
    if size == "tiny":
        # strides 4/8/16 (+ a stride-32 level made by the detector): the coarsest map must be
        # larger than 1 x 1 (GroupNorm(32, 32) rejects 1 value per group), so inputs >= 64 px
        backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32], depths=[1, 1, 1],
                                layer_type="basic", out_features=["stage1", "stage2", "stage3"])
        text = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
        return GroundingDinoConfig(
            backbone_config=backbone, text_config=text, num_queries=10,
            d_model=32,  # input projections use GroupNorm(32, d_model)
            encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_n_points=2,
            decoder_n_points=2, max_text_len=32)
    if size == "paper":
        backbone = SwinConfig(embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48],
                              window_size=12, image_size=384, out_indices=[2, 3, 4])
        return GroundingDinoConfig(backbone_config=backbone,
                                   text_config=BertConfig(vocab_size=max(vocab_size, 30522)))
    raise ValueError(f"unknown grounded_sam size {size!r}; valid: {list(SIZES)}")


def sam_config(size: str) -> SamConfig:
    """SAM config: "tiny" (64 px, patch 8, 2 ViT layers) or "paper" (ViT-H, 1024 px)."""
    if size == "tiny":
        return SamConfig(
            vision_config=dict(hidden_size=32, output_channels=32, num_hidden_layers=2,
                               num_attention_heads=2, image_size=64, patch_size=8, window_size=4,
                               global_attn_indexes=[1], num_pos_feats=16, mlp_dim=64,
                               initializer_range=0.02),  # default 1e-10 gives ~0 features
            prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=8,
                                       mask_input_channels=4),
            mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=2,
                                     num_attention_heads=2, iou_head_hidden_dim=32))
    if size == "paper":
        return SamConfig(vision_config=dict(hidden_size=1280, num_hidden_layers=32,
                                            num_attention_heads=16,
                                            global_attn_indexes=[7, 15, 23, 31],
                                            initializer_range=0.02))
    raise ValueError(f"unknown grounded_sam size {size!r}; valid: {list(SIZES)}")


def sam2_config(size: str) -> Sam2Config:
    """SAM2 config: "tiny" (64 px, Hiera patch stride 2, 5 blocks) or "paper" (SAM2.1 Hiera-L)."""
    if size == "tiny":
        s = 64
        hiera = Sam2HieraDetConfig(
            hidden_size=16, image_size=[s, s], patch_kernel_size=[3, 3], patch_stride=[2, 2],
            patch_padding=[1, 1], blocks_per_stage=[1, 1, 2, 1],
            embed_dim_per_stage=[16, 32, 64, 128],
            num_attention_heads_per_stage=[1, 1, 2, 2], window_size_per_stage=[4, 4, 4, 2],
            global_attention_blocks=[3], window_positional_embedding_background_size=[4, 4])
        vision = dict(backbone_config=hiera, backbone_channel_list=[128, 64, 32, 16],
                      backbone_feature_sizes=[[s // 2, s // 2], [s // 4, s // 4], [s // 8, s // 8]],
                      fpn_hidden_size=32)
        return Sam2Config(vision_config=vision,
                          prompt_encoder_config=dict(hidden_size=32, image_size=s, patch_size=8,
                                                     mask_input_channels=4),
                          mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=2,
                                                   num_attention_heads=2, iou_head_hidden_dim=32))
    if size == "paper":
        hiera = Sam2HieraDetConfig(
            hidden_size=144, num_attention_heads=2, embed_dim_per_stage=[144, 288, 576, 1152],
            num_attention_heads_per_stage=[2, 4, 8, 16], blocks_per_stage=[2, 6, 36, 4],
            global_attention_blocks=[23, 33, 43], window_size_per_stage=[8, 4, 16, 8],
            window_positional_embedding_background_size=[7, 7])
        return Sam2Config(vision_config=dict(backbone_config=hiera,
                                             backbone_channel_list=[1152, 576, 288, 144]))
    raise ValueError(f"unknown grounded_sam size {size!r}; valid: {list(SIZES)}")


# --------------------------------------------------------------------------- checkpoints


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hint(part: str, setting: str) -> str:
    hub = HUB_HINTS[part]
    local = f"weights/{hub.split('/')[-1]}"
    files = "config.json, model.safetensors (or pytorch_model.bin)"
    if part == "detector":
        files += (", tokenizer files (vocab.txt or tokenizer.json, tokenizer_config.json) and "
                  "preprocessor_config.json")
    else:
        files += " and preprocessor_config.json"
    alt = ""
    if part == "detector":
        alt = (" (the paper's Grounding-DINO-L; the cheaper Grounding-DINO-B is "
               "IDEA-Research/grounding-dino-base -> weights/grounding-dino-base)")
    return (f"expected a directory (save_pretrained layout) with {files}. On a machine with "
            f"network access run `huggingface-cli download {hub} --local-dir {local}`{alt} and "
            f"pass {setting}={local!r}")


def _is_hub_id(ref: str) -> bool:
    return ref.count("/") == 1 and not ref.startswith((".", "/", "~")) and not Path(ref).exists()


def _check_dir(path: Path, part: str, setting: str) -> None:
    if not path.is_dir():
        raise TeacherWeightsError(f"{setting}={str(path)!r} is not a directory; "
                                  + _hint(part, setting))
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if part == "detector" and not any((path / f).is_file() for f in TOKENIZER_FILES):
        missing.append("tokenizer files (" + " or ".join(TOKENIZER_FILES) + ")")
    if missing:
        raise TeacherWeightsError(f"{setting}={str(path)!r} lacks {', '.join(missing)}; "
                                  + _hint(part, setting))


def _load(cls, ref: str, part: str, setting: str):
    """``cls.from_pretrained`` with offline handling, type check and strict key check (``cls``
    None for the detector: chosen by the checkpoint's model type)."""
    local_only = _offline()
    if not _is_hub_id(ref):
        _check_dir(Path(ref).expanduser(), part, setting)
        ref, local_only = str(Path(ref).expanduser()), True
    try:
        config = AutoConfig.from_pretrained(ref, local_files_only=local_only)
    except OSError as e:
        where = "" if Path(ref).is_dir() else "there is no such local directory, and as a hub id "
        why = "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache" if local_only \
            else "it could not be fetched"
        raise TeacherWeightsError(f"cannot load {setting}={ref!r}: {where}{why}; "
                                  + _hint(part, setting)) from e
    if config.model_type not in MODEL_TYPES[part]:
        expected = " or ".join(repr(t) for t in MODEL_TYPES[part])
        raise TeacherWeightsError(f"{setting}={ref!r} holds a {config.model_type!r} checkpoint, "
                                  f"expected {expected}; " + _hint(part, setting))
    if part == "detector":
        cls = DETECTOR_CLASSES[config.model_type]
    try:
        model, info = cls.from_pretrained(ref, local_files_only=local_only,
                                          output_loading_info=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise TeacherWeightsError(f"weights in {setting}={ref!r} do not load into "
                                  f"{cls.__name__}: {e}; " + _hint(part, setting)) from e
    if info.get("missing_keys") or info.get("mismatched_keys"):
        bad = sorted(info.get("missing_keys") or [])[:5] + [str(k) for k in
                                                            (info.get("mismatched_keys") or [])][:5]
        raise TeacherWeightsError(f"weights in {setting}={ref!r} do not match {cls.__name__} "
                                  f"(missing/mismatched: {bad}); " + _hint(part, setting))
    return model, ref, local_only


def load_detector(ref: str):
    """-> ((MM)GroundingDinoForObjectDetection, tokenizer, shortest_edge or None) from ``ref``."""
    model, ref, local_only = _load(None, ref, "detector", "detector_weights")
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, local_files_only=local_only)
    except (OSError, ValueError) as e:
        raise TeacherWeightsError(f"no usable tokenizer in detector_weights={ref!r}: {e}; "
                                  + _hint("detector", "detector_weights")) from e
    return model, tokenizer, _shortest_edge(ref, local_only)


def load_mask_model(ref: str, mask_model: str):
    """-> SamModel or Sam2Model from ``ref`` (``mask_model`` must match the checkpoint)."""
    cls = SamModel if mask_model == "sam" else Sam2Model
    model, _, _ = _load(cls, ref, mask_model, "sam_weights")
    return model


def _shortest_edge(ref: str, local_only: bool) -> int | None:
    """The detector processor's ``size.shortest_edge`` from preprocessor_config.json, if any."""
    import json

    from huggingface_hub import hf_hub_download
    try:
        path = Path(ref) / "preprocessor_config.json" if Path(ref).is_dir() else \
            Path(hf_hub_download(ref, "preprocessor_config.json", local_files_only=local_only))
        size = json.loads(path.read_text()).get("size", {})
    except Exception:  # optional file (any hub/IO/json error): fall back to the caller's default
        return None
    has_edge = isinstance(size, dict) and "shortest_edge" in size
    return int(size["shortest_edge"]) if has_edge else None


def build_detector(size: str, tokenizer) -> GroundingDinoForObjectDetection:
    """Random-init Grounding DINO of ``size`` whose text encoder matches ``tokenizer``."""
    return GroundingDinoForObjectDetection(detector_config(size, len(tokenizer)))


def build_mask_model(size: str, mask_model: str):
    """Random-init SAM / SAM2 of ``size``."""
    if mask_model == "sam":
        return SamModel(sam_config(size))
    if mask_model == "sam2":
        return Sam2Model(sam2_config(size))
    raise ValueError(f"mask_model must be one of {list(MASK_MODELS)}, got {mask_model!r}")
