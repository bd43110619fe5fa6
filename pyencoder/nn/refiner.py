"""Refiner: FocalCodec-Stream's chunk-wise residual feed-forward.

The sequence (B, T, E) is cut into chunks of C frames (the last one zero-padded), each chunk is
flattened to C * E features and refined by a residual MLP, y = x + W2 act(W1 flat(x) + b1) + b2,
reshaped back and cropped to T. A frame's output depends on its whole chunk, so the latency is
C - 1 frames (the first frame of a chunk waits for the last).

Streaming: frames are buffered until a chunk is complete; ``flush`` zero-pads the incomplete last
chunk exactly as the offline forward does, so step + flush outputs equal forward.
"""
import dataclasses

import torch
from torch import nn

from ..streaming.state import (StreamState, SteadyCheck, check_init_args, check_state,
                               check_step_input, check_step_lengths, ends_stream, fill_counter,
                               fixed_index, inference_step, stamp)
from .._checks import check_int, check_module_input
from .linear import Linear

__all__ = ["Refiner", "RefinerState"]


@dataclasses.dataclass
class RefinerState(StreamState):
    buf: torch.Tensor          # (B, C, E) frames of the incomplete chunk
    count: torch.Tensor        # (B,) int64 frames in buf
    out_lengths: torch.Tensor  # (B,) int64

    def _invalid(self):
        if self.count.numel() and int(self.count.max()) > self.buf.shape[1]:
            return f"count {self.count.tolist()} exceeds the chunk buffer ({self.buf.shape[1]})"
        return None


class Refiner(nn.Module):
    """FocalCodec-Stream's chunk-wise residual MLP over chunks of ``chunk_size`` frames of
    (B, T, ``embed_dim``) inputs; lookahead chunk_size - 1 frames; streams (module docstring)."""
    def __init__(self, embed_dim, chunk_size, hidden_dim=None, activation=None, bias=True):
        super().__init__()
        check_int("embed_dim", embed_dim, min_value=1)
        check_int("chunk_size", chunk_size, min_value=1)
        check_int("hidden_dim", hidden_dim, min_value=1, allow_none=True)
        self.embed_dim, self.chunk_size = embed_dim, chunk_size
        flat = embed_dim * chunk_size
        hidden_dim = flat if hidden_dim is None else hidden_dim
        self.fc1 = Linear(flat, hidden_dim, bias=bias)
        if activation is not None and not isinstance(activation, nn.Module):
            raise TypeError(f"activation must be None (GELU) or an nn.Module (e.g. nn.SiLU()); "
                            f"got {type(activation).__name__} {activation!r}")
        self.act = nn.GELU() if activation is None else activation
        self.fc2 = Linear(hidden_dim, flat, bias=bias)

    @property
    def lookahead(self):
        return self.chunk_size - 1

    hop = 1

    @property
    def period(self):
        return self.chunk_size

    def last_input(self, t):
        """The last frame that frame t needs: the end of its chunk (exact latency composition,
        streaming.latency: declaring only the worst case, chunk - 1, overstated a chain of two
        chunk-periodic modules, e.g. 4 frames for two Refiners of 3 that need 2)."""
        c = self.chunk_size
        return (t // c + 1) * c - 1

    def _refine(self, chunks):
        B, N, C, E = chunks.shape
        flat = chunks.reshape(B, N, C * E)
        return (flat + self.fc2(self.act(self.fc1(flat)))).view(B, N, C, E)

    def _check_dtype(self, x):
        """A step's chunk in the weights' dtype, as forward requires (it returned float64 from a
        float32 module): forward's own check."""
        check_module_input(x, 2, self.embed_dim, f"(B, n, {self.embed_dim})", self.fc1.weight)

    def forward(self, x):
        check_module_input(x, 2, self.embed_dim, f"(B, T, {self.embed_dim})", self.fc1.weight)
        B, T, E = x.shape
        C = self.chunk_size
        N = -(-T // C)
        xp = torch.nn.functional.pad(x, (0, 0, 0, N * C - T))
        return self._refine(xp.view(B, N, C, E)).reshape(B, N * C, E)[:, :T]

    def extra_repr(self):
        return f"embed_dim={self.embed_dim}, chunk_size={self.chunk_size}"

    def init_state(self, batch_size, *, device=None, dtype=None, **_):
        check_init_args(batch_size, dtype, device, self)
        device = self.fc1.weight.device if device is None else torch.device(device)
        dtype = self.fc1.weight.dtype if dtype is None else dtype
        zi = lambda: torch.zeros(batch_size, dtype=torch.int64, device=device)  # noqa: E731
        return stamp(self, RefinerState(buf=torch.zeros(batch_size, self.chunk_size, self.embed_dim,
                                                        device=device, dtype=dtype), count=zi(),
                                        out_lengths=zi()))

    def step(self, x, state, lengths=None):
        check_state(self, state, RefinerState)
        check_step_input(x, -1, self.embed_dim, state.count.shape[0], state.buf.device)
        self._check_dtype(x)
        if lengths is not None:
            lengths = check_step_lengths(lengths, x.shape[0], x.shape[1], x.device)
        state.out_dtype = x.dtype     # frames come out in the input's dtype (flush's too)
        return self._run(x, state, lengths, final=False)

    def steady_check(self, n, state):
        """pyencoder.streaming.state.SteadyCheck of a step of n frames: n whole chunks (n frames
        out whatever each slot holds of its next chunk), nothing to check on the device."""
        if n < 1 or n % self.chunk_size or state.count.shape[0] == 0:
            return None
        return SteadyCheck(n, lambda: None, ())

    def _seq_index(self, state, n, device):
        """Slot b's sequence for a fixed step of n frames: its count_b held frames
        (buf[:count_b]), then x: positions in cat(buf, x) (B, n + C) (those past its n + count_b
        frames clamped), and which rows of the new buffer hold frames (B, C, 1). The counts
        never change in a fixed step, so both are built once per count tensor and version
        (pyencoder.streaming.state.fixed_index: rebuilt after a general step, reset or
        load_state_dict; what a CUDA graph read stays pinned, and admit refuses a slot whose
        count the graph baked otherwise)."""
        C = self.chunk_size
        fi = fixed_index(state, "count", n + C, device)
        rows = fi.__dict__.get("refiner_rows")
        if rows is None:
            ar, cnt = fi.ar, fi.qidx[:, :1]                 # qidx = count + arange: col 0
            rows = (torch.where(ar < cnt, ar, ar + (C - cnt)).clamp_max_(C + n - 1),
                    (ar[:C] < cnt)[..., None])
            fi.refiner_rows = rows
        return rows

    @inference_step
    def step_fixed(self, x, state, check=False):
        """CUDA-graph friendly step: x (B, n, E), every slot the same n frames, n a multiple of
        ``chunk_size``; each slot may hold any count of its next chunk (read on the device: its
        frames come first, then x's). Returns (B, n, E), what ``step`` returns, the state
        updated in place without host synchronisation (``check`` has nothing to verify)."""
        check_state(self, state, RefinerState)
        check_step_input(x, -1, self.embed_dim, state.count.shape[0], state.buf.device)
        self._check_dtype(x)
        B, n, E = x.shape
        C = self.chunk_size
        if n % C:
            raise ValueError(f"Refiner.step_fixed: the step length x.shape[1] must be a multiple "
                             f"of chunk_size ({C}); got {n}")
        cat = torch.cat((state.buf, x.to(state.buf.dtype)), 1)       # (B, C + n, E)
        idx, keep = self._seq_index(state, n, x.device)
        seq = torch.gather(cat, 1, idx[..., None].expand(B, n + C, E))
        y = self._refine(seq[:, :n].reshape(B, n // C, C, E)).reshape(B, n, E)
        state.buf.copy_(torch.where(keep, seq[:, n:], 0))
        fill_counter(state, n)
        state.out_dtype = x.dtype
        return y.to(x.dtype)

    @ends_stream
    def flush(self, state):
        check_state(self, state, RefinerState)
        B = state.buf.shape[0]
        # in the dtype of the steps' frames (their inputs'; a state of another dtype, e.g. the
        # autocast dtype, gave flush's frames that one)
        dt = getattr(state, "out_dtype", None) or state.buf.dtype
        return self._run(state.buf.new_zeros(B, 0, self.embed_dim, dtype=dt), state, None,
                         final=True)

    def _run(self, x, state, lengths, final):
        B, n, E = x.shape
        C = self.chunk_size
        outs, bufs, counts = [], [], []
        for b in range(B):
            ln = n if lengths is None else int(lengths[b])
            cb = int(state.count[b])
            seq = torch.cat((state.buf[b, :cb], x[b, :ln].to(state.buf.dtype)), 0)
            full = seq.shape[0] // C
            rest = seq[full * C:]
            if final and rest.shape[0]:
                pad = torch.cat((rest, rest.new_zeros(C - rest.shape[0], E)), 0)
                y = torch.cat((self._refine(seq[:full * C].view(1, full, C, E)).view(-1, E),
                               self._refine(pad.view(1, 1, C, E)).view(C, E)[:rest.shape[0]]), 0)
                rest = rest[:0]
            else:
                y = self._refine(seq[:full * C].view(1, full, C, E)).view(-1, E)
            outs.append(y)
            nb = state.buf.new_zeros(C, E)
            nb[:rest.shape[0]] = rest
            bufs.append(nb)
            counts.append(rest.shape[0])
        m = max((o.shape[0] for o in outs), default=0)
        yb = x.new_zeros(B, m, E)
        for b, o in enumerate(outs):
            yb[b, :o.shape[0]] = o.to(x.dtype)
        state.out_lengths = torch.tensor([o.shape[0] for o in outs], dtype=torch.int64,
                                         device=state.count.device)
        if B:
            state.buf = torch.stack(bufs, 0)
        state.count = torch.tensor(counts, dtype=torch.int64, device=state.count.device)
        return yb, state
