"""CudaGraphStep: a module's steady-state ``step_fixed`` captured once in a torch.cuda.CUDAGraph and
replayed per chunk (at batch 1 a streaming step is bound by its kernel launches; a replay
launches them all at once).

    y, state = model.step(first_chunk, state)      # general steps until the steady state
    step = CudaGraphStep(model, state, chunk)      # chunk: a tensor of the step's shape
    for chunk in audio:
        y = step(chunk)                            # == model.step_fixed(chunk, state)

A module whose step takes several inputs (``FrameCrossAttention.step_fixed(x_q, x_kv, state)``)
takes a tuple of examples, and each call the inputs in that order: ``step(video, audio)``;
``admit`` then takes a tuple per chunk.

What it does that a hand-written capture easily gets wrong: the warm-up before capture (Triton
compiles, cuBLAS workspaces: work that may not run inside a capture) runs on a copy of the state
on a side stream, so the stream itself is not advanced by the example chunk; the preconditions
are checked there once (``step_fixed(check=True)``, a host synchronisation, outside capture);
the per-state index tensors and counter records the warm-up built are built on the state itself
before capture (else the graph would recompute them at every replay); the input is copied into
the graph's static buffer at each call. Before the first call the state's ``out_lengths``
counters already read the step's frame count.

Contract (the graph reads and writes fixed memory):
  * the returned y is the graph's static output, overwritten by the next call: clone it to keep;
  * the state is advanced in place by each call; do not run ``step`` / ``flush`` /
    ``load_state_dict`` of a state that replaces its tensors on it afterwards (the graph would
    go on advancing the old ones): ``check()`` (or ``step(x, check=True)``) raises when any
    tensor of the state is no longer the one captured; build a new CudaGraphStep after such
    calls. A new stream takes a slot with ``admit(slot, first_chunks)``
    (pyencoder.streaming.admit: its warm-up runs on a private state, then is copied into the
    slot in place; the graph runs on). ``reset(state, mask)`` alone zeroes slots in place, but a
    reset slot is a fresh stream, which is not in the steady state step_fixed assumes (its
    outputs would not be the offline ones);
  * parameters are read from their memory at each replay: in-place edits are seen, ``.to()`` or
    replacing a parameter is not (capture again);
  * autograd is off inside (``torch.no_grad``).
"""
import copy

import torch

from .admit import admit
from .protocol import time_last
from .state import StreamState, ended_message, mirror_step_caches

__all__ = ["CudaGraphStep"]


def _fingerprint(state):
    return tuple(map(id, state.tensors().values()))


class CudaGraphStep:
    """``module.step_fixed(x, state)`` captured in a CUDA graph for inputs shaped like
    ``example`` (module docstring; a tuple of tensors for ``step_fixed(*xs, state)``). ``warmup``: step_fixed calls on a copy of the state before
    capture (>= 1; the first with ``check=True``). ``pool``: a graph memory pool to share
    (``torch.cuda.graph_pool_handle()``), e.g. between the graphs of several batch sizes."""

    def __init__(self, module, state, example, *, warmup=2, pool=None):
        if not hasattr(module, "step_fixed"):
            raise TypeError(f"CudaGraphStep: {type(module).__name__} has no step_fixed")
        if not isinstance(state, StreamState):
            raise TypeError(f"CudaGraphStep: state must be a StreamState; got "
                            f"{type(state).__name__}")
        examples = tuple(example) if isinstance(example, (tuple, list)) else (example,)
        if not examples or not all(isinstance(e, torch.Tensor) for e in examples):
            raise TypeError(f"CudaGraphStep: example must be a torch.Tensor shaped like a step's "
                            f"input (or a tuple of them, one per input); got "
                            f"{type(example).__name__}")
        devices = {e.device for e in examples}
        if len(devices) > 1 or examples[0].device.type != "cuda":
            raise ValueError(f"CudaGraphStep: example must be a CUDA tensor (CUDA graphs), every "
                             f"input on one device; got {sorted(map(str, devices))}")
        example = examples[0]
        devs = {t.device for t in state.tensors().values()}
        if devs != {example.device}:
            raise ValueError(f"CudaGraphStep: the state's tensors must all be on the example's "
                             f"device {example.device}; got {sorted(map(str, devs))}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"CudaGraphStep: warmup must be an int >= 1; got {warmup!r}")
        self.module, self.state = module, state
        self.xs = tuple(e.detach().clone() for e in examples)
        self.x = self.xs[0]
        scratch = copy.deepcopy(state)
        cur = torch.cuda.current_stream(example.device)
        side = torch.cuda.Stream(example.device)
        side.wait_stream(cur)
        with torch.no_grad(), torch.cuda.stream(side):
            module.step_fixed(*self.xs, scratch, check=True)
            for _ in range(warmup - 1):
                module.step_fixed(*self.xs, scratch)
        cur.wait_stream(side)
        torch.cuda.synchronize(example.device)
        # the state-level caches the warm-up built on the copy (index tensors, counter fill
        # records), built on the state itself: the graph reads them instead of recomputing them
        # at every replay (~5 small kernels per attention layer)
        mirror_step_caches(scratch, state)
        del scratch
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph, pool=pool):
            self.y = module.step_fixed(*self.xs, state)
        self._captured = _fingerprint(state)

    def check(self):
        """Raise RuntimeError if a tensor of the state is not the one captured (a general step,
        flush or load_state_dict replaced it since): the graph would advance stale memory."""
        if _fingerprint(self.state) != self._captured:
            raise RuntimeError("CudaGraphStep: the state's tensors were replaced since capture "
                               "(a general step, flush or load_state_dict on it?); the graph "
                               "advances the captured ones: build a new CudaGraphStep")

    def admit(self, slot, chunks):
        """Start a new stream in slot ``slot``: its first ``chunks`` (batch-1 tensors) run
        through the general step on a private state until it is steady for this graph's steps,
        which is then copied into the slot in place (pyencoder.streaming.admit). Returns the
        warm-up's outputs (one batch-1 tensor per chunk, the frames emitted for it); the next
        call advances the new stream with the others. A step of several inputs takes a tuple
        per chunk (``FrameCrossAttention``: ``(video, audio)``, None where one stream brought
        nothing), and the new stream must share the batch's mask pattern (fed whole frames of
        both streams from its start; else RuntimeError, nothing written). A state made under
        autocast (``init_state(dtype=torch.bfloat16)``) is admitted under that autocast, as its
        general steps run (outside it the state is refused by name)."""
        n = len(self.xs)
        if n > 1 and (isinstance(chunks, torch.Tensor) or not all(
                isinstance(c, tuple) and len(c) == n for c in chunks)):
            raise ValueError(f"CudaGraphStep.admit: the captured step takes {n} inputs: chunks "
                             f"must be a list of {n}-tuples (one batch-1 tensor or None per "
                             f"input)")
        axis = -1 if time_last(self.module) else 1
        return admit(self.module, self.state, slot, chunks, self.x.shape[axis])

    def __call__(self, *xs, check=False):
        """Advance the stream by the chunk x (same shape, dtype and device as the example; one
        per input for a multi-input step): returns the static output (overwritten by the next
        call). ``check``: ``check()`` first (about 0.1 ms of host time for a 12-layer encoder's
        state)."""
        if len(xs) != len(self.xs):
            raise ValueError(f"CudaGraphStep: the captured step takes {len(self.xs)} input(s); "
                             f"got {len(xs)}")
        for i, (x, want) in enumerate(zip(xs, self.xs)):
            if not isinstance(x, torch.Tensor) or x.shape != want.shape or \
                    x.dtype != want.dtype or x.device != want.device:
                got = (f"{tuple(x.shape)} {x.dtype} on {x.device}"
                       if isinstance(x, torch.Tensor) else type(x).__name__)
                name = "x" if len(self.xs) == 1 else f"input {i}"
                raise ValueError(f"CudaGraphStep: {name} must be {tuple(want.shape)} "
                                 f"{want.dtype} on {want.device} (the captured step's input); "
                                 f"got {got}")
        if self.state.ended:       # a Python flag: no cost (a replay would go on past the flush)
            raise ValueError(ended_message("CudaGraphStep", self.state) +
                             " (and capture a new step)")
        if check:
            self.check()
        for x, buf in zip(xs, self.xs):
            buf.copy_(x)
        self.graph.replay()
        return self.y
