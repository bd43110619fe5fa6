"""WavLM attention as an interval attention with WavLM's gated relative position bias.

WavLMAttention does not go through transformers' attention registry (it calls
F.multi_head_attention_forward with a dense (B*H, N, N) bias), so it is patched per module. For
query i at absolute position p and key j at s, with head h:

    score = scale * <rot(q_i), rot(k_j)> + gate[b, h, i] * table[bucket(s - p), h]
    gate  = a * (b * gru_rel_pos_const[h] - 1) + 2,   (a, b) = sigmoid(sum4(gru_rel_pos_linear(x_i,h)))

where table is layer 0's ``rel_attn_embed`` (num_buckets, H) and bucket() is WavLM's own T5-style
log bucketing (called from the module, so it is the installed release's function). Visibility is the
interval mask of pyencoder.ops.attention; rows with no visible key output 0.

Algorithm: pyencoder.nn.relpos.biased_interval_attention (the transformers-free core shared with
pyencoder.nn.WavLMSelfAttention and pyencoder.models.CausalEncoder): the bucket table is read once
per call at the window's relative offsets and passed with the gate to the fused bias of
pyencoder.ops.interval_attention (Triton kernels on a GPU, the blocked reference on a CPU; time
and memory O(N * W), never a dense N x N bias or mask), forward and backward. Half inputs are
computed in float32. In training mode with ``module.dropout`` > 0 the probabilities get dropout
(eager's attention dropout; torch's default generator) on relpos' plain-torch tiles instead.

Registry path (``attn_implementation="pyencoder"`` without a patch): WavLM's attention does not
consult the registry, so ``install_registry_dispatch()`` (run by ``pyencoder.hf.register()``)
wraps ``WavLMEncoder.forward`` / ``WavLMEncoderStableLayerNorm.forward`` and
``WavLMAttention.forward`` once, at class level: when the encoder's
``config._attn_implementation`` is "pyencoder", every layer's attention runs ``wavlm_forward``
with no LayerSpec (full attention, the same function as eager); any other value runs transformers'
code unchanged. Output attention weights are None on this path.
"""
import functools

from ..nn.relpos import biased_interval_attention as _core_attention
from ..nn.relpos import relative_bias_gate
from .attention import NAME, check_sink_dropout, effective_dropout, key_lengths_from_mask


def wavlm_gate(module, x):
    """Per-query gate (B, H, N) of WavLMAttention ``module`` for its input x (B, N, E)."""
    return relative_bias_gate(x, module.gru_rel_pos_linear, module.gru_rel_pos_const,
                              module.num_heads)


def biased_interval_attention(q, k, v, gate, table, bucket_fn, spec, key_lengths=None, scale=None,
                              q_offset=0, k_offset=0, dropout_p=0.0):
    """q (B, H, Nq, D), k and v (B, H, Nk, D), gate (B, H, Nq), table (num_buckets, H).

    ``spec``: a LayerSpec (interval mask and rope) or None for full attention. ``bucket_fn`` maps
    relative positions (key - query, int64) to bucket indices. ``dropout_p``: dropout on the
    probabilities (training). Returns (B, H, Nq, D) in q's dtype.
    """
    if spec is None:
        return _core_attention(q, k, v, gate, table, bucket_fn, key_lengths=key_lengths,
                               scale=scale, q_offset=q_offset, k_offset=k_offset,
                               dropout_p=dropout_p)
    return _core_attention(q, k, v, gate, table, bucket_fn, mask=spec.mask, rope=spec.rope,
                           key_lengths=key_lengths,
                           scale=scale, q_offset=q_offset, k_offset=k_offset,
                           dropout_p=dropout_p)


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
    spec, p = getattr(module, "_pyencoder_attn", None), effective_dropout(module, module.dropout)
    check_sink_dropout(spec, p)
    out = biased_interval_attention(q, k, v, gate, table, module._relative_positions_bucket,
                                    spec, key_lengths, module.scaling, dropout_p=p)
    # time-major, as transformers' WavLMAttention computes it (F.multi_head_attention_forward on
    # (N, B, E)) and returns it (a (B, N, E) view of that): the layer's dropout after it draws its
    # mask in memory order, so a (B, N, E)-contiguous output dropped other elements than eager
    # under the same seed (training runs differed from eager's at batch > 1)
    out = module.out_proj(out.permute(2, 0, 1, 3).reshape(N, B, E))
    return out.transpose(0, 1), None, table


_DISPATCH_KWARG = "_pyencoder_wavlm_attention"


def _attention_dispatch(orig):
    @functools.wraps(orig)
    def forward(self, hidden_states, attention_mask=None, position_bias=None, index=0, **kwargs):
        if kwargs.pop(_DISPATCH_KWARG, False):
            return wavlm_forward(self, hidden_states, attention_mask, position_bias, index)
        return orig(self, hidden_states, attention_mask=attention_mask,
                    position_bias=position_bias, index=index, **kwargs)
    forward._pyencoder_dispatch = True
    return forward


def _encoder_dispatch(orig):
    @functools.wraps(orig)
    def forward(self, hidden_states, attention_mask=None, **kwargs):
        if self.config._attn_implementation == NAME:
            kwargs[_DISPATCH_KWARG] = True
        return orig(self, hidden_states, attention_mask=attention_mask, **kwargs)
    forward._pyencoder_dispatch = True
    return forward


def install_registry_dispatch():
    """Make ``attn_implementation="pyencoder"`` run ``wavlm_forward`` in WavLM models (see the
    module docstring). Idempotent; returns False when the installed transformers has no WavLM
    classes of the expected shape (nothing is changed then)."""
    try:
        from transformers.models.wavlm import modeling_wavlm as M
    except ImportError:  # pragma: no cover
        return False
    encoders = [getattr(M, n, None) for n in ("WavLMEncoder", "WavLMEncoderStableLayerNorm")]
    att = getattr(M, "WavLMAttention", None)
    if att is None or any(c is None for c in encoders):
        return False
    if not getattr(att.forward, "_pyencoder_dispatch", False):
        att.forward = _attention_dispatch(att.forward)
    for cls in encoders:
        if not getattr(cls.forward, "_pyencoder_dispatch", False):
            cls.forward = _encoder_dispatch(cls.forward)
    return True
