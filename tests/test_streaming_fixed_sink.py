"""step_fixed (the CUDA-graph steady-state step) with sink keys, for banded and chunked masks.

CPU: after a warm-up with the general step over random ragged chunkings (slots at different
positions), step_fixed sequences equal the pure general step (its dispatch to step_fixed switched
off) and the offline forward of each slot's stream (float64 1e-10, float32 1e-5 relative: the
streamed rows differ from offline only in summation order), with the sink count inside and beyond
the window; the state tensors keep their data pointers and the fixed step never writes the sink
buffer (complete in the steady state); no host synchronisation
(tests/test_streaming_fixed.NoHostSync); the steady state begins once every sink key has arrived
(check_step_fixed names the sink before); the general step dispatches to step_fixed then and not
before; a conv + transformer stack and a CausalEncoder with sinks stream with ``step_fixed``
equal to offline. GPU (marked): step_fixed captured in a torch.cuda.CUDAGraph and replayed equals
the eager step_fixed (fp32, bf16), a stack streamed by graph replays equals offline, and the eager
step_fixed makes no synchronising CUDA call.
"""
import random

import pytest
import torch
from torch import nn

from _stream_utils import rel_err
from test_streaming_fixed import (NoHostSync, _capture, _clone_state, _count_fixed, _general_only,
                                  replay_rest)
from pyencoder.nn import (BandedSelfAttention, CausalConv1d, ChunkedSelfAttention,
                          TransformerLayer, Transpose, WavLMSelfAttention)
from pyencoder.streaming import StreamingSequential

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

# (name, factory, n): S inside the window (a few leading keys the window also covers early) and
# beyond it (the first queries wait for key S - 1, so the steady state starts at P = S)
CASES = [
    ("band_s3_in", lambda: BandedSelfAttention(16, 2, left=5, right=2, sink=3), 1),
    ("band_s9_beyond", lambda: BandedSelfAttention(16, 2, left=2, right=1, sink=9), 2),
    ("band_s1_r0", lambda: BandedSelfAttention(16, 2, left=3, right=0, sink=1, rope=False), 3),
    ("chunk_s2_in", lambda: ChunkedSelfAttention(16, 2, chunk_size=3, left_chunks=2, lookahead=2,
                                                 sink=2), 3),
    ("chunk_s11_beyond", lambda: ChunkedSelfAttention(16, 2, chunk_size=2, left_chunks=1,
                                                      lookahead=1, sink=11), 4),
    ("chunk_s4_la0", lambda: ChunkedSelfAttention(16, 2, chunk_size=4, left_chunks=1, lookahead=0,
                                                  sink=4), 4),
]


def gpu_quick(name, p):
    """The fast GPU tier (tests/conftest.py): one banded and one chunked graph case per dtype,
    the graph-replayed stack and the no-sync check."""
    if name == "test_cuda_graph_attention_with_sinks":
        return p["name"] in ("band_s9_beyond", "chunk_s2_in")
    return name in ("test_cuda_graph_sink_stack_equals_offline",
                    "test_sink_step_fixed_no_sync_cuda")


def _steady_from(m):
    return max(m.lookahead_frames, m.mask.sink)


def _feed(m, xs, st, counts):
    """One general step: slot b gets its next counts[b] frames of xs[b]; returns per-slot rows."""
    B = len(xs)
    x = xs[0].new_zeros(B, max(counts), xs[0].shape[-1])
    for b in range(B):
        p = int(st.pos[b])
        x[b, :counts[b]] = xs[b][p:p + counts[b]]
    y, st = m.step(x, st, lengths=torch.tensor(counts))
    return [y[b, :int(st.out_lengths[b])] for b in range(B)], st


def _stream_case(m, xs, warm, n, steps, max_chunk, fixed):
    """Warm-up with ragged general steps (``warm``: per-step per-slot counts), then ``steps``
    steps of n frames in every slot: step_fixed when ``fixed`` else the pure general step.
    Returns per-slot outputs and the state."""
    B = len(xs)
    st = m.init_state(B, max_chunk=max_chunk, dtype=xs[0].dtype)
    outs = [[] for _ in range(B)]
    for counts in warm:
        ys, st = _feed(m, xs, st, counts)
        for b in range(B):
            outs[b].append(ys[b])
    if fixed:
        m.check_step_fixed(st, n)
        ptrs = {k: v.data_ptr() for k, v in st.tensors().items()}
        sink = (st.sink_k.clone(), st.sink_v.clone())
    for _ in range(steps):
        x = torch.stack([xs[b][int(st.pos[b]):int(st.pos[b]) + n] for b in range(B)])
        if fixed:
            y = m.step_fixed(x, st)
            assert int(st.out_lengths.min()) == n == int(st.out_lengths.max())
            for b in range(B):
                outs[b].append(y[b])
        else:
            ys, st = _feed(m, xs, st, [n] * B)
            for b in range(B):
                outs[b].append(ys[b])
    if fixed:
        assert {k: v.data_ptr() for k, v in st.tensors().items()} == ptrs
        assert torch.equal(st.sink_k, sink[0]) and torch.equal(st.sink_v, sink[1])
    return [torch.cat(o, 0) for o in outs], st


def _warmup(rng, m, B, n_steps_min=2):
    """Random ragged per-slot chunk counts until every slot has seen max(lookahead, sink) frames;
    slots end at different positions (and phases of the chunk)."""
    need = _steady_from(m)
    warm, seen = [], [0] * B
    while min(seen) < need or len(warm) < n_steps_min:
        counts = [rng.randint(0, 5) for _ in range(B)]
        if max(counts) == 0:
            counts[0] = 1
        warm.append(counts)
        seen = [s + c for s, c in zip(seen, counts)]
    return warm, max(seen)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name,make,n", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("trial", range(2))
def test_sink_step_fixed_equals_step_and_offline(name, make, n, dtype, trial):
    rng = random.Random(torch.randint(1 << 30, ()).item())
    torch.manual_seed(rng.randint(0, 1 << 30))
    m = make().to(dtype).eval()
    B = 3
    warm, top = _warmup(rng, m, B)
    steps = rng.randint(3, 6)
    T = top + n * steps
    xs = [torch.randn(T, m.embed_dim, dtype=dtype) for _ in range(B)]
    max_chunk = max(n, rng.choice([n, 4, 7]))
    with torch.no_grad():
        got, st = _stream_case(m, xs, warm, n, steps, max_chunk, fixed=True)
        with _general_only():
            gen, st2 = _stream_case(m, xs, warm, n, steps, max_chunk, fixed=False)
        for b in range(B):
            ref = m(xs[b][None])[0]
            assert got[b].shape == gen[b].shape
            assert rel_err(got[b], gen[b]) <= TOL[dtype], (name, b)
            assert rel_err(got[b], ref[:got[b].shape[0]]) <= TOL[dtype], (name, b)
    for key in ("pos", "pending"):
        assert torch.equal(getattr(st, key), getattr(st2, key))


def test_steady_state_begins_when_every_sink_key_has_arrived():
    """sink beyond the window: no query is released before key sink - 1 arrived, so the state is
    not steady before P = sink (check_step_fixed names the sink), and the general step does not
    dispatch to step_fixed before; from then on it does, with the offline result."""
    torch.manual_seed(7)
    m = BandedSelfAttention(16, 2, left=2, right=1, sink=6).eval()
    x = torch.randn(1, 30, 16)
    with torch.no_grad():
        ref = m(x)
        st = m.init_state(1, max_chunk=4)
        outs = []
        for t in range(5):
            y, st = m.step(x[:, t:t + 1], st)
            outs.append(y[:, :int(st.out_lengths[0])])
            assert int(st.out_lengths[0]) == 0
            with pytest.raises(ValueError, match=r"max\(lookahead_frames=1, sink=6\)"):
                m.check_step_fixed(st, 1)
        y, st = m.step(x[:, 5:6], st)                        # key 5 arrives: queries 0..4 out
        outs.append(y[:, :int(st.out_lengths[0])])
        assert int(st.out_lengths[0]) == 5
        assert m.check_step_fixed(st, 1)
        for t in range(6, 30):
            outs.append(m.step_fixed(x[:, t:t + 1], st))
        got = torch.cat(outs, 1)
    assert rel_err(got, ref[:, :got.shape[1]]) <= 1e-5


def test_general_step_dispatches_to_fixed_with_sinks(monkeypatch):
    """Uniform steps: the general step runs as step_fixed once every slot is steady (P >= sink),
    never before, and the outputs equal the pure general path and offline."""
    m = ChunkedSelfAttention(16, 2, chunk_size=2, left_chunks=1, lookahead=1, sink=7).eval()
    x = torch.randn(2, 40, 16)
    with torch.no_grad():
        ref = m(x)
        with _general_only():
            st0 = m.init_state(2, max_chunk=4)
            ys0 = []
            for t in range(0, 40, 2):
                y, st0 = m.step(x[:, t:t + 2], st0)
                ys0.append(y)
            y, st0 = m.flush(st0)
            ys0.append(y)
        calls = _count_fixed(monkeypatch, ChunkedSelfAttention)
        st = m.init_state(2, max_chunk=4)
        ys, fixed_at = [], []
        for t in range(0, 40, 2):
            before = len(calls)
            y, st = m.step(x[:, t:t + 2], st)
            ys.append(y)
            if len(calls) > before:
                fixed_at.append(t)
        y, st = m.flush(st)
        ys.append(y)
    # steady from P >= 7 with P even: the step that starts at P = 8
    assert fixed_at == list(range(8, 40, 2)), fixed_at
    got, gen = torch.cat(ys, 1), torch.cat(ys0, 1)
    assert got.shape == gen.shape == ref.shape
    assert rel_err(got, gen) <= 1e-5 and rel_err(got, ref) <= 1e-5


def _sink_stack(kind, E=16):
    """Conv front-end (one frame per 4 samples) + 3 transformer layers with sink keys."""
    layers = [CausalConv1d(1, 8, 4, stride=2, activation="gelu"), CausalConv1d(8, 8, 2, stride=2),
              Transpose(), nn.Linear(8, E)]
    for i, (la, sink) in enumerate(((2, 4), (0, 1), (1, 9))):
        att = (BandedSelfAttention(E, 2, left=6, right=la, sink=sink) if kind == "banded" else
               ChunkedSelfAttention(E, 2, chunk_size=2, left_chunks=2, lookahead=la, sink=sink))
        layers.append(TransformerLayer(att, 32))
    return StreamingSequential(*layers).eval()


@pytest.mark.parametrize("kind", ["banded", "chunked"])
def test_sink_stack_step_fixed_equals_offline_without_host_sync(kind):
    torch.manual_seed(8)
    model = _sink_stack(kind)
    hop, n = 4, 2
    step = hop * n
    x = torch.randn(2, 1, hop * 40)
    with torch.no_grad():
        ref = model(x)
        st = model.init_state(2, max_chunk=2)
        outs = []
        t = 0
        for _ in range(8):                     # 16 frames: past every layer's sink
            y, st = model.step(x[..., t:t + step], st)
            outs.append(y[:, :int(st.out_lengths[0])])
            t += step
        outs.append(model.step_fixed(x[..., t:t + step], st, check=True))
        t += step
        ptrs = {k: v.data_ptr() for k, v in st.tensors().items()}
        with NoHostSync():
            for _ in range(2):
                outs.append(model.step_fixed(x[..., t:t + step], st))
                t += step
        while t + step <= x.shape[-1]:
            outs.append(model.step_fixed(x[..., t:t + step], st))
            t += step
        assert {k: v.data_ptr() for k, v in st.tensors().items()} == ptrs
        got = torch.cat(outs, 1)
    assert rel_err(got, ref[:, :got.shape[1]]) <= 1e-5


def test_single_module_step_fixed_no_host_sync_with_sinks():
    m = ChunkedSelfAttention(16, 2, chunk_size=3, left_chunks=1, lookahead=2, sink=5).eval()
    with torch.no_grad():
        st = m.init_state(2, max_chunk=3)
        _, st = m.step(torch.randn(2, 7, 16), st, lengths=torch.tensor([7, 5]))
        m.check_step_fixed(st, 3)
        with NoHostSync():
            m.step_fixed(torch.randn(2, 3, 16), st)
            m.step_fixed(torch.randn(2, 3, 16), st)


@pytest.mark.skipif(not __import__("conftest").has_triton(), reason="triton is not installed")
@pytest.mark.parametrize("kind", ["banded", "chunked"])
def test_sink_stream_on_the_triton_decode_kernel(kind, monkeypatch):
    """decode_backend="triton" (the interpreter on CPU): the general step and step_fixed of a
    layer with sinks run the Triton decode kernel with the sink buffer (spied), and the stream
    equals offline (fp32, 1e-5)."""
    import pyencoder.ops._decode_attention_triton as DT
    seen = []
    orig = DT.forward

    def spy(*a):
        seen.append(a[15] is not None and a[15].shape[2])
        return orig(*a)
    monkeypatch.setattr(DT, "forward", spy)
    torch.manual_seed(13)
    m = (BandedSelfAttention(16, 2, left=4, right=1, sink=6) if kind == "banded" else
         ChunkedSelfAttention(16, 2, chunk_size=2, left_chunks=1, lookahead=1, sink=3)).eval()
    m.decode_backend = "triton"
    n = m.block
    x = torch.randn(2, 24, 16)
    with torch.no_grad():
        ref = m(x)
        st = m.init_state(2, max_chunk=4)
        outs = []
        y, st = m.step(x[:, :8], st)
        outs.append(y[:, :int(st.out_lengths[0])])
        t = 8
        m.check_step_fixed(st, n)
        while t + n <= 20:
            outs.append(m.step_fixed(x[:, t:t + n], st))
            t += n
        y, st = m.step(x[:, t:], st)
        outs.append(y[:, :int(st.out_lengths[0])])
        outs.append(m.flush(st)[0])
        got = torch.cat(outs, 1)
    assert seen and all(s == m.mask.sink for s in seen), seen
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= 1e-5


# ---- GPU: capture in a CUDA graph ------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,make,n", CASES, ids=[c[0] for c in CASES])
def test_cuda_graph_attention_with_sinks(name, make, n, dtype):
    """Replaying a captured step_fixed with sink keys (Triton decode kernel, HAS_SINK) equals the
    eager step_fixed on a copy of the state (fp32 1e-5, bf16 2e-2: as
    tests/test_streaming_fixed.test_cuda_graph_attention), and the stream equals offline in fp32."""
    torch.manual_seed(9)
    dev = "cuda"
    m = make().to(dev, dtype)
    B, E, max_chunk = 3, m.embed_dim, max(n, 4)
    steps = 6
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        st = m.init_state(B, max_chunk=max_chunk)
        warm = _steady_from(m)
        warm += (-warm) % m.block
        _, st = m.step(torch.randn(B, warm, E, device=dev, dtype=dtype), st)
        m.check_step_fixed(st, n)
        xs = torch.randn(steps + 1, B, n, E, device=dev, dtype=dtype)
        xbuf = xs[0].clone()
        eager = _clone_state(m, st, B, max_chunk)
        g, ybuf = _capture(lambda: m.step_fixed(xbuf, st))
        m.step_fixed(xbuf.clone(), eager)
        for i in range(1, steps + 1):
            xbuf.copy_(xs[i])
            g.replay()
            ye = m.step_fixed(xs[i], eager)
            torch.cuda.synchronize()
            assert rel_err(ybuf.float(), ye.float()) <= tol, (name, i)
        for k, v in st.tensors().items():
            e = eager.tensors()[k]
            if v.is_floating_point():
                assert rel_err(v.float(), e.float()) <= tol, k
            else:
                assert torch.equal(v, e), k


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["banded", "chunked"])
def test_cuda_graph_sink_stack_equals_offline(kind):
    """A conv + transformer stack with sink keys streamed by graph replays (fp32) equals the
    offline forward."""
    torch.manual_seed(10)
    dev = "cuda"
    model = _sink_stack(kind).to(dev)
    hop, n = 4, 2
    step = hop * n
    x = torch.randn(2, 1, hop * 60, device=dev)
    with torch.no_grad():
        ref = model(x)
        st = model.init_state(2, max_chunk=2)
        outs = []
        t = 0
        for _ in range(8):
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
def test_sink_step_fixed_no_sync_cuda(kind):
    """The eager step_fixed of a stack with sink keys makes no synchronising CUDA call."""
    torch.manual_seed(11)
    model = _sink_stack(kind).to("cuda", torch.bfloat16)
    x = torch.randn(2, 1, 4 * 30, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        st = model.init_state(2, max_chunk=2)
        for t in range(0, 80, 8):
            _, st = model.step(x[..., t:t + 8], st)
        model.step_fixed(x[..., 80:88], st, check=True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model.step_fixed(x[..., 88:96], st)
            model.step_fixed(x[..., 96:104], st)
        finally:
            torch.cuda.set_sync_debug_mode("default")


# ---- CausalEncoder with sink keys --------------------------------------------------------------

ENC = {
    "band": (dict(sink=3), 1),
    "chunked": (dict(attention="chunked", left=None,
                     chunk_size=2, left_chunks=1, lookahead=1, sink=5,
                     lookahead_layers="first", norm_first=True), 2),
}


def _sink_encoder(over):
    from pyencoder.models import CausalEncoder
    from test_models import tiny_encoder_config
    torch.manual_seed(12)
    return CausalEncoder(tiny_encoder_config(**over)).double().eval()


@pytest.mark.parametrize("case", sorted(ENC))
def test_encoder_with_sinks_step_fixed_equals_offline(case, monkeypatch):
    """CausalEncoder(sink=S): ``layers.step_fixed`` after a warm-up equals the offline layer stack,
    and the whole encoder streamed in uniform steps runs its layers as step_fixed (spied) and
    equals the offline encoder (float64, 1e-10)."""
    over, n = ENC[case]
    m = _sink_encoder(over)
    assert all(lay.attention.mask.sink == over["sink"] for lay in m.layers)
    E = m.config.hidden_size
    h = torch.randn(2, 40, E, dtype=torch.float64)
    with torch.no_grad():
        ref = m.layers(h)
        st = m.layers.init_state(2, max_chunk=n, dtype=torch.float64)
        ys, t = [], 0
        for s in [2, 1, 3]:
            y, st = m.layers.step(h[:, t:t + s], st)
            ys.append(y[:, :int(st.out_lengths[0])])
            t += s
        while True:              # general steps of n frames until every layer is steady
            try:
                for lay, ls in zip(m.layers, st.layers):
                    lay.attention.check_step_fixed(ls.attention, n)
                break
            except ValueError:
                y, st = m.layers.step(h[:, t:t + n], st)
                ys.append(y[:, :int(st.out_lengths[0])])
                t += n
        with NoHostSync():
            ys.append(m.layers.step_fixed(h[:, t:t + n], st))
        t += n
        while t + n <= h.shape[1]:
            ys.append(m.layers.step_fixed(h[:, t:t + n], st))
            t += n
    got = torch.cat(ys, 1)
    assert got.shape[1] > 20
    assert rel_err(got, ref[:, :got.shape[1]]) <= 1e-10
    cls = type(m.layers[0].attention)
    calls = _count_fixed(monkeypatch, cls)
    hop = 20
    wav = torch.randn(2, hop * 50, dtype=torch.float64)
    with torch.no_grad():
        want = m(wav).last_hidden_state
        st = m.init_state(2, max_chunk=n)
        ys = []
        sizes = [37, 50] + [hop * n] * ((wav.shape[1] - 87) // (hop * n))
        t = 0
        for s in sizes + [wav.shape[1] - sum(sizes)]:
            y, st = m.step(wav[:, t:t + s], st)
            ys.append(y)
            t += s
        ys.append(m.flush(st)[0])
    assert len(calls) >= 10
    assert rel_err(torch.cat(ys, 1), want) <= 1e-10


def test_encoder_sink_argument():
    from pyencoder.models import CausalEncoder
    from test_models import tiny_encoder_config
    with pytest.raises(ValueError, match="sink must be an int >= 0.*got -1"):
        CausalEncoder(tiny_encoder_config(sink=-1))
    # WavLM layers take the sinks too (issue 15; they used to refuse them by name)
    from pyencoder.nn import WavLMSelfAttention
    enc = CausalEncoder(tiny_encoder_config(sink=2, rel_pos_bias=True, num_buckets=8,
                                            max_bucket_distance=16))
    atts = [m for m in enc.modules() if isinstance(m, WavLMSelfAttention)]
    assert atts and all(a.mask.sink == 2 for a in atts)


@pytest.mark.gpu
def test_cuda_graph_encoder_layers_with_sinks():
    """CausalEncoder(sink=3)'s layer stack captured as ``layers.step_fixed`` and replayed equals
    the eager stack step (fp32, 1e-5), as tests/test_wavlm_step_fixed's encoder graph test."""
    m = _sink_encoder(ENC["band"][0]).float().cuda()
    E, B, n, dev = m.config.hidden_size, 2, 1, "cuda"
    with torch.no_grad():
        st = m.layers.init_state(B, max_chunk=2, device=dev)
        _, st = m.layers.step(torch.randn(B, 8, E, device=dev), st)
        m.layers.step_fixed(torch.randn(B, n, E, device=dev), st, check=True)
        eager = m.layers.init_state(B, max_chunk=2, device=dev).load_state_dict(st.state_dict())
        xbuf = torch.randn(B, n, E, device=dev)
        g, ybuf = _capture(lambda: m.layers.step_fixed(xbuf, st))
        m.layers.step_fixed(xbuf.clone(), eager)
        for _ in range(5):
            xbuf.copy_(torch.randn(B, n, E, device=dev))
            g.replay()
            ye = m.layers.step_fixed(xbuf.clone(), eager)
            torch.cuda.synchronize()
            assert rel_err(ybuf, ye) <= 1e-5


@pytest.mark.parametrize("max_chunk", [1, 2, 4, 64])
@pytest.mark.parametrize("make", [
    lambda: BandedSelfAttention(16, 2, left=16, right=0, sink=4),
    lambda: ChunkedSelfAttention(16, 2, chunk_size=2, left_chunks=2, lookahead=0, sink=5),
    lambda: WavLMSelfAttention(16, 2, left=6, right=1, sink=6, num_buckets=8, max_distance=6),
    lambda: BandedSelfAttention(16, 2, left=None, right=0, sink=3),
], ids=["band", "chunked", "wavlm", "band_unbounded"])
def test_layer_splits_long_steps_while_queries_wait_for_sinks(make, max_chunk):
    """A TransformerLayer whose queries wait for the last sink key longer than for their
    lookahead (sink - 1 > hi_off) splits a step longer than its queue by the attention's own
    limit (max_chunk past what it holds back): steps of up to max_chunk + sink frames, from
    states still waiting for sink keys, equal offline (the layer split by hi_off and overran
    its residual queue: IndexError on CPU, a device-side assert on CUDA)."""
    torch.manual_seed(max_chunk)
    for norm_first in (True, False):
        m = TransformerLayer(make(), 24, norm_first=norm_first).double().eval()
        S = m.attention.mask.sink
        x = torch.randn(2, 3 * max_chunk + 4 * S + 20, 16, dtype=torch.float64)
        with torch.no_grad():
            ref = m(x)
            st = m.init_state(2, max_chunk=max_chunk)
            outs, t = [], 0
            for c in [1, max_chunk + S, 0, max_chunk + S - 1, 2 * max_chunk + S]:
                y, st = m.step(x[:, t:t + c], st)
                outs.append(y[:, :int(st.out_lengths[0])])
                t += c
            y, st = m.step(x[:, t:], st)
            outs.append(y[:, :int(st.out_lengths[0])])
            y, st = m.flush(st)
            outs.append(y[:, :int(st.out_lengths[0])])
        got = torch.cat(outs, 1)
        assert got.shape == ref.shape
        assert rel_err(got, ref) <= TOL[torch.float64], (norm_first, max_chunk)
