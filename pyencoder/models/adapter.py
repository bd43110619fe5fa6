"""ConvAdapter: wav2vec2's strided conv adapter after the encoder (transformers'
``config.add_adapter``), offline and streaming.

    h (B, T, E) -> [Linear(E, C) -> LayerNorm(C) when C != E] -> per layer: Conv1d(C, 2C, k,
    stride s, zero padding p on both sides) -> GLU over channels -> (B, T', C)

Each layer divides the frame rate by s: T frames give (T + 2p - k) // s + 1. ``PaddedConv1d`` is
that conv on pyencoder.ops.causal_conv1d (``FeatureConv1d`` with a left padding of p): output u
reads the padded frames [u*s, u*s + k - 1], i.e. input frames u*s - p .. u*s - p + k - 1, so its
lookahead past its own hop is k - p - s frames (negative when the window ends before its hop:
it then needs nothing new). Streaming keeps, per slot, the input frames of the next unfinished
window (the state starts as the p zeros of the left padding: an all-zero state is a fresh stream,
so ``reset`` of a slot is exact); ``flush`` feeds the p zeros of the right padding. Any chunking
gives the offline output (up to summation order, same windows).
"""
import dataclasses
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.linear import Linear
from ..streaming.sequential import cat_time
from ..streaming.state import (StreamState, check_init_args, check_state, check_step_lengths,
                               stamp, stream_config)
from .frontend import FeatureConv1d, FeatureConvState

__all__ = ["PaddedConv1d", "ConvAdapterLayer", "ConvAdapter", "AdapterState"]


class PaddedConv1d(FeatureConv1d):
    """Conv1d with zero padding p on both sides (p <= k - 1), streamable (module docstring)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, bias=True):
        super().__init__(in_channels, out_channels, kernel_size, stride, bias=bias)
        if isinstance(padding, bool) or not isinstance(padding, int) or \
                not 0 <= padding <= kernel_size - 1:
            raise ValueError(f"padding must be an int in [0, kernel_size - 1 = {kernel_size - 1}]; "
                             f"got {padding!r}")
        self.padding_frames = padding

    @property
    def pad(self):
        return self.padding_frames

    @property
    def lookahead(self):
        return self.k - self.padding_frames - self.s

    def extra_repr(self):
        return super().extra_repr() + f", padding_frames={self.padding_frames}"

    def forward(self, x):
        if x.dim() != 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, L); got {tuple(x.shape)}")
        p = self.padding_frames
        return self._valid(F.pad(x, (p, p)) if p else x)

    def flush(self, state):
        """End of stream: the right padding's p zeros complete the last windows."""
        check_state(self, state, FeatureConvState)
        B, C = state.buf.shape[0], self.in_channels
        zeros = state.buf.new_zeros(B, C, self.padding_frames)
        return self.step(zeros, state)


class ConvAdapterLayer(nn.Module):
    """PaddedConv1d(C, 2C) -> GLU (transformers' Wav2Vec2AdapterLayer, parameter ``conv``)."""
    stream_time_axis = -1

    def __init__(self, channels, kernel_size, stride, padding, bias=True):
        super().__init__()
        self.conv = PaddedConv1d(channels, 2 * channels, kernel_size, stride, padding, bias=bias)

    @property
    def hop(self):
        return self.conv.hop

    @property
    def lookahead(self):
        return self.conv.lookahead

    def forward(self, x):
        return F.glu(self.conv(x), dim=1)

    def _stream_config(self):
        return f"ConvAdapterLayer({stream_config(self.conv)})"

    def init_state(self, batch_size, *, device=None, dtype=None, **_):
        return self.conv.init_state(batch_size, device=device, dtype=dtype)

    def step(self, x, state, lengths=None):
        y, state = self.conv.step(x, state, lengths)
        return F.glu(y, dim=1), state

    def flush(self, state):
        y, state = self.conv.flush(state)
        return F.glu(y, dim=1), state


@dataclasses.dataclass
class AdapterState(StreamState):
    layers: List[StreamState]
    out_lengths: torch.Tensor


class ConvAdapter(nn.Module):
    """transformers' Wav2Vec2Adapter (same parameter names: proj, proj_layer_norm, layers.i.conv)
    on (B, T, E) encoder frames, streamable (module docstring)."""

    def __init__(self, embed_dim, channels, num_layers, kernel_size, stride, padding=1,
                 eps=1e-5):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1; got {num_layers}")
        if channels != embed_dim:
            self.proj = Linear(embed_dim, channels)
            self.proj_layer_norm = nn.LayerNorm(channels, eps=eps)
        else:
            self.proj = self.proj_layer_norm = None
        self.layers = nn.ModuleList(ConvAdapterLayer(channels, kernel_size, stride, padding)
                                    for _ in range(num_layers))

    @property
    def stride(self):
        s = 1
        for layer in self.layers:
            s *= layer.conv.s
        return s

    def out_length(self, n):
        """Output frames for n (int or tensor) encoder frames, offline."""
        for layer in self.layers:        # the right padding as p more frames of the stream
            n = layer.conv.out_length(n + layer.conv.padding_frames)
        return n

    def _project(self, h):
        if self.proj is not None and self.proj_layer_norm is not None:
            h = self.proj_layer_norm(self.proj(h))
        return h

    def forward(self, h):
        x = self._project(h).transpose(1, 2)
        for layer in self.layers:
            x = layer(x)
        return x.transpose(1, 2)

    def _stream_config(self):
        return f"ConvAdapter({', '.join(stream_config(layer) for layer in self.layers)})"

    def init_state(self, batch_size, *, device=None, dtype=None, **_):
        check_init_args(batch_size, dtype, device)
        layers = [layer.init_state(batch_size, device=device, dtype=dtype)
                  for layer in self.layers]
        return stamp(self, AdapterState(layers=layers,
                                        out_lengths=torch.zeros_like(layers[0].seen)))

    def _from(self, start, x, lengths, state):
        for i in range(start, len(self.layers)):
            x, st = self.layers[i].step(x, state.layers[i], lengths)
            state.layers[i] = st
            lengths = st.out_lengths
        return x, lengths

    def step(self, h, state, lengths=None):
        """h (B, n, E) encoder frames (slot b's first ``lengths[b]``) -> (B, m, C), state."""
        check_state(self, state, AdapterState)
        B, n = h.shape[0], h.shape[1]
        lengths = check_step_lengths(lengths, B, n, h.device)
        y, state.out_lengths = self._from(0, self._project(h).transpose(1, 2), lengths, state)
        return y.transpose(1, 2), state

    def flush(self, state):
        """End of stream: each layer's right padding, passed through the layers after it."""
        check_state(self, state, AdapterState)
        outs, counts = [], []
        for i, layer in enumerate(self.layers):
            y, st = layer.flush(state.layers[i])
            state.layers[i] = st
            y, lengths = self._from(i + 1, y, st.out_lengths, state)
            outs.append(y)
            counts.append(lengths)
        y, state = cat_time(outs, counts, state, time_last=True)
        return y.transpose(1, 2), state
