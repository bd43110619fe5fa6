"""Decode-step attention: the pending queries of each stream slot against its ring KV cache
(the streaming step of pyencoder.nn's attention modules).

    o = decode_attention(q, k_ring, v_ring, q_pos, q_count, n_keys, inv_freq, interleaved,
                         block, lo_off, hi_off, scale, backend=None, *, rel_bias=None,
                         gate=None, rel_offset=None, sink_k=None, sink_v=None)

Arguments, ring layout and semantics: pyencoder.reference.decode_attention (the reference backend
and the oracle). Backends: ``reference`` and ``triton`` (pyencoder.ops._decode_attention_triton),
chosen by the one registry of pyencoder._backend like every other op family ("decode_attention":
``backend=``, then ``use_backend``, then ``PYENCODER_BACKEND``, then auto: the Triton kernel for
supported CUDA tensors, the reference otherwise).

Relative bias (WavLM's streaming step; DESIGN.md "Relative bias"): ``rel_bias`` (H, L) float, a
per-head vector over relative offsets s - p (key position minus query position), column t for
offset ``rel_offset + t`` (default: the window's smallest offset ``-(lo_off + block - 1)``), and
an optional per-row ``gate`` (B, H, M) float: score += gate[b, h, i] * rel_bias[h, s - p -
rel_offset]. The columns must cover every offset the window can see, [-(lo_off + block - 1),
hi_off] (``window_offsets``), so a bias needs a bounded left context (lo_off >= 0). Checked on the
host from shapes and ints only (no device read: the step stays graph-capturable), so values are
not checked: a non-finite gate or rel_bias entry makes NaN exactly the rows that see it (both
backends), like a non-finite q. Without ``rel_bias`` both backends run exactly the code they ran
before it existed. k_ring / v_ring may have fewer heads than q (GQA: H % Hk == 0).

Sink keys (``sink_k``, ``sink_v`` (B, Hk, S, D), the dtype and device of the ring; None: none,
both backends run exactly the code of before): the resident rotated keys and values of positions
< S, the streaming side of the offline op's ``sink=S``. Every valid row also sees the positions
s < min(S, n_keys[b]); ring entries at positions < S are skipped (read from the sink buffer), so
no key counts twice. With a relative bias, a sink key outside the window reads the table's
saturated edge column: gate * rel_bias[h, clamp(s - p - rel_offset, 0, L - 1)] (the rule shared
with the offline op); window keys are inside the table by the check above, so bias-only results
do not change. Shapes only are checked (no device read).

Forward only: the streaming step runs under no_grad (training runs the offline interval attention).

Registration: the triton backend is the ``torch.library.triton_op``
``pyencoder::decode_attention_triton`` (pyencoder.ops._decode_attention_triton.forward_op), which
is what torch.compile traces. Eager calls take a deliberate direct path instead: the launcher
itself, without the dispatcher (plain eager only: traces, Python dispatch modes, torch.func
transforms, forward AD and PYENCODER_EAGER_FASTPATH=0 call the op, pyencoder.ops._call.eager_ok). The step attends once per layer and step, and the dispatcher costs
~14 us a call on a CPU core (benchmarks/bench_dispatch_overhead.py, two runs: 17.3-17.5 us through
the op vs 3.1-3.2 us direct for the same call; a 2-core x86-64 VM shared with other work, load
3.4-4.1),
host-side time that a GPU step pays too: 12 layers would add ~0.17 ms to every step, the order of
a small decode kernel itself (no GPU timing yet). The reference backend is plain torch and is
never an op.
"""
import torch

from .. import _backend
from .._checks import (MAX_POSITION, WINDOW_CAP, autocasting, check_bias_tensors,
                      check_decode_inputs, check_int, check_same, check_tensor, clamp_extents)
from ..reference import decode_attention as _reference
from . import _decode_attention_triton as _triton
from ._call import eager_ok
from ._autograd import refuse_forward_ad

__all__ = ["decode_attention", "window_offsets"]

_backend.register("decode_attention", reference=_reference, triton=_triton)


def window_offsets(block, lo_off, hi_off):
    """(r_min, r_max): the relative offsets s - p a query of the interval mask (block, lo_off >= 0,
    hi_off) can see: lo(p) - p >= -(lo_off + block - 1), hi(p) - p <= hi_off."""
    return -(lo_off + block - 1), hi_off


def _check_bias(q, k_ring, rel_bias, gate, rel_offset, block, lo_off, hi_off):
    """Validated rel_offset (None without a bias); shapes and ints only, no device read."""
    B, H, M, _ = q.shape
    if k_ring.dim() == 4 and (k_ring.shape[1] < 1 or H % k_ring.shape[1]):
        raise ValueError(f"k_ring must have Hk heads with H % Hk == 0 (H={H}); got shape "
                         f"{tuple(k_ring.shape)}")
    if rel_bias is None:
        if gate is not None:
            raise ValueError("decode_attention: gate needs rel_bias (the gate scales the relative "
                             "bias); got gate without rel_bias")
        if rel_offset is not None:
            raise ValueError(f"decode_attention: rel_offset needs rel_bias; got rel_offset="
                             f"{rel_offset!r} without rel_bias")
        return None
    check_bias_tensors(q, rel_bias, gate, H, (B, H, M), "(B, H, M)")
    if lo_off < 0:
        raise ValueError(f"decode_attention: rel_bias needs a bounded left context (lo_off >= 0: "
                         f"the offsets s - p a query sees must be covered by its columns); got "
                         f"lo_off={lo_off}")
    r_min, r_max = window_offsets(block, lo_off, hi_off)
    if rel_offset is None:
        rel_offset = r_min
    check_int("rel_offset", rel_offset, min_value=-MAX_POSITION, max_value=MAX_POSITION)
    L = rel_bias.shape[1]
    if rel_offset > r_min or rel_offset + L - 1 < r_max:
        raise ValueError(f"rel_bias must cover the window's relative offsets s - p in [{r_min}, "
                         f"{r_max}] (window_offsets(block={block}, lo_off={lo_off}, hi_off="
                         f"{hi_off})); got rel_offset={rel_offset} with {L} columns, covering "
                         f"[{rel_offset}, {rel_offset + L - 1}]")
    return rel_offset


def _check_sinks(q, k_ring, v_ring, sink_k, sink_v):
    """Shapes, dtypes and devices of the sink buffers; no device read."""
    if sink_k is None and sink_v is None:
        return
    if sink_k is None or sink_v is None:
        given = "sink_k" if sink_v is None else "sink_v"
        raise ValueError(f"decode_attention: sink_k and sink_v go together (the resident keys and "
                         f"values of positions < S); got {given} alone")
    for name, t, ring, ring_name in (("sink_k", sink_k, k_ring, "k_ring"),
                                     ("sink_v", sink_v, v_ring, "v_ring")):
        check_tensor(name, t, 4)
        check_same(name, t, ring_name, ring)
        want = (q.shape[0], ring.shape[1], sink_k.shape[2], ring.shape[3])
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape (B, Hk, S, D) = {want} (B from q, Hk and D "
                             f"from {ring_name}, S from sink_k); got {tuple(t.shape)}")


def _refuse_autograd(*tensors):
    """The decode is forward only (a streaming step's; the Triton kernel has no backward, the
    reference computes in place): a gradient asked of it was dropped silently (the Triton
    path: no grad_fn) or failed in autograd's words (the reference). (Forward-mode AD: the
    Triton path refuses it by name where it is selected; the reference's torch ops carry it.)"""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise RuntimeError("pyencoder: decode_attention is forward only (the streaming steps' "
                           "decode: no backward); call it under torch.no_grad() / "
                           "torch.inference_mode(), and take gradients from the offline op "
                           "(pyencoder.ops.interval_attention), which equals it")


def decode_attention(q, k_ring, v_ring, q_pos, q_count, n_keys, inv_freq, interleaved, block,
                     lo_off, hi_off, scale, backend=None, *, rel_bias=None, gate=None,
                     rel_offset=None, sink_k=None, sink_v=None):
    """(B, H, M, D) outputs of the M pending queries of each slot; see the module docstring.
    Under autocast it computes in the ring's dtype (q of that dtype, as checked), as the offline
    op does after its cast: without autocast (the plain-torch backend's products were cast
    again)."""
    if autocasting(q):
        with torch.autocast(q.device.type, enabled=False):
            return decode_attention(q, k_ring, v_ring, q_pos, q_count, n_keys, inv_freq,
                                    interleaved, block, lo_off, hi_off, scale, backend,
                                    rel_bias=rel_bias, gate=gate, rel_offset=rel_offset,
                                    sink_k=sink_k, sink_v=sink_v)
    check_decode_inputs(q, k_ring, v_ring, q_pos, q_count, n_keys, inv_freq, interleaved, block,
                        lo_off, hi_off, scale)
    _refuse_autograd(q, k_ring, v_ring, rel_bias, gate, sink_k, sink_v)
    scale = float(scale)        # a numpy float as the offline op takes it
    # extents within WINDOW_CAP (2**53), the offline op's rule (positions stay below 2**52):
    # hi_off = 2**63 - 1 wrapped in the reference's int64 bounds (rows that see every key saw
    # none); 2**64 failed as "int too big to convert", naming no argument
    block, lo_off, hi_off = clamp_extents(block, lo_off, hi_off, WINDOW_CAP)
    rel_offset = _check_bias(q, k_ring, rel_bias, gate, rel_offset, block, lo_off, hi_off)
    _check_sinks(q, k_ring, v_ring, sink_k, sink_v)
    args = dict(q=q, k_ring=k_ring)
    name = _backend.select("decode_attention", "forward", q.device.type, args, backend)
    if name != "reference":     # no forward-mode formula: torch would give a zero tangent
        refuse_forward_ad("decode_attention", q, k_ring, v_ring, rel_bias, gate, sink_k, sink_v)
    if name == "triton" and not eager_ok():
        # traced (torch.compile, make_fx, FakeTensor), a torch.func transform or forward AD:
        # the registered op, which they understand (pyencoder.ops._call.eager_ok)
        from . import _triton_ops  # noqa: F401  (registers the triton_ops at first use)
        fwd = _triton.forward_op
    else:
        fwd = _backend.get_entry("decode_attention", name, "forward")   # eager: direct path
    if sink_k is not None:
        return fwd(q, k_ring, v_ring, q_pos, q_count, n_keys, inv_freq, interleaved, block,
                   lo_off, hi_off, scale, rel_bias, gate, 0 if rel_offset is None else rel_offset,
                   sink_k, sink_v)
    if rel_bias is None:
        return fwd(q, k_ring, v_ring, q_pos, q_count, n_keys, inv_freq, interleaved, block,
                   lo_off, hi_off, scale)
    return fwd(q, k_ring, v_ring, q_pos, q_count, n_keys, inv_freq, interleaved, block, lo_off,
               hi_off, scale, rel_bias, gate, rel_offset)
