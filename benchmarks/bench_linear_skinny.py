"""CPU few-row Linear: F.linear vs the skinny product (W @ x^T)^T that pyencoder.nn.Linear takes
(on the weight as is), vs the K-split product over a contiguous K-blocked copy of the weight (the
cache pyencoder.nn.Linear kept for in_features > 1024 until issue 13; no longer used: the copy can
go stale when the weight changes through ``.data``). wav2vec2-base/large shapes, 1-5 rows, fp32.
Run it on a quiet machine: if the blocked copy's gain matters, the way back is a copy the owner
rebuilds explicitly (never one validated by version counters).

    python -m benchmarks.bench_linear_skinny [--threads N]

Prints GB/s of weight read (median of ``bench``); writes nothing.
"""
import argparse

import torch
import torch.nn.functional as F

from benchmarks._common import bench
from pyencoder.nn import linear as L

SHAPES = ((768, 768), (3072, 768), (768, 3072), (1024, 1024), (4096, 1024), (1024, 4096))


def _split(w, nb):
    return w.view(w.shape[0], nb, w.shape[1] // nb).permute(1, 0, 2)


def _blocked(wb, x2):
    nb, _, kb = wb.shape
    return torch.bmm(wb, x2.view(-1, nb, kb).permute(1, 2, 0)).sum(0).t()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"{'weight':>10} rows  F.linear    skinny  blocked-copy   (GB/s of weight read)")
    for out_f, in_f in SHAPES:
        w = torch.randn(out_f, in_f) / in_f ** 0.5
        nb = -(-in_f // 1024)
        copy = _split(w, nb).contiguous() if in_f % nb == 0 else None
        gb = w.numel() * 4 / 1e9
        for rows in (1, 2, 3, 4, 5):
            x = torch.randn(rows, in_f)
            x2 = x.expand(2, -1).contiguous() if rows == 1 else x
            fns = [lambda: F.linear(x, w), lambda: L.linear(x, w)]
            if nb > 1 and copy is not None:
                fns.append(lambda: _blocked(copy, x2).contiguous())
            with torch.inference_mode():
                rates = [gb / (bench(f)["median_ms"] / 1e3) for f in fns]
            cells = "".join(f"{r:10.1f}" for r in rates)
            print(f"{out_f:>5}x{in_f:<5} {rows:3d}{cells}")


if __name__ == "__main__":
    main()
