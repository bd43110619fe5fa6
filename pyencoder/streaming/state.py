"""Explicit streaming state (DESIGN.md, "Streaming").

A state is a dataclass whose fields are tensors with the batch (slot) dimension first, nested
states, or lists of nested states. ``state_dict()`` / ``load_state_dict()`` round-trip a stream
through ``torch.save`` and a fresh process. ``reset(mask)`` returns the masked slots to their
initial (all-zero) state, which is how a batched server recycles a slot for a new stream.

A state records what made it: ``init_state`` stamps it (and each nested state) with its module's
configuration string, ``config`` (class, mask, dims; the batch, dtype and buffer sizes are the
tensors' own). ``step`` / ``flush`` refuse a state of another type or configuration
(``check_state``), and ``state_dict()`` saves the strings beside the tensors (keys ending in
``__config__``) so ``load_state_dict`` refuses a stream saved from another configuration, another
batch size or dtype, with a message naming both.
"""
import contextlib
import dataclasses
import functools
import threading
from typing import Callable, NamedTuple, Optional, Tuple

import torch

from .._checks import MAX_POSITION, autocast_on, tensor_arg
from .._env import env_flag

__all__ = ["StreamState", "reset", "ends_stream", "state_nbytes", "check_state", "stamp",
           "stream_config",
           "check_init_args", "check_step_lengths", "check_step_slots", "check_step_input",
           "fixed_index", "fill_counter", "shift_queue", "advance_counter", "batched_counters",
           "SteadyCheck", "steady_check", "all_steady", "steady_dispatch", "record_steady",
           "fresh_counters"]

CONFIG_KEY = "__config__"
ENDED_KEY = "__ended__"
# dtypes a module records on its state as a plain attribute (the dtype of the frames its steps
# returned, or took in: what flush's output takes), saved as "__<name>__": "float32" entries so
# that a resumed stream flushes as the uninterrupted one would
RECORDED_DTYPES = ("out_dtype", "in_dtype")
# per-state caches kept in a state's __dict__ (with the "_filled_<counter>" records): rebuilt when
# missing, never copied (StreamState.__getstate__)
_CACHES = ("_steady_record", "_fixed_index", "_graph_pinned", "_cross_align")


class StateKeyError(KeyError, ValueError):
    """A state_dict whose keys are not this state's (another module's stream, a corrupt file):
    a KeyError like torch's, and a ValueError like every other bad-input error here."""


@dataclasses.dataclass
class StreamState:
    """Base of every stream state: a dataclass of tensors (and nested states) with
    ``state_dict()`` / ``load_state_dict()`` to checkpoint and resume a stream, ``reset(mask)`` to
    recycle slots, ``batch_size`` and ``nbytes()``."""

    config = None      # configuration string of the module that made it (set by ``stamp``)
    ended = False      # set by the module's flush: its streams ended (``ends_stream``)
    _growable = {}     # {field: dim} of buffers whose length may differ between two states
    # fields added after states were first saved: a saved stream without one loads, keeping the
    # fresh state's value (RunningNormState.out_lengths: only the last step's frame count)
    _added_fields = ()

    def __getstate__(self):
        """What a copy (copy.deepcopy, copy.copy, pickle) takes: the fields and what init_state
        recorded, not the per-state caches (``_CACHES``: the steady-dispatch record, the fixed
        step's indices, fill records). Those identify counters by (tensor, version), and a
        copied tensor's version restarts: a copy's record matched counters a reset() had
        rewritten since, and the general step ran as step_fixed on a stream that was not
        steady (wrong frames)."""
        return {k: v for k, v in self.__dict__.items()
                if k not in _CACHES and not k.startswith("_filled_")}

    def _shape_hint(self, name):
        """More words for load_state_dict's shape refusal of field ``name`` ('' for none)."""
        return ""

    def _may_lack(self):
        """The fields a saved stream may lack when it loads into this state (the fresh state's
        value stands in): ``_added_fields``, unless a state says where that would be wrong."""
        return type(self)._added_fields
    # (B,) counters a step_fixed advances in place (``fresh_counters`` copies them, with
    # ``out_lengths``, before a general step runs as step_fixed); the fields present are taken
    stream_counters = ("pos", "seen")

    def _items(self):
        for f in dataclasses.fields(self):
            yield f.name, getattr(self, f.name)

    def tensors(self, prefix=""):
        """Flat {dotted name: tensor} over this state and its nested states."""
        out = {}
        for name, v in self._items():
            key = prefix + name
            if isinstance(v, torch.Tensor):
                out[key] = v
            elif isinstance(v, StreamState):
                out.update(v.tensors(key + "."))
            elif isinstance(v, (list, tuple)):
                for i, s in enumerate(v):
                    if not isinstance(s, StreamState):
                        raise TypeError(f"{type(self).__name__}.{name}[{i}] must be a StreamState; "
                                        f"got {type(s).__name__}")
                    out.update(s.tensors(f"{key}.{i}."))
            elif v is not None:
                raise TypeError(f"{type(self).__name__}.{name} must be a tensor, a StreamState or "
                                f"a list of them; got {type(v).__name__}")
        return out

    def states(self, prefix=""):
        """Flat {dotted prefix: state} over this state and its nested states ("" is self)."""
        out = {prefix: self}
        for name, v in self._items():
            if isinstance(v, StreamState):
                out.update(v.states(f"{prefix}{name}."))
            elif isinstance(v, (list, tuple)):
                for i, st in enumerate(v):
                    if isinstance(st, StreamState):
                        out.update(st.states(f"{prefix}{name}.{i}."))
        return out

    def configs(self):
        """{dotted key ending in ``__config__``: configuration string} of the stamped states."""
        return {p + CONFIG_KEY: st.config for p, st in self.states().items()
                if st.config is not None}

    def state_dict(self):
        """{dotted name: tensor (detached clone)} plus the configuration strings (keys ending in
        ``__config__``), for a flushed stream ``__ended__`` flags, and the dtypes a module
        recorded for its flush (``__out_dtype__`` / ``__in_dtype__``: "float32", ...): pass to
        torch.save (``weights_only=True`` loads it)."""
        broken = [st.broken for st in self.states().values() if st.__dict__.get("broken")]
        if broken:
            raise ValueError(f"state_dict: this state's streams are inconsistent ({broken[0]}): "
                             f"nothing to resume; reset it or make a new one")
        out = {k: v.detach().clone() for k, v in self.tensors().items()}
        out.update(self.configs())
        out.update({p + ENDED_KEY: True for p, st in self.states().items() if st.ended})
        for p, st in self.states().items():
            for name in RECORDED_DTYPES:
                dt = st.__dict__.get(name)
                if isinstance(dt, torch.dtype):
                    out[f"{p}__{name}__"] = str(dt).replace("torch.", "")
        return out

    def load_state_dict(self, state_dict):
        """Load a copy of a ``state_dict()`` onto this state's devices (the dict stays the
        checkpoint it was: resume it as often as you like). It must come from a stream of the
        same configuration (the recorded strings), batch size and dtypes; buffers may differ in
        length only where one grows (the ring of unbounded attention, leftover audio). Counters
        must be non-negative. Nothing is changed when a check fails. Returns self."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict (from StreamState.state_dict()); got "
                            f"{type(state_dict).__name__}")
        check_inference_mode(self, "load_state_dict")
        mine = self.tensors()
        cfgs = self.configs()
        states = self.states()
        ended = {p + ENDED_KEY for p in states}      # optional: present for a flushed stream
        dkeys = {f"{p}__{n}__": (p, n) for p in states for n in RECORDED_DTYPES}   # optional
        added = {p + f for p, st in states.items() for f in st._may_lack()}
        missing = sorted((set(mine) | set(cfgs)) - set(state_dict) - added)
        extra = sorted(set(state_dict) - set(mine) - set(cfgs) - ended - set(dkeys))
        if missing or extra:
            raise StateKeyError(f"load_state_dict: state keys do not match; missing {missing}, "
                                f"unexpected {extra}")
        for key, want in cfgs.items():
            got = state_dict[key]
            if not isinstance(got, str) or got != want:
                raise ValueError(f"load_state_dict: {key} does not match: the saved stream was "
                                 f"made by {got!r}; this state belongs to {want!r}")
        for key in ended & set(state_dict):
            if state_dict[key] is not True:
                raise ValueError(f"load_state_dict: {key} must be True (a flushed stream); got "
                                 f"{state_dict[key]!r}")
        dtypes = {}
        for key in set(dkeys) & set(state_dict):
            v = state_dict[key]
            dt = getattr(torch, v, None) if isinstance(v, str) else None
            if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
                raise ValueError(f"load_state_dict: {key} must name a floating torch dtype (as "
                                 f"state_dict() writes it, e.g. 'float32'); got {v!r}")
            dtypes[dkeys[key]] = dt
        new = {}
        for key, cur in mine.items():
            if key not in state_dict:            # an added field the saved stream predates
                continue
            v = state_dict[key]
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"load_state_dict: {key} must be a torch.Tensor; got "
                                f"{type(v).__name__}")
            if v.dtype != cur.dtype:
                hint = (f": a {v.dtype} stream loads into a state of that dtype (the module "
                        f"in it, module.to({v.dtype}).init_state(...), or under autocast "
                        f"init_state(dtype={v.dtype}) where that is the autocast dtype or the "
                        f"module's), or cast the saved tensors" if v.dtype.is_floating_point and
                        cur.dtype.is_floating_point else "")
                raise ValueError(f"load_state_dict: {key} has dtype {v.dtype}; this state holds "
                                 f"{cur.dtype}{hint}")
            owner, name = key.rpartition(".")[0], key.rpartition(".")[2]
            st = states[owner + "." if owner else ""]
            grow = st._growable.get(name)
            same = v.dim() == cur.dim() and all(
                a == b or d == grow for d, (a, b) in enumerate(zip(v.shape, cur.shape)))
            if not same:
                # every state tensor is batch-first (reset masks dim 0): a batch that differs is
                # named as such (the hint about other dimensions would mislead)
                other_batch = v.dim() == cur.dim() and v.dim() and v.shape[0] != cur.shape[0] \
                    and v.shape[1:] == cur.shape[1:]
                raise ValueError(f"load_state_dict: {key} has shape {tuple(v.shape)}; this state "
                                 f"holds {tuple(cur.shape)} (batch size {self.batch_size})" + (
                                     f": the saved stream has batch size {v.shape[0]} (make "
                                     f"the state with init_state({v.shape[0]}))"
                                     if other_batch else st._shape_hint(name)))
            if not v.dtype.is_floating_point and v.numel() and int(v.min()) < 0:
                raise ValueError(f"load_state_dict: {key} must be >= 0; got min {int(v.min())}")
            if not v.dtype.is_floating_point and v.numel() and int(v.max()) > MAX_POSITION:
                # a stream that far would have failed on its way (the ops' position bound)
                raise ValueError(f"load_state_dict: {key} must be <= {MAX_POSITION} (2**52, the "
                                 f"largest stream position); got max {int(v.max())}")
            # a copy (as state_dict() gives one): the steps update a state in place, which
            # rewrote the caller's checkpoint (a second resume from it went 1.4 off offline)
            new[key] = v.to(device=cur.device, copy=True)
        old = {k: mine[k] for k in new}
        for key, v in new.items():
            self._set(key.split("."), v)
        for p, st in states.items():
            err = st._invalid()
            if err is not None:
                for key, v in old.items():
                    self._set(key.split("."), v)
                raise ValueError(f"load_state_dict: {p or 'state'} is corrupt: {err}")
        for p, st in states.items():        # the saved stream's: ended where it had been flushed
            st.__dict__.pop("broken", None)
            if p + ENDED_KEY in state_dict:
                st.ended = True
            else:
                st.__dict__.pop("ended", None)
            for name in RECORDED_DTYPES:        # and its recorded dtypes (none saved: the
                if (p, name) in dtypes:         # state's own stands, e.g. a fresh one's)
                    st.__dict__[name] = dtypes[(p, name)]
        return self

    def _invalid(self):
        """None, or why this state's tensors are inconsistent with each other (subclasses)."""
        return None

    def _set(self, path, value):
        obj = self
        for p in path[:-1]:
            obj = obj[int(p)] if isinstance(obj, (list, tuple)) else getattr(obj, p)
        setattr(obj, path[-1], value)

    @property
    def batch_size(self):
        for v in self.tensors().values():
            return v.shape[0]
        return 0

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def reset(self, mask):
        """Zero this state's tensors at the slots where ``mask`` (B,) bool is True (in place) and
        reset its nested states through their own ``reset`` (a state whose fresh stream is not
        all zeros overrides it; a stack's reset used to zero its tensors behind its back). A
        flushed state (``ended``) must be reset in every slot: it starts fresh streams then."""
        mask = _check_reset_mask(mask, self.batch_size or None)   # (None: a state of no tensor)
        check_inference_mode(self, "reset")
        if any(st.ended for st in self.states().values()) and not bool(mask.all()):
            broken = [st.broken for st in self.states().values() if st.__dict__.get("broken")]
            raise ValueError(f"this state's streams are inconsistent ({broken[0]}); reset all "
                             f"of its slots (or make a new state with init_state)" if broken
                             else "this state was flushed: every slot's stream ended; reset all "
                             "of its slots (or make a new state with init_state)")
        for _, v in self._items():
            if isinstance(v, torch.Tensor):
                if mask.device != v.device:     # once per device: the nested resets get it
                    mask = mask.to(v.device)
                v.masked_fill_(mask.view(-1, *([1] * (v.dim() - 1))), 0)
            elif isinstance(v, StreamState):
                v.reset(mask)
            elif isinstance(v, (list, tuple)):
                for st in v:
                    st.reset(mask)
        # back to the class default (False) rather than an instance False: a compiled step
        # guards on the attribute's absence, so an instance entry cost a recompile per reset
        self.__dict__.pop("ended", None)
        self.__dict__.pop("broken", None)
        return self


def reset(state, mask):
    """Recycle the slots of ``state`` where ``mask`` (B,) is True: they restart a fresh stream at
    position 0. Returns the state (modified in place)."""
    if not isinstance(state, StreamState):
        raise TypeError(f"state must be a StreamState; got {type(state).__name__}")
    return state.reset(mask)


def _check_reset_mask(mask, B):
    """reset's ``mask``: a (B,) bool tensor (or a list of B bools; B None: any length). A (1,)
    mask or a bare bool broadcast over the batch and reset every slot."""
    mask = tensor_arg("mask", mask, f"a bool tensor of shape ({'B' if B is None else B},) "
                      f"(True: reset that slot)")
    if mask.dtype != torch.bool or mask.dim() != 1 or (B is not None and mask.shape[0] != B):
        raise ValueError(f"mask must be a bool tensor of shape ({'B' if B is None else B},); "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    if mask.is_meta:
        raise ValueError("mask must hold values (on the CPU or the state's device); got a meta "
                         "tensor")
    return mask


def state_nbytes(state):
    """Bytes held by the tensors of a stream state (nested states included)."""
    if not isinstance(state, StreamState):
        raise TypeError(f"state must be a StreamState; got {type(state).__name__}")
    return state.nbytes()


def stream_config(module):
    """The configuration string that ``module``'s states record: ``module._stream_config()``
    where defined, else its class name and ``extra_repr()``. Built once per module (a module's
    mask and dims are fixed at construction) and kept in its ``__dict__``, so the check a step
    makes is an identity comparison."""
    cached = module.__dict__.get("_stream_config_str")
    if cached is not None:
        return cached
    own = getattr(module, "_stream_config", None)
    cfg = own() if own is not None else f"{type(module).__name__}({module.extra_repr()})"
    module.__dict__["_stream_config_str"] = cfg
    return cfg


def stamp(module, state):
    """Record ``module``'s configuration in ``state`` (made by its init_state), and the dtype of
    its parameters then (``weights_dtype``: a module converted afterwards refuses the state).
    Returns state."""
    state.config = stream_config(module)
    p = _weights(module)
    state.weights_dtype = None if p is None else p.dtype
    if p is not None and autocast_on(p.device.type):
        # a state holding the autocast dtype (init_state(dtype=...) under autocast): its steps
        # must run under that autocast (recorded only then: nothing to read otherwise)
        held = torch.get_autocast_dtype(p.device.type)
        if held != p.dtype and any(t.dtype == held for t in state.tensors().values()):
            state.autocast_dtype = held
            state.autocast_device = p.device.type
    if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
        state.inference_made = True
    return state


def check_inference_mode(state, who):
    """A state made under torch.inference_mode holds inference tensors: outside that mode a step,
    reset or load cannot update them in place (torch's message named no state). Raise a
    RuntimeError saying what to do; a flag read and one C call per check. A copy made outside
    the mode (copy.deepcopy, load_state_dict into a new state) holds normal tensors: the flag is
    dropped there."""
    # (not while dynamo traces: it cannot trace the mode query, and a compiled step of such a
    # state made and run under inference_mode is the serving pattern)
    if state.__dict__.get("inference_made") and not torch.compiler.is_compiling() and \
            not torch.is_inference_mode_enabled():
        if not any(t.is_inference() for t in state.tensors().values()):
            del state.__dict__["inference_made"]
            return
        raise RuntimeError(
            f"{who}: this state was made under torch.inference_mode() (its tensors are inference "
            f"tensors, which cannot be updated in place outside that mode): step, reset and load "
            f"it under torch.inference_mode(), or make it with init_state outside it (then "
            f"torch.no_grad() steps it)")


def _weights(module):
    """``module``'s first floating parameter (None without one): the dtype its streams run in.
    Its path (submodule names, parameter name) is found once and kept in the module's
    ``__dict__``; the path is followed afresh at every call (a replaced submodule, or a
    parameter replaced by load_state_dict(assign=True) or a conversion, is the one read)."""
    path = module.__dict__.get("_weights_path")
    if path is not None:
        m = module
        for name in path[:-1]:
            m = m._modules.get(name)
            if m is None:
                break
        else:
            p = m._parameters.get(path[-1])
            if p is not None and p.is_floating_point():
                return p
    for prefix, m in module.named_modules(remove_duplicate=True):
        for name, p in m._parameters.items():
            if p is not None and p.is_floating_point():
                module.__dict__["_weights_path"] = \
                    tuple(prefix.split(".")) + (name,) if prefix else (name,)
                return p
    return None


def ends_stream(flush):
    """Decorator of a module's ``flush(state, ...)``: the state's streams end there (``ended``),
    so a later step, step_fixed or flush refuses it (check_state) until every slot is reset. A
    step after flush used to continue the old streams at their positions: its frames matched no
    offline call (the flushed frames had been emitted without their lookahead)."""
    @functools.wraps(flush)
    def wrapper(self, state, *args, **kwargs):
        out = flush(self, state, *args, **kwargs)
        if isinstance(state, StreamState):
            state.ended = True
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], StreamState):
            out[1].ended = True
        return out
    return wrapper


def require_steady(who, steady):
    """check=True of a step_fixed made of parts: every part's device condition (``steady``, the
    module's SteadyCheck of this step, or None) read once before any part runs, where a part
    refusing after the ones before it had taken the chunk left them advanced. Raises unless
    every slot is steady."""
    ok = None if steady is None else steady.ok()
    if ok is not None and not bool(ok.all()):
        raise ValueError(f"{who}.step_fixed(check=True) needs every slot in its steady state for "
                         f"this step; slots {ok.logical_not().nonzero().flatten().tolist()} are "
                         f"not (run the general step until they are)")


def mark_broken(state, why):
    """A step that failed after changing part of ``state``: its streams are inconsistent (a
    retried chunk would enter some children twice). Marked ended, with ``why``: every later
    step / flush / state_dict refuses it by name until every slot is reset. Not while a CUDA
    graph is captured (capture records kernels: the state's tensors have not changed)."""
    if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        return
    state.ended = True
    state.broken = why


class marks_partial:
    """``with marks_partial(state, who, name) as p:`` around a step made of parts: each part
    that took the chunk is appended to ``p.took`` (``p.at``: the part running; ``name(part)``
    words either, for the message only: nothing is formatted on the way); an exception after a
    part took the chunk marks the state's streams inconsistent (``mark_broken``), where a retried
    chunk would enter those parts twice. A refusal before any part took the chunk (a bad input)
    leaves the state as it was. ``p.part``: the running part's state, whose own mark (a split
    inside it) marks this state too (with ``who`` None: its words as they are)."""
    __slots__ = ("state", "who", "name", "took", "at", "part")

    def __init__(self, state, who, name=str):
        self.state, self.who, self.name, self.took, self.at = state, who, name, [], None
        self.part = None        # the running part's state: marked by the part itself (a split)

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is None:
            return False
        at = "" if self.at is None else f" at {self.name(self.at)}"
        if self.took:
            mark_broken(self.state, f"{self.who} failed{at} after "
                                    f"{', '.join(map(self.name, self.took))} had taken the chunk")
        elif self.part is not None and self.part.__dict__.get("broken"):
            # who None: a wrapper of one part (the decoder's stack) carries its mark as is
            mark_broken(self.state, self.part.broken if self.who is None else
                        f"{self.who} failed{at}: {self.part.broken}")
        return False


def ended_message(who, state):
    """Why a state whose ``ended`` flag is set refuses a step: flushed, or inconsistent."""
    why = state.__dict__.get("broken")
    if why:
        return (f"{who}: this state's streams are inconsistent ({why}); start new streams with "
                f"pyencoder.streaming.reset(state, all slots) or init_state")
    return (f"{who}: this state was flushed (its streams ended, the held-back frames were "
            f"emitted without their lookahead); start new streams with "
            f"pyencoder.streaming.reset(state, all slots) or init_state")


def check_state(module, state, cls, config=None):
    """Raise unless ``state`` is a ``cls`` made by a module of ``module``'s configuration and its
    streams have not ended (``ends_stream``)."""
    who = type(module).__name__
    if not isinstance(state, cls):
        raise TypeError(f"{who}: state must be a {cls.__name__} made by {who}.init_state; got "
                        f"{type(state).__name__}")
    if state.ended:
        raise ValueError(ended_message(who, state))
    check_inference_mode(state, who)
    want = stream_config(module) if config is None else config
    if state.config is None:
        raise ValueError(f"{who}: this {type(state).__name__} records no configuration (it was "
                         f"not made by init_state); this module is {want!r}")
    if state.config is not want and state.config != want:
        raise ValueError(f"{who}: state was made by {state.config!r}, not by this module "
                         f"({want!r}); build it with this module's init_state")
    made = state.__dict__.get("weights_dtype")
    if made is not None:
        p = _weights(module)
        if p is not None and p.dtype != made:
            raise ValueError(f"{who}: this state was made when the module's parameters were "
                             f"{made}; they are {p.dtype} now (the module was converted after "
                             f"init_state): make a new state with init_state")
    held = state.__dict__.get("autocast_dtype")
    if held is not None and not torch.compiler.is_compiling():
        dev = state.autocast_device
        if not autocast_on(dev) or torch.get_autocast_dtype(dev) != held:
            raise ValueError(f"{who}: this state holds {held} activations (made under autocast "
                             f"with init_state(dtype={held})); the module's parameters are "
                             f"{made}: step it under torch.autocast({dev!r}, dtype={held}), or "
                             f"make a state of the parameters' dtype")


def check_init_args(batch_size, dtype=None, device=None, module=None):
    """init_state arguments: batch_size an int >= 1 (not bool), dtype None or floating, device
    None or what torch.device accepts (a str, int or torch.device). With ``module``: a given dtype
    and device must be those of its (first floating) parameter: a stream runs in the weights'
    dtype on their device, so a state of another one would fail at the first step (or mix
    dtypes silently). The meta device is taken: a state sized without memory, never stepped."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be an int >= 1; got {type(batch_size).__name__} "
                        f"{batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be None or a floating torch.dtype; got {dtype!r}")
    if device is not None and not isinstance(device, torch.device):
        if isinstance(device, bool) or not isinstance(device, (str, int)):
            raise TypeError(f"device must be None, a str, an int or a torch.device; got "
                            f"{type(device).__name__} {device!r}")
        try:
            torch.device(device)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"device must name a torch device (e.g. 'cpu', 'cuda:0'); got "
                             f"{device!r}") from e
    if module is not None:
        _check_state_matches_module(module, dtype, device)


def _check_state_matches_module(module, dtype, device):
    p = _weights(module)
    if p is None:
        return
    who = type(module).__name__
    d = None if device is None else torch.device(device)
    dev_type = p.device.type if d is None else d.type
    if dev_type == "meta":          # a state sized without memory (any dtype; a meta module's too)
        return
    # under autocast the activations a state holds are in the autocast dtype: a state of it
    # (half the memory) is what the stream computes in
    autocast = autocast_on(dev_type) and \
        dtype == torch.get_autocast_dtype(dev_type)
    if dtype is not None and dtype != p.dtype and not autocast:
        raise TypeError(f"{who}.init_state: dtype ({dtype}) must be the module's parameter dtype "
                        f"({p.dtype}) or, under autocast, its dtype: a stream runs in its "
                        f"weights' dtype; convert the module first (module.to({dtype})) or leave "
                        f"dtype=None")
    if d is not None:
        if d.type != p.device.type or (d.index is not None and p.device.index is not None
                                       and d.index != p.device.index):
            raise ValueError(f"{who}.init_state: device ({d}) must be the module's parameter "
                             f"device ({p.device}); move the module first (module.to('{d}')) "
                             f"or leave device=None")


def check_step_slots(B, slots, name="x"):
    """A step's input of batch ``B`` against a state of ``slots`` slots."""
    if B != slots:
        raise ValueError(f"{name} has batch {B} but the state holds {slots} slots")


def check_step_input(x, axis, size, slots, device=None):
    """A step's input ``x``: a floating tensor, 3-d with ``size`` features on ``axis`` (1:
    (B, size, n); -1: (B, n, size)), a batch of ``slots`` (the state's) and, when given, on
    ``device`` (the state's)."""
    layout = f"(B, {size}, n)" if axis == 1 else f"(B, n, {size})"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape {layout}; got {type(x).__name__}")
    if x.dim() != 3 or x.shape[axis] != size:
        raise ValueError(f"x must have shape {layout}; got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must have a floating dtype; got {x.dtype}")
    check_step_slots(x.shape[0], slots)
    if device is not None and x.device != device:
        raise ValueError(f"x must be on the state's device ({device}); got {x.device}")


def check_step_lengths(lengths, B, n, device, name="lengths"):
    """``lengths`` of a step with n frames (or samples) per slot: None (all n), or B integers in
    [0, n] (an integer tensor, or a list / tuple of ints). Returns a (B,) int64 tensor."""
    if lengths is None:
        return torch.full((B,), n, dtype=torch.int64, device=device)
    if isinstance(lengths, torch.Tensor):
        t = lengths
    elif isinstance(lengths, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in lengths):
        t = torch.tensor(list(lengths), dtype=torch.int64).reshape(len(lengths))
    else:
        raise TypeError(f"{name} must be None, an integer tensor or a list of ints; got "
                        f"{type(lengths).__name__} {lengths!r}")
    if t.dtype.is_floating_point or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype; got {t.dtype}")
    if tuple(t.shape) != (B,):
        raise ValueError(f"{name} must have shape ({B},) (one length per slot); got "
                         f"{tuple(t.shape)}")
    t = t.to(device=device, dtype=torch.int64)
    if B and not torch.compiler.is_compiling():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi > n:
            raise ValueError(f"{name} must lie in [0, {n}] (the input's length on its time "
                             f"axis); got {t.tolist()}")
    return t


class _FixedIndex:
    """Index tensors of a steady-state step of n frames (``fixed_index``): key, name (the
    counter's field), ar, bidx, qidx, qoff, count_n."""


def _stamp(t):
    """What identifies the contents of counter ``t`` across steps without reading it: the tensor
    itself and its version counter (in-place writes, reset(), load_state_dict's new tensors are
    all seen). None where no version exists (inference tensors, torch.compile / jit tracing):
    then nothing is cached."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or t.is_inference():
        return None
    return t._version


def _capturing(device):
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def fixed_index(state, name, n, device):
    """Index tensors of ``step_fixed`` for n frames, built from the (B,) counter
    ``getattr(state, name)`` (the held-back count, which the steady-state step never changes):
    ``ar`` arange(n), ``bidx`` (B, n) slot index, ``qidx`` = count + ar (where the new frames
    are queued), ``qoff`` = ar - count - n (query positions relative to the advanced pos) and
    ``count_n`` (B,) int64 filled with n (the decode's row count: private, so a reset() of the
    state's own counters cannot change it under a graph).
    Kept on the state (not a dataclass field: not saved) and rebuilt whenever the counter is
    another tensor or was written in place. CUDA graphs: tensors built before capture are the
    ones the graph reads (nothing per step recomputed); they are kept alive as long as the state
    once a graph used them (never freed under a graph); during capture a missing entry is built
    in the graph (recomputed at each replay) and not cached, since capture does not run it."""
    cnt = getattr(state, name)
    ver = _stamp(cnt)
    cache = state.__dict__.setdefault("_fixed_index", {})
    hit = cache.get((name, n))
    capturing = _capturing(device)
    if ver is not None and hit is not None and hit.key[0] is cnt and hit.key[1] == ver \
            and hit.ar.device == device:
        idx = hit
    else:
        B = cnt.shape[0]
        c = cnt.to(torch.int64)
        idx = _FixedIndex()
        idx.ar = torch.arange(n, device=device)
        idx.bidx = torch.arange(B, device=device)[:, None].expand(B, n)
        idx.qidx = c[:, None] + idx.ar[None, :]
        idx.qoff = idx.ar[None, :] - (c + n)[:, None]
        idx.count_n = torch.full((B,), n, dtype=torch.int64, device=device)
        idx.key = (cnt, ver)
        idx.name = name
        if ver is not None and not capturing:
            cache[(name, n)] = idx
    if capturing:
        pinned = state.__dict__.setdefault("_graph_pinned", [])
        if not any(p is idx for p in pinned):
            pinned.append(idx)
    return idx


def mirror_step_caches(src, dst):
    """Build on ``dst`` (eagerly) the per-state caches a ``step_fixed`` made on ``src``, a copy
    of it (``copy.deepcopy``) advanced by step_fixed: the ``fixed_index`` entries and the
    ``fill_counter`` records (filling dst's counters with the same counts, which steady-state
    counters already hold). A CUDA graph captured on dst afterwards then reads them instead of
    recomputing them at every replay (pyencoder.streaming.CudaGraphStep warms up on a copy so the
    stream itself is not advanced). The two must have the same structure."""
    dst_states = dst.states()
    for prefix, s in src.states().items():
        d = dst_states.get(prefix)
        if d is None or type(d) is not type(s):
            raise ValueError(f"mirror_step_caches: the states differ at {prefix!r}")
        for key, val in list(s.__dict__.items()):
            if key.startswith("_filled_"):
                fill_counter(d, val[1], key[len("_filled_"):])
        for (name, n), idx in list(s.__dict__.get("_fixed_index", {}).items()):
            fixed_index(d, name, n, idx.ar.device)


def fill_counter(state, n, name="out_lengths", filled=None):
    """``getattr(state, name).fill_(n)``, skipped when this counter already holds n from an
    earlier (executed) fill here and was not written since (same tensor, same version: see
    ``_stamp``). A graph captured after that has no fill: the counter keeps n across replays,
    except after an in-place reset() of the state (then it reads 0 until an eager step; the
    step's results do not depend on it). ``filled``: a counter a child's step_fixed has just
    filled with n; skipped when this counter is that tensor (a general step leaves a
    container's out_lengths aliased to its last child's; filling both would write it twice per
    step, each fill invalidating the other's record). Returns the counter."""
    t = getattr(state, name)
    if filled is not None and t is filled:
        return t
    ver = _stamp(t)
    key = "_filled_" + name
    last = state.__dict__.get(key)
    if ver is None or last is None or last[0] is not t or last[1] != n or last[2] != ver:
        t.fill_(n)
        if _capturing(t.device):
            state.__dict__.pop(key, None)    # recorded, not run: fill again when eager
        else:
            state.__dict__[key] = (t, n, _stamp(t))
    return t


def shift_queue(buf, n, keep, dim):
    """buf[..., :keep] = buf[..., n:n + keep] along ``dim`` (in place): one copy when the two
    ranges do not overlap (n >= keep), through a temporary otherwise."""
    src = buf.narrow(dim, n, keep)
    buf.narrow(dim, 0, keep).copy_(src if n >= keep else src.clone())


_queued_adds = threading.local()


def advance_counter(t, n):
    """``t.add_(n)`` for a (B,) stream counter (``pos``, ``seen``) in a ``step_fixed``. Inside
    ``batched_counters()`` the add is queued and runs at the scope's exit together with every
    other queued one: on CUDA one multi-tensor kernel for all counters of a stack's step, where
    each module's add_ is a kernel of its own (19 of a 12-layer encoder's step). A module that
    queues its counter must not read it later in the same step (the attention's decode reads
    the advanced count from the ring write instead)."""
    adds = getattr(_queued_adds, "adds", None)
    if adds is None or torch.compiler.is_compiling():
        t.add_(n)
    else:
        adds.append((t, n))


@contextlib.contextmanager
def batched_counters():
    """Queue the ``advance_counter`` adds of the enclosed steps and apply them at exit (also when
    the steps raise: the modules that ran have advanced, as without the scope). Nested scopes
    join the outermost. Not under torch.compile tracing (there every add runs where it is
    made)."""
    if getattr(_queued_adds, "adds", None) is not None or torch.compiler.is_compiling():
        yield
        return
    _queued_adds.adds = []
    try:
        yield
    finally:
        adds, _queued_adds.adds = _queued_adds.adds, None
        _apply_adds(adds)


def _apply_adds(adds):
    # one foreach add per (device, dtype): CUDA's fast route needs one device and dtype, and it
    # runs every tensor of the list in parallel, so a tensor queued twice is summed first and
    # counters that share memory (never the case for module states, but a caller could alias
    # them) are added one by one
    merged = {}
    for t, n in adds:
        key = id(t)
        merged[key] = (t, merged[key][1] + n if key in merged else n)
    groups = {}
    for t, n in merged.values():
        groups.setdefault((t.device, t.dtype), []).append((t, n))
    for items in groups.values():
        ptrs = {t.untyped_storage().data_ptr() for t, _ in items}
        if len(items) == 1 or len(ptrs) < len(items):
            for t, n in items:
                t.add_(n)
        else:
            torch._foreach_add_([t for t, _ in items], [n for _, n in items])


# ---- the general step as step_fixed in the steady state -------------------------------------

class SteadyCheck(NamedTuple):
    """What a streaming module's ``steady_check(n, state)`` returns when a general ``step`` of n
    frames in every slot may be the steady step its ``step_fixed`` computes (the same result):
    ``n_out`` frames per slot come out of it; ``ok()`` builds the device-side condition, a (B,)
    bool tensor on the state's device, or None where there is none; ``counters`` are the
    tensors ``ok`` reads. A fixed step keeps the stream steady, so while those counters are
    untouched (same tensors, same versions) the condition need not be read again
    (``steady_dispatch``). A module returns None where the step cannot be a fixed one whatever
    the state (n not a multiple of its stride or block, unbounded context, ...)."""
    n_out: int
    ok: Callable[[], Optional[torch.Tensor]]
    counters: Tuple[torch.Tensor, ...]


def _no_condition():
    return None


_DECLARED = {}


def _declared(cls):
    """Whether ``cls``'s ``step`` and ``step_fixed`` are those of the class that declares its
    ``steady_check`` (a subclass that overrides ``step`` alone must not be dispatched to the
    parent's step_fixed behind its back)."""
    hit = _DECLARED.get(cls)
    if hit is None:
        owner = next((c for c in cls.__mro__ if "steady_check" in c.__dict__), None)
        hit = _DECLARED[cls] = owner is not None and all(
            getattr(cls, a, None) is getattr(owner, a, None) for a in ("step", "step_fixed"))
    return hit


def steady_check(module, n, state):
    """``module.steady_check(n, state)`` where the module declares it (a streaming module with a
    ``step_fixed``) and its ``step`` / ``step_fixed`` are those the declaration was made with
    (not overridden by a subclass that left ``steady_check`` alone); per-frame modules pass n
    frames through unconditionally; any other streaming module: None (never dispatched)."""
    if getattr(module, "steady_check", None) is not None:
        return module.steady_check(n, state) if _declared(type(module)) else None
    if all(hasattr(module, a) for a in ("init_state", "step", "flush")):
        return None
    return SteadyCheck(n, _no_condition, ())


def all_steady(checks, n_out):
    """The SteadyCheck of a chain of modules whose checks are ``checks`` (None if one is None):
    every condition (one device tensor), every counter."""
    if any(c is None for c in checks):
        return None

    def ok():
        out = None
        for c in checks:
            t = c.ok()
            if t is not None:
                out = t if out is None else out & t.to(out.device)
        return out
    return SteadyCheck(n_out, ok, tuple(t for c in checks for t in c.counters))


def steady_dispatch(state, check, lengths, n):
    """Whether a general step of n frames per slot (``lengths``: None, or the (B,) int64 tensor
    of check_step_lengths) may run as step_fixed, given the module's ``check`` (SteadyCheck or
    None). One host read of the device-side condition; none while the counters it reads are
    those ``record_steady`` recorded after the last dispatched step (same tensors, same
    versions: reset(), load_state_dict, a general step and a step_fixed called directly all
    change them) and ``lengths`` is None. Never under torch.compile / jit tracing, nor with
    PYENCODER_STEADY_DISPATCH=0."""
    if check is None or n < 1 or torch.compiler.is_compiling() or torch.jit.is_tracing() \
            or not env_flag("PYENCODER_STEADY_DISPATCH", True):
        return False
    rec = state.__dict__.get("_steady_record")
    if lengths is None and rec is not None and len(rec) == len(check.counters) and all(
            t is r and _stamp(t) == v for t, (r, v) in zip(check.counters, rec)):
        return True
    if check.counters and _capturing(check.counters[0].device):
        raise RuntimeError(
            "a general step under CUDA graph capture: whether the stream is steady is not known "
            "without reading the device (an eager step of the same size just before capture "
            "records it); capture step_fixed instead (pyencoder.streaming.CudaGraphStep)")
    ok = check.ok()
    if lengths is not None:
        full = lengths == n
        ok = full if ok is None else ok & full.to(ok.device)
    return True if ok is None else bool(ok.all())


def record_steady(state, check):
    """After a dispatched step: record ``check``'s counters (the state's, as the step left them:
    call the module's steady_check again) so that the next steps skip the device read while
    they are untouched. Nothing is recorded where a counter has no version (inference tensors,
    tracing)."""
    rec = None if check is None else tuple((t, _stamp(t)) for t in check.counters)
    if rec is not None and any(v is None for _, v in rec):
        rec = None
    state.__dict__["_steady_record"] = rec


def fresh_counters(state):
    """Before a general step runs as ``step_fixed`` (which advances the stream counters and fills
    ``out_lengths`` in place): give every nested state copies of its ``stream_counters`` and
    ``out_lengths``, so that counters a caller kept from earlier steps (the general step replaces
    them, so callers treat them as values) do not change under it. One multi-tensor copy per
    (device, dtype) (``torch._foreach_add(ts, 0)``: one kernel on CUDA for all of them, where a
    clone each was a kernel each); a tensor shared by two states (a container's out_lengths
    aliased to its last child's, as a general step leaves it) stays shared, and a
    ``fill_counter`` record moves to the copy (it holds the same value), so the fixed step does
    not fill it again. Not under CUDA graph capture (a captured step advances the state's own
    counters at every replay; copies made in the graph would be refilled from the capture-time
    tensors at each replay)."""
    uses, olds = [], {}
    for st in state.states().values():
        for name in type(st).stream_counters + ("out_lengths",):
            t = getattr(st, name, None)
            if isinstance(t, torch.Tensor):
                olds.setdefault(id(t), t)
                uses.append((st, name, t))
    if not uses or _capturing(uses[0][2].device):
        return      # a graph replays the step in place: the counters are the graph's own
    groups = {}
    for t in olds.values():
        groups.setdefault((t.device, t.dtype), []).append(t)
    new = {}
    for ts in groups.values():
        new.update(zip(map(id, ts), torch._foreach_add(ts, 0)))
    for st, name, t in uses:
        nt = new[id(t)]
        setattr(st, name, nt)
        key = "_filled_" + name
        rec = st.__dict__.get(key)
        if rec is not None and rec[0] is t and rec[2] == _stamp(t):
            ver = _stamp(nt)
            if ver is None:
                st.__dict__.pop(key)
            else:
                st.__dict__[key] = (nt, rec[1], ver)


# ---- no backward through steps that update their state in place ------------------------------

class _NoStepBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, who):
        ctx.who = who
        # a copy, not a view: a caller may edit a step's output in place (zero the rows past
        # out_lengths), which autograd refuses on a custom Function's view
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(
            f"{ctx.who}: backward through a streaming step is not supported (a step updates its "
            f"state in place: the ring of keys and values, the queues of held-back frames, so "
            f"what autograd saved is overwritten by later steps). Train on the offline forward, "
            f"which equals the stream, and run steps under torch.no_grad() / "
            f"torch.inference_mode()")


def inference_step(fn=None, *, when=None):
    """Decorator of a module's ``step`` / ``step_fixed`` whose state updates in place make it
    non-differentiable (with ``when``: a container's, when ``when(module)`` says its stream runs
    through such a step, e.g. ``holds_in_place_step``). Where autograd records, the step runs
    without recording (autograd history kept in the state would chain every step to the last
    and grow without bound, for a backward that cannot run) and, when a parameter or an input
    requires grad, its output carries a node whose backward raises a RuntimeError that says so.
    Forward results are unchanged; no cost under torch.no_grad / inference_mode."""
    if fn is None:
        return functools.partial(inference_step, when=when)

    @functools.wraps(fn)
    def wrapped(self, *args, **kwargs):
        if not torch.is_grad_enabled():       # inference: the step itself, nothing more
            return fn(self, *args, **kwargs)
        if torch.compiler.is_compiling() or (when is not None and not when(self)):
            return fn(self, *args, **kwargs)
        given = (*args, *kwargs.values())
        wanted = any(isinstance(a, torch.Tensor) and a.requires_grad for a in given) or \
            any(p.requires_grad for p in self.parameters())
        # lists the step appends outputs to (StreamingSequential.step(outputs=[])): theirs too
        lists = [(a, len(a)) for a in given if isinstance(a, list)] if wanted else ()
        with torch.no_grad():
            out = fn(self, *args, **kwargs)
        if not wanted:
            return out
        who = f"{type(self).__name__}.{fn.__name__}"
        for a, n in lists:
            a[n:] = _refusing(a[n:], who)
        if isinstance(out, tuple):        # (y, state); y may hold hidden states
            return (_refusing(out[0], who),) + out[1:]
        return _refusing(out, who)
    wrapped.in_place = when is None
    return wrapped


def _refusing(y, who):
    """y's floating tensors (in nested tuples / lists too) as outputs whose backward raises
    _NoStepBackward's message (y was computed without recording)."""
    if isinstance(y, (tuple, list)):
        return type(y)(_refusing(t, who) for t in y)
    if isinstance(y, torch.Tensor) and (y.is_floating_point() or y.is_complex()):
        return _NoStepBackward.apply(y.detach().requires_grad_(), who)
    return y


def holds_in_place_step(module):
    """Whether ``module`` or a module below it steps in place (its ``step`` decorated with
    inference_step): a container's stream through it cannot be differentiated either."""
    return any(getattr(getattr(type(m), "step", None), "in_place", False)
               for m in module.modules())
