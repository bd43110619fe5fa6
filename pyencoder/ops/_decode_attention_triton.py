"""Triton backend of the decode-step attention (``backend="triton"``; kernel:
pyencoder.triton_kernels.decode_attention).

Same arguments and result as pyencoder.reference.decode_attention.forward: q (B, H, M, D)
un-rotated pending queries, k_ring / v_ring (B, H, CAP, D) with rotated keys at index
position % CAP, q_pos (B, M) absolute positions, q_count (B,) valid rows, n_keys (B,) keys
appended; optional relative bias rel_bias (H, L) / gate (B, H, M) / rel_offset, GQA rings
(B, Hk, CAP, D) and resident sink keys / values sink_k / sink_v (B, Hk, S, D) of positions < S,
validated by pyencoder.ops.decode_attention. Positions are taken per slot from
tensors, so slots at different positions share one launch and the step can be captured in a CUDA
graph (no host synchronisation here).

Limits: float16, bfloat16, float32; head_dim <= 256; positions below POSITION_LIMIT (2**30: the
kernel's bounds are int32).
"""
from typing import Optional

import torch
from torch import Tensor

from .._checks import clamp_extents
from ._triton_op import cdiv, launch, next_pow2, triton_op

__all__ = ["decode_attention_triton", "supports_forward", "forward", "forward_op"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports_forward(q=None, k_ring=None, **_):
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} is not supported by the Triton decode kernel (use the reference)"
    if q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} > 256"
    return None


# The kernel's positions and bounds are int32: positions must lie below POSITION_LIMIT (2**30,
# about 248 days of 20 ms frames), and the mask's extents are cut to it (kernel_extents).
POSITION_LIMIT = 1 << 30


def kernel_extents(block, lo_off, hi_off):
    """(block, lo_off, hi_off) with every extent within POSITION_LIMIT (``clamp_extents``): the
    same mask for positions below it, and base + hi_off cannot wrap in int32 (hi_off = 2**31 - 1,
    a "no limit" sentinel, emptied every row)."""
    return clamp_extents(block, lo_off, hi_off, POSITION_LIMIT)


def _index(t):
    return t if t.dtype in (torch.int32, torch.int64) else t.to(torch.int32)


def decode_attention_triton(q, k_ring, v_ring, q_pos, q_count, n_keys, inv_freq, interleaved,
                            block, lo_off, hi_off, scale, rel_bias=None, gate=None,
                            rel_offset=None, sink_k=None, sink_v=None):
    from ..triton_kernels.decode_attention import _decode_attention_fwd_kernel
    why = supports_forward(q, k_ring)
    if why is not None:
        raise RuntimeError(f"decode_attention (triton): {why}")
    B, H, M, D = q.shape
    cap = k_ring.shape[2]
    if k_ring.dtype != q.dtype or v_ring.dtype != q.dtype:
        k_ring, v_ring = k_ring.to(q.dtype), v_ring.to(q.dtype)
    # (B, H, M, D) with the memory layout of (B, M, H, D): the caller's transpose(1, 2).reshape
    # to (B, M, H * D) for the output projection is then a view, not a copy kernel
    o = q.new_empty(B, M, H, D).transpose(1, 2)
    if B == 0 or M == 0:
        return o
    has_rope = inv_freq is not None and inv_freq.numel() > 0
    R = 2 * inv_freq.numel() if has_rope else 0
    # q_count, n_keys and inv_freq are read at unit stride (q_pos through its strides): a strided
    # view is copied (contiguous() of a contiguous tensor is itself: no copy in the steady step)
    freq = inv_freq.contiguous() if has_rope else q.new_zeros(1, dtype=torch.float32)
    # the kernel loads the three as they are (int32 or int64) and narrows them to int32 itself,
    # as a host cast would: the module's int64 counters go in without a cast kernel per step
    q_pos = _index(q_pos)
    q_count = _index(q_count).contiguous()
    n_keys = _index(n_keys).contiguous()
    BLOCK_M = 16
    BLOCK_D = max(16, next_pow2(D))
    BLOCK_N = 64 if BLOCK_D <= 64 else 32
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (B * H, cdiv(M, BLOCK_M))
    bias = (None,) * 7      # off: None (constexpr), the unbiased kernel's PTX is unchanged
    extra = {}
    if rel_bias is not None:
        rel = rel_bias.to(torch.float32).contiguous()
        g = None if gate is None else gate.to(torch.float32)
        gs = (None,) * 3 if g is None else g.stride()
        bias = (rel, g, rel.shape[1], int(rel_offset), *gs)
        extra = dict(HAS_BIAS=True, HAS_GATE=g is not None)
    if k_ring.shape[1] != H:
        extra["GROUP"] = H // k_ring.shape[1]
    sink = (None,) * 11     # off: None (constexpr), the kernel's PTX without sinks is unchanged
    if sink_k is not None:
        sink_k, sink_v = sink_k.to(q.dtype), sink_v.to(q.dtype)
        sink = (sink_k, sink_v, sink_k.shape[2], *sink_k.stride(), *sink_v.stride())
        extra["HAS_SINK"] = True
    block, lo_off, hi_off = kernel_extents(block, lo_off, hi_off)
    launch(_decode_attention_fwd_kernel)[grid](
        q, k_ring, v_ring, o, q_pos, q_count, n_keys, freq,
        *q.stride(), *k_ring.stride(), *v_ring.stride(), *o.stride(), *q_pos.stride(),
        H, M, cap, D, R, block, max(lo_off, 0), hi_off, float(scale), *bias, *sink,
        HAS_ROPE=has_rope, INTERLEAVED=bool(interleaved), HAS_LO=lo_off >= 0,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, PRECISION=prec,
        num_warps=4 if BLOCK_D <= 64 else 8, **extra)
    return o


forward = decode_attention_triton


@triton_op("pyencoder::decode_attention_triton", mutates_args=())
def forward_op(q: Tensor, k_ring: Tensor, v_ring: Tensor, q_pos: Tensor, q_count: Tensor,
               n_keys: Tensor, inv_freq: Optional[Tensor], interleaved: bool, block: int,
               lo_off: int, hi_off: int, scale: float, rel_bias: Optional[Tensor] = None,
               gate: Optional[Tensor] = None, rel_offset: int = 0,
               sink_k: Optional[Tensor] = None, sink_v: Optional[Tensor] = None) -> Tensor:
    """The registered triton backend (torch.library.triton_op): what torch.compile traces.
    Eager steps call ``forward`` directly (pyencoder.ops.decode_attention)."""
    return decode_attention_triton(q, k_ring, v_ring, q_pos, q_count, n_keys, inv_freq,
                                   interleaved, block, lo_off, hi_off, scale, rel_bias, gate,
                                   rel_offset, sink_k, sink_v)
