"""transformers attention-registry entry "pyencoder": interval attention for HF encoders.

``pyencoder.hf.register()`` (pyencoder.hf.registry) adds two functions under the name
"pyencoder":

- to ``AttentionInterface``: ``pyencoder_attention_forward(module, query, key, value,
  attention_mask, scaling, dropout, **kwargs)``, called by Wav2Vec2Attention / HubertAttention with
  q, k, v of shape (B, H, N, D). It reads the per-layer ``LayerSpec`` that
  ``apply_pyencoder_to_wav2vec2`` stores on the attention module (``module._pyencoder_attn``) and
  calls ``pyencoder.ops.interval_attention`` (band or chunked mask, RoPE inside the kernel). A module
  without a spec gets full bidirectional attention, so ``from_pretrained(...,
  attn_implementation="pyencoder")`` alone computes the same function as "eager"/"sdpa".
- to ``AttentionMaskInterface``: ``pyencoder_mask(...)``, which turns HF's 2-D right-padding
  mask into ``key_lengths`` (int32 (B,)) once per forward; no (B, 1, N, N) mask is ever built.

In training mode with dropout > 0 (``config.attention_dropout``), the probabilities get eager's
dropout through ``pyencoder.ops.interval_attention_dropout`` (blocked plain torch on every device,
autograd backward, torch's default generator); eval mode and dropout == 0 use the registered op.

WavLM does not call the registry; ``register()`` also installs pyencoder.hf.wavlm's class-level
dispatch so that WavLM models with ``attn_implementation="pyencoder"`` run pyencoder's WavLM
attention (full attention until patched).

Limits: only bidirectional (encoder) masks; output_attentions=True gives None weights with a
UserWarning (wav2vec2/HuBERT; a patched WavLM records no weights); a 4-D custom mask is refused.
"""
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from ..mask import IntervalMask
from ..ops.attention import interval_attention
from ..ops.attention_dropout import interval_attention_dropout
from ..rope import Rope

NAME = "pyencoder"


@dataclass(frozen=True)
class LayerSpec:
    """One layer's interval mask (a pyencoder.IntervalMask, formula in pyencoder/mask.py) and
    rotary. Everything derived from the mask is read from it (``spec.mask.lookahead``: the user's
    frames past the query's own block; ``spec.mask.hi(p)``, ...)."""
    mask: IntervalMask
    rope: Optional[Rope]


def key_lengths_from_mask(attention_mask, batch_size, kv_length):
    """HF padding mask -> int32 key_lengths (B,) or None (no padding). Accepts the 1-D lengths made
    by ``pyencoder_mask``, a 2-D (B, N) 0/1 or bool right-padding mask, or None."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"pyencoder attention: attention_mask must be a tensor or None; got "
                        f"{type(attention_mask).__name__}")
    if attention_mask.dim() == 1 and not attention_mask.is_floating_point():
        return attention_mask.to(torch.int32)
    if attention_mask.dim() == 2:
        if attention_mask.shape != (batch_size, kv_length):
            raise ValueError(f"pyencoder attention: 2-D attention_mask must be (batch, keys) = "
                             f"({batch_size}, {kv_length}); got {tuple(attention_mask.shape)}")
        if attention_mask.is_floating_point() and not _compiling() and not bool(
                ((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("pyencoder attention: a floating attention_mask must be a 0/1 padding "
                             "mask (1 = keep), not an additive one (0 / -inf or a large negative); "
                             "got other values")
        m = attention_mask.to(torch.bool)
        lengths = m.sum(-1, dtype=torch.int32)
        if not _compiling():
            ref = torch.arange(kv_length, device=m.device)[None, :] < lengths[:, None]
            if not torch.equal(ref, m):
                raise ValueError("pyencoder attention: attention_mask must be a right-padding "
                                 "mask (ones then zeros in every row); got another pattern")
        return lengths
    raise ValueError(f"pyencoder attention supports a 2-D padding mask (batch, keys) only; got a "
                     f"{attention_mask.dim()}-D attention_mask of shape "
                     f"{tuple(attention_mask.shape)}")


def _compiling():
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover
        return False


def effective_dropout(module, dropout):
    """Attention-probability dropout of one call: ``dropout`` in training mode, else 0 (eager
    applies ``F.dropout(P, p=dropout, training=module.training)``)."""
    return float(dropout) if (dropout and module.training) else 0.0


def check_sink_dropout(spec, dropout):
    """A patched layer with sink frames in training mode with attention dropout: refused in the
    patch's words (the ops named their own arguments: mask.sink, dropout_p, fused)."""
    sink = 0 if spec is None else spec.mask.sink
    if sink and dropout > 0.0:
        raise NotImplementedError(
            f"pyencoder.hf: a model patched with sink_frames ({sink}) trains without attention "
            f"dropout (got {dropout} in training mode; no kernel drops the sink keys' "
            f"probabilities): load the model with attention_dropout=0.0 (or set each attention "
            f"layer's .dropout = 0.0), call model.eval() for inference, or patch without "
            f"sink_frames")


def run_spec(spec, q, k, v, key_lengths, scaling, dropout=0.0):
    """(B, H, N, D) interval attention of one layer; full attention when spec is None. dropout > 0:
    dropout on the probabilities (the blocked plain-torch training path)."""
    if spec is None:
        mask, rope = IntervalMask.full(k.shape[2]), None
    else:
        mask, rope = spec.mask, spec.rope
    if dropout > 0.0:
        return interval_attention_dropout(q, k, v, mask=mask, dropout_p=dropout, rope=rope,
                                          key_lengths=key_lengths, scale=scaling)
    return interval_attention(q, k, v, mask=mask, rope=rope,
                              key_lengths=key_lengths, scale=scaling)


# keyword arguments of transformers' attention interface that change what is computed (a bias
# added to the scores, a soft cap, attention sinks' logits, a window): refused, never dropped
_CHANGES_THE_FUNCTION = ("position_bias", "softcap", "s_aux", "sliding_window")


def pyencoder_attention_forward(module, query, key, value, attention_mask, scaling=None,
                                dropout=0.0, **kwargs):
    """AttentionInterface entry: returns (attn_output (B, N, H, D), None). With
    ``output_attentions=True`` the weights are None, as with transformers' sdpa and flash paths
    (the interval kernels never form the N x N probabilities: O(N * W) memory), and a
    UserWarning says so instead of leaving it silent."""
    for name in _CHANGES_THE_FUNCTION:
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"pyencoder attention: {type(module).__name__} passes {name}= (a term eager / "
                f"sdpa attention add to the scores or a window they apply), which the interval "
                f"kernels do not take: this model's attention is not the plain softmax(q k^T) v "
                f"the pyencoder implementation computes (T5 / Conformer / Wav2Vec2-BERT relative "
                f"positions); use attn_implementation='eager' or 'sdpa' for it")
    if kwargs.get("output_attentions"):
        warnings.warn("pyencoder attention: output_attentions=True returns None attention weights "
                      "on a pyencoder-patched model (the interval kernels never form the N x N "
                      "probabilities); call pyencoder.hf.revert_pyencoder(model) for transformers' "
                      "eager weights.", UserWarning, stacklevel=2)
    B, _, _, _ = query.shape
    key_lengths = key_lengths_from_mask(attention_mask, B, key.shape[2])
    spec = getattr(module, "_pyencoder_attn", None)
    if spec is None:
        _warn_if_unpatched(module)
    p = effective_dropout(module, dropout)
    check_sink_dropout(spec, p)
    out = run_spec(spec, query, key, value, key_lengths, scaling, p)
    return out.transpose(1, 2).contiguous(), None


_warned_unpatched = [False]


def _warn_if_unpatched(module):
    if _warned_unpatched[0]:
        return
    entry = getattr(getattr(module, "config", None), "pyencoder", None)
    if entry is not None:
        _warned_unpatched[0] = True
        warnings.warn("this model's config records a pyencoder patch (config.pyencoder, saved from "
                      "a patched model) but the model is not patched: it runs full-context "
                      "attention. Load it with pyencoder.hf.from_pretrained(cls, path) or call "
                      "pyencoder.hf.reapply_pyencoder(model).", stacklevel=3)


def pyencoder_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                   attention_mask=None, **kwargs):
    """AttentionMaskInterface entry: the padding mask as int32 key_lengths (B,), or None."""
    from transformers.masking_utils import bidirectional_mask_function
    if mask_function is not None and mask_function is not bidirectional_mask_function:
        raise NotImplementedError(
            "the 'pyencoder' attention implementation serves bidirectional encoders (wav2vec2, "
            "HuBERT); it got a causal/sliding/custom mask function. Use it only with audio "
            "encoders patched by pyencoder.hf.apply_pyencoder_to_wav2vec2.")
    if not isinstance(q_offset, int) or not isinstance(kv_offset, int) or q_offset or kv_offset:
        raise NotImplementedError("the 'pyencoder' attention implementation does not support a "
                                  "KV cache (q_offset/kv_offset must be 0)")
    if attention_mask is None:
        return None
    return key_lengths_from_mask(attention_mask, batch_size, kv_length)
