"""CausalEncoder: a wav2vec2-style speech encoder made causal with per-layer lookahead
(DyStream's Rope-Wav2vec2, FocalCodec-Stream's causal WavLM encoder), offline and streaming.

    wav (B, L) -> ConvFeatureExtractor (valid or causal strided convs, LayerNorm / running
    GroupNorm / none, GELU) -> feature projection (LayerNorm, Linear) -> + causal positional conv
    (optional; HuBERT's BatchNorm before it) -> [post-LN: LayerNorm] -> L x TransformerLayer
    (banded or chunked interval attention with RoPE inside the op, lookahead r_l in layer l; pre-LN
    layers may end in an MMS attention adapter) -> [pre-LN: LayerNorm] -> [conv adapter]

Each attention layer is pyencoder.nn.BandedSelfAttention (frame p sees [p - left, p + r_l]) or
ChunkedSelfAttention (chunk c sees left_chunks chunks back and r_l frames past its end); with
``rel_pos_bias=True`` (the WavLM variant) it is pyencoder.nn.WavLMSelfAttention with the same mask
plus WavLM's gated relative position bias: layer 0 owns the (num_buckets, H) bucket table
(``layers.0.attention.rel_attn_embed``) and every later layer reads it by reference, recomputing
the bias of its own window from (key - query) and its own per-query gate. Lookahead
compounds: the encoder's total lookahead is the sum of the per-layer values (band) and the
conv front end adds k - s samples per valid conv. ``lookahead=None`` gives a full-context encoder
(teacher; offline only).

Streaming: ``init_state`` / ``step`` / ``flush`` (DESIGN.md "Streaming"); any chunking of the
waveform gives the offline output (up to summation order). ``step_fixed`` is the whole encoder's
CUDA-graph-capturable steady-state step (every slot the same whole number of hops; no host
synchronisation, the state updated in place); ``step`` runs it by itself once the stream is
steady (one host read to check, where the general step reads the device ~80 times; none on
later steps while nothing else touched the stream's counters). ``from_hf`` converts a transformers
Wav2Vec2Model / HubertModel (or a head around one) into a CausalEncoder with the same weights, the
same function as that model patched by ``pyencoder.hf.apply_pyencoder_to_wav2vec2`` with the same
options; a WavLMModel (or head) gives the WavLM variant, its relative-bias table and gates included.
No dropout anywhere (training-time dropout is left to the caller).

``from_hf(..., share_weights=True)`` builds the encoder around the transformers model's own
parameters instead of copies (what pyencoder.hf.StreamingEncoder streams): every parameter is the
model's tensor (in-place edits, ``load_adapter`` and ``.to()`` of either are seen by both), the
projections and feed-forward Linear layers are the model's nn.Linear modules run through
pyencoder.nn.LinearView, the positional conv reads the model's weight-norm parametrisation at
each call, and WavLM's layer 0 table is the model's nn.Embedding.

Adapters (transformers' ``config.add_adapter`` and ``config.adapter_attn_dim``): the conv adapter
after the encoder is pyencoder.models.adapter.ConvAdapter (strided: ``hop`` and ``latency()``
include its stride and right context, the stream carries its windows); the attention adapters of
pre-LN layers (MMS) are per frame (pyencoder.nn.AttentionAdapter).

Limits: no SpecAugment masking. The WavLM relative bias is fused in the interval attention kernels
offline (forward and backward) and in the ring decode when streaming with a bounded left context
(``left`` / ``left_chunks``), where the WavLM layers have ``step_fixed`` like the others: the
general step of ``layers`` runs it by itself in the steady state, and ``layers.step_fixed`` is the
CUDA-graph-capturable step of the stack. Unbounded left context streams on the plain-torch ring
path (no ``step_fixed``). ``sink`` (band / chunked layers, WavLM's biased ones included): the first
``sink`` frames are attention sinks every frame sees (IntervalMask sink keys), resident in the
stream state; the layers' ``step_fixed`` covers them once every sink frame has arrived.
"""
import copy
import dataclasses
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..nn.attention import BandedSelfAttention, ChunkedSelfAttention
from ..nn.conv import CausalConv1d
from ..nn.layer import AttentionAdapter, TransformerLayer
from ..nn.linear import Linear, skinny_view
from ..nn.norm import frame_batch_norm
from .._checks import autocasting, check_bool, check_int
from ..nn.relpos import WavLMSelfAttention, check_bucket_args
from ..ops import _channel_norm_triton as _cn
from ..ops import _ring_write_triton as _ring
from ..rope import Rope
from ..streaming.latency import NotStreamableError, latency as composed_latency
from ..streaming.sequential import PassState, StreamingSequential, cat_time
from ..streaming.state import (StreamState, all_steady, batched_counters, check_init_args,
                               check_state, check_step_lengths, check_step_slots, ends_stream,
                               fill_counter, fresh_counters, holds_in_place_step,
                               inference_step, marks_partial, record_steady, require_steady, stamp,
                               steady_check, steady_dispatch)
from ._config import _as_int, cfg_bool, cfg_choice, cfg_float, cfg_int, cfg_ints, is_np_bool
from .adapter import ConvAdapter
from .frontend import ConvFeatureExtractor, FrontendState

__all__ = ["EncoderConfig", "CausalEncoder", "EncoderOutput", "EncoderState", "find_hf_base",
           "hf_adapter_config"]

FULL_CONTEXT = 1 << 24


@dataclasses.dataclass
class EncoderConfig:
    conv_dim: Tuple[int, ...] = (512,) * 7
    conv_kernel: Tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: Tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    feat_extract_norm: Optional[str] = "group"   # "layer", "group" (running), None
    causal_conv: bool = False                    # False: wav2vec2's valid convs (k - s lookahead)
    feat_proj_layer_norm: bool = True
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    norm_first: bool = False                     # pre-LN (wav2vec2-large) or post-LN (base)
    layer_norm_eps: float = 1e-5
    # the feature extractor's conv-layer norms (None: layer_norm_eps); transformers builds them
    # with torch's default 1e-5 whatever its config.layer_norm_eps says: from_hf reads them
    conv_norm_eps: Optional[float] = None
    pos_conv: Optional[str] = None               # None or "causal"
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    attention: str = "band"                      # "band" or "chunked"
    left: Optional[int] = None                   # band: frames of history (None: unbounded)
    chunk_size: int = 1                          # chunked: frames per chunk
    left_chunks: Optional[int] = None            # chunked: chunks of history (None: unbounded)
    lookahead: Optional[int] = 3                 # frames; None: full context (offline teacher;
                                                 # the mask fields left, chunk_size, left_chunks,
                                                 # sink and lookahead_layers are then not used,
                                                 # so a teacher is the student's config with
                                                 # lookahead=None)
    sink: int = 0                                # band / chunked layers: the first `sink` frames
                                                 # are seen by every frame (attention sinks)
    lookahead_layers: Union[str, Sequence[int]] = "first"   # "first", "all" or one int per layer
    rope: Union[bool, int, Rope] = True          # True: whole head; int: rotary dim; or a Rope
    rope_base: float = 10000.0
    max_context: int = 65536
    rel_pos_bias: bool = False                   # WavLM: gated relative position bias
    num_buckets: int = 320                       # WavLM: relative-position buckets
    max_bucket_distance: int = 800               # WavLM: distance of the last (log) bucket
    gated_rel_pos: bool = True                   # WavLM: per-query gate on the bias
    pos_conv_batch_norm: bool = False            # HuBERT: BatchNorm1d before the positional conv
                                                 # (running statistics in training too: causal;
                                                 # never updated, so from scratch it is affine)
    adapter_attn_dim: Optional[int] = None       # MMS attention adapters (pre-LN layers only)
    add_adapter: bool = False                    # conv adapter after the encoder
    adapter_hidden_size: Optional[int] = None    # its channels (None: hidden_size)
    num_adapter_layers: int = 3
    adapter_kernel_size: int = 3
    adapter_stride: int = 2
    adapter_padding: int = 1                     # zero frames on both sides of each adapter conv

    def validate(self):
        """Raise naming the field (``EncoderConfig.<field>``) if a field is of the wrong type or
        out of range; CausalEncoder calls it before building anything."""
        cfg_ints(self, "conv_dim", 1)
        cfg_ints(self, "conv_kernel", 1)
        cfg_ints(self, "conv_stride", 1)
        if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride):
            raise ValueError(f"EncoderConfig.conv_dim, conv_kernel and conv_stride must have one "
                             f"entry per conv layer; got {len(self.conv_dim)}, "
                             f"{len(self.conv_kernel)} and {len(self.conv_stride)}")
        for name in ("conv_bias", "causal_conv", "feat_proj_layer_norm", "norm_first",
                     "rel_pos_bias", "gated_rel_pos", "pos_conv_batch_norm", "add_adapter"):
            cfg_bool(self, name)
        cfg_choice(self, "feat_extract_norm", ("layer", "group", None))
        for name in ("hidden_size", "num_layers", "num_heads", "ffn_dim", "pos_conv_kernel",
                     "pos_conv_groups", "chunk_size", "max_context"):
            cfg_int(self, name, 1)
        cfg_float(self, "layer_norm_eps", positive=False)
        cfg_float(self, "conv_norm_eps", positive=False, allow_none=True)
        cfg_choice(self, "pos_conv", (None, "causal"))
        cfg_choice(self, "attention", ("band", "chunked"))
        cfg_int(self, "left", 0, allow_none=True)
        cfg_int(self, "left_chunks", 0, allow_none=True)
        cfg_int(self, "lookahead", 0, allow_none=True)
        cfg_int(self, "sink", 0)
        if self.attention == "band" and (self.chunk_size != 1 or self.left_chunks is not None):
            raise ValueError(f"EncoderConfig.chunk_size ({self.chunk_size}) / left_chunks "
                             f"({self.left_chunks}) are for attention='chunked'; this config has "
                             f"attention='band' (give left, or set attention='chunked')")
        if self.attention == "chunked" and self.left is not None:
            raise ValueError(f"EncoderConfig.left ({self.left}) is for attention='band'; with "
                             f"attention='chunked' give left_chunks")
        la = self.lookahead_layers
        if isinstance(la, str):
            cfg_choice(self, "lookahead_layers", ("first", "all"))
        elif isinstance(la, (tuple, list)):
            cfg_ints(self, "lookahead_layers", 0)
            if len(la) != self.num_layers:
                raise ValueError(f"EncoderConfig.lookahead_layers must hold one int per layer "
                                 f"({self.num_layers}); got {len(la)}: {list(la)!r}")
        else:
            raise TypeError(f"EncoderConfig.lookahead_layers must be 'first', 'all' or one int "
                            f"per layer; got {type(la).__name__} {la!r}")
        if is_np_bool(self.rope):
            self.rope = bool(self.rope)
        rope = self.rope
        if not isinstance(rope, (bool, Rope)) and rope is not None:
            dim = _as_int(rope)
            if dim is None or dim < 2 or dim % 2:
                raise (ValueError if dim is not None else TypeError)(
                    f"EncoderConfig.rope must be True, False, an even rotary dim >= 2 or a "
                    f"pyencoder.Rope; got {type(rope).__name__} {rope!r}")
            self.rope = rope = dim
        cfg_float(self, "rope_base", positive=True)
        if self.rope_base <= 1 and rope is not False and rope is not None:
            raise ValueError(f"EncoderConfig.rope_base must be a finite float > 1 (RoPE's "
                             f"frequency base); got {self.rope_base!r}")
        if self.rel_pos_bias:
            for name in ("num_buckets", "max_bucket_distance"):
                i = _as_int(getattr(self, name))
                if i is not None:                       # a numpy integer: a Python int
                    setattr(self, name, i)
            check_bucket_args(self.num_buckets, self.max_bucket_distance,
                              ("num_buckets", "max_bucket_distance"))
        cfg_int(self, "adapter_attn_dim", 1, allow_none=True)
        if self.add_adapter:
            cfg_int(self, "adapter_hidden_size", 1, allow_none=True)
            for name in ("num_adapter_layers", "adapter_kernel_size", "adapter_stride"):
                cfg_int(self, name, 1)
            cfg_int(self, "adapter_padding", 0)
        self._check_geometry()

    def _check_geometry(self):
        """What the modules would refuse in their own words (a conv's kernel vs its stride, the
        heads' rotary dim, the sink keys vs max_context), refused naming the config fields."""
        for i, (k, s) in enumerate(zip(self.conv_kernel, self.conv_stride)):
            if s > k:
                raise ValueError(f"EncoderConfig.conv_stride[{i}] ({s}) exceeds conv_kernel[{i}] "
                                 f"({k}): that conv skips samples, which a stream cannot "
                                 f"reproduce")
        if self.add_adapter and self.adapter_stride > self.adapter_kernel_size:
            raise ValueError(f"EncoderConfig.adapter_stride ({self.adapter_stride}) exceeds "
                             f"adapter_kernel_size ({self.adapter_kernel_size}): that conv skips "
                             f"frames, which a stream cannot reproduce")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"EncoderConfig.hidden_size ({self.hidden_size}) must be a multiple "
                             f"of num_heads ({self.num_heads})")
        head = self.hidden_size // self.num_heads
        rope = self.rope.dim if isinstance(self.rope, Rope) else head if self.rope is True \
            else self.rope
        if rope and rope > head:
            raise ValueError(f"EncoderConfig.rope: the rotary dim ({rope}) must be <= the head dim "
                             f"hidden_size // num_heads ({head})")
        if rope and rope % 2:
            raise ValueError(f"EncoderConfig.rope=True rotates the whole head, and the head dim "
                             f"hidden_size // num_heads ({head}) is odd: give an even rotary dim "
                             f"below it" + (f" (rope={head - 1})" if head > 2 else "")
                             + " or rope=False")
        if self.lookahead is not None and self.sink > self.max_context:    # (teachers: unused)
            raise ValueError(f"EncoderConfig.sink ({self.sink}) must be <= max_context "
                             f"({self.max_context}): the sink keys stay in the stream's key cache")

    def layer_lookaheads(self):
        """Per-layer lookahead frames (None for full-context layers)."""
        L = self.num_layers
        if self.lookahead is None:
            return [None] * L
        la = self.lookahead_layers
        if la == "first":
            return [self.lookahead] + [0] * (L - 1)
        if la == "all":
            return [self.lookahead] * L
        if isinstance(la, str) or len(la) != L:
            raise ValueError(f"lookahead_layers must be 'first', 'all' or {L} ints; got {la!r}")
        return [int(r) for r in la]


@dataclasses.dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor              # (B, T, E)
    hidden_states: Optional[Tuple[torch.Tensor, ...]]  # L + 1 tensors (B, T, E), see forward
    extract_features: torch.Tensor               # (B, T, C) normalised conv features
    lengths: Optional[torch.Tensor]              # (B,) valid frames, or None


def _register_pytree(cls):
    """``cls`` (a dataclass of tensors) as a pytree node, so that torch.export returns it whole
    ("Found EncoderOutput in output, which is not a known type" before); a torch without the
    hook leaves it a plain dataclass."""
    try:
        from torch.utils._pytree import register_dataclass
        register_dataclass(cls, serialized_type_name=f"pyencoder.models.{cls.__name__}")
    except (ImportError, TypeError, ValueError):
        pass
    return cls


_register_pytree(EncoderOutput)


@dataclasses.dataclass
class EncoderState(StreamState):
    frontend: FrontendState
    pos: Optional[StreamState]
    layers: StreamState
    out_lengths: torch.Tensor
    adapter: Optional[StreamState] = None


class FeatureProjection(nn.Module):
    def __init__(self, conv_channels, hidden_size, layer_norm, eps):
        super().__init__()
        self.layer_norm = nn.LayerNorm(conv_channels, eps=eps) if layer_norm else None
        self.projection = Linear(conv_channels, hidden_size)

    def forward(self, x):
        ln = self.layer_norm
        if ln is not None and x.dim() == 3 and x.stride(1) == 1 and x.shape[1] > 1 and \
                tuple(ln.normalized_shape) == (x.shape[2],) and \
                _cn.fused_ok(x.transpose(1, 2), ln.weight, ln.bias):
            # x is the conv features' (B, C, T) buffer seen as (B, T, C): torch's layer_norm would
            # copy it to contiguous first (a kernel on CUDA); one launch reads it as it lies
            n = _cn.channel_norm_act(x.transpose(1, 2), ln.weight, ln.bias, ln.eps, gelu=False,
                                     time_major=True).transpose(1, 2)
        else:
            n = ln(x) if ln is not None else x
        return self.projection(n), n


class CausalEncoder(nn.Module):
    """Rope-wav2vec2-style causal encoder: conv feature extractor -> projection -> optional causal
    positional conv -> interval-attention TransformerLayers, configured by an ``EncoderConfig``
    (``lookahead=None``: a full-context teacher). Offline ``forward`` and streaming ``init_state`` /
    ``step`` / ``flush`` with equal outputs; ``from_hf`` converts a Wav2Vec2 / HuBERT / WavLM model."""
    # a step takes waveform samples on the last axis ((B, n) or (B, 1, n)) and emits frames on
    # axis 1 ((B, m, E)): pyencoder.streaming.protocol
    stream_time_axis = -1

    @staticmethod
    def out_time_last():
        return False

    def __init__(self, config: EncoderConfig):
        super().__init__()
        if not isinstance(config, EncoderConfig):
            raise TypeError(f"config must be an EncoderConfig; got "
                            f"{type(config).__name__}")
        # the model's own copy: it reads its config at run time (an edit of the caller's object,
        # e.g. to build a second model from it, changed this one)
        c = copy.deepcopy(config)
        c.validate()
        if c.adapter_attn_dim is not None and not c.norm_first:
            raise ValueError(f"adapter_attn_dim ({c.adapter_attn_dim}): attention adapters follow "
                             f"the feed-forward of pre-LN layers (norm_first=True); got "
                             f"norm_first=False")
        self.config = c
        self.feature_extractor = ConvFeatureExtractor(c.conv_dim, c.conv_kernel, c.conv_stride,
                                                      c.conv_bias, c.feat_extract_norm,
                                                      c.causal_conv,
                                                      c.layer_norm_eps if c.conv_norm_eps is None
                                                      else c.conv_norm_eps)
        E = c.hidden_size
        self.feature_projection = FeatureProjection(c.conv_dim[-1], E, c.feat_proj_layer_norm,
                                                    c.layer_norm_eps)
        if c.pos_conv == "causal":
            if E % c.pos_conv_groups:
                raise ValueError(f"hidden_size ({E}) must be a multiple of pos_conv_groups "
                                 f"({c.pos_conv_groups})")
            self.pos_conv = CausalConv1d(E, E, c.pos_conv_kernel, groups=c.pos_conv_groups,
                                         activation="gelu")
        else:
            self.pos_conv = None
        # per frame in eval mode (running statistics); streaming.latency refuses it in training
        self.pos_conv_norm = nn.BatchNorm1d(E) if c.pos_conv == "causal" and \
            c.pos_conv_batch_norm else None
        self.layer_norm = nn.LayerNorm(E, eps=c.layer_norm_eps)
        head_dim = E // c.num_heads
        if isinstance(c.rope, Rope):
            rope = c.rope
        elif c.rope is True:
            rope = Rope(head_dim, base=c.rope_base)
        elif c.rope is False or c.rope is None:
            rope = None
        else:
            rope = Rope(int(c.rope), base=c.rope_base)
        layers = []
        table = None
        for i, r in enumerate(c.layer_lookaheads()):
            full = r is None
            if c.rel_pos_bias:
                kw = dict(num_buckets=c.num_buckets, max_distance=c.max_bucket_distance,
                          gated=c.gated_rel_pos, has_relative_bias=i == 0, rel_attn_embed=table,
                          rope=rope, max_context=c.max_context, sink=0 if full else c.sink)
                if c.attention == "band" or full:
                    att = WavLMSelfAttention(E, c.num_heads, left=None if full else c.left,
                                             right=FULL_CONTEXT if full else r, **kw)
                else:
                    att = WavLMSelfAttention(E, c.num_heads, chunk_size=c.chunk_size,
                                             left_chunks=c.left_chunks, lookahead=r, **kw)
                if i == 0:
                    table = att.rel_attn_embed
            elif c.attention == "band" or full:
                att = BandedSelfAttention(E, c.num_heads, left=None if full else c.left,
                                          right=FULL_CONTEXT if full else r, rope=rope,
                                          max_context=c.max_context, sink=0 if full else c.sink)
            else:
                att = ChunkedSelfAttention(E, c.num_heads, chunk_size=c.chunk_size,
                                           left_chunks=c.left_chunks, lookahead=r, rope=rope,
                                           max_context=c.max_context, sink=c.sink)
            adapter = None if c.adapter_attn_dim is None else AttentionAdapter(
                E, c.adapter_attn_dim)
            layers.append(TransformerLayer(att, c.ffn_dim, norm_first=c.norm_first,
                                           layer_norm_eps=c.layer_norm_eps, adapter=adapter))
        self.layers = StreamingSequential(*layers)
        self.adapter = ConvAdapter(E, c.adapter_hidden_size or E, c.num_adapter_layers,
                                   c.adapter_kernel_size, c.adapter_stride,
                                   c.adapter_padding) if c.add_adapter else None

    # ---- geometry ----------------------------------------------------------------------------
    @property
    def full_context(self):
        return self.config.lookahead is None

    @property
    def hop(self):
        """Waveform samples per output frame (the conv adapter's stride included)."""
        return self.feature_extractor.hop * (1 if self.adapter is None else self.adapter.stride)

    def frame_lengths(self, lengths):
        """Valid encoder frames for waveforms of ``lengths`` samples (int or (B,) tensor), before
        the conv adapter (``output_lengths`` counts the frames after it)."""
        return self.feature_extractor.out_length(lengths)

    def output_lengths(self, lengths):
        """Frames of ``last_hidden_state`` for waveforms of ``lengths`` samples."""
        n = self.frame_lengths(lengths)
        return n if self.adapter is None else self.adapter.out_length(n)

    def latency(self, sample_rate=16000):
        """Exact algorithmic latency (pyencoder.streaming.Latency)."""
        if self.full_context:
            raise NotStreamableError("this CausalEncoder has full-context attention "
                                     "(config.lookahead=None): it cannot stream")
        return composed_latency(self, sample_rate=sample_rate)

    # ---- offline -----------------------------------------------------------------------------
    def _embed(self, feats):
        h, ext = self.feature_projection(feats.transpose(1, 2))
        return h, ext

    def positional_embedding(self, h):
        """The causal positional conv's output for projected features h (B, T, E) (zeros when the
        encoder has none): what causal positional-embedding distillation trains."""
        if self.pos_conv is None:
            return torch.zeros_like(h)
        x = h.transpose(1, 2)
        if self.pos_conv_norm is not None:
            x = frame_batch_norm(self.pos_conv_norm, x)
        return self.pos_conv(x).transpose(1, 2)

    def _pos(self, h):
        if self.pos_conv is None:
            return h
        return h + self.positional_embedding(h)

    def _check_wav(self, wav, n):
        """wav: a floating (B, n) or (B, 1, n) tensor on the model's device -> (B, n)."""
        if not isinstance(wav, torch.Tensor):
            raise TypeError(f"wav must be a torch.Tensor (B, {n}); got {type(wav).__name__}")
        if wav.dim() == 3 and wav.shape[1] == 1:
            wav = wav[:, 0]
        if wav.dim() != 2:
            raise ValueError(f"wav must have shape (B, {n}) or (B, 1, {n}); got "
                             f"{tuple(wav.shape)}")
        if not wav.dtype.is_floating_point:
            raise TypeError(f"wav must be a floating tensor (scale integer PCM to [-1, 1] first); "
                            f"got {wav.dtype}")
        p = next(self.parameters(), None)
        if p is not None and wav.device != p.device:
            raise ValueError(f"wav must be on the model's device ({p.device}); got {wav.device}")
        # offline and streaming alike (a step cast float64 audio to the state's dtype silently;
        # transformers' own models refuse it too); autocast runs the model in its own dtypes
        if p is not None and wav.dtype != p.dtype and not autocasting(wav):
            raise TypeError(f"wav must have the model's dtype ({p.dtype}); got {wav.dtype} "
                            f"(convert it: wav.to({p.dtype}))")
        return wav

    def forward(self, wav, lengths=None, output_hidden_states=False):
        """wav (B, L) (or (B, 1, L)); ``lengths`` (B,) valid samples (right padding). Returns an
        EncoderOutput; ``hidden_states`` (with output_hidden_states) follows transformers 5: the
        input of layer 0, then every layer's output (before a pre-LN model's final LayerNorm and
        the conv adapter, which only ``last_hidden_state`` gets). ``lengths`` of the output counts
        the frames of ``last_hidden_state``."""
        wav = self._check_wav(wav, "L")
        check_bool("output_hidden_states", output_hidden_states)
        if lengths is not None:
            lengths = check_step_lengths(lengths, wav.shape[0], wav.shape[1], wav.device)
        feats = self.feature_extractor(wav)
        h, ext = self._embed(feats)
        T = h.shape[1]
        frames = None
        if lengths is not None:
            frames = self.frame_lengths(lengths).clamp(max=T)
            valid = torch.arange(T, device=h.device)[None, :] < frames[:, None]
            h = h * valid[..., None].to(h.dtype)
        h = self._pos(h)
        if not self.config.norm_first:
            h = self.layer_norm(h)
        hs = [h] if output_hidden_states else None
        kl = None if frames is None else frames.to(torch.int32)
        for layer in self.layers:
            h = layer(h, key_lengths=kl)
            if hs is not None:
                hs.append(h)
        if self.config.norm_first:
            h = self.layer_norm(h)
        if self.adapter is not None:
            h = self.adapter(h, frames)
            frames = None if frames is None else self.adapter.out_length(frames)
        return EncoderOutput(h, tuple(hs) if hs is not None else None, ext, frames)

    # ---- streaming ---------------------------------------------------------------------------
    def _stream_config(self):
        return f"CausalEncoder({self.config!r})"

    def init_state(self, batch_size, *, device=None, dtype=None, max_chunk=64):
        check_init_args(batch_size, dtype, device, self)
        if self.full_context:
            raise NotStreamableError("this CausalEncoder has full-context attention "
                                     "(config.lookahead=None): it cannot stream")
        p = self.layer_norm.weight
        device = p.device if device is None else torch.device(device)
        dtype = p.dtype if dtype is None else dtype
        fe = self.feature_extractor.init_state(batch_size, device=device, dtype=dtype)
        pos = None if self.pos_conv is None else self.pos_conv.init_state(
            batch_size, device=device, dtype=dtype)
        layers = self.layers.init_state(batch_size, device=device, dtype=dtype,
                                        max_chunk=max_chunk)
        adapter = None if self.adapter is None else self.adapter.init_state(
            batch_size, device=device, dtype=dtype)
        return stamp(self, EncoderState(frontend=fe, pos=pos, layers=layers,
                                        out_lengths=torch.zeros(batch_size, dtype=torch.int64,
                                                                device=device),
                                        adapter=adapter))

    def _finish(self, y, state, lengths, final):
        """Final LayerNorm (pre-LN) and the conv adapter on the encoder frames y (slot b's first
        ``lengths[b]``); with ``final`` the adapter's right padding too."""
        if self.config.norm_first:
            y = self.layer_norm(y)
        if self.adapter is None:
            state.out_lengths = lengths
            return y
        y, state.adapter = self.adapter.step(y, state.adapter, lengths)
        if final:
            n1 = state.adapter.out_lengths
            y2, state.adapter = self.adapter.flush(state.adapter)
            tmp = PassState(out_lengths=n1)
            y, _ = cat_time([y, y2], [n1, state.adapter.out_lengths], tmp, time_last=False)
            state.adapter.out_lengths = tmp.out_lengths
        state.out_lengths = state.adapter.out_lengths
        return y

    @inference_step(when=holds_in_place_step)
    def step(self, wav, state, lengths=None, output_hidden_states=False):
        """Feed wav (B, n) samples (any n >= 0; ``lengths`` (B,) valid samples per slot). Returns
        (y (B, m, E), state): slot b's new frames are the first ``state.out_lengths[b]`` rows.
        With ``output_hidden_states``: ((y, hidden_states), state), hidden_states[0] the new
        inputs of layer 0 and hidden_states[i + 1] the new outputs of layer i (slot b's first
        ``state.layers.layers[i].out_lengths[b]`` rows; counts differ between depths while frames
        are held back for lookahead)."""
        wav = self._check_wav(wav, "n")
        check_bool("output_hidden_states", output_hidden_states)
        check_state(self, state, EncoderState)
        if wav.device != state.out_lengths.device:
            raise ValueError(f"wav must be on the state's device ({state.out_lengths.device}); "
                             f"got {wav.device}")
        B = state.out_lengths.shape[0]
        if wav.shape[0] != B:
            raise ValueError(f"wav has batch {wav.shape[0]} but the state holds {B} slots")
        if lengths is not None:
            lengths = check_step_lengths(lengths, B, wav.shape[-1], wav.device)
        if not output_hidden_states and self._fixed_ok(wav, state, lengths):
            # the steady state: the same step without its ~80 host reads (one here, none while
            # the stream stays steady), on the fused kernels where the device has them; counters
            # the caller may hold from earlier steps are not written (fresh ones first)
            fresh_counters(state)
            y = self.step_fixed(wav, state)
            record_steady(state, self.steady_check(wav.shape[-1], state))
            return y, state
        with marks_partial(state, "CausalEncoder.step") as part:
            feats, state.frontend = self.feature_extractor.step(wav, state.frontend, lengths)
            if wav.shape[-1]:
                part.took.append("the feature extractor")
            fl = state.frontend.out_lengths
            h, _ = self._embed(feats)
            if self.pos_conv is not None:
                x = h.transpose(1, 2)
                if self.pos_conv_norm is not None:
                    x = frame_batch_norm(self.pos_conv_norm, x)
                p, state.pos = self.pos_conv.step(x, state.pos, fl)
                h = h + p.transpose(1, 2)
            if not self.config.norm_first:
                h = self.layer_norm(h)
            hidden = [] if output_hidden_states else None
            y, state.layers = self.layers.step(h, state.layers, fl, outputs=hidden)
            y = self._finish(y, state, state.layers.out_lengths, final=False)
        if hidden is not None:
            return (y, (h, *hidden)), state
        return y, state

    def steady_check(self, n, state):
        """pyencoder.streaming.state.SteadyCheck of a general step of n samples in every slot:
        the feature extractor's (n a multiple of hop, every slot fed a multiple of hop past its
        first windows), the positional conv's and the layers' (steady, whole mask blocks,
        n // hop <= max_chunk) and the conv adapter's (n a multiple of ``hop``, its stride
        included)."""
        if self.adapter is not None and n % self.hop:
            return None
        checks = [self.feature_extractor.steady_check(n, state.frontend)]
        if checks[0] is None:
            return None
        fr = checks[0].n_out
        if self.pos_conv is not None:
            checks.append(steady_check(self.pos_conv, fr, state.pos))
        checks.append(self.layers.steady_check(fr, state.layers))
        if self.adapter is not None:
            checks.append(self.adapter.steady_check(fr, state.adapter))
            return all_steady(checks, None if checks[-1] is None else checks[-1].n_out)
        return all_steady(checks, fr)

    def _fixed_ok(self, wav, state, lengths=None):
        """Whether this general step of n samples in every slot may run as ``step_fixed`` (the
        same result: the fixed step is the general one specialised to the steady state). One
        host read of a device-side check (every slot fed a multiple of hop past the feature
        extractor's first windows, every attention layer steady), where the general step reads
        the device ~80 times; none while the counters it read are untouched since the last
        dispatched step (same tensors and versions: the fixed step keeps the stream steady, and
        reset / load_state_dict / a general step / step_fixed called directly change them;
        pyencoder.streaming.state.steady_dispatch)."""
        n = wav.shape[-1]
        return steady_dispatch(state, self.steady_check(n, state), lengths, n)

    @inference_step(when=holds_in_place_step)
    def step_fixed(self, wav, state, check=False):
        """CUDA-graph friendly steady-state step of the whole encoder: wav (B, n) (or (B, 1, n)),
        every slot the same n samples, n a multiple of ``hop``. Returns y (B, n // hop, E) (the
        adapter's channels with the conv adapter), equal to ``step``'s output (every row valid);
        the state is updated in place, without host synchronisation, so the call can be captured
        in a torch.cuda.CUDAGraph and replayed.

        Preconditions (``check=True`` verifies them, a host synchronisation: call it once,
        outside capture): the stream is in its steady state, i.e. every slot has been fed the
        same multiple of ``hop`` samples, past the feature extractor's first windows and every
        layer's lookahead (a general ``step`` or two of the same chunk size do it), and the
        layers' ``step_fixed`` conditions hold (bounded left context, steps of whole mask blocks,
        ``n // hop <= max_chunk``; StreamingSequential.step_fixed). With the conv adapter
        (``config.add_adapter``) ``hop`` includes its stride: the layers step n // hop times the
        adapter's stride frames, each slot's adapter phase (set by the frames the layers held
        back) read on the device (ConvAdapter.step_fixed). The stream counters (every conv's
        ``seen``, the running norm's ``count``, the attention ``pos``) advance together at the
        end (``pyencoder.streaming.batched_counters``)."""
        wav = self._check_wav(wav, "n")
        check_state(self, state, EncoderState)
        if self.adapter is not None and wav.shape[-1] % self.hop:
            raise ValueError(f"CausalEncoder.step_fixed: the step length ({wav.shape[-1]} "
                             f"samples) must be a multiple of hop ({self.hop}: the feature "
                             f"extractor's {self.feature_extractor.hop} x the conv adapter's "
                             f"stride {self.adapter.stride})")
        if wav.device != state.out_lengths.device:
            raise ValueError(f"wav must be on the state's device ({state.out_lengths.device}); "
                             f"got {wav.device}")
        check_step_slots(wav.shape[0], state.out_lengths.shape[0])
        n = wav.shape[-1]
        if n == 0:
            raise ValueError(f"CausalEncoder.step_fixed needs a step of at least one hop "
                             f"({self.hop} samples); got 0 samples (the general step takes "
                             f"empty chunks)")
        if wav.shape[0] and self.feature_extractor.steady_check(n, state.frontend) is not None:
            # a step the front end takes but a later part refuses whatever the state (n // hop
            # frames past max_chunk or not whole mask blocks, unbounded left context): refused
            # on the host before the front end takes the chunk
            steady = self.steady_check(n, state)
            if steady is None:
                raise ValueError(f"CausalEncoder.step_fixed: a step of {n} samples cannot be a "
                                 f"fixed one for the layers (they step n // hop frames: at most "
                                 f"init_state's max_chunk, whole mask blocks, bounded left "
                                 f"context; with the conv adapter a multiple of its stride); "
                                 f"run the general step")
            if check:      # every part's device condition before any part runs
                require_steady("CausalEncoder", steady)
        with marks_partial(state, "CausalEncoder.step_fixed") as part, batched_counters():
            feats = self.feature_extractor.step_fixed(wav, state.frontend, check=check)
            part.took.append("the feature extractor")
            h, _ = self._embed(feats)
            post_ln = not self.config.norm_first
            if self.pos_conv is not None:
                x = h.transpose(1, 2)
                if self.pos_conv_norm is not None:
                    x = frame_batch_norm(self.pos_conv_norm, x)
                p = self.pos_conv.step_fixed(x, state.pos, check=check).transpose(1, 2)
                if post_ln and _ring.residual_ok(h, p, h, 0):
                    # CUDA: the positional embedding's add and the LayerNorm after it in one
                    # launch (the layers' residual kernel, without a queue)
                    h = _ring.residual_step(h, None, h, p, 0, self.layer_norm,
                                            need_sum=False)[1]
                    post_ln = False
                else:
                    h = h + p
            if post_ln:
                h = self.layer_norm(h)
            y = self.layers.step_fixed(h, state.layers, check=check)
            if self.config.norm_first:
                y = self.layer_norm(y)
            last = state.layers.out_lengths
            if self.adapter is not None:
                y = self.adapter.step_fixed(y, state.adapter, check=check)
                last = state.adapter.out_lengths
        fill_counter(state, y.shape[1], filled=last)
        return y

    @ends_stream
    def flush(self, state, output_hidden_states=False):
        """End of stream: the frames held back for lookahead (and the conv adapter's last
        windows). Returns (y (B, m, E), state), or ((y, hidden_states), state) as ``step``."""
        check_state(self, state, EncoderState)
        check_bool("output_hidden_states", output_hidden_states)
        hidden = [] if output_hidden_states else None
        y, state.layers = self.layers.flush(state.layers, outputs=hidden)
        B = state.out_lengths.shape[0]
        if y is None:
            y = self.layer_norm.weight.new_zeros(B, 0, self.config.hidden_size)
        y = self._finish(y, state, state.layers.out_lengths, final=True)
        if hidden is not None:
            h0 = self.layer_norm.weight.new_zeros(B, 0, self.config.hidden_size)
            return (y, (h0, *hidden)), state
        return y, state

    # ---- conversion --------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model, *, lookahead=3, lookahead_layers="first", left=None, rope=True,
                pos_conv="drop", chunk_size=None, left_chunks=None, num_layers=None,
                max_context=65536, share_weights=False, sink=0):
        """A CausalEncoder with the weights of a transformers Wav2Vec2Model / HubertModel /
        WavLMModel (or a model with one inside, e.g. ...ForCTC; the head is not converted). For
        WavLM the config gets rel_pos_bias=True with the model's num_buckets and
        max_bucket_distance, and the gates and layer 0's bucket table are converted. The options
        mean what they mean in pyencoder.hf.apply_pyencoder_to_wav2vec2 (lookahead_frames=lookahead,
        left_frames=left, sink_frames=sink, pos_conv "drop" or "causal"; ``rope`` also a
        pyencoder.Rope); a GroupNorm front end becomes the running GroupNorm. ``num_layers``: keep
        only the first layers (FocalCodec-Stream keeps 6 of WavLM-large's). ``lookahead=None`` gives the full-context
        model (a teacher). Adapters are converted: the conv adapter (``config.add_adapter``) and
        the attention adapters of pre-LN layers (``config.adapter_attn_dim``, MMS).

        ``share_weights=False`` copies the parameters (an independent student); True shares them
        with ``hf_model`` (module docstring; pyencoder.hf.StreamingEncoder's encoder)."""
        base, family = find_hf_base(hf_model, "from_hf")
        hc = base.config
        if pos_conv not in ("drop", "causal"):
            raise ValueError(f"pos_conv must be 'drop' or 'causal'; got {pos_conv!r}")
        if not share_weights and (getattr(hc, "hidden_act", "gelu") != "gelu" or
                                  getattr(hc, "feat_extract_activation", "gelu") != "gelu"):
            raise NotImplementedError(f"only GELU activations are supported with copied weights "
                                      f"(share_weights=True runs the model's own activation "
                                      f"modules); got hidden_act={hc.hidden_act!r}, "
                                      f"feat_extract_activation={hc.feat_extract_activation!r}")
        # (an int: 2.7 built 2 layers and True 1)
        check_int("num_layers", num_layers, min_value=1, max_value=hc.num_hidden_layers,
                  allow_none=True)
        n_layers = hc.num_hidden_layers if num_layers is None else int(num_layers)
        if chunk_size is not None and left is not None:
            raise ValueError("left is for the band mask; with chunk_size give left_chunks")
        if share_weights not in (True, False):
            raise TypeError(f"share_weights must be a bool; got {share_weights!r}")
        pos_bn = pos_conv == "causal" and \
            getattr(base.encoder.pos_conv_embed, "batch_norm", None) is not None
        attn_adapter = getattr(base.encoder.layers[0], "adapter_layer", None)
        adapter = hf_adapter_config(base)
        _check_hf_strides(hc, adapter)
        if family == "wavlm":
            check_bucket_args(getattr(hc, "num_buckets", 320),
                              getattr(hc, "max_bucket_distance", 800),
                              ("config.num_buckets", "config.max_bucket_distance"))
        cfg = EncoderConfig(
            conv_dim=tuple(hc.conv_dim), conv_kernel=tuple(hc.conv_kernel),
            conv_stride=tuple(hc.conv_stride), conv_bias=bool(hc.conv_bias),
            feat_extract_norm=hc.feat_extract_norm, causal_conv=False,
            feat_proj_layer_norm=bool(getattr(hc, "feat_proj_layer_norm", True)),
            hidden_size=hc.hidden_size, num_layers=n_layers, num_heads=hc.num_attention_heads,
            ffn_dim=hc.intermediate_size, norm_first=bool(hc.do_stable_layer_norm),
            layer_norm_eps=hc.layer_norm_eps, conv_norm_eps=_hf_conv_norm_eps(base),
            pos_conv="causal" if pos_conv == "causal" else None,
            pos_conv_kernel=hc.num_conv_pos_embeddings,
            pos_conv_groups=hc.num_conv_pos_embedding_groups,
            attention="band" if chunk_size is None else "chunked", left=left,
            chunk_size=1 if chunk_size is None else chunk_size, left_chunks=left_chunks,
            lookahead=lookahead, lookahead_layers=lookahead_layers, rope=rope,
            max_context=max_context, sink=sink, rel_pos_bias=family == "wavlm",
            num_buckets=getattr(hc, "num_buckets", 320),
            max_bucket_distance=getattr(hc, "max_bucket_distance", 800),
            pos_conv_batch_norm=pos_bn,
            adapter_attn_dim=None if attn_adapter is None else attn_adapter.linear_1.out_features,
            add_adapter=bool(adapter), **(adapter or {}))
        p = next(base.parameters())
        if share_weights:
            with torch.device("meta"):
                model = cls(cfg)
            _share_hf_modules(model, base, cfg)
            return model
        model = cls(cfg)
        model.to(device=p.device, dtype=p.dtype)
        model.load_state_dict(_convert_state_dict(base, cfg), strict=True)
        return model


def _check_hf_strides(hc, adapter):
    """A conv whose stride exceeds its kernel skips input samples: transformers runs it offline,
    a causal stream cannot (every sample must reach a window). Refused naming the config field
    (the conv layer would say only 'kernel_size (2) must be >= stride (3)')."""
    for i, (k, s) in enumerate(zip(hc.conv_kernel, hc.conv_stride)):
        if s > k:
            raise ValueError(f"from_hf: config.conv_stride[{i}] = {s} exceeds config.conv_kernel"
                             f"[{i}] = {k}: that conv skips samples, which a stream cannot "
                             f"reproduce (the patched model's offline forward runs it)")
    if adapter is not None and adapter["adapter_stride"] > adapter["adapter_kernel_size"]:
        raise ValueError(f"from_hf: config.adapter_stride = {adapter['adapter_stride']} exceeds "
                         f"config.adapter_kernel_size = {adapter['adapter_kernel_size']}: that "
                         f"adapter conv skips frames, which a stream cannot reproduce (offline "
                         f"runs it)")


def _hf_conv_norm_eps(base):
    """The eps of a transformers feature extractor's conv-layer norms (LayerNorm / GroupNorm,
    built with torch's default 1e-5, not config.layer_norm_eps); None without norms."""
    for layer in base.feature_extractor.conv_layers:
        norm = getattr(layer, "layer_norm", None)
        if norm is not None and hasattr(norm, "eps"):
            return float(norm.eps)
    return None


def hf_inner(model):
    """The base model a transformers head holds (its ``base_model_prefix`` attribute), or None
    (no transformers import: duck-typed)."""
    prefix = getattr(model, "base_model_prefix", None)
    return getattr(model, prefix, None) if isinstance(prefix, str) and prefix else None


def find_hf_base(model, caller="from_hf"):
    """(base model, family) of a transformers Wav2Vec2Model / HubertModel / WavLMModel, or of a
    model with one inside (a head: its ``base_model_prefix`` attribute). The one finder for
    pyencoder.models and pyencoder.hf."""
    from transformers import HubertModel, Wav2Vec2Model, WavLMModel
    fams = {"wav2vec2": Wav2Vec2Model, "hubert": HubertModel, "wavlm": WavLMModel}
    for cand in (model, hf_inner(model)):
        for fam, kls in fams.items():
            if isinstance(cand, kls):
                return cand, fam
    raise TypeError(f"{caller} supports Wav2Vec2Model, HubertModel, WavLMModel and their heads "
                    f"(ForCTC, ForSequenceClassification, ...); got {type(model).__name__}")


def hf_adapter_config(base):
    """EncoderConfig fields of the conv adapter (config.add_adapter), or None without one (the
    model's ``adapter`` module decides, as its forward does: a HuBERT model ignores a config's
    add_adapter). Raises with the reason where its conv is not the zero-padded strided Conv1d +
    GLU the stream reproduces."""
    ad = getattr(base, "adapter", None)
    if ad is None:
        return None
    if not hasattr(ad, "layers") or not len(ad.layers):
        raise NotImplementedError("the model's `adapter` module has no conv layers")
    geo = set()
    for i, layer in enumerate(ad.layers):
        conv = getattr(layer, "conv", None)
        if not isinstance(conv, nn.Conv1d):
            raise NotImplementedError(f"adapter layer {i} has no nn.Conv1d named conv")
        k, s, pad = conv.kernel_size[0], conv.stride[0], conv.padding
        if isinstance(pad, str) or conv.dilation[0] != 1 or conv.groups != 1 or \
                conv.padding_mode != "zeros" or not 0 <= pad[0] <= k - 1 or \
                conv.out_channels != 2 * conv.in_channels:
            raise NotImplementedError(
                f"adapter layer {i}: {conv} cannot be streamed as converted: expected an "
                f"undilated, ungrouped Conv1d(C, 2C) with zero padding <= kernel - 1 (its window "
                f"must end within the frames that have arrived plus the right padding at flush)")
        geo.add((conv.in_channels, k, s, pad[0]))
    if len(geo) != 1:
        raise NotImplementedError(f"adapter layers differ ({sorted(geo)}); expected one geometry")
    C, k, s, pad = geo.pop()
    proj = getattr(ad, "proj", None)
    if (proj is None) != (C == base.config.hidden_size):
        raise NotImplementedError(f"adapter: {C} channels with proj={proj!r}; expected a proj "
                                  f"exactly when the channels differ from hidden_size")
    return dict(adapter_hidden_size=C, num_adapter_layers=len(ad.layers), adapter_kernel_size=k,
                adapter_stride=s, adapter_padding=pad)


def _hf_tensors(base, cfg):
    """{CausalEncoder name: the transformers model's parameter or buffer} (the positional conv's
    weight: its weight-norm parametrisation evaluated)."""
    sd = {}
    for i, layer in enumerate(base.feature_extractor.conv_layers):
        sd[f"feature_extractor.conv_layers.{i}.conv.weight"] = layer.conv.weight
        if layer.conv.bias is not None:
            sd[f"feature_extractor.conv_layers.{i}.conv.bias"] = layer.conv.bias
        ln = getattr(layer, "layer_norm", None)
        if ln is not None:
            sd[f"feature_extractor.conv_layers.{i}.layer_norm.weight"] = ln.weight
            sd[f"feature_extractor.conv_layers.{i}.layer_norm.bias"] = ln.bias
    fp = base.feature_projection
    if getattr(fp, "layer_norm", None) is not None and cfg.feat_proj_layer_norm:
        sd["feature_projection.layer_norm.weight"] = fp.layer_norm.weight
        sd["feature_projection.layer_norm.bias"] = fp.layer_norm.bias
    sd["feature_projection.projection.weight"] = fp.projection.weight
    sd["feature_projection.projection.bias"] = fp.projection.bias
    enc = base.encoder
    if cfg.pos_conv == "causal":
        conv = enc.pos_conv_embed.conv
        sd["pos_conv.weight"] = conv.weight   # weight-norm parametrisation evaluated
        sd["pos_conv.bias"] = conv.bias
        if cfg.pos_conv_batch_norm:
            for k, v in enc.pos_conv_embed.batch_norm.state_dict(keep_vars=True).items():
                sd[f"pos_conv_norm.{k}"] = v
    sd["layer_norm.weight"] = enc.layer_norm.weight
    sd["layer_norm.bias"] = enc.layer_norm.bias
    names = ["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.out_proj",
             "layer_norm", "feed_forward.intermediate_dense", "feed_forward.output_dense",
             "final_layer_norm"]
    if cfg.adapter_attn_dim is not None:
        names += ["adapter_layer.norm", "adapter_layer.linear_1", "adapter_layer.linear_2"]
    for i in range(cfg.num_layers):
        src = enc.layers[i]
        for n in names:
            m = src.get_submodule(n)
            dst = n.replace("adapter_layer.", "adapter.")
            sd[f"layers.{i}.{dst}.weight"] = m.weight
            sd[f"layers.{i}.{dst}.bias"] = m.bias
        if cfg.rel_pos_bias:
            att = src.attention
            sd[f"layers.{i}.attention.gru_rel_pos_const"] = att.gru_rel_pos_const
            sd[f"layers.{i}.attention.gru_rel_pos_linear.weight"] = att.gru_rel_pos_linear.weight
            sd[f"layers.{i}.attention.gru_rel_pos_linear.bias"] = att.gru_rel_pos_linear.bias
            if i == 0:
                sd["layers.0.attention.rel_attn_embed.weight"] = att.rel_attn_embed.weight
    if cfg.add_adapter:
        ad = base.adapter
        if ad.proj is not None:
            for n in ("proj", "proj_layer_norm"):
                sd[f"adapter.{n}.weight"] = getattr(ad, n).weight
                sd[f"adapter.{n}.bias"] = getattr(ad, n).bias
        for i, layer in enumerate(ad.layers):
            sd[f"adapter.layers.{i}.conv.weight"] = layer.conv.weight
            sd[f"adapter.layers.{i}.conv.bias"] = layer.conv.bias
    return sd


def _convert_state_dict(base, cfg):
    """Copies of a transformers wav2vec2-family base model's tensors under CausalEncoder names."""
    return {k: v.detach().clone() for k, v in _hf_tensors(base, cfg).items()}


class SharedCausalConv1d(CausalConv1d):
    """A CausalConv1d whose weight and bias are another Conv1d's, read at each call (a
    transformers positional conv: its weight is a weight-norm parametrisation of g and v, so
    gradients and in-place edits reach the model's own parameters), followed by that model's
    activation module ``post``."""

    def __init__(self, src, post):
        super().__init__(src.in_channels, src.out_channels, src.kernel_size[0],
                         groups=src.groups, bias=src.bias is not None, device="meta")
        del self._parameters["weight"]
        del self._parameters["bias"]
        self.src = src
        self.post = post

    def forward(self, x):
        return self.post(super().forward(x))

    def step(self, x, state, lengths=None):
        y, state = super().step(x, state, lengths)
        return self.post(y), state

    def step_fixed(self, x, state, check=False):
        return self.post(super().step_fixed(x, state, check))

    # step and step_fixed are the parent's followed by ``post``: the same steady condition
    # (pyencoder.streaming.state.steady_check trusts a declaration only from the class whose
    # step / step_fixed it was written for)
    steady_check = CausalConv1d.steady_check

    def _read(self, name):
        src = self._modules.get("src")
        if src is None:                      # during nn.Conv1d.__init__
            if name in self._parameters:
                return self._parameters[name]
            raise AttributeError(name)
        return getattr(src, name)

    weight = property(lambda self: self._read("weight"))
    bias = property(lambda self: self._read("bias"))


def _share_hf_modules(model, base, cfg):
    """Make the meta-built ``model`` run on ``base``'s own parameters (module docstring)."""
    tensors = _hf_tensors(base, cfg)
    if cfg.pos_conv == "causal":
        for k in ("pos_conv.weight", "pos_conv.bias"):
            tensors.pop(k)
        pc = base.encoder.pos_conv_embed
        model.pos_conv = SharedCausalConv1d(pc.conv, pc.activation)
        if cfg.pos_conv_batch_norm:
            for k in [k for k in tensors if k.startswith("pos_conv_norm.")]:
                tensors.pop(k)
            model.pos_conv_norm = base.encoder.pos_conv_embed.batch_norm
    for src, dst in zip(base.feature_extractor.conv_layers, model.feature_extractor.conv_layers):
        dst.conv.activation = None           # the model's own activation module, not a fused GELU
        dst.activation = src.activation
    for i in range(cfg.num_layers):
        src, dst = base.encoder.layers[i], model.layers[i]
        dst.feed_forward.act = src.feed_forward.intermediate_act_fn
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(dst.attention, n, skinny_view(getattr(src.attention, n)))
        for n in ("intermediate_dense", "output_dense"):
            setattr(dst.feed_forward, n, skinny_view(getattr(src.feed_forward, n)))
        if cfg.adapter_attn_dim is not None:
            dst.adapter = src.adapter_layer
        if cfg.rel_pos_bias:
            dst.attention.gru_rel_pos_linear = src.attention.gru_rel_pos_linear
        hs = abs(dst.attention.scale - src.attention.scaling)
        if hs > 1e-12:
            raise ValueError(f"layer {i}: attention scaling {src.attention.scaling} is not "
                             f"1/sqrt(head_dim)")
    if cfg.rel_pos_bias:
        table = base.encoder.layers[0].attention.rel_attn_embed
        model.layers[0].attention.rel_attn_embed = table
        for layer in list(model.layers)[1:]:
            layer.attention.share_relative_bias(table)
    for name, t in tensors.items():
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        cur = getattr(mod, attr, None)
        if cur is None or not cur.is_meta:
            continue     # set above through a shared module
        if not isinstance(t, nn.Parameter):
            raise RuntimeError(f"from_hf(share_weights=True): {name} of the transformers model is "
                               f"not a Parameter ({type(t).__name__})")
        setattr(mod, attr, t)
    left = [n for n, v in list(model.named_parameters()) + list(model.named_buffers()) if v.is_meta]
    if left:
        raise RuntimeError(f"from_hf(share_weights=True): no transformers tensor for {left}")
