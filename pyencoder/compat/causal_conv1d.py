"""causal-conv1d's Python API on pyencoder's depthwise causal conv (any width >= 1).

Drop-in for ``causal_conv1d.causal_conv1d_fn`` / ``causal_conv1d_update`` (Dao-AILab, v1.6):
same names, argument order, shapes and semantics; the conv itself is
``pyencoder.ops.causal_conv1d`` / ``causal_conv1d_update`` with ``groups = dim`` and
``weight.unsqueeze(1)``, so the backend (reference on CPU, Triton/CUDA on GPU) is chosen as for
every pyencoder op (``pyencoder.use_backend`` forces one).

causal_conv1d_fn(x (batch, dim, seqlen), weight (dim, width), bias (dim,), seq_idx (batch,
seqlen) int, initial_states (batch, dim, width - 1), return_final_states, final_states_out
(batch, dim, width - 1), activation None | "silu" | "swish")
    out[b, c, t] = act(bias[c] + sum_w weight[c, w] * xp[b, c, t + w]) with xp = x left-padded by
    width - 1 zeros or ``initial_states``. With ``seq_idx`` (packed varlen batches): tap w of
    output t only counts when seq_idx[b, t - width + 1 + w] == seq_idx[b, t] (positions before 0
    never match), and outputs with seq_idx < 0 (padding) are 0. ``final_states`` are the last
    width - 1 entries of cat(initial_states or zeros, x); ``final_states_out`` is written in place
    and returned. Differentiable in x, weight, bias and initial_states (and through the returned
    final states). The output has x's memory layout (channel-last x gives channel-last out).

causal_conv1d_update(x (batch, dim) or (batch, dim, seqlen), conv_state (batch or n_slots, dim,
state_len >= width - 1), weight, bias, activation, cache_seqlens (batch,) int,
conv_state_indices (batch,) int)
    Streaming step; ``conv_state`` is updated in place.
    - cache_seqlens None: the last width - 1 columns of conv_state are the history; afterwards
      conv_state holds the last state_len columns of cat(conv_state, x).
    - cache_seqlens given: conv_state is a ring buffer; with p = cache_seqlens[b] % state_len the
      history is columns (p - width + 1 .. p - 1) mod state_len, and x[:, :, i] is written to
      column (p + i) mod state_len (when seqlen > state_len the last writes win). The caller
      advances cache_seqlens (this function does not).
    - conv_state_indices given: row b reads and writes slot conv_state_indices[b]; a negative
      index is padding (vLLM's PAD_SLOT_ID = -1): output 0, no slot touched. cache_seqlens is
      indexed by batch row, not by slot.
    Gradients flow to x, weight and bias; conv_state is a buffer (read without gradient).

Differences from causal-conv1d, all widening what it accepts: any width >= 1 (it: 2..4); float64;
any layout for x, states and final_states_out (it: channel-last x for initial/final states and
seq_idx); int64 index tensors as well as int32; weight/bias dtypes may differ from x's (computed
in the promoted dtype, returned in x's), under autocast too (as causal-conv1d, which does not
autocast: the final states are x's values exactly, one precision on every update path). Bad arguments raise ValueError/TypeError naming the
argument where causal-conv1d asserts (NotImplementedError for a bad activation becomes
ValueError); so do duplicate slots in conv_state_indices (undefined there).

How the features our ops lack are built here (plain torch around one op call; a fused kernel
would skip the extra memory passes):
- seq_idx: each run of equal seq_idx gets its own copy of the width - 1 samples before it, masked
  to the run's id, in a re-packed sequence (length seqlen + (width - 1) * runs); one op call with
  zero initial state convolves it, the run outputs are gathered back. gather/where keep autograd
  exact. Costs a host sync (the number of runs) and two gathers.
- cache_seqlens, state_len > width - 1, mixed dtypes or autograd in the update: the history is
  gathered into linear order, the conv runs as ``ops.causal_conv1d`` with that history as
  initial state, and the new columns are scattered back. The common case (no ring, state_len ==
  width - 1, one dtype, no autograd) calls ``ops.causal_conv1d_update`` in place directly.
"""
import torch

from .. import ops
from .._checks import autocasting, check_writable

__all__ = ["causal_conv1d_fn", "causal_conv1d_update"]

_ACTIVATIONS = (None, "silu", "swish")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _activation(activation):
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be None, 'silu' or 'swish'; got {activation!r}")
    return None if activation is None else "silu"


def _tensor(name, t, ndim):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must be {ndim}-D; got shape {tuple(t.shape)}")


def _float(name, t, x):
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must have a floating dtype in {[str(d) for d in _FLOATS]}; got "
                        f"{t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device ({x.device}); got {t.device}")


def _shape(name, t, shape, what):
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {what} = {tuple(shape)}; got {tuple(t.shape)}")


def _index(name, t, batch, x):
    if t is None:
        return None
    _tensor(name, t, 1)
    if t.dtype.is_floating_point or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int32 as in causal-conv1d); got "
                        f"{t.dtype}")
    if t.shape[0] != batch:
        raise ValueError(f"{name} must have shape (batch,) = ({batch},); got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device ({x.device}); got {t.device}")
    return t.long()


def _weights(x, weight, bias):
    """Validates (dim, width) weight and (dim,) bias; returns compute dtype, (dim, 1, width)
    weight and bias in that dtype."""
    dim = x.shape[1]
    if dim == 0:
        raise ValueError(f"x must have at least one channel (dim >= 1); got shape "
                         f"{tuple(x.shape)}")
    _tensor("weight", weight, 2)
    _float("weight", weight, x)
    if weight.shape[0] != dim or weight.shape[1] < 1:
        raise ValueError(f"weight must have shape (dim, width) = ({dim}, width >= 1) for x with "
                         f"dim={dim}; got {tuple(weight.shape)}")
    cdt = torch.promote_types(x.dtype, weight.dtype)
    if bias is not None:
        _tensor("bias", bias, 1)
        _float("bias", bias, x)
        _shape("bias", bias, (dim,), "(dim,)")
        cdt = torch.promote_types(cdt, bias.dtype)
        bias = bias.to(cdt)
    return cdt, weight.to(cdt).unsqueeze(1), bias


def _like_layout(y, x):
    """y in x's memory layout (channel-last x: stride(1) == 1 along dim with seqlen > 1)."""
    if x.dim() == 3 and x.shape[2] > 1 and x.shape[1] > 1 and x.stride(1) == 1 \
            and y.stride(1) != 1:
        return y.transpose(1, 2).contiguous().transpose(1, 2)
    return y


def _varlen_conv(x, w3, bias, activation, seq_idx):
    """Depthwise causal conv that never mixes positions with different seq_idx (see header)."""
    B, D, L = x.shape
    h = w3.shape[-1] - 1
    if L == 0:
        return x.new_empty(B, D, 0)
    sid = seq_idx
    if x.is_meta or sid.is_meta:   # shapes only: the re-pack's length is data-dependent
        return x.new_empty(B, D, L, dtype=torch.promote_types(x.dtype, w3.dtype))
    if h == 0 or B == 0:      # (an empty batch has no runs to separate)
        y = ops.causal_conv1d(x, w3, bias, groups=D, activation=activation)
    else:
        dev = x.device
        starts = torch.ones(B, L, dtype=torch.bool, device=dev)
        starts[:, 1:] = sid[:, 1:] != sid[:, :-1]
        run = starts.long().cumsum(1)                       # 1-based run number, (B, L)
        nruns = run[:, -1]
        max_runs = int(nruns.max())
        Ln = L + h * max_runs
        t = torch.arange(L, device=dev)
        newpos = t + h * run                                 # slot of x[:, :, t] in the re-pack
        bi, ti = starts.nonzero(as_tuple=True)
        seg = torch.zeros(B, Ln, dtype=torch.long, device=dev)
        seg[bi, ti + h * (run[bi, ti] - 1)] = 1
        seg = seg.cumsum(1)                                  # segment (run) number of each slot
        run_id = torch.zeros(B, max_runs, dtype=sid.dtype, device=dev)
        run_id[bi, run[bi, ti] - 1] = sid[bi, ti]
        p = torch.arange(Ln, device=dev)
        src = p - h * seg
        src_c = src.clamp(0, L - 1)
        keep = (src >= 0) & (src < L) & (sid.gather(1, src_c) == run_id.gather(1, seg - 1))
        xn = x.gather(2, src_c.unsqueeze(1).expand(B, D, Ln))
        xn = torch.where(keep.unsqueeze(1), xn, xn.new_zeros(()))
        yn = ops.causal_conv1d(xn, w3, bias, groups=D, activation=activation)
        y = yn.gather(2, newpos.unsqueeze(1).expand(B, D, L))
    return torch.where((sid >= 0).unsqueeze(1), y, y.new_zeros(()))


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None,
                     return_final_states=False, final_states_out=None, activation=None):
    """x: (batch, dim, seqlen); weight: (dim, width); bias: (dim,); seq_idx: (batch, seqlen) int;
    initial_states: (batch, dim, width - 1); final_states_out: (batch, dim, width - 1), written
    to; activation: None, "silu" or "swish". Returns out (batch, dim, seqlen), or
    (out, final_states) with ``return_final_states``. See the module docstring."""
    if autocasting(x):      # as causal-conv1d (no autocast): the promoted dtype, exact states
        with torch.autocast(x.device.type, enabled=False):
            return causal_conv1d_fn(x, weight, bias, seq_idx, initial_states, return_final_states,
                                    final_states_out, activation)
    act = _activation(activation)
    _tensor("x", x, 3)
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must have a floating dtype in {[str(d) for d in _FLOATS]}; got "
                        f"{x.dtype}")
    B, D, L = x.shape
    cdt, w3, b = _weights(x, weight, bias)
    width = w3.shape[-1]
    if not isinstance(return_final_states, bool):
        raise TypeError(f"return_final_states must be a bool; got {return_final_states!r}")
    xc = x.to(cdt)
    if seq_idx is not None:
        if initial_states is not None:
            raise ValueError("initial_states must be None when seq_idx is given (as in "
                             "causal-conv1d)")
        if return_final_states:
            raise ValueError("return_final_states must be False when seq_idx is given (as in "
                             "causal-conv1d: final states of packed sequences are not returned)")
        _tensor("seq_idx", seq_idx, 2)
        if seq_idx.dtype.is_floating_point or seq_idx.is_complex() or seq_idx.dtype == torch.bool:
            raise TypeError(f"seq_idx must be an integer tensor (int32 as in causal-conv1d); got "
                            f"{seq_idx.dtype}")
        _shape("seq_idx", seq_idx, (B, L), "(batch, seqlen)")
        if seq_idx.device != x.device:
            raise ValueError(f"seq_idx must be on x's device ({x.device}); got {seq_idx.device}")
        y = _varlen_conv(xc, w3, b, act, seq_idx.long())
        return _like_layout(y.to(x.dtype), x)
    init = None
    if initial_states is not None:
        _tensor("initial_states", initial_states, 3)
        _float("initial_states", initial_states, x)
        _shape("initial_states", initial_states, (B, D, width - 1), "(batch, dim, width - 1)")
        init = initial_states.to(cdt)
    # (without return_final_states, final_states_out is ignored, as causal-conv1d ignores it)
    if return_final_states and final_states_out is not None:
        _tensor("final_states_out", final_states_out, 3)
        _float("final_states_out", final_states_out, x)
        if final_states_out.dtype != x.dtype:
            raise TypeError(f"final_states_out must have x's dtype ({x.dtype}), the final states' "
                            f"dtype; got {final_states_out.dtype}")
        _shape("final_states_out", final_states_out, (B, D, width - 1),
               "(batch, dim, width - 1)")
        check_writable("final_states_out", final_states_out)
    y, final = ops.causal_conv1d(xc, w3, b, groups=D, activation=act, initial_state=init,
                                 return_final_state=True)
    y = _like_layout(y.to(x.dtype), x)
    if not return_final_states:
        return y
    final = final.to(x.dtype)
    if final_states_out is None:
        return y, final
    return y, final_states_out.copy_(final)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):
    """x: (batch, dim) or (batch, dim, seqlen); conv_state: (batch, dim, state_len) or, with
    ``conv_state_indices``, (n_slots, dim, state_len), state_len >= width - 1, updated in place;
    weight: (dim, width); bias: (dim,); cache_seqlens: (batch,) int (ring-buffer positions);
    conv_state_indices: (batch,) int (negative: padding row). Returns out shaped like x. See the
    module docstring."""
    if autocasting(x):      # as causal-conv1d (no autocast): one precision on every path
        with torch.autocast(x.device.type, enabled=False):
            return causal_conv1d_update(x, conv_state, weight, bias, activation, cache_seqlens,
                                        conv_state_indices)
    act = _activation(activation)
    _tensor("x", x, (2, 3))
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must have a floating dtype in {[str(d) for d in _FLOATS]}; got "
                        f"{x.dtype}")
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(-1) if squeeze else x
    B, D, L = x3.shape
    cdt, w3, b = _weights(x3, weight, bias)
    width = w3.shape[-1]
    h = width - 1
    _tensor("conv_state", conv_state, 3)
    if conv_state.dtype != x.dtype:
        raise TypeError(f"conv_state must have x's dtype ({x.dtype}); got {conv_state.dtype}")
    if conv_state.device != x.device:
        raise ValueError(f"conv_state must be on x's device ({x.device}); got "
                         f"{conv_state.device}")
    check_writable("conv_state", conv_state)
    S = conv_state.shape[2]
    if conv_state.shape[1] != D or S < h:
        raise ValueError(f"conv_state must have shape (batch, dim, state_len >= width - 1) = "
                         f"(.., {D}, >= {h}); got {tuple(conv_state.shape)}")
    idx = _index("conv_state_indices", conv_state_indices, B, x)
    seqlens = _index("cache_seqlens", cache_seqlens, B, x)
    if idx is None:
        if conv_state.shape[0] != B:
            raise ValueError(f"conv_state must have batch ({B}) rows when conv_state_indices is "
                             f"None; got shape {tuple(conv_state.shape)}")
    elif B and not idx.is_meta:    # (value checks read the device; a meta index has none)
        hi = int(idx.max())
        if hi >= conv_state.shape[0]:
            raise ValueError(f"conv_state_indices values must be < conv_state.shape[0] "
                             f"({conv_state.shape[0]}) (negative: padding); got max {hi}")
        used = idx[idx >= 0]
        if used.numel() != used.unique().numel():
            raise ValueError(f"conv_state_indices must not repeat a slot (two rows would write "
                             f"one state; negative padding may repeat); got {idx.tolist()}")
    if seqlens is not None and B and not seqlens.is_meta and int(seqlens.min()) < 0:
        raise ValueError(f"cache_seqlens must be >= 0; got min {int(seqlens.min())}")
    if L == 0:
        raise ValueError(f"x must hold at least one new frame; got shape {tuple(x.shape)}")

    # conv_state is read without gradient on every path: a state that requires grad (the final
    # states of a training graph) takes the general path, whose reads are detached (the fast
    # path's op has no formula for it: its backward failed naming no argument)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, conv_state))
    if (seqlens is None and S == h and h > 0 and cdt == x.dtype and not needs_grad):
        pool_idx = None if idx is None else idx.clamp(min=-1)
        y = ops.causal_conv1d_update(x3, conv_state, w3, b, groups=D, activation=act,
                                     state_indices=pool_idx)
        return y.squeeze(-1) if squeeze else y

    valid = None if idx is None else idx >= 0
    with torch.no_grad():
        rows = conv_state if idx is None else conv_state[idx.clamp(min=0)]
        pos = None if seqlens is None or S == 0 else seqlens % S
        if h == 0:
            hist = None
        elif seqlens is None:
            hist = rows[:, :, S - h:].clone()
        else:
            cols = (pos.unsqueeze(1) + torch.arange(-h, 0, device=x.device)) % S
            hist = rows.gather(2, cols.unsqueeze(1).expand(B, D, h))
    y = ops.causal_conv1d(x3.to(cdt), w3, b, groups=D, activation=act,
                          initial_state=None if hist is None else hist.to(cdt))
    y = y.to(x.dtype)
    if valid is not None:
        y = torch.where(valid.view(B, 1, 1), y, y.new_zeros(()))
    if S > 0:
        with torch.no_grad():
            xd = x3.detach()
            if seqlens is None:
                new = torch.cat((rows, xd), dim=2)[:, :, -S:]
            else:
                n = min(L, S)
                cols = (pos.unsqueeze(1) + torch.arange(L - n, L, device=x.device)) % S
                new = rows.scatter_(2, cols.unsqueeze(1).expand(B, D, n), xd[:, :, L - n:])
            if idx is None:
                if new is not conv_state:
                    conv_state.copy_(new)
            elif not idx.is_meta:         # (a meta index: shapes only, nothing to write)
                sel = valid.nonzero().squeeze(-1)
                if sel.numel():
                    conv_state.index_copy_(0, idx[sel], new[sel])
    y = _like_layout(y, x3)
    return y.squeeze(-1) if squeeze else y
