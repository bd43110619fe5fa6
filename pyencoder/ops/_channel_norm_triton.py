"""Launcher of the channel LayerNorm + GELU kernel (triton_kernels/channel_norm.py): a "layer"
feature extractor's conv layer norm and activation (pyencoder.models.frontend.FeatureConvLayer)
in one launch where torch runs three on CUDA (a hidden contiguous copy of the transposed input,
the LayerNorm, the GELU), offline and in a streaming step.

``fused_ok(x, weight, bias)`` says when it applies: where the fused streaming kernels do
(pyencoder.ops._ring_write_triton: a CUDA tensor, or the interpreter with its
``FORCE_INTERPRET``; Triton importable; not traced; PYENCODER_FUSED_RING not 0), x a 3-D
float16 / bfloat16 / float32 tensor of at most ``MAX_C`` channels, the affine parameters both
present in x's dtype or both absent, and autograd not recording (no backward). Otherwise the
module runs torch's ops; both compute the same function (float32 statistics in another order:
equal to the last bit of x's dtype but for rare ties).
"""
import torch

from . import _ring_write_triton as _rw
from ._triton_op import block_size, cdiv, launch, next_pow2

__all__ = ["fused_ok", "channel_norm_act"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_C = 2048       # every channel of a frame in one tile (wav2vec2-family extractors: 512)
# Tests set this: the output is NaN-filled before the launch, so an element the kernel does not
# write shows up.
POISON_OUTPUTS = False


def fused_ok(x, weight, bias):
    if x.dim() != 3 or x.dtype not in _DTYPES or not 1 <= x.shape[1] <= MAX_C \
            or not _rw._device_ok(x):
        return False
    if (weight is None) != (bias is None):
        return False
    if weight is not None and (weight.dtype != x.dtype or bias.dtype != x.dtype
                               or weight.shape != (x.shape[1],) or bias.shape != weight.shape):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and (
            weight.requires_grad or bias.requires_grad))):
        return False
    if x.dtype != torch.float32 and torch.is_autocast_enabled(x.device.type):
        # autocast runs layer_norm in float32 (a float32 output): the kernel returns x's dtype
        return False
    return True


def channel_norm_act(x, weight, bias, eps, gelu=True, time_major=False):
    """x (B, C, T) -> LayerNorm over C (affine ``weight`` / ``bias`` or none), then the exact GELU
    (``gelu``), as a new (B, C, T) tensor of x's dtype: contiguous, or with ``time_major`` the
    transposed view of a contiguous (B, T, C) tensor (what a LayerNorm over a (B, T, C) view
    of x returns, for a Linear after it; torch would copy x first). Call when ``fused_ok``."""
    from ..triton_kernels.channel_norm import _channel_norm_act_kernel
    B, C, T = x.shape
    out = (torch.empty(B, T, C, device=x.device, dtype=x.dtype).transpose(1, 2) if time_major
           else torch.empty(B, C, T, device=x.device, dtype=x.dtype))
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    if B and C and T:
        bc = next_pow2(C)
        # about 32 float32 values of the tile per thread at 8 warps (C = 512: 16 frames, 32
        # bytes along time per channel row in 16-bit dtypes)
        bt = block_size(T, 1, max(1, 8192 // bc))
        affine = weight is not None
        launch(_channel_norm_act_kernel)[(B, cdiv(T, bt))](
            x, out, weight if affine else out, bias if affine else out, *x.stride(),
            *out.stride(), C, T, float(eps), BLOCK_C=bc, BLOCK_T=bt, HAS_AFFINE=affine,
            GELU=bool(gelu), num_warps=4 if bc * bt <= 4096 else 8)
    return out
