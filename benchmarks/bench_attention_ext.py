"""Interval attention's extensions against FlexAttention: the fused WavLM relative bias, sink keys
and frame-rate cross-attention masks, forward and forward+backward (issue 15, Numbers).

Suites (GPU: wav2vec2/WavLM-base B=8, H=12, D=64, bf16, N in {1500, 3000, 12000}):
  bias   causal WavLM attention, chunked(4, left_chunks 62, lookahead 3) and band(250, 3), with
         WavLM's gated relative bias: score = scale*<q, k> + gate[b, h, q] * table[bucket(s - p), h]
         (T5 buckets, 320 of them, max distance 800; gradients for q, k, v, table and gate).
         Providers: pyencoder-triton (the bias fused in the kernels: the bucket table is gathered
         into per-offset columns once per call, inside the timed call); flex (a ``score_mod``
         adding gate[b, h, q] * columns[h, s - p - offset], block mask built once, compiled with
         the gather); unfused (pyencoder.nn.relpos.biased_interval_attention(fused=False): the
         plain-torch tiles WavLM ran before the fused bias, what ``fused_bias=False`` runs).
  sink   band(250, 3) and band(50, 3) with sink=4 (the first 4 keys visible to every query):
         pyencoder-triton vs flex with the equivalent ``mask_mod``.
  frame  cross-attention at different rates, IntervalMask.frames(q_frame, k_frame, left=3,
         right=2) (each query frame sees its own and 5 neighbouring key frames, TalkingMachines'
         audio window): q_frame:k_frame = 2:1 and 16:3, N keys, Nq = (N // k_frame) * q_frame:
         pyencoder-triton (pyencoder.ops.cross_attention) vs flex with the equivalent ``mask_mod``.
No RoPE anywhere (the attention kernels alone; bench_attention has the RoPE rows).

The anchors are compiled and checked as in bench_attention (its _Compiler, recompile guard and
Flex-unfused warning as an error: any of these stops the run with CompiledAnchorError). Before any
timing, every provider's output and gradients are compared with pyencoder's plain-torch reference
in float32 on the same inputs (relative RMS error, per-dtype tolerance ``TOL``); the flex masks
and score_mods are written here from the masks' definitions, independently of pyencoder.mask, so
a wrong kernel or a wrong anchor raises CheckError instead of producing a number.

CPU (and ``--dry-run``): tiny shapes, float32, providers reference (pyencoder's reference path),
unfused (bias), flex forward only (Flex has no CPU backward; compiled with the ``eager`` backend,
which still traces through Dynamo) and, under TRITON_INTERPRET=1, pyencoder-triton at the first
case of each suite (checked, not timed: interpreter times mean nothing). Seconds (~7 s on a
shared 2-core CPU, ~15 s with the interpreter).

Records (bench "attention-ext", <results root>/<device>/attention_ext.jsonl, each appended as
soon as it is measured, so a cut run keeps what finished): suite, provider, shape, B, H, D,
N (keys), Nq, Nk, mask, dtype, fwd/fwdbwd medians and 20/80 % quantiles (ms), in-mask TFLOP/s
(FLOPs over the visible pairs only, ``visible_pairs`` = B*H*pairs: 4*D per pair forward, 14*D
forward+backward), check_err (relative RMS error per tensor vs the reference), on CUDA
fwd/fwdbwd_host_us and fwd/fwdbwd_graph_ms (benchmarks._common.host_graph_fields: one call's host
time, and the call replayed from a CUDA graph: GPU time only); and per case one row provider
"ratio" with flex's time over each other provider's (``<provider>_fwd_x`` > 1: faster than Flex;
``<provider>_fwd_graph_x`` / ``_fwdbwd_graph_x`` the same for the graph times).

    python -m benchmarks.bench_attention_ext [--suites bias sink frame] [--n N ...] [--quick]
        [--providers P ...] [--dry-run] [--max-seconds S] [--no-write]
"""
import argparse
import sys
import time

import torch

from benchmarks._common import bench, device_slug, env_info, host_graph_fields, write_jsonl
from benchmarks.bench_attention import (_Compiler, _compiled_checks, CompiledAnchorError,
                                        flex_interval_mod, record_failure)

SUITES = ("bias", "sink", "frame")
SHAPE = ("wavlm-base", 8, 12, 64)
CPU_SHAPE = ("tiny", 1, 2, 16)
NS = (1500, 3000, 12000)
CPU_NS = (48,)
# mask specs: (kind, *ints); the IntervalMask and the flex mask_mod are both built from these
CASES = {
    "bias": (("chunked", 4, 62, 3), ("band", 250, 3)),
    "sink": (("band", 250, 3, 4), ("band", 50, 3, 4)),
    "frame": (("frames", 2, 1, 3, 2), ("frames", 16, 3, 3, 2)),
}
CPU_CASES = {
    "bias": (("chunked", 4, 2, 3), ("band", 12, 3)),
    "sink": (("band", 12, 3, 4), ("band", 5, 3, 4)),
    "frame": (("frames", 2, 1, 3, 2), ("frames", 16, 3, 3, 2)),
}
GPU_PROVIDERS = {"bias": ("pyencoder-triton", "flex", "unfused"),
                 "sink": ("pyencoder-triton", "flex"), "frame": ("pyencoder-triton", "flex")}
CPU_PROVIDERS = {"bias": ("reference", "unfused", "flex"), "sink": ("reference", "flex"),
                 "frame": ("reference", "flex")}
NUM_BUCKETS, MAX_DISTANCE = 320, 800
# relative RMS error vs the float32 reference (output; gradients of q, k, v; gradients of the
# bias table and gate). float32: the same math in another order (~1e-6). bf16/fp16: the kernels
# round P and the outputs to 8/11 mantissa bits (2^-9 / 2^-12 unit roundoff, a few roundings per
# element, ~5e-3 / 6e-4 RMS); the table/gate gradients sum ~B*N*window such terms (Flex may
# accumulate them in the input dtype). A mask wrong by one key of a 254-key window moves the
# output by ~6 % RMS, a missing sink or a wrong bias offset by far more.
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 2e-2), torch.bfloat16: (2e-2, 6e-2)}


class CheckError(RuntimeError):
    """A provider's output or gradient differs from the reference beyond the tolerance."""


def mask_name(spec):
    kind, *a = spec
    if kind == "band":
        return f"band({a[0]}, {a[1]})" + (f" sink={a[2]}" if len(a) > 2 else "")
    if kind == "chunked":
        return f"chunked({a[0]}, {a[1]}, {a[2]})"
    return f"frames({a[0]}:{a[1]}, left={a[2]}, right={a[3]})"


def interval_mask(spec):
    from pyencoder import IntervalMask
    kind, *a = spec
    if kind == "band":
        return IntervalMask.band(a[0], a[1], sink=a[2] if len(a) > 2 else 0)
    if kind == "chunked":
        return IntervalMask.chunked(a[0], a[1], a[2])
    return IntervalMask.frames(a[0], a[1], a[2], a[3])


def mask_mod_for(spec, device="cpu"):
    """The FlexAttention mask_mod of ``spec``, from the masks' definitions (DESIGN.md), not from
    pyencoder.mask. Every kind is one form: key j is visible from query i iff
    base - lo <= j <= base + hi, base = (i // q_step) * k_step, or j < sink:
    band(left, right, sink): steps 1, lo = left, hi = right;
    chunked(chunk, left_chunks, lookahead): steps chunk (base = the query's chunk start),
    lo = left_chunks * chunk, hi = chunk - 1 + lookahead;
    frames(q_frame, k_frame, left, right): the query's frame f = i // q_frame starts at key
    f * k_frame; lo = left * k_frame, hi = (right + 1) * k_frame - 1.
    All kinds share bench_attention.flex_interval_mod (integers as graph inputs), so every case
    of one size traces the same graph and shares its kernels."""
    kind, *a = spec
    if kind == "band":
        params = (1, 1, a[0], a[1], a[2] if len(a) > 2 else 0)
    elif kind == "chunked":
        chunk, left_chunks, lookahead = a
        params = (chunk, chunk, left_chunks * chunk, chunk - 1 + lookahead, 0)
    else:
        q_frame, k_frame, left, right = a
        params = (q_frame, k_frame, left * k_frame, (right + 1) * k_frame - 1, 0)
    return flex_interval_mod(*params, device)


def bias_score_mod(gate, cols, r0):
    """Flex score_mod adding gate[b, h, q] * cols[h, s - p - r0] (cols (H, L): the bias at offsets
    r0 .. r0 + L - 1; the index is clamped because Flex also scores the masked pairs of a visited
    block)."""
    last = cols.shape[1] - 1

    def score_mod(score, b, h, qi, kj):
        return score + gate[b, h, qi] * cols[h, (kj - qi - r0).clamp(0, last)]
    return score_mod


def sizes(spec, n):
    """(Nq, Nk) for N keys: self-attention Nq = Nk = n; a frame mask covers the same frames on
    both sides, Nq = (n // k_frame) * q_frame."""
    if spec[0] == "frames":
        return (n // spec[2]) * spec[1], n
    return n, n


def bias_columns(table, nq, nk, m):
    """(columns (H, L), offset) of the bucket table over every s - p the call can see."""
    from pyencoder.nn.relpos import relative_bias_columns
    block, lo, hi = m.params
    return relative_bias_columns(table, _bucket, nq, nk, block=block, lo_off=lo, hi_off=hi)


def _bucket(rel):
    from pyencoder.nn.relpos import relative_position_bucket
    return relative_position_bucket(rel, NUM_BUCKETS, MAX_DISTANCE)


def visible_pairs(spec, nq, nk):
    """(query, key) pairs the mask shows (per batch and head): the interval clipped to the keys,
    plus the sink keys below it."""
    m = interval_mask(spec)
    p = torch.arange(nq, dtype=torch.int64)
    lo, hi = m.lo(p), m.hi(p).clamp(max=nk - 1)
    band = (hi - lo + 1).clamp(min=0)
    sink = torch.minimum(lo, torch.full_like(lo, min(m.sink, nk))) if m.sink else 0
    return int((band + sink).sum())


def make_leaves(suite, spec, B, H, D, n, dtype, device, grad, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    nq, nk = sizes(spec, n)

    def rnd(*shape, lo=None):
        kw = dict(generator=g, device=device, dtype=dtype)
        x = torch.randn(*shape, **kw) if lo is None else lo + torch.rand(*shape, **kw)
        return x.requires_grad_(grad)
    leaves = {"q": rnd(B, H, nq, D), "k": rnd(B, H, nk, D), "v": rnd(B, H, nk, D)}
    if suite == "bias":
        leaves["table"] = rnd(NUM_BUCKETS, H)
        leaves["gate"] = rnd(B, H, nq, lo=1.0)      # WavLM's gate lies in (1, 2 + ...)
    return leaves


def make_provider(name, suite, spec, leaves, compiler):
    """A callable running the forward over ``leaves`` (returns the output), or raises
    NotImplementedError."""
    import pyencoder
    m = interval_mask(spec)
    q, k, v = leaves["q"], leaves["k"], leaves["v"]
    nq, nk = q.shape[2], k.shape[2]
    if name in ("pyencoder-triton", "reference"):
        backend = "reference" if name == "reference" else "triton"
        if suite == "frame":
            return lambda: pyencoder.ops.cross_attention(q, k, v, mask=m, backend=backend)
        if suite == "sink":
            return lambda: pyencoder.ops.interval_attention(q, k, v, mask=m, backend=backend)

        def run():
            cols, r0 = bias_columns(leaves["table"], nq, nk, m)
            return pyencoder.ops.interval_attention(q, k, v, mask=m, rel_bias=cols,
                                                    gate=leaves["gate"], rel_offset=r0,
                                                    backend=backend)
        return run
    if name == "unfused":
        if suite != "bias":
            raise NotImplementedError("unfused: the bias suite's plain-torch path only")
        from pyencoder.nn.relpos import biased_interval_attention
        return lambda: biased_interval_attention(q, k, v, leaves["gate"], leaves["table"],
                                                 _bucket, mask=m, fused=False)
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        bm = create_block_mask(mask_mod_for(spec, q.device), None, None, nq, nk,
                               device=q.device)
        if suite != "bias":
            fn = compiler(lambda q, k, v: flex_attention(q, k, v, block_mask=bm))
            return lambda: fn(q, k, v)
        # the bucket of every offset s - p a (nq, nk) call has, -(nq - 1) .. nk - 1, not only the
        # mask's window: the same shapes for every mask of one size, so the cases share one graph
        # and its compiled kernels (a window-sized gather would differ per mask); Flex reads one
        # column entry per score either way
        r0 = -(nq - 1)
        idx = _bucket(torch.arange(r0, nk, device=q.device))

        def attn(q, k, v, table, gate):
            cols = table[idx].t()                  # (H, L): the table at every offset s - p
            return flex_attention(q, k, v, score_mod=bias_score_mod(gate, cols, r0),
                                  block_mask=bm)
        fn = compiler(attn)
        return lambda: fn(q, k, v, leaves["table"], leaves["gate"])
    raise ValueError(f"unknown provider {name!r}; expected one of reference, pyencoder-triton, "
                     f"unfused, flex")


def reference_result(suite, spec, leaves, grad, dout):
    """Output and gradients of pyencoder's reference path in float32 on the same inputs."""
    ref = {n: x.detach().float().requires_grad_(grad) for n, x in leaves.items()}
    out = make_provider("reference", suite, spec, ref, None)()
    res = {"out": out.detach()}
    if grad:
        gs = torch.autograd.grad(out, list(ref.values()), dout.float())
        res.update({f"d{n}": g for n, g in zip(ref, gs)})
    return res


def rel_rms(x, ref):
    x, ref = x.detach().float(), ref.float()
    if not torch.isfinite(x).all():
        return float("inf")
    den = ref.pow(2).mean().sqrt().item()
    return (x - ref).pow(2).mean().sqrt().item() / max(den, 1e-30)


def check(name, got, want, dtype):
    """{tensor: relative RMS error}; raises CheckError past TOL (names the tensor and values)."""
    t_main, t_bias = TOL[dtype]
    errs = {}
    for key, ref in want.items():
        if key not in got:
            continue
        e = rel_rms(got[key], ref)
        errs[key] = e
        tol = t_bias if key in ("dtable", "dgate") else t_main
        if not e <= tol:
            raise CheckError(f"{name}: {key} differs from the float32 reference: relative RMS "
                             f"error {e:.3g} > tolerance {tol:g} ({dtype}); a wrong kernel or a "
                             f"wrong anchor mask/score_mod: no number is written")
    return errs


def measure(name, suite, spec, shape, n, dtype, device, warmup, rep, grad, compile_backend,
            timed=True):
    """One record: the provider checked against the reference, then (``timed``) timed."""
    shape_name, B, H, D = shape
    nq, nk = sizes(spec, n)
    rec = {"bench": "attention-ext", "suite": suite, "provider": name, "shape": shape_name,
           "B": B, "H": H, "D": D, "N": n, "Nq": nq, "Nk": nk, "mask": mask_name(spec),
           "dtype": str(dtype).replace("torch.", ""), "rope": False}
    if name == "flex" and device == "cpu":
        grad = False                                  # Flex has no CPU backward
    leaves = make_leaves(suite, spec, B, H, D, n, dtype, device, grad)
    names, tensors = list(leaves), list(leaves.values())
    compiler = _Compiler(compile_backend)
    try:
        with _compiled_checks(name) as strict:
            fwd = make_provider(name, suite, spec, leaves, compiler)
            with torch.no_grad():
                out = fwd()
            dout = torch.randn(out.shape, generator=torch.Generator(device=device).manual_seed(1),
                               device=device, dtype=dtype)
            got = {"out": out}
            if grad:
                out = fwd()
                got.update({f"d{k}": g for k, g in
                            zip(names, torch.autograd.grad(out, tensors, dout))})
                out = None

                def fwdbwd():
                    torch.autograd.grad(fwd(), tensors, dout)
            rec["check_err"] = check(name, got, reference_result(suite, spec, leaves, grad, dout),
                                     dtype)
            got = None
            if not timed:
                rec["untimed"] = "checked only (Triton interpreter)"
                return rec
            with strict():
                with torch.no_grad():
                    t_f = bench(fwd, warmup, rep)
                    graphs = host_graph_fields(fwd, "fwd", warmup, rep)
                t_fb = bench(fwdbwd, warmup, rep) if grad else None
                if grad:   # GPU time only: ours was host-bound at N=1500 on the first GPU runs
                    graphs.update(host_graph_fields(fwdbwd, "fwdbwd", warmup, rep))
            rec.update(graphs)
        if name == "flex":
            rec["graphs"] = compiler.graphs
            rec["compiled"] = compile_backend if compiler.graphs else None
    except (NotImplementedError, CheckError, CompiledAnchorError) as e:
        if isinstance(e, NotImplementedError):
            rec["skipped"] = str(e)
            return rec
        raise
    except Exception as e:
        return record_failure(rec, name, e, device)
    pairs = visible_pairs(spec, nq, nk) * B * H
    rec["visible_pairs"] = pairs
    for key, t, flops in (("fwd", t_f, 4 * D), ("fwdbwd", t_fb, 14 * D)):
        if t is not None:
            rec[f"{key}_ms"] = t["median_ms"]
            rec[f"{key}_p20_ms"] = t["p20_ms"]
            rec[f"{key}_p80_ms"] = t["p80_ms"]
            rec[f"{key}_tflops"] = flops * pairs / (t["median_ms"] * 1e-3) / 1e12
    return rec


def ratio_row(recs):
    """Flex's time over every other provider's in one case (> 1: faster than Flex), or None."""
    flex = next((r for r in recs if r["provider"] == "flex" and "fwd_ms" in r), None)
    if flex is None:
        return None
    row = {k: flex[k] for k in ("bench", "suite", "shape", "B", "H", "D", "N", "Nq", "Nk", "mask",
                                "dtype", "rope")}
    row.update(provider="ratio", vs="flex")
    for r in recs:
        if r is flex:
            continue
        for key in ("fwd", "fwdbwd"):
            if f"{key}_ms" in r and f"{key}_ms" in flex:
                row[f"{r['provider']}_{key}_x"] = flex[f"{key}_ms"] / r[f"{key}_ms"]
            if r.get(f"{key}_graph_ms") and flex.get(f"{key}_graph_ms"):
                row[f"{r['provider']}_{key}_graph_x"] = (flex[f"{key}_graph_ms"]
                                                         / r[f"{key}_graph_ms"])
    return row if len(row) > 14 else None


def _interpreting():
    import os
    return os.environ.get("TRITON_INTERPRET") == "1"


def main(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--suites", nargs="*", default=list(SUITES), choices=SUITES)
    p.add_argument("--n", nargs="*", type=int, default=None, help="key counts")
    p.add_argument("--providers", nargs="*", default=None)
    p.add_argument("--dry-run", action="store_true",
                   help="the CPU form (tiny shapes, float32) on any machine")
    p.add_argument("--quick", action="store_true", help="GPU: N=1500 only; CPU: the dry run")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="start no new case after this many seconds (what finished is written)")
    p.add_argument("--compile-backend", choices=("inductor", "eager"), default=None,
                   help="the anchors' torch.compile backend (default: inductor on GPU, eager on "
                        "CPU)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    for x in args.n or ():
        if x < 1:
            p.error(f"--n: key counts must be >= 1; got {x}")
    gpu = torch.cuda.is_available() and not args.dry_run
    device = "cuda" if gpu else "cpu"
    if gpu:
        dtype, shape, cases, ns, provs = torch.bfloat16, SHAPE, CASES, NS, GPU_PROVIDERS
        warmup, rep = 25, 100
        if args.quick:
            ns = NS[:1]
    else:
        dtype, shape, cases, ns, provs = torch.float32, CPU_SHAPE, CPU_CASES, CPU_NS, CPU_PROVIDERS
        warmup, rep = 0, 0
    if args.n:
        ns = tuple(args.n)
    compile_backend = args.compile_backend or ("inductor" if gpu else "eager")
    t0 = time.monotonic()
    print(f"device {device_slug()}  torch {env_info()['torch']}  triton {env_info()['triton']}  "
          f"{dtype}", flush=True)
    n_written = 0
    for suite in args.suites:
        providers = tuple(args.providers or provs[suite])
        for n in ns:                       # smallest N first: a cut run keeps the cheap cases
            for ci, spec in enumerate(cases[suite]):
                if args.max_seconds is not None and time.monotonic() - t0 > args.max_seconds:
                    print(f"--max-seconds {args.max_seconds:g} reached: stopping", flush=True)
                    return 0
                case = list(providers)
                if not gpu and _interpreting() and ci == 0 and n == ns[0] and \
                        "pyencoder-triton" not in case and args.providers is None:
                    case.append("pyencoder-triton")
                recs = []
                for prov in case:
                    rec = measure(prov, suite, spec, shape, n, dtype, device, warmup, rep,
                                  True, compile_backend, timed=gpu or prov != "pyencoder-triton")
                    recs.append(rec)
                    status = rec.get("error") or rec.get("skipped")
                    if rec.get("untimed"):
                        status = rec["untimed"] + ": " + " ".join(
                            f"{k}={e:.1e}" for k, e in rec["check_err"].items())
                    line = status or "  ".join(
                        f"{k} {rec[k + '_ms']:8.3f} ms" for k in ("fwd", "fwdbwd")
                        if k + "_ms" in rec) + "".join(
                        f"  {k} graph {rec[k + '_graph_ms']:.3f} ms" for k in ("fwd", "fwdbwd")
                        if rec.get(k + "_graph_ms") is not None) + "  check " + " ".join(
                        f"{k}={e:.1e}" for k, e in rec["check_err"].items())
                    print(f"{suite:5s} N={n:6d} Nq={rec['Nq']:6d} {mask_name(spec):28s} "
                          f"{prov:18s} {line}", flush=True)
                    if not args.no_write:      # at once: a run cut mid-case keeps this record
                        path = write_jsonl("attention_ext", [rec])
                        n_written += 1
                row = ratio_row(recs)
                if row is not None:
                    print("      ratio vs flex: " + "  ".join(
                        f"{k} {v:.2f}" for k, v in row.items() if k.endswith("_x")), flush=True)
                    if not args.no_write:
                        path = write_jsonl("attention_ext", [row])
                        n_written += 1
    if not args.no_write and n_written:
        print(f"wrote {n_written} records to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
