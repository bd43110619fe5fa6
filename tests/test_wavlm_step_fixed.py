"""WavLMSelfAttention.step_fixed (the CUDA-graph step with the gated relative bias in the ring
decode) and the WavLM stacks built on it.

CPU: after a warm-up with the general step over a random chunking, step_fixed sequences equal the
pure general step (the dispatch to step_fixed switched off), step_fixed on relpos' plain-torch
ring decode (``fused_bias = False``, the path before the op's bias) and the offline forward, band and chunked masks, gated and not, RoPE on and off, a
later layer reading layer 0's table; the state keeps its data pointers; no host synchronisation
(tests/test_streaming_fixed.NoHostSync); the general step dispatches to step_fixed in the steady
state; a CausalEncoder WavLM variant streamed with ``layers.step_fixed`` equals offline; the
window's bucket indices are built once per device and in-place table edits are seen; the Triton
decode path (interpreter) streams a WavLM module equal to offline.
GPU (marked): step_fixed captured in a torch.cuda.CUDAGraph and replayed equals the eager step,
for a module and a CausalEncoder WavLM layer stack.

Tolerances. float64: streamed and offline rows run the same float64 math up to the summation
order of the dot products and softmax sums, ~1e-15 relative; 1e-10 (tests/test_models_wavlm.py's
bound) is far below any mask / bias / gate error (O(1e-2) with these perturbed weights). float32:
DESIGN.md's streaming contract, 1e-5 relative.
"""
import random

import pytest
import torch

from _stream_utils import rel_err
from test_streaming_fixed import NoHostSync, _capture, _clone_state, _general_only
from pyencoder.models import CausalEncoder
from pyencoder.nn import WavLMSelfAttention, relpos
from test_models_wavlm import tiny_wavlm_config

F64_TOL = 1e-10
F32_TOL = 1e-5

CASES = {
    # name: (module kwargs, step length n, max_chunk)
    "band_r2_gated_rope": (dict(left=5, right=2, rope=True), 1, 4),
    "band_r0_ungated": (dict(left=7, right=0, gated=False), 3, 3),
    "band_r3_n2": (dict(left=9, right=3), 2, 5),
    "chunk4_la1": (dict(chunk_size=4, left_chunks=1, lookahead=1), 4, 4),
    "chunk3_la2_n6_rope": (dict(chunk_size=3, left_chunks=2, lookahead=2, rope=True), 6, 6),
    "chunk2_la0_ungated": (dict(chunk_size=2, left_chunks=3, lookahead=0, gated=False), 2, 3),
}


def _module(kw, dtype=torch.float64, shared=False):
    att = WavLMSelfAttention(16, 2, num_buckets=12, max_distance=20, **kw)
    if shared:   # a later layer: reads layer 0's table by reference
        owner = WavLMSelfAttention(16, 2, num_buckets=12, max_distance=20, **kw)
        att = WavLMSelfAttention(16, 2, num_buckets=12, max_distance=20, has_relative_bias=False,
                                 rel_attn_embed=owner.rel_attn_embed, **kw)
        att._owner = [owner]
        params = list(att.parameters()) + list(owner.parameters())
    else:
        params = list(att.parameters())
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn_like(p))
    if shared:
        owner.to(dtype)
    return att.to(dtype).eval()


def _warm_sizes(m, phase):
    """A random chunking long enough to reach the steady state at a given phase of the block."""
    warm = [random.randint(1, 5) for _ in range(random.randint(1, 4))]
    La = m.lookahead_frames
    while sum(warm) < La or (sum(warm) - La) % m.block != phase % m.block:
        warm.append(1)
    return warm


def _stream(m, x, warm, n, max_chunk, fixed):
    """Warm-up steps, then steps of n frames (step_fixed if ``fixed``, else the pure general
    step); the concatenated outputs and the state."""
    B, T = x.shape[:2]
    st = m.init_state(B, max_chunk=max_chunk)
    outs, t = [], 0
    for s in warm:
        y, st = m.step(x[:, t:t + s], st)
        outs.append(y[:, :int(st.out_lengths[0])])
        t += s
    if fixed:
        m.check_step_fixed(st, n)
        ptrs = {k: v.data_ptr() for k, v in st.tensors().items()}
    while t + n <= T:
        if fixed:
            outs.append(m.step_fixed(x[:, t:t + n], st))
            assert int(st.out_lengths.min()) == n == int(st.out_lengths.max())
        else:
            y, st = m.step(x[:, t:t + n], st)
            outs.append(y[:, :int(st.out_lengths[0])])
        t += n
    if fixed:
        assert {k: v.data_ptr() for k, v in st.tensors().items()} == ptrs
    return torch.cat(outs, 1), st


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("phase", [0, 1])
def test_step_fixed_equals_step_and_offline(name, dtype, phase):
    kw, n, mc = CASES[name]
    m = _module(kw, dtype, shared=phase == 1)
    x = torch.randn(2, 37, 16, dtype=dtype)
    warm = _warm_sizes(m, phase)
    tol = F64_TOL if dtype == torch.float64 else F32_TOL
    with torch.no_grad():
        ref = m(x)
        fixed, st = _stream(m, x, warm, n, mc, fixed=True)
        with _general_only():
            general, st2 = _stream(m, x, warm, n, mc, fixed=False)
        m.fused_bias = False      # relpos' plain-torch ring decode (the path before the op's bias)
        plain, _ = _stream(m, x, warm, n, mc, fixed=True)
        del m.fused_bias
    assert fixed.shape[1] == general.shape[1] == plain.shape[1] > 0
    assert rel_err(fixed, general) <= tol
    assert rel_err(plain, fixed) <= tol
    assert rel_err(fixed, ref[:, :fixed.shape[1]]) <= tol
    for key in ("pos", "pending"):
        assert torch.equal(getattr(st, key), getattr(st2, key)), key
    for b in range(2):     # the queued queries and gates (past them: stale entries, never read)
        p = int(st.pending[b])
        assert torch.equal(st.gate[b, :, :p], st2.gate[b, :, :p])
        assert torch.equal(st.q[b, :, :p], st2.q[b, :, :p])


def test_step_fixed_no_host_sync():
    m = _module(CASES["chunk3_la2_n6_rope"][0], torch.float32)
    with torch.no_grad():
        st = m.init_state(2, max_chunk=6)
        _, st = m.step(torch.randn(2, 5, 16), st)
        m.step_fixed(torch.randn(2, 3, 16), st, check=True)
        with NoHostSync():
            m.step_fixed(torch.randn(2, 3, 16), st)
            m.step_fixed(torch.randn(2, 6, 16), st)


def test_general_step_dispatches_to_fixed(monkeypatch):
    """Uniform steps after a ragged warm-up: the general step runs the fixed body (spied) and
    still equals offline."""
    from test_streaming_fixed import _count_fixed
    m = _module(CASES["band_r2_gated_rope"][0])
    calls = _count_fixed(monkeypatch, WavLMSelfAttention)
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    with torch.no_grad():
        ref = m(x)
        st = m.init_state(2, max_chunk=4)
        ys = []
        for t0, t1 in [(0, 3), (3, 4)] + [(t, t + 2) for t in range(4, 30, 2)]:
            y, st = m.step(x[:, t0:t1], st)
            ys.append(y)
        y, st = m.flush(st)
        ys.append(y)
    assert len(calls) >= 10
    assert rel_err(torch.cat(ys, 1), ref) <= F64_TOL


def test_window_bias_built_once_and_follows_table_edits():
    m = _module(CASES["chunk4_la1"][0])
    rel, r0 = m.window_bias(torch.device("cpu"))
    assert (r0, rel.shape) == (-(4 + 4 - 1), (2, 4 + 4 - 1 + 4 + 1))   # offsets [-7, 4]
    offs = torch.arange(r0, r0 + rel.shape[1])
    want = m.relative_bias_table()[relpos.relative_position_bucket(offs, 12, 20)].t()
    assert torch.equal(rel, want)
    idx = m._window_buckets[torch.device("cpu")]
    with torch.no_grad():
        m.rel_attn_embed.weight.mul_(2.0)
    rel2, _ = m.window_bias(torch.device("cpu"))
    assert m._window_buckets[torch.device("cpu")] is idx
    assert torch.equal(rel2, 2.0 * want)


def test_stream_uses_the_decode_op_with_bias(monkeypatch):
    """Bounded windows decode through pyencoder.ops.decode_attention with the bias (spied);
    unbounded ones keep the plain-torch ring path."""
    seen = []
    orig = relpos.decode_attention

    def spy(*a, **k):
        seen.append(k.get("rel_bias") is not None)
        return orig(*a, **k)
    monkeypatch.setattr(relpos, "decode_attention", spy)
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    with torch.no_grad():
        m = _module(CASES["band_r3_n2"][0])
        st = m.init_state(1, max_chunk=5)
        m.step(x, st)
        assert seen and all(seen)
        seen.clear()
        u = _module(dict(left=None, right=1))
        u.step(x, u.init_state(1))
        assert not seen


def _encoder(**over):
    from test_models_wavlm import _perturbed_encoder
    return _perturbed_encoder(tiny_wavlm_config(**over))


ENC = {
    "band": (dict(), 1),
    "chunked_preln": (dict(attention="chunked", left=None, chunk_size=3, left_chunks=1,
                           lookahead_layers="first", rope=False, norm_first=True), 3),
}


@pytest.mark.parametrize("case", sorted(ENC))
def test_encoder_layers_step_fixed_equals_offline(case, monkeypatch):
    """CausalEncoder's WavLM layer stack: ``layers.step_fixed`` after a warm-up equals the offline
    stack; and the whole encoder streamed in uniform steps runs its WavLM layers as step_fixed
    (spied) and equals the offline encoder (float64)."""
    from test_streaming_fixed import _count_fixed
    over, n = ENC[case]
    m = _encoder(**over)
    E = m.config.hidden_size
    h = torch.randn(2, 40, E, dtype=torch.float64)
    with torch.no_grad():
        ref = m.layers(h)
        st = m.layers.init_state(2, max_chunk=n, dtype=torch.float64)
        ys, t = [], 0
        for s in [2, 5, 1, 4]:
            y, st = m.layers.step(h[:, t:t + s], st)
            ys.append(y[:, :int(st.out_lengths[0])])
            t += s
        # warm up (general steps of n frames) until every layer is in steady state
        while True:
            try:
                for lay, ls in zip(m.layers, st.layers):
                    lay.attention.check_step_fixed(ls.attention, n)
                break
            except ValueError:
                y, st = m.layers.step(h[:, t:t + n], st)
                ys.append(y[:, :int(st.out_lengths[0])])
                t += n
        while t + n <= h.shape[1]:
            ys.append(m.layers.step_fixed(h[:, t:t + n], st))
            t += n
    got = torch.cat(ys, 1)
    assert got.shape[1] > 10
    assert rel_err(got, ref[:, :got.shape[1]]) <= F64_TOL
    calls = _count_fixed(monkeypatch, WavLMSelfAttention)
    hop = 20
    wav = torch.randn(2, hop * 60, dtype=torch.float64)
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
    assert rel_err(torch.cat(ys, 1), want) <= F64_TOL


@pytest.mark.skipif(not __import__("conftest").has_triton(), reason="triton is not installed")
def test_triton_decode_stream_equals_offline():
    """The Triton decode kernel with the bias (interpreter on CPU, tiny shapes) streams a WavLM
    module, general steps and step_fixed, equal to offline (fp32, DESIGN.md's 1e-5)."""
    m = _module(CASES["chunk3_la2_n6_rope"][0], torch.float32)
    m.decode_backend = "triton"
    x = torch.randn(2, 20, 16)
    with torch.no_grad():
        ref = m(x)
        got, _ = _stream(m, x, [2, 3, 1, 2], 3, 6, fixed=True)
    assert got.shape[1] >= 15
    assert rel_err(got, ref[:, :got.shape[1]]) <= F32_TOL


# ---- GPU: capture in a CUDA graph ------------------------------------------------------------

def gpu_quick(name, p):
    """The fast GPU tier (tests/conftest.py): one band case in bf16, one chunked case in fp32, and
    the encoder layer stack."""
    if name == "test_cuda_graph_wavlm_step_fixed":
        return (p["name"], p["dtype"]) in (("band_r2_gated_rope", torch.bfloat16),
                                           ("chunk3_la2_n6_rope", torch.float32))
    return name == "test_cuda_graph_wavlm_encoder_layers"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["band_r2_gated_rope", "chunk3_la2_n6_rope"])
def test_cuda_graph_wavlm_step_fixed(name, dtype):
    """A captured WavLM step_fixed (Triton decode kernel with the gated bias) replayed equals the
    pure general step (no dispatch to the fixed body) on a copy of the state: same decode kernel,
    the general step's gather / nonzero bookkeeping instead of the fixed one (fp32 1e-5; bf16 2e-2
    = a few bf16 ulps: cuBLAS may pick another algorithm under capture), and the streamed fp32
    output equals offline (1e-4: the decode kernel vs the offline interval kernels, both fp32 with
    ieee dots, differing in summation order; projections in fp32 at unit scale)."""
    torch.manual_seed(5)
    kw, n, mc = CASES[name]
    m = _module(kw, torch.float32).cuda().to(dtype)
    B, E, steps = 3, 16, 6
    dev = "cuda"
    with torch.no_grad():
        st = m.init_state(B, max_chunk=mc)
        _, st = m.step(torch.randn(B, m.lookahead_frames + m.block, E, device=dev, dtype=dtype),
                       st)
        m.check_step_fixed(st, n)
        xs = torch.randn(steps + 1, B, n, E, device=dev, dtype=dtype)
        xbuf = xs[0].clone()
        eager = _clone_state(m, st, B, mc)
        g, ybuf = _capture(lambda: m.step_fixed(xbuf, st))
        m.step_fixed(xbuf.clone(), eager)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for i in range(1, steps + 1):
            xbuf.copy_(xs[i])
            g.replay()
            with _general_only():                  # the pure general step (host reads)
                ye, eager = m.step(xs[i], eager)
            torch.cuda.synchronize()
            assert rel_err(ybuf.float(), ye.float()) <= tol, (name, i)
        for k, v in st.tensors().items():
            e = eager.tensors()[k]
            if k in ("q", "gate"):
                continue           # queue slots past the pending count are scratch
            if v.is_floating_point():
                assert rel_err(v.float(), e.float()) <= tol, k
            else:
                assert torch.equal(v, e), k
    if dtype == torch.float32:
        x = torch.randn(2, 30, E, device=dev)
        with torch.no_grad():
            ref = m(x)
            got, _ = _stream(m, x, [1, 2, 3], n, mc, fixed=True)
        assert rel_err(got, ref[:, :got.shape[1]]) <= 1e-4


@pytest.mark.gpu
def test_cuda_graph_wavlm_encoder_layers():
    """CausalEncoder's WavLM layer stack captured as ``layers.step_fixed`` and replayed equals the
    eager stack step (fp32, 1e-5)."""
    torch.manual_seed(6)
    m = _encoder().float().cuda()
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
