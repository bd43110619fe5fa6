"""Triton kernels for causal 1-D convolution (semantics: pyencoder.reference.conv).

Padded input: xp[b, c, s] = initial_state[b, c, s] for s < PAD (zero without a state) and
x[b, c, s - PAD] after, PAD = K - STRIDE. Output y[b, co, t] = act(bias[co] +
sum_{ci, j} w[co, ci, j] * xp[b, g*CG + ci, t*STRIDE + j]) for t < T = L // STRIDE.

Kernels
- ``_causal_conv1d_dw_fwd_kernel``: depthwise (groups == C_in == C_out). A (BLOCK_C, BLOCK_T)
  tile of outputs accumulates K shifted, masked loads of x (or of the state for s < PAD) times one
  tap column of the weight, in fp32. Any K, any stride, any x/y strides (channel-first or
  channel-last). The state rows may be addressed through ``state_indices`` (a pool of resident
  streams); a row whose index is -1 writes zeros.
- ``_causal_conv1d_grp_fwd_kernel``: grouped / dense conv as an implicit GEMM. The reduction axis
  is the flattened (ci, j) index r = ci*K + j, which is contiguous in nn.Conv1d's weight, so the A
  operand is a plain 2-D load; the B operand xp[ci(r), t*STRIDE + j(r)] is an im2col gather that
  stays in L1/L2. ``tl.dot`` with fp32 accumulation (``input_precision="ieee"`` for fp32 inputs).
- ``_causal_conv1d_state_fwd_kernel``: final_state[b, c, i] = xp[b, c, T*STRIDE + i], i < PAD.
- ``_causal_conv1d_state_scatter_kernel``: pool[idx[b]] = new[b] for idx[b] >= 0 (streaming update).
- Backward: ``_causal_conv1d_dw_bwd_dx_kernel`` / ``_causal_conv1d_grp_bwd_dx_kernel`` compute the
  gradient of the padded input dxp (B, C, PAD + L) in fp32 (transposed conv, the same gather
  schemes); ``_causal_conv1d_dw_bwd_dw_kernel`` / ``_causal_conv1d_grp_bwd_dw_kernel`` write
  per-split partial weight gradients (NSPLIT, ...) that the host sums in a fixed order, so the
  weight gradient is deterministic (no atomics).

Limits: the grad_y fed to the backward kernels is already multiplied by the activation derivative
(the host recomputes the pre-activation); float64 is not supported (use the reference backend).
"""
import triton
import triton.language as tl

from . import _interpreter  # noqa: F401  (TRITON_INTERPRET=1 compatibility fix)


@triton.jit
def _apply_act(acc, ACT: tl.constexpr):
    if ACT == 1:
        acc = acc / (1.0 + tl.exp(-acc))
    elif ACT == 2:
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    return acc


@triton.jit
def _load_xp(x_ptr, s_ptr, b, row, row_ok, c2, s2, m2, L, PAD,
             sxb, sxc, sxl, ssb, ssc, ssl, HAS_STATE: tl.constexpr):
    """xp[b, c2, s2] in fp32 for padded positions s2 (any broadcastable shapes)."""
    xs = s2 - PAD
    v = tl.load(x_ptr + b * sxb + c2 * sxc + xs * sxl, mask=m2 & (xs >= 0) & (xs < L),
                other=0.0).to(tl.float32)
    if HAS_STATE:
        # row_ok is a scalar: tl.where, not `&` (Triton 3.9's interpreter rejects the mask of a
        # scalar bool & a bool tensor: "mask has unsupported dtype")
        sm = tl.where(row_ok, m2 & (s2 >= 0) & (s2 < PAD), False)
        v += tl.load(s_ptr + row * ssb + c2 * ssc + s2 * ssl, mask=sm, other=0.0).to(tl.float32)
    return v


@triton.jit
def _split_items(split, PER_SPLIT, B, NTB):
    """[it0, it1): the (batch, time block) items of split ``split`` of the weight-gradient
    kernels (PER_SPLIT items each, B * NTB in all)."""
    it0 = split * PER_SPLIT
    return it0, tl.minimum(it0 + PER_SPLIT, B * NTB)


@triton.jit
def _time_tile(it, NTB, T, BLOCK_T: tl.constexpr):
    """Item ``it`` of a weight-gradient split: batch b (int64), output steps t and their mask."""
    b = (it // NTB).to(tl.int64)
    t = (it % NTB) * BLOCK_T + tl.arange(0, BLOCK_T)
    return b, t, t < T


@triton.jit
def _strided_tap(u, STRIDE: tl.constexpr, T, valid):
    """Output step tt = u / STRIDE that reads padded input u (tap offsets subtracted) and whether
    it exists: u >= 0, a multiple of STRIDE, tt < T, and ``valid`` (a mask, or None)."""
    tt = u // STRIDE
    ok = u >= 0
    if valid is not None:
        ok = valid & ok
    return tt, ok & (u - tt * STRIDE == 0) & (tt < T)


@triton.jit
def _state_row(idx_ptr, b, HAS_IDX: tl.constexpr):
    if HAS_IDX:
        idx = tl.load(idx_ptr + b).to(tl.int64)
        return tl.maximum(idx, 0), idx >= 0
    return b.to(tl.int64), b >= 0


@triton.jit
def _causal_conv1d_dw_fwd_kernel(
        x_ptr, w_ptr, bias_ptr, s_ptr, idx_ptr, y_ptr,
        C, L, T, K, PAD,
        sxb, sxc, sxl, swc, swk, ssb, ssc, ssl, syb, syc, syl,
        STRIDE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr,
        HAS_IDX: tl.constexpr, ACT: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    row, row_ok = _state_row(idx_ptr, b, HAS_IDX)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cm = c < C
    c2 = c[:, None]
    m2 = cm[:, None] & (t[None, :] < T)
    acc = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32)
    for j in range(0, K):
        w = tl.load(w_ptr + c * swc + j * swk, mask=cm, other=0.0).to(tl.float32)
        s2 = t[None, :] * STRIDE + j
        v = _load_xp(x_ptr, s_ptr, b, row, row_ok, c2, s2, m2, L, PAD,
                     sxb, sxc, sxl, ssb, ssc, ssl, HAS_STATE)
        acc += w[:, None] * v
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=cm, other=0.0).to(tl.float32)[:, None]
    acc = _apply_act(acc, ACT)
    if HAS_IDX:
        acc = tl.where(row_ok, acc, 0.0)
    tl.store(y_ptr + b * syb + c2 * syc + t[None, :] * syl, acc.to(y_ptr.dtype.element_ty),
             mask=m2)


@triton.jit
def _grp_block(acc, x_ptr, w_ptr, s_ptr, b, row, row_ok, cin, cout, com, ci, jw, rm, s2, tm, L,
               PAD, swo, swi, swk, sxb, sxc, sxl, ssb, ssc, ssl,
               HAS_STATE: tl.constexpr, IEEE: tl.constexpr):
    """acc + one reduction block of the implicit GEMM: the weight tile w[cout, ci, jw] (jw the
    block's taps, or its one tap) times the padded-input tile xp[b, cin, s2] (rm masks the
    block's rows)."""
    a = tl.load(w_ptr + cout[:, None] * swo + ci[None, :] * swi + jw * swk,
                mask=com[:, None] & rm[None, :], other=0.0)
    v = _load_xp(x_ptr, s_ptr, b, row, row_ok, cin[:, None], s2, rm[:, None] & tm[None, :], L,
                 PAD, sxb, sxc, sxl, ssb, ssc, ssl, HAS_STATE)
    if IEEE:
        return acc + tl.dot(a.to(tl.float32), v, input_precision="ieee")
    return acc + tl.dot(a, v.to(a.dtype))


@triton.jit
def _causal_conv1d_grp_fwd_kernel(
        x_ptr, w_ptr, bias_ptr, s_ptr, idx_ptr, y_ptr,
        CG, COG, L, T, K, PAD, NCO, CGP,
        sxb, sxc, sxl, swo, swi, swk, ssb, ssc, ssl, syb, syc, syl,
        STRIDE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr,
        HAS_IDX: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_CO: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
        TAP_MAJOR: tl.constexpr = False):
    pid_t = tl.program_id(0)
    pid_gc = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    g = pid_gc // NCO
    row, row_ok = _state_row(idx_ptr, b, HAS_IDX)
    co = (pid_gc % NCO) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    com = co < COG
    tm = t < T
    cout = g * COG + co
    acc = tl.zeros((BLOCK_CO, BLOCK_T), dtype=tl.float32)
    if TAP_MAJOR:
        # the reduction (tap j, input channel ci) walked tap by tap, channels fastest:
        # r = j * CGP + ci with CGP = CG rounded up to BLOCK_R, so a block is one tap and a run
        # of channels, along which channel-last x and the tap-major weight (Cout, K, CG; swi 1)
        # are contiguous (vector loads); no division per element
        for r0 in range(0, K * CGP, BLOCK_R):
            j = r0 // CGP
            ci = (r0 - j * CGP) + tl.arange(0, BLOCK_R)
            acc = _grp_block(acc, x_ptr, w_ptr, s_ptr, b, row, row_ok, g * CG + ci, cout, com,
                             ci, j, ci < CG, (t * STRIDE + j)[None, :], tm, L, PAD, swo, swi,
                             swk, sxb, sxc, sxl, ssb, ssc, ssl, HAS_STATE, IEEE)
    else:
        R = CG * K
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            ci = r // K
            j = r - ci * K
            acc = _grp_block(acc, x_ptr, w_ptr, s_ptr, b, row, row_ok, g * CG + ci, cout, com,
                             ci, j[None, :], r < R, t[None, :] * STRIDE + j[:, None], tm, L, PAD,
                             swo, swi, swk, sxb, sxc, sxl, ssb, ssc, ssl, HAS_STATE, IEEE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cout, mask=com, other=0.0).to(tl.float32)[:, None]
    acc = _apply_act(acc, ACT)
    if HAS_IDX:
        acc = tl.where(row_ok, acc, 0.0)
    tl.store(y_ptr + b * syb + cout[:, None] * syc + t[None, :] * syl,
             acc.to(y_ptr.dtype.element_ty), mask=com[:, None] & tm[None, :])


@triton.jit
def _causal_conv1d_state_fwd_kernel(
        x_ptr, s_ptr, idx_ptr, out_ptr, C, L, T, PAD,
        sxb, sxc, sxl, ssb, ssc, ssl, sob, soc, sol,
        STRIDE: tl.constexpr, HAS_STATE: tl.constexpr, HAS_IDX: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    row, row_ok = _state_row(idx_ptr, b, HAS_IDX)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    i = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    m2 = (c < C)[:, None] & (i < PAD)[None, :]
    v = _load_xp(x_ptr, s_ptr, b, row, row_ok, c[:, None], T * STRIDE + i[None, :], m2, L, PAD,
                 sxb, sxc, sxl, ssb, ssc, ssl, HAS_STATE)
    tl.store(out_ptr + b * sob + c[:, None] * soc + i[None, :] * sol,
             v.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _causal_conv1d_state_scatter_kernel(
        new_ptr, idx_ptr, pool_ptr, N, snb, spb, HAS_IDX: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    row, row_ok = _state_row(idx_ptr, b, HAS_IDX)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    m = tl.where(row_ok, i < N, False)
    v = tl.load(new_ptr + b * snb + i, mask=m)
    tl.store(pool_ptr + row * spb + i, v, mask=m)


@triton.jit
def _causal_conv1d_dw_bwd_dx_kernel(
        g_ptr, w_ptr, dxp_ptr, C, T, K, LP,
        sgb, sgc, sgl, swc, swk, sdb, sdc, sdl,
        STRIDE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    cm = c < C
    acc = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    for j in range(0, K):
        w = tl.load(w_ptr + c * swc + j * swk, mask=cm, other=0.0).to(tl.float32)
        tt, ok = _strided_tap(s - j, STRIDE, T, None)
        v = tl.load(g_ptr + b * sgb + c[:, None] * sgc + tt[None, :] * sgl,
                    mask=cm[:, None] & ok[None, :], other=0.0).to(tl.float32)
        acc += w[:, None] * v
    tl.store(dxp_ptr + b * sdb + c[:, None] * sdc + s[None, :] * sdl, acc,
             mask=cm[:, None] & (s < LP)[None, :])


@triton.jit
def _causal_conv1d_dw_bwd_dw_kernel(
        g_ptr, x_ptr, s_ptr, part_ptr, C, L, T, K, PAD, B, NTB, PER_SPLIT,
        sgb, sgc, sgl, sxb, sxc, sxl, ssb, ssc, ssl,
        STRIDE: tl.constexpr, HAS_STATE: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_j = tl.program_id(0)
    pid_c = tl.program_id(1)
    split = tl.program_id(2)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    cm = c < C
    jm = j < K
    c3 = c[:, None, None]
    acc = tl.zeros((BLOCK_C, BLOCK_J), dtype=tl.float32)
    it0, it1 = _split_items(split, PER_SPLIT, B, NTB)
    for it in range(it0, it1):
        b, t, tm = _time_tile(it, NTB, T, BLOCK_T)
        gv = tl.load(g_ptr + b * sgb + c[:, None] * sgc + t[None, :] * sgl,
                     mask=cm[:, None] & tm[None, :], other=0.0).to(tl.float32)
        s3 = t[None, None, :] * STRIDE + j[None, :, None]
        m3 = cm[:, None, None] & jm[None, :, None] & tm[None, None, :]
        xv = _load_xp(x_ptr, s_ptr, b, b, True, c3, s3, m3, L, PAD,
                      sxb, sxc, sxl, ssb, ssc, ssl, HAS_STATE)
        acc += tl.sum(gv[:, None, :] * xv, axis=2)
    tl.store(part_ptr + split * C * K + c[:, None] * K + j[None, :], acc,
             mask=cm[:, None] & jm[None, :])


@triton.jit
def _causal_conv1d_grp_bwd_dx_kernel(
        g_ptr, w_ptr, dxp_ptr, CG, COG, T, K, LP, NCI,
        sgb, sgc, sgl, swo, swi, swk, sdb, sdc, sdl,
        STRIDE: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_CI: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_gc = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    g = pid_gc // NCI
    ci = (pid_gc % NCI) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    cim = ci < CG
    R = COG * K
    acc = tl.zeros((BLOCK_CI, BLOCK_S), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rm = r < R
        co = r // K
        j = r - co * K
        cout = g * COG + co
        a = tl.load(w_ptr + cout[None, :] * swo + ci[:, None] * swi + j[None, :] * swk,
                    mask=cim[:, None] & rm[None, :], other=0.0)
        tt, ok = _strided_tap(s[None, :] - j[:, None], STRIDE, T, rm[:, None])
        v = tl.load(g_ptr + b * sgb + cout[:, None] * sgc + tt * sgl, mask=ok, other=0.0)
        if IEEE:
            acc += tl.dot(a.to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, v.to(a.dtype))
    tl.store(dxp_ptr + b * sdb + (g * CG + ci)[:, None] * sdc + s[None, :] * sdl, acc,
             mask=cim[:, None] & (s < LP)[None, :])


@triton.jit
def _causal_conv1d_grp_bwd_dw_kernel(
        g_ptr, x_ptr, s_ptr, part_ptr, CG, COG, L, T, K, PAD, B, NTB, PER_SPLIT, NCO, COUT,
        sgb, sgc, sgl, sxb, sxc, sxl, ssb, ssc, ssl,
        STRIDE: tl.constexpr, HAS_STATE: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_CO: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_gc = tl.program_id(1)
    split = tl.program_id(2)
    g = pid_gc // NCO
    co = (pid_gc % NCO) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    R = CG * K
    com = co < COG
    rm = r < R
    ci = r // K
    j = r - ci * K
    cout = g * COG + co
    acc = tl.zeros((BLOCK_CO, BLOCK_R), dtype=tl.float32)
    it0, it1 = _split_items(split, PER_SPLIT, B, NTB)
    for it in range(it0, it1):
        b, t, tm = _time_tile(it, NTB, T, BLOCK_T)
        a = tl.load(g_ptr + b * sgb + cout[:, None] * sgc + t[None, :] * sgl,
                    mask=com[:, None] & tm[None, :], other=0.0)
        s2 = t[:, None] * STRIDE + j[None, :]
        v = _load_xp(x_ptr, s_ptr, b, b, True, (g * CG + ci)[None, :], s2,
                     tm[:, None] & rm[None, :], L, PAD, sxb, sxc, sxl, ssb, ssc, ssl, HAS_STATE)
        if IEEE:
            acc += tl.dot(a.to(tl.float32), v, input_precision="ieee")
        else:
            acc += tl.dot(a, v.to(a.dtype))
    tl.store(part_ptr + split * COUT * R + cout[:, None] * R + r[None, :], acc,
             mask=com[:, None] & rm[None, :])
