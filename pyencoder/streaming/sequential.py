"""StreamingSequential: nn.Sequential whose children stream in turn.

Children are streaming modules (``init_state`` / ``step`` / ``flush``, e.g. CausalConv1d,
BandedSelfAttention, TransformerLayer, Refiner, a nested StreamingSequential) or stateless
per-frame modules (``pyencoder.streaming.protocol``: nn.Linear, nn.LayerNorm over features,
activations, dropout, identity, pyencoder.nn.Transpose) that are applied to each chunk as is. The
chain's input layout is the one its first child declaring a layout takes (through the Transposes
before it; layout-neutral per-frame modules take either); each child declaring
``stream_swaps_time_axis`` flips the output layout. The per-slot valid lengths travel
down the chain with the frames: each step's output is (B, ..., m) with slot b's frames first,
``state.out_lengths[b]`` of them; what follows them is padding. ``flush`` flushes the children in
order, each flush output passed through the rest of the chain before that child is flushed.
``step`` / ``flush`` with ``outputs=[]`` also append every child's output of that call (the frames
each depth emitted, slot b's first ``state.layers[i].out_lengths[b]``; for ``flush`` the outputs of
every flush that reached that child, concatenated per slot): a model's hidden states.
"""
import dataclasses
import functools
import inspect
from typing import List

import torch
from torch import nn

from .._cpu_threads import threads_for
from .protocol import is_pointwise, is_streaming, swaps_time_axis, time_last
from .state import (StreamState, _declared, all_steady, batched_counters, check_init_args,
                    check_state, check_step_lengths, check_step_slots, ends_stream, fill_counter,
                    fresh_counters, holds_in_place_step, inference_step, marks_partial,
                    record_steady, require_steady, stamp, steady_check, steady_dispatch)

__all__ = ["StreamingSequential", "StackState", "PassState", "cat_time"]


@dataclasses.dataclass
class PassState(StreamState):
    out_lengths: torch.Tensor


@dataclasses.dataclass
class StackState(StreamState):
    layers: List[StreamState]
    out_lengths: torch.Tensor


def _holds_back(m):
    """Whether a child of a stack may hold frames back from its output (so the frames after it
    reach a steady state at any phase): a declared ``lookahead`` other than 0 (None: unknown,
    a nested stack: any of its children); per-frame modules never."""
    if isinstance(m, StreamingSequential):
        return any(_holds_back(c) for c in m)
    if not is_streaming(m):
        return False
    return getattr(m, "lookahead", None) != 0


def _takes_positional(fn, n):
    """Whether ``fn`` accepts n positional arguments (True where its signature is unknown)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    kinds = [p.kind for p in params]
    return inspect.Parameter.VAR_POSITIONAL in kinds or sum(
        k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        for k in kinds) >= n


def _takes_keyword(fn, name):
    """Whether ``fn`` accepts the keyword ``name`` (True where its signature is unknown)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind == inspect.Parameter.VAR_KEYWORD
                                 for p in params.values())


def _wants_time_last(m):
    """The layout child ``m`` takes: True (B, C, T), False (B, T, C), None (either: a
    layout-neutral per-frame module such as GELU, Dropout, Identity, a Transpose)."""
    if is_streaming(m):
        return time_last(m)
    if isinstance(m, (nn.Linear, nn.LayerNorm)):
        return False
    if isinstance(m, nn.PReLU) and m.num_parameters > 1:
        return True
    return None


def _layout_after(m, t):
    """Whether child ``m``'s outputs are time-last, its inputs being time-last where ``t``: a
    per-frame module may swap the layout (Transpose), a streaming one may declare its outputs'
    (``out_time_last()``: CausalEncoder, a nested stack ending in a Transpose)."""
    if swaps_time_axis(m):
        return not t
    if is_streaming(m) and callable(getattr(m, "out_time_last", None)):
        return bool(m.out_time_last())
    return t


class StreamingSequential(nn.Sequential):
    """``nn.Sequential`` of streaming and per-frame modules that also streams: ``init_state``,
    ``step`` and ``flush`` run the children in turn (module docstring); its latency is composed by
    ``pyencoder.streaming.latency``."""
    lookahead = None  # composed by pyencoder.streaming.latency from the children

    def __init__(self, *modules):
        super().__init__(*modules)
        for i, m in enumerate(self):
            if not (is_streaming(m) or is_pointwise(m)):
                raise TypeError(f"StreamingSequential: child {i} ({type(m).__name__}) is neither a "
                                f"streaming module (init_state/step/flush) nor a per-frame module")
            if is_streaming(m) and not _takes_positional(m.step, 3):
                raise TypeError(f"StreamingSequential: child {i} ({type(m).__name__}).step takes "
                                f"no `lengths`: a stack calls step(x, state, lengths) (lengths "
                                f"None or (B,) int64, the valid frames of each slot; "
                                f"pyencoder.streaming.protocol)")
        self._check_layouts()

    def _check_layouts(self):
        """Each child gets chunks in the layout it takes: a streaming child its declared
        ``stream_time_axis``, a last-axis per-frame module (Linear, LayerNorm) the sequence
        layout (B, T, C), a per-channel PReLU the conv layout (B, C, T). A mismatch failed at the
        first step with a shape error from inside torch, or ran over the time axis silently when
        a chunk's length equalled the channels."""
        if not len(self):
            return
        name = {True: "(B, C, T)", False: "(B, T, C)"}
        t = self._input_time_last()
        for i, m in enumerate(self):
            want = _wants_time_last(m)
            if want is not None and want != t:
                raise ValueError(f"StreamingSequential: child {i} ({type(m).__name__}) takes "
                                 f"{name[want]} chunks but gets {name[t]} chunks there; insert "
                                 f"pyencoder.nn.Transpose(1, 2) before it")
            t = _layout_after(m, t)

    def _stream_config(self):
        return f"StreamingSequential({', '.join(type(m).__name__ for m in self)})"

    def _mark_any_phase(self):
        """Strided CausalConv1d's (children, or inside children) after a child that holds
        frames back (lookahead, unknown lookahead, incomplete chunks) meet a steady stream at
        any phase of their stride: their step_fixed reads each slot's phase (``any_phase``)."""
        held = False
        for m in self:
            if held:
                for c in m.modules():
                    if hasattr(c, "any_phase") and c.s > 1 and not c.any_phase:
                        c.any_phase = True
            held = held or _holds_back(m)

    def init_state(self, batch_size, *, device=None, dtype=None, max_chunk=64):
        check_init_args(batch_size, dtype, device, self)
        self._mark_any_phase()
        p = next(self.parameters(), None)
        device = (p.device if p is not None else torch.device("cpu")) if device is None \
            else torch.device(device)
        dtype = (p.dtype if p is not None else torch.float32) if dtype is None else dtype
        layers = []
        for i, m in enumerate(self):
            if is_streaming(m):
                kw = {"max_chunk": max_chunk} if _takes_keyword(m.init_state, "max_chunk") else {}
                st = m.init_state(batch_size, device=device, dtype=dtype, **kw)
                if not isinstance(st, StreamState) or \
                        not isinstance(getattr(st, "out_lengths", None), torch.Tensor):
                    raise TypeError(f"StreamingSequential: child {i} ({type(m).__name__})"
                                    f".init_state returned a {type(st).__name__} without an "
                                    f"out_lengths tensor: a stack reads state.out_lengths, (B,) "
                                    f"int64, the frames of each slot a step or flush emitted "
                                    f"(pyencoder.streaming.protocol)")
                layers.append(st)
            else:
                layers.append(PassState(out_lengths=torch.zeros(batch_size, dtype=torch.int64,
                                                                device=device)))
        return stamp(self, StackState(layers=layers, out_lengths=torch.zeros(
            batch_size, dtype=torch.int64, device=device)))

    def _check_state(self, state):
        check_state(self, state, StackState)
        if len(state.layers) != len(self):
            raise ValueError(f"StreamingSequential: state has {len(state.layers)} layer states for "
                             f"{len(self)} children")

    def _child_name(self, i):
        return f"child {i} ({type(self[i]).__name__})"

    def _from(self, start, x, lengths, state, collect=None, who="step"):
        with marks_partial(state, f"{type(self).__name__}.{who}", self._child_name) as p:
            for i in range(start, len(self)):
                m, st = self[i], state.layers[i]
                p.at, p.part = i, st
                if is_streaming(m):
                    x, st = m.step(x, st, lengths)
                    state.layers[i] = st
                    lengths = st.out_lengths
                    p.took.append(i)
                else:
                    x = m(x)
                    st.out_lengths = lengths.clone()
                if collect is not None:
                    collect[i].append((x, lengths))
        return x, lengths

    @inference_step(when=holds_in_place_step)
    def step(self, x, state, lengths=None, outputs=None):
        self._check_state(state)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"x must be a 3-D tensor (B, C, n) or (B, n, C), as the first "
                             f"module takes it; got shape {tuple(x.shape)}")
        B = x.shape[0]
        check_step_slots(B, state.out_lengths.shape[0])
        n = x.shape[-1] if time_last(self) else x.shape[1]
        if lengths is not None:
            lengths = check_step_lengths(lengths, B, n, x.device)
        if outputs is None and not self._records_autograd(x, state) and \
                self._fixed_ok(n, state, lengths):
            # the steady state: step_fixed, the same step without the children's host reads
            # (one here, none while the stream stays steady), on fresh counters
            with threads_for(float("inf"), x.device):
                fresh_counters(state)
                y = self.step_fixed(x, state)
            record_steady(state, self.steady_check(n, state))
            return y, state
        if lengths is None:
            lengths = check_step_lengths(None, B, n, x.device)
        # one scoped CPU thread count for the step (pyencoder._cpu_threads: busy machine -> fewer)
        collect = None if outputs is None else [[] for _ in self]
        with threads_for(float("inf"), x.device):
            y, lengths = self._from(0, x, lengths, state, collect)
        if collect is not None:
            outputs.extend(c[0][0] for c in collect)
        state.out_lengths = lengths
        return y, state

    def steady_check(self, n, state):
        """pyencoder.streaming.state.SteadyCheck of a general step of n frames in every slot: the
        children's, in turn (each child's n_out is the next one's n); None if a streaming child
        has none (its step is never a fixed one here)."""
        checks = []
        for m, st in zip(self, state.layers):
            c = steady_check(m, n, st)
            if c is None or (is_streaming(m) and not hasattr(m, "step_fixed")):
                return None
            checks.append(c)
            n = c.n_out
        return all_steady(checks, n)

    def _refuse_unfixable(self, n, state):
        """step_fixed(check=True) of n frames whose steady_check is None: the first child that
        declares its conditions (or streams without a step_fixed) and cannot take its share as
        a fixed step is named before any child runs; a child declaring nothing decides itself."""
        for i, (m, st) in enumerate(zip(self, state.layers)):
            c = steady_check(m, n, st)
            if c is not None:
                n = c.n_out
                continue
            if is_streaming(m) and not hasattr(m, "step_fixed"):
                raise TypeError(f"{type(self).__name__}.step_fixed: child {i} "
                                f"({type(m).__name__}) has no step_fixed")
            if getattr(m, "steady_check", None) is not None and _declared(type(m)):
                raise ValueError(f"{type(self).__name__}.step_fixed(check=True): child {i} "
                                 f"({type(m).__name__}) cannot take a step of {n} frames as a "
                                 f"fixed one (not whole strides / mask blocks / chunks, more "
                                 f"than init_state's max_chunk, or unbounded context); run the "
                                 f"general step")
            return

    def _records_autograd(self, x, state):
        """Grad mode on and x, a parameter or a tensor of the state (a history that earlier
        differentiable steps wrote) requires grad: the general step then runs as is (step_fixed
        writes the state in place, which tensors autograd saved must not see: a stack of strided
        convs is differentiable through its general steps)."""
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or any(p.requires_grad for p in self.parameters()) or any(
            t.requires_grad for t in state.tensors().values())

    def _fixed_ok(self, n, state, lengths=None):
        """Whether this general step of n frames per slot may run as ``step_fixed``: every child
        declares a ``steady_check`` that holds (conv: n a multiple of its stride, every slot at a
        multiple of it; attention / TransformerLayer: steady, whole mask blocks; per-frame
        children always). One host read where the children's general steps read the device a
        few times each, none while the counters it reads are untouched since the last
        dispatched step (pyencoder.streaming.state.steady_dispatch)."""
        return steady_dispatch(state, self.steady_check(n, state), lengths, n)

    @inference_step(when=holds_in_place_step)
    def step_fixed(self, x, state, check=False):
        """CUDA-graph friendly steady-state step: every child's ``step_fixed`` (preconditions:
        CausalConv1d.step_fixed and BandedSelfAttention / ChunkedSelfAttention /
        WavLMSelfAttention.step_fixed);
        per-frame children as is. No host synchronisation; the state is updated in place.
        ``check=True`` reads every child's device condition before any child runs, and makes
        every child verify its preconditions (host synchronisations: call it once, outside graph
        capture). A child refusing after a streaming child before it took the chunk marks the
        state's streams inconsistent (``mark_broken``: refused by name until reset). The children's stream counters (attention ``pos``, conv
        ``seen``) advance together at the end (``batched_counters``: one kernel on CUDA, not one
        per child). ``state.out_lengths`` holds the frames of y. Returns y."""
        self._check_state(state)
        last = None
        t_last = time_last(self)
        if check:
            # every child's device condition before any child runs (a child refusing after the
            # ones before it had taken the chunk left them advanced: a caller who retried the
            # chunk with step() fed it twice, silently); a step no child declaring its
            # conditions can take as a fixed one is named first too
            n = x.shape[-1] if t_last else x.shape[1]
            steady = self.steady_check(n, state)
            if steady is None:
                self._refuse_unfixable(n, state)
            require_steady(type(self).__name__, steady)
        with marks_partial(state, f"{type(self).__name__}.step_fixed", self._child_name) as p, \
                batched_counters():
            for i, (m, st) in enumerate(zip(self, state.layers)):
                p.at = i
                per_frame = not hasattr(m, "step_fixed")
                if not per_frame:
                    x = m.step_fixed(x, st, check=True) if check else m.step_fixed(x, st)
                    last = st
                    p.took.append(i)
                elif is_streaming(m):
                    raise TypeError(f"{type(m).__name__} has no step_fixed")
                else:
                    x = m(x)
                t_last = _layout_after(m, t_last)
                if per_frame:
                    # the frames through here, as the general step counts them (once: a record)
                    fill_counter(st, x.shape[-1 if t_last else 1])
        fill_counter(state, x.shape[-1 if t_last else 1],
                     filled=None if last is None else last.out_lengths)
        return x

    @property
    def stream_time_axis(self):
        return -1 if self._input_time_last() else 1

    def _input_time_last(self):
        """The stack's input layout: the one its first child declaring a layout takes, through
        the Transposes before it (layout-neutral leading children, e.g. GELU, Dropout, take
        either); a stack of none: its first child's ``stream_time_axis`` (default (B, T, C))."""
        swapped = False
        for m in self:
            want = _wants_time_last(m)
            if want is not None:
                return want != swapped
            swapped ^= swaps_time_axis(m)
        return time_last(self[0])

    @ends_stream
    def flush(self, state, outputs=None):
        self._check_state(state)
        outs, counts = [], []
        collect = None if outputs is None else [[] for _ in self]
        for i, m in enumerate(self):
            if not is_streaming(m):
                continue
            y, st = m.flush(state.layers[i])
            state.layers[i] = st
            if y is None:                   # nothing held back (as run_stream takes it)
                continue
            if collect is not None:
                collect[i].append((y, st.out_lengths))
            y, lengths = self._from(i + 1, y, st.out_lengths, state, collect, who="flush")
            outs.append(y)
            counts.append(lengths)
        if collect is not None:
            t = time_last(self)
            for i, (m, c) in enumerate(zip(self, collect)):
                t = _layout_after(m, t)
                tmp = PassState(out_lengths=state.out_lengths.clone())
                outputs.append(cat_time([o for o, _ in c], [n for _, n in c], tmp,
                                        time_last=t)[0])
                state.layers[i].out_lengths = tmp.out_lengths
        return cat_time(outs, counts, state, time_last=self.out_time_last())

    def out_time_last(self):
        """True if the chain's outputs are time-last ((B, C, T))."""
        t = time_last(self)
        for m in self:
            t = _layout_after(m, t)
        return t


def cat_time(outs, counts, state, time_last):
    if not outs:
        state.out_lengths = torch.zeros_like(state.out_lengths)
        return None, state
    tdim = -1 if time_last else 1
    total = torch.stack(counts, 0).sum(0)
    B = total.shape[0]
    M = int(total.max()) if B else 0
    ref = outs[-1]
    shape = list(ref.shape)
    shape[tdim] = M
    # the dtype of the pieces that hold frames (an empty last piece's dtype can differ, e.g.
    # a module's empty output under autocast; it carried real frames into another dtype)
    full = [o.dtype for o in outs if o.shape[tdim]]
    y = ref.new_zeros(shape, dtype=functools.reduce(torch.promote_types, full)
                      if full else ref.dtype)
    for b in range(B):
        t = 0
        for o, c in zip(outs, counts):
            cb = int(c[b])
            if cb:
                src = o[b, ..., :cb] if time_last else o[b, :cb]
                if time_last:
                    y[b, ..., t:t + cb] = src
                else:
                    y[b, t:t + cb] = src
                t += cb
    state.out_lengths = total
    return y, state
