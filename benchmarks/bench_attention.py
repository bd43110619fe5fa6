"""Interval attention: pyencoder's Triton kernels against the named anchors, forward, backward
and forward+backward, RoPE counted on every side.

Providers (GPU): pyencoder-triton (RoPE inside the kernels, cos/sin source as
PYENCODER_ROPE_TABLE says: in-kernel by default); pyencoder-triton-ropetable (the same kernels with
cos/sin loaded from float32 tables built once per call, PYENCODER_ROPE_TABLE=1); reference
(pyencoder's plain-torch path); sdpa-mask (scaled_dot_product_attention with a dense boolean
N x N mask, plus a separate RoPE pass); flex (torch.nn.attention.flex_attention, compiled, block
mask built once outside the timing, plus a separate RoPE pass); flash-attn (window_size=(left,
right), band masks only, when flash_attn is installed, plus a separate RoPE pass).
CPU: only reference and sdpa-mask, at small N, float32 (a smoke run).

Shapes: wav2vec2-base (B=8, H=12, D=64) and large (B=8, H=16, D=64); N in {500, 1500, 3000,
12000}; masks band(None,0), band(None,3), band(250,3), band(50,3), chunked(4,128,3). bf16 on GPU.

Each record: provider, shape, B, H, D, N, mask, dtype, fwd/bwd/fwdbwd medians and 20/80 %
quantiles (ms), in-band TFLOP/s (FLOPs over visible (query, key) pairs only: 4*D per pair forward,
10*D backward), and for windows <= 1024 wide the % of the measured copy bandwidth reached by the
minimum HBM traffic (q, k, v read, out written; backward: q, k, v, out, dout read, dq, dk, dv
written). Written to <results root>/<device>/attention.jsonl.

    python -m benchmarks.bench_attention [--quick] [--providers P ...] [--n N ...]
"""
import argparse
import contextlib
import os
import sys

import torch

from benchmarks._common import bench, copy_bandwidth_gbs, device_slug, env_info, write_jsonl

SHAPES = {"wav2vec2-base": (8, 12, 64), "wav2vec2-large": (8, 16, 64)}
NS = (500, 1500, 3000, 12000)
MASKS = (("band", None, 0), ("band", None, 3), ("band", 250, 3), ("band", 50, 3),
         ("chunked", 4, 128, 3))
GPU_PROVIDERS = ("pyencoder-triton", "pyencoder-triton-ropetable", "reference", "sdpa-mask",
                 "flex", "flash-attn")
CPU_PROVIDERS = ("reference", "sdpa-mask")


def mask_name(m):
    return f"{m[0]}({', '.join('None' if x is None else str(x) for x in m[1:])})"


def mask_params(m):
    from pyencoder.ops.attention import band_params, chunked_params
    return band_params(m[1], m[2]) if m[0] == "band" else chunked_params(m[1], m[2], m[3])


def bounds(n, m):
    """lo, hi (inclusive) per query position 0..n-1, clipped to [0, n - 1]."""
    block, lo_off, hi_off = mask_params(m)
    p = torch.arange(n, dtype=torch.int64)
    base = (p // block) * block
    lo = torch.zeros_like(p) if lo_off < 0 else (base - lo_off).clamp(min=0)
    hi = (base + hi_off).clamp(max=n - 1)
    return lo, hi


def visible_pairs(n, m):
    lo, hi = bounds(n, m)
    return int((hi - lo + 1).clamp(min=0).sum())


def window(m):
    block, lo_off, hi_off = mask_params(m)
    return None if lo_off < 0 else lo_off + hi_off + block


def dense_mask(n, m, device):
    lo, hi = bounds(n, m)
    s = torch.arange(n)
    return ((s[None, :] >= lo[:, None]) & (s[None, :] <= hi[:, None])).to(device)


def make_provider(name, q, k, v, m, rope):
    """A callable running the forward (returns the output), or raises NotImplementedError."""
    import pyencoder
    n = q.shape[2]
    pos = torch.arange(n, device=q.device)
    if name in ("pyencoder-triton", "pyencoder-triton-ropetable", "reference"):
        backend = "reference" if name == "reference" else "triton"
        block, lo, hi = mask_params(m)
        return lambda: pyencoder.ops.interval_attention(q, k, v, block=block, lo_off=lo,
                                                         hi_off=hi, rope=rope, backend=backend)
    if name == "sdpa-mask":
        mask = dense_mask(n, m, q.device)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return lambda: sdpa(rope.rotate(q, pos), rope.rotate(k, pos), v, attn_mask=mask)
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        block, lo_off, hi_off = mask_params(m)

        def mask_mod(b, h, qi, kj):
            base = (qi // block) * block
            ok = kj <= base + hi_off
            if lo_off >= 0:
                ok = ok & (kj >= base - lo_off)
            return ok

        bm = create_block_mask(mask_mod, None, None, n, n, device=q.device)
        flex = torch.compile(flex_attention, dynamic=False)
        return lambda: flex(rope.rotate(q, pos), rope.rotate(k, pos), v, block_mask=bm)
    if name == "flash-attn":
        if m[0] != "band":
            raise NotImplementedError("flash-attn has no chunked mask")
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            raise NotImplementedError("flash_attn is not installed")
        ws = (-1 if m[1] is None else m[1], m[2])

        def run():
            qr = rope.rotate(q, pos).transpose(1, 2)
            kr = rope.rotate(k, pos).transpose(1, 2)
            return flash_attn_func(qr, kr, v.transpose(1, 2), window_size=ws).transpose(1, 2)
        return run
    raise ValueError(f"unknown provider {name!r}")


@contextlib.contextmanager
def _rope_table_env(name):
    """PYENCODER_ROPE_TABLE=1 while the table-mode provider runs (forward and backward)."""
    if name != "pyencoder-triton-ropetable":
        yield
        return
    old = os.environ.get("PYENCODER_ROPE_TABLE")
    os.environ["PYENCODER_ROPE_TABLE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYENCODER_ROPE_TABLE", None)
        else:
            os.environ["PYENCODER_ROPE_TABLE"] = old


def measure(name, *args):
    with _rope_table_env(name):
        rec = _measure(name, *args)
    if name.startswith("pyencoder-triton"):
        rec["rope_table"] = "1" if name.endswith("ropetable") else \
            os.environ.get("PYENCODER_ROPE_TABLE", "auto")
    return rec


def _measure(name, shape_name, B, H, D, n, m, dtype, device, warmup, rep, bw):
    import pyencoder
    rec = {"bench": "attention", "provider": name, "shape": shape_name, "B": B, "H": H, "D": D,
           "N": n, "mask": mask_name(m), "dtype": str(dtype).replace("torch.", ""), "rope": True}
    rope = pyencoder.Rope(D)
    torch.manual_seed(0)
    leaves = [torch.randn(B, H, n, D, device=device, dtype=dtype, requires_grad=True)
              for _ in range(3)]
    try:
        fwd = make_provider(name, *leaves, m, rope)
        with torch.no_grad():
            fwd()
        out = fwd()
        dout = torch.randn_like(out)

        def bwd():
            torch.autograd.grad(out, leaves, dout, retain_graph=True)

        def fwdbwd():
            torch.autograd.grad(fwd(), leaves, dout)

        bwd()
        with torch.no_grad():
            t_f = bench(fwd, warmup, rep)
        t_b = bench(bwd, warmup, rep)
        t_fb = bench(fwdbwd, warmup, rep)
        out = None  # free the graph (bwd closes over it)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fwdbwd()
            torch.cuda.synchronize()
            rec["fwdbwd_peak_mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    except NotImplementedError as e:
        rec["skipped"] = str(e)
        return rec
    except Exception as e:  # OOM or a provider failing on this shape: record it, keep going
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if device == "cuda":
            torch.cuda.empty_cache()
        return rec
    for key, t in (("fwd", t_f), ("bwd", t_b), ("fwdbwd", t_fb)):
        rec[f"{key}_ms"] = t["median_ms"]
        rec[f"{key}_p20_ms"] = t["p20_ms"]
        rec[f"{key}_p80_ms"] = t["p80_ms"]
    pairs = visible_pairs(n, m) * B * H
    rec["visible_pairs"] = pairs
    rec["fwd_tflops"] = 4 * D * pairs / (t_f["median_ms"] * 1e-3) / 1e12
    rec["bwd_tflops"] = 10 * D * pairs / (t_b["median_ms"] * 1e-3) / 1e12
    rec["fwdbwd_tflops"] = 14 * D * pairs / (t_fb["median_ms"] * 1e-3) / 1e12
    w = window(m)
    if w is not None and w <= 1024:
        esz = torch.empty((), dtype=dtype).element_size()
        tile = B * H * n * D * esz
        rec["copy_bw_gbs"] = bw
        rec["fwd_hbm_pct"] = 100 * (4 * tile / (t_f["median_ms"] * 1e-3) / 1e9) / bw
        rec["bwd_hbm_pct"] = 100 * (8 * tile / (t_b["median_ms"] * 1e-3) / 1e9) / bw
    return rec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a small subset (about a minute)")
    p.add_argument("--providers", nargs="*", default=None)
    p.add_argument("--n", nargs="*", type=int, default=None)
    p.add_argument("--shapes", nargs="*", default=None, choices=sorted(SHAPES))
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    if gpu:
        dtype, providers, ns, shapes, masks = torch.bfloat16, GPU_PROVIDERS, NS, SHAPES, MASKS
        warmup, rep = 25, 100
        if args.quick:
            ns, shapes = (500, 3000), {"wav2vec2-base": SHAPES["wav2vec2-base"]}
            masks = (MASKS[0], MASKS[3], MASKS[4])
    else:
        dtype, providers, ns = torch.float32, CPU_PROVIDERS, (500,) if args.quick else (500, 1500)
        shapes = {"wav2vec2-base-b1": (1, 12, 64)}
        masks = (MASKS[3], MASKS[4]) if args.quick else MASKS
        warmup, rep = 10, 200
    if args.providers:
        providers = tuple(x for x in args.providers)
    if args.n:
        ns = tuple(args.n)
    if args.shapes:
        shapes = {k: SHAPES[k] for k in args.shapes}
    bw = copy_bandwidth_gbs()
    print(f"device {device_slug()}  copy bandwidth {bw:.0f} GB/s  "
          f"torch {env_info()['torch']}  triton {env_info()['triton']}", flush=True)
    records = []
    for shape_name, (B, H, D) in shapes.items():
        for n in ns:
            for m in masks:
                for prov in providers:
                    rec = measure(prov, shape_name, B, H, D, n, m, dtype, device, warmup, rep, bw)
                    records.append(rec)
                    status = rec.get("error") or rec.get("skipped")
                    if status:
                        line = status
                    else:
                        line = (f"fwd {rec['fwd_ms']:8.3f} ms  bwd {rec['bwd_ms']:8.3f} ms  "
                                f"fwd+bwd {rec['fwdbwd_ms']:8.3f} ms  "
                                f"{rec['fwd_tflops']:6.1f} TFLOP/s fwd")
                        if "fwd_hbm_pct" in rec:
                            line += f"  {rec['fwd_hbm_pct']:5.1f} % HBM fwd"
                    print(f"{shape_name:16s} N={n:6d} {mask_name(m):18s} {prov:26s} {line}",
                          flush=True)
    if not args.no_write:
        print(f"wrote {write_jsonl('attention', records)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
