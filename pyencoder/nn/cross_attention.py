"""Cross-attention between two streams at their own rates (issue 15 item 3), offline and streaming.

``FrameCrossAttention(embed_dim, num_heads, mask=IntervalMask.frames(q_frame, k_frame, left,
right), kv_dim=None, rope=False)``: queries come from one stream (B, Tq, E), keys and values from
another (B, Tk, kv_dim), e.g. 25 fps video latents attending to 50 Hz audio features
(q_frame=1, k_frame=2). Query position p (in query units) sees key positions s (in key units)
with mask.lo(p) <= s <= mask.hi(p); ``rope`` rotates q and k at their own positions. Offline
``forward(x_q, x_kv, key_lengths=None)`` is one ``pyencoder.ops.cross_attention`` call.

Streaming: ``state = m.init_state(B, device=..., dtype=...)``, ``y, state = m.step(x_q, x_kv,
state)`` where either chunk may be None or hold any number of frames (the two streams are chunked
independently), ``y, state = m.flush(state)`` at the end of both streams. All slots of a batch
advance together. Projected queries wait (un-rotated) until every key they see has arrived: query
p is emitted once ``mask.hi(p) + 1`` keys have arrived (``last_key(p)``), or by ``flush``; the
emitted queries attend over the buffered keys with the same op as offline, at their absolute
positions, so streamed output equals offline output up to summation order. Keys no pending or
future query can see (below ``mask.lo`` of the oldest pending query) are dropped; with
unbounded history (left=None) every key is kept, up to ``max_context`` keys, then ``step``
raises.

Latency (the streaming protocol's terms, pyencoder.streaming.latency): on the query stream the
module is per-frame (``hop`` = 1, ``lookahead`` = 0: output p needs query p only); on the key
stream, ``latency()`` is the number of key positions a query frame waits for past the end of its
own key frame (the key frame at the same time: query frame f = p // q_frame lines up with key
frame f), i.e. ``mask.hi_off - k_block + 1`` (frames(q, k, left, right, extra): right * k_frame
+ extra); ``last_key(p)`` gives the exact last key position query p needs.
"""
import dataclasses

import torch
from torch import nn

from ..mask import IntervalMask
from .._checks import check_module_input
from ..ops.attention import cross_attention
from ..rope import as_rope
from ..streaming.state import StreamState, check_init_args, check_state, stamp
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

    _growable = {"q": 2, "k": 2, "v": 2}

    def _invalid(self):
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
        if not isinstance(embed_dim, int) or not isinstance(num_heads, int) or num_heads < 1 \
                or embed_dim < 1 or embed_dim % num_heads:
            raise ValueError(f"embed_dim must be a positive multiple of num_heads; got "
                             f"embed_dim={embed_dim!r}, num_heads={num_heads!r}")
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
        """Key positions a query frame waits for past the end of its own key frame (worst case
        over its rows): mask.hi_off - mask.k_block + 1."""
        return self.mask.hi_off - self.mask.k_block + 1

    def last_key(self, p):
        """The last key position query position p sees (p an int or an integer tensor)."""
        return self.mask.hi(p)

    # ---- offline --------------------------------------------------------------------------------
    def _heads(self, x, proj):
        B, T, _ = x.shape
        return proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def _attend(self, q, k, v, q_offset, k_offset, key_lengths=None):
        B, _, T, _ = q.shape
        o = cross_attention(q, k, v, mask=self.mask, rope=self.rope, key_lengths=key_lengths,
                            q_offset=q_offset, k_offset=k_offset)
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
        check_init_args(batch_size, dtype, device)
        dev = self.q_proj.weight.device if device is None else device
        dt = self.q_proj.weight.dtype if dtype is None else dtype
        empty = torch.zeros(batch_size, self.num_heads, 0, self.head_dim, device=dev, dtype=dt)
        zeros = torch.zeros(batch_size, dtype=torch.int64, device=dev)
        return stamp(self, CrossAttentionState(q=empty, k=empty.clone(), v=empty.clone(),
                                               q_pos=zeros, k_pos=zeros.clone(),
                                               out_lengths=zeros.clone()))

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
        need = n_keys - m.hi_off            # hi(p) < n_keys  <=>  (p // block) * k_block < need
        if need <= 0:
            return 0
        first_blocked = -(-need // m.k_block) * m.block
        return max(0, min(n_pending, first_blocked - p0))

    def step(self, x_q, x_kv, state):
        """Append query frames x_q (B, n, E) and key/value frames x_kv (B, m, kv_dim) (either may
        be None); returns (y (B, e, E), state) with the e queries whose keys have all arrived."""
        return self._advance(x_q, x_kv, state, final=False)

    def flush(self, state):
        """End of both streams: every pending query attends over the keys there are."""
        return self._advance(None, None, state, final=True)

    def _advance(self, x_q, x_kv, state, final):
        check_state(self, state, CrossAttentionState)
        B = state.q_pos.shape[0]
        x_q = self._check_chunk("x_q", x_q, self.embed_dim, B)
        x_kv = self._check_chunk("x_kv", x_kv, self.kv_dim, B)
        q, k, v = state.q, state.k, state.v
        q_pos, k_pos = int(state.q_pos[0]) if B else 0, int(state.k_pos[0]) if B else 0
        if x_q is not None and x_q.shape[1]:
            q = torch.cat([q, self._heads(x_q, self.q_proj).to(q.dtype)], 2)
            q_pos += x_q.shape[1]
        if x_kv is not None and x_kv.shape[1]:
            k = torch.cat([k, self._heads(x_kv, self.k_proj).to(k.dtype)], 2)
            v = torch.cat([v, self._heads(x_kv, self.v_proj).to(v.dtype)], 2)
            k_pos += x_kv.shape[1]
        if k.shape[2] > self.max_context:
            raise RuntimeError(f"FrameCrossAttention: {k.shape[2]} buffered keys exceed "
                               f"max_context={self.max_context} (unbounded history keeps every "
                               f"key; raise max_context or bound the mask's left)")
        p0 = q_pos - q.shape[2]
        k_start = k_pos - k.shape[2]
        e = self._emittable(p0, q.shape[2], k_pos, final)
        if e:
            y = self._attend(q[:, :, :e], k, v, p0, k_start)
            q = q[:, :, e:]
        else:
            y = q.new_zeros(B, 0, self.embed_dim)
        if self.mask.bounded:   # drop keys below lo of the oldest query still to come
            keep_from = min(max(self.mask.lo(p0 + e), k_start), k_pos)
            k, v = k[:, :, keep_from - k_start:], v[:, :, keep_from - k_start:]
        dev = state.q_pos.device
        full = lambda n: torch.full((B,), n, dtype=torch.int64, device=dev)  # noqa: E731
        new = stamp(self, CrossAttentionState(q=q, k=k, v=v, q_pos=full(q_pos), k_pos=full(k_pos),
                                              out_lengths=full(e)))
        return y, new
