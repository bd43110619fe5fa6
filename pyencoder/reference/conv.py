"""Plain-torch causal convolution: the CPU production path and the test oracle for the kernels.

causal_conv1d: x (B, C_in, L), weight (C_out, C_in/groups, k) as nn.Conv1d. The input is
left-padded by k - stride samples (zeros, or ``initial_state`` (B, C_in, k - stride)), so output
frame t covers padded samples [t*stride, t*stride + k) and ends at input sample (t+1)*stride - 1.
T = floor(L / stride) frames are produced. ``final_state`` is the k - stride padded-input samples
that precede the first unconsumed input sample T*stride; when L is not a multiple of stride the
caller re-feeds x[..., T*stride:] in front of the next chunk (nn.CausalConv1d does).
y = act(conv + bias) with act in {None, "silu", "gelu" (erf)}.

causal_conv1d_update: stride-1 streaming step. x (B, C_in, t), state (B, C_in, k-1) updated in
place (or a pool (S, C_in, k-1) addressed by ``state_indices`` (B,), where index -1 is a padding
slot whose output is zero and whose state is untouched).

Half and bfloat16 inputs are computed in float32 and rounded once at the end; float64 stays float64.
The backward uses torch.nn.grad's conv gradients (recomputing the pre-activation when fused).
"""
import torch
import torch.nn.functional as F

from .._cpu_threads import threads_for

ACTIVATIONS = (None, "silu", "gelu")


def _cdtype(dt):
    return torch.float64 if dt == torch.float64 else torch.float32


def _act(y, activation):
    if activation is None:
        return y
    if activation == "silu":
        return F.silu(y)
    if activation == "gelu":
        return F.gelu(y)
    raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")


def supports_forward(**_):
    return None


def supports_backward(**_):
    return None


def supports_update(**_):
    return None


def _flops(x, weight, stride):
    return 2.0 * x.shape[0] * weight.numel() * max(1, x.shape[-1] // stride)


def forward(x, weight, bias, initial_state, stride, groups, activation):
    """Returns (y (B, C_out, L // stride), final_state (B, C_in, k - stride)) in x's dtype.
    On CPU the thread count follows pyencoder._cpu_threads (a small streaming step: 1 thread)."""
    with threads_for(_flops(x, weight, stride), x.device):
        return _forward(x, weight, bias, initial_state, stride, groups, activation)


def _forward(x, weight, bias, initial_state, stride, groups, activation):
    B, C, L = x.shape
    k = weight.shape[-1]
    pad = k - stride
    cdt = _cdtype(x.dtype)
    xc = x.to(cdt)
    if initial_state is None:
        xp = F.pad(xc, (pad, 0))
    else:
        xp = torch.cat((initial_state.to(cdt), xc), dim=-1)
    T = L // stride
    if T > 0:
        b = None if bias is None else bias.to(cdt)
        if _few_frames_grouped(xp, weight, groups, B * T):
            y = _grouped_matmul(xp, weight.to(cdt), b, stride, groups, T)
        else:
            y = F.conv1d(xp, weight.to(cdt), b, stride=stride, groups=groups)
        y = _act(y, activation)
    else:
        y = xp.new_zeros(B, weight.shape[0], 0)
    final = xp[..., T * stride: T * stride + pad]
    return y.to(x.dtype), final.to(x.dtype, copy=True).contiguous()


def _few_frames_grouped(xp, weight, groups, frames):
    """Whether a CPU conv is computed as one batched matrix product instead of F.conv1d: a grouped
    conv (>= 8 input channels a group) with a wide kernel (k >= 16) and few output frames
    (B * T <= 32), as a streaming step of wav2vec2's positional conv (768 channels, 16 groups,
    k = 128, 1-5 frames). oneDNN's grouped conv takes 3.5 ms for 4 such frames on the 2-core CI
    machine with the weight in cache (8.5 ms cold, in the streaming demo), the product 1.0 ms; it
    loses at 128 frames, for depthwise convs (1-channel groups: tiny matrices) and for groups=1
    k=3 (the feature extractor)."""
    return (xp.device.type == "cpu" and groups > 1 and weight.shape[1] >= 8
            and weight.shape[-1] >= 16 and frames <= 32)


def _grouped_matmul(xp, weight, bias, stride, groups, T):
    """F.conv1d(xp, weight, bias, stride, groups) as (G, Og, Cg*k) @ (G, Cg*k, B*T): the padded
    input's windows unfolded (B*T*C*k values, a small copy at few frames) against the weight's
    own memory. The same products as the conv, summed in another order (fp32 rounding)."""
    B, C, _ = xp.shape
    Co, Cg, k = weight.shape
    cols = xp.unfold(-1, k, stride)[:, :, :T]                       # (B, C, T, k)
    cols = cols.reshape(B, groups, Cg, T, k).permute(1, 2, 4, 0, 3).reshape(groups, Cg * k, B * T)
    y = torch.bmm(weight.reshape(groups, Co // groups, Cg * k), cols)
    y = y.reshape(Co, B, T).permute(1, 0, 2).contiguous()
    return y if bias is None else y + bias[:, None]


def _act_grad(pre, activation):
    if activation == "silu":
        sg = torch.sigmoid(pre)
        return sg * (1 + pre * (1 - sg))
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(pre * 0.7071067811865476))
        pdf = torch.exp(-0.5 * pre * pre) * 0.3989422804014327
        return cdf + pre * pdf
    raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")


def backward(grad_y, grad_final_state, x, weight, bias, initial_state, stride, groups, activation):
    """Returns (dx, dweight, dbias or None, dinitial_state or None).

    Plain-torch gradients (torch.nn.grad.conv1d_input / conv1d_weight) of the forward above; the
    pre-activation is recomputed when an activation is fused."""
    B, C, L = x.shape
    k = weight.shape[-1]
    pad = k - stride
    cdt = _cdtype(x.dtype)
    xc = x.to(cdt)
    wc = weight.to(cdt)
    xp = F.pad(xc, (pad, 0)) if initial_state is None else torch.cat(
        (initial_state.to(cdt), xc), dim=-1)
    T = L // stride
    g = grad_y.to(cdt)
    if T > 0 and activation is not None:
        pre = F.conv1d(xp, wc, None if bias is None else bias.to(cdt), stride=stride,
                       groups=groups)
        g = g * _act_grad(pre, activation)
    if T > 0:
        dxp = torch.nn.grad.conv1d_input(xp.shape, wc, g, stride=stride, groups=groups)
        dw = torch.nn.grad.conv1d_weight(xp, wc.shape, g, stride=stride, groups=groups)
    else:
        dxp = torch.zeros_like(xp)
        dw = torch.zeros_like(wc)
    if grad_final_state is not None and pad > 0:
        dxp[..., T * stride: T * stride + pad] += grad_final_state.to(cdt)
    db = None if bias is None else g.sum(dim=(0, 2)).to(bias.dtype)
    ds = None if initial_state is None else dxp[..., :pad].to(initial_state.dtype, copy=True)
    return dxp[..., pad:].to(x.dtype).contiguous(), dw.to(weight.dtype), db, ds.contiguous() if ds is not None else None


def update(x, state, weight, bias, state_indices, groups, activation):
    """One streaming step at stride 1; updates ``state`` in place and returns y (B, C_out, t)."""
    B, C, t = x.shape
    k = weight.shape[-1]
    if state_indices is None:
        st = state
        valid = None
    else:
        idx = state_indices.to(device=state.device, dtype=torch.long)
        valid = idx >= 0
        st = state[idx.clamp(min=0)]
    y, final = forward(x, weight, bias, st, 1, groups, activation)
    if k > 1:
        if valid is None:
            state.copy_(final)
        else:
            vi = valid.nonzero().squeeze(-1)
            if vi.numel():
                state.index_copy_(0, idx[vi], final[vi].to(state.dtype))
    if valid is not None:
        y = torch.where(valid.view(B, 1, 1).to(y.device), y, torch.zeros_like(y))
    return y
