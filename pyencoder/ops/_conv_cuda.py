"""CUDA backend of the causal conv ops (pyencoder._C, csrc/causal_conv1d/).

Entry points have the signatures and semantics of pyencoder.reference.conv.

- Depthwise (groups == C_in == C_out), stride 1, widths 1..256, fp32/fp16/bf16, channel-first or
  channel-last x: the custom kernels (``torch.ops.pyencoder.causal_conv1d_{fwd,bwd,update}_cuda``):
  fused bias + activation, initial/final state, deterministic weight gradient, in-place update
  with ``state_indices``.
- Dense strided convs (groups == 1, stride > 1: the wav2vec2 feature extractor): cuDNN (through
  F.conv1d / aten.convolution_backward) in the input dtype, ``_cudnn_forward`` /
  ``_cudnn_backward`` below (plain torch: they also run, and are tested, on CPU tensors).
- Grouped convs (1 < groups < C, e.g. wav2vec2's positional conv) are declined, so auto
  selection hands them to the triton backend's implicit-GEMM kernel.
"""
import torch
import torch.nn.functional as F

from .. import _ext
from .._env import env_exact
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
        if x.shape[0] > 65535:
            return (f"batch {x.shape[0]} is above 65535, the CUDA grid extent the depthwise "
                    f"kernels put it on")
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


def forward(x, weight, bias, initial_state, stride, groups, activation, need_final=True):
    """(y, final_state); without ``need_final`` final_state is None and not computed (the cuDNN
    route's copy, the depthwise final-state kernel; an extension built before
    causal_conv1d_fwd_y_cuda existed computes it anyway)."""
    if _kind(x, weight, stride, groups) == "cudnn":
        return _cudnn_forward(x, weight, bias, initial_state, stride, activation, need_final)
    env_exact("PYENCODER_CONV_ROW", ("0", "1"))     # read by the extension as is (strcmp)
    ops = _ops()
    if not need_final and hasattr(ops, "causal_conv1d_fwd_y_cuda"):
        return ops.causal_conv1d_fwd_y_cuda(x, weight, _unit(bias), initial_state,
                                            _ACT[activation]), None
    y, final = ops.causal_conv1d_fwd_cuda(x, weight, _unit(bias), initial_state,
                                          _ACT[activation])
    return y, (final if need_final else None)


def backward(grad_y, grad_final_state, x, weight, bias, initial_state, stride, groups, activation):
    if _kind(x, weight, stride, groups) == "cudnn":
        return _cudnn_backward(grad_y, grad_final_state, x, weight, bias, initial_state, stride,
                               activation)
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


# Dense strided convs (groups == 1, stride > 1) through cuDNN, in the input dtype.
#
# Precision: torch's legacy cuDNN convolution descriptor sets the compute (accumulation) type to
# float32 for half data (aten/src/ATen/cudnn/Descriptors.h, ConvolutionDescriptor::set:
# CUDNN_DATA_HALF -> mathType CUDNN_DATA_FLOAT). The cuDNN v8 frontend path (Conv_v8.cpp,
# getConvDescriptor) passes the tensor data type to ConvDescBuilder in the copies found here;
# which compute type cuDNN then uses for fp16/bf16 was not verified from the source, so the GPU
# tests (tests/test_conv_cudnn_path.py, C_in*k up to 1536 terms) hold this path to the fp32
# reference within ~2 ulp: half-precision accumulation would miss that by ~10x and fail them.
# float32 follows torch.backends.cudnn.allow_tf32 (default True: TF32 tensor cores) exactly like
# the reference's own F.conv1d on the same device, so the GPU fp32 tolerance (1e-4) is the one
# tests/test_conv_gpu.py uses for both; on CPU there is no TF32 and fp32 is held to 1e-5.
#
# Padding: the causal left pad of k - stride zeros is cuDNN's symmetric ``padding=k - stride``;
# output frame t starts at padded sample t*stride either way, so the first T = L // stride frames
# are the causal ones and the right padding adds e = (L + pad) // stride - T trailing frames
# (e = 0 for the feature extractor's k=3, s=2 and k=2, s=2 at even L). When e > 0 one of two
# copies is unavoidable: padding x (reads and writes B*C_in*(L + pad)) or keeping the first T
# frames of the wider output (B*C_out*T); the cheaper one is taken (``_pad_copy``: wav2vec2's
# layer 0 has C_in = 1, so there padding x is ~100x cheaper than slicing 512-channel frames).
# The output is contiguous: the registered op's fake kernel promises contiguous outputs, and the
# next conv (cuDNN) would copy a strided view anyway. With an initial_state (streaming chunks) the
# state is concatenated in front (a small copy) and the conv is unpadded.


def _extra_frames(L, k, stride):
    pad = k - stride
    return (L + pad) // stride - L // stride


def _pad_copy(x, weight, stride):
    """True when padding x costs fewer bytes than slicing the wider output."""
    B, C, L = x.shape
    k = weight.shape[-1]
    if _extra_frames(L, k, stride) == 0:
        return False
    return C * (L + k - stride) <= weight.shape[0] * (L // stride)


def _final_state(x, initial_state, T, stride, pad):
    """The pad padded-input samples before sample T*stride, taken from x (and initial_state or
    zeros where they reach before x). A fresh contiguous tensor."""
    B, C, L = x.shape
    if pad == 0:
        return x.new_empty(B, C, 0)
    lo = T * stride - pad
    if lo >= 0:
        return x[..., lo:T * stride].clone(memory_format=torch.contiguous_format)
    head = initial_state[..., pad + lo:] if initial_state is not None else \
        x.new_zeros(B, C, -lo)
    return torch.cat((head, x[..., :T * stride]), dim=-1)


def _cudnn_conv(x, weight, bias, initial_state, stride):
    """The pre-activation y (B, C_out, L // stride) in x's dtype (L // stride > 0)."""
    k = weight.shape[-1]
    pad = k - stride
    L = x.shape[-1]
    T = L // stride
    if initial_state is not None:
        return F.conv1d(torch.cat((initial_state, x), dim=-1), weight, bias, stride=stride)
    if _pad_copy(x, weight, stride):
        return F.conv1d(F.pad(x, (pad, 0)), weight, bias, stride=stride)
    y = F.conv1d(x, weight, bias, stride=stride, padding=pad)
    return y if y.shape[-1] == T else y[..., :T].contiguous()


def _cudnn_forward(x, weight, bias, initial_state, stride, activation, need_final=True):
    """y (B, C_out, L // stride), final_state (B, C_in, k - stride), both in x's dtype; without
    ``need_final``, final_state is None (its copy skipped: pyencoder.ops.conv's output-only
    call)."""
    B, C, L = x.shape
    k = weight.shape[-1]
    pad = k - stride
    T = L // stride
    if T > 0:
        y = _ref._act(_cudnn_conv(x, weight, bias, initial_state, stride), activation)
    else:
        y = x.new_zeros(B, weight.shape[0], 0)
    return y, (_final_state(x, initial_state, T, stride, pad) if need_final else None)


def _cudnn_backward(grad_y, grad_final_state, x, weight, bias, initial_state, stride, activation):
    """(dx, dweight, dbias or None, dinitial_state or None) of ``_cudnn_forward`` through
    aten.convolution_backward in the input dtype. With a fused activation the pre-activation is
    recomputed and its derivative applied in float32, then the gradient is rounded once to the
    input dtype for the conv gradients; dbias is summed in float32."""
    B, C, L = x.shape
    k = weight.shape[-1]
    pad = k - stride
    T = L // stride
    dx = torch.zeros_like(x) if T == 0 else None
    dw = torch.zeros_like(weight) if T == 0 else None
    db = None
    ds = None if initial_state is None else torch.zeros_like(initial_state)
    if T > 0:
        g = grad_y
        if activation is not None:
            pre = _cudnn_conv(x, weight, bias, initial_state, stride)
            g32 = grad_y.float() * _ref._act_grad(pre.float(), activation)
            g = g32.to(x.dtype)
        else:
            g32 = grad_y
        if bias is not None:
            db = g32.sum(dim=(0, 2), dtype=torch.float32).to(bias.dtype)
        if initial_state is not None or _pad_copy(x, weight, stride):
            xp = torch.cat((initial_state, x), -1) if initial_state is not None else \
                F.pad(x, (pad, 0))
            dxp, dw, _ = torch.ops.aten.convolution_backward(
                g.contiguous(), xp, weight, None, [stride], [0], [1], False, [0], 1,
                [True, True, False])
            dx = dxp[..., pad:]
            if initial_state is not None:
                ds = dxp[..., :pad]
        else:
            e = _extra_frames(L, k, stride)
            ge = F.pad(g, (0, e)) if e else g.contiguous()
            dx, dw, _ = torch.ops.aten.convolution_backward(
                ge, x, weight, None, [stride], [pad], [1], False, [0], 1, [True, True, False])
    elif bias is not None:
        db = torch.zeros_like(bias)
    if grad_final_state is not None and pad > 0:
        lo = T * stride - pad
        gf = grad_final_state.to(x.dtype)
        if lo >= 0:
            dx[..., lo:T * stride] += gf
        else:
            dx[..., :T * stride] += gf[..., -lo:]
            if ds is not None:
                ds[..., pad + lo:] += gf[..., :-lo]
    # dx and ds may be slices of one buffer: the registered op's outputs must not alias
    dx = dx.contiguous()
    ds = None if ds is None else ds.clone(memory_format=torch.contiguous_format)
    return dx, dw, db, ds
