"""`python -m benchmarks` (`make bench`): run every benchmark that applies to this device, write
JSON lines under <results root>/<device-slug>/, then a Markdown summary and PNG plots made from
those JSON lines, next to them.

    python -m benchmarks [--quick] [--only NAME ...] [--results-dir PATH | --commit-results]
                         [--compare OLD_DIR] [--no-run]

Results root: --results-dir, else --commit-results (benchmarks/results/, the committed folder the
README tables are generated from: an explicit step), else $PYENCODER_RESULTS_DIR, else
<repo>/bench-results/ (git-ignored): a plain run never touches tracked files.

--quick: a minute or two on a 2-core CPU (reduced models and shapes, no concurrent-stream search,
no distillation); its records carry quick=true. A progress bar shows the elapsed time and an ETA
(expected durations per benchmark, rescaled by how the finished ones compared).

GPU: the Triton/CUDA kernels against their anchors (attention, conv, streaming, HF). CPU: the
reference path against dense baselines, streaming costs and the HF patch. Each benchmark runs in
its own process, so one failing does not stop the others; the exit code is non-zero if any failed.
Every benchmark appends each JSON row the moment it is measured (benchmarks._common.JsonlRows), so
a run cut by a time limit keeps its finished rows.

Not run here (GPU diagnostics, run by hand): ``python -m benchmarks.profile_attention`` profiles the
Triton attention forward and forward+backward with torch.profiler and separates the per-call host
time (validation, custom-op dispatch, Triton's launcher) from the CUDA kernels' time and the
CUDA-graph replay time (profile_attention.jsonl).
"""
import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (module, runs on CPU, runs on GPU, expected seconds on a 2-core CPU: quick, full)
BENCHES = [
    ("bench_reference_cpu", True, False, 10, 120),
    ("bench_attention", True, True, 15, 300),
    ("bench_attention_ext", False, True, 0, 600),  # GPU: vs Flex, a Flex compile per case
    ("bench_conv", True, True, 5, 60),
    ("bench_convnext", True, True, 5, 10),
    ("bench_streaming", True, True, 30, 1500),
    ("bench_hf", True, True, 25, 600),
    ("bench_running_norm", False, True, 0, 30),    # GPU: the norm kernels vs the torch paths
    ("bench_wavlm_bias", True, False, 40, 900),    # CPU: causal WavLM, fused bias vs relpos tiles
    ("distill_lookahead", True, False, 0, 1800),   # minutes of CPU training: not in --quick
]
NOT_QUICK = {"distill_lookahead", "bench_attention_ext"}   # --only runs them (--quick: N=1500)


def _fmt_s(s):
    s = max(0, int(round(s)))
    return f"{s // 60}:{s % 60:02d}"


def _bar(done_s, total_s, elapsed, name, width=30):
    """[#####.....] 40% elapsed 0:32 ETA 0:48  name"""
    frac = min(1.0, done_s / total_s) if total_s > 0 else 1.0
    n = int(width * frac)
    eta = max(0.0, total_s - done_s)
    return (f"[{'#' * n}{'.' * (width - n)}] {100 * frac:3.0f}%  elapsed {_fmt_s(elapsed)}  "
            f"ETA {_fmt_s(eta)}  {name}")


def _resolve_results_root(args):
    if args.results_dir:
        return os.path.abspath(args.results_dir)
    if args.commit_results:
        return os.path.join(HERE, "results")
    from benchmarks._common import results_root
    return os.path.abspath(results_root())


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--quick", action="store_true",
                   help="a minute or two on a 2-core CPU: reduced models and shapes")
    p.add_argument("--only", nargs="*", default=None, help="benchmark module names to run")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--results-dir", default=None, metavar="PATH",
                       help="results root (default: $PYENCODER_RESULTS_DIR, else bench-results/)")
    where.add_argument("--commit-results", action="store_true",
                       help="write into the committed benchmarks/results/ (README tables)")
    p.add_argument("--compare", default=None, help="results folder of an older run to compare")
    p.add_argument("--no-run", action="store_true", help="only regenerate summary and plots")
    args = p.parse_args(argv)
    known = [b[0] for b in BENCHES]
    for m in args.only or ():
        if m not in known:
            p.error(f"--only: unknown benchmark {m!r}; choose from {', '.join(known)}")

    root = _resolve_results_root(args)
    os.environ["PYENCODER_RESULTS_DIR"] = root   # the child processes write there

    import torch
    from benchmarks._common import device_slug
    gpu = torch.cuda.is_available()
    todo = [(m, q if args.quick else f) for m, cpu_ok, gpu_ok, q, f in BENCHES
            if (gpu_ok if gpu else cpu_ok)
            and os.path.exists(os.path.join(HERE, m + ".py"))
            and (args.only is None or m in args.only)
            and not (args.quick and m in NOT_QUICK and args.only is None)]
    failed = []
    out_dir = os.path.join(root, device_slug())
    if not args.no_run:
        print(f"device: {device_slug()}  ({len(todo)} benchmarks{', quick' if args.quick else ''})"
              f"  results: {out_dir}")
        t_start = time.time()
        expected_done, actual_done = 0.0, 0.0
        for i, (mod, expect) in enumerate(todo):
            scale = actual_done / expected_done if expected_done > 0 else 1.0
            remaining = scale * sum(e for _, e in todo[i:])
            elapsed = time.time() - t_start
            print(_bar(elapsed, elapsed + remaining, elapsed, f"{i + 1}/{len(todo)} {mod}"),
                  flush=True)
            t0 = time.time()
            cmd = [sys.executable, "-m", f"benchmarks.{mod}"] + (["--quick"] if args.quick else [])
            rc = subprocess.call(cmd, cwd=ROOT)
            dt = time.time() - t0
            expected_done += max(expect, 1)
            actual_done += dt
            print(f"  {mod}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {dt:.0f} s",
                  flush=True)
            if rc != 0:
                failed.append(mod)
        elapsed = time.time() - t_start
        print(_bar(elapsed, elapsed, elapsed, "done"))
    from benchmarks.summarize import summarize
    out = summarize(out_dir, compare=args.compare)
    print(f"summary: {out}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
