"""Interval attention with attention-probability dropout, for training (fine-tuning, distillation).

``interval_attention_dropout`` is pyencoder.ops.interval_attention (same mask, RoPE, GQA, padding
and zero-row rule; see pyencoder.ops.attention) with transformers-eager dropout applied to the
softmax probabilities before they multiply v: ``F.dropout(P, p, training=True)``, i.e. each
(b, h, i, j) probability is kept with probability 1 - p and scaled by 1 / (1 - p).

It runs the blocked plain-torch computation of pyencoder.reference.attention_dropout on every device
(no Triton/CUDA kernel yet): O(N * W) memory, differentiated by autograd, so GPU users get correct
results but not kernel speed. With dropout_p == 0 (and no keep-masks asked for) it is exactly the
registered op (kernels included).
"""
import torch

from .._checks import autocast_cast, autocasting
from ..reference import attention_dropout as _ref
from ..mask import as_mask
from .attention import _validate, interval_attention

__all__ = ["interval_attention_dropout"]


def _check_dropout(dropout_p):
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float in [0, 1]; got {type(dropout_p).__name__} "
                        f"{dropout_p!r}")
    if not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1]; got {dropout_p!r}")


def _check_generator(generator, device):
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got "
                        f"{type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator must be on q's device type ({device.type}); got a "
                         f"{generator.device.type} generator")


def interval_attention_dropout(q, k, v, *, mask=None, dropout_p, rope=None, key_lengths=None,
                               q_offset=0, k_offset=0, scale=None, generator=None,
                               return_keep=False, block=None, lo_off=None, hi_off=None):
    """Interval attention over ``mask`` (a pyencoder.IntervalMask, or the loose ints block, lo_off,
    hi_off as in pyencoder.ops.interval_attention) with dropout
    ``dropout_p`` on the attention probabilities, as in transformers' eager attention in training
    mode. Masked keys stay 0, rows with no visible key output 0 (zero gradient, never NaN).

    Keep-masks are drawn tile by tile from ``generator`` (a torch.Generator on q's device; None:
    torch's default generator). ``return_keep=True`` (debugging, tests) returns (out, keeps) with
    keeps a list of (i0, i1, j0, j1, keep bool (B, Hq, i1 - i0, j1 - j0)) per query tile.

    Runs plain torch on every device (no kernel yet): correct on GPU, not kernel-fast. Memory
    O(N * W); autograd keeps every tile's probabilities for the backward. dropout_p == 0 without
    return_keep calls the registered op (pyencoder.ops.interval_attention) instead.
    Returns (B, Hq, Nq, D) in q's dtype. Under autocast q, k and v are cast to the autocast dtype
    first, as in pyencoder.ops.interval_attention."""
    if autocasting(q):
        dev = q.device.type
        q, k, v = autocast_cast(torch.get_autocast_dtype(dev), q, k, v)
        with torch.autocast(dev, enabled=False):
            return interval_attention_dropout(
                q, k, v, mask=mask, dropout_p=dropout_p, rope=rope, key_lengths=key_lengths,
                q_offset=q_offset, k_offset=k_offset, scale=scale, generator=generator,
                return_keep=return_keep, block=block, lo_off=lo_off, hi_off=hi_off)
    _validate(q, k, v, rope, key_lengths, q_offset, k_offset, scale)
    mask = as_mask(mask, block, lo_off, hi_off)
    block, lo_off, hi_off = mask.params
    _check_dropout(dropout_p)
    _check_generator(generator, q.device)
    if float(dropout_p) == 0.0 and not return_keep:
        return interval_attention(q, k, v, mask=mask, rope=rope,
                                  key_lengths=key_lengths, q_offset=q_offset, k_offset=k_offset,
                                  scale=scale)
    if mask.sink:
        raise NotImplementedError(f"interval_attention_dropout: sink keys (mask.sink="
                                  f"{mask.sink}) are not supported with dropout_p > 0 or "
                                  f"return_keep; got dropout_p={dropout_p!r}")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    inv_freq = None if rope is None else rope.inv_freq(q.device)
    interleaved = False if rope is None else rope.interleaved
    return _ref.forward(q, k, v, inv_freq, key_lengths, block, lo_off, hi_off, q_offset, k_offset,
                        scale, interleaved, float(dropout_p), generator, return_keep)
