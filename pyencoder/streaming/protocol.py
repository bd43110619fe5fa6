"""What a module declares to take part in a stream (DESIGN.md, "Streaming").

A streaming module has ``init_state`` / ``step`` / ``flush`` (``pyencoder.streaming``'s docstring)
and reports ``hop`` and ``lookahead`` (``pyencoder.streaming.latency``: both, or neither and its
children compose them; ``hop`` alone is checked against its children's). What a
``StreamingSequential`` calls (checked when it is built and at its ``init_state``, naming the
child):

- ``init_state(batch_size, *, device=None, dtype=None[, max_chunk=...])`` returns a
  ``pyencoder.streaming.StreamState`` with ``out_lengths``, a (B,) int64 tensor: how many frames
  of each slot the last step or flush emitted (max_chunk is passed where accepted);
- ``step(x, state, lengths=None)`` returns ``(y, state)``: ``lengths`` None (every slot's whole
  chunk) or (B,) int64, the valid frames of each slot (the rest is padding); slot b's first
  ``state.out_lengths[b]`` frames of y are its output;
- ``flush(state)`` returns ``(y or None, state)``: the held-back frames.

It may also declare, as class attributes:

- ``stream_time_axis``: the time axis of its input chunks, ``-1`` for the conv layout (B, C, T)
  (pyencoder.nn.CausalConv1d) or ``1`` for the sequence layout (B, T, C); absent means ``1``;
- ``out_time_last()`` (a method): whether its outputs are time-last, where that is not the
  input's layout (StreamingSequential; CausalEncoder: waveform samples in, (B, T, E) frames out).

A per-frame module (applied to each chunk as is, no state) is an instance of ``POINTWISE`` or
declares:

- ``streaming_pointwise = True``;
- ``stream_swaps_time_axis = True`` if it turns one of the two layouts into the other
  (pyencoder.nn.Transpose).

A streaming module may also have ``step_fixed(x, state, check=False)`` (the steady-state step,
no host synchronisation, state in place: CUDA-graph capturable) and then ``steady_check(n,
state)``: whether its general step of n frames per slot is that step
(``pyencoder.streaming.state.SteadyCheck``: the frames out, the device-side condition, the
counters it reads; None if it never is). A ``StreamingSequential`` whose children all declare it
runs its general step as ``step_fixed`` once every condition holds.

The stream drivers (``StreamingSequential``, ``run_stream``) and the latency accounting read only
these declarations, so the streaming package imports no module class of pyencoder.nn.
"""
from torch import nn

__all__ = ["POINTWISE", "ZERO_LATENCY", "is_pointwise", "is_streaming", "time_last",
           "swaps_time_axis"]

# torch modules that act on each frame independently: StreamingSequential runs them on every chunk
POINTWISE = (nn.Linear, nn.LayerNorm, nn.Dropout, nn.Identity, nn.GELU, nn.ReLU, nn.SiLU,
             nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Mish, nn.Hardtanh,
             nn.PReLU)

# leaf modules that add no latency: the per-frame ones, plus Softmax and Embedding (per-frame for
# latency accounting, but not accepted as StreamingSequential children: a Softmax may normalise
# over time, an Embedding takes ids, not frames)
ZERO_LATENCY = POINTWISE + (nn.Softmax, nn.Embedding)


def is_streaming(m):
    return all(hasattr(m, a) for a in ("init_state", "step", "flush"))


def is_pointwise(m):
    return isinstance(m, POINTWISE) or getattr(m, "streaming_pointwise", False) is True


def time_last(m):
    """True if ``m`` takes its chunks time-last ((B, C, T); ``stream_time_axis == -1``)."""
    return getattr(m, "stream_time_axis", 1) == -1


def swaps_time_axis(m):
    return getattr(m, "stream_swaps_time_axis", False) is True
