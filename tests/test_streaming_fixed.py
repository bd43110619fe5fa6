"""step_fixed, the CUDA-graph friendly steady-state step, for banded and chunked masks. CPU:
step_fixed sequences (after a warm-up with the general step) equal step sequences and the offline
forward (float32, 1e-5 relative: the streamed rows differ from offline only in summation order);
the state tensors keep their data pointers; the step does no host synchronisation (run under a
TorchDispatchMode that raises on aten._local_scalar_dense, which .item() / int(t) / bool(t)
dispatch to, and on the ops whose CUDA kernels synchronise: nonzero, masked_select, boolean-mask
indexing, unique); clear errors on bad step lengths and states that are not in steady state; the
general step dispatches to step_fixed in the steady state (same outputs and counters as the pure
general path, earlier counter tensors left unchanged, not taken for ragged lengths / unbounded
history / after flush / steps that are not whole blocks). GPU (marked): step_fixed captured in a
torch.cuda.CUDAGraph and replayed equals the eager step_fixed, for single attention modules and a
conv + transformer stack, fp32 and bf16.
"""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from _stream_utils import rel_err
from pyencoder.nn import (BandedSelfAttention, CausalConv1d, ChunkedSelfAttention,
                          TransformerLayer, Transpose)
from pyencoder.streaming import StreamingSequential

TOL = 1e-5

_SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "equal",
             "unique_dim", "_unique", "_unique2", "unique_consecutive", "allclose"}


class NoHostSync(TorchDispatchMode):
    """Raise on any op that reads a tensor value on the host or whose CUDA kernel syncs."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _SYNC_OPS:
            raise AssertionError(f"host synchronisation in step_fixed: aten.{name}")
        if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            idx = args[1] if len(args) > 1 else kwargs.get("indices")
            if any(t is not None and t.dtype == torch.bool for t in idx):
                raise AssertionError(f"boolean-mask indexing (nonzero) in step_fixed: aten.{name}")
        return func(*args, **(kwargs or {}))


def test_detector_catches_item():
    t = torch.arange(3)
    with pytest.raises(AssertionError, match="_local_scalar_dense"):
        with NoHostSync():
            int(t.max())
    with pytest.raises(AssertionError, match="host synchronisation"):
        with NoHostSync():
            bool((t > 1).any())
    with pytest.raises(AssertionError):
        with NoHostSync():
            t[t > 0] = 1


def _banded(E=16, H=2, left=5, right=2, rope=True):
    return BandedSelfAttention(E, H, left=left, right=right, rope=rope).eval()


def _chunked(E=16, H=2, chunk=3, left_chunks=2, lookahead=2, rope=True):
    return ChunkedSelfAttention(E, H, chunk_size=chunk, left_chunks=left_chunks,
                                lookahead=lookahead, rope=rope).eval()


ATT_CASES = [
    ("band_r2", lambda: _banded(right=2), 1, 5),
    ("band_r0", lambda: _banded(right=0, rope=False), 3, 3),
    ("band_r3_n2", lambda: _banded(left=7, right=3), 2, 4),
    ("chunk3_la2", lambda: _chunked(chunk=3, lookahead=2), 3, 4),
    ("chunk3_la2_n6", lambda: _chunked(chunk=3, lookahead=2), 6, 6),
    ("chunk4_la0", lambda: _chunked(chunk=4, lookahead=0, left_chunks=1), 4, 4),
    ("chunk2_la5", lambda: _chunked(chunk=2, lookahead=5, left_chunks=3), 2, 3),
    ("chunk1_la1", lambda: _chunked(chunk=1, lookahead=1), 1, 2),
]


class _general_only:
    """Context: the general ``step`` never dispatches to ``step_fixed`` (the pure general path,
    the oracle the fixed step is compared with): not in an attention (TransformerLayer asks its
    attention), a StreamingSequential, a CausalEncoder or a StreamingDecoder."""

    def __enter__(self):
        from pyencoder.models import CausalEncoder, StreamingDecoder
        from pyencoder.nn import attention
        self._mp = pytest.MonkeyPatch()
        for cls in (attention.IntervalSelfAttention, StreamingSequential, CausalEncoder,
                    StreamingDecoder):
            self._mp.setattr(cls, "_fixed_ok", lambda *a, **k: False)

    def __exit__(self, *exc):
        self._mp.undo()


def fixed_vs_general(module, st, xs, shape, feeds, outs, tol, exact_state=True, time_axis=1):
    """Run the chunks ``xs`` through ``module.step_fixed`` on ``st`` (the first with
    check=True, the rest under NoHostSync) and the pure general step on a copy of ``st``: each
    output has ``shape(n)`` for a chunk of n frames on ``time_axis`` (of the input and output) and equals the general one within ``tol``; every slot's out_lengths
    is the output's frame count; each slot's input and output are appended to ``feeds`` /
    ``outs``. Then the states agree (``exact_state``: torch.equal, else ``tol``) and ``st``
    kept its tensors (in place)."""
    B = len(feeds)
    oracle = module.init_state(B, dtype=torch.float64)
    oracle.load_state_dict(st.state_dict())
    ptrs = {k: v.data_ptr() for k, v in st.tensors().items()}
    for i, x in enumerate(xs):
        if i == 0:
            y = module.step_fixed(x, st, check=True)
        else:
            with NoHostSync():
                y = module.step_fixed(x, st)
        with _general_only():
            y2, oracle = module.step(x, oracle)
        n = x.shape[time_axis]
        want = shape(n)
        frames = want[time_axis]
        assert tuple(y.shape) == want, (i, tuple(y.shape), want)
        assert oracle.out_lengths.tolist() == st.out_lengths.tolist() == [frames] * B, i
        assert rel_err(y, y2) <= tol, (i, n)
        for b in range(B):
            feeds[b].append(x[b])
            outs[b].append(y[b])
    want = oracle.tensors()
    for k, v in st.tensors().items():
        if exact_state:
            assert torch.equal(v, want[k]), k
        else:
            assert rel_err(v.double(), want[k].double()) <= tol, k
    assert {k: v.data_ptr() for k, v in st.tensors().items()} == ptrs


def _run_fixed(module, x, warm_sizes, n, max_chunk):
    """Warm up with step (ragged sizes), then step_fixed in steps of n; return the concatenated
    outputs of the general steps and the fixed steps, and the state."""
    B = x.shape[0]
    st = module.init_state(B, max_chunk=max_chunk)
    outs = []
    t = 0
    for s in warm_sizes:
        y, st = module.step(x[:, t:t + s], st)
        outs.append(y[:, :int(st.out_lengths[0])])
        t += s
    assert module.check_step_fixed(st, n) if hasattr(module, "check_step_fixed") else True
    ptrs = {k: v.data_ptr() for k, v in st.tensors().items()}
    while t + n <= x.shape[1]:
        outs.append(module.step_fixed(x[:, t:t + n], st))
        assert int(st.out_lengths.min()) == n and int(st.out_lengths.max()) == n
        t += n
    assert {k: v.data_ptr() for k, v in st.tensors().items()} == ptrs
    return torch.cat(outs, 1), st, t


@pytest.mark.parametrize("name,make,n,max_chunk", ATT_CASES, ids=[c[0] for c in ATT_CASES])
@pytest.mark.parametrize("phase", [0, 1])
def test_attention_step_fixed_equals_step_and_offline(name, make, n, max_chunk, phase):
    torch.manual_seed(0)
    m = make()
    T = 40
    x = torch.randn(2, T, m.embed_dim)
    La = m.lookahead_frames
    warm = [2, 3, 1]
    while sum(warm) < La or (sum(warm) - La) % m.block != phase % m.block:
        warm.append(1)
    with torch.no_grad():
        ref = m(x)
        got, st, t = _run_fixed(m, x, warm, n, max_chunk)
        st2 = m.init_state(2, max_chunk=max_chunk)
        ys, u = [], 0
        with _general_only():
            for s in warm + [n] * ((t - sum(warm)) // n):
                y, st2 = m.step(x[:, u:u + s], st2)
                ys.append(y[:, :int(st2.out_lengths[0])])
                u += s
        via_step = torch.cat(ys, 1)
    assert got.shape[1] == via_step.shape[1]
    assert rel_err(got, via_step) <= TOL
    assert rel_err(got, ref[:, :got.shape[1]]) <= TOL
    for key in ("pos", "pending"):
        assert torch.equal(getattr(st, key), getattr(st2, key))


def test_chunked_slots_at_different_phases():
    """Slots whose positions differ modulo the chunk share one step_fixed (pending counts are
    read per slot on the device)."""
    torch.manual_seed(1)
    m = _chunked(chunk=3, lookahead=1)
    x = torch.randn(3, 30, m.embed_dim)
    lens = torch.tensor([4, 5, 6])
    with torch.no_grad():
        ref = m(x)
        st = m.init_state(3, max_chunk=6)
        y0, st = m.step(x[:, :6], st, lengths=lens)
        first = [y0[b, :int(st.out_lengths[b])] for b in range(3)]
        m.check_step_fixed(st, 3)
        xs = [torch.stack([x[b, int(lens[b]) + t: int(lens[b]) + t + 3] for b in range(3)])
              for t in range(0, 18, 3)]
        outs = [m.step_fixed(xi, st) for xi in xs]
        got = torch.cat(outs, 1)
    for b in range(3):
        row = torch.cat((first[b], got[b]), 0)
        assert rel_err(row, ref[b, :row.shape[0]]) <= TOL


def _stack(kind, E=16):
    """Conv front-end (stride 4: one frame per 4 samples) + 3 transformer layers."""
    layers = [CausalConv1d(1, 8, 4, stride=2, activation="gelu"), CausalConv1d(8, 8, 2, stride=2),
              Transpose(), nn.Linear(8, E)]
    for i, la in enumerate((2, 0, 1)):
        att = (BandedSelfAttention(E, 2, left=6, right=la) if kind == "banded" else
               ChunkedSelfAttention(E, 2, chunk_size=2, left_chunks=2, lookahead=la))
        layers.append(TransformerLayer(att, 32))
    return StreamingSequential(*layers).eval()


@pytest.mark.parametrize("kind", ["banded", "chunked"])
def test_stack_step_fixed_equals_step_and_offline(kind):
    torch.manual_seed(2)
    model = _stack(kind)
    hop, n = 4, 2
    x = torch.randn(2, 1, hop * 40)
    step = hop * n
    with torch.no_grad():
        ref = model(x)
        st = model.init_state(2, max_chunk=2)
        outs = []
        for t in range(0, step * 4, step):
            y, st = model.step(x[..., t:t + step], st)
            outs.append(y[:, :int(st.out_lengths[0])])
        ptrs = {k: v.data_ptr() for k, v in st.tensors().items()}
        st_ref = model.init_state(2, max_chunk=2)
        st_ref.load_state_dict(st.state_dict())
        ys_ref = []
        for t in range(step * 4, x.shape[-1], step):
            outs.append(model.step_fixed(x[..., t:t + step], st, check=(t == step * 4)))
            y, st_ref = model.step(x[..., t:t + step], st_ref)
            ys_ref.append(y)
            assert int(st_ref.out_lengths.min()) == n
        assert {k: v.data_ptr() for k, v in st.tensors().items()} == ptrs
        got = torch.cat(outs, 1)
        fixed = torch.cat(outs[4:], 1)
    assert rel_err(fixed, torch.cat(ys_ref, 1)) <= TOL
    assert rel_err(got, ref[:, :got.shape[1]]) <= TOL


@pytest.mark.parametrize("kind", ["banded", "chunked"])
def test_step_fixed_no_host_sync(kind):
    torch.manual_seed(3)
    model = _stack(kind)
    x = torch.randn(2, 1, 4 * 24)
    with torch.no_grad():
        st = model.init_state(2, max_chunk=2)
        for t in range(0, 64, 8):
            _, st = model.step(x[..., t:t + 8], st)
        model.step_fixed(x[..., 64:72], st, check=True)
        with NoHostSync():
            model.step_fixed(x[..., 72:80], st)
            model.step_fixed(x[..., 80:88], st)
    m = _chunked(chunk=3, lookahead=2)
    with torch.no_grad():
        st = m.init_state(1, max_chunk=3)
        _, st = m.step(torch.randn(1, 5, m.embed_dim), st)
        with NoHostSync():
            m.step_fixed(torch.randn(1, 3, m.embed_dim), st)


def test_step_fixed_errors():
    m = _chunked(chunk=3, lookahead=2)
    st = m.init_state(1, max_chunk=6)
    with pytest.raises(ValueError, match="multiple of the mask block \\(3\\)"):
        m.step_fixed(torch.randn(1, 2, m.embed_dim), st)
    with pytest.raises(ValueError, match="max_chunk=6"):
        m.step_fixed(torch.randn(1, 9, m.embed_dim), st)
    with pytest.raises(ValueError, match="steady state"):
        m.step_fixed(torch.randn(1, 3, m.embed_dim), st, check=True)
    _, st = m.step(torch.randn(1, 4, m.embed_dim), st)
    m.step_fixed(torch.randn(1, 3, m.embed_dim), st, check=True)
    _, st = m.flush(st)
    with pytest.raises(ValueError, match="slot 0 has pos=7, pending=0"):
        m.check_step_fixed(st, 3)
    u = ChunkedSelfAttention(16, 2, chunk_size=2, left_chunks=None)
    with pytest.raises(ValueError, match="finite left context"):
        u.step_fixed(torch.randn(1, 2, 16), u.init_state(1))
    c = CausalConv1d(1, 2, 4, stride=2)
    with pytest.raises(ValueError, match="multiple of the stride 2"):
        c.step_fixed(torch.randn(1, 1, 3), c.init_state(1))


# ---- GPU: capture in a CUDA graph ------------------------------------------------------------

def _capture(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def replay_rest(g, xbuf, ybuf, x, t, step, outs):
    """Replay graph g over x's chunks from t (copied into its input xbuf), appending clones of
    its output ybuf to outs; returns the concatenated outs (after a synchronize)."""
    while t + step <= x.shape[-1]:
        xbuf.copy_(x[..., t:t + step])
        g.replay()
        outs.append(ybuf.clone())
        t += step
    torch.cuda.synchronize()
    return torch.cat(outs, 1)


def _clone_state(module, st, B, max_chunk, **kw):
    c = module.init_state(B, max_chunk=max_chunk, **kw)
    c.load_state_dict(st.state_dict())
    return c


def gpu_quick(name, p):
    """The fast GPU tier (tests/conftest.py): graph capture of one banded and one chunked
    attention case per dtype, the graph-replayed stacks and the no-sync check."""
    if name == "test_cuda_graph_attention":
        return (p["name"], p["dtype"]) in (("band_r2", torch.bfloat16),
                                           ("chunk4_la0", torch.float32))
    return name in ("test_cuda_graph_stack_equals_offline", "test_step_fixed_no_sync_cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,make,n,max_chunk", ATT_CASES, ids=[c[0] for c in ATT_CASES])
def test_cuda_graph_attention(name, make, n, max_chunk, dtype):
    """Replaying a captured step_fixed equals eager step_fixed on a copy of the state (same
    kernels on the same inputs; the bound only allows for a different cuBLAS algorithm choice
    under capture: fp32 1e-5, bf16 2e-2 = a few bf16 ulps)."""
    torch.manual_seed(4)
    dev = "cuda"
    m = make().to(dev, dtype)
    B, E = 3, m.embed_dim
    steps = 6
    with torch.no_grad():
        st = m.init_state(B, max_chunk=max_chunk)
        La = m.lookahead_frames
        warm = La + m.block
        _, st = m.step(torch.randn(B, warm, E, device=dev, dtype=dtype), st)
        m.check_step_fixed(st, n)
        xs = torch.randn(steps + 1, B, n, E, device=dev, dtype=dtype)
        xbuf = xs[0].clone()
        eager = _clone_state(m, st, B, max_chunk)
        g, ybuf = _capture(lambda: m.step_fixed(xbuf, st))
        # the warm-up on the side stream and the capture advanced st by one step each
        # (capture does not run kernels, warm-up does): bring the eager copy to the same point
        m.step_fixed(xbuf.clone(), eager)
        for i in range(1, steps + 1):
            xbuf.copy_(xs[i])
            g.replay()
            ye = m.step_fixed(xs[i], eager)
            torch.cuda.synchronize()
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            assert rel_err(ybuf.float(), ye.float()) <= tol, (name, i)
        for k, v in st.tensors().items():
            e = eager.tensors()[k]
            if v.is_floating_point():
                assert rel_err(v.float(), e.float()) <= tol, k
            else:
                assert torch.equal(v, e), k


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["banded", "chunked"])
def test_cuda_graph_stack_equals_offline(kind):
    """A conv + transformer stack streamed by graph replays (fp32) equals the offline forward."""
    torch.manual_seed(5)
    dev = "cuda"
    model = _stack(kind).to(dev)
    hop, n = 4, 2
    step = hop * n
    x = torch.randn(2, 1, hop * 60, device=dev)
    with torch.no_grad():
        ref = model(x)
        st = model.init_state(2, max_chunk=2)
        outs = []
        t = 0
        for _ in range(4):
            y, st = model.step(x[..., t:t + step], st)
            outs.append(y[:, :int(st.out_lengths[0])])
            t += step
        outs.append(model.step_fixed(x[..., t:t + step], st, check=True))
        t += step
        xbuf = x[..., t:t + step].clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        warm = _clone_state(model, st, 2, 2)
        with torch.cuda.stream(s):
            model.step_fixed(xbuf, warm)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            ybuf = model.step_fixed(xbuf, st)
        got = replay_rest(g, xbuf, ybuf, x, t, step, outs)
    assert rel_err(got, ref[:, :got.shape[1]]) <= 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["banded", "chunked"])
def test_step_fixed_no_sync_cuda(kind):
    """On CUDA (Triton decode kernel, GPU conv backend) the eager step_fixed of a whole stack makes
    no synchronising CUDA call (torch.cuda.set_sync_debug_mode raises on one)."""
    torch.manual_seed(6)
    model = _stack(kind).to("cuda", torch.bfloat16)
    x = torch.randn(2, 1, 4 * 24, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        st = model.init_state(2, max_chunk=2)
        for t in range(0, 64, 8):
            _, st = model.step(x[..., t:t + 8], st)
        model.step_fixed(x[..., 64:72], st, check=True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model.step_fixed(x[..., 72:80], st)
            model.step_fixed(x[..., 80:88], st)
        finally:
            torch.cuda.set_sync_debug_mode("default")


# ---- the general step runs as step_fixed in the steady state ---------------------------------

def _count_fixed(monkeypatch, cls):
    # Attention modules: step() runs the body of step_fixed (_step_fixed) after its own checks,
    # so the spy sits on the body; modules without one dispatch to step_fixed itself.
    calls = []
    name = "_step_fixed" if hasattr(cls, "_step_fixed") else "step_fixed"
    orig = getattr(cls, name)

    def spy(self, *a, **k):
        calls.append(type(self).__name__)
        return orig(self, *a, **k)
    monkeypatch.setattr(cls, name, spy)
    return calls


def _layer_stack(mask):
    torch.manual_seed(3)
    att = (lambda: _banded(right=2)) if mask == "banded" else (lambda: _chunked(chunk=2,
                                                                                lookahead=1))
    return StreamingSequential(
        CausalConv1d(1, 8, 3, stride=2, activation="gelu"), Transpose(), nn.Linear(8, 16),
        TransformerLayer(att(), 32), TransformerLayer(att(), 32, norm_first=False)).eval()


@pytest.mark.parametrize("mask", ["banded", "chunked"])
def test_general_step_dispatches_to_fixed(monkeypatch, mask):
    """Uniform steps of a multiple of the block: after the warm-up the general step runs as
    step_fixed (spied), and the streamed outputs equal the pure general path and the offline
    forward; the states agree."""
    model = _layer_stack(mask)
    chunks = [4] * 3 + [8] * 17          # 8 samples = 4 frames (stride 2): whole chunks of 2
    x = torch.randn(2, 1, sum(chunks))
    def stream():
        st = model.init_state(2, max_chunk=4)
        ys, t = [], 0
        for c in chunks:
            y, st = model.step(x[..., t:t + c], st)
            ys.append(y)
            t += c
        return ys, st

    with torch.no_grad():
        ref = model(x)
        with _general_only():
            ys0, st0 = stream()
            yf0, st0 = model.flush(st0)
        calls = _count_fixed(monkeypatch, TransformerLayer)
        ys, st = stream()
        assert len(calls) >= 2 * 10, calls
        yf, st = model.flush(st)
    ys.append(yf)
    ys0.append(yf0)
    got, gen = torch.cat(ys, 1), torch.cat(ys0, 1)
    assert got.shape == gen.shape == ref.shape
    assert rel_err(got, gen) <= TOL and rel_err(got, ref) <= TOL
    # Counters, the rings and conv histories agree (the held-back query / residual queues are
    # compared through the outputs: their slots past the pending count are scratch).
    t1, t0 = st.tensors(), st0.tensors()
    assert t1.keys() == t0.keys()
    for key in t1:
        leaf = key.rsplit(".", 1)[-1]
        if leaf in ("pos", "pending", "count", "out_lengths"):
            assert torch.equal(t1[key], t0[key]), key
        elif leaf in ("k", "v", "hist"):
            assert rel_err(t1[key], t0[key]) <= TOL, key


def test_dispatch_keeps_counter_values(monkeypatch):
    """out_lengths / pos returned by an earlier step are not changed by a later step that runs
    as step_fixed (it updates its counters in place, on fresh tensors)."""
    m = _banded(right=2)
    calls = _count_fixed(monkeypatch, BandedSelfAttention)
    x = torch.randn(1, 20, m.embed_dim)
    with torch.no_grad():
        st = m.init_state(1, max_chunk=4)
        _, st = m.step(x[:, :3], st)
        seen = (st.out_lengths, st.pos)
        vals = (st.out_lengths.clone(), st.pos.clone())
        _, st = m.step(x[:, 3:7], st)
        assert calls
        assert torch.equal(seen[0], vals[0]) and torch.equal(seen[1], vals[1])
        assert int(st.out_lengths) == 4 and int(st.pos) == 7


@pytest.mark.parametrize("case", ["ragged", "unbounded", "after_flush", "not_block_multiple"])
def test_dispatch_not_taken(monkeypatch, case):
    left = None if case == "unbounded" else 5
    m = (_chunked(chunk=3, lookahead=1) if case == "not_block_multiple"
         else BandedSelfAttention(16, 2, left=left, right=1).eval())
    calls = _count_fixed(monkeypatch, type(m))
    x = torch.randn(2, 30, 16)
    with torch.no_grad():
        st = m.init_state(2, max_chunk=4)
        _, st = m.step(x[:, :6], st)
        calls.clear()
        if case == "ragged":
            _, st = m.step(x[:, 6:9], st, lengths=torch.tensor([3, 2]))
        elif case == "after_flush":            # a flushed state is refused (ends_stream)
            _, st = m.flush(st)
            with pytest.raises(ValueError, match="flushed"):
                m.step(x[:, 6:9], st)
        else:
            _, st = m.step(x[:, 6:8], st)
    assert calls == []
