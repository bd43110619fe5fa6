"""Program-index helper shared by the Triton kernels whose grid is (batch * heads, row tiles) in
either axis order (the ring decode kernel; interval attention's backward preprocess used the
other order until its delta moved into the dq kernel).
"""
import triton
import triton.language as tl


@triton.jit
def _head_row_tile(H, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, HEADS_AXIS: tl.constexpr):
    """(bh, b, h, rows, cols) of this program (b int64): bh = the (batch * H + head) index read
    from grid axis HEADS_AXIS, the row tile from the other axis (program ids read in axis
    order), its BLOCK_M row indices and the BLOCK_C column indices."""
    if HEADS_AXIS == 0:
        bh = tl.program_id(0)
        pid_m = tl.program_id(1)
    else:
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
    # b in 64 bits: batch offsets b * stride pass 2**31 in a ring of many streams (12 heads x 256
    # slots x 64 features: past ~10,900 streams), where 32-bit products wrap
    b = (bh // H).to(tl.int64)
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    return bh, b, h, rows, cols
