"""WavLM attention as an interval attention with WavLM's gated relative position bias.

WavLMAttention does not go through transformers' attention registry (it calls
F.multi_head_attention_forward with a dense (B*H, N, N) bias), so it is patched per module. For
query i at absolute position p and key j at s, with head h:

    score = scale * <rot(q_i), rot(k_j)> + gate[b, h, i] * table[bucket(s - p), h]
    gate  = a * (b * gru_rel_pos_const[h] - 1) + 2,   (a, b) = sigmoid(sum4(gru_rel_pos_linear(x_i,h)))

where table is layer 0's ``rel_attn_embed`` (num_buckets, H) and bucket() is WavLM's own T5-style
log bucketing (called from the module, so it is the installed release's function). Visibility is the
interval mask of pyencoder.ops.attention; rows with no visible key output 0.

Algorithm: plain torch, blocked over query tiles; a tile reads only keys in [lo(first), hi(last)],
so time and memory are O(N * W) (never a dense N x N bias or mask). Autograd differentiates the
tiles directly (scores of one tile are kept for backward: O(N * W) activations). Half inputs are
computed in float32. Limits: no Triton/CUDA kernel path yet (the interval-attention op has no bias
input); no attention-probability dropout.
"""
import torch

from ..rope import apply_rope
from .attention import check_no_dropout, key_lengths_from_mask

_NEG_INF = float("-inf")


def _tile_rows(spec):
    if spec is None or spec.lo_off < 0:
        return 128
    return int(min(256, max(32, (spec.lo_off + spec.hi_off + spec.block) // 2)))


def wavlm_gate(module, x):
    """Per-query gate (B, H, N) of WavLMAttention ``module`` for its input x (B, N, E)."""
    B, N, _ = x.shape
    g = x.view(B, N, module.num_heads, -1).permute(0, 2, 1, 3)
    proj = module.gru_rel_pos_linear(g)
    proj = proj.view(g.shape[:-1] + (2, 4)).sum(-1)
    gate_a, gate_b = torch.sigmoid(proj).chunk(2, dim=-1)
    gate = gate_a * (gate_b * module.gru_rel_pos_const - 1.0) + 2.0
    return gate.squeeze(-1)


def biased_interval_attention(q, k, v, gate, table, bucket_fn, spec, key_lengths=None, scale=None,
                              q_offset=0, k_offset=0):
    """q (B, H, Nq, D), k and v (B, H, Nk, D), gate (B, H, Nq), table (num_buckets, H).

    ``spec``: a LayerSpec (interval mask and rope) or None for full attention. ``bucket_fn`` maps
    relative positions (key - query, int64) to bucket indices. Returns (B, H, Nq, D) in q's dtype.
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    rope = None if spec is None else spec.rope
    if rope is not None:
        inv = rope.inv_freq(dev)
        qc = apply_rope(qc, torch.arange(q_offset, q_offset + Nq, device=dev), inv, rope.interleaved)
        kc = apply_rope(kc, torch.arange(k_offset, k_offset + Nk, device=dev), inv, rope.interleaved)
    gc, tc = gate.to(cdt), table.to(cdt)
    if key_lengths is not None:
        kl = key_lengths.to(device=dev, dtype=torch.int64)
        nk_eff = min(Nk, int(kl.max().item())) if kl.numel() else 0
    else:
        kl, nk_eff = None, Nk
    tq = _tile_rows(spec)
    outs = []
    for i0 in range(0, Nq, tq):
        i1 = min(Nq, i0 + tq)
        p = torch.arange(q_offset + i0, q_offset + i1, device=dev)
        if spec is None:
            j0, j1 = 0, nk_eff
        else:
            j0 = max(0, spec.lo(q_offset + i0) - k_offset) if spec.lo_off >= 0 else 0
            j1 = min(nk_eff, spec.hi(q_offset + i1 - 1) - k_offset + 1)
        if j1 <= j0:
            outs.append(qc.new_zeros(B, H, i1 - i0, vc.shape[-1]))
            continue
        s = torch.arange(k_offset + j0, k_offset + j1, device=dev)
        rel = s[None, :] - p[:, None]
        bias = tc[bucket_fn(rel)].permute(2, 0, 1)  # (H, tq, tk)
        sc = torch.matmul(qc[:, :, i0:i1], kc[:, :, j0:j1].transpose(-1, -2)) * scale
        sc = sc + gc[:, :, i0:i1, None] * bias
        if spec is None:
            vis = torch.ones(i1 - i0, j1 - j0, dtype=torch.bool, device=dev)
        else:
            base = torch.div(p, spec.block, rounding_mode="floor") * spec.block
            vis = s[None, :] <= (base + spec.hi_off)[:, None]
            if spec.lo_off >= 0:
                vis = vis & (s[None, :] >= (base - spec.lo_off)[:, None])
        vis = vis[None, None]
        if kl is not None:
            vis = vis & (torch.arange(j0, j1, device=dev)[None, :] < kl[:, None])[:, None, None, :]
        sc = sc.masked_fill(~vis, _NEG_INF)
        m = sc.amax(-1, keepdim=True).detach()
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        pr = torch.exp(sc - m)
        l = pr.sum(-1, keepdim=True)
        nz = l > 0
        o = torch.matmul(pr, vc[:, :, j0:j1]) / torch.where(nz, l, torch.ones_like(l))
        outs.append(torch.where(nz, o, torch.zeros_like(o)))
    out = torch.cat(outs, dim=2) if outs else qc.new_zeros(B, H, 0, vc.shape[-1])
    return out.to(q.dtype)


def project_qkv(module, x):
    B, N, _ = x.shape
    H, D = module.num_heads, module.head_dim
    q = module.q_proj(x).view(B, N, H, D).transpose(1, 2)
    k = module.k_proj(x).view(B, N, H, D).transpose(1, 2)
    v = module.v_proj(x).view(B, N, H, D).transpose(1, 2)
    return q, k, v


def wavlm_forward(module, hidden_states, attention_mask=None, position_bias=None, index=0,
                  **kwargs):
    """Forward of a patched WavLMAttention (bound to the instance). ``position_bias`` carries
    layer 0's bucket table (num_buckets, H) from layer to layer instead of a dense (B*H, N, N)
    bias; returns (out, None, table)."""
    check_no_dropout(module, module.dropout)
    B, N, E = hidden_states.shape
    if position_bias is None:
        if getattr(module, "rel_attn_embed", None) is None:
            raise RuntimeError("pyencoder WavLM attention: the first layer must carry "
                               "rel_attn_embed (the relative position bucket table)")
        table = module.rel_attn_embed.weight
    else:
        table = position_bias
    if table.dim() != 2 or table.shape[1] != module.num_heads:
        raise RuntimeError(f"pyencoder WavLM attention: position_bias must be the bucket table "
                           f"(num_buckets, {module.num_heads}) passed by a patched layer 0; got "
                           f"shape {tuple(table.shape)} (is every layer patched?)")
    q, k, v = project_qkv(module, hidden_states)
    gate = wavlm_gate(module, hidden_states)
    key_lengths = key_lengths_from_mask(attention_mask, B, N)
    out = biased_interval_attention(q, k, v, gate, table, module._relative_positions_bucket,
                                    getattr(module, "_pyencoder_attn", None), key_lengths,
                                    module.scaling)
    out = module.out_proj(out.transpose(1, 2).reshape(B, N, E))
    return out, None, table
