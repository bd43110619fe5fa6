"""Launcher of the fused streaming-state write (triton_kernels/ring_write.py) used by the
attention modules' ``step_fixed``: the n new keys (rotated), values and queries of every slot in
one kernel instead of ~20 small torch kernels per layer (on a CUDA-graph step at batch 1 those
kernels are most of a layer's time).

``fused_ok(x, state, q)`` says when it applies: a CUDA tensor (or, for tests, the interpreter
with ``FORCE_INTERPRET``), Triton importable, not traced by torch.compile, the ring / queue
head counts and head_dim equal to the new frames', PYENCODER_FUSED_RING not 0. Otherwise the
module runs its plain-torch write (same results up to the last bit of the float32 rotation).
"""
import torch

from .._backend import _interpret
from .._env import env_flag
from ._triton_op import cdiv, dummy, launch, next_pow2

__all__ = ["fused_ok", "ring_write"]

# Tests set this to run the kernel under TRITON_INTERPRET=1 on CPU tensors (slow: off otherwise).
FORCE_INTERPRET = False


def fused_ok(x, state, q):
    if not env_flag("PYENCODER_FUSED_RING", True) or torch.compiler.is_compiling() \
            or torch.jit.is_tracing():
        return False
    if x.device.type == "cuda":
        pass
    elif not (FORCE_INTERPRET and _interpret()):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    B, H, n, D = q.shape
    return (state.k.shape[1] == H and state.q.shape[1] == H and state.k.shape[3] == D
            and state.v.shape[1] == H and state.v.shape[3] == D and state.q.shape[3] == D)


def ring_write(state, q, k, v, inv_freq, interleaved):
    """state.k / state.v at slots (state.pos + i) % cap <- rotated k / v; state.q at
    state.pending + i <- q, for the n frames of q, k, v (B, H, n, D). In place; no host sync."""
    from ..triton_kernels.ring_write import _ring_write_kernel
    B, H, n, D = q.shape
    if B == 0 or n == 0:
        return
    half = 0 if inv_freq is None else int(inv_freq.numel())
    freq = (inv_freq.to(device=q.device, dtype=torch.float32).contiguous() if half else
            dummy(q, torch.float32))
    bn = 16 if _interpret() else max(1, min(64, next_pow2(n)))
    launch(_ring_write_kernel)[(cdiv(n, bn), B * H)](
        k, v, q, state.k, state.v, state.q, state.pos, state.pending, freq,
        *k.stride(), *v.stride(), *q.stride(), *state.k.stride(), *state.v.stride(),
        *state.q.stride(), H, n, D, half, 2 * half, state.k.shape[2],
        BLOCK_N=bn, BLOCK_R=max(16, next_pow2(max(half, 1))), BLOCK_D=max(16, next_pow2(D)),
        HAS_ROPE=half > 0, INTERLEAVED=bool(interleaved), num_warps=4)
