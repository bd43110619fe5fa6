"""Static instruction statistics of the Triton attention kernels as a GPU would compile them,
without a GPU: what a kernel edit does to the machine code (vector widths of the global loads,
cp.async / wgmma counts, registers, spills, shared memory) before a device can time it.

    python -m benchmarks.sass_stats [--case NAME ...] [--arch sm90|sm80] [--grad] [--json OUT]

Each case is a headline benchmark call (wav2vec2-base, bf16, N=1500: bench_attention's
pyencoder-triton provider per mask and RoPE mode, bench_attention_ext's gated-bias, sink and
frame cases). Its launches run on CPU tensors standing in for CUDA ones (tests/_count_compiles.py
``prepare``: the GPU tile table row, Triton's CUDA binder and specialisation on a fake driver of
the target, as benchmarks/triton_cache.py captures them), every compile request is compiled for
the target in this process (``JITFunction.preload``: the JIT's own path, so the specialisation
attributes, i.e. 16-byte-aligned pointers and 16-divisible ints, are those of a real launch; the
PTX-level dump of benchmarks/ptx_diff.py has none and shows scalar loads that a real launch does
not run) and its cubin is disassembled with the cuobjdump that Triton ships. Per kernel it
prints the SASS instruction count, LDG / LDGSTS by width, HGMMA / HMMA, SHFL, MUFU (exp2, ...),
BAR, registers, spill stores and the shared memory the launch asks for. "spills" counts the STL
(local store) instructions: register spills when the count of registers is at the 255 cap, or
local arrays (the kernels computing cos/sin themselves, the decode attention, the ring write and
the rotation kernel, show 4-36 from libdevice's slow-path range reduction of large angles, with
100-120 registers: not register pressure).

Findings (sm_90, wav2vec2-base bf16, N=1500): the forward at 128x64 / 4 warps spilled 14-26
stores (the tile the first H100 rows ran) and 132-148 with the gated bias, whose pipelined bias
gather also took 128 KiB of shared memory; 128x64 / 8 warps has none. The default tile table
(pyencoder.ops._attention_triton) is ordered by these counts.

Run it in a process of its own (it patches torch and Triton for good); ``--grad`` also runs the
backward (dq, which also computes delta, and dk/dv). Compiles take 5-15 s per kernel on this CPU. Counts are static
(the code of a loop body counts once), so they compare two versions of a kernel, not kernels.
"""
import argparse
import collections
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# name -> (module, provider, mask / spec, rope)
CASES = {
    "band50": ("attention", "pyencoder-triton", "band:50:3", False),
    "band250": ("attention", "pyencoder-triton", "band:250:3", False),
    "chunked": ("attention", "pyencoder-triton", "chunked:4:128:3", False),
    "full": ("attention", "pyencoder-triton", "band:None:0", False),
    "band50-table": ("attention", "pyencoder-triton-ropetable", "band:50:3", True),
    "band250-pre": ("attention", "pyencoder-triton-prerot", "band:250:3", True),
    "bias": ("ext", "bias", ("chunked", 4, 62, 3), None),
    "bias-band": ("ext", "bias", ("band", 250, 3), None),
    "sink": ("ext", "sink", ("band", 250, 3, 4), None),
    "frame": ("ext", "frame", ("frames", 2, 1, 3, 2), None),
    # a streaming step_fixed of bench_streaming's stack (2 layers; bf16, batch 1): the decode
    # attention, the fused ring write, the conv step kernels a CUDA-graph step launches
    "step-banded": ("stream", "banded", 4, None),
    "step-chunked": ("stream", "chunked", 4, None),
}
DEFAULT_CASES = ("band50", "band250", "bias")

_OPS = (("LDG", r"LDG(?:\.[A-Z0-9]+)*"), ("LDGSTS", r"LDGSTS(?:\.[A-Z0-9]+)*"),
        ("STG", r"STG(?:\.[A-Z0-9]+)*"), ("HGMMA", r"HGMMA"), ("HMMA", r"HMMA"),
        ("SHFL", r"SHFL"), ("MUFU", r"MUFU(?:\.[A-Z0-9]+)*"), ("BAR", r"BAR(?:\.[A-Z]+)*"),
        ("ATOM", r"(?:RED|ATOM)G?(?:\.[A-Z0-9]+)*"))


def cuobjdump():
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    if not os.path.exists(path):
        raise SystemExit(f"sass_stats: no cuobjdump at {path} (Triton's bundled CUDA tools)")
    return path


def sass_stats(cubin, tool):
    """{'instructions': n, op: {variant: count}, 'registers': r, 'stack': s} of one cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    lines = [ln for ln in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/", ln)]
    out = {"instructions": len(lines)}
    for name, pat in _OPS:
        c = collections.Counter()
        for ln in lines:
            m = re.search(r"\*/\s*(?:@!?U?P[T0-9]+\s+)?(" + pat + r")\b", ln)
            if m:
                c[m.group(1)] += 1
        if c:
            out[name] = dict(sorted(c.items()))
    m = re.search(r"REG:(\d+)", res)
    out["registers"] = int(m.group(1)) if m else None
    m = re.search(r"STACK:(\d+)", res)
    out["stack"] = int(m.group(1)) if m else None
    out["spill_stores"] = sum(1 for ln in lines if re.search(r"\bSTL\b", ln))
    return out


def _run_case(name, grad):
    """Launch the case's calls (inside _cuda_to_cpu_mode)."""
    import torch

    import pyencoder
    module, prov, spec, rope = CASES[name]
    if module == "attention":
        from benchmarks import bench_attention as ba
        B, H, D = ba.SHAPES["wav2vec2-base"]
        leaves = [torch.randn(B, H, 1500, D, device="cuda", dtype=torch.bfloat16,
                              requires_grad=grad) for _ in range(3)]
        with ba._rope_table_env(prov):
            fn = ba.make_provider(prov, *leaves, ba.parse_mask(spec),
                                  pyencoder.Rope(D) if rope else None)
            out = fn()
            if grad:
                torch.autograd.grad(out, leaves, torch.randn_like(out))
        return
    if module == "stream":
        from benchmarks import bench_streaming as bs
        model = bs.build(layers=2, mask=prov).to(torch.bfloat16)
        x = torch.randn(1, 1, bs.HOP * spec, dtype=torch.bfloat16)
        with torch.no_grad():
            st = model.init_state(1, device="cpu", dtype=torch.bfloat16, max_chunk=spec)
            for _ in range(bs._warm_steps(model, spec)):
                model.step(x, st)
            model.step_fixed(x, st)
        return
    from benchmarks import bench_attention_ext as bx
    leaves = bx.make_leaves(prov, spec, 8, 12, 64, 1500, torch.bfloat16, "cpu", grad)
    fn = bx.make_provider("pyencoder-triton", prov, spec, leaves, None)
    out = fn()
    if grad:
        ins = [t for t in leaves.values() if t.requires_grad]
        torch.autograd.grad(out, ins, torch.randn_like(out))


def collect(cases, arch, grad, tiles=False):
    """[(case, kernel name, constexpr summary, stats)] for the cases' compile requests."""
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="sass-stats-")
    import _count_compiles as cc
    from triton.runtime.jit import JITFunction

    from benchmarks import triton_cache as tcache
    target = ("cuda", 90 if arch == "sm90" else 80, 32)
    cc.prepare(False, arch)
    if tiles:
        os.environ["PYENCODER_TRITON_AUTOTUNE"] = "full"
    real_run = JITFunction.run
    real_compile = JITFunction._do_compile
    cap = tcache.CompileCapture()

    class Recorder(cc._Recorder):
        # the autotuner runs every config its pruning keeps (no timing), each launch goes
        # through Triton's own binder up to _do_compile, where it is recorded
        def install(self):
            super().install()
            JITFunction.run = lambda fn, *a, grid, warmup, **kw: real_run(
                fn, *a, grid=grid, warmup=True, **kw)
            tcache.use_target(target)
            cap.install()

    Recorder().install()
    capture_compile = JITFunction._do_compile
    tool = cuobjdump()
    rows = []
    seen = set()
    for name in cases:
        n0 = len(cap.requests)
        with cc._cuda_to_cpu_mode():
            _run_case(name, grad)
        for req in list(cap.requests.values())[n0:]:
            if req["hash"] in seen:
                continue
            seen.add(req["hash"])
            os.environ.pop("TRITON_INTERPRET", None)
            JITFunction._do_compile = real_compile
            try:
                obj = importlib.import_module(req["module"])
                for part in req["qualname"].split("."):
                    obj = getattr(obj, part)
                while not isinstance(obj, JITFunction):
                    obj = obj.fn
                kernel = obj.preload(req["spec"])
            finally:
                os.environ["TRITON_INTERPRET"] = "1"
                JITFunction._do_compile = capture_compile
            spec = json.loads(req["spec"])
            consts = {}
            for path, val in zip(spec["constant_keys"], spec["constant_vals"]):
                nm = obj.arg_names[path[0]] if len(path) == 1 else str(path)
                if isinstance(val, dict):
                    val = val.get("constexpr")
                if nm.isupper() and val not in (None, False):
                    consts[nm] = val
            opts = spec.get("options", {})
            stats = sass_stats(kernel.asm["cubin"], tool)
            stats["shared"] = kernel.metadata.shared
            stats["num_warps"] = opts.get("num_warps")
            stats["num_stages"] = opts.get("num_stages")
            rows.append((name, req["name"], consts, stats))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--case", action="append", choices=sorted(CASES),
                   help=f"(repeatable) default: {' '.join(DEFAULT_CASES)}")
    p.add_argument("--arch", choices=("sm90", "sm80"), default="sm90")
    p.add_argument("--grad", action="store_true", help="the backward kernels too")
    p.add_argument("--tiles", action="store_true",
                   help="every tile of the kernels' tuned lists that the pruning keeps "
                        "(PYENCODER_TRITON_AUTOTUNE=full), not only the default table's first")
    p.add_argument("--verbose", action="store_true", help="instruction counts by kind too")
    p.add_argument("--json", help="write the rows here as JSON lines")
    args = p.parse_args(argv)
    rows = collect(args.case or DEFAULT_CASES, args.arch, args.grad, args.tiles)
    for case, kname, consts, st in rows:
        tile = (f"M{consts.pop('BLOCK_M', '-')} N{consts.pop('BLOCK_N', '-')} "
                f"w{st['num_warps']} s{st['num_stages']}")
        cs = " ".join(f"{k}={v}" for k, v in sorted(consts.items()) if not k.startswith("BLOCK"))
        print(f"{case:12s} {kname.replace('_interval_attention_', ''):22s} {tile:18s} "
              f"regs {st['registers']:3d} spills {st['spill_stores']:3d} stack {st['stack']:4d} "
              f"smem {st['shared'] // 1024:3d}K instr {st['instructions']:5d}  [{cs}]")
        if args.verbose:
            for op, _ in _OPS:
                if op in st:
                    print(f"    {op:7s} " + "  ".join(f"{k}:{v}" for k, v in st[op].items()))
    if args.json:
        with open(args.json, "w") as f:
            for case, kname, consts, st in rows:
                f.write(json.dumps({"case": case, "kernel": kname, "constexprs": consts,
                                    **st}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
