"""Every Triton kernel compiled for real GPUs (sm_80, sm_90) on a machine without one.

The interpreter tests (TRITON_INTERPRET=1) check semantics but not what the real compiler
rejects (dot shapes and dtypes, constexpr misuse, type promotion, shared memory). This test runs
the launchers themselves (pyencoder.ops._attention_triton, pyencoder.ops._conv_triton,
pyencoder.ops._convnext_triton, pyencoder.ops._decode_attention_triton) in a subprocess without
TRITON_INTERPRET, on CPU tensors,
with ``JITFunction.run`` replaced by a recorder: each launch becomes a compile job (signature
derived from the bound arguments the way triton.runtime.jit does, constexprs, num_warps,
num_stages, and the target: attention tiles come from a per-architecture table, so attention
launches are captured once per target), and ``Autotuner.run`` records every config its pruning
keeps instead of benchmarking. The jobs are compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` in a pool of 2 processes,
which die with the driver (parent-death signal); the pytest entries run the driver in its own
process group through tests/_subproc.py, killed whole if the test fails or is interrupted, and
with no wall-clock limit (a loaded machine makes it slow, not wrong).

Checks: no compile error (kernel, target and config are named), shared memory within the opt-in
limit of the target (sm_80: 163 KiB, sm_90: 227 KiB). Registers and spills come from the
``ptxas -v`` log of the compile (reported in the summary table, not failures).

Signatures are the plain form: integer arguments are "i32"/"i64" and pointers carry no alignment
attribute (real launches also specialise integers equal to 1 and 16-divisible values and
pointers; those variants only add facts for the compiler).

Matrices (``--matrix`` or ``PYENCODER_COMPILE_MATRIX``):
- ``sample`` (the default tier, ``make test``): every kernel, dtype and target at least once, at
  the default (untimed) tiles: attention bf16 head_dim 128 partial RoPE, fp32 head_dim 32 NeoX in
  the RoPE-table mode, fp16 head_dim 64 interleaved unbounded, fp16 head_dim 64 with the gated
  relative bias (WavLM); one conv case per dtype (fp16
  depthwise with state and update, bf16 grouped, fp32 strided channels-last), one ConvNeXt and one
  decode case per dtype: 61 launch variants, 92 compiles; plus one frame-rate mask case (fp16,
  K_BLOCK=3) of the three attention kernels, 3 more variants per target, one decode case with
  the gated relative bias and a GQA ring (fp16, HAS_BIAS / HAS_GATE / GROUP=2), 1 more per
  target, two decode cases with resident sink keys (HAS_SINK: fp32 head_dim 32 NeoX unbounded,
  and fp16 head_dim 64 with the gated bias and a GQA ring), 2 more per target, and the sink-key
  variant (HAS_SINK, IntervalMask.sink) of the three attention kernels in the fp32 head_dim 32
  and fp16 head_dim 64 interleaved cases, 6 more per target, and with the gated relative bias
  (HAS_SINK with HAS_BIAS / HAS_GATE: the clamped bias column), 3 more. The whole sample,
  counted last after the attention backward's preprocess kernel was folded into the dq kernel
  (the counts above included it): 95 launch variants, 132 compiles.
  Every matrix adds the sink-key variant of its default-tile (not all-configs) head_dim <= 64
  cases, biased ones included.
- ``quick``: every config of every launcher list at the shapes that need the most shared memory
  and registers (head_dim 128 with partial RoPE for attention, widest conv tiles) in each element
  size, plus one case per remaining code path; the attention RoPE table mode
  (PYENCODER_ROPE_TABLE=1, cases labelled "table") at head_dim 128 with full and partial RoPE,
  every config, and one 16-bit interleaved case.
- ``full`` (``make test-compile-full``, pytest marker ``compile_full``, deselected by default):
  adds every dtype x head dim (32, 64, 80, 128) x RoPE (none, NeoX, interleaved, partial, the
  rotary ones in both RoPE modes) and the conv width/grouping/stride/activation grid.
Results are cached per job (keyed by the kernel's source hash, the job, the target and the Triton
version) in ``$PYENCODER_COMPILE_CACHE`` or ``<tmp>/pyencoder-triton-compile``, so a rerun only
compiles what changed.

Cost: a head_dim-128 attention tile takes 10-100 s through ptxas on one core, so under pytest
the jobs stop after the LLVM IR by default (compile errors and shared memory, no registers);
``PYENCODER_COMPILE_PTXAS=1`` runs ptxas too and fills the registers/spills columns. Run directly
for the full table with ptxas: ``python tests/test_triton_compile.py [--matrix quick|full]``.
"""
import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time

try:
    import pytest
except ImportError:  # the driver subprocess does not need pytest
    pytest = None

TARGETS = {"sm_80": (80, 166912), "sm_90": (90, 232448)}
MATRICES = ("sample", "quick", "full")
_OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)


# ------------------------------------------------------------------------------------------------
# Capture: run the launchers with a recording JITFunction.run
# ------------------------------------------------------------------------------------------------

class _Recorder:
    def __init__(self):
        self.jobs = {}
        self.case = ""
        self.all_configs = True
        self.targets = tuple(TARGETS)

    def install(self):
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        rec = self

        def run(fn, *args, grid, warmup, **kwargs):
            params = {k: v for k, v in kwargs.items() if k in fn.arg_names}
            bound = fn.signature.bind(*args, **params)
            bound.apply_defaults()
            options = {"num_warps": 4, "num_stages": 3}
            options.update({k: v for k, v in kwargs.items()
                            if k in _OPTION_KEYS and v is not None})
            signature, constexprs = {}, {}
            for p, (name, val) in zip(fn.params, bound.arguments.items()):
                if p.is_constexpr:
                    signature[name] = "constexpr"
                    constexprs[name] = val
                    continue
                ty = native_specialize_impl(BaseBackend, val, False, False, False)[0]
                signature[name] = ty
                if ty == "constexpr":
                    constexprs[name] = val
            rec.add(fn, signature, constexprs, options)

        def autotune_run(tuner, *args, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = tuner.prune_configs(kwargs)
            configs = configs if rec.all_configs else configs[:1]
            for cfg in configs:
                tuner.fn.run(*args, **kwargs, **cfg.all_kwargs())
            tuner.nargs = None

        JITFunction.run = run
        Autotuner.run = autotune_run

    def add(self, fn, signature, constexprs, options):
        job = dict(module=fn.module, kernel=fn.fn.__name__, signature=signature,
                   constexprs=constexprs, options=options, targets=list(self.targets))
        key = json.dumps(job, sort_keys=True, default=str)
        if key not in self.jobs:
            job["case"] = self.case
            job["source_key"] = fn.cache_key
            self.jobs[key] = job


def _attention_cases(matrix):
    """(dtype, head_dim, rope, all_configs, bounded, rope_table[, bias]) cases of a matrix; bias
    "gated" / "plain": the relative-position bias variants (HAS_BIAS, with or without HAS_GATE)."""
    dts = ("fp16", "bf16", "fp32")
    ropes = ("none", "neox", "interleaved", "partial")
    # the fused relative bias (WavLM's gated bias: head_dim 64, no RoPE; a plain bias with RoPE)
    if matrix == "sample":
        yield ("fp16", 64, "none", False, True, False, "gated")
    elif matrix == "quick":
        yield ("bf16", 64, "none", True, True, False, "gated")
        yield ("fp32", 128, "partial", True, True, False, "gated")
        yield ("fp16", 64, "neox", False, False, False, "plain")
    else:
        for dn in dts:
            for D in (64, 128):
                yield (dn, D, "none", True, True, False, "gated")
                yield (dn, D, "partial", True, False, False, "plain")
    if matrix == "sample":
        # every kernel, dtype, RoPE layout and RoPE mode once, at the default tiles
        yield ("bf16", 128, "partial", False, True, False)
        yield ("fp32", 32, "neox", False, True, True)
        yield ("fp16", 64, "interleaved", False, False, False)
    elif matrix == "full":
        for dn in dts:
            for D in (32, 64, 80, 128):
                for rope in ropes:
                    yield (dn, D, rope, True, True, False)
                    if rope != "none":
                        yield (dn, D, rope, True, True, True)
        yield ("fp16", 64, "none", False, True, False)
    else:
        for dn in ("bf16", "fp32"):
            yield (dn, 128, "partial", True, True, False)
            # RoPE table mode: the widest cos/sin tiles (full rotary) and the partial split
            yield (dn, 128, "neox", True, True, True)
        yield ("bf16", 128, "partial", True, True, True)
        yield ("fp16", 64, "interleaved", False, True, False)
        yield ("fp16", 64, "interleaved", False, True, True)
        yield ("fp32", 32, "neox", False, True, False)
        yield ("bf16", 80, "none", False, True, False)
        yield ("fp16", 64, "none", False, False, False)


def _env(**values):
    """benchmarks._common.temp_env (the repo root is on sys.path by then: main() puts it there)."""
    from benchmarks._common import temp_env
    return temp_env(**values)


def _run_attention(rec, matrix):
    """Per target (the default tile table has a row per architecture): the untimed default tiles
    (PYENCODER_TRITON_AUTOTUNE=0, deterministic backward) always; with all_configs also every
    tile of the fully pruned autotune lists (``full``, a superset of ``auto``'s) and the
    out-of-resources fallback tile."""
    import torch

    import pyencoder.ops._attention_triton as A
    A._interpret = lambda: False
    dts = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    default_configs = A._default_configs
    for target in TARGETS:
        A._arch = lambda device, t=target: t.replace("_", "")
        rec.targets = (target,)
        for dn, D, rope, all_cfgs, bounded, table, *bias in _attention_cases(matrix):
            dt = dts[dn]
            bias = bias[0] if bias else None
            B, Hq, Hk, N = 2, 4, 2, 40
            q = torch.randn(B, Hq, N, D, dtype=dt)
            k = torch.randn(B, Hk, N, D, dtype=dt)
            v = torch.randn(B, Hk, N, D, dtype=dt)
            rot = {"none": 0, "neox": D, "interleaved": D, "partial": D // 2}[rope]
            inv = None if rot == 0 else torch.rand(rot // 2)
            klen = torch.tensor([N, N - 3], dtype=torch.int32) if bounded else None
            lo = 4000 if bounded else -1  # a wide window: the window prune keeps every tile
            mask = (klen, 4, lo, 3, 0, 0, D ** -0.5, rope == "interleaved")
            bkw = {}
            if bias is not None:
                bkw = dict(rel_bias=torch.randn(Hq, 2 * N), rel_offset=-N,
                           gate=torch.rand(B, Hq, N) if bias == "gated" else None)
            rec.case = (f"{dn} D{D} rope={rope}" + ("" if bounded else " unbounded")
                        + (" table" if table else "") + (f" bias={bias}" if bias else ""))
            rec.all_configs = all_cfgs
            with _env(PYENCODER_ROPE_TABLE="1" if table else "0"):
                for mode in (("0", "full") if all_cfgs else ("0",)):
                    with _env(PYENCODER_TRITON_AUTOTUNE=mode):
                        out, lse = A.forward(q, k, v, inv, *mask, **bkw)
                        for det in ((True, False) if mode == "full" else (True,)):
                            A.backward(out, q, k, v, out, lse, inv, *mask, det, **bkw)
                if all_cfgs:
                    # a recording run never runs out of resources: ask for the fallback tile
                    A._default_configs = lambda *a, **kw: []
                    try:
                        with _env(PYENCODER_TRITON_AUTOTUNE="0"):
                            out, lse = A.forward(q, k, v, inv, *mask, **bkw)
                            A.backward(out, q, k, v, out, lse, inv, *mask, True, **bkw)
                    finally:
                        A._default_configs = default_configs
                if not all_cfgs and D <= 64:
                    # the sink-key variant (HAS_SINK) of the three attention kernels; of a
                    # biased case, sinks with the bias (the clamped bias column)
                    rec.case += " sink"
                    with _env(PYENCODER_ROPE_TABLE="1" if table else "0",
                              PYENCODER_TRITON_AUTOTUNE="0"):
                        out, lse = A.forward(q, k, v, inv, *mask, sink=5, **bkw)
                        A.backward(out, q, k, v, out, lse, inv, *mask, True, sink=5, **bkw)
        # a frame-rate (cross-attention) mask: the same kernels with the constexpr K_BLOCK
        # (query blocks of 16 positions see key frames of 3: 16:3), Nq != Nk
        q = torch.randn(2, 4, 48, 64, dtype=torch.float16)
        k = torch.randn(2, 2, 21, 64, dtype=torch.float16)
        inv = torch.rand(32)
        mask = (torch.tensor([21, 17], dtype=torch.int32), 16, 3, 5, 0, 0, 0.125, False)
        rec.case = "fp16 D64 rope=neox frames 16:3"
        rec.all_configs = False
        with _env(PYENCODER_ROPE_TABLE="0", PYENCODER_TRITON_AUTOTUNE="0"):
            out, lse = A.forward(q, k, k, inv, *mask, kb=3)
            A.backward(out, q, k, k, out, lse, inv, *mask, True, kb=3)
        # the RoPE prerotate mode: the rotation kernel (forward into bf16, the gradient's inverse
        # rotation from float32) around the no-RoPE kernels with float32 dq / dk
        q = torch.randn(2, 4, 40, 64, dtype=torch.bfloat16)
        k = torch.randn(2, 2, 40, 64, dtype=torch.bfloat16)
        mask = (None, 1, 8, 3, 0, 0, 0.125, True)
        rec.case = "bf16 D64 rope=interleaved prerotate"
        with _env(PYENCODER_ROPE_MODE="pre", PYENCODER_TRITON_AUTOTUNE="0"):
            out, lse = A.forward(q, k, k, inv, *mask)
            A.backward(out, q, k, k, out, lse, inv, *mask, True)
    rec.targets = tuple(TARGETS)


def _conv_cases(matrix):
    # (C, Cout, groups, K, stride, activation, state, bias, channel_last)
    base = [
        (64, 64, 64, 4, 1, "silu", True, True, False),      # depthwise, streaming width
        (64, 64, 64, 31, 2, "gelu", False, True, True),     # depthwise, wide, strided, NLC
        (64, 64, 64, 128, 1, None, True, False, False),     # depthwise, very wide
        (64, 128, 64, 4, 1, None, True, True, False),       # channel multiplier
        (64, 64, 2, 4, 1, "silu", True, True, False),       # grouped
        (64, 64, 1, 31, 2, "gelu", True, False, True),      # dense, strided, NLC
        (96, 64, 4, 128, 1, None, False, True, False),      # grouped, very wide
    ]
    if matrix == "sample":
        return base[:1] + base[4:5] + base[1:2]
    if matrix == "full":
        for C, Co, g, K, s, act, st, b, cl in list(base):
            for act2 in (None, "silu", "gelu"):
                for s2 in (1, 2, 3):
                    if s2 < K:
                        base.append((C, Co, g, K, s2, act2, st, b, cl))
                        base.append((C, Co, g, K, s2, act2, not st, not b, cl))
    return base


def _run_conv(rec, matrix):
    import torch

    import pyencoder.ops._conv_triton as CT
    dts = (torch.float16, torch.bfloat16, torch.float32)
    seen = set()
    for i, dt in enumerate(dts):
        cases = _conv_cases(matrix)
        if matrix == "sample":   # one case per dtype: fp16 depthwise, bf16 grouped, fp32 strided
            cases = cases[i:i + 1]
        for case in cases:
            if (dt, case) in seen:
                continue
            seen.add((dt, case))
            C, Co, g, K, s, act, st, b, cl = case
            B, L = 2, 256
            x = torch.randn(B, C, L, dtype=dt)
            if cl:
                x = x.transpose(1, 2).contiguous().transpose(1, 2)
            w = torch.randn(Co, C // g, K, dtype=dt)
            bias = torch.randn(Co, dtype=dt) if b else None
            state = torch.randn(B, C, K - s, dtype=dt) if st else None
            kind = "depthwise" if g == C and Co == C else ("dense" if g == 1 else f"groups={g}")
            rec.case = (f"{str(dt)[6:]} {kind} C{C}->{Co} K{K} stride{s} act={act} "
                        f"state={st} bias={b}" + (" NLC" if cl else ""))
            y, fin = CT.forward(x, w, bias, state, s, g, act)
            CT.backward(torch.randn_like(y), torch.randn_like(fin), x, w, bias, state, s, g, act)
            if s == 1 and K > 1:
                pool = torch.randn(B + 1, C, K - 1, dtype=dt)
                idx = torch.tensor([1, -1], dtype=torch.int32)
                CT.update(x[..., :3], pool, w, bias, idx, g, act)
                CT.update(x[..., :1], pool[:B].clone(), w, bias, None, g, act)
    # the grouped forward's GPU A/B variants (benchmarks/bench_conv.py GRP_VARIANTS): the
    # tap-major reduction (constexpr TAP_MAJOR; 48 channels a group: blocks of 16; 64: of 64) and
    # tile overrides (PYENCODER_CONV_GRP_TILE), channel-last bf16 as a model feeds it
    dt = torch.bfloat16
    for C, tap, tile in ((96, True, None), (128, True, "128,64,8,3"), (96, False, "256,64,8,3")):
        x = torch.randn(2, 256, C, dtype=dt).transpose(1, 2)
        w = torch.randn(C, C // 2, 128, dtype=dt)
        rec.case = f"bf16 groups=2 C{C}->{C} K128 NLC tap_major={tap} tile={tile}"
        env = {"PYENCODER_CONV_TAP_MAJOR": "1"} if tap else {}
        if tile is not None:
            env["PYENCODER_CONV_GRP_TILE"] = tile
        with _env(**env):
            CT.forward(x, w, None, None, 1, 2, None)


def _run_decode(rec, matrix):
    import torch

    import pyencoder.ops._decode_attention_triton as DT
    dts = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    # (dtype, head_dim, rope, lo_off[, extras]): extras "plain" / "gated" (the relative bias of
    # WavLM's streaming step; lo_off >= 0), "+gqa" adds a ring with half the heads (GROUP=2),
    # "sink" / "+sink" resident sink keys (HAS_SINK, 3 sink positions)
    if matrix == "full":
        cases = [(dn, D, rope, lo) for dn in dts for D in (32, 64, 80, 128)
                 for rope in ("none", "neox", "interleaved", "partial") for lo in (8, -1)]
        cases += [(dn, D, rope, 8, bias) for dn in dts for D in (64, 128)
                  for rope in ("none", "partial") for bias in ("plain", "gated", "gated+gqa")]
        cases += [(dn, D, rope, lo, ex) for dn in dts for D in (64, 128)
                  for rope in ("none", "partial") for lo, ex in ((8, "sink"), (-1, "sink"),
                                                                 (8, "gated+gqa+sink"))]
    elif matrix == "sample":
        cases = [("fp16", 64, "partial", 8), ("bf16", 128, "interleaved", -1),
                 ("fp32", 80, "none", 8), ("fp16", 64, "none", 8, "gated+gqa"),
                 ("fp32", 32, "neox", -1, "sink"), ("fp16", 64, "none", 8, "gated+gqa+sink")]
    else:
        cases = [(dn, D, "partial", 8) for dn in dts for D in (64, 128)]
        cases += [("fp16", 32, "interleaved", -1), ("fp32", 80, "none", -1)]
        cases += [("bf16", 128, "partial", 8, "gated"), ("fp32", 64, "none", 8, "plain"),
                  ("fp16", 64, "neox", 8, "gated+gqa")]
        cases += [(dn, 128, "partial", 8, "sink") for dn in dts]
        cases += [("bf16", 128, "partial", 8, "gated+gqa+sink"), ("fp32", 80, "none", -1, "sink")]
    for dn, D, rope, lo, *extras in cases:
        dt = dts[dn]
        label = extras[0] if extras else ""
        flags = set(label.split("+")) - {""}
        bias = "gated" if "gated" in flags else "plain" if "plain" in flags else None
        B, H, M, cap = 2, 4, 5, 48
        Hk = H // 2 if "gqa" in flags else H
        q = torch.randn(B, H, M, D, dtype=dt)
        kr = torch.randn(B, Hk, cap, D, dtype=dt)
        vr = torch.randn(B, Hk, cap, D, dtype=dt)
        rot = {"none": 0, "neox": D, "interleaved": D, "partial": D // 2}[rope]
        inv = None if rot == 0 else torch.rand(rot // 2)
        qpos = torch.arange(M)[None].repeat(B, 1) + 60
        kw = {}
        if bias:
            kw = dict(rel_bias=torch.randn(H, 4 + lo + 3), rel_offset=-(lo + 3),
                      gate=torch.rand(B, H, M, dtype=dt) if bias == "gated" else None)
        if "sink" in flags:
            kw.update(sink_k=torch.randn(B, Hk, 3, D, dtype=dt),
                      sink_v=torch.randn(B, Hk, 3, D, dtype=dt))
        rec.case = f"{dn} D{D} rope={rope} lo={lo}" + (f" bias={label}" if bias else "") + (
            " sinks=3" if "sink" in flags else "")
        DT.decode_attention_triton(q, kr, vr, qpos, torch.tensor([M, 2]), torch.tensor([64, 70]),
                                   inv, rope == "interleaved", 4, lo, 3, D ** -0.5, **kw)
    # step_fixed's fused state write (pyencoder.ops._ring_write_triton): rotated keys into the
    # ring, values, queries; float32 frames into a ring of the case's dtype
    import types

    import pyencoder.ops._ring_write_triton as RW
    RW._interpret = lambda: False
    for dn, D, rope in ((("fp16", 64, "neox"), ("bf16", 128, "partial"), ("fp32", 80, "none"))
                        if matrix != "full" else
                        [(dn, D, r) for dn in dts for D in (64, 128)
                         for r in ("none", "neox", "interleaved", "partial")]):
        dt = dts[dn]
        rot = {"none": 0, "neox": D, "interleaved": D, "partial": D // 2}[rope]
        B, H, n, cap = 2, 4, 3, 48
        st = types.SimpleNamespace(k=torch.randn(B, H, cap, D, dtype=dt),
                                   v=torch.randn(B, H, cap, D, dtype=dt),
                                   q=torch.randn(B, H, 8, D, dtype=dt),
                                   pos=torch.tensor([70, 3]), pending=torch.tensor([2, 0]))
        new = [torch.randn(B, n, H, D).transpose(1, 2) for _ in range(3)]
        rec.case = f"{dn} D{D} rope={rope} ring write"
        RW.ring_write(st, *new, None if rot == 0 else torch.rand(rot // 2),
                      rope == "interleaved")
        # with held-back queries: the same launch advances the query queue (QUEUE); bf16 also
        # one frame, one held back (1-row blocks)
        rec.case = f"{dn} D{D} rope={rope} ring write + query queue"
        RW.ring_write(st, *new, None if rot == 0 else torch.rand(rot // 2),
                      rope == "interleaved", 3)
        if dn == "bf16" or matrix == "full":
            rec.case = f"{dn} D{D} rope={rope} ring write n=1 + query queue keep=1"
            st.pending = torch.tensor([1, 0])
            RW.ring_write(st, *[t[:, :, :1] for t in new],
                          None if rot == 0 else torch.rand(rot // 2), rope == "interleaved", 1)
    # the layer's residual kernel (E = 768; 4 frames, 3 held back as the 80 ms chunked step):
    # queue + sum + LayerNorm (pre-LN: the sum stored too; post-LN: not), the FFN's add +
    # LayerNorm (no queue), the queue and sum alone (3 column blocks)
    # (pre-LN, the sum stored: plus the feed-forward's output bias (sum_bias) when the layer
    # folds its residual add into that GEMM, as the bench stack's bf16 layers do)
    variants = [("fp16", True, True, True, False), ("bf16", True, True, True, True),
                ("bf16", True, True, False, False), ("bf16", False, True, False, False),
                ("fp32", True, False, True, False)]
    if matrix == "full":
        variants = [(dn, qu, ln, su, sb) for dn in dts for qu in (True, False)
                    for ln in (True, False) for su in (True, False) if ln or su
                    for sb in ((False, True) if ln and su else (False,))]
    for dn, queue, norm, need_sum, sum_bias in variants:
        dt = dts[dn]
        ln = torch.nn.LayerNorm(768).to(dt) if norm else None
        # 4 frames, 3 held back; and one frame, one held back (1-row blocks: a 20 ms band step)
        for n, keep in ((4, 3), (1, 1)) if dn == "bf16" or matrix == "full" else ((4, 3),):
            res = torch.randn(2, 8, 768, dtype=dt)
            rec.case = (f"{dn} residual n={n} queue={queue} layer_norm={norm} sum={need_sum}"
                        f" sum_bias={sum_bias}")
            with torch.no_grad():   # the LayerNorm in the launch (not while autograd records)
                RW.residual_step(res, torch.tensor([keep, 0]), torch.randn(2, n, 768, dtype=dt),
                                 torch.randn(2, n, 768, dtype=dt), keep if queue else 0, ln,
                                 need_sum=need_sum,
                                 sum_bias=torch.randn(768, dtype=dt) if sum_bias else None)
    # the running GroupNorm's step (a converted wav2vec2-base's first conv layer, C = 512): the
    # 80 ms step's 256 frames (4 tiles of 64) with the affine, and a 20 ms step's 64 without
    import pyencoder.ops._running_norm_triton as RNT
    for dn in (dts if matrix == "full" else ("fp16", "bf16", "fp32")):
        dt = dts[dn]
        for T, affine in ((256, True), (64, False)) if dn == "bf16" or matrix == "full" else \
                ((256, True),):
            C = 512
            tot = torch.randn(2, C, dtype=torch.float64)
            # with the affine, the GELU after it (the encoder's first conv layer)
            rec.case = f"{dn} running norm C={C} T={T} affine={affine} gelu={affine}"
            RNT.running_norm_step(torch.randn(2, C, T, dtype=dt),
                                  torch.randn(C, dtype=dt) if affine else None,
                                  torch.randn(C, dtype=dt) if affine else None, 1e-5,
                                  torch.tensor([3, 0]), tot, tot.abs().clone(), gelu=affine)
    # a "layer" extractor's channel LayerNorm + GELU (C = 512: an 80 ms step's first conv layer,
    # 16-frame tiles; its last, 4 frames) and the feature projection's LayerNorm (no GELU, the
    # (B, T, C) output layout)
    import pyencoder.ops._channel_norm_triton as CNT
    for dn in (dts if matrix == "full" else ("fp16", "bf16", "fp32")):
        dt = dts[dn]
        cases = ((256, True, True), (4, True, True), (4, False, False))
        for T, gelu, affine in cases if dn == "bf16" or matrix == "full" else cases[:1]:
            C = 512
            rec.case = f"{dn} channel norm C={C} T={T} gelu={gelu} affine={affine}"
            w = torch.randn(C, dtype=dt) if affine else None
            CNT.channel_norm_act(torch.randn(1, C, T, dtype=dt), w,
                                 torch.randn(C, dtype=dt) if affine else None, 1e-5, gelu=gelu,
                                 time_major=not gelu)


def _run_convnext(rec, matrix):
    import torch

    import pyencoder.ops._convnext_triton as CXT
    dts = (torch.float16, torch.bfloat16, torch.float32)
    # (C, K, state, bias/affine, channel_last): one channel block of 16 / 512 / 1024 channels in
    # registers, and 1536 channels looping over 2 blocks
    cases = [(1024, 7, True, True, True), (1536, 7, True, True, True),
             (512, 7, False, False, False), (12, 1, False, True, False)]
    if matrix == "full":
        cases += [(C, K, st, a, cl) for C in (768, 2048) for K in (3, 7, 31)
                  for st in (False, True) for a in (False, True) for cl in (False, True)]
    for i, dt in enumerate(dts):
        for C, K, st, aff, cl in (cases[i:i + 1] if matrix == "sample" else cases):
            B, L = 2, 256
            x = torch.randn(B, L, C, dtype=dt).transpose(1, 2) if cl else \
                torch.randn(B, C, L, dtype=dt)
            v = (lambda: torch.randn(C, dtype=dt)) if aff else (lambda: None)
            s = torch.randn(B, C, K - 1, dtype=dt) if st else None
            rec.case = (f"{str(dt)[6:]} C{C} K{K} state={st} affine={aff}" +
                        (" NLC" if cl else ""))
            CXT.forward(x, torch.randn(C, 1, K, dtype=dt), v(), v(), v(), s, 1e-6)


def capture(matrix):
    rec = _Recorder()
    rec.install()
    _run_attention(rec, matrix)
    _run_conv(rec, matrix)
    _run_convnext(rec, matrix)
    _run_decode(rec, matrix)
    return list(rec.jobs.values())


# ------------------------------------------------------------------------------------------------
# Compile
# ------------------------------------------------------------------------------------------------

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_usage(log):
    regs = [int(m) for m in _PTXAS_REGS.findall(log)]
    spills = [(int(a), int(b)) for a, b in _PTXAS_SPILL.findall(log)]
    if not regs:
        return None, None
    return regs[-1], (max(a + b for a, b in spills) if spills else 0)


def _run_ptxas(ptx, cc):
    import triton
    from triton import knobs
    try:
        ptxas = knobs.nvidia.ptxas.path
    except Exception:
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        import _subproc   # ptxas dies with this worker
        r = _subproc.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.o")])
    return r.stdout + r.stderr


class _StopAfterLLIR(Exception):
    pass


def _stop_after_llir(backend, stages, options, language, capability):
    def ptx(src, metadata):
        raise _StopAfterLLIR(metadata["shared"])
    stages["ptx"] = ptx


def compile_job(job, target, smem_only=False):
    """Compile one job for one target; returns a result dict (never raises). ``smem_only`` stops
    after the LLVM IR (shared memory known, no PTX, no ptxas: a fast survey)."""
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cc, limit = TARGETS[target]
    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    res = dict(kernel=job["kernel"], target=target, case=job["case"], config=_config_label(job),
               ok=False, error=None, smem=None, regs=None, spill=None, seconds=None)
    t0 = time.time()
    buf = io.StringIO()
    old = knobs.nvidia.dump_ptxas_log
    old_hook = knobs.runtime.add_stages_inspection_hook
    try:
        knobs.nvidia.dump_ptxas_log = True
        src = ASTSource(fn=fn, signature=job["signature"], constexprs=job["constexprs"])
        if smem_only:
            knobs.runtime.add_stages_inspection_hook = _stop_after_llir
            try:  # a kernel already in Triton's cache comes back whole
                c = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                   options=dict(job["options"]))
                res["smem"] = int(c.metadata.shared)
            except _StopAfterLLIR as stop:
                res["smem"] = int(stop.args[0])
            res["ok"] = True
            if res["smem"] > limit:
                res["error"] = f"shared memory {res['smem']} B > {limit} B opt-in limit of {target}"
            return res
        with contextlib.redirect_stdout(buf):
            c = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(job["options"]))
        res["smem"] = int(c.metadata.shared)
        log = buf.getvalue()
        if "Used" not in log:  # served from Triton's cache: ptxas did not run
            log = _run_ptxas(c.asm["ptx"], cc)
        res["regs"], res["spill"] = _ptxas_usage(log)
        res["ok"] = True
        if res["smem"] > limit:
            res["error"] = f"shared memory {res['smem']} B > {limit} B opt-in limit of {target}"
    except Exception as e:  # noqa: BLE001 - every compiler failure is a result
        msg = f"{type(e).__name__}: {e}"
        res["error"] = msg[:3000]
    finally:
        knobs.nvidia.dump_ptxas_log = old
        knobs.runtime.add_stages_inspection_hook = old_hook
        res["seconds"] = round(time.time() - t0, 2)
    return res


def _config_label(job):
    c = job["constexprs"]
    tiles = " ".join(f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in c.items()
                     if k.startswith("BLOCK_"))
    flags = " ".join(f"{k}={v}" for k, v in c.items()
                     if not k.startswith("BLOCK_") and v is not None and v is not False
                     and k.isupper())
    o = job["options"]
    return f"{tiles} w{o['num_warps']} s{o['num_stages']}" + (f" [{flags}]" if flags else "")


def _job_key(job, target, smem_only):
    import triton
    blob = json.dumps([job["module"], job["kernel"], job["signature"], job["constexprs"],
                       job["options"], job["source_key"], target, triton.__version__, smem_only],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _cache_dir():
    d = os.environ.get("PYENCODER_COMPILE_CACHE") or os.path.join(tempfile.gettempdir(),
                                                                   "pyencoder-triton-compile")
    os.makedirs(d, exist_ok=True)
    return d


def _compile_cached(args):
    job, target, path, smem_only = args
    res = compile_job(job, target, smem_only)
    if path is not None:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(res, f)
        os.replace(tmp, path)
    return res


def compile_all(jobs, workers=2, use_cache=True, smem_only=False):
    import concurrent.futures as cf
    import multiprocessing as mp

    cache = _cache_dir() if use_cache else None
    results, todo = [], []
    for job in jobs:
        for target in job.get("targets", TARGETS):
            path = None
            if cache is not None:
                path = os.path.join(cache, _job_key(job, target, smem_only) + ".json")
                if os.path.exists(path):
                    with open(path) as f:
                        r = json.load(f)
                    r["case"], r["cached"] = job["case"], True
                    results.append(r)
                    continue
            todo.append((job, target, path, smem_only))
    # biggest tiles first so that the slow compiles do not end up alone at the tail
    todo.sort(key=lambda a: -sum(v for k, v in a[0]["constexprs"].items()
                                 if k.startswith("BLOCK_") and isinstance(v, int)))
    if todo:
        import _subproc
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork"),
                                    initializer=_subproc.die_with_parent,
                                    initargs=(os.getpid(),)) as ex:
            results.extend(ex.map(_compile_cached, todo))
    return results


def format_table(results):
    rows = sorted(results, key=lambda r: (r["kernel"], r["case"], r["config"], r["target"]))
    head = ("kernel", "target", "case", "config", "regs", "spill B", "smem B", "s")
    data = [(r["kernel"].lstrip("_"), r["target"], r["case"], r["config"],
             "-" if r["regs"] is None else str(r["regs"]),
             "-" if r["spill"] is None else str(r["spill"]),
             "-" if r["smem"] is None else str(r["smem"]),
             "cache" if r.get("cached") else str(r["seconds"])) for r in rows]
    width = [max(len(h), *(len(d[i]) for d in data)) if data else len(h)
             for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, width))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(d, width)) for d in data]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--matrix", default=os.environ.get("PYENCODER_COMPILE_MATRIX", "sample"),
                    choices=MATRICES)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--only", help="regex on kernel names")
    ap.add_argument("--case", help="regex on case labels")
    ap.add_argument("--smem-only", action="store_true",
                    help="survey: stop after the LLVM IR (shared memory only, no ptxas)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: the kernels must be JITFunctions here")
    sys.path.insert(0, _ROOT)
    t0 = time.time()
    jobs = capture(args.matrix)
    if args.only:
        jobs = [j for j in jobs if re.search(args.only, j["kernel"])]
    if args.case:
        jobs = [j for j in jobs if re.search(args.case, j["case"])]
    results = compile_all(jobs, workers=args.workers, use_cache=not args.no_cache,
                          smem_only=args.smem_only)
    print(format_table(results))
    bad = [r for r in results if r["error"]]
    for r in bad:
        print(f"\nFAIL {r['kernel']} {r['target']} [{r['case']}] {r['config']}:\n  {r['error']}")
    fresh = sum(1 for r in results if not r.get("cached"))
    print(f"\nmatrix {args.matrix}: {len(jobs)} launch variants, {len(results)} compiles "
          f"({fresh} run, {len(results) - fresh} cached), {len(bad)} failed, "
          f"{time.time() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)
    return 1 if bad else 0


# ------------------------------------------------------------------------------------------------
# pytest entry
# ------------------------------------------------------------------------------------------------

def _has_triton_compiler():
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        return True
    except ImportError:
        return False


def _compile_in_subprocess(tmp_path, matrix):
    import _subproc

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("OMP_NUM_THREADS", "1")
    out = tmp_path / "results.json"
    cmd = [sys.executable, os.path.abspath(__file__), "--json", str(out), "--matrix", matrix]
    if os.environ.get("PYENCODER_COMPILE_PTXAS", "0") != "1":
        cmd.append("--smem-only")
    # no wall-clock limit: a loaded machine makes it slow, not wrong; the driver's process group
    # (compile pool included) is killed if the test fails or is interrupted
    proc = _subproc.run(cmd, env=env, cwd=_ROOT)
    print(proc.stdout[-20000:])
    if not out.exists():
        pytest.fail(f"compile driver crashed (rc {proc.returncode}):\n{proc.stderr[-5000:]}")
    results = json.loads(out.read_text())
    assert results, "no kernel launch was captured"
    bad = [f"{r['kernel']} on {r['target']} [{r['case']}] {r['config']}: {r['error']}"
           for r in results if r["error"]]
    assert not bad, "Triton kernels that do not compile or do not fit:\n" + "\n".join(bad)
    return results


if pytest is not None and __name__ != "__main__":
    _needs_triton = pytest.mark.skipif(not _has_triton_compiler(), reason="triton is not installed")

    @_needs_triton
    def test_sampled_triton_kernels_compile_for_sm80_sm90(tmp_path):
        """Default tier: every kernel, dtype and target at least once, at the default tiles."""
        results = _compile_in_subprocess(tmp_path, "sample")
        seen = {(r["kernel"], r["target"]) for r in results}
        kernels = {r["kernel"] for r in results}
        assert seen == {(k, t) for k in kernels for t in TARGETS}
        for name in ("_interval_attention_fwd_kernel", "_interval_attention_bwd_dq_kernel",
                     "_interval_attention_bwd_dkdv_kernel", "_causal_conv1d_dw_fwd_kernel",
                     "_causal_conv1d_grp_bwd_dw_kernel", "_convnext_dwconv_ln_fwd_kernel",
                     "_decode_attention_fwd_kernel", "_rope_rotate_kernel",
                     "_ring_write_kernel", "_residual_kernel", "_running_norm_step_kernel",
                     "_channel_norm_act_kernel"):
            assert name in kernels
        # the residual kernel with its LayerNorm, with and without the queue, per target
        assert {(r["target"], "QUEUE=True" in r["config"]) for r in results
                if r["kernel"] == "_residual_kernel" and "LN=True" in r["config"]} == {
                    (t, v) for t in TARGETS for v in (False, True)}
        # the ring write with and without the query queue, per target
        assert {(r["target"], "query queue" in r["case"]) for r in results
                if r["kernel"] == "_ring_write_kernel"} == {(t, v) for t in TARGETS
                                                             for v in (False, True)}
        # the grouped forward's tap-major variant and a tile override, per target
        variants = {(r["target"], "tap_major=True" in r["case"]) for r in results
                    if r["kernel"] == "_causal_conv1d_grp_fwd_kernel" and "tile=" in r["case"]}
        assert variants == {(t, v) for t in TARGETS for v in (False, True)}
        # the decode kernel with the gated relative bias and a GQA ring (WavLM's step), per target
        assert {r["target"] for r in results if r["kernel"] == "_decode_attention_fwd_kernel"
                and "bias=gated" in r["case"]} == set(TARGETS)
        # the decode kernel with resident sink keys (HAS_SINK), alone and with the gated bias + GQA
        dsink = {(r["target"], "bias=gated" in r["case"]) for r in results
                 if r["kernel"] == "_decode_attention_fwd_kernel"
                 and r["case"].endswith(" sinks=3")}
        assert dsink == {(t, b) for t in TARGETS for b in (False, True)}
        # the frame-rate mask variant (constexpr K_BLOCK) of each attention kernel, per target
        frames = {(r["kernel"], r["target"]) for r in results if "frames" in r["case"]}
        assert frames == {(k, t) for k in ("_interval_attention_fwd_kernel",
                                            "_interval_attention_bwd_dq_kernel",
                                            "_interval_attention_bwd_dkdv_kernel")
                          for t in TARGETS}
        # the sink-key variant (constexpr HAS_SINK) of each attention kernel, per target
        sink = {(r["kernel"], r["target"]) for r in results if r["case"].endswith(" sink")}
        assert sink == {(k, t) for k in ("_interval_attention_fwd_kernel",
                                          "_interval_attention_bwd_dq_kernel",
                                          "_interval_attention_bwd_dkdv_kernel")
                        for t in TARGETS}
        # sink keys with the gated relative bias (HAS_SINK + HAS_BIAS + HAS_GATE), per target
        sink_bias = {(r["kernel"], r["target"]) for r in results
                     if r["case"].endswith("bias=gated sink")}
        assert sink_bias == sink

    @_needs_triton
    @pytest.mark.compile_full
    def test_all_triton_kernels_compile_for_sm80_sm90(tmp_path):
        """``make test-compile-full``: every config of the tuned lists over the whole matrix
        (PYENCODER_COMPILE_MATRIX=quick for the smaller widest-shapes matrix)."""
        matrix = os.environ.get("PYENCODER_COMPILE_MATRIX", "full")
        if matrix not in MATRICES:
            raise ValueError(f"PYENCODER_COMPILE_MATRIX must be one of {MATRICES}; got {matrix!r}")
        _compile_in_subprocess(tmp_path, matrix)


if __name__ == "__main__":
    sys.exit(main())
