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
    if lo_off < 0:
        return 256
    w = lo_off + hi_off + block
    return int(min(512, max(64, w // 2)))


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


def _tile_mask(i0, i1, j0, j1, block, lo_off, hi_off, q_offset, k_offset, key_lengths, device):
    """Boolean (B or 1, 1, 1, tq, tk) visibility of the tile."""
    p = torch.arange(q_offset + i0, q_offset + i1, device=device)
    s = torch.arange(k_offset + j0, k_offset + j1, device=device)
    lo, hi = _bounds(p, block, lo_off, hi_off)
    m = (s[None, :] >= lo[:, None]) & (s[None, :] <= hi[:, None])
    m = m[None, None, None]
    if key_lengths is not None:
        j = torch.arange(j0, j1, device=device)
        kl = (j[None, :] < key_lengths.to(device)[:, None])  # (B, tk)
        m = m & kl[:, None, None, None, :]
    return m


def _rotate(x, offset, inv_freq, interleaved, cdt, inverse=False):
    x = x.to(cdt)
    if inv_freq is None or inv_freq.numel() == 0:
        return x
    pos = torch.arange(offset, offset + x.shape[-2], device=x.device)
    return apply_rope(x, pos, inv_freq, interleaved, inverse)


def supports_forward(**_):
    return None


def supports_backward(**_):
    return None


def forward(q, k, v, inv_freq, key_lengths, block, lo_off, hi_off, q_offset, k_offset, scale,
            interleaved):
    """Returns (out (B, Hq, Nq, D) in q's dtype, lse (B, Hq, Nq) float32/float64)."""
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    Dv = v.shape[-1]
    g = Hq // Hk
    cdt = _cdtype(q.dtype)
    qr = _rotate(q, q_offset, inv_freq, interleaved, cdt).view(B, Hk, g, Nq, D)
    kr = _rotate(k, k_offset, inv_freq, interleaved, cdt)
    vc = v.to(cdt)
    out = torch.zeros(B, Hk, g, Nq, Dv, dtype=cdt, device=q.device)
    lse = torch.full((B, Hk, g, Nq), _NEG_INF, dtype=cdt, device=q.device)
    nk_eff = _key_limit(key_lengths, Nk)
    for i0, i1, j0, j1 in _tiles(Nq, nk_eff, block, lo_off, hi_off, q_offset, k_offset):
        if j1 <= j0:
            continue
        tq = i1 - i0
        qt = qr[:, :, :, i0:i1].reshape(B, Hk, g * tq, D)
        s = torch.matmul(qt, kr[:, :, j0:j1].transpose(-1, -2)).view(B, Hk, g, tq, j1 - j0)
        s.mul_(scale)
        mask = _tile_mask(i0, i1, j0, j1, block, lo_off, hi_off, q_offset, k_offset,
                          key_lengths, q.device)
        s.masked_fill_(~mask, _NEG_INF)
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        l = p.sum(dim=-1, keepdim=True)
        o = torch.matmul(p.view(B, Hk, g * tq, j1 - j0), vc[:, :, j0:j1]).view(B, Hk, g, tq, Dv)
        nz = l > 0
        out[:, :, :, i0:i1] = torch.where(nz, o / torch.where(nz, l, torch.ones_like(l)),
                                          torch.zeros_like(o))
        lse[:, :, :, i0:i1] = torch.where(nz, m + torch.log(l), torch.full_like(l, _NEG_INF)).squeeze(-1)
    return out.view(B, Hq, Nq, Dv).to(q.dtype), lse.view(B, Hq, Nq).to(
        torch.float64 if cdt == torch.float64 else torch.float32)


def backward(dout, q, k, v, out, lse, inv_freq, key_lengths, block, lo_off, hi_off, q_offset,
             k_offset, scale, interleaved, deterministic=True):
    """Returns (dq, dk, dv) in the dtypes of q, k, v."""
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    Dv = v.shape[-1]
    g = Hq // Hk
    cdt = _cdtype(q.dtype)
    qr = _rotate(q, q_offset, inv_freq, interleaved, cdt).view(B, Hk, g, Nq, D)
    kr = _rotate(k, k_offset, inv_freq, interleaved, cdt)
    vc = v.to(cdt)
    do = dout.to(cdt).view(B, Hk, g, Nq, Dv)
    lse_c = lse.to(cdt).view(B, Hk, g, Nq, 1)
    delta = (do * out.to(cdt).view(B, Hk, g, Nq, Dv)).sum(-1, keepdim=True)
    dq = torch.zeros(B, Hk, g, Nq, D, dtype=cdt, device=q.device)
    dk = torch.zeros(B, Hk, Nk, D, dtype=cdt, device=q.device)
    dv = torch.zeros(B, Hk, Nk, Dv, dtype=cdt, device=q.device)
    nk_eff = _key_limit(key_lengths, Nk)
    for i0, i1, j0, j1 in _tiles(Nq, nk_eff, block, lo_off, hi_off, q_offset, k_offset):
        if j1 <= j0:
            continue
        tq, tk = i1 - i0, j1 - j0
        qt = qr[:, :, :, i0:i1].reshape(B, Hk, g * tq, D)
        kt = kr[:, :, j0:j1]
        s = torch.matmul(qt, kt.transpose(-1, -2)).view(B, Hk, g, tq, tk) * scale
        mask = _tile_mask(i0, i1, j0, j1, block, lo_off, hi_off, q_offset, k_offset,
                          key_lengths, q.device)
        lt = lse_c[:, :, :, i0:i1]
        lt = torch.where(torch.isfinite(lt), lt, torch.zeros_like(lt))
        p = torch.where(mask, torch.exp(s - lt), torch.zeros_like(s))
        dot = do[:, :, :, i0:i1]
        p2 = p.reshape(B, Hk, g * tq, tk)
        dv[:, :, j0:j1] += torch.matmul(p2.transpose(-1, -2), dot.reshape(B, Hk, g * tq, Dv))
        dp = torch.matmul(dot, vc[:, :, j0:j1].unsqueeze(2).transpose(-1, -2))
        ds = (p * (dp - delta[:, :, :, i0:i1])).mul_(scale)
        ds2 = ds.reshape(B, Hk, g * tq, tk)
        dq[:, :, :, i0:i1] = torch.matmul(ds2, kt).view(B, Hk, g, tq, D)
        dk[:, :, j0:j1] += torch.matmul(ds2.transpose(-1, -2), qt)
    dq = _rotate(dq.view(B, Hq, Nq, D), q_offset, inv_freq, interleaved, cdt, inverse=True)
    dk = _rotate(dk, k_offset, inv_freq, interleaved, cdt, inverse=True)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
