"""Dump the PTX of every Triton launch variant, and diff two dumps: proof that a kernel-source
refactor is free (same instruction stream) without a GPU.

    python benchmarks/ptx_diff.py dump OUT [--matrix quick] [--target sm_90] [--only REGEX]
                                           [--case REGEX] [--skip-flag HAS_BIAS]
    python benchmarks/ptx_diff.py diff BEFORE AFTER

``dump`` captures the launches exactly as tests/test_triton_compile.py does (the launchers run on
CPU tensors with a recording ``JITFunction.run``; autotuned kernels record every config their
pruning keeps), compiles each job with ``triton.compile`` for the target up to the PTX stage (no
ptxas) and writes one ``<kernel>.<key hash>.ptx`` per job plus ``index.json`` (job labels). The
PTX is normalised before it is written: debug records (``.loc``, ``.file``, ``$L__tmp`` labels, the ``.debug_*``
sections, ``// begin/end inline asm`` and other comments) are dropped, since they carry source
line numbers and inlined-helper names that move with any edit of the source but are not code.
The key of a job is its kernel name, runtime signature, options and the constexprs whose value
is not None/False: a new constexpr flag that is off (and optional pointers passed as None, which
Triton makes constexpr) leaves the key unchanged, so a dump before a flag was added matches the
dump after it with the flag off.

``diff`` matches jobs by key and reports per kernel: identical, register-allocation-neutral (the
same instruction stream once virtual registers are renumbered in order of first use, and the
``.reg`` declarations ignored), or different (with the first differing lines); and jobs present
on one side only. Exit status 1 if a job differs or is missing after (new launch variants, e.g. of
a new constexpr flag turned on, are listed but are no failure).

Results (sm_90, quick matrix; attention fwd/dq/dk-dv and the decode kernel, 2 shared CPU cores):
- issue 14 item 6 (block loops of the three interval attention kernels into one span helper
  each over tuples of run-time values, shared feature-group non-finite guards, RoPE helpers in
  _rotary.py shared with the decode kernel): all 128 launch variants of the quick matrix
  (interval fwd 40, dq 38, dk/dv 38, preprocess 4, decode 8) have identical PTX before and after.
  Two traps on the way, both fixed: loop-carried values must keep their order (scf.for iter_args
  follow the defining scope's order: m_i, l_i, acc and (pass, pair-first, pair-second)
  accumulators), and moving tl.cos / tl.sin of the decode kernel before the partner load
  reorders its code (the shared helper returns the angles).
- relative-position bias (HAS_BIAS / HAS_GATE constexprs off, bias pointers and ints passed as
  None): all 121 unbiased interval-attention variants of the quick matrix (fwd 40, dq 38, dk/dv
  38, preprocess 5; ``dump --skip-flag HAS_BIAS``) have PTX identical to KERNEL-DEDUPE-DONE's.
- frame-rate masks (issue 15 item 3, constexpr K_BLOCK, None when off; sample matrix, sm_90,
  attention kernels): the 12 band/chunked launch variants are identical before and after; the 3
  frame-mask variants (K_BLOCK=3) are new.
- decode kernel relative bias and GQA (issue 15 item 1, WavLM step_fixed; constexprs HAS_BIAS /
  HAS_GATE default False and GROUP default None, bias pointers and ints passed as None when off;
  dumps on 87f93d4 and after, ``--only 'decode|preprocess'``): quick matrix, sm_90 and sm_80, all
  8 unbiased decode and 5 preprocess variants identical; full matrix, sm_90, all 54 unbiased
  decode variants identical; the bias variants (plain, gated, gated + GQA ring) are new.
- duplicate D4 (program ids, row and column indices of the decode kernel and of interval
  attention's backward preprocess folded into triton_kernels/_grid.py ``_head_row_tile``, its
  grid-axis order a constexpr): identical PTX for every decode and preprocess variant of the
  quick matrix (sm_90, sm_80) and the full matrix (sm_90, decode 90 incl. bias, preprocess 9).
- sink keys (issue 15 item 2, constexpr HAS_SINK and the runtime int sink, both None when off;
  sample matrix, sm_90, ``--only "interval|conv"``; the quick matrix below): the 18
  interval-attention variants (fwd 5, dq 5, dk/dv 5, preprocess 3; band, chunked, frame, biased)
  are identical before and after; the 6 sink variants (HAS_SINK=True, fp32 D32 table and fp16
  D64 interleaved, each kernel) are new.
- issue 14 item 6, second pass (fwd/dq preamble -> _query_setup; conv weight-gradient loop ->
  _split_items/_time_tile, transposed-conv tap -> _strided_tap; ConvNeXt channel sweep ->
  _channel_block): sample matrix (all 46 interval-attention, conv and ConvNeXt variants) and
  quick matrix of the touched conv/ConvNeXt kernels (dw/grp bwd_dw 21, dw/grp bwd_dx 19,
  ConvNeXt 12) identical. Traps: the kernel's own head pointers (O; DO, DQ) must be computed
  where they were, between _query_program and _query_tile (_head_bases inside the helper;
  after it, dq's PTX reorders), and ``rm & (u >= 0) & ...`` must keep its operand order
  (_strided_tap takes the row mask first). Quick matrix, interval attention, both changes
  together against the commit before the sinks (dumps split with ``--case``): all 161 variants
  (fwd 54, dq 51, dk/dv 51, preprocess 5) identical; 12 new HAS_SINK variants.
  Then the key-tile loads of the forward and dq block functions -> _key_tile (dq zeroes
  non-finite k before v is loaded, kept inside the helper): sample matrix 18/18 against main,
  quick matrix fwd 54/54 and dq 51/51 (dk/dv untouched) against before the sinks: identical.
- decode kernel sink keys (issue 15 item 2, streaming side; constexpr HAS_SINK default False, sink
  pointers, SINK and strides passed as None when off; ``--only decode``, dumps on 99b6a54 and
  after): quick matrix sm_80 11/11 and sm_90 11/11, full matrix sm_80 90/90 and sm_90 90/90
  identical; the sink variants (alone, unbounded, gated bias + GQA ring) are new.
- relative bias with sink keys (issue 15, the saturated bucket rule: under HAS_SINK the bias
  column is clamped to the table in the three attention kernels and the dq kernel's drel atomics
  use the clamped column; ``--only interval``, sm_90, dumps on 99b6a54 and after, extracted with
  ``git archive``, ``pyencoder/triton_kernels`` linked to the copy's ``triton_kernels``): quick
  matrix 173/173 identical (fwd 58, dq 55, dk/dv 55, preprocess 5: the 161 band / chunked / biased
  variants and the 12 sink variants without a bias); the 3 sink + bias variants are new.
- decode kernel, the sink span's and the ring's online-softmax step folded into one
  ``_softmax_block`` helper (``--only decode``, dumps on 74b1860 and after): quick matrix sm_90
  16/16 and sm_80 16/16, full matrix sm_90 126/126 identical (sinks, bias, GQA included).
"""
import argparse
import hashlib
import json
import os
import re
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)


def _job_key(job, target):
    const = {k: v for k, v in job["constexprs"].items() if v is not None and v is not False}
    runtime = {k: v for k, v in job["signature"].items() if v != "constexpr"}
    blob = json.dumps([job["kernel"], runtime, const, job["options"], target], sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_DROP = re.compile(r"^\s*(\.loc|\.file|//|\$L__tmp\d+:)")


def normalise(ptx):
    """PTX without debug records and comments (see the module docstring)."""
    out, in_debug = [], False
    for line in ptx.splitlines():
        s = line.strip()
        if s.startswith(".section") and ".debug" in s:
            in_debug = True
            continue
        if in_debug:
            if s == "}":
                in_debug = False
            continue
        if not s or _DROP.match(line):
            continue
        out.append(line.rstrip())
    return "\n".join(out) + "\n"


class _PTXReady(Exception):
    pass


def _stop_after_ptx(backend, stages, options, language, capability):
    make_ptx = stages["ptx"]

    def ptx(src, metadata):
        raise _PTXReady(make_ptx(src, metadata))
    stages["ptx"] = ptx


def compile_ptx(job, target):
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cc = int(target.split("_")[1])
    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    src = ASTSource(fn=fn, signature=job["signature"], constexprs=job["constexprs"])
    old = knobs.runtime.add_stages_inspection_hook
    knobs.runtime.add_stages_inspection_hook = _stop_after_ptx
    try:   # a kernel already in Triton's cache comes back whole
        return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                              options=dict(job["options"])).asm["ptx"]
    except _PTXReady as done:
        return done.args[0]
    finally:
        knobs.runtime.add_stages_inspection_hook = old


def _work(args):
    job, target, out = args
    path = os.path.join(out, f"{job['kernel'].lstrip('_')}.{_job_key(job, target)}.ptx")
    try:
        text = normalise(compile_ptx(job, target))
    except Exception as e:  # noqa: BLE001 - reported
        return path, f"{type(e).__name__}: {e}"[:2000]
    with open(path, "w") as f:
        f.write(text)
    return path, None


def dump(out, matrix, target, only, workers, skip=(), case=None):
    sys.path.insert(0, os.path.join(_ROOT, "tests"))
    sys.path.insert(0, _ROOT)
    import test_triton_compile as TC

    os.makedirs(out, exist_ok=True)
    jobs = [j for j in TC.capture(matrix) if target in j["targets"]]
    if only:
        jobs = [j for j in jobs if re.search(only, j["kernel"])]
    if case:
        jobs = [j for j in jobs if re.search(case, j["case"])]
    jobs = [j for j in jobs if not any(j["constexprs"].get(n) for n in skip)]
    index = {}
    for j in jobs:
        name = f"{j['kernel'].lstrip('_')}.{_job_key(j, target)}.ptx"
        index[name] = f"{j['kernel']} [{j['case']}] {TC._config_label(j)}"
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
    t0 = time.time()
    todo = [(j, target, out) for j in jobs]
    import concurrent.futures as cf
    import multiprocessing as mp
    import _subproc
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork"),
                                initializer=_subproc.die_with_parent,
                                initargs=(os.getpid(),)) as ex:
        results = list(ex.map(_work, todo))
    bad = [(p, e) for p, e in results if e]
    for p, e in bad:
        print(f"FAIL {os.path.basename(p)}: {e}")
    print(f"{len(jobs)} launch variants for {target} ({matrix} matrix) -> {out}, "
          f"{len(bad)} failed, {time.time() - t0:.0f} s")
    return 1 if bad else 0


_REG = re.compile(r"%[a-z]+\d+")


def _renumber(text):
    """Virtual registers renamed in order of first use; .reg declarations dropped."""
    names = {}

    def sub(m):
        r = m.group(0)
        if r not in names:
            names[r] = f"%v{len(names)}"
        return names[r]
    lines = [ln for ln in text.splitlines() if not ln.strip().startswith(".reg")]
    return "\n".join(_REG.sub(sub, ln) for ln in lines)


def diff(a, b):
    ia = json.load(open(os.path.join(a, "index.json")))
    ib = json.load(open(os.path.join(b, "index.json")))
    same, neutral, changed = [], [], []
    for name in sorted(set(ia) & set(ib)):
        ta = open(os.path.join(a, name)).read()
        tb = open(os.path.join(b, name)).read()
        if ta == tb:
            same.append(name)
        elif _renumber(ta) == _renumber(tb):
            neutral.append(name)
        else:
            changed.append(name)
    by_kernel = {}
    for tag, names in (("identical", same), ("regalloc-neutral", neutral), ("different", changed)):
        for n in names:
            by_kernel.setdefault(n.split(".")[0], {}).setdefault(tag, 0)
            by_kernel[n.split(".")[0]][tag] += 1
    for k, counts in sorted(by_kernel.items()):
        print(f"{k}: " + ", ".join(f"{v} {t}" for t, v in counts.items()))
    for n in changed:
        la = open(os.path.join(a, n)).read().splitlines()
        lb = open(os.path.join(b, n)).read().splitlines()
        first = next((i for i, (x, y) in enumerate(zip(la, lb)) if x != y), min(len(la), len(lb)))
        print(f"DIFFERENT {ia[n]}: {len(la)} vs {len(lb)} lines, first at line {first + 1}:\n"
              f"  - {la[first] if first < len(la) else '<end>'}\n"
              f"  + {lb[first] if first < len(lb) else '<end>'}")
    only_a = sorted(set(ia) - set(ib))
    only_b = sorted(set(ib) - set(ia))
    for n in only_a:
        print(f"ONLY BEFORE {ia[n]}")
    for n in only_b:
        print(f"ONLY AFTER {ib[n]}")
    print(f"{len(same)} identical, {len(neutral)} register-allocation-neutral, {len(changed)} "
          f"different, {len(only_a)} only before, {len(only_b)} only after")
    return 1 if changed or only_a else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("out")
    d.add_argument("--matrix", default="quick", choices=("sample", "quick", "full"))
    d.add_argument("--target", default="sm_90", choices=("sm_80", "sm_90"))
    d.add_argument("--only", help="regex on kernel names")
    d.add_argument("--case", help="regex on the case labels of tests/test_triton_compile.py "
                                  "(e.g. a matrix's cheaper cases)")
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--skip-flag", action="append", default=[],
                   help="skip the jobs where this constexpr is on (e.g. HAS_BIAS: only the "
                        "variants that existed before a flag was added)")
    c = sub.add_parser("diff")
    c.add_argument("before")
    c.add_argument("after")
    args = ap.parse_args(argv)
    if args.cmd == "dump":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            sys.exit("unset TRITON_INTERPRET: the kernels must be JITFunctions here")
        return dump(args.out, args.matrix, args.target, args.only, args.workers,
                    args.skip_flag, args.case)
    return diff(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
