"""Triton RoPE rotation of a whole (B, H, N, D) tensor: the prerotate mode of the interval
attention (pyencoder.ops._attention_triton, PYENCODER_ROPE_MODE=pre).

y[b, h, n] = rot(x[b, h, n], pos = pos_offset + n) (angle theta, or -theta with INVERSE) over
the rotary pairs (NeoX: i and i + HALF; interleaved: 2i and 2i + 1; _rotary._feature_index),
features from ROT = 2 * HALF on copied. cos/sin are taken in float32 of float32(pos) * inv_freq,
the formula the attention kernels and the reference use (pyencoder.rope.rope_cos_sin); the
rotation runs in float32 and is stored in Y's dtype (the in-kernel mode also rounds the rotated
tiles to the input dtype before its dots). One program per (BLOCK_N rows, batch * head); any
strides in, any float dtype out (float32 for the gradient's intermediate).
"""
import triton
import triton.language as tl

from ._rotary import _feature_index, _rope_angles


@triton.jit(do_not_specialize=["pos_offset"])   # streaming offsets: one compile for all
def _rope_rotate_kernel(X, Y, INV_FREQ, stride_xb, stride_xh, stride_xn, stride_xd,
                        stride_yb, stride_yh, stride_yn, stride_yd, H, N, D, HALF, ROT,
                        pos_offset, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_C: tl.constexpr, HAS_PASS: tl.constexpr,
                        INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    xp = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh + rows[:, None] * stride_xn
    yp = Y + b.to(tl.int64) * stride_yb + h.to(tl.int64) * stride_yh + rows[:, None] * stride_yn
    r = tl.arange(0, BLOCK_R)
    ia, ib = _feature_index(r, HALF, INTERLEAVED)
    m = rmask[:, None] & (r < HALF)[None, :]
    x1 = tl.load(xp + ia[None, :] * stride_xd, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(xp + ib[None, :] * stride_xd, mask=m, other=0.0).to(tl.float32)
    ang = _rope_angles(pos_offset + rows, INV_FREQ, r, r < HALF)
    cos = tl.cos(ang)
    sin = tl.sin(ang)
    if INVERSE:
        sin = -sin
    tl.store(yp + ia[None, :] * stride_yd, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=m)
    tl.store(yp + ib[None, :] * stride_yd, (x2 * cos + x1 * sin).to(Y.dtype.element_ty), mask=m)
    if HAS_PASS:
        c = tl.arange(0, BLOCK_C)
        mc = rmask[:, None] & (ROT + c < D)[None, :]
        xc = tl.load(xp + (ROT + c)[None, :] * stride_xd, mask=mc, other=0.0)
        tl.store(yp + (ROT + c)[None, :] * stride_yd, xc.to(Y.dtype.element_ty), mask=mc)
