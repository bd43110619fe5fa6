"""CUDA backend of the causal conv ops (pyencoder._C, csrc/causal_conv1d/).

Entry points have the signatures and semantics of pyencoder.reference.conv.

- Depthwise (groups == C_in == C_out), stride 1, widths 1..256, fp32/fp16/bf16, channel-first or
  channel-last x: the custom kernels (``torch.ops.pyencoder.causal_conv1d_{fwd,bwd,update}_cuda``):
  fused bias + activation, initial/final state, deterministic weight gradient, in-place update
  with ``state_indices``.
- Dense strided convs (groups == 1, stride > 1: the wav2vec2 feature extractor): cuDNN through
  the reference implementation (F.conv1d on the state-padded input), which is what this backend
  runs for them until a custom kernel beats it (benchmarks/bench_conv.py measures both).
- Grouped convs (1 < groups < C, e.g. wav2vec2's positional conv) are declined, so auto
  selection hands them to the triton backend's implicit-GEMM kernel.
"""
import torch

from .. import _ext
from ..reference import conv as _ref

_ACT = {None: 0, "silu": 1, "gelu": 2}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_WIDTH = 256


def _ops():
    if _ext.load() is None:
        raise RuntimeError(f"pyencoder: the cuda conv backend is unavailable: {_ext.reason()}")
    return torch.ops.pyencoder


def _ext_reason():
    if _ext.load() is None:
        return _ext.reason()
    return None


def _is_depthwise(x, weight, groups):
    return groups == x.shape[1] and weight.shape[0] == x.shape[1] and weight.shape[1] == 1


def _kind(x, weight, stride, groups):
    """'depthwise', 'cudnn' or a reason string."""
    if x.dtype not in _DTYPES:
        return f"the cuda conv backend supports float16, bfloat16 and float32; got {x.dtype}"
    if _is_depthwise(x, weight, groups):
        if stride != 1:
            return ("strided depthwise convs are not implemented in the cuda backend "
                    "(the triton backend runs them)")
        if weight.shape[-1] > MAX_WIDTH:
            return f"depthwise kernel width {weight.shape[-1]} exceeds the cuda limit {MAX_WIDTH}"
        return "depthwise"
    if groups == 1 and stride > 1:
        return "cudnn"
    return (f"grouped/dense stride-{stride} conv (groups={groups}) is not run by the cuda backend; "
            "the triton backend (implicit GEMM) runs it")


def _supports(x=None, weight=None, stride=1, groups=1, **_):
    r = _ext_reason()
    if r is not None:
        return r
    k = _kind(x, weight, stride, groups)
    return None if k in ("depthwise", "cudnn") else k


def supports_forward(x=None, weight=None, bias=None, initial_state=None, stride=1, groups=1,
                     activation=None, **_):
    return _supports(x=x, weight=weight, stride=stride, groups=groups)


def supports_backward(x=None, weight=None, bias=None, initial_state=None, stride=1, groups=1,
                      activation=None, **_):
    return _supports(x=x, weight=weight, stride=stride, groups=groups)


def supports_update(x=None, state=None, weight=None, groups=1, **_):
    r = _ext_reason()
    if r is not None:
        return r
    k = _kind(x, weight, 1, groups)
    if k != "depthwise":
        return k if k != "cudnn" else "the cuda update step is depthwise only"
    return None


def forward(x, weight, bias, initial_state, stride, groups, activation):
    if _kind(x, weight, stride, groups) == "cudnn":
        return _ref.forward(x, weight, bias, initial_state, stride, groups, activation)
    y, final = _ops().causal_conv1d_fwd_cuda(x, weight, _unit(bias), initial_state,
                                             _ACT[activation])
    return y, final


def backward(grad_y, grad_final_state, x, weight, bias, initial_state, stride, groups, activation):
    if _kind(x, weight, stride, groups) == "cudnn":
        return _ref.backward(grad_y, grad_final_state, x, weight, bias, initial_state, stride,
                             groups, activation)
    dx, dw, db, ds = _ops().causal_conv1d_bwd_cuda(grad_y, grad_final_state, x, weight,
                                                   _unit(bias), initial_state, _ACT[activation])
    db = db if bias is not None else None
    if db is not None and _shares_storage(dw, db):
        # the extension reduces dweight and dbias into one (C, K + 1) buffer and returns views of
        # it when no dtype cast copies them (float32): a registered op must not return outputs
        # that alias each other (torch refuses: the first GPU run's convnext backward failed)
        db = db.clone()
    return dx, dw, db, (ds if initial_state is not None else None)


def _shares_storage(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def update(x, state, weight, bias, state_indices, groups, activation):
    return _ops().causal_conv1d_update_cuda(x, state, weight, _unit(bias), state_indices,
                                            _ACT[activation])


def _unit(bias):
    """The extension reads bias at unit stride (and refuses another): a strided view, accepted by
    the op like by the other backends, is copied."""
    return None if bias is None else bias.contiguous()
