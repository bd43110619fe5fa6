"""Fused front half of the causal ConvNeXt block: depthwise causal conv + LayerNorm over channels.

    y, final_state = convnext_dwconv_ln(x, conv_weight, conv_bias, ln_weight, ln_bias, eps=...,
                                        initial_state=state, return_final_state=True)

x (B, C, L) (any strides; the decoder passes a channel-last (B, T, C) tensor transposed),
conv_weight (C, 1, k) as nn.Conv1d(C, C, k, groups=C), conv_bias / ln_weight / ln_bias (C,) or
None, initial_state (B, C, k - 1) the previous k - 1 inputs (zeros when None). Returns y
(B, L, C) = LayerNorm_C(causal_dwconv(x) + conv_bias) * ln_weight + ln_bias, channel-last ready for
the pointwise MLP, and final_state (B, C, k - 1), the state for the input that follows.

Registered ops: ``pyencoder::convnext_dwconv_ln`` (forward, fake kernel, autograd; an opaque
custom op running the backend named by its last argument) and
``pyencoder::convnext_dwconv_ln_backward``; the triton backend's forward is the
``torch.library.triton_op`` ``pyencoder::convnext_dwconv_ln_triton`` (same autograd), which the
public function calls when the registry picks triton.

Backends: ``triton`` (pyencoder.ops._convnext_triton, the fused kernel of
pyencoder.triton_kernels.convnext: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1;
fp16/bf16/fp32) and ``reference`` (pyencoder.reference.convnext: the reference
causal conv + F.layer_norm, computed in fp32, or float64 for float64 inputs). Selection: the one
registry of pyencoder._backend, family "convnext": ``backend=`` per call, then
``pyencoder.use_backend`` (``use_backend(convnext=...)`` for this family alone), then
``PYENCODER_BACKEND``, then auto: triton for supported CUDA inputs, reference otherwise (CPU
tensors use the reference in auto mode, as every other op).

Backward (both backends): no Triton kernel. The backward op recomputes the conv output in fp32
with the conv family's backend (pyencoder.ops.conv's selection: the Triton/CUDA conv on GPU),
applies the LayerNorm gradient in plain torch, then the depthwise conv backward entry of that
backend (dx, dweight, dbias, dstate, plus the final-state gradient).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend
from ..reference import convnext as _reference
from ..reference.convnext import _cdtype, convnext_dwconv_ln_reference
from . import _convnext_triton as _triton
from . import conv  # noqa: F401  (the backward runs the conv family's registered backends)
from ._autograd import forbid_double_backward, fresh, refuse_forward_ad
from ._call import call_custom, call_op
from .._checks import (autocast_cast, autocasting, check_bool, check_eps, check_float_dtype,
                      check_same, check_tensor)

__all__ = ["convnext_dwconv_ln", "convnext_dwconv_ln_reference", "select_backend"]

_backend.register("convnext", reference=_reference, triton=_triton)


# ------------------------------------------------------------------------------------------------
# Registered ops
# ------------------------------------------------------------------------------------------------

@torch.library.custom_op("pyencoder::convnext_dwconv_ln", mutates_args=())
def _convnext_op(x: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
                 ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                 initial_state: Optional[Tensor], eps: float,
                 backend: str) -> Tuple[Tensor, Tensor]:
    fwd = _backend.get_entry("convnext", backend, "forward")
    return fwd(x, conv_weight, conv_bias, ln_weight, ln_bias, initial_state, eps)


@_convnext_op.register_fake
def _(x, conv_weight, conv_bias, ln_weight, ln_bias, initial_state, eps, backend):
    B, C, L = x.shape
    return x.new_empty(B, L, C), x.new_empty(B, C, conv_weight.shape[-1] - 1)


@torch.library.custom_op("pyencoder::convnext_dwconv_ln_backward", mutates_args=())
def _convnext_bwd_op(grad_y: Tensor, grad_final_state: Optional[Tensor], x: Tensor,
                     conv_weight: Tensor, conv_bias: Optional[Tensor], ln_weight: Optional[Tensor],
                     ln_bias: Optional[Tensor], initial_state: Optional[Tensor],
                     eps: float, conv_backend: str = "auto"
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _backward_impl(grad_y, grad_final_state, x, conv_weight, conv_bias, ln_weight,
                           ln_bias, initial_state, eps, conv_backend)
    # contiguous, as the fake says (pyencoder.ops._autograd.fresh)
    return tuple(x.new_empty(0) if g is None else g.contiguous() for g in grads)


@_convnext_bwd_op.register_fake
def _(grad_y, grad_final_state, x, conv_weight, conv_bias, ln_weight, ln_bias, initial_state, eps,
      conv_backend="auto"):
    like = lambda t: x.new_empty(0) if t is None else fresh(t)  # noqa: E731
    return (fresh(x), fresh(conv_weight), like(conv_bias), like(ln_weight), like(ln_bias),
            like(initial_state))


def _backward_impl(grad_y, grad_final_state, x, conv_weight, conv_bias, ln_weight, ln_bias,
                   initial_state, eps, conv_backend="auto"):
    """(dx, dconv_weight, dconv_bias, dln_weight, dln_bias, dinitial_state), None where the input
    is None. Recomputes h in fp32 (float64 for float64) with the conv family's backend
    ``conv_backend``: what the forward's call asked for (_setup_context)."""
    cdt = _cdtype(x.dtype)
    B, C, L = x.shape
    up = lambda t: None if t is None else t.to(cdt)  # noqa: E731
    xc, wc, cbc, sc = up(x), up(conv_weight), up(conv_bias), up(initial_state)
    args = dict(x=xc, weight=wc, bias=cbc, initial_state=sc, stride=1, groups=C, activation=None)
    conv = _backend.select("conv", "backward", x.device.type, args, conv_backend)
    h, _ = _backend.get_entry("conv", conv, "forward")(xc, wc, cbc, sc, 1, C, None)
    h = h.transpose(1, 2)
    mean = h.mean(-1, keepdim=True)
    hc = h - mean
    rstd = torch.rsqrt(hc.pow(2).mean(-1, keepdim=True) + eps)
    xhat = hc * rstd
    g = grad_y.to(cdt)
    dlnw = None if ln_weight is None else (g * xhat).sum((0, 1)).to(ln_weight.dtype)
    dlnb = None if ln_bias is None else g.sum((0, 1)).to(ln_bias.dtype)
    if ln_weight is not None:
        g = g * ln_weight.to(cdt)
    dh = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    dh = dh.transpose(1, 2).contiguous()
    gf = None if grad_final_state is None else grad_final_state.to(cdt)
    dx, dw, dcb, ds = _backend.get_entry("conv", conv, "backward")(dh, gf, xc, wc, cbc, sc, 1, C,
                                                                   None)
    return (dx.to(x.dtype), dw.to(conv_weight.dtype),
            None if conv_bias is None else dcb.to(conv_bias.dtype), dlnw, dlnb,
            None if initial_state is None else ds.to(initial_state.dtype))


def _setup_context(ctx, inputs, output):
    # inputs: pyencoder::convnext_dwconv_ln's arguments (trailing backend string) or those of the
    # triton backend's triton_op pyencoder::convnext_dwconv_ln_triton (none).
    x, conv_weight, conv_bias, ln_weight, ln_bias, initial_state, eps = inputs[:7]
    ctx.save_for_backward(x, conv_weight, conv_bias, ln_weight, ln_bias, initial_state)
    ctx.eps = eps
    ctx.n_inputs = len(inputs)
    # the conv backend of the backward's recompute, decided here, under the forward's call: a
    # reference forward recomputes on the reference conv; otherwise the conv family's request
    # now (backend blocks, PYENCODER_BACKEND; "auto" if none). Chosen at backward time it
    # followed whatever block the backward ran in (the autograd thread on CUDA has none): a
    # backend="reference" forward failed in a use_backend(conv="cuda") backward
    backend = inputs[7] if len(inputs) > 7 else "triton"
    ctx.conv_backend = ("reference" if backend == "reference"
                        else _backend.requested_backend("conv") or "auto")


def _backward(ctx, grad_y, grad_final):
    x, conv_weight, conv_bias, ln_weight, ln_bias, initial_state = ctx.saved_tensors
    if grad_y is None:
        grad_y = x.new_zeros(x.shape[0], x.shape[2], x.shape[1])
    if grad_final is not None and grad_final.numel() == 0:
        grad_final = None
    dx, dw, dcb, dlnw, dlnb, ds = call_custom(_convnext_bwd_op, grad_y, grad_final, x, conv_weight,
                                              conv_bias, ln_weight, ln_bias, initial_state,
                                              ctx.eps, ctx.conv_backend)
    pick = lambda g, t: None if t is None else g  # noqa: E731
    return (dx, dw, pick(dcb, conv_bias), pick(dlnw, ln_weight), pick(dlnb, ln_bias),
            pick(ds, initial_state)) + (None,) * (ctx.n_inputs - 6)


_convnext_op.register_autograd(_backward, setup_context=_setup_context)
_triton.forward_op.register_autograd(_backward, setup_context=_setup_context)
forbid_double_backward(_convnext_bwd_op, "convnext_dwconv_ln")


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------

def select_backend(x, conv_weight, backend=None):
    """The backend convnext_dwconv_ln runs for x and conv_weight (pyencoder._backend.select, family
    "convnext"): raises if a forced backend cannot run the case."""
    args = dict(x=x, conv_weight=conv_weight)
    return _backend.select("convnext", "forward", x.device.type, args, backend)


def _check_vec(name, t, C, x):
    if t is None:
        return
    check_tensor(name, t, 1)
    check_same(name, t, "x", x)
    if t.shape[0] != C:
        raise ValueError(f"{name} must have shape ({C},); got {tuple(t.shape)}")


def convnext_dwconv_ln(x, conv_weight, conv_bias=None, ln_weight=None, ln_bias=None, *, eps=1e-6,
                       initial_state=None, return_final_state=False, backend=None):
    """LayerNorm over channels of a depthwise causal conv, written channel-last.

    x (B, C, L); conv_weight (C, 1, k); conv_bias, ln_weight, ln_bias (C,) or None;
    initial_state (B, C, k - 1) or None (zeros). Returns y (B, L, C), and with
    ``return_final_state`` (y, final_state (B, C, k - 1)). Under autocast, as the conv it starts
    with (F.conv1d): the floating inputs (float64 aside) are cast to the autocast dtype, so are
    the outputs (the LayerNorm's statistics stay float32 inside the op; the composed LayerNorm
    returns float32 under CUDA autocast, and the Linear after it casts to the autocast dtype
    either way)."""
    check_tensor("x", x, 3)
    check_bool("return_final_state", return_final_state)
    check_float_dtype("x", x)
    if autocasting(x):
        dev = x.device.type
        x, conv_weight, conv_bias, ln_weight, ln_bias, initial_state = autocast_cast(
            torch.get_autocast_dtype(dev), x, conv_weight, conv_bias, ln_weight, ln_bias,
            initial_state)
        with torch.autocast(dev, enabled=False):     # the plain-torch backend's ops: as given
            return convnext_dwconv_ln(x, conv_weight, conv_bias, ln_weight, ln_bias, eps=eps,
                                      initial_state=initial_state,
                                      return_final_state=return_final_state, backend=backend)
    refuse_forward_ad("convnext_dwconv_ln", x, conv_weight, conv_bias, ln_weight, ln_bias,
                      initial_state)
    B, C, L = x.shape
    if C == 0:
        raise ValueError(f"x must have at least one channel (LayerNorm over C channels); got shape "
                         f"{tuple(x.shape)}")
    check_tensor("conv_weight", conv_weight, 3)
    check_same("conv_weight", conv_weight, "x", x)
    if conv_weight.shape[0] != C or conv_weight.shape[1] != 1 or conv_weight.shape[2] < 1:
        raise ValueError(f"conv_weight must have shape (C, 1, k) = ({C}, 1, k >= 1) (depthwise); "
                         f"got {tuple(conv_weight.shape)}")
    _check_vec("conv_bias", conv_bias, C, x)
    _check_vec("ln_weight", ln_weight, C, x)
    _check_vec("ln_bias", ln_bias, C, x)
    check_eps("eps", eps)
    K = conv_weight.shape[-1]
    if initial_state is not None:
        check_tensor("initial_state", initial_state, 3)
        check_same("initial_state", initial_state, "x", x)
        if tuple(initial_state.shape) != (B, C, K - 1):
            raise ValueError(f"initial_state must have shape (B, C, k - 1) = ({B}, {C}, {K - 1}); "
                             f"got {tuple(initial_state.shape)}")
    name = select_backend(x, conv_weight, backend)
    y, final = call_op(name, _triton.forward_op, _convnext_op, x, conv_weight, conv_bias,
                       ln_weight, ln_bias, initial_state, float(eps))
    return (y, final) if return_final_state else y
