"""Synthetic domain-shift benchmark: coloured shapes on textured backgrounds, as COCO json.

Each image holds a few instances of "thing" classes that differ by *shape* only (circle,
rectangle, triangle, and optionally ellipse, star, cross). Colours are drawn from the domain's
palette independently of the class, so a model has to learn shape, and a domain shift (other
palette, textured/cluttered background, other scales, noise, more occlusion) is a shift in
appearance, not in what the classes are.

Rendering is plain numpy on pixel centres (no anti-aliasing), so a mask is exactly the set of
pixels painted with its instance colour. Shapes are painted in order: later shapes occlude
earlier ones and a mask is the *visible* part. A new shape that would leave an earlier one (or
itself) with too little visible area is re-drawn elsewhere (``min_visible_fraction``,
``min_visible_pixels``), so no instance is ever a sliver. Clutter blobs and strokes are drawn
into the background and are not instances.

Everything is a function of the seed: the same seed gives byte-identical PNGs and json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from sskd.config import ConfigError, SyntheticConfig, SyntheticDomainConfig, config_hash
from sskd.data.records import Dataset, ImageRecord, Instance, to_coco, write_json_atomic

log = logging.getLogger(__name__)

#: bump when rendering changes, so cached benchmarks are regenerated
GENERATOR_VERSION = 1
#: file written last (atomically) into a complete benchmark dir
MARKER = "COMPLETE.json"
SHAPES = ("circle", "rectangle", "triangle", "ellipse", "star", "cross")
BACKGROUNDS = ("flat", "gradient", "stripes", "noise", "clutter")
TEXTURES = ("flat", "stripes")  # instance fills

# Palettes: object colours (drawn independently of the class) and background colours.
# Objects keep a minimum RGB distance from the background colours so they stay visible.
PALETTES: dict[str, dict[str, list[tuple[int, int, int]]]] = {
    "primary": {"objects": [(220, 40, 40), (40, 170, 60), (40, 80, 220), (240, 210, 40),
                            (240, 130, 30), (150, 60, 190), (30, 190, 200)],
                "background": [(245, 245, 245), (228, 228, 234), (250, 246, 236)]},
    "pastel": {"objects": [(250, 170, 170), (170, 225, 170), (170, 190, 250), (250, 230, 160),
                           (220, 180, 240), (160, 225, 225)],
               "background": [(110, 110, 125), (85, 95, 110), (135, 125, 115)]},
    "dark": {"objects": [(130, 25, 25), (25, 90, 35), (25, 45, 120), (115, 95, 15),
                         (75, 35, 95), (35, 35, 35)],
             "background": [(205, 205, 195), (185, 195, 205), (222, 212, 200)]},
    "muted": {"objects": [(185, 105, 95), (100, 150, 100), (100, 115, 175), (195, 170, 100),
                          (160, 110, 160), (95, 160, 160), (70, 70, 75)],
              "background": [(150, 145, 135), (125, 130, 135), (165, 158, 146), (110, 115, 108)]},
}
_MIN_CONTRAST = 45.0  # least RGB (L2) distance between an object colour and any background colour


# --------------------------------------------------------------------------- validation


def validate_domain(cfg: SyntheticDomainConfig, classes: Sequence[str], image_size: int,
                    where: str = "data.synthetic") -> None:
    """Raise :class:`ConfigError` naming the bad key (``where`` prefixes it) and the fix."""
    def bad(key: str, msg: str) -> ConfigError:
        return ConfigError(f"config key {where}.{key}: {msg}")

    if not classes or len(set(classes)) != len(classes):
        raise ConfigError(f"config key data.synthetic.classes must be unique shape names, got {list(classes)}")
    unknown = [c for c in classes if c not in SHAPES]
    if unknown:
        raise ConfigError(f"config key data.synthetic.classes: unknown shapes {unknown}; "
                          f"choose from {list(SHAPES)}")
    if int(image_size) < 16:
        raise ConfigError(f"config key data.synthetic.image_size must be >= 16, got {image_size}")
    if cfg.background not in BACKGROUNDS:
        raise bad("background", f"must be one of {list(BACKGROUNDS)}, got {cfg.background!r}")
    if cfg.object_texture not in TEXTURES:
        raise bad("object_texture", f"must be one of {list(TEXTURES)}, got {cfg.object_texture!r}")
    if cfg.background == "clutter" and cfg.clutter < 1:
        raise bad("clutter", "background 'clutter' needs clutter >= 1 distractor blobs")
    if cfg.clutter < 0:
        raise bad("clutter", f"must be >= 0, got {cfg.clutter}")
    if cfg.palette not in PALETTES:
        raise bad("palette", f"must be one of {sorted(PALETTES)}, got {cfg.palette!r}")
    if not 0 < cfg.scale_min <= cfg.scale_max <= 1:
        raise bad("scale_min", f"need 0 < scale_min <= scale_max <= 1, got "
                               f"{cfg.scale_min}, {cfg.scale_max}")
    if not 0 < cfg.aspect_min <= 1:
        raise bad("aspect_min", f"must be in (0, 1], got {cfg.aspect_min}")
    if cfg.noise_std < 0 or cfg.color_jitter < 0:
        raise bad("noise_std", "noise_std and color_jitter must be >= 0")
    if not 0 <= cfg.occlusion <= 1:
        raise bad("occlusion", f"must be a probability in [0, 1], got {cfg.occlusion}")
    if not 0 <= cfg.min_objects <= cfg.max_objects or cfg.max_objects < 1:
        raise bad("min_objects", f"need 0 <= min_objects <= max_objects, max_objects >= 1, got "
                                 f"{cfg.min_objects}, {cfg.max_objects}")
    if cfg.distractors < 0 or (cfg.distractors and not cfg.distractor_shapes):
        raise bad("distractors", "must be >= 0, and > 0 only with distractor_shapes set")
    wrong = [d for d in cfg.distractor_shapes if d not in SHAPES or d in classes]
    if wrong:
        raise bad("distractor_shapes", f"{wrong}: each must be a shape of {list(SHAPES)} that is "
                                       f"not one of the classes {list(classes)}")
    if not 0 <= cfg.min_visible_fraction < 1 or cfg.min_visible_pixels < 1:
        raise bad("min_visible_fraction", "need 0 <= min_visible_fraction < 1 and "
                                          "min_visible_pixels >= 1")


# --------------------------------------------------------------------------- rasterisation


def _polygon_inside(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test; ``u``: ``h x 1``/``h x w``, ``verts``: ``V x 2`` (u, v)."""
    inside = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    n = len(verts)
    for i in range(n):
        (ui, vi), (uj, vj) = verts[i], verts[(i + 1) % n]
        if vi == vj:  # horizontal edges never cross a horizontal ray
            continue
        crosses = (vi > v) != (vj > v)
        inside ^= crosses & (u < (uj - ui) * (v - vi) / (vj - vi) + ui)
    return inside


def _shape_geometry(kind: str, size: float, aspect: float) -> tuple[float, object]:
    """Circumradius and local-frame description of a shape whose longest extent is ``size`` px."""
    h = size / 2.0
    if kind == "circle":
        return h, ("ellipse", h, h)
    if kind == "ellipse":  # clearly elongated, so it never passes for a circle
        return h, ("ellipse", h, h * min(aspect, 0.6))
    if kind == "rectangle":
        b = h * aspect
        return float(np.hypot(h, b)), ("box", h, b)
    if kind == "cross":
        return float(np.hypot(h, 0.18 * size)), ("cross", h, 0.18 * size)
    if kind == "triangle":  # isosceles: base along u, apex at +v; aspect squashes the height
        height = size * max(aspect, 0.55)
        verts = np.array([[-h, -height / 3], [h, -height / 3], [0.0, 2 * height / 3]])
        return float(np.linalg.norm(verts, axis=1).max()), ("poly", verts)
    if kind == "star":  # five points, inner radius 0.45 of the outer one
        ang = np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, h, 0.45 * h)
        return h, ("poly", np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1))
    raise ValueError(f"unknown shape {kind!r}; choose from {list(SHAPES)}")


def _rasterize(geom: object, cx: float, cy: float, theta: float, radius: float,
               size: int) -> tuple[slice, slice, np.ndarray] | None:
    """Patch slices and ``h x w`` bool mask of a rotated shape clipped to the ``size``^2 image."""
    x0, x1 = max(int(np.floor(cx - radius)), 0), min(int(np.ceil(cx + radius)) + 1, size)
    y0, y1 = max(int(np.floor(cy - radius)), 0), min(int(np.ceil(cy + radius)) + 1, size)
    if x0 >= x1 or y0 >= y1:
        return None
    dx = (np.arange(x0, x1, dtype=np.float64) + 0.5 - cx)[None, :]
    dy = (np.arange(y0, y1, dtype=np.float64) + 0.5 - cy)[:, None]
    c, s = np.cos(theta), np.sin(theta)
    u, v = dx * c + dy * s, -dx * s + dy * c  # pixel centres in the shape's local frame
    kind = geom[0]
    if kind == "ellipse":
        m = (u / geom[1]) ** 2 + (v / geom[2]) ** 2 <= 1.0
    elif kind == "box":
        m = (np.abs(u) <= geom[1]) & (np.abs(v) <= geom[2])
    elif kind == "cross":
        au, av = np.abs(u), np.abs(v)
        m = ((au <= geom[1]) & (av <= geom[2])) | ((au <= geom[2]) & (av <= geom[1]))
    else:
        m = _polygon_inside(u, v, geom[1])
    return slice(y0, y1), slice(x0, x1), m


# --------------------------------------------------------------------------- backgrounds


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth ``size x size`` noise in [0, 1]: a random ``cells``^2 grid, bilinearly upsampled."""
    grid = rng.random((cells + 1, cells + 1))
    t = (np.arange(size) + 0.5) / size * cells
    i = np.minimum(t.astype(int), cells - 1)
    f = t - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]            # size x (cells+1)
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _background(cfg: SyntheticDomainConfig, size: int, rng: np.random.Generator,
                bg_colors: np.ndarray) -> np.ndarray:
    """``H x W x 3`` float background texture (before clutter)."""
    pick = rng.choice(len(bg_colors), size=2, replace=False)
    c0, c1 = bg_colors[pick[0]], bg_colors[pick[1]]
    if cfg.background == "flat":
        return np.broadcast_to(c0, (size, size, 3)).astype(np.float32)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    if cfg.background in ("gradient", "stripes"):
        a = rng.uniform(0, 2 * np.pi)
        proj = coords[None, :] * np.cos(a) + coords[:, None] * np.sin(a)      # H x W
        if cfg.background == "gradient":
            t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
        else:
            period = rng.uniform(0.08, 0.25)
            t = 0.5 + 0.5 * np.sin(2 * np.pi * proj / period)
    else:  # noise, clutter: mottled low-frequency texture
        t = _value_noise(rng, size, int(rng.integers(3, 7)))
    t = t.astype(np.float32)[..., None]
    return c0 * (1 - t) + c1 * t


def _draw_clutter(img: np.ndarray, n: int, cfg: SyntheticDomainConfig, rng: np.random.Generator,
                  colors: np.ndarray) -> None:
    """Paint ``n`` distractors in place: wobbly blobs and thin strokes (never instances)."""
    size = img.shape[0]
    for _ in range(n):
        color = colors[rng.integers(len(colors))]
        cx, cy = rng.uniform(0, size, 2)
        r = rng.uniform(cfg.scale_min, cfg.scale_max) * size / 2
        if rng.random() < 0.6:  # blob: radius r(phi) = r (1 + sum_k a_k cos(k phi + p_k))
            phi = np.linspace(0, 2 * np.pi, 18, endpoint=False)
            k = np.arange(2, 5)[:, None]  # irregular enough never to pass for a circle/ellipse
            wobble = (rng.uniform(0.12, 0.3, (3, 1)) * np.cos(k * phi + rng.uniform(0, 6.3, (3, 1)))).sum(0)
            rad = r * (1 + wobble)
            geom = ("poly", np.stack([rad * np.cos(phi), rad * np.sin(phi)], 1))
            out = _rasterize(geom, cx, cy, 0.0, float(rad.max()), size)
            if out is not None:
                ys, xs, m = out
                img[ys, xs][m] = color
        else:  # stroke: a 1-2 px wide segment, thinner than any rectangle instance
            ang = rng.uniform(0, np.pi)
            length = r * 2
            half_w = rng.uniform(0.5, 1.0)
            out = _rasterize(("box", length / 2, half_w), cx, cy, ang, length / 2 + 1, size)
            if out is not None:
                ys, xs, m = out
                img[ys, xs][m] = color


def _object_colors(palette: dict, bg_colors: np.ndarray) -> np.ndarray:
    """Palette object colours far enough from every background colour (at least the farthest)."""
    obj = np.asarray(palette["objects"], dtype=np.float32)
    dist = np.linalg.norm(obj[:, None] - bg_colors[None], axis=-1).min(1)
    keep = dist >= _MIN_CONTRAST
    return obj[keep] if keep.any() else obj[[int(dist.argmax())]]


def _jittered(color: np.ndarray, cfg: SyntheticDomainConfig, rng: np.random.Generator) -> np.ndarray:
    """``color`` with the domain's per-object uniform RGB jitter (no draw when it is 0)."""
    if not cfg.color_jitter:
        return color
    return np.clip(color + rng.uniform(-cfg.color_jitter, cfg.color_jitter, 3), 0, 255)


def _paint_stripes(img: np.ndarray, label: np.ndarray, colors: list[np.ndarray],
                   rng: np.random.Generator) -> None:
    """Stripe each instance in place: every other band of ``period`` px (random angle and
    period per instance) takes a darker shade of the instance colour."""
    size = img.shape[0]
    coords = np.arange(size, dtype=np.float32) + 0.5
    for i, color in enumerate(colors):
        a = rng.uniform(0, np.pi)
        period = rng.uniform(3.0, 6.0)
        proj = coords[None, :] * np.cos(a) + coords[:, None] * np.sin(a)
        band = (np.floor(proj / (period / 2)) % 2 == 1) & (label == i)
        img[band] = color * 0.55


# --------------------------------------------------------------------------- images


def render_image(domain_cfg: SyntheticDomainConfig, image_size: int, classes: Sequence[str],
                 rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Render one image in memory.

    Returns the ``H x W x 3`` uint8 RGB image (``H = W = image_size``) and the instances in
    painting order as ``(class_id, H x W bool visible mask)``; masks never overlap. ``class_id``
    indexes ``classes``. Uses only ``rng``, so a seeded generator gives identical output.
    """
    cfg, size = domain_cfg, int(image_size)
    validate_domain(cfg, classes, size)
    palette = PALETTES[cfg.palette]
    bg_colors = np.asarray(palette["background"], dtype=np.float32)
    obj_colors = _object_colors(palette, bg_colors)

    img = np.ascontiguousarray(_background(cfg, size, rng, bg_colors))
    if cfg.clutter:
        _draw_clutter(img, cfg.clutter, cfg, rng, obj_colors)
    for _ in range(cfg.distractors):  # unlabelled look-alikes, under any instance drawn later
        kind = cfg.distractor_shapes[int(rng.integers(len(cfg.distractor_shapes)))]
        radius, geom = _shape_geometry(kind, rng.uniform(cfg.scale_min, cfg.scale_max) * size,
                                       rng.uniform(cfg.aspect_min, 1.0))
        cx, cy = rng.uniform(0.6 * radius, max(size - 0.6 * radius, 0.6 * radius + 1e-3), 2)
        out = _rasterize(geom, cx, cy, rng.uniform(0, 2 * np.pi), radius, size)
        if out is not None:
            ys, xs, m = out
            img[ys, xs][m] = _jittered(obj_colors[int(rng.integers(len(obj_colors)))], cfg, rng)

    label = np.full((size, size), -1, dtype=np.int16)  # index of the visible instance per pixel
    full_area: list[int] = []       # in-image pixels of each instance when nothing covers it
    visible: list[int] = []         # pixels still visible now
    centers: list[tuple[float, float, float]] = []  # (cx, cy, radius), for occlusion placement
    kinds: list[int] = []
    colors: list[np.ndarray] = []
    color_idx: list[int] = []       # palette index of each instance's colour (before jitter)
    n_target = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    for _ in range(n_target):
        # occlusion decides per object whether it overlaps earlier ones or keeps clear of them;
        # the last attempts accept either, so crowded images still fill up
        overlap = bool(centers) and rng.random() < cfg.occlusion
        for attempt in range(25):
            class_id = int(rng.integers(len(classes)))
            scale = rng.uniform(cfg.scale_min, cfg.scale_max) * size
            aspect = rng.uniform(cfg.aspect_min, 1.0)
            radius, geom = _shape_geometry(classes[class_id], scale, aspect)
            theta = rng.uniform(0, 2 * np.pi)
            if overlap:  # centre within reach of a random earlier shape's centre
                ox, oy, orad = centers[int(rng.integers(len(centers)))]
                d = rng.uniform(0.3, 0.8) * (orad + radius) * 0.7
                a = rng.uniform(0, 2 * np.pi)
                cx, cy = ox + d * np.cos(a), oy + d * np.sin(a)
            else:
                lo, hi = 0.6 * radius, size - 0.6 * radius  # mostly inside the frame
                cx, cy = rng.uniform(lo, max(hi, lo + 1e-3), 2)
            out = _rasterize(geom, cx, cy, theta, radius, size)
            if out is None:
                continue
            ys, xs, m = out
            area = int(m.sum())
            if area < cfg.min_visible_pixels:
                continue
            covered = label[ys, xs][m]
            if attempt < 15 and overlap != bool((covered >= 0).any()):
                continue
            lost = np.bincount(covered[covered >= 0], minlength=len(visible))
            left = np.asarray(visible, dtype=np.int64) - lost
            if len(left) and ((left < cfg.min_visible_pixels).any() or
                              (left < cfg.min_visible_fraction * np.asarray(full_area)).any()):
                continue  # would hide an earlier instance almost completely: re-draw this one
            # a colour that differs from the shapes it covers, so their boundary stays visible
            under = {color_idx[int(i)] for i in np.nonzero(lost)[0]}
            choices = [c for c in range(len(obj_colors)) if c not in under] or list(range(len(obj_colors)))
            cidx = choices[int(rng.integers(len(choices)))]
            color = _jittered(obj_colors[cidx], cfg, rng)
            idx = len(visible)
            label[ys, xs][m] = idx
            visible = list(left) + [area]
            full_area.append(area)
            centers.append((cx, cy, radius))
            kinds.append(class_id)
            colors.append(np.asarray(color, dtype=np.float32))
            color_idx.append(cidx)
            break

    if colors:
        fg = label >= 0
        img[fg] = np.stack(colors)[label[fg]]
        if cfg.object_texture == "stripes":
            _paint_stripes(img, label, colors, rng)
    if cfg.noise_std:
        img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(cfg.noise_std)
    out_img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out_img, [(kinds[i], label == i) for i in range(len(kinds))]


# --------------------------------------------------------------------------- datasets


def _rng(seed: int | Sequence[int], index: int) -> np.random.Generator:
    entropy = [int(s) for s in (seed if isinstance(seed, (list, tuple)) else [seed])]
    return np.random.default_rng(entropy + [int(index)])


def corpus_domains(cfg: SyntheticConfig) -> list[SyntheticDomainConfig]:
    """The domains of the stand-ins' pretraining corpus (``source``), in rendering order.

    With ``corpus_backgrounds`` and ``corpus_palettes`` set: every (background, palette) pair
    except the target's own, each a copy of ``cfg.source`` with that background and palette (a
    "clutter" background gets at least 2 distractors), so the target is a held-out combination
    of appearances the corpus has seen separately, as a real target domain is for a VFM.
    Otherwise the single ``cfg.source`` domain.
    """
    if not cfg.corpus_backgrounds and not cfg.corpus_palettes:
        return [cfg.source]
    if not cfg.corpus_backgrounds or not cfg.corpus_palettes:
        raise ConfigError("config keys data.synthetic.corpus_backgrounds and corpus_palettes must "
                          "both be set (a foundation corpus) or both be [] (one source domain)")
    held_out = (cfg.target.background, cfg.target.palette)
    domains = [dataclasses.replace(cfg.source, background=bg, palette=pal,
                                   clutter=max(cfg.source.clutter, 2) if bg == "clutter"
                                   else cfg.source.clutter)
               for bg in cfg.corpus_backgrounds for pal in cfg.corpus_palettes
               if (bg, pal) != held_out]
    if not domains:
        raise ConfigError("data.synthetic.corpus_backgrounds x corpus_palettes holds only the "
                          "target's own combination: add backgrounds or palettes")
    return domains


def generate_domain(domain_cfg: SyntheticDomainConfig | Sequence[SyntheticDomainConfig], n: int,
                    image_size: int, classes: Sequence[str], seed: int | Sequence[int],
                    out_dir: str | Path) -> Path:
    """Render ``n`` images into ``out_dir/images/NNNNNN.png`` and write ``out_dir/annotations.json``.

    ``domain_cfg`` may be a list of domains (a corpus): image ``i`` (1-based) is drawn from
    ``domain_cfg[(i - 1) % len(domain_cfg)]``.

    COCO instance json: image ids ``1..n``, ``file_name`` (``images/NNNNNN.png``) relative to
    ``out_dir`` (the folder holding the json, i.e. the ``image_root`` of a COCO reader),
    ``category_id = class_id + 1``, RLE masks of the visible parts, ``area`` and tight ``bbox``
    from the masks, and an ``info`` block with the domain config. Image ``i`` is rendered from
    ``numpy.random.default_rng([*seed, i])``, so it does not depend on ``n``. Returns the json path.
    """
    classes = list(classes)
    domains = [domain_cfg] if isinstance(domain_cfg, SyntheticDomainConfig) else list(domain_cfg)
    for dom in domains:
        validate_domain(dom, classes, image_size)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records, short = [], 0
    for i in range(1, int(n) + 1):
        dom = domains[(i - 1) % len(domains)]
        img, instances = render_image(dom, image_size, classes, _rng(seed, i))
        short += len(instances) < dom.min_objects
        name = f"{i:06d}.png"
        Image.fromarray(img).save(out_dir / "images" / name, format="PNG", compress_level=1)
        records.append(ImageRecord(f"images/{name}", int(image_size), int(image_size), i,
                                   [Instance.from_mask(m, c) for c, m in instances]))
    if short:  # placement gave up (crowded image); counted rather than silently ignored
        log.warning("%s: %d of %d images have fewer than their domain's min_objects instances",
                    out_dir, short, n)
    coco = to_coco(Dataset(records, classes, name=out_dir.name))
    coco["info"] = {"description": "sskd synthetic domain", "generator_version": GENERATOR_VERSION,
                    "seed": seed if isinstance(seed, int) else list(seed),
                    "image_size": int(image_size),
                    "domain": dataclasses.asdict(domains[0]) if len(domains) == 1
                    else [dataclasses.asdict(d) for d in domains],
                    "images_below_min_objects": int(short)}
    return write_json_atomic(coco, out_dir / "annotations.json")


def benchmark_dir(cfg: SyntheticConfig, root: str | Path) -> Path:
    """``root/<config_hash(cfg)>``: where :func:`generate_benchmark` puts this config."""
    return Path(root) / config_hash(cfg)


def _is_complete(path: Path) -> bool:
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("generator_version") == GENERATOR_VERSION


def generate_benchmark(cfg: SyntheticConfig, root: str | Path) -> dict[str, Path]:
    """Source domain + target train/val under ``root/<config_hash(cfg)>/{source,train,val}/``.

    Returns ``{"source": json, "train": json, "val": json}``. A complete copy (marker file
    ``COMPLETE.json`` of the current generator version) is reused as is. Otherwise the benchmark
    is built in a private temp dir, the marker is written last, and the dir is renamed into
    place, so a crash or a concurrent run never leaves a half-written benchmark that looks done.
    Seeds: source ``[seed, 0]``, train ``[seed, 1]``, val ``[seed, 2]``. ``source`` is the
    stand-ins' pretraining corpus (:func:`corpus_domains`: one domain, or many with the target's
    combination held out).
    """
    for key, dom in (("source", cfg.source), ("target", cfg.target)):
        validate_domain(dom, cfg.classes, cfg.image_size, where=f"data.synthetic.{key}")
    corpus = corpus_domains(cfg)
    final = benchmark_dir(cfg, root)
    paths = {k: final / k / "annotations.json" for k in ("source", "train", "val")}
    if _is_complete(final):
        return paths
    if final.exists():
        log.info("%s is incomplete or from another generator version: regenerating", final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        parts = (("source", corpus, cfg.n_source, 0), ("train", cfg.target, cfg.n_train, 1),
                 ("val", cfg.target, cfg.n_val, 2))
        for name, dom, n, salt in parts:
            generate_domain(dom, n, cfg.image_size, cfg.classes, [cfg.seed, salt], tmp / name)
        write_json_atomic({"generator_version": GENERATOR_VERSION, "config": dataclasses.asdict(cfg),
                           "counts": {"source": cfg.n_source, "train": cfg.n_train, "val": cfg.n_val}},
                          tmp / MARKER, indent=2, sort_keys=True)
        if final.exists() and not _is_complete(final):
            shutil.rmtree(final)
        try:
            tmp.rename(final)
        except OSError:
            if not _is_complete(final):  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths
