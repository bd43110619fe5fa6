"""Triton backend of the interval attention ops (``backend="triton"``).

Launchers for the kernels in pyencoder.triton_kernels.interval_attention, with the signatures of
pyencoder.reference.attention (``forward``, ``backward``, ``supports_forward``; the backward runs
on the backend its forward chose). The kernels apply RoPE themselves, so q and k go to the kernels
as given (any strides).

Tiles: under TRITON_INTERPRET=1 one fixed small config. On a GPU a per-architecture default table
(``_DEFAULT_TILES``: sm_80 / sm_90 rows, by kernel, dtype class and head-dim class) orders the
tiles of each kernel's tuned list; the list is first pruned to the tiles that fit the key's shared
memory and window. ``PYENCODER_TRITON_AUTOTUNE`` says how many are compiled and timed at the first
call of an autotune key (key: head-dim tile, rotary tiles, RoPE mode, window width bucketed to a
power of two and capped by the key count, dtypes; not N, offsets or lengths):
``auto`` (default) the table's first two, ``full`` the whole pruned list, ``0`` none (the table's
first choice, no timing). Default per key: forward 2, dq 2, dk/dv 2 compiles (before: 6 / 5 / 5).
The table is not ranked by GPU timings yet (see the comment above _T16_D64). The backward
never uses atomics, so dq/dk/dv are bitwise reproducible for a fixed config; ``deterministic=True`` additionally pins the table's first choice (no timing), so that
reproducibility holds across processes on the same architecture.

RoPE source (``PYENCODER_ROPE_MODE``, pyencoder.ops._attention_triton._rope_mode): ``kernel``
computes cos/sin in the kernels with tl.cos/tl.sin on every tile visit; ``table`` builds float32
cos/sin tables once per call (forward, and again in the backward) with
pyencoder.rope.rope_cos_sin (the reference's formula) over the absolute positions the call
touches and the kernels load them; ``pre`` rotates q and k once with the rotation kernel
(triton_kernels/rope_rotate.py) and runs the no-RoPE kernels (the backward un-rotates dq and dk
from float32); ``auto`` (default) picks table for windows up to a 256-key bucket and pre above,
from H100 timings of the three (benchmarks/bench_attention.py: pyencoder-triton, -ropetable,
-prerot; the in-kernel mode was 2-5x slower than the better of the other two everywhere).
``PYENCODER_ROPE_TABLE=1`` / ``0`` (older switch) still force table / kernel.

Relative-position bias (``rel_bias``, ``gate``, ``rel_offset``; pyencoder.ops.attention): the
table and gate go to the kernels as float32 contiguous copies (constexprs HAS_BIAS / HAS_GATE; the
autotune key includes them); the backward returns drel_bias from a float32 atomic buffer filled by
the dq kernel (summation order varies between runs: not bitwise reproducible, even with
``deterministic=True``) and dgate from the dq kernel's row sums. Without a bias every new argument
is None, so the unbiased kernels are unchanged (same PTX, benchmarks/ptx_diff.py).

Sink keys (``sink`` > 0, IntervalMask.sink): passed to the kernels as a do_not_specialize int
(capped at k_offset + Nk) with the constexpr HAS_SINK=True, one more compile per kernel whatever
the count; sink = 0 passes None for both, so the band / chunked kernels are unchanged (same PTX).
With a relative bias the sink kernels clamp the bias column (the saturated bucket rule of
pyencoder.ops.attention). Refused with a frame-rate mask (kb != block), naming sink.

Limits: float16, bfloat16, float32 (float64: use the reference); head_dim <= 256; absolute
positions below 2**24 (exact in float32).
"""

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .._backend import _interpret
from .._env import env_choice, env_flag, env_raw, env_snapshot
from .._fifo import put
from ..rope import rope_cos_sin
from ._attention_op import op_signature, run_backward, run_forward
from . import _triton_op
from ._triton_op import (BlockGrid, _triton, cdiv, dummy, is_plain, last_plan, launch, next_pow2,
                         on_clear_launch_plans, triton_op)

_MAX_HEAD_DIM = 256
_MAX_POSITION = 1 << 24
_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Set to True (tests) to fill outputs with NaN before the kernels write them.
POISON_OUTPUTS = False

_kernels = None


def _window_key(block, lo_off, hi_off, nk):
    """The autotune key's window bucket: keys a query tile can see, as a power of two in
    [16, 4096] (the 16 floor keeps the value 16-divisible: no extra kernel specialisation)."""
    width = 4096 if lo_off < 0 else lo_off + hi_off + block
    return max(16, min(next_pow2(width), next_pow2(max(1, nk)), 4096))


_AUTOTUNE_MODES = ("auto", "full", "0")
_AUTOTUNE_ALIASES = {"1": "full", "true": "full", "yes": "full", "on": "full",
                     "false": "0", "no": "0", "off": "0"}


def _autotune_mode():
    """PYENCODER_TRITON_AUTOTUNE: "auto" (default), "full" (also 1/true/yes/on) or "0" (also
    false/no/off)."""
    raw = env_raw("PYENCODER_TRITON_AUTOTUNE")
    val = (raw or "").strip().lower() or "auto"
    mode = _AUTOTUNE_ALIASES.get(val, val)
    if mode not in _AUTOTUNE_MODES:
        raise ValueError(f"PYENCODER_TRITON_AUTOTUNE must be one of auto, full (or 1 / true / "
                         f"yes / on), 0 (or false / no / off), or unset; got {raw!r}")
    return mode


def _autotune_enabled():
    return _autotune_mode() != "0"


_ARCH = {}      # cuda device -> its row of the default table (a capability query per launch else)


def _arch(device):
    """Row of the default table: "sm90" for compute capability >= 9, else "sm80"."""
    if device.type != "cuda":
        return "sm80"
    row = _ARCH.get(device)
    if row is None:
        row = _ARCH[device] = \
            "sm90" if torch.cuda.get_device_capability(device)[0] >= 9 else "sm80"
    return row


_ROPE_TABLE_MODES = ("auto", "0", "1")
_ROPE_MODES = ("auto", "kernel", "table", "pre")
# "auto": the table mode for windows whose autotune bucket (_window_key) is at most this wide,
# the prerotate mode above. Measured on an H100 (benchmarks/results/nvidia-h100-80gb-hbm3/
# attention.jsonl, wav2vec2-base bf16, forward GPU time from CUDA-graph replay, N = 1500 / 3000):
# band(50,3): table 0.134 / 0.229 ms, pre 0.152 / 0.272, kernel 0.260 / 0.436; band(250,3):
# table 0.186 / 0.336, pre 0.200 / 0.371, kernel 0.542 / 1.03; chunked(4,128,3) (bucket 1024):
# pre 0.215 / 0.425, table 0.238 / 0.459, kernel 0.769 / 1.56; full: pre 0.195 / 0.516, table
# 0.243 / 0.707, kernel 0.793 / 2.29. The in-kernel mode (cos/sin on every tile visit) never won.
_AUTO_TABLE_MAX_WINDOW = 256


def _rope_mode(win=None):
    """PYENCODER_ROPE_MODE: ``kernel`` (cos/sin computed in the attention kernels), ``table``
    (cos/sin tables built once per call, loaded by the kernels), ``pre`` (q and k rotated once
    by a rotation kernel, the attention kernels run without RoPE; the backward un-rotates dq and
    dk from float32), ``auto`` (default: PYENCODER_ROPE_TABLE=1 / 0 picks table / kernel, else
    table for a window bucket ``win`` <= _AUTO_TABLE_MAX_WINDOW and pre above or when unknown)."""
    mode = env_choice("PYENCODER_ROPE_MODE", _ROPE_MODES, "auto")
    if mode != "auto":
        return mode
    table = env_choice("PYENCODER_ROPE_TABLE", _ROPE_TABLE_MODES, "auto")
    if table in ("0", "1"):
        return {"1": "table", "0": "kernel"}[table]
    return "table" if win is not None and win <= _AUTO_TABLE_MAX_WINDOW else "pre"


def _rope_table_enabled(win=None):
    return _rope_mode(win) == "table"


def _prerotate(inv_freq, win=None):
    return inv_freq is not None and inv_freq.numel() > 0 and _rope_mode(win) == "pre"


def rotate(x, inv_freq, pos_offset, interleaved, inverse=False, dtype=None):
    """x (B, H, N, D) rotated at positions pos_offset + n by the Triton rotation kernel
    (triton_kernels/rope_rotate.py; pyencoder.rope.apply_rope's formula), as a new contiguous
    tensor of ``dtype`` (default x's). ``inverse``: angle -theta (the gradient's rotation)."""
    from ..triton_kernels.rope_rotate import _rope_rotate_kernel
    B, H, N, D = x.shape
    y = torch.empty((B, H, N, D), dtype=x.dtype if dtype is None else dtype, device=x.device)
    if y.numel() == 0:
        return y
    freq = inv_freq.to(device=x.device, dtype=torch.float32).contiguous()
    half = int(freq.numel())
    rot = 2 * half
    bn = 16 if _interpret() else 64
    launch(_rope_rotate_kernel)[(cdiv(N, bn), B * H)](
        x, y, freq, *x.stride(), *y.stride(), H, N, D, half, rot, int(pos_offset), BLOCK_N=bn,
        BLOCK_R=max(16, next_pow2(half)), BLOCK_C=max(16, next_pow2(D - rot)),
        HAS_PASS=D > rot, INTERLEAVED=bool(interleaved), INVERSE=bool(inverse), num_warps=4)
    return y


# Tiles measured (tests/test_triton_compile.py) to fit the 163 KiB opt-in shared memory of sm_80
# at head_dim 128 in float32, the widest case of the tuned lists: (BLOCK_M, BLOCK_N, warps, stages).
# fp32 tiles take about 4x the shared memory of 16-bit ones (operand layout conversions of the
# IEEE dots), so float32 from head_dim 64 and 16-bit from head_dim 256 keep only these.
_WIDE_TILES = {
    "fwd": {(64, 64, 4, 2), (128, 32, 4, 3), (64, 32, 4, 2)},
    "dq": {(64, 64, 4, 2), (64, 32, 4, 2)},
    "dkdv": {(32, 64, 4, 2), (16, 64, 4, 2)},
}


# The RoPE table mode adds the cos/sin tiles of K (forward, dq) or Q (dk/dv) to the software
# pipeline's shared-memory stages: with full rotary at head_dim 128 (BLOCK_R 64) these tiles exceed
# the 163 KiB of sm_80 (tests/test_triton_compile.py; sm_90 fits them all) and are dropped there.
_TABLE_DROP = {
    (True, "fwd"): {(128, 32, 4, 3)}, (True, "dq"): {(64, 64, 4, 2)}, (True, "dkdv"): set(),
    (False, "fwd"): {(128, 128, 8, 3)}, (False, "dq"): set(), (False, "dkdv"): set(),
}
# Autotune configs tried in the table mode only: the large tiles with fewer pipeline stages, since
# the pipelined cos/sin stages cost shared memory and registers (ptxas, fp16, head_dim 64, sm_90:
# forward 128x64 spills 16 B / 112 B / 216 B at 1 / 2 / 3 stages against 16 B for the in-kernel
# mode at any of them). The in-kernel mode never sees them.
_TABLE_ONLY = {
    "fwd": {(128, 64, 4, 2), (128, 64, 4, 1)},
    "dq": {(128, 64, 8, 2), (64, 64, 4, 1)},
    "dkdv": {(64, 128, 8, 2), (64, 128, 8, 1)},
}


def _table_drop(name, fp32, kwargs, arch="sm80"):
    if arch != "sm80" or not kwargs.get("ROPE_TABLE") or kwargs["BLOCK_R"] < 64:
        return set()
    return _TABLE_DROP[(fp32, name)]


def _tile(c):
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def _is_wide(named_args, kwargs):
    fp32 = named_args["Q"].dtype == torch.float32
    return kwargs["BLOCK_DV"] >= (64 if fp32 else 256)


def _prune_size(name, configs, named_args, kwargs):
    q = named_args["Q"]
    if kwargs.get("ROPE_TABLE"):
        drop = _table_drop(name, q.dtype == torch.float32, kwargs, _arch(q.device))
    else:
        drop = _TABLE_ONLY[name]
    configs = [c for c in configs if _tile(c) not in drop]
    if not _is_wide(named_args, kwargs):
        return configs
    return [c for c in configs if _tile(c) in _WIDE_TILES[name]]


def _prune_full(name, configs, named_args, kwargs):
    """The tuned list cut to the tiles that fit: shared memory, then the window (a key tile no
    wider than the window; for dk/dv a query tile)."""
    win = named_args["WIN_KEY"]
    fit = _prune_size(name, configs, named_args, kwargs)
    along = "BLOCK_M" if name == "dkdv" else "BLOCK_N"
    keep = [c for c in fit if c.kwargs[along] <= max(32, win)]
    return keep or fit[-1:]


# Default table: per (arch, kernel, 16-bit or fp32, head-dim class) the tiles
# (BLOCK_M, BLOCK_N, warps, stages) in order of preference. A key uses the first entries that
# survive _prune_full (shared memory and window fit); an empty intersection falls back to the
# pruned list's order. First ordered by FlashAttention-2 conventions; the 16-bit head_dim-64 rows
# and the relative-bias rows are now ordered by what ptxas makes of each tile at the headline
# shapes (python -m benchmarks.sass_stats --tiles --grad; wav2vec2-base bf16, N=1500, band(50,3),
# band(250,3), full, chunked, gated bias, sink, frame): tiles that spill registers to local
# memory inside the key loop come last. sm_90 (255 registers per thread at 4 warps):
#   forward 128x64 at 4 warps spilled 14-26 stores (the first choice before, the one the H100
#     session measured), 128x64 at 8 warps none (193-214 registers, half the instructions);
#   with the gated bias every 128-row tile at 4 warps spilled 132-148 stores and pipelined the
#     per-element bias gather into 128 KiB of shared memory (1 program per SM: the measured ~4x
#     cost of the biased kernel); 64x64 at 2 stages none (56 KiB); the biased dq only at 64x32,
#     dk/dv at 32x64 and 16x64;
#   dk/dv 32x128 at 4 warps spilled 15-24 stores (what narrow windows, frame masks, got), 32x64
#     none.
# sm_80 spills far more (mma.sync fragments): forward 128x64 / 4 warps 118 stores against 1 at 8
# warps; dq 128x64 / 8 warps 55, 64x32 none; dk/dv 64x128 / 8 warps 186, 16x64 none.
# None of these orders is timed yet: the GPU session's tuning run (bench_attention
# --autotune full, tiles recorded per row) ranks them.
_T16_D64 = {
    "fwd": [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 128, 8, 3), (64, 64, 4, 2),
            (64, 32, 4, 2), (128, 64, 4, 3)],
    "dq": [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2)],
    "dkdv": [(64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 2), (32, 128, 4, 3)],
}
_T16_D64_SM80 = dict(
    _T16_D64,
    dq=[(64, 32, 4, 2), (128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
    dkdv=[(16, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 3), (64, 64, 4, 3)],
)
_T16_D128 = {
    "fwd": [(128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2)],
    "dq": [(64, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 2)],
    "dkdv": [(64, 64, 4, 3), (32, 128, 4, 3), (32, 64, 4, 2), (16, 64, 4, 2)],
}
_T_WIDE = {   # fp32 from head_dim 64, any dtype above 128: the _WIDE_TILES
    "fwd": [(64, 64, 4, 2), (128, 32, 4, 3), (64, 32, 4, 2)],
    "dq": [(64, 64, 4, 2), (64, 32, 4, 2)],
    "dkdv": [(32, 64, 4, 2), (16, 64, 4, 2)],
}
_T_TABLE_MODE = {  # RoPE-table mode: fewer pipeline stages for the cos/sin tiles (_TABLE_ONLY)
    "fwd": [(128, 64, 8, 2), (128, 64, 4, 2), (64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 4, 1)],
    "dq": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (64, 64, 4, 1)],
    "dkdv": [(64, 128, 8, 2), (32, 64, 4, 2), (16, 64, 4, 2), (64, 128, 8, 1)],
}
_T_TABLE_MODE_SM80 = {  # sm_80 table mode (bf16 D64 full RoPE): 128x64 / 8 warps spilled 30
    # stores forward, dq 64x64 592 and dk/dv 64x128 / 8 warps over a thousand; these none or few
    "fwd": [(64, 32, 4, 2), (128, 64, 8, 2), (64, 64, 4, 2)],
    "dq": [(64, 32, 4, 2), (64, 64, 4, 2)],
    "dkdv": [(16, 64, 4, 2), (32, 64, 4, 2)],
}
_T_BIAS = {  # relative bias (HAS_BIAS), 16-bit, head_dim <= 64: the tiles that do not spill
    "sm90": {"fwd": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2)],
             "dq": [(64, 32, 4, 2), (64, 64, 4, 2)],
             "dkdv": [(32, 64, 4, 2), (16, 64, 4, 2)]},
    "sm80": {"fwd": [(64, 32, 4, 2), (64, 64, 4, 2)],
             "dq": [(64, 32, 4, 2), (64, 64, 4, 2)],
             "dkdv": [(16, 64, 4, 2), (32, 64, 4, 2)]},
}
_DEFAULT_TILES = {
    arch: {("16", "d64"): _T16_D64 if arch == "sm90" else _T16_D64_SM80,
           ("16", "d128"): _T16_D128, ("16", "d256"): _T_WIDE,
           ("32", "d64"): _T_WIDE, ("32", "d128"): _T_WIDE, ("32", "d256"): _T_WIDE,
           ("table", "any"): _T_TABLE_MODE if arch == "sm90" else _T_TABLE_MODE_SM80,
           ("bias", "d64"): _T_BIAS[arch]}
    for arch in ("sm80", "sm90")
}
_DEFAULT_PICKS = {"auto": 2, "0": 1}


def _table_row(name, named_args, kwargs):
    q = named_args["Q"]
    rows = _DEFAULT_TILES[_arch(q.device)]
    if kwargs.get("ROPE_TABLE"):
        return rows[("table", "any")][name]
    dv = kwargs["BLOCK_DV"]
    dclass = "d64" if dv <= 64 else ("d128" if dv <= 128 else "d256")
    fp32 = q.dtype == torch.float32
    if kwargs.get("HAS_BIAS") and not fp32 and dclass == "d64":
        return rows[("bias", "d64")][name]
    return rows[("32" if fp32 else "16", dclass)][name]


def _default_configs(name, configs, named_args, kwargs, picks):
    """The first ``picks`` tiles of the default table that the key's pruning keeps."""
    fit = _prune_full(name, configs, named_args, kwargs)
    by_tile = {_tile(c): c for c in fit}
    ranked = [by_tile[t] for t in _table_row(name, named_args, kwargs) if t in by_tile]
    ranked += [c for c in fit if c not in ranked]
    return ranked[:picks]


def _pruner(name, mode):
    def prune(configs, named_args, **kwargs):
        if mode == "full":
            return _prune_full(name, configs, named_args, kwargs)
        return _default_configs(name, configs, named_args, kwargs, _DEFAULT_PICKS[mode])
    return prune


def _build_kernels():
    """(name -> (fixed_kernel, fixed_config, tuned_kernel_or_None)) built once, lazily."""
    import triton

    from ..triton_kernels import interval_attention as ia

    def cfg(m, n, w, s):
        return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)

    key = ["BLOCK_DV", "BLOCK_R", "BLOCK_C", "WIN_KEY", "ROPE_TABLE", "HAS_BIAS", "HAS_GATE",
           "HAS_SINK", "PIPE_MASKED"]
    if _interpret():
        small = cfg(16, 16, 4, 1)
        return {
            "fwd": (ia._interval_attention_fwd_kernel, small, None),
            "dq": (ia._interval_attention_bwd_dq_kernel, small, None),
            "dkdv": (ia._interval_attention_bwd_dkdv_kernel, small, None),
        }
    fns = {"fwd": ia._interval_attention_fwd_kernel, "dq": ia._interval_attention_bwd_dq_kernel,
           "dkdv": ia._interval_attention_bwd_dkdv_kernel}
    lists = {name: [cfg(*t) for t in tiles] for name, tiles in _TUNED.items()}
    kernels = {}
    for name, fn in fns.items():
        tuners = {mode: triton.autotune(lists[name], key=key,
                                        prune_configs_by={"early_config_prune": _pruner(name, mode)}
                                        )(fn)
                  for mode in ("auto", "full")}
        kernels[name] = (fn, lists[name], tuners)
    return kernels


# The tuned lists (BLOCK_M, BLOCK_N, warps, stages); the last entries are the table-mode-only tiles.
_TUNED = {
    "fwd": [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 2),
            (64, 32, 4, 2), (128, 64, 8, 3), (128, 64, 8, 2),
            *sorted(_TABLE_ONLY["fwd"], reverse=True)],
    "dq": [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2),
           *sorted(_TABLE_ONLY["dq"], reverse=True)],
    "dkdv": [(64, 128, 8, 3), (64, 64, 4, 3), (32, 128, 4, 3), (32, 64, 4, 2), (16, 64, 4, 2),
             *sorted(_TABLE_ONLY["dkdv"], reverse=True)],
}


def _kernel(name):
    global _kernels
    if _kernels is None:
        _kernels = _build_kernels()
    return _kernels[name]


# Tried when the chosen tile runs out of resources on the device (a 99 KiB consumer GPU): fits
# anything up to head_dim 256.
_FALLBACK = (32, 32, 4, 1)


_PINNED = {}   # (kernel, arch, dtype, window key, tile-deciding constexprs) -> tiles to try


def _pinned_tiles(name, configs, q, win, consts):
    """The pinned mode's tiles (the default table's first fitting one, then _FALLBACK), memoised
    per key: the pruning reads only the arch, q's dtype, the window key and these constexprs."""
    key = (name, _arch(q.device), q.dtype, win, consts["BLOCK_DV"], consts["BLOCK_R"],
           bool(consts.get("ROPE_TABLE")), bool(consts.get("HAS_BIAS")))
    tiles = _PINNED.get(key)
    if tiles is None:
        named = {"Q": q, "WIN_KEY": win}
        tiles = [_tile(c) for c in _default_configs(name, configs, named, consts, 1)]
        tiles = _PINNED[key] = tiles + [_FALLBACK]
    return tiles


def _launch(name, grid, args, consts, pinned=False):
    """Launch kernel ``name`` over ``grid`` (a BlockGrid: the tile decides its extent)."""
    fixed, configs, tuners = _kernel(name)

    def grid_fn(bm, bn):
        return grid({"BLOCK_M": bm, "BLOCK_N": bn})
    if tuners is None:
        bm, bn, warps, stages = _tile(configs)
        launch(fixed)[grid_fn(bm, bn)](*args, **consts, BLOCK_M=bm, BLOCK_N=bn,
                                       num_warps=warps, num_stages=stages)
        return
    mode = "0" if pinned else _autotune_mode()
    if mode != "0":
        launch(tuners[mode])[grid](*args, **consts)
        return
    tiles = _pinned_tiles(name, configs, args[0], args[-1], consts)
    for i, (bm, bn, warps, stages) in enumerate(tiles):
        try:
            launch(fixed)[grid_fn(bm, bn)](*args, **consts, BLOCK_M=bm, BLOCK_N=bn,
                                           num_warps=warps, num_stages=stages)
            return
        except Exception as e:
            if i + 1 == len(tiles) or "OutOfResources" not in type(e).__name__:
                raise


def _rope_split(inv_freq, D):
    half = 0 if inv_freq is None else int(inv_freq.numel())
    rot = 2 * half
    npass = D - rot
    return half, rot, npass


def _pipe_masked(q, D):
    """PYENCODER_PIPELINE_MASKED=1: the boundary (masked) block loops software-pipelined like the
    interior ones (constexpr PIPE_MASKED) instead of num_stages=1, for 16-bit q with
    head_dim <= 128 (float32 and wider heads keep one stage: shared memory, see
    triton_kernels/interval_attention.py). Off by default until a GPU times it: at band(50, 3)
    every key block of a query tile is a boundary block, so the forward then runs with no
    prefetch at all; sm_90 SASS with it on (benchmarks/sass_stats.py, bf16 128x64 / 8 warps):
    the same 64 KiB of shared memory, no spills, 225 registers instead of 199. None when off
    (the kernels' code is then the code before the flag)."""
    if q.dtype == torch.float32 or D > 128:
        return None
    return True if env_flag("PYENCODER_PIPELINE_MASKED", False) else None


def _consts(q, D, half, npass, lo_off, key_lengths, interleaved, table):
    return dict(
        BLOCK_R=max(16, next_pow2(half)), BLOCK_C=max(16, next_pow2(npass)),
        BLOCK_DV=max(16, next_pow2(D)), HAS_ROPE=half > 0, HAS_PASS=npass > 0,
        INTERLEAVED=bool(interleaved) and half > 0, LO_BOUNDED=lo_off >= 0,
        HAS_KLEN=key_lengths is not None,
        DOT_PREC="ieee" if q.dtype == torch.float32 else None, ROPE_TABLE=table,
        PIPE_MASKED=_pipe_masked(q, D))


def _bias_args(rel_bias, gate, rel_offset):
    """Kernel arguments of the relative bias: float32 contiguous (Hq, L) table and (B, Hq, Nq)
    gate, or None everywhere (Triton makes None a constexpr: the unbiased kernels keep their
    exact signature and code)."""
    if rel_bias is None:
        return dict(REL=None, GATE=None, rel_len=None, rel_offset=None, HAS_BIAS=False,
                    HAS_GATE=False)
    rel = rel_bias.to(torch.float32).contiguous()
    g = None if gate is None else gate.to(torch.float32).contiguous()
    return dict(REL=rel, GATE=g, rel_len=int(rel.shape[1]), rel_offset=int(rel_offset),
                HAS_BIAS=True, HAS_GATE=g is not None)


def _aux(q, inv_freq, key_lengths):
    freq = dummy(q, torch.float32) if inv_freq is None or inv_freq.numel() == 0 else \
        inv_freq.to(device=q.device, dtype=torch.float32).contiguous()
    klen = dummy(q, torch.int32) if key_lengths is None else \
        key_lengths.to(device=q.device, dtype=torch.int32).contiguous()
    return freq, klen


def _rope_tables(q, inv_freq, Nq, Nk, q_offset, k_offset, win=None):
    """(cos, sin, base, enabled): float32 (P, R/2) tables whose row p - base holds absolute
    position p, for every position of the call, or dummies when the kernels compute cos/sin."""
    enabled = _rope_table_enabled(win)
    if inv_freq is None or inv_freq.numel() == 0 or not enabled:
        d = dummy(q, torch.float32)
        return d, d, 0, False
    # the base: min(q_offset, k_offset) moved down to 5 mod 16 (up to 15 rows more, negative
    # positions included). The kernels take it as a do_not_specialize int like q_offset /
    # k_offset, so neither the compiled kernel nor the fast launch plan depends on its value
    # (tests/test_attention_triton.py::test_rope_table_base_is_not_specialised,
    # tests/test_fast_launch.py::test_rope_table_streaming_shares_plans); the move dates from
    # when it was specialised (harmless: it also keeps the cached tables' keys coarser)
    base = min(q_offset, k_offset)
    base -= (base - 5) % 16
    end = max(q_offset + Nq, k_offset + Nk)
    cacheable = _table_cacheable(q, inv_freq)
    key = (id(inv_freq), inv_freq._version, str(q.device), base, end) if cacheable else None
    hit = _TABLES.get(key) if cacheable else None
    if hit is not None and hit[0] is inv_freq:
        return hit[1], hit[2], base, True
    pos = torch.arange(base, end, dtype=torch.int64, device=q.device)
    cos, sin = rope_cos_sin(pos, inv_freq.to(device=q.device, dtype=torch.float32))
    cos, sin = cos.contiguous(), sin.contiguous()
    if cacheable:
        put(_TABLES, key, (inv_freq, cos, sin), _TABLES_MAX)
    return cos, sin, base, True


# RoPE tables of recent calls, (id and version of the inv_freq tensor, device, base, end) ->
# (that inv_freq, cos, sin): the entry holds the tensor itself (so its id cannot be reused while
# cached) and a hit must be that very object (a Rope keeps its inv_freq per device):
# a training or offline loop calls with the same positions every step, and building the tables
# costs ~5 small kernels and their host time per call, forward and backward (a few KB each).
_TABLES = {}
_TABLES_MAX = 16


def _table_cacheable(q, inv_freq):
    """Only plain real tensors (``is_plain``: not fake, functional or functorch-wrapped) outside
    any trace or CUDA-graph capture (a table allocated in a graph's private pool must not outlive
    it)."""
    if torch.compiler.is_compiling() or not is_plain(q) or not is_plain(inv_freq):
        return False
    if inv_freq.is_inference():     # no version counter to see an in-place edit by
        return False
    if q.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


def _new(shape, like, dtype=None):
    t = torch.empty(shape, dtype=like.dtype if dtype is None else dtype, device=like.device)
    if POISON_OUTPUTS:
        t.fill_(float("nan"))
    return t


def _common_reason(q, k, v, inv_freq, q_offset, k_offset):
    if q.dtype not in _DTYPES:
        return (f"the triton attention kernels support float16, bfloat16 and float32; got "
                f"{q.dtype} (use backend='reference' for float64)")
    D = q.shape[-1]
    if D > _MAX_HEAD_DIM:
        return f"head_dim must be <= {_MAX_HEAD_DIM} for the triton kernels; got {D}"
    if k.shape[-1] != D or v.shape[-1] != D:
        return f"the triton kernels need q, k and v to share head_dim; got {D}, {k.shape[-1]}, {v.shape[-1]}"
    if inv_freq is not None and inv_freq.numel() * 2 > D:
        return f"rotary dim {2 * inv_freq.numel()} exceeds head_dim {D}"
    if q.shape[0] * q.shape[1] > _triton_op.MAX_GRID_YZ:
        return (f"batch * heads = {q.shape[0]} * {q.shape[1]} is above "
                f"{_triton_op.MAX_GRID_YZ}, the CUDA grid extent the triton kernels put it on "
                f"(the functional ops split such a batch into launches that fit)")
    last = max(q_offset + q.shape[2], k_offset + k.shape[2])
    if last >= _MAX_POSITION:
        return (f"absolute positions must be < 2**24 (exact in float32) for the triton kernels; "
                f"got up to {last}")
    return None


def kernel_mask(block, kb, lo_off, hi_off, q_end, k_end):
    """The mask ints (block, kb, lo_off, hi_off) the kernels get for queries at positions < q_end
    and keys < k_end (both < 2**24): an extent beyond 2**25 is cut to what those positions reach,
    so the kernels' int32 arithmetic cannot wrap (a "right = 2**31 - 1" sentinel made base +
    hi_off negative: rows that see every key saw none). Exact: lo_off above the largest base
    hides no key (lo < 0 for every query), as base_max + 1 does; hi_off >= k_end shows every key,
    as k_end does; hi_off below -(base_max + 1) shows none; a band / chunked block >= 2**25 puts
    every query in block 0, as 2**25 does (kb, None or the block itself there, follows it: the
    mask stays same-rate). Ordinary extents (below 2**25) pass unchanged: the kernels' integer
    specialisations and autotune keys stay what they were. Idempotent (the backward applies it
    again)."""
    cap = 1 << 25
    base_max = ((max(q_end, 1) - 1) // block) * (block if kb is None else kb)
    if lo_off > cap:
        lo_off = min(lo_off, base_max + 1)
    if hi_off > cap:
        hi_off = min(hi_off, k_end)
    elif hi_off < -cap:
        hi_off = max(hi_off, -(base_max + 1))
    if (kb is None or kb == block) and block > cap:
        block = cap
        kb = None if kb is None else cap
    return block, kb, lo_off, hi_off


def _int32_reason(block, kb, lo_off, hi_off, q_end, k_end):
    """Why a frame-rate mask's bounds could pass int32 in the kernels at these positions (after
    kernel_mask), or None. Band and chunked masks always fit (their base is at most the query's
    position); a frame mask's base is the query block index times the key block, and the dk/dv
    kernel inverts it (key position // k_block * block, after a cdiv that adds k_block - 1)."""
    if kb is None or kb == block:
        return None
    block, kb, lo_off, hi_off = kernel_mask(block, kb, lo_off, hi_off, q_end, k_end)
    ext = max(lo_off, abs(hi_off))
    base_max = ((max(q_end, 1) - 1) // block) * kb
    inverse = ((k_end + ext + 256) // kb + 2) * block
    if max(base_max + ext + kb, k_end + ext + 256 + kb, inverse) >= 1 << 31:
        return (f"this frame-rate mask (block={block}, k_block={kb}) reaches positions past "
                f"2**31 at these offsets (queries < {q_end}, keys < {k_end}): the kernels' int32 "
                f"bounds would wrap")
    return None


def supports_forward(q, k, v, inv_freq=None, key_lengths=None, block=1, lo_off=-1, hi_off=0,
                     q_offset=0, k_offset=0, scale=1.0, interleaved=False, sink=0, kb=None,
                     rel_bias=None, k_block=None, **_):
    kb = k_block if kb is None else kb     # backend selection names it k_block, launchers kb
    if sink and kb is not None and kb != block:
        return (f"sink keys with a frame-rate mask are not supported; got sink={sink} with "
                f"k_block={kb} != block={block}")
    return _common_reason(q, k, v, inv_freq, q_offset, k_offset) or _int32_reason(
        block, kb, lo_off, hi_off, q_offset + q.shape[2], k_offset + k.shape[2])


# Zero padding on each side of the forward's vectorised bias layout: more than any visited tile
# reaches outside the table (a visited key block holds a key some row of the tile sees, so the
# tile's offsets lie within BLOCK_M + BLOCK_N <= 256 of the table's columns).
_VEC_BIAS_PAD = 512


def _vec_bias(rel, rel_offset):
    """The forward's bias in the layout of _bias_tile_vec (constexpr VEC_BIAS; forward without
    sink keys): (Hq, 4, L4) float32, copy t of head h = the per-offset vector zero-padded by
    _VEC_BIAS_PAD on both sides and shifted by t entries, L4 a multiple of 16 (16-byte aligned
    rows), so the kernel loads every row of a bias tile as 16-byte vectors with no mask; the
    kernel's rel_len / rel_offset become L4 and rel_offset - _VEC_BIAS_PAD. Two small copies per
    call (pad, strided copy); the backward keeps the plain (Hq, L) table."""
    H, L = rel.shape
    pad = _VEC_BIAS_PAD
    L4 = -(-(L + 2 * pad) // 16) * 16
    padded = torch.nn.functional.pad(rel, (pad, L4 + 3 - L - pad))
    rel4 = padded.as_strided((H, 4, L4), (padded.stride(0), 1, 1)).contiguous()
    return dict(REL=rel4, rel_len=L4, rel_offset=int(rel_offset) - pad, VEC_BIAS=True)


def _sink_args(sink, k_offset, Nk):
    """Kernel arguments of the sink keys: the runtime int ``sink`` (do_not_specialize; capped at
    k_offset + Nk, the positions that hold a key) with HAS_SINK=True, or None for both when
    sink = 0 (constexprs: the band / chunked kernels keep their exact code)."""
    if not sink:
        return dict(sink=None, HAS_SINK=None)
    return dict(sink=int(min(sink, k_offset + Nk)), HAS_SINK=True)


def _frame_const(consts, block, kb):
    """A frame-rate mask (key block kb != block) adds the constexpr K_BLOCK; every other mask
    launches exactly the kernels it always did (K_BLOCK keeps its default None)."""
    if kb is not None and kb != block:
        consts = dict(consts, K_BLOCK=int(kb))
    return consts


def _require_supported(q, k, v, inv_freq, block, lo_off, hi_off, q_offset, k_offset, sink, kb,
                       rel_bias):
    """Raise unless the kernels take this call; returns kernel_mask's (block, kb, lo_off,
    hi_off)."""
    reason = supports_forward(q, k, v, inv_freq, block=block, lo_off=lo_off, hi_off=hi_off,
                              q_offset=q_offset, k_offset=k_offset, sink=sink, kb=kb,
                              rel_bias=rel_bias)
    if reason is not None:
        raise ValueError(f"pyencoder triton attention: {reason}")
    return kernel_mask(block, kb, lo_off, hi_off, q_offset + q.shape[2], k_offset + k.shape[2])


def forward(q, k, v, inv_freq, key_lengths, block, lo_off, hi_off, q_offset, k_offset, scale,
            interleaved, sink=0, kb=None, rel_bias=None, gate=None, rel_offset=0):
    """Returns (out (B, Hq, Nq, D) in q's dtype, lse (B, Hq, Nq) float32). ``kb``: the key-side
    block of a frame-rate mask (None: block). ``rel_bias`` (Hq, L), ``gate`` (B, Hq, Nq) or None,
    ``rel_offset``: relative-position bias (pyencoder.ops.attention), read by the kernels in
    float32. A call like an earlier one is replayed by its call program (section below)."""
    key = _program_key((q, k, v, rel_bias, gate), inv_freq, key_lengths,
                       (block, lo_off, hi_off, q_offset, k_offset, scale, interleaved, sink, kb,
                        rel_offset if rel_bias is not None else None))
    if key is not None:
        prog = _FWD_PROGRAMS.get(key)
        if prog is not None and prog.inv_freq is inv_freq:
            res = prog.run(q, k, v, key_lengths, rel_bias, gate, rel_offset, sink)
            if res is not None:
                return res
    block, kb, lo_off, hi_off = _require_supported(q, k, v, inv_freq, block, lo_off, hi_off,
                                                   q_offset, k_offset, sink, kb, rel_bias)
    win = _window_key(block if kb is None else kb, lo_off, hi_off, k.shape[2])
    pre = None
    if _prerotate(inv_freq, win) and q.numel() and k.numel():
        pre = (inv_freq, q_offset, k_offset, interleaved)
        q = rotate(q, inv_freq, q_offset, interleaved)
        k = rotate(k, inv_freq, k_offset, interleaved)
        inv_freq = None
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    out = _new((B, Hq, Nq, D), q)
    lse = _new((B, Hq, Nq), q, torch.float32)
    if out.numel() == 0:
        return out, lse
    half, rot, npass = _rope_split(inv_freq, D)
    freq, klen = _aux(q, inv_freq, key_lengths)
    cos, sin, tab_base, table = _rope_tables(q, inv_freq, Nq, Nk, q_offset, k_offset, win)
    consts = _frame_const(_consts(q, D, half, npass, lo_off, key_lengths, interleaved, table),
                          block, kb)
    consts.update(_bias_args(rel_bias, gate, rel_offset))
    consts.update(_sink_args(sink, k_offset, Nk))
    if consts["HAS_BIAS"] and not consts["HAS_SINK"]:
        consts.update(_vec_bias(consts["REL"], consts["rel_offset"]))
    args = (q, k, v, out, lse, freq, cos, sin, klen,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            Hq, Hq // Hk, Nq, Nk, D, half, rot, npass,
            block, lo_off, hi_off, q_offset, k_offset, tab_base, float(scale) * _LOG2E,
            _window_key(block if kb is None else kb, lo_off, hi_off, Nk))
    _launch("fwd", BlockGrid(Nq, "BLOCK_M", B * Hq), args, consts)
    if key is not None:
        _keep_forward(key, pre, inv_freq, key_lengths, args, out, lse, rel_bias is not None,
                      {"REL": consts["REL"], "GATE": consts["GATE"]})
    return out, lse


def backward(dout, q, k, v, out, lse, inv_freq, key_lengths, block, lo_off, hi_off, q_offset,
             k_offset, scale, interleaved, deterministic=True, sink=0, kb=None, rel_bias=None,
             gate=None, rel_offset=0, _grad_dtype=None):
    """Returns (dq, dk, dv) in the dtypes of q, k, v. Without a bias always deterministic (no
    atomics); ``deterministic=True`` also pins the tile config (no autotuning). With
    ``rel_bias``: (dq, dk, dv, drel_bias, dgate or None); dgate is a row reduction of the dq
    kernel (deterministic), drel_bias is accumulated with float32 atomics by the dq kernel (one
    per visible (query, key) pair: summation order, hence the last bits, vary between runs).
    A call like an earlier one is replayed by its call program (section below)."""
    key = _program_key((dout, q, k, v, out, lse, rel_bias, gate), inv_freq, key_lengths,
                       (block, lo_off, hi_off, q_offset, k_offset, scale, interleaved,
                        bool(deterministic), sink, kb, _grad_dtype,
                        rel_offset if rel_bias is not None else None))
    if key is not None:
        prog = _BWD_PROGRAMS.get(key)
        if prog is not None and prog.inv_freq is inv_freq:
            res = prog.run(dout, q, k, v, out, lse, key_lengths, rel_bias, gate, rel_offset)
            if res is not None:
                return res
    block, kb, lo_off, hi_off = _require_supported(q, k, v, inv_freq, block, lo_off, hi_off,
                                                   q_offset, k_offset, sink, kb, rel_bias)
    win = _window_key(block if kb is None else kb, lo_off, hi_off, k.shape[2])
    if _prerotate(inv_freq, win) and q.numel() and k.numel():
        # the prerotate mode: the no-RoPE backward on rotated q and k, its dq and dk kept in
        # float32 and un-rotated (angle -theta) into q's and k's dtypes (one rounding, as the
        # in-kernel mode's un-rotation in registers)
        grads = backward(dout, rotate(q, inv_freq, q_offset, interleaved),
                         rotate(k, inv_freq, k_offset, interleaved), v, out, lse, None,
                         key_lengths, block, lo_off, hi_off, q_offset, k_offset, scale,
                         interleaved, deterministic, sink, kb, rel_bias, gate, rel_offset,
                         _grad_dtype=torch.float32)
        dq = rotate(grads[0], inv_freq, q_offset, interleaved, inverse=True, dtype=q.dtype)
        dk = rotate(grads[1], inv_freq, k_offset, interleaved, inverse=True, dtype=k.dtype)
        return (dq, dk) + tuple(grads[2:])
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    dq = _new(q.shape, q, _grad_dtype)
    dk = _new(k.shape, k, _grad_dtype)
    dv = _new(v.shape, v)
    bias = _bias_args(rel_bias, gate, rel_offset)
    drel = dgate = None
    if rel_bias is not None:
        drel = torch.zeros(rel_bias.shape, dtype=torch.float32, device=q.device)
        if gate is not None:
            dgate = _new(gate.shape, q, torch.float32)
            if Nq == 0 or Nk == 0 or B == 0 or Hq == 0:
                dgate.zero_()

    def result(*grads):
        if rel_bias is None:
            return grads
        return (*grads, drel.to(rel_bias.dtype), None if dgate is None else dgate.to(gate.dtype))

    if B == 0 or Hq == 0:
        return result(dq, dk, dv)
    if Nq == 0 or Nk == 0:
        return result(dq.zero_(), dk.zero_(), dv.zero_())
    lse = lse.to(torch.float32).contiguous()
    dout = dout.to(q.dtype)
    half, rot, npass = _rope_split(inv_freq, D)
    freq, klen = _aux(q, inv_freq, key_lengths)
    cos, sin, tab_base, table = _rope_tables(q, inv_freq, Nq, Nk, q_offset, k_offset, win)
    consts = _frame_const(_consts(q, D, half, npass, lo_off, key_lengths, interleaved, table),
                          block, kb)
    consts.update(bias)
    consts.update(_sink_args(sink, k_offset, Nk))
    # delta = rowsum(dout * out), float32: written by the dq kernel (every row), read by the
    # dk/dv kernel launched after it
    delta = _new((B, Hq, Nq), q, torch.float32)
    win = _window_key(block if kb is None else kb, lo_off, hi_off, Nk)
    common = (Nq, Nk, D, half, rot, npass, block, lo_off, hi_off, q_offset, k_offset, tab_base,
              float(scale), float(scale) * _LOG2E, win)
    args = (q, k, v, dout, out, dq, lse, delta, freq, cos, sin, klen,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *out.stride(), *dq.stride(),
            Hq, Hq // Hk, *common)
    _launch("dq", BlockGrid(Nq, "BLOCK_M", B * Hq), args, dict(consts, DREL=drel,
                                                                     DGATE=dgate),
            pinned=deterministic)
    dq_plan, dq_args = last_plan(), args
    args = (q, k, v, dout, dk, dv, lse, delta, freq, cos, sin, klen,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
            Hq, Hk, Hq // Hk, *common)
    _launch("dkdv", BlockGrid(Nk, "BLOCK_N", B * Hk), args, consts, pinned=deterministic)
    if key is not None:
        _keep_backward(key, inv_freq, key_lengths, dq_plan, dq_args, args, _grad_dtype,
                       rel_bias is not None, {"REL": bias["REL"], "GATE": bias["GATE"]})
    return result(dq, dk, dv)


# ------------------------------------------------------------------------------------------------
# Call programs. An eager call's host path (validation of the backend's limits, the window key,
# the RoPE mode, tables, the constexpr dict, the tile choice, and the fast launch path's plan key
# over ~60 kernel arguments: ~20 us per forward on the CPU machine here, against ~100 us kernels
# at wav2vec2-base sizes) is a function of what ``_program_key`` summarises: every tensor's shape,
# strides, dtype, device and 16-byte alignment, the identity and version of inv_freq, key_lengths'
# layout, every scalar argument, the environment variables the path reads, and the current device.
# A call whose launches were all served or recorded by fast launch plans (pyencoder.ops.
# _triton_op.last_plan) leaves a program under that key: the plans and the kernel arguments that
# are not the call's own tensors. A later call with the same key allocates its outputs, converts
# key_lengths as the path does and calls the plans' launchers with its own tensors: the launches
# the path would make, with the same arguments. Only where the fast launch path itself applies
# (PYENCODER_FAST_LAUNCH on, not interpreted, no trace, dispatch mode or torch.func transform,
# plain tensors) and, with RoPE, outside CUDA-graph capture (a program holds its cos/sin tables: a
# capture must own what it reads). With a relative bias the program rebuilds the bias' tensor
# keywords per call as the path does (float32 copies, the forward's vectorised layout; the
# backward's zeroed drel and dgate) and passes them by name: the recorded plans read them from
# each launch's keywords; their alignment must be the recorded call's.
# tests/test_fast_launch.py compares every launch of a replayed call with the path's.

_FWD_PROGRAMS = {}
_BWD_PROGRAMS = {}
_PROGRAMS_MAX = 64      # per table; the oldest goes (eager streaming: offsets move every chunk)
_NO_KW = {}
# every variable the forward / backward path reads (the fast launch path's own, and
# TRITON_INTERPRET, are checked by _program_key)
_PROGRAM_ENV = ("PYENCODER_ROPE_MODE", "PYENCODER_ROPE_TABLE", "PYENCODER_PIPELINE_MASKED",
                "PYENCODER_TRITON_AUTOTUNE")


@on_clear_launch_plans
def _clear_programs():
    _FWD_PROGRAMS.clear()
    _BWD_PROGRAMS.clear()


def _program_key(tensors, inv_freq, key_lengths, scalars):
    """The call program key of a call (section comment), or None where no program may serve or
    be recorded."""
    if not env_flag("PYENCODER_FAST_LAUNCH", True) or _interpret() \
            or torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None \
            or torch._C._are_functorch_transforms_active():
        return None
    T = torch.Tensor
    parts = []
    for t in tensors:
        if t is None:
            parts.append(None)
            continue
        if type(t) is not T:
            return None
        parts += (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0)
    rope = None
    if inv_freq is not None:
        if type(inv_freq) is not T or inv_freq.is_inference():   # no version counter
            return None
        if tensors[0].is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        rope = (id(inv_freq), inv_freq._version, inv_freq.data_ptr())
    klen = None
    if key_lengths is not None:
        if type(key_lengths) is not T:
            return None
        klen = (key_lengths.shape, key_lengths.stride(), key_lengths.dtype, key_lengths.device)
    try:
        device = _triton()[0].active.get_current_device()
    except Exception:       # no active Triton driver (a direct call on a machine without one)
        return None
    return (tuple(parts), rope, klen, scalars, env_snapshot(_PROGRAM_ENV),
            POISON_OUTPUTS, device)


def _keep(table, key, prog):
    put(table, key, prog, _PROGRAMS_MAX)


def _klen(key_lengths, q, aligned):
    """key_lengths as the path passes it (int32 on q's device), or None when its alignment differs
    from the recorded call's (a plan is keyed by it)."""
    klen = key_lengths.to(device=q.device, dtype=torch.int32).contiguous()
    return klen if (klen.data_ptr() % 16 == 0) == aligned else None


def _bias_tensors(rel_bias, gate, rel_offset, vec, aligned):
    """The relative bias' tensor keywords of a launch, built as the path builds them (REL, GATE:
    float32 contiguous; the forward without sink keys: REL in _vec_bias' layout), or None when
    their alignment differs from the recorded call's."""
    kw = _bias_args(rel_bias, gate, rel_offset)
    if vec:
        kw["REL"] = _vec_bias(kw["REL"], rel_offset)["REL"]
    kw = {"REL": kw["REL"], "GATE": kw["GATE"]}
    if _alignment(kw) != aligned:
        return None
    return kw


def _alignment(kw):
    return tuple(None if t is None else t.data_ptr() % 16 == 0 for t in kw.values())


class _FwdProgram:
    __slots__ = ("plan", "inv_freq", "pre", "klen", "klen_aligned", "aux", "rest", "out_shape",
                 "lse_shape", "bias")

    def run(self, q, k, v, key_lengths, rel_bias, gate, rel_offset, sink):
        klen = self.klen
        if key_lengths is not None:
            klen = _klen(key_lengths, q, self.klen_aligned)
            if klen is None:
                return None
        kw = _NO_KW
        if self.bias is not None:
            kw = _bias_tensors(rel_bias, gate, rel_offset, not sink, self.bias)
            if kw is None:
                return None
        if self.pre is not None:
            inv, q_offset, k_offset, interleaved = self.pre
            q = rotate(q, inv, q_offset, interleaved)
            k = rotate(k, inv, k_offset, interleaved)
        out = _new(self.out_shape, q)
        lse = _new(self.lse_shape, q, torch.float32)
        freq, cos, sin = self.aux
        self.plan.launch((q, k, v, out, lse, freq, cos, sin, klen) + self.rest, kw)
        return out, lse


_BIAS_KW = frozenset(("REL", "GATE"))
_DQ_BIAS_KW = frozenset(("REL", "GATE", "DREL", "DGATE"))


def _plan_serves(plan, allowed):
    """Whether ``plan`` can be replayed by a program: its tensor keywords (a plan reads them from
    each launch's keywords) are among ``allowed``, the ones a program passes."""
    if plan is None:
        return False
    names = () if plan.names is None else tuple(
        t for t, is_name in zip(plan.tail, plan.names) if is_name)
    return set(names) <= allowed


def _keep_forward(key, pre, inv_freq, key_lengths, args, out, lse, bias, kw=None):
    plan = last_plan()
    if not _plan_serves(plan, _BIAS_KW if bias else frozenset()):
        return
    prog = _FwdProgram()
    prog.plan, prog.pre = plan, pre
    prog.bias = _alignment(kw) if bias else None
    prog.inv_freq = inv_freq if pre is None else pre[0]   # the call's own (identity-checked)
    # the dummy without key_lengths; else nothing (the call's own conversion is not held)
    prog.klen = args[8] if key_lengths is None else None
    prog.klen_aligned = args[8].data_ptr() % 16 == 0
    prog.aux, prog.rest = args[5:8], args[9:]
    prog.out_shape, prog.lse_shape = tuple(out.shape), tuple(lse.shape)
    _keep(_FWD_PROGRAMS, key, prog)


class _BwdProgram:
    __slots__ = ("dq_plan", "dkdv_plan", "inv_freq", "klen", "klen_aligned", "aux", "dq_rest",
                 "dkdv_rest", "grad_dtype", "delta_shape", "bias")

    def run(self, dout, q, k, v, out, lse, key_lengths, rel_bias, gate, rel_offset):
        klen = self.klen
        if key_lengths is not None:
            klen = _klen(key_lengths, q, self.klen_aligned)
            if klen is None:
                return None
        kw = dq_kw = _NO_KW
        if self.bias is not None:
            kw = _bias_tensors(rel_bias, gate, rel_offset, False, self.bias)
            if kw is None:
                return None
            # the path's drel (zeroed float32, filled by atomics) and dgate (every row written)
            drel = torch.zeros(rel_bias.shape, dtype=torch.float32, device=q.device)
            dgate = None if gate is None else _new(gate.shape, q, torch.float32)
            dq_kw = dict(kw, DREL=drel, DGATE=dgate)
        dq = _new(q.shape, q, self.grad_dtype)
        dk = _new(k.shape, k, self.grad_dtype)
        dv = _new(v.shape, v)
        lse = lse.to(torch.float32).contiguous()
        dout = dout.to(q.dtype)
        delta = _new(self.delta_shape, q, torch.float32)
        freq, cos, sin = self.aux
        self.dq_plan.launch((q, k, v, dout, out, dq, lse, delta, freq, cos, sin, klen)
                            + self.dq_rest, dq_kw)
        self.dkdv_plan.launch((q, k, v, dout, dk, dv, lse, delta, freq, cos, sin, klen)
                              + self.dkdv_rest, kw)
        if self.bias is None:
            return dq, dk, dv
        return (dq, dk, dv, drel.to(rel_bias.dtype),
                None if dgate is None else dgate.to(gate.dtype))


def _keep_backward(key, inv_freq, key_lengths, dq_plan, dq_args, dkdv_args, grad_dtype, bias,
                   kw=None):
    plan = last_plan()
    if not (_plan_serves(plan, _BIAS_KW if bias else frozenset())
            and _plan_serves(dq_plan, _DQ_BIAS_KW if bias else frozenset())):
        return
    prog = _BwdProgram()
    prog.bias = _alignment(kw) if bias else None
    prog.dq_plan, prog.dkdv_plan, prog.inv_freq = dq_plan, plan, inv_freq
    prog.klen = dq_args[11] if key_lengths is None else None
    prog.klen_aligned = dq_args[11].data_ptr() % 16 == 0
    prog.aux = dq_args[8:11]
    prog.dq_rest, prog.dkdv_rest = dq_args[12:], dkdv_args[12:]
    prog.grad_dtype, prog.delta_shape = grad_dtype, tuple(dq_args[7].shape)
    _keep(_BWD_PROGRAMS, key, prog)


# ------------------------------------------------------------------------------------------------
# Registered ops (pyencoder.ops._triton_op: torch.library.triton_op + wrap_triton) with the one
# schema of pyencoder.ops._attention_op; their autograd is registered in pyencoder.ops.attention.

@triton_op("pyencoder::interval_attention_triton", mutates_args=())
@op_signature(backward=False, backend=False)
def forward_op(*args):
    """The forward with the arguments of pyencoder.ops._attention_op (no backend string)."""
    return run_forward(forward, *args)


@triton_op("pyencoder::interval_attention_triton_backward", mutates_args=())
@op_signature(backward=True, backend=False)
def backward_op(*args):
    """The backward with the arguments of pyencoder.ops._attention_op (no backend string)."""
    return run_backward(backward, *args)
