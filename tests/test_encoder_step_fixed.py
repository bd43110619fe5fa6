"""CausalEncoder.step_fixed: the whole encoder (feature extractor with its running GroupNorm,
projection, causal positional conv, layers, final LayerNorm) in one CUDA-graph-capturable step,
and pyencoder.hf.StreamingEncoder.step_fixed around it.

CPU (float64): after a warm-up with the general step (ragged chunks summing to whole hops),
step_fixed sequences equal the pure general step (the attention's dispatch to step_fixed switched
off) and the offline forward, and leave the same state (every tensor: conv buffers, ``seen``, the
running norm's float64 sums, the positional conv's history, the layers' rings); the state keeps
its data pointers; no host synchronisation (tests/test_streaming_fixed.NoHostSync) and no counter
fill once the counters hold the step's frame count (a container's ``out_lengths`` aliased to its
last child's is not filled twice); clear errors on bad steps and states that are not steady.
Configurations: the tiny encoders of tests/test_models.py (valid and causal convs, layer / running
group / no norm, band and chunked, pre- and post-LN), wav2vec2's own conv geometry (kernels
10,3,3,3,3,2,2, strides 5,2,...: its last two layers hold one sample more than k - stride, the
feature conv's cat path) with a HuBERT BatchNorm before a 128-tap positional conv, WavLM's
relative bias and attention sinks. HF: StreamingEncoder.step_fixed on patched transformers
models equals its general step. The general step runs as step_fixed in the steady state (spied:
one host read instead of ~80; same outputs, out_lengths and results as the pure general path;
counters the caller kept are not changed) and not for ragged lengths, partial hops or mask
blocks, hidden states, before the steady state or off the hop grid.
GPU (marked): the encoder's step_fixed captured in a torch.cuda.CUDAGraph and replayed equals the
eager step_fixed and the offline forward (fp32) / the eager step_fixed (bf16).

Tolerance: float64 streamed and offline rows run the same math up to summation order (~1e-15);
1e-10 as tests/test_models.py.
"""
import random

import pytest
import torch

from _stream_utils import rel_err, spy_calls
from test_models import ENC_CASES, tiny_encoder_config
from test_streaming_fixed import NoHostSync, _capture, _general_only
from pyencoder.models import CausalEncoder
from pyencoder.models.frontend import ConvFeatureExtractor
from pyencoder.nn.norm import RunningGroupNorm

F64_TOL = 1e-10

W2V2_CONV = dict(conv_dim=(8,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2),
                 conv_stride=(5, 2, 2, 2, 2, 2, 2))

CASES = {name: dict(kw) for name, kw in ENC_CASES.items()}
CASES["band_group_valid"] = dict(feat_extract_norm="group")
CASES["w2v2_geometry_hubert_bn"] = dict(**W2V2_CONV, feat_extract_norm="group", pos_conv_kernel=128,
                                        pos_conv_batch_norm=True, lookahead=3,
                                        lookahead_layers="first", left=8)
CASES["wavlm_chunked"] = dict(rel_pos_bias=True, num_buckets=12, max_bucket_distance=20,
                              attention="chunked", left=None,
                              chunk_size=2, left_chunks=2, lookahead=1,
                              feat_extract_norm="group")
CASES["band_sink"] = dict(sink=2, left=4, norm_first=True)
# the conv adapter after the encoder (config.add_adapter): hop includes its stride (4); the frames
# the layers hold back leave its layers at odd phases (ConvAdapter.step_fixed reads them)
CASES["adapter_band"] = dict(add_adapter=True, adapter_hidden_size=12, num_adapter_layers=2)
CASES["adapter_chunked_k5"] = dict(add_adapter=True, num_adapter_layers=2, adapter_kernel_size=5,
                                   adapter_padding=0, attention="chunked", left=None, chunk_size=2,
                                   left_chunks=2, lookahead=1, norm_first=True)


def _encoder(case, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    kw = dict(CASES[case])
    if kw.get("left", 6) is None and kw.get("attention") != "chunked":
        kw["left"] = 6            # step_fixed needs a bounded left context
    m = CausalEncoder(tiny_encoder_config(**kw))
    with torch.no_grad():     # no parameter at its constant init (LayerNorm 1/0, BatchNorm 1/0)
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
        bn = m.pos_conv_norm
        if bn is not None:
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return m.to(dtype).eval()


def _frames(m):
    """Output frames per fixed step: whole mask blocks (with the conv adapter, one output frame:
    its stride's worth of layer frames, within max_chunk=4)."""
    if m.adapter is not None:
        return 1
    return m.config.chunk_size if m.config.attention == "chunked" else 2


def _warm_sizes(n, steps, rng):
    """Ragged chunk sizes summing to steps * n samples (whole hops)."""
    total, sizes = steps * n, []
    while total:
        c = min(total, rng.randint(1, 2 * n))
        sizes.append(c)
        total -= c
    return sizes


@pytest.mark.parametrize("case", sorted(CASES))
def test_encoder_step_fixed_equals_step_and_offline(case):
    m = _encoder(case)
    B, n = 2, m.hop * _frames(m)
    warm, fixed = 6, 8
    x = torch.randn(B, n * (warm + fixed), dtype=torch.float64)
    rng = random.Random(sum(map(ord, case)))
    with torch.no_grad():
        ref = m(x).last_hidden_state
        st = m.init_state(B, max_chunk=4)
        outs, t = [], 0
        for c in _warm_sizes(n, warm, rng):
            y, st = m.step(x[:, t:t + c], st)
            outs.append(y[:, :int(st.out_lengths[0])])
            t += c
        oracle = m.init_state(B, max_chunk=4)
        oracle.load_state_dict(st.state_dict())
        ptrs = {k: v.data_ptr() for k, v in st.tensors().items()}
        got, want = [], []
        for i in range(fixed):
            got.append(m.step_fixed(x[:, t:t + n], st, check=i < 2))
            width = m.config.adapter_hidden_size if m.adapter is not None else None
            assert got[-1].shape == (B, n // m.hop, width or m.config.hidden_size)
            assert st.out_lengths.tolist() == [n // m.hop] * B
            with _general_only():
                y, oracle = m.step(x[:, t:t + n], oracle)
            assert oracle.out_lengths.tolist() == [n // m.hop] * B
            want.append(y)
            t += n
        assert {k: v.data_ptr() for k, v in st.tensors().items()} == ptrs
    assert rel_err(torch.cat(got, 1), torch.cat(want, 1)) <= F64_TOL
    streamed = torch.cat(outs + got, 1)
    assert rel_err(streamed, ref[:, :streamed.shape[1]]) <= F64_TOL
    a, b = st.tensors(), oracle.tensors()
    assert a.keys() == b.keys()
    assert any(k.startswith("frontend.") for k in a)
    bad = []
    for k in a:
        if k.endswith((".attention.q", ".attention.gate", ".res")):
            continue       # the layers' per-query queues: slots past `pending` are unused
        if a[k].is_floating_point():
            ok = rel_err(a[k], b[k]) <= F64_TOL
        else:
            ok = torch.equal(a[k], b[k])
        if not ok:
            bad.append(k)
    assert not bad


def test_w2v2_geometry_takes_both_feature_conv_paths():
    """wav2vec2's conv stack at a whole-hop position: layers 0-4 hold k - stride samples (the
    conv reads them as its initial state, no cat), layers 5 and 6 (k = stride = 2) hold one (the
    cat path); the held counts do not depend on the position."""
    fe = ConvFeatureExtractor(W2V2_CONV["conv_dim"], W2V2_CONV["conv_kernel"],
                              W2V2_CONV["conv_stride"], norm="group")
    assert fe.hop == 320
    assert fe.steady_held() == [5, 1, 1, 1, 1, 1, 1]
    for m in (3, 17, 1000):
        seen, held = 320 * m, []
        for layer in fe.conv_layers:
            held.append(int(layer.conv.held_after(torch.tensor([seen]))[0]))
            seen = layer.conv.out_length(seen)
        assert held == fe.steady_held()


@pytest.mark.parametrize("seed", range(6))
def test_steady_from_random_geometries(seed):
    """steady_from(): from there on every whole-hop position leaves the steady held counts (up
    to 3 receptive fields further), one hop earlier does not; valid and causal stacks, kernels
    up to 64 taps in late layers (a receptive field of many hops)."""
    rng = random.Random(seed)
    L = rng.randint(1, 4)
    strides = [rng.randint(1, 3) for _ in range(L)]
    kernels = [s + rng.randint(0, 64 if i == L - 1 else 6) for i, s in enumerate(strides)]
    fe = ConvFeatureExtractor((4,) * L, tuple(kernels), tuple(strides), norm=None,
                              causal=bool(seed % 2))
    held, start = fe.steady_held(), fe.steady_from()
    assert start % fe.hop == 0

    def at(seen):
        out = []
        for layer in fe.conv_layers:
            out.append(layer.conv.held_after(seen))
            seen = layer.conv.out_length(seen)
        return out
    R = 1 + sum((k - 1) * fe.hop for k in kernels)
    for m in range(start // fe.hop, start // fe.hop + 3 * (R // fe.hop + 2)):
        assert at(m * fe.hop) == held, (kernels, strides, m)
    if start:
        assert at(start - fe.hop) != held


@pytest.mark.parametrize("case", ["w2v2_geometry_hubert_bn", "wavlm_chunked", "band_sink",
                                  "adapter_chunked_k5"])
def test_encoder_step_fixed_no_host_sync_no_refill(case):
    """No host synchronisation; once warm (one eager fixed step), no counter fill: the
    encoder's, the stack's and the extractor's out_lengths alias their last child's after the
    general step and are not filled again (each fill would invalidate the other's record)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Fills(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("fill_", "fill"):
                Fills.n += 1
            return func(*args, **(kwargs or {}))

    m = _encoder(case)
    B, n = 2, m.hop * _frames(m)
    x = torch.randn(B, n * 10, dtype=torch.float64)
    with torch.no_grad():
        st = m.init_state(B, max_chunk=4)
        for i in range(6):
            _, st = m.step(x[:, i * n:(i + 1) * n], st)
        m.step_fixed(x[:, 6 * n:7 * n], st, check=True)
        with NoHostSync():
            m.step_fixed(x[:, 7 * n:8 * n], st)
        with Fills():
            m.step_fixed(x[:, 8 * n:9 * n], st)
            m.step_fixed(x[:, 9 * n:10 * n], st)
    assert Fills.n == 0


def test_encoder_step_fixed_errors():
    m = _encoder("band_postln_valid")
    n = m.hop * 2
    st = m.init_state(2, max_chunk=4)
    with torch.no_grad():
        with pytest.raises(ValueError, match="steady state"):      # valid convs: no window yet
            m.step_fixed(torch.randn(2, n, dtype=torch.float64), st, check=True)
        for _ in range(5):
            _, st = m.step(torch.randn(2, n, dtype=torch.float64), st)
        with pytest.raises(ValueError, match=r"multiple of hop \(20\)"):
            m.step_fixed(torch.randn(2, n + 5, dtype=torch.float64), st)
        with pytest.raises(ValueError, match="slots"):
            m.step_fixed(torch.randn(3, n, dtype=torch.float64), st)
        with pytest.raises(TypeError, match="wav must be a torch.Tensor"):
            m.step_fixed([0.0] * n, st)
        bad = m.init_state(2, max_chunk=4)
        bad.load_state_dict(st.state_dict())
        _, bad = m.step(torch.randn(2, 7, dtype=torch.float64), bad)   # off the hop grid
        with pytest.raises(ValueError, match="steady state"):
            m.step_fixed(torch.randn(2, n, dtype=torch.float64), bad, check=True)
        m.step_fixed(torch.randn(2, n, dtype=torch.float64), st, check=True)
    ad = CausalEncoder(tiny_encoder_config(add_adapter=True, adapter_hidden_size=16)).double()
    assert ad.hop == 20 * 8
    with pytest.raises(ValueError, match=r"multiple of hop \(160: the feature extractor's 20 x "
                                         r"the conv adapter's stride 8\)"):
        ad.step_fixed(torch.randn(1, 40, dtype=torch.float64), ad.init_state(1))
    assert ad.steady_check(40, ad.init_state(1)) is None


def test_running_group_norm_step_fixed():
    """In place, equal to the general step (bit for bit: the same float64 ops), any n >= 0."""
    torch.manual_seed(1)
    norm = RunningGroupNorm(6).double()
    with torch.no_grad():
        norm.weight.add_(torch.randn(6, dtype=torch.float64))
        norm.bias.add_(torch.randn(6, dtype=torch.float64))
    st = norm.init_state(3)
    ref = norm.init_state(3)
    ptrs = {k: v.data_ptr() for k, v in st.tensors().items()}
    for n in (4, 0, 1, 7):
        x = torch.randn(3, 6, n, dtype=torch.float64) * 3 + 1
        y = norm.step_fixed(x, st)
        y2, ref = norm.step(x, ref)
        assert torch.equal(y, y2)
        for k, v in st.tensors().items():
            assert torch.equal(v, ref.tensors()[k]), k
    assert {k: v.data_ptr() for k, v in st.tensors().items()} == ptrs


# ---- HF: StreamingEncoder.step_fixed ---------------------------------------------------------

@pytest.mark.parametrize("family", ["w2v2_post", "wavlm"])
def test_hf_streaming_encoder_step_fixed(family):
    pytest.importorskip("transformers")
    import pyencoder.hf as H
    from test_hf import make_model

    torch.manual_seed(7)
    model = make_model(family).eval()
    H.apply_pyencoder_to_wav2vec2(model, lookahead_frames=2, left_frames=6, pos_conv="causal")
    enc = H.StreamingEncoder(model)
    n = enc.hop * 2
    x = torch.randn(2, n * 12)
    with torch.no_grad():
        ref = model(x).last_hidden_state
        st = enc.init_state(2, max_chunk=4)
        outs = []
        for i in range(4):
            y, st = enc.step(x[:, i * n:(i + 1) * n], st)
            outs.append(y[:, :int(st.out_lengths[0])])
        oracle = enc.init_state(2, max_chunk=4)
        oracle.load_state_dict(st.state_dict())
        for i in range(4, 12):
            outs.append(enc.step_fixed(x[:, i * n:(i + 1) * n], st, check=i == 4))
            y, oracle = enc.step(x[:, i * n:(i + 1) * n], oracle)
            torch.testing.assert_close(outs[-1], y, atol=1e-6, rtol=1e-6)
    got = torch.cat(outs, 1)
    torch.testing.assert_close(got, ref[:, :got.shape[1]], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="output_hidden_states"):
        H.StreamingEncoder(model, output_hidden_states=True).step_fixed(x[:, :n], st)


# ---- GPU: capture the whole encoder in a CUDA graph ------------------------------------------

def gpu_quick(name, p):
    """The fast GPU tier (tests/conftest.py): the wav2vec2-geometry encoder in bf16."""
    return name == "test_cuda_graph_encoder" and p["dtype"] == torch.bfloat16 and \
        p["case"] == "w2v2_geometry_hubert_bn"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["w2v2_geometry_hubert_bn", "wavlm_chunked", "adapter_band"])
def test_cuda_graph_encoder(case, dtype):
    """Replays of the captured encoder step equal the eager step_fixed on a copy of the state
    (fp32 1e-5, bf16 2e-2: only a cuBLAS algorithm choice may differ under capture) and, in fp32,
    the offline forward (1e-4: TF32-free fp32 kernels, summation order)."""
    dev = "cuda"
    m = _encoder(case, dtype=torch.float32, seed=8).to(dev, dtype)
    B, n = 2, m.hop * _frames(m)
    warm, steps = 6, 6
    x = torch.randn(B, n * (warm + 2 + steps), device=dev, dtype=dtype)
    with torch.no_grad():
        ref = m(x).last_hidden_state
        st = m.init_state(B, max_chunk=4)
        outs = []
        for i in range(warm):
            y, st = m.step(x[:, i * n:(i + 1) * n], st)
            outs.append(y[:, :int(st.out_lengths[0])])
        outs.append(m.step_fixed(x[:, warm * n:(warm + 1) * n], st, check=True))
        xbuf = x[:, (warm + 1) * n:(warm + 2) * n].clone()
        eager = m.init_state(B, max_chunk=4)
        eager.load_state_dict(st.state_dict())
        g, ybuf = _capture(lambda: m.step_fixed(xbuf, st))
        # the side-stream warm-up ran one step on st (the capture runs none): match it
        outs.append(m.step_fixed(xbuf.clone(), eager).clone())
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for i in range(warm + 2, warm + 2 + steps):
            xbuf.copy_(x[:, i * n:(i + 1) * n])
            g.replay()
            ye = m.step_fixed(x[:, i * n:(i + 1) * n], eager)
            torch.cuda.synchronize()
            assert rel_err(ybuf.float(), ye.float()) <= tol, i
            outs.append(ybuf.clone())
    if dtype == torch.float32:
        got = torch.cat(outs, 1)
        assert rel_err(got, ref[:, :got.shape[1]]) <= 1e-4


# ---- the general step runs as step_fixed in the steady state ---------------------------------

class _Syncs(NoHostSync):
    """Count host reads instead of raising."""
    n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("_local_scalar_dense", "item", "is_nonzero"):
            _Syncs.n += 1
        return func(*args, **(kwargs or {}))


def step_both(m, xi, st, oracle, tag=None):
    """One step of ``m`` on ``st`` (counting its host reads) and on ``oracle`` by the pure
    general path; the out_lengths and the valid rows must agree (float64). Returns the reads."""
    _Syncs.n = 0
    with _Syncs():
        y, _ = m.step(xi, st)
    with _general_only():
        y2, _ = m.step(xi, oracle)
    assert torch.equal(st.out_lengths, oracle.out_lengths), tag
    k = int(st.out_lengths.max())
    assert rel_err(y[:, :k], y2[:, :k]) <= F64_TOL, tag
    return _Syncs.n


def _spy_step_fixed(monkeypatch):
    """A list that gets an entry per CausalEncoder.step_fixed call (which still runs)."""
    return spy_calls(monkeypatch, CausalEncoder)


@pytest.mark.parametrize("case", ["w2v2_geometry_hubert_bn", "wavlm_chunked", "band_sink",
                                  "band_preln_group_causalconv", "adapter_band",
                                  "adapter_chunked_k5"])
def test_general_step_dispatches_to_fixed(case, monkeypatch):
    """Uniform steps of whole hops: once steady, CausalEncoder.step runs step_fixed (spied) with
    one host read; outputs, out_lengths and the state equal the pure general path (float64) and
    the offline forward; counters the caller kept from earlier steps are not changed."""
    m = _encoder(case)
    B, n = 2, m.hop * _frames(m)
    steps = 10
    x = torch.randn(B, n * steps, dtype=torch.float64)
    calls = _spy_step_fixed(monkeypatch)
    with torch.no_grad():
        ref = m(x).last_hidden_state
        st = m.init_state(B, max_chunk=4)
        oracle = m.init_state(B, max_chunk=4)
        got, want, kept = [], [], []
        for i in range(steps):
            xi = x[:, i * n:(i + 1) * n]
            _Syncs.n = 0
            with _Syncs():
                y, st = m.step(xi, st)
            syncs = _Syncs.n
            got.append(y[:, :int(st.out_lengths[0])])
            kept.append((st.out_lengths, st.out_lengths.clone(), st.frontend.convs[0].seen,
                         st.frontend.convs[0].seen.clone()))
            with _general_only():
                y2, oracle = m.step(xi, oracle)
            want.append(y2[:, :int(oracle.out_lengths[0])])
            assert torch.equal(st.out_lengths, oracle.out_lengths), i
            if calls:       # one host read for the first dispatched step, none after it
                assert syncs == (1 if len(calls) == 1 else 0), (i, syncs, len(calls))
    assert len(calls) >= steps - 5, len(calls)
    a, b = torch.cat(got, 1), torch.cat(want, 1)
    assert a.shape == b.shape and rel_err(a, b) <= F64_TOL
    assert rel_err(a, ref[:, :a.shape[1]]) <= F64_TOL
    for t, v, s, sv in kept:
        assert torch.equal(t, v) and torch.equal(s, sv)


def test_dispatch_record_sees_reset_and_direct_steps(monkeypatch):
    """The record that spares the check is dropped by what changes the counters: reset() of a
    slot (the next step is not dispatched: that slot starts over), a step_fixed called directly
    (checked again: one host read, still steady)."""
    from pyencoder.streaming import reset
    m = _encoder("band_postln_valid")
    B, n = 2, m.hop * _frames(m)
    x = torch.randn(B, n * 14, dtype=torch.float64)
    calls = _spy_step_fixed(monkeypatch)
    with torch.no_grad():
        st = m.init_state(B, max_chunk=4)
        oracle = m.init_state(B, max_chunk=4)

        def both(i):
            return step_both(m, x[:, i * n:(i + 1) * n], st, oracle, i)
        for i in range(6):
            both(i)
        assert calls and both(6) == 0
        before = len(calls)
        mask = torch.tensor([False, True])
        reset(st, mask)
        reset(oracle, mask)
        both(7)
        assert len(calls) == before                 # slot 1 starts over: the general step
        for i in range(8, 12):
            both(i)
        assert len(calls) > before                  # steady again
        m.step_fixed(x[:, 12 * n:13 * n], st)       # counters advanced directly
        m.step_fixed(x[:, 12 * n:13 * n], oracle)
        assert both(13) == 1                        # checked again


def test_general_step_not_dispatched(monkeypatch):
    """Not taken: ragged lengths, steps that are not whole hops (or mask blocks), hidden states,
    before the steady state."""
    m = _encoder("wavlm_chunked")
    n = m.hop * _frames(m)
    calls = []
    monkeypatch.setattr(CausalEncoder, "step_fixed",
                        lambda self, *a, **k: calls.append(1))
    x = torch.randn(2, n, dtype=torch.float64)
    with torch.no_grad():
        st = m.init_state(2, max_chunk=4)
        m.step(x, st)                                   # not steady yet
        for _ in range(5):
            m.step(x, st, lengths=torch.tensor([n, n - 1]))
            m.step(x[:, :m.hop], st)                    # one hop: not a whole chunk of 2
            m.step(x[:, :n - 3], st)                    # not whole hops
            m.step(x, st, output_hidden_states=True)
    assert calls == []
    # a stream off the hop grid (7 samples in) stays on the general step, however steady its
    # layers are
    m = _encoder("band_postln_valid")
    n = m.hop * _frames(m)
    x = torch.randn(2, 7 + n * 8, dtype=torch.float64)
    with torch.no_grad():
        st = m.init_state(2, max_chunk=4)
        m.step(x[:, :7], st)
        for i in range(8):
            m.step(x[:, 7 + i * n:7 + (i + 1) * n], st)
    assert calls == []


def test_encoder_refused_fixed_step_check_reads_every_condition_first():
    """check=True reads the whole encoder's device conditions before any part runs (the
    feature extractor took the chunk before a layer refused: a retried chunk entered it twice);
    a refusal after the feature extractor ran marks the streams inconsistent."""
    from pyencoder.streaming.state import mark_broken
    torch.manual_seed(16)
    m = _encoder("band_postln_valid").eval()
    x = torch.randn(1, m.hop * 4 * 6, dtype=torch.float64)
    with torch.no_grad():
        ref = m(x).last_hidden_state
        st = m.init_state(1, max_chunk=4)
        y0, st = m.step(x[:, :m.hop], st)                   # not steady yet
        with pytest.raises(ValueError, match="needs every slot in its steady state"):
            m.step_fixed(x[:, m.hop:5 * m.hop], st, check=True)
        y1, st = m.step(x[:, m.hop:], st)
        y2, st = m.flush(st)
        torch.testing.assert_close(torch.cat([y0, y1, y2], 1), ref, rtol=1e-9, atol=1e-9)
        st = m.init_state(1)
        mark_broken(st, "a test")
        with pytest.raises(ValueError, match=r"streams are inconsistent \(a test\)"):
            m.step(x[:, :m.hop], st)


def test_encoder_refusals_after_the_front_end_are_decided_first(monkeypatch):
    """A step the front end takes but the layers refuse whatever the state (more frames than
    max_chunk) is refused on the host before the front end takes the chunk; so is nothing for
    an empty chunk. A part failing after the front end ran marks the streams inconsistent."""
    torch.manual_seed(19)
    m = _encoder("band_postln_valid").eval()
    x = torch.randn(1, m.hop * 40, dtype=torch.float64)
    with torch.no_grad():
        st = m.init_state(1, max_chunk=4)
        for i in range(3):
            _, st = m.step(x[:, i * 4 * m.hop:(i + 1) * 4 * m.hop], st)
        keep = st.state_dict()
        for check in (False, True):
            with pytest.raises(ValueError, match="cannot be a fixed one for the layers"):
                m.step_fixed(x[:, 12 * m.hop:18 * m.hop], st, check=check)
            with pytest.raises(ValueError):
                m.step_fixed(x[:, :0], st, check=check)
            assert not st.ended
        for k, v in st.state_dict().items():
            assert torch.equal(v, keep[k]) if isinstance(v, torch.Tensor) else v == keep[k], k

        def boom(*a, **kw):
            raise RuntimeError("boom")
        monkeypatch.setattr(m.layers, "step_fixed", boom)
        with pytest.raises(RuntimeError, match="boom"):
            m.step_fixed(x[:, 12 * m.hop:16 * m.hop], st)
        assert "after the feature extractor" in st.broken
        with pytest.raises(ValueError, match="streams are inconsistent"):
            m.step(x[:, 12 * m.hop:16 * m.hop], st)


@pytest.mark.parametrize("where", ["encoder_layer", "encoder_hidden", "stack", "layer_split",
                                   "attention_split", "adapter", "decoder"])
def test_general_step_failing_midway_marks_the_streams(monkeypatch, where):
    """The general step had no such mark: a later part failing (a CUDA OOM, an interrupt, a
    layer converted to another dtype) after earlier parts took the chunk left the state
    accepted, and a retried chunk entered those parts twice (the stream then 4.7 off offline,
    or a frame short). The state is marked inconsistent (state_dict and steps refuse it by
    name until reset); a failure before any part took the chunk leaves it usable."""
    from pyencoder.models.adapter import ConvAdapter
    from pyencoder.nn import BandedSelfAttention, TransformerLayer
    from test_decoder_step_fixed import _decoder
    from test_streaming_fixed import _stack
    torch.manual_seed(29)
    kw, fail_first = {}, None
    if where.startswith("encoder"):
        m = _encoder("band_postln_valid").eval()
        x, n = torch.randn(1, m.hop * 12, dtype=torch.float64), m.hop * 3      # not steady
        kw = {"output_hidden_states": where == "encoder_hidden"}
        target, fail_first = m.layers[1], m.feature_extractor
    elif where == "stack":
        m = _stack("banded").double()
        x, n = torch.randn(1, 1, 8 * 6, dtype=torch.float64), 8
        kw = {"lengths": torch.tensor([7])}                                    # ragged: general
        target = next(c for c in m if isinstance(c, TransformerLayer))
        fail_first = m[0]
    elif where in ("layer_split", "attention_split"):
        att = BandedSelfAttention(16, 2, left=3, right=1).double()
        m = TransformerLayer(att, 32).double().eval() if where == "layer_split" else att
        x, n = torch.randn(1, 12, 16, dtype=torch.float64), 12    # 12 frames > max_chunk 4
        # the second sub-chunk fails (the layer's step: the outer call, then one per sub-chunk)
        target = m
    elif where == "adapter":
        m = ConvAdapter(6, 4, 2, 3, 2, 1).double()
        x, n = torch.randn(1, 12, 6, dtype=torch.float64), 5
        target, fail_first = m.layers[1], m.layers[0]
    else:
        m = _decoder("refiner_attention")
        x, n = torch.randn(1, 12, 6, dtype=torch.float64), 5
        target = next(c for c in m.net.modules() if isinstance(c, TransformerLayer))
        fail_first = next(c for c in m.net if hasattr(c, "step"))
    axis = -1 if where == "stack" else 1
    init = (lambda: m.init_state(1, max_chunk=4)) if where.endswith("split") else \
        (lambda: m.init_state(1))
    calls = {"n": 0}
    real = type(target).step if not where == "attention_split" else type(target)._piece

    def failing(self, *a, **k):
        calls["n"] += 1
        if self is target and (not where.endswith("split") or
                               calls["n"] == (3 if where == "layer_split" else 2)):
            raise RuntimeError("injected failure")
        return real(self, *a, **k)
    with torch.no_grad():
        if fail_first is not None:          # a part refusing before any took the chunk
            st = init()
            monkeypatch.setattr(type(fail_first), "step", lambda *a, **k: (_ for _ in ()).throw(
                RuntimeError("refused first")))
            with pytest.raises(RuntimeError, match="refused first"):
                m.step(x.narrow(axis, 0, n), st, **kw)
            assert not st.ended
            monkeypatch.undo()
        st = init()
        monkeypatch.setattr(type(target), "_piece" if where == "attention_split" else "step",
                            failing)
        with pytest.raises(RuntimeError, match="injected failure"):
            m.step(x.narrow(axis, 0, n), st, **kw)
        monkeypatch.undo()
        assert st.ended and "had taken the chunk" in st.broken, where
        with pytest.raises(ValueError, match="streams are inconsistent"):
            st.state_dict()
        with pytest.raises(ValueError, match="streams are inconsistent"):
            m.step(x.narrow(axis, 0, n), st, **kw)


def test_fixed_and_empty_steps_failing_midway(monkeypatch):
    """ConvAdapter.step_fixed failing at its second layer marks its state; an empty step (no
    part took anything) failing later does not, for the adapter's fixed step and the encoder's
    general step."""
    from pyencoder.models.adapter import ConvAdapter, ConvAdapterLayer
    torch.manual_seed(61)
    ad = ConvAdapter(6, 4, 2, 3, 2, 1).double()
    h = torch.randn(1, 16, 6, dtype=torch.float64)
    real = ConvAdapterLayer.step_fixed

    def failing(self, *a, **k):
        if self is ad.layers[1]:
            raise RuntimeError("injected failure")
        return real(self, *a, **k)
    with torch.no_grad():
        for n, marked in ((4, True), (0, False)):
            st = ad.init_state(1)
            _, st = ad.step(h[:, :8], st)
            with monkeypatch.context() as mp:
                mp.setattr(ConvAdapterLayer, "step_fixed", failing)
                with pytest.raises(RuntimeError, match="injected failure"):
                    ad.step_fixed(h[:, 8:8 + n], st)
            assert st.ended == marked, n
            if marked:
                assert "ConvAdapter.step_fixed failed at layer 1 after layer 0" in st.broken
        m = _encoder("band_postln_valid").eval()
        st = m.init_state(1)
        with monkeypatch.context() as mp:
            mp.setattr(type(m.layers), "step", lambda *a, **k: (_ for _ in ()).throw(
                RuntimeError("injected failure")))
            with pytest.raises(RuntimeError, match="injected failure"):
                m.step(torch.zeros(1, 0, dtype=torch.float64), st)
        assert not st.ended
