"""RoPE helpers shared by the Triton attention kernels (interval attention, ring decode).

Angles are float32(pos) * inv_freq in float32 (the reference's formula, pyencoder.rope); a
feature pair (a, b) rotates to (a cos - b sin, b cos + a sin). NeoX (half-split) pairs are
(i, i + R/2), interleaved (GPT-J) pairs (2i, 2i + 1); features from R on pass through.
"""
import triton
import triton.language as tl


@triton.jit
def _feature_index(r, HALF, INTERLEAVED: tl.constexpr):
    """Feature indices (first, second) of the rotary pairs r."""
    if INTERLEAVED:
        ia = 2 * r
        ib = 2 * r + 1
    else:
        ia = r
        ib = r + HALF
    return ia, ib


@triton.jit
def _rope_angles(pos, INV_FREQ, r, r_mask):
    """float32 (rows, len(r)) angles pos * inv_freq[r] (0 where not r_mask)."""
    freq = tl.load(INV_FREQ + r, mask=r_mask, other=0.0)
    return pos.to(tl.float32)[:, None] * freq[None, :]


@triton.jit
def _rope_cos_sin(pos, row_mask, INV_FREQ, COS_TAB, SIN_TAB, tab_base, r, HALF,
                  ROPE_TABLE: tl.constexpr):
    """cos and sin of rotary pairs r < HALF at positions pos: computed (_rope_angles), or
    loaded from float32 (P, HALF) tables whose row p - tab_base holds position p."""
    if ROPE_TABLE:
        m = row_mask[:, None] & (r < HALF)[None, :]
        idx = (pos - tab_base)[:, None] * HALF + r[None, :]
        return (tl.load(COS_TAB + idx, mask=m, other=0.0),
                tl.load(SIN_TAB + idx, mask=m, other=0.0))
    ang = _rope_angles(pos, INV_FREQ, r, r < HALF)
    return tl.cos(ang), tl.sin(ang)
