"""Causal convolution ops (DESIGN.md, "Causal convolution").

Registered ops: ``pyencoder::causal_conv1d`` (returns y and the final state),
``pyencoder::causal_conv1d_backward`` and ``pyencoder::causal_conv1d_update`` (streaming step,
state updated in place): opaque custom ops that run the backend named by their last argument
(reference, cuda; they accept "triton" too). The triton backend is registered the torch way
(pyencoder.ops._conv_triton: ``torch.library.triton_op`` ``pyencoder::causal_conv1d_triton``,
``..._triton_backward``, ``..._triton_update``), so torch.compile traces down to its kernels; the
public functions call it when the registry picks triton. Eager calls skip the dispatcher where
nothing traces them (pyencoder.ops._call: the op's body directly, or its autograd formula in an
``autograd.Function``; PYENCODER_EAGER_FASTPATH=0 turns it off). Semantics are those of
pyencoder.reference.conv.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend
from ..reference import conv as _reference
from . import _conv_cuda as _cuda
from . import _conv_triton as _triton
from ._autograd import forbid_double_backward, fresh, refuse_forward_ad
from ._call import call_custom, call_op, call_triton, direct_ok
from .._checks import (autocast_cast, autocasting, check_bool, check_float_dtype, check_int,
                      check_same, check_tensor, check_writable, value_checks_enabled)

__all__ = ["causal_conv1d", "causal_conv1d_update"]

ACTIVATIONS = (None, "silu", "gelu")

_backend.register("conv", reference=_reference, triton=_triton, cuda=_cuda)


def _act_str(a):
    return "" if a is None else a


def _act_from(s):
    return None if s == "" else s


@torch.library.custom_op("pyencoder::causal_conv1d", mutates_args=())
def _causal_conv1d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                      initial_state: Optional[Tensor], stride: int, groups: int, activation: str,
                      backend: str) -> Tuple[Tensor, Tensor]:
    fwd = _backend.get_entry("conv", backend, "forward")
    y, final = fwd(x, weight, bias, initial_state, stride, groups, _act_from(activation))
    return y, final


@_causal_conv1d_op.register_fake
def _(x, weight, bias, initial_state, stride, groups, activation, backend):
    B, C, L = x.shape
    k = weight.shape[-1]
    return x.new_empty(B, weight.shape[0], L // stride), x.new_empty(B, C, k - stride)


@torch.library.custom_op("pyencoder::causal_conv1d_backward", mutates_args=())
def _causal_conv1d_bwd_op(grad_y: Tensor, grad_final_state: Optional[Tensor], x: Tensor,
                          weight: Tensor, bias: Optional[Tensor], initial_state: Optional[Tensor],
                          stride: int, groups: int, activation: str,
                          backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    bwd = _backend.get_entry("conv", backend, "backward")
    dx, dw, db, ds = bwd(grad_y, grad_final_state, x, weight, bias, initial_state, stride, groups,
                         _act_from(activation))
    db = x.new_empty(0) if db is None else db
    ds = x.new_empty(0) if ds is None else ds
    # contiguous, as the fake says (a backend may return a view; a copy only then)
    return dx.contiguous(), dw.contiguous(), db.contiguous(), ds.contiguous()


@_causal_conv1d_bwd_op.register_fake
def _(grad_y, grad_final_state, x, weight, bias, initial_state, stride, groups, activation,
      backend):
    db = x.new_empty(0) if bias is None else fresh(bias)
    ds = x.new_empty(0) if initial_state is None else fresh(initial_state)
    return fresh(x), fresh(weight), db, ds


def _setup_context(ctx, inputs, output):
    # inputs: the op's arguments; pyencoder::causal_conv1d has a trailing backend string,
    # pyencoder::causal_conv1d_triton (the triton backend's triton_op) has none.
    x, weight, bias, initial_state, stride, groups, activation = inputs[:7]
    ctx.save_for_backward(x, weight, bias, initial_state)
    ctx.params = (stride, groups, activation)
    ctx.backend = inputs[7] if len(inputs) > 7 else None
    ctx.n_inputs = len(inputs)


def _backward(ctx, grad_y, grad_final):
    x, weight, bias, initial_state = ctx.saved_tensors
    stride, groups, activation = ctx.params
    if grad_y is None:
        grad_y = torch.zeros(x.shape[0], weight.shape[0], x.shape[-1] // stride, dtype=x.dtype,
                             device=x.device)
    args = (grad_y.contiguous(), grad_final, x, weight, bias, initial_state, stride, groups,
            activation)
    if ctx.backend is None:
        dx, dw, db, ds = call_triton(_triton.backward_op, *args)
    else:
        dx, dw, db, ds = call_custom(_causal_conv1d_bwd_op, *args, ctx.backend)
    return (dx, dw, None if bias is None else db, None if initial_state is None else ds) + \
        (None,) * (ctx.n_inputs - 4)


_causal_conv1d_op.register_autograd(_backward, setup_context=_setup_context)
_triton.forward_op.register_autograd(_backward, setup_context=_setup_context)
forbid_double_backward(_causal_conv1d_bwd_op, "causal_conv1d")
forbid_double_backward(_triton.backward_op, "causal_conv1d")


@torch.library.custom_op("pyencoder::causal_conv1d_update", mutates_args=("state",))
def _causal_conv1d_update_op(x: Tensor, state: Tensor, weight: Tensor, bias: Optional[Tensor],
                             state_indices: Optional[Tensor], groups: int, activation: str,
                             backend: str) -> Tensor:
    upd = _backend.get_entry("conv", backend, "update")
    return upd(x, state, weight, bias, state_indices, groups, _act_from(activation))


@_causal_conv1d_update_op.register_fake
def _(x, state, weight, bias, state_indices, groups, activation, backend):
    return x.new_empty(x.shape[0], weight.shape[0], x.shape[-1])


def _check_weight(x, weight, bias, groups):
    check_tensor("weight", weight, 3)
    check_same("weight", weight, "x", x)
    check_int("groups", groups, min_value=1)
    C = x.shape[1]
    Cout, Cg, k = weight.shape
    # (zero channels: the output took x's 0 channels whatever C_out said, or torch's conv failed
    # in its own words)
    if C < 1:
        raise ValueError(f"x must have at least one channel (B, C_in >= 1, L); got shape "
                         f"{tuple(x.shape)}")
    if Cout < 1:
        raise ValueError(f"weight must have at least one output channel (C_out >= 1, C_in/groups, "
                         f"k); got shape {tuple(weight.shape)}")
    if C % groups or Cout % groups:
        raise ValueError(f"groups ({groups}) must divide in_channels ({C}) and out_channels "
                         f"({Cout})")
    if Cg * groups != C:
        raise ValueError(f"weight must have shape (C_out, C_in/groups, k) = ({Cout}, "
                         f"{C // groups}, k) for x with {C} channels and groups={groups}; got "
                         f"{tuple(weight.shape)}")
    if k < 1:
        raise ValueError(f"weight kernel size must be >= 1; got {k}")
    if bias is not None:
        check_tensor("bias", bias, 1)
        check_same("bias", bias, "x", x)
        if bias.shape[0] != Cout:
            raise ValueError(f"bias must have shape ({Cout},); got {tuple(bias.shape)}")
    return k


def _check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")


def causal_conv1d(x, weight, bias=None, *, stride=1, groups=1, activation=None,
                  initial_state=None, return_final_state=False, backend=None):
    """Causal 1-D convolution, x (B, C_in, L) -> (B, C_out, L // stride).

    Left-pads by k - stride samples (zeros or ``initial_state`` (B, C_in, k - stride)); output t
    ends at input sample (t + 1) * stride - 1. ``activation``: None, "silu" or "gelu", fused after
    the bias. With ``return_final_state`` returns (y, final_state), the state to pass as
    ``initial_state`` for the input that follows sample (L // stride) * stride; without it, an
    eager call that autograd does not record computes no final state (the cuda and triton
    backends launch the conv alone). Under autocast, as F.conv1d: x, weight, bias and
    initial_state are cast to the autocast dtype (float64 ones kept), so is the output."""
    check_tensor("x", x, 3)
    check_float_dtype("x", x)
    refuse_forward_ad("causal_conv1d", x, weight, bias, initial_state)
    if autocasting(x):
        # as F.conv1d: the floating inputs in the autocast dtype; the op then runs without
        # autocast (the plain-torch backend's own ops would cast again, the kernels do not)
        dev = x.device.type
        x, weight, bias, initial_state = autocast_cast(torch.get_autocast_dtype(dev), x, weight,
                                                       bias, initial_state)
        with torch.autocast(dev, enabled=False):
            return causal_conv1d(x, weight, bias, stride=stride, groups=groups,
                                 activation=activation, initial_state=initial_state,
                                 return_final_state=return_final_state, backend=backend)
    k = _check_weight(x, weight, bias, groups)
    check_int("stride", stride, min_value=1)
    if k < stride:
        raise ValueError(f"kernel size ({k}) must be >= stride ({stride}) for a causal conv")
    _check_activation(activation)
    check_bool("return_final_state", return_final_state)
    B, C, L = x.shape
    if initial_state is not None:
        check_tensor("initial_state", initial_state, 3)
        check_same("initial_state", initial_state, "x", x)
        if tuple(initial_state.shape) != (B, C, k - stride):
            raise ValueError(f"initial_state must have shape (B, C_in, k - stride) = "
                             f"({B}, {C}, {k - stride}); got {tuple(initial_state.shape)}")
    args = dict(x=x, weight=weight, bias=bias, initial_state=initial_state, stride=stride,
                groups=groups, activation=activation)
    name = _backend.select("conv", "forward", x.device.type, args, backend)
    if not return_final_state and name in ("cuda", "triton") \
            and direct_ok((x, weight, bias, initial_state)):
        # the output alone: the op's body, run directly as the eager fast path would (nothing
        # traces it, no autograd graph), without the final state nobody asked for (one kernel
        # per call: the cuDNN route's copy of it, the triton and CUDA depthwise backends' state
        # kernels)
        fwd = _backend.get_entry("conv", name, "forward")
        if fwd is _triton.forward or fwd is _cuda.forward:
            return fwd(x, weight, bias, initial_state, stride, groups, activation,
                       need_final=False)[0]
        # another module registered under that name (a stand-in): its forward as the op's body
        # calls it, the final state dropped
        return fwd(x, weight, bias, initial_state, stride, groups, activation)[0]
    y, final = call_op(name, _triton.forward_op, _causal_conv1d_op, x, weight, bias,
                       initial_state, stride, groups, _act_str(activation))
    return (y, final) if return_final_state else y


def causal_conv1d_update(x, state, weight, bias=None, *, groups=1, activation=None,
                         state_indices=None, backend=None):
    """One streaming step at stride 1: x (B, C_in, t) new frames, ``state`` (B, C_in, k - 1) the
    previous k - 1 inputs, updated in place (so not an expanded or self-overlapping view). With
    ``state_indices`` (B,) int, ``state`` is a pool (S, C_in, k - 1) and row b uses slot
    state_indices[b] (-1: padding, output zeros; other slots at most once). The index checks read
    the indices on the host, except under torch.compile and during CUDA graph capture. Returns
    y (B, C_out, t), equal to the offline causal conv over the concatenated stream. Under
    autocast the step computes in ``state``'s dtype (the state is updated in place, so it is
    not cast): x, weight and bias are cast to it."""
    check_tensor("x", x, 3)
    check_float_dtype("x", x)
    refuse_forward_ad("causal_conv1d_update", x, state, weight, bias)
    if autocasting(x) and isinstance(state, torch.Tensor):
        # under autocast the step computes in its state's dtype (updated in place: not cast),
        # without autocast (the plain-torch backend's own ops would cast)
        dev = x.device.type
        x, weight, bias = autocast_cast(state.dtype, x, weight, bias)
        with torch.autocast(dev, enabled=False):
            return causal_conv1d_update(x, state, weight, bias, groups=groups,
                                        activation=activation, state_indices=state_indices,
                                        backend=backend)
    k = _check_weight(x, weight, bias, groups)
    _check_activation(activation)
    check_tensor("state", state, 3)
    check_same("state", state, "x", x)
    check_writable("state", state)
    B, C, t = x.shape
    if t < 1:
        raise ValueError(f"x must hold at least one new frame; got shape {tuple(x.shape)}")
    if state_indices is None:
        if tuple(state.shape) != (B, C, k - 1):
            raise ValueError(f"state must have shape (B, C_in, k - 1) = ({B}, {C}, {k - 1}); got "
                             f"{tuple(state.shape)}")
    else:
        check_tensor("state_indices", state_indices, 1)
        if state_indices.dtype.is_floating_point or state_indices.dtype == torch.bool:
            raise TypeError(f"state_indices must be an integer tensor; got {state_indices.dtype}")
        if state_indices.shape[0] != B:
            raise ValueError(f"state_indices must have shape ({B},); got "
                             f"{tuple(state_indices.shape)}")
        if state_indices.device != x.device:
            raise ValueError(f"state_indices must be on {x.device}; got {state_indices.device}")
        if state.shape[1:] != (C, k - 1):
            raise ValueError(f"state must have shape (num_slots, C_in, k - 1) = (S, {C}, {k - 1}); "
                             f"got {tuple(state.shape)}")
        if value_checks_enabled() and B and not state_indices.is_meta:
            srt = state_indices.sort().values
            dup = ((srt[1:] == srt[:-1]) & (srt[1:] >= 0)).sum()
            lo, hi, n_dup = torch.stack((srt[0], srt[-1], dup.to(srt.dtype))).tolist()
            if lo < -1 or hi >= state.shape[0]:
                raise ValueError(f"state_indices values must lie in [-1, {state.shape[0] - 1}]; "
                                 f"got min {lo}, max {hi}")
            if n_dup:
                raise ValueError(f"state_indices must not repeat a slot (two rows would write one "
                                 f"state; -1 padding may repeat); got "
                                 f"{state_indices.tolist()}")
    args = dict(x=x, state=state, weight=weight, bias=bias, state_indices=state_indices,
                groups=groups, activation=activation)
    name = _backend.select("conv", "update", x.device.type, args, backend)
    return call_op(name, _triton.update_op, _causal_conv1d_update_op, x, state, weight, bias,
                   state_indices, groups, _act_str(activation))
