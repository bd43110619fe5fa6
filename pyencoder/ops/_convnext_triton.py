"""Triton backend of pyencoder.ops.convnext_dwconv_ln (``backend="triton"``; kernel:
pyencoder.triton_kernels.convnext): the fused depthwise causal conv + LayerNorm forward.

Same arguments and result as pyencoder.reference.convnext.forward. Tiles: a program holds a
(BLOCK_T x BLOCK_C) tile of the output, the whole channel row up to _MAX_BLOCK_C channels, channel
blocks above (``_tiles``). Limits: float16, bfloat16, float32; kernel size <= MAX_TRITON_KERNEL,
channels <= MAX_TRITON_CHANNELS. The op's backward has no Triton kernel (pyencoder.ops.convnext).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _triton_op
from ._triton_op import block_size, cdiv, launch, next_pow2, triton_op

__all__ = ["supports_forward", "forward", "forward_op"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TRITON_KERNEL = 256
MAX_TRITON_CHANNELS = 16384
_MAX_BLOCK_C = 1024   # channels one program holds in registers; above, it loops over blocks
_TILE_ELEMS = 4096    # (time x channel) tile of one program
_NUM_WARPS = 8


def supports_forward(x=None, conv_weight=None, **_):
    if x.dtype not in _TRITON_DTYPES:
        return (f"the fused triton kernel supports float16, bfloat16 and float32; got {x.dtype} "
                "(use backend='reference')")
    if conv_weight.shape[-1] > MAX_TRITON_KERNEL:
        return (f"kernel size {conv_weight.shape[-1]} is above the fused kernel's limit "
                f"{MAX_TRITON_KERNEL}")
    if x.shape[1] > MAX_TRITON_CHANNELS:
        return f"{x.shape[1]} channels is above the fused kernel's limit {MAX_TRITON_CHANNELS}"
    if x.shape[0] > _triton_op.MAX_GRID_YZ:
        return (f"batch {x.shape[0]} is above {_triton_op.MAX_GRID_YZ}, the CUDA grid extent "
                f"the fused kernel puts it on")
    return None


def _tiles(C, L):
    """(BLOCK_T, BLOCK_C, NUM_CB, num_warps): the whole channel row in registers up to
    C = _MAX_BLOCK_C, channel blocks above; BLOCK_T * BLOCK_C <= _TILE_ELEMS fp32 per program,
    spread over _NUM_WARPS warps (16 values a thread at the defaults)."""
    BLOCK_C = block_size(C, 16, _MAX_BLOCK_C)
    NUM_CB = cdiv(C, BLOCK_C)
    BLOCK_T = max(1, min(64, _TILE_ELEMS // BLOCK_C, next_pow2(max(L, 1))))
    num_warps = max(1, min(_NUM_WARPS, BLOCK_T * BLOCK_C // 512))
    return BLOCK_T, BLOCK_C, NUM_CB, num_warps


def _launch(x, conv_weight, conv_bias, ln_weight, ln_bias, initial_state, eps, y, final):
    """Run the fused kernel: y (B, L, C) and final (B, C, k - 1) are written (any strides)."""
    from ..triton_kernels import convnext as kern
    B, C, L = x.shape
    K = conv_weight.shape[-1]
    pad = K - 1
    if B == 0 or C == 0:
        return
    if L == 0:
        if pad:
            final.copy_(initial_state if initial_state is not None else torch.zeros_like(final))
        return
    BLOCK_T, BLOCK_C, NUM_CB, num_warps = _tiles(C, L)
    # the kernel reads the (C,) vectors at unit stride: a strided view would be misread
    conv_bias, ln_weight, ln_bias = (None if t is None else t.contiguous()
                                     for t in (conv_bias, ln_weight, ln_bias))
    has_state = initial_state is not None and pad > 0
    s = initial_state if has_state else x
    ss = (s.stride(0), s.stride(1), s.stride(2)) if has_state else (0, 0, 0)
    fs = (final.stride(0), final.stride(1), final.stride(2)) if pad else (0, 0, 0)
    grid = (cdiv(L, BLOCK_T), B)
    launch(kern._convnext_dwconv_ln_fwd_kernel)[grid](
        x, conv_weight, conv_bias if conv_bias is not None else conv_weight,
        ln_weight if ln_weight is not None else conv_weight,
        ln_bias if ln_bias is not None else conv_weight, s, y, final if pad else y,
        C, L, K, pad, float(eps),
        x.stride(0), x.stride(1), x.stride(2), conv_weight.stride(0), conv_weight.stride(2),
        *ss, y.stride(0), y.stride(1), y.stride(2), *fs,
        HAS_CB=conv_bias is not None, HAS_LNW=ln_weight is not None,
        HAS_LNB=ln_bias is not None, HAS_STATE=has_state, HAS_FINAL=pad > 0, NUM_CB=NUM_CB,
        BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, BLOCK_P=max(2, next_pow2(max(pad, 1))),
        BLOCK_CF=max(16, min(BLOCK_C, 4096 // max(2, next_pow2(max(pad, 1))))),
        num_warps=num_warps)


def forward(x, conv_weight, conv_bias, ln_weight, ln_bias, initial_state, eps):
    B, C, L = x.shape
    K = conv_weight.shape[-1]
    y = torch.empty(B, L, C, dtype=x.dtype, device=x.device)
    final = torch.empty(B, C, K - 1, dtype=x.dtype, device=x.device)
    _launch(x, conv_weight, conv_bias, ln_weight, ln_bias, initial_state, eps, y, final)
    return y, final


@triton_op("pyencoder::convnext_dwconv_ln_triton", mutates_args=())
def forward_op(x: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
               ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
               initial_state: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor]:
    """The triton backend as a torch.library.triton_op (autograd: pyencoder.ops.convnext)."""
    return forward(x, conv_weight, conv_bias, ln_weight, ln_bias, initial_state, eps)
