"""Decode-step attention: the pending queries of each stream slot against its ring KV cache
(the streaming step of pyencoder.nn's attention modules).

    o = decode_attention(q, k_ring, v_ring, q_pos, q_count, n_keys, inv_freq, interleaved,
                         block, lo_off, hi_off, scale, backend=None)

Arguments, ring layout and semantics: pyencoder.reference.decode_attention (the reference backend
and the oracle). Backends: ``reference`` and ``triton`` (pyencoder.ops._decode_attention_triton),
chosen by the one registry of pyencoder._backend like every other op family ("decode_attention":
``backend=``, then ``use_backend``, then ``PYENCODER_BACKEND``, then auto: the Triton kernel for
supported CUDA tensors, the reference otherwise).

Forward only: the streaming step runs under no_grad (training runs the offline interval attention).

Registration: the triton backend is the ``torch.library.triton_op``
``pyencoder::decode_attention_triton`` (pyencoder.ops._decode_attention_triton.forward_op), which
is what torch.compile traces. Eager calls take a deliberate direct path instead: the launcher
itself, without the dispatcher. The step attends once per layer and step, and the dispatcher costs
~14 us a call on a CPU core (benchmarks/bench_dispatch_overhead.py, two runs: 17.3-17.5 us through
the op vs 3.1-3.2 us direct for the same call; a 2-core x86-64 VM shared with other work, load
3.4-4.1),
host-side time that a GPU step pays too: 12 layers would add ~0.17 ms to every step, the order of
a small decode kernel itself (no GPU timing yet). The reference backend is plain torch and is
never an op.
"""
import torch

from .. import _backend
from ..reference import decode_attention as _reference
from . import _decode_attention_triton as _triton

__all__ = ["decode_attention"]

_backend.register("decode_attention", reference=_reference, triton=_triton)


def decode_attention(q, k_ring, v_ring, q_pos, q_count, n_keys, inv_freq, interleaved, block,
                     lo_off, hi_off, scale, backend=None):
    """(B, H, M, D) outputs of the M pending queries of each slot; see the module docstring."""
    args = dict(q=q, k_ring=k_ring)
    name = _backend.select("decode_attention", "forward", q.device.type, args, backend)
    if name == "triton" and torch.compiler.is_compiling():
        from . import _triton_ops  # noqa: F401  (registers the triton_ops at first use)
        fwd = _triton.forward_op
    else:
        fwd = _backend.get_entry("decode_attention", name, "forward")   # eager: direct path
    return fwd(q, k_ring, v_ring, q_pos, q_count, n_keys, inv_freq, interleaved, block, lo_off,
               hi_off, scale)
