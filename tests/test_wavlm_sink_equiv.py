"""WavLMSelfAttention with sink keys (issue 15): equivalence across offline, streaming, Triton
and HF paths (tests/test_wavlm_sink.py has the first oracle / stream / saturation checks).

Offline: the module's forward (the op's fused bias with sinks, relpos.sink_bias_columns) equals a
dense float64 oracle that reads relative_position_bucket at the TRUE offsets s - p of every
visible key (band / chunked interval plus the sink keys, key_lengths, RoPE), forward and
gradients (x, projections, rel_attn_embed, gate parameters), with a small bucket (num_buckets=8,
max_distance=10) and N well beyond max_distance so the saturated bucket is exercised.
Streaming: after ragged warm-ups (slots at different positions), step_fixed == the pure general
step == offline per slot (float64 1e-10, float32 1e-5: streamed rows differ from offline only in
summation order), band and chunked, sink inside / beyond the window, streams longer than
max_distance; no host synchronisation in step_fixed; the window columns reach the bucket's
saturation point, and one column less makes the stream depart from offline. Triton (interpreter,
fp32) offline and decode; CausalEncoder.from_hf(WavLM, sink=) == the patched HF model, streamed
too; HF sink_frames=0 unchanged; GPU (marked): CUDA-graph replay of step_fixed with sinks.
"""
import random

import pytest
import torch

from _stream_utils import rel_err
from test_streaming_fixed import NoHostSync, _general_only
from test_streaming_fixed_sink import _stream_case, _warmup
from pyencoder.nn import WavLMSelfAttention
from pyencoder.nn.relpos import relative_position_bucket

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
NB, MD = 8, 10

CASES = [
    # (name, module kwargs, step length n)
    ("band_s3_in", dict(left=5, right=2, sink=3), 1),
    ("band_s9_beyond_ungated", dict(left=2, right=1, sink=9, gated=False), 2),
    ("band_s1_r0_rope", dict(left=3, right=0, sink=1, rope=True), 3),
    ("chunk_s2_in", dict(chunk_size=3, left_chunks=2, lookahead=2, sink=2), 3),
    ("chunk_s11_beyond", dict(chunk_size=2, left_chunks=1, lookahead=1, sink=11), 4),
]


def _module(kw, dtype=torch.float64):
    m = WavLMSelfAttention(16, 2, num_buckets=NB, max_distance=MD, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m.to(dtype).eval()


def _oracle(m, x, key_lengths=None):
    """Dense float64 WavLM attention with sinks: the bucket at the true offset of every key."""
    x = x.double()
    B, T, E = x.shape
    H, D = m.num_heads, m.head_dim

    def heads(lin):
        return (x @ lin.weight.double().t() + lin.bias.double()).view(B, T, H, D).transpose(1, 2)
    q, k, v = heads(m.q_proj), heads(m.k_proj), heads(m.v_proj)
    if m.rope is not None:
        from pyencoder.rope import apply_rope
        pos = torch.arange(T)
        inv = m.rope.inv_freq(x.device)
        q, k = (apply_rope(t, pos, inv, m.rope.interleaved) for t in (q, k))
    p = torch.arange(T)[:, None]
    s = torch.arange(T)[None, :]
    vis = ((s >= m.mask.lo(p)) & (s <= m.mask.hi(p))) | (s < m.mask.sink)
    vis = vis[None, None].expand(B, 1, T, T)
    if key_lengths is not None:
        vis = vis & (s[None, None] < key_lengths[:, None, None, None])
    bias = m.relative_bias_table().double()[relative_position_bucket(s - p, NB, MD)]
    bias = bias.permute(2, 0, 1)[None]
    if m.gated:
        g = x.view(B, T, H, D).transpose(1, 2)
        proj = (g @ m.gru_rel_pos_linear.weight.double().t() + m.gru_rel_pos_linear.bias.double())
        a, b = torch.sigmoid(proj.view(B, H, T, 2, 4).sum(-1)).chunk(2, dim=-1)
        gate = a * (b * m.gru_rel_pos_const.double() - 1.0) + 2.0
        bias = gate * bias
    sc = q @ k.transpose(-1, -2) * m.scale + bias
    sc = sc.masked_fill(~vis, float("-inf"))
    pr = torch.softmax(sc, -1).nan_to_num(0.0)
    o = (pr @ v).transpose(1, 2).reshape(B, T, E)
    return o @ m.out_proj.weight.double().t() + m.out_proj.bias.double()


@pytest.mark.parametrize("name,kw,n", CASES, ids=[c[0] for c in CASES])
def test_offline_equals_dense_oracle_forward_and_grads(name, kw, n):
    m = _module(kw).train()
    T = 3 * MD + 7                         # offsets far past max_distance: saturated buckets
    x = torch.randn(2, T, 16, dtype=torch.float64, requires_grad=True)
    kl = torch.tensor([T, T - 5])
    y = m(x, key_lengths=kl)
    ref = _oracle(m, x, kl)
    assert rel_err(y, ref) <= 1e-10
    w = torch.randn_like(y)
    params = [x] + list(m.parameters())
    g = torch.autograd.grad((y * w).sum(), params)
    g_ref = torch.autograd.grad((ref * w).sum(), params)
    names = ["x"] + [k for k, _ in m.named_parameters()]
    assert "rel_attn_embed.weight" in names
    for nm, a, b in zip(names, g, g_ref):
        # k_proj.bias's gradient is 0 up to rounding (a per-row constant under softmax): the
        # bound is relative to max(1, |reference|)
        assert float((a - b).abs().max()) <= 1e-9 * max(1.0, float(b.abs().max())), nm


def test_sink_changes_the_output():
    """The oracle test can fail: dropping the sinks changes the rows that see them."""
    m = _module(dict(left=2, right=1, sink=4))
    x = torch.randn(1, 30, 16, dtype=torch.float64)
    m0 = WavLMSelfAttention(16, 2, num_buckets=NB, max_distance=MD, left=2, right=1).double()
    m0.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert rel_err(m0(x)[:, 8:], m(x)[:, 8:]) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name,kw,n", CASES, ids=[c[0] for c in CASES])
def test_stream_step_fixed_equals_step_and_offline(name, kw, n, dtype):
    rng = random.Random(torch.randint(1 << 30, ()).item())
    torch.manual_seed(rng.randint(0, 1 << 30))
    m = _module(kw, dtype)
    B = 3
    warm, top = _warmup(rng, m, B)
    steps = (3 * MD) // n + rng.randint(1, 4)      # streams well past max_distance
    T = top + n * steps
    xs = [torch.randn(T, 16, dtype=dtype) for _ in range(B)]
    max_chunk = max(n, rng.choice([n, 4, 7]))
    with torch.no_grad():
        got, st = _stream_case(m, xs, warm, n, steps, max_chunk, fixed=True)
        with _general_only():
            gen, st2 = _stream_case(m, xs, warm, n, steps, max_chunk, fixed=False)
        for b in range(B):
            ref = m(xs[b][None])[0]
            assert got[b].shape == gen[b].shape and got[b].shape[0] > 2 * MD
            assert rel_err(got[b], gen[b]) <= TOL[dtype], (name, b)
            assert rel_err(got[b], ref[:got[b].shape[0]]) <= TOL[dtype], (name, b)
            assert rel_err(ref.double(), _oracle(m, xs[b][None])[0]) <= TOL[dtype] * 10
    for key in ("pos", "pending"):
        assert torch.equal(getattr(st, key), getattr(st2, key))


@pytest.mark.parametrize("kw", [dict(left=3, right=1, sink=2),
                                dict(chunk_size=2, left_chunks=1, lookahead=1, sink=5)])
def test_general_step_random_chunkings_equal_offline(kw):
    m = _module(kw)
    T = 4 * MD
    x = torch.randn(2, T, 16, dtype=torch.float64)
    with torch.no_grad():
        ref = m(x)
        st = m.init_state(2, max_chunk=6)
        ys, t = [], 0
        while t < T:
            c = random.randint(1, 6)
            y, st = m.step(x[:, t:t + c], st)
            ys.append(y)
            t += c
        y, st = m.flush(st)
        ys.append(y)
    got = torch.cat(ys, 1)
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= 1e-10


def test_window_columns_reach_saturation():
    """The streaming columns start at the bucket's saturation point; one column less makes a
    sink key far behind the window read a wrong bucket, and the stream departs from offline."""
    m = _module(dict(left=2, right=1, sink=3))
    rel, r0 = m.window_bias(torch.device("cpu"))
    assert r0 <= -3 and r0 + rel.shape[1] - 1 >= 2     # covers the window [-2, 1] and the sinks
    assert torch.equal(relative_position_bucket(torch.arange(r0 - 50, r0 + 1), NB, MD),
                       relative_position_bucket(torch.full((51,), r0), NB, MD))
    x = torch.randn(1, 4 * MD, 16, dtype=torch.float64)

    def run():
        st = m.init_state(1, max_chunk=2)
        ys = []
        for t in range(0, x.shape[1], 2):
            y, st = m.step(x[:, t:t + 2], st)
            ys.append(y)
        ys.append(m.flush(st)[0])
        return torch.cat(ys, 1)

    with torch.no_grad():
        ref = m(x)
        assert rel_err(run(), ref) <= 1e-10
        idx, c0 = m._sink_window_buckets[torch.device("cpu")]
        assert idx[1] != idx[0]              # the cheapest start: one column less is wrong
        m._sink_window_buckets[torch.device("cpu")] = (idx[1:], c0 + 1)   # stops short
        assert rel_err(run(), ref) > 1e-4
        del m._sink_window_buckets


def test_step_fixed_no_host_sync_with_sinks():
    m = _module(dict(chunk_size=3, left_chunks=2, lookahead=2, sink=4), torch.float32)
    with torch.no_grad():
        st = m.init_state(2, max_chunk=6)
        x = torch.randn(2, 40, 16)
        _, st = m.step(x[:, :12], st)
        assert m.check_step_fixed(st, 3)
        m.step_fixed(x[:, 12:15], st)
        with NoHostSync():
            for t in range(15, 39, 3):
                m.step_fixed(x[:, t:t + 3], st)


@pytest.mark.skipif(not __import__("conftest").has_triton(), reason="triton is not installed")
@pytest.mark.parametrize("kw", [dict(left=3, right=1, sink=2, rope=True),
                                dict(chunk_size=2, left_chunks=1, lookahead=1, sink=5)])
def test_triton_backends_with_sinks_equal_reference(kw):
    """Tiny case on the Triton kernels (TRITON_INTERPRET=1 on CPU; fp32: the interpreter's bf16
    dot is wrong): the offline forward and gradients on the interval kernels with the sink bias
    equal the reference backend (1e-4 relative: IEEE fp32 dots, exp2, another summation order),
    and a stream on the Triton decode kernel (general steps and step_fixed) equals offline
    (1e-5, DESIGN.md's streaming bound)."""
    import os
    import pyencoder
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set before triton is imported) or a GPU")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = _module(kw, torch.float32).to(dev).train()
    x = torch.randn(2, 2 * MD + 3, 16, device=dev, requires_grad=True)
    outs = {}
    for be in ("reference", "triton"):
        with pyencoder.use_backend(be):
            y = m(x)
            w = torch.ones_like(y) * torch.linspace(-1, 1, y.shape[-1], device=dev)
            outs[be] = (y, torch.autograd.grad((y * w).sum(), [x, m.rel_attn_embed.weight]))
    assert rel_err(outs["triton"][0], outs["reference"][0]) <= 1e-4
    for a, b in zip(outs["triton"][1], outs["reference"][1]):
        assert rel_err(a, b) <= 1e-4
    m.eval()
    m.decode_backend = "triton"
    xs = [torch.randn(2 * MD + 8, 16, device=dev) for _ in range(2)]
    rng = random.Random(3)
    warm, top = _warmup(rng, m, 2)
    n = m.block
    with torch.no_grad():
        got, _ = _stream_case(m, xs, warm, n, (2 * MD + 8 - top) // n, max(n, 4), fixed=True)
        for b in range(2):
            ref = m(xs[b][None])[0]
            assert rel_err(got[b], ref[:got[b].shape[0]]) <= 1e-5


def test_from_hf_wavlm_with_sinks_equals_patched_and_streams():
    """CausalEncoder.from_hf(WavLM, sink=) (the refusal is gone) equals the patched model with
    the same sink_frames offline, and streams equal to it (float64, 1e-9 as tests/test_models)."""
    pytest.importorskip("transformers")
    import pyencoder.hf as H
    from pyencoder.models import CausalEncoder
    from test_hf import make_model
    hf = make_model("wavlm").double().eval()
    enc = CausalEncoder.from_hf(hf, lookahead=1, left=4, pos_conv="causal", sink=3)
    atts = [a for a in enc.modules() if isinstance(a, WavLMSelfAttention)]
    assert atts and all(a.mask.sink == 3 for a in atts)
    H.apply_pyencoder_to_wav2vec2(hf, lookahead_frames=1, left_frames=4, rope=True,
                                  pos_conv="causal", group_norm="running", sink_frames=3)
    wav = torch.randn(1, 1500, dtype=torch.float64)
    with torch.no_grad():
        ref = hf(wav).last_hidden_state
        out = enc(wav).last_hidden_state
        assert ref.shape[1] > 64                 # past the model's max_bucket_distance
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
        st = enc.init_state(1)
        ys, t = [], 0
        while t < wav.shape[1]:
            c = random.choice([7, 40, 160, 333])
            y, st = enc.step(wav[:, t:t + c], st)
            ys.append(y)
            t += c
        ys.append(enc.flush(st)[0])
    torch.testing.assert_close(torch.cat(ys, 1), ref, rtol=0, atol=1e-9)


def test_hf_wavlm_sink_zero_unchanged():
    """A WavLM patched with sink_frames=0 is the model patched without the option."""
    pytest.importorskip("transformers")
    import pyencoder.hf as H
    from test_hf import audio, make_model
    a = make_model("wavlm").eval()
    b = make_model("wavlm").eval()
    b.load_state_dict(a.state_dict())
    H.apply_pyencoder_to_wav2vec2(a, lookahead_frames=2, left_frames=4, pos_conv="causal")
    H.apply_pyencoder_to_wav2vec2(b, lookahead_frames=2, left_frames=4, pos_conv="causal",
                                  sink_frames=0)
    assert a.config.pyencoder == b.config.pyencoder
    x = audio(2, 900)
    with torch.no_grad():
        assert torch.equal(a(x).last_hidden_state, b(x).last_hidden_state)


# ---- GPU: capture in a CUDA graph ------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,kw,n", [CASES[0], CASES[4]], ids=[CASES[0][0], CASES[4][0]])
def test_cuda_graph_wavlm_sink_step_fixed(name, kw, n, dtype):
    """A captured WavLM step_fixed with sinks (Triton decode kernel, sink span with the clamped
    bias) replayed equals the pure general step on a copy of the state (fp32 1e-5; bf16 2e-2, as
    tests/test_wavlm_step_fixed.py), past max_distance; the fp32 stream equals offline (1e-4:
    decode kernel vs offline interval kernels, another summation order)."""
    from test_streaming_fixed import _capture, _clone_state
    torch.manual_seed(7)
    m = _module(kw, torch.float32).cuda().to(dtype)
    B, E, steps, dev = 3, 16, 3 * MD, "cuda"
    mc = max(n, 4)
    with torch.no_grad():
        st = m.init_state(B, max_chunk=mc, dtype=dtype)
        warm = max(m.lookahead_frames, m.mask.sink)
        warm += (-warm) % m.block
        _, st = m.step(torch.randn(B, warm, E, device=dev, dtype=dtype), st)
        m.check_step_fixed(st, n)
        xs = torch.randn(steps + 1, B, n, E, device=dev, dtype=dtype)
        xbuf = xs[0].clone()
        eager = _clone_state(m, st, B, mc, dtype=dtype)
        g, ybuf = _capture(lambda: m.step_fixed(xbuf, st))
        m.step_fixed(xbuf.clone(), eager)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for i in range(1, steps + 1):
            xbuf.copy_(xs[i])
            g.replay()
            with _general_only():
                ye, eager = m.step(xs[i], eager)
            torch.cuda.synchronize()
            assert rel_err(ybuf.float(), ye.float()) <= tol, (name, i)
    if dtype == torch.float32:
        x = [torch.randn(4 * MD, E, device=dev) for _ in range(2)]
        rng = random.Random(1)
        w, top = _warmup(rng, m, 2)
        with torch.no_grad():
            got, _ = _stream_case(m, x, w, n, (4 * MD - top) // n, mc, fixed=True)
            for b in range(2):
                ref = m(x[b][None])[0]
                assert rel_err(got[b], ref[:got[b].shape[0]]) <= 1e-4
