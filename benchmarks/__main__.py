"""`python -m benchmarks` (`make bench`): run every benchmark that applies to this device, write
JSON lines under benchmarks/results/<device-slug>/, then a Markdown summary and PNG plots made from
those JSON lines.

    python -m benchmarks [--quick] [--only NAME ...] [--compare OLD_DIR] [--no-run]

GPU: the Triton/CUDA kernels against their anchors (attention, conv, streaming, HF). CPU: the
reference path against dense baselines, streaming costs and the HF patch. Each benchmark runs in
its own process, so one failing does not stop the others; the exit code is non-zero if any failed.
"""
import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (module, runs on CPU, runs on GPU)
BENCHES = [
    ("bench_reference_cpu", True, False),
    ("bench_attention", True, True),
    ("bench_conv", True, True),
    ("bench_convnext", True, True),
    ("bench_streaming", True, True),
    ("bench_hf", True, True),
    ("distill_lookahead", True, False),   # minutes of CPU training: not in --quick
]
NOT_QUICK = {"distill_lookahead"}


def _bar(i, n, name, width=30):
    done = int(width * i / max(n, 1))
    return f"[{'#' * done}{'.' * (width - done)}] {i}/{n} {name}"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="about a minute: small shape subsets")
    p.add_argument("--only", nargs="*", default=None, help="benchmark module names to run")
    p.add_argument("--compare", default=None, help="results folder of an older run to compare")
    p.add_argument("--no-run", action="store_true", help="only regenerate summary and plots")
    args = p.parse_args(argv)

    import torch
    from benchmarks._common import device_slug
    gpu = torch.cuda.is_available()
    todo = [m for m, cpu_ok, gpu_ok in BENCHES if (gpu_ok if gpu else cpu_ok)
            and os.path.exists(os.path.join(HERE, m + ".py"))
            and (args.only is None or m in args.only)
            and not (args.quick and m in NOT_QUICK and args.only is None)]
    failed = []
    if not args.no_run:
        print(f"device: {device_slug()}  ({len(todo)} benchmarks{', quick' if args.quick else ''})")
        for i, mod in enumerate(todo):
            print(_bar(i, len(todo), mod), flush=True)
            t0 = time.time()
            cmd = [sys.executable, "-m", f"benchmarks.{mod}"] + (["--quick"] if args.quick else [])
            rc = subprocess.call(cmd, cwd=ROOT)
            print(f"  {mod}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.time() - t0:.0f} s")
            if rc != 0:
                failed.append(mod)
        print(_bar(len(todo), len(todo), "done"))
    from benchmarks.summarize import summarize
    out = summarize(os.path.join(HERE, "results", device_slug()), compare=args.compare)
    print(f"summary: {out}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
