"""Decode-step attention over a ring KV cache: the plain-torch backend (``backend="reference"``)
and the oracle of the Triton kernel (pyencoder.ops._decode_attention_triton), plus the ring layout
helpers the streaming attention modules use.

The ring holds, per slot b, the keys (already rotated at their absolute position) and values of the
last ``cap`` positions of stream b: position s lives at ring index s % cap. With ``n_keys[b]`` keys
appended so far, ring index i holds position ``kpos = (n - 1) - ((n - 1 - i) mod cap)`` (negative:
empty). Nothing is ever copied to undo the wrap-around; the attention below (and the Triton kernel
in pyencoder.triton_kernels.decode_attention) index the ring directly.

``forward(q, k_ring, v_ring, q_pos, q_count, n_keys, ...)``: the M pending queries of each
slot (un-rotated; rotated here at q_pos, float32 angles) attend to the ring entries whose position
lies in [lo(p), hi(p)] of the interval mask whose ints (block, lo_off, hi_off) it takes (the
launch boundary: pyencoder.IntervalMask.params; formula in pyencoder/mask.py).
Rows i >= q_count[b] are padding and output zeros, like rows with no visible key. The arithmetic
follows pyencoder.reference.attention.forward step by step (q k^T, times scale, mask, max, exp,
sum, p v, divide), so a streamed row matches the offline row up to summation order.

Relative bias (``rel_bias``, ``gate``, ``rel_offset``; all None: no bias, the arithmetic above
unchanged): the score of query row i (position p) and ring entry at position s gains
``gate[b, h, i] * rel_bias[h, s - p - rel_offset]`` (gate None: 1), added after the scale and
before the mask, in the order of pyencoder.nn.relpos (WavLM's gated bucket bias; the caller reads
its bucket table into the dense per-offset vector once per call). The columns must cover the
window's offsets [-(lo_off + block - 1), hi_off] (pyencoder.ops.decode_attention validates); the
gather index is clamped, so entries outside the window (masked anyway) read an edge column.
GQA: k_ring / v_ring may have Hk heads with H % Hk == 0 (query head h reads ring head
h // (H / Hk)).

Sink keys (``sink_k`` / ``sink_v`` (B, Hk, S, D), None: none, the code above unchanged): the
rotated keys and values of positions 0..S-1, resident beside the ring (the offline op's
``sink=S``, pyencoder.IntervalMask). Every valid row also sees the positions s < min(S, n_keys[b])
from this buffer; ring entries at positions < S are skipped, so no key counts twice. With a
relative bias, a sink key's column is clamped to the table: gate * rel_bias[h, clamp(s - p -
rel_offset, 0, L - 1)] (the saturated edge column for offsets outside the window; window keys are
inside the table by the op's validation).

Non-finite values follow pyencoder.reference.attention: a row that sees a ring entry whose k or v
has a NaN / inf entry (or whose own q has one) outputs NaN, every other row is exact (masked
entries never contribute 0 * NaN): ``nonfinite_guard`` turns each non-finite score, or score of
a non-finite v row, into NaN before the mask and zeroes non-finite v entries (a few elementwise
ops, no host synchronisation).
"""
import torch

from .._cpu_threads import threads_for
from ..rope import apply_rope

__all__ = ["ring_positions", "ring_write", "nonfinite_guard", "ring_bias",
           "decode_attention_reference", "supports_forward", "forward"]

_NEG_INF = float("-inf")


def ring_positions(n_keys, cap):
    """(B, cap) int64 absolute position held at each ring index (negative: empty)."""
    last = n_keys.to(torch.int64)[:, None] - 1
    i = torch.arange(cap, device=n_keys.device)[None, :]
    return last - torch.remainder(last - i, cap)


def ring_write(ring, values, positions, valid):
    """ring (B, H, cap, D) <- values (B, H, n, D) at ring index positions % cap where valid (B, n)."""
    bi, ji = valid.nonzero(as_tuple=True)
    if bi.numel() == 0:
        return
    idx = torch.remainder(positions[bi, ji], ring.shape[2])
    ring[bi, :, idx] = values[bi, :, ji].to(ring.dtype)


def nonfinite_guard(s, v):
    """Scores s (B, H, M, cap) before masking (updated in place) and values v (B, H, cap, Dv) ->
    (s, v with non-finite entries zeroed). Every score that is non-finite, or whose v row is,
    becomes NaN (s + s * 0 + rowsum(v * 0): exact for finite ones, also where a finite v row's
    own sum would overflow), so after the mask the rows that see one softmax to NaN and the
    others never meet it. A non-finite q or k entry makes every score of its row / column
    non-finite, so s covers q and k. No host synchronisation."""
    vz = v.mul(0.0).sum(-1)
    s.add_(torch.mul(s, 0.0).add_(vz[:, :, None, :]))
    return s, torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)


def decode_attention_reference(q, k_ring, v_ring, q_pos, q_count, n_keys, inv_freq, interleaved,
                               block, lo_off, hi_off, scale, rel_bias=None, gate=None,
                               rel_offset=None, sink_k=None, sink_v=None):
    """Plain-torch oracle of the streaming decode attention: queries q (B, H, M, D) at positions
    ``q_pos`` (the first ``q_count`` rows valid) against a ring buffer of rotated keys / values
    (B, Hk, cap, D) holding ``n_keys`` keys; interval mask from ``block``, ``lo_off`` (< 0:
    unbounded) and ``hi_off``; RoPE on q from ``inv_freq`` (None: none); optional relative bias
    ``rel_bias`` (H, L) from offset ``rel_offset`` with per-row ``gate`` (B, H, M); optional
    resident sink keys / values ``sink_k`` / ``sink_v`` (B, Hk, S, D) of positions < S (module
    docstring). Rows without a visible key output zeros."""
    B, H, M, D = q.shape
    cap = k_ring.shape[2]
    # the bounds below in int64 (no copy when given so): uint8 / int8 indices wrapped (1 - lo_off
    # became 254, a padding row's -1 became 255, a position near 127 overflowed)
    q_pos, q_count, n_keys = (t.to(torch.int64) for t in (q_pos, q_count, n_keys))
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qr = q.to(cdt)
    if inv_freq is not None and inv_freq.numel():
        qr = apply_rope(qr, q_pos, inv_freq, interleaved)
    # Visibility (B, 1, M, cap) of ring entry i for query row r: lo(p) <= kpos <= hi(p), the entry
    # filled (kpos >= 0) and the row valid (r < q_count). One bound tensor per side keeps this at
    # a handful of ops: a step attends ~12 layers x this function, so per-op overhead matters on
    # CPU. Rows past q_count get hi = -1 (nothing visible, so they output zeros).
    kpos = ring_positions(n_keys, cap)[:, None, :]           # (B, 1, cap)
    base = q_pos if block == 1 else torch.div(q_pos, block, rounding_mode="floor") * block
    valid = torch.arange(M, device=q.device)[None, :] < q_count.to(q.device)[:, None]
    hi = torch.where(valid, base + hi_off, -1)[:, :, None]  # (B, M, 1)
    m = kpos <= hi
    if lo_off >= 0:
        m &= kpos >= (base - lo_off).clamp_min_(0)[:, :, None]
    else:
        m &= kpos >= 0
    if sink_k is not None:
        # Sink keys first (positions 0..S-1, visible to every valid row once appended), then the
        # ring without its entries at positions < S (those are read from the sink buffer).
        S = sink_k.shape[2]
        spos = torch.arange(S, device=q.device)
        m &= kpos >= S
        sinks = (spos[None, None, :] < n_keys.to(q.device)[:, None, None]) & valid[:, :, None]
        m = torch.cat([sinks, m.expand(B, M, cap)], -1)
        kpos = torch.cat([spos[None, None, :].expand(B, 1, S), kpos], -1)
        k_ring = torch.cat([sink_k.to(k_ring.dtype), k_ring], 2)
        v_ring = torch.cat([sink_v.to(v_ring.dtype), v_ring], 2)
    if k_ring.shape[1] != H:
        k_ring = k_ring.repeat_interleave(H // k_ring.shape[1], dim=1)
        v_ring = v_ring.repeat_interleave(H // v_ring.shape[1], dim=1)
    s = torch.matmul(qr, k_ring.to(cdt).transpose(-1, -2))
    s.mul_(scale)
    if rel_bias is not None:
        s.add_(ring_bias(rel_bias, gate, rel_offset, kpos, q_pos, cdt))
    s, vr = nonfinite_guard(s, v_ring.to(cdt))
    s.masked_fill_(~m[:, None], _NEG_INF)
    mx = s.amax(dim=-1, keepdim=True).nan_to_num_(neginf=0.0)   # empty rows: -inf -> 0
    p = s.sub_(mx).exp_()
    l = p.sum(dim=-1, keepdim=True)
    o = torch.matmul(p, vr)
    # Rows with no visible key have l == 0 and o == 0 (every p is exp(-inf) = 0): 0 / 1 = 0.
    o.div_(torch.where(l > 0, l, 1.0))
    return o.to(q.dtype)


def ring_bias(rel_bias, gate, rel_offset, kpos, q_pos, cdt):
    """(B, H, M, cap) gate[b, h, i] * rel_bias[h, kpos - q_pos - rel_offset] (index clamped to
    the table: entries outside the window are masked by the caller)."""
    L = rel_bias.shape[1]
    idx = (kpos - q_pos[:, :, None] - rel_offset).clamp_(0, L - 1)       # (B, M, cap)
    bias = rel_bias.to(cdt)[:, idx].transpose(0, 1)                     # (B, H, M, cap)
    return bias if gate is None else bias.mul_(gate.to(cdt)[..., None])


def supports_forward(**_):
    return None


def forward(q, k_ring, v_ring, q_pos, q_count, n_keys, inv_freq, interleaved, block, lo_off,
            hi_off, scale, rel_bias=None, gate=None, rel_offset=None, sink_k=None, sink_v=None):
    """The reference backend's entry: decode_attention_reference under the CPU thread policy."""
    # A step is a few MFLOP: on CPU its ~20 small ops run single-threaded (pyencoder._cpu_threads:
    # each parallel op would pay a thread barrier, 10-25x slower on a busy machine).
    keys = k_ring.shape[2] + (0 if sink_k is None else sink_k.shape[2])
    with threads_for(4.0 * q.numel() * keys, q.device):
        return decode_attention_reference(q, k_ring, v_ring, q_pos, q_count, n_keys, inv_freq,
                                          interleaved, block, lo_off, hi_off, scale, rel_bias,
                                          gate, rel_offset, sink_k, sink_v)
