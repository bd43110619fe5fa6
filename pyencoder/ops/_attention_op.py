"""The one schema of the interval attention ops, shared by their two registrations.

(The arguments are written once, as ``_forward``'s signature; ``op_signature`` gives an op body
that signature, from which torch.library infers the schema.)

Every interval attention (band, chunked, sink keys, frame-rate masks with k_block != block and
Nq != Nk, the relative bias) goes through one op pair with these arguments:

    q, k, v, inv_freq?, key_lengths?, rel_bias?, gate?,           (tensors; ? = may be None)
    block, k_block, lo_off, hi_off, sink, rel_offset, q_offset, k_offset, scale, interleaved

(the IntervalMask's ints at the kernel boundary, pyencoder/mask.py; without a bias rel_bias and
gate are None and rel_offset is 0). It is registered twice: ``pyencoder::interval_attention``
(+ ``_backward``), an opaque custom op with a trailing ``backend`` string (pyencoder.ops.attention;
the reference on any device, or "triton"), and ``pyencoder::interval_attention_triton``
(+ ``_backward``), the triton backend's ``torch.library.triton_op`` (pyencoder.ops.
_attention_triton), which torch.compile traces down to the Triton kernels. The backward op also
takes ``deterministic`` and returns (dq, dk, dv, drel_bias, dgate), an empty tensor standing for
the gradient of an absent rel_bias or gate. Both registrations call a backend's ``forward`` /
``backward`` (the signature of pyencoder.reference.attention) through ``run_forward`` /
``run_backward`` and share one autograd formula (pyencoder.ops.attention).
"""
import inspect
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._autograd import fresh

__all__ = ["op_signature", "N_TENSORS", "N_PARAMS", "run_forward", "run_backward",
           "fake_forward", "fake_backward"]

N_TENSORS = 7     # q, k, v, inv_freq, key_lengths, rel_bias, gate
N_PARAMS = 10     # block .. interleaved


def _forward(q: Tensor, k: Tensor, v: Tensor, inv_freq: Optional[Tensor],
             key_lengths: Optional[Tensor], rel_bias: Optional[Tensor], gate: Optional[Tensor],
             block: int, k_block: int, lo_off: int, hi_off: int, sink: int, rel_offset: int,
             q_offset: int, k_offset: int, scale: float,
             interleaved: bool) -> Tuple[Tensor, Tensor]:
    """The forward's arguments, written once (the registered ops take their schema from it)."""


def _param(name, annotation):
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation)


def op_signature(backward, backend):
    """Decorator: give an op body taking ``*args`` the signature torch.library infers the schema
    from. ``backward``: the backward's arguments (dout first, out and lse after v, deterministic
    last; returns five tensors); ``backend``: with the trailing ``backend: str`` (before
    deterministic)."""
    sig = inspect.signature(_forward)
    params = list(sig.parameters.values())
    tail = [_param("backend", str)] if backend else []
    returns = sig.return_annotation
    if backward:
        params = ([_param("dout", Tensor)] + params[:3]
                  + [_param("out", Tensor), _param("lse", Tensor)] + params[3:])
        tail.append(_param("deterministic", bool))
        returns = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]

    def deco(fn):
        fn.__signature__ = sig.replace(parameters=params + tail, return_annotation=returns)
        return fn
    return deco


def run_forward(fwd, q, k, v, inv_freq, key_lengths, rel_bias, gate, block, k_block, lo_off,
                hi_off, sink, rel_offset, q_offset, k_offset, scale, interleaved):
    """A backend's ``forward`` called with the op's arguments: (out, lse)."""
    return fwd(q, k, v, inv_freq, key_lengths, block, lo_off, hi_off, q_offset, k_offset, scale,
               interleaved, sink=sink, kb=k_block, rel_bias=rel_bias, gate=gate,
               rel_offset=rel_offset)


def run_backward(bwd, dout, q, k, v, out, lse, inv_freq, key_lengths, rel_bias, gate, block,
                 k_block, lo_off, hi_off, sink, rel_offset, q_offset, k_offset, scale,
                 interleaved, deterministic):
    """A backend's ``backward`` called with the op's arguments: (dq, dk, dv, drel_bias, dgate),
    an empty tensor for the gradient of an absent rel_bias or gate (an op returns tensors)."""
    grads = bwd(dout, q, k, v, out, lse, inv_freq, key_lengths, block, lo_off, hi_off, q_offset,
                k_offset, scale, interleaved, deterministic, sink=sink, kb=k_block,
                rel_bias=rel_bias, gate=gate, rel_offset=rel_offset)
    drel, dgate = grads[3:] if rel_bias is not None else (None, None)
    return (*grads[:3], q.new_empty(0) if drel is None else drel,
            q.new_empty(0) if dgate is None else dgate)


def fake_forward(q, k, v, *_):
    """(out, lse) of the right shapes and dtypes (float64 lse for float64 q, float32 otherwise)."""
    B, Hq, Nq, _ = q.shape
    lse_dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(B, Hq, Nq, v.shape[-1]), q.new_empty(B, Hq, Nq, dtype=lse_dt)


def fake_backward(dout, q, k, v, out, lse, inv_freq, key_lengths, rel_bias, gate, *_):
    """(dq, dk, dv, drel_bias, dgate) of the right shapes and dtypes, contiguous as the
    backends return them (pyencoder.ops._autograd.fresh)."""
    return (fresh(q), fresh(k), fresh(v),
            q.new_empty(0) if rel_bias is None else fresh(rel_bias),
            q.new_empty(0) if gate is None else fresh(gate))
