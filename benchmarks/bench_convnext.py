"""ConvNeXt block front half: the fused depthwise causal conv + LayerNorm kernel against the
composed ops it replaces.

    python -m benchmarks.bench_convnext [--quick] [--dtypes ...] [--tiles ...] [--no-write]

Providers (GPU)
- fused: pyencoder.ops.convnext_dwconv_ln(backend="triton"), x (B, C, L) as the decoder passes
  it (a channel-last (B, L, C) tensor transposed), y (B, L, C).
- fused-tile<E>w<W>: the same kernel with other tile sizes (E fp32 elements per program, W warps)
  when ``--tiles`` asks for them: the data that picks the launcher's defaults.
- composed: ConvNeXtBlock's unfused path, pyencoder.ops.causal_conv1d (auto backend) + transpose
  + F.layer_norm (its input is the conv's channel-last output).
- composed-fwd+bwd / fused-fwd+bwd: forward and backward of the sum of the output.
Shapes: B = 8, C in {512, 768, 1024}, L in {2048, 16384}, k = 7, bf16 and fp32; then (GPU, first
dtype) streaming steps, mode "step": B in {1, 256} streams of L = 4 new frames, C = 768, the conv
state in and out (``STEP_SHAPES``), where launches rather than bytes set the time.

Records: median/p20/p80 ms, GB/s of compulsory traffic (x read + y written + the parameters;
fwd only) against the measured device copy bandwidth (``copy_bw_gbs``, ``frac_of_copy``), and
``speedup_vs_composed``. JSON lines to <results root>/<device>/convnext.jsonl, each row appended
as soon as it is measured.

CPU: a smoke run of the composed path and the fused op's reference backend at tiny shapes (the
Triton kernel is not timed on CPU: the interpreter is a correctness tool). The reference backend
of the fused op is its test oracle (float64-accurate plain torch, not a fast path), so it gets no
``speedup_vs_composed``: its time only shows that the op runs.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import (JsonlRows, bench, copy_bandwidth_gbs, device_slug, env_info,  # noqa: E402
                               write_jsonl)


def _inputs(B, C, L, K, dtype, dev):
    x = torch.randn(B, L, C, device=dev, dtype=dtype).transpose(1, 2)
    w = torch.randn(C, 1, K, device=dev, dtype=dtype) / K ** 0.5
    cb = torch.randn(C, device=dev, dtype=dtype)
    g = 1 + 0.1 * torch.randn(C, device=dev, dtype=dtype)
    b = torch.randn(C, device=dev, dtype=dtype)
    return x, w, cb, g, b


def _composed(x, w, cb, g, b):
    from pyencoder.ops import causal_conv1d
    h = causal_conv1d(x, w, cb, groups=x.shape[1])
    return F.layer_norm(h.transpose(1, 2), (x.shape[1],), g, b, 1e-6)


def _composed_step(x, w, cb, g, b, s):
    from pyencoder.ops import causal_conv1d
    h, fin = causal_conv1d(x, w, cb, groups=x.shape[1], initial_state=s, return_final_state=True)
    return F.layer_norm(h.transpose(1, 2), (x.shape[1],), g, b, 1e-6), fin


def _fused_step(x, w, cb, g, b, s):
    from pyencoder.ops import convnext_dwconv_ln
    return convnext_dwconv_ln(x, w, cb, g, b, eps=1e-6, initial_state=s, return_final_state=True,
                              backend="triton")


# streaming steps of a decoder block (a few frames with the conv state in and out): launch-bound
# sizes, where one fused launch instead of the composed ops' two to three could win
STEP_SHAPES = ((1, 768, 4), (256, 768, 4))


def _fused(backend):
    from pyencoder.ops import convnext_dwconv_ln

    def fn(x, w, cb, g, b):
        return convnext_dwconv_ln(x, w, cb, g, b, eps=1e-6, backend=backend)
    return fn


def _tiled(elems, warps):
    import pyencoder.ops._convnext_triton as CX
    base = _fused("triton")

    def fn(*a):
        old = CX._TILE_ELEMS, CX._NUM_WARPS
        CX._TILE_ELEMS, CX._NUM_WARPS = elems, warps
        try:
            return base(*a)
        finally:
            CX._TILE_ELEMS, CX._NUM_WARPS = old
    return fn


def _with_bwd(f, args):
    leaves = [a.detach().requires_grad_() for a in args]

    def run():
        f(*leaves).float().sum().backward()
    return run


def run(args):
    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    copy_bw = copy_bandwidth_gbs()
    if gpu:
        Cs, Ls = (512, 768, 1024), (2048, 16384)
        dtypes = [getattr(torch, d) for d in args.dtypes]
        if args.quick:
            Cs, Ls = (768,), (2048,)
        B = 8
        providers = {"composed": _composed, "fused": _fused("triton")}
        for spec in args.tiles or ():
            e, w = (int(v) for v in spec.split("x"))
            providers[f"fused-tile{e}w{w}"] = _tiled(e, w)
        warmup, rep = (10, 30) if args.quick else (25, 100)
    else:
        Cs, Ls, dtypes, B = (64,), (256,), [torch.float32], 2
        providers = {"composed": _composed, "fused-reference": _fused("reference")}
        warmup, rep = 10, 30
    K = 7
    modes = ("fwd",) if args.quick or not gpu else ("fwd", "fwd+bwd")
    records = JsonlRows("convnext", write=not getattr(args, "no_write", True))  # on disk per row
    for dtype in dtypes:
        for C in Cs:
            for L in Ls:
                a = _inputs(B, C, L, K, dtype, dev)
                es = a[0].element_size()
                nbytes = (2 * B * C * L + C * (K + 3)) * es
                for mode in modes:
                    base_ms = None
                    for name, f in providers.items():
                        rec = dict(bench="convnext", provider=name, mode=mode, B=B, C=C, L=L, k=K,
                                   dtype=str(dtype).replace("torch.", ""))
                        fn = (lambda f=f: f(*a)) if mode == "fwd" else _with_bwd(f, a)
                        try:
                            t = bench(fn, warmup=warmup, rep=rep)
                        except Exception as e:  # one failing provider must not stop the sweep
                            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                            records.append(rec)
                            print(f"{name:22s} {mode:8s} C={C} L={L} {rec['dtype']}: "
                                  f"{rec['error']}")
                            continue
                        rec.update(t)
                        if mode == "fwd":
                            gbs = nbytes / (t["median_ms"] * 1e-3) / 1e9
                            rec.update(gb_per_s=gbs, bytes=nbytes, copy_bw_gbs=copy_bw,
                                       frac_of_copy=gbs / copy_bw if copy_bw else None)
                        if name == "composed":
                            base_ms = t["median_ms"]
                        elif base_ms is not None and not name.endswith("-reference"):
                            rec["speedup_vs_composed"] = base_ms / t["median_ms"]
                        records.append(rec)
                        extra = (f" {rec['gb_per_s']:.0f} GB/s "
                                 f"({100 * rec['frac_of_copy']:.0f}% copy)"
                                 if "gb_per_s" in rec else "")
                        sp = (f"  x{rec['speedup_vs_composed']:.2f}"
                              if "speedup_vs_composed" in rec else "")
                        print(f"{name:22s} {mode:8s} C={C:5d} L={L:6d} {rec['dtype']:9s} "
                              f"{t['median_ms']:.4f} ms{extra}{sp}", flush=True)
    if gpu:
        _steps(dtypes[:1], warmup, rep, records)
    return records


def _steps(dtypes, warmup, rep, records, shapes=STEP_SHAPES, dev="cuda"):
    """Streaming-step rows (mode "step": B streams, L new frames each, the conv state read and
    the final state written): composed vs fused forward."""
    K = 7
    for dtype in dtypes:
        for B, C, L in shapes:
            a = _inputs(B, C, L, K, dtype, dev)
            s = torch.randn(B, C, K - 1, device=dev, dtype=dtype)
            base_ms = None
            for name, f in (("composed", _composed_step), ("fused", _fused_step)):
                rec = dict(bench="convnext", provider=name, mode="step", B=B, C=C, L=L, k=K,
                           dtype=str(dtype).replace("torch.", ""))
                try:
                    t = bench(lambda f=f: f(*a, s), warmup=warmup, rep=rep)
                except Exception as e:  # one failing provider must not stop the sweep
                    rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    records.append(rec)
                    print(f"{name:22s} step     B={B} C={C} L={L}: {rec['error']}")
                    continue
                rec.update(t)
                if name == "composed":
                    base_ms = t["median_ms"]
                elif base_ms:
                    rec["speedup_vs_composed"] = base_ms / t["median_ms"]
                records.append(rec)
                sp = f"  x{rec['speedup_vs_composed']:.2f}" if "speedup_vs_composed" in rec else ""
                print(f"{name:22s} step     B={B:4d} C={C:5d} L={L:6d} {rec['dtype']:9s} "
                      f"{t['median_ms']:.4f} ms{sp}", flush=True)
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--quick", action="store_true", help="one shape, forward only")
    p.add_argument("--dtypes", nargs="*", default=["bfloat16", "float32"],
                   choices=("float16", "bfloat16", "float32"))
    p.add_argument("--tiles", nargs="*", default=None,
                   help="extra fused tile configs ELEMSxWARPS, e.g. 2048x4 8192x8 8192x16")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    print(f"device: {device_slug()}  env: {env_info().get('device_name')}")
    records = run(args)
    if not args.no_write:
        print(f"wrote {records.path or write_jsonl('convnext', [])}")


if __name__ == "__main__":
    main()
