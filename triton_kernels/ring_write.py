"""Triton kernels of the streaming step's bookkeeping (``step_fixed``).

``_ring_write_kernel``: one launch writes the n new frames of every slot into the attention's
stream state, where the plain-torch step runs ~20 small kernels per layer (positions, the RoPE of
the keys, ring slots, three index_puts):

    K_RING[b, h, (POS[b] + i) % cap] = rot(k[b, h, i], POS[b] + i)   (cast to k's dtype first,
                                                                      as the torch path does)
    V_RING[b, h, (POS[b] + i) % cap] = v[b, h, i]
    Q_BUF[b, h, PEND[b] + i]         = q[b, h, i]                     (queries stay un-rotated)
    Q_POS[b, i]                      = POS[b] - PEND[b] + i           (the released queries'
                                                                      positions: the decode's)
    N_KEYS[b]                        = POS[b] + n                     (the decode's key count;
                                                                      POS is not written)

for i < n. The rotation is pyencoder.rope.apply_rope's formula (float32 angle float32(pos) *
inv_freq, NeoX or interleaved pairs, features from ROT = 2 * HALF copied); every store casts to
its buffer's dtype. One program per (batch * head, BLOCK_N frames); any strides. With QUEUE (a
mask with lookahead: queries wait in Q_BUF) the query queue is advanced in the same launch
instead of by a later shift copy: of the rows (Q_BUF[b, h, :PEND[b]] ++ q[b, h, :n]), the first
n (the queries this step releases) go to Q_OUT[b, h, :n] and the PEND[b] after them back to
Q_BUF[b, h, :PEND[b]] (the queue the next step finds); then one program holds all n rows of a
(b, h) and loads every row before it stores any.

``_residual_kernel``: a TransformerLayer's residual sum after its attention, with its residual
queue (QUEUE: the inputs of the frames whose attention is held back) and LayerNorm (LN):

    S[b, :n]   = (RES[b, :CNT[b]] ++ x[b, :n])[:n] + a[b, :n]    (in a's dtype, as torch adds)
    RES[b, :CNT[b]] = (RES[b, :CNT[b]] ++ x[b, :n])[n:n + CNT[b]]   (QUEUE)
    OUT[b, :n] = layer_norm(S[b, :n]) (LN; S stored too with STORE_SUM, plus SUM_BIAS[None, :]
                                       with HAS_SUM_BIAS) or S

(without QUEUE, CNT = 0: S = x + a). One launch where the torch step runs an index_put, an add,
a shift copy and a layer_norm. A program holds all rows of a slot (of BLOCK_E columns; with LN
all E), so it reads every queued row before it stores any.
"""
import triton
import triton.language as tl

from ._rotary import _feature_index, _rope_angles


@triton.jit
def _queued_rows(NEW, OLD, r, cnt, c_new, c_old, s_new_r, s_old_r, rmask, cmask):
    """Rows r of (the cnt queued rows of OLD) ++ (the rows of NEW), in OLD's dtype; c_new /
    c_old are the column offsets (1, BLOCK) of NEW / OLD and cmask their mask."""
    from_old = r < cnt
    old = tl.load(OLD + r[:, None] * s_old_r + c_old, mask=(rmask & from_old)[:, None] & cmask)
    new = tl.load(NEW + (r - cnt)[:, None] * s_new_r + c_new,
                  mask=(rmask & (r >= cnt))[:, None] & cmask)
    return tl.where(from_old[:, None], old, new.to(OLD.dtype.element_ty))


@triton.jit
def _advance_queue(NEW, OLD, r, rmask, cnt, n, c_new, c_old, s_new_r, s_old_r, cmask,
                   BLOCK_K: tl.constexpr):
    """A queue step of the rows (OLD[:cnt] ++ NEW[:n]): returns rows r (< n: those released),
    and stores rows n .. n + cnt - 1 (the queue's new front) into OLD[:cnt] after a barrier,
    when the program has read every row it needs (it must hold all rows of its columns)."""
    rel = _queued_rows(NEW, OLD, r, cnt, c_new, c_old, s_new_r, s_old_r, rmask, cmask)
    j = tl.arange(0, BLOCK_K)
    jmask = j < cnt
    kept = _queued_rows(NEW, OLD, n + j, cnt, c_new, c_old, s_new_r, s_old_r, jmask, cmask)
    tl.debug_barrier()
    tl.store(OLD + j[:, None] * s_old_r + c_old, kept, mask=jmask[:, None] & cmask)
    return rel


@triton.jit
def _ring_write_kernel(K, V, Q, K_RING, V_RING, Q_BUF, Q_OUT, Q_POS, N_KEYS, POS, PEND,
                       INV_FREQ, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, s_qb, s_qh, s_qn, s_qd,
                       s_rkb, s_rkh, s_rkn, s_rkd, s_rvb, s_rvh, s_rvn, s_rvd,
                       s_bqb, s_bqh, s_bqn, s_bqd, s_oqb, s_oqh, s_oqn, s_oqd, s_pb, s_pn,
                       H, n, D, HALF, ROT,
                       cap, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_D: tl.constexpr, HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
                       QUEUE: tl.constexpr):
    bh = tl.program_id(0)           # axis 0: batch * heads may exceed 65535 (many streams)
    pid_n = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    i = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    imask = i < n
    pos0 = tl.load(POS + b).to(tl.int64)
    pend = tl.load(PEND + b).to(tl.int64)
    pos = pos0 + i
    slot = pos % cap
    if h == 0:
        # positions of the n queries the step releases: the oldest pending one sits at pos - pend
        tl.store(Q_POS + b * s_pb + i * s_pn, pos - pend, mask=imask)
        if pid_n == 0:
            tl.store(N_KEYS + b, pos0 + n)
    d = tl.arange(0, BLOCK_D)
    dmask = imask[:, None] & (d < D)[None, :]
    # v and q: copies (cast to the buffers' dtypes)
    v = tl.load(V + b * s_vb + h * s_vh + i[:, None] * s_vn + d[None, :] * s_vd, mask=dmask)
    tl.store(V_RING + b * s_rvb + h * s_rvh + slot[:, None] * s_rvn + d[None, :] * s_rvd,
             v.to(V_RING.dtype.element_ty), mask=dmask)
    if QUEUE:
        # grid axis 1 == 1 (BLOCK_N >= n): every row of this (b, h) is read before any is written
        qn = Q + b * s_qb + h * s_qh
        qb = Q_BUF + b * s_bqb + h * s_bqh
        rel = _advance_queue(qn, qb, i, imask, pend, n, d[None, :] * s_qd, d[None, :] * s_bqd,
                             s_qn, s_bqn, (d < D)[None, :], BLOCK_K)
        tl.store(Q_OUT + b * s_oqb + h * s_oqh + i[:, None] * s_oqn + d[None, :] * s_oqd, rel,
                 mask=dmask)
    else:
        qrow = pend + i
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


@triton.jit
def _residual_kernel(X, A, RES, CNT, OUT, SUM, W, BIAS, SUM_BIAS, s_xb, s_xn, s_xe, s_ab, s_an,
                     s_ae, s_rb, s_rn, s_re, s_ob, s_on, s_oe, s_sb, s_sn, s_se, n, E, eps,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                     QUEUE: tl.constexpr, LN: tl.constexpr, HAS_W: tl.constexpr,
                     HAS_BIAS: tl.constexpr, STORE_SUM: tl.constexpr,
                     HAS_SUM_BIAS: tl.constexpr):
    # one program per (slot, BLOCK_E columns; LN: all E) holding all rows of the slot
    b = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    ecol = (e < E)[None, :]
    xb = X + b * s_xb
    rb = RES + b * s_rb
    r = tl.arange(0, BLOCK_N)
    rmask = r < n
    m2 = rmask[:, None] & ecol
    if QUEUE:
        # (OUT / SUM are fresh tensors: only the queue's rows need the read-before-write order)
        rel = _advance_queue(xb, rb, r, rmask, tl.load(CNT + b).to(tl.int64), n,
                             e[None, :] * s_xe, e[None, :] * s_re, s_xn, s_rn, ecol, BLOCK_K)
    else:
        rel = tl.load(xb + r[:, None] * s_xn + e[None, :] * s_xe, mask=m2).to(
            RES.dtype.element_ty)
    a = tl.load(A + b * s_ab + r[:, None] * s_an + e[None, :] * s_ae, mask=m2)
    # torch: res.to(a.dtype) + a, summed in float32 and rounded to a's dtype
    sm = (rel.to(a.dtype).to(tl.float32) + a.to(tl.float32)).to(a.dtype)
    if LN:
        # layer_norm over E in float32 (torch's CUDA kernel: float32 statistics, biased
        # variance, output in the input's dtype); masked columns are 0 and left out
        sf = tl.where(ecol, sm.to(tl.float32), 0.0)
        mean = tl.sum(sf, axis=1) / E
        d = tl.where(ecol, sf - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / E + eps)
        y = d * rstd[:, None]
        if HAS_W:
            y = y * tl.load(W + e, mask=e < E).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(BIAS + e, mask=e < E).to(tl.float32)[None, :]
        out = y.to(OUT.dtype.element_ty)
    else:
        out = sm.to(OUT.dtype.element_ty)
    tl.store(OUT + b * s_ob + r[:, None] * s_on + e[None, :] * s_oe, out, mask=m2)
    if STORE_SUM:
        if HAS_SUM_BIAS:
            # the sum plus a vector (the feed-forward's output bias, so that its GEMM can
            # accumulate onto this buffer): torch's s + bias, in float32, rounded once
            sm = (sm.to(tl.float32)
                  + tl.load(SUM_BIAS + e, mask=e < E).to(tl.float32)[None, :]).to(sm.dtype)
        tl.store(SUM + b * s_sb + r[:, None] * s_sn + e[None, :] * s_se,
                 sm.to(SUM.dtype.element_ty), mask=m2)
