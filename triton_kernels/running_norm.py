"""Triton kernel of the running (causal, cumulative) GroupNorm's streaming step
(pyencoder.nn.norm.RunningGroupNorm.step_fixed): one launch where the torch path runs ~25 small
float64 kernels (casts, two cats and cumsums, the statistics, the affine, the state copies).

For x (B, C, T), per slot b and channel c, with n0 = COUNT[b] frames seen before the step and the
float64 running sums TOT[b, c] (sum) and TSQ[b, c] (sum of squares):

    s_t  = TOT + sum_{u <= t} x_u          ss_t = TSQ + sum_{u <= t} x_u^2     (float64)
    mean = s_t / (n0 + 1 + t)              var  = max(ss_t / (n0 + 1 + t) - mean^2, 0)
    y_t  = ((x_t - mean) * rsqrt(var + eps)) rounded to x's dtype, then * W[c] and + BIAS[c]
           each rounded to x's dtype (torch's y * weight + bias in that dtype); with GELU, then
           0.5 * y * (1 + erf(y / sqrt(2))) in float32, rounded (torch's GELU after the norm)
    TOT, TSQ <- s_{T-1}, ss_{T-1}          (in place; COUNT is not written: the caller's
                                            counter add, pyencoder.streaming.advance_counter)

One program per (slot, BLOCK_C channels) walks the T frames in NUM_T tiles of BLOCK_T (NUM_T a
constexpr: the step length of a streaming configuration is fixed; each tile loaded at
unit stride along time, scanned with tl.cumsum in float64, the running sums carried to the next
tile), so it owns its channels' sums: it reads them first and writes them last. The float64 scan
adds in another order than torch's sequential CPU cumsum: the sums agree to float64 rounding
(~1e-16 relative), y to the last bit of its dtype.
"""
import triton
import triton.language as tl


@triton.jit
def _running_norm_step_kernel(X, OUT, COUNT, TOT, TSQ, W, BIAS, s_xb, s_xc, s_xt, s_ob, s_oc,
                              s_ot, s_tb, s_tc, C, T, eps, BLOCK_C: tl.constexpr,
                              BLOCK_T: tl.constexpr, NUM_T: tl.constexpr,
                              HAS_AFFINE: tl.constexpr, GELU: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    tot = tl.load(TOT + b * s_tb + c * s_tc, mask=cm, other=0.0).to(tl.float64)
    tsq = tl.load(TSQ + b * s_tb + c * s_tc, mask=cm, other=0.0).to(tl.float64)
    n0 = tl.load(COUNT + b).to(tl.float64)
    if HAS_AFFINE:
        w = tl.load(W + c, mask=cm, other=0.0)
        bias = tl.load(BIAS + c, mask=cm, other=0.0)
    tt = tl.arange(0, BLOCK_T)
    for i in range(NUM_T):          # NUM_T = cdiv(T, BLOCK_T): a compile per tile count
        t = i * BLOCK_T + tt
        m = cm[:, None] & (t < T)[None, :]
        x = tl.load(X + b * s_xb + c[:, None] * s_xc + t[None, :] * s_xt, mask=m, other=0.0)
        xd = x.to(tl.float64)
        s = tot[:, None] + tl.cumsum(xd, axis=1)
        ss = tsq[:, None] + tl.cumsum(xd * xd, axis=1)
        n = n0 + 1.0 + t.to(tl.float64)
        mean = s / n[None, :]
        var = tl.maximum(ss / n[None, :] - mean * mean, 0.0)
        # float64 -> float32 -> x's dtype, as torch's .to() from float64 rounds (c10's Half /
        # BFloat16 are built from a float)
        y = ((xd - mean) / tl.sqrt(var + eps)).to(tl.float32).to(OUT.dtype.element_ty)
        if HAS_AFFINE:
            y = (y.to(tl.float32) * w.to(tl.float32)[:, None]).to(OUT.dtype.element_ty)
            y = (y.to(tl.float32) + bias.to(tl.float32)[:, None]).to(OUT.dtype.element_ty)
        if GELU:    # the exact GELU after it (wav2vec2's first conv layer), on the rounded y
            yf = y.to(tl.float32)
            y = (0.5 * yf * (1.0 + tl.math.erf(yf * 0.7071067811865476))).to(
                OUT.dtype.element_ty)
        tl.store(OUT + b * s_ob + c[:, None] * s_oc + t[None, :] * s_ot, y, mask=m)
        tot = tot + tl.sum(xd, axis=1)
        tsq = tsq + tl.sum(xd * xd, axis=1)
    tl.store(TOT + b * s_tb + c * s_tc, tot, mask=cm)
    tl.store(TSQ + b * s_tb + c * s_tc, tsq, mask=cm)
