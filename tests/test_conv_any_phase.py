"""A strided CausalConv1d's step_fixed at any phase of its stride (``any_phase``): a strided conv
after layers that hold frames back for lookahead (DyStream's 25 fps motion from 50 Hz features
behind a 3-frame lookahead; a downsampling conv after a chunked encoder) meets its steady stream
at seen % stride != 0, slots at different phases; the fixed step reads each slot's phase on the
device and gathers its window. StreamingSequential marks the strided convs after a child that
holds frames back at init_state.

Checked (float64): random geometries (k, stride, groups, activation, k == stride), per-slot ragged
warm-ups that leave every phase: step_fixed == the general step (outputs, out_lengths, every
state tensor, in place, no host synchronisation) == offline per slot; without ``any_phase``
check=True refuses and names the attribute; a stack (conv front end, a lookahead transformer
layer, a stride-2 conv after it): the marks, the general step's dispatch to step_fixed (one host
read, then none) equal to the pure general path and offline, step_fixed(check=True) accepted;
what holds frames back (lookahead 0 does not; nested stacks; unknown lookahead does).
GPU (marked): the stack's step_fixed captured in a CUDA graph; replays == offline.

Tolerance: float64, the same windows through the same conv op: 1e-12 (stack: 1e-10 as
tests/test_stack_dispatch.py).
"""
import random

import pytest
import torch
from torch import nn

from _stream_utils import rel_err, spy_calls
from test_encoder_step_fixed import _Syncs
from test_streaming_fixed import _capture, _general_only, fixed_vs_general, replay_rest
from pyencoder.nn import (BandedSelfAttention, CausalConv1d, ChunkedSelfAttention,
                          TransformerLayer, Transpose)
from pyencoder.streaming import StreamingSequential
from pyencoder.streaming.sequential import _holds_back

F64_TOL = 1e-12


@pytest.mark.parametrize("geo", [(4, 2, 1, None), (2, 2, 1, "gelu"), (5, 3, 4, "silu"),
                                 (3, 3, 2, None), (9, 4, 4, None)], ids=str)
def test_causal_conv_step_fixed_any_phase(geo):
    k, s, groups, act = geo
    torch.manual_seed(k * 10 + s)
    rng = random.Random(k * 10 + s)
    conv = CausalConv1d(4, 8, k, stride=s, groups=groups, activation=act).double()
    conv.any_phase = True
    B = 5
    st = conv.init_state(B)
    feeds, outs = [[] for _ in range(B)], [[] for _ in range(B)]
    with torch.no_grad():
        for i in range(4):                     # ragged warm-up: slot b ends at phase b % s
            ls = [rng.randint(0, 5) for _ in range(B)]
            if i == 3:
                tot = [sum(t.shape[-1] for t in f) for f in feeds]
                ls = [ls[b] + (b - tot[b] - ls[b]) % s for b in range(B)]
            x = torch.randn(B, 4, max(ls), dtype=torch.float64)
            y, st = conv.step(x, st, torch.tensor(ls))
            for b in range(B):
                feeds[b].append(x[b, :, :ls[b]])
                outs[b].append(y[b, :, :int(st.out_lengths[b])])
        assert [int(v) % s for v in st.seen] == [b % s for b in range(B)]
        chk = conv.steady_check(2 * s, st)
        assert chk.n_out == 2 and chk.ok() is None and chk.counters == ()
        xs = [torch.randn(B, 4, n, dtype=torch.float64) for n in (s, 3 * s, 0, 2 * s)]
        fixed_vs_general(conv, st, xs, lambda n: (B, 8, n // s), feeds, outs, F64_TOL,
                         time_axis=-1)
        for b in range(B):
            got = torch.cat(outs[b], -1)
            want = conv(torch.cat(feeds[b], -1)[None])[0]
            assert got.shape == want.shape and rel_err(got, want) <= F64_TOL, b


def test_causal_conv_phase_zero_by_default():
    conv = CausalConv1d(2, 2, 4, stride=2).double()
    assert conv.any_phase is False
    st = conv.init_state(2)
    _, st = conv.step(torch.randn(2, 2, 3, dtype=torch.float64), st)
    assert conv.steady_check(2, st).ok().tolist() == [False, False]
    with pytest.raises(ValueError, match=r"multiple of the stride 2.*seen=\[3, 3\].*any_phase"):
        conv.step_fixed(torch.randn(2, 2, 2, dtype=torch.float64), st, check=True)


def _phase_stack(kind="banded"):
    E = 16
    att = BandedSelfAttention(E, 2, left=6, right=3) if kind == "banded" else \
        ChunkedSelfAttention(E, 2, chunk_size=3, left_chunks=2, lookahead=1)
    return StreamingSequential(CausalConv1d(1, E, 4, stride=2, activation="gelu"), Transpose(),
                               TransformerLayer(att, 32), Transpose(),
                               CausalConv1d(E, 12, 4, stride=2), Transpose(),
                               nn.Linear(12, 8)).eval()


def test_stack_marks_convs_after_lookahead():
    m = _phase_stack()
    assert not m[0].any_phase and not m[4].any_phase
    m.init_state(1)
    assert not m[0].any_phase and m[4].any_phase
    # what holds frames back
    causal = TransformerLayer(BandedSelfAttention(8, 2, left=4, right=0), 16)
    assert not _holds_back(causal) and not _holds_back(nn.Linear(2, 2))
    assert not _holds_back(CausalConv1d(2, 2, 3, stride=2))
    assert _holds_back(TransformerLayer(BandedSelfAttention(8, 2, left=4, right=1), 16))
    assert _holds_back(ChunkedSelfAttention(8, 2, chunk_size=2, left_chunks=1, lookahead=0))
    assert _holds_back(StreamingSequential(Transpose(), m))
    assert not _holds_back(StreamingSequential(causal, nn.Linear(8, 8)))
    # a nested stack after a lookahead child: its strided convs are marked too
    inner = StreamingSequential(CausalConv1d(16, 16, 2, stride=2))
    outer = StreamingSequential(
        TransformerLayer(BandedSelfAttention(16, 2, left=4, right=2), 32), Transpose(), inner)
    outer.init_state(1)
    assert inner[0].any_phase


@pytest.mark.parametrize("kind", ["banded", "chunked"])
def test_stack_after_lookahead_dispatches_and_equals_offline(monkeypatch, kind):
    torch.manual_seed(4)
    model = _phase_stack(kind).double()
    calls = spy_calls(monkeypatch, StreamingSequential)
    # banded: 8 samples = 4 layer frames = 2 output frames; chunked: two chunks of 3 frames
    B, step, steps = 2, 8 if kind == "banded" else 12, 14
    x = torch.randn(B, 1, step * steps, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        st = model.init_state(B, max_chunk=6)
        oracle = model.init_state(B, max_chunk=6)
        got, want = [], []
        for i in range(steps):
            xi = x[..., i * step:(i + 1) * step]
            before = len(calls)
            _Syncs.n = 0
            with _Syncs():
                y, st = model.step(xi, st)
            if len(calls) > before:
                assert _Syncs.n == (1 if len(calls) == 1 else 0), (i, _Syncs.n)
            got.append(y[:, :int(st.out_lengths[0])])
            with _general_only():
                y2, oracle = model.step(xi, oracle)
            want.append(y2[:, :int(oracle.out_lengths[0])])
            assert torch.equal(st.out_lengths, oracle.out_lengths), i
        # the conv after the layer sits at an odd phase (3 frames held back; whole chunks of 3):
        # without the mark it never dispatched
        assert int(st.layers[4].seen[0]) % 2 == 1
        assert len(calls) >= steps - 5, len(calls)
        a, b = torch.cat(got, 1), torch.cat(want, 1)
        assert a.shape == b.shape and rel_err(a, b) <= 1e-10
        assert rel_err(a, ref[:, :a.shape[1]]) <= 1e-10
        model.step_fixed(x[..., :step], st, check=True)       # the checks accept it


@pytest.mark.gpu
def test_cuda_graph_stack_after_lookahead():
    torch.manual_seed(11)
    model = _phase_stack("banded").cuda()
    step = 8
    x = torch.randn(2, 1, step * 30, device="cuda")
    with torch.no_grad():
        ref = model(x)
        st = model.init_state(2, max_chunk=4)
        outs = []
        for i in range(6):
            y, st = model.step(x[..., i * step:(i + 1) * step], st)
            outs.append(y[:, :int(st.out_lengths[0])])
        outs.append(model.step_fixed(x[..., 6 * step:7 * step], st, check=True))
        xbuf = x[..., 7 * step:8 * step].clone()
        g, ybuf = _capture(lambda: model.step_fixed(xbuf, st))   # the warm-up ran step 7
        outs.append(ybuf.clone())
        got = replay_rest(g, xbuf, ybuf, x, 8 * step, step, outs)
    assert rel_err(got, ref[:, :got.shape[1]]) <= 1e-4


@pytest.mark.parametrize("geo", [(4, 2, 1, None), (5, 3, 4, "silu"), (3, 3, 2, None)], ids=str)
def test_any_phase_on_the_triton_backend(geo):
    """The gathered window's initial state is a strided view: the triton backend (interpreted
    here, float32) reads it as the reference does (within float32 rounding of the fused
    activation), slots at different phases."""
    from _norm_kernel_utils import NEEDS_TRITON_RUN
    import pyencoder
    if NEEDS_TRITON_RUN.args[0]:
        pytest.skip(NEEDS_TRITON_RUN.kwargs["reason"])
    k, s, groups, act = geo
    torch.manual_seed(k + s)
    conv = CausalConv1d(4, 8, k, stride=s, groups=groups, activation=act)
    conv.any_phase = True
    st = conv.init_state(3)
    with torch.no_grad():
        _, st = conv.step(torch.randn(3, 4, 7), st, torch.tensor([7, 5, 6]))
        assert len({int(v) % s for v in st.seen}) > 1
        ref = conv.init_state(3)
        ref.load_state_dict(st.state_dict())
        for _ in range(3):
            x = torch.randn(3, 4, 2 * s)
            with pyencoder.use_backend(conv="triton"):
                y = conv.step_fixed(x, st)
            with pyencoder.use_backend(conv="reference"):
                y2, ref = conv.step(x, ref)
            torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-6)
