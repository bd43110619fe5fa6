"""Streamable replacements for the two non-causal pieces of wav2vec2-style front ends.

running_group_norm: wav2vec2-base's conv layer 0 ends in GroupNorm(C, C), i.e. per-channel
normalisation over the whole utterance. "running" replaces the utterance statistics by causal
cumulative ones: for frame t (counting from the start of the stream, n_t = t + 1)

    mean_t = sum_{u<=t} x_u / n_t,   var_t = max(sum_{u<=t} x_u^2 / n_t - mean_t^2, 0)
    y_t = (x_t - mean_t) / sqrt(var_t + eps) * weight + bias

Sums are float64 and carried as a pyencoder.nn.RunningNormState (count, sum, sum of squares; the
one running-norm state, also pyencoder.models' front end's), computed as one sequential
cumulative sum seeded with the carried value, so the offline pass (time blocks of BLOCK frames) and
any chunked stream add the same numbers in the same order. Memory: O(B * C * BLOCK) extra.
A NaN / inf sample enters the running sums: that channel is NaN for the rest of the stream (see
pyencoder.nn.norm).

causal_pos_conv: the symmetric positional conv (k taps, padding k // 2, last frame dropped for even
k) becomes causal with the same weights: output t reads inputs t - k + 1 .. t (zero history).
Uses pyencoder.ops.causal_conv1d.
"""
import torch

from ..nn.norm import RunningNormState, frame_batch_norm, running_norm
from ..ops.conv import causal_conv1d


def running_group_norm(x, weight, bias, eps, state=None):
    """x (B, C, T) -> (y (B, C, T), new pyencoder.nn.RunningNormState); ``state`` None starts a
    fresh stream (pyencoder.nn.norm.running_norm does the math; the patched offline forward)."""
    B, C, T = x.shape
    if state is None:
        z = torch.zeros(B, C, dtype=torch.float64, device=x.device)
        state = RunningNormState(torch.zeros(B, dtype=torch.int64, device=x.device), z, z)
    y, tot, tot_sq = running_norm(x, weight, bias, eps, state.count, state.total, state.total_sq)
    return y, RunningNormState(state.count + T, tot.detach(), tot_sq.detach())


def causal_pos_conv(pc, hidden_states):
    """hidden_states (B, N, C) -> positional embeddings (B, N, C), causal, same weights as ``pc``
    (the patched model's offline forward; the stream runs pyencoder.models' positional conv on
    the same weights)."""
    x = hidden_states.transpose(1, 2)
    if getattr(pc, "batch_norm", None) is not None:
        x = frame_batch_norm(pc.batch_norm, x)    # running statistics in training too: causal
    conv = pc.conv
    y = causal_conv1d(x.contiguous(), conv.weight, conv.bias, groups=conv.groups)
    return pc.activation(y).transpose(1, 2)
