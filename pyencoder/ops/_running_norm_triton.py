"""Launcher of the running GroupNorm's streaming-step kernel (triton_kernels/running_norm.py):
``RunningGroupNorm.step_fixed`` in one launch instead of ~25 small float64 torch kernels (a
converted wav2vec2-base's first conv layer; on a CUDA-graph step at batch 1 each kernel costs a
launch slot).

``fused_ok(x, weight, total)`` says when it applies: where the fused streaming kernels do
(pyencoder.ops._ring_write_triton: a CUDA tensor, or the interpreter with its
``FORCE_INTERPRET``; Triton importable; not traced; PYENCODER_FUSED_RING not 0), x in float16 /
bfloat16 / float32 with the affine parameters in x's dtype (or none), float64 sums, and autograd
not recording (the kernel has no backward). Otherwise the module runs pyencoder.nn.norm's torch
path; both compute the same function (float64 sums in another order: y equal to its dtype's last
bit but for rare ties).
"""
import torch

from . import _ring_write_triton as _rw
from ._triton_op import block_size, cdiv, launch, next_pow2

__all__ = ["fused_ok", "running_norm_step"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_C = 16
# Tests set this: the output is NaN-filled before the launch, so a frame or channel the kernel
# does not write shows up.
POISON_OUTPUTS = False


def fused_ok(x, weight, total):
    if x.dtype not in _DTYPES or total.dtype != torch.float64 or not _rw._device_ok(x):
        return False
    if weight is not None and weight.dtype != x.dtype:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and
                                                        weight.requires_grad)):
        return False
    return True


def running_norm_step(x, weight, bias, eps, count, total, total_sq, offline=False, gelu=False):
    """x (B, C, T) -> y (B, C, T) in x's dtype; ``total`` / ``total_sq`` (B, C) float64 advanced
    in place (they must not overlap); ``count`` (B,) frames seen before, not written. No host
    synchronisation. Call when ``fused_ok``. ``offline``: T varies from call to call (an
    utterance, not a stream's fixed step): the kernel's tile count is rounded up to a power of
    two (the tiles past T are masked), so lengths share a few compiles. ``gelu``: the exact GELU
    of the normalised y, in the same launch."""
    from ..triton_kernels.running_norm import _running_norm_step_kernel
    B, C, T = x.shape
    out = torch.empty(B, C, T, device=x.device, dtype=x.dtype)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    if B and C and T:
        if total.stride() != total_sq.stride():
            raise ValueError(f"running_norm_step: total and total_sq must have the same strides; "
                             f"got {total.stride()} and {total_sq.stride()}")
        affine = weight is not None
        bt = block_size(T, 16, 64)
        tiles = cdiv(T, bt)
        if offline:
            tiles = next_pow2(tiles)
        launch(_running_norm_step_kernel)[(B, cdiv(C, BLOCK_C))](
            x, out, count, total, total_sq, weight if affine else out, bias if affine else out,
            *x.stride(), *out.stride(), *total.stride(), C, T, float(eps),
            BLOCK_C=BLOCK_C, BLOCK_T=bt, NUM_T=tiles, HAS_AFFINE=affine, GELU=bool(gelu),
            num_warps=4)
    return out
