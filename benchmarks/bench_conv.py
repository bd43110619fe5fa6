"""Causal conv1d benchmark: pyencoder backends against cuDNN, causal-conv1d and the reference.

    python -m benchmarks.bench_conv [--quick] [--providers NAME ...] [--suites NAME ...] [--no-write]
                                    [--max-seconds S] [--layouts cf cl] [--grp-tiles]

Suites
- depthwise: B=8, C in {512, 768, 1024, 2048}, L in {256, 2048, 16384}, widths {2, 4, 7, 31, 128},
  forward, fp16 (bf16 with --dtype). Providers: pyencoder-cuda, pyencoder-cuda-row (the same
  with PYENCODER_CONV_ROW=1 set around each call: the CUDA forward's register-only row kernel, an
  A/B; its host time includes the variable's set and restore, a few us), pyencoder-triton, cudnn
  (F.conv1d with left padding, groups=C; labelled torch-conv1d on a CPU, where it is not cuDNN), causal-conv1d (widths 2..4, when installed),
  reference.
- grouped: wav2vec2 positional conv, B=8, L in {512, 2048}, (C, groups, k) = (768, 16, 128) and
  (1024, 16, 128); forward and forward+backward. Providers: pyencoder-triton, cudnn, reference;
  rows carry ``layout``: x channel-first ("cf", the default) or, with ``--layouts cl``, channel-last
  (a (B, L, C) tensor transposed: what a model's (B, T, C) hidden states give the positional
  conv). ``--grp-tiles``: the forward also in the variants of GRP_VARIANTS (implicit-GEMM tiles,
  providers pyencoder-triton-grp*, and the tap-major reduction, pyencoder-triton-tap*: their
  environment set around each call).
- strided: feature-extractor convs, C=512 out, (k, stride) in {(10, 5), (3, 2), (2, 2)}, forward;
  k=10 takes the waveform (C_in=1, wav2vec2's first conv), the others C_in=C (rows carry C_in).
- update: one new frame for B in {1, 64, 512} streams, C=1024, widths {4, 31}.
Suites run in the order depthwise, strided, update, grouped (the most valuable rows first: a run
cut short, or stopped by --max-seconds, keeps them). --quick on a GPU: depthwise C=768, widths
{4, 31}, L=16384 for pyencoder-cuda / -cuda-row / pyencoder-triton / cudnn first, then L=2048 for every
provider; grouped L=2048 only.

Records: median/p20/p80 ms and GB/s of compulsory traffic (x read + y written + weights) against
the measured device-to-device copy bandwidth (``copy_bw_gbs``, ``frac_of_copy``). Depthwise rows
also carry ``fwd_host_us`` (host cost of one call: 20 calls back to back, one synchronize at the
end) and ``fwd_graph_ms`` (the call replayed from a CUDA graph: GPU time without host overhead;
``fwd_graph_error`` when the capture fails), both None on CPU (benchmarks._common.host_us,
graph_ms). JSON lines go to <results root>/<device>/conv.jsonl, each row appended when measured. On CPU only the reference and F.conv1d run, on small
shapes.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import (JsonlRows, bench, copy_bandwidth_gbs, device_slug, env_info,  # noqa: E402
                               host_graph_fields, host_graph_text, temp_env, write_jsonl)

PROVIDERS = ("pyencoder-cuda", "pyencoder-cuda-row", "pyencoder-triton", "cudnn", "causal-conv1d",
             "reference")
# pyencoder-cuda with PYENCODER_CONV_ROW=1: the CUDA forward's register-only row kernel (an A/B of
# that untimed flag; depthwise forward only)
ROW_PROVIDER = "pyencoder-cuda-row"
# F.conv1d with left padding is cuDNN on a GPU; on a CPU it is torch's own conv (oneDNN/ATen), so
# the same provider is labelled torch-conv1d there.
CPU_ALIASES = {"cudnn": "torch-conv1d"}
SUITES = ("depthwise", "grouped", "strided", "update")
# --quick on a GPU: the depthwise bandwidth target is stated for C >= 768, L >= 2048; L=2048
# (B=8, C=768: a 50 MB working set) is dominated by launch and tail effects, so L=16384 is measured
# too, first, for the three providers the target compares.
QUICK_DEPTHWISE_LS = (16384, 2048)
QUICK_LONG_PROVIDERS = ("pyencoder-cuda", ROW_PROVIDER, "pyencoder-triton", "cudnn")
# --grp-tiles: the grouped suite's forward also runs pyencoder-triton in these variants, each an
# environment set around its calls: implicit-GEMM tiles (PYENCODER_CONV_GRP_TILE = BLOCK_T,
# BLOCK_R,WARPS,STAGES; the default is 64,64,4,3) and the tap-major reduction
# (PYENCODER_CONV_TAP_MAJOR=1). sm_90 ptxas / SASS, fp16, 16 groups, k=128, none spills: the
# default order gathers the x tile with 2-byte loads (32 LDG.U16 in the loop body, both
# layouts); tap-major on channel-last x loads both operands as 16-byte cp.async only (C=1024:
# 72 registers, 560 instructions against 98 / 776; C=768 reduces in blocks of 16 channels).
# Default-order tiles (C=768): 128,64,8,3 99 registers / 40 KiB shared; 256,64,8,3 176 / 56;
# 128,32,4,4 168 / 24.
GRP_VARIANTS = (
    ("pyencoder-triton-grp128x64w8s3", {"PYENCODER_CONV_GRP_TILE": "128,64,8,3"}),
    ("pyencoder-triton-grp256x64w8s3", {"PYENCODER_CONV_GRP_TILE": "256,64,8,3"}),
    ("pyencoder-triton-grp128x32w4s4", {"PYENCODER_CONV_GRP_TILE": "128,32,4,4"}),
    ("pyencoder-triton-tap", {"PYENCODER_CONV_TAP_MAJOR": "1"}),
    ("pyencoder-triton-tap128x64w8s3", {"PYENCODER_CONV_TAP_MAJOR": "1",
                                        "PYENCODER_CONV_GRP_TILE": "128,64,8,3"}),
)


def _cudnn_fwd(x, w, b, stride, groups):
    return F.conv1d(F.pad(x, (w.shape[-1] - stride, 0)), w, b, stride=stride, groups=groups)


def _causal_conv1d_fn():
    try:
        from causal_conv1d import causal_conv1d_fn
        return causal_conv1d_fn
    except Exception:
        return None


def _provider_fn(name, x, w, b, stride, groups, bwd=False):
    """A zero-argument callable, or a string saying why the provider cannot run."""
    from pyencoder.ops import causal_conv1d
    env = dict(GRP_VARIANTS).get(name)
    if env is not None:
        if groups == x.shape[1] or bwd:
            return "the variants are the grouped / dense forward's (bench_conv.GRP_VARIANTS)"
        base = _provider_fn("pyencoder-triton", x, w, b, stride, groups)
        if isinstance(base, str):
            return base

        def variant():
            with temp_env(**env):   # read by the launcher at each call
                return base()
        return variant
    if name == ROW_PROVIDER:
        if groups != x.shape[1] or stride != 1 or bwd:
            return "the row kernel is the depthwise forward (PYENCODER_CONV_ROW=1)"
        base = _provider_fn("pyencoder-cuda", x, w, b, stride, groups)
        if isinstance(base, str):
            return base

        def row():
            with temp_env(PYENCODER_CONV_ROW="1"):   # read by the extension at each launch
                return base()
        return row
    if name in ("pyencoder-cuda", "pyencoder-triton", "reference"):
        backend = {"pyencoder-cuda": "cuda", "pyencoder-triton": "triton"}.get(name, "reference")
        from pyencoder import _backend
        args = dict(x=x, weight=w, bias=b, initial_state=None, stride=stride, groups=groups,
                    activation=None)
        r = _backend._reason_for("conv", backend, "backward" if bwd else "forward",
                                 x.device.type, args)
        if r is not None:
            return r
        fwd = lambda: causal_conv1d(x, w, b, stride=stride, groups=groups, backend=backend)  # noqa: E731
    elif name in ("cudnn", "torch-conv1d"):
        fwd = lambda: _cudnn_fwd(x, w, b, stride, groups)  # noqa: E731
    elif name == "causal-conv1d":
        fn = _causal_conv1d_fn()
        if fn is None:
            return "causal-conv1d is not installed"
        if x.device.type != "cuda" or groups != x.shape[1] or stride != 1 or not 2 <= w.shape[-1] <= 4:
            return "causal-conv1d runs depthwise widths 2..4 on CUDA"
        w2 = w[:, 0, :].contiguous()
        fwd = lambda: fn(x, w2, b)  # noqa: E731
    else:
        return f"unknown provider {name}"
    if not bwd:
        return fwd
    xs = x.detach().requires_grad_()
    ws = w.detach().requires_grad_()
    if name in ("cudnn", "torch-conv1d"):
        return lambda: _cudnn_fwd(xs, ws, b, stride, groups).sum().backward()
    if name in ("pyencoder-cuda", "pyencoder-triton", "reference"):
        backend = {"pyencoder-cuda": "cuda", "pyencoder-triton": "triton"}.get(name, "reference")
        return lambda: causal_conv1d(xs, ws, b, stride=stride, groups=groups,
                                     backend=backend).sum().backward()
    return "no backward for this provider"


def _bytes(x, w, y_numel, bwd=False):
    """Bytes a forward moves: x and w read, y written; with ``bwd`` the backward's too (dy, x
    and w read, dx and dw written)."""
    es = x.element_size()
    n = x.numel() + y_numel + w.numel()
    if bwd:
        n += 2 * x.numel() + y_numel + 2 * w.numel()
    return n * es


def _record(suite, provider, shape, dtype, fn, nbytes, copy_bw, warmup, rep, extra=None,
            host_graph=False):
    rec = dict(bench="conv", suite=suite, provider=provider, dtype=str(dtype).replace("torch.", ""),
               **shape, **(extra or {}))
    if isinstance(fn, str):
        rec["skipped"] = fn
        return rec
    try:
        t = bench(fn, warmup=warmup, rep=rep)
        hg = host_graph_fields(fn, "fwd", warmup, rep) if host_graph else {}
    except Exception as e:  # one failing provider must not stop the sweep
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return rec
    rec.update(t)
    rec.update(hg)
    gbs = nbytes / (t["median_ms"] * 1e-3) / 1e9
    rec.update(gb_per_s=gbs, bytes=nbytes, copy_bw_gbs=copy_bw,
               frac_of_copy=(gbs / copy_bw) if copy_bw else None)
    return rec


def run(args):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = dev == "cuda"
    dtype = getattr(torch, args.dtype) if gpu else torch.float32
    providers = args.providers or (PROVIDERS if gpu else ("cudnn", "reference"))
    if not gpu:
        providers = [CPU_ALIASES.get(p, p) for p in providers]
    suites = args.suites or SUITES
    copy_bw = copy_bandwidth_gbs()
    warmup, rep = (10, 30) if (args.quick or not gpu) else (25, 100)
    records = JsonlRows("conv", write=not getattr(args, "no_write", True))  # on disk per row
    t0 = time.monotonic()
    max_s = getattr(args, "max_seconds", None)
    stopped, started = [], []

    def out_of_time():
        """True once --max-seconds have passed (the first case always runs)."""
        if max_s is None or not started or time.monotonic() - t0 <= max_s:
            started.append(True)
            return False
        if not stopped:
            print(f"--max-seconds {max_s:g} reached: no new case", flush=True)
            stopped.append(True)
        return True

    def emit(rec):
        records.append(rec)
        ms = rec.get("median_ms")
        tail = rec.get("skipped") or rec.get("error") or (
            f"{ms:.4f} ms  {rec['gb_per_s']:.0f} GB/s ({100 * (rec['frac_of_copy'] or 0):.0f}% copy)"
            + host_graph_text(rec))
        shape = " ".join(f"{k}={rec[k]}" for k in ("B", "C_in", "C", "L", "k", "groups", "stride",
                                                   "mode", "layout") if k in rec)
        print(f"{rec['suite']:9s} {rec['provider']:17s} {shape:50s} {tail}", flush=True)

    if "depthwise" in suites:
        if gpu:
            Cs, Ls, ks = (512, 768, 1024, 2048), (256, 2048, 16384), (2, 4, 7, 31, 128)
            if args.quick:
                Cs, Ls, ks = (768,), QUICK_DEPTHWISE_LS, (4, 31)
        else:
            Cs, Ls, ks = (64,), (256,), (4, 31)
        B = 8 if gpu else 2
        for C in Cs:
            for L in Ls:
                # quick: the long rows (the bandwidth target's shape) for the three providers
                # the target compares, before the L=2048 rows of every provider
                provs = [p for p in providers if p in QUICK_LONG_PROVIDERS] \
                    if (gpu and args.quick and L > 2048) else providers
                for k in ks:
                    if out_of_time():
                        return records
                    x = torch.randn(B, C, L, device=dev, dtype=dtype)
                    w = torch.randn(C, 1, k, device=dev, dtype=dtype) / k ** 0.5
                    b = torch.randn(C, device=dev, dtype=dtype)
                    nbytes = _bytes(x, w, B * C * L)
                    for prov in provs:
                        fn = _provider_fn(prov, x, w, b, 1, C)
                        emit(_record("depthwise", prov, dict(B=B, C=C, L=L, k=k, groups=C,
                                                             stride=1, mode="fwd"),
                                     dtype, fn, nbytes, copy_bw, warmup, rep, host_graph=True))
                    del x, w, b
    if "strided" in suites:
        B, L = (8, 16000 * 4) if gpu else (2, 3200)
        for k, s in ((10, 5), (3, 2), (2, 2)):
            if out_of_time():
                return records
            C = 512 if gpu else 32
            Cin = 1 if k == 10 else C     # wav2vec2's first conv takes the waveform (1 channel)
            x = torch.randn(B, Cin, L, device=dev, dtype=dtype)
            w = torch.randn(C, Cin, k, device=dev, dtype=dtype) / (Cin * k) ** 0.5
            for prov in providers:
                fn = _provider_fn(prov, x, w, None, s, 1)
                emit(_record("strided", prov, dict(B=B, C=C, C_in=Cin, L=L, k=k, groups=1,
                                                   stride=s, mode="fwd"),
                             dtype, fn, _bytes(x, w, B * C * (L // s)), copy_bw, warmup, rep))
    if "update" in suites:
        from pyencoder.ops import causal_conv1d_update
        C = 1024 if gpu else 64
        for nb in ((1, 64, 512) if gpu else (1, 8)):
            for k in (4, 31):
                if out_of_time():
                    return records
                x = torch.randn(nb, C, 1, device=dev, dtype=dtype)
                w = torch.randn(C, 1, k, device=dev, dtype=dtype) / k ** 0.5
                st = torch.randn(nb, C, k - 1, device=dev, dtype=dtype)
                nbytes = (x.numel() * 2 + 2 * st.numel() + w.numel()) * x.element_size()
                for prov in providers:
                    backend = {"pyencoder-cuda": "cuda", "pyencoder-triton": "triton",
                               "reference": "reference"}.get(prov)
                    if backend is None:
                        fn = f"{prov} has no update step"
                    else:
                        from pyencoder import _backend
                        r = _backend._reason_for("conv", backend, "update", dev,
                                                 dict(x=x, state=st, weight=w, bias=None,
                                                      state_indices=None, groups=C,
                                                      activation=None))
                        fn = r if r is not None else (
                            lambda x=x, st=st, w=w, backend=backend: causal_conv1d_update(
                                x, st, w, groups=C, backend=backend))
                    emit(_record("update", prov, dict(B=nb, C=C, L=1, k=k, groups=C, stride=1,
                                                      mode="update"),
                                 dtype, fn, nbytes, copy_bw, warmup, rep))
    if "grouped" in suites:
        cfgs = ((768, 16, 128), (1024, 16, 128)) if gpu else ((64, 4, 16),)
        Ls = ((512, 2048) if not args.quick else (2048,)) if gpu else (64,)
        B = 8 if gpu else 2
        layouts = getattr(args, "layouts", None) or ("cf",)
        tiles = [name for name, _ in GRP_VARIANTS] \
            if getattr(args, "grp_tiles", False) and "pyencoder-triton" in providers else []
        for C, G, k in cfgs:
            for L in Ls:
                for layout in layouts:
                    if out_of_time():
                        return records
                    # "cl": channel-last memory, x a (B, L, C) tensor transposed, as a model's
                    # (B, T, C) hidden states reach wav2vec2's positional conv
                    x = torch.randn(B, C, L, device=dev, dtype=dtype) if layout == "cf" else \
                        torch.randn(B, L, C, device=dev, dtype=dtype).transpose(1, 2)
                    w = torch.randn(C, C // G, k, device=dev, dtype=dtype) / (C // G * k) ** 0.5
                    b = torch.randn(C, device=dev, dtype=dtype)
                    _grouped_rows(emit, providers, tiles, x, w, b, G, layout, dtype, copy_bw,
                                  warmup, rep)
    return records


def _grouped_rows(emit, providers, tiles, x, w, b, G, layout, dtype, copy_bw, warmup, rep):
    B, C, L = x.shape
    k = w.shape[-1]
    flops = 2 * B * C * L * (C // G) * k
    for mode in ("fwd", "fwd+bwd"):
        for prov in list(providers) + (tiles if mode == "fwd" else []):
            fn = _provider_fn(prov, x, w, b, 1, G, bwd=mode != "fwd")
            rec = _record("grouped", prov, dict(B=B, C=C, L=L, k=k, groups=G, stride=1,
                                                mode=mode, layout=layout),
                          dtype, fn, _bytes(x, w, B * C * L, bwd=mode != "fwd"), copy_bw,
                          warmup, rep)
            if "median_ms" in rec:
                mult = 1 if mode == "fwd" else 3
                rec["tflops"] = mult * flops / (rec["median_ms"] * 1e-3) / 1e12
            emit(rec)


def parser():
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--quick", action="store_true", help="a small subset")
    p.add_argument("--providers", nargs="*", default=None,
                   choices=PROVIDERS + tuple(CPU_ALIASES.values()),
                   help="cudnn = F.conv1d (reported as torch-conv1d on a CPU)")
    p.add_argument("--suites", nargs="*", default=None, choices=SUITES)
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="start no new case after this many seconds (the first always runs)")
    p.add_argument("--layouts", nargs="*", default=None, choices=("cf", "cl"),
                   help="grouped suite: x channel-first (cf, default) and / or channel-last (cl: "
                        "a (B, L, C) tensor transposed, as a model's hidden states reach the "
                        "positional conv)")
    p.add_argument("--grp-tiles", action="store_true",
                   help="grouped suite: also pyencoder-triton's forward in the GRP_VARIANTS "
                        "(tiles, tap-major reduction)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    print(f"device: {device_slug()}  env: {env_info().get('device_name')}")
    records = run(args)
    if not args.no_write:
        print(f"wrote {records.path or write_jsonl('conv', [])}")


if __name__ == "__main__":
    main()
