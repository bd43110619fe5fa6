"""StreamingEncoder: run a patched Wav2Vec2 / HuBERT / WavLM model on raw 16 kHz audio chunk by
chunk, with outputs equal to the patched model's offline forward.

A thin adapter: the stream is ``pyencoder.models.CausalEncoder.from_hf(model, <the patch's
options>, share_weights=True)``, the same encoder as ``from_hf`` builds, running on the model's own
parameters (no copy: the projections and feed-forward Linear layers are the model's modules run
through pyencoder.nn.LinearView, the other parameters are the model's tensors, the positional
conv reads its weight-norm parametrisation at each call, WavLM's bucket table is layer 0's
nn.Embedding). In-place edits of the model, ``load_adapter`` and ``.to()`` are seen by the stream.

What this class adds to that encoder: it checks the patch (pos_conv="keep", group_norm="keep" and
training mode cannot stream and raise ValueError; a model reverted or re-patched after
construction raises RuntimeError), the audio layout, and the (transformers-style) hidden states.

Per-slot streams (pyencoder.models.CausalEncoder): every slot keeps its own position, leftover
audio, held-back frames and running statistics, so chunks may differ per slot (``lengths``) and
``pyencoder.streaming.reset(state, mask)`` restarts any subset of slots. Lookahead: frames are
emitted as soon as the last key they see has arrived; ``flush`` emits the rest (their windows are
cut at the end of the stream, as offline). Leftover audio shorter than one frame at the end is
dropped, as the offline conv does.

Adapters: attention adapters (``config.adapter_attn_dim``, MMS ``load_adapter``) are per-frame and
run inside each layer's step, on whatever weights are loaded. The conv adapter after the encoder
(``config.add_adapter``) streams through pyencoder.models.adapter.ConvAdapter: it divides the frame
rate by its stride (``hop``) and its right context is counted in ``lookahead``
(pyencoder.hf.latency).
"""
import itertools

import torch
from torch import nn

from .._cpu_threads import threads_for
from ..models.encoder import CausalEncoder, EncoderState
from .._checks import autocasting, check_chunk_sizes
from ..streaming.latency import NotStreamableError
from ..streaming.state import check_state, ends_stream, stream_config
from .patch import base_model, latency as _latency, unstreamable_reason

__all__ = ["StreamingEncoder", "EncoderStreamState"]


class EncoderStreamState(EncoderState):
    """The state of a StreamingEncoder: its CausalEncoder's state (per-slot; ``reset(mask)``
    restarts any subset of slots)."""


class StreamingEncoder(nn.Module):
    """Streams a model patched by ``apply_pyencoder_to_wav2vec2`` (base model or a head; the head
    is not applied: outputs are the base model's hidden states, after the conv adapter if the
    model has one).

    ``step(audio (B, n) float, state, lengths=None) -> (last_hidden_state (B, m, E), state)``;
    slot b's new frames are the first ``state.out_lengths[b]`` rows (all slots alike when every
    slot gets the whole chunk). With ``output_hidden_states=True`` it returns
    ``((last_hidden_state, hidden_states), state)`` where hidden_states[0] is the input of layer 0
    and hidden_states[i + 1] the output of layer i (as in transformers), each holding the frames
    that depth emitted in this step (counts differ between depths while frames are held back;
    concatenated over the stream they equal the offline ones).
    """

    def __init__(self, model, *, max_context=65536, output_hidden_states=False):
        super().__init__()
        base, family = base_model(model, "StreamingEncoder")
        rec = getattr(base, "_pyencoder_patch", None)
        if rec is None:
            raise ValueError("StreamingEncoder needs a model patched by "
                             "pyencoder.hf.apply_pyencoder_to_wav2vec2")
        why = unstreamable_reason(rec)
        if why is not None:
            raise NotStreamableError(why)
        if base.training:
            raise ValueError("StreamingEncoder runs the model in eval mode (dropout, SpecAugment "
                             "and batch statistics are not streamable); call model.eval() first")
        self.base = base
        self.family = family
        self.record = rec
        if not isinstance(output_hidden_states, bool):
            raise TypeError(f"output_hidden_states must be True or False; got "
                            f"{type(output_hidden_states).__name__} {output_hidden_states!r}")
        self.output_hidden_states = output_hidden_states
        self.max_context = max_context
        opts = rec.options
        spec0 = rec.specs[0]
        self.encoder = CausalEncoder.from_hf(
            base, lookahead=opts["lookahead_frames"], lookahead_layers=opts["lookahead_layers"],
            left=opts["left_frames"], rope=spec0.rope or False, pos_conv=opts["pos_conv"],
            chunk_size=opts["chunk_size"], left_chunks=opts["left_chunks"],
            sink=opts.get("sink_frames", 0), max_context=max_context, share_weights=True)
        for i, (layer, spec) in enumerate(zip(self.encoder.layers, rec.specs)):
            att = layer.attention
            if (att.block, att.lo_off, att.hi_off, att.mask.sink) != (*spec.mask.params,
                                                                      spec.mask.sink):
                raise RuntimeError(f"layer {i}: the converted mask (block, lo_off, hi_off, sink) = "
                                   f"{(att.block, att.lo_off, att.hi_off, att.mask.sink)} differs "
                                   f"from the patch's {(*spec.mask.params, spec.mask.sink)}")

    @property
    def attn(self):
        """The attention module of each layer (pyencoder.nn; sharing the model's projections)."""
        return [layer.attention for layer in self.encoder.layers]

    @property
    def hop(self):
        """Input samples per output frame (pyencoder.streaming.latency protocol)."""
        return _latency(self.base).hop

    @property
    def lookahead_samples(self):
        """Input samples past a frame's own hop that its output needs: attention (and conv
        adapter) lookahead frames times the hop plus the feature extractor's receptive field minus
        its hop."""
        return _latency(self.base).lookahead_samples

    @property
    def lookahead(self):
        """``lookahead_samples`` under the streaming.latency protocol's name (its input frames are
        samples)."""
        return self.lookahead_samples

    def _check_patch(self):
        # The encoder was built from the patch record of construction time; a model reverted (or
        # reverted and patched again, possibly with other options) since then is not the model
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

    def _check_eval(self):
        # Checked at construction too; a model put back in training mode afterwards would stream
        # with dropout active (outputs that differ from the offline forward at random).
        self._check_patch()
        if self.base.training:
            raise ValueError("StreamingEncoder streams in eval mode only (dropout would make the "
                             "stream differ from the offline forward); call model.eval()")

    def _check_state(self, state):
        check_state(self, state, EncoderStreamState, config=stream_config(self.encoder))

    # ------------------------------------------------------------------ protocol
    def init_state(self, batch_size, *, device=None, dtype=None, max_chunk=64):
        self._check_patch()
        st = self.encoder.init_state(batch_size, device=device, dtype=dtype, max_chunk=max_chunk)
        out = EncoderStreamState(**{k: getattr(st, k) for k in st.__dataclass_fields__})
        out.__dict__.update(st.__getstate__())       # what init_state recorded (config, dtypes)
        return out

    def step(self, audio, state, lengths=None):
        """audio (B, n) raw 16 kHz samples (any n >= 0; ``lengths`` (B,) valid samples per slot)
        -> (frames ready now, state)."""
        _check_audio(audio, self.encoder)
        self._check_state(state)
        if audio.shape[0] != state.out_lengths.shape[0]:
            raise ValueError(f"audio has batch {audio.shape[0]} but the state holds "
                             f"{state.out_lengths.shape[0]} streams")
        if audio.device != state.out_lengths.device:
            raise ValueError(f"audio must be on the state's device ({state.out_lengths.device}); "
                             f"got {audio.device}")
        self._check_eval()
        # One scoped thread count for the whole step (pyencoder._cpu_threads): on a busy CPU the
        # step's hundreds of small parallel ops each wait at a thread barrier (RTF 35-52 vs 5).
        with threads_for(float("inf"), state.out_lengths.device):
            return self.encoder.step(audio, state, lengths,
                                     output_hidden_states=self.output_hidden_states)

    def steady_check(self, n, state):
        """pyencoder.streaming.state.SteadyCheck of a step of n samples: the encoder's (None with
        ``output_hidden_states``: step_fixed returns the last hidden state only)."""
        return None if self.output_hidden_states else self.encoder.steady_check(n, state)

    def step_fixed(self, audio, state, check=False):
        """CUDA-graph friendly steady-state step (pyencoder.models.CausalEncoder.step_fixed):
        audio (B, n), every slot the same n samples, n a multiple of ``hop``, after general
        ``step`` calls of the same chunk size have brought the stream to its steady state
        (``check=True`` verifies, a host synchronisation: once, outside capture). Returns the
        last hidden state (B, n // hop, E), equal to ``step``'s; the state is updated in place
        without host synchronisation, so the call can be captured in a torch.cuda.CUDAGraph.
        Not with ``output_hidden_states=True``; with a conv adapter ``hop`` includes its
        stride."""
        _check_audio(audio, self.encoder)
        self._check_state(state)
        if self.output_hidden_states:
            raise ValueError("StreamingEncoder.step_fixed returns the last hidden state only; "
                             "this encoder was built with output_hidden_states=True (use step)")
        self._check_eval()
        return self.encoder.step_fixed(audio, state, check=check)

    @ends_stream
    def flush(self, state):
        """End of stream: emit every held-back frame."""
        self._check_state(state)
        self._check_eval()
        with threads_for(float("inf"), state.out_lengths.device):
            return self.encoder.flush(state, output_hidden_states=self.output_hidden_states)

    def forward(self, audio, chunk_sizes=(3200,)):
        """Convenience: stream ``audio`` (B, n) in the given chunk sizes (ints >= 1, in samples,
        cycled) and return the concatenated last hidden state."""
        chunk_sizes = check_chunk_sizes("chunk_sizes", chunk_sizes)
        _check_audio(audio, self.encoder)
        state = self.init_state(audio.shape[0])
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


def _check_audio(audio, encoder):
    """``audio``: a floating (batch, samples) tensor (integer PCM must be scaled to floats by the
    caller: the model was trained on floats, a silent cast would feed it values 2**15 too big) of
    the model's dtype (as the patched model's offline forward needs; outside autocast)."""
    if not isinstance(audio, torch.Tensor) or audio.dim() != 2:
        raise ValueError(f"audio must be a (batch, samples) tensor; got "
                         f"{getattr(audio, 'shape', type(audio).__name__)}")
    if not audio.dtype.is_floating_point:
        raise TypeError(f"audio must be a floating tensor (scale integer PCM to [-1, 1] first); "
                        f"got {audio.dtype}")
    p = next(encoder.parameters(), None)
    if p is not None and audio.dtype != p.dtype and not autocasting(audio):
        raise TypeError(f"audio must have the model's dtype ({p.dtype}); got {audio.dtype} "
                        f"(convert it: audio.to({p.dtype}))")
