"""A user-built StreamingSequential's general ``step`` runs as ``step_fixed`` once the whole
stack is steady (pyencoder.streaming.state.steady_dispatch over the children's
``steady_check``): one host read decides, none while the stream stays steady; outputs, out_lengths
and every state tensor equal the pure general path (float64) and the offline forward; counters a
caller kept are not changed; not taken for ragged lengths, steps off a conv's stride grid or not
whole mask blocks, hidden outputs, a streaming child without ``steady_check``, before the steady
state; the record that spares the read is dropped by reset(), load_state_dict and step_fixed
called directly. ``fresh_counters``: one multi-tensor copy, aliases kept, fill records moved.
"""
import pytest
import torch
from torch import nn

from _stream_utils import rel_err, spy_calls
from test_encoder_step_fixed import _Syncs, step_both
from test_streaming_fixed import _general_only, _stack, replay_rest
from pyencoder.nn import BandedSelfAttention, CausalConv1d, TransformerLayer, Transpose
from pyencoder.streaming import StreamingSequential, reset
from pyencoder.streaming.state import fill_counter, fresh_counters

F64_TOL = 1e-10


def _spy(monkeypatch):
    return spy_calls(monkeypatch, StreamingSequential)


@pytest.mark.parametrize("kind", ["banded", "chunked"])
def test_stack_general_step_dispatches(monkeypatch, kind):
    """The README's kind of stack (strided convs, Transpose, Linear, transformer layers): once
    steady every step runs step_fixed, with one host read for the first and none after; the
    outputs and the whole state equal the pure general path and offline."""
    torch.manual_seed(5)
    model = _stack(kind).double()
    B, step, steps = 2, 8, 16                  # 8 samples = 2 frames: a chunk of the mask block
    x = torch.randn(B, 1, step * steps, dtype=torch.float64)
    calls = _spy(monkeypatch)
    with torch.no_grad():
        ref = model(x)
        st = model.init_state(B, max_chunk=2)
        oracle = model.init_state(B, max_chunk=2)
        got, want, kept = [], [], []
        for i in range(steps):
            xi = x[..., i * step:(i + 1) * step]
            before = len(calls)
            _Syncs.n = 0
            with _Syncs():
                y, st = model.step(xi, st)
            syncs = _Syncs.n
            if len(calls) > before:      # dispatched: one read for the first, none after it
                assert syncs == (1 if len(calls) == 1 else 0), (i, syncs, len(calls))
            got.append(y[:, :int(st.out_lengths[0])])
            kept.append([(t, t.clone()) for t in (st.out_lengths, st.layers[0].seen,
                                                  st.layers[4].attention.pos,
                                                  st.layers[3].out_lengths)])
            with _general_only():
                y2, oracle = model.step(xi, oracle)
            want.append(y2[:, :int(oracle.out_lengths[0])])
            assert torch.equal(st.out_lengths, oracle.out_lengths), i
    assert len(calls) >= steps - 5, len(calls)
    a, b = torch.cat(got, 1), torch.cat(want, 1)
    assert a.shape == b.shape and rel_err(a, b) <= F64_TOL
    assert rel_err(a, ref[:, :a.shape[1]]) <= F64_TOL
    for pairs in kept:
        for t, v in pairs:
            assert torch.equal(t, v)
    t1, t0 = st.tensors(), oracle.tensors()
    assert t1.keys() == t0.keys()
    for key in t1:
        leaf = key.rsplit(".", 1)[-1]
        if leaf in ("pos", "pending", "count", "seen", "out_lengths"):
            assert torch.equal(t1[key], t0[key]), key
        elif leaf in ("k", "v", "hist"):
            assert rel_err(t1[key], t0[key]) <= F64_TOL, key


def test_stack_without_device_condition():
    """Stride-1 convs and per-frame modules only: nothing to check on the device, so every
    uniform step is the fixed one without a host read (the general step read the device twice
    per conv); equal to the pure general path and offline."""
    torch.manual_seed(6)
    model = StreamingSequential(CausalConv1d(3, 8, 5, activation="silu"),
                                CausalConv1d(8, 8, 31, groups=8), nn.GELU(), Transpose(),
                                nn.Linear(8, 4)).double().eval()
    x = torch.randn(2, 3, 60, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        st = model.init_state(2)
        oracle = model.init_state(2)
        got, want = [], []
        for t in range(0, 60, 6):
            _Syncs.n = 0
            with _Syncs():
                y, st = model.step(x[..., t:t + 6], st)
            assert _Syncs.n == 0
            got.append(y)
            with _general_only():
                y2, oracle = model.step(x[..., t:t + 6], oracle)
            want.append(y2)
        assert torch.equal(st.layers[4].out_lengths, oracle.layers[4].out_lengths)
    a = torch.cat(got, 1)
    assert rel_err(a, torch.cat(want, 1)) <= F64_TOL and rel_err(a, ref) <= F64_TOL


class _Plain(nn.Module):
    """A streaming module without steady_check (delegates to a CausalConv1d's general step)."""

    def __init__(self):
        super().__init__()
        self.conv = CausalConv1d(8, 8, 3)
        self.stream_time_axis = -1
        self.lookahead = 0

    def forward(self, x):
        return self.conv(x)

    def init_state(self, *a, **k):
        return self.conv.init_state(*a, **k)

    def step(self, x, state, lengths=None):
        return self.conv.step(x, state, lengths)

    def flush(self, state):
        return self.conv.flush(state)


class _Doubled(CausalConv1d):
    """A user's subclass that overrides ``step`` alone: its steady_check / step_fixed are the
    parent's, written for the parent's step, so the stack must not dispatch to them."""

    def step(self, x, state, lengths=None):
        y, state = super().step(x, state, lengths)
        return 2 * y, state


@pytest.mark.parametrize("case", ["ragged", "off_stride_grid", "not_whole_blocks", "outputs",
                                  "child_without_check", "unbounded", "overridden_step",
                                  "autograd"])
def test_stack_dispatch_not_taken(monkeypatch, case):
    torch.manual_seed(7)
    if case == "overridden_step":
        model = StreamingSequential(_Doubled(1, 8, 4, stride=2), Transpose(),
                                    nn.Linear(8, 16)).double().eval()
    elif case == "child_without_check":
        model = StreamingSequential(CausalConv1d(1, 8, 4, stride=2), _Plain(), Transpose(),
                                    nn.Linear(8, 16)).double().eval()
    elif case == "unbounded":
        model = StreamingSequential(CausalConv1d(1, 16, 2, stride=2), Transpose(),
                                    TransformerLayer(BandedSelfAttention(16, 2, left=None,
                                                                         right=1), 32)
                                    ).double().eval()
    elif case == "autograd":   # autograd records through a differentiable stack (strided
        # convs): general steps (a stack holding attention steps records nothing: it dispatches;
        # test_grad_mode_steps_keep_no_graph)
        model = StreamingSequential(CausalConv1d(1, 8, 4, stride=2),
                                    CausalConv1d(8, 8, 3, stride=2)).double()
    else:
        model = _stack("chunked").double()
    x = torch.randn(2, 1, 400, dtype=torch.float64)
    calls = _spy(monkeypatch)
    with torch.set_grad_enabled(case == "autograd"):
        st = model.init_state(2, max_chunk=2)
        off = 1 if case == "off_stride_grid" else 0
        _, st = model.step(x[..., :16 + off], st)           # warm
        _, st = model.step(x[..., 16 + off:32 + off], st)
        t = 32 + off
        for _ in range(6):
            if case == "ragged":
                model.step(x[..., t:t + 8], st, lengths=torch.tensor([8, 4]))
                t += 8
            elif case == "not_whole_blocks":
                model.step(x[..., t:t + 4], st)             # 1 frame: half a chunk of 2
                t += 4
            elif case == "outputs":
                model.step(x[..., t:t + 8], st, outputs=[])
                t += 8
            else:
                model.step(x[..., t:t + 8], st)
                t += 8
    assert calls == [], case


def test_stack_of_strided_convs_differentiable_through_steps():
    """Where autograd records, the stack keeps its general step (a stack of strided convs is
    differentiable through it: the streamed outputs' gradients equal offline's); under no_grad
    the same stream dispatches."""
    torch.manual_seed(9)
    model = StreamingSequential(CausalConv1d(3, 8, 5, stride=2, activation="gelu"),
                                CausalConv1d(8, 8, 4, stride=2)).double()
    x = torch.randn(2, 3, 64, dtype=torch.float64)
    st = model.init_state(2)
    ys = []
    for t in range(0, 64, 8):
        y, st = model.step(x[..., t:t + 8], st)
        ys.append(y)
    torch.cat(ys, -1).pow(2).sum().backward()
    g = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).pow(2).sum().backward()
    for a, p in zip(g, model.parameters()):
        assert rel_err(a, p.grad) <= F64_TOL


def test_stack_record_sees_reset_load_and_direct_steps(monkeypatch):
    """The record that spares the read: a reset slot starts over (not dispatched until steady
    again, equal to the pure general path throughout); load_state_dict and a direct step_fixed
    make the next step read the device once."""
    torch.manual_seed(8)
    model = _stack("banded").double()
    B, step = 2, 8
    x = torch.randn(B, 1, step * 30, dtype=torch.float64)
    calls = _spy(monkeypatch)
    with torch.no_grad():
        st = model.init_state(B, max_chunk=2)
        oracle = model.init_state(B, max_chunk=2)

        def both(i):
            return step_both(model, x[..., i * step:(i + 1) * step], st, oracle, i)
        for i in range(8):
            both(i)
        assert calls and both(8) == 0
        before = len(calls)
        mask = torch.tensor([True, False])
        reset(st, mask)
        reset(oracle, mask)
        both(9)
        assert len(calls) == before                 # slot 0 starts over: the general step
        for i in range(10, 18):
            both(i)
        assert len(calls) > before and both(18) == 0
        st.load_state_dict(st.state_dict())         # new counter tensors: checked again
        assert both(19) == 1 and both(20) == 0
        model.step_fixed(x[..., 21 * step:22 * step], st)     # counters advanced directly
        model.step_fixed(x[..., 21 * step:22 * step], oracle)
        assert both(22) == 1


def test_encoder_layers_take_the_stack_dispatch(monkeypatch):
    """Inside an encoder whose front end is not steady (ragged lengths), its layer stack still
    dispatches (one read for the stack, where each layer read once)."""
    from test_encoder_step_fixed import _encoder, _frames
    m = _encoder("band_postln_valid")
    n = m.hop * _frames(m)
    calls = _spy(monkeypatch)
    x = torch.randn(2, n * 12, dtype=torch.float64)
    with torch.no_grad():
        st = m.init_state(2, max_chunk=4)
        oracle = m.init_state(2, max_chunk=4)
        for i in range(12):
            xi = x[:, i * n:(i + 1) * n]
            y, st = m.step(xi, st, lengths=torch.tensor([n, n]))
            with _general_only():
                y2, oracle = m.step(xi, oracle, lengths=torch.tensor([n, n]))
            assert torch.equal(st.out_lengths, oracle.out_lengths)
            k = int(st.out_lengths.max())
            assert rel_err(y[:, :k], y2[:, :k]) <= F64_TOL, i
    assert len(calls) >= 6


def test_fresh_counters_one_copy_aliases_and_records():
    """One multi-tensor copy for all counters of a stack's state; a container's out_lengths
    aliased to its last child's stays aliased; fill records move to the copies (no refill)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    model = _stack("banded").double()
    x = torch.randn(2, 1, 64, dtype=torch.float64)
    with torch.no_grad():
        st = model.init_state(2, max_chunk=2)
        for t in range(0, 64, 8):
            with _general_only():
                _, st = model.step(x[..., t:t + 8], st)
        assert st.out_lengths is st.layers[-1].out_lengths
        fill_counter(st.layers[0], 4)                          # a record to move
        old = {k: v for k, v in st.tensors().items()}
        ops = []

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                ops.append(func.overloadpacket.__name__)
                return func(*args, **(kwargs or {}))
        with Ops():
            fresh_counters(st)
        assert ops == ["_foreach_add"], ops
        new = st.tensors()
        for k, v in new.items():
            leaf = k.rsplit(".", 1)[-1]
            if leaf in ("pos", "seen", "out_lengths"):
                assert v is not old[k] and torch.equal(v, old[k]), k
            else:
                assert v is old[k], k
        assert st.out_lengths is st.layers[-1].out_lengths
        ops.clear()
        with Ops():
            fill_counter(st.layers[0], 4)
        assert ops == []


def test_general_step_under_graph_capture(monkeypatch):
    """Under CUDA graph capture (emulated: ``_capturing`` true) a recorded steady stream runs
    step_fixed in place (no counter copies: a graph's copies would be refilled from the
    capture-time tensors at every replay); without a record the step cannot know it is steady
    without a host read and says so instead of failing inside CUDA."""
    from pyencoder.streaming import state as state_mod
    model = _stack("banded").double()
    x = torch.randn(2, 1, 8 * 12, dtype=torch.float64)
    with torch.no_grad():
        st = model.init_state(2, max_chunk=2)
        for i in range(10):
            _, st = model.step(x[..., i * 8:(i + 1) * 8], st)
        assert st.__dict__.get("_steady_record")
        before = {k: v for k, v in st.tensors().items()}
        monkeypatch.setattr(state_mod, "_capturing", lambda device: True)
        _, st = model.step(x[..., 80:88], st)
        after = st.tensors()
        assert all(after[k] is v for k, v in before.items())     # nothing replaced
        st.__dict__["_steady_record"] = None
        with pytest.raises(RuntimeError, match="under CUDA graph capture"):
            model.step(x[..., 88:96], st)


@pytest.mark.gpu
@pytest.mark.gpu_quick
def test_cuda_graph_of_the_general_step():
    """On a GPU: once a stream's steady state is recorded (eager general steps), ``step`` itself
    can be captured (it runs step_fixed in place); graph replays equal the offline forward."""
    torch.manual_seed(10)
    model = _stack("chunked").cuda()
    step = 8
    x = torch.randn(2, 1, step * 40, device="cuda")
    with torch.no_grad():
        ref = model(x)
        st = model.init_state(2, max_chunk=2)
        outs, t = [], 0
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):           # eager steps (compiles) off the capture stream
            for _ in range(8):
                y, st = model.step(x[..., t:t + step], st)
                outs.append(y[:, :int(st.out_lengths[0])])
                t += step
        torch.cuda.current_stream().wait_stream(side)
        assert st.__dict__.get("_steady_record")
        xbuf = torch.empty_like(x[..., :step])
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            ybuf, _ = model.step(xbuf, st)
        got = replay_rest(g, xbuf, ybuf, x, t, step, outs)
    assert rel_err(got, ref[:, :got.shape[1]]) <= 1e-4


@pytest.mark.parametrize("what", ["attention", "layer", "stack", "encoder"])
def test_backward_through_a_step_says_it_is_unsupported(what):
    """Steps that update their state in place (attention rings, queues) are not differentiable:
    where autograd records, the forward is unchanged and a backward raises a RuntimeError that
    says so and what to do (not autograd's in-place message from deep inside a later node)."""
    from test_encoder_step_fixed import _encoder
    from test_streaming_fixed import _banded
    torch.manual_seed(17)
    if what == "encoder":
        m = _encoder("band_postln_valid")
        x = torch.randn(2, m.hop * 4 * 6, dtype=torch.float64)
        step = m.hop * 4
    elif what == "stack":
        m = _stack("banded").double()
        x, step = torch.randn(2, 1, 8 * 6, dtype=torch.float64), 8
    else:
        att = _banded(right=2).double()
        m = att if what == "attention" else TransformerLayer(att, 32).double().eval()
        x, step = torch.randn(2, 4 * 6, 16, dtype=torch.float64), 4
    axis = 1 if what in ("attention", "layer") else -1

    def stream(grad):
        st = m.init_state(2, max_chunk=4)
        ys = []
        with torch.set_grad_enabled(grad):
            for i in range(6):
                y, st = m.step(x.narrow(axis, i * step, step), st)
                ys.append(y)
        return ys
    ys, ref = stream(True), stream(False)
    for a, b in zip(ys, ref):
        assert torch.equal(a.detach(), b)
    assert ys[-1].requires_grad
    with pytest.raises(RuntimeError, match="backward through a streaming step is not "
                                           "supported.*torch.no_grad"):
        sum(y.sum() for y in ys).backward()


@pytest.mark.parametrize("what", ["attention", "stack", "encoder", "encoder_hidden", "decoder",
                                  "hf"])
def test_grad_mode_steps_keep_no_graph(what):
    """Steps run with autograd on (no torch.no_grad: a common slip) recorded a graph that the
    state kept (a running norm's sums, a conv's history, the attention ring): each step chained
    to the last, memory grew without bound (a tiny wav2vec2 0.33 MB a step), for a backward that
    is refused anyway. Such steps now record nothing: no state tensor requires grad, the outputs
    equal the no-grad stream's exactly and still require grad, and a backward through them says
    it is unsupported."""
    from test_decoder_step_fixed import _decoder
    from test_encoder_step_fixed import _encoder
    from test_streaming_fixed import _banded
    torch.manual_seed(23)
    kw = {}
    if what.startswith("encoder"):
        m = _encoder("band_postln_valid")
        x, step = torch.randn(2, m.hop * 4 * 8, dtype=torch.float64), m.hop * 4
        kw = {"output_hidden_states": what == "encoder_hidden"}
    elif what == "hf":
        pytest.importorskip("transformers")
        from test_hf import make_model
        from pyencoder import hf as H
        base = make_model("w2v2_post").double().eval()
        H.apply_pyencoder_to_wav2vec2(base, lookahead_frames=1, left_frames=4)
        m = H.StreamingEncoder(base)
        x, step = torch.randn(2, 320 * 8, dtype=torch.float64), 320
    elif what == "stack":
        m = _stack("banded").double()
        x, step = torch.randn(2, 1, 8 * 8, dtype=torch.float64), 8
    elif what == "decoder":
        m = _decoder("refiner_attention")
        x, step = torch.randn(2, 6 * 8, 6, dtype=torch.float64), 6
    else:
        m = _banded(right=2).double()
        x, step = torch.randn(2, 4 * 8, 16, dtype=torch.float64), 4
    axis = -1 if what == "stack" else 1

    def stream(grad):
        st = m.init_state(2)
        ys = []
        with torch.set_grad_enabled(grad):
            for i in range(8):
                y, st = m.step(x.narrow(axis, i * step, step), st, **kw)
                ys.append(y)
        return ys, st
    (ys, st), (ref, _) = stream(True), stream(False)
    assert not [k for k, t in st.tensors().items() if t.requires_grad or t.grad_fn is not None]
    if kw.get("output_hidden_states"):          # ((y, hidden_states), state) each
        flat, flat_ref = ([t for y in got for t in (y[0], *y[1])] for got in (ys, ref))
    else:
        flat, flat_ref = ys, ref
    for a, b in zip(flat, flat_ref):
        assert torch.equal(a.detach(), b) and a.requires_grad
    with pytest.raises(RuntimeError, match="backward through a streaming step is not supported"):
        sum(y.sum() for y in flat).backward()


def test_grad_mode_step_outputs_refuse_backward_and_take_in_place_edits():
    """Under grad mode a stack holding attention runs without recording: the per-child outputs
    ``step(outputs=[])`` appends came back not requiring grad (a loss through them backpropagated
    silently, the stream's part missing); the refusing node's view made an in-place edit of a
    step's output (zeroing the rows past out_lengths) raise in autograd's words."""
    from test_decoder_step_fixed import _decoder
    from test_encoder_step_fixed import _encoder
    torch.manual_seed(37)
    m = _stack("banded").double()
    x = torch.randn(2, 1, 64, dtype=torch.float64)
    outs = []
    y, st = m.step(x[..., :8], m.init_state(2), outputs=outs)
    assert len(outs) == len(m) and all(o.requires_grad for o in outs)
    w = nn.Parameter(torch.ones((), dtype=torch.float64))
    with pytest.raises(RuntimeError, match="backward through a streaming step"):
        (w * 2 + outs[-1].sum()).backward()
    for model, inp in ((_encoder("band_postln_valid"), None), (_decoder("refiner_attention"),
                                                               torch.randn(2, 6, 6,
                                                                           dtype=torch.float64))):
        if inp is None:
            inp = torch.randn(2, model.hop * 4, dtype=torch.float64)
        y, st = model.step(inp, model.init_state(2))
        y[1, int(st.out_lengths[1]):] = 0          # an edit in place: taken
        assert y.requires_grad


def test_a_split_failing_midway_marks_the_stack_holding_it():
    """A stack's first streaming child failing in the second of its max_chunk pieces marked the
    child's state only: the stack's own flag (what CudaGraphStep and the decoder read) stayed
    clean."""
    from pyencoder.nn import TransformerLayer as TL
    torch.manual_seed(41)
    m = StreamingSequential(TL(BandedSelfAttention(16, 2, left=3, right=1), 32),
                            TL(BandedSelfAttention(16, 2, left=3, right=1), 32)).double().eval()
    st = m.init_state(1, max_chunk=4)
    real, calls = TL.step, []

    def failing(self, *a, **k):
        if self is m[0]:
            calls.append(1)
            if len(calls) == 3:          # the outer call, piece 1, piece 2
                raise RuntimeError("injected failure")
        return real(self, *a, **k)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(TL, "step", failing)
        with pytest.raises(RuntimeError, match="injected failure"):
            m.step(torch.randn(1, 12, 16, dtype=torch.float64), st)
    assert "TransformerLayer.step failed after frames 0-3" in st.layers[0].broken
    assert st.ended and "at child 0 (TransformerLayer): TransformerLayer.step failed" in st.broken


def test_fixed_step_check_names_a_step_no_child_can_take_before_any_runs():
    """step_fixed(check=True) of a length a later child can never take as a fixed one (a
    strided conv after another: 6 samples give it 3 frames) passed the check silently (the
    SteadyCheck was None), then that child refused after the first had taken the chunk: the
    streams marked inconsistent. It is named before any child runs."""
    torch.manual_seed(43)
    m = _stack("banded").double()
    x = torch.randn(2, 1, 64, dtype=torch.float64)
    with torch.no_grad():
        st = m.init_state(2)
        for i in range(4):
            _, st = m.step(x[..., i * 8:(i + 1) * 8], st)
        keep = {k: v.clone() for k, v in st.tensors().items()}
        with pytest.raises(ValueError, match=r"step_fixed\(check=True\): child \d+ "
                                             r"\(CausalConv1d\) cannot take a step of 3 frames"):
            m.step_fixed(x[..., 32:38], st, check=True)
        assert not st.ended
        assert all(torch.equal(v, keep[k]) for k, v in st.tensors().items())
        m.step_fixed(x[..., 32:40], st, check=True)


@pytest.mark.parametrize("what", ["attention", "chunked", "wavlm", "layer", "decoder"])
def test_backward_through_a_flush_says_it_is_unsupported(what):
    """flush emits the held-back frames through the same in-place ring and queues: a backward
    through its output (alone, or concatenated with the steps' as run_stream does) raised
    autograd's "modified by an inplace operation" from a node deep inside; it says what the
    step's backward says now, and the flushed values are unchanged."""
    from pyencoder.models import StreamingDecoder
    from pyencoder.nn import ChunkedSelfAttention, WavLMSelfAttention
    from test_models import tiny_decoder_config
    from test_streaming_fixed import _banded
    torch.manual_seed(19)
    E = 16
    if what == "attention":
        m = _banded(right=2)
    elif what == "chunked":
        m = ChunkedSelfAttention(E, 2, chunk_size=3, left_chunks=1, lookahead=2)
    elif what == "wavlm":
        m = WavLMSelfAttention(E, 2, left=4, right=2)
    elif what == "layer":
        m = TransformerLayer(_banded(right=2), 32)
    else:
        m, E = StreamingDecoder(tiny_decoder_config(num_attention_layers=2)), 6
    m = m.double().eval()
    x = torch.randn(1, 10, E, dtype=torch.float64)

    def stream(grad):
        with torch.set_grad_enabled(grad):
            y, st = m.step(x, m.init_state(1))
            y2, _ = m.flush(st)
        return y, y2
    (y, y2), (r, r2) = stream(True), stream(False)
    assert torch.equal(y.detach(), r) and torch.equal(y2.detach(), r2) and y2.numel()
    msg = "flush: backward through a streaming step is not supported.*torch.no_grad"
    with pytest.raises(RuntimeError, match=msg):
        y2.sum().backward()
    y, y2 = stream(True)
    with pytest.raises(RuntimeError, match="backward through a streaming step is not supported"):
        torch.cat([y, y2], 1).sum().backward()


def test_fixed_step_check_lets_undeclared_children_decide_and_names_a_missing_step_fixed():
    """_refuse_unfixable: a streaming child without step_fixed is named before any child runs
    (the state stays usable); a child that declares no conditions decides itself (its own
    step_fixed runs or refuses), even before a declared child that could not take the step."""
    torch.manual_seed(53)
    x = torch.randn(1, 1, 16, dtype=torch.float64)
    m = StreamingSequential(CausalConv1d(1, 8, 4, stride=2), _Plain()).double()
    with torch.no_grad():
        st = m.init_state(1)
        _, st = m.step(x[..., :8], st)
        with pytest.raises(TypeError, match=r"child 1 \(_Plain\) has no step_fixed"):
            m.step_fixed(x[..., 8:12], st, check=True)
        assert not st.ended

    class _Undeclared(CausalConv1d):
        """step_fixed of the parent, no steady_check of its own (a subclass overriding step)."""
        def step(self, x, state, lengths=None):
            return super().step(x, state, lengths)
    u = StreamingSequential(_Undeclared(1, 8, 3), CausalConv1d(8, 8, 4, stride=2)).double()
    with torch.no_grad():
        st = u.init_state(1)
        _, st = u.step(x[..., :8], st)
        # 3 samples: the strided child could never take them, but the undeclared first child
        # decides (it runs), and the strided one refuses in its own words after it
        with pytest.raises(ValueError, match=r"CausalConv1d\.step_fixed: the step length"):
            u.step_fixed(x[..., 8:11], st, check=True)


def test_fixed_steps_called_directly_under_grad_mode_keep_no_graph():
    """step_fixed of a stack / encoder holding attention, called directly where autograd
    records: no state tensor requires grad, and a backward names the call."""
    from test_encoder_step_fixed import _encoder
    torch.manual_seed(59)
    for m, x, step in ((_stack("banded").double(), torch.randn(2, 1, 64, dtype=torch.float64),
                        8), (None, None, None)):
        if m is None:
            m = _encoder("band_postln_valid")
            x, step = torch.randn(2, m.hop * 4 * 8, dtype=torch.float64), m.hop * 4
        with torch.no_grad():
            st = m.init_state(2)
            for i in range(4):
                _, st = m.step(x[..., i * step:(i + 1) * step], st)
        y = m.step_fixed(x[..., 4 * step:5 * step], st)
        assert y.requires_grad
        assert not [k for k, t in st.tensors().items() if t.requires_grad]
        with pytest.raises(RuntimeError, match=rf"{type(m).__name__}\.step_fixed: backward "
                                               rf"through a streaming step"):
            y.sum().backward()
