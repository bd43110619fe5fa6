"""Triton backend of the causal conv ops (kernels: pyencoder.triton_kernels.causal_conv1d).

Entry points have the signatures and semantics of pyencoder.reference.conv. Depthwise convs
(groups == C_in == C_out) use the elementwise tap-loop kernel; every other grouping (grouped,
dense, channel multipliers) the implicit-GEMM kernel. Both take x/y strides, so channel-last
inputs are read in place. Half/bfloat16 accumulate in fp32 and round once; float64 is not
supported here (the reference backend runs it).

Backward: the activation derivative is applied on the host to grad_y (the pre-activation is
recomputed by the forward kernel with the activation off); dx comes from a transposed-conv kernel
over the padded input, dweight from per-split partial sums added in a fixed order
(deterministic), dbias from a torch reduction.

Update: the conv reads the state (optionally through ``state_indices``) in one kernel, the new
state is gathered into a scratch buffer by a second kernel and scattered back into the pool by a
third, so no kernel reads state that another of its programs writes.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .._env import env_choice, grp_tile
from ..reference.conv import _act_grad
from . import _triton_op
from ._triton_op import block_size, cdiv, launch, next_pow2, triton_op

_ACT = {None: 0, "silu": 1, "gelu": 2}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernels():
    from ..triton_kernels import causal_conv1d as k
    return k


def _is_depthwise(x, weight, groups):
    return groups == x.shape[1] and weight.shape[0] == x.shape[1]


def _reason(x, weight):
    if x.dtype not in _DTYPES:
        return (f"the triton conv backend supports float16, bfloat16 and float32; got {x.dtype} "
                "(use backend='reference')")
    if weight.shape[-1] > 4096:
        return f"kernel size {weight.shape[-1]} is above the triton backend's limit 4096"
    if x.shape[0] > _triton_op.MAX_GRID_YZ:
        return (f"batch {x.shape[0]} is above {_triton_op.MAX_GRID_YZ}, the CUDA grid extent "
                f"the triton conv kernels put it on")
    return None


def supports_forward(x=None, weight=None, **_):
    return _reason(x, weight)


def supports_backward(x=None, weight=None, **_):
    return _reason(x, weight)


def supports_update(x=None, weight=None, **_):
    return _reason(x, weight)


def _grouped_tiles(n_c, n_t, n_r, groups, B):
    """Tiles of a grouped conv kernel (forward, or backward dx as the transposed conv): n_c output
    channels per group, n_t positions, a reduction of n_r = input channels per group x k. Returns
    (BLOCK_C, BLOCK_T, BLOCK_R, channel blocks per group, grid (T blocks, groups x channel blocks,
    B))."""
    BLOCK_C, BLOCK_T, BLOCK_R = (block_size(n, 16, 64) for n in (n_c, n_t, n_r))
    nc = cdiv(n_c, BLOCK_C)
    return BLOCK_C, BLOCK_T, BLOCK_R, nc, (cdiv(n_t, BLOCK_T), groups * nc, B)


# The grouped / dense implicit-GEMM forward's tile is (BLOCK_CO, BLOCK_T, BLOCK_R) = up to
# (64, 64, 64) at Triton's default 4 warps and 3 stages (_grouped_tiles). On the H100 it ran
# wav2vec2's positional conv (C=768, 16 groups, k=128, B=8, L=2048, fp16) at 101 TFLOP/s, 7.3x
# cuDNN, but the wav2vec2-large one (C=1024) at 135 TFLOP/s against cuDNN's 199. For a tile A/B on
# a GPU, PYENCODER_CONV_GRP_TILE="BLOCK_T,BLOCK_R,WARPS,STAGES" overrides the time and reduction
# blocks (still capped by the problem's size), the warps and the pipeline stages of that kernel
# (benchmarks/bench_conv.py's pyencoder-triton-grp* providers). Unset: the default tile.
# PYENCODER_CONV_TAP_MAJOR=1: the same kernel walks its reduction tap by tap, channels fastest
# (constexpr TAP_MAJOR), over a tap-major copy of the weight: for channel-last x (what a model's
# (B, T, C) hidden states give the positional conv) both operand tiles are contiguous runs, where
# the default (channel, tap) order gathers x element by element. Off until a GPU A/B says so.
_TAP_ENV = "PYENCODER_CONV_TAP_MAJOR"


def _strides3(t):
    return (t.stride(0), t.stride(1), t.stride(2)) if t is not None else (0, 0, 0)


def _launch_forward(x, weight, bias, state, state_indices, stride, groups, activation, y):
    k = _kernels()
    weight = weight.contiguous()                 # the kernels index weight and bias densely
    bias = bias.contiguous() if bias is not None else None
    B, C, L = x.shape
    Cout, CG, K = weight.shape
    pad = K - stride
    T = L // stride
    if T == 0 or B == 0:
        return
    has_state = state is not None and pad > 0
    s_arg = state if has_state else x
    ss = _strides3(state) if has_state else (0, 0, 0)
    idx = state_indices if state_indices is not None else x
    common = dict(STRIDE=stride, HAS_BIAS=bias is not None, HAS_STATE=has_state,
                  HAS_IDX=state_indices is not None, ACT=_ACT[activation])
    bias_arg = bias if bias is not None else weight
    if _is_depthwise(x, weight, groups):
        BLOCK_C = min(16, next_pow2(C))
        BLOCK_T = block_size(T, 16, 128)
        grid = (cdiv(T, BLOCK_T), cdiv(C, BLOCK_C), B)
        launch(k._causal_conv1d_dw_fwd_kernel)[grid](
            x, weight, bias_arg, s_arg, idx, y, C, L, T, K, pad,
            *_strides3(x), weight.stride(0), weight.stride(2), *ss, *_strides3(y),
            BLOCK_C=BLOCK_C, BLOCK_T=BLOCK_T, **common)
    else:
        COG = Cout // groups
        BLOCK_CO, BLOCK_T, BLOCK_R, NCO, grid = _grouped_tiles(COG, T, CG * K, groups, B)
        tile = grp_tile()
        tap = env_choice(_TAP_ENV, ("0", "1"), "0") == "1"
        opts = {}
        if tile is not None:
            BLOCK_T, BLOCK_R = block_size(T, 16, tile[0]), block_size(CG * K, 16, tile[1])
            grid = (cdiv(T, BLOCK_T), grid[1], grid[2])
            opts = dict(num_warps=tile[2], num_stages=tile[3])
        w_arg, ws, cgp = weight, _strides3(weight), 0
        if tap:
            # tap-major weight (Cout, K, CG): a reduction block is one tap's run of channels;
            # the block is the largest power of two in [16, 64] (or the tile's) dividing CG,
            # else CG is padded up to it (masked)
            cap = BLOCK_R if tile is not None else 64
            BLOCK_R = next((r for r in (64, 32, 16) if r <= cap and CG % r == 0),
                           block_size(CG, 16, cap))
            cgp = cdiv(CG, BLOCK_R) * BLOCK_R
            w_arg = weight.permute(0, 2, 1).contiguous()
            ws = (w_arg.stride(0), w_arg.stride(2), w_arg.stride(1))   # (o, ci, j) as indexed
            opts["TAP_MAJOR"] = True
        launch(k._causal_conv1d_grp_fwd_kernel)[grid](
            x, w_arg, bias_arg, s_arg, idx, y, CG, COG, L, T, K, pad, NCO, cgp,
            *_strides3(x), *ws, *ss, *_strides3(y),
            IEEE=x.dtype == torch.float32, BLOCK_CO=BLOCK_CO, BLOCK_T=BLOCK_T, BLOCK_R=BLOCK_R,
            **common, **opts)


def _launch_state(x, state, state_indices, stride, K, out):
    k = _kernels()
    B, C, L = x.shape
    pad = K - stride
    if pad == 0 or B == 0 or C == 0:
        return
    has_state = state is not None
    BLOCK_C = min(16, next_pow2(C))
    BLOCK_P = min(64, next_pow2(pad))
    grid = (cdiv(pad, BLOCK_P), cdiv(C, BLOCK_C), B)
    launch(k._causal_conv1d_state_fwd_kernel)[grid](
        x, state if has_state else x, state_indices if state_indices is not None else x, out,
        C, L, L // stride, pad, *_strides3(x),
        *(_strides3(state) if has_state else (0, 0, 0)), *_strides3(out),
        STRIDE=stride, HAS_STATE=has_state, HAS_IDX=state_indices is not None,
        BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P)


def _out_like(x, C, T):
    """y in x's memory format: channel-last x (stride(1) == 1) gets a channel-last y."""
    B = x.shape[0]
    if x.stride(1) == 1 and x.shape[2] > 1:
        return torch.empty(B, T, C, dtype=x.dtype, device=x.device).transpose(1, 2)
    return torch.empty(B, C, T, dtype=x.dtype, device=x.device)


def forward(x, weight, bias, initial_state, stride, groups, activation, need_final=True):
    """(y, final_state); without ``need_final`` the final state's kernel is not launched and
    final_state is None (pyencoder.ops.conv's output-only call)."""
    B, C, L = x.shape
    Cout, _, K = weight.shape
    T = L // stride
    y = _out_like(x, Cout, T)
    _launch_forward(x, weight, bias, initial_state, None, stride, groups, activation, y)
    if not need_final:
        return y, None
    final = torch.empty(B, C, K - stride, dtype=x.dtype, device=x.device)
    _launch_state(x, initial_state, None, stride, K, final)
    return y, final


def backward(grad_y, grad_final_state, x, weight, bias, initial_state, stride, groups, activation):
    k = _kernels()
    B, C, L = x.shape
    Cout, CG, K = weight.shape
    pad = K - stride
    T = L // stride
    LP = pad + L
    g = grad_y
    if activation is not None and T > 0:
        pre = torch.empty(B, Cout, T, dtype=torch.float32, device=x.device)
        _launch_forward(x, weight, bias, initial_state, None, stride, groups, None, pre)
        g = grad_y.float() * _act_grad(pre, activation)
    dxp = torch.zeros(B, C, LP, dtype=torch.float32, device=x.device)
    has_state = initial_state is not None and pad > 0
    s_arg = initial_state if has_state else x
    ss = _strides3(initial_state) if has_state else (0, 0, 0)
    nsplit = 1
    if T > 0 and B > 0:
        ieee = x.dtype == torch.float32 or g.dtype == torch.float32
        if _is_depthwise(x, weight, groups):
            BLOCK_C = min(16, next_pow2(C))
            BLOCK_S = block_size(LP, 16, 128)
            grid = (cdiv(LP, BLOCK_S), cdiv(C, BLOCK_C), B)
            launch(k._causal_conv1d_dw_bwd_dx_kernel)[grid](
                g, weight, dxp, C, T, K, LP, *_strides3(g), weight.stride(0), weight.stride(2),
                *_strides3(dxp), STRIDE=stride, BLOCK_C=BLOCK_C, BLOCK_S=BLOCK_S)
            BLOCK_J = min(16, next_pow2(K))
            BLOCK_T = block_size(T, 16, 32)
            ntb = cdiv(T, BLOCK_T)
            nsplit = max(1, min(B * ntb, 64))
            per = cdiv(B * ntb, nsplit)
            nsplit = cdiv(B * ntb, per)
            part = torch.empty(nsplit, C, K, dtype=torch.float32, device=x.device)
            grid = (cdiv(K, BLOCK_J), cdiv(C, BLOCK_C), nsplit)
            launch(k._causal_conv1d_dw_bwd_dw_kernel)[grid](
                g, x, s_arg, part, C, L, T, K, pad, B, ntb, per, *_strides3(g), *_strides3(x),
                *ss, STRIDE=stride, HAS_STATE=has_state, BLOCK_C=BLOCK_C, BLOCK_J=BLOCK_J,
                BLOCK_T=BLOCK_T)
            dw = part.sum(0).view(C, 1, K)
        else:
            COG = Cout // groups
            BLOCK_CI, BLOCK_S, BLOCK_R, NCI, grid = _grouped_tiles(CG, LP, COG * K, groups, B)
            launch(k._causal_conv1d_grp_bwd_dx_kernel)[grid](
                g, weight, dxp, CG, COG, T, K, LP, NCI, *_strides3(g), *_strides3(weight),
                *_strides3(dxp), STRIDE=stride, IEEE=ieee, BLOCK_CI=BLOCK_CI, BLOCK_S=BLOCK_S,
                BLOCK_R=BLOCK_R)
            BLOCK_CO = block_size(COG, 16, 64)
            BLOCK_R = block_size(CG * K, 16, 64)
            BLOCK_T = block_size(T, 16, 64)
            NCO = cdiv(COG, BLOCK_CO)
            ntb = cdiv(T, BLOCK_T)
            nsplit = max(1, min(B * ntb, 16))
            per = cdiv(B * ntb, nsplit)
            nsplit = cdiv(B * ntb, per)
            part = torch.empty(nsplit, Cout, CG * K, dtype=torch.float32, device=x.device)
            grid = (cdiv(CG * K, BLOCK_R), groups * NCO, nsplit)
            launch(k._causal_conv1d_grp_bwd_dw_kernel)[grid](
                g, x, s_arg, part, CG, COG, L, T, K, pad, B, ntb, per, NCO, Cout,
                *_strides3(g), *_strides3(x), *ss, STRIDE=stride, HAS_STATE=has_state,
                IEEE=ieee, BLOCK_CO=BLOCK_CO, BLOCK_R=BLOCK_R, BLOCK_T=BLOCK_T)
            dw = part.sum(0).view(Cout, CG, K)
    else:
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
    if grad_final_state is not None and pad > 0:
        dxp[..., T * stride: T * stride + pad] += grad_final_state.float()
    db = None
    if bias is not None:
        db = (g.float().sum(dim=(0, 2)) if T > 0 else torch.zeros_like(bias, dtype=torch.float32))
        db = db.to(bias.dtype)
    # dx and ds are copies (clone / zeros): views of dxp would alias each other when L == 0 or
    # pad == 0, which a custom op's outputs must not
    ds = None if initial_state is None else dxp[..., :pad].to(initial_state.dtype).clone()
    dx = dxp[..., pad:].to(x.dtype).contiguous() if L else torch.zeros_like(x)
    return dx, dw.to(weight.dtype), db, ds


def update(x, state, weight, bias, state_indices, groups, activation):
    k = _kernels()
    B, C, t = x.shape
    Cout, _, K = weight.shape
    y = _out_like(x, Cout, t)
    # the kernels read the indices at unit stride (a strided int32 view would be misread)
    idx = None if state_indices is None else state_indices.to(torch.int32).contiguous()
    _launch_forward(x, weight, bias, state, idx, 1, groups, activation, y)
    if K > 1 and B > 0:
        new = torch.empty(B, C, K - 1, dtype=state.dtype, device=x.device)
        _launch_state(x, state, idx, 1, K, new)
        n = C * (K - 1)
        if state.stride(2) == 1 and state.stride(1) == K - 1:
            BLOCK = min(1024, next_pow2(n))
            launch(k._causal_conv1d_state_scatter_kernel)[(cdiv(n, BLOCK), B)](
                new, idx if idx is not None else x, state, n, new.stride(0), state.stride(0),
                HAS_IDX=idx is not None, BLOCK=BLOCK)
        elif idx is None:
            state.copy_(new)
        else:
            valid = (idx >= 0).nonzero().squeeze(-1)
            state.index_copy_(0, idx[valid].long(), new[valid])
    return y


# ------------------------------------------------------------------------------------------------
# Registered ops (pyencoder.ops._triton_op: torch.library.triton_op + wrap_triton); their autograd
# is registered in pyencoder.ops.conv. ``activation`` is "" for None, as in
# pyencoder::causal_conv1d.

def _act(a):
    return None if a == "" else a


@triton_op("pyencoder::causal_conv1d_triton", mutates_args=())
def forward_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_state: Optional[Tensor],
               stride: int, groups: int, activation: str) -> Tuple[Tensor, Tensor]:
    return forward(x, weight, bias, initial_state, stride, groups, _act(activation))


@triton_op("pyencoder::causal_conv1d_triton_backward", mutates_args=())
def backward_op(grad_y: Tensor, grad_final_state: Optional[Tensor], x: Tensor, weight: Tensor,
                bias: Optional[Tensor], initial_state: Optional[Tensor], stride: int, groups: int,
                activation: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dinitial_state); an empty tensor where bias / initial_state is None."""
    dx, dw, db, ds = backward(grad_y, grad_final_state, x, weight, bias, initial_state, stride,
                              groups, _act(activation))
    return dx, dw, x.new_empty(0) if db is None else db, x.new_empty(0) if ds is None else ds


@triton_op("pyencoder::causal_conv1d_triton_update", mutates_args=("state",))
def update_op(x: Tensor, state: Tensor, weight: Tensor, bias: Optional[Tensor],
              state_indices: Optional[Tensor], groups: int, activation: str) -> Tensor:
    return update(x, state, weight, bias, state_indices, groups, _act(activation))
