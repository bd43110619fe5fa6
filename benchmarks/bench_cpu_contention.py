"""The CPU path on a quiet and on a busy machine: reference vs dense-mask SDPA with 0, 1, 2 CPU
burner processes beside it, at 1 thread and at torch's default thread count.

A burner is a `python -c "while True: pass"` process (a neighbour's job). Cases (fp32, RoPE):
  banded  B=1 H=12 D=64 left=250 right=3, N=1500 (the demo's kernel table; --quick) and N=3000
  decode  one ring decode step of a streaming attention layer: H=12, 4 queries, 257 ring slots
Variants of each case, run in one process per burner count with the variants interleaved
(repeat 1 of every variant, then repeat 2, ..., the order rotated each repeat because a
variant run after a multi-threaded one meets that one's still-spinning OpenMP workers), so the
ratios compare like with like:
  reference auto    torch default threads, PYENCODER_CPU_THREADS=auto (the package default)
  reference torch   torch default threads, PYENCODER_CPU_THREADS=torch (thread count untouched:
                    the behaviour before pyencoder._cpu_threads)
  reference 1t      torch.set_num_threads(1)
  sdpa default, sdpa 1t   rotate q and k, then SDPA with the dense N x N boolean band mask
Each record has the 1-minute load average before and after, and the thread count the auto policy
picked. Absolute times on a shared machine are noise; read the ratios within one burner count.
Writes JSON lines (benchmarks/_common.write_jsonl, name "cpu_contention").

    python -m benchmarks.bench_cpu_contention [--quick] [--burners 0 1 2] [--reps 5]
"""
import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, sys, time, torch
import pyencoder
from pyencoder import _cpu_threads
from pyencoder.ops import banded_attention
from pyencoder.ops.decode_attention import decode_attention
cfg = json.loads(sys.argv[1])
default_threads = torch.get_num_threads()
torch.manual_seed(0)
rope = pyencoder.Rope(64)
left, right = 250, 3
cases = {}
for n in cfg["sizes"]:
    q, k, v = (torch.randn(1, 12, n, 64) for _ in range(3))
    pos = torch.arange(n)
    def ref(q=q, k=k, v=v):
        return banded_attention(q, k, v, left=left, right=right, rope=rope, backend="reference")
    i = torch.arange(n)     # the anchor's dense mask, built once (not timed: ours builds none)
    band = (i[None, :] >= i[:, None] - left) & (i[None, :] <= i[:, None] + right)
    def sdpa(q=q, k=k, v=v, pos=pos, mask=band):
        return torch.nn.functional.scaled_dot_product_attention(
            rope.rotate(q, pos), rope.rotate(k, pos), v, attn_mask=mask)
    cases[f"banded N={n}"] = {"reference": ref, "sdpa": sdpa,
                              "flops": 4 * 12 * n * (left + right + 1) * 64}
cap, M = left + right + 4, 4
qd, kr, vr = torch.randn(1, 12, M, 64), torch.randn(1, 12, cap, 64), torch.randn(1, 12, cap, 64)
qpos, qcnt, nk = torch.arange(1000, 1000 + M)[None], torch.tensor([M]), torch.tensor([1000 + M])
inv = rope.inv_freq()
def dec():
    for _ in range(10):
        decode_attention(qd, kr, vr, qpos, qcnt, nk, inv, False, 1, left, right, 0.125,
                         backend="reference")
cases["decode step x10"] = {"reference": dec, "flops": 4 * 12 * M * cap * 64}   # per call
variants = [("reference", "auto", default_threads), ("reference", "torch", default_threads),
            ("reference", "torch", 1), ("sdpa", "torch", default_threads), ("sdpa", "torch", 1)]
load0 = os.getloadavg()[0]
out = []
for name, case in cases.items():
    vs = [v for v in variants if v[0] in case]
    times = {v: [] for v in vs}
    picked = []
    for rep in range(cfg["reps"] + 1):          # repeat 0 is the warm-up
        for v in vs[rep % len(vs):] + vs[:rep % len(vs)]:   # rotate: no fixed predecessor
            provider, policy, threads = v
            torch.set_num_threads(threads)
            os.environ["PYENCODER_CPU_THREADS"] = policy
            if policy == "auto":
                picked.append(_cpu_threads.choose(case["flops"]))
            t0 = time.perf_counter()
            case[provider]()
            dt = time.perf_counter() - t0
            if rep:
                times[v].append(dt * 1e3)
    torch.set_num_threads(default_threads)
    for (provider, policy, threads), ts in times.items():
        ts.sort()
        rec = {"case": name, "provider": provider, "policy": policy, "threads": threads,
               "median_ms": ts[len(ts) // 2], "min_ms": ts[0], "max_ms": ts[-1], "reps": len(ts)}
        if policy == "auto":
            rec["auto_threads"] = sorted(set(picked))
        out.append(rec)
load1 = os.getloadavg()[0]
for r in out:
    r.update(load_before=load0, load_after=load1, default_threads=default_threads)
print(json.dumps(out))
"""

BURN = "while True: pass"


def run_level(burners, sizes, reps):
    procs = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(burners)]
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",
                                                               "MKL_NUM_THREADS")}
        out = subprocess.run([sys.executable, "-c", CHILD,
                              json.dumps({"sizes": sizes, "reps": reps})],
                             capture_output=True, text=True, env=env)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    if out.returncode != 0:
        raise SystemExit(f"child failed (burners={burners}):\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    from benchmarks._common import write_jsonl
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--quick", action="store_true", help="N=1500 only, burners 0 and 1, 3 repeats")
    p.add_argument("--burners", type=int, nargs="*", default=None,
                   help="burner counts to run (default 0 1 2; quick: 0 1)")
    p.add_argument("--reps", type=int, default=None, help="timed repeats per variant")
    p.add_argument("--no-write", action="store_true", help="print only, write no JSON lines")
    args = p.parse_args(argv)
    burners = args.burners if args.burners is not None else ([0, 1] if args.quick else [0, 1, 2])
    reps = args.reps or (3 if args.quick else 5)
    sizes = [1500] if args.quick else [1500, 3000]
    records = []
    print(f"{'burners':>7} {'case':<16} {'variant':<18} {'median ms':>10} {'vs sdpa':>8} "
          f"{'load':>10}")
    for b in burners:
        res = run_level(b, sizes, reps)
        for r in res:
            base = next((x for x in res if x["case"] == r["case"] and x["provider"] == "sdpa"
                         and x["threads"] == r["default_threads"]), None)
            ratio = base["median_ms"] / r["median_ms"] if base else None
            label = (f"{r['provider']} {r['policy']}" if r["policy"] == "auto"
                     else f"{r['provider']} {r['threads']}t")
            if r["policy"] == "auto":
                label += f" ({','.join(map(str, r['auto_threads']))}t)"
            print(f"{b:>7} {r['case']:<16} {label:<18} {r['median_ms']:10.1f} "
                  f"{'' if ratio is None else f'{ratio:7.2f}x':>8} "
                  f"{r['load_before']:4.1f}-{r['load_after']:<4.1f}", flush=True)
            records.append(dict(r, bench="cpu_contention", burners=b, op=r["case"],
                                speedup_vs_sdpa_default=ratio))
    if not args.no_write:
        print(f"wrote {write_jsonl('cpu_contention', records)}")


if __name__ == "__main__":
    main()
