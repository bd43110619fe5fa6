"""admit: start a new stream in one slot of a running batch without replacing any state tensor.

A server that advances B streams in lockstep with one captured CUDA graph
(``pyencoder.streaming.CudaGraphStep``, or its own capture of ``step_fixed``) cannot run the
general ``step`` on the batch state when a stream ends and another takes its slot: the general
step replaces tensors, so the graph would have to be captured again, and ``step_fixed`` alone is
wrong for a fresh stream (it assumes the steady state: lookahead already buffered, the feature
extractor past its first windows). ``admit(module, state, slot, chunks, step)`` does the
admission beside the graph:

1. the new stream's first ``chunks`` run through the general step on a private batch-1 state
   (a fresh stream: every tensor zero, as ``reset`` leaves a slot), which returns their outputs
   (the frames a general step emits while it warms up: fewer than the chunk's at first);
2. that state must then be steady for steps of ``step`` samples / frames (the module's
   ``steady_check``; else ValueError: feed more of the stream's first chunks);
3. its tensors are copied into the slot of the batch state, in place: every tensor of the batch
   state stays the one a graph captured, and the next replay (or ``step_fixed``) advances the
   new stream with the others.

The copy is refused (RuntimeError, nothing written) where a graph baked something per slot that
the new stream does not share: the index tensors of ``step_fixed`` (pyencoder.streaming.state.
fixed_index) that a capture used hold each slot's held-back count, which depends on the stream's
phase modulo the mask block; streams fed whole steps from their start share it. The other slots
are not touched; the slot's ``out_lengths`` read the steady step's frame count afterwards, as
those of the other slots do.
"""
import dataclasses
import inspect

import torch

from .protocol import is_streaming, time_last
from .state import StreamState, _stamp, check_state, steady_check
from .._checks import is_int

__all__ = ["admit"]


def _fresh_slot(st, slot):
    """A batch-1 state shaped like slot ``slot`` of ``st`` (what init_state recorded kept: the
    configuration stamp, the weights' dtype, ...), made a fresh stream by its own ``reset`` (all
    zeros, or what a state that overrides reset starts from: the cross-attention's empty
    buffers)."""
    dev = next(iter(st.tensors().values())).device
    return _slot_copy(st, slot).reset(torch.ones(1, dtype=torch.bool, device=dev))


def _slot_copy(st, slot):
    kw = {}
    for f in dataclasses.fields(st):
        v = getattr(st, f.name)
        if isinstance(v, torch.Tensor):
            v = v[slot:slot + 1].detach().clone()   # (the batch's autograd graph stays there)
        elif isinstance(v, StreamState):
            v = _slot_copy(v, slot)
        elif isinstance(v, (list, tuple)):
            v = type(v)(_slot_copy(s, slot) for s in v)
        kw[f.name] = v
    out = type(st)(**kw)
    out.__dict__.update({k: v for k, v in st.__getstate__().items() if k not in kw})
    return out


def _out_axis(module):
    fn = getattr(module, "out_time_last", None)
    if callable(fn):
        return -1 if fn() else 1
    return -1 if time_last(module) else 1


def _step_inputs(module):
    """How many inputs ``module.step`` takes before ``state`` (None: unknown)."""
    try:
        params = list(inspect.signature(module.step).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("state") if "state" in params else None


def admit(module, state, slot, chunks, step):
    """Start a new stream in slot ``slot`` of ``state`` (a batch state of ``module``, e.g. one a
    CUDA graph of ``step_fixed`` advances) without replacing any of its tensors (module
    docstring). ``chunks``: the new stream's first chunks, each a batch-1 tensor of any length
    the general step takes (a module whose step takes several inputs: a tuple per chunk, one
    batch-1 tensor or None per input); ``step``: the length (samples or frames, the module's
    time axis; of the first input for several) of the steady steps that follow. Returns the
    warm-up's outputs, one batch-1 tensor per chunk holding only the frames the general step
    emitted for it. Raises ValueError if the stream is
    not steady for ``step`` after the chunks (nothing written)."""
    if not is_streaming(module):
        raise TypeError(f"admit: module must be a streaming module (init_state / step / flush; "
                        f"the one that made state); got {type(module).__name__}")
    if not isinstance(state, StreamState):
        raise TypeError(f"admit: state must be a StreamState; got {type(state).__name__}")
    own = getattr(module, "_check_state", None)     # where a module checks its own way
    own(state) if callable(own) else check_state(module, state, type(state))
    B = state.batch_size
    if isinstance(slot, bool) or not isinstance(slot, int):
        raise TypeError(f"admit: slot must be an int in [0, {B}); got {type(slot).__name__} "
                        f"{slot!r}")
    if not 0 <= slot < B:
        raise ValueError(f"admit: slot must be an int in [0, {B}); got {slot!r}")
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"admit: step must be an int >= 1 (the steady step's length); got "
                        f"{type(step).__name__} {step!r}")
    if step < 1:
        raise ValueError(f"admit: step must be an int >= 1 (the steady step's length); got "
                         f"{step!r}")
    try:
        chunks = [chunks] if isinstance(chunks, torch.Tensor) else list(chunks)
    except TypeError:
        raise TypeError(f"admit: chunks must be a list of batch-1 tensors (the new stream's "
                        f"first chunks); got {type(chunks).__name__} {chunks!r}") from None

    def one(c):
        return isinstance(c, torch.Tensor) and c.dim() >= 1 and c.shape[0] == 1
    # a multi-input step (FrameCrossAttention: step(x_q, x_kv, state)): each chunk a tuple of
    # inputs, each a batch-1 tensor or None (that stream brought nothing)
    multi = bool(chunks) and all(isinstance(c, tuple) for c in chunks)
    if not chunks or not (all(one(c) for c in chunks) or multi and all(
            len(c) == len(chunks[0]) and any(x is not None for x in c)
            and all(x is None or one(x) for x in c) for c in chunks)):
        raise ValueError("admit: chunks must be a non-empty list of batch-1 tensors (the new "
                         "stream's first chunks; for a step of several inputs, tuples of them, "
                         "None where a stream brought nothing)")
    n_in = _step_inputs(module)
    if n_in is not None and ((n_in > 1) != multi or (multi and len(chunks[0]) != n_in)):
        got = f"tuples of {len(chunks[0])}" if multi else "tensors"
        raise ValueError(f"admit: {type(module).__name__}.step takes {n_in} input(s) before the "
                         f"state: each chunk must be " + (f"a tuple of {n_in} (None where a "
                                                          f"stream brought nothing)"
                                                          if n_in > 1 else "one tensor")
                         + f"; got {got}")
    sub = _fresh_slot(state, slot)
    if steady_check(module, step, sub) is None:
        why = (" (it was built with output_hidden_states=True: its fixed step returns the last "
               "hidden state only)") if getattr(module, "output_hidden_states", False) is True \
            else (f" (no steady_check, or {step} is not a whole number of its strides / mask "
                  f"blocks, or a context it cannot hold in a fixed state)")
        raise ValueError(f"admit: {type(module).__name__} has no steady step of length "
                         f"{step}{why}")
    axis = _out_axis(module)
    outs = []
    with torch.no_grad():
        for c in chunks:
            y, sub = module.step(*c, sub) if multi else module.step(c, sub)
            m = int(sub.out_lengths[0])
            outs.append(y.narrow(axis, 0, m))
        check = steady_check(module, step, sub)
        ok = None if check is None else check.ok()
        if check is None or ok is not None and not bool(ok.all()):
            hop = getattr(module, "hop", None)
            fed = None if multi else sum(c.shape[-1 if time_last(module) else 1] for c in chunks)
            if is_int(hop) and hop > 1 and fed is not None and fed % hop:
                raise ValueError(f"admit: the new stream's first chunks total {fed} samples, not "
                                 f"a multiple of {type(module).__name__}'s hop ({hop}): steps of "
                                 f"{step} never bring it into phase with the batch; make their "
                                 f"total a multiple of {hop}")
            raise ValueError(f"admit: after {len(chunks)} chunk(s) the new stream is not yet in "
                             f"the steady state for steps of {step} (its lookahead and first "
                             f"windows need more input): pass more of its first chunks")
        # where a module baked something per batch that the new stream must share (the
        # cross-attention's mask alignment): its own check, and what to redo after the copy
        guard = getattr(module, "_admit_check", None)
        after = guard(state, sub, slot) if callable(guard) else None
        _write_slot(state, sub, slot)
        if after is not None:
            after()
    return outs


def _write_slot(state, sub, slot):
    mine, new = state.tensors(), sub.tensors()
    if mine.keys() != new.keys():
        raise RuntimeError(f"admit: the new stream's state has other tensors than the batch's "
                           f"({sorted(set(mine) ^ set(new))})")
    for k, t in mine.items():
        if t.shape[1:] != new[k].shape[1:] or t.dtype != new[k].dtype:
            raise RuntimeError(f"admit: {k} of the new stream's state is "
                               f"{tuple(new[k].shape[1:])} {new[k].dtype} per slot, the batch's "
                               f"{tuple(t.shape[1:])} {t.dtype} (a buffer grew: unbounded "
                               f"context cannot run a fixed step)")
    states, subs = state.states(), sub.states()
    # what a captured graph baked per slot: the fixed_index tensors it pinned
    for p, st in states.items():
        for idx in st.__dict__.get("_graph_pinned", ()):
            held, c = int(idx.qidx[slot, 0]), int(getattr(subs[p], idx.name)[0])
            if held != c:
                raise RuntimeError(
                    f"admit: a captured graph holds slot {slot}'s {p}{idx.name} = {held} (its "
                    f"phase modulo the mask block); the new stream's is {c}: feed it whole "
                    f"steps from its start, or capture again")
    # out_lengths counters recorded as holding the steady count (fill_counter) keep holding it
    recs = []
    for st in states.values():
        for key, rec in list(st.__dict__.items()):
            if key.startswith("_filled_") and rec[0] is getattr(st, key[8:], None) \
                    and rec[2] == _stamp(rec[0]):
                recs.append((st, key, rec))
    # every tensor's slot at once: one multi-tensor copy per device and dtype on CUDA (a slot
    # of a (B, ...) state tensor and a batch-1 one are both dense), ~100 copies for an encoder
    keys = list(mine)
    torch._foreach_copy_([mine[k][slot] for k in keys], [new[k][0] for k in keys])
    for st, key, (t, n, _) in recs:
        t[slot] = n
    for st, key, (t, n, _) in recs:
        st.__dict__[key] = (t, n, _stamp(t))
