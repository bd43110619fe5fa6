"""CausalEncoder: a wav2vec2-style speech encoder made causal with per-layer lookahead
(DyStream's Rope-Wav2vec2, FocalCodec-Stream's causal WavLM encoder), offline and streaming.

    wav (B, L) -> ConvFeatureExtractor (valid or causal strided convs, LayerNorm / running
    GroupNorm / none, GELU) -> feature projection (LayerNorm, Linear) -> + causal positional conv
    (optional) -> [post-LN: LayerNorm] -> L x TransformerLayer (banded or chunked interval
    attention with RoPE inside the op, lookahead r_l in layer l) -> [pre-LN: LayerNorm]

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
waveform gives the offline output (up to summation order). ``from_hf`` converts a transformers
Wav2Vec2Model / HubertModel (or a head around one) into a CausalEncoder with the same weights, the
same function as that model patched by ``pyencoder.hf.apply_pyencoder_to_wav2vec2`` with the same
options; a WavLMModel (or head) gives the WavLM variant, its relative-bias table and gates included.
No dropout anywhere (training-time dropout is left to the caller).

Limits: no SpecAugment masking; the WavLM relative bias is fused in the interval attention kernels
offline (forward and backward), but streaming runs the plain-torch ring decode (no ``step_fixed``
CUDA-graph step for the WavLM variant yet: the decode kernel has no bias input).
"""
import dataclasses
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..nn.attention import BandedSelfAttention, ChunkedSelfAttention
from ..nn.conv import CausalConv1d
from ..nn.layer import TransformerLayer
from ..nn.linear import Linear
from ..nn.relpos import WavLMSelfAttention
from ..rope import Rope
from ..streaming.latency import NotStreamableError, latency as composed_latency
from ..streaming.sequential import StreamingSequential
from ..streaming.state import StreamState, check_init_args, check_state, check_step_lengths, stamp
from .frontend import ConvFeatureExtractor, FrontendState

__all__ = ["EncoderConfig", "CausalEncoder", "EncoderOutput", "EncoderState"]

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
    pos_conv: Optional[str] = None               # None or "causal"
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    attention: str = "band"                      # "band" or "chunked"
    left: Optional[int] = None                   # band: frames of history (None: unbounded)
    chunk_size: int = 1                          # chunked: frames per chunk
    left_chunks: Optional[int] = None            # chunked: chunks of history (None: unbounded)
    lookahead: Optional[int] = 3                 # frames; None: full context (offline teacher)
    lookahead_layers: Union[str, Sequence[int]] = "first"   # "first", "all" or one int per layer
    rope: Union[bool, int] = True                # True: RoPE on the whole head; int: rotary dim
    rope_base: float = 10000.0
    max_context: int = 65536
    rel_pos_bias: bool = False                   # WavLM: gated relative position bias
    num_buckets: int = 320                       # WavLM: relative-position buckets
    max_bucket_distance: int = 800               # WavLM: distance of the last (log) bucket
    gated_rel_pos: bool = True                   # WavLM: per-query gate on the bias

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


@dataclasses.dataclass
class EncoderState(StreamState):
    frontend: FrontendState
    pos: Optional[StreamState]
    layers: StreamState
    out_lengths: torch.Tensor


class FeatureProjection(nn.Module):
    def __init__(self, conv_channels, hidden_size, layer_norm, eps):
        super().__init__()
        self.layer_norm = nn.LayerNorm(conv_channels, eps=eps) if layer_norm else None
        self.projection = Linear(conv_channels, hidden_size)

    def forward(self, x):
        n = self.layer_norm(x) if self.layer_norm is not None else x
        return self.projection(n), n


class CausalEncoder(nn.Module):
    """Rope-wav2vec2-style causal encoder: conv feature extractor -> projection -> optional causal
    positional conv -> interval-attention TransformerLayers, configured by an ``EncoderConfig``
    (``lookahead=None``: a full-context teacher). Offline ``forward`` and streaming ``init_state`` /
    ``step`` / ``flush`` with equal outputs; ``from_hf`` converts a Wav2Vec2 / HuBERT / WavLM model."""
    def __init__(self, config: EncoderConfig):
        super().__init__()
        c = config
        if c.attention not in ("band", "chunked"):
            raise ValueError(f"attention must be 'band' or 'chunked'; got {c.attention!r}")
        if c.pos_conv not in (None, "causal"):
            raise ValueError(f"pos_conv must be None or 'causal'; got {c.pos_conv!r}")
        if c.hidden_size % c.num_heads:
            raise ValueError(f"hidden_size ({c.hidden_size}) must be a multiple of num_heads "
                             f"({c.num_heads})")
        self.config = c
        self.feature_extractor = ConvFeatureExtractor(c.conv_dim, c.conv_kernel, c.conv_stride,
                                                      c.conv_bias, c.feat_extract_norm,
                                                      c.causal_conv, c.layer_norm_eps)
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
        self.layer_norm = nn.LayerNorm(E, eps=c.layer_norm_eps)
        head_dim = E // c.num_heads
        if c.rope is True:
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
                          rope=rope, max_context=c.max_context)
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
                                          max_context=c.max_context)
            else:
                att = ChunkedSelfAttention(E, c.num_heads, chunk_size=c.chunk_size,
                                           left_chunks=c.left_chunks, lookahead=r, rope=rope,
                                           max_context=c.max_context)
            layers.append(TransformerLayer(att, c.ffn_dim, norm_first=c.norm_first,
                                           layer_norm_eps=c.layer_norm_eps))
        self.layers = StreamingSequential(*layers)

    # ---- geometry ----------------------------------------------------------------------------
    @property
    def full_context(self):
        return self.config.lookahead is None

    @property
    def hop(self):
        """Waveform samples per output frame."""
        return self.feature_extractor.hop

    def frame_lengths(self, lengths):
        """Valid output frames for waveforms of ``lengths`` samples (int or (B,) tensor)."""
        return self.feature_extractor.out_length(lengths)

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
        return self.pos_conv(h.transpose(1, 2)).transpose(1, 2)

    def _pos(self, h):
        if self.pos_conv is None:
            return h
        return h + self.positional_embedding(h)

    def forward(self, wav, lengths=None, output_hidden_states=False):
        """wav (B, L) (or (B, 1, L)); ``lengths`` (B,) valid samples (right padding). Returns an
        EncoderOutput; ``hidden_states`` (with output_hidden_states) follows transformers 5: the
        input of layer 0, then every layer's output (before a pre-LN model's final LayerNorm,
        which only ``last_hidden_state`` gets)."""
        if wav.dim() == 3 and wav.shape[1] == 1:
            wav = wav[:, 0]
        if wav.dim() != 2:
            raise ValueError(f"wav must have shape (B, L) or (B, 1, L); got {tuple(wav.shape)}")
        feats = self.feature_extractor(wav)
        h, ext = self._embed(feats)
        T = h.shape[1]
        frames = None
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=wav.device).to(torch.int64)
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
        return EncoderOutput(h, tuple(hs) if hs is not None else None, ext, frames)

    # ---- streaming ---------------------------------------------------------------------------
    def _stream_config(self):
        return f"CausalEncoder({self.config!r})"

    def init_state(self, batch_size, *, device=None, dtype=None, max_chunk=64):
        check_init_args(batch_size, dtype, device)
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
        return stamp(self, EncoderState(frontend=fe, pos=pos, layers=layers,
                                        out_lengths=torch.zeros(batch_size, dtype=torch.int64,
                                                                device=device)))

    def step(self, wav, state, lengths=None):
        """Feed wav (B, n) samples (any n >= 0; ``lengths`` (B,) valid samples per slot). Returns
        (y (B, m, E), state): slot b's new frames are the first ``state.out_lengths[b]`` rows."""
        if wav.dim() == 3 and wav.shape[1] == 1:
            wav = wav[:, 0]
        if wav.dim() != 2:
            raise ValueError(f"wav must have shape (B, n) or (B, 1, n); got {tuple(wav.shape)}")
        check_state(self, state, EncoderState)
        B = state.out_lengths.shape[0]
        if wav.shape[0] != B:
            raise ValueError(f"wav has batch {wav.shape[0]} but the state holds {B} slots")
        if lengths is not None:
            lengths = check_step_lengths(lengths, B, wav.shape[-1], wav.device)
        feats, state.frontend = self.feature_extractor.step(wav, state.frontend, lengths)
        fl = state.frontend.out_lengths
        h, _ = self._embed(feats)
        if self.pos_conv is not None:
            p, state.pos = self.pos_conv.step(h.transpose(1, 2), state.pos, fl)
            h = h + p.transpose(1, 2)
        if not self.config.norm_first:
            h = self.layer_norm(h)
        y, state.layers = self.layers.step(h, state.layers, fl)
        if self.config.norm_first:
            y = self.layer_norm(y)
        state.out_lengths = state.layers.out_lengths
        return y, state

    def flush(self, state):
        """End of stream: the frames held back for lookahead. Returns (y (B, m, E), state)."""
        check_state(self, state, EncoderState)
        y, state.layers = self.layers.flush(state.layers)
        B = state.out_lengths.shape[0]
        if y is None:
            y = self.layer_norm.weight.new_zeros(B, 0, self.config.hidden_size)
        elif self.config.norm_first:
            y = self.layer_norm(y)
        state.out_lengths = state.layers.out_lengths
        return y, state

    # ---- conversion --------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model, *, lookahead=3, lookahead_layers="first", left=None, rope=True,
                pos_conv="drop", chunk_size=None, left_chunks=None, num_layers=None):
        """A CausalEncoder with the weights of a transformers Wav2Vec2Model / HubertModel /
        WavLMModel (or a model with one inside, e.g. ...ForCTC; the head is not converted). For
        WavLM the config gets rel_pos_bias=True with the model's num_buckets and
        max_bucket_distance, and the gates and layer 0's bucket table are copied. The options mean what they mean in
        pyencoder.hf.apply_pyencoder_to_wav2vec2 (lookahead_frames=lookahead, left_frames=left,
        pos_conv "drop" or "causal"); a GroupNorm front end becomes the running GroupNorm.
        ``num_layers``: keep only the first layers (FocalCodec-Stream keeps 6 of WavLM-large's).
        ``lookahead=None`` gives the full-context model (a teacher)."""
        base, family = _hf_base(hf_model)
        hc = base.config
        if pos_conv not in ("drop", "causal"):
            raise ValueError(f"pos_conv must be 'drop' or 'causal'; got {pos_conv!r}")
        if getattr(hc, "conv_pos_batch_norm", False):
            raise NotImplementedError("models with conv_pos_batch_norm are not supported")
        if getattr(hc, "add_adapter", False):
            raise NotImplementedError("models with an adapter are not supported")
        if getattr(hc, "hidden_act", "gelu") != "gelu" or \
                getattr(hc, "feat_extract_activation", "gelu") != "gelu":
            raise NotImplementedError(f"only GELU activations are supported; got hidden_act="
                                      f"{hc.hidden_act!r}, feat_extract_activation="
                                      f"{hc.feat_extract_activation!r}")
        n_layers = hc.num_hidden_layers if num_layers is None else int(num_layers)
        if not 1 <= n_layers <= hc.num_hidden_layers:
            raise ValueError(f"num_layers must be in [1, {hc.num_hidden_layers}]; got {num_layers}")
        if chunk_size is not None and left is not None:
            raise ValueError("left is for the band mask; with chunk_size give left_chunks")
        cfg = EncoderConfig(
            conv_dim=tuple(hc.conv_dim), conv_kernel=tuple(hc.conv_kernel),
            conv_stride=tuple(hc.conv_stride), conv_bias=bool(hc.conv_bias),
            feat_extract_norm=hc.feat_extract_norm, causal_conv=False,
            feat_proj_layer_norm=bool(getattr(hc, "feat_proj_layer_norm", True)),
            hidden_size=hc.hidden_size, num_layers=n_layers, num_heads=hc.num_attention_heads,
            ffn_dim=hc.intermediate_size, norm_first=bool(hc.do_stable_layer_norm),
            layer_norm_eps=hc.layer_norm_eps,
            pos_conv="causal" if pos_conv == "causal" else None,
            pos_conv_kernel=hc.num_conv_pos_embeddings,
            pos_conv_groups=hc.num_conv_pos_embedding_groups,
            attention="band" if chunk_size is None else "chunked", left=left,
            chunk_size=1 if chunk_size is None else chunk_size, left_chunks=left_chunks,
            lookahead=lookahead, lookahead_layers=lookahead_layers, rope=rope,
            rel_pos_bias=family == "wavlm",
            num_buckets=int(getattr(hc, "num_buckets", 320)),
            max_bucket_distance=int(getattr(hc, "max_bucket_distance", 800)))
        model = cls(cfg)
        p = next(base.parameters())
        model.to(device=p.device, dtype=p.dtype)
        model.load_state_dict(_convert_state_dict(base, cfg), strict=True)
        return model


def _hf_base(model):
    from transformers import HubertModel, Wav2Vec2Model, WavLMModel
    fams = {"wav2vec2": Wav2Vec2Model, "hubert": HubertModel, "wavlm": WavLMModel}
    for cand in (model, getattr(model, getattr(model, "base_model_prefix", "") or "", None)):
        for fam, kls in fams.items():
            if isinstance(cand, kls):
                return cand, fam
    raise TypeError(f"from_hf expects a transformers Wav2Vec2Model / HubertModel / WavLMModel (or "
                    f"a model around one); got {type(model).__name__}")


def _convert_state_dict(base, cfg):
    """Map a transformers wav2vec2-family base model's parameters to CausalEncoder names."""
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
        sd["pos_conv.weight"] = conv.weight.detach()   # weight-norm parametrisation evaluated
        sd["pos_conv.bias"] = conv.bias
    sd["layer_norm.weight"] = enc.layer_norm.weight
    sd["layer_norm.bias"] = enc.layer_norm.bias
    names = ["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.out_proj",
             "layer_norm", "feed_forward.intermediate_dense", "feed_forward.output_dense",
             "final_layer_norm"]
    for i in range(cfg.num_layers):
        src = enc.layers[i]
        for n in names:
            m = src.get_submodule(n)
            sd[f"layers.{i}.{n}.weight"] = m.weight
            sd[f"layers.{i}.{n}.bias"] = m.bias
        if cfg.rel_pos_bias:
            att = src.attention
            sd[f"layers.{i}.attention.gru_rel_pos_const"] = att.gru_rel_pos_const
            sd[f"layers.{i}.attention.gru_rel_pos_linear.weight"] = att.gru_rel_pos_linear.weight
            sd[f"layers.{i}.attention.gru_rel_pos_linear.bias"] = att.gru_rel_pos_linear.bias
            if i == 0:
                sd["layers.0.attention.rel_attn_embed.weight"] = att.rel_attn_embed.weight
    return {k: v.detach().clone() for k, v in sd.items()}
