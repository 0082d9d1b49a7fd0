"""Time and peak memory of L_pxl (fused sampler) against a naive all-pairs implementation.

    .venv/bin/python benchmarks/pixel_contrastive.py [--sides 32 64] [--anchors 64 256 1024 4096]
        [--batch 8] [--negatives 200] [--dim 128] [--queries 100] [--classes 8]
        [--mem-cap-gb 3] [--threads 1] [--methods gumbel rejection]

One row per (map side, anchors per image): forward + backward of the loss on random
``B x D x side x side`` embeddings and random pseudo-probabilities (``Q`` queries, ``C`` classes).

* ``gumbel`` / ``rejection``: :func:`sskd.losses.pixel_contrastive.pixel_contrastive_loss`
  with the two exact samplers (anchors chunked; never an ``N x P`` matrix).
* ``naive``: the same loss computed the direct way: the full ``N x P`` y-similarity and
  sampling weights, Gumbel keys over all of them, and the full ``N x P`` embedding similarity
  from which the sampled negatives are gathered. Skipped when its estimated peak
  (``5 x 4 B x N x P``) exceeds ``--mem-cap-gb``.

Peak memory = the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs`` after ``malloc_trim``) minus the resident set before the run, so it
counts every allocation of the call (torch's CPU allocator included), not the inputs. Time is
the process's CPU time (less disturbed by other jobs on a shared machine than wall time; equal
to it on an idle machine with ``--threads 1``), best of 3 runs for runs under 1 s.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import time

import torch
import torch.nn.functional as F

from sskd.losses.pixel_contrastive import fused_pseudo_probabilities, pixel_contrastive_loss


def _status(key: str) -> float:
    """A ``/proc/self/status`` field in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


_LIBC = ctypes.CDLL("libc.so.6")


def measure(fn) -> tuple[float, float]:
    """(best seconds of up to 3 runs, peak extra MiB of the first run) of ``fn()``."""
    gc.collect()
    _LIBC.malloc_trim(0)                   # hand cached free heap back, so reuse shows as growth
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                       # reset the peak-RSS high-water mark
    base = _status("VmRSS")
    t = time.process_time()
    fn()
    best = time.process_time() - t
    mem = _status("VmHWM") - base
    for _ in range(2 if best < 1.0 else 0):  # short runs: repeat, keep the fastest
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best, mem


def naive_loss(zw, zs, y, num_anchors, R, T, g):
    """All-pairs reference: N x P similarities and weights materialised at once."""
    B, D, h, w = zw.shape
    P = B * h * w
    zwf = F.normalize(zw, dim=1).permute(0, 2, 3, 1).reshape(P, D)
    zsf = F.normalize(zs.detach(), dim=1).permute(0, 2, 3, 1).reshape(P, D)
    yf = y.permute(0, 2, 3, 1).reshape(P, -1)
    img = torch.arange(B).repeat_interleave(h * w)
    anchors = (torch.rand(B, h * w, generator=g).topk(num_anchors, 1).indices
               + torch.arange(B)[:, None] * h * w).flatten()
    with torch.no_grad():
        wts = (1 - yf[anchors] @ yf.T).clamp_(min=1e-20)                  # N x P
        wts[img[anchors][:, None] == img[None]] = 0.0                     # other images only
        keys = wts.log_() - torch.empty_like(wts).exponential_(generator=g).log_()
        neg = keys.topk(R, dim=1).indices
        del wts, keys
    sim = zwf[anchors] @ zsf.T / T                                        # N x P, with grad
    logits = torch.cat([sim.gather(1, anchors[:, None]), sim.gather(1, neg)], 1)
    return (torch.logsumexp(logits, 1) - logits[:, 0]).mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sides", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--anchors", type=int, nargs="+", default=[64, 256, 1024, 4096])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--negatives", type=int, default=200)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--mem-cap-gb", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=["gumbel", "rejection"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    B, D, R = args.batch, args.dim, args.negatives
    print(f"B={B} D={D} R={R} Q={args.queries} C={args.classes} threads={args.threads} "
          f"(time: forward+backward CPU s; mem: peak extra MiB)")
    cols = ["side", "anchors/img", "N", "P"] + [f"{m} s" for m in args.methods] + \
           [f"{m} MiB" for m in args.methods] + ["naive s", "naive MiB"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for side in args.sides:
        g = torch.Generator().manual_seed(0)
        zw = torch.randn(B, D, side, side, generator=g, requires_grad=True)
        zs = torch.randn(B, D, side, side, generator=g)
        pm = torch.randn(B, args.queries, side, side, generator=g).mul(4).softmax(1)
        pc = torch.randn(B, args.queries, args.classes + 1, generator=g).mul(4).softmax(-1)
        y = fused_pseudo_probabilities(pm, pc)
        del pm
        P = B * side * side
        for a in args.anchors:
            if a > side * side:
                continue
            N = B * a
            times, mems = [], []
            for m in args.methods:
                def run(m=m):
                    loss, _ = pixel_contrastive_loss(
                        zw, zs, y, num_anchors=a, num_negatives=R, temperature=0.07,
                        sampler="fused", generator=torch.Generator().manual_seed(1), method=m)
                    loss.backward()
                    zw.grad = None
                dt, mem = measure(run)
                times.append(f"{dt:.3f}")
                mems.append(f"{mem:.0f}")
            est_gb = 5 * 4 * N * P / 1e9
            if est_gb > args.mem_cap_gb:
                naive = [f"skip (~{est_gb:.1f} GB)", "-"]
            else:
                def run_naive():
                    naive_loss(zw, zs, y, a, R, 0.07, torch.Generator().manual_seed(1)).backward()
                    zw.grad = None
                dt, mem = measure(run_naive)
                naive = [f"{dt:.3f}", f"{mem:.0f}"]
            row = [str(side), str(a), str(N), str(P)] + times + mems + naive
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
