"""StreamingEncoder: run a patched Wav2Vec2 / HuBERT / WavLM model on raw 16 kHz audio chunk by
chunk, with outputs equal to the patched model's offline forward.

Per stage, what the state carries (a pyencoder.streaming.StreamState, so state_dict() round-trips):

- conv feature extractor ("valid" strided convs): per conv layer the input frames not consumed yet
  (fewer than kernel + stride), so any chunk length works, down to 1 sample; the running GroupNorm
  of conv layer 0 carries (count, sum, sum of squares) in float64 (pyencoder.hf.frontend).
- positional conv: "drop" has no state; "causal" carries its last k - 1 inputs
  (pyencoder.ops.causal_conv1d with initial_state).
- attention layers: Wav2Vec2 / HuBERT layers use pyencoder.nn.BandedSelfAttention /
  ChunkedSelfAttention sharing the HF module's projections (ring KV cache of rotated keys, held-back
  queries, the Triton decode kernel on CUDA). WavLM layers use pyencoder.nn.WavLMSelfAttention
  sharing the HF module's projections, gate parameters and layer 0's rel_attn_embed (same ring
  state plus the gates of held-back queries; plain torch, no kernel path yet). Each layer also
  keeps the inputs of its held-back frames for the residual path. The attention projections and
  the feed-forward's two Linear layers run through pyencoder.nn.LinearView (the HF modules keep
  their parameters; on a CPU, the 1-5 frames of a step take the faster skinny GEMM path).

Streams in a batch run in lockstep (same chunk length for every slot; ``pyencoder.streaming.reset``
restarts all slots together and refuses a subset). Lookahead: frames are
emitted as soon as the last key they see has arrived; ``flush`` emits the rest (their windows are
cut at the end of the stream, as offline). Leftover audio shorter than one frame at the end is
dropped, as the offline conv does. Settings that cannot stream (pos_conv="keep", group_norm="keep",
training mode) raise ValueError at construction.

Adapters: attention adapters (``config.adapter_attn_dim``, MMS ``load_adapter``) are per-frame
and run inside each layer's step, on whatever weights are loaded. The conv adapter after the
encoder (``config.add_adapter``: proj + LayerNorm, then strided Conv1d + GLU layers with zero
padding on both sides) carries per layer the inputs of its next window, starting with the left
padding; flush adds the right padding. It divides the frame rate by its stride (``hop``) and its
right context is counted in ``lookahead`` (pyencoder.hf.latency).
"""
import dataclasses
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._cpu_threads import threads_for
from ..nn.attention import BandedSelfAttention, ChunkedSelfAttention
from ..nn.linear import skinny_view
from ..nn.relpos import WavLMSelfAttention
from ..ops._checks import check_chunk_sizes
from ..streaming.state import StreamState, check_init_args, check_state, stamp
from .frontend import RunningNormState, causal_pos_conv, running_group_norm
from .patch import adapter_geometry, base_model, latency as _latency

__all__ = ["StreamingEncoder", "EncoderStreamState"]


class _StreamFeedForward(nn.Module):
    """An HF Wav2Vec2 / HuBERT / WavLM feed-forward (intermediate_dense -> act -> dropout ->
    output_dense -> dropout) with its two Linear layers run through pyencoder.nn.LinearView (the
    few-row CPU GEMM path of a streaming step); the HF module itself where its layout differs."""

    _PARTS = ("intermediate_dense", "intermediate_act_fn", "intermediate_dropout", "output_dense",
              "output_dropout")

    def __init__(self, ff):
        super().__init__()
        self.ff = ff
        self.split = all(hasattr(ff, p) for p in self._PARTS)
        if self.split:
            self.inter = skinny_view(ff.intermediate_dense)
            self.out = skinny_view(ff.output_dense)

    def forward(self, x):
        ff = self.ff
        if not self.split:
            return ff(x)
        h = ff.intermediate_dropout(ff.intermediate_act_fn(self.inter(x)))
        return ff.output_dropout(self.out(h))


@dataclasses.dataclass
class BufState(StreamState):
    buf: torch.Tensor                      # (B, C, n) inputs not consumed yet

    _growable = {"buf": 2}


@dataclasses.dataclass
class NormState(StreamState):
    count: torch.Tensor                    # (B,) int64
    total: torch.Tensor                    # (B, C) float64
    total_sq: torch.Tensor                 # (B, C) float64


@dataclasses.dataclass
class LayerState(StreamState):
    attn: StreamState
    pending: torch.Tensor                  # (B, n, E) inputs of held-back frames (residual)

    _growable = {"pending": 1}


@dataclasses.dataclass
class AdapterBufState(StreamState):
    buf: torch.Tensor                      # (B, C, n) adapter-conv inputs not consumed yet
    left: torch.Tensor                     # (B,) int64: zero frames a stream starts with (padding)
    _growable = {"buf": 2}


@dataclasses.dataclass
class EncoderStreamState(StreamState):
    convs: List[BufState]
    norm: Optional[NormState]
    pos: Optional[BufState]
    layers: List[LayerState]
    out_lengths: torch.Tensor              # (B,) frames emitted by the last step / flush
    adapter: Optional[List[AdapterBufState]] = None   # conv adapter layers (config.add_adapter)

    def reset(self, mask):
        """Restart streams. The slots of this encoder run in lockstep: the leftover audio of the
        conv layers and the held-back frames of each layer are buffers with one length for the
        whole batch, so zeroing one slot would feed it zeros as if they were audio (a silently
        wrong stream). All slots at once is a full restart; a subset raises."""
        mask = mask.to(self.out_lengths.device)
        if not bool(mask.any()):
            return self
        if not bool(mask.all()):
            raise ValueError(
                f"pyencoder.hf.StreamingEncoder runs its {mask.shape[0]} slots in lockstep (one "
                f"leftover-audio and held-frame length for the whole batch), so slots "
                f"{mask.nonzero().flatten().tolist()} cannot restart alone. Reset every slot (a "
                f"fresh state), or convert the model with pyencoder.models.CausalEncoder.from_hf, "
                f"whose streams keep per-slot positions, lengths and resets")
        for c in self.convs:
            c.buf = c.buf[..., :0].clone()
        for st in (self.norm, self.pos):
            if st is not None:
                StreamState.reset(st, mask)
        for layer in self.layers:
            layer.attn.reset(mask)
            layer.pending = layer.pending[:, :0].clone()
        for a in self.adapter or ():
            a.buf = a.buf.new_zeros(a.buf.shape[0], a.buf.shape[1], int(a.left[0]))
        self.out_lengths = torch.zeros_like(self.out_lengths)
        return self


class StreamingEncoder(nn.Module):
    """Streams a model patched by ``apply_pyencoder_to_wav2vec2`` (base model or a head; the head
    is not applied: outputs are the base model's hidden states).

    ``step(audio (B, n) float, state) -> (last_hidden_state (B, m, E), state)``; with
    ``output_hidden_states=True`` it returns ``((last_hidden_state, hidden_states), state)`` where
    hidden_states[0] is the input of layer 0 and hidden_states[i + 1] the output of layer i (as in
    transformers), each holding the frames that depth emitted in this step (counts differ between
    depths while frames are held back; concatenated over the stream they equal the offline ones).
    """

    def __init__(self, model, *, max_context=65536, output_hidden_states=False):
        super().__init__()
        base, family = base_model(model)
        rec = getattr(base, "_pyencoder_patch", None)
        if rec is None:
            raise ValueError("StreamingEncoder needs a model patched by "
                             "pyencoder.hf.apply_pyencoder_to_wav2vec2")
        if rec.pos_conv == "keep":
            raise ValueError("pos_conv='keep' cannot stream: the symmetric positional conv looks "
                             "half its kernel (e.g. 64 frames = 1.28 s) into the future. Patch "
                             "with pos_conv='drop' or 'causal'.")
        if rec.group_norm == "keep":
            raise ValueError("group_norm='keep' cannot stream: conv layer 0's GroupNorm normalises "
                             "over the whole utterance. Patch with group_norm='running'.")
        if base.training:
            raise ValueError("StreamingEncoder runs the model in eval mode (dropout, SpecAugment "
                             "and batch statistics are not streamable); call model.eval() first")
        self.base = base
        self.family = family
        self.record = rec
        self.stable = bool(base.config.do_stable_layer_norm)
        self.output_hidden_states = output_hidden_states
        self.max_context = max_context
        self.adapter_geometry = adapter_geometry(base)
        self.attn = nn.ModuleList()
        self.ffn = nn.ModuleList()
        for i, (layer, spec) in enumerate(zip(base.encoder.layers, rec.specs)):
            hf = layer.attention
            E, H = hf.embed_dim, hf.num_heads
            if family == "wavlm":
                sa = self._wavlm_attention(hf, spec, i, max_context)
            elif spec.block == 1:
                sa = BandedSelfAttention(E, H, left=spec.left, right=spec.lookahead,
                                         rope=spec.rope or False, max_context=max_context)
            else:
                lc = None if spec.lo_off < 0 else spec.lo_off // spec.block
                sa = ChunkedSelfAttention(E, H, chunk_size=spec.block, left_chunks=lc,
                                          lookahead=spec.lookahead, rope=spec.rope or False,
                                          max_context=max_context)
            for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                setattr(sa, name, skinny_view(getattr(hf, name)))
            if family == "wavlm":
                sa.gru_rel_pos_linear = hf.gru_rel_pos_linear
                sa.gru_rel_pos_const = hf.gru_rel_pos_const
            if abs(sa.scale - hf.scaling) > 1e-12:
                raise ValueError(f"attention scaling {hf.scaling} is not 1/sqrt(head_dim)")
            self.attn.append(sa)
            self.ffn.append(_StreamFeedForward(layer.feed_forward))

    def _wavlm_attention(self, hf, spec, i, max_context):
        """A WavLMSelfAttention for HF layer i's mask; layer 0 owns (shares) the HF bucket table,
        later layers read it by reference."""
        E, H = hf.embed_dim, hf.num_heads
        mask = (dict(left=spec.left, right=spec.lookahead) if spec.block == 1 else
                dict(chunk_size=spec.block, lookahead=spec.lookahead,
                     left_chunks=None if spec.lo_off < 0 else spec.lo_off // spec.block))
        table = self.base.encoder.layers[0].attention.rel_attn_embed
        sa = WavLMSelfAttention(E, H, num_buckets=hf.num_buckets, max_distance=hf.max_distance,
                                has_relative_bias=i == 0, rel_attn_embed=None if i == 0 else table,
                                rope=spec.rope or False, max_context=max_context, **mask)
        if i == 0:
            sa.rel_attn_embed = table
        return sa

    @property
    def hop(self):
        """Input samples per output frame (pyencoder.streaming.latency protocol)."""
        return _latency(self.base).hop

    @property
    def lookahead_samples(self):
        """Input samples past a frame's own hop that its output needs: attention lookahead frames
        times the hop plus the feature extractor's receptive field minus its hop."""
        return _latency(self.base).lookahead_samples

    @property
    def lookahead(self):
        """``lookahead_samples`` under the streaming.latency protocol's name (its input frames are
        samples)."""
        return self.lookahead_samples

    def _check_patch(self):
        # The layers above were built from the patch record of construction time; a model reverted
        # (or reverted and patched again, possibly with other options) since then is not the model
        # this encoder streams.
        rec = getattr(self.base, "_pyencoder_patch", None)
        if rec is None:
            raise RuntimeError("this StreamingEncoder's model was reverted by "
                               "pyencoder.hf.revert_pyencoder after the encoder was built; patch "
                               "it again and build a new StreamingEncoder")
        if rec is not self.record:
            raise RuntimeError("this StreamingEncoder's model was re-patched after the encoder was "
                               f"built (now {rec.options}, was {self.record.options}); build a new "
                               "StreamingEncoder for the current patch")

    # ------------------------------------------------------------------ state
    def _stream_config(self):
        fe = [(cl.conv.in_channels, cl.conv.out_channels, cl.conv.kernel_size[0],
               cl.conv.stride[0]) for cl in self.base.feature_extractor.conv_layers]
        return (f"pyencoder.hf.StreamingEncoder({type(self.base).__name__}, family={self.family}, "
                f"hidden_size={self.base.config.hidden_size}, convs={fe}, group_norm="
                f"{self.record.group_norm}, pos_conv={self.record.pos_conv}, stable_layer_norm="
                f"{self.stable}, adapter={list(self.adapter_geometry or [])}, "
                f"layers=[{', '.join(sa.extra_repr() for sa in self.attn)}])")

    def init_state(self, batch_size, *, device=None, dtype=None, max_chunk=64):
        self._check_patch()
        check_init_args(batch_size, dtype, device)
        p = next(self.base.parameters())
        device = p.device if device is None else torch.device(device)
        dtype = p.dtype if dtype is None else dtype
        B = batch_size
        convs = []
        for i, cl in enumerate(self.base.feature_extractor.conv_layers):
            convs.append(BufState(torch.zeros(B, cl.conv.in_channels, 0, device=device,
                                              dtype=dtype)))
        norm = None
        if self.record.group_norm == "running":
            C = self.base.feature_extractor.conv_layers[0].conv.out_channels
            z = torch.zeros(B, C, dtype=torch.float64, device=device)
            norm = NormState(torch.zeros(B, dtype=torch.int64, device=device), z, z.clone())
        pos = None
        if self.record.pos_conv == "causal":
            pc = self.base.encoder.pos_conv_embed
            k = pc.conv.kernel_size[0]
            pos = BufState(torch.zeros(B, pc.conv.in_channels, k - 1, device=device, dtype=dtype))
        E = self.base.config.hidden_size
        layers = []
        for sa in self.attn:
            st = sa.init_state(B, device=device, dtype=dtype, max_chunk=max_chunk)
            layers.append(LayerState(st, torch.zeros(B, 0, E, device=device, dtype=dtype)))
        adapter = None
        if self.adapter_geometry:
            adapter = []
            for layer, (_, _, p) in zip(self.base.adapter.layers, self.adapter_geometry):
                adapter.append(AdapterBufState(
                    torch.zeros(B, layer.conv.in_channels, p, device=device, dtype=dtype),
                    torch.full((B,), p, dtype=torch.int64, device=device)))
        return stamp(self, EncoderStreamState(convs, norm, pos, layers,
                                              torch.zeros(B, dtype=torch.int64, device=device),
                                              adapter))

    # ------------------------------------------------------------------ stages
    def _frontend(self, audio, state):
        x = audio[:, None]
        for i, cl in enumerate(self.base.feature_extractor.conv_layers):
            st = state.convs[i]
            buf = torch.cat((st.buf, x.to(st.buf.dtype)), -1)
            k, s = cl.conv.kernel_size[0], cl.conv.stride[0]
            n_out = (buf.shape[-1] - k) // s + 1 if buf.shape[-1] >= k else 0
            if n_out == 0:
                st.buf = buf
                return None
            y = cl.conv(buf[..., :(n_out - 1) * s + k])
            st.buf = buf[..., n_out * s:]
            if i == 0 and state.norm is not None:
                ns = state.norm
                y, new = running_group_norm(
                    y, cl.layer_norm.weight, cl.layer_norm.bias, cl.layer_norm.eps,
                    RunningNormState(int(ns.count[0]), ns.total, ns.total_sq))
                ns.count = torch.full_like(ns.count, new.count)
                ns.total, ns.total_sq = new.total, new.total_sq
            elif isinstance(getattr(cl, "layer_norm", None), nn.LayerNorm):
                y = cl.layer_norm(y.transpose(-2, -1)).transpose(-2, -1)
            x = cl.activation(y)
        feats = self.base.feature_projection(x.transpose(1, 2))
        return feats[0] if isinstance(feats, tuple) else feats

    def _pre_layers(self, h, state):
        enc = self.base.encoder
        if state.pos is not None:
            pe, state.pos.buf = causal_pos_conv(enc.pos_conv_embed, h, state.pos.buf,
                                                return_state=True)
            h = h + pe
        if not self.stable:
            h = enc.layer_norm(h)
        return h

    def _attend(self, i, a_new, st, final):
        """New attention inputs a_new (B, n, E) -> outputs of the frames ready now (B, m, E)."""
        sa = self.attn[i]
        y, st.attn = sa.step(a_new, st.attn) if a_new.shape[1] else (a_new, st.attn)
        if final:
            y2, st.attn = sa.flush(st.attn)
            y = torch.cat((y, y2), 1)
        return y

    def _layer(self, i, h_new, st, final):
        layer = self.base.encoder.layers[i]
        a_new = layer.layer_norm(h_new) if self.stable else h_new
        st.pending = torch.cat((st.pending, h_new), 1)
        y = self._attend(i, a_new, st, final)
        m = y.shape[1]
        res, st.pending = st.pending[:, :m], st.pending[:, m:]
        h = res + layer.dropout(y)
        if self.stable:
            h = h + self.ffn[i](layer.final_layer_norm(h))
            if getattr(layer, "adapter_layer", None) is not None:
                h = h + layer.adapter_layer(h)
        else:
            h = layer.layer_norm(h)
            h = h + self.ffn[i](h)
            h = layer.final_layer_norm(h)
        return h

    def _adapter(self, h, state, final):
        """Conv adapter (config.add_adapter) on the encoder frames ready now: proj + LayerNorm
        per frame, then per layer a buffer that starts with the conv's left zero padding, emits
        every complete strided window, and gets the right zero padding at flush: the same
        windows as the offline zero-padded conv."""
        ad = self.base.adapter
        if ad.proj is not None and ad.proj_layer_norm is not None:
            h = ad.proj_layer_norm(ad.proj(h))
        x = h.transpose(1, 2)
        for layer, st, (k, s, p) in zip(ad.layers, state.adapter, self.adapter_geometry):
            buf = torch.cat((st.buf, x.to(st.buf.dtype)), -1)
            if final and p:
                buf = F.pad(buf, (0, p))
            n = (buf.shape[-1] - k) // s + 1 if buf.shape[-1] >= k else 0
            conv = layer.conv
            if n:
                x = F.glu(F.conv1d(buf[..., :(n - 1) * s + k], conv.weight, conv.bias, stride=s),
                          dim=1)
            else:
                x = buf.new_zeros(buf.shape[0], conv.out_channels // 2, 0)
            st.buf = buf[..., n * s:]
        return x.transpose(1, 2)

    def _run(self, audio, state, final):
        B = state.out_lengths.shape[0]
        E = self.base.config.hidden_size
        dt = state.layers[0].pending.dtype
        dev = state.layers[0].pending.device
        h = self._frontend(audio, state) if audio is not None and audio.shape[-1] else None
        h = self._pre_layers(h, state) if h is not None else torch.zeros(B, 0, E, device=dev,
                                                                          dtype=dt)
        hidden = [h]
        for i, st in enumerate(state.layers):
            h = self._layer(i, h, st, final)
            hidden.append(h)
        last = self.base.encoder.layer_norm(h) if self.stable else h
        if self.adapter_geometry:
            last = self._adapter(last, state, final)
        state.out_lengths = torch.full((B,), last.shape[1], dtype=torch.int64, device=dev)
        if self.output_hidden_states:
            return (last, tuple(hidden)), state
        return last, state

    # ------------------------------------------------------------------ protocol
    def step(self, audio, state):
        """audio (B, n) raw 16 kHz samples (any n >= 0) -> (frames ready now, state)."""
        if not isinstance(audio, torch.Tensor) or audio.dim() != 2:
            raise ValueError(f"audio must be a (batch, samples) tensor; got "
                             f"{getattr(audio, 'shape', type(audio).__name__)}")
        check_state(self, state, EncoderStreamState)
        if audio.shape[0] != state.out_lengths.shape[0]:
            raise ValueError(f"audio has batch {audio.shape[0]} but the state holds "
                             f"{state.out_lengths.shape[0]} streams")
        self._check_eval()
        # One scoped thread count for the whole step (pyencoder._cpu_threads): on a busy CPU the
        # step's hundreds of small parallel ops each wait at a thread barrier (RTF 35-52 vs 5).
        with threads_for(float("inf"), state.layers[0].pending.device):
            return self._run(audio, state, final=False)

    def flush(self, state):
        """End of stream: emit every held-back frame."""
        check_state(self, state, EncoderStreamState)
        self._check_eval()
        with threads_for(float("inf"), state.layers[0].pending.device):
            return self._run(None, state, final=True)

    def _check_eval(self):
        # Checked at construction too; a model put back in training mode afterwards would stream
        # with dropout active (outputs that differ from the offline forward at random).
        self._check_patch()
        if self.base.training:
            raise ValueError("StreamingEncoder streams in eval mode only (dropout would make the "
                             "stream differ from the offline forward); call model.eval()")

    def forward(self, audio, chunk_sizes=(3200,)):
        """Convenience: stream ``audio`` (B, n) in the given chunk sizes (ints >= 1, in samples,
        cycled) and return the concatenated last hidden state."""
        import itertools
        chunk_sizes = check_chunk_sizes("chunk_sizes", chunk_sizes)
        if not isinstance(audio, torch.Tensor) or audio.dim() != 2:
            raise ValueError(f"audio must be a (batch, samples) tensor; got "
                             f"{getattr(audio, 'shape', type(audio).__name__)}")
        state = self.init_state(audio.shape[0], device=audio.device)
        outs, t = [], 0
        for c in itertools.cycle(chunk_sizes):
            if t >= audio.shape[1]:
                break
            y, state = self.step(audio[:, t:t + c], state)
            outs.append(y[0] if self.output_hidden_states else y)
            t += c
        y, state = self.flush(state)
        outs.append(y[0] if self.output_hidden_states else y)
        return torch.cat(outs, 1)
