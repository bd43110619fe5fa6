"""Where the Triton attention forward's time goes: host overhead (Python validation, torch.library
custom-op dispatch, Triton's launcher) against the kernels' GPU time, under torch.profiler.

Cases (provider pyencoder-triton, built by bench_attention.make_provider): band(50,3) without
RoPE, band(50,3) with RoPE, band(None,0) without RoPE; each forward (no_grad) and forward+backward
(torch.autograd.grad of the output). GPU: wav2vec2-base shapes, B=8, H=12, D=64, bf16, N=1500
(``--n``). ``--dry-run`` (CPU): B=1, H=2, D=16, N=24, float32, Triton kernels in the interpreter
(TRITON_INTERPRET=1, set when absent), few calls: exercises the whole script, no meaningful time.

Per case: torch.profiler (CPU and, when present, CUDA activities) over 10 calls after warm-up
(``--quick``: 5), its ``key_averages().table`` sorted by cuda_time_total (GPU) or cpu_time_total
(CPU), 15 rows; then the per-call host time (``host_us``: benchmarks._common.host_us, 20 calls back
to back, one synchronize at the end: when the kernels are slower than the host this is GPU time),
the CUDA kernels' self time per call (``kernel_us``: self_device_time_total summed over the
key_averages entries whose device_type is CUDA, over the profiled calls; None on CPU or when the
profiler lacks those fields), do_bench's median (``ms``) and the CUDA-graph replay median
(``graph_ms``; ``graph_error`` when the capture fails; None on CPU). ``host_us`` well above
``kernel_us`` with ``ms`` close to ``host_us`` means the launch path, not the kernel, sets the
time.

Rows (one per case, appended as measured): bench "profile_attention", case, mode (fwd | fwdbwd),
mask, rope, B, H, D, N, dtype, calls, host_us, host_us_triton_run (host_us with
PYENCODER_FAST_LAUNCH=0: every launch through Triton's JITFunction.run), kernel_us, ms, p20_ms, p80_ms, graph_ms, top_ops
(the 10 entries with most time: name, calls, cpu_us, cuda_us (None on CPU); totals over the
profiled calls, us), host_profile (cProfile over the host_us calls: the 25 Python functions with
most own time, per call: func, calls, self_us, cum_us; which of pyencoder's launch path, torch's
autograd and Triton's launcher the host time goes to), trace (the chrome trace's path with
``--trace``, else None). Written to
<results root>/<device>/profile_attention.jsonl; ``--trace`` also exports one chrome trace per case
there (profile_attention_<case>_<run_id>.json). ``--max-seconds``: no new case after that many
seconds (the first case always runs; the case running finishes). On an H100 with the kernels in the Triton cache the whole run
takes well under 40 s.

    python -m benchmarks.profile_attention [--n 1500] [--quick] [--dry-run] [--trace]
        [--max-seconds S] [--no-write]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = (("band(50,3)-no-rope", ("band", 50, 3), False),
         ("band(50,3)-rope", ("band", 50, 3), True),
         ("band(None,0)-no-rope", ("band", None, 0), False))
MODES = ("fwd", "fwdbwd")
TOP_OPS = 10
HOST_TOP = 25


def _attr(e, *names):
    for n in names:
        v = getattr(e, n, None)
        if v is not None:
            return v
    return None


def _is_cuda(e):
    dt = getattr(e, "device_type", None)
    cuda = getattr(getattr(torch.autograd, "DeviceType", None), "CUDA", None)
    return dt is not None and cuda is not None and dt == cuda


def kernel_us(averages, calls):
    """Sum of the CUDA kernels' self time per call (us) from ``prof.key_averages()``: entries
    whose device_type is CUDA, self_device_time_total (self_cuda_time_total in older torch).
    None when no entry carries these fields."""
    total, found = 0.0, False
    for e in averages:
        if not _is_cuda(e):
            continue
        t = _attr(e, "self_device_time_total", "self_cuda_time_total")
        if t is None:
            continue
        total += float(t)
        found = True
    return total / calls if found else None


def top_ops(averages, cuda, k=TOP_OPS):
    """The ``k`` entries with most time (CUDA time on GPU, else CPU time): name, calls, cpu_us,
    cuda_us (totals over the profiled calls)."""
    rows = []
    for e in averages:
        cpu_us = _attr(e, "cpu_time_total")
        cuda_us = _attr(e, "device_time_total", "cuda_time_total") if cuda else None
        rows.append({"name": str(getattr(e, "key", "?")), "calls": int(getattr(e, "count", 0)),
                     "cpu_us": None if cpu_us is None else float(cpu_us),
                     "cuda_us": None if cuda_us is None else float(cuda_us)})
    key = "cuda_us" if cuda else "cpu_us"
    rows.sort(key=lambda r: (-(r[key] or 0.0), -(r["cpu_us"] or 0.0)))
    return rows[:k]


def host_profile(fn, calls, sync, k=HOST_TOP):
    """Where the host time of one call goes, by Python function: ``fn`` run ``calls`` times
    under cProfile (one synchronize at the end), the ``k`` functions with most own time. Rows:
    func ("file:line(name)", the file's last two path parts), calls, self_us and cum_us, each
    per call of ``fn``. cProfile's own cost inflates every figure (about 1.5-2x here): read the
    shares, not the absolute values. Prints them."""
    import cProfile
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    sync()
    st = pstats.Stats(prof)
    rows = []
    for (path, line, name), (cc, nc, tt, ct, _) in st.stats.items():
        short = "/".join(path.replace("\\", "/").split("/")[-2:])
        rows.append({"func": f"{short}:{line}({name})", "calls": nc / calls,
                     "self_us": tt / calls * 1e6, "cum_us": ct / calls * 1e6})
    rows.sort(key=lambda r: -r["self_us"])
    total = sum(r["self_us"] for r in rows)
    print(f"host profile (cProfile, {calls} calls): {total:.0f} us/call in Python and the C "
          f"calls it makes; top {k} by own time:", flush=True)
    for r in rows[:k]:
        print(f"  {r['self_us']:8.1f} us self {r['cum_us']:8.1f} us cum {r['calls']:6.1f}x  "
              f"{r['func']}", flush=True)
    return rows[:k]


def _case_fn(mode, fwd, leaves, dout):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fwd()
        return run

    def run():
        return torch.autograd.grad(fwd(), leaves, dout)
    return run


def profile_case(label, m, rope, mode, B, H, D, n, dtype, device, cfg, trace_dir=None):
    """One row; prints the profiler table and a summary line."""
    import pyencoder
    from benchmarks._common import bench, env_info, graph_ms, host_us, temp_env
    from benchmarks.bench_attention import make_provider, mask_name
    cuda = device == "cuda"
    case = f"{label}-{mode}"
    row = {"bench": "profile_attention", "provider": "pyencoder-triton", "case": case,
           "mode": mode, "mask": mask_name(m), "rope": bool(rope), "B": B, "H": H, "D": D,
           "N": n, "dtype": str(dtype).replace("torch.", ""), "calls": cfg["calls"]}
    torch.manual_seed(0)
    leaves = [torch.randn(B, H, n, D, device=device, dtype=dtype, requires_grad=mode != "fwd")
              for _ in range(3)]
    dout = torch.randn(B, H, n, D, device=device, dtype=dtype)
    fwd = make_provider("pyencoder-triton", *leaves, m, pyencoder.Rope(D) if rope else None)
    fn = _case_fn(mode, fwd, leaves, dout)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(cfg["warm"]):
        fn()
    sync()
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(cfg["calls"]):
            fn()
        sync()
    avg = prof.key_averages()
    print(f"== {case}  B={B} H={H} D={D} N={n} {row['dtype']}  ({cfg['calls']} calls)",
          flush=True)
    print(avg.table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=15),
          flush=True)
    row["host_us"] = host_us(fn, calls=cfg["host_calls"], repeats=cfg["host_repeats"])
    # the same through Triton's JITFunction.run on every launch (the fast launch path off): the
    # A/B of PYENCODER_FAST_LAUNCH on this machine's CPU, right after the row above
    with temp_env(PYENCODER_FAST_LAUNCH="0"):
        row["host_us_triton_run"] = host_us(fn, calls=cfg["host_calls"],
                                            repeats=cfg["host_repeats"])
    row["host_profile"] = host_profile(fn, cfg["host_calls"], sync)
    row["kernel_us"] = kernel_us(avg, cfg["calls"]) if cuda else None
    t = bench(fn, cfg["bench_warmup"], cfg["bench_rep"])
    row["ms"], row["p20_ms"], row["p80_ms"] = t["median_ms"], t["p20_ms"], t["p80_ms"]
    row["graph_ms"] = None
    if cuda:
        try:
            row["graph_ms"] = graph_ms(fn, cfg["bench_warmup"], cfg["bench_rep"])
        except Exception as e:  # capture unsupported: record it, keep going
            row["graph_error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            try:
                torch.cuda.synchronize()
            except Exception:
                pass
    row["top_ops"] = top_ops(avg, cuda)
    row["trace"] = None
    if trace_dir is not None:
        os.makedirs(trace_dir, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in case)
        path = os.path.join(trace_dir, f"profile_attention_{safe}_{env_info()['run_id']}.json")
        prof.export_chrome_trace(path)
        row["trace"] = path
    k = row["kernel_us"]
    g = row["graph_ms"]
    print(f"-- {case}: host {row['host_us']:.0f} us/call (Triton's run every launch: "
          f"{row['host_us_triton_run']:.0f})  kernels "
          f"{'n/a' if k is None else f'{k:.0f} us'}/call  do_bench {row['ms']:.3f} ms  graph "
          f"{'n/a' if g is None else f'{g:.3f} ms'}"
          + (f"  ({row['graph_error']})" if "graph_error" in row else ""), flush=True)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--n", type=int, default=None, help="sequence length (GPU default 1500)")
    p.add_argument("--quick", action="store_true", help="5 profiled calls, shorter do_bench")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU: tiny shapes, float32, Triton interpreter (a rehearsal)")
    p.add_argument("--trace", action="store_true", help="export a chrome trace per case")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="start no new case after this many seconds")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        p.error("no CUDA device: the profile needs a GPU (--dry-run rehearses it on CPU)")
    if args.max_seconds is not None and args.max_seconds < 0:
        p.error(f"--max-seconds must be >= 0; got {args.max_seconds}")
    if args.n is not None and args.n < 1:
        p.error(f"--n must be >= 1; got {args.n}")
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if os.environ["TRITON_INTERPRET"] != "1":
            p.error(f"--dry-run on CPU needs TRITON_INTERPRET=1; got "
                    f"{os.environ['TRITON_INTERPRET']!r}")
    from benchmarks._common import JsonlRows, device_slug, results_dir
    if cuda:
        B, H, D, n, dtype, device = 8, 12, 64, args.n or 1500, torch.bfloat16, "cuda"
        cfg = dict(warm=3, calls=5 if args.quick else 10, host_calls=20, host_repeats=5,
                   bench_warmup=10 if args.quick else 25, bench_rep=30 if args.quick else 100)
    else:
        B, H, D, n, dtype, device = 1, 2, 16, args.n or 24, torch.float32, "cpu"
        cfg = dict(warm=1, calls=1, host_calls=1, host_repeats=1, bench_warmup=0, bench_rep=0)
    print(f"device {device_slug()}  {'CUDA' if cuda else 'CPU dry run (Triton interpreter)'}",
          flush=True)
    # a rehearsal's rows say so: interpreter timings, which summaries leave out
    rows = JsonlRows("profile_attention", write=not args.no_write,
                     extra=dict(dry_run=True) if args.dry_run else None)
    trace_dir = results_dir() if args.trace else None
    t0 = time.monotonic()
    for label, m, rope in CASES:
        for mode in MODES:
            if rows and args.max_seconds is not None and \
                    time.monotonic() - t0 > args.max_seconds:
                print(f"--max-seconds {args.max_seconds:g} reached: stopping", flush=True)
                return _done(rows, args)
            rows.append(profile_case(label, m, rope, mode, B, H, D, n, dtype, device, cfg,
                                     trace_dir))
    return _done(rows, args)


def _done(rows, args):
    if not args.no_write and rows.path:
        print(f"wrote {len(rows)} records to {rows.path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
