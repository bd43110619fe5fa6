"""Triton interval attention with RoPE fused on q and k: forward and backward.

Computes, for query i (absolute position p = q_offset + i) and key j (s = k_offset + j),

    base(p) = (p // block) * block,  lo(p) = base(p) - lo_off (lo_off < 0: -inf),  hi(p) = base(p) + hi_off
(a frame-rate mask, constexpr K_BLOCK not None: base(p) = (p // block) * K_BLOCK, see _key_block)
    visible(i, j) = lo(p) <= s <= hi(p)  and  j < key_lengths[b]
    out_i = softmax_j(scale * rope(q_i, p) . rope(k_j, s))  @ v        (visible j only)

which covers band(left, right) (block 1) and chunked(chunk, left_chunks, lookahead) masks; see
pyencoder/reference/attention.py for the oracle. Sink keys (constexpr HAS_SINK, runtime int sink):
key positions s < sink are visible to every query besides its interval (still j < key_lengths[b]).
A query row with no visible key outputs zeros, has lse = -inf and gets zero gradient.

Algorithm (FlashAttention-2 style, one program per (query tile, batch * query head)):
- lo and hi are non-decreasing in p, so a query tile [i0, i1) only visits key blocks intersecting
  [lo(p(i0)), hi(p(i1 - 1))]; blocks that every row of the tile sees entirely (interior blocks)
  run without an elementwise mask, only the boundary blocks on either side are masked. Cost is
  O(N * W) for a window of width W.
- RoPE is applied in registers. The head dimension is split into three feature groups: the first
  and second members of each rotary pair (NeoX: i and i + R/2; interleaved: 2i and 2i + 1) and
  the R..D-1 pass-through features. q . k is the sum of the three group dot products, so rotation
  is an elementwise operation on the two pair tiles and needs no shuffles. cos/sin come from one
  of two sources (constexpr ROPE_TABLE): computed in the kernel in float32 from
  float32(pos) * inv_freq (tl.cos/tl.sin, recomputed on every tile visit), or loaded from float32
  tables COS_TAB/SIN_TAB of shape (P, HALF), contiguous, row p - tab_base holding position p,
  built by the launcher with the reference's formula (tab_base is a do_not_specialize runtime
  int like q_offset / k_offset: it moves with the streaming offsets, and its value never selects
  a compiled kernel or a fast launch plan, pyencoder/ops/_triton_op.py). Gradients of the
  rotated q and k are un-rotated (angle -theta) in registers before they are stored. There is no
  rotary pass over q or k outside the kernels.
- Online softmax in base 2 (scale * log2(e) folded into the scores); the forward saves the natural
  log-sum-exp. Backward, two kernels launched in this order on one stream: the dq kernel runs per
  query tile like the forward and first computes its tile's delta = rowsum(dO * O) (float32, from
  the O tile loaded beside the dO tile) and stores it to DELTA (B, Hq, Nq), before its key loops,
  for every row of the tile whatever the rows see (no early exit; one launch and one read of dO
  fewer than a separate preprocess kernel); the dk/dv kernel then runs one program per (key
  block, batch * kv head), reads DELTA, loops over the query heads of its GQA group and over the
  query blocks whose interval can contain the block (found by inverting the monotone bounds).
  No atomics: the backward is deterministic by construction.

Non-finite values (semantics of pyencoder.reference.attention: NaN / +-inf in q, k, v or dout
poison exactly the rows and keys that see them, as NaN; nothing leaks through a masked or padded
position). Padded keys are never loaded (masked loads give 0). The poison of a row x is
sum(x * 0): 0 when finite, NaN otherwise. Extra work, all elementwise or row reductions, no dot:
- forward, boundary (masked) key blocks: the k and v rows' poison (row sums of the k, v tiles) is
  added to the scores before the mask select (a visible non-finite key gives a NaN score), and v
  is zeroed where non-finite (one select on the v tile); interior blocks: the row sum of
  p + s * 0 (one fused multiply-add per score) replaces the row sum of p, so a non-finite score
  poisons l even when it is -inf (weight 0); once per program: rows whose acc, l or (if they see
  a key) q is non-finite store NaN output and lse.
- dq, boundary blocks: k zeroed where non-finite, dS selected with the mask (instead of P);
  once per program: a row with a non-finite dq entry is stored all NaN.
- dk/dv, boundary query blocks: q and dout zeroed where non-finite, dS selected with the mask,
  the row's delta poison added to P before the mask select (a row with a non-finite output or
  dout poisons the keys it sees); once per program: a key with a non-finite dk or dv entry gets
  both rows NaN.
The boundary-block loops run with num_stages=1 (tl.range): the selects on the loaded k / v / q /
dout tiles keep them from being copied straight into the pipelined shared-memory buffers, which
pushed the fp32 head_dim-128 configs past sm_80's shared memory; a tile visits at most a couple
of boundary blocks, so their software pipelining bought little. Interior blocks of dq and dk/dv
need nothing: every row there sees every key, so the natural IEEE
propagation reaches exactly the rows and keys that must be NaN, and the final check widens it to
whole rows.

Relative-position bias (constexpr HAS_BIAS, HAS_GATE; pyencoder.ops.attention): the score of
(p, s) gains gate[b, h, i] * REL[h, s - p - rel_offset] (REL float32 (Hq, rel_len), GATE float32
(B, Hq, Nq) contiguous), gathered per visited tile from the dense per-offset vector (the bucketing
is done outside) and added in base 2 before the online softmax; the backward kernels recompute it.
The forward without sink keys reads the bias from a vectorisable layout instead
(constexpr VEC_BIAS, ``_bias_tile_vec``: four zero-padded copies of the vector shifted by 0-3
entries, so each row of a bias tile is one 16-byte-aligned contiguous run, loaded without a mask
as 16-byte vectors; the scalar gather took four times the load instructions, sm_90 SASS by
benchmarks/sass_stats.py). dgate (HAS_GATE) is a row reduction of dS * REL in the dq kernel (stored once per row, NaN on the
rows whose dq is NaN); dREL is accumulated by the dq kernel with float32 atomics into a (Hq, L)
buffer (one per visible pair, non-finite dS of poisoned rows dropped), so it is the one gradient
whose last bits depend on the summation order. Without a bias the pointers and ints are passed as
None (constexpr): the unbiased kernels compile to the same PTX as without these arguments
(benchmarks/ptx_diff.py).

Sink keys (HAS_SINK; sink a do_not_specialize runtime int, both None when off: the same PTX as
without them): one more span per kernel, visited before the band and masked (the visibility is
band OR s < sink). Forward and dq: the key blocks [0, sink end) (_sink_end: keys j < sink -
k_offset, j < nk_b, rounded up to a block); the band's block ranges are clipped to start after
them (_after_sink), so a block in both is visited once. dk/dv: a key block holding a sink key
(k_offset + j0 < sink) is seen by every query, so its sink span is every query block and its band
ranges are clipped away; other key blocks are unchanged. Cost O(N * (W + S)). Rows see a key when
the band or the sink holds one (the zero-row rule). Not combined with K_BLOCK (frame masks): the
launcher refuses it. With a relative bias (HAS_SINK and HAS_BIAS) the column s - p - rel_offset
is clamped to [0, rel_len - 1] (``_clamp_column``: the saturated bucket rule of
pyencoder.ops.attention) wherever the sink kernels read the table, and the dq kernel's drel
atomics use the clamped column: a sink key outside the table reads and accumulates into the edge
column; a visible band key is always inside it (the op validates the columns), so the clamp only
changes what sink keys read. Without sinks the bias code is the code before (same PTX).

Source layout: each kernel walks its block ranges with one span helper (``_fwd_span``,
``_dq_span``, ``_dkdv_span``: a loop over blocks [lo, hi) calling the kernel's block function,
MASKED a constexpr), called for the three spans of _block_ranges (``_span_bounds``: leading
boundary, interior, trailing boundary). Run-time values travel to the helpers as tuples: ``rope``
(INV_FREQ, COS_TAB, SIN_TAB, tab_base, HALF, ROT, NPASS), ``kv`` (k/v bases and strides), ``win``
(block, lo_off, hi_off, q_offset, k_offset), split q/k/gradient tiles as 3-tuples; constexprs stay
named arguments. The feature-group guards (``_groups_poison``, ``_groups_zero_nonfinite``,
``_groups_nan_rows``) are shared by the three kernels; RoPE helpers live in _rotary.py (shared
with the decode kernel). The sink blocks are one more span call.

Limits: head_dim <= 256 (tiles are padded to powers of two with masks, so any D works; 32, 64, 80,
96, 128 are the tuned cases); fp16, bf16, fp32 (fp32 dots use IEEE precision); positions < 2**24
(exact in float32). key_lengths, offsets, the table base and lengths are runtime values (no
recompiles).
"""

import triton
import triton.language as tl

from . import _interpreter  # noqa: F401  (TRITON_INTERPRET=1 compatibility fix)
from ._rotary import _feature_index, _rope_cos_sin


@triton.jit
def _load_qk(base, rows, row_mask, stride_n, stride_d, pos, rope, BLOCK_R: tl.constexpr,
             BLOCK_C: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_PASS: tl.constexpr,
             INTERLEAVED: tl.constexpr, ROPE_TABLE: tl.constexpr):
    """Rotated (pair-first, pair-second, pass-through) tiles of q or k rows, in the input dtype.
    rope = (INV_FREQ, COS_TAB, SIN_TAB, tab_base, HALF, ROT, NPASS)."""
    INV_FREQ, COS_TAB, SIN_TAB, tab_base, HALF, ROT, NPASS = rope
    rp = base + rows[:, None] * stride_n
    xc = tl.zeros([16, 16], dtype=tl.float32)
    xa = xc
    xb = xc
    if HAS_PASS:
        c = tl.arange(0, BLOCK_C)
        xc = tl.load(rp + (ROT + c)[None, :] * stride_d,
                     mask=row_mask[:, None] & (c < NPASS)[None, :], other=0.0)
    if HAS_ROPE:
        r = tl.arange(0, BLOCK_R)
        ia, ib = _feature_index(r, HALF, INTERLEAVED)
        m = row_mask[:, None] & (r < HALF)[None, :]
        x1 = tl.load(rp + ia[None, :] * stride_d, mask=m, other=0.0)
        x2 = tl.load(rp + ib[None, :] * stride_d, mask=m, other=0.0)
        cos, sin = _rope_cos_sin(pos, row_mask, INV_FREQ, COS_TAB, SIN_TAB, tab_base, r, HALF,
                                 ROPE_TABLE)
        x1f = x1.to(tl.float32)
        x2f = x2.to(tl.float32)
        xa = (x1f * cos - x2f * sin).to(x1.dtype)
        xb = (x2f * cos + x1f * sin).to(x1.dtype)
    return xa, xb, xc


@triton.jit
def _store_grad(base, rows, row_mask, stride_n, stride_d, ga, gb, gc, pos, rope,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_ROPE: tl.constexpr,
                HAS_PASS: tl.constexpr, INTERLEAVED: tl.constexpr, ROPE_TABLE: tl.constexpr):
    """Un-rotate (angle -theta) the gradient groups of rotated q or k and store them."""
    INV_FREQ, COS_TAB, SIN_TAB, tab_base, HALF, ROT, NPASS = rope
    rp = base + rows[:, None] * stride_n
    if HAS_PASS:
        c = tl.arange(0, BLOCK_C)
        tl.store(rp + (ROT + c)[None, :] * stride_d, gc.to(base.dtype.element_ty),
                 mask=row_mask[:, None] & (c < NPASS)[None, :])
    if HAS_ROPE:
        r = tl.arange(0, BLOCK_R)
        ia, ib = _feature_index(r, HALF, INTERLEAVED)
        m = row_mask[:, None] & (r < HALF)[None, :]
        cos, sin = _rope_cos_sin(pos, row_mask, INV_FREQ, COS_TAB, SIN_TAB, tab_base, r, HALF,
                                 ROPE_TABLE)
        g1 = ga * cos + gb * sin
        g2 = gb * cos - ga * sin
        tl.store(rp + ia[None, :] * stride_d, g1.to(base.dtype.element_ty), mask=m)
        tl.store(rp + ib[None, :] * stride_d, g2.to(base.dtype.element_ty), mask=m)


@triton.jit
def _scores(xa, xb, xc, ya, yb, yc, acc, HAS_ROPE: tl.constexpr, HAS_PASS: tl.constexpr,
            DOT_PREC: tl.constexpr):
    """acc + x . y^T summed over the three feature groups."""
    if HAS_PASS:
        acc = tl.dot(xc, tl.trans(yc), acc, input_precision=DOT_PREC)
    if HAS_ROPE:
        acc = tl.dot(xa, tl.trans(ya), acc, input_precision=DOT_PREC)
        acc = tl.dot(xb, tl.trans(yb), acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _key_block(block, K_BLOCK: tl.constexpr):
    """The key side's block: ``block`` itself (K_BLOCK None, every band and chunked mask: the
    same code as before frame masks existed) or the constexpr K_BLOCK of a frame-rate mask, where
    base(p) = (p // block) * K_BLOCK (query and key positions in their own units)."""
    kblock = block
    if K_BLOCK is not None:
        kblock = block * 0 + K_BLOCK
    return kblock


@triton.jit
def _visible(rows_pos, cols, cols_pos, nk_b, block, kblock, lo_off, hi_off, sink,
             LO_BOUNDED: tl.constexpr, HAS_SINK: tl.constexpr):
    """Elementwise (rows, cols) visibility (HAS_SINK: key positions < sink too)."""
    base = (rows_pos // block) * kblock
    vis = (cols_pos[None, :] <= (base + hi_off)[:, None]) & (cols < nk_b)[None, :]
    if LO_BOUNDED:
        vis = vis & (cols_pos[None, :] >= (base - lo_off)[:, None])
    if HAS_SINK:
        vis = vis | ((cols_pos < sink) & (cols < nk_b))[None, :]
    return vis


@triton.jit
def _zero_nonfinite(x):
    """x with NaN / inf entries replaced by 0."""
    return tl.where(x * 0.0 == 0.0, x, 0.0)


@triton.jit
def _row_poison(x):
    """(rows,) float32: 0 where the row of x is finite, NaN where it has a NaN / inf entry."""
    return tl.sum((x * 0.0).to(tl.float32), 1)



@triton.jit
def _groups_poison(xa, xb, xc, acc, HAS_ROPE: tl.constexpr, HAS_PASS: tl.constexpr):
    """acc + the (rows,) poison (_row_poison) of the feature groups (rotary pair tiles, pass-
    through tile) of a split q, k or gradient tile."""
    if HAS_ROPE:
        acc += _row_poison(xa) + _row_poison(xb)
    if HAS_PASS:
        acc += _row_poison(xc)
    return acc


@triton.jit
def _groups_zero_nonfinite(xa, xb, xc, HAS_ROPE: tl.constexpr, HAS_PASS: tl.constexpr):
    """The feature groups with NaN / inf entries replaced by 0."""
    if HAS_ROPE:
        xa = _zero_nonfinite(xa)
        xb = _zero_nonfinite(xb)
    if HAS_PASS:
        xc = _zero_nonfinite(xc)
    return xa, xb, xc


@triton.jit
def _groups_nan_rows(poison, xa, xb, xc):
    """The feature groups with every row whose poison is not 0 set to NaN."""
    ok = (poison == 0.0)[:, None]
    return (tl.where(ok, xa, float("nan")), tl.where(ok, xb, float("nan")),
            tl.where(ok, xc, float("nan")))


@triton.jit
def _rows_see_keys(q_pos, rmask, nk_b, block, kblock, lo_off, hi_off, k_offset,
                   LO_BOUNDED: tl.constexpr):
    """(rows,) bool: the query row has at least one visible key."""
    base = (q_pos // block) * kblock
    last = tl.minimum(base + hi_off - k_offset, nk_b - 1)
    first = 0
    if LO_BOUNDED:
        first = tl.maximum(base - lo_off - k_offset, 0)
    return rmask & (last >= first)


@triton.jit
def _block_ranges(first, last_valid, lo_full, hi_full, end, BLOCK: tl.constexpr):
    """Split [first, end) into masked [start, a), unmasked [a, b) and masked [b, end) ranges of
    BLOCK-aligned blocks; [lo_full, hi_full) are the indices fully inside for every row."""
    start = (first // BLOCK) * BLOCK
    end_r = start + tl.cdiv(tl.maximum(end - start, 0), BLOCK) * BLOCK
    a = start + tl.cdiv(tl.maximum(lo_full - start, 0), BLOCK) * BLOCK
    b = start + (tl.maximum(tl.minimum(hi_full, last_valid) - start, 0) // BLOCK) * BLOCK
    keep = (b > a).to(tl.int32)
    a = a * keep + end_r * (1 - keep)
    b = b * keep + end_r * (1 - keep)
    return start, a, b, end_r


@triton.jit
def _query_program(Q, K, V, Hq, GROUP, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb,
                   stride_vh):
    """A query-tile program's ids (tiles launched last-first: the longest run first) and the base
    pointers of its q head and of the k/v head it reads (GQA: Hq // GROUP heads share one)."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    return pid_m, bh, b, h, q_base, k_base, v_base


@triton.jit
def _query_tile(pid_m, b, Nq, Nk, KLEN, block, kblock, lo_off, hi_off, q_offset, k_offset,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LO_BOUNDED: tl.constexpr,
                HAS_KLEN: tl.constexpr):
    """Query tile pid_m of batch b: its rows, row mask, absolute positions, the batch's key count
    and the key-block ranges (_block_ranges) of the keys its queries can see."""
    i0 = pid_m * BLOCK_M
    rows = i0 + tl.arange(0, BLOCK_M)
    rmask = rows < Nq
    q_pos = q_offset + rows
    nk_b = Nk
    if HAS_KLEN:
        nk_b = tl.minimum(tl.load(KLEN + b), Nk)

    p_first = q_offset + i0
    p_last = q_offset + tl.minimum(i0 + BLOCK_M, Nq) - 1
    base_first = (p_first // block) * kblock
    base_last = (p_last // block) * kblock
    end = tl.minimum(nk_b, base_last + hi_off - k_offset + 1)
    hi_full = base_first + hi_off - k_offset + 1
    first = 0
    lo_full = 0
    if LO_BOUNDED:
        first = tl.maximum(base_first - lo_off - k_offset, 0)
        lo_full = tl.maximum(base_last - lo_off - k_offset, 0)
    start, a, bb, end_r = _block_ranges(first, nk_b, lo_full, hi_full, end, BLOCK_N)
    return rows, rmask, q_pos, nk_b, start, a, bb, end_r


@triton.jit
def _span_bounds(SPAN: tl.constexpr, start, a, bb, end_r):
    """Span SPAN of a tile's block ranges (_block_ranges): 0 the leading boundary blocks
    [start, a), 1 the interior blocks [a, bb), 2 the trailing boundary blocks [bb, end_r)."""
    lo = start
    hi = a
    if SPAN == 1:
        lo = a
        hi = bb
    if SPAN == 2:
        lo = bb
        hi = end_r
    return lo, hi


@triton.jit
def _sink_end(sink, k_offset, nk_b, BLOCK: tl.constexpr):
    """End of the sink span [0, end) of the key blocks: the keys j < sink - k_offset (and
    j < nk_b), rounded up to whole blocks of BLOCK."""
    return tl.cdiv(tl.minimum(tl.maximum(sink - k_offset, 0), nk_b), BLOCK) * BLOCK


@triton.jit
def _after_sink(end, start, a, bb, end_r):
    """The block ranges (_block_ranges) clipped to start at the sink span's end ``end`` (a
    multiple of the block, as they are): no block is visited twice."""
    return (tl.maximum(start, end), tl.maximum(a, end), tl.maximum(bb, end),
            tl.maximum(end_r, end))


@triton.jit
def _head_bases(heads, b, h):
    """Base pointers of head (b, h) of the one to three (pointer, batch stride, head stride)
    ``heads`` of a query-tile kernel (forward: O; dq: DO, DQ, O)."""
    ptr, sb, sh = heads[0]
    bases = (ptr + b.to(tl.int64) * sb + h.to(tl.int64) * sh,)
    if len(heads) > 1:
        ptr2, sb2, sh2 = heads[1]
        bases = (bases[0], ptr2 + b.to(tl.int64) * sb2 + h.to(tl.int64) * sh2)
    if len(heads) > 2:
        ptr3, sb3, sh3 = heads[2]
        bases = (bases[0], bases[1], ptr3 + b.to(tl.int64) * sb3 + h.to(tl.int64) * sh3)
    return bases


@triton.jit
def _query_setup(Q, K, V, KLEN, INV_FREQ, COS_TAB, SIN_TAB, heads, stride_qb, stride_qh,
                 stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn,
                 stride_vd, Hq, GROUP, Nq, Nk, HALF, ROT, NPASS, block, lo_off, hi_off, q_offset,
                 k_offset, tab_base, sink, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 LO_BOUNDED: tl.constexpr, HAS_KLEN: tl.constexpr, K_BLOCK: tl.constexpr,
                 HAS_SINK: tl.constexpr):
    """Preamble of a query-tile kernel (forward, dq): program ids (_query_program), the base
    pointers of the kernel's own ``heads`` (_head_bases; computed before the tile, the order of
    the code before this helper: same PTX), the tile (_query_tile), the ``rope`` / ``kv`` tuples
    of the span helpers and the key block (``win`` is built by the caller: a compiled function
    cannot return the None that ``sink`` is without sinks), the end of the sink span (HAS_SINK;
    0 otherwise) and the band's block ranges (start, a, bb, end_r), clipped after the sink span
    (_after_sink)."""
    kblock = _key_block(block, K_BLOCK)
    pid_m, bh, b, h, q_base, k_base, v_base = _query_program(
        Q, K, V, Hq, GROUP, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh)
    bases = _head_bases(heads, b, h)
    rows, rmask, q_pos, nk_b, start, a, bb, end_r = _query_tile(
        pid_m, b, Nq, Nk, KLEN, block, kblock, lo_off, hi_off, q_offset, k_offset, BLOCK_M,
        BLOCK_N, LO_BOUNDED, HAS_KLEN)
    rope = (INV_FREQ, COS_TAB, SIN_TAB, tab_base, HALF, ROT, NPASS)
    kv = (k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd)
    ns_end = 0
    if HAS_SINK:
        ns_end = _sink_end(sink, k_offset, nk_b, BLOCK_N)
        start, a, bb, end_r = _after_sink(ns_end, start, a, bb, end_r)
    return (bh, h, q_base, bases, rows, rmask, q_pos, nk_b, (start, a, bb, end_r), ns_end, rope,
            kv, kblock)


@triton.jit
def _bias_setup(REL, GATE, rel_len, rel_offset, h, bh, rows, rmask, Nq, HAS_BIAS: tl.constexpr,
                HAS_GATE: tl.constexpr, VEC_BIAS: tl.constexpr = None):
    """Relative bias of head h for the query rows ``rows``: (table row pointer, float32 gate of
    the rows (0.0 placeholder without a gate), table length, rel_offset); numeric placeholders
    without a bias (a compiled function cannot return None)."""
    res = (0, 0.0, 0, 0)
    if HAS_BIAS:
        g = 0.0
        if HAS_GATE:
            g = tl.load(GATE + bh.to(tl.int64) * Nq + rows, mask=rmask, other=0.0)
        if VEC_BIAS:   # the head's four shifted copies (_bias_tile_vec)
            res = (REL + h * 4 * rel_len, g, rel_len, rel_offset)
        else:
            res = (REL + h * rel_len, g, rel_len, rel_offset)
    return res


@triton.jit
def _bias_tile(bias, rel, HAS_GATE: tl.constexpr, TRANS: tl.constexpr, CLAMP: tl.constexpr):
    """(table values, gated values, in-table mask) of a tile ``rel`` of relative offsets s - p:
    (queries, keys), or (keys, queries) when TRANS; the gate is per query. CLAMP (the kernels
    with sink keys): the column is clamped to [0, rel_len - 1], the saturated bucket rule."""
    rel_row, g, rel_len, rel_offset = bias
    c = rel - rel_offset
    if CLAMP:
        c = _clamp_column(c, rel_len)
    ok = (c >= 0) & (c < rel_len)
    raw = tl.load(rel_row + c, mask=ok, other=0.0)
    val = raw
    if HAS_GATE:
        if TRANS:
            val = raw * g[None, :]
        else:
            val = raw * g[:, None]
    return raw, val, ok


@triton.jit
def _bias_tile_vec(bias, q_pos, k0, BLOCK_N: tl.constexpr, HAS_GATE: tl.constexpr):
    """Gated values of the bias tile (queries q_pos, keys at positions k0 + [0, BLOCK_N)) from
    the launcher's vectorisable layout (VEC_BIAS, forward without sinks): per head four copies
    of the zero-padded per-offset vector, copy t shifted by t entries (REL4[h, t, x] =
    padded[h, x + t], rows rel_len = L4 long, L4 a multiple of 16). A row's offsets
    y .. y + BLOCK_N - 1 are contiguous; reading them from copy y % 4 at y - y % 4 makes every
    row start 16-byte aligned, so the tile loads as 16-byte vectors (one instruction per four
    entries instead of four). The zero padding (wider than any tile's reach outside the window)
    replaces the in-table mask: out-of-table entries read 0, as the masked load's other=0."""
    rel_row, g, L4, rel_offset = bias
    y = (k0 - rel_offset) - q_pos
    t = y % 4
    # L4 and y - t are multiples of 4 (L4 a runtime int: the hint carries it)
    start = tl.multiple_of(t * L4 + (y - t), 4)
    raw = tl.load(rel_row + start[:, None] + tl.arange(0, BLOCK_N)[None, :])
    if HAS_GATE:
        raw = raw * g[:, None]
    return raw


@triton.jit
def _clamp_column(c, rel_len):
    """Bias column c clamped to [0, rel_len - 1] (a sink key outside the table reads its edge)."""
    return tl.minimum(tl.maximum(c, 0), rel_len - 1)


@triton.jit
def _key_tile(kv, rope, j0, nk_b, k_offset, D, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
              BLOCK_C: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_ROPE: tl.constexpr,
              HAS_PASS: tl.constexpr, INTERLEAVED: tl.constexpr, ROPE_TABLE: tl.constexpr,
              ZERO_K: tl.constexpr):
    """Key block j0 of a query-tile kernel (forward, dq): its columns, absolute positions, the
    rotated k groups (ZERO_K: non-finite entries zeroed, before v is loaded) and the v tile."""
    k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd = kv
    cols = j0 + tl.arange(0, BLOCK_N)
    cmask = cols < nk_b
    k_pos = k_offset + cols
    ka, kb, kc = _load_qk(k_base, cols, cmask, stride_kn, stride_kd, k_pos, rope, BLOCK_R,
                          BLOCK_C, HAS_ROPE, HAS_PASS, INTERLEAVED, ROPE_TABLE)
    if ZERO_K:
        # rows that do not see a non-finite key must not read it through a zero coefficient
        ka, kb, kc = _groups_zero_nonfinite(ka, kb, kc, HAS_ROPE, HAS_PASS)
    dv = tl.arange(0, BLOCK_DV)
    v = tl.load(v_base + cols[:, None] * stride_vn + dv[None, :] * stride_vd,
                mask=cmask[:, None] & (dv < D)[None, :], other=0.0)
    return cols, k_pos, ka, kb, kc, v


@triton.jit
def _fwd_block(acc, l_i, m_i, q3, kv, rope, win, bias, j0, q_pos, nk_b, D, qk_scale,
               BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
               BLOCK_DV: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_PASS: tl.constexpr,
               INTERLEAVED: tl.constexpr, LO_BOUNDED: tl.constexpr, MASKED: tl.constexpr,
               DOT_PREC: tl.constexpr, ROPE_TABLE: tl.constexpr, HAS_BIAS: tl.constexpr,
               HAS_GATE: tl.constexpr, HAS_SINK: tl.constexpr,
               VEC_BIAS: tl.constexpr = None):
    qa, qb, qc = q3
    block, lo_off, hi_off, q_offset, k_offset, kblock, sink = win
    cols, k_pos, ka, kb, kc, v = _key_tile(kv, rope, j0, nk_b, k_offset, D, BLOCK_N, BLOCK_R,
                                           BLOCK_C, BLOCK_DV, HAS_ROPE, HAS_PASS, INTERLEAVED,
                                           ROPE_TABLE, False)
    s = _scores(qa, qb, qc, ka, kb, kc, tl.zeros([acc.shape[0], BLOCK_N], dtype=tl.float32),
                HAS_ROPE, HAS_PASS, DOT_PREC) * qk_scale
    if HAS_BIAS:
        if VEC_BIAS:
            bv = _bias_tile_vec(bias, q_pos, k_offset + j0, BLOCK_N, HAS_GATE)
        else:
            _, bv, _ = _bias_tile(bias, k_pos[None, :] - q_pos[:, None], HAS_GATE, False,
                                  HAS_SINK)
        s += bv * 1.4426950408889634
    if MASKED:
        # keys with a non-finite k or v: NaN score where visible, v row zeroed for the p @ v dot
        kv0 = _groups_poison(ka, kb, kc, _row_poison(v), HAS_ROPE, HAS_PASS)
        vis = _visible(q_pos, cols, k_pos, nk_b, block, kblock, lo_off, hi_off, sink, LO_BOUNDED,
                       HAS_SINK)
        s = tl.where(vis, s + kv0[None, :], float("-inf"))
        v = _zero_nonfinite(v)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    if MASKED:
        l_i = l_i * alpha + tl.sum(p, 1)
    else:
        # every row sees every key here: a non-finite q or k makes its scores non-finite, and a
        # -inf one (weight 0) would not show in p, so each score's poison (s * 0) joins the sum;
        # a non-finite v reaches acc on its own
        l_i = l_i * alpha + tl.sum(p + s * 0.0, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _fwd_span(m_i, l_i, acc, q3, kv, rope, win, bias, j_lo, j_hi, q_pos, nk_b, D, qk_scale,
              BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
              BLOCK_DV: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_PASS: tl.constexpr,
              INTERLEAVED: tl.constexpr, LO_BOUNDED: tl.constexpr, MASKED: tl.constexpr,
              DOT_PREC: tl.constexpr, ROPE_TABLE: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_GATE: tl.constexpr, HAS_SINK: tl.constexpr,
              PIPE_MASKED: tl.constexpr = None, VEC_BIAS: tl.constexpr = None):
    """The key blocks [j_lo, j_hi) of a query tile; masked (boundary) spans run unpipelined.
    (m_i, l_i, acc: the loop-carry order of the kernel before the span helpers, same PTX.)"""
    for j0 in tl.range(j_lo, j_hi, BLOCK_N,
                       num_stages=(None if PIPE_MASKED else 1) if MASKED else None):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q3, kv, rope, win, bias, j0, q_pos, nk_b, D,
                                   qk_scale, BLOCK_N, BLOCK_R, BLOCK_C, BLOCK_DV, HAS_ROPE,
                                   HAS_PASS, INTERLEAVED, LO_BOUNDED, MASKED, DOT_PREC,
                                   ROPE_TABLE, HAS_BIAS, HAS_GATE, HAS_SINK, VEC_BIAS)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["q_offset", "k_offset", "tab_base", "rel_len", "rel_offset", "sink"])
def _interval_attention_fwd_kernel(
        Q, K, V, O, LSE, INV_FREQ, COS_TAB, SIN_TAB, KLEN,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_on, stride_od,
        Hq, GROUP, Nq, Nk, D, HALF, ROT, NPASS,
        block, lo_off, hi_off, q_offset, k_offset, tab_base, qk_scale, WIN_KEY,
        REL, GATE, rel_len, rel_offset, sink,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_ROPE: tl.constexpr,
        HAS_PASS: tl.constexpr, INTERLEAVED: tl.constexpr, LO_BOUNDED: tl.constexpr,
        HAS_KLEN: tl.constexpr, DOT_PREC: tl.constexpr, ROPE_TABLE: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, K_BLOCK: tl.constexpr = None,
        HAS_SINK: tl.constexpr = None, PIPE_MASKED: tl.constexpr = None,
        VEC_BIAS: tl.constexpr = None):
    bh, h, q_base, bases, rows, rmask, q_pos, nk_b, ranges, ns_end, rope, kv, kblock = \
        _query_setup(Q, K, V, KLEN, INV_FREQ, COS_TAB, SIN_TAB, ((O, stride_ob, stride_oh),),
                     stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb,
                     stride_vh, stride_vn, stride_vd, Hq, GROUP, Nq, Nk, HALF, ROT, NPASS, block,
                     lo_off, hi_off, q_offset, k_offset, tab_base, sink, BLOCK_M, BLOCK_N,
                     LO_BOUNDED, HAS_KLEN, K_BLOCK, HAS_SINK)
    o_base = bases[0]
    start, a, bb, end_r = ranges
    win = (block, lo_off, hi_off, q_offset, k_offset, kblock, sink)

    qa, qb, qc = _load_qk(q_base, rows, rmask, stride_qn, stride_qd, q_pos, rope, BLOCK_R,
                          BLOCK_C, HAS_ROPE, HAS_PASS, INTERLEAVED, ROPE_TABLE)
    q3 = (qa, qb, qc)
    bias = _bias_setup(REL, GATE, rel_len, rel_offset, h, bh, rows, rmask, Nq, HAS_BIAS, HAS_GATE,
                       VEC_BIAS)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if HAS_SINK:   # the sink key blocks (masked); the band's ranges start after them
        acc, l_i, m_i = _fwd_span(m_i, l_i, acc, q3, kv, rope, win, bias, 0, ns_end, q_pos,
                                  nk_b, D, qk_scale, BLOCK_N, BLOCK_R, BLOCK_C, BLOCK_DV,
                                  HAS_ROPE, HAS_PASS, INTERLEAVED, LO_BOUNDED, True,
                                  DOT_PREC, ROPE_TABLE, HAS_BIAS, HAS_GATE, HAS_SINK, PIPE_MASKED,
                                  VEC_BIAS)
    # boundary blocks (masked), interior blocks (every row sees every key), boundary blocks
    for span in tl.static_range(3):
        j_lo, j_hi = _span_bounds(span, start, a, bb, end_r)
        acc, l_i, m_i = _fwd_span(m_i, l_i, acc, q3, kv, rope, win, bias, j_lo, j_hi, q_pos,
                                  nk_b, D, qk_scale, BLOCK_N, BLOCK_R, BLOCK_C, BLOCK_DV,
                                  HAS_ROPE, HAS_PASS, INTERLEAVED, LO_BOUNDED, span != 1,
                                  DOT_PREC, ROPE_TABLE, HAS_BIAS, HAS_GATE, HAS_SINK, PIPE_MASKED,
                                  VEC_BIAS)

    nz = l_i > 0.0
    l_safe = tl.where(nz, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(nz, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    # poisoned rows (NaN output and lse): a non-finite acc or l, or a non-finite q row that
    # sees a key
    rz = _row_poison(acc) + l_i * 0.0
    qz = _groups_poison(qa, qb, qc, tl.zeros([BLOCK_M], dtype=tl.float32), HAS_ROPE, HAS_PASS)
    if HAS_GATE:
        qz += bias[1] * 0.0
    sees = _rows_see_keys(q_pos, rmask, nk_b, block, kblock, lo_off, hi_off, k_offset,
                          LO_BOUNDED)
    if HAS_SINK:
        sees = sees | (rmask & (tl.minimum(sink - k_offset, nk_b) > 0))
    ok = (rz + tl.where(sees, qz, 0.0)) == 0.0
    out = tl.where(ok[:, None], out, float("nan"))
    lse = tl.where(ok, lse, float("nan"))
    dv = tl.arange(0, BLOCK_DV)
    tl.store(o_base + rows[:, None] * stride_on + dv[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=rmask[:, None] & (dv < D)[None, :])
    tl.store(LSE + bh.to(tl.int64) * Nq + rows, lse, mask=rmask)


@triton.jit
def _dq_block(dq3, q3, do, lse2, delta, kv, rope, win, bias, j0, q_pos, nk_b, D, qk_scale,
              BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
              BLOCK_DV: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_PASS: tl.constexpr,
              INTERLEAVED: tl.constexpr, LO_BOUNDED: tl.constexpr, MASKED: tl.constexpr,
              DOT_PREC: tl.constexpr, ROPE_TABLE: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_GATE: tl.constexpr, DREL_ROW, HAS_SINK: tl.constexpr):
    dqc, dqa, dqb = dq3[0], dq3[1], dq3[2]
    qa, qb, qc = q3
    block, lo_off, hi_off, q_offset, k_offset, kblock, sink = win
    cols, k_pos, ka, kb, kc, v = _key_tile(kv, rope, j0, nk_b, k_offset, D, BLOCK_N, BLOCK_R,
                                           BLOCK_C, BLOCK_DV, HAS_ROPE, HAS_PASS, INTERLEAVED,
                                           ROPE_TABLE, MASKED)
    s = _scores(qa, qb, qc, ka, kb, kc, tl.zeros([do.shape[0], BLOCK_N], dtype=tl.float32),
                HAS_ROPE, HAS_PASS, DOT_PREC) * qk_scale
    if HAS_BIAS:
        rel = k_pos[None, :] - q_pos[:, None]
        braw, bv, bok = _bias_tile(bias, rel, HAS_GATE, False, HAS_SINK)
        s += bv * 1.4426950408889634
    p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    if MASKED:
        vis = _visible(q_pos, cols, k_pos, nk_b, block, kblock, lo_off, hi_off, sink, LO_BOUNDED,
                       HAS_SINK)
        ds = tl.where(vis, ds, 0.0)
    if HAS_BIAS:
        # d gate = row sum of dS * table; d table[h, s - p] += dS * gate (float32 atomics; a
        # poisoned row's non-finite dS adds nothing, its dq / dgate are NaN)
        rel_row, g, rel_len, rel_offset = bias
        w = ds
        if HAS_GATE:
            dg = dq3[3] + tl.sum(ds * braw, 1)
            w = ds * g[:, None]
        live = bok & (cols < nk_b)[None, :]
        if MASKED:
            live = live & vis
        col = rel - rel_offset
        if HAS_SINK:   # a sink key outside the table adds into the edge column
            col = _clamp_column(col, rel_len)
        tl.atomic_add(DREL_ROW + col, _zero_nonfinite(w), mask=live, sem="relaxed")
    ds = ds.to(v.dtype)
    if HAS_PASS:
        dqc = tl.dot(ds, kc, dqc, input_precision=DOT_PREC)
    if HAS_ROPE:
        dqa = tl.dot(ds, ka, dqa, input_precision=DOT_PREC)
        dqb = tl.dot(ds, kb, dqb, input_precision=DOT_PREC)
    res = (dqc, dqa, dqb)
    if HAS_GATE:
        res = (dqc, dqa, dqb, dg)
    return res


@triton.jit
def _dq_span(dq3, q3, do, lse2, delta, kv, rope, win, bias, j_lo, j_hi, q_pos, nk_b, D,
             qk_scale, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
             BLOCK_DV: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_PASS: tl.constexpr,
             INTERLEAVED: tl.constexpr, LO_BOUNDED: tl.constexpr, MASKED: tl.constexpr,
             DOT_PREC: tl.constexpr, ROPE_TABLE: tl.constexpr, HAS_BIAS: tl.constexpr,
             HAS_GATE: tl.constexpr, DREL_ROW, HAS_SINK: tl.constexpr,
              PIPE_MASKED: tl.constexpr = None):
    """The key blocks [j_lo, j_hi) of a query tile; masked (boundary) spans run unpipelined."""
    for j0 in tl.range(j_lo, j_hi, BLOCK_N,
                       num_stages=(None if PIPE_MASKED else 1) if MASKED else None):
        dq3 = _dq_block(dq3, q3, do, lse2, delta, kv, rope, win, bias, j0, q_pos, nk_b,
                            D, qk_scale, BLOCK_N, BLOCK_R, BLOCK_C, BLOCK_DV, HAS_ROPE,
                            HAS_PASS, INTERLEAVED, LO_BOUNDED, MASKED, DOT_PREC, ROPE_TABLE,
                            HAS_BIAS, HAS_GATE, DREL_ROW, HAS_SINK)
    return dq3


@triton.jit(do_not_specialize=["q_offset", "k_offset", "tab_base", "rel_len", "rel_offset", "sink"])
def _interval_attention_bwd_dq_kernel(
        Q, K, V, DO, O, DQ, LSE, DELTA, INV_FREQ, COS_TAB, SIN_TAB, KLEN,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_dob, stride_doh, stride_don, stride_dod,
        stride_ob, stride_oh, stride_on, stride_od,
        stride_dqb, stride_dqh, stride_dqn, stride_dqd,
        Hq, GROUP, Nq, Nk, D, HALF, ROT, NPASS,
        block, lo_off, hi_off, q_offset, k_offset, tab_base, scale, qk_scale, WIN_KEY,
        REL, GATE, rel_len, rel_offset, DREL, DGATE, sink,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_ROPE: tl.constexpr,
        HAS_PASS: tl.constexpr, INTERLEAVED: tl.constexpr, LO_BOUNDED: tl.constexpr,
        HAS_KLEN: tl.constexpr, DOT_PREC: tl.constexpr, ROPE_TABLE: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, K_BLOCK: tl.constexpr = None,
        HAS_SINK: tl.constexpr = None, PIPE_MASKED: tl.constexpr = None):
    bh, h, q_base, bases, rows, rmask, q_pos, nk_b, ranges, ns_end, rope, kv, kblock = \
        _query_setup(Q, K, V, KLEN, INV_FREQ, COS_TAB, SIN_TAB,
                     ((DO, stride_dob, stride_doh), (DQ, stride_dqb, stride_dqh),
                      (O, stride_ob, stride_oh)),
                     stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb,
                     stride_vh, stride_vn, stride_vd, Hq, GROUP, Nq, Nk, HALF, ROT, NPASS, block,
                     lo_off, hi_off, q_offset, k_offset, tab_base, sink, BLOCK_M, BLOCK_N,
                     LO_BOUNDED, HAS_KLEN, K_BLOCK, HAS_SINK)
    do_base, dq_base, o_base = bases
    start, a, bb, end_r = ranges
    win = (block, lo_off, hi_off, q_offset, k_offset, kblock, sink)

    q3 = _load_qk(q_base, rows, rmask, stride_qn, stride_qd, q_pos, rope, BLOCK_R, BLOCK_C,
                  HAS_ROPE, HAS_PASS, INTERLEAVED, ROPE_TABLE)
    dvi = tl.arange(0, BLOCK_DV)
    dmask = rmask[:, None] & (dvi < D)[None, :]
    do = tl.load(do_base + rows[:, None] * stride_don + dvi[None, :] * stride_dod, mask=dmask,
                 other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * Nq + rows, mask=rmask, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    # delta = rowsum(dO * O) in float32 (padded rows and head_dim columns load 0), stored for the
    # dk/dv kernel before the key loops: every row of every (b, h) is written by its tile
    o = tl.load(o_base + rows[:, None] * stride_on + dvi[None, :] * stride_od, mask=dmask,
                other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * Nq + rows, delta, mask=rmask)
    # accumulators (pass-through, pair-first, pair-second): the loop-carry order of the kernel
    # before the span helpers (same PTX)
    dq3 = (tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32),
           tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32),
           tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32))
    if HAS_GATE:   # and the row sums of dgate
        dq3 = (tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32),
               tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32),
               tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32),
               tl.zeros([BLOCK_M], dtype=tl.float32))
    bias = _bias_setup(REL, GATE, rel_len, rel_offset, h, bh, rows, rmask, Nq, HAS_BIAS, HAS_GATE)
    drel_row = DREL
    if HAS_BIAS:
        drel_row = DREL + h * rel_len
    if HAS_SINK:   # the sink key blocks (masked); the band's ranges start after them
        dq3 = _dq_span(dq3, q3, do, lse2, delta, kv, rope, win, bias, 0, ns_end, q_pos,
                       nk_b, D, qk_scale, BLOCK_N, BLOCK_R, BLOCK_C, BLOCK_DV, HAS_ROPE,
                       HAS_PASS, INTERLEAVED, LO_BOUNDED, True, DOT_PREC, ROPE_TABLE,
                       HAS_BIAS, HAS_GATE, drel_row, HAS_SINK, PIPE_MASKED)
    for span in tl.static_range(3):
        j_lo, j_hi = _span_bounds(span, start, a, bb, end_r)
        dq3 = _dq_span(dq3, q3, do, lse2, delta, kv, rope, win, bias, j_lo, j_hi, q_pos,
                       nk_b, D, qk_scale, BLOCK_N, BLOCK_R, BLOCK_C, BLOCK_DV, HAS_ROPE,
                       HAS_PASS, INTERLEAVED, LO_BOUNDED, span != 1, DOT_PREC, ROPE_TABLE,
                       HAS_BIAS, HAS_GATE, drel_row, HAS_SINK, PIPE_MASKED)
    dqc, dqa, dqb = dq3[0], dq3[1], dq3[2]
    dqz = _groups_poison(dqa, dqb, dqc, tl.zeros([BLOCK_M], dtype=tl.float32), HAS_ROPE, HAS_PASS)
    if HAS_GATE:
        # a poisoned row (a non-finite gate included) gets a NaN dgate, and NaN dq
        dg = dq3[3]
        dqz += dg * 0.0
        tl.store(DGATE + bh.to(tl.int64) * Nq + rows, tl.where(dqz == 0.0, dg, float("nan")),
                 mask=rmask)
    dqa, dqb, dqc = _groups_nan_rows(dqz, dqa, dqb, dqc)
    _store_grad(dq_base, rows, rmask, stride_dqn, stride_dqd, dqa * scale, dqb * scale,
                dqc * scale, q_pos, rope, BLOCK_R, BLOCK_C, HAS_ROPE, HAS_PASS, INTERLEAVED,
                ROPE_TABLE)


@triton.jit
def _visible_t(k_pos, kmask, q_pos, qmask, block, kblock, lo_off, hi_off, sink,
               LO_BOUNDED: tl.constexpr, HAS_SINK: tl.constexpr):
    """Elementwise (keys, queries) visibility (transposed mask of the dk/dv kernel)."""
    base = (q_pos // block) * kblock
    vis = (k_pos[:, None] <= (base + hi_off)[None, :]) & kmask[:, None] & qmask[None, :]
    if LO_BOUNDED:
        vis = vis & (k_pos[:, None] >= (base - lo_off)[None, :])
    if HAS_SINK:
        vis = vis | (((k_pos < sink) & kmask)[:, None] & qmask[None, :])
    return vis


@triton.jit
def _dkdv_block_t(dk3, dv, k3, v, kmask, k_pos, qd, rope, win, hbias, i0, Nq, D, qk_scale,
                  BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_DV: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_PASS: tl.constexpr,
                  INTERLEAVED: tl.constexpr, LO_BOUNDED: tl.constexpr, MASKED: tl.constexpr,
                  DOT_PREC: tl.constexpr, ROPE_TABLE: tl.constexpr, HAS_BIAS: tl.constexpr,
                  HAS_GATE: tl.constexpr, HAS_SINK: tl.constexpr):
    dkc, dka, dkb = dk3
    ka, kb, kc = k3
    q_base, do_base, LSE, DELTA, stride_qn, stride_qd, stride_don, stride_dod = qd
    block, lo_off, hi_off, q_offset, k_offset, kblock, sink = win
    rows = i0 + tl.arange(0, BLOCK_M)
    rmask = rows < Nq
    q_pos = q_offset + rows
    qa, qb, qc = _load_qk(q_base, rows, rmask, stride_qn, stride_qd, q_pos, rope, BLOCK_R,
                          BLOCK_C, HAS_ROPE, HAS_PASS, INTERLEAVED, ROPE_TABLE)
    dvi = tl.arange(0, BLOCK_DV)
    do = tl.load(do_base + rows[:, None] * stride_don + dvi[None, :] * stride_dod,
                 mask=rmask[:, None] & (dvi < D)[None, :], other=0.0)
    lse = tl.load(LSE + rows, mask=rmask, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    delta = tl.load(DELTA + rows, mask=rmask, other=0.0)
    if MASKED:
        # keys must not read a non-finite q or dout row of a query that does not see them; a
        # query row with a non-finite delta (poisoned output or non-finite dout) poisons the
        # keys it sees through a NaN probability
        qa, qb, qc = _groups_zero_nonfinite(qa, qb, qc, HAS_ROPE, HAS_PASS)
        do = _zero_nonfinite(do)
    st = _scores(ka, kb, kc, qa, qb, qc, tl.zeros([v.shape[0], BLOCK_M], dtype=tl.float32),
                 HAS_ROPE, HAS_PASS, DOT_PREC) * qk_scale
    if HAS_BIAS:
        REL_ROW, GATE_ROW, rel_len, rel_offset = hbias
        g = 0.0
        if HAS_GATE:
            g = _zero_nonfinite(tl.load(GATE_ROW + rows, mask=rmask, other=0.0))
        _, bv, _ = _bias_tile((REL_ROW, g, rel_len, rel_offset),
                              k_pos[:, None] - q_pos[None, :], HAS_GATE, True, HAS_SINK)
        st += bv * 1.4426950408889634
    pt = tl.math.exp2(st - lse2[None, :])
    if MASKED:
        vis = _visible_t(k_pos, kmask, q_pos, rmask, block, kblock, lo_off, hi_off, sink,
                         LO_BOUNDED, HAS_SINK)
        pt = tl.where(vis, pt + (delta * 0.0)[None, :], 0.0)
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dst = pt * (dpt - delta[None, :])
    if MASKED:
        dst = tl.where(vis, dst, 0.0)
    dst = dst.to(do.dtype)
    if HAS_PASS:
        dkc = tl.dot(dst, qc, dkc, input_precision=DOT_PREC)
    if HAS_ROPE:
        dka = tl.dot(dst, qa, dka, input_precision=DOT_PREC)
        dkb = tl.dot(dst, qb, dkb, input_precision=DOT_PREC)
    return (dkc, dka, dkb), dv


@triton.jit
def _dkdv_span(dk3, dv, k3, v, kmask, k_pos, qd, rope, win, hbias, i_lo, i_hi, Nq, D, qk_scale,
               BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
               BLOCK_DV: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_PASS: tl.constexpr,
               INTERLEAVED: tl.constexpr, LO_BOUNDED: tl.constexpr, MASKED: tl.constexpr,
               DOT_PREC: tl.constexpr, ROPE_TABLE: tl.constexpr, HAS_BIAS: tl.constexpr,
               HAS_GATE: tl.constexpr, HAS_SINK: tl.constexpr,
              PIPE_MASKED: tl.constexpr = None):
    """The query blocks [i_lo, i_hi) of a key block; masked (boundary) spans run unpipelined."""
    for i0 in tl.range(i_lo, i_hi, BLOCK_M,
                       num_stages=(None if PIPE_MASKED else 1) if MASKED else None):
        dk3, dv = _dkdv_block_t(dk3, dv, k3, v, kmask, k_pos, qd, rope, win, hbias, i0, Nq, D,
                                qk_scale, BLOCK_M, BLOCK_R, BLOCK_C, BLOCK_DV, HAS_ROPE,
                                HAS_PASS, INTERLEAVED, LO_BOUNDED, MASKED, DOT_PREC, ROPE_TABLE,
                                HAS_BIAS, HAS_GATE, HAS_SINK)
    return dk3, dv


@triton.jit(do_not_specialize=["q_offset", "k_offset", "tab_base", "rel_len", "rel_offset", "sink"])
def _interval_attention_bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, LSE, DELTA, INV_FREQ, COS_TAB, SIN_TAB, KLEN,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_dob, stride_doh, stride_don, stride_dod,
        stride_dkb, stride_dkh, stride_dkn, stride_dkd,
        stride_dvb, stride_dvh, stride_dvn, stride_dvd,
        Hq, Hk, GROUP, Nq, Nk, D, HALF, ROT, NPASS,
        block, lo_off, hi_off, q_offset, k_offset, tab_base, scale, qk_scale, WIN_KEY,
        REL, GATE, rel_len, rel_offset, sink,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_ROPE: tl.constexpr,
        HAS_PASS: tl.constexpr, INTERLEAVED: tl.constexpr, LO_BOUNDED: tl.constexpr,
        HAS_KLEN: tl.constexpr, DOT_PREC: tl.constexpr, ROPE_TABLE: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, K_BLOCK: tl.constexpr = None,
        HAS_SINK: tl.constexpr = None, PIPE_MASKED: tl.constexpr = None):
    kblock = _key_block(block, K_BLOCK)
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // Hk
    hk = bhk % Hk
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    nk_b = Nk
    if HAS_KLEN:
        nk_b = tl.minimum(tl.load(KLEN + b), Nk)

    j0 = pid_n * BLOCK_N
    cols = j0 + tl.arange(0, BLOCK_N)
    kmask = cols < nk_b
    k_pos = k_offset + cols
    j_last = tl.minimum(j0 + BLOCK_N, nk_b) - 1
    s0 = k_offset + j0
    s1 = k_offset + j_last
    # queries p with hi(p) >= s0 and lo(p) <= s1 can see a key of the block; every key of the
    # block is visible to p when hi(p) >= s0 + BLOCK_N - 1 and lo(p) <= s0 (and the block is full)
    p_first = tl.cdiv(tl.maximum(s0 - hi_off, 0), kblock) * block
    p_full_first = tl.cdiv(tl.maximum(s0 + BLOCK_N - 1 - hi_off, 0), kblock) * block
    i_end = Nq
    i_full_end = Nq
    if LO_BOUNDED:
        i_end = tl.minimum(((s1 + lo_off) // kblock) * block + block - q_offset, Nq)
        i_full_end = tl.minimum(((s0 + lo_off) // kblock) * block + block - q_offset, Nq)
    i_end = i_end * (j_last >= j0).to(tl.int32)
    i_full_end = i_full_end * (j0 + BLOCK_N <= nk_b).to(tl.int32)
    i_first = tl.maximum(p_first - q_offset, 0)
    i_full_first = tl.maximum(p_full_first - q_offset, 0)
    start, a, bb, end_r = _block_ranges(i_first, Nq, i_full_first, i_full_end, i_end, BLOCK_M)
    ni_end = 0
    if HAS_SINK:
        # a block holding sink keys is seen by every query: the sink span covers all query
        # blocks (masked), the band's blocks are clipped away
        ni_end = tl.cdiv(Nq, BLOCK_M) * BLOCK_M * ((s0 < sink) & (j_last >= j0)).to(tl.int32)
        start, a, bb, end_r = _after_sink(ni_end, start, a, bb, end_r)
    rope = (INV_FREQ, COS_TAB, SIN_TAB, tab_base, HALF, ROT, NPASS)
    win = (block, lo_off, hi_off, q_offset, k_offset, kblock, sink)

    k3 = _load_qk(k_base, cols, kmask, stride_kn, stride_kd, k_pos, rope, BLOCK_R, BLOCK_C,
                  HAS_ROPE, HAS_PASS, INTERLEAVED, ROPE_TABLE)
    dvi = tl.arange(0, BLOCK_DV)
    v = tl.load(v_base + cols[:, None] * stride_vn + dvi[None, :] * stride_vd,
                mask=kmask[:, None] & (dvi < D)[None, :], other=0.0)
    # accumulators (pass-through, pair-first, pair-second), then dv: the loop-carry order of the
    # kernel before the span helpers (same PTX)
    dk3 = (tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32),
           tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32),
           tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32))
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * Hq + h
        qd = (Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh,
              DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh,
              LSE + bh.to(tl.int64) * Nq, DELTA + bh.to(tl.int64) * Nq,
              stride_qn, stride_qd, stride_don, stride_dod)
        hbias = (0, 0, 0, 0)
        if HAS_GATE:
            hbias = (REL + h * rel_len, GATE + bh.to(tl.int64) * Nq, rel_len, rel_offset)
        elif HAS_BIAS:
            hbias = (REL + h * rel_len, 0, rel_len, rel_offset)
        if HAS_SINK:
            dk3, dv = _dkdv_span(dk3, dv, k3, v, kmask, k_pos, qd, rope, win, hbias, 0, ni_end,
                                 Nq, D, qk_scale, BLOCK_M, BLOCK_R, BLOCK_C, BLOCK_DV, HAS_ROPE,
                                 HAS_PASS, INTERLEAVED, LO_BOUNDED, True, DOT_PREC,
                                 ROPE_TABLE, HAS_BIAS, HAS_GATE, HAS_SINK, PIPE_MASKED)
        for span in tl.static_range(3):
            i_lo, i_hi = _span_bounds(span, start, a, bb, end_r)
            dk3, dv = _dkdv_span(dk3, dv, k3, v, kmask, k_pos, qd, rope, win, hbias, i_lo, i_hi,
                                 Nq, D, qk_scale, BLOCK_M, BLOCK_R, BLOCK_C, BLOCK_DV, HAS_ROPE,
                                 HAS_PASS, INTERLEAVED, LO_BOUNDED, span != 1, DOT_PREC,
                                 ROPE_TABLE, HAS_BIAS, HAS_GATE, HAS_SINK, PIPE_MASKED)

    dkc, dka, dkb = dk3
    cz = _groups_poison(dka, dkb, dkc, _row_poison(dv), HAS_ROPE, HAS_PASS)
    dka, dkb, dkc = _groups_nan_rows(cz, dka, dkb, dkc)
    dv = tl.where((cz == 0.0)[:, None], dv, float("nan"))
    smask = cols < Nk
    dk_base = DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh
    dv_base = DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh
    _store_grad(dk_base, cols, smask, stride_dkn, stride_dkd, dka * scale, dkb * scale,
                dkc * scale, k_pos, rope, BLOCK_R, BLOCK_C, HAS_ROPE, HAS_PASS, INTERLEAVED,
                ROPE_TABLE)
    tl.store(dv_base + cols[:, None] * stride_dvn + dvi[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=smask[:, None] & (dvi < D)[None, :])
