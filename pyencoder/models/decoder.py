"""StreamingDecoder: a Vocos-style causal ConvNeXt decoder that emits K waveform samples per frame
(FocalCodec-Stream's replacement for the iSTFT head), offline and streaming.

    x (B, T, input_dim) -> causal conv embed (k) -> LayerNorm -> [Refiner] -> N x ConvNeXtBlock
    -> [M x TransformerLayer (banded causal attention, optional lookahead)] -> LayerNorm
    -> Linear(dim, K) -> (B, T, K) -> flattened waveform (B, T * K)

ConvNeXtBlock: y = x + gamma * W2 GELU(W1 LN(dwconv(x))) with dwconv a depthwise causal conv
(pyencoder.nn.CausalConv1d, width k, no lookahead) and gamma a per-channel layer scale.

Exact latency: frame f's K samples need input frames up to f + R in the worst case, R = (refiner
chunk - 1) + the attention lookaheads (the first frame of a Refiner chunk waits for the whole
chunk); counted from the first output sample of frame f, that is (R + 1) * K samples
(``latency()``). In a stream they are emitted by the step that delivers the last input frame they
need (at the latest input frame f + R); without a Refiner every frame waits exactly R frames.

Streaming: ``init_state`` / ``step(x_chunk)`` / ``flush``: a StreamingSequential over the same
modules; for any chunking step + flush outputs concatenate to the offline waveform.
"""
import copy
import dataclasses
import math
from typing import Optional

import torch
from torch import nn

from .._backend import requested_backend
from .._checks import check_eps, check_module_input
from ..nn.attention import BandedSelfAttention
from ..nn.conv import CausalConv1d, ConvState
from ..nn.layer import TransformerLayer
from ..nn.linear import Linear
from ..nn.misc import Transpose
from ..nn.norm import LayerNorm
from ..nn.refiner import Refiner
from ..ops import _channel_norm_triton as _cn
from ..ops.convnext import convnext_dwconv_ln, select_backend as convnext_backend
from ..streaming.latency import Latency, check_sample_rate, latency as chain_latency
from ..streaming.sequential import StreamingSequential
from ._config import cfg_bool, cfg_float, cfg_int
from ..streaming.state import (StreamState, SteadyCheck, advance_counter, check_init_args,
                               check_state, check_step_input, check_step_lengths, check_step_slots,
                               ends_stream, fill_counter, fresh_counters, holds_in_place_step,
                               inference_step, marks_partial, record_steady, stamp, steady_dispatch)

__all__ = ["DecoderConfig", "ConvNeXtBlock", "StreamingDecoder", "DecoderState"]


@dataclasses.dataclass
class DecoderConfig:
    input_dim: int = 1024
    dim: int = 512
    intermediate_dim: int = 1536
    num_blocks: int = 8
    kernel_size: int = 7
    embed_kernel_size: int = 7
    layer_scale_init: Optional[float] = None   # None: 1 / num_blocks (Vocos)
    samples_per_frame: int = 320               # K
    num_attention_layers: int = 0
    num_heads: int = 8
    attention_left: Optional[int] = 64
    attention_lookahead: int = 0
    refiner_chunk: Optional[int] = None        # frames per Refiner chunk (None: no Refiner)
    refiner_hidden: Optional[int] = None
    layer_norm_eps: float = 1e-6
    convnext_fused: Optional[bool] = None   # ConvNeXtBlock.fused (None: auto)

    def validate(self):
        """Raise naming the field (``DecoderConfig.<field>``) if a field is of the wrong type or
        out of range; StreamingDecoder calls it before building anything."""
        for name in ("input_dim", "dim", "intermediate_dim", "kernel_size", "embed_kernel_size",
                     "samples_per_frame", "num_heads"):
            cfg_int(self, name, 1)
        cfg_int(self, "num_blocks", 0)
        cfg_int(self, "num_attention_layers", 0)
        cfg_int(self, "attention_left", 0, allow_none=True)
        cfg_int(self, "attention_lookahead", 0)
        cfg_int(self, "refiner_chunk", 1, allow_none=True)
        cfg_int(self, "refiner_hidden", 1, allow_none=True)
        cfg_float(self, "layer_norm_eps", positive=False)
        cfg_float(self, "layer_scale_init", positive=None, allow_none=True)
        cfg_bool(self, "convnext_fused", allow_none=True)
        if self.num_attention_layers:
            # the attention layers rotate whole heads (RoPE): what they would refuse in their
            # own words, named here by the config's fields
            if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
                raise ValueError(f"DecoderConfig.dim ({self.dim}) must be num_heads "
                                 f"({self.num_heads}) heads of an even size (its attention "
                                 f"layers rotate whole heads) with num_attention_layers > 0")


@dataclasses.dataclass
class DecoderState(StreamState):
    net: StreamState
    out_lengths: torch.Tensor   # (B,) int64 waveform samples emitted by the last step / flush


class ConvNeXtBlock(nn.Module):
    """Causal ConvNeXt block on (B, T, C): depthwise causal conv -> LayerNorm -> Linear -> GELU
    -> Linear -> layer scale -> residual.

    ``fused``: None (auto: the composed ops, i.e. the depthwise conv kernel then LayerNorm,
    unless a kernel backend is forced for the "convnext" op family (``use_backend(convnext=...)``
    or ``PYENCODER_BACKEND``) and can run the call: then the fused conv + LayerNorm op
    pyencoder.ops.convnext_dwconv_ln), True (always the fused op, with the registry's backend),
    False (composed ops). Both paths compute the same function (the fused one rounds once after
    the LayerNorm). Auto does not pick the fused op by itself because it measured slower: on an
    H100 (c446fb01b9e0, forward, B=8, C=768, L=2048) it took 0.122 ms in bf16 and 0.176 ms in
    fp32 against the composed ops' 0.076 / 0.108 ms (0.63x / 0.61x); bench_convnext decides
    again when the kernel changes."""

    lookahead = 0
    hop = 1

    def __init__(self, dim, intermediate_dim, kernel_size=7, layer_scale_init=None, eps=1e-6,
                 fused=None):
        super().__init__()
        check_eps("eps", eps)
        if layer_scale_init is not None:
            if isinstance(layer_scale_init, bool) or not isinstance(layer_scale_init, (int, float)):
                raise TypeError(f"layer_scale_init must be None or a finite float; got "
                                f"{type(layer_scale_init).__name__} {layer_scale_init!r}")
            if not math.isfinite(layer_scale_init):
                raise ValueError(f"layer_scale_init must be None or a finite float; got "
                                 f"{layer_scale_init!r}")
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"fused must be None, True or False; got {type(fused).__name__} "
                            f"{fused!r}")
        self.dwconv = CausalConv1d(dim, dim, kernel_size, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.pwconv1 = Linear(dim, intermediate_dim)
        self.act = nn.GELU()
        self.pwconv2 = Linear(intermediate_dim, dim)
        # (float: an int made an int64 tensor, which nn.Parameter refused in torch's words)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init))) \
            if layer_scale_init is not None else None
        self.fused = fused

    def _use_fused(self, x):
        if self.fused is None:
            req = requested_backend("convnext")
            if req is None or req == "auto":
                return False
            return convnext_backend(x.transpose(1, 2), self.dwconv.weight) != "reference"
        return bool(self.fused)

    def _fused(self, x, state=None):
        return convnext_dwconv_ln(x.transpose(1, 2), self.dwconv.weight, self.dwconv.bias,
                                  self.norm.weight, self.norm.bias, eps=self.norm.eps,
                                  initial_state=state, return_final_state=state is not None)

    def _mlp(self, x, h, normed=False):
        h = self.pwconv2(self.act(self.pwconv1(h if normed else self.norm(h))))
        if self.gamma is None:
            return x + h
        if h.dtype == x.dtype == self.gamma.dtype:
            return torch.addcmul(x, h, self.gamma)      # x + gamma * h, one kernel for two
        return x + h * self.gamma

    def _conv_norm(self, h):
        """LayerNorm over the channels of the depthwise conv's output h (B, C, T) -> (B, T, C).
        On CUDA one Triton launch reading h as it lies (pyencoder.ops._channel_norm_triton),
        where torch's layer_norm of the transposed view first copies it to contiguous (a whole
        activation's pass offline, a kernel per step); torch's ops where autograd records."""
        n = self.norm
        if _cn.fused_ok(h, n.weight, n.bias):
            return _cn.channel_norm_act(h, n.weight, n.bias, n.eps, gelu=False,
                                        time_major=True).transpose(1, 2)
        return n(h.transpose(1, 2))

    def _check_x(self, x):
        """x (B, T, dim) of the module's dtype and device, named as given (the conv and the fused
        op would describe its (B, dim, T) transpose, or call it conv_weight)."""
        C = self.dwconv.in_channels
        check_module_input(x, 2, C, f"(B, T, {C})", self.dwconv.weight)

    def forward(self, x):
        self._check_x(x)
        if self._use_fused(x):
            return self._mlp(x, self._fused(x), normed=True)
        h = self.dwconv(x.transpose(1, 2))
        return self._mlp(x, self._conv_norm(h), normed=True)

    def init_state(self, batch_size, *, device=None, dtype=None, **_):
        return self.dwconv.init_state(batch_size, device=device, dtype=dtype)

    def _check_state(self, state):
        """The state is its depthwise conv's (a ConvState stamped by it); pyencoder.streaming's
        admit calls this hook too (its own check wanted this module's stamp)."""
        check_state(self.dwconv, state, ConvState)

    def step(self, x, state, lengths=None):
        self._check_state(state)
        check_step_input(x, -1, self.dwconv.in_channels, state.seen.shape[0], state.hist.device)
        self._check_x(x)
        n = x.shape[1]
        if lengths is not None:
            lengths = check_step_lengths(lengths, x.shape[0], n, x.device)
        uniform = lengths is None or bool((lengths == n).all())
        if uniform and n > 0 and self.dwconv.k > 1 and self._use_fused(x):
            h, hist = self._fused(x.to(state.hist.dtype), state.hist)
            state.hist = hist.to(state.hist.dtype)     # (under autocast the op's is bf16)
            state.seen = state.seen + n
            state.out_lengths = torch.full_like(state.seen, n)
            y = self._mlp(x, h, normed=True)
        else:
            h, state = self.dwconv.step(x.transpose(1, 2), state, lengths)
            # ragged lengths: the conv emits max(lengths) frames (slot b's first lengths[b]),
            # the residual is x's first as many (it crashed on x's n where every slot had fewer)
            y = self._mlp(x[:, :h.shape[-1]], self._conv_norm(h), normed=True)
        state.out_dtype = y.dtype           # flush's empty output takes it
        return y, state

    def steady_check(self, n, state):
        """pyencoder.streaming.state.SteadyCheck of a step of n >= 1 frames: always the fixed
        step (a stride-1 conv: every state is steady), nothing to check on the device."""
        if n < 1 or state.seen.shape[0] == 0:
            return None
        return SteadyCheck(n, lambda: None, ())

    @inference_step
    def step_fixed(self, x, state, check=False):
        """CUDA-graph friendly step: x (B, n, C), every slot the same n frames; what ``step``
        returns, the state updated in place, no host synchronisation."""
        self._check_state(state)
        check_step_input(x, -1, self.dwconv.in_channels, state.seen.shape[0], state.hist.device)
        self._check_x(x)
        n = x.shape[1]
        if n > 0 and self.dwconv.k > 1 and self._use_fused(x):
            h, hist = self._fused(x.to(state.hist.dtype), state.hist)
            state.hist.copy_(hist)
            advance_counter(state.seen, n)
            fill_counter(state, n)
            y = self._mlp(x, h, normed=True)
        else:
            h = self.dwconv.step_fixed(x.transpose(1, 2), state, check=check)
            y = self._mlp(x, self._conv_norm(h), normed=True)
        state.out_dtype = y.dtype
        return y

    @ends_stream
    def flush(self, state):
        self._check_state(state)
        B = state.seen.shape[0]
        state.out_lengths = torch.zeros_like(state.seen)
        # in the dtype of the steps' frames (the residual's: the input's), not the history's
        dt = getattr(state, "out_dtype", None) or self.dwconv.weight.dtype
        return state.hist.new_zeros(B, 0, self.dwconv.in_channels, dtype=dt), state


class StreamingDecoder(nn.Module):
    """Vocos-style causal ConvNeXt decoder (``DecoderConfig``): frames (B, T, input_dim) ->
    waveform (B, T * samples_per_frame), offline and streaming, with exact ``latency()``."""
    def __init__(self, config: DecoderConfig):
        super().__init__()
        if not isinstance(config, DecoderConfig):
            raise TypeError(f"config must be a DecoderConfig; got "
                            f"{type(config).__name__}")
        # the model's own copy: it reads its config at run time (an edit of the caller's object,
        # e.g. to build a second model from it, changed this one)
        c = copy.deepcopy(config)
        c.validate()
        self.config = c
        ls = 1.0 / c.num_blocks if c.layer_scale_init is None and c.num_blocks else \
            c.layer_scale_init
        # the embed conv's output normalised as it lies (pyencoder.nn.LayerNorm: no copy of the
        # transposed view on CUDA)
        mods = [Transpose(1, 2), CausalConv1d(c.input_dim, c.dim, c.embed_kernel_size),
                Transpose(1, 2), LayerNorm(c.dim, eps=c.layer_norm_eps)]
        if c.refiner_chunk is not None:
            mods.append(Refiner(c.dim, c.refiner_chunk, hidden_dim=c.refiner_hidden))
        mods += [ConvNeXtBlock(c.dim, c.intermediate_dim, c.kernel_size, ls, c.layer_norm_eps,
                               fused=c.convnext_fused)
                 for _ in range(c.num_blocks)]
        for _ in range(c.num_attention_layers):
            att = BandedSelfAttention(c.dim, c.num_heads, left=c.attention_left,
                                      right=c.attention_lookahead, rope=True)
            mods.append(TransformerLayer(att, c.intermediate_dim, norm_first=True,
                                         layer_norm_eps=c.layer_norm_eps))
        mods += [nn.LayerNorm(c.dim, eps=c.layer_norm_eps), Linear(c.dim, c.samples_per_frame)]
        self.net = StreamingSequential(*mods)

    @property
    def samples_per_frame(self):
        return self.config.samples_per_frame

    @property
    def lookahead_frames(self):
        c = self.config
        r = 0 if c.refiner_chunk is None else c.refiner_chunk - 1
        return r + c.num_attention_layers * c.attention_lookahead

    def latency(self, sample_rate=16000):
        """Exact worst-case algorithmic latency (pyencoder.streaming.Latency) in waveform samples
        at ``sample_rate`` (the decoder's output rate): frame t's K samples are out once input
        frame t + lookahead_frames has arrived, so ``samples`` = (lookahead_frames + 1) * K,
        ``hop`` = K samples per input frame, ``lookahead_samples`` = lookahead_frames * K.
        ``pyencoder.streaming.latency(decoder)`` returns the same. The keys of the dict this used
        to return (lookahead_frames, samples_per_frame, samples, ms) read the same values."""
        check_sample_rate(sample_rate)
        K = self.samples_per_frame
        frames = chain_latency(self.net, sample_rate=1)      # in input frames
        la = frames.lookahead_samples
        return Latency(samples=(la + 1) * K, ms=1000.0 * (la + 1) * K / sample_rate, hop=K,
                       lookahead_samples=la * K, sample_rate=int(sample_rate),
                       breakdown=[(n, t, h, f, s * K) for n, t, h, f, s in frames.breakdown],
                       lookahead_frames=la)

    def own_latency(self, sample_rate):
        """pyencoder.streaming.latency(decoder): this model's own accounting (its input is
        frames, its output waveform samples: a walk of its layers counted frames as samples)."""
        return self.latency(sample_rate)

    def forward_frames(self, x):
        """x (B, T, input_dim) -> (B, T, K) samples per frame."""
        if x.dim() != 3 or x.shape[-1] != self.config.input_dim:
            raise ValueError(f"x must have shape (B, T, {self.config.input_dim}); got "
                             f"{tuple(x.shape)}")
        return self.net(x)

    def forward(self, x):
        """x (B, T, input_dim) -> waveform (B, T * K)."""
        y = self.forward_frames(x)
        return y.reshape(y.shape[0], y.shape[1] * y.shape[2])   # (-1: ambiguous at batch 0)

    def _stream_config(self):
        return f"StreamingDecoder({self.config!r})"

    def init_state(self, batch_size, *, device=None, dtype=None, max_chunk=64):
        check_init_args(batch_size, dtype, device, self)
        net = self.net.init_state(batch_size, device=device, dtype=dtype, max_chunk=max_chunk)
        return stamp(self, DecoderState(net=net, out_lengths=torch.zeros_like(net.out_lengths)))

    def _wave(self, y, state):
        K = self.samples_per_frame
        B = state.out_lengths.shape[0]
        if y is None:
            y = state.out_lengths.new_zeros(B, 0, K, dtype=torch.float32)
        state.out_lengths = state.net.out_lengths * K
        return y.reshape(B, -1), state

    @inference_step(when=holds_in_place_step)
    def step(self, x, state, lengths=None):
        """Feed x (B, n, input_dim) frames; returns (wav (B, m * K), state). Slot b's new samples
        are the first ``state.out_lengths[b]``."""
        if x.dim() != 3 or x.shape[-1] != self.config.input_dim:
            raise ValueError(f"x must have shape (B, n, {self.config.input_dim}); got "
                             f"{tuple(x.shape)}")
        check_state(self, state, DecoderState)
        n = x.shape[1]
        if lengths is not None:
            lengths = check_step_lengths(lengths, x.shape[0], n, x.device)
        if self._fixed_ok(x, state, lengths):
            # the steady state: step_fixed (one host read to decide, none while the stream stays
            # steady); counters the caller may hold from earlier steps are not written
            fresh_counters(state)
            y = self.step_fixed(x, state)
            record_steady(state, self.steady_check(n, state))
            return y, state
        # the stack marks its own streams; the decoder's state (CudaGraphStep and the next step
        # read the top one) carries the mark
        with marks_partial(state, None) as p:
            p.part = state.net
            y, state.net = self.net.step(x, state.net, lengths)
        return self._wave(y, state)

    def _fixed_ok(self, x, state, lengths=None):
        """Whether this general step may run as ``step_fixed`` (the same result):
        pyencoder.streaming.state.steady_dispatch of ``steady_check``; not where autograd
        records (the fixed step writes the state in place)."""
        if self.net._records_autograd(x, state.net):
            return False
        n = x.shape[1]
        return steady_dispatch(state, self.steady_check(n, state), lengths, n)

    def steady_check(self, n, state):
        """pyencoder.streaming.state.SteadyCheck of a step of n frames: the stack's (every
        ConvNeXt block and conv always; the Refiner: n whole chunks; attention layers: steady),
        n_out in waveform samples."""
        c = self.net.steady_check(n, state.net)
        return None if c is None else SteadyCheck(c.n_out * self.samples_per_frame, c.ok,
                                                  c.counters)

    @inference_step(when=holds_in_place_step)
    def step_fixed(self, x, state, check=False):
        """CUDA-graph friendly steady-state step: x (B, n, input_dim), every slot the same n
        frames (n whole Refiner chunks; attention layers steady: StreamingSequential.step_fixed,
        ``check=True`` verifies, a host synchronisation). Returns the waveform (B, n * K) (every
        sample valid), equal to ``step``'s; the state is updated in place without host
        synchronisation, so the call can be captured in a torch.cuda.CUDAGraph. The general
        ``step`` runs it by itself once steady."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or \
                x.shape[-1] != self.config.input_dim:
            raise ValueError(f"x must have shape (B, n, {self.config.input_dim}); got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)}")
        check_state(self, state, DecoderState)
        check_step_slots(x.shape[0], state.out_lengths.shape[0])
        with marks_partial(state, None) as p:
            p.part = state.net
            y = self.net.step_fixed(x, state.net, check=check)
        fill_counter(state, y.shape[1] * self.samples_per_frame)
        return y.reshape(y.shape[0], y.shape[1] * y.shape[2])

    @ends_stream
    def flush(self, state):
        check_state(self, state, DecoderState)
        y, state.net = self.net.flush(state.net)
        return self._wave(y, state)
