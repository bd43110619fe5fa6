"""WavLMSelfAttention with sink keys (issue 15), CPU.

Offline: the fused bias path with sinks equals a dense float64 oracle that builds the full N x N
score matrix with ``relative_position_bucket`` at the TRUE offsets s - p (small num_buckets /
max_distance, N far beyond max_distance so the saturated bucket is exercised), forward and the
gradients of x and every parameter (projections, rel_attn_embed, gate params).
Streaming: the general step (which switches to step_fixed in the steady state) and step_fixed
equal offline over random chunkings, band and chunked, sink inside / beyond the window, streams
far longer than max_distance; step_fixed runs without host synchronisation.
Saturation: a module whose sink columns stop short of the bucket's saturation point streams
wrong (the test fails), which is what the window extension prevents.
fused_bias=False with sinks is refused by name (NotImplementedError).

Tolerances: float64 1e-10 (same math up to summation order, ~1e-15); float32 1e-5 (DESIGN.md).
"""
import random

import pytest
import torch

from pyencoder.nn import WavLMSelfAttention, relpos
from test_streaming_fixed import NoHostSync

NB, MD = 8, 6          # num_buckets, max_distance: the bucket saturates at |r| >= ~6
CASES = {
    "band_sink_in": dict(left=3, right=1, sink=2),
    "band_sink_beyond": dict(left=2, right=0, sink=5),
    "chunked_sink": dict(chunk_size=2, left_chunks=1, lookahead=1, sink=3),
}
# unbounded history: the plain-torch ring path (no fixed step); sink keys ahead of the first
# queries' bands (it left them out: frames 0..sink-2 streamed up to 1.4 relative off offline)
UNBOUNDED = {
    "band_unbounded_sink": dict(left=None, right=0, sink=3),
    "chunked_unbounded_sink": dict(chunk_size=2, left_chunks=None, lookahead=0, sink=4),
    "band_unbounded_sink_la": dict(left=None, right=1, sink=5),
}


def _module(kw, dtype, seed=0):
    torch.manual_seed(seed)
    m = WavLMSelfAttention(16, 2, num_buckets=NB, max_distance=MD, **kw).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


def _oracle(m, x):
    """Dense float64: score = q.k * scale + gate * table[bucket(s - p)], visible iff the interval
    mask or s < sink."""
    B, T, E = x.shape
    H, D = m.num_heads, m.head_dim
    h = lambda lin: lin(x).view(B, T, H, D).transpose(1, 2)  # noqa: E731
    q, k, v = h(m.q_proj), h(m.k_proj), h(m.v_proj)
    p = torch.arange(T)
    rel = p[None, :] - p[:, None]                      # s - p
    bias = m.relative_bias_table()[relpos.relative_position_bucket(rel, NB, MD)]  # (T, T, H)
    bias = bias.permute(2, 0, 1)
    g = m.gate(x)
    sc = q @ k.transpose(-1, -2) * m.scale + g[..., None] * bias
    s = p[None, :]
    pp = p[:, None]
    kw = m._case
    if "chunk_size" in kw:
        c = kw["chunk_size"]
        lo = (pp // c - kw["left_chunks"]) * c if kw["left_chunks"] is not None else pp * 0 - T
        hi = (pp // c + 1) * c - 1 + kw["lookahead"]
    else:
        lo = pp - kw["left"] if kw["left"] is not None else pp * 0 - T
        hi = pp + kw["right"]
    vis = ((s >= lo) & (s <= hi)) | (s < kw["sink"])
    sc = sc.masked_fill(~vis, float("-inf"))
    o = torch.softmax(sc, -1) @ v
    return m.out_proj(o.transpose(1, 2).reshape(B, T, E))


@pytest.mark.parametrize("name", sorted(CASES) + sorted(UNBOUNDED))
def test_offline_matches_dense_oracle(name):
    kw = {**CASES, **UNBOUNDED}[name]
    m = _module(kw, torch.float64)
    m._case = kw
    x = torch.randn(2, 30, 16, dtype=torch.float64, requires_grad=True)
    y = m(x)
    ref = _oracle(m, x)
    assert (y - ref).abs().max() <= 1e-10 * ref.abs().max()
    gy = torch.randn_like(y)
    params = [x] + list(m.parameters())
    g1 = torch.autograd.grad(y, params, gy)
    g2 = torch.autograd.grad(ref, params, gy)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    assert any("rel_attn_embed" in n for n in names) and any("gru" in n for n in names)
    for n, a, b in zip(names, g1, g2):
        assert (a - b).abs().max() <= 1e-10 * max(b.abs().max(), 1.0), n   # some grads are ~0


def _stream(m, x, chunks):
    st = m.init_state(x.shape[0], max_chunk=4)
    outs, t = [], 0
    for c in chunks:
        y, st = m.step(x[:, t:t + c], st)
        outs.append(y[:, :int(st.out_lengths[0])])
        t += c
    y, st = m.flush(st)
    outs.append(y[:, :int(st.out_lengths[0])])
    return torch.cat(outs, 1)


@pytest.mark.parametrize("name", sorted(CASES) + sorted(UNBOUNDED))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=str)
def test_stream_matches_offline(name, dtype, tol):
    m = _module({**CASES, **UNBOUNDED}[name], dtype)
    x = torch.randn(2, 45, 16, dtype=dtype)
    with torch.no_grad():
        ref = m(x)
        for seed in range(2):
            rng = random.Random(seed)
            chunks, t = [], 0
            while t < 45:
                chunks.append(min(rng.randint(1, 9), 45 - t))
                t += chunks[-1]
            y = _stream(m, x, chunks)
            assert (y - ref).abs().max() <= tol * ref.abs().max(), chunks


@pytest.mark.parametrize("name", sorted(CASES))
def test_step_fixed_matches_offline_no_host_sync(name):
    m = _module(CASES[name], torch.float64)
    n = m.chunk_size if "chunk_size" in CASES[name] else 2
    x = torch.randn(2, 40, 16, dtype=torch.float64)
    with torch.no_grad():
        ref = m(x)
        st = m.init_state(2, max_chunk=4)
        outs, t = [], 0
        for s in (3, 5, 4):
            y, st = m.step(x[:, t:t + s], st)
            outs.append(y[:, :int(st.out_lengths[0])])
            t += s
        while t + n <= 40:
            with NoHostSync():
                outs.append(m.step_fixed(x[:, t:t + n], st))
            t += n
        y = torch.cat(outs, 1)
        assert (y - ref[:, :y.shape[1]]).abs().max() <= 1e-10 * ref.abs().max()
        assert y.shape[1] > 2 * MD          # streamed well past the saturation point


def test_columns_short_of_saturation_fail():
    """Columns cut at the window's own r_min (not extended to saturation) stream wrong."""
    kw = CASES["band_sink_in"]
    m = _module(kw, torch.float64)
    x = torch.randn(1, 40, 16, dtype=torch.float64)
    with torch.no_grad():
        ref = m(x)
        r_min, r_max = relpos.window_offsets(*m.mask.params)
        idx = m.bucket(torch.arange(r_min, max(r_max, kw["sink"] - 1) + 1))
        m.__dict__["_sink_window_buckets"] = {torch.device("cpu"): (idx, r_min)}
        y = _stream(m, x, [4] * 10)
    assert (y - ref).abs().max() > 1e-6 * ref.abs().max()


def test_plain_torch_path_refuses_sinks():
    m = _module(CASES["band_sink_in"], torch.float64)
    m.fused_bias = False
    with pytest.raises(NotImplementedError, match="fused_bias"):
        m(torch.randn(1, 8, 16, dtype=torch.float64))
