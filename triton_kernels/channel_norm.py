"""Triton kernel of a LayerNorm over the channels of a (B, C, T) tensor followed by an exact GELU
(pyencoder.models.frontend.ChannelLayerNorm then the GELU: the conv layers of a "layer"
feature extractor, wav2vec2-large-lv60 / HuBERT-large / WavLM-large's). torch runs it as three
kernels on CUDA: layer_norm over a transposed view first makes a contiguous copy of it (hidden
inside the op), then normalises, then the GELU reads and writes it all again.

Per slot b and frame t, over the C channels (float32):

    mean = sum_c x / C          var = sum_c (x - mean)^2 / C
    y    = ((x - mean) * rsqrt(var + eps) * W[c] + BIAS[c]) rounded to x's dtype   (torch's
           layer_norm: the affine inside, one rounding)
    out  = gelu(y) = 0.5 * y * (1 + erf(y / sqrt(2))) in float32, rounded to x's dtype (torch's
           GELU on the rounded LayerNorm output)

One program per (slot, BLOCK_T frames) holds all C channels (BLOCK_C >= C) of its frames: the
statistics are column reductions of one tile; the loads run along time (unit stride in the
conv layout), so no transposed copy is made. T is not a constexpr: an utterance of any length
and a stream's steps share one compile per (C, dtype, tile).
"""
import triton
import triton.language as tl


@triton.jit
def _channel_norm_act_kernel(X, OUT, W, BIAS, s_xb, s_xc, s_xt, s_ob, s_oc, s_ot, C, T, eps,
                             BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
                             HAS_AFFINE: tl.constexpr, GELU: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.arange(0, BLOCK_C)
    cm = c < C
    m = cm[:, None] & (t < T)[None, :]
    x = tl.load(X + b * s_xb + c[:, None] * s_xc + t[None, :] * s_xt, mask=m,
                other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    d = tl.where(m, x - mean[None, :], 0.0)
    var = tl.sum(d * d, axis=0) / C
    y = d * (1.0 / tl.sqrt(var + eps))[None, :]
    if HAS_AFFINE:
        w = tl.load(W + c, mask=cm, other=0.0).to(tl.float32)
        bias = tl.load(BIAS + c, mask=cm, other=0.0).to(tl.float32)
        y = y * w[:, None] + bias[:, None]
    y = y.to(OUT.dtype.element_ty)
    if GELU:
        yf = y.to(tl.float32)
        y = (0.5 * yf * (1.0 + tl.math.erf(yf * 0.7071067811865476))).to(OUT.dtype.element_ty)
    tl.store(OUT + b * s_ob + c[:, None] * s_oc + t[None, :] * s_ot, y, mask=m)
