"""Plain-torch interval attention: the CPU production path and the test oracle for the kernels.

Computes, for query i at absolute position p = q_offset + i and key j at s = k_offset + j,
visible(i, j) = lo(p) <= s <= hi(p) (or s < sink) and j < key_lengths[b], lo and hi those of the
pyencoder.IntervalMask whose ints (block, lo_off, hi_off, and the keywords sink and kb, the key
block of a frame-rate mask: base(p) = (p // block) * kb) the registered op passes to ``forward`` /
``backward`` (pyencoder/mask.py holds the formula; the helpers below take the IntervalMask), with
RoPE (inv_freq, NeoX or interleaved, partial rotary) applied to q and k at their absolute
positions, softmax(scale * q k^T) over visible keys, and the zero-row rule (no visible key: output 0,
lse = -inf, zero gradient).

Relative-position bias (``rel_bias`` (Hq, L), ``gate`` (B, Hq, Nq) or None, ``rel_offset``;
pyencoder.ops.attention): every visible pair's score gains

    gate[b, h, i] * rel_bias[h, clamp(s - p - rel_offset, 0, L - 1)]

(the "saturated bucket" rule, as WavLM's bucket function saturates beyond max_distance). For band
keys the clamp is a no-op (the op requires the columns to cover relative_offsets()); only sink
keys outside the table read the edge column, and the backward adds their gradient into it
(drel_bias[h, 0] / [h, L - 1] sum several offsets). A caller who wants exact values for sink keys
gives a wider table (rel_offset smaller, L larger). Without sinks, or without a bias, the results
are bit-identical to before the rule (the same code runs).

Algorithm: blocked over query tiles. A tile of queries only reads keys in
[lo(first query), hi(last query)] (lo and hi are non-decreasing), so time and memory are O(N * W),
never O(N^2); no dense N x N mask is ever built. Half/bf16 inputs are computed in float32 (the
"upcast" oracle), float64 stays float64. GQA (Hq a multiple of Hk) is handled by viewing q as
(B, Hk, Hq/Hk, N, D), so k and v are never repeated. The backward recomputes probabilities from the
saved log-sum-exp (FlashAttention's recurrence) tile by tile, so it also needs O(N * W) memory.

Non-finite inputs (NaN, +-inf; both count as NaN) poison exactly the rows that see them and
nothing else. Forward: row i is *poisoned* when it has a visible key and q_i, or the k or v row
of one of its visible keys, has a non-finite entry; its output row and lse are NaN, every other
row is bit-identical to the same call with the poison replaced by any finite value. Backward: row
i is *bad* when it has a visible key and is poisoned or dout_i / out_i has a non-finite entry;
dq_i is NaN for bad rows, dk_j and dv_j are NaN when a bad row sees key j, everything else is
exact. Masked and padded positions contribute exactly nothing (no 0 * NaN). Cost: one
``isfinite().all()`` check of the inputs per call (one host synchronisation; a device reduction
when the tensors are on a GPU); only when it fails, the call runs on copies with the non-finite
entries replaced by 0 and marks the poisoned rows from per-row key intervals (prefix sums over
the non-finite key rows: O(N) extra work, no N x N mask).
"""
import math
from typing import NamedTuple, Optional

import torch

from .._cpu_threads import threads_for
from ..mask import IntervalMask
from ..rope import apply_rope

_NEG_INF = float("-inf")


def _cdtype(dt):
    return torch.float64 if dt == torch.float64 else torch.float32


class Bias(NamedTuple):
    """The relative-position bias of a call (pyencoder.ops.attention): table (Hq, L), gate
    (B, Hq, Nq) or None, and the relative offset of the table's column 0."""
    rel_bias: torch.Tensor
    gate: Optional[torch.Tensor]
    rel_offset: int


def _bounds(p, mask):
    """(lo, hi) of the query positions ``p`` (an int64 tensor): lo a large negative number for
    unbounded history (not clamped at 0, unlike IntervalMask.lo)."""
    base = mask.base(p)               # (saturated: no int64 overflow for any mask)
    hi = base + mask.hi_off
    if mask.lo_off < 0:
        lo = torch.full_like(p, torch.iinfo(torch.int64).min // 4)
    else:
        lo = base - mask.lo_off
    return lo, hi


def _bound_scalar(p, mask):
    base = mask.base(p)
    return (None if mask.lo_off < 0 else base - mask.lo_off), base + mask.hi_off


def _tile_size(nq, mask):
    # A tile of tq queries reads tq + W - 1 keys for W visible ones: small tiles waste less work,
    # large ones amortise per-tile overhead. Measured on a 2-core CPU (H=12, D=64): tq=64 is best
    # or within noise of best for W in 54..254 and for unbounded history at N=1500; tq=256 is up
    # to 1.8x slower.
    if mask.lo_off < 0:
        return 128
    w = mask.lo_off + mask.hi_off + mask.block
    return int(min(128, max(32, w // 4)))


def key_limit(key_lengths, nk):
    if key_lengths is None:
        return nk
    return int(min(nk, int(key_lengths.max().item()))) if key_lengths.numel() else 0


def query_tiles(nq, nk_eff, mask, q_offset, k_offset):
    """Yield (i0, i1, j0, j1): query tile and the key range its interval can see (sink keys
    aside) under the IntervalMask ``mask``."""
    tq = _tile_size(nq, mask)
    for i0 in range(0, nq, tq):
        i1 = min(nq, i0 + tq)
        lo, _ = _bound_scalar(q_offset + i0, mask)
        _, hi = _bound_scalar(q_offset + i1 - 1, mask)
        j0 = 0 if lo is None else max(0, lo - k_offset)
        j1 = min(nk_eff, hi - k_offset + 1)
        yield i0, i1, j0, j1


def tile_bias(i0, i1, j0, j1, mask, q_offset, k_offset, g, dtype, device):
    """Additive (1, g*tq, tk) bias of the tile's positional mask (0 or -inf; the interval of the
    IntervalMask ``mask``, sink keys aside), or None when every query of the tile sees every key
    of the range."""
    p = torch.arange(q_offset + i0, q_offset + i1, device=device)
    s = torch.arange(k_offset + j0, k_offset + j1, device=device)
    lo, hi = _bounds(p, mask)
    m = (s[None, :] >= lo[:, None]) & (s[None, :] <= hi[:, None])
    if bool(m.all()):
        return None
    bias = torch.zeros(m.shape, dtype=dtype, device=device).masked_fill_(~m, _NEG_INF)
    if g > 1:
        bias = bias.unsqueeze(0).expand(g, -1, -1).reshape(g * (i1 - i0), j1 - j0)
    return bias.unsqueeze(0)


class _Biases:
    """tile_bias memoised by what determines it: the tile's shape (tq, tk), the offset p0 - s0
    of its first query's block base (p0 // block) * kb and its first key s0 and the first
    query's phase p0 % block (lo/hi of p0 + a minus s0 depend on nothing else; kb is the key-side
    frame of a frame mask, block otherwise). Interior tiles of a band or chunked mask share one
    entry; at most 8 are kept."""

    def __init__(self, mask, q_offset, k_offset, g, dtype, device):
        self.args = (mask, q_offset, k_offset, g, dtype, device)
        self.memo = {}

    def get(self, i0, i1, j0, j1):
        mask, q_offset, k_offset = self.args[:3]
        p0, s0 = q_offset + i0, k_offset + j0
        key = (i1 - i0, j1 - j0, mask.base(p0) - s0, p0 % mask.block)
        if key not in self.memo:
            if len(self.memo) >= 8:
                self.memo.clear()
            self.memo[key] = tile_bias(i0, i1, j0, j1, *self.args)
        return self.memo[key]


class _RelBias:
    """Relative-position bias tiles: ``rel_bias`` (Hq, L) holds the bias of relative offset
    s - p = rel_offset + t in column t; ``gate`` (B, Hq, Nq) or None (gate 1). The bias of
    (query i, key j) is gate[b, h, i] * rel_bias[h, clamp(s - p - rel_offset, 0, L - 1)] with
    s = k_offset + j, p = q_offset + i: the saturated bucket rule. A visible band key is always
    inside the table (the op validates that the columns cover relative_offsets()); a sink key
    outside it reads the edge column (and its gradient adds into that column); other columns
    outside [0, L) only occur at masked pairs (score -inf)."""

    def __init__(self, bias, q_offset, k_offset, B, Hk, g, cdt):
        rel_bias, gate, rel_offset = bias
        self.table = rel_bias.to(cdt)
        self.gate = None if gate is None else gate.to(cdt).reshape(B, Hk, g, gate.shape[-1])
        self.shift = k_offset - q_offset - rel_offset
        self.B, self.Hk, self.g = B, Hk, g

    def index(self, i0, i1, j0, j1, jidx=None):
        """(tq, tk) clamped column of each (query, key) of the tile: keys [j0, j1), or the key
        indices ``jidx`` (sink keys prepended)."""
        dev = self.table.device
        i = torch.arange(i0, i1, device=dev)
        j = torch.arange(j0, j1, device=dev) if jidx is None else jidx
        return (j[None, :] - i[:, None] + self.shift).clamp_(0, self.table.shape[1] - 1)

    def add_to(self, s, idx, i0, i1):
        """s (B*Hk, g*tq, tk) += the tile's bias."""
        tq, tk = idx.shape
        tab = self.table[:, idx].view(1, self.Hk, self.g, tq, tk)
        s5 = s.view(self.B, self.Hk, self.g, tq, tk)
        if self.gate is None:
            s5.add_(tab)
        else:
            s5.addcmul_(self.gate[..., i0:i1, None], tab)

    def grads(self, ds, idx, i0, i1, drel, dgate):
        """Accumulate the tile's dScore ds (B*Hk, g*tq, tk) into drel (Hq, L) and dgate
        (B, Hk, g, Nq) (or None)."""
        tq, tk = idx.shape
        ds5 = ds.view(self.B, self.Hk, self.g, tq, tk)
        if self.gate is None:
            w = ds5.sum(0)
        else:
            tab = self.table[:, idx].view(1, self.Hk, self.g, tq, tk)
            dgate[..., i0:i1] = (ds5 * tab).sum(-1)
            w = (ds5 * self.gate[..., i0:i1, None]).sum(0)
        H = self.Hk * self.g
        drel.scatter_add_(1, idx.reshape(1, -1).expand(H, -1), w.reshape(H, tq * tk))


def tile_scores(qt, kt, bias, key_lengths, min_len, j0, j1, B, Hk, jidx=None, safe=False):
    """Scaled, masked scores (B*Hk, g*tq, tk): q was pre-scaled. ``jidx``: the key indices of
    the tile when they are not the range [j0, j1) (sink keys prepended; j1 is then their end).
    ``safe``: a product may overflow (``overflow_risk``): the mask is filled in after the
    product, not added to it (a masked key's +inf score plus the -inf bias was NaN)."""
    if bias is None:
        s = torch.bmm(qt, kt.transpose(-1, -2))
    elif safe:
        s = torch.bmm(qt, kt.transpose(-1, -2)).masked_fill_(torch.isneginf(bias), _NEG_INF)
    else:
        s = torch.baddbmm(bias, qt, kt.transpose(-1, -2))
    if key_lengths is not None and j1 > min_len:
        j = torch.arange(j0, j1, device=s.device) if jidx is None else jidx
        pad = j[None, :] >= key_lengths.to(s.device)[:, None]  # (B, tk)
        s.view(B, Hk, -1, j.numel()).masked_fill_(pad[:, None, None, :], _NEG_INF)
    return s


def _sink_keys(k_offset, sink, nk_eff):
    """How many leading keys of k are sink keys (absolute position < sink)."""
    return min(nk_eff, max(0, sink - k_offset))


def _sink_split(j0, j1, ns):
    """(js, j0, j1): a tile reads the sink keys [0, js) and the range [j0, j1) (js <= j0, the two
    disjoint); with ns = 0 the range is returned unchanged."""
    if ns == 0:
        return 0, j0, j1
    if j1 <= j0:
        return ns, ns, ns
    if ns >= j0:
        return 0, 0, max(j1, ns)
    return ns, j0, j1


def _sink_bias(i0, i1, jidx, mask, q_offset, k_offset, g, dtype):
    """tile_bias for the key indices ``jidx`` of a mask with sink keys (not memoised)."""
    p = torch.arange(q_offset + i0, q_offset + i1, device=jidx.device)
    s = jidx + k_offset
    lo, hi = _bounds(p, mask)
    m = ((s[None, :] >= lo[:, None]) & (s[None, :] <= hi[:, None])) | (s < mask.sink)[None, :]
    if bool(m.all()):
        return None
    bias = torch.zeros(m.shape, dtype=dtype, device=jidx.device).masked_fill_(~m, _NEG_INF)
    if g > 1:
        bias = bias.unsqueeze(0).expand(g, -1, -1).reshape(g * (i1 - i0), s.numel())
    return bias.unsqueeze(0)


def _tile_keys(js, j0, j1, device):
    return torch.cat([torch.arange(js, device=device), torch.arange(j0, j1, device=device)])


def rotate(x, offset, inv_freq, interleaved, cdt, inverse=False):
    x = x.to(cdt)
    if inv_freq is None or inv_freq.numel() == 0:
        return x
    pos = torch.arange(offset, offset + x.shape[-2], device=x.device)
    return apply_rope(x, pos, inv_freq, interleaved, inverse)


def supports_forward(**_):
    return None


def _prepare(q, k, inv_freq, q_offset, k_offset, scale, interleaved):
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    cdt = _cdtype(q.dtype)
    qr = rotate(q, q_offset, inv_freq, interleaved, cdt) * scale
    qr = qr.view(B, Hk, (Hq // Hk) * Nq, D) if Hq == Hk else qr.view(B, Hk, Hq // Hk, Nq, D)
    kr = rotate(k, k_offset, inv_freq, interleaved, cdt)
    return qr, kr.reshape(B * Hk, Nk, D), cdt


def _q_tile(qr, i0, i1, B, Hk, g, D):
    if qr.dim() == 4:  # g == 1
        return qr[:, :, i0:i1].reshape(B * Hk, i1 - i0, D)
    return qr[:, :, :, i0:i1].reshape(B * Hk, g * (i1 - i0), D)


def min_key_length(key_lengths, nk):
    if key_lengths is None:
        return nk
    return int(key_lengths.min().item()) if key_lengths.numel() else 0


class _RotatedKeys:
    """Keys rotated lazily in blocks of KB and dropped once no later tile can need them: tiles
    read monotone key ranges, so at most ceil((W + tq) / KB) + 1 blocks are alive at a time and
    every key is rotated exactly once."""

    KB = 256

    def __init__(self, k, k_offset, inv_freq, interleaved, cdt):
        B, Hk, Nk, D = k.shape
        self.k, self.k_offset, self.inv_freq, self.interleaved, self.cdt = (
            k, k_offset, inv_freq, interleaved, cdt)
        self.flat = B * Hk
        self.plain = None
        if inv_freq is None or inv_freq.numel() == 0:
            self.plain = k.to(cdt).reshape(B * Hk, Nk, D)
        self.blocks = {}

    def _block(self, b):
        t = self.blocks.get(b)
        if t is None:
            a = b * self.KB
            e = min(self.k.shape[2], a + self.KB)
            t = rotate(self.k[:, :, a:e], self.k_offset + a, self.inv_freq, self.interleaved,
                        self.cdt).reshape(self.flat, e - a, self.k.shape[3])
            self.blocks[b] = t
        return t

    def get(self, j0, j1):
        if self.plain is not None:
            return self.plain[:, j0:j1]
        b0, b1 = j0 // self.KB, (j1 - 1) // self.KB
        for b in [b for b in self.blocks if b < b0]:
            del self.blocks[b]
        parts = [self._block(b)[:, max(j0, b * self.KB) - b * self.KB:
                                min(j1, (b + 1) * self.KB) - b * self.KB]
                 for b in range(b0, b1 + 1)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _flops(q, k, mask):
    """Rough arithmetic of one pass (q k^T and p v over each query's window)."""
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    w = Nk if mask.lo_off < 0 else min(Nk, mask.lo_off + mask.hi_off + mask.block + mask.sink)
    return 4.0 * B * Hq * Nq * max(w, 1) * D


def magnitudes(*tensors):
    """Each tensor's largest magnitude as a float (0.0 for None or empty; inf where it holds an
    inf, NaN where a NaN): one host synchronisation for all of them (aminmax: one vectorised
    pass; on one CPU thread ~15-25x faster than an isfinite pass at 1-2k positions, ~1.7x at a
    streaming step's size)."""
    live = [t for t in tensors if t is not None and t.numel()]
    if not live:
        return [0.0] * len(tensors)
    # float64 only where a tensor is (a device without float64, MPS, never needs it)
    dt = torch.float64 if any(t.dtype == torch.float64 for t in live) else torch.float32
    ends = torch.stack([torch.stack(torch.aminmax(t.detach())).to(dt) for t in live])
    vals = iter(ends.abs().amax(1).tolist())            # NaN propagates through both
    return [next(vals) if t is not None and t.numel() else 0.0 for t in tensors]


def all_finite(*tensors):
    """True when no tensor holds a NaN or inf (one host synchronisation for all of them)."""
    return all(math.isfinite(m) for m in magnitudes(*tensors))


def overflow_risk(cdt, *bounds):
    """Whether a product bounded by one of ``bounds`` (floats, from ``magnitudes``) may overflow
    ``cdt``, with room for the sums after it. Finite inputs whose scores cannot overflow take the
    fast path (the mask added to the product); others fill the mask in (tile_scores ``safe``)."""
    lim = torch.finfo(cdt).max / 16
    return any(not b < lim for b in bounds)


def _score_bound(q, mags_qk, scale, relbias, mags_bias):
    """|score| <= D * max|q| * max|k| * |scale| (Cauchy-Schwarz; RoPE keeps each pair's norm)
    plus the relative bias's max|table| * max|gate|."""
    aq, ak = mags_qk
    bound = q.shape[-1] * aq * ak * abs(scale)
    if relbias is not None:
        arel, agate = mags_bias
        bound += arel * (1.0 if relbias.gate is None else agate)
    return bound


def finite_or_zero(x):
    """x with every NaN / inf entry replaced by 0 (a new tensor; autograd: zero gradient there)."""
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def nonfinite_rows(x):
    """(..., N) bool: row has a NaN / inf entry."""
    return ~torch.isfinite(x).all(-1)


def visible_key_ranges(Nq, B, key_lengths, Nk, mask, q_offset, k_offset, device):
    """Keys j in [jlo[i], jhi[b, i]) are the ones query i of batch item b sees in its interval
    (IntervalMask ``mask``, sink keys aside): jlo (Nq,), jhi (B, Nq) int64, empty when
    jhi <= jlo."""
    p = torch.arange(q_offset, q_offset + Nq, device=device)
    lo, hi = _bounds(p, mask)
    jlo = (lo - k_offset).clamp_(0, Nk)
    lim = (torch.full((B,), Nk, dtype=torch.int64, device=device) if key_lengths is None
           else key_lengths.to(device=device, dtype=torch.int64).clamp(0, Nk))
    jhi = torch.minimum((hi - k_offset + 1).clamp(0, Nk)[None, :], lim[:, None])
    return jlo, torch.maximum(jhi, jlo[None, :])


def _sink_counts(B, key_lengths, Nk, k_offset, sink, device):
    """(B,) int64 sink keys of each batch item that are real keys (None when there are none)."""
    ns = min(Nk, max(0, sink - k_offset))
    if ns == 0:
        return None
    n = torch.full((B,), ns, dtype=torch.int64, device=device)
    if key_lengths is not None:
        n = torch.minimum(n, key_lengths.to(device=device, dtype=torch.int64).clamp(0, Nk))
    return n


def _sink_poison(kvbad, nsb, Hq):
    """(B, Hq) bool: a visible sink key of (b, kv head) has a non-finite k or v row."""
    B, Hk, Nk = kvbad.shape
    insink = torch.arange(Nk, device=kvbad.device)[None, :] < nsb[:, None]
    return (kvbad & insink[:, None, :]).any(-1).repeat_interleave(Hq // Hk, dim=1)


def poisoned_rows(qbad, kvbad, ranges, Hq):
    """(B, Hq, Nq) bool: rows that see a key with kvbad (B, Hk, Nk), or have qbad (B, Hq, Nq) (or
    None) and see any key; ``ranges`` from visible_key_ranges."""
    jlo, jhi = ranges
    B, Hk, Nk = kvbad.shape
    cum = torch.zeros(B, Hk, Nk + 1, dtype=torch.int64, device=kvbad.device)
    torch.cumsum(kvbad.to(torch.int64), -1, out=cum[:, :, 1:])
    nq = jlo.numel()
    hits = (cum.gather(-1, jhi[:, None, :].expand(B, Hk, nq))
            - cum.gather(-1, jlo[None, None, :].expand(B, Hk, nq))) > 0
    bad = hits.repeat_interleave(Hq // Hk, dim=1)
    if qbad is not None:
        bad |= qbad & (jhi > jlo[None, :])[:, None, :]
    return bad


def keys_seen_by(rowbad, Hk, Nk, key_lengths, mask, q_offset, k_offset):
    """(B, Hk, Nk) bool: key j of kv head hk is in the interval (IntervalMask ``mask``, sink keys
    aside) of a row with rowbad (B, Hq, Nq)."""
    B, Hq, Nq = rowbad.shape
    dev = rowbad.device
    p = torch.arange(q_offset, q_offset + Nq, device=dev)
    lo, hi = _bounds(p, mask)
    s = torch.arange(k_offset, k_offset + Nk, device=dev)
    ia = torch.searchsorted(hi.contiguous(), s, right=False)
    ib = torch.searchsorted(lo.contiguous(), s, right=True)
    ib = torch.maximum(ib, ia)
    g = Hq // Hk
    rb = rowbad.view(B, Hk, g, Nq).any(2)
    cum = torch.zeros(B, Hk, Nq + 1, dtype=torch.int64, device=dev)
    torch.cumsum(rb.to(torch.int64), -1, out=cum[:, :, 1:])
    seen = (cum[:, :, ib] - cum[:, :, ia]) > 0
    if key_lengths is not None:
        seen &= (torch.arange(Nk, device=dev)[None, :]
                 < key_lengths.to(dev, torch.int64)[:, None])[:, None, :]
    return seen


def forward(q, k, v, inv_freq, key_lengths, block, lo_off, hi_off, q_offset, k_offset, scale,
            interleaved, sink=0, kb=None, rel_bias=None, gate=None, rel_offset=0):
    """Returns (out (B, Hq, Nq, D) in q's dtype, lse (B, Hq, Nq) float32/float64); non-finite
    inputs poison the rows that see them (module docstring). ``rel_bias`` (Hq, L) / ``gate``
    (B, Hq, Nq) or None / ``rel_offset``: the relative-position bias added to the scores (see
    _RelBias: with sink keys, a sink key whose offset s - p lies outside the table reads the
    nearest edge column, the saturated bucket rule); a non-finite gate entry poisons its row
    like a non-finite q row. On CPU the call runs with the thread count of
    pyencoder._cpu_threads (work size and machine load; one thread when busy)."""
    mask, relbias = _mask_and_bias(block, lo_off, hi_off, sink, kb, rel_bias, gate, rel_offset)
    with threads_for(_flops(q, k, mask), q.device):
        return _forward_checked(q, k, v, inv_freq, key_lengths, mask, q_offset, k_offset, scale,
                                interleaved, relbias)


def _mask_and_bias(block, lo_off, hi_off, sink, kb, rel_bias, gate, rel_offset):
    """The entry points' ints as (IntervalMask, Bias or None); refuses a bias with a frame-rate
    mask."""
    kb = block if kb is None else kb
    if rel_bias is not None and kb != block:
        raise ValueError(f"rel_bias with a frame-rate mask is not supported; got k_block={kb} "
                         f"!= block={block}")
    mask = IntervalMask(block, lo_off, hi_off, kb, sink)
    return mask, None if rel_bias is None else Bias(rel_bias, gate, rel_offset)


def _forward_checked(q, k, v, inv_freq, key_lengths, mask, q_offset, k_offset, scale,
                     interleaved, relbias):
    gate = None if relbias is None else relbias.gate
    table = None if relbias is None else relbias.rel_bias
    aq, ak, av, agate, arel = magnitudes(q, k, v, gate, table)
    if all(math.isfinite(m) for m in (aq, ak, av, agate)):     # (a non-finite table: safe)
        safe = overflow_risk(_cdtype(q.dtype),
                             _score_bound(q, (aq, ak), scale, relbias, (arel, agate)))
        return _forward(q, k, v, inv_freq, key_lengths, mask, q_offset, k_offset, scale,
                        interleaved, relbias, safe)
    B, Hq, Nq, _ = q.shape
    ranges = visible_key_ranges(Nq, B, key_lengths, k.shape[2], mask, q_offset, k_offset,
                                q.device)
    kvbad = nonfinite_rows(k) | nonfinite_rows(v)
    qbad = nonfinite_rows(q)
    if gate is not None:
        qbad = qbad | ~torch.isfinite(gate)
        relbias = relbias._replace(gate=finite_or_zero(gate))
    bad = poisoned_rows(qbad, kvbad, ranges, Hq)
    nsb = _sink_counts(B, key_lengths, k.shape[2], k_offset, mask.sink, q.device)
    if nsb is not None:
        bad |= _sink_poison(kvbad, nsb, Hq)[:, :, None] | (qbad & (nsb > 0)[:, None, None])
    out, lse = _forward(finite_or_zero(q), finite_or_zero(k), finite_or_zero(v), inv_freq,
                        key_lengths, mask, q_offset, k_offset, scale, interleaved, relbias,
                        safe=True)
    return out.masked_fill_(bad[..., None], float("nan")), lse.masked_fill_(bad, float("nan"))


def _forward(q, k, v, inv_freq, key_lengths, mask, q_offset, k_offset, scale, interleaved,
             relbias=None, safe=False):
    """forward() for finite inputs. Working memory beyond the output is O(tile * W): q is rotated
    tile by tile and k block by block (each exactly once), never as whole rotated copies.
    ``safe``: scores may overflow (tile_scores)."""
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    Dv = v.shape[-1]
    g = Hq // Hk
    cdt = _cdtype(q.dtype)
    keys = _RotatedKeys(k, k_offset, inv_freq, interleaved, cdt)
    queries = _RotatedKeys(q, q_offset, inv_freq, interleaved, cdt)   # same lazy blocks for q
    biases = _Biases(mask, q_offset, k_offset, g, cdt, q.device)
    vc = v.to(cdt).reshape(B * Hk, Nk, Dv)
    out = torch.zeros(B, Hk, g, Nq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hk, g, Nq), _NEG_INF, dtype=cdt, device=q.device)
    nk_eff = key_limit(key_lengths, Nk)
    min_len = min_key_length(key_lengths, Nk)
    ns = _sink_keys(k_offset, mask.sink, nk_eff)
    if ns:
        sink_k = rotate(k[:, :, :ns], k_offset, inv_freq, interleaved, cdt).reshape(B * Hk, ns, D)
    rel = None if relbias is None else _RelBias(relbias, q_offset, k_offset, B, Hk, g, cdt)
    for i0, i1, j0, j1 in query_tiles(Nq, nk_eff, mask, q_offset, k_offset):
        js, j0, j1 = _sink_split(j0, j1, ns)
        if j1 <= j0 and js == 0:
            continue
        tq = i1 - i0
        qt = (queries.get(i0, i1) * scale).reshape(B * Hk, g * tq, D)
        if ns == 0:
            bias = biases.get(i0, i1, j0, j1)
            s = tile_scores(qt, keys.get(j0, j1), bias, key_lengths, min_len, j0, j1, B, Hk,
                            safe=safe)
            vt = vc[:, j0:j1]
            if rel is not None:
                rel.add_to(s, rel.index(i0, i1, j0, j1), i0, i1)
        else:
            jidx = _tile_keys(js, j0, j1, q.device)
            bias = _sink_bias(i0, i1, jidx, mask, q_offset, k_offset, g, cdt)
            kt = keys.get(j0, j1) if j1 > j0 else sink_k[:, :0]
            kt = torch.cat([sink_k[:, :js], kt], 1) if js else kt
            vt = torch.cat([vc[:, :js], vc[:, j0:j1]], 1) if js else vc[:, j0:j1]
            s = tile_scores(qt, kt, bias, key_lengths, min_len, j0, max(j1, js), B, Hk, jidx,
                            safe)
            if rel is not None:
                rel.add_to(s, rel.index(i0, i1, j0, j1, jidx), i0, i1)
        m = torch.logsumexp(s, dim=-1, keepdim=True)
        m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = s.sub_(m_safe).exp_()
        o = torch.bmm(p, vt)
        out[:, :, :, i0:i1] = o.view(B, Hk, g, tq, Dv)
        lse[:, :, :, i0:i1] = m.view(B, Hk, g, tq)
    return out.view(B, Hq, Nq, Dv), lse.view(B, Hq, Nq).to(
        torch.float64 if cdt == torch.float64 else torch.float32)


def backward(dout, q, k, v, out, lse, inv_freq, key_lengths, block, lo_off, hi_off, q_offset,
             k_offset, scale, interleaved, deterministic=True, sink=0, kb=None,
             rel_bias=None, gate=None, rel_offset=0):
    """Returns (dq, dk, dv) in the dtypes of q, k, v; NaN rows as in the module docstring. With
    ``rel_bias``: (dq, dk, dv, drel_bias, dgate) (dgate None without a gate); dgate is NaN on the
    rows where dq is, and those rows add nothing to drel_bias. Thread count as in forward."""
    mask, relbias = _mask_and_bias(block, lo_off, hi_off, sink, kb, rel_bias, gate, rel_offset)
    with threads_for(2.5 * _flops(q, k, mask), q.device):
        res = _backward_checked(dout, q, k, v, out, lse, inv_freq, key_lengths, mask, q_offset,
                                k_offset, scale, interleaved, relbias)
    return res if rel_bias is not None else res[:3]


def _backward_checked(dout, q, k, v, out, lse, inv_freq, key_lengths, mask, q_offset, k_offset,
                      scale, interleaved, relbias):
    gate = None if relbias is None else relbias.gate
    table = None if relbias is None else relbias.rel_bias
    ado, aq, ak, av, agate, aout, arel, alse = magnitudes(dout, q, k, v, gate, out, table, lse)
    if all(math.isfinite(m) for m in (ado, aq, ak, av, agate)) and not math.isnan(alse):
        # dp = dout . v and delta = dout . out (Dv each) beside the scores
        Dv = v.shape[-1]
        safe = overflow_risk(_cdtype(q.dtype),
                             _score_bound(q, (aq, ak), scale, relbias, (arel, agate)),
                             Dv * ado * av, Dv * ado * aout)
        return _backward(dout, q, k, v, out, lse, inv_freq, key_lengths, mask, q_offset,
                         k_offset, scale, interleaved, None, relbias, safe)
    B, Hq, Nq, _ = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    jlo, jhi = visible_key_ranges(Nq, B, key_lengths, Nk, mask, q_offset, k_offset, q.device)
    sees = (jhi > jlo[None, :])[:, None, :]
    nsb = _sink_counts(B, key_lengths, Nk, k_offset, mask.sink, q.device)
    if nsb is not None:
        sees = sees | (nsb > 0)[:, None, None]
    rowbad = (torch.isnan(lse) | nonfinite_rows(dout) | nonfinite_rows(out)) & sees
    if gate is not None:
        relbias = relbias._replace(gate=finite_or_zero(gate))
    dq, dk, dv, drel, dgate = _backward(
        finite_or_zero(dout), finite_or_zero(q), finite_or_zero(k), finite_or_zero(v),
        finite_or_zero(out), lse, inv_freq, key_lengths, mask, q_offset, k_offset, scale,
        interleaved, rowbad, relbias, safe=True)
    colbad = keys_seen_by(rowbad, Hk, Nk, key_lengths, mask, q_offset, k_offset)
    if nsb is not None:
        anybad = rowbad.view(B, Hk, Hq // Hk, Nq).any(-1).any(-1)             # (B, Hk)
        insink = torch.arange(Nk, device=q.device)[None, :] < nsb[:, None]    # (B, Nk)
        colbad |= anybad[:, :, None] & insink[:, None, :]
    nan = float("nan")
    if dgate is not None:
        dgate.masked_fill_(rowbad, nan)
    return (dq.masked_fill_(rowbad[..., None], nan), dk.masked_fill_(colbad[..., None], nan),
            dv.masked_fill_(colbad[..., None], nan), drel, dgate)


def _backward(dout, q, k, v, out, lse, inv_freq, key_lengths, mask, q_offset, k_offset, scale,
              interleaved, rowbad, relbias=None, safe=False):
    """backward() for finite inputs; rows with rowbad (B, Hq, Nq) (or None) take no part;
    ``relbias`` a Bias or None. Returns (dq, dk, dv, drel_bias or None, dgate or None).
    ``safe``: a product may overflow: masked pairs get ds = 0 by a fill (p = 0 times an
    overflowed dout . v was NaN), and tile_scores fills the mask in."""
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    Dv = v.shape[-1]
    g = Hq // Hk
    qr, kr, cdt = _prepare(q, k, inv_freq, q_offset, k_offset, scale, interleaved)
    vc = v.to(cdt).reshape(B * Hk, Nk, Dv)
    do = dout.to(cdt).view(B, Hk, g, Nq, Dv)
    lse_c = lse.to(cdt).view(B, Hk, g, Nq, 1)
    lse_c = torch.where(torch.isfinite(lse_c), lse_c, torch.zeros_like(lse_c))
    if rowbad is not None:
        lse_c = lse_c.masked_fill(rowbad.view(B, Hk, g, Nq, 1), float("inf"))
    delta = (do * out.to(cdt).view(B, Hk, g, Nq, Dv)).sum(-1, keepdim=True)
    dq = torch.zeros(B, Hk, g, Nq, D, dtype=cdt, device=q.device)
    dk = torch.zeros(B * Hk, Nk, D, dtype=cdt, device=q.device)
    dv = torch.zeros(B * Hk, Nk, Dv, dtype=cdt, device=q.device)
    nk_eff = key_limit(key_lengths, Nk)
    min_len = min_key_length(key_lengths, Nk)
    biases = _Biases(mask, q_offset, k_offset, g, cdt, q.device)
    ns = _sink_keys(k_offset, mask.sink, nk_eff)
    rel = drel = dgate = None
    if relbias is not None:
        rel = _RelBias(relbias, q_offset, k_offset, B, Hk, g, cdt)
        drel = torch.zeros(relbias.rel_bias.shape, dtype=cdt, device=q.device)
        if relbias.gate is not None:
            dgate = torch.zeros(B, Hk, g, Nq, dtype=cdt, device=q.device)
    for i0, i1, j0, j1 in query_tiles(Nq, nk_eff, mask, q_offset, k_offset):
        js, j0, j1 = _sink_split(j0, j1, ns)
        if j1 <= j0 and js == 0:
            continue
        tq = i1 - i0
        qt = _q_tile(qr, i0, i1, B, Hk, g, D)
        if ns == 0:
            bias = biases.get(i0, i1, j0, j1)
            kt, vt = kr[:, j0:j1], vc[:, j0:j1]
            s = tile_scores(qt, kt, bias, key_lengths, min_len, j0, j1, B, Hk, safe=safe)
            if rel is not None:
                idx = rel.index(i0, i1, j0, j1)
                rel.add_to(s, idx, i0, i1)
        else:
            jidx = _tile_keys(js, j0, j1, q.device)
            bias = _sink_bias(i0, i1, jidx, mask, q_offset, k_offset, g, cdt)
            kt = torch.cat([kr[:, :js], kr[:, j0:j1]], 1) if js else kr[:, j0:j1]
            vt = torch.cat([vc[:, :js], vc[:, j0:j1]], 1) if js else vc[:, j0:j1]
            s = tile_scores(qt, kt, bias, key_lengths, min_len, j0, max(j1, js), B, Hk, jidx,
                            safe)
            if rel is not None:
                idx = rel.index(i0, i1, j0, j1, jidx)
                rel.add_to(s, idx, i0, i1)
        dead = torch.isneginf(s) if safe else None      # masked and padded pairs
        p = s.sub_(lse_c[:, :, :, i0:i1].reshape(B * Hk, g * tq, 1)).exp_()
        dot = do[:, :, :, i0:i1].reshape(B * Hk, g * tq, Dv)
        dvt = torch.bmm(p.transpose(-1, -2), dot)
        dp = torch.bmm(dot, vt.transpose(-1, -2))
        ds = p.mul_(dp.sub_(delta[:, :, :, i0:i1].reshape(B * Hk, g * tq, 1)))
        if dead is not None:
            ds.masked_fill_(dead, 0.0)
        if rel is not None:
            rel.grads(ds, idx, i0, i1, drel, dgate)
        dq[:, :, :, i0:i1] = torch.bmm(ds, kt).view(B, Hk, g, tq, D)
        dkt = torch.bmm(ds.transpose(-1, -2), qt)
        if js:
            dv[:, :js] += dvt[:, :js]
            dk[:, :js] += dkt[:, :js]
        dv[:, j0:j1] += dvt[:, js:]
        dk[:, j0:j1] += dkt[:, js:]
    # q was pre-scaled: dS/dk carries one factor of scale through qt, dS/dq needs it explicitly.
    dq = rotate(dq.view(B, Hq, Nq, D).mul_(scale), q_offset, inv_freq, interleaved, cdt,
                 inverse=True)
    dk = rotate(dk.view(B, Hk, Nk, D), k_offset, inv_freq, interleaved, cdt, inverse=True)
    if drel is not None:
        drel = drel.to(relbias.rel_bias.dtype)
    if dgate is not None:
        dgate = dgate.view(B, Hq, Nq).to(relbias.gate.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.view(B, Hk, Nk, Dv).to(v.dtype), drel, dgate
