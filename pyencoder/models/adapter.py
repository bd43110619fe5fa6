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

Steady state (``step_fixed``, CUDA graphs): steps of n frames, n a multiple of the adapter's
stride S (the product of its layers' strides), give n // S frames in every slot. The encoder holds
frames back for lookahead, so where a slot's next window starts in its buffer (its phase modulo
each layer's stride) is whatever the stream's first steps made it, and may differ between slots:
the fixed step reads each slot's window through a gather indexed by its ``seen`` on the device
(no host read), so any phase and any mix of phases is steady once every layer holds at least
k - s frames of its next window (from the start for k - s <= p, wav2vec2's k=3, s=2, p=1).
"""
import dataclasses
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.linear import Linear
from ..streaming.sequential import cat_time
from .._checks import check_eps, check_int, check_module_input
from ..streaming.state import (StreamState, SteadyCheck, advance_counter, check_init_args,
                               check_state, check_step_lengths, check_step_slots, ends_stream,
                               fill_counter, marks_partial, require_steady, stamp, stream_config)
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

    def last_input(self, u):
        """The last input frame output frame u reads: u*s - p + k - 1 (exact latency
        composition; its lookahead past its own hop, k - p - s, may be negative)."""
        return u * self.s - self.padding_frames + self.k - 1

    def extra_repr(self):
        return super().extra_repr() + f", padding_frames={self.padding_frames}"

    def forward(self, x):
        if x.dim() != 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, L); got {tuple(x.shape)}")
        p = self.padding_frames
        return self._valid(F.pad(x, (p, p)) if p else x)

    def steady_from(self):
        """Frames seen from which every slot holds at least k - s frames of its next window (the
        fixed step's condition; 0 for k - s <= p)."""
        return max(0, self.k - self.s - self.padding_frames)

    def step_fixed(self, x, state, held=None, check=False):
        """CUDA-graph friendly steady-state step (no host synchronisation, state updated in
        place): every slot gets the same n frames, n a multiple of the stride, and has seen at
        least ``steady_from()`` frames (``check=True`` verifies it, a host synchronisation).
        Returns y (B, C_out, n // stride): what ``step`` returns, with the same state.
        ``held`` (a Python int, FeatureConv1d.step_fixed) where every slot holds that many frames
        of its next window; None (the default): each slot's own, read on the device from its
        ``seen`` (any phase, slots may differ; module docstring)."""
        if held is not None or self.s == 1:
            # stride 1: every slot past its first frames holds k - 1
            return super().step_fixed(x, state, self.k - 1 if held is None else held,
                                      check=check)
        n = self._check_fixed_input(x, state)
        k, s = self.k, self.s
        if check and bool((state.seen < self.steady_from()).any()):
            raise ValueError(f"{type(self).__name__}.step_fixed needs a steady state: every slot "
                             f"past {self.steady_from()} frames (k - stride - padding), holding "
                             f"k - stride = {k - s} frames of its next window; got "
                             f"seen={state.seen.tolist()}")
        x = x.to(state.buf.dtype)
        m = n // s
        B = x.shape[0]
        if m == 0:                               # n == 0: nothing moves
            fill_counter(state, 0)
            return self._empty(x, B)
        cat = torch.cat((state.buf, x), -1) if k > 1 else x
        win = self._gather_windows(cat, state.seen, (m - 1) * s + k)
        if self.activation is None:
            # the window as it lies: one strided conv (no initial-state split of _valid)
            y = F.conv1d(win, self.weight.to(win.dtype),
                         None if self.bias is None else self.bias.to(win.dtype), stride=s,
                         groups=self.groups)
        else:
            y = self._valid(win)
        if k > 1:
            state.buf.copy_(cat[..., cat.shape[-1] - (k - 1):])
        advance_counter(state.seen, n)
        fill_counter(state, m)
        return y

    def _window_starts(self, r):
        """A slot with ``seen % s == r`` holds held = t + k - s frames of its next window,
        t = (r + p - k) mod s (``held_after`` past the first window): in cat(buf, x) the window
        starts at k - 1 - held = s - 1 - t."""
        return self.s - 1 - torch.remainder(r + (self.padding_frames - self.k), self.s)

    @ends_stream
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

    def last_input(self, u):
        return self.conv.last_input(u)

    def forward(self, x):
        return F.glu(self.conv(x), dim=1)

    def _stream_config(self):
        return f"ConvAdapterLayer({stream_config(self.conv)})"

    def init_state(self, batch_size, *, device=None, dtype=None, **_):
        return self.conv.init_state(batch_size, device=device, dtype=dtype)

    def step(self, x, state, lengths=None):
        y, state = self.conv.step(x, state, lengths)
        return F.glu(y, dim=1), state

    def step_fixed(self, x, state, check=False):
        """PaddedConv1d.step_fixed (each slot's own phase) -> GLU."""
        return F.glu(self.conv.step_fixed(x, state, check=check), dim=1)

    @ends_stream
    def flush(self, state):
        y, state = self.conv.flush(state)
        return F.glu(y, dim=1), state


@dataclasses.dataclass
class AdapterState(StreamState):
    layers: List[StreamState]
    out_lengths: torch.Tensor


def _layer_name(i):
    return f"layer {i}"


class ConvAdapter(nn.Module):
    """transformers' Wav2Vec2Adapter (same parameter names: proj, proj_layer_norm, layers.i.conv)
    on (B, T, E) encoder frames, streamable (module docstring)."""

    def __init__(self, embed_dim, channels, num_layers, kernel_size, stride, padding=1,
                 eps=1e-5):
        super().__init__()
        check_int("embed_dim", embed_dim, min_value=1)
        check_int("channels", channels, min_value=1)
        check_int("num_layers", num_layers, min_value=1)
        check_eps("eps", eps)
        self.embed_dim = embed_dim
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

    def _check_h(self, h, state=None):
        """h: (B, n, embed_dim) floating, on the module's device and of its dtype; with a state,
        one row per slot."""
        w = self.layers[0].conv.weight
        check_module_input(h, 2, self.embed_dim, f"(B, n, {self.embed_dim})", w, name="h")
        if state is not None:
            check_step_slots(h.shape[0], state.out_lengths.shape[0], name="h")

    def _project(self, h):
        if self.proj is not None and self.proj_layer_norm is not None:
            h = self.proj_layer_norm(self.proj(h))
        return h

    def forward(self, h, lengths=None):
        """h (B, T, E) encoder frames -> (B, T', C). ``lengths`` (B,) valid frames per row (None:
        all): each layer's input past its valid frames is zeroed, so a row gives what its clip
        alone (and its stream) gives; the padded frames used to enter the last valid windows (a
        padded batch's last frame 0.17 off its clip's). transformers' adapter reads them."""
        self._check_h(h)
        if lengths is not None and (
                not isinstance(lengths, torch.Tensor) or lengths.dtype.is_floating_point
                or lengths.dtype == torch.bool or tuple(lengths.shape) != (h.shape[0],)
                or lengths.device != h.device):
            # (shapes only: no value read, the encoder passes its own frame counts here)
            raise ValueError(f"lengths must be None or an integer tensor of shape "
                             f"({h.shape[0]},) on {h.device} (valid frames per row); got "
                             f"{lengths!r}")
        x = self._project(h).transpose(1, 2)
        for layer in self.layers:
            if lengths is not None:
                pad = torch.arange(x.shape[-1], device=x.device)[None, :] >= lengths[:, None]
                x = x.masked_fill(pad[:, None, :], 0)
                lengths = layer.conv.out_length(lengths + layer.conv.padding_frames)
            x = layer(x)
        return x.transpose(1, 2)

    def _stream_config(self):
        return f"ConvAdapter({', '.join(stream_config(layer) for layer in self.layers)})"

    def init_state(self, batch_size, *, device=None, dtype=None, **_):
        check_init_args(batch_size, dtype, device, self)
        layers = [layer.init_state(batch_size, device=device, dtype=dtype)
                  for layer in self.layers]
        return stamp(self, AdapterState(layers=layers,
                                        out_lengths=torch.zeros_like(layers[0].seen)))

    def _from(self, start, x, lengths, state, who="step"):
        with marks_partial(state, f"ConvAdapter.{who}", _layer_name) as p:
            for i in range(start, len(self.layers)):
                p.at = i
                x, st = self.layers[i].step(x, state.layers[i], lengths)
                state.layers[i] = st
                lengths = st.out_lengths
                p.took.append(i)
        return x, lengths

    def step(self, h, state, lengths=None):
        """h (B, n, E) encoder frames (slot b's first ``lengths[b]``) -> (B, m, C), state."""
        check_state(self, state, AdapterState)
        self._check_h(h, state)
        B, n = h.shape[0], h.shape[1]
        lengths = check_step_lengths(lengths, B, n, h.device)
        y, state.out_lengths = self._from(0, self._project(h).transpose(1, 2), lengths, state)
        return y.transpose(1, 2), state

    def steady_check(self, n, state):
        """pyencoder.streaming.state.SteadyCheck of a general step of n encoder frames in every
        slot: n a positive multiple of ``stride`` (n // stride frames out); the device condition:
        every layer past its ``steady_from()`` frames (none where that is 0 for every layer: any
        state is steady, whatever its phases)."""
        if n < 1 or n % self.stride or state.out_lengths.shape[0] == 0:
            return None
        need = [(st.seen, layer.conv.steady_from())
                for layer, st in zip(self.layers, state.layers) if layer.conv.steady_from() > 0]
        if not need:
            return SteadyCheck(n // self.stride, lambda: None, ())

        def ok():
            out = None
            for seen, start in need:
                c = seen >= start
                out = c if out is None else out & c
            return out
        return SteadyCheck(n // self.stride, ok, tuple(seen for seen, _ in need))

    def step_fixed(self, h, state, check=False):
        """CUDA-graph friendly steady-state step: h (B, n, E), n a multiple of ``stride``, every
        slot the same n frames (``steady_check``; ``check=True`` verifies, a host
        synchronisation). Returns (B, n // stride, C), equal to ``step``'s output; the state is
        updated in place without host synchronisation (each slot's phase read on the device)."""
        check_state(self, state, AdapterState)
        self._check_h(h, state)
        n = h.shape[1]
        if n % self.stride:
            raise ValueError(f"ConvAdapter.step_fixed: the step length h.shape[1] ({n} frames) "
                             f"must be a multiple of the adapter's stride ({self.stride})")
        if check:          # every layer's condition before layer 0 takes the chunk
            require_steady("ConvAdapter", self.steady_check(n, state))
        x = self._project(h).transpose(1, 2)
        with marks_partial(state, "ConvAdapter.step_fixed", _layer_name) as p:
            for i, (layer, st) in enumerate(zip(self.layers, state.layers)):
                p.at = i
                x = layer.step_fixed(x, st, check=check)
                if n:
                    p.took.append(i)
        fill_counter(state, x.shape[-1], filled=state.layers[-1].out_lengths)
        return x.transpose(1, 2)

    @ends_stream
    def flush(self, state):
        """End of stream: each layer's right padding, passed through the layers after it."""
        check_state(self, state, AdapterState)
        outs, counts = [], []
        for i, layer in enumerate(self.layers):
            y, st = layer.flush(state.layers[i])
            state.layers[i] = st
            y, lengths = self._from(i + 1, y, st.out_lengths, state, who="flush")
            outs.append(y)
            counts.append(lengths)
        y, state = cat_time(outs, counts, state, time_last=True)
        return y.transpose(1, 2), state
