"""The training input pipeline: a ``torch.utils.data`` dataset whose item ``t`` is step ``t``'s batch.

Every random choice of a step's batch comes from generators seeded by ``(seed, step)``, as the
trainer always drew them: which images (``step_seed(seed, t, 0)``) and each image's two views
(``step_seed(seed, t, 1 + slot)``). An item is therefore a pure function of the step, and the
batches are the same whether they are built in the training process (``num_workers=0``) or in
worker processes, in any order, and after a resume from any step.

Memory: each process keeps its own :class:`~sskd.engine.data.SampleCache`, an LRU bounded by
``cache_mb / max(1, num_workers)`` MB, so the loader as a whole stays within ``cache_mb``.
"""

from __future__ import annotations

import torch
import torch.utils.data

from sskd.data.records import ImageRecord
from sskd.engine.data import InputGeometry, Sample, SampleCache, pad_batch
from sskd.engine.objective import Batch, step_seed


def _views(sample: Sample, generator: torch.Generator, geometry: InputGeometry, augment: bool):
    """Weak and strong views sharing one geometry (pixel p of one is pixel p of the other)."""
    from sskd.data.views import make_views
    if not augment:
        valid = torch.ones(sample.image.shape[-2:], dtype=torch.bool)
        return (sample.image, sample.image, sample.masks, sample.labels, sample.class_probs,
                valid, sample.ignore)
    if geometry.aspect or geometry.train_crop is not None:
        v = make_views(sample.image, sample.masks, generator, out_size=geometry.crop,
                       base_size=tuple(sample.image.shape[-2:]), ignore=sample.ignore,
                       scale_range=geometry.scale_range)
    else:  # the square pipeline, exactly as it always ran
        v = make_views(sample.image, sample.masks, generator, out_size=geometry.input_size,
                       ignore=sample.ignore, scale_range=geometry.scale_range)
    probs = sample.class_probs[v.keep] if sample.class_probs is not None else None
    return v.weak, v.strong, v.masks, sample.labels[v.keep], probs, v.valid, v.ignore


class StepBatches(torch.utils.data.Dataset):
    """Item ``step`` -> :class:`~sskd.engine.objective.Batch` of this rank for that step.

    ``labeled``: ground-truth records; ``unlabeled``: hard pseudo-label records. Each step draws
    ``n_lab`` labeled and ``n_unl`` pseudo-labeled images (with replacement); rank ``r`` of
    ``world_size`` takes slots ``r, r + world_size, ...`` of them.
    """

    def __init__(self, labeled: list[ImageRecord], unlabeled: list[ImageRecord], n_lab: int,
                 n_unl: int, seed: int, steps: int, geometry: InputGeometry, *,
                 augment: bool = True, rank: int = 0, world_size: int = 1,
                 cache_mb: float = 2048.0, cache: SampleCache | None = None) -> None:
        self.labeled, self.unlabeled = labeled, unlabeled
        self.n_lab, self.n_unl, self.seed, self.steps = n_lab, n_unl, seed, steps
        self.geometry, self.augment = geometry, augment
        self.rank, self.world_size = rank, world_size
        self.cache_mb = cache_mb
        self.cache = cache  # built lazily in the process that uses it (each worker has its own)

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> Batch:
        if self.cache is None:
            info = torch.utils.data.get_worker_info()
            share = self.cache_mb / (info.num_workers if info is not None else 1)
            self.cache = SampleCache(self.geometry, max_mb=share)
        pick = torch.Generator().manual_seed(step_seed(self.seed, step, 0))
        lab_idx = torch.randint(len(self.labeled), (self.n_lab,), generator=pick).tolist() \
            if self.n_lab else []
        unl_idx = torch.randint(len(self.unlabeled), (self.n_unl,), generator=pick).tolist() \
            if self.n_unl else []
        slots = [("l", i) for i in lab_idx] + [("u", i) for i in unl_idx]
        weak, strong, valid, targets, kinds = [], [], [], [], []
        for slot in range(self.rank, len(slots), self.world_size):
            kind, idx = slots[slot]
            rec = self.labeled[idx] if kind == "l" else self.unlabeled[idx]
            sample = self.cache.sample(rec, tag=0 if kind == "l" else 1)
            g = torch.Generator().manual_seed(step_seed(self.seed, step, 1 + slot))
            w, s, m, lab, probs, ok, ign = _views(sample, g, self.geometry, self.augment)
            weak.append(w), strong.append(s), valid.append(ok), kinds.append(kind)
            t = {"masks": m.float(), "labels": lab}
            if probs is not None:  # soft class targets (stages.<stage>.soft_classes)
                t["class_probs"] = probs
            if ign is not None and bool(ign.any()):
                t["ignore"] = ign
            targets.append(t)
        return _collate(weak, strong, valid, targets, kinds)


def _collate(weak, strong, valid, targets, kinds) -> Batch:
    """Stack the views; images of different sizes (``augment=False`` in aspect mode) are
    zero-padded bottom/right to the largest, with ``valid`` False and targets padded there."""
    if len({tuple(w.shape[-2:]) for w in weak}) > 1:
        size = pad_batch(weak).shape[-2:]
        pad = lambda x: torch.nn.functional.pad(x, (0, size[1] - x.shape[-1], 0, size[0] - x.shape[-2]))  # noqa: E731
        valid = [pad(v) for v in valid]
        targets = [{k: pad(v) if k not in ("labels", "class_probs") else v for k, v in t.items()}
                   for t in targets]
        weak, strong = [pad(w) for w in weak], [pad(s) for s in strong]
    return Batch(torch.stack(weak), torch.stack(strong), torch.stack(valid), targets, kinds)


def _identity(batch: Batch) -> Batch:
    return batch


def batch_loader(batches: StepBatches, start: int, num_workers: int = 0,
                 prefetch: int = 2) -> torch.utils.data.DataLoader:
    """Steps ``start .. len(batches) - 1`` in order, built by ``num_workers`` processes.

    The loader owns a fixed generator, so creating it never draws from the global torch RNG
    (the training loop seeds that per step for the loss's point sampling).
    """
    return torch.utils.data.DataLoader(
        batches, batch_size=None, sampler=range(start, len(batches)), num_workers=num_workers,
        collate_fn=_identity, generator=torch.Generator().manual_seed(0),
        prefetch_factor=prefetch if num_workers else None,
        persistent_workers=False)
