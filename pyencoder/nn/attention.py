"""Drop-in self-attention modules with interval masks, offline and streaming.

``BandedSelfAttention`` (query p sees keys [p - left, p + right]) and ``ChunkedSelfAttention``
(chunked mask with left chunks and lookahead) take and return (B, T, E) tensors. Their parameters
are wav2vec2's attention (q_proj, k_proj, v_proj, out_proj Linear layers), so a wav2vec2 / HuBERT /
WavLM attention's state_dict loads as is; the 1/sqrt(head_dim) scaling is applied inside the op.

Offline ``forward`` is one call of pyencoder.ops.interval_attention over the whole sequence, RoPE
applied inside the op. Streaming (``init_state`` / ``step`` / ``flush``): each new key is rotated
once at its absolute position and written to a ring buffer (layout:
pyencoder.reference.decode_attention) of capacity lo_off + hi_off + max_chunk of the layer's
``mask`` (a pyencoder.IntervalMask; band: left + right + max_chunk); queries are kept un-rotated
until their last visible key mask.hi(p) has arrived, then rotated at p and attended over the ring
(pyencoder.ops.decode_attention: the backend registry's choice, the Triton decode kernel on CUDA
and the reference elsewhere in auto mode). Rotating the cached keys once gives the same
float32 values the offline op computes for them (same elementwise formula), so a streamed output
differs from the offline one only by the summation order of the dot products and the softmax sum.
Steps longer than max_chunk are cut into pieces internally. With unbounded history (left=None /
left_chunks=None) the cache grows up to ``max_context`` positions and then raises.

Batched streams: every slot has its own position. ``step(x, state, lengths=None)``: x (B, n, E),
``lengths`` (B,) the valid frames of each slot (default n). The output is (B, m, E) with
m = max(state.out_lengths); slot b's frames are the first ``state.out_lengths[b]`` rows, the rest
are zeros.

``step_fixed(x, state)``: the steady-state step for CUDA graphs (banded and chunked masks, with
or without sink keys): a fixed n frames per slot, n a multiple of the mask block (chunk_size),
exactly n frames out, no host synchronisation, state updated in place; preconditions in its
docstring (``check=True`` verifies them once, outside capture). The general ``step`` runs as
``step_fixed`` by itself whenever those preconditions hold and every slot gets the same n frames
(one host read decides; on a CPU it saves about a quarter of the per-step op overhead).
``pack_qkv_()`` (or ``pyencoder.nn.pack_qkv_(model)`` for every attention of a model) stores the
q / k / v weights in one buffer (the same Parameters, no cached copy), so a streaming step projects
with one GEMM instead of three: worth it for CUDA-graph steps at small batch, which are bound by
their kernel count (``python -m benchmarks.count_step_kernels``). Opt-in, never done behind the
user's back: while packed the three parameters share one storage, which safetensors'
``save_model`` refuses (its other entry points and releases differ); ``unpack_qkv_()`` undoes it.

Package-internal (used by pyencoder.nn.layer and pyencoder.nn.relpos, not in ``__all__``):
``IntervalSelfAttention``, the base of every interval self-attention module; ``concat_ragged``,
the output helper of the general step.
"""
import dataclasses

import torch
from torch import nn

from .._checks import autocast_dtype, check_module_input, is_int
from ..mask import IntervalMask
from ..ops.attention import interval_attention
from ..rope import apply_rope, as_rope
from ..ops import _ring_write_triton as _ring
from ..ops.decode_attention import decode_attention
from ..reference.decode_attention import ring_write
from ..streaming.state import (StreamState, SteadyCheck, advance_counter, check_init_args,
                               check_state, check_step_lengths, ends_stream, fill_counter,
                               fixed_index, fresh_counters, inference_step, marks_partial,
                               record_steady, shift_queue, stamp, steady_check, steady_dispatch)
from .linear import Linear, linear, plain_linear

__all__ = ["BandedSelfAttention", "ChunkedSelfAttention", "AttentionState"]


@dataclasses.dataclass
class AttentionState(StreamState):
    k: torch.Tensor           # (B, H, cap, D) rotated keys, ring-indexed by position % cap
    v: torch.Tensor           # (B, H, cap, D)
    q: torch.Tensor           # (B, H, qcap, D) pending (un-rotated) queries, oldest first
    pos: torch.Tensor         # (B,) int64 keys appended so far
    pending: torch.Tensor     # (B,) int64 queries held back
    out_lengths: torch.Tensor  # (B,) int64 frames emitted by the last step / flush

    @property
    def _growable(self):
        # the ring of unbounded history grows up to max_context (it holds every key: no wrap);
        # a bounded ring is indexed by position % its capacity, which a checkpoint must keep
        # (init_state's max_chunk sets it)
        return {"k": 2, "v": 2} if self.__dict__.get("_ring_grows", True) else {}

    def _shape_hint(self, name):
        if name in ("k", "v", "q"):
            return (": the ring and the query queue are sized by init_state's max_chunk (a "
                    "bounded ring's capacity lo + hi + max_chunk, positions stored modulo it): "
                    "make the state with the saved stream's max_chunk")
        return ""

    def _invalid(self):
        qcap = self.q.shape[2]
        if self.k.shape != self.v.shape:
            return f"k {tuple(self.k.shape)} and v {tuple(self.v.shape)} differ in shape"
        if self.__dict__.get("_ring_grows") and self.pos.numel() \
                and int(self.pos.max()) > self.k.shape[2]:
            return (f"the ring of unbounded history holds {self.k.shape[2]} keys, fewer than the "
                    f"{self.pos.tolist()} received (it keeps every key)")
        if self.pending.numel() and int(self.pending.max()) > qcap:
            return f"pending {self.pending.tolist()} exceeds the query queue ({qcap})"
        if bool((self.pending > self.pos).any()):
            return f"pending {self.pending.tolist()} exceeds pos {self.pos.tolist()}"
        return None


@dataclasses.dataclass
class SinkAttentionState(AttentionState):
    """AttentionState of a mask with sink keys: positions < sink stay resident here (never wrap
    out of the ring)."""
    sink_k: torch.Tensor      # (B, H, sink, D) rotated keys of positions < sink
    sink_v: torch.Tensor      # (B, H, sink, D)


class IntervalSelfAttention(nn.Module):
    """Projections, offline forward and streaming of one ``pyencoder.IntervalMask`` (``mask``);
    BandedSelfAttention, ChunkedSelfAttention and WavLMSelfAttention set the mask."""

    def __init__(self, embed_dim, num_heads, mask, rope, bias, max_context):
        super().__init__()
        if not is_int(embed_dim) or not is_int(num_heads) or num_heads < 1 \
                or embed_dim < 1 or embed_dim % num_heads:
            raise ValueError(f"embed_dim must be a positive multiple of num_heads; got "
                             f"embed_dim={embed_dim!r}, num_heads={num_heads!r}")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be True or False; got {type(bias).__name__} {bias!r}")
        if isinstance(max_context, bool) or not isinstance(max_context, int):
            raise TypeError(f"max_context must be a positive int; got "
                            f"{type(max_context).__name__} {max_context!r}")
        if max_context < 1:
            raise ValueError(f"max_context must be a positive int; got {max_context!r}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        if not isinstance(mask, IntervalMask):
            raise TypeError(f"mask must be a pyencoder.IntervalMask; got {type(mask).__name__}")
        self.mask = mask
        if mask.sink:
            if mask.sink > max_context:
                raise ValueError(f"sink must be <= max_context ({max_context}): the sink keys stay "
                                 f"resident in the stream state; got sink={mask.sink}")
            self._state_cls = SinkAttentionState
        self.rope = as_rope(rope, self.head_dim)
        self.max_context = max_context
        self.decode_backend = None
        self.k_proj = Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = Linear(embed_dim, embed_dim, bias=bias)
        self.q_proj = Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias)

    # The mask's ints, read by the streaming code and kept as attributes for compatibility.
    @property
    def block(self):
        return self.mask.block

    @property
    def lo_off(self):
        return self.mask.lo_off

    @property
    def hi_off(self):
        return self.mask.hi_off

    # Latency accounting: frames of future context a frame waits for (IntervalMask.latency()),
    # frames per input frame.
    @property
    def lookahead(self):
        return self.mask.latency()

    hop = 1

    @property
    def period(self):
        return self.block

    def last_input(self, t):
        """The last frame that frame t sees (exact latency composition, streaming.latency)."""
        return self.mask.hi(t)

    @property
    def scale(self):
        return self.head_dim ** -0.5

    def _heads(self, x, proj):
        B, T, _ = x.shape
        return proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    # ---- q / k / v as one GEMM (streaming steps) ---------------------------------------------
    def _qkv_modules(self):
        """(q_proj, k_proj, v_proj) when they are plain Linear layers (``plain_linear``: no
        hooks, global ones included; not views of another model's Linear) with plain parameters
        (then the three products are one product with the rows stacked), else None."""
        mods = (self.q_proj, self.k_proj, self.v_proj)
        if any(plain_linear(m) is not m for m in mods):
            return None
        ps = [m.weight for m in mods] + [m.bias for m in mods]
        if any(p is not None and type(p) is not nn.Parameter for p in ps):
            return None
        return mods

    def pack_qkv_(self):
        """Store the q, k and v projection weights (and biases) in one (3E, E) buffer, rows in
        that order, so a streaming step computes the three projections as one GEMM (``_qkv``).
        The parameters stay the same Parameter objects with the same values (their ``.data``
        becomes a view of the buffer; nothing is cached: the step reads the parameters' own
        memory, so every later edit is seen). Opt-in (worth it for a CUDA-graph step at small
        batch, which is launch-bound; on the CPU a step is bound by reading the weights, which one
        GEMM does not change). It does nothing unless the projections are plain Linear layers
        whose parameters each own their whole storage (not views into a flat buffer, as FSDP's,
        nor tied to each other) on one device and dtype; ``.to()`` /
        ``load_state_dict(assign=True)`` simply undo it (the step then runs three GEMMs), as
        does ``unpack_qkv_``. While packed, ``state_dict()`` holds three views of one storage:
        ``torch.save`` is unaffected; safetensors' ``save_model`` refuses shared storage (save
        clones, or unpack first). Returns whether the weights are packed."""
        mods = self._qkv_modules()
        if mods is None:
            return False
        if self._packed_qkv(mods) is not None:
            return True
        ws = [m.weight for m in mods]
        bs = [m.bias for m in mods]
        if (bs[0] is None) != (bs[1] is None) or (bs[0] is None) != (bs[2] is None):
            return False
        ts = ws + [b for b in bs if b is not None]
        if len({t.untyped_storage().data_ptr() for t in ts}) < len(ts):
            return False      # tied projections (shared q/k): one buffer cannot hold them apart
        if any(t.is_meta or t.device != ws[0].device or t.dtype != ws[0].dtype
               or t.storage_offset() or not t.is_contiguous()
               or t.untyped_storage().nbytes() != t.numel() * t.element_size() for t in ts):
            return False
        E = self.embed_dim
        with torch.no_grad():
            w3 = torch.cat(ws, 0)
            b3 = None if bs[0] is None else torch.cat(bs, 0)
            for i, m in enumerate(mods):
                m.weight.data = w3[i * E:(i + 1) * E]
                if b3 is not None:
                    m.bias.data = b3[i * E:(i + 1) * E]
        return True

    def unpack_qkv_(self):
        """Give the q, k and v projection parameters their own storage again (undo
        ``pack_qkv_``; same Parameters, same values). Returns whether they were packed."""
        mods = self._qkv_modules()
        if mods is None or self._packed_qkv(mods) is None:
            return False
        with torch.no_grad():
            for m in mods:
                m.weight.data = m.weight.data.clone()
                if m.bias is not None:
                    m.bias.data = m.bias.data.clone()
        return True

    @staticmethod
    def _span(ts):
        """A (3 * rows, ...) view over the three tensors ``ts`` when they lie back to back in one
        storage (pack_qkv_), else None."""
        a = ts[0]
        if any(t.dtype != a.dtype or t.device != a.device or t.shape != a.shape
               or not t.is_contiguous() for t in ts):
            return None
        st = a.untyped_storage().data_ptr()
        step = a.numel() * a.element_size()
        for i, t in enumerate(ts[1:], 1):
            if t.untyped_storage().data_ptr() != st or t.data_ptr() != a.data_ptr() + i * step:
                return None
        return a.as_strided((3 * a.shape[0], *a.shape[1:]), a.stride(), a.storage_offset())

    def _packed_qkv(self, mods):
        """(w3 (3E, E), b3 (3E,) or None) views over the packed parameters, or None."""
        w3 = self._span([m.weight for m in mods])
        if w3 is None:
            return None
        bs = [m.bias for m in mods]
        if all(b is None for b in bs):
            return w3, None
        if any(b is None for b in bs):
            return None
        b3 = self._span(bs)
        return None if b3 is None else (w3, b3)

    def _qkv(self, x):
        """(q, k, v) (B, H, T, D) of x (B, T, E): one GEMM on the packed weights where they are
        packed and no gradient is recorded (the result equals the three products up to the
        GEMM's summation blocking), the three projections otherwise."""
        mods = self._qkv_modules()
        packed = None
        if mods is not None and not torch.compiler.is_compiling() and not torch.jit.is_tracing() \
                and not (torch.is_grad_enabled() and (x.requires_grad or any(
                    m.weight.requires_grad for m in mods))):
            packed = self._packed_qkv(mods)
        if packed is None:
            return (self._heads(x, self.q_proj), self._heads(x, self.k_proj),
                    self._heads(x, self.v_proj))
        B, T, E = x.shape
        y = linear(x, *packed).view(B, T, 3, self.num_heads, self.head_dim)
        return tuple(y[:, :, i].transpose(1, 2) for i in range(3))

    def forward(self, x, key_lengths=None):
        """x (B, T, E) -> (B, T, E). ``key_lengths`` (B,): frames >= key_lengths[b] are padding."""
        check_module_input(x, 2, self.embed_dim, f"(B, T, {self.embed_dim})", self.q_proj.weight)
        B, T, E = x.shape
        q, k, v = self._heads(x, self.q_proj), self._heads(x, self.k_proj), self._heads(x, self.v_proj)
        o = interval_attention(q, k, v, mask=self.mask, rope=self.rope, key_lengths=key_lengths,
                               scale=self.scale)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, E))

    # ---- streaming -------------------------------------------------------------------------
    def _wait(self):
        """Most frames a query is held back: hi_off, or until the last sink key arrived."""
        return max(self.hi_off, self.mask.sink - 1)

    def _caps(self, max_chunk):
        qcap = self._wait() + max_chunk
        if self.lo_off < 0:
            return None, qcap
        return self.lo_off + self._wait() + max_chunk, qcap

    def init_state(self, batch_size, *, device=None, dtype=None, max_chunk=64):
        """Fresh state for ``batch_size`` streams. ``max_chunk``: frames processed per internal
        piece (sets the ring capacity lo_off + hi_off + max_chunk; longer steps are split)."""
        check_init_args(batch_size, dtype, device, self)
        if isinstance(max_chunk, bool) or not isinstance(max_chunk, int) or max_chunk < 1:
            raise ValueError(f"max_chunk must be a positive int; got {max_chunk!r}")
        p = self.q_proj.weight
        device = p.device if device is None else torch.device(device)
        dtype = p.dtype if dtype is None else dtype
        cap, qcap = self._caps(max_chunk)
        window = self.hi_off + max(self.lo_off, 0)
        if window > self.max_context:
            raise ValueError(
                f"{type(self).__name__}: streaming this mask ({self.extra_repr()}) keeps a window "
                f"of {window} frames, beyond max_context={self.max_context}; narrow the window "
                f"(left / right, left_chunks / lookahead) or raise max_context")
        if cap is None:
            cap = min(self.max_context, max(64, 2 * qcap))
        H, D, B = self.num_heads, self.head_dim, batch_size
        z = lambda n: torch.zeros(B, H, n, D, device=device, dtype=dtype)  # noqa: E731
        zi = lambda: torch.zeros(B, dtype=torch.int64, device=device)  # noqa: E731
        st = stamp(self, self._state_cls(k=z(cap), v=z(cap), q=z(qcap), pos=zi(), pending=zi(),
                                         out_lengths=zi(),
                                         **self._extra_state(B, qcap, device, dtype)))
        st.__dict__["_ring_grows"] = self.lo_off < 0      # AttentionState._growable
        return st

    _state_cls = AttentionState

    def _extra_state(self, B, qcap, device, dtype):
        if not self.mask.sink:
            return {}
        z = torch.zeros(B, self.num_heads, self.mask.sink, self.head_dim, device=device,
                        dtype=dtype)
        return {"sink_k": z, "sink_v": z.clone()}

    def _check_state(self, state):
        check_state(self, state, self._state_cls)

    def _max_chunk(self, state):
        return state.q.shape[2] - self._wait()

    @inference_step
    def step(self, x, state, lengths=None):
        """Feed x (B, n, E) (n >= 0); returns (y (B, m, E), state): the queries whose lookahead has
        arrived. See the module docstring for ``lengths`` and ``state.out_lengths``."""
        check_module_input(x, 2, self.embed_dim, f"(B, n, {self.embed_dim})", self.q_proj.weight)
        B, n, _ = x.shape
        self._check_state(state)
        if B != state.pos.shape[0]:
            raise ValueError(f"x has batch {B} but the state holds {state.pos.shape[0]} slots")
        if lengths is not None:
            lengths = check_step_lengths(lengths, B, n, x.device)
        if self._fixed_ok(n, state, lengths):
            fresh_counters(state)
            y = self._step_fixed(x, state)
            record_steady(state, self.steady_check(n, state))
            return y, state
        lengths = check_step_lengths(lengths, B, n, x.device)
        mc = self._max_chunk(state)
        if n <= mc:
            return self._piece(x, lengths, state, final=False)
        outs, counts = [], []
        with marks_partial(state, f"{type(self).__name__}.step",
                           lambda s: f"frames {s}-{min(s + mc, n) - 1}") as p:
            for s in range(0, n, mc):
                ln = (lengths - s).clamp(0, min(mc, n - s))
                y, state = self._piece(x[:, s:s + mc], ln, state, final=False)
                outs.append(y)
                counts.append(state.out_lengths.clone())
                p.took.append(s)
        return concat_ragged(outs, counts, state)

    @inference_step
    def step_fixed(self, x, state, check=False):
        """Steady-state step without host synchronisation, for CUDA graphs. Returns y (B, n, E).

        Every slot gets the same n = x.shape[1] frames and exactly n queries are released per
        step, so the output has a fixed shape. That holds when (1) the left context is finite
        (the ring cannot grow inside a graph), (2) n <= max_chunk and n is a multiple of the mask
        block (1 for banded, chunk_size for chunked), and (3) every slot is in steady state: it
        has seen at least ``lookahead_frames`` = hi_off - block + 1 frames (band: right; chunked:
        lookahead), and at least ``sink`` frames with sink keys, and its pending queries are
        those the general ``step`` leaves behind (a fresh state, or any state produced by
        ``step`` / ``step_fixed``; not one after ``flush``).
        Why (3) suffices: query p is released once hi(p) = (p // block + 1) * block - 1 +
        lookahead_frames has arrived, so the released count after P frames is
        block * floor((P - lookahead_frames) / block) (clamped at 0); once P >= lookahead_frames,
        adding n = m * block frames adds exactly n to it. The number of pending queries
        (lookahead_frames + (P - lookahead_frames) mod block, in [0, hi_off]) is constant per
        slot but may differ between slots; it is read on the device from ``state.pending``, so
        slots at different phases share the step.

        The state is updated in place (same tensors, same data pointers): new keys are rotated
        and written to the ring at position % cap, new queries are appended behind the pending
        ones (device-side indices), the first n queued queries are attended and the queue is
        shifted by n. No ``.item()``, no data-dependent Python branch. Sink keys: the fixed-size
        resident buffer (``state.sink_k`` / ``sink_v``, positions < sink) is complete once the
        slot is in steady state (query releases wait for the last sink key, so a stream's
        latency until then is max(hi_off, sink - 1) frames), so the fixed step only reads it; the
        decode op skips the ring entries below sink. ``check=True`` verifies
        the preconditions of (3) for this state first (a host synchronisation; do it once before
        capturing, never inside a graph) and raises ValueError if a slot would release fewer
        than n queries."""
        check_module_input(x, 2, self.embed_dim, f"(B, n, {self.embed_dim})", self.q_proj.weight)
        B, n, E = x.shape
        if self.lo_off < 0:
            raise ValueError(f"{type(self).__name__}.step_fixed needs a finite left context "
                             f"(left / left_chunks); the unbounded cache grows, which a CUDA graph "
                             f"cannot do")
        self._check_state(state)
        if B != state.pos.shape[0]:
            raise ValueError(f"x has batch {B} but the state holds {state.pos.shape[0]} slots")
        mc = self._max_chunk(state)
        if n < 1 or n > mc or n % self.block:
            raise ValueError(f"{type(self).__name__}.step_fixed: the step length n = x.shape[1] "
                             f"must be a multiple of the mask block ({self.block}) in [1, "
                             f"max_chunk={mc}]; got n={n}")
        if check:
            self.check_step_fixed(state, n)
        return self._step_fixed(x, state)

    def _step_fixed(self, x, state):
        # The body of step_fixed, after its checks (step() makes the same ones, then calls this).
        # Few ops (a batch-1 CUDA-graph step is launch-bound): the index tensors that depend only
        # on n and state.pending (constant in the steady state) are built once per state
        # (fixed_index), the decode's key count comes from the ring write (pos + n) so that pos's
        # own add can join the stack's other counters (advance_counter), the out_lengths fill is skipped when they already hold n (fill_counter) and the queue shift
        # copies without a temporary when source and destination do not overlap (the fused ring
        # write advances the query queue itself).
        B, n, E = x.shape
        dev = x.device
        inv = None if self.rope is None else self.rope.inv_freq(dev)
        q, k, v = self._qkv(x)
        P = state.pos
        idx = fixed_index(state, "pending", n, dev)
        extras_new = self._query_extras(x)
        keep = self.hi_off
        released = qpos = nk = None
        if _ring.fused_ok(x, state, q):
            # one kernel for the keys (rotated), values and queries of every slot, the released
            # queries' positions and the key count after the step; with held-back queries it also
            # advances the query queue and returns the n queries released now
            released, qpos, nk = _ring.ring_write(
                state, q, k, v, inv, False if self.rope is None else self.rope.interleaved, keep)
        else:
            kpos = P[:, None] + idx.ar[None, :]
            if inv is not None:
                k = apply_rope(k, kpos, inv, self.rope.interleaved)
            slot = torch.remainder(kpos, state.k.shape[2])
            state.k[idx.bidx, :, slot] = k.transpose(1, 2).to(state.k.dtype)
            state.v[idx.bidx, :, slot] = v.transpose(1, 2).to(state.v.dtype)
            state.q[idx.bidx, :, idx.qidx] = q.transpose(1, 2).to(state.q.dtype)
        for name, t in extras_new.items():
            buf = getattr(state, name)
            buf[idx.bidx, :, idx.qidx] = t.transpose(1, 2).to(buf.dtype)
        if nk is None:
            # n_keys = pos + n; query i sits at pos - pending + i = n_keys + qoff[i]
            nk = P + n
            qpos = nk[:, None] + idx.qoff
        # pos itself advances here, or with the stack's other counters when a batched_counters
        # scope (StreamingSequential.step_fixed) queues the add: nothing below reads it
        advance_counter(P, n)
        extras = {name: getattr(state, name)[:, :, :n] for name in self._queued}
        fill_counter(state, n)
        o = self._decode(state.q[:, :, :n] if released is None else released, extras, state,
                         qpos, idx.count_n, nk)
        if keep:
            if released is None:
                shift_queue(state.q, n, keep, 2)
            for name in self._queued:
                shift_queue(getattr(state, name), n, keep, 2)
        return self.out_proj(o.to(x.dtype).transpose(1, 2).reshape(B, n, E))

    @property
    def lookahead_frames(self):
        """Frames a query waits for beyond the end of its block (IntervalMask.lookahead: band:
        right; chunked: lookahead)."""
        return self.mask.lookahead

    def _steady_slots(self, state):
        """(B,) bool: slots in the steady state ``step_fixed`` needs (see its docstring)."""
        P = state.pos.to(torch.int64)
        pend = state.pending.to(torch.int64)
        C, La = self.block, self.lookahead_frames
        # With sink keys no query is released before the last one (position sink - 1) arrived;
        # from then on the releases are those of the mask alone.
        P0 = max(La, self.mask.sink)
        if C == 1:      # band: (P - La) % 1 == 0, so the expected pending count is La itself
            return (P >= P0) & (pend == La)
        expect = torch.where(P >= La, La + torch.remainder(P - La, C), P)
        return (P >= P0) & (pend == expect)

    def steady_check(self, n, state):
        """pyencoder.streaming.state.SteadyCheck of a general step of n frames in every slot:
        None where it can never be a fixed one (unbounded left context, n not a positive
        multiple of the mask block or above max_chunk, no slots); else the device condition
        ``_steady_slots`` over ``pos`` and ``pending``."""
        if self.lo_off < 0 or n < 1 or n % self.block or n > self._max_chunk(state) \
                or state.pos.shape[0] == 0:
            return None
        return SteadyCheck(n, lambda: self._steady_slots(state), (state.pos, state.pending))

    def _fixed_ok(self, n, state, lengths=None):
        """Whether the general ``step`` of n frames in every slot (``lengths`` None or all n) may
        run as ``step_fixed`` (same result: the fixed step is the general one specialised to the
        steady state, with fewer ops and no nonzero / gather). One host read, which the general
        step's own ``int(ready.max())`` would cost anyway; none while ``pos`` / ``pending`` are
        untouched since the last dispatched step (pyencoder.streaming.state.steady_dispatch)."""
        if lengths is not None and (not isinstance(lengths, torch.Tensor)
                                    or tuple(lengths.shape) != (state.pos.shape[0],)):
            return False
        return steady_dispatch(state, steady_check(self, n, state), lengths, n)

    def check_step_fixed(self, state, n):
        """Raise ValueError unless ``step_fixed`` with n frames releases exactly n queries in
        every slot of ``state`` (host synchronisation: call it outside CUDA graph capture)."""
        P = state.pos.to(torch.int64)
        pend = state.pending.to(torch.int64)
        C, La = self.block, self.lookahead_frames
        bad = ~self._steady_slots(state)
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            seen = f"max(lookahead_frames={La}, sink={self.mask.sink})" if self.mask.sink else \
                f"lookahead_frames={La}"
            raise ValueError(
                f"{type(self).__name__}.step_fixed needs every slot in steady state: at least "
                f"{seen} frames seen and the pending queries the general step "
                f"leaves (lookahead_frames + (pos - lookahead_frames) % {C}); slot {b} has "
                f"pos={int(P[b])}, pending={int(pend[b])}. Warm up with step() first (and do not "
                f"use step_fixed after flush)")
        if n % C:
            raise ValueError(f"n={n} must be a multiple of the mask block {C}")
        return True

    @ends_stream
    @inference_step
    def flush(self, state):
        """End of stream: emit every held-back query (its window is cut at the last frame)."""
        self._check_state(state)
        B = state.pos.shape[0]
        x = state.q.new_zeros(B, 0, self.embed_dim)
        return self._piece(x, torch.zeros(B, dtype=torch.int64, device=x.device), state,
                           final=True)

    def _grow(self, state, need):
        cap = state.k.shape[2]
        if need <= cap:
            return
        if need > self.max_context:
            raise RuntimeError(
                f"{type(self).__name__}: the stream reached {need} frames, beyond max_context="
                f"{self.max_context}, and the attention has unbounded history (left=None), so the "
                f"cache cannot be bounded. Set a finite left/left_chunks or a larger max_context.")
        new = min(self.max_context, max(need, 2 * cap))
        pad = lambda t: torch.cat((t, t.new_zeros(*t.shape[:2], new - cap, t.shape[3])), 2)  # noqa
        state.k, state.v = pad(state.k), pad(state.v)

    # Per-query (B, H, qcap) state tensors queued beside the held-back queries (subclasses with
    # per-query inputs to the attention, e.g. WavLM's gate, name them here).
    _queued = ()

    def _query_extras(self, x):
        """{name in _queued: (B, H, n) values for the new queries of x}."""
        return {}

    def _decode(self, q, extras, state, q_pos, q_count, n_keys):
        """Pending queries q (B, H, M, D) at positions q_pos attend over the ring (and the
        resident sink keys of a mask with sinks)."""
        inv = None if self.rope is None else self.rope.inv_freq(q.device)
        sinks = dict(sink_k=state.sink_k, sink_v=state.sink_v) if self.mask.sink else {}
        return decode_attention(q, state.k, state.v, q_pos, q_count, n_keys, inv,
                                False if self.rope is None else self.rope.interleaved,
                                *self.mask.params, self.scale,
                                backend=self.decode_backend, **sinks)

    def _piece(self, x, lengths, state, final):
        B, n, E = x.shape
        H, D = self.num_heads, self.head_dim
        dev = x.device
        P0, np0 = state.pos, state.pending
        P1 = P0 + lengths
        if n:
            q, k, v = self._qkv(x)
            j = torch.arange(n, device=dev)
            valid = j[None, :] < lengths[:, None]
            kpos = P0[:, None] + j[None, :]
            if self.rope is not None:
                k = apply_rope(k, kpos, self.rope.inv_freq(dev), self.rope.interleaved)
            if self.lo_off < 0:
                self._grow(state, int(P1.max()))
            ring_write(state.k, k, kpos, valid)
            ring_write(state.v, v, kpos, valid)
            if self.mask.sink:
                bs, js = (valid & (kpos < self.mask.sink)).nonzero(as_tuple=True)
                state.sink_k[bs, :, kpos[bs, js]] = k[bs, :, js].to(state.sink_k.dtype)
                state.sink_v[bs, :, kpos[bs, js]] = v[bs, :, js].to(state.sink_v.dtype)
            bi, ji = valid.nonzero(as_tuple=True)
            state.q[bi, :, np0[bi] + ji] = q[bi, :, ji].to(state.q.dtype)
            for name, t in self._query_extras(x).items():
                buf = getattr(state, name)
                buf[bi, :, np0[bi] + ji] = t[bi, :, ji].to(buf.dtype)
        np1 = np0 + lengths
        qp0 = P0 - np0
        qcap = state.q.shape[2]
        if final:
            ready = np1
        else:
            i = torch.arange(qcap, device=dev)[None, :]
            p = qp0[:, None] + i
            hi = self.mask.hi(p)
            if self.mask.sink:     # a query also waits for every sink key (offline sees them all)
                hi = hi.clamp(min=self.mask.sink - 1)
            ready = ((i < np1[:, None]) & (hi <= (P1 - 1)[:, None])).sum(1)
        m = int(ready.max()) if B else 0
        if m == 0:      # in the dtype out_proj gives the frames of other steps (autocast)
            y = x.new_zeros(B, 0, E, dtype=autocast_dtype(x))
        else:
            qpos = qp0[:, None] + torch.arange(m, device=dev)[None, :]
            extras = {name: getattr(state, name)[:, :, :m] for name in self._queued}
            o = self._decode(state.q[:, :, :m], extras, state, qpos, ready, P1)
            y = self.out_proj(o.to(x.dtype).transpose(1, 2).reshape(B, m, E))
            rows = torch.arange(m, device=dev)[None, :] < ready[:, None]
            y = y * rows[:, :, None].to(y.dtype)
            idx = (torch.arange(qcap, device=dev)[None, :] + ready[:, None]).clamp(max=qcap - 1)
            state.q = state.q.gather(2, idx[:, None, :, None].expand(B, H, qcap, D))
            for name in self._queued:
                setattr(state, name, getattr(state, name).gather(2, idx[:, None, :].expand(
                    B, H, qcap)))
        state.pos = P1
        state.pending = np1 - ready
        state.out_lengths = ready
        return y, state


def concat_ragged(outs, counts, state):
    """Concatenate per-piece outputs (B, m_i, E) whose valid rows are counts_i (B,)."""
    total = torch.stack(counts, 0).sum(0)
    B = total.shape[0]
    M = int(total.max()) if B else 0
    E = outs[0].shape[-1]
    if all(bool((c == c[0]).all()) for c in counts):
        y = torch.cat([o[:, :int(c[0])] if B else o for o, c in zip(outs, counts)], 1)
    else:
        y = outs[0].new_zeros(B, M, E)
        for b in range(B):
            parts = [o[b, :int(c[b])] for o, c in zip(outs, counts)]
            cat = torch.cat(parts, 0)
            y[b, :cat.shape[0]] = cat
    state.out_lengths = total
    return y, state


class BandedSelfAttention(IntervalSelfAttention):
    """Self-attention where frame p sees frames [p - left, p + right] (left=None: all history).

    ``rope``: True (RoPE over the full head dim), False, an int rotary dim, a pyencoder.Rope or a
    RotaryEmbedding. Latency: ``right`` frames (``lookahead``)."""

    def __init__(self, embed_dim, num_heads, *, left, right, rope=True, bias=True,
                 max_context=65536, sink=0):
        super().__init__(embed_dim, num_heads, IntervalMask.band(left, right, sink=sink), rope,
                         bias, max_context)
        self.left, self.right = left, right

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, left={self.left}, "
                f"right={self.right}, rope={self.rope}"
                + (f", sink={self.mask.sink}" if self.mask.sink else ""))


class ChunkedSelfAttention(IntervalSelfAttention):
    """Chunked self-attention: frame p in chunk c = p // chunk_size sees from the start of chunk
    c - left_chunks (None: all history) to the end of chunk c plus ``lookahead`` frames.
    Latency (worst case, the first frame of a chunk): chunk_size - 1 + lookahead frames."""

    def __init__(self, embed_dim, num_heads, *, chunk_size, left_chunks, lookahead=0, rope=True,
                 bias=True, max_context=65536, sink=0):
        super().__init__(embed_dim, num_heads,
                         IntervalMask.chunked(chunk_size, left_chunks, lookahead, sink=sink),
                         rope, bias, max_context)
        self.chunk_size, self.left_chunks, self.chunk_lookahead = chunk_size, left_chunks, lookahead

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, chunk_size="
                f"{self.chunk_size}, left_chunks={self.left_chunks}, lookahead="
                f"{self.chunk_lookahead}, rope={self.rope}"
                + (f", sink={self.mask.sink}" if self.mask.sink else ""))


def pack_qkv_(module):
    """``pack_qkv_()`` on every interval self-attention in ``module`` (itself included): their
    q / k / v projections become one GEMM in a streaming step. Returns how many were packed.
    Undo with ``unpack_qkv_(module)`` before saving with safetensors (shared storage)."""
    return sum(bool(m.pack_qkv_()) for m in module.modules()
               if isinstance(m, IntervalSelfAttention))


def unpack_qkv_(module):
    """``unpack_qkv_()`` on every interval self-attention in ``module``; returns how many were
    packed."""
    return sum(bool(m.unpack_qkv_()) for m in module.modules()
               if isinstance(m, IntervalSelfAttention))
