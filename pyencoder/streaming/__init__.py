"""Streaming: explicit state objects, stream drivers and latency accounting (DESIGN.md,
"Streaming"). The decode-step attention over the ring KV cache is an op family like the others
(pyencoder.ops.decode_attention, reference and ring layout in pyencoder.reference.decode_attention);
its names are re-exported here.

Protocol of every streaming module m::

    state = m.init_state(batch_size, device=..., dtype=...)
    y, state = m.step(x_chunk, state)        # any chunk length >= 0; y may hold fewer frames
    y, state = m.step(x_chunk, state, lengths)   # (B,) valid frames per slot
    y, state = m.flush(state)                # end of stream: the held-back frames
    reset(state, mask)                       # recycle slots (bool (B,)) for new streams

``state.out_lengths`` (B,) counts each slot's frames of y. What a module of your own provides to
join a ``StreamingSequential`` (the exact signatures), and what else it declares (its chunks'
time axis, being per-frame, swapping layouts), is in ``pyencoder.streaming.protocol``.

In the steady state, modules with ``step_fixed`` (attention,
conv, TransformerLayer, StreamingSequential, CausalEncoder) step without host synchronisation:
``CudaGraphStep(module, state, example)`` captures that step in a CUDA graph and replays it per
chunk (pyencoder.streaming.graph).
"""
import inspect
import itertools

import torch

from .._checks import autocasting, check_chunk_sizes
from .protocol import time_last
from .state import StreamState, batched_counters, reset, state_nbytes
from .latency import Latency, NotStreamableError, latency
from .sequential import StreamingSequential, StackState, cat_time
from .graph import CudaGraphStep
from .admit import admit
from ..ops.decode_attention import decode_attention
from ..reference.decode_attention import decode_attention_reference, ring_positions

__all__ = ["StreamState", "reset", "state_nbytes", "latency", "Latency", "NotStreamableError",
           "StreamingSequential", "StackState", "decode_attention", "decode_attention_reference",
           "ring_positions", "run_stream", "batched_counters", "CudaGraphStep", "admit"]


def _step_inputs(step):
    """The names of the inputs (required positional parameters before the state) of a bound
    ``step``, or None where its signature is unknown."""
    try:
        params = list(inspect.signature(step).parameters.values())
    except (TypeError, ValueError):
        return None
    req = [p.name for p in params if p.default is p.empty and p.kind in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return req[:-1]


def run_stream(module, x, chunk_sizes, time_dim=None, **init_kwargs):
    """Stream ``x`` (batch 1 or more, all slots in lockstep) through ``module`` in chunks of the
    given sizes (ints >= 1, cycled) and return the concatenated step + flush outputs.
    ``time_dim``: the time axis of x and of the outputs (default: -1 for conv layouts (B, C, T), 1
    otherwise)."""
    chunk_sizes = check_chunk_sizes("chunk_sizes", chunk_sizes)
    if not all(callable(getattr(module, f, None)) for f in ("init_state", "step", "flush")):
        raise TypeError(f"module must be a streaming module (init_state, step, flush); got "
                        f"{type(module).__name__}")
    inputs = _step_inputs(module.step)
    if inputs is not None and len(inputs) > 1:
        # (FrameCrossAttention: step(x_q, x_kv, state) failed inside with "missing 'state'")
        raise TypeError(f"run_stream drives modules whose step takes one input, step(x, state); "
                        f"{type(module).__name__}.step takes {len(inputs)} "
                        f"({', '.join(inputs)}): call its step yourself")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have a batch and a time axis; got shape {tuple(x.shape)}")
    if time_dim is None:
        time_dim = -1 if time_last(module) else 1
    if isinstance(time_dim, bool) or not isinstance(time_dim, int) \
            or not -x.dim() < time_dim < x.dim() or time_dim in (0, -x.dim()):
        raise ValueError(f"time_dim must be an int naming a non-batch axis of x (shape "
                         f"{tuple(x.shape)}); got {time_dim!r}")
    if hasattr(module, "stream_time_axis") or type(module).__module__.startswith("pyencoder."):
        # the module declares its chunks' time axis (pyencoder's modules: absent means 1)
        want = x.dim() - 1 if time_last(module) else 1
        if time_dim % x.dim() != want:
            raise ValueError(f"time_dim ({time_dim}) names axis {time_dim % x.dim()} of x (shape "
                             f"{tuple(x.shape)}), but {type(module).__name__} takes its chunks "
                             f"with time on axis {want}: pass time_dim={want} or leave it None")
    if x.shape[0] < 1:
        raise ValueError(f"x must hold at least one stream (batch >= 1); got shape "
                         f"{tuple(x.shape)}")
    clash = sorted({"dtype", "device", "batch_size"} & set(init_kwargs))
    if clash:
        raise TypeError(f"run_stream takes the state's batch, dtype and device from x; got "
                        f"{', '.join(clash)} among the init_state keywords")
    T = x.shape[time_dim]
    # under autocast the state keeps the module's dtype (init_state refuses another one)
    dtype = None if autocasting(x) else x.dtype
    state = module.init_state(x.shape[0], device=x.device, dtype=dtype, **init_kwargs)
    outs, counts = [], []
    t = 0
    for c in itertools.cycle(chunk_sizes):
        if t >= T:
            break
        c = min(c, T - t)
        xc = x.narrow(time_dim, t, c)
        y, state = module.step(xc, state)
        outs.append(y)
        counts.append(state.out_lengths.clone())
        t += c
    y, state = module.flush(state)
    if y is not None:
        outs.append(y)
        counts.append(state.out_lengths.clone())
    out_time_last = _out_time_last(module, time_dim % x.dim() == x.dim() - 1)
    y, _ = cat_time(outs, counts, state, out_time_last)
    return y


def _out_time_last(m, in_time_last):
    fn = getattr(m, "out_time_last", None)
    if callable(fn):
        return fn()
    return in_time_last
