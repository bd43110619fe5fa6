"""Plain-torch interval attention: the CPU production path and the test oracle for the kernels.

Computes, for query i at absolute position p = q_offset + i and key j at s = k_offset + j,

    base(p) = (p // block) * block
    lo(p)   = base(p) - lo_off          (lo_off < 0: unbounded, lo = -inf)
    hi(p)   = base(p) + hi_off
    visible(i, j) = lo(p) <= s <= hi(p)  and  j < key_lengths[b]

    band(left, right):             block = 1,     lo_off = left,          hi_off = right
    chunked(chunk, left_chunks, la): block = chunk, lo_off = left_chunks*chunk, hi_off = chunk-1+la

with RoPE (inv_freq, NeoX or interleaved, partial rotary) applied to q and k at their absolute
positions, softmax(scale * q k^T) over visible keys, and the zero-row rule (no visible key: output 0,
lse = -inf, zero gradient).

Algorithm: blocked over query tiles. A tile of queries only reads keys in
[lo(first query), hi(last query)] (lo and hi are non-decreasing), so time and memory are O(N * W),
never O(N^2); no dense N x N mask is ever built. Half/bf16 inputs are computed in float32 (the
"upcast" oracle), float64 stays float64. GQA (Hq a multiple of Hk) is handled by viewing q as
(B, Hk, Hq/Hk, N, D), so k and v are never repeated. The backward recomputes probabilities from the
saved log-sum-exp (FlashAttention's recurrence) tile by tile, so it also needs O(N * W) memory.
"""
import torch

from .._cpu_threads import threads_for
from ..rope import apply_rope

_NEG_INF = float("-inf")


def _cdtype(dt):
    return torch.float64 if dt == torch.float64 else torch.float32


def _bounds(p, block, lo_off, hi_off):
    base = torch.div(p, block, rounding_mode="floor") * block
    hi = base + hi_off
    if lo_off < 0:
        lo = torch.full_like(p, torch.iinfo(torch.int64).min // 4)
    else:
        lo = base - lo_off
    return lo, hi


def _bound_scalar(p, block, lo_off, hi_off):
    base = (p // block) * block
    return (None if lo_off < 0 else base - lo_off), base + hi_off


def _tile_size(nq, block, lo_off, hi_off):
    # A tile of tq queries reads tq + W - 1 keys for W visible ones: small tiles waste less work,
    # large ones amortise per-tile overhead. Measured on a 2-core CPU (H=12, D=64): tq=64 is best
    # or within noise of best for W in 54..254 and for unbounded history at N=1500; tq=256 is up
    # to 1.8x slower.
    if lo_off < 0:
        return 128
    w = lo_off + hi_off + block
    return int(min(128, max(32, w // 4)))


def _key_limit(key_lengths, nk):
    if key_lengths is None:
        return nk
    return int(min(nk, int(key_lengths.max().item()))) if key_lengths.numel() else 0


def _tiles(nq, nk_eff, block, lo_off, hi_off, q_offset, k_offset):
    """Yield (i0, i1, j0, j1): query tile and the key range it can see (j1 > j0)."""
    tq = _tile_size(nq, block, lo_off, hi_off)
    for i0 in range(0, nq, tq):
        i1 = min(nq, i0 + tq)
        lo, _ = _bound_scalar(q_offset + i0, block, lo_off, hi_off)
        _, hi = _bound_scalar(q_offset + i1 - 1, block, lo_off, hi_off)
        j0 = 0 if lo is None else max(0, lo - k_offset)
        j1 = min(nk_eff, hi - k_offset + 1)
        yield i0, i1, j0, j1


def _tile_bias(i0, i1, j0, j1, block, lo_off, hi_off, q_offset, k_offset, g, dtype, device):
    """Additive (1, g*tq, tk) bias of the tile's positional mask (0 or -inf), or None when every
    query of the tile sees every key of the range."""
    p = torch.arange(q_offset + i0, q_offset + i1, device=device)
    s = torch.arange(k_offset + j0, k_offset + j1, device=device)
    lo, hi = _bounds(p, block, lo_off, hi_off)
    m = (s[None, :] >= lo[:, None]) & (s[None, :] <= hi[:, None])
    if bool(m.all()):
        return None
    bias = torch.zeros(m.shape, dtype=dtype, device=device).masked_fill_(~m, _NEG_INF)
    if g > 1:
        bias = bias.unsqueeze(0).expand(g, -1, -1).reshape(g * (i1 - i0), j1 - j0)
    return bias.unsqueeze(0)


class _Biases:
    """_tile_bias memoised by what determines it: the tile's shape (tq, tk), the offset p0 - s0
    of its first query and key and the first query's phase p0 % block (lo/hi of p0 + a minus
    s0 depend on nothing else). Interior tiles of a band or chunked mask share one entry; at
    most 8 are kept."""

    def __init__(self, block, lo_off, hi_off, q_offset, k_offset, g, dtype, device):
        self.args = (block, lo_off, hi_off, q_offset, k_offset, g, dtype, device)
        self.memo = {}

    def get(self, i0, i1, j0, j1):
        block, _, _, q_offset, k_offset = self.args[:5]
        p0, s0 = q_offset + i0, k_offset + j0
        key = (i1 - i0, j1 - j0, p0 - s0, p0 % block)
        if key not in self.memo:
            if len(self.memo) >= 8:
                self.memo.clear()
            self.memo[key] = _tile_bias(i0, i1, j0, j1, *self.args)
        return self.memo[key]


def _tile_scores(qt, kt, bias, key_lengths, min_len, j0, j1, B, Hk):
    """Scaled, masked scores (B*Hk, g*tq, tk): q was pre-scaled."""
    if bias is None:
        s = torch.bmm(qt, kt.transpose(-1, -2))
    else:
        s = torch.baddbmm(bias, qt, kt.transpose(-1, -2))
    if key_lengths is not None and j1 > min_len:
        j = torch.arange(j0, j1, device=s.device)
        pad = j[None, :] >= key_lengths.to(s.device)[:, None]  # (B, tk)
        s.view(B, Hk, -1, j1 - j0).masked_fill_(pad[:, None, None, :], _NEG_INF)
    return s


def _rotate(x, offset, inv_freq, interleaved, cdt, inverse=False):
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
    qr = _rotate(q, q_offset, inv_freq, interleaved, cdt) * scale
    qr = qr.view(B, Hk, (Hq // Hk) * Nq, D) if Hq == Hk else qr.view(B, Hk, Hq // Hk, Nq, D)
    kr = _rotate(k, k_offset, inv_freq, interleaved, cdt)
    return qr, kr.reshape(B * Hk, Nk, D), cdt


def _q_tile(qr, i0, i1, B, Hk, g, D):
    if qr.dim() == 4:  # g == 1
        return qr[:, :, i0:i1].reshape(B * Hk, i1 - i0, D)
    return qr[:, :, :, i0:i1].reshape(B * Hk, g * (i1 - i0), D)


def _min_len(key_lengths, nk):
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
            t = _rotate(self.k[:, :, a:e], self.k_offset + a, self.inv_freq, self.interleaved,
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


def _flops(q, k, block, lo_off, hi_off):
    """Rough arithmetic of one pass (q k^T and p v over each query's window)."""
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    w = Nk if lo_off < 0 else min(Nk, lo_off + hi_off + block)
    return 4.0 * B * Hq * Nq * max(w, 1) * D


def forward(q, k, v, inv_freq, key_lengths, block, lo_off, hi_off, q_offset, k_offset, scale,
            interleaved):
    """Returns (out (B, Hq, Nq, D) in q's dtype, lse (B, Hq, Nq) float32/float64).

    Working memory beyond the output is O(tile * W): q is rotated tile by tile and k block by
    block (each exactly once), never as whole rotated copies. On CPU the call runs with the
    thread count of pyencoder._cpu_threads (work size and machine load; one thread when busy)."""
    with threads_for(_flops(q, k, block, lo_off, hi_off), q.device):
        return _forward(q, k, v, inv_freq, key_lengths, block, lo_off, hi_off, q_offset, k_offset,
                        scale, interleaved)


def _forward(q, k, v, inv_freq, key_lengths, block, lo_off, hi_off, q_offset, k_offset, scale,
             interleaved):
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    Dv = v.shape[-1]
    g = Hq // Hk
    cdt = _cdtype(q.dtype)
    keys = _RotatedKeys(k, k_offset, inv_freq, interleaved, cdt)
    queries = _RotatedKeys(q, q_offset, inv_freq, interleaved, cdt)   # same lazy blocks for q
    biases = _Biases(block, lo_off, hi_off, q_offset, k_offset, g, cdt, q.device)
    vc = v.to(cdt).reshape(B * Hk, Nk, Dv)
    out = torch.zeros(B, Hk, g, Nq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hk, g, Nq), _NEG_INF, dtype=cdt, device=q.device)
    nk_eff = _key_limit(key_lengths, Nk)
    min_len = _min_len(key_lengths, Nk)
    for i0, i1, j0, j1 in _tiles(Nq, nk_eff, block, lo_off, hi_off, q_offset, k_offset):
        if j1 <= j0:
            continue
        tq = i1 - i0
        qt = (queries.get(i0, i1) * scale).view(B * Hk, g * tq, D)
        bias = biases.get(i0, i1, j0, j1)
        s = _tile_scores(qt, keys.get(j0, j1), bias, key_lengths, min_len, j0, j1, B, Hk)
        m = torch.logsumexp(s, dim=-1, keepdim=True)
        m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = s.sub_(m_safe).exp_()
        o = torch.bmm(p, vc[:, j0:j1])
        out[:, :, :, i0:i1] = o.view(B, Hk, g, tq, Dv)
        lse[:, :, :, i0:i1] = m.view(B, Hk, g, tq)
    return out.view(B, Hq, Nq, Dv), lse.view(B, Hq, Nq).to(
        torch.float64 if cdt == torch.float64 else torch.float32)


def backward(dout, q, k, v, out, lse, inv_freq, key_lengths, block, lo_off, hi_off, q_offset,
             k_offset, scale, interleaved, deterministic=True):
    """Returns (dq, dk, dv) in the dtypes of q, k, v. Thread count as in forward."""
    with threads_for(2.5 * _flops(q, k, block, lo_off, hi_off), q.device):
        return _backward(dout, q, k, v, out, lse, inv_freq, key_lengths, block, lo_off, hi_off,
                         q_offset, k_offset, scale, interleaved)


def _backward(dout, q, k, v, out, lse, inv_freq, key_lengths, block, lo_off, hi_off, q_offset,
              k_offset, scale, interleaved):
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    Dv = v.shape[-1]
    g = Hq // Hk
    qr, kr, cdt = _prepare(q, k, inv_freq, q_offset, k_offset, scale, interleaved)
    vc = v.to(cdt).reshape(B * Hk, Nk, Dv)
    do = dout.to(cdt).view(B, Hk, g, Nq, Dv)
    lse_c = lse.to(cdt).view(B, Hk, g, Nq, 1)
    lse_c = torch.where(torch.isfinite(lse_c), lse_c, torch.zeros_like(lse_c))
    delta = (do * out.to(cdt).view(B, Hk, g, Nq, Dv)).sum(-1, keepdim=True)
    dq = torch.zeros(B, Hk, g, Nq, D, dtype=cdt, device=q.device)
    dk = torch.zeros(B * Hk, Nk, D, dtype=cdt, device=q.device)
    dv = torch.zeros(B * Hk, Nk, Dv, dtype=cdt, device=q.device)
    nk_eff = _key_limit(key_lengths, Nk)
    min_len = _min_len(key_lengths, Nk)
    biases = _Biases(block, lo_off, hi_off, q_offset, k_offset, g, cdt, q.device)
    for i0, i1, j0, j1 in _tiles(Nq, nk_eff, block, lo_off, hi_off, q_offset, k_offset):
        if j1 <= j0:
            continue
        tq = i1 - i0
        bias = biases.get(i0, i1, j0, j1)
        qt = _q_tile(qr, i0, i1, B, Hk, g, D)
        kt = kr[:, j0:j1]
        s = _tile_scores(qt, kt, bias, key_lengths, min_len, j0, j1, B, Hk)
        p = s.sub_(lse_c[:, :, :, i0:i1].reshape(B * Hk, g * tq, 1)).exp_()
        dot = do[:, :, :, i0:i1].reshape(B * Hk, g * tq, Dv)
        dv[:, j0:j1] += torch.bmm(p.transpose(-1, -2), dot)
        dp = torch.bmm(dot, vc[:, j0:j1].transpose(-1, -2))
        ds = p.mul_(dp.sub_(delta[:, :, :, i0:i1].reshape(B * Hk, g * tq, 1)))
        dq[:, :, :, i0:i1] = torch.bmm(ds, kt).view(B, Hk, g, tq, D)
        dk[:, j0:j1] += torch.bmm(ds.transpose(-1, -2), qt)
    # q was pre-scaled: dS/dk carries one factor of scale through qt, dS/dq needs it explicitly.
    dq = _rotate(dq.view(B, Hq, Nq, D).mul_(scale), q_offset, inv_freq, interleaved, cdt,
                 inverse=True)
    dk = _rotate(dk.view(B, Hk, Nk, D), k_offset, inv_freq, interleaved, cdt, inverse=True)
    return dq.to(q.dtype), dk.to(k.dtype), dv.view(B, Hk, Nk, Dv).to(v.dtype)
