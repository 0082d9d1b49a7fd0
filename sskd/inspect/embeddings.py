"""Per-instance and per-image embeddings of a run's models, stored on its FiftyOne dataset.

An instance's embedding is the model's weak pixel embedding (the contrastive head that L_pxl
trains, ``Segmenter.forward(images, embeddings="weak").embed_weak``, ``B x D x h x w``)
averaged over the instance's mask, so the plot shows what the contrastive loss shapes: pixels
of one instance should pool to one point, instances of a class to one cluster. An image's
embedding is the mean over all its pixels. Vectors are L2-normalised after pooling.

Stored as: sample field ``emb_<key>`` (``D`` vector) and label attribute ``emb_<key>`` on every
detection of the chosen label fields; ``<key>`` names the model (``"teacher"``, ``"student"``).
:func:`compute_visualizations` then runs ``fiftyone.brain.compute_visualization`` on them.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger("sskd.inspect")

BATCH_SIZE = 8  # images per forward pass when embedding a dataset


def embedding_field(key: str) -> str:
    """Name of the sample field / label attribute that holds model ``key``'s embeddings."""
    return f"emb_{key}"


# --------------------------------------------------------------------------- pooling (torch only)


def pool_instance_embeddings(embed: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mask-average one image's pixel embeddings over each instance.

    ``embed``: ``D x h x w`` pixel embeddings; ``masks``: ``N x H x W`` binary masks at any
    resolution. Each mask is area-resized to ``h x w``, which turns it into the fraction of
    each embedding cell it covers, so a small instance still weighs on the cells it touches.
    Returns ``N x D`` L2-normalised vectors (``0 x D`` when ``N == 0``).
    """
    d, h, w = embed.shape
    if masks.shape[0] == 0:
        return embed.new_zeros((0, d))
    weights = F.interpolate(masks[:, None].float(), size=(h, w), mode="area")[:, 0]  # N x h x w
    total = weights.flatten(1).sum(1, keepdim=True)                                   # N x 1
    pooled = weights.flatten(1) @ embed.flatten(1).T / total.clamp(min=1e-8)           # N x D
    return F.normalize(pooled, dim=1)


def pool_image_embedding(embed: torch.Tensor) -> torch.Tensor:
    """``D x h x w`` -> ``D``: mean over pixels, L2-normalised."""
    return F.normalize(embed.flatten(1).mean(1), dim=0)


def weak_embeddings(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``B x 3 x H x W`` in [0, 1] -> ``B x D x h x w`` weak pixel embeddings of ``model``."""
    out = model(images, embeddings="weak")
    embed = getattr(out, "embed_weak", None)
    if embed is None:
        raise ValueError(f"{type(model).__name__}.forward(images, embeddings='weak') returned no "
                         "embed_weak: the model has no weak projection head, so it cannot be "
                         "embedded (use a model built with pixel-embedding heads)")
    return embed


def load_image(path: str, size: int) -> torch.Tensor:
    """An image file -> ``3 x size x size`` float in [0, 1] (the models' square input)."""
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB").resize((size, size), Image.BILINEAR)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}; fix or remove the file") from e
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)


# --------------------------------------------------------------------------- dataset


def _full_mask(det: Any, height: int, width: int) -> np.ndarray:
    """A FiftyOne Detection (box + cropped mask) -> ``height x width`` bool mask."""
    full = np.zeros((height, width), dtype=bool)
    mask = det.get_mask() if hasattr(det, "get_mask") else det.mask
    if mask is None:
        return full
    x, y, _, _ = det.bounding_box
    x0, y0 = int(round(x * width)), int(round(y * height))
    mh, mw = mask.shape[:2]
    full[y0:y0 + mh, x0:x0 + mw] = mask[: height - y0, : width - x0].astype(bool)
    return full


@torch.no_grad()
def compute_embeddings(samples: Any, model: torch.nn.Module, key: str,
                       label_fields: Sequence[str] | None = None, input_size: int = 64,
                       batch_size: int = BATCH_SIZE, device: str | torch.device = "cpu") -> dict:
    """Embed every image of ``samples`` and every instance of ``label_fields`` with ``model``.

    ``samples``: a FiftyOne dataset or view with image metadata (width/height) set, as
    :func:`sskd.inspect.fiftyone_export.export_run` writes it. ``label_fields``: Detections
    fields whose instances get the ``emb_<key>`` attribute (default: every Detections field).
    Images are resized to ``input_size`` (the run's ``data.input_size``). Returns counts
    ``{"images": n, "<field>": n_instances, ...}``.
    """
    if label_fields is None:
        label_fields = detection_fields(samples)
    attr = embedding_field(key)
    was_training = model.training
    model.eval().to(device)
    view = samples.select_fields(list(label_fields) + ["metadata"])
    image_vectors: dict[str, np.ndarray] = {}
    inst_vectors: dict[str, dict[str, list]] = {f: {} for f in label_fields}
    counts = {"images": 0, **{f: 0 for f in label_fields}}
    batch: list[Any] = []

    def flush() -> None:
        imgs = torch.stack([load_image(s.filepath, input_size) for s in batch]).to(device)
        embed = weak_embeddings(model, imgs).float().cpu()                  # B x D x h x w
        for s, e in zip(batch, embed):
            image_vectors[s.id] = pool_image_embedding(e).numpy()
            h, w = s.metadata.height, s.metadata.width
            for f in label_fields:
                dets = s[f]
                if dets is None:
                    continue
                masks = torch.from_numpy(np.stack([_full_mask(d, h, w) for d in dets.detections])
                                         if dets.detections else np.zeros((0, h, w), bool))
                vecs = pool_instance_embeddings(e, masks).numpy()
                # plain float lists: a numpy array in a dynamic label attribute comes back
                # from the database as opaque bytes
                inst_vectors[f][s.id] = vecs.tolist()
                counts[f] += len(vecs)
        counts["images"] += len(batch)
        batch.clear()

    try:
        for sample in view.iter_samples(progress=False):
            if sample.metadata is None or not sample.metadata.height:
                raise ValueError(f"sample {sample.filepath} has no image metadata; export it with "
                                 "sskd.inspect.fiftyone_export.export_run (sets width/height)")
            batch.append(sample)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    finally:
        model.train(was_training)

    samples.set_values(attr, image_vectors, key_field="id")
    for f, per_sample in inst_vectors.items():
        if per_sample:
            samples.set_values(f"{f}.detections.{attr}", per_sample, key_field="id")
    log.info("embeddings %s: %s", key, counts)
    return counts


def detection_fields(samples: Any) -> list[str]:
    """Names of the Detections label fields of a dataset/view, in schema order."""
    import fiftyone as fo

    schema = samples.get_field_schema(embedded_doc_type=fo.Detections)
    return list(schema)


# --------------------------------------------------------------------------- visualization


def visualization_method(method: str = "auto") -> str:
    """``"auto"``: UMAP when ``umap-learn`` is installed, else PCA; or ``pca|umap|tsne``."""
    has_umap = importlib.util.find_spec("umap") is not None
    if method == "auto":
        return "umap" if has_umap else "pca"
    if method not in ("pca", "umap", "tsne"):
        raise ValueError(f"visualization method must be auto|pca|umap|tsne, got {method!r}")
    if method == "umap" and not has_umap:
        raise ValueError("method='umap' needs umap-learn: `pip install umap-learn`, or use "
                         "method='pca' / 'tsne'")
    return method


def method_kwargs(method: str, n_points: int, dim: int) -> dict:
    """Keyword arguments that keep each method valid on small point sets.

    t-SNE: ``pca_dims <= min(n_points, dim)`` (sklearn's PCA limit) and perplexity below
    ``n_points`` (sklearn requires it). UMAP: ``n_neighbors < n_points``.
    """
    if method == "tsne":
        return {"pca_dims": int(min(50, n_points, dim)), "verbose": False,
                "perplexity": float(max(1.0, min(30.0, (n_points - 1) / 3)))}
    if method == "umap":
        return {"num_neighbors": int(max(2, min(15, n_points - 1))), "verbose": False}
    return {}


def brain_key_for(key: str, field: str | None) -> str:
    """Brain key of a visualization: ``viz_<key>_images`` or ``viz_<key>_<field>``."""
    return f"viz_{key}_{field or 'images'}"


def compute_visualizations(dataset: Any, key: str, label_fields: Sequence[str] | None = None,
                           method: str = "auto", seed: int = 0) -> dict[str, int]:
    """2-D maps of model ``key``'s image and instance embeddings (FiftyOne brain runs).

    One run for the images (brain key ``viz_<key>_images``) and one per label field that has
    instance embeddings (``viz_<key>_<field>``, patches of that field); in the App's
    Embeddings panel colour them by label, or by ``eval_<field>`` (tp/fp/fn) to see where the
    teacher's mistakes sit. Re-running replaces the previous runs. Returns
    ``{brain_key: n_points}``; sets with fewer than 3 points are skipped with a log line.
    """
    import fiftyone.brain as fob
    from fiftyone import ViewField as F

    method = visualization_method(method)
    attr = embedding_field(key)
    if label_fields is None:
        label_fields = detection_fields(dataset)
    done: dict[str, int] = {}
    targets: list[tuple[str | None, Any]] = [(None, dataset.exists(attr))]
    for f in label_fields:
        targets.append((f, dataset.filter_labels(f, F(attr) != None)))  # noqa: E711 (mongo expr)
    for field, view in targets:
        bkey = brain_key_for(key, field)
        if bkey in dataset.list_brain_runs():
            dataset.delete_brain_run(bkey)
        # Vectors are passed explicitly: given only a field name, the brain falls back to
        # downloading a zoo model when it cannot resolve the field (never offline-safe).
        if field is None:
            vectors = view.values(attr)
            embeddings = np.stack(vectors) if vectors else None
        else:
            # sample id -> num_patches x D, in label order (the view keeps embedded labels only)
            sids, per_sample = view.values(["id", f"{field}.detections.{attr}"])
            embeddings = {i: np.stack(v) for i, v in zip(sids, per_sample) if v}
            vectors = [row for arr in embeddings.values() for row in arr]
        if len(vectors) < 3:
            log.info("visualization %s skipped: %d embedded %s (need >= 3)", bkey, len(vectors),
                     "images" if field is None else f"instances of {field}")
            continue
        kwargs = method_kwargs(method, len(vectors), len(vectors[0]))
        fob.compute_visualization(view, patches_field=field, embeddings=embeddings,
                                  brain_key=bkey, method=method, seed=seed, progress=False,
                                  **kwargs)
        done[bkey] = len(vectors)
    log.info("visualizations (%s) of %s: %s", method, key, done)
    return done
