"""Load pretrained DINOv2 weights into a segmenter's encoder, offline-first.

``path_or_id`` is either a local directory holding a Hugging Face Dinov2 checkpoint
(``config.json`` plus ``model.safetensors`` or ``pytorch_model.bin``) or a hub id such as
``facebook/dinov2-small``. A hub id is only fetched when the machine is online and
``HF_HUB_OFFLINE`` is not set; with ``HF_HUB_OFFLINE=1`` only the local HF cache is used. Every
failure names the expected files and the command that puts them in place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import Dinov2Model

CONFIG_NAME = "config.json"
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
#: architecture fields that must agree between checkpoint and encoder
ARCH_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size",
               "mlp_ratio", "use_swiglu_ffn")
#: checkpoint keys we drop on purpose: the iBOT mask token (pretraining only, see mask2former.py)
IGNORED_KEYS = ("embeddings.mask_token",)


class PretrainedWeightsError(FileNotFoundError):
    """Weights missing, unreadable or not matching the encoder; the message says what to do."""


def _fix_hint(name: str) -> str:
    local = f"weights/{name.split('/')[-1]}"
    hub = name if "/" in name else "facebook/dinov2-small"
    return (f"download it with `huggingface-cli download {hub} --local-dir {local}` on a machine "
            f"with network access and pass encoder_weights={local!r} (a directory with "
            f"{CONFIG_NAME} and one of {list(WEIGHT_NAMES)})")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_checkpoint_dir(path_or_id: str) -> Path:
    """Local dir as is; a hub id -> its snapshot dir (download only when online)."""
    path = Path(path_or_id).expanduser()
    if path.exists() or path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
        if not path.is_dir():
            raise PretrainedWeightsError(f"encoder weights directory {path} does not exist; "
                                         + _fix_hint(path.name))
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(path_or_id, allow_patterns=[CONFIG_NAME, *WEIGHT_NAMES],
                                      local_files_only=_offline()))
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set and" if _offline() else "the hub is unreachable and"
        raise PretrainedWeightsError(f"cannot load {path_or_id!r}: {why} it is not in the local "
                                     f"Hugging Face cache; " + _fix_hint(path_or_id)) from e


def _check_files(directory: Path) -> None:
    if not (directory / CONFIG_NAME).is_file():
        raise PretrainedWeightsError(f"{directory} lacks {CONFIG_NAME}; " + _fix_hint(directory.name))
    names = [*WEIGHT_NAMES, *(n + ".index.json" for n in WEIGHT_NAMES)]  # single or sharded
    if not any((directory / n).is_file() for n in names):
        raise PretrainedWeightsError(f"{directory} has no weight file: expected one of "
                                     f"{list(WEIGHT_NAMES)} (or a sharded *.index.json); "
                                     + _fix_hint(directory.name))


def load_dinov2_weights(encoder: Dinov2Model, path_or_id: str) -> Path:
    """Copy a HF Dinov2 checkpoint into ``encoder`` (in place); returns the checkpoint dir.

    transformers' own ``from_pretrained`` reads the files (it maps the checkpoint's legacy key
    names, e.g. ``attention.attention.query``, to the current module names and strips a
    ``dinov2.`` prefix); we then insist on an exact match. Raises
    :class:`PretrainedWeightsError` when files are missing, the architecture differs (hidden
    size, depth, heads, patch, ...) or any tensor is missing or has another shape.
    """
    directory = resolve_checkpoint_dir(str(path_or_id))
    _check_files(directory)
    cfg_file = directory / CONFIG_NAME
    ckpt_cfg = json.loads(cfg_file.read_text())
    if ckpt_cfg.get("model_type", "dinov2") != "dinov2":
        raise PretrainedWeightsError(f"{cfg_file} describes a {ckpt_cfg.get('model_type')!r} model, "
                                     "not a DINOv2 encoder")
    diffs = [f"{k}: checkpoint {ckpt_cfg[k]!r} vs model {getattr(encoder.config, k)!r}"
             for k in ARCH_FIELDS if k in ckpt_cfg and ckpt_cfg[k] != getattr(encoder.config, k)]
    if diffs:
        raise PretrainedWeightsError(f"checkpoint {directory} does not fit this encoder ({'; '.join(diffs)}); "
                                     "pick the model size made for it (student_paper <- dinov2-small, "
                                     "teacher_paper <- dinov2-large) or override encoder_* options")
    loaded, info = Dinov2Model.from_pretrained(
        str(directory), config=encoder.config, local_files_only=True, output_loading_info=True,
        ignore_mismatched_sizes=True)  # report mismatches ourselves, with the fix
    missing = sorted(info.get("missing_keys", []))
    unexpected = sorted(k for k in info.get("unexpected_keys", [])
                        if k.removeprefix("dinov2.") not in IGNORED_KEYS)
    shapes = [f"{m[0]}: checkpoint {tuple(m[1])} vs model {tuple(m[2])}" if len(m) == 3 else str(m)
              for m in info.get("mismatched_keys", [])]
    if missing or unexpected or shapes:
        raise PretrainedWeightsError(
            f"checkpoint {directory} does not match the encoder: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatches {shapes[:5]} (position embeddings "
            f"depend on encoder_image_size: 518 for the facebook/dinov2-* checkpoints)")
    encoder.load_state_dict(loaded.state_dict(), strict=True)
    return directory
