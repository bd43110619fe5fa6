"""Causal ("running") normalisation over time: the streamable replacement for wav2vec2-base's
GroupNorm(C, C) in conv layer 0, which normalises each channel over the whole utterance.

Frame t of a stream is normalised per channel by the mean and variance of frames 0..t of that
stream, accumulated in float64 (count, sum, sum of squares): y = (x - mean_t) / sqrt(var_t + eps),
then the affine weight and bias. Offline and streaming use the same function on the same
accumulators, so any chunking gives the offline result exactly (on CPU, where cumsum is
sequential). Time is processed in blocks sized so each float64 temporary is about 1 MiB
(B * C * block * 8 bytes, block in [32, 4096]): the ~15 passes per block then run in cache. On the
2-core CI machine (C=512) that is 3-8x faster than 4096-frame blocks (B=1, T=32000: 380 -> 105 ms;
B=8, T=8000: 1677 -> 209 ms). The block size does not change the result: the running sums are
carried across blocks through the same sequential cumsum.

On CUDA, where autograd does not record (inference, a frozen feature encoder, the streaming
step), the whole call is one Triton launch (pyencoder.ops._running_norm_triton: per slot and 16
channels, time in tiles scanned in float64; float64 sums in another order, so y agrees with the
torch path to the last bit of its dtype but for rare ties); with autograd recording the torch
path runs with blocks sized for the GPU (32 MiB temporaries, not the CPU's 1 MiB: those would be
~15 kernel launches per 32 frames of a batch of 8).

Non-finite input: a NaN / inf sample enters the channel's running sums, so that channel's output
is NaN from that frame to the end of the stream (offline: the rest of the utterance); other
channels and other slots are unaffected. Reset the slot (a fresh state) to recover. This is the
math of a cumulative statistic, not contained on purpose: skipping the sample would need
per-channel counts in the state and would silently change every later frame.
"""
import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_eps, check_int, check_module_input
from ..ops import _channel_norm_triton as _cn
from ..ops import _running_norm_triton as _rn
from ..streaming.state import (StreamState, SteadyCheck, advance_counter, check_init_args,
                               check_state, check_step_input, check_step_lengths, ends_stream,
                               fill_counter, _no_condition, stamp)

__all__ = ["running_norm", "running_norm_torch", "RunningGroupNorm", "RunningNormState",
           "LayerNorm", "frame_batch_norm"]

BLOCK = 4096          # the largest block (CPU)
_BLOCK_ELEMS = 1 << 17  # float64 elements per temporary (1 MiB: the CPU's cache)
# On a GPU the blocks only bound the temporaries' memory (32 MiB each); 1 MiB blocks would be
# ~15 small kernels per 32 frames of a batch of 8 (15,000 launches for 10 s of audio)
_GPU_BLOCK, _GPU_BLOCK_ELEMS = 1 << 16, 1 << 22


@dataclasses.dataclass
class RunningNormState(StreamState):
    stream_counters = ("count",)     # advanced by step_fixed (pyencoder.streaming.state)
    _added_fields = ("out_lengths",)  # a stream saved before it existed still loads
    count: torch.Tensor      # (B,) int64 frames seen
    total: torch.Tensor      # (B, C) float64 sum
    total_sq: torch.Tensor   # (B, C) float64 sum of squares
    # (B,) int64 frames emitted by the last step (= its frames in); None where the owner counts
    # them (ConvFeatureExtractor's state: no fill per step_fixed) and in the HF patch's offline
    # states (pyencoder.hf.frontend)
    out_lengths: Optional[torch.Tensor] = None


def running_norm(x, weight, bias, eps, count, total, total_sq, gelu=False):
    """x (B, C, T), count (B,) int64, total / total_sq (B, C) float64 ->
    (y (B, C, T) in out_dtype(x, weight), new total, new total_sq). ``count`` is not advanced
    here. On CUDA, where autograd does not record (inference, a frozen feature encoder), one Triton launch
    (pyencoder.ops._running_norm_triton); else the torch ops of ``running_norm_torch``.
    ``gelu``: y is the exact GELU of the normalised values (in the same launch on CUDA)."""
    if _rn.fused_ok(x, weight, total):
        total, total_sq = total.clone(), total_sq.clone()
        y = _rn.running_norm_step(x, weight, bias, eps, count, total, total_sq, offline=True,
                                  gelu=gelu)
        return y, total, total_sq
    y, total, total_sq = running_norm_torch(x, weight, bias, eps, count, total, total_sq)
    return (F.gelu(y) if gelu else y), total, total_sq


def out_dtype(x, weight):
    """The dtype of y: x's, promoted with the affine parameters' (the normalised frames in x's
    dtype times weight, plus bias: a half x with float32 parameters gives float32, as torch's
    ops under autocast do), for every path (empty, ragged, flush) alike."""
    return x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)


def running_norm_torch(x, weight, bias, eps, count, total, total_sq):
    """``running_norm`` in torch ops (differentiable), time in blocks (module docstring)."""
    ys = []
    B, C, T = x.shape
    if x.device.type == "cuda":
        blk = max(32, min(_GPU_BLOCK, _GPU_BLOCK_ELEMS // max(1, B * C)))
    else:
        blk = max(32, min(BLOCK, _BLOCK_ELEMS // max(1, B * C)))
    # traced (torch.compile, export): one block, as a Python loop over blocks specialised the
    # graph to T (a recompile per length); Dynamo shows a dynamic T as an int, hence the first
    symbolic = torch.compiler.is_compiling() or isinstance(T, torch.SymInt)
    if T == 0:      # no frames (the traced single block indexed the empty sums' last column)
        return x.new_empty(x.shape, dtype=out_dtype(x, weight)), total, total_sq
    for t0 in ((0,) if symbolic else range(0, T, blk)):
        t1 = T if symbolic else min(T, t0 + blk)
        xd = x[..., t0:t1].to(torch.float64)
        s = torch.cumsum(torch.cat((total[..., None], xd), -1), -1)[..., 1:]
        ss = torch.cumsum(torch.cat((total_sq[..., None], xd * xd), -1), -1)[..., 1:]
        n = (count[:, None] + 1 + t0 + torch.arange(t1 - t0, device=x.device)[None, :]).to(
            torch.float64)[:, None, :]
        mean = s / n
        var = (ss / n - mean * mean).clamp_min(0.0)
        y = ((xd - mean) * torch.rsqrt(var + eps)).to(x.dtype)
        if weight is not None:
            y = y * weight[:, None] + bias[:, None]
        ys.append(y)
        total, total_sq = s[..., -1], ss[..., -1]
    return (ys[0] if len(ys) == 1 else torch.cat(ys, -1)), total, total_sq


class RunningGroupNorm(nn.Module):
    """Per-channel causal normalisation with cumulative float64 statistics (see module doc).
    Streams through init_state / step(x, state, lengths) / flush (no lookahead: flush emits
    nothing and ends the stream)."""
    stream_time_axis = -1      # chunks (B, C, n)

    hop = 1
    lookahead = 0

    def __init__(self, num_channels, eps=1e-5, affine=True):
        super().__init__()
        check_int("num_channels", num_channels, min_value=1)
        check_eps("eps", eps)
        self.num_channels, self.eps = num_channels, eps
        self.weight = nn.Parameter(torch.ones(num_channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels)) if affine else None

    def forward(self, x, gelu=False):
        """x (B, C, T) -> the running-normalised x (``gelu``: its exact GELU, one launch on
        CUDA where autograd does not record)."""
        check_module_input(x, 1, self.num_channels, f"(B, {self.num_channels}, T)", self.weight,
                           same_dtype=False)
        B, C, T = x.shape
        z = x.new_zeros(B, C, dtype=torch.float64)
        return running_norm(x, self.weight, self.bias, self.eps,
                            torch.zeros(B, dtype=torch.int64, device=x.device), z, z,
                            gelu=gelu)[0]

    def extra_repr(self):
        return f"{self.num_channels}, eps={self.eps}, affine={self.weight is not None}"

    def init_state(self, batch_size, *, device=None, dtype=None, **_):
        check_init_args(batch_size, dtype, device)
        device = (self.weight.device if self.weight is not None else None) if device is None \
            else device
        z = torch.zeros(batch_size, self.num_channels, dtype=torch.float64, device=device)
        count = torch.zeros(batch_size, dtype=torch.int64, device=device)
        st = RunningNormState(count=count, total=z, total_sq=z.clone(),
                              out_lengths=torch.zeros_like(count))
        # the dtype of the frames (flush's empty output; each step records its input's)
        st.out_dtype = dtype if dtype is not None else \
            self.weight.dtype if self.weight is not None else torch.get_default_dtype()
        return stamp(self, st)

    def step(self, x, state, lengths=None, gelu=False):
        """Feed x (B, C, n); returns (y, state) (``gelu``: the exact GELU of the normalised
        frames, as ``forward``)."""
        check_state(self, state, RunningNormState)
        check_step_input(x, 1, self.num_channels, state.count.shape[0], state.total.device)
        B, C, n = x.shape
        given = lengths
        lengths = check_step_lengths(lengths, B, n, x.device)
        if bool((lengths == n).all()):
            y, state.total, state.total_sq = running_norm(x, self.weight, self.bias, self.eps,
                                                          state.count, state.total,
                                                          state.total_sq, gelu=gelu)
        else:
            y = torch.zeros(x.shape, dtype=out_dtype(x, self.weight), device=x.device)
            tot, tsq = state.total.clone(), state.total_sq.clone()
            for b in range(B):
                L = int(lengths[b])
                yb, t1, t2 = running_norm(x[b:b + 1, :, :L], self.weight, self.bias, self.eps,
                                          state.count[b:b + 1], state.total[b:b + 1],
                                          state.total_sq[b:b + 1], gelu=gelu)
                y[b, :, :L] = yb[0]
                tot[b], tsq[b] = t1[0], t2[0]
            state.total, state.total_sq = tot, tsq
        state.count = state.count + lengths
        if state.out_lengths is not None:
            # the caller's own tensor is copied: step_fixed's in-place fill of out_lengths would
            # otherwise overwrite it
            state.out_lengths = lengths if given is None else lengths.clone()
        state.out_dtype = y.dtype
        return y, state

    def steady_check(self, n, state):
        """pyencoder.streaming.state.SteadyCheck of a step of n >= 1 frames per slot: always the
        fixed step (no lookahead, no phase), nothing to check on the device. Without it a chain
        holding the norm never ran its steady step and ``admit`` refused it."""
        if n < 1 or state.count.shape[0] == 0:
            return None
        return SteadyCheck(n, _no_condition, ())

    def step_fixed(self, x, state, check=False, gelu=False):
        """CUDA-graph friendly step: every slot gets the same n frames; the statistics are
        updated in place, without host synchronisation (``check`` is accepted for the
        step_fixed protocol: there is no precondition). Returns y, equal to ``step``'s
        (``gelu``: its exact GELU). On CUDA (float16 / bfloat16 / float32, autograd not
        recording) one Triton launch (pyencoder.ops._running_norm_triton: the float64 sums added
        in another order, y equal to its dtype's last bit but for rare ties; the GELU in the
        same launch); elsewhere the torch ops of ``step``."""
        check_state(self, state, RunningNormState)
        check_step_input(x, 1, self.num_channels, state.count.shape[0], state.total.device)
        if _rn.fused_ok(x, self.weight, state.total):
            # one Triton launch (CUDA): statistics, normalisation, affine, GELU and the sums'
            # update
            y = _rn.running_norm_step(x, self.weight, self.bias, self.eps, state.count,
                                      state.total, state.total_sq, gelu=gelu)
        else:
            y, total, total_sq = running_norm_torch(x, self.weight, self.bias, self.eps,
                                                    state.count, state.total, state.total_sq)
            if gelu:
                y = F.gelu(y)
            if x.shape[-1]:
                state.total.copy_(total)
                state.total_sq.copy_(total_sq)
        advance_counter(state.count, x.shape[-1])
        if state.out_lengths is not None:
            fill_counter(state, x.shape[-1])
        state.out_dtype = y.dtype
        return y

    @ends_stream
    def flush(self, state):
        """Ends the stream: nothing is held back, so nothing is emitted ((B, C, 0) frames)."""
        check_state(self, state, RunningNormState)
        B = state.count.shape[0]
        state.out_lengths = torch.zeros_like(state.count)
        dt = getattr(state, "out_dtype", None) or (
            self.weight.dtype if self.weight is not None else torch.get_default_dtype())
        return state.total.new_zeros(B, self.num_channels, 0, dtype=dt), state


def frame_batch_norm(bn, x):
    """``bn`` (an ``nn.BatchNorm1d`` over the channels of x (B, C, T)) with its running statistics
    in training mode too: per frame, so causal and the same offline, streaming and in training
    (HuBERT's BatchNorm before the causal positional conv). In training mode BatchNorm normalises
    with statistics over every frame of the batch, the future ones and the other clips included
    (a patched model's frame 0 moved 0.15 when audio 3000 samples later changed); here its weight
    and bias train and its statistics stay the pretrained ones (not updated)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{type(bn).__name__}(track_running_stats=False) has no running "
                         f"statistics: it normalises over time, which a causal model cannot")
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                        bn.eps)


class LayerNorm(nn.LayerNorm):
    """Drop-in ``nn.LayerNorm`` (same parameters and state_dict keys) that reads a transposed
    input as it lies: a (B, T, C) input that is the transposed view of a (B, C, T) tensor (a
    conv's output after ``pyencoder.nn.Transpose``), normalised over C, is one Triton launch on
    CUDA (pyencoder.ops._channel_norm_triton) where torch's layer_norm first copies the view to
    contiguous (a pass over the whole activation offline, a kernel per streaming step). Returns
    the contiguous (B, T, C) result torch would; float32 statistics in another order (equal to
    the last bit of the dtype but for rare ties). Any other input, autograd recording, or no
    kernel: ``nn.LayerNorm``'s forward."""

    def forward(self, x):
        if x.dim() == 3 and x.stride(1) == 1 and x.shape[1] > 1 and \
                tuple(self.normalized_shape) == (x.shape[2],):
            xt = x.transpose(1, 2)
            if _cn.fused_ok(xt, self.weight, self.bias):
                return _cn.channel_norm_act(xt, self.weight, self.bias, self.eps, gelu=False,
                                            time_major=True).transpose(1, 2)
        return super().forward(x)
