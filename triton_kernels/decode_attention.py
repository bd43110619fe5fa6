"""Triton decode-step attention over a ring KV cache (semantics:
pyencoder.reference.decode_attention.decode_attention_reference).

For slot b, head h and pending query row i < q_count[b] at absolute position p = q_pos[b, i]:

    q' = RoPE(q[b, h, i], p)           (rotated here; float32 angles p * inv_freq; NeoX or
                                        interleaved pairs; partial rotary: first R features)
    keys: positions s in [max(lo(p), n - CAP, 0), min(hi(p), n - 1)], n = n_keys[b],
          read at ring index s % CAP (keys already rotated when they were appended)
    out = softmax(scale * q' k^T) v    over those keys; 0 for rows i >= q_count[b] or no key

with base(p) = (p // BLOCK) * BLOCK, lo = base - LO_OFF (no lower bound when HAS_LO is false),
hi = base + HI_OFF — the interval mask of pyencoder.ops.attention.

Algorithm: one program per (slot, head, tile of BLOCK_M query rows). The tile walks logical key
positions from lo(first row) to hi(last row) in BLOCK_N steps; the wrap-around of the ring is
handled by indexing (position % CAP), never by copying. The partner feature of each q feature
(i +- R/2, or i ^ 1 interleaved) is loaded with a second gather so RoPE needs no shuffles.
Online softmax in fp32 with the -inf-safe rescaling; fp32 inputs use ``input_precision="ieee"``.
Non-finite values (semantics of pyencoder.reference.attention): per key block, the k and v rows'
poison (sum of x * 0: 0 or NaN) is added to the visible scores and non-finite v entries are zeroed
for the p @ v dot, so a masked NaN never reaches a row; a row whose acc, l or (if it sees a key) q
is non-finite is stored as NaN.

Relative bias (constexpr HAS_BIAS / HAS_GATE, off by default; pyencoder.ops.decode_attention):
the score of row i and key position s gains gate[b, h, i] * REL[h, s - p - rel_offset] (REL
float32 (H, rel_len) contiguous, the dense per-offset vector of the window; gate float32 (B, H, M)
with strides sgb, sgh, sgm), gathered per key block and added after the scale, before the mask
(the reference's order); columns outside [0, rel_len) read 0 (only masked entries fall there, the
op checks the coverage). A row with a non-finite gate that sees a key is NaN. GQA (constexpr GROUP
= H / Hk, None when the ring has H heads): query head h reads ring head h // GROUP. Off, the bias
pointers and ints are passed as None and GROUP is None: the kernel compiles to the same PTX as
before these arguments existed (benchmarks/ptx_diff.py).

Sink keys (constexpr HAS_SINK, off by default; sink pointers, SINK and strides None when off, so
the PTX without sinks is unchanged): the resident keys / values (B, Hk, SINK, D) of positions
< SINK. A first span walks positions [0, min(SINK, n)) of the sink buffer, visible to every valid
row; the ring span then starts at SINK or later, so no key counts twice. With a bias, a sink key's
column is clamped to [0, rel_len) (the saturated edge column: the rule of the offline op). A row
that sees a sink key (n > 0) is NaN if its q is non-finite, like a row that sees a window key.

Limits: head_dim <= 256; positions must fit in int32 (about 12 days of 20 ms frames).
"""

import triton
import triton.language as tl

from . import _interpreter  # noqa: F401  (TRITON_INTERPRET=1 compatibility fix)
from ._grid import _head_row_tile
from ._rotary import _rope_angles


@triton.jit
def _softmax_block(s, k, v, vis, m_i, l_i, acc, PRECISION: tl.constexpr):
    """One key block of the online softmax: the k and v rows' poison (sum of x * 0) joins the
    visible scores, non-finite v entries are zeroed for the p @ v dot, then the -inf-safe
    rescaling of (m_i, l_i, acc) (returned in that order: the loop-carried order)."""
    vz = v * 0.0
    kv0 = tl.sum((k * 0.0).to(tl.float32), 1) + tl.sum(vz.to(tl.float32), 1)
    s = tl.where(vis, s + kv0[None, :], float("-inf"))
    v = tl.where(vz == 0.0, v, 0.0)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["rel_len", "rel_offset", "SINK"])
def _decode_attention_fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, qpos_ptr, qcnt_ptr, nk_ptr, freq_ptr,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
        spb, spm,
        H, M, CAP, D, R, BLK, LO_OFF, HI_OFF, scale,
        rel_ptr, gate_ptr, rel_len, rel_offset, sgb, sgh, sgm,
        sk_ptr, sv_ptr, SINK, sskb, sskh, sskn, sskd, ssvb, ssvh, ssvn, ssvd,
        HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_LO: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr = False, HAS_GATE: tl.constexpr = False,
        GROUP: tl.constexpr = None, HAS_SINK: tl.constexpr = False):
    _, b, h, rows, cols = _head_row_tile(H, BLOCK_M, BLOCK_D, 0)
    cnt = tl.load(qcnt_ptr + b).to(tl.int32)
    n = tl.load(nk_ptr + b).to(tl.int32)
    row_ok = (rows < cnt) & (rows < M)
    col_ok = cols < D
    pos = tl.load(qpos_ptr + b * spb + rows * spm, mask=row_ok, other=0).to(tl.int32)

    qb = q_ptr + b * sqb + h * sqh
    m2 = row_ok[:, None] & col_ok[None, :]
    q = tl.load(qb + rows[:, None] * sqm + cols[None, :] * sqd, mask=m2, other=0.0).to(tl.float32)
    if HAS_ROPE:
        half = R // 2
        in_rot = cols < R
        if INTERLEAVED:
            partner = tl.where(in_rot, cols ^ 1, cols)
            sign = tl.where((cols % 2) == 0, -1.0, 1.0)
            fidx = cols // 2
        else:
            partner = tl.where(cols < half, cols + half, tl.where(in_rot, cols - half, cols))
            sign = tl.where(cols < half, -1.0, 1.0)
            fidx = tl.where(cols < half, cols, cols - half)
        ang = _rope_angles(pos, freq_ptr, fidx, in_rot)
        qp = tl.load(qb + rows[:, None] * sqm + partner[None, :] * sqd, mask=m2,
                     other=0.0).to(tl.float32)
        rot = q * tl.cos(ang) + (sign[None, :] * qp) * tl.sin(ang)
        q = tl.where(in_rot[None, :], rot, q)

    big = 2147483647
    p_first = tl.min(tl.where(row_ok, pos, big), axis=0)
    p_last = tl.max(tl.where(row_ok, pos, -1), axis=0)
    lo_row = (pos // BLK) * BLK - LO_OFF
    hi_row = (pos // BLK) * BLK + HI_OFF
    start = tl.maximum(n - CAP, 0)
    if HAS_LO:
        start = tl.maximum(start, (p_first // BLK) * BLK - LO_OFF)
    if HAS_SINK:
        start = tl.maximum(start, SINK)     # ring entries below SINK are read from the sink span
    end = tl.minimum((p_last // BLK) * BLK + HI_OFF, n - 1)
    end = tl.where(p_last >= 0, end, start - 1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qd = q.to(k_ptr.dtype.element_ty)
    hk = h
    if GROUP is not None:
        hk = h // GROUP
    kb = k_ptr + b * skb + hk * skh
    vb = v_ptr + b * svb + hk * svh
    if HAS_BIAS:
        rel_row = rel_ptr + h * rel_len
        g = 0.0
        if HAS_GATE:
            g = tl.load(gate_ptr + b * sgb + h * sgh + rows * sgm, mask=row_ok,
                        other=0.0).to(tl.float32)
    if HAS_SINK:
        n_sink = tl.minimum(SINK, n)
        skb = sk_ptr + b * sskb + hk * sskh
        svb = sv_ptr + b * ssvb + hk * ssvh
        for s0 in range(0, n_sink, BLOCK_N):
            kp = s0 + tl.arange(0, BLOCK_N)
            k_ok = kp < n_sink
            k = tl.load(skb + kp[:, None] * sskn + cols[None, :] * sskd,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            s = tl.dot(qd, tl.trans(k), input_precision=PRECISION) * scale
            if HAS_BIAS:
                c = tl.minimum(tl.maximum(kp[None, :] - pos[:, None] - rel_offset, 0), rel_len - 1)
                bv = tl.load(rel_row + c)
                if HAS_GATE:
                    bv = bv * g[:, None]
                s = s + bv
            vis = row_ok[:, None] & k_ok[None, :]
            v = tl.load(svb + kp[:, None] * ssvn + cols[None, :] * ssvd,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            m_i, l_i, acc = _softmax_block(s, k, v, vis, m_i, l_i, acc, PRECISION)
    for s0 in range(start, end + 1, BLOCK_N):
        kp = s0 + tl.arange(0, BLOCK_N)
        k_ok = kp <= end
        slot = kp % CAP
        k = tl.load(kb + slot[:, None] * skn + cols[None, :] * skd,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        s = tl.dot(qd, tl.trans(k), input_precision=PRECISION) * scale
        if HAS_BIAS:
            c = kp[None, :] - pos[:, None] - rel_offset
            bv = tl.load(rel_row + c, mask=(c >= 0) & (c < rel_len), other=0.0)
            if HAS_GATE:
                bv = bv * g[:, None]
            s = s + bv
        vis = row_ok[:, None] & k_ok[None, :] & (kp[None, :] <= hi_row[:, None])
        if HAS_LO:
            vis = vis & (kp[None, :] >= lo_row[:, None])
        v = tl.load(vb + slot[:, None] * svn + cols[None, :] * svd,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        m_i, l_i, acc = _softmax_block(s, k, v, vis, m_i, l_i, acc, PRECISION)
    ok = l_i > 0
    out = tl.where(ok[:, None], acc / tl.where(ok, l_i, 1.0)[:, None], 0.0)
    first = tl.maximum(n - CAP, 0)
    if HAS_LO:
        first = tl.maximum(first, lo_row)
    sees = row_ok & (tl.minimum(hi_row, n - 1) >= first)
    if HAS_SINK:
        sees = row_ok & ((tl.minimum(hi_row, n - 1) >= tl.maximum(first, SINK))
                         | (tl.minimum(SINK, n) > 0))
    rz = tl.sum(acc * 0.0, 1) + l_i * 0.0 + tl.where(sees, tl.sum(q * 0.0, 1), 0.0)
    if HAS_GATE:
        rz += tl.where(sees, g * 0.0, 0.0)
    out = tl.where((rz == 0.0)[:, None], out, float("nan"))
    ob = o_ptr + b * sob + h * soh
    tl.store(ob + rows[:, None] * som + cols[None, :] * sod, out.to(o_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & col_ok[None, :])
