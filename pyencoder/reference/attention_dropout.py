"""Plain-torch interval attention with dropout on the attention probabilities (training mode).

Computes, with the interval mask, RoPE, GQA and zero-row rule of pyencoder.reference.attention,

    P   = softmax(scale * rot(q) rot(k)^T + mask)          (over visible keys; masked entries 0)
    out = (P * keep / (1 - p)) @ v,   keep ~ Bernoulli(1 - p) i.i.d. per (b, h, i, j)

which is transformers' eager attention (softmax, then ``F.dropout(P, p, training=True)``, then
``@ v``): inverted scaling, masked keys stay 0 (their probability is 0 before the mask), rows
with no visible key output 0 with zero gradient. p == 1 drops everything (output 0, nothing
drawn), as F.dropout does.

Algorithm: blocked over the query tiles of pyencoder.reference.attention (``query_tiles``), so a tile
reads only the keys in [lo(first query), hi(last query)]; time and memory are O(N * W), never a
dense N x N mask. Each tile's keep-mask is drawn with ``Tensor.bernoulli_(1 - p, generator)`` on a
(B, Hq, tq, tk) tensor of the compute dtype, tile after tile in query order: the same call
F.dropout makes on CPU, so when one tile covers the whole (B, H, N, N) score matrix (full context,
N <= tile size, no padding) the mask equals eager's for the same RNG state. Otherwise the draw
order differs from eager's, and only the distribution is the same.

The backward is autograd through the tile computations (scores, probabilities and keep-masks of
every tile are kept: O(N * W) activations, no recomputation). Half/bf16 inputs are computed in
float32, float64 stays float64. Limits: plain torch on every device (no fused kernel yet).
Non-finite inputs poison exactly the rows that see them (NaN rows, the rule of
pyencoder.reference.attention; the keep-masks drawn are the same); autograd then gives those rows
zero (not NaN) gradients, and a non-finite upstream gradient is not contained.
"""
import math

import torch

from ..mask import IntervalMask
from .attention import (key_limit, min_key_length, rotate, tile_bias, tile_scores, query_tiles,
                        finite_or_zero, magnitudes, nonfinite_rows, poisoned_rows,
                        visible_key_ranges)


def _cdtype(dt):
    return torch.float64 if dt == torch.float64 else torch.float32


def forward(q, k, v, inv_freq, key_lengths, block, lo_off, hi_off, q_offset, k_offset, scale,
            interleaved, dropout_p, generator=None, return_keep=False):
    """Returns out (B, Hq, Nq, Dv) in q's dtype, differentiable by autograd; with
    ``return_keep=True`` returns (out, keeps), keeps a list of (i0, i1, j0, j1, keep) per tile with
    keep a bool (B, Hq, i1 - i0, j1 - j0) tensor: query rows i0:i1, key columns j0:j1. Entries
    outside every tile have probability 0 and are not drawn."""
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    mask = IntervalMask(block, lo_off, hi_off)
    if not all(math.isfinite(m) for m in magnitudes(q, k, v)):
        ranges = visible_key_ranges(Nq, B, key_lengths, Nk, mask, q_offset, k_offset, q.device)
        bad = poisoned_rows(nonfinite_rows(q), nonfinite_rows(k) | nonfinite_rows(v), ranges, Hq)
        res = forward(finite_or_zero(q), finite_or_zero(k), finite_or_zero(v), inv_freq,
                      key_lengths, block, lo_off, hi_off, q_offset, k_offset, scale, interleaved,
                      dropout_p, generator, return_keep)
        out = (res[0] if return_keep else res).masked_fill(bad[..., None], float("nan"))
        return (out, res[1]) if return_keep else out
    Dv = v.shape[-1]
    g = Hq // Hk
    cdt = _cdtype(q.dtype)
    p_drop = float(dropout_p)
    kr = rotate(k, k_offset, inv_freq, interleaved, cdt).reshape(B * Hk, Nk, D)
    vc = v.to(cdt).reshape(B * Hk, Nk, Dv)
    nk_eff = key_limit(key_lengths, Nk)
    min_len = min_key_length(key_lengths, Nk)
    outs, keeps = [], []
    for i0, i1, j0, j1 in query_tiles(Nq, nk_eff, mask, q_offset, k_offset):
        tq = i1 - i0
        if j1 <= j0:
            outs.append(torch.zeros(B, Hq, tq, Dv, dtype=cdt, device=q.device))
            continue
        tk = j1 - j0
        qt = rotate(q[:, :, i0:i1], q_offset + i0, inv_freq, interleaved, cdt) * scale
        qt = qt.reshape(B * Hk, g * tq, D)
        bias = tile_bias(i0, i1, j0, j1, mask, q_offset, k_offset, g, cdt, q.device)
        # the mask filled in after the product (safe: a masked pair's score is -inf whatever the
        # product; an overflowed one plus the -inf bias was NaN), and the masked probabilities
        # filled with 0 again, so that autograd stops there: their gradient dout . v may overflow
        # (dout is not known here to bound it), and 0 * inf in the softmax's backward was NaN
        # for the whole row
        s = tile_scores(qt, kr[:, j0:j1], bias, key_lengths, min_len, j0, j1, B, Hk,
                        safe=True)
        with torch.no_grad():
            row_visible = torch.isfinite(s).any(-1, keepdim=True)
            dead = torch.isneginf(s)
        lse = torch.logsumexp(torch.where(row_visible, s, torch.zeros_like(s)), -1, keepdim=True)
        prob = torch.exp(s - lse).masked_fill(dead, 0.0)
        if p_drop > 0.0:
            if p_drop >= 1.0:
                noise = torch.zeros(B, Hq, tq, tk, dtype=cdt, device=q.device)
            else:
                noise = torch.empty(B, Hq, tq, tk, dtype=cdt, device=q.device)
                noise.bernoulli_(1.0 - p_drop, generator=generator)
            if return_keep:
                keeps.append((i0, i1, j0, j1, noise != 0))
            if p_drop < 1.0:
                noise.div_(1.0 - p_drop)
            prob = prob * noise.view(B * Hk, g * tq, tk)
        elif return_keep:
            keeps.append((i0, i1, j0, j1,
                          torch.ones(B, Hq, tq, tk, dtype=torch.bool, device=q.device)))
        o = torch.bmm(prob, vc[:, j0:j1])
        outs.append(o.view(B, Hq, tq, Dv))
    if outs:
        out = torch.cat(outs, dim=2).to(q.dtype)
    else:
        out = torch.zeros(B, Hq, Nq, Dv, dtype=q.dtype, device=q.device)
    grads = [t for t in (q, k, v) if t.requires_grad]
    if grads and torch.is_grad_enabled() and not out.requires_grad:
        # no query saw a key: the output is zeros, still a function of the inputs (zero
        # gradients, as interval_attention gives), not a constant that backward cannot reach.
        # An empty slice's sum is exactly 0 whatever the values (NaN included)
        out = out + sum(t.narrow(-1, 0, 0).sum() for t in grads).to(out.dtype)
    return (out, keeps) if return_keep else out
