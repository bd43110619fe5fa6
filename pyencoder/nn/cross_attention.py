"""Cross-attention between two streams at their own rates (issue 15 item 3), offline and streaming.

``FrameCrossAttention(embed_dim, num_heads, mask=IntervalMask.frames(q_frame, k_frame, left,
right), kv_dim=None, rope=False)``: queries come from one stream (B, Tq, E), keys and values from
another (B, Tk, kv_dim), e.g. 25 fps video latents attending to 50 Hz audio features
(q_frame=1, k_frame=2). Query position p (in query units) sees key positions s (in key units)
with mask.lo(p) <= s <= mask.hi(p); ``rope`` rotates q and k at their own positions. Offline
``forward(x_q, x_kv, key_lengths=None)`` is one ``pyencoder.ops.cross_attention`` call.

Streaming: ``state = m.init_state(B, device=..., dtype=...)``, ``y, state = m.step(x_q, x_kv,
state)`` where either chunk may be None or hold any number of frames (the two streams are chunked
independently), ``y, state = m.flush(state)`` at the end of both streams. The general step
advances all slots of a batch together (one position; a state whose slots stand apart is
refused); ``step_fixed`` (lockstep steps of whole frames, CUDA graphs) serves slots at different
positions whose mask pattern agrees, so ``pyencoder.streaming.admit`` / ``CudaGraphStep.admit``
start a new stream in one slot of a running batch (its first chunks as (x_q, x_kv) tuples, fed
as the batch's streams were: whole frames of both streams in lockstep from its start). Projected
queries wait (un-rotated) until every key they see has arrived: query
p is emitted once ``last_key(p) + 1`` keys have arrived (``mask.hi(p)``, or the last sink key
where that is later), or by ``flush``; the emitted queries attend over the buffered keys with
the same op as offline, at their absolute positions, so streamed output equals offline output up
to summation order. Keys no pending or future query can see (below ``mask.lo`` of the oldest
pending query) are dropped; with unbounded history (left=None) every key is kept, up to
``max_context`` keys, then ``step`` raises.

Sink keys (a mask with ``sink`` = S, query and key frames of one size): the keys at positions
< S stay resident in ``state.sink_k`` / ``sink_v`` (a copy made as they arrive) when the window
drops them. The emitted queries then attend over [the resident sink keys the window dropped,
the buffered keys] in one op call: where the two are apart (keys S .. k_start - 1 dropped), the
sink keys are placed just below the buffer, at positions k_start - S .. k_start - 1, under the
same interval with ``sink`` = k_start (so exactly they are visible to every query, as the sink
keys are offline), and RoPE rotates every key at its true position before the call.

Latency (the streaming protocol's terms, pyencoder.streaming.latency): on the query stream the
module is per-frame (``hop`` = 1, ``lookahead`` = 0: output p needs query p only); on the key
stream, ``latency()`` is the number of key positions a query frame waits for past the end of its
own key frame (the key frame at the same time, frames being the finest the mask's blocks share:
g = gcd(block, k_block), query frames of block / g positions line up with key frames of
k_block / g), worst case over a block's frames, i.e. ``mask.hi_off - k_block / g + 1``
(frames(q, k, left, right, extra) with q, k coprime: right * k + extra; a chunked mask's first
frame waits for its whole chunk); ``last_key(p)`` gives the exact last key position query p
needs.
"""
import dataclasses
import math

import torch
from torch import nn

from ..mask import IntervalMask
from .._checks import autocast_dtype, check_bool, check_module_input, is_int
from ..ops.attention import cross_attention
from ..rope import as_rope
from ..streaming.state import (StreamState, SteadyCheck, ends_stream, _stamp, _check_reset_mask,
                               check_init_args, check_state, fill_counter, inference_step, stamp)
from .linear import Linear

__all__ = ["FrameCrossAttention", "CrossAttentionState"]


@dataclasses.dataclass
class CrossAttentionState(StreamState):
    q: torch.Tensor            # (B, H, n_pending, D) projected, un-rotated queries, oldest first
    k: torch.Tensor            # (B, H, n_keys, D) projected, un-rotated keys from position k_start
    v: torch.Tensor            # (B, H, n_keys, D)
    q_pos: torch.Tensor        # (B,) int64 queries received so far
    k_pos: torch.Tensor        # (B,) int64 keys received so far
    out_lengths: torch.Tensor  # (B,) int64 frames emitted by the last step / flush
    sink_k: torch.Tensor       # (B, H, sink, D) projected, un-rotated keys of positions < sink
    sink_v: torch.Tensor       # (B, H, sink, D) (positions >= k_pos: not arrived yet, zeros)

    _growable = {"q": 2, "k": 2, "v": 2}
    _added_fields = ("sink_k", "sink_v")   # saved before sink keys streamed: none (sink = 0)

    def _may_lack(self):
        # only a stream without sink keys predates the fields (a mask with sinks did not stream
        # then): a sink stream's checkpoint without them would resume on zero keys
        return self._added_fields if self.sink_k.shape[2] == 0 else ()

    def reset(self, mask):
        """All slots at once (the general step gives them one position): back to a fresh stream,
        empty buffers (new tensors: a graph captured on this state must be captured again). A
        subset raises: make a state of its own for a stream that starts apart, or ``admit`` it
        into a slot of a batch that ``step_fixed`` advances."""
        mask = _check_reset_mask(mask, self.q_pos.shape[0]).to(self.q_pos.device)
        if not bool(mask.all()):
            raise ValueError(f"FrameCrossAttention's general step advances the slots together "
                             f"(one position for the batch): reset every slot at once, give a "
                             f"stream that starts apart a state of its own, or admit it into a "
                             f"slot of a batch that step_fixed advances (pyencoder.streaming."
                             f"admit); got mask={mask.tolist()}")
        B, H, _, D = self.q.shape
        self.q = self.q.new_zeros(B, H, 0, D)
        self.k, self.v = self.k.new_zeros(B, H, 0, D), self.v.new_zeros(B, H, 0, D)
        self.sink_k, self.sink_v = torch.zeros_like(self.sink_k), torch.zeros_like(self.sink_v)
        for t in (self.q_pos, self.k_pos, self.out_lengths):
            t.zero_()
        self.ended = False          # every slot restarts (a flushed state may stream again)
        return self

    def _invalid(self):
        # slots at different positions load (admitted streams: step_fixed serves them when their
        # mask patterns agree, which its check=True verifies); the general step refuses them
        if self.q_pos.numel() and self.q.shape[2] > int(self.q_pos.min()):
            return f"{self.q.shape[2]} pending queries exceed the {self.q_pos.tolist()} received"
        if self.k_pos.numel() and self.k.shape[2] > int(self.k_pos.min()):
            return f"{self.k.shape[2]} buffered keys exceed the {self.k_pos.tolist()} received"
        return None


class FrameCrossAttention(nn.Module):
    """Cross-attention from a query stream to a key/value stream under a frame-rate
    ``pyencoder.IntervalMask`` (module docstring). Parameters: q_proj (E -> E), k_proj and v_proj
    (kv_dim -> E), out_proj (E -> E)."""

    hop = 1
    lookahead = 0     # on the query stream: output p needs query p only (keys: latency())

    def __init__(self, embed_dim, num_heads, *, mask, kv_dim=None, rope=False, bias=True,
                 max_context=1 << 20):
        super().__init__()
        if not is_int(embed_dim) or not is_int(num_heads) or num_heads < 1 \
                or embed_dim < 1 or embed_dim % num_heads:
            raise ValueError(f"embed_dim must be a positive multiple of num_heads; got "
                             f"embed_dim={embed_dim!r}, num_heads={num_heads!r}")
        check_bool("bias", bias)
        if not isinstance(mask, IntervalMask):
            raise TypeError(f"mask must be a pyencoder.IntervalMask; got {type(mask).__name__} "
                            f"{mask!r}")
        kv_dim = embed_dim if kv_dim is None else kv_dim
        if isinstance(kv_dim, bool) or not isinstance(kv_dim, int) or kv_dim < 1:
            raise ValueError(f"kv_dim must be a positive int; got {kv_dim!r}")
        if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 1:
            raise ValueError(f"max_context must be a positive int; got {max_context!r}")
        self.embed_dim, self.num_heads, self.kv_dim = embed_dim, num_heads, kv_dim
        self.head_dim = embed_dim // num_heads
        self.mask = mask
        self.rope = as_rope(rope, self.head_dim)
        self.max_context = max_context
        self.q_proj = Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = Linear(kv_dim, embed_dim, bias=bias)
        self.v_proj = Linear(kv_dim, embed_dim, bias=bias)
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias)

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kv_dim={self.kv_dim}, "
                f"mask={self.mask!r}, rope={self.rope!r}")

    # ---- latency ------------------------------------------------------------------------------
    def latency(self):
        """Key positions a query frame waits for past the end of its own key frame, worst case
        (the first frame of a query block): mask.hi_off - k_frame + 1, where the frames are the
        finest the mask's blocks share: g = gcd(block, k_block), a query frame of block / g
        positions and a key frame of k_frame = k_block / g (``frames(q, k)``: q and k once
        reduced; ``frame_chunked``: its frames; a same-rate ``chunked`` mask: single positions,
        hi_off as the self-attention with that mask reports). It used to count a whole chunk as
        one frame (hi_off - k_block + 1): a chunked mask's first frames wait (chunk frames - 1)
        key frames longer than that said. With sink keys it is the same (as for self-attention):
        it leaves out the start-up wait of a stream's first queries for the last sink key
        (``last_key``)."""
        m = self.mask
        return m.hi_off - m.k_block // math.gcd(m.block, m.k_block) + 1

    def last_key(self, p):
        """The last key position query position p waits for (p an int or an integer tensor):
        mask.hi(p), or the last sink key where that is later."""
        hi = self.mask.hi(p)
        if not self.mask.sink:
            return hi
        if isinstance(hi, torch.Tensor):
            return hi.clamp(min=self.mask.sink - 1)
        return max(hi, self.mask.sink - 1)

    # ---- offline --------------------------------------------------------------------------------
    def _heads(self, x, proj):
        B, T, _ = x.shape
        return proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def _attend(self, q, k, v, q_offset, k_offset, key_lengths=None):
        B, _, T, _ = q.shape
        o = cross_attention(q, k, v, mask=self.mask, rope=self.rope, key_lengths=key_lengths,
                            q_offset=q_offset, k_offset=k_offset)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, self.embed_dim))

    def _attend_sinks(self, q, k, v, sink_k, sink_v, p0, k_start, q_positions, k_positions):
        """The emitted queries q (positions ``q_positions``, the first at p0 for the mask) over
        [the resident sink keys the window dropped, the buffered keys k from k_start]: one op
        call, the sink keys placed just below the buffer and visible to every query (module
        docstring); RoPE rotates at the true positions (``q_positions`` / ``k_positions``: (N,)
        or (B, N)) before the call."""
        S = self.mask.sink
        ns = min(S, k_start)
        ks, vs = sink_k[:, :, :ns], sink_v[:, :, :ns]
        if self.rope is not None:
            sp = torch.arange(ns, device=k.device)
            if k_positions.dim() == 2:
                sp = sp.expand(k.shape[0], ns)
            q = self.rope.rotate(q, q_positions)
            ks, k = self.rope.rotate(ks, sp), self.rope.rotate(k, k_positions)
        B, _, T, _ = q.shape
        o = cross_attention(q, torch.cat([ks, k], 2), torch.cat([vs, v], 2),
                            mask=self.mask.with_sink(max(S, k_start)), rope=None, q_offset=p0,
                            k_offset=k_start - ns)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, self.embed_dim))

    def forward(self, x_q, x_kv, key_lengths=None):
        """x_q (B, Tq, E), x_kv (B, Tk, kv_dim) -> (B, Tq, E). ``key_lengths`` (B,): key frames
        >= key_lengths[b] are padding."""
        check_module_input(x_q, 2, self.embed_dim, f"(B, Tq, {self.embed_dim})",
                           self.q_proj.weight, name="x_q")
        check_module_input(x_kv, 2, self.kv_dim, f"(B, Tk, {self.kv_dim})", self.k_proj.weight,
                           name="x_kv")
        if x_kv.shape[0] != x_q.shape[0]:
            raise ValueError(f"x_q and x_kv must share the batch size; got x_q "
                             f"{tuple(x_q.shape)}, x_kv {tuple(x_kv.shape)}")
        return self._attend(self._heads(x_q, self.q_proj), self._heads(x_kv, self.k_proj),
                            self._heads(x_kv, self.v_proj), 0, 0, key_lengths)

    # ---- streaming ------------------------------------------------------------------------------
    def init_state(self, batch_size, *, device=None, dtype=None):
        check_init_args(batch_size, dtype, device, self)
        dev = self.q_proj.weight.device if device is None else device
        dt = self.q_proj.weight.dtype if dtype is None else dtype
        empty = torch.zeros(batch_size, self.num_heads, 0, self.head_dim, device=dev, dtype=dt)
        sinks = torch.zeros(batch_size, self.num_heads, self.mask.sink, self.head_dim,
                            device=dev, dtype=dt)
        zeros = torch.zeros(batch_size, dtype=torch.int64, device=dev)
        return stamp(self, CrossAttentionState(q=empty, k=empty.clone(), v=empty.clone(),
                                               q_pos=zeros, k_pos=zeros.clone(),
                                               out_lengths=zeros.clone(), sink_k=sinks,
                                               sink_v=sinks.clone()))

    def _check_chunk(self, name, x, dim, B):
        if x is None:
            return None
        check_module_input(x, 2, dim, f"(B, T, {dim})", self.q_proj.weight, name=name)
        if x.shape[0] != B:
            raise ValueError(f"{name} must have the state's batch size {B}; got {tuple(x.shape)}")
        return x

    def _emittable(self, p0, n_pending, n_keys, final):
        """How many of the pending queries p0, p0 + 1, ... have all their keys."""
        if final:
            return n_pending
        m = self.mask
        if n_keys < m.sink:                 # every query waits for the last sink key
            return 0
        need = n_keys - m.hi_off            # hi(p) < n_keys  <=>  (p // block) * k_block < need
        if need <= 0:
            return 0
        first_blocked = -(-need // m.k_block) * m.block
        return max(0, min(n_pending, first_blocked - p0))

    def step(self, x_q, x_kv, state):
        """Append query frames x_q (B, n, E) and key/value frames x_kv (B, m, kv_dim) (either may
        be None); returns (y (B, e, E), state) with the e queries whose keys have all arrived."""
        return self._advance(x_q, x_kv, state, final=False)

    @ends_stream
    def flush(self, state):
        """End of both streams: every pending query attends over the keys there are."""
        return self._advance(None, None, state, final=True)

    def _advance(self, x_q, x_kv, state, final):
        check_state(self, state, CrossAttentionState)
        B = state.q_pos.shape[0]
        x_q = self._check_chunk("x_q", x_q, self.embed_dim, B)
        x_kv = self._check_chunk("x_kv", x_kv, self.kv_dim, B)
        q, k, v = state.q, state.k, state.v
        sink_k, sink_v = state.sink_k, state.sink_v
        # one host read; slots at different positions (a state edited or copied per slot) would
        # all be stepped at slot 0's: refused
        q_pos, k_pos = _shared_positions(state)
        if x_q is not None and x_q.shape[1]:
            q = torch.cat([q, self._heads(x_q, self.q_proj).to(q.dtype)], 2)
            q_pos += x_q.shape[1]
        if x_kv is not None and x_kv.shape[1]:
            kh = self._heads(x_kv, self.k_proj).to(k.dtype)
            vh = self._heads(x_kv, self.v_proj).to(v.dtype)
            k, v = torch.cat([k, kh], 2), torch.cat([v, vh], 2)
            n_sink = min(self.mask.sink, k_pos + x_kv.shape[1]) - k_pos
            if n_sink > 0:      # sink keys arriving: a resident copy (new tensors: the old
                # state stays what it was)
                sink_k, sink_v = (torch.cat([s[:, :, :k_pos], h[:, :, :n_sink],
                                             s[:, :, k_pos + n_sink:]], 2)
                                  for s, h in ((sink_k, kh), (sink_v, vh)))
            k_pos += x_kv.shape[1]
        if k.shape[2] > self.max_context:
            w = self.mask.width()
            if w is None:
                why = "unbounded history keeps every key; raise max_context or bound the mask's left"
            elif w > self.max_context:
                why = f"one query sees up to {w} keys under this mask; raise max_context"
            else:
                why = (f"the key stream ran ahead of the query stream: {k_pos} keys arrived for "
                       f"{q_pos} queries, and every key from mask.lo of the oldest pending query "
                       f"on is kept; feed the queries, or raise max_context")
            raise RuntimeError(f"FrameCrossAttention: {k.shape[2]} buffered keys exceed "
                               f"max_context={self.max_context} ({why})")
        p0 = q_pos - q.shape[2]
        k_start = k_pos - k.shape[2]
        e = self._emittable(p0, q.shape[2], k_pos, final)
        if e:
            if self.mask.sink and k_start:
                y = self._attend_sinks(q[:, :, :e], k, v, sink_k, sink_v, p0, k_start,
                                       p0 + torch.arange(e, device=q.device),
                                       torch.arange(k.shape[2], device=k.device) + k_start)
            else:
                y = self._attend(q[:, :, :e], k, v, p0, k_start)
            q = q[:, :, e:]
        else:
            y = q.new_zeros(B, 0, self.embed_dim, dtype=autocast_dtype(q))    # out_proj's
        if self.mask.bounded:   # drop keys below lo of the oldest query still to come
            keep_from = min(max(self.mask.lo(p0 + e), k_start), k_pos)
            k, v = k[:, :, keep_from - k_start:], v[:, :, keep_from - k_start:]
        dev = state.q_pos.device
        full = lambda n: torch.full((B,), n, dtype=torch.int64, device=dev)  # noqa: E731
        new = stamp(self, CrossAttentionState(q=q, k=k, v=v, q_pos=full(q_pos), k_pos=full(k_pos),
                                              out_lengths=full(e), sink_k=sink_k,
                                              sink_v=sink_v))
        _record_align(new, q_pos - q.shape[2], k_pos - k.shape[2])
        return y, new

    # ---- the steady state (CUDA graphs) ---------------------------------------------------------
    def _pattern(self, p0, k_start):
        """What the mask between the pending queries (from p0) and the buffered keys (from
        k_start) depends on: the mask shifts by k_block keys per block queries, so two slots
        with the same (p0 mod block, k_start - (p0 // block) * k_block) see the same pattern and
        one alignment serves both."""
        m = self.mask
        return (p0 % m.block, k_start - (p0 // m.block) * m.k_block)

    def steady_check(self, n_q, state):
        """SteadyCheck for lockstep fixed steps of ``n_q`` query frames (and n_q // block *
        k_block key frames): None where no such step is a fixed one (unbounded history, n_q not
        whole query frames); ``ok()`` reads each slot's positions on the host (admission, not a
        hot path). The general step does not dispatch to step_fixed (two streams)."""
        check_state(self, state, CrossAttentionState)
        m = self.mask
        if not m.bounded or isinstance(n_q, bool) or not isinstance(n_q, int) or n_q < 1 \
                or n_q % m.block:
            return None
        n_k = n_q // m.block * m.k_block
        P, K = state.q.shape[2], state.k.shape[2]

        def ok():
            flags = [self._steady_after(a - P, P, b - K, K, n_q, n_k)
                     for a, b in zip(state.q_pos.tolist(), state.k_pos.tolist())]
            return torch.tensor(flags, dtype=torch.bool, device=state.q_pos.device)
        return SteadyCheck(n_q, ok, (state.q_pos, state.k_pos))

    def _admit_check(self, state, sub, slot):
        """pyencoder.streaming.admit's hook: the new stream (``sub``, batch 1, steady) must
        share the batch's mask pattern (a graph baked the batch's alignment into its launches);
        returns what re-records that alignment after the copy into the slot (the copy bumps
        ``q_pos``'s version, which retires the record)."""
        align = _recorded_align(state)
        if align is None:
            raise RuntimeError("admit: the batch state's mask alignment is not known (no general "
                               "or fixed step since it was loaded or reset): run "
                               "step_fixed(..., check=True) on it first")
        P, K = sub.q.shape[2], sub.k.shape[2]
        if (P, K) != (state.q.shape[2], state.k.shape[2]):
            raise RuntimeError(
                f"admit: the new stream holds {P} pending queries and {K} keys, the batch's "
                f"streams {state.q.shape[2]} and {state.k.shape[2]} (both steady, at another lag "
                f"between the two streams): feed it as the batch's streams were fed (whole "
                f"frames of both streams in lockstep from its start)")
        new = (int(sub.q_pos[0]) - P, int(sub.k_pos[0]) - K)
        if self._pattern(*new) != self._pattern(*align):
            raise RuntimeError(
                f"admit: the new stream's pending queries start at {new[0]} and its keys at "
                f"{new[1]}, a mask pattern other than the batch's (queries from {align[0]}, keys "
                f"from {align[1]}; pattern {self._pattern(*new)} vs {self._pattern(*align)}): "
                f"feed it whole frames of both streams from its start")
        return lambda: _record_align(state, *align)

    def _steady_after(self, p0, P, k_start, K, n_q, n_k):
        """Whether a general step of n_q queries and n_k keys from a state with P pending
        queries from p0 and K keys from k_start emits n_q queries and keeps P and K (then every
        later lockstep step does too: the mask shifts by n_k keys per n_q queries)."""
        m = self.mask
        if k_start < m.sink:    # sink keys still in the buffer: not every one resident apart
            return False
        k_pos = k_start + K + n_k
        e = self._emittable(p0, P + n_q, k_pos, False)
        keep_from = min(max(m.lo(p0 + e), k_start), k_pos)
        return e == n_q and keep_from == k_start + n_k

    @inference_step
    def step_fixed(self, x_q, x_kv, state, check=False):
        """CUDA-graph friendly steady-state step: x_q (B, n_q, E) and x_kv (B, n_kv, kv_dim) in
        lockstep (n_q a multiple of the mask's query block, n_kv = n_q // block * k_block: whole
        frames of both streams), from a state whose pending queries and buffered keys keep
        their counts (a bounded mask, after general steps in lockstep past the first windows).
        Returns the n_q emitted rows (B, n_q, E), equal to ``step``'s; the state is updated in
        place without host synchronisation. The mask's alignment (where the buffered keys start
        relative to the pending queries, fixed in lockstep) is the one the last general step
        recorded, or ``check=True`` reads it from the state (a host synchronisation, verifying
        the steady state: once, outside capture); RoPE rotates at the device's positions."""
        check_state(self, state, CrossAttentionState)
        B = state.q_pos.shape[0]
        if x_q is None or x_kv is None:
            raise ValueError("FrameCrossAttention.step_fixed needs both chunks (lockstep steps)")
        x_q = self._check_chunk("x_q", x_q, self.embed_dim, B)
        x_kv = self._check_chunk("x_kv", x_kv, self.kv_dim, B)
        m = self.mask
        n_q, n_k = x_q.shape[1], x_kv.shape[1]
        if not m.bounded:
            raise ValueError("FrameCrossAttention.step_fixed: unbounded history (left=None) keeps "
                             "every key, so no step is a fixed one; stream with step")
        if n_q < 1 or n_q % m.block or n_k != n_q // m.block * m.k_block:
            raise ValueError(f"FrameCrossAttention.step_fixed: steps must be whole frames of both "
                             f"streams in lockstep: x_q's length a positive multiple of "
                             f"{m.block} and x_kv's {m.k_block} per {m.block} queries; got "
                             f"{n_q} and {n_k}")
        P, K = state.q.shape[2], state.k.shape[2]
        if check:
            qp, kp = state.q_pos.tolist(), state.k_pos.tolist()
            # slots may stand at different positions (admit) when their mask pattern is the
            # same: the op runs at one alignment for the batch
            pats = {self._pattern(a - P, b - K) for a, b in zip(qp, kp)}
            if len(pats) > 1:
                raise ValueError(f"FrameCrossAttention.step_fixed: slots at positions whose mask "
                                 f"patterns differ (q_pos={qp}, k_pos={kp}): one alignment "
                                 f"serves the batch (admit streams fed whole frames of both "
                                 f"streams from their start)")
            if B and not self._steady_after(qp[0] - P, P, kp[0] - K, K, n_q, n_k):
                why = (f"the buffered keys from {kp[0] - K} still hold sink keys (the fixed step "
                       f"reads all {m.sink} from the state, apart from the window)"
                       if kp[0] - K < m.sink else
                       f"{P} pending queries from {qp[0] - P} and {K} keys from {kp[0] - K} do "
                       f"not keep their counts over a step of {n_q} queries and {n_k} keys")
                raise ValueError(f"FrameCrossAttention.step_fixed needs a steady state: {why} "
                                 f"(run general steps in lockstep first)")
            if B:
                _record_align(state, qp[0] - P, kp[0] - K)
        align = _recorded_align(state)
        if align is None:
            raise RuntimeError("FrameCrossAttention.step_fixed: the mask's alignment of this "
                               "state is not known (no general step since it was loaded or "
                               "reset): call step_fixed(..., check=True) once, outside capture")
        p0, k_start = align
        dt = state.q.dtype
        qcat = torch.cat([state.q, self._heads(x_q, self.q_proj).to(dt)], 2)
        kcat = torch.cat([state.k, self._heads(x_kv, self.k_proj).to(dt)], 2)
        vcat = torch.cat([state.v, self._heads(x_kv, self.v_proj).to(dt)], 2)
        qe = qcat[:, :, :n_q]
        rope, ke = self.rope, kcat
        # RoPE at the positions the device holds (the recorded alignment may be whole periods
        # behind a graph's replays; the mask pattern is the same there, the rotation not)
        if rope is not None or m.sink:
            ar = torch.arange(max(n_q, K + n_k), device=qcat.device)
            qp = (state.q_pos - P)[:, None] + ar[None, :n_q]
            kp = (state.k_pos - K)[:, None] + ar[None, :K + n_k]
        if m.sink:
            # steady: every sink key resident apart (k_start >= sink), read from the state
            y = self._attend_sinks(qe, kcat, vcat, state.sink_k, state.sink_v, p0, k_start, qp,
                                   kp)
        else:
            if rope is not None:
                qe, ke = rope.rotate(qe, qp), rope.rotate(kcat, kp)
            o = cross_attention(qe, ke, vcat, mask=m, rope=None, q_offset=p0, k_offset=k_start)
            y = self.out_proj(o.transpose(1, 2).reshape(B, n_q, self.embed_dim))
        state.q.copy_(qcat[:, :, n_q:])
        state.k.copy_(kcat[:, :, n_k:])
        state.v.copy_(vcat[:, :, n_k:])
        # advanced here (not queued by batched_counters): the record below stamps q_pos as this
        # step leaves it
        state.q_pos.add_(n_q)
        state.k_pos.add_(n_k)
        fill_counter(state, n_q)
        _record_align(state, p0 + n_q, k_start + n_k)
        return y


def _positions(state):
    """[q_pos min, q_pos max, k_pos min, k_pos max] in one host read ([0] * 4 for no slots)."""
    if not state.q_pos.numel():
        return [0, 0, 0, 0]
    return torch.stack([state.q_pos.min(), state.q_pos.max(), state.k_pos.min(),
                        state.k_pos.max()]).tolist()


def _shared_positions(state):
    """(q_pos, k_pos) of every slot, or ValueError where the slots stand apart."""
    qmin, qmax, kmin, kmax = _positions(state)
    if qmin != qmax or kmin != kmax:
        raise ValueError(f"FrameCrossAttention's general step advances the slots together (one "
                         f"position for the batch); got q_pos={state.q_pos.tolist()}, "
                         f"k_pos={state.k_pos.tolist()} (give a stream that starts apart a state "
                         f"of its own, or admit it into a batch that step_fixed advances)")
    return qmax, kmax


def _record_align(state, p0, k_start):
    """Keep (p0, k_start), the positions of the oldest pending query and the first buffered key,
    with the stamp of the state's ``q_pos`` (its tensor and version: load_state_dict and reset()
    change them). Lockstep fixed steps shift both by whole periods of the mask, which leaves the
    pattern step_fixed reads from them unchanged, so the record stays valid across them."""
    state.__dict__["_cross_align"] = (state.q_pos, _stamp(state.q_pos), p0, k_start)


def _recorded_align(state):
    rec = state.__dict__.get("_cross_align")
    if rec is None:
        return None
    t, ver, p0, k_start = rec
    if t is not state.q_pos:
        return None
    # without a version (inference tensors) the tensor's identity alone (reset() empties the
    # buffers, so a stale record there meets a state step_fixed's check=True would refuse)
    if ver is not None and _stamp(t) != ver:
        return None
    return p0, k_start
