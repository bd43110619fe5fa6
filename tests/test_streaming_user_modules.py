"""Modules of a user's own in a stream (pyencoder.streaming.protocol) and the stack's bookkeeping
around them: latency of tied and partially declared modules, a nested stack that changes the
layout, a state whose fresh stream is not all zeros, run_stream's time_dim, and the protocol's
signatures checked by name."""
import dataclasses

import pytest
import torch
from torch import nn

from pyencoder.nn import BandedSelfAttention, CausalConv1d, Transpose
from pyencoder.streaming import (StreamingSequential, StreamState, admit, latency, reset,
                                 run_stream)


def _measured_lookahead(m, x):
    """Frames an output needs past its own input frame, by perturbation."""
    with torch.no_grad():
        y0 = m(x)
        worst = 0
        for t in range(x.shape[1]):
            xp = x.clone()
            xp[:, t] += 1
            changed = ((m(xp) - y0).abs().amax(-1)[0] > 1e-6).nonzero().flatten()
            worst = max(worst, t - int(changed[0]))
    return worst


def test_latency_counts_a_child_registered_twice():
    """named_children() yields a module registered twice once: a tied layer applied twice was
    reported with half the stack's lookahead and hop."""
    torch.manual_seed(0)
    attn = BandedSelfAttention(8, 2, left=4, right=2).eval()
    m = StreamingSequential(attn, attn).eval()
    assert latency(m, sample_rate=50).lookahead_samples == 4 == \
        _measured_lookahead(m, torch.randn(1, 24, 8))
    conv = CausalConv1d(4, 4, 2, stride=2)
    m2 = StreamingSequential(conv, conv)
    assert latency(m2).hop == 4 and m2(torch.randn(1, 4, 16)).shape[-1] == 4
    wrap = nn.Module()              # outside a container, a second name is an alias: once
    wrap.enc, wrap.alias = conv, conv
    assert latency(wrap).hop == 2


class _Declares(nn.Module):
    def __init__(self, **decl):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        for k, v in decl.items():
            setattr(self, k, v)

    def init_state(self, *a, **k):
        raise NotImplementedError

    def step(self, x, state, lengths=None):
        raise NotImplementedError

    def flush(self, state):
        raise NotImplementedError


def test_partial_declarations_are_refused_not_dropped():
    """A declared lookahead without hop (or a hop its children do not compose) was silently
    replaced by the children's latency (0 lookahead, hop 1)."""
    with pytest.raises(ValueError, match=r"declares lookahead=2 but no hop"):
        latency(_Declares(lookahead=2))
    with pytest.raises(ValueError, match=r"declares hop=2 but its children compose hop 1"):
        latency(_Declares(hop=2))
    assert latency(_Declares(hop=1)).hop == 1          # a hop its children do compose
    assert latency(_Declares(hop=2, lookahead=3)).lookahead_samples == 3


def test_nested_stack_that_ends_time_second():
    """A nested stack ending in a Transpose outputs (B, T, C); the outer stack's
    out_time_last, step_fixed's frame counts and flush(outputs=) read only per-frame swaps:
    run_stream failed in cat_time, flush returned channels as frames, steady steps counted the
    channels, admit narrowed on the channel axis."""
    torch.manual_seed(2)
    front = StreamingSequential(CausalConv1d(3, 8, 4, stride=2), Transpose())
    m = StreamingSequential(front, nn.Linear(8, 6)).eval()
    x = torch.randn(1, 3, 40)
    with torch.no_grad():
        want = m(x)
        assert not m.out_time_last()
        torch.testing.assert_close(run_stream(m, x, [5]), want)
        st = m.init_state(1)
        for i in range(0, 40, 4):                       # steady: runs as step_fixed
            y, st = m.step(x[:, :, i:i + 4], st)
            assert st.out_lengths.tolist() == [2] and y.shape[1] == 2
        m2 = StreamingSequential(front, BandedSelfAttention(8, 2, left=4, right=2)).eval()
        want2 = m2(x)
        st = m2.init_state(1)
        _, st = m2.step(x, st)
        outs = []
        tail, st = m2.flush(st, outputs=outs)
        torch.testing.assert_close(tail, want2[:, -2:])
        assert outs[-1].shape == (1, 2, 8)
        m3 = StreamingSequential(front, BandedSelfAttention(8, 2, left=4, right=1)).eval()
        st = m3.init_state(2)
        for _ in range(4):
            _, st = m3.step(torch.randn(2, 3, 4), st)
        new = torch.randn(1, 3, 16)
        rows = admit(m3, st, 0, [new[:, :, :4], new[:, :, 4:8]], 4)
        assert all(r.shape[0] == 1 and r.shape[2] == 8 for r in rows)
        torch.testing.assert_close(torch.cat(rows, 1), m3(new[:, :, :8])[:, :sum(
            r.shape[1] for r in rows)])


@dataclasses.dataclass
class _MaxState(StreamState):
    run_max: torch.Tensor       # (B, C): a fresh stream's is -inf
    out_lengths: torch.Tensor

    def reset(self, mask):
        super().reset(mask)
        self.run_max[mask.to(self.run_max.device)] = float("-inf")
        return self


class _RunningMax(nn.Module):
    """(B, T, C) -> running maximum over time (hop 1, no lookahead)."""
    hop, lookahead = 1, 0

    def __init__(self, C):
        super().__init__()
        self.C = C

    def forward(self, x):
        return x.cummax(1).values

    def init_state(self, batch_size, *, device=None, dtype=None):     # no max_chunk
        return _MaxState(torch.full((batch_size, self.C), float("-inf"), device=device),
                         torch.zeros(batch_size, dtype=torch.int64, device=device))

    def step(self, x, state, lengths=None):
        B, n, _ = x.shape
        ls = [n] * B if lengths is None else [int(v) for v in lengths]
        y, rm = torch.zeros_like(x), state.run_max.clone()
        for b in range(B):
            if ls[b]:
                c = torch.maximum(x[b, :ls[b]].cummax(0).values, rm[b])
                y[b, :ls[b]] = c
                rm[b] = c[-1]
        state.run_max = rm
        state.out_lengths = torch.tensor(ls, dtype=torch.int64)
        return y, state

    def flush(self, state):
        state.out_lengths = torch.zeros_like(state.out_lengths)
        return None, state                  # nothing held back


def test_nested_state_resets_through_its_own_reset():
    """A stack's reset zeroed every nested tensor, bypassing a state's own reset (a running
    maximum restarted from 0 instead of -inf). Also: an init_state without max_chunk and a
    flush returning None serve in a stack."""
    torch.manual_seed(3)
    x_old, x_new = torch.randn(2, 6, 3) + 5.0, torch.randn(2, 6, 3) - 5.0
    seq = StreamingSequential(nn.Identity(), _RunningMax(3)).eval()
    with torch.no_grad():
        st = seq.init_state(2)
        _, st = seq.step(x_old, st)
        reset(st, torch.tensor([True, False]))
        y, st = seq.step(x_new, st)
        assert torch.equal(y[0], seq(x_new[:1])[0])
        tail, st = seq.flush(st)
        assert tail is None or tail.shape[1] == 0
        torch.testing.assert_close(run_stream(seq, x_new, [4]), seq(x_new))


def test_run_stream_time_dim_of_a_time_last_module():
    """run_stream refused time_dim=1 for a (B, C, T) module, recommending time_dim=2, which then
    failed in cat_time (only -1 was taken as time-last)."""
    torch.manual_seed(4)
    conv = CausalConv1d(3, 5, 3).eval()
    x = torch.randn(2, 3, 20)
    with torch.no_grad():
        want = conv(x)
        for td in (-1, 2):
            torch.testing.assert_close(run_stream(conv, x, [3, 7], time_dim=td), want)


class _NoLengths(_RunningMax):
    def step(self, x, state):
        return super().step(x, state)


class _NoOutLengths(_RunningMax):
    def init_state(self, batch_size, *, device=None, dtype=None, **_):
        return None


def test_protocol_signatures_are_checked_by_name():
    with pytest.raises(TypeError, match=r"child 1 \(_NoLengths\)\.step takes no `lengths`"):
        StreamingSequential(nn.Identity(), _NoLengths(3))
    seq = StreamingSequential(nn.Identity(), _NoOutLengths(3))
    with pytest.raises(TypeError, match=r"child 1 \(_NoOutLengths\)\.init_state returned a "
                                        r"NoneType without an out_lengths tensor"):
        seq.init_state(1)


@pytest.mark.parametrize("kind", ["gelu_conv", "dropout_conv", "transpose_linear"])
def test_stack_input_layout_comes_from_the_first_child_declaring_one(kind):
    """The stack took its input layout from its first child: a leading GELU / Dropout (layout
    neutral) made a conv after it 'get (B, T, C) chunks' and the stack was refused, telling to
    insert a Transpose that would change its input; Transpose + Linear (a head on a conv's
    output) could not be built at all."""
    from pyencoder.streaming import run_stream
    torch.manual_seed(73)
    if kind == "transpose_linear":
        mods, x = (Transpose(), nn.Linear(4, 4), nn.GELU()), torch.randn(2, 4, 13,
                                                                          dtype=torch.float64)
    else:
        first = nn.GELU() if kind == "gelu_conv" else nn.Dropout(0.1)
        mods, x = (first, CausalConv1d(3, 4, 2)), torch.randn(2, 3, 13, dtype=torch.float64)
    m = StreamingSequential(*mods).double().eval()
    assert m.stream_time_axis == -1                  # (B, C, T) in, both
    with torch.no_grad():
        got = run_stream(m, x, [1, 4, 3])
        ref = m(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
