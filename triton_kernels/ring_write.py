"""Triton kernel of the streaming attention step's bookkeeping (``step_fixed``): one launch
writes the n new frames of every slot into the stream state, where the plain-torch step runs
~20 small kernels per layer (positions, the RoPE of the keys, ring slots, three index_puts):

    K_RING[b, h, (POS[b] + i) % cap] = rot(k[b, h, i], POS[b] + i)   (cast to k's dtype first,
                                                                      as the torch path does)
    V_RING[b, h, (POS[b] + i) % cap] = v[b, h, i]
    Q_BUF[b, h, PEND[b] + i]         = q[b, h, i]                     (queries stay un-rotated)

for i < n. The rotation is pyencoder.rope.apply_rope's formula (float32 angle float32(pos) *
inv_freq, NeoX or interleaved pairs, features from ROT = 2 * HALF copied); every store casts to
its buffer's dtype. One program per (BLOCK_N frames, batch * head); any strides.
"""
import triton
import triton.language as tl

from ._rotary import _feature_index, _rope_angles


@triton.jit
def _ring_write_kernel(K, V, Q, K_RING, V_RING, Q_BUF, POS, PEND, INV_FREQ,
                       s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, s_qb, s_qh, s_qn, s_qd,
                       s_rkb, s_rkh, s_rkn, s_rkd, s_rvb, s_rvh, s_rvn, s_rvd,
                       s_bqb, s_bqh, s_bqn, s_bqd, H, n, D, HALF, ROT, cap,
                       BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                       HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    i = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    imask = i < n
    pos = tl.load(POS + b).to(tl.int64) + i
    slot = pos % cap
    qrow = tl.load(PEND + b).to(tl.int64) + i
    d = tl.arange(0, BLOCK_D)
    dmask = imask[:, None] & (d < D)[None, :]
    # v and q: plain copies (cast to the buffers' dtypes)
    v = tl.load(V + b * s_vb + h * s_vh + i[:, None] * s_vn + d[None, :] * s_vd, mask=dmask)
    tl.store(V_RING + b * s_rvb + h * s_rvh + slot[:, None] * s_rvn + d[None, :] * s_rvd,
             v.to(V_RING.dtype.element_ty), mask=dmask)
    q = tl.load(Q + b * s_qb + h * s_qh + i[:, None] * s_qn + d[None, :] * s_qd, mask=dmask)
    tl.store(Q_BUF + b * s_bqb + h * s_bqh + qrow[:, None] * s_bqn + d[None, :] * s_bqd,
             q.to(Q_BUF.dtype.element_ty), mask=dmask)
    kp = K + b * s_kb + h * s_kh + i[:, None] * s_kn
    rp = K_RING + b * s_rkb + h * s_rkh + slot[:, None] * s_rkn
    if HAS_ROPE:
        # the pass-through features, then the rotated pairs over them
        pmask = dmask & (d >= ROT)[None, :]
        kc = tl.load(kp + d[None, :] * s_kd, mask=pmask)
        tl.store(rp + d[None, :] * s_rkd, kc.to(K_RING.dtype.element_ty), mask=pmask)
        r = tl.arange(0, BLOCK_R)
        ia, ib = _feature_index(r, HALF, INTERLEAVED)
        m = imask[:, None] & (r < HALF)[None, :]
        k1 = tl.load(kp + ia[None, :] * s_kd, mask=m, other=0.0)
        k2 = tl.load(kp + ib[None, :] * s_kd, mask=m, other=0.0)
        ang = _rope_angles(pos, INV_FREQ, r, r < HALF)
        cos = tl.cos(ang)
        sin = tl.sin(ang)
        k1f = k1.to(tl.float32)
        k2f = k2.to(tl.float32)
        # rounded to k's dtype first (apply_rope returns x's dtype), then to the ring's
        ra = (k1f * cos - k2f * sin).to(k1.dtype)
        rb = (k2f * cos + k1f * sin).to(k1.dtype)
        tl.store(rp + ia[None, :] * s_rkd, ra.to(K_RING.dtype.element_ty), mask=m)
        tl.store(rp + ib[None, :] * s_rkd, rb.to(K_RING.dtype.element_ty), mask=m)
    else:
        k = tl.load(kp + d[None, :] * s_kd, mask=dmask)
        tl.store(rp + d[None, :] * s_rkd, k.to(K_RING.dtype.element_ty), mask=dmask)
