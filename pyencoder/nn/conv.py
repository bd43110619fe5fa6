"""CausalConv1d: a drop-in nn.Conv1d (same parameters and state_dict keys) computing the causal
convolution of pyencoder.ops.causal_conv1d, offline and streaming.

Offline: x (B, C_in, L) -> (B, C_out, L // stride); the input is left-padded by k - stride zeros, so
output frame t ends at input sample (t + 1) * stride - 1 (no lookahead).

Streaming: the state keeps the last k - 1 samples of the padded input and the number of samples
seen. A step concatenates them with the new samples, starts at the first sample of the next
unproduced frame (offset stride - 1 - seen % stride) and runs the op with that prefix as
``initial_state``; samples that do not complete a frame stay in the history (chunks of any length
>= 1, not only multiples of the stride). At stride 1 the step is pyencoder.ops.causal_conv1d_update
(state updated in place, the CUDA kernel where present). Slots whose lengths or phases differ are
run one by one; outputs are (B, C_out, m) with slot b's frames in the first
``state.out_lengths[b]`` columns and zeros after them. ``flush`` emits nothing: an incomplete last
frame is dropped, as offline.
"""
import dataclasses

import torch
from torch import nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .._checks import autocast_dtype, check_int, check_module_input
from ..ops.conv import causal_conv1d, causal_conv1d_update
from ..streaming import state as _state
from ..streaming.state import (StreamState, SteadyCheck, advance_counter, check_init_args,
                               check_state, check_step_lengths, check_step_slots, ends_stream,
                               fill_counter, inference_step, stamp)

__all__ = ["CausalConv1d", "ConvState", "StridedConv1d"]

_NORM_HOOKS = (WeightNorm, SpectralNorm)


@dataclasses.dataclass
class ConvState(StreamState):
    hist: torch.Tensor         # (B, C_in, k - 1) last padded-input samples
    seen: torch.Tensor         # (B,) int64 input samples seen
    out_lengths: torch.Tensor  # (B,) int64 frames emitted by the last step


def refresh_hooked_weight(module):
    """A hook-based weight norm / spectral norm (torch.nn.utils.weight_norm, spectral_norm) keeps
    ``weight`` as a plain attribute that its forward pre-hook recomputes from weight_g / weight_v
    on every ``__call__``; a streaming step is not a ``__call__``, so it read the weight of the
    last forward (or of the hook's registration): recomputed here. (A parametrisation,
    torch.nn.utils.parametrizations.weight_norm, recomputes on every read by itself.)"""
    hooks = module._forward_pre_hooks
    if hooks:
        for h in list(hooks.values()):
            if isinstance(h, _NORM_HOOKS):
                h(module, None)


class StridedConv1d(nn.Conv1d):
    """Base of the package's streamable convs on pyencoder.ops.causal_conv1d (CausalConv1d,
    pyencoder.models.frontend.FeatureConv1d): nn.Conv1d's parameters with validated sizes and an
    optional fused ``activation``, ``k`` / ``s`` / ``hop``, a state of ``state_type`` holding the
    last k - 1 samples, the samples seen and the frames emitted per slot, and the stacking of a
    ragged step's per-slot outputs."""
    state_type = None    # a StreamState dataclass (buffer (B, C_in, k - 1), seen, out_lengths)
    stream_time_axis = -1      # chunks (B, C, n): pyencoder.streaming.protocol

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1, bias=True,
                 activation=None, device=None, dtype=None, **conv_kwargs):
        for key, v in conv_kwargs.items():       # nn.Conv1d's other arguments, by name
            if key == "dilation" and v in (1, (1,)) or key == "padding_mode" and v == "zeros":
                continue                          # what this conv does anyway
            if key in ("padding", "dilation", "padding_mode"):
                raise ValueError(f"{type(self).__name__}: {key}={v!r} is not supported: it "
                                 f"fixes its own padding (CausalConv1d: k - stride zero samples "
                                 f"on the left) and has dilation 1")
            raise TypeError(f"{type(self).__name__}.__init__() got an unexpected keyword "
                            f"argument {key!r}")
        if activation not in (None, "silu", "gelu"):
            raise ValueError(f"activation must be None, 'silu' or 'gelu'; got {activation!r}")
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("groups", groups)):
            check_int(name, v, min_value=1)
        for name, v in (("kernel_size", kernel_size), ("stride", stride)):
            check_int(name, v[0] if isinstance(v, tuple) and len(v) == 1 else v, min_value=1)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups ({groups}) must divide in_channels ({in_channels}) and "
                             f"out_channels ({out_channels})")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool; got {type(bias).__name__} {bias!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0,
                         groups=groups, bias=bias, device=device, dtype=dtype)
        if self.kernel_size[0] < self.stride[0]:
            raise ValueError(f"kernel_size ({self.kernel_size[0]}) must be >= stride "
                             f"({self.stride[0]}) for a causal conv")
        self.activation = activation

    @property
    def hop(self):
        return self.stride[0]

    @property
    def k(self):
        return self.kernel_size[0]

    @property
    def s(self):
        return self.stride[0]

    def init_state(self, batch_size, *, device=None, dtype=None, **_):
        refresh_hooked_weight(self)
        check_init_args(batch_size, dtype, device, self)
        device = self.weight.device if device is None else torch.device(device)
        dtype = self.weight.dtype if dtype is None else dtype
        zi = lambda: torch.zeros(batch_size, dtype=torch.int64, device=device)  # noqa: E731
        return stamp(self, self.state_type(torch.zeros(batch_size, self.in_channels, self.k - 1,
                                                       device=device, dtype=dtype),
                                           zi(), zi()))

    def _window_starts(self, r):
        """Where in cat(history, x) the next window of a slot with ``seen % stride == r`` starts
        (r an int64 tensor); the subclass's layout of its history."""
        raise NotImplementedError

    def _phase_rows(self, L, device):
        """(stride, L) int64: row r holds the positions in cat(history, x) of the L samples a
        slot with ``seen % stride == r`` reads (``_window_starts``). Kept per (L, device); under
        CUDA graph capture a missing entry is built in the graph and not kept (capture does not
        run it)."""
        cache = self.__dict__.setdefault("_phase_cache", {})
        hit = cache.get((L, device))
        if hit is not None:
            return hit
        start = self._window_starts(torch.arange(self.s, device=device))
        rows = start[:, None] + torch.arange(L, device=device)[None, :]
        if not _state._capturing(device):
            cache[(L, device)] = rows
        return rows

    def _empty(self, like, B):
        """No frames: (B, C_out, 0) on ``like``'s device, in the dtype a conv over it computes in
        (under autocast the autocast dtype, as the frames of other steps)."""
        return like.new_zeros(B, self.out_channels, 0, dtype=autocast_dtype(like))

    def _gather_windows(self, cat, seen, L):
        """Each slot's L samples of cat (B, C, T) from its own window start, read on the device
        from its ``seen`` (no host synchronisation): (B, C, L)."""
        B, C = cat.shape[0], cat.shape[1]
        rows = self._phase_rows(L, cat.device)[torch.remainder(seen, self.s)]      # (B, L)
        return torch.gather(cat, 2, rows[:, None, :].expand(B, C, L))

    def _stack_slots(self, ys, like):
        """Per-slot outputs ys[b] (C_out, m_b) as one (B, C_out, max m_b) tensor on ``like``'s
        device in the dtype a conv over it computes in (``autocast_dtype``), zeros after slot b's
        m_b frames."""
        m = max(t.shape[-1] for t in ys)
        y = like.new_zeros(len(ys), self.out_channels, m, dtype=autocast_dtype(like))
        for b, yb in enumerate(ys):
            y[b, :, :yb.shape[-1]] = yb
        return y


class CausalConv1d(StridedConv1d):
    """Drop-in ``nn.Conv1d`` (same parameters and state_dict keys) computing the causal conv of
    ``pyencoder.ops.causal_conv1d`` (left padding k - stride, optional fused ``activation``), offline
    and streaming through ``init_state`` / ``step`` / ``flush`` (module docstring)."""
    state_type = ConvState
    lookahead = 0
    stream_time_axis = -1
    # step_fixed at stride > 1: False reads every slot's window at phase 0 (seen % stride == 0,
    # the steady state of a stream fed whole strides from its start: no extra kernel); True
    # reads each slot's own phase on the device (a gather: any phase, slots may differ), which
    # a strided conv after frames held back for lookahead needs. StreamingSequential sets it on
    # the strided convs after a child with lookahead.
    any_phase = False

    def extra_repr(self):
        return super().extra_repr() + f", causal=True, activation={self.activation}"

    def _window_starts(self, r):
        # the general step's offset: s - 1 - seen % s
        return self.s - 1 - r

    def forward(self, x):
        # self.weight is read once per call: where it is computed on access (a weight-norm
        # parametrisation, SharedCausalConv1d) each read recomputes it.
        w = self.weight
        check_module_input(x, 1, self.in_channels, f"(B, {self.in_channels}, L)", w)
        return causal_conv1d(x, w, self.bias, stride=self.s, groups=self.groups,
                             activation=self.activation)

    def _run(self, cat, off, w):
        k, s = self.k, self.s
        return causal_conv1d(cat[..., off + k - s:], w, self.bias, stride=s,
                             groups=self.groups, activation=self.activation,
                             initial_state=cat[..., off:off + k - s])

    def step(self, x, state, lengths=None):
        """Feed x (B, C_in, n); returns (y (B, C_out, m), state)."""
        refresh_hooked_weight(self)
        w = self.weight                      # read once per step (see forward)
        check_module_input(x, 1, self.in_channels, f"(B, {self.in_channels}, n)", w)
        B, C, n = x.shape
        check_state(self, state, ConvState)
        check_step_slots(B, state.seen.shape[0])
        k, s = self.k, self.s
        dev = x.device
        lengths = check_step_lengths(lengths, B, n, dev)
        x = x.to(state.hist.dtype)
        phase = torch.remainder(state.seen, s)
        uniform = B > 0 and bool((lengths == n).all()) and bool((phase == phase[0]).all())
        # where autograd records, the history is replaced, not updated in place (the update op
        # has no backward): the step stays differentiable, as the strided ones are
        records = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, w, self.bias, state.hist))
        if uniform and n == 0:
            y = self._empty(x, B)
        elif uniform and s == 1 and k > 1 and not records \
                and autocast_dtype(state.hist) == state.hist.dtype:
            # (under autocast, a history of another dtype: the cat path, which computes in the
            # autocast dtype as the offline forward does; the update computes in the state's)
            y = causal_conv1d_update(x, state.hist, w, self.bias, groups=self.groups,
                                     activation=self.activation)
        elif uniform:
            cat = torch.cat((state.hist, x), -1)
            y = self._run(cat, s - 1 - int(phase[0]), w)
            if k > 1:
                state.hist = cat[..., cat.shape[-1] - (k - 1):].contiguous()
        else:
            ys, hists = [], []
            for b in range(B):
                cat = torch.cat((state.hist[b:b + 1], x[b:b + 1, :, :int(lengths[b])]), -1)
                yb = self._run(cat, s - 1 - int(phase[b]), w)
                ys.append(yb[0])
                hists.append(cat[0, :, cat.shape[-1] - (k - 1):])
            y = self._stack_slots(ys, x)
            state.hist = torch.stack(hists, 0).contiguous()
        new_seen = state.seen + lengths
        state.out_lengths = torch.div(new_seen, s, rounding_mode="floor") - torch.div(
            state.seen, s, rounding_mode="floor")
        state.seen = new_seen
        return y, state

    def steady_check(self, n, state):
        """pyencoder.streaming.state.SteadyCheck of a general step of n samples in every slot: n
        a positive multiple of the stride, n // stride frames out; the device condition: every
        slot has seen a multiple of the stride (none at stride 1 or with ``any_phase``)."""
        s = self.s
        if n < 1 or n % s or state.seen.shape[0] == 0:
            return None
        if s == 1 or self.any_phase:
            return SteadyCheck(n // s, lambda: None, ())
        seen = state.seen
        return SteadyCheck(n // s, lambda: torch.remainder(seen, s) == 0, (seen,))

    @inference_step
    def step_fixed(self, x, state, check=False):
        """CUDA-graph friendly step: every slot gets the same n samples, n a multiple of the
        stride, and every slot has seen a multiple of the stride (``check=True`` verifies that,
        a host synchronisation), or, with ``any_phase``, any number (each slot's window read
        at its own phase on the device). State updated in place: for inference (a backward
        through it raises saying so; ``step`` is differentiable)."""
        k, s = self.k, self.s
        refresh_hooked_weight(self)
        check_module_input(x, 1, self.in_channels, f"(B, {self.in_channels}, n)", self.weight)
        check_state(self, state, ConvState)
        check_step_slots(x.shape[0], state.seen.shape[0])
        if x.shape[-1] % s:
            raise ValueError(f"CausalConv1d.step_fixed: the step length x.shape[-1] must be a "
                             f"multiple of the stride {s}; got {x.shape[-1]}")
        phased = s > 1 and self.any_phase
        if check and not phased and bool((torch.remainder(state.seen, s) != 0).any()):
            raise ValueError(f"CausalConv1d.step_fixed needs every slot to have seen a multiple "
                             f"of the stride {s} samples; got seen={state.seen.tolist()} (a "
                             f"strided conv after frames held back for lookahead: set "
                             f"any_phase = True)")
        n = x.shape[-1]
        x = x.to(state.hist.dtype)
        if phased and n:
            # the general step's window at each slot's own offset s - 1 - seen % s: k - s
            # samples of initial state, then n of input (its first n // s frames)
            cat = torch.cat((state.hist, x), -1)
            win = self._gather_windows(cat, state.seen, k - s + n)
            y = causal_conv1d(win[..., k - s:], self.weight, self.bias, stride=s,
                              groups=self.groups, activation=self.activation,
                              initial_state=win[..., :k - s] if k > s else None)
            state.hist.copy_(cat[..., cat.shape[-1] - (k - 1):])
        elif 1 < k <= n + 1:
            # what the general step computes on cat(hist, x), without the cat: the input is x,
            # the k - s samples before it end the history (a strided view: every backend reads
            # it as it is, no copy kernel), and x's last k - 1 samples are the next history
            y = causal_conv1d(x, self.weight, self.bias, stride=s, groups=self.groups,
                              activation=self.activation, initial_state=state.hist[..., s - 1:])
            state.hist.copy_(x[..., n - (k - 1):])
        else:
            cat = torch.cat((state.hist, x), -1)
            y = self._run(cat, s - 1, self.weight)
            if k > 1:
                state.hist.copy_(cat[..., cat.shape[-1] - (k - 1):])
        advance_counter(state.seen, n)
        fill_counter(state, x.shape[-1] // s)
        return y

    @ends_stream
    def flush(self, state):
        check_state(self, state, ConvState)
        B = state.seen.shape[0]
        state.out_lengths = torch.zeros_like(state.seen)
        return self._empty(state.hist, B), state
