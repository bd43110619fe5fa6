"""Triton kernel of the ConvNeXt block's front half: depthwise causal conv + LayerNorm over channels
(semantics: pyencoder.ops.convnext.convnext_dwconv_ln_reference).

Padded input: xp[b, c, s] = state[b, c, s] for s < PAD (zero without a state) and x[b, c, s - PAD]
after, PAD = K - 1. With h[b, c, t] = conv_bias[c] + sum_j w[c, j] * xp[b, c, t + j]:

    y[b, t, :] = (h[b, :, t] - mean_c h[b, :, t]) / sqrt(var_c h[b, :, t] + eps) * ln_w + ln_b

written channel-last (B, L, C), and final_state[b, c, i] = xp[b, c, L + i] for i < PAD.

``_convnext_dwconv_ln_fwd_kernel``: one program per (block of BLOCK_T time steps, b) that owns all
C channels of its rows. The conv of a (BLOCK_T, BLOCK_C) tile is K shifted, masked loads of x (or
of the state for s < PAD) times one tap row of the weight, accumulated in fp32. When one channel
block covers C (NUM_CB == 1) the tile stays in registers: exact two-pass mean/variance, normalise,
store. Otherwise the first sweep over the channel blocks merges per-block (mean, M2) with Chan's
parallel formula, and the second sweep recomputes each block's conv (cheap: K FMAs, loads served
by L1/L2) and writes the normalised values. The program of the last time block also writes the
final state (channel chunks of BLOCK_CF). Any x / state / y strides (channel-first or
channel-last x is read in place).

Limits: fp16 / bf16 / fp32 inputs (fp32 statistics, one rounding at the store); float64 goes to
the reference. No backward kernel: the registered op's backward recomputes in plain torch.
"""
import triton
import triton.language as tl

from . import _interpreter  # noqa: F401  (TRITON_INTERPRET=1 compatibility fix)


@triton.jit
def _load_xp(xb_ptr, sb_ptr, c2, s2, m2, L, PAD, sxc, sxl, ssc, ssl,
             HAS_STATE: tl.constexpr):
    """xp[b, c2, s2] in fp32 for padded positions s2 (broadcastable index tensors); xb_ptr and
    sb_ptr point at row b of x and of the state (32-bit offsets within a row)."""
    xs = s2 - PAD
    v = tl.load(xb_ptr + c2 * sxc + xs * sxl, mask=m2 & (xs >= 0) & (xs < L),
                other=0.0).to(tl.float32)
    if HAS_STATE:
        v += tl.load(sb_ptr + c2 * ssc + s2 * ssl, mask=m2 & (s2 >= 0) & (s2 < PAD),
                     other=0.0).to(tl.float32)
    return v


@triton.jit
def _dwconv_tile(xb_ptr, w_ptr, cb_ptr, sb_ptr, t, c, tm, cm, L, K, PAD,
                 sxc, sxl, swc, swk, ssc, ssl,
                 HAS_CB: tl.constexpr, HAS_STATE: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """h[b, c, t] as a (BLOCK_T, BLOCK_C) fp32 tile; zero outside the valid rows and channels."""
    m2 = tm[:, None] & cm[None, :]
    c2 = c[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for j in range(0, K):
        w = tl.load(w_ptr + c * swc + j * swk, mask=cm, other=0.0).to(tl.float32)
        v = _load_xp(xb_ptr, sb_ptr, c2, t[:, None] + j, m2, L, PAD, sxc, sxl, ssc, ssl,
                     HAS_STATE)
        acc += v * w[None, :]
    if HAS_CB:
        acc += tl.load(cb_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    return tl.where(m2, acc, 0.0)


@triton.jit
def _channel_block(cb, cr, C, xb_ptr, w_ptr, cb_ptr, sb_ptr, t, tm, L, K, PAD,
                   sxc, sxl, swc, swk, ssc, ssl,
                   HAS_CB: tl.constexpr, HAS_STATE: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Channel block cb of a sweep over NUM_CB blocks: its channels c, their mask and the conv
    tile h (_dwconv_tile)."""
    c = cb * BLOCK_C + cr
    cm = c < C
    h = _dwconv_tile(xb_ptr, w_ptr, cb_ptr, sb_ptr, t, c, tm, cm, L, K, PAD,
                     sxc, sxl, swc, swk, ssc, ssl, HAS_CB, HAS_STATE,
                     BLOCK_T, BLOCK_C)
    return c, cm, h


@triton.jit
def _ln_store(h, mean, rstd, lnw_ptr, lnb_ptr, yb_ptr, t, c, tm, cm, syl, syc,
              HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr):
    o = (h - mean[:, None]) * rstd[:, None]
    if HAS_LNW:
        o = o * tl.load(lnw_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    if HAS_LNB:
        o = o + tl.load(lnb_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    tl.store(yb_ptr + t[:, None] * syl + c[None, :] * syc,
             o.to(yb_ptr.dtype.element_ty), mask=tm[:, None] & cm[None, :])


@triton.jit
def _convnext_dwconv_ln_fwd_kernel(
        x_ptr, w_ptr, cb_ptr, lnw_ptr, lnb_ptr, s_ptr, y_ptr, f_ptr,
        C, L, K, PAD, eps,
        sxb, sxc, sxl, swc, swk, ssb, ssc, ssl, syb, syl, syc, sfb, sfc, sfl,
        HAS_CB: tl.constexpr, HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr,
        HAS_STATE: tl.constexpr, HAS_FINAL: tl.constexpr, NUM_CB: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_CF: tl.constexpr):
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    xb_ptr = x_ptr + b * sxb
    sb_ptr = s_ptr + b * ssb
    yb_ptr = y_ptr + b * syb
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < L
    cr = tl.arange(0, BLOCK_C)
    if NUM_CB == 1:
        cm = cr < C
        h = _dwconv_tile(xb_ptr, w_ptr, cb_ptr, sb_ptr, t, cr, tm, cm, L, K, PAD,
                         sxc, sxl, swc, swk, ssc, ssl, HAS_CB, HAS_STATE,
                         BLOCK_T, BLOCK_C)
        mean = tl.sum(h, axis=1) / C
        d = tl.where(cm[None, :], h - mean[:, None], 0.0)
        var = tl.sum(d * d, axis=1) / C
        rstd = 1.0 / tl.sqrt(var + eps)
        _ln_store(h, mean, rstd, lnw_ptr, lnb_ptr, yb_ptr, t, cr, tm, cm, syl, syc,
                  HAS_LNW, HAS_LNB)
    else:
        mean = tl.zeros((BLOCK_T,), dtype=tl.float32)
        m2 = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for cb in range(NUM_CB):
            c, cm, h = _channel_block(cb, cr, C, xb_ptr, w_ptr, cb_ptr, sb_ptr, t, tm, L, K, PAD,
                                      sxc, sxl, swc, swk, ssc, ssl, HAS_CB, HAS_STATE,
                                      BLOCK_T, BLOCK_C)
            na = (cb * BLOCK_C) * 1.0
            nb = tl.minimum(C - cb * BLOCK_C, BLOCK_C).to(tl.float32)
            bmean = tl.sum(h, axis=1) / nb
            d = tl.where(cm[None, :], h - bmean[:, None], 0.0)
            bm2 = tl.sum(d * d, axis=1)
            n = na + nb
            delta = bmean - mean
            mean = mean + delta * (nb / n)
            m2 = m2 + bm2 + delta * delta * (na * nb / n)
        rstd = 1.0 / tl.sqrt(m2 / C + eps)
        for cb in range(NUM_CB):
            c, cm, h = _channel_block(cb, cr, C, xb_ptr, w_ptr, cb_ptr, sb_ptr, t, tm, L, K, PAD,
                                      sxc, sxl, swc, swk, ssc, ssl, HAS_CB, HAS_STATE,
                                      BLOCK_T, BLOCK_C)
            _ln_store(h, mean, rstd, lnw_ptr, lnb_ptr, yb_ptr, t, c, tm, cm, syl, syc,
                      HAS_LNW, HAS_LNB)
    if HAS_FINAL:
        if pid_t == tl.num_programs(0) - 1:
            i = tl.arange(0, BLOCK_P)
            im = i < PAD
            cf = tl.arange(0, BLOCK_CF)
            for c0 in range(0, C, BLOCK_CF):
                c = c0 + cf
                mf = (c < C)[:, None] & im[None, :]
                v = _load_xp(xb_ptr, sb_ptr, c[:, None], L + i[None, :], mf, L, PAD,
                             sxc, sxl, ssc, ssl, HAS_STATE)
                tl.store(f_ptr + b * sfb + c[:, None] * sfc + i[None, :] * sfl,
                         v.to(f_ptr.dtype.element_ty), mask=mf)
