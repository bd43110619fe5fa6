"""CPU few-row Linear: F.linear vs the skinny product (W @ x^T)^T that pyencoder.nn.Linear takes
(on the weight as is), vs the K-split product over a contiguous K-blocked copy of the weight (the
cache pyencoder.nn.Linear kept for in_features > 1024 until issue 13; no longer used: the copy can
go stale when the weight changes through ``.data``). wav2vec2-base/large shapes, 1-5 rows, fp32.
Run it on a quiet machine: if the blocked copy's gain matters, the way back is a copy the owner
rebuilds explicitly (never one validated by version counters).

Two weight sets per shape, both printed:
  * warm: one matrix, multiplied again and again, so after the first call it is read from the
    CPU caches (a 768x768 fp32 matrix is 2.4 MB, within a 32 MB L3) -- not what a model sees;
  * cold: the matrices of that shape in a whole model (wav2vec2-base, 12 layers: 48 768x768
    attention projections, 12 of each FFN matrix; wav2vec2-large, 24 layers: 96 1024x1024, 24 of
    each FFN matrix), more if needed so the set is at least 4x the last-level cache, cycled one
    per call: each call reads a matrix that the calls since its previous use have evicted, as
    in a streaming step of a model whose weights (~340 MB fp32 for base) do not fit in cache.

    python -m benchmarks.bench_linear_skinny [--threads N] [--sets warm,cold] [--llc-mb MB]

Prints GB/s of weight read (median of ``bench``); writes nothing.
"""
import argparse
import math
import os

import torch
import torch.nn.functional as F

from benchmarks._common import bench
from pyencoder.nn import linear as L

# (out_features, in_features, matrices of that shape in the model they come from)
SHAPES = ((768, 768, 48), (3072, 768, 12), (768, 3072, 12),
          (1024, 1024, 96), (4096, 1024, 24), (1024, 4096, 24))
COLD_FACTOR = 4


def llc_bytes(default=64 << 20):
    """Size of the largest CPU cache of cpu0 (Linux sysfs), else ``default``."""
    root = "/sys/devices/system/cpu/cpu0/cache"
    best = 0
    try:
        for d in os.listdir(root):
            try:
                with open(os.path.join(root, d, "size")) as f:
                    s = f.read().strip()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:].upper(), 1)
            best = max(best, int(s.rstrip("KkMmGg")) * mult)
    except (OSError, ValueError):
        return default
    return best or default


def cold_count(out_f, in_f, model_count, llc, factor=COLD_FACTOR):
    """Matrices in the cold set: the model's own count, raised until they span factor x llc."""
    return max(model_count, math.ceil(factor * llc / (out_f * in_f * 4)), 2)


def weight_set(out_f, in_f, count, generator=None):
    """``count`` distinct (out_f, in_f) fp32 matrices (separate storage), scaled like a layer."""
    return [torch.randn(out_f, in_f, generator=generator) / in_f ** 0.5 for _ in range(count)]


def _split(w, nb):
    return w.view(w.shape[0], nb, w.shape[1] // nb).permute(1, 0, 2)


def _blocked(wb, x2):
    nb, _, kb = wb.shape
    return torch.bmm(wb, x2.view(-1, nb, kb).permute(1, 2, 0)).sum(0).t()


def cycled(fn, weights):
    """A no-argument callable that calls fn(w) on the next matrix of ``weights`` each time
    (round robin); ``.last`` is the index it used last."""
    state = {"i": -1}

    def call():
        state["i"] = (state["i"] + 1) % len(weights)
        call.last = state["i"]
        return fn(weights[state["i"]])
    call.last = None
    return call


def candidates(weights, x):
    """{name: callable} of the products for input rows x over the cycled ``weights``."""
    in_f = weights[0].shape[1]
    nb = -(-in_f // 1024)
    x2 = x.expand(2, -1).contiguous() if x.shape[0] == 1 else x
    fns = {"F.linear": cycled(lambda w: F.linear(x, w), weights),
           "skinny": cycled(lambda w: L.linear(x, w), weights)}
    if nb > 1 and in_f % nb == 0:
        copies = [_split(w, nb).contiguous() for w in weights]
        rows = x.shape[0]
        fns["blocked-copy"] = cycled(lambda wb: _blocked(wb, x2)[:rows].contiguous(), copies)
    return fns


def main(argv=None):
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--sets", default="warm,cold",
                    help="comma list of warm (one matrix, cache-resident) and cold (the model's "
                         "matrices cycled, > last-level cache)")
    ap.add_argument("--llc-mb", type=float, default=None,
                    help="last-level cache size in MB (default: read from sysfs)")
    ap.add_argument("--shapes", default=None,
                    help="comma list of OUTxIN[xCOUNT] (default: the wav2vec2-base/large set)")
    ap.add_argument("--rows", default="1,2,3,4,5")
    a = ap.parse_args(argv)
    sets = [s for s in a.sets.split(",") if s]
    for s in sets:
        if s not in ("warm", "cold"):
            raise SystemExit(f"--sets: expected a comma list of warm, cold; got {a.sets!r}")
    if a.threads:
        torch.set_num_threads(a.threads)
    llc = int(a.llc_mb * 2 ** 20) if a.llc_mb else llc_bytes()
    shapes = SHAPES if a.shapes is None else tuple(
        tuple(int(v) for v in s.split("x")) + ((1,) if s.count("x") == 1 else ())
        for s in a.shapes.split(","))
    rows_list = [int(r) for r in a.rows.split(",")]
    print(f"last-level cache {llc / 2 ** 20:.0f} MB, torch threads {torch.get_num_threads()}")
    print(f"{'weight':>10} set   matrices  MB  rows  F.linear    skinny  blocked-copy   "
          f"(GB/s of weight read)")
    gen = torch.Generator().manual_seed(0)
    for out_f, in_f, model_count in shapes:
        gb = out_f * in_f * 4 / 1e9
        for s in sets:
            count = 1 if s == "warm" else cold_count(out_f, in_f, model_count, llc)
            weights = weight_set(out_f, in_f, count, gen)
            for rows in rows_list:
                x = torch.randn(rows, in_f, generator=gen)
                with torch.inference_mode():
                    rates = [gb / (bench(f)["median_ms"] / 1e3)
                             for f in candidates(weights, x).values()]
                cells = "".join(f"{r:10.1f}" for r in rates)
                print(f"{out_f:>5}x{in_f:<5} {s:<5} {count:6d} {count * gb * 1e3:5.0f} "
                      f"{rows:4d}{cells}")
            del weights


if __name__ == "__main__":
    main()
