"""Interval attention: banded (left, right) and chunked (chunk_size, left_chunks, lookahead) masks,
with RoPE applied inside the kernels (DESIGN.md, "One attention: interval attention").

Registered ops: one op pair for every interval attention (band, chunked, sink keys, frame-rate
masks with Nq != Nk, the relative bias), with the one schema of pyencoder.ops._attention_op,
registered twice: ``pyencoder::interval_attention`` (forward, returns out and log-sum-exp) with its
backward ``pyencoder::interval_attention_backward``, an opaque custom op that runs the backend
named by its last argument (the reference on any device; it accepts "triton" too), and for the
triton backend the ``torch.library.triton_op`` pair ``pyencoder::interval_attention_triton`` /
``pyencoder::interval_attention_triton_backward`` (pyencoder.ops._attention_triton), which
torch.compile traces down to the Triton kernels. The public functions call the triton_op when the
registry picks triton, the custom op otherwise; both carry the one autograd formula below. The
mask is a ``pyencoder.IntervalMask`` (pyencoder/mask.py holds its formula); the registered ops and
the backends take its ints (block, k_block, lo_off, hi_off, sink) at their boundary.

Relative-position bias (DESIGN.md, "Relative bias"; WavLM's gated bias, T5/ALiBi-style plain
biases): with ``rel_bias`` (Hq, L) the score of query position p and key position s gains

    gate[b, h, i] * rel_bias[h, s - p - rel_offset]          (gate=None: gate = 1)

a dense per-head vector over the call's relative offsets (``relative_offsets`` gives the range a
call can see; bucketing, e.g. WavLM's T5 buckets, is done by the caller once per call:
``rel_bias = table[bucket(arange(r_min, r_max + 1))].T``). The same op pair carries it (rel_bias
and gate None, rel_offset 0 without a bias); its backward also returns the gradients of rel_bias
and gate.

With sink keys (``sink`` > 0) the bias follows the "saturated bucket" rule (as WavLM's bucket
function saturates beyond max_distance): the bias of query p and visible key s is

    gate[b, h, i] * rel_bias[h, clamp(s - p - rel_offset, 0, L - 1)]

for every visible key. For band keys the clamp is a no-op (the columns must still cover
relative_offsets(), the band's offsets), so every result without sinks is unchanged; a sink key
whose offset lies outside the table reads the edge column (column 0 for sink keys far behind the
query, column L - 1 for sink keys ahead of an early query), and drel_bias adds their gradients into
that column. A caller who wants the exact bias of every sink key gives a wider table (rel_offset
down to k_offset - last query position, L up to the sink keys' largest offset);
pyencoder.nn.relpos.biased_interval_attention builds the cheapest exact table for a bucket function.
"""
import torch
import torch.autograd.profiler as _profiler

from .. import _backend
from .._env import env_flag
from ..mask import IntervalMask, as_mask
from ..reference import attention as _reference
from ..rope import Rope
from . import _attention_triton as _triton
from . import _triton_op
from ._attention_op import (N_PARAMS, N_TENSORS, fake_backward, fake_forward, op_signature,
                            run_backward, run_forward)
from ._autograd import forbid_double_backward, refuse_forward_ad
from ._call import call_custom, call_op, eager_ok
from .._checks import (MAX_POSITION, autocast_cast, autocasting, check_bias_tensors,
                      check_bool, check_float_dtype, check_int, check_lengths, check_same,
                      check_scale, check_tensor, passed, passed_key, plain_values, remember_passed,
                      value_checks_enabled)

__all__ = ["banded_attention", "chunked_attention", "interval_attention", "cross_attention",
           "band_params", "chunked_params", "relative_offsets"]

_backend.register("attention", reference=_reference, triton=_triton)


# ---- the registered op pair (pyencoder.ops._attention_op: its arguments) ----------------------

@torch.library.custom_op("pyencoder::interval_attention", mutates_args=())
@op_signature(backward=False, backend=True)
def _interval_attention_op(*args):
    *args, backend = args
    return run_forward(_backend.get_entry("attention", backend, "forward"), *args)


_interval_attention_op.register_fake(fake_forward)


@torch.library.custom_op("pyencoder::interval_attention_backward", mutates_args=())
@op_signature(backward=True, backend=True)
def _interval_attention_bwd_op(*args):
    *args, backend, deterministic = args
    grads = run_backward(_backend.get_entry("attention", backend, "backward"), *args,
                         deterministic)
    return tuple(g.contiguous() for g in grads)      # as the fake says (fake_backward)


_interval_attention_bwd_op.register_fake(fake_backward)


def _setup_context(ctx, inputs, output):
    """Shared by the custom op and the triton_op (whose inputs have no trailing backend)."""
    out, lse = output
    ctx.save_for_backward(*inputs[:3], out, lse, *inputs[3:N_TENSORS])
    ctx.params = tuple(inputs[N_TENSORS:N_TENSORS + N_PARAMS])
    ctx.backend = inputs[N_TENSORS + N_PARAMS] if len(inputs) > N_TENSORS + N_PARAMS else None
    ctx.n_inputs = len(inputs)
    # an output that does not reach the loss gets None, not zeros (``_backward``: lse's gradient
    # costs a second backward pass, run only where lse was used)
    ctx.set_materialize_grads(False)


def deterministic_backward():
    """Deterministic backward when torch asks for deterministic algorithms or
    PYENCODER_DETERMINISTIC=1."""
    return (torch.are_deterministic_algorithms_enabled()
            or env_flag("PYENCODER_DETERMINISTIC", False))


def _run_backward(ctx, dout, q, k, v, out, lse, inv_freq, key_lengths, rel_bias, gate):
    args = (dout, q, k, v, out, lse, inv_freq, key_lengths, rel_bias, gate, *ctx.params)
    if getattr(ctx, "eager", False) and not torch.is_grad_enabled():
        # the eager fast path (_EagerTriton): the launcher itself, no dispatcher; with
        # create_graph=True the registered op runs instead (its double backward refuses by name)
        return run_backward(_triton.backward, *args, deterministic_backward())
    if ctx.backend is None:
        return _triton.backward_op(*args, deterministic_backward())
    # the custom op, or its body directly where nothing traces the call (pyencoder.ops._call)
    return call_custom(_interval_attention_bwd_op, *args, ctx.backend, deterministic_backward())


def _lse_backward_inputs(out, dlse):
    """(dout', out') for the gradient of lse alone. lse_i = log sum_j exp(s_ij), so dS_ij =
    dlse_i * P_ij: the backward's dS = P * (dP - delta) with v = 0 (dP = 0) and delta = rowsum(
    dout' * out') = -dlse (out is read for delta only, in float32). In float16 / bfloat16 -dlse
    (float32, as large as a loss scale makes it) is written as 2**a * (hi + lo): a power of two
    in dout' (a in [-14, 15], exact in both dtypes) times a two-term split of the rest in out'
    (its value and its rounding error, ~16 bits; ~11 bits where the head dim is 1), so the
    pass's inputs hold |dlse| up to ~2**30 (the float16 gradients it yields overflow as they
    would for such a dout)."""
    if out.dtype in (torch.float32, torch.float64):
        nl = -dlse.to(out.dtype)
        do2, o2 = torch.zeros_like(out), torch.zeros_like(out)
        do2[..., 0] = 1
        o2[..., 0] = nl
        return do2, o2
    nl = -dlse.to(torch.float32)
    m, e = torch.frexp(nl)                          # nl = m * 2**e, |m| in [0.5, 1)
    a = e.clamp(-14, 15)
    rest = torch.ldexp(m, e - a)                    # nl / 2**a
    hi = rest.to(out.dtype)
    scale = torch.ldexp(torch.ones_like(rest), a).to(out.dtype)
    do2, o2 = torch.zeros_like(out), torch.zeros_like(out)
    do2[..., 0] = scale
    o2[..., 0] = hi
    if out.shape[-1] > 1:
        do2[..., 1] = scale
        o2[..., 1] = (rest - hi.to(torch.float32)).to(out.dtype)
    return do2, o2


def _backward(ctx, dout, dlse):
    """Gradients of (out, lse): dout's through the op's backward; dlse's (where lse was used:
    merging partial attentions by their lse) through the same backward on the inputs of
    ``_lse_backward_inputs`` (its dv is 0 and dropped). None for an unused output (no zeros
    materialised: ctx.set_materialize_grads(False))."""
    q, k, v, out, lse, inv_freq, key_lengths, rel_bias, gate = ctx.saved_tensors
    rest = (lse, inv_freq, key_lengths, rel_bias, gate)
    grads = None
    if dout is not None:
        grads = _run_backward(ctx, dout.contiguous(), q, k, v, out, *rest)
    if dlse is not None:
        do2, o2 = _lse_backward_inputs(out, dlse)
        g2 = _run_backward(ctx, do2, q, k, torch.zeros_like(v), o2, *rest)
        if grads is None:
            grads = (g2[0], g2[1], torch.zeros_like(g2[2])) + tuple(g2[3:])
        else:                              # v's gradient is dout's alone
            grads = tuple(a if i == 2 or a is None else a + b
                          for i, (a, b) in enumerate(zip(grads, g2)))
    if grads is None:                     # neither output reached the loss
        return (None,) * ctx.n_inputs
    dq, dk, dv, drel, dgate = grads
    return (dq, dk, dv, None, None, None if rel_bias is None else drel,
            None if gate is None else dgate) + (None,) * (ctx.n_inputs - N_TENSORS)


_interval_attention_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerTriton(torch.autograd.Function):
    """The triton backend's eager fast path: the same launcher (pyencoder.ops._attention_triton.
    forward / backward) and the same autograd formula (``_backward``) as the registered triton_op,
    without the dispatcher. torch.library's custom-op autograd wrapper costs ~100-150 us of host
    time per call (schema default filling, redispatch), more than the whole forward kernel of a
    narrow band at wav2vec2-base sizes, so eager calls skip it. Used only where nothing traces
    the call (pyencoder.ops._call.eager_ok): torch.compile, torch.export, make_fx, FakeTensorMode and torch.func
    transforms (and torch.jit.trace) still see the registered op
    pyencoder::interval_attention_triton."""

    @staticmethod
    def forward(ctx, *inputs):
        # old-style forward(ctx, ...): Function.apply binds a setup_context-style forward's
        # signature with inspect on every call (~20 us); no torch.func support is needed here
        output = run_forward(_triton.forward, *inputs)
        _setup_context(ctx, inputs, output)
        ctx.eager = True
        return output

    @staticmethod
    def backward(ctx, dout, dlse):
        return _backward(ctx, dout, dlse)


_triton.forward_op.register_autograd(_backward, setup_context=_setup_context)
forbid_double_backward(_interval_attention_bwd_op, "interval attention")
forbid_double_backward(_triton.backward_op, "interval attention")


def relative_offsets(nq, nk, *, block, lo_off, hi_off, q_offset=0, k_offset=0):
    """(r_min, r_max): every visible (query, key) pair of a call has s - p in [r_min, r_max]
    (bounds from the mask and the positions the call holds; r_min > r_max when none is visible).
    A ``rel_bias`` must cover them: column t is offset rel_offset + t, rel_offset <= r_min and
    rel_offset + L - 1 >= r_max."""
    p_first, p_last = q_offset, q_offset + nq - 1
    r_max = min(hi_off, k_offset + nk - 1 - p_first)
    r_min = k_offset - p_last
    if lo_off >= 0:
        r_min = max(r_min, -(lo_off + block - 1))
    return r_min, r_max


def _validate_bias(q, k, rel_bias, gate, rel_offset, block, lo_off, hi_off, q_offset, k_offset,
                   sink=0):
    if rel_bias is None:
        if gate is not None:
            raise ValueError("gate needs rel_bias (the gate scales the relative bias); got "
                             "gate without rel_bias")
        if rel_offset is not None:      # (ignored silently before, as decode_attention refuses)
            raise ValueError(f"rel_offset needs rel_bias (it places the bias table's columns); "
                             f"got rel_offset={rel_offset!r} without rel_bias")
        return None
    B, Hq, Nq, _ = q.shape
    check_bias_tensors(q, rel_bias, gate, Hq, (B, Hq, Nq), "(B, Hq, Nq)", "Hq",
                       min_columns=0)     # an empty call covers no offsets
    r_min, r_max = relative_offsets(Nq, k.shape[2], block=block, lo_off=lo_off, hi_off=hi_off,
                                    q_offset=q_offset, k_offset=k_offset)
    if rel_offset is None:
        rel_offset = r_min
    check_int("rel_offset", rel_offset, min_value=-MAX_POSITION, max_value=MAX_POSITION)
    L = rel_bias.shape[1]
    # (not over symbolic lengths: the comparison would add guards that an exported length
    # range cannot always prove, e.g. 1 - T <= max(-4, 1 - T); concrete ones are checked)
    symbolic = any(isinstance(t, torch.SymInt) for t in (r_min, r_max, L, rel_offset))
    if not symbolic and r_min <= r_max and (rel_offset > r_min or rel_offset + L - 1 < r_max):
        raise ValueError(f"rel_bias must cover the relative offsets s - p in [{r_min}, {r_max}] "
                         f"of this call (relative_offsets()); got rel_offset={rel_offset} with "
                         f"{L} columns, covering [{rel_offset}, {rel_offset + L - 1}]")
    if L == 0 and sink > k_offset and Nq and k.shape[2]:
        raise ValueError(f"rel_bias needs at least one column when sink keys are visible (a sink "
                         f"key outside the table reads its edge column: the saturated bucket "
                         f"rule); got 0 columns with sink={sink}, k_offset={k_offset}")
    if value_checks_enabled() and rel_bias.numel() and not rel_bias.is_meta:
        vals = plain_values(rel_bias)
        key = passed_key("finite", vals)         # a host sync on a GPU: once per tensor
        if not passed(key, vals):
            if not bool(torch.isfinite(vals).all()):
                raise ValueError("rel_bias must be finite (a NaN / inf entry would poison every "
                                 "row that sees its offset); got a non-finite entry")
            remember_passed(key, vals)
    return rel_offset


def band_params(left, right):
    """(block, lo_off, hi_off) of ``IntervalMask.band(left, right)`` (older API)."""
    return IntervalMask.band(left, right).params


def chunked_params(chunk_size, left_chunks, lookahead):
    """(block, lo_off, hi_off) of ``IntervalMask.chunked(...)`` (older API)."""
    return IntervalMask.chunked(chunk_size, left_chunks, lookahead).params


def _validate(q, k, v, rope, key_lengths, q_offset, k_offset, scale):
    check_tensor("q", q, 4)
    check_tensor("k", k, 4)
    check_tensor("v", v, 4)
    check_float_dtype("q", q)
    check_same("k", k, "q", q)
    check_same("v", v, "q", q)
    B, Hq, Nq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"q, k and v must share the batch size; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must share heads and length (B, Hk, Nk, D); got k "
                         f"{tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != D or v.shape[3] != D:
        raise ValueError(f"q, k and v must share head_dim; got q {D}, k {k.shape[3]}, "
                         f"v {v.shape[3]}")
    Hk = k.shape[1]
    if Hq == 0 or Hk == 0 or Hq % Hk:
        raise ValueError(f"q heads must be a positive multiple of k/v heads (GQA); got Hq={Hq}, "
                         f"Hk={Hk}")
    if D == 0:
        raise ValueError("head_dim must be >= 1; got 0")
    if rope is not None:
        if not isinstance(rope, Rope):
            raise TypeError(f"rope must be a pyencoder.Rope or None; got {type(rope).__name__}")
        if rope.dim > D:
            raise ValueError(f"rope.dim must be <= head_dim ({D}); got {rope.dim}")
    check_lengths("key_lengths", key_lengths, B, k.shape[2], q.device)
    check_int("q_offset", q_offset, min_value=0, max_value=MAX_POSITION)
    check_int("k_offset", k_offset, min_value=0, max_value=MAX_POSITION)
    check_scale(scale)


def _attend(q, k, v, mask, rope, key_lengths, q_offset, k_offset, scale, backend, return_lse,
            rel_bias=None, gate=None, rel_offset=None):
    """Every interval attention after validation of q, k, v and the positions: one op call."""
    check_bool("return_lse", return_lse)
    refuse_forward_ad("interval attention", q, k, v, rel_bias, gate)
    block, k_block, lo_off, hi_off = mask.frame_params
    sink = mask.sink
    # with sink keys: the saturated bucket rule (module docstring)
    rel_offset = _validate_bias(q, k, rel_bias, gate, rel_offset, block, lo_off, hi_off,
                                q_offset, k_offset, sink)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    inv_freq = None if rope is None else rope.inv_freq(q.device)
    interleaved = False if rope is None else rope.interleaved
    args = dict(q=q, k=k, v=v, inv_freq=inv_freq, key_lengths=key_lengths, block=block,
                lo_off=lo_off, hi_off=hi_off, q_offset=q_offset, k_offset=k_offset, scale=scale,
                interleaved=interleaved, sink=sink)
    if mask.is_frame:
        args.update(k_block=k_block)
    if rel_bias is not None:
        args.update(rel_bias=rel_bias, gate=gate, rel_offset=rel_offset)
    rows_max = _triton_op.MAX_GRID_YZ
    if q.shape[0] > 1 and q.shape[0] * q.shape[1] > rows_max and q.shape[1] <= rows_max:
        # the triton kernels' grid holds at most rows_max (batch, head) rows: where they would
        # run the call (the selection made for a batch that fits), split the batch into such
        # launches; each part is its own op call (autograd included), the outputs concatenated
        per = rows_max // q.shape[1]
        part = dict(args, q=q[:per], k=k[:per], v=v[:per],
                    key_lengths=None if key_lengths is None else key_lengths[:per])
        if rel_bias is not None and gate is not None:
            part.update(gate=gate[:per])
        if _backend.select("attention", "forward", q.device.type, part, backend) == "triton":
            outs = [_attend(q[i:i + per], k[i:i + per], v[i:i + per], mask, rope,
                            None if key_lengths is None else key_lengths[i:i + per], q_offset,
                            k_offset, scale, "triton", True, rel_bias,
                            None if gate is None else gate[i:i + per], rel_offset)
                    for i in range(0, q.shape[0], per)]
            out = torch.cat([o for o, _ in outs], 0)
            return (out, torch.cat([lse for _, lse in outs], 0)) if return_lse else out
    name = _backend.select("attention", "forward", q.device.type, args, backend)
    if key_lengths is not None and key_lengths.dtype != torch.int32:
        key_lengths = key_lengths.to(torch.int32)
    op_args = (q, k, v, inv_freq, key_lengths, rel_bias, gate, block, k_block, lo_off, hi_off,
               sink, 0 if rel_bias is None else rel_offset, q_offset, k_offset, scale,
               interleaved)
    if name == "triton" and eager_ok():
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                        or (rel_bias is not None and rel_bias.requires_grad)
                                        or (gate is not None and gate.requires_grad)):
            out, lse = _EagerTriton.apply(*op_args)
        elif _profiler._is_profiler_enabled:   # a profile still names the call
            with torch.profiler.record_function("pyencoder::interval_attention_triton"):
                out, lse = run_forward(_triton.forward, *op_args)
        else:   # no graph to record: the launcher itself (Function.apply costs ~8 us here)
            out, lse = run_forward(_triton.forward, *op_args)
    else:
        out, lse = call_op(name, _triton.forward_op, _interval_attention_op, *op_args)
    return (out, lse) if return_lse else out


def interval_attention(q, k, v, *, mask=None, rope=None, key_lengths=None, q_offset=0,
                       k_offset=0, scale=None, backend=None, return_lse=False, block=None,
                       lo_off=None, hi_off=None, rel_bias=None, gate=None, rel_offset=None):
    """The general op over any ``pyencoder.IntervalMask`` ``mask`` (see pyencoder/mask.py for the
    formula) but a frame-rate one (``cross_attention``). The loose ints ``block``, ``lo_off``,
    ``hi_off`` (all three, instead of ``mask``) are still accepted: they build
    ``IntervalMask(block, lo_off, hi_off)``.

    ``rel_bias`` (Hq, L) float: relative-position bias, column t for s - p = rel_offset + t
    (``rel_offset`` default: r_min of ``relative_offsets``; the columns must cover that range);
    ``gate`` (B, Hq, Nq) or None scales it per query (WavLM's gated bias). Both get gradients.
    With ``mask.sink``: a sink key whose offset lies outside the table reads the nearest edge
    column, rel_bias[h, clamp(s - p - rel_offset, 0, L - 1)] (the saturated bucket rule, module
    docstring); give a wider table for exact sink-key values.

    ``return_lse``: also each row's log-sum-exp of its scaled scores, (B, Hq, Nq) float32
    (float64 for float64 inputs; -inf for a row that sees no key); differentiable: a loss that
    uses it (merging partial attentions by their lse) costs a second backward pass. Under
    torch.compile a compiled region that returns lse runs that pass at every backward (its
    unused output gets a zero gradient there, not None): return ``lse.detach()`` from it when
    lse is only logged.

    Under autocast, as SDPA: q, k and v are cast to the autocast dtype (float64 kept), so is the
    output; the op then runs without autocast (rel_bias / gate enter as float32 as always)."""
    if autocasting(q):
        dev = q.device.type
        q, k, v = autocast_cast(torch.get_autocast_dtype(dev), q, k, v)
        with torch.autocast(dev, enabled=False):
            return interval_attention(q, k, v, mask=mask, rope=rope, key_lengths=key_lengths,
                                      q_offset=q_offset, k_offset=k_offset, scale=scale,
                                      backend=backend, return_lse=return_lse, block=block,
                                      lo_off=lo_off, hi_off=hi_off, rel_bias=rel_bias, gate=gate,
                                      rel_offset=rel_offset)
    mask = as_mask(mask, block, lo_off, hi_off)
    _validate(q, k, v, rope, key_lengths, q_offset, k_offset, scale)
    mask.params  # noqa: B018  (raises for a frame-rate mask, naming cross_attention)
    return _attend(q, k, v, mask, rope, key_lengths, q_offset, k_offset, scale, backend,
                   return_lse, rel_bias, gate, rel_offset)


def banded_attention(q, k, v, *, left, right, rope=None, key_lengths=None, q_offset=0,
                     k_offset=0, scale=None, backend=None, sink=0, rel_bias=None, gate=None,
                     rel_offset=None):
    """Attention where query at position p sees keys at positions [p - left, p + right].

    q (B, Hq, Nq, D), k and v (B, Hk, Nk, D); left=None means unbounded history. ``rope``: a
    pyencoder.Rope applied to q and k at absolute positions q_offset + i and k_offset + j.
    ``key_lengths`` (B,) int: keys j >= key_lengths[b] are padding. A query that sees no key
    outputs zeros. ``sink``: key positions < sink are visible to every query too (attention sinks;
    pyencoder.IntervalMask). ``rel_bias`` / ``gate`` / ``rel_offset``: relative-position bias (see
    interval_attention). Returns (B, Hq, Nq, D) in q's dtype."""
    return interval_attention(q, k, v, mask=IntervalMask.band(left, right, sink=sink), rope=rope,
                              key_lengths=key_lengths, q_offset=q_offset, k_offset=k_offset,
                              scale=scale, backend=backend, rel_bias=rel_bias, gate=gate,
                              rel_offset=rel_offset)


def chunked_attention(q, k, v, *, chunk_size, left_chunks, lookahead=0, rope=None,
                      key_lengths=None, q_offset=0, k_offset=0, scale=None, backend=None, sink=0,
                      rel_bias=None, gate=None, rel_offset=None):
    """Chunked attention: a query in chunk c = p // chunk_size sees keys from the start of chunk
    c - left_chunks (None: from the beginning) to the end of chunk c plus ``lookahead`` frames
    (and the ``sink`` first key positions). ``rel_bias`` / ``gate`` / ``rel_offset``:
    relative-position bias (see interval_attention)."""
    mask = IntervalMask.chunked(chunk_size, left_chunks, lookahead, sink=sink)
    return interval_attention(q, k, v, mask=mask, rope=rope,
                              key_lengths=key_lengths, q_offset=q_offset, k_offset=k_offset,
                              scale=scale, backend=backend, rel_bias=rel_bias, gate=gate,
                              rel_offset=rel_offset)


def cross_attention(q, k, v, *, mask, rope=None, key_lengths=None, q_offset=0, k_offset=0,
                    scale=None, backend=None, return_lse=False):
    """Interval attention from one stream's queries to another stream's keys and values, at their
    own rates: ``mask`` any ``pyencoder.IntervalMask``, typically ``IntervalMask.frames(q_frame,
    k_frame, left, right)`` (query frame f = p // q_frame sees key frames [f - left, f + right])
    or ``IntervalMask.frame_chunked(...)``. q (B, Hq, Nq, D), k and v (B, Hk, Nk, D) with Nq and
    Nk independent; positions p = q_offset + i and s = k_offset + j are each in their own side's
    units, and ``rope`` (optional) rotates q and k at those positions. ``key_lengths`` (B,) as in
    ``interval_attention``. A mask with k_block == block runs exactly ``interval_attention``; a
    frame mask runs the same op pair with its own k_block (reference, triton: the same kernels
    with the constexpr K_BLOCK). Backend choice as everywhere (``backend=``, ``use_backend``, env,
    auto)."""
    if not isinstance(mask, IntervalMask):
        raise TypeError(f"mask must be a pyencoder.IntervalMask; got {type(mask).__name__} "
                        f"{mask!r}")
    if not mask.is_frame:
        return interval_attention(q, k, v, mask=mask, rope=rope, key_lengths=key_lengths,
                                  q_offset=q_offset, k_offset=k_offset, scale=scale,
                                  backend=backend, return_lse=return_lse)
    if autocasting(q):          # as interval_attention
        dev = q.device.type
        q, k, v = autocast_cast(torch.get_autocast_dtype(dev), q, k, v)
        with torch.autocast(dev, enabled=False):
            return cross_attention(q, k, v, mask=mask, rope=rope, key_lengths=key_lengths,
                                   q_offset=q_offset, k_offset=k_offset, scale=scale,
                                   backend=backend, return_lse=return_lse)
    _validate(q, k, v, rope, key_lengths, q_offset, k_offset, scale)
    return _attend(q, k, v, mask, rope, key_lengths, q_offset, k_offset, scale, backend,
                   return_lse)
