"""Independent dense oracles for the tests (written apart from pyencoder.reference on purpose:
explicit N x M masks, explicit cos/sin tables, float64)."""
import math

import torch


def interval_mask(nq, nk, block, lo_off, hi_off, q_offset=0, k_offset=0, key_lengths=None,
                  batch=1):
    """Boolean (B, 1, Nq, Nk) visibility from the DESIGN.md definition, by explicit loops over
    the formula (vectorised per row)."""
    m = torch.zeros(batch, 1, nq, nk, dtype=torch.bool)
    s = torch.arange(nk) + k_offset
    for i in range(nq):
        p = q_offset + i
        base = (p // block) * block
        hi = base + hi_off
        row = s <= hi
        if lo_off >= 0:
            row &= s >= base - lo_off
        m[:, 0, i] = row
    if key_lengths is not None:
        j = torch.arange(nk)
        m &= (j[None, :] < key_lengths.cpu()[:, None])[:, None, None, :]
    return m


def band(left, right):
    return 1, (-1 if left is None else left), right


def chunked(chunk, left_chunks, lookahead):
    return chunk, (-1 if left_chunks is None else left_chunks * chunk), chunk - 1 + lookahead


def rope_rotate(x, positions, dim, base=10000.0, interleaved=False):
    """Rotate the first ``dim`` features of x (B, H, N, D) in float64 using a cos/sin table."""
    x = x.to(torch.float64)
    if dim == 0:
        return x
    out = x.clone()
    for n, p in enumerate(positions.tolist()):
        for i in range(dim // 2):
            inv = 1.0 / (base ** (2 * i / dim))
            # angle as the package defines it: float32(p) * float32(inv_freq) in float32
            ang = float(torch.tensor(float(p), dtype=torch.float32)
                        * torch.tensor(inv, dtype=torch.float32))
            c, s = math.cos(ang), math.sin(ang)
            a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + dim // 2)
            xa, xb = x[:, :, n, a], x[:, :, n, b]
            out[:, :, n, a] = xa * c - xb * s
            out[:, :, n, b] = xb * c + xa * s
    return out


def dense_attention(q, k, v, mask, scale=None, rope_dim=0, rope_base=10000.0, interleaved=False,
                    q_offset=0, k_offset=0, upcast=True):
    """Dense masked softmax attention with GQA and the zero-row rule. upcast=False computes in the
    inputs' dtype (the "plain torch in the same dtype" baseline of the FA tolerance rule)."""
    dt = torch.float64 if upcast else q.dtype
    B, Hq, Nq, D = q.shape
    Hk = k.shape[1]
    if rope_dim:
        q = rope_rotate(q, torch.arange(Nq) + q_offset, rope_dim, rope_base, interleaved)
        k = rope_rotate(k, torch.arange(k.shape[2]) + k_offset, rope_dim, rope_base, interleaved)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    k = k.repeat_interleave(Hq // Hk, dim=1)
    v = v.repeat_interleave(Hq // Hk, dim=1)
    scale = D ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask.to(s.device), float("-inf"))
    any_visible = mask.any(-1, keepdim=True).to(s.device)
    s = torch.where(any_visible, s, torch.zeros_like(s))
    p = torch.softmax(s, dim=-1) * any_visible
    return p @ v


def naive_causal_conv(x, w, b, stride, groups, activation, init=None):
    """Loop-over-taps causal conv in float64; returns (y, padded input)."""
    x = x.to(torch.float64)
    w = w.to(torch.float64)
    B, C, L = x.shape
    Cout, Cg, k = w.shape
    pad = k - stride
    xp = torch.cat((torch.zeros(B, C, pad, dtype=torch.float64) if init is None
                    else init.to(torch.float64), x), dim=-1)
    T = L // stride
    y = torch.zeros(B, Cout, T, dtype=torch.float64)
    og = Cout // groups
    for o in range(Cout):
        gi = o // og
        for t in range(T):
            seg = xp[:, gi * Cg:(gi + 1) * Cg, t * stride: t * stride + k]
            y[:, o, t] = (seg * w[o]).sum(dim=(1, 2))
    if b is not None:
        y = y + b.to(torch.float64)[None, :, None]
    if activation == "silu":
        y = y * torch.sigmoid(y)
    elif activation == "gelu":
        y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
    return y, xp


def relative_bias_matrix(rel_bias, gate, rel_offset, nq, nk, q_offset=0, k_offset=0, batch=1):
    """(B, Hq, Nq, Nk) float64 bias gate[b, h, i] * rel_bias[h, s - p - rel_offset], built by an
    explicit loop over (i, j) (0 where s - p falls outside the table: never visible there)."""
    H, L = rel_bias.shape
    out = torch.zeros(batch, H, nq, nk, dtype=torch.float64)
    t = rel_bias.to(torch.float64)
    for i in range(nq):
        for j in range(nk):
            c = (k_offset + j) - (q_offset + i) - rel_offset
            if 0 <= c < L:
                out[:, :, i, j] = t[:, c]
    if gate is not None:
        out = out * gate.to(torch.float64)[..., None]
    return out


def dense_biased_attention(q, k, v, mask, bias, scale=None, rope_dim=0, interleaved=False,
                           q_offset=0, k_offset=0):
    """dense_attention in float64 with an additive (B, Hq, Nq, Nk) score bias (differentiable
    in every input, bias included)."""
    B, Hq, Nq, D = q.shape
    Hk = k.shape[1]
    q, k, v = q.to(torch.float64), k.to(torch.float64), v.to(torch.float64)
    if rope_dim:
        q = rope_rotate(q, torch.arange(Nq) + q_offset, rope_dim, interleaved=interleaved)
        k = rope_rotate(k, torch.arange(k.shape[2]) + k_offset, rope_dim, interleaved=interleaved)
    k = k.repeat_interleave(Hq // Hk, dim=1)
    v = v.repeat_interleave(Hq // Hk, dim=1)
    scale = D ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale + bias
    s = s.masked_fill(~mask, float("-inf"))
    any_visible = mask.any(-1, keepdim=True)
    s = torch.where(any_visible, s, torch.zeros_like(s))
    p = torch.softmax(s, dim=-1) * any_visible
    return p @ v
