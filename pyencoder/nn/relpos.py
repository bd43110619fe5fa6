"""WavLM self-attention: interval attention with WavLM's gated relative position bias, offline and
streaming, without transformers.

For query i at absolute position p and key j at absolute position s, head h:

    score = scale * <rot(q_i, p), rot(k_j, s)> + gate[b, h, i] * table[bucket(s - p), h]
    gate  = a * (b * gru_rel_pos_const[h] - 1) + 2,  (a, b) = sigmoid(sum4(gru_rel_pos_linear(x_i,h)))

``table`` is the (num_buckets, H) weight of ``rel_attn_embed``; ``bucket`` is WavLM's T5-style
log bucketing (``relative_position_bucket``, the same float32 arithmetic as transformers'
``WavLMAttention._relative_positions_bucket``); x_i is the attention input of frame i split into
heads. ``gated=False`` uses gate = 1 (a plain T5 relative bias); ``rot`` is optional RoPE.
Visibility is the interval mask of pyencoder.ops.attention (band or chunked, key_lengths); a row
with no visible key outputs 0.

Relative-bias table shared across layers: in WavLM only layer 0 owns ``rel_attn_embed``; the other
layers reuse its bias (transformers passes the dense ``position_bias`` along). The bias of a
banded/streaming window only depends on (s - p) per head, so every layer recomputes the entries it
needs from the shared table. A later layer is built with ``has_relative_bias=False,
rel_attn_embed=<layer 0's nn.Embedding>``: the embedding is referenced, not registered as a
submodule, so each layer's state_dict keys are exactly transformers' WavLMAttention keys (q_proj,
k_proj, v_proj, out_proj, gru_rel_pos_const, gru_rel_pos_linear, and rel_attn_embed in layer 0
only), gradients of every layer reach the one table, and ``copy.deepcopy`` / ``.to()`` of the whole
model keep the reference pointing at (the copy of) layer 0's embedding.

Algorithm. Offline (``biased_interval_attention``): the bucket table is read once per call at
every relative offset the call can see (``relative_bias_columns``: a dense (H, L) vector, L about
the window width) and handed with the gate to pyencoder.ops.interval_attention's fused bias
(``rel_bias=``, ``gate=``): the Triton kernels on a GPU, the blocked reference (the fast CPU path)
on a CPU, forward and backward, with gradients for q, k, v, the table (through the gather) and
the gate. With sink keys (a ``mask`` with ``sink``; fused path only) the table is
``sink_bias_columns``: the op clamps a key outside the table to its edge column (the saturated
bucket rule), and the columns are chosen so that the clamp gives the bucket of every visible
offset exactly. Attention-probability dropout (training) keeps the plain-torch tile loop of this
module (blocked over query tiles, a tile reads only keys in [lo(first row), hi(last row)]: O(N * W);
autograd differentiates the tiles). Streaming (``init_state`` / ``step`` / ``flush``, the protocol of
pyencoder.nn.BandedSelfAttention): new keys are rotated once at their absolute position and
written to a ring buffer (capacity lo_off + hi_off + max_chunk; unbounded history grows up to
``max_context``); a query and its gate wait un-rotated until their last visible key has arrived,
then attend over the ring with the bias of (ring position - query position). Per-slot positions
and ragged ``lengths`` as in pyencoder.nn.attention.

With a bounded left context the decode is pyencoder.ops.decode_attention with its relative bias
(``rel_bias`` = the table read at the window's offsets [-(lo_off + block - 1), hi_off], bucket
indices built once per module and device, ``gate`` = the queued gates): the Triton decode kernel
on CUDA, the reference elsewhere. ``step_fixed`` (the CUDA-graph step of
pyencoder.nn.BandedSelfAttention, same preconditions) queues the gates beside the queries on the
device and runs that decode, so a WavLM stack streams under CUDA graphs; the general ``step`` runs
as ``step_fixed`` by itself in the steady state. Unbounded left context (left=None) keeps the
plain-torch ring path (the offsets a query sees grow with the stream) and has no ``step_fixed``.

Sink keys (``sink=S``: positions < S seen by every query, IntervalMask sink keys): offline on the
fused bias (``sink_bias_columns``); streaming keeps them resident and the decode op reads them
with the clamped bias rule, the window's columns extended once per module and device down to the
offset where the bucket saturates (a sink key's offset s - p falls without bound as the stream
grows; every offset below the first column reads it, its exact bucket), and up to S - 1 (a sink
key ahead of an early query). ``fused_bias=False`` and attention dropout have no sink keys and
refuse them by name.

Limits: attention-probability dropout only
offline (``biased_interval_attention(dropout_p=...)``, used by pyencoder.hf in training mode).
Half inputs compute in float32. Non-finite q, k, v or gate values poison exactly the rows that see
them (NaN rows, pyencoder.reference.attention's rule, offline and streamed); the fused path's
backward follows the op's rule (NaN dq / dgate for those rows, NaN dk / dv for the keys they see),
the dropout path gives those rows zero (not NaN) gradients.
"""
import dataclasses
import math

import torch
from torch import nn

from .._checks import (check_bool, check_module_input, clamp_window, passed, passed_key,
                       remember_passed, value_checks_enabled)
from .._fifo import put
from ..mask import IntervalMask
from ..ops.attention import interval_attention, relative_offsets
from ..ops.decode_attention import decode_attention, window_offsets
from ..rope import apply_rope
from ..reference.attention import (all_finite, finite_or_zero, nonfinite_rows, poisoned_rows,
                                   visible_key_ranges)
from ..reference.decode_attention import nonfinite_guard, ring_positions
from .attention import AttentionState, IntervalSelfAttention, SinkAttentionState

__all__ = ["WavLMSelfAttention", "RelPosAttentionState", "relative_position_bucket",
           "relative_bias_gate", "relative_bias_columns", "sink_bias_columns",
           "biased_interval_attention"]

_NEG_INF = float("-inf")
_UNBOUNDED = 1 << 40


def check_bucket_args(num_buckets, max_distance, names=("num_buckets", "max_distance")):
    """WavLM's bucket arguments: num_buckets an int >= 4, max_distance an int > num_buckets // 4
    (the exact buckets end at num_buckets // 4, the logarithmic ones run from there up to
    max_distance; at or below it the formula divides by log(1) or leaves the table, and
    transformers' own WavLM indexes outside its table too). ``names``: how the caller calls them
    (e.g. the config fields)."""
    nb, md = names
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or num_buckets < 4:
        raise ValueError(f"{nb} must be an int >= 4 (WavLM's relative-position buckets); got "
                         f"{num_buckets!r}")
    if isinstance(max_distance, bool) or not isinstance(max_distance, int) or \
            max_distance <= num_buckets // 4:
        raise ValueError(f"{md} must be an int > {nb} // 4 = {num_buckets // 4} (the exact "
                         f"buckets end there, the logarithmic ones run from there to {md}; "
                         f"at or below it the bucket index leaves the ({num_buckets}, H) table, "
                         f"in transformers' WavLM too); got {max_distance!r}")


def relative_position_bucket(rel, num_buckets=320, max_distance=800):
    """WavLM's bucket index (int64, same shape) of relative positions ``rel`` = key - query:
    half the buckets for rel > 0; |rel| < num_buckets // 4 exact, then logarithmic up to
    ``max_distance``, clamped. float32 logarithm, as transformers computes it."""
    half = num_buckets // 2
    max_exact = half // 2
    out = (rel > 0).to(torch.long) * half
    a = torch.abs(rel)
    is_small = a < max_exact
    large = torch.log(a.float() / max_exact)
    large = large / math.log(max_distance / max_exact)
    large = large * (half - max_exact)
    large = (max_exact + large).to(torch.long)
    large = torch.clamp(large, max=half - 1)
    return out + torch.where(is_small, a, large)


def relative_bias_gate(x, gru_rel_pos_linear, gru_rel_pos_const, num_heads):
    """WavLM's per-query gate (B, H, N) for attention inputs x (B, N, E)."""
    B, N, E = x.shape
    g = x.reshape(B, N, num_heads, E // num_heads).permute(0, 2, 1, 3)   # (-1: ambiguous at N=0)
    proj = gru_rel_pos_linear(g)
    proj = proj.view(g.shape[:-1] + (2, 4)).sum(-1)
    gate_a, gate_b = torch.sigmoid(proj).chunk(2, dim=-1)
    gate = gate_a * (gate_b * gru_rel_pos_const - 1.0) + 2.0
    return gate.squeeze(-1)


def relative_bias_columns(table, bucket_fn, nq, nk, *, block, lo_off, hi_off, q_offset=0,
                          k_offset=0):
    """(rel_bias (H, L), rel_offset): the bucket table (num_buckets, H) read at every relative
    offset s - p a call of interval attention can see (pyencoder.ops.attention.relative_offsets),
    the dense per-head vector the fused kernels take. Differentiable in ``table`` (a gather)."""
    key = _columns_key(table, bucket_fn, (nq, nk, block, lo_off, hi_off, q_offset, k_offset))
    hit = _COLUMNS.get(key) if key is not None else None
    if hit is not None and hit[0] is table and hit[1]._version == hit[2]:
        _vouch_finite(table, hit[1])
        return hit[1], hit[3]
    ints = (nq, nk, block, lo_off, hi_off, q_offset, k_offset)

    def build():
        r_min, r_max = relative_offsets(nq, nk, block=block, lo_off=lo_off, hi_off=hi_off,
                                        q_offset=q_offset, k_offset=k_offset)
        return bucket_fn(torch.arange(r_min, max(r_min, r_max) + 1, device=table.device)), r_min
    idx, r_min = _bucket_index("band", bucket_fn, table.device, ints, build)
    cols = table[idx].t()
    if key is not None:
        put(_COLUMNS, key, (table, cols, cols._version, r_min), _COLUMNS_MAX)
    _vouch_finite(table, cols)
    return cols, r_min


def _vouch_finite(table, cols):
    """Columns gathered from a finite table are finite: when ``table`` is (read once per version,
    pyencoder._checks.passed), ``cols`` is remembered as having passed the op's rel_bias
    finiteness check, so the op does not read it (a host sync per layer on a GPU, in training
    too, where the columns are new every call). A non-finite table vouches for nothing: the op
    checks the columns themselves, as before."""
    if not value_checks_enabled() or not table.numel() or table.is_meta:
        return
    key = passed_key("finite", table)
    if key is None:
        return
    if not passed(key, table):
        if not bool(torch.isfinite(table).all()):
            return
        remember_passed(key, table)
    remember_passed(passed_key("finite", cols), cols)


# relative_bias_columns of recent calls that record no graph for the table (no grad needed, or a
# frozen table): (table id, version, data pointer, bucket_fn, call ints) -> (table, columns, their
# version, r_min). A model's layers share one table (WavLM: layer 0's), so inference builds the
# columns (an arange, the bucket function's ~10 small ops and a gather) once per call shape instead
# of once per layer, and the op's finiteness check of rel_bias (a host sync on a GPU) runs once
# (pyencoder._checks.passed). An in-place edit of the table or of the returned columns misses.
# ``bucket_fn`` is keyed by equality (a bound method: its object and function) and assumed to be
# a pure function of its argument, as WavLM's bucket is; not under torch.compile or CUDA-graph
# capture (a capture must own the tensors it allocates).
_COLUMNS = {}
_COLUMNS_MAX = 16


# The bucket indices a call's columns gather, and their first offset: (kind, bucket_fn, device,
# call ints) -> (index tensor, offset). They depend on the bucket function and the call's ints
# only, not on the table: a model's layers (and every training step of one shape) share them, so
# a call with a table that records a graph still skips the arange, the bucket function's small
# ops and, for sinks, the host synchronisation that finds the table's ends. The index tensor is
# never handed out (the columns are a gather from it). Not under torch.compile or CUDA-graph
# capture; ``bucket_fn`` keyed by equality and assumed pure, as for _COLUMNS.
_INDEX = {}
_INDEX_MAX = 32


def _may_memo(device):
    """Whether tensors made now may be kept for later calls: not under torch.compile, not in a
    CUDA-graph capture (a capture owns what it allocates), not under inference_mode (inference
    tensors have no version counter, and a later call under autograd could not save them)."""
    return not (torch.compiler.is_compiling() or torch.is_inference_mode_enabled()
                or _capturing(device))


def _capturing(device):
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _bucket_index(kind, bucket_fn, device, ints, build):
    # a capture must not read a kept tensor either: evicted later, its memory would be freed
    # under the graph
    if torch.compiler.is_compiling() or _capturing(device):
        return build()
    key = (kind, bucket_fn, device, ints)
    try:
        hit = _INDEX.get(key)
    except TypeError:       # an unhashable bucket function
        return build()
    if hit is None:
        hit = build()
        if _may_memo(device):
            put(_INDEX, key, hit, _INDEX_MAX)
    return hit


def _columns_key(table, bucket_fn, ints):
    if type(table) is not torch.Tensor or table.is_inference() or not _may_memo(table.device) \
            or torch._C._functorch.is_functorch_wrapped_tensor(table):   # (vmap: no storage)
        return None
    if table.requires_grad and torch.is_grad_enabled():
        return None
    key = (id(table), table._version, table.data_ptr(), bucket_fn, ints)
    try:
        hash(key)
    except TypeError:       # an unhashable bucket function
        return None
    return key


def _leading_run(x):
    """Length (0-dim int64 tensor) of the run of x's leading entries equal to x[0] (x not
    empty)."""
    ne = x != x[0]
    return torch.where(ne.any(), ne.to(torch.int64).argmax(), x.numel())


def sink_bias_columns(table, bucket_fn, nq, nk, *, block, lo_off, hi_off, sink, q_offset=0,
                      k_offset=0):
    """(rel_bias (H, L), rel_offset) for a call with ``sink`` keys: the cheapest table whose
    saturated-bucket clamp (pyencoder.ops.attention: a visible key outside the table reads the
    edge column) gives ``bucket_fn`` exactly at every visible offset.

    The visible offsets s - p lie in [r_lo, r_hi]: the band's [r_min, r_max]
    (relative_offsets(), which the table must cover; none when the band sees no key) and the sink
    keys' [k_offset - p_last, sink_end - 1 - p_first]. The bucket indices are computed once
    over [r_lo, r_hi] (O(N) ints, on the table's device; one host synchronisation for the two
    ends below on a GPU; both once per bucket function and call shape, _bucket_index). The
    table starts at c_lo, the largest offset <= r_min such that bucket_fn is constant on
    [r_lo, c_lo] (every offset below c_lo then reads column 0 = bucket_fn(c_lo), which is its
    own bucket), and ends at c_hi, the smallest offset >= r_max
    with bucket_fn constant on [c_hi, r_hi] (no band key visible: the same from both ends of the
    sink offsets, at least one column). For WavLM's bucket (saturated at |r| >= max_distance)
    the table reaches at most max_distance on either side, or covers the whole range when that
    is shorter. Shrinking it by one column at an end that is not the band's would make some
    visible offset read a wrong bucket (the cheapest table of this kind for a contiguous range
    of visible offsets: tests/test_attention_sink_bias.py)."""
    r_min, r_max = relative_offsets(nq, nk, block=block, lo_off=lo_off, hi_off=hi_off,
                                    q_offset=q_offset, k_offset=k_offset)
    sink_end = min(sink, k_offset + nk)           # positions past the last key hold no key
    if sink_end <= k_offset or nq == 0:
        return relative_bias_columns(table, bucket_fn, nq, nk, block=block, lo_off=lo_off,
                                     hi_off=hi_off, q_offset=q_offset, k_offset=k_offset)
    def build():
        s_lo = k_offset - (q_offset + nq - 1)
        s_hi = sink_end - 1 - q_offset
        band = r_min <= r_max
        # r_lo = min(r_min, s_lo) = s_lo: the band's r_min is k_offset - p_last or above (written
        # so, and torch.sym_max: an exported length stays symbolic, no guard on which wins)
        r_lo, r_hi = s_lo, (torch.sym_max(r_max, s_hi) if band else s_hi)
        idx = bucket_fn(torch.arange(r_lo, r_hi + 1, device=table.device))
        n = idx.numel()
        # offsets below the band / above it (no band key visible: all of them, one column kept)
        n_lo, n_hi = (r_min - r_lo, r_hi - r_max) if band else (n - 1, n - 1)
        if torch.compiler.is_compiling() or idx.is_meta:
            # traced (torch.compile, export) or shapes only (meta): no host read of the bucket
            # values (the trimmed ends would be data-dependent sizes); the whole range's
            # columns, every visible offset reading its own bucket: the same values, a wider
            # table
            return idx, r_lo
        # a, b: the columns dropped at either end (constant runs of the bucket, the band kept)
        a, b = (torch.stack([_leading_run(idx[:n_lo + 1]),
                             _leading_run(idx.flip(0)[:n_hi + 1])]) - 1).tolist()
        b = min(b, n - 1 - a)                     # a constant range keeps one column
        return idx[a:idx.numel() - b], r_lo + a
    cols, r0 = _bucket_index("sink", bucket_fn, table.device,
                             (nq, nk, block, lo_off, hi_off, sink, q_offset, k_offset), build)
    return table[cols].t(), r0


def _tile_rows(block, lo_off, hi_off):
    if lo_off < 0:
        return 128
    return int(min(256, max(32, (lo_off + hi_off + block) // 2)))


def _keep_scale(shape, p, generator, dtype, device):
    if p >= 1:
        return torch.zeros(shape, dtype=dtype, device=device)
    noise = torch.empty(shape, dtype=dtype, device=device).bernoulli_(1.0 - p, generator=generator)
    return noise.div_(1.0 - p)


def biased_interval_attention(q, k, v, gate, table, bucket_fn, *, mask=None, block=1, lo_off=-1,
                              hi_off=_UNBOUNDED, rope=None, key_lengths=None, scale=None,
                              q_offset=0, k_offset=0, dropout_p=0.0, generator=None,
                              fused=True):
    """Interval attention with a gated relative bias (module docstring), blocked over query tiles.

    q (B, H, Nq, D), k and v (B, H, Nk, D), gate (B, H, Nq) or None (ungated), table
    (num_buckets, H); ``bucket_fn`` maps int64 relative positions (key - query) to bucket indices.
    Mask: ``mask``, a pyencoder.IntervalMask, or its loose ints block, lo_off (< 0: unbounded),
    hi_off (the defaults give full attention); ``rope`` a pyencoder.Rope or None; key_lengths (B,)
    or None; integer absolute offsets of the first query / key. Without dropout the call is
    pyencoder.ops.interval_attention with the fused bias (kernels on a GPU). ``dropout_p`` > 0:
    dropout on the probabilities as in
    pyencoder.ops.interval_attention_dropout (keep ~ Bernoulli(1 - p) drawn per tile from
    ``generator``, scaled by 1 / (1 - p)), on this module's plain-torch tiles. ``fused=False``
    runs those tiles without dropout too (the path before the fused bias; benchmarks compare the
    two). Returns (B, H, Nq, D) in q's dtype.
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    sink = 0
    if mask is not None:
        sink = mask.sink
        block, lo_off, hi_off = mask.params
    lo_off, hi_off = (-1 if lo_off < 0 else clamp_window(lo_off)), clamp_window(hi_off)
    if sink and (dropout_p or not fused):
        raise NotImplementedError(f"biased_interval_attention: sink keys (mask.sink={sink}) run "
                                  f"on the fused bias only; got dropout_p={dropout_p}, "
                                  f"fused={fused} (expected dropout_p=0 and fused=True)")
    if fused and not dropout_p:
        if sink:
            rel_bias, r0 = sink_bias_columns(table, bucket_fn, Nq, Nk, block=block,
                                             lo_off=lo_off, hi_off=hi_off, sink=sink,
                                             q_offset=q_offset, k_offset=k_offset)
        else:
            rel_bias, r0 = relative_bias_columns(table, bucket_fn, Nq, Nk, block=block,
                                                 lo_off=lo_off, hi_off=hi_off,
                                                 q_offset=q_offset, k_offset=k_offset)
        return interval_attention(q, k, v, mask=IntervalMask(block, lo_off, hi_off, sink=sink),
                                  rope=rope, key_lengths=key_lengths, q_offset=q_offset,
                                  k_offset=k_offset, scale=scale, rel_bias=rel_bias, gate=gate,
                                  rel_offset=r0)
    if not all_finite(q, k, v, gate):
        ranges = visible_key_ranges(Nq, B, key_lengths, Nk, IntervalMask(block, lo_off, hi_off),
                                    q_offset, k_offset, q.device)
        qbad = nonfinite_rows(q)
        if gate is not None:
            qbad = qbad | ~torch.isfinite(gate)
        bad = poisoned_rows(qbad, nonfinite_rows(k) | nonfinite_rows(v), ranges, H)
        out = biased_interval_attention(
            finite_or_zero(q), finite_or_zero(k), finite_or_zero(v),
            None if gate is None else finite_or_zero(gate), table, bucket_fn, block=block,
            lo_off=lo_off, hi_off=hi_off, rope=rope, key_lengths=key_lengths, scale=scale,
            q_offset=q_offset, k_offset=k_offset, dropout_p=dropout_p, generator=generator,
            fused=fused)
        return out.masked_fill(bad[..., None], float("nan"))
    scale = D ** -0.5 if scale is None else scale
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    if rope is not None:
        inv = rope.inv_freq(dev)
        qc = apply_rope(qc, torch.arange(q_offset, q_offset + Nq, device=dev), inv, rope.interleaved)
        kc = apply_rope(kc, torch.arange(k_offset, k_offset + Nk, device=dev), inv, rope.interleaved)
    gc = None if gate is None else gate.to(cdt)
    tc = table.to(cdt)
    if key_lengths is not None:
        kl = key_lengths.to(device=dev, dtype=torch.int64)
        nk_eff = min(Nk, int(kl.max().item())) if kl.numel() else 0
    else:
        kl, nk_eff = None, Nk
    tq = _tile_rows(block, lo_off, hi_off)
    outs = []
    for i0 in range(0, Nq, tq):
        i1 = min(Nq, i0 + tq)
        p = torch.arange(q_offset + i0, q_offset + i1, device=dev)
        first = ((q_offset + i0) // block) * block
        last = ((q_offset + i1 - 1) // block) * block
        j0 = max(0, first - lo_off - k_offset) if lo_off >= 0 else 0
        j1 = min(nk_eff, last + hi_off - k_offset + 1)
        if j1 <= j0:
            outs.append(qc.new_zeros(B, H, i1 - i0, vc.shape[-1]))
            continue
        s = torch.arange(k_offset + j0, k_offset + j1, device=dev)
        bias = tc[bucket_fn(s[None, :] - p[:, None])].permute(2, 0, 1)  # (H, tq, tk)
        sc = torch.matmul(qc[:, :, i0:i1], kc[:, :, j0:j1].transpose(-1, -2)) * scale
        sc = sc + (bias if gc is None else gc[:, :, i0:i1, None] * bias)
        base = torch.div(p, block, rounding_mode="floor") * block
        vis = s[None, :] <= (base + hi_off)[:, None]
        if lo_off >= 0:
            vis = vis & (s[None, :] >= (base - lo_off)[:, None])
        vis = vis[None, None]
        if kl is not None:
            vis = vis & (torch.arange(j0, j1, device=dev)[None, :] < kl[:, None])[:, None, None, :]
        sc = sc.masked_fill(~vis, _NEG_INF)
        m = sc.amax(-1, keepdim=True).detach()
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        pr = torch.exp(sc - m)
        l = pr.sum(-1, keepdim=True)
        nz = l > 0
        if dropout_p > 0:
            pr = pr * _keep_scale(pr.shape, dropout_p, generator, cdt, dev)
        o = torch.matmul(pr, vc[:, :, j0:j1]) / torch.where(nz, l, torch.ones_like(l))
        outs.append(torch.where(nz, o, torch.zeros_like(o)))
    out = torch.cat(outs, dim=2) if outs else qc.new_zeros(B, H, 0, vc.shape[-1])
    if torch.is_grad_enabled() and not out.requires_grad:
        # no tile saw a key: zeros that are still a function of the inputs (zero gradients, as
        # the fused op gives; a backward raised "element 0 of tensors does not require grad")
        for t in (qc, kc, vc, tc, gc):
            if t is not None and t.requires_grad:
                out = out + t.flatten()[:0].sum()
    return out.to(q.dtype)


@dataclasses.dataclass
class RelPosAttentionState(AttentionState):
    gate: torch.Tensor        # (B, H, qcap) gates of the pending queries, oldest first


@dataclasses.dataclass
class RelPosSinkAttentionState(SinkAttentionState):
    """RelPosAttentionState of a mask with sink keys (resident sink_k / sink_v)."""
    gate: torch.Tensor        # (B, H, qcap) gates of the pending queries, oldest first


class WavLMSelfAttention(IntervalSelfAttention):
    """WavLM attention (gated relative position bias) with an interval mask, offline and streaming.

    Mask: band (``left``, ``right``; frame p sees [p - left, p + right], left=None: all history)
    or, with ``chunk_size``, chunked (``left_chunks``, ``lookahead``). Parameters are transformers'
    WavLMAttention's (q_proj, k_proj, v_proj, out_proj, gru_rel_pos_const (1, H, 1, 1),
    gru_rel_pos_linear Linear(head_dim, 8), rel_attn_embed Embedding(num_buckets, H)), so its
    state_dict loads as is. ``has_relative_bias=False`` with ``rel_attn_embed=<layer 0's
    embedding>`` makes a later layer read layer 0's table (module docstring). ``gated=False``: no
    gate parameters, gate = 1. ``rope``: as in BandedSelfAttention (default False: WavLM's position
    information is the relative bias). Latency: ``self.mask.latency()`` frames, hop 1.
    ``fused_bias`` (attribute, default True): offline attention on the op's fused bias (kernels on
    a GPU) and the streaming decode on pyencoder.ops.decode_attention's bias; False runs relpos'
    plain-torch tiles offline and its plain-torch ring decode (the paths before; for comparisons).
    """

    fused_bias = True

    def __init__(self, embed_dim, num_heads, *, left=None, right=None, chunk_size=None,
                 left_chunks=None, lookahead=0, num_buckets=320, max_distance=800, gated=True,
                 has_relative_bias=True, rel_attn_embed=None, rope=False, bias=True,
                 max_context=65536, sink=0):
        if chunk_size is None:
            if right is None:
                raise ValueError("WavLMSelfAttention: give right (band mask) or chunk_size "
                                 "(chunked mask); got neither")
            if left_chunks is not None or lookahead:
                raise ValueError(f"left_chunks / lookahead are for the chunked mask (chunk_size); "
                                 f"got left_chunks={left_chunks!r}, lookahead={lookahead!r} "
                                 f"without chunk_size")
            mask = IntervalMask.band(left, right, sink=sink)
        else:
            if left is not None or right is not None:
                raise ValueError(f"left / right are for the band mask; with chunk_size give "
                                 f"left_chunks and lookahead (got left={left!r}, right={right!r})")
            mask = IntervalMask.chunked(chunk_size, left_chunks, lookahead, sink=sink)
        super().__init__(embed_dim, num_heads, mask, rope, bias, max_context)
        if sink:
            self._state_cls = RelPosSinkAttentionState
        check_bucket_args(num_buckets, max_distance)
        gated = check_bool("gated", gated)
        has_relative_bias = check_bool("has_relative_bias", has_relative_bias)
        self.left, self.right = left, right
        self.chunk_size, self.left_chunks, self.chunk_lookahead = chunk_size, left_chunks, lookahead
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.gated = gated
        H = num_heads
        if self.gated:
            self.gru_rel_pos_const = nn.Parameter(torch.ones(1, H, 1, 1))
            self.gru_rel_pos_linear = nn.Linear(self.head_dim, 8)
        if has_relative_bias:
            if rel_attn_embed is not None:
                raise ValueError("rel_attn_embed (a shared table) is for has_relative_bias=False; "
                                 "a module with has_relative_bias=True owns its own table")
            self.rel_attn_embed = nn.Embedding(num_buckets, H)
            self._shared_rel_embed = None
        else:
            if rel_attn_embed is not None and (
                    not isinstance(rel_attn_embed, nn.Embedding)
                    or tuple(rel_attn_embed.weight.shape) != (num_buckets, H)):
                raise ValueError(f"rel_attn_embed must be an nn.Embedding({num_buckets}, {H}); "
                                 f"got {rel_attn_embed!r}")
            self._shared_rel_embed = (rel_attn_embed,) if rel_attn_embed is not None else None

    # ---- bias ----------------------------------------------------------------------------------
    @property
    def has_relative_bias(self):
        return "rel_attn_embed" in self._modules

    def share_relative_bias(self, rel_attn_embed):
        """Read the bias table from ``rel_attn_embed`` (layer 0's nn.Embedding) from now on."""
        if self.has_relative_bias:
            raise ValueError("this module owns its relative-bias table (has_relative_bias=True)")
        if not isinstance(rel_attn_embed, nn.Embedding) or \
                tuple(rel_attn_embed.weight.shape) != (self.num_buckets, self.num_heads):
            raise ValueError(f"rel_attn_embed must be an nn.Embedding({self.num_buckets}, "
                             f"{self.num_heads}); got {rel_attn_embed!r}")
        self._shared_rel_embed = (rel_attn_embed,)

    def relative_bias_table(self):
        """(num_buckets, H) table: this module's own, or the shared one of layer 0."""
        if self.has_relative_bias:
            return self.rel_attn_embed.weight
        if self._shared_rel_embed is None:
            raise RuntimeError("WavLMSelfAttention: has_relative_bias=False and no shared table; "
                               "build it with rel_attn_embed=<layer 0's rel_attn_embed> or call "
                               "share_relative_bias()")
        return self._shared_rel_embed[0].weight

    def bucket(self, rel):
        return relative_position_bucket(rel, self.num_buckets, self.max_distance)

    def gate(self, x):
        """Per-query gate (B, H, N) for attention inputs x (B, N, E); None when ungated."""
        if not self.gated:
            return None
        return relative_bias_gate(x, self.gru_rel_pos_linear, self.gru_rel_pos_const,
                                  self.num_heads)

    def _check_sink_path(self):
        if self.mask.sink and not self.fused_bias:
            raise NotImplementedError(f"WavLMSelfAttention: sink keys (sink={self.mask.sink}) run "
                                      f"on the fused bias only (offline op and decode op); got "
                                      f"fused_bias={self.fused_bias} (expected True)")

    # ---- offline -------------------------------------------------------------------------------
    def forward(self, x, key_lengths=None):
        """x (B, T, E) -> (B, T, E). ``key_lengths`` (B,): frames >= key_lengths[b] are padding."""
        check_module_input(x, 2, self.embed_dim, f"(B, T, {self.embed_dim})", self.q_proj.weight)
        B, T, E = x.shape
        self._check_sink_path()
        q, k, v = self._heads(x, self.q_proj), self._heads(x, self.k_proj), self._heads(x, self.v_proj)
        o = biased_interval_attention(q, k, v, self.gate(x), self.relative_bias_table(),
                                      self.bucket, mask=self.mask, rope=self.rope,
                                      key_lengths=key_lengths, scale=self.scale,
                                      fused=self.fused_bias)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, E))

    # ---- streaming -----------------------------------------------------------------------------
    _state_cls = RelPosAttentionState

    def _extra_state(self, B, qcap, device, dtype):
        extra = super()._extra_state(B, qcap, device, dtype)
        extra["gate"] = torch.zeros(B, self.num_heads, qcap, device=device, dtype=dtype)
        return extra

    _queued = ("gate",)

    def _query_extras(self, x):
        g = self.gate(x)
        return {} if g is None else {"gate": g}

    def window_bias(self, device):
        """(rel_bias (H, L), rel_offset): the bucket table read at every relative offset s - p
        the streaming window can see (pyencoder.ops.decode_attention.window_offsets; needs a
        bounded left context). The bucket indices depend only on the mask and are built once per
        device (a plain attribute, not a buffer: state_dict keys stay transformers'); the gather
        from the table runs at each call (one device op, graph-capturable), so in-place edits of
        the table are seen."""
        r_min, r_max = window_offsets(*self.mask.params)
        if self.mask.sink:
            cache = self.__dict__.setdefault("_sink_window_buckets", {})
            entry = cache.get(device)
            if entry is None:
                entry = cache[device] = self._sink_columns(r_min, r_max, device)
            idx, r0 = entry
            return self.relative_bias_table()[idx].t(), r0
        cache = self.__dict__.setdefault("_window_buckets", {})
        idx = cache.get(device)
        if idx is None:
            idx = cache[device] = self.bucket(torch.arange(r_min, r_max + 1, device=device))
        return self.relative_bias_table()[idx].t(), r_min

    def _sink_columns(self, r_min, r_max, device):
        """(bucket indices, rel_offset) of the streaming columns with sink keys. A sink key
        (s < sink) seen by the query at p >= 0 has offset s - p in (-inf, sink - 1]: unbounded
        below as the stream grows. The decode op clamps an offset outside the columns to the edge
        column, so the columns run from c_lo, the largest offset <= r_min at and below which the
        bucket is constant (WavLM's bucket saturates at |r| >= about max_distance), to
        max(r_max, sink - 1). Built on the host once per module and device (no device read at
        step time); the saturation is checked far below c_lo."""
        r_hi = max(r_max, self.mask.sink - 1)
        r_lo = min(r_min, -(self.max_distance + 1))
        idx = self.bucket(torch.arange(r_lo, r_hi + 1))
        far = self.bucket(torch.tensor([r_lo - 1, -(1 << 40)]))
        if not bool((far == idx[0]).all()):
            raise RuntimeError(f"WavLMSelfAttention: the bucket is not saturated below offset "
                               f"{r_lo} (num_buckets={self.num_buckets}, max_distance="
                               f"{self.max_distance}); sink keys cannot stream exactly")
        n_lo = r_min - r_lo
        ne = (idx[:n_lo + 1] != idx[0]).nonzero()
        a = (int(ne[0]) if ne.numel() else n_lo + 1) - 1    # leading columns equal to column 0
        return idx[a:].to(device), r_lo + a

    def _decode(self, q, extras, state, q_pos, q_count, n_keys):
        """Pending queries q (B, H, M, D) with gates extras["gate"] (B, H, M) at positions q_pos
        (B, M) attend over the ring; rows >= q_count[b] output 0. Bounded left context: the
        decode attention op with the window's bias (the Triton decode kernel on CUDA; what
        ``step_fixed`` runs); unbounded, or ``fused_bias`` False: the plain-torch ring path
        below (no host synchronisation either)."""
        gate = extras["gate"] if self.gated else None
        self._check_sink_path()
        if self.lo_off >= 0 and self.fused_bias:
            rel_bias, r0 = self.window_bias(q.device)
            inv = None if self.rope is None else self.rope.inv_freq(q.device)
            sinks = dict(sink_k=state.sink_k, sink_v=state.sink_v) if self.mask.sink else {}
            return decode_attention(q, state.k, state.v, q_pos, q_count, n_keys, inv,
                                    False if self.rope is None else self.rope.interleaved,
                                    *self.mask.params, self.scale, backend=self.decode_backend,
                                    rel_bias=rel_bias, gate=gate, rel_offset=r0, **sinks)
        B, H, M, D = q.shape
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        qr = q.to(cdt)
        if self.rope is not None:
            qr = apply_rope(qr, q_pos, self.rope.inv_freq(q.device), self.rope.interleaved)
        kpos = ring_positions(n_keys, state.k.shape[2])                    # (B, cap)
        vis = ((kpos[:, None, :] >= self.mask.lo(q_pos)[:, :, None])
               & (kpos[:, None, :] <= self.mask.hi(q_pos)[:, :, None]))
        if self.mask.sink:
            # sink keys are seen by every query, also ahead of its band (unbounded history keeps
            # them in the ring; empty ring entries have negative positions)
            vis = vis | ((kpos >= 0) & (kpos < self.mask.sink))[:, None, :]
        rows = torch.arange(M, device=q.device)[None, :] < q_count[:, None]
        vis = (vis & rows[:, :, None])[:, None]                            # (B, 1, M, cap)
        bias = self.relative_bias_table().to(cdt)[self.bucket(kpos[:, None, :] - q_pos[:, :, None])]
        bias = bias.permute(0, 3, 1, 2)                                    # (B, H, M, cap)
        s = torch.matmul(qr, state.k.to(cdt).transpose(-1, -2)) * self.scale
        s = s + (bias if gate is None else gate.to(cdt)[..., None] * bias)
        s, vr = nonfinite_guard(s, state.v.to(cdt))
        s = s.masked_fill(~vis, _NEG_INF)
        mx = s.amax(-1, keepdim=True)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        p = torch.exp(s - mx)
        l = p.sum(-1, keepdim=True)
        nz = l != 0                                  # NaN (a poisoned row) stays NaN
        o = torch.matmul(p, vr) / torch.where(nz, l, torch.ones_like(l))
        return torch.where(nz, o, torch.zeros_like(o)).to(q.dtype)

    def extra_repr(self):
        mask = (f"left={self.left}, right={self.right}" if self.chunk_size is None else
                f"chunk_size={self.chunk_size}, left_chunks={self.left_chunks}, "
                f"lookahead={self.chunk_lookahead}")
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, {mask}, num_buckets="
                f"{self.num_buckets}, max_distance={self.max_distance}, gated={self.gated}, "
                f"has_relative_bias={self.has_relative_bias}, rope={self.rope}"
                + (f", sink={self.mask.sink}" if self.mask.sink else ""))
