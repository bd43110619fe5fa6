"""Interval attention: pyencoder's Triton kernels against the named anchors, forward, backward
and forward+backward, with RoPE (on every side) and without it (the attention kernel alone).

Providers (GPU): pyencoder-triton (RoPE as PYENCODER_ROPE_MODE says: auto by default, cos/sin
tables for windows up to a 256-key bucket, q and k pre-rotated above);
pyencoder-triton-ropetable (the same kernels with cos/sin loaded from float32 tables built once per call, PYENCODER_ROPE_TABLE=1 and
PYENCODER_ROPE_MODE=table); pyencoder-triton-prerot (q and k rotated once by the rotation kernel,
the attention kernels without RoPE: PYENCODER_ROPE_MODE=pre); pyencoder-triton-pipe (the
boundary-block loops software-pipelined, PYENCODER_PIPELINE_MASKED=1, RoPE mode auto: the A/B of
that untimed flag, rope-off rows included); pyencoder-triton-compiled (the same call under
torch.compile, fullgraph, as the compiled anchors: Inductor launches our Triton kernels from its
own wrapper, the host path a compiled model gets; RoPE mode auto); without RoPE the two RoPE variants run
pyencoder-triton's kernels, so rope-off rows skip them when pyencoder-triton runs too; reference
(pyencoder's plain-torch path); sdpa-mask (scaled_dot_product_attention with a dense boolean
N x N mask); flex (torch.nn.attention.flex_attention, block mask built once per case outside the
timing); flash-attn (window_size=(left, right), band masks only, when flash_attn is installed).
The anchors' RoPE is what a competent user writes: sdpa-mask and flex compile RoPE and the
attention call as one graph (torch.compile, fullgraph, Inductor fuses the rotation into its
kernels); flash-attn gets a compiled RoPE pass before its kernel.
CPU: only reference and sdpa-mask, at small N, float32 (a smoke run).

Compiled anchors are checked, not trusted: Dynamo's caches are reset per case (reusing one compiled
function across (N, mask) recompiles per N, and a mask closure's Python ints would be guarded on:
past the recompile limit Dynamo silently runs Flex unfused with the full score matrix). Flex's
mask parameters are 0-d tensors (``flex_mask_mod``), so the masks of one (N, RoPE) share one
graph and its kernels through Inductor's and Triton's caches (one compile, not one per mask); each
case may compile at most 2 graphs (inference and training); the timed calls run with
``error_on_recompile``; and Flex's "called without torch.compile()" warning is an error. Any of
these raises CompiledAnchorError and stops the run: a number measured against a broken anchor is
never written.

Rows: ``rope: true`` (q and k rotated, the kernels' fused RoPE vs the anchors' compiled pass) and
``rope: false`` (no RoPE anywhere, attention only); ``--rope on|off|both`` (GPU default both,
CPU on).

First call (``--first-call``): for each case and provider, a fresh process with empty Triton and
Inductor caches times the first forward call and the first forward+backward (compile, autotune
and run), per PYENCODER_TRITON_AUTOTUNE mode (``--first-call-modes``, default ``auto 0``); records
have ``bench: "attention-first-call"``. Only these rows are measured with ``--first-call``.

Shapes: wav2vec2-base (B=8, H=12, D=64) and large (B=8, H=16, D=64); N in {500, 1500, 3000,
12000}; masks band(None,0), band(None,3), band(250,3), band(50,3), chunked(4,128,3). bf16 on GPU.

Each record: provider, shape, B, H, D, N, mask, dtype, rope, fwd/bwd/fwdbwd medians and 20/80 %
quantiles (ms) (triton.testing.do_bench: CUDA events around each call, so host-side launch cost
shows whenever it exceeds the kernel time), ``fwd_host_us`` (CUDA: host cost of one forward, 20
calls back to back with perf_counter and one synchronize at the end, median of 5; when the kernel
is slower than the host this is GPU time: compare with fwd_ms), ``fwd_graph_ms`` (CUDA: the
forward captured once into a CUDA graph and the replay timed with do_bench: GPU time without host
overhead; a failed capture leaves it None and records ``fwd_graph_error``), both None on CPU and
printed as "host 123 us  graph 0.045 ms"; the same two for forward + backward
(``fwdbwd_host_us``, ``fwdbwd_graph_ms``: one CUDA graph holding the forward and the
autograd backward, printed as "fwd+bwd graph 0.4 ms"); with ``--autotune full`` (or auto via the
environment) our rows also name ``triton_autotune`` and the ``tiles`` the autotuner chose per
kernel (the data to rank the default tile table); in-band TFLOP/s (FLOPs over visible (query, key) pairs only: 4*D per pair forward,
10*D backward), and for windows <= 1024 wide the % of the measured copy bandwidth reached by the
minimum HBM traffic (q, k, v read, out written; backward: q, k, v, out, dout read, dq, dk, dv
written). Written to <results root>/<device>/attention.jsonl, each row appended as soon as it is
measured (a run cut by a time limit keeps every finished row). Where the host time goes, call by
call: ``python -m benchmarks.profile_attention``.

``--masks band:LEFT:RIGHT | chunked:CHUNK:LEFT_CHUNKS:LOOKAHEAD ...`` (None: unbounded left)
replaces the mask list. pyencoder-triton rows carry ``rope_mode`` (kernel / table / pre, or the
PYENCODER_ROPE_MODE in effect) besides ``rope_table``.

    python -m benchmarks.bench_attention [--quick] [--providers P ...] [--n N ...]
        [--masks M ...] [--rope on|off|both] [--first-call [--first-call-modes M ...]]
"""
import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings

import torch

from benchmarks._common import (ROOT, JsonlRows, bench, copy_bandwidth_gbs, device_slug, env_info,
                                host_graph_fields, host_graph_text, temp_env, write_jsonl)

SHAPES = {"wav2vec2-base": (8, 12, 64), "wav2vec2-large": (8, 16, 64)}
NS = (500, 1500, 3000, 12000)
MASKS = (("band", None, 0), ("band", None, 3), ("band", 250, 3), ("band", 50, 3),
         ("chunked", 4, 128, 3))
GPU_PROVIDERS = ("pyencoder-triton", "pyencoder-triton-ropetable", "pyencoder-triton-prerot",
                 "pyencoder-triton-pipe", "pyencoder-triton-compiled",
                 "reference", "sdpa-mask",
                 "flex", "flash-attn")
CPU_PROVIDERS = ("reference", "sdpa-mask")


def mask_name(m):
    return f"{m[0]}({', '.join('None' if x is None else str(x) for x in m[1:])})"


def mask_params(m):
    from pyencoder.ops.attention import band_params, chunked_params
    return band_params(m[1], m[2]) if m[0] == "band" else chunked_params(m[1], m[2], m[3])


def bounds(n, m):
    """lo, hi (inclusive) per query position 0..n-1, clipped to [0, n - 1]."""
    block, lo_off, hi_off = mask_params(m)
    p = torch.arange(n, dtype=torch.int64)
    base = (p // block) * block
    lo = torch.zeros_like(p) if lo_off < 0 else (base - lo_off).clamp(min=0)
    hi = (base + hi_off).clamp(max=n - 1)
    return lo, hi


def visible_pairs(n, m):
    lo, hi = bounds(n, m)
    return int((hi - lo + 1).clamp(min=0).sum())


def window(m):
    block, lo_off, hi_off = mask_params(m)
    return None if lo_off < 0 else lo_off + hi_off + block


def dense_mask(n, m, device):
    lo, hi = bounds(n, m)
    s = torch.arange(n)
    return ((s[None, :] >= lo[:, None]) & (s[None, :] <= hi[:, None])).to(device)


# providers whose RoPE/attention is compiled (graph count, no recompiles while timed)
COMPILED = ("sdpa-mask", "flex", "flash-attn", "pyencoder-triton-compiled")
# ours under torch.compile: a failure there is a row's error, not a broken anchor (which stops
# the run so that no ratio against it is written)
NOT_ANCHORS = ("pyencoder-triton-compiled",)
_MAX_GRAPHS = 2                                   # per case: inference and training graphs
_UNFUSED_WARNING = r".*flex_attention called without torch\.compile"


class CompiledAnchorError(RuntimeError):
    """A compiled anchor recompiled, broke its graph or ran uncompiled (unfused Flex)."""


class _Compiler:
    """torch.compile with a graph counter: one per case, Dynamo's caches reset first."""

    def __init__(self, backend="inductor"):
        if backend not in ("inductor", "eager"):
            raise ValueError(f"compile_backend must be 'inductor' or 'eager'; got {backend!r}")
        self.backend = backend
        self.graphs = 0

    def _compile_graph(self, gm, example_inputs):
        self.graphs += 1
        if self.graphs > _MAX_GRAPHS:
            raise CompiledAnchorError(f"{self.graphs} graphs compiled for one case (at most "
                                      f"{_MAX_GRAPHS}: inference and training)")
        if self.backend == "inductor":
            from torch._inductor.compile_fx import compile_fx
            return compile_fx(gm, example_inputs)
        return gm.forward

    def __call__(self, fn):
        torch._dynamo.reset()
        return torch.compile(fn, backend=self._compile_graph, dynamic=False, fullgraph=True)


def _rope_fn(rope, n, device):
    """The anchors' RoPE pass as plain tensor ops over positions and frequencies computed once,
    so that torch.compile traces it into the anchor's graph."""
    if rope is None:
        return lambda x: x
    from pyencoder.rope import apply_rope
    pos = torch.arange(n, device=device)
    inv = rope.inv_freq(device).to(torch.float32)
    interleaved = rope.interleaved
    return lambda x: apply_rope(x, pos, inv, interleaved)


def flex_interval_mod(q_step, k_step, lo, hi, sink, device):
    """A Flex mask_mod in the interval form every mask here takes: key j is visible from query i
    iff base - lo <= j <= base + hi, base = (i // q_step) * k_step, or j < sink. The integers
    are 0-d tensors on ``device``, not Python ints: Dynamo lifts captured tensors into graph
    inputs, so every mask of one size traces the same graph and generates the same kernels, and
    after the first case Inductor's FX graph cache and Triton's cache serve the others (an int
    would be baked into each case's kernel source: one compile per case, ~12 s of a GPU session's
    time each). Flex loads the scalars in its partially masked blocks only."""
    q_step, k_step, lo, hi, sink = (torch.tensor(x, device=device)
                                    for x in (q_step, k_step, lo, hi, sink))

    def mask_mod(b, h, qi, kj):
        base = (qi // q_step) * k_step
        return ((kj >= base - lo) & (kj <= base + hi)) | (kj < sink)
    return mask_mod


def flex_mask_mod(m, n, device):
    """Flex's mask_mod for interval mask ``m`` over ``n`` keys (flex_interval_mod with both steps
    the mask block; an unbounded left: lo = n + block, never binding)."""
    block, lo_off, hi_off = mask_params(m)
    return flex_interval_mod(block, block, lo_off if lo_off >= 0 else n + block, hi_off, 0,
                             device)


def make_provider(name, q, k, v, m, rope, compiler=None):
    """A callable running the forward (returns the output), or raises NotImplementedError.
    rope=None: no RoPE on any side. ``compiler`` compiles the anchors (default: a fresh
    inductor _Compiler)."""
    import pyencoder
    n = q.shape[2]
    compiler = _Compiler() if compiler is None else compiler
    rot = _rope_fn(rope, n, q.device)
    if name == "pyencoder-triton-compiled":
        block, lo, hi = mask_params(m)

        def attn(q, k, v):
            return pyencoder.ops.interval_attention(q, k, v, block=block, lo_off=lo, hi_off=hi,
                                                     rope=rope, backend="triton")
        fn = compiler(attn)
        return lambda: fn(q, k, v)
    if name in ("pyencoder-triton", "pyencoder-triton-ropetable", "pyencoder-triton-prerot",
                "pyencoder-triton-pipe", "reference"):
        backend = "reference" if name == "reference" else "triton"
        block, lo, hi = mask_params(m)
        return lambda: pyencoder.ops.interval_attention(q, k, v, block=block, lo_off=lo,
                                                         hi_off=hi, rope=rope, backend=backend)
    if name == "sdpa-mask":
        mask = dense_mask(n, m, q.device)
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def attn(q, k, v):
            return sdpa(rot(q), rot(k), v, attn_mask=mask)
        if rope is None:
            return lambda: attn(q, k, v)
        fn = compiler(attn)
        return lambda: fn(q, k, v)
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        if q.device.type == "cpu" and q.requires_grad:
            raise NotImplementedError("FlexAttention has no backward on CPU")
        bm = create_block_mask(flex_mask_mod(m, n, q.device), None, None, n, n, device=q.device)

        def attn(q, k, v):
            return flex_attention(rot(q), rot(k), v, block_mask=bm)
        fn = compiler(attn)
        return lambda: fn(q, k, v)
    if name == "flash-attn":
        if m[0] != "band":
            raise NotImplementedError("flash-attn has no chunked mask")
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            raise NotImplementedError("flash_attn is not installed")
        ws = (-1 if m[1] is None else m[1], m[2])

        def prep(q, k, v):
            return rot(q).transpose(1, 2), rot(k).transpose(1, 2), v.transpose(1, 2)
        prep = prep if rope is None else compiler(prep)

        def run():
            return flash_attn_func(*prep(q, k, v), window_size=ws).transpose(1, 2)
        return run
    raise ValueError(f"unknown provider {name!r}")


@contextlib.contextmanager
def _compiled_checks(name):
    """While a compiled anchor runs: Flex's unfused-path warning raises, and (``strict``) so
    does any recompile."""
    if name not in COMPILED:
        yield lambda: contextlib.nullcontext()
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=_UNFUSED_WARNING)
        yield lambda: torch._dynamo.config.patch(error_on_recompile=True)


def _anchor_failure(name, e):
    if name not in COMPILED or name in NOT_ANCHORS:
        return None
    if isinstance(e, CompiledAnchorError):
        return e
    if isinstance(e, UserWarning) or isinstance(getattr(e, "inner_exception", None),
                                                CompiledAnchorError) or \
            type(e).__name__ in ("RecompileError", "Unsupported", "FailOnRecompileLimitHit"):
        return CompiledAnchorError(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    return None


def record_failure(rec, name, e, device):
    """A provider failing on a case (OOM, unsupported shape): raise if it is a broken compiled
    anchor (a number against it would be wrong), else note the error in ``rec`` and return it."""
    broken = _anchor_failure(name, e)
    if broken is not None:
        raise broken from e
    rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if device == "cuda":
        torch.cuda.empty_cache()
    return rec


# the RoPE-mode variants of pyencoder-triton: the environment they run under
ROPE_VARIANTS = {"pyencoder-triton-ropetable": {"PYENCODER_ROPE_TABLE": "1",
                                                "PYENCODER_ROPE_MODE": "table"},
                 "pyencoder-triton-prerot": {"PYENCODER_ROPE_MODE": "pre"}}
# kernel variants of pyencoder-triton (RoPE mode auto) that change the kernels without RoPE too
KERNEL_VARIANTS = {"pyencoder-triton-pipe": {"PYENCODER_PIPELINE_MASKED": "1"}}


def _rope_table_env(name):
    """The variant's environment (ROPE_VARIANTS, KERNEL_VARIANTS) while it runs (forward and
    backward): table mode for -ropetable, pre-rotation for -prerot, the flag of a kernel variant;
    nothing for the others."""
    return temp_env(**ROPE_VARIANTS.get(name, KERNEL_VARIANTS.get(name, {})))


def parse_mask(text):
    """"band:LEFT:RIGHT" or "chunked:CHUNK:LEFT_CHUNKS:LOOKAHEAD" (None for an unbounded left)
    -> the MASKS tuple form; ValueError naming --masks otherwise."""
    parts = text.split(":")
    want = {"band": 2, "chunked": 3}
    if parts[0] not in want or len(parts) != want[parts[0]] + 1:
        raise ValueError(f"--masks: expected band:LEFT:RIGHT or chunked:CHUNK:LEFT_CHUNKS:"
                         f"LOOKAHEAD; got {text!r}")
    try:
        vals = tuple(None if x == "None" else int(x) for x in parts[1:])
    except ValueError:
        raise ValueError(f"--masks: expected integers or None after {parts[0]!r}; got {text!r}")
    return (parts[0],) + vals


def measure(name, *args, rope=True, compile_backend="inductor", grad=True):
    """One record; ``grad=False`` times the forward only (inputs without gradients)."""
    with _rope_table_env(name):
        rec = _measure(name, *args, rope=rope, compile_backend=compile_backend, grad=grad)
    if name.startswith("pyencoder-triton"):
        rec["rope_table"] = "1" if name.endswith("ropetable") else \
            os.environ.get("PYENCODER_ROPE_TABLE", "auto")
        rec["rope_mode"] = ROPE_VARIANTS.get(name, {}).get(
            "PYENCODER_ROPE_MODE", os.environ.get("PYENCODER_ROPE_MODE", "auto"))
        rec["pipe_masked"] = KERNEL_VARIANTS.get(name, {}).get(
            "PYENCODER_PIPELINE_MASKED", os.environ.get("PYENCODER_PIPELINE_MASKED", "0"))
        mode = os.environ.get("PYENCODER_TRITON_AUTOTUNE", "auto") or "auto"
        if mode not in ("0", "auto"):
            rec["triton_autotune"] = mode
            try:       # Triton's autotuner internals: a change there costs this field only
                rec["tiles"] = tuned_tiles()
            except Exception as e:
                rec["tiles"] = f"unknown ({type(e).__name__}: {e})"
    return rec


def tuned_tiles():
    """{kernel: "BLOCK_M x BLOCK_N, warps, stages"} the Triton autotuner chose for the key it
    tuned last (this case's, when it was new): the data that ranks the default tile table
    (pyencoder.ops._attention_triton._DEFAULT_TILES)."""
    from pyencoder.ops import _attention_triton as A
    out = {}
    for name, entry in (A._kernels or {}).items():
        tuners = entry[2]
        if not tuners:
            continue
        for mode, tuner in tuners.items():
            cache = getattr(tuner, "cache", None) or {}
            if cache:
                cfg = list(cache.values())[-1]
                out[f"{name}/{mode}"] = (f"{cfg.kwargs.get('BLOCK_M')}x{cfg.kwargs.get('BLOCK_N')}"
                                         f" w{cfg.num_warps} s{cfg.num_stages}")
    return out


def _measure(name, shape_name, B, H, D, n, m, dtype, device, warmup, rep, bw, rope=True,
             compile_backend="inductor", grad=True):
    import pyencoder
    rec = {"bench": "attention", "provider": name, "shape": shape_name, "B": B, "H": H, "D": D,
           "N": n, "mask": mask_name(m), "dtype": str(dtype).replace("torch.", ""),
           "rope": bool(rope)}
    torch.manual_seed(0)
    leaves = [torch.randn(B, H, n, D, device=device, dtype=dtype, requires_grad=grad)
              for _ in range(3)]
    compiler = _Compiler(compile_backend)
    try:
        with _compiled_checks(name) as strict:
            fwd = make_provider(name, *leaves, m, pyencoder.Rope(D) if rope else None, compiler)
            with torch.no_grad():
                fwd()
            if grad:
                out = fwd()
                dout = torch.randn_like(out)

                def bwd():
                    torch.autograd.grad(out, leaves, dout, retain_graph=True)

                def fwdbwd():
                    torch.autograd.grad(fwd(), leaves, dout)

                bwd()
            with strict():
                with torch.no_grad():
                    t_f = bench(fwd, warmup, rep)
                    # CUDA: host cost per call and CUDA-graph replay (None on CPU)
                    host_graph = host_graph_fields(fwd, "fwd", warmup, rep)
                if grad:
                    t_b = bench(bwd, warmup, rep)
                    t_fb = bench(fwdbwd, warmup, rep)
                    # the forward + backward replayed from one CUDA graph: GPU time only (the
                    # first GPU run's fwd+bwd rows were host-bound for ours at N=1500)
                    host_graph.update(host_graph_fields(fwdbwd, "fwdbwd", warmup, rep))
        if name in COMPILED:
            rec["graphs"] = compiler.graphs
            rec["compiled"] = compile_backend if compiler.graphs else None
        out = None  # free the graph (bwd closes over it)
        if device == "cuda" and grad:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fwdbwd()
            torch.cuda.synchronize()
            rec["fwdbwd_peak_mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    except NotImplementedError as e:
        rec["skipped"] = str(e)
        return rec
    except Exception as e:  # OOM or a provider failing on this shape: record it, keep going
        return record_failure(rec, name, e, device)
    times = (("fwd", t_f), ("bwd", t_b), ("fwdbwd", t_fb)) if grad else (("fwd", t_f),)
    for key, t in times:
        rec[f"{key}_ms"] = t["median_ms"]
        rec[f"{key}_p20_ms"] = t["p20_ms"]
        rec[f"{key}_p80_ms"] = t["p80_ms"]
    rec.update(host_graph)
    pairs = visible_pairs(n, m) * B * H
    rec["visible_pairs"] = pairs
    rec["fwd_tflops"] = 4 * D * pairs / (t_f["median_ms"] * 1e-3) / 1e12
    if not grad:
        return rec
    rec["bwd_tflops"] = 10 * D * pairs / (t_b["median_ms"] * 1e-3) / 1e12
    rec["fwdbwd_tflops"] = 14 * D * pairs / (t_fb["median_ms"] * 1e-3) / 1e12
    w = window(m)
    if w is not None and w <= 1024:
        esz = torch.empty((), dtype=dtype).element_size()
        tile = B * H * n * D * esz
        rec["copy_bw_gbs"] = bw
        rec["fwd_hbm_pct"] = 100 * (4 * tile / (t_f["median_ms"] * 1e-3) / 1e9) / bw
        rec["bwd_hbm_pct"] = 100 * (8 * tile / (t_b["median_ms"] * 1e-3) / 1e9) / bw
    return rec


def _first_call_child(spec):
    """In a fresh process (empty caches): seconds of the first forward, of the backward after it,
    and ms of a second forward. The forward runs with gradients on (the training graph)."""
    import pyencoder
    name, device = spec["provider"], spec["device"]
    B, H, D, n = spec["B"], spec["H"], spec["D"], spec["N"]
    dtype = getattr(torch, spec["dtype"])
    m = tuple(spec["mask"])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    leaves = [torch.randn(B, H, n, D, device=device, dtype=dtype, requires_grad=True)
              for _ in range(3)]
    dout = torch.randn(B, H, n, D, device=device, dtype=dtype)
    sync()
    with _rope_table_env(name), _compiled_checks(name):
        t0 = time.perf_counter()
        fwd = make_provider(name, *leaves, m, pyencoder.Rope(D) if spec["rope"] else None,
                            _Compiler(spec["compile_backend"]))
        out = fwd()
        sync()
        t1 = time.perf_counter()
        torch.autograd.grad(out, leaves, dout)
        sync()
        t2 = time.perf_counter()
        fwd()
        sync()
        t3 = time.perf_counter()
    return {"first_fwd_s": t1 - t0, "first_bwd_s": t2 - t1, "first_fwdbwd_s": t2 - t0,
            "second_fwd_ms": (t3 - t2) * 1e3}


def first_call(name, shape_name, B, H, D, n, m, dtype, device, mode, rope=True,
               compile_backend="inductor", timeout=600):
    """A first-call record: the provider's first forward and forward+backward in a fresh process
    with empty Triton and Inductor caches, PYENCODER_TRITON_AUTOTUNE=mode. The child runs in its
    own process group, killed whole on timeout or interruption."""
    rec = {"bench": "attention-first-call", "provider": name, "shape": shape_name, "B": B, "H": H,
           "D": D, "N": n, "mask": mask_name(m), "dtype": str(dtype).replace("torch.", ""),
           "rope": bool(rope), "autotune": mode if name.startswith("pyencoder-triton") else None}
    spec = dict(provider=name, device=device, B=B, H=H, D=D, N=n, mask=list(m),
                dtype=rec["dtype"], rope=bool(rope), compile_backend=compile_backend)
    with tempfile.TemporaryDirectory(prefix="pyencoder-first-call-") as tmp:
        env = dict(os.environ, PYENCODER_TRITON_AUTOTUNE=mode,
                   TRITON_CACHE_DIR=os.path.join(tmp, "triton"),
                   TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"))
        cmd = [sys.executable, "-m", "benchmarks.bench_attention", "--first-call-child",
               json.dumps(spec)]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            rec["error"] = f"no result within {timeout} s"
            return rec
        except BaseException:
            _kill_group(proc)
            proc.wait()
            raise
        _kill_group(proc)
    lines = [x for x in out.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (err.strip().splitlines() or ["?"])[-1][:300]
        if "CompiledAnchorError" in err:
            raise CompiledAnchorError(f"{name} first call: {tail}")
        rec["error"] = f"rc {proc.returncode}: {tail}"
        return rec
    rec.update(json.loads(lines[-1]))
    return rec


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--quick", action="store_true", help="a small subset (about a minute)")
    p.add_argument("--providers", nargs="*", default=None)
    p.add_argument("--n", nargs="*", type=int, default=None)
    p.add_argument("--shapes", nargs="*", default=None, choices=sorted(SHAPES))
    p.add_argument("--masks", nargs="*", default=None,
                   help="band:LEFT:RIGHT or chunked:CHUNK:LEFT_CHUNKS:LOOKAHEAD (None: unbounded "
                        "left), e.g. band:None:0 band:50:3 chunked:4:128:3")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--rope", choices=("on", "off", "both"), default=None,
                   help="rows with RoPE, attention-only rows, or both (GPU default: both; CPU: on)")
    p.add_argument("--compile-backend", choices=("inductor", "eager"), default="inductor",
                   help="torch.compile backend of the anchors (eager: a cheap CPU rehearsal)")
    p.add_argument("--autotune", choices=("0", "auto", "full"), default=None,
                   help="PYENCODER_TRITON_AUTOTUNE for this run (default: the environment's); "
                        "rows of a tuned run record the tiles the autotuner chose")
    p.add_argument("--first-call", action="store_true",
                   help="measure only the first call per case (fresh process, empty caches)")
    p.add_argument("--first-call-modes", nargs="*", default=["auto", "0"],
                   choices=("auto", "full", "0"), help="PYENCODER_TRITON_AUTOTUNE values")
    p.add_argument("--first-call-timeout", type=float, default=600.0)
    p.add_argument("--first-call-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.autotune is not None:
        os.environ["PYENCODER_TRITON_AUTOTUNE"] = args.autotune
    if args.first_call_child:
        print(json.dumps(_first_call_child(json.loads(args.first_call_child))), flush=True)
        return 0

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    if gpu:
        dtype, providers, ns, shapes, masks = torch.bfloat16, GPU_PROVIDERS, NS, SHAPES, MASKS
        warmup, rep = 25, 100
        if args.quick:
            ns, shapes = (500, 3000), {"wav2vec2-base": SHAPES["wav2vec2-base"]}
            masks = (MASKS[0], MASKS[3], MASKS[4])
    else:
        dtype, providers, ns = torch.float32, CPU_PROVIDERS, (500,) if args.quick else (500, 1500)
        shapes = {"wav2vec2-base-b1": (1, 12, 64)}
        masks = (MASKS[3], MASKS[4]) if args.quick else MASKS
        warmup, rep = 10, 200
    if args.providers:
        providers = tuple(x for x in args.providers)
    if args.n:
        ns = tuple(args.n)
    if args.shapes:
        shapes = {k: SHAPES[k] for k in args.shapes}
    if args.masks:
        try:
            masks = tuple(parse_mask(x) for x in args.masks)
        except ValueError as e:
            p.error(str(e))
    ropes = {"on": (True,), "off": (False,), "both": (True, False)}[
        args.rope or ("both" if gpu else "on")]
    if args.first_call:
        return _main_first_call(args, shapes, ns, masks, providers, ropes, dtype, device)
    bw = copy_bandwidth_gbs()
    print(f"device {device_slug()}  copy bandwidth {bw:.0f} GB/s  "
          f"torch {env_info()['torch']}  triton {env_info()['triton']}", flush=True)
    records = JsonlRows("attention", write=not args.no_write)   # each row on disk once measured
    for shape_name, (B, H, D) in shapes.items():
        for n in ns:
            for rope in ropes:
                for m in masks:
                    for prov in providers:
                        if not rope and prov in ROPE_VARIANTS and "pyencoder-triton" in providers:
                            continue   # without RoPE the variants run pyencoder-triton's kernels
                        rec = measure(prov, shape_name, B, H, D, n, m, dtype, device, warmup,
                                      rep, bw, rope=rope, compile_backend=args.compile_backend)
                        records.append(rec)
                        status = rec.get("error") or rec.get("skipped")
                        if status:
                            line = status
                        else:
                            line = (f"fwd {rec['fwd_ms']:8.3f} ms  bwd {rec['bwd_ms']:8.3f} ms  "
                                    f"fwd+bwd {rec['fwdbwd_ms']:8.3f} ms  "
                                    + (f"{rec['fwd_tflops']:6.1f} TFLOP/s fwd" if gpu else
                                       f"{rec['fwd_tflops'] * 1e3:6.1f} GFLOP/s fwd"))
                            if "fwd_hbm_pct" in rec:
                                line += (f"  {rec['fwd_hbm_pct']:5.1f} % "
                                         f"{'HBM' if gpu else 'copy bandwidth'} fwd")
                            line += host_graph_text(rec)
                            if rec.get("fwdbwd_graph_ms") is not None:
                                line += f"  fwd+bwd graph {rec['fwdbwd_graph_ms']:.3f} ms"
                            if rec.get("tiles"):
                                line += "  tiles " + ", ".join(f"{k} {v}" for k, v in
                                                               rec["tiles"].items())
                        print(f"{shape_name:16s} N={n:6d} {mask_name(m):18s} "
                              f"{'rope' if rope else 'no-rope':7s} {prov:26s} {line}", flush=True)
    if not args.no_write:
        print(f"wrote {records.path or write_jsonl('attention', [])}")
    return 0


def _main_first_call(args, shapes, ns, masks, providers, ropes, dtype, device):
    records = JsonlRows("attention", write=not args.no_write)   # each row on disk once measured
    for shape_name, (B, H, D) in shapes.items():
        for n in ns:
            for m in masks:
                for rope in ropes:
                    for prov in providers:
                        modes = args.first_call_modes if prov.startswith("pyencoder-triton") \
                            else args.first_call_modes[:1]
                        for mode in modes:
                            rec = first_call(prov, shape_name, B, H, D, n, m, dtype, device, mode,
                                             rope, args.compile_backend, args.first_call_timeout)
                            records.append(rec)
                            line = rec.get("error") or (
                                f"first fwd {rec['first_fwd_s']:7.2f} s  first fwd+bwd "
                                f"{rec['first_fwdbwd_s']:7.2f} s  then fwd "
                                f"{rec['second_fwd_ms']:8.3f} ms")
                            print(f"{shape_name:16s} N={n:6d} {mask_name(m):18s} "
                                  f"{'rope' if rope else 'no-rope':7s} {prov:26s} "
                                  f"autotune={rec['autotune']} {line}", flush=True)
    if not args.no_write:
        print(f"wrote {records.path or write_jsonl('attention', [])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
