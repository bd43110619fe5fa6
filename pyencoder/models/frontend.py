"""Streamable wav2vec2-style convolutional feature extractor.

``FeatureConv1d`` is wav2vec2's unpadded ("valid") strided conv: output t reads input samples
[t*s, t*s + k - 1], so L samples give (L - k) // s + 1 frames. It runs on
pyencoder.ops.causal_conv1d: the valid conv of a sequence equals the causal conv of its samples
from k - s on, with its first k - s samples as ``initial_state``. ``causal=True`` instead left-pads
the input with k - s zeros (the Moshi/EnCodec convention of pyencoder.nn.CausalConv1d:
L // s frames, no lookahead). Streaming keeps, per slot, the samples of the next unfinished
window (at most k - 1); a chunk of any length >= 0 may be fed.

``RunningGroupNorm`` replaces wav2vec2-base's GroupNorm(C, C) over the whole utterance (conv layer
0, not streamable) by causal cumulative statistics: frame t is normalised by the float64 mean and
variance of frames 0..t of its stream (pyencoder.nn.norm, shared with pyencoder.hf's "running"
group norm).

``ConvFeatureExtractor`` stacks ``FeatureConvLayer`` s (conv -> optional norm -> GELU); with no norm
the GELU is fused into the conv op. Streaming state: per-layer ``FeatureConvState`` and an optional
``RunningNormState``. Slots whose phase or chunk length differ are processed one by one.
"""
import dataclasses
from typing import List, Optional

import torch
from torch import nn

from ..nn.conv import StridedConv1d, refresh_hooked_weight
from ..nn.norm import RunningGroupNorm, RunningNormState
from ..ops import _channel_norm_triton as _cn
from ..ops.conv import causal_conv1d
from .._checks import check_module_input
from ..streaming.state import (StreamState, SteadyCheck, advance_counter, check_init_args,
                               check_state, check_step_input, check_step_lengths, check_step_slots,
                               ends_stream, fill_counter, stamp, stream_config)

__all__ = ["FeatureConv1d", "RunningGroupNorm", "FeatureConvLayer", "ConvFeatureExtractor",
           "FeatureConvState", "RunningNormState", "FrontendState"]


@dataclasses.dataclass
class FeatureConvState(StreamState):
    buf: torch.Tensor          # (B, C_in, k - 1) last samples of the padded input, right-aligned
    seen: torch.Tensor         # (B,) int64 input samples fed so far
    out_lengths: torch.Tensor  # (B,) int64


@dataclasses.dataclass
class FrontendState(StreamState):
    convs: List[StreamState]
    norm: Optional[StreamState]
    out_lengths: torch.Tensor


def _tail(cat, keep):
    """The last ``keep`` samples of cat (B, C, L), left-padded with zeros when L < keep: the
    buffer after a step (samples before the held ones are never read; keeping them, rather than
    zeros, makes the general step's buffer the one step_fixed leaves)."""
    L = cat.shape[-1]
    if L >= keep:
        return cat[..., L - keep:].contiguous()
    return torch.nn.functional.pad(cat, (keep - L, 0))


def _full(B, n, device):
    return torch.full((B,), n, dtype=torch.int64, device=device)


class FeatureConv1d(StridedConv1d):
    """wav2vec2's unpadded strided conv (or left-padded with ``causal=True``) on
    pyencoder.ops.causal_conv1d, streamable (module docstring)."""
    state_type = FeatureConvState

    def __init__(self, in_channels, out_channels, kernel_size, stride, bias=True, activation=None,
                 causal=False, **conv_kwargs):
        super().__init__(in_channels, out_channels, kernel_size, stride, bias=bias,
                         activation=activation, **conv_kwargs)
        self.causal = causal

    @property
    def pad(self):
        return self.k - self.s if self.causal else 0

    @property
    def lookahead(self):
        return 0 if self.causal else self.k - self.s

    def extra_repr(self):
        return super().extra_repr() + f", causal={self.causal}, activation={self.activation}"

    def out_length(self, n):
        n = n + self.pad
        if isinstance(n, torch.Tensor):
            return torch.where(n >= self.k, torch.div(n - self.k, self.s, rounding_mode="floor")
                               + 1, torch.zeros_like(n))
        return (n - self.k) // self.s + 1 if n >= self.k else 0

    def _valid(self, x):
        k, s = self.k, self.s
        B, C, L = x.shape
        n = (L - k) // s + 1 if L >= k else 0
        if n == 0:
            return self._empty(x, B)
        # the samples past the last whole window (n - 1) * s + k are not cut off: the causal conv
        # over x[k - s:] gives (L - k + s) // s = n frames, dropping them itself (a slice to
        # that end made torch.compile / export guard on the length's residue: a recompile per
        # residue class, and an export's length range unprovable)
        init = x[..., :k - s].contiguous() if k > s else None
        return causal_conv1d(x[..., k - s:], self.weight, self.bias, stride=s, groups=self.groups,
                             activation=self.activation, initial_state=init)

    def forward(self, x):
        if x.dim() != 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, L); got {tuple(x.shape)}")
        if self.causal:
            return causal_conv1d(x, self.weight, self.bias, stride=self.s, groups=self.groups,
                                 activation=self.activation)
        return self._valid(x)

    def held_after(self, seen):
        """Samples of the padded stream kept in the buffer (the next window's) after ``seen``
        input samples (an int or a (B,) tensor)."""
        P = seen + self.pad
        done = self.out_length(seen)
        return P - done * self.s

    def step(self, x, state, lengths=None):
        """Feed x (B, C_in, n); returns (y (B, C_out, m), state)."""
        check_state(self, state, FeatureConvState)
        check_step_input(x, 1, self.in_channels, state.seen.shape[0], state.buf.device)
        refresh_hooked_weight(self)
        # x of another dtype is refused as by the offline forward (outside autocast): it was
        # cast to the state's silently
        check_module_input(x, 1, self.in_channels, f"(B, {self.in_channels}, n)", self.weight)
        B, C, n = x.shape
        k = self.k
        dev = x.device
        lengths = check_step_lengths(lengths, B, n, dev)
        x = x.to(state.buf.dtype)
        held = self.held_after(state.seen)
        uniform = B > 0 and bool((lengths == n).all()) and bool((held == held[0]).all())
        if uniform:
            c = int(held[0])
            cat = torch.cat((state.buf[..., k - 1 - c:], x), -1)
            y = self._valid(cat)
            state.buf = _tail(cat, k - 1)
        else:
            ys, bufs = [], []
            for b in range(B):
                c = int(held[b])
                cat = torch.cat((state.buf[b:b + 1, :, k - 1 - c:], x[b:b + 1, :, :int(lengths[b])]),
                                -1)
                yb = self._valid(cat)
                ys.append(yb[0])
                bufs.append(_tail(cat, k - 1)[0])
            y = self._stack_slots(ys, x)
            state.buf = torch.stack(bufs, 0)
        new_seen = state.seen + lengths
        state.out_lengths = self.out_length(new_seen) - self.out_length(state.seen)
        state.seen = new_seen
        return y, state

    def _check_fixed_input(self, x, state):
        """A fixed step's x (B, C_in, n) against the module and ``state`` (its slots), n a
        multiple of the stride. Returns n."""
        refresh_hooked_weight(self)
        # another dtype refused as by step and the offline forward (outside autocast)
        check_module_input(x, 1, self.in_channels, f"(B, {self.in_channels}, n)", self.weight)
        check_state(self, state, FeatureConvState)
        check_step_slots(x.shape[0], state.seen.shape[0])
        n = x.shape[-1]
        if n % self.s:
            raise ValueError(f"{type(self).__name__}.step_fixed: the step length x.shape[-1] must "
                             f"be a multiple of the stride {self.s}; got {n}")
        return n

    def step_fixed(self, x, state, held, check=False):
        """CUDA-graph friendly steady-state step (no host synchronisation, state updated in
        place): every slot gets the same n samples, n a multiple of the stride, and every slot
        holds ``held`` samples of its next window (a Python int: ``held_after(seen)`` of the
        slots' common ``seen``; ``check=True`` verifies it, a host synchronisation). Returns y
        (B, C_out, n // stride): what ``step`` returns, with the same state."""
        n = self._check_fixed_input(x, state)
        k, s = self.k, self.s
        if not k - s <= held <= k - 1:
            raise ValueError(f"{type(self).__name__}.step_fixed: held must be in [k - stride, "
                             f"k - 1] = [{k - s}, {k - 1}] (a stream past its first window); got "
                             f"{held}")
        if check:
            have = self.held_after(state.seen)
            if bool((have != held).any()):
                raise ValueError(f"{type(self).__name__}.step_fixed needs every slot to hold "
                                 f"{held} samples of its next window (a steady state: "
                                 f"held_after(seen) == {held}); got seen={state.seen.tolist()}, "
                                 f"held={have.tolist()}")
        x = x.to(state.buf.dtype)
        m = n // s
        if m == 0:
            y = self._empty(x, x.shape[0])
        elif held == k - s and k - 1 <= n:
            # the general step's cat(buf tail, x) without the cat: the k - s held samples are the
            # conv's initial state (a strided view of the buffer, no copy kernel), x its input
            y = causal_conv1d(x, self.weight, self.bias, stride=s, groups=self.groups,
                              activation=self.activation,
                              initial_state=state.buf[..., s - 1:] if k > s else None)
            if k > 1:
                state.buf.copy_(x[..., n - (k - 1):])
        else:
            cat = torch.cat((state.buf[..., k - 1 - held:], x), -1)
            init = cat[..., :k - s] if k > s else None
            y = causal_conv1d(cat[..., k - s:(m - 1) * s + k], self.weight, self.bias, stride=s,
                              groups=self.groups, activation=self.activation,
                              initial_state=init)
            if k > 1:
                state.buf.copy_(cat[..., cat.shape[-1] - (k - 1):])
        advance_counter(state.seen, n)
        fill_counter(state, m)
        return y

    @ends_stream
    def flush(self, state):
        check_state(self, state, FeatureConvState)
        state.out_lengths = torch.zeros_like(state.seen)
        return self._empty(state.buf, state.buf.shape[0]), state


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, T) tensor."""

    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2)

    def norm_gelu(self, x):
        """gelu(self(x)) (exact GELU). On CUDA (float16 / bfloat16 / float32, autograd not
        recording) one Triton launch (pyencoder.ops._channel_norm_triton: the statistics over
        the channels read along time, no transposed copy), where torch runs three (layer_norm's
        hidden contiguous copy of the transposed input, the norm, the GELU); equal to the last
        bit of x's dtype but for rare ties (float32 sums in another order)."""
        if x.dim() == 3 and tuple(self.normalized_shape) == (x.shape[1],) and \
                _cn.fused_ok(x, self.weight, self.bias):
            return _cn.channel_norm_act(x, self.weight, self.bias, self.eps, gelu=True)
        return torch.nn.functional.gelu(self(x))


def _exact_gelu(act):
    """Whether module ``act`` is the exact (erf) GELU: nn.GELU() or transformers' GELUActivation
    on torch's gelu (the activation of a shared HF feature extractor)."""
    if type(act) is nn.GELU:
        return act.approximate == "none"
    return type(act).__name__ == "GELUActivation" and \
        getattr(act, "act", None) is torch.nn.functional.gelu


class FeatureConvLayer(nn.Module):
    """conv -> norm ("layer": LayerNorm over channels, "group": RunningGroupNorm, None) -> GELU."""
    stream_time_axis = -1      # chunks (B, C, n)

    def __init__(self, in_channels, out_channels, kernel_size, stride, bias, norm, causal,
                 eps=1e-5):
        super().__init__()
        if norm not in (None, "layer", "group"):
            raise ValueError(f"norm must be None, 'layer' or 'group'; got {norm!r}")
        self.conv = FeatureConv1d(in_channels, out_channels, kernel_size, stride, bias=bias,
                                  activation="gelu" if norm is None else None, causal=causal)
        if norm == "layer":
            self.layer_norm = ChannelLayerNorm(out_channels, eps=eps)
        elif norm == "group":
            self.layer_norm = RunningGroupNorm(out_channels, eps=eps)
        else:
            self.layer_norm = None
        self.activation = nn.GELU() if norm is not None else nn.Identity()

    def forward(self, x):
        y = self.conv(x)
        if self.layer_norm is None:
            return self.activation(y)        # Identity when the GELU is fused into the conv
        return self.norm_act(y)

    def norm_act(self, y):
        """The layer's norm then its activation on the conv output y (B, C, T): a LayerNorm over
        channels or the running GroupNorm and an exact GELU in one launch on CUDA
        (ChannelLayerNorm.norm_gelu, RunningGroupNorm's ``gelu``)."""
        if _exact_gelu(self.activation):
            if isinstance(self.layer_norm, ChannelLayerNorm):
                return self.layer_norm.norm_gelu(y)
            if isinstance(self.layer_norm, RunningGroupNorm):
                return self.layer_norm(y, gelu=True)
        return self.activation(self.layer_norm(y))


class ConvFeatureExtractor(nn.Module):
    """wav2vec2's convolutional feature extractor: FeatureConvLayers (conv -> optional layer /
    running group norm -> GELU) for waveforms (B, L) -> features (B, C, T); streamable."""
    stream_time_axis = -1      # samples (B, n) in, features (B, C, m) out
    def __init__(self, conv_dim, conv_kernel, conv_stride, conv_bias=False, norm="layer",
                 causal=False, eps=1e-5):
        super().__init__()
        if not (len(conv_dim) == len(conv_kernel) == len(conv_stride)) or not conv_dim:
            raise ValueError(f"conv_dim, conv_kernel and conv_stride must be non-empty and of equal "
                             f"length; got {len(conv_dim)}, {len(conv_kernel)}, {len(conv_stride)}")
        if norm not in ("layer", "group", None):
            raise ValueError(f"feat_extract_norm must be 'layer', 'group' or None; got {norm!r}")
        layers = []
        cin = 1
        for i, (c, k, s) in enumerate(zip(conv_dim, conv_kernel, conv_stride)):
            ln = "layer" if norm == "layer" else ("group" if norm == "group" and i == 0 else None)
            layers.append(FeatureConvLayer(cin, c, k, s, conv_bias, ln, causal, eps))
            cin = c
        self.conv_layers = nn.ModuleList(layers)

    @property
    def hop(self):
        h = 1
        for layer in self.conv_layers:
            h *= layer.conv.s
        return h

    def out_length(self, n):
        for layer in self.conv_layers:
            n = layer.conv.out_length(n)
        return n

    def forward(self, wav):
        """wav (B, L) or (B, 1, L) -> features (B, C, T)."""
        x = wav[:, None] if wav.dim() == 2 else wav
        for layer in self.conv_layers:
            x = layer(x)
        return x

    def _stream_config(self):
        convs = ", ".join(stream_config(layer.conv) for layer in self.conv_layers)
        return f"ConvFeatureExtractor({convs})"

    def init_state(self, batch_size, *, device=None, dtype=None, **_):
        check_init_args(batch_size, dtype, device, self)
        convs = [layer.conv.init_state(batch_size, device=device, dtype=dtype)
                 for layer in self.conv_layers]
        ln0 = self.conv_layers[0].layer_norm
        norm = ln0.init_state(batch_size, device=convs[0].seen.device) \
            if isinstance(ln0, RunningGroupNorm) else None
        if norm is not None:
            norm.out_lengths = None     # the extractor counts its frames (state.out_lengths)
        return stamp(self, FrontendState(convs=convs, norm=norm,
                                         out_lengths=torch.zeros_like(convs[0].seen)))

    def step(self, wav, state, lengths=None):
        check_state(self, state, FrontendState)
        x = wav[:, None] if wav.dim() == 2 else wav
        B = x.shape[0]
        lengths = check_step_lengths(lengths, B, x.shape[-1], x.device)
        for i, layer in enumerate(self.conv_layers):
            x, st = layer.conv.step(x, state.convs[i], lengths)
            state.convs[i] = st
            lengths = st.out_lengths
            if isinstance(layer.layer_norm, RunningGroupNorm):
                g = _exact_gelu(layer.activation)     # in the norm's launch on CUDA
                x, state.norm = layer.layer_norm.step(x, state.norm, lengths, gelu=g)
                x = x if g else layer.activation(x)
            elif layer.layer_norm is not None:
                x = layer.norm_act(x)
            else:
                x = layer.activation(x)          # Identity when the GELU is fused
        state.out_lengths = lengths
        return x, state

    def _held_at(self, seen):
        """Per conv layer, the samples its state holds after ``seen`` waveform samples (ints)."""
        held = []
        for layer in self.conv_layers:
            held.append(layer.conv.held_after(seen))
            seen = layer.conv.out_length(seen)
        return held

    def steady_held(self):
        """Per conv layer, the samples of its next window its state holds once the stream has
        been fed a multiple of ``hop`` samples past every layer's first window: what
        ``step_fixed`` reads without looking at the state (it depends on the waveform position
        modulo hop only)."""
        cached = self.__dict__.get("_steady_held")
        geo = tuple((layer.conv.k, layer.conv.s, layer.conv.pad) for layer in self.conv_layers)
        if cached is not None and cached[0] == geo:
            return cached[1]
        # two positions: the held counts do not change
        out = [self._held_at(m * self.hop) for m in (1 << 20, (1 << 20) + 1)]
        if out[0] != out[1]:
            raise RuntimeError(f"ConvFeatureExtractor: held samples {out} differ between "
                               f"positions {{0 mod hop}}: not a periodic stream geometry {geo}")
        self.__dict__["_steady_held"] = (geo, out[0])
        return out[0]

    def steady_from(self):
        """The fewest samples (a multiple of ``hop``) from which every multiple of ``hop`` fed
        leaves the ``steady_held`` counts: ``seen % hop == 0 and seen >= steady_from()`` is a
        steady state (checked on the device without reading it per layer)."""
        cached = self.__dict__.get("_steady_from")
        held = self.steady_held()
        if cached is not None and cached[0] == held:
            return cached[1]
        # past every layer's first window (the receptive field R) the held counts are constant
        # in the position (the hop is a multiple of each layer's stride times the hops before
        # it); scan the positions up to there
        last_bad, R, H = -1, 1, 1
        for layer in self.conv_layers:
            R += (layer.conv.k - 1) * H
            H *= layer.conv.s
        for m in range(-(-R // self.hop) + 3):
            if self._held_at(m * self.hop) != held:
                last_bad = m
        out = (last_bad + 1) * self.hop
        self.__dict__["_steady_from"] = (held, out)
        return out

    def steady_check(self, n, state):
        """pyencoder.streaming.state.SteadyCheck of a general step of n samples in every slot: n
        a positive multiple of ``hop`` (n // hop frames out); the device condition: every slot
        at a multiple of hop, at least ``steady_from()`` samples in (the state of every later
        layer, and the running norm's count, follow from the first conv's ``seen``)."""
        hop = self.hop
        seen = state.convs[0].seen
        if n < 1 or n % hop or seen.shape[0] == 0:
            return None
        start = self.steady_from()
        return SteadyCheck(n // hop, lambda: (torch.remainder(seen, hop) == 0) & (seen >= start),
                           (seen,))

    def step_fixed(self, wav, state, check=False):
        """CUDA-graph friendly steady-state step: wav (B, n) or (B, 1, n), every slot the same
        n samples, n a multiple of ``hop``; every slot has been fed a multiple of ``hop``
        samples and is past each conv layer's first window (one general ``step`` of at least
        the receptive field does it; ``check=True`` verifies, a host synchronisation). No host
        synchronisation; the state is updated in place. Returns the features (B, C, n // hop),
        equal to ``step``'s."""
        check_state(self, state, FrontendState)
        if not isinstance(wav, torch.Tensor):
            raise TypeError(f"wav must be a torch.Tensor (B, n); got {type(wav).__name__}")
        x = wav[:, None] if wav.dim() == 2 else wav
        n = x.shape[-1]
        if n % self.hop:
            raise ValueError(f"ConvFeatureExtractor.step_fixed: the step length ({n} samples) "
                             f"must be a multiple of hop ({self.hop})")
        held = self.steady_held()
        if check:
            seen = state.convs[0].seen
            bad = [i for i, (layer, st) in enumerate(zip(self.conv_layers, state.convs))
                   if bool((layer.conv.held_after(st.seen) != held[i]).any())]
            if bad:
                raise ValueError(f"ConvFeatureExtractor.step_fixed needs a steady state: every "
                                 f"slot fed a multiple of hop ({self.hop}) samples, past the "
                                 f"first window of every conv layer (run the general step "
                                 f"first); got seen={seen.tolist()}, conv layers {bad} hold "
                                 f"other sample counts than {held}")
        for i, layer in enumerate(self.conv_layers):
            x = layer.conv.step_fixed(x, state.convs[i], held[i], check=check)
            if isinstance(layer.layer_norm, RunningGroupNorm):
                g = _exact_gelu(layer.activation)     # in the norm's launch on CUDA
                x = layer.layer_norm.step_fixed(x, state.norm, check=check, gelu=g)
                x = x if g else layer.activation(x)
            elif layer.layer_norm is not None:
                x = layer.norm_act(x)
            else:
                x = layer.activation(x)          # Identity when the GELU is fused
        fill_counter(state, x.shape[-1], filled=state.convs[-1].out_lengths)
        return x
