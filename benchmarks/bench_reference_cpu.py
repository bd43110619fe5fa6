"""Offline banded attention on CPU: the reference path vs SDPA with a dense boolean mask.

Shape (issue 2): B=1, H=12, D=64, left=250, right=3, fp32, RoPE on both sides (the SDPA path
rotates q and k in a separate pass). N=3000 (60 s of 50 Hz frames) and N=30000 (10 min; the dense
path is skipped there unless --dense-30k: its N x N mask and scores need ~4 GB per head).

``--threads`` is torch's thread count; the reference then picks its own per call under
PYENCODER_CPU_THREADS (auto: fewer on a busy machine), recorded as ``cpu_threads_policy``. Loaded
vs quiet machine: benchmarks/bench_cpu_contention.py.

Each provider runs in a fresh subprocess. Peak memory is the process's resident high-water mark
during one call, above the resident size before it (Linux: VmHWM reset through
/proc/self/clear_refs after a warm-up call), so it counts everything the call allocates, output
included, and nothing else. Writes JSON lines to
<results root>/<device-slug>/reference_cpu.jsonl.

    python -m benchmarks.bench_reference_cpu [--quick] [--threads N]
"""
import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
import pyencoder
from pyencoder.ops import banded_attention
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
torch.manual_seed(0)
B, H, N, D, left, right = 1, 12, cfg["n"], 64, 250, 3
q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
rope = pyencoder.Rope(D)
pos = torch.arange(N)
if cfg["provider"] == "reference":
    def run():
        return banded_attention(q, k, v, left=left, right=right, rope=rope, backend="reference")
else:
    i = torch.arange(N)     # the anchor's dense mask, built once (not timed: ours builds none)
    mask = (i[None, :] >= i[:, None] - left) & (i[None, :] <= i[:, None] + right)

    def run():
        qr, kr = rope.rotate(q, pos), rope.rotate(k, pos)
        return torch.nn.functional.scaled_dot_product_attention(qr, kr, v, attn_mask=mask)
def status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
out = run()                      # warm-up: one-time allocations (thread pools, kernels) happen here
if cfg["mode"] == "time":
    times = []
    for _ in range(cfg["reps"]):
        t0 = time.perf_counter(); out = run(); times.append(time.perf_counter() - t0)
    times.sort()
    m = len(times) // 2       # the median (of an even count: the middle two's mean)
    med = times[m] if len(times) % 2 else (times[m - 1] + times[m]) / 2
    print(json.dumps({"median_ms": 1e3 * med, "min_ms": 1e3 * times[0],
                      "max_ms": 1e3 * times[-1], "checksum": float(out.double().abs().sum())}))
else:
    del out
    import gc; gc.collect()
    base = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:   # reset the high-water mark VmHWM to VmRSS
        f.write("5")
    out = run()
    peak = status_kb("VmHWM")
    out_mb = out.numel() * out.element_size() / 2**20
    print(json.dumps({"peak_mem_mb": max(0, peak - base) / 1024, "output_mb": out_mb}))
"""


def _child(cfg, env=None):
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True,
                         text=True, env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_child(provider, n, reps, threads):
    cfg = {"provider": provider, "n": n, "reps": reps, "threads": threads}
    res = _child(dict(cfg, mode="time"))
    if "error" in res:
        return res
    # Memory in a separate process: allocations above 64 KiB go straight to mmap and back to the
    # OS when freed, so the resident high-water mark tracks live tensor memory instead of glibc's
    # recycled heap (this slows allocation, hence not in the timed process).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    res.update(_child(dict(cfg, mode="mem"), env))
    return res


def main(argv=None):
    from benchmarks._common import env_info, write_jsonl
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--dense-30k", action="store_true")
    args = p.parse_args(argv)
    reps = 3 if args.quick else 7
    env = env_info()
    records = []
    sizes = [3000] if args.quick else [3000, 30000]
    print(f"{'N':>6} {'provider':<22} {'median ms':>10} {'peak MB':>9} {'output MB':>9}")
    for n in sizes:
        res = {}
        for provider in ("reference", "sdpa_dense_mask+rope"):
            if provider != "reference" and n > 3000 and not args.dense_30k:
                res[provider] = {"skipped": "dense N x N mask: ~%.1f GB of mask+scores per head"
                                 % (n * n * 5 / 1e9)}
            else:
                res[provider] = run_child("reference" if provider == "reference" else "sdpa", n,
                                          reps if n <= 3000 else 2, args.threads)
            r = res[provider]
            shown = (f"{r['median_ms']:10.1f} {r['peak_mem_mb']:9.1f} {r['output_mb']:9.1f}"
                     if "median_ms" in r and "peak_mem_mb" in r
                     else "  " + (r.get("skipped") or r.get("error")))
            print(f"{n:>6} {provider:<22} {shown}")
            records.append(dict(env, bench="reference_cpu", op="banded_attention", quick=args.quick,
                                provider=provider,
                                B=1, H=12, N=n, D=64, left=250, right=3, dtype="float32", rope=True,
                                threads=args.threads,
                                cpu_threads_policy=os.environ.get("PYENCODER_CPU_THREADS", "auto"),
                                **r))
        a, b = res["reference"], res["sdpa_dense_mask+rope"]
        if "median_ms" in a and "median_ms" in b:
            speed = b["median_ms"] / a["median_ms"]
            mem = b["peak_mem_mb"] / max(a["peak_mem_mb"], 1e-3)
            ws = (b["peak_mem_mb"] - b["output_mb"]) / max(a["peak_mem_mb"] - a["output_mb"], 1e-3)
            print(f"{'':>6} reference: {speed:.2f}x faster, {mem:.1f}x less peak memory "
                  f"({ws:.1f}x less beyond the {a['output_mb']:.1f} MB output)")
            records.append(dict(env, bench="reference_cpu", op="banded_attention", N=n,
                                quick=args.quick, provider="ratio", speedup=speed, memory_ratio=mem,
                                workspace_ratio=ws))
    path = write_jsonl("reference_cpu", records)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
