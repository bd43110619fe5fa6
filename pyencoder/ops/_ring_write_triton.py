"""Launcher of the fused streaming-state write (triton_kernels/ring_write.py) used by the
attention modules' ``step_fixed``: the n new keys (rotated), values and queries of every slot in
one kernel instead of ~20 small torch kernels per layer (on a CUDA-graph step at batch 1 those
kernels are most of a layer's time).

``fused_ok(x, state, q)`` says when it applies: a CUDA tensor (or, for tests, the interpreter
with ``FORCE_INTERPRET``), Triton importable, not traced by torch.compile, the ring / queue
head counts and head_dim equal to the new frames', PYENCODER_FUSED_RING not 0. Otherwise the
module runs its plain-torch write (same results up to the last bit of the float32 rotation).

The launch also writes the released queries' positions (the decode's q_pos) and the key count
after the step (pos + n, the decode's n_keys), so that pos's own add can wait for the stack's
other counters (pyencoder.streaming.state.batched_counters). With ``keep`` > 0
(a mask with lookahead: queries wait in ``state.q``) and a step of at most
``MAX_QUEUE_ROWS`` frames, the same launch also advances the query queue: it returns the n
queries the step releases and leaves the pending ones at the queue's front, where the module's
torch path writes every query into the queue, attends its first n rows and shifts the rest with
a copy. ``residual_step`` does that for a TransformerLayer's residual queue, adds the attention
output and applies the LayerNorm that follows, in the same launch (an index_put, an add, a copy
and a layer_norm in the torch path); without a queue it is the fused add + LayerNorm.
"""
import torch

from .._backend import _interpret
from .._env import env_flag
from ._triton_op import cdiv, dummy, launch, next_pow2

__all__ = ["fused_ok", "ring_write", "residual_ok", "residual_step", "MAX_QUEUE_ROWS"]

# Tests set this to run the kernel under TRITON_INTERPRET=1 on CPU tensors (slow: off otherwise).
FORCE_INTERPRET = False

# A program holds a slot's whole queue (the step's rows and the pending ones, each padded to a
# power of two): larger steps or queues keep the torch path's shift copies.
MAX_QUEUE_ROWS = 64


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _device_ok(x):
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
    return True


def fused_ok(x, state, q):
    if not _device_ok(x):
        return False
    B, H, n, D = q.shape
    return (state.k.shape[1] == H and state.q.shape[1] == H and state.k.shape[3] == D
            and state.v.shape[1] == H and state.v.shape[3] == D and state.q.shape[3] == D)


def _queue_fits(n, keep):
    return 0 < keep <= MAX_QUEUE_ROWS and 0 < n <= MAX_QUEUE_ROWS


def ring_write(state, q, k, v, inv_freq, interleaved, keep=0):
    """state.k / state.v at slots (state.pos + i) % cap <- rotated k / v; state.q at
    state.pending + i <- q, for the n frames of q, k, v (B, H, n, D). In place; no host sync.

    Returns (released, q_pos, n_keys). q_pos (B, n) int64: state.pos - state.pending + i (before
    the step's pos advance), the positions of the n queries the step releases; n_keys (B,) int64:
    state.pos + n, the key count after the step (the decode's; state.pos itself is not advanced
    here: the caller adds n, possibly batched with other counters). ``keep``: the most
    queries a slot holds back (the module's hi_off; state.pending <= keep). When 0 < keep and
    n <= MAX_QUEUE_ROWS (and keep too), the queue is advanced as well (module docstring) and
    ``released`` holds the released queries (B, H, n, D) in state.q's dtype; otherwise it is None
    (the caller attends state.q[:, :, :n] and shifts the queue itself)."""
    from ..triton_kernels.ring_write import _ring_write_kernel
    B, H, n, D = q.shape
    queue = _queue_fits(n, keep)
    q_pos = torch.empty(B, n, device=q.device, dtype=torch.int64)
    n_keys = torch.empty(B, device=q.device, dtype=torch.int64)
    if B == 0 or n == 0:
        if B:
            n_keys.copy_(state.pos)
        return (q.new_empty(B, H, n, D, dtype=state.q.dtype) if queue else None), q_pos, n_keys
    half = 0 if inv_freq is None else int(inv_freq.numel())
    freq = (inv_freq.to(device=q.device, dtype=torch.float32).contiguous() if half else
            dummy(q, torch.float32))
    if queue:
        bn = next_pow2(n)
        out = torch.empty(B, H, n, D, device=q.device, dtype=state.q.dtype)
    else:
        bn = 16 if _interpret() else max(1, min(64, next_pow2(n)))
        out = state.q              # not read (QUEUE off)
    launch(_ring_write_kernel)[(B * H, cdiv(n, bn))](
        k, v, q, state.k, state.v, state.q, out, q_pos, n_keys, state.pos, state.pending, freq,
        *k.stride(), *v.stride(), *q.stride(), *state.k.stride(), *state.v.stride(),
        *state.q.stride(), *out.stride(), *q_pos.stride(), H, n, D, half, 2 * half,
        state.k.shape[2],
        BLOCK_N=bn, BLOCK_K=next_pow2(keep) if queue else 1,
        BLOCK_R=max(16, next_pow2(max(half, 1))), BLOCK_D=max(16, next_pow2(D)),
        HAS_ROPE=half > 0, INTERLEAVED=bool(interleaved), QUEUE=queue, num_warps=4)
    return (out if queue else None), q_pos, n_keys


def residual_ok(x, a, res, keep):
    """Whether ``residual_step`` runs for a layer step of x (B, n, E) with attention output a,
    residual queue res (B, qcap, E) and at most ``keep`` frames held back (0: no queue). Not
    when autograd records x or a (the kernel has no backward: the torch ops keep the graph)."""
    return (_device_ok(x) and (keep == 0 or _queue_fits(x.shape[1], keep))
            and a.shape == x.shape and a.device == x.device and res.shape[2] == x.shape[2]
            and all(t.dtype in _DTYPES for t in (x, a, res))
            and not (torch.is_grad_enabled() and (x.requires_grad or a.requires_grad))
            # under autocast the torch ops promote the sum and run the LayerNorm in float32;
            # the kernel sums in a's dtype
            and not torch.is_autocast_enabled(x.device.type))


# LayerNorm in the same launch: a program holds all E columns of a slot's rows (padded to powers
# of two); larger tiles run the sum kernel and torch's layer_norm.
MAX_NORM_TILE = 8192


def _norm_args(norm, E, n, device):
    """(weight, bias, eps) of an nn.LayerNorm the kernel can apply over E, else None."""
    if not isinstance(norm, torch.nn.LayerNorm) or tuple(norm.normalized_shape) != (E,) \
            or next_pow2(n) * next_pow2(E) > MAX_NORM_TILE:
        return None
    w, b = norm.weight, norm.bias
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (w, b)):
        return None                 # autograd records the norm: torch's, on the fused sum
    for t in (w, b):
        if t is not None and (t.device != device or t.dtype not in _DTYPES or t.shape != (E,)
                              or t.stride() != (1,)):
            return None
    return w, b, float(norm.eps)


def residual_step(res, count, x, a, keep, norm=None, need_sum=True, sum_bias=None):
    """A TransformerLayer's residual sum after its attention, in one launch (module docstring):
    s = (rows released by the queue res[:, :count] ++ x)[:, :n] + a in a's dtype, the count
    rows after them left at the queue's front (keep > 0; keep == 0: no queue, s = x + a, res
    only gives the dtype x goes through), and y = norm(s) for an nn.LayerNorm ``norm``. Returns
    (s, y): y is None without a norm; s is None when the norm ran in the launch and
    ``need_sum`` is false. ``sum_bias`` (E,): the returned s is s + sum_bias (rounded once to
    a's dtype), while y stays norm(s); in the launch when it also runs the norm (else one torch
    add). A norm the launch cannot hold (an E x n tile over MAX_NORM_TILE, another module) is
    applied by torch to s. In place; no host sync. Call when ``residual_ok``."""
    from ..triton_kernels.ring_write import _residual_kernel
    B, n, E = x.shape
    ln = None if norm is None else _norm_args(norm, E, n, x.device)
    queue = keep > 0
    store_sum = ln is not None and need_sum
    out = torch.empty(B, n, E, device=a.device, dtype=a.dtype)
    ssum = torch.empty(B, n, E, device=a.device, dtype=a.dtype) if store_sum else out
    in_launch = store_sum and sum_bias is not None
    if in_launch:
        sum_bias = sum_bias.contiguous()           # the kernel reads it at unit stride
    if B and n:
        bn = next_pow2(n)
        be = next_pow2(E) if ln is not None else max(16, min(256, next_pow2(E), 4096 // bn))
        w, bias, eps = ln if ln is not None else (None, None, 0.0)
        launch(_residual_kernel)[(B, cdiv(E, be))](
            x, a, res, count if queue else x, out, ssum, w if w is not None else out,
            bias if bias is not None else out, sum_bias if in_launch else out,
            *x.stride(), *a.stride(), *res.stride(), *out.stride(), *ssum.stride(), n, E, eps,
            BLOCK_N=bn, BLOCK_K=next_pow2(keep) if queue else 1, BLOCK_E=be, QUEUE=queue,
            LN=ln is not None, HAS_W=w is not None, HAS_BIAS=bias is not None,
            STORE_SUM=store_sum, HAS_SUM_BIAS=in_launch,
            num_warps=8 if bn * be >= 4096 else 4)
    if norm is None:
        return (out if sum_bias is None else out + sum_bias.to(out.dtype)), None
    if ln is None:
        return (out if sum_bias is None else out + sum_bias.to(out.dtype)), norm(out)
    if not need_sum:
        return None, out
    return ssum, out
