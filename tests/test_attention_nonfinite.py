"""Non-finite values poison exactly the rows that see them (rule: pyencoder.reference.attention).

Op level (reference; Triton kernels under TRITON_INTERPRET=1 in float32 and float16): NaN / +-inf
planted in a visible key's k, a visible key's v, a query row, padded k/v rows and one dout row. The
expected NaN sets come from the dense mask of tests/oracle.py; every other entry of out, dq, dk,
dv is compared with a float64 dense oracle run on the same inputs with the poison replaced by
fresh finite values (tolerances as in test_attention_triton.py). The reference must also be
bit-identical to itself on those inputs.

Module level: one NaN input frame in BandedSelfAttention(left=5, right=2) makes exactly the rows
that see it NaN, offline and streamed (1-frame and random chunks), and the input gradient is NaN
exactly where a poisoned row reaches it.
"""
import random

import pytest
import torch

from _stream_utils import stream
from conftest import has_triton
from oracle import band, chunked, dense_attention, interval_mask
from pyencoder import Rope
from pyencoder.nn import BandedSelfAttention
from pyencoder.ops import interval_attention

NAN, INF = float("nan"), float("inf")


def _plant(B, Hq, Hk, Nq, Nk, D, dtype, klen, mask):
    """Random q, k, v, dout with poison; returns them, their finite twins and the planted rows."""
    q, k, v = (torch.randn(B, h, n, D, dtype=dtype) for h, n in ((Hq, Nq), (Hk, Nk), (Hk, Nk)))
    dout = torch.randn(B, Hq, Nq, D, dtype=dtype)
    twins = [t.clone() for t in (q, k, v, dout)]
    vis = mask[:, 0]
    # a key visible to some rows and not others, in the first valid half of batch item 0
    jk = random.randrange(2, max(3, int(klen[0]) // 2))
    k[0, 0, jk, random.randrange(D)] = NAN
    jv = random.randrange(max(1, int(klen[1]) // 2), int(klen[1]))
    v[1, Hk - 1, jv, random.randrange(D)] = INF
    iq = random.randrange(Nq)
    q[1, 0, iq, random.randrange(D)] = -INF
    ido = random.randrange(Nq)
    dout[0, Hq - 1, ido, random.randrange(D)] = NAN
    for b in range(B):
        k[b, :, int(klen[b]):, 0] = INF
        v[b, :, int(klen[b]):, 1] = NAN
    assert vis.any()
    return (q, k, v, dout), twins


def _expected(q, k, v, dout, mask, Hq, Hk):
    vis = mask[:, 0]                                              # (B, Nq, Nk)
    g = Hq // Hk
    kvbad = (~torch.isfinite(k).all(-1) | ~torch.isfinite(v).all(-1)).repeat_interleave(g, 1)
    has = vis.any(-1)[:, None, :]
    pois = (vis[:, None] & kvbad[:, :, None, :]).any(-1) | (~torch.isfinite(q).all(-1) & has)
    rowbad = pois | (~torch.isfinite(dout).all(-1) & has)
    colbad = (vis[:, None] & rowbad[..., None]).any(2)            # (B, Hq, Nk)
    colbad = colbad.view(colbad.shape[0], Hk, g, -1).any(2)
    return pois, rowbad, colbad


def _oracle(twins, mask, rope, scale):
    q, k, v, dout = (t.to(torch.float64, copy=True).requires_grad_(True) for t in twins)
    dim = 0 if rope is None else rope.dim
    out = dense_attention(q, k, v, mask, scale=scale, rope_dim=dim)
    out.backward(dout.detach())
    return out.detach(), q.grad, k.grad, v.grad


def _run(backend, q, k, v, dout, mp, rope, klen):
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = interval_attention(q, k, v, block=mp[0], lo_off=mp[1], hi_off=mp[2], rope=rope,
                             key_lengths=klen, backend=backend)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _check(got, want, bad, atol, rtol, name):
    bad = bad[..., None].expand_as(got)
    assert torch.equal(torch.isnan(got), bad), f"{name}: NaN pattern"
    torch.testing.assert_close(got[~bad].to(torch.float64), want[~bad], atol=atol, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")


_MASKS = [("band", band(5, 2)), ("band-unbounded", band(None, 3)), ("chunked", chunked(4, 1, 2))]


def _case(backend, dtype, mask_params, atol, rtol, Nq=37, D=16):
    B, Hq, Hk = 2, 2, 1
    Nk = Nq
    klen = torch.tensor([Nk - random.randrange(1, 6), Nk - random.randrange(1, 6)])
    mask = interval_mask(Nq, Nk, *mask_params, key_lengths=klen, batch=B)
    rope = Rope(D // 2)
    (q, k, v, dout), twins = _plant(B, Hq, Hk, Nq, Nk, D, dtype, klen, mask)
    pois, rowbad, colbad = _expected(q, k, v, dout, mask, Hq, Hk)
    assert pois.any() and not pois.all() and colbad.any() and not colbad.all()
    got = _run(backend, q, k, v, dout, mask_params, rope, klen)
    want = _oracle(twins, mask, rope, D ** -0.5)
    for name, x, w, bad in zip(("out", "dq", "dk", "dv"), got, want, (pois, rowbad, colbad,
                                                                       colbad)):
        _check(x, w, bad, atol, rtol, name)
    return (q, k, v, dout), twins, got, (pois, rowbad, colbad), klen, rope


@pytest.mark.parametrize("name,mp", _MASKS, ids=[m[0] for m in _MASKS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_nonfinite_rows(name, mp, dtype):
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    (q, k, v, dout), twins, got, bads, klen, rope = _case("reference", dtype, mp, tol, tol)
    # bit-identical to the call with the poison replaced (every unpoisoned entry)
    ref = _run("reference", *twins, mp, rope, klen)
    for x, w, bad in zip(got, ref, (bads[0], bads[1], bads[2], bads[2])):
        good = ~bad[..., None].expand_as(x)
        assert torch.equal(x[good], w[good])


def test_reference_padded_nonfinite_is_invisible():
    """NaN / inf only in padded k and v: the result equals the unpoisoned call exactly."""
    B, H, N, D = 3, 2, 29, 8
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    klen = torch.tensor([N - 3, N, 11])
    kp, vp = k.clone(), v.clone()
    for b in range(B):
        kp[b, :, int(klen[b]):] = INF
        vp[b, :, int(klen[b]):] = NAN
    res = []
    for kk, vv in ((k, v), (kp, vp)):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, kk, vv))
        out = interval_attention(qq, kk, vv, block=1, lo_off=-1, hi_off=N, key_lengths=klen,
                                 backend="reference")
        out.backward(torch.ones_like(out))
        res.append((out, qq.grad, kk.grad, vv.grad))
    for a, b in zip(*res):
        assert torch.equal(a, b)


@pytest.mark.skipif(not has_triton(), reason="triton is not installed")
@pytest.mark.parametrize("mi,dtype", [(0, torch.float16), (1, torch.float32), (2, torch.float32)],
                         ids=["band-fp16", "band-unbounded-fp32", "chunked-fp32"])
def test_triton_nonfinite_rows(mi, dtype):
    mp = _MASKS[mi][1]
    if not torch.cuda.is_available():
        import os
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    atol, rtol = (1e-4, 1e-4) if dtype == torch.float32 else (1.2e-2, 1e-2)
    _case("triton", dtype, mp, atol, rtol, Nq=21)


def _module_case(T=40):
    m = BandedSelfAttention(32, 4, left=5, right=2)
    x = torch.randn(1, T, 32)
    f = random.randrange(8, T - 8)
    xn = x.clone()
    xn[0, f, random.randrange(32)] = NAN
    rows = torch.zeros(T, dtype=torch.bool)
    rows[f - 2:f + 6] = True                  # i sees f  <=>  i - 5 <= f <= i + 2
    return m, x, xn, f, rows


def test_module_nan_frame_offline_and_streamed():
    m, x, xn, f, rows = _module_case()
    with torch.no_grad():
        y, yn = m(x), m(xn)
        assert torch.equal(torch.isnan(yn[0]).any(-1), rows)
        assert torch.equal(torch.isnan(yn[0]).all(-1), rows)
        assert torch.equal(yn[0, ~rows], y[0, ~rows])
        T = x.shape[1]
        sizes = []
        while sum(sizes) < T:
            sizes.append(random.randrange(1, 9))
        for chunks in ([1] * T, sizes):
            ys = stream(m, xn, chunks, time_dim=1)
            assert torch.equal(torch.isnan(ys[0]).any(-1), rows), chunks
            torch.testing.assert_close(ys[0, ~rows], y[0, ~rows], atol=1e-5, rtol=1e-5)


def test_module_nan_frame_gradient():
    m, x, xn, f, rows = _module_case()
    w = torch.randn(1, x.shape[1], 32)
    grads = []
    for inp in (x, xn):
        inp = inp.clone().requires_grad_(True)
        y = m(inp)
        (torch.where(rows[None, :, None], 0.0, y) * w).sum().backward()
        grads.append(inp.grad[0])
    reach = torch.zeros_like(rows)
    reach[f - 7:f + 8] = True                 # keys seen by a poisoned row, and those rows
    assert torch.equal(torch.isnan(grads[1]).any(-1), reach)
    torch.testing.assert_close(grads[1][~reach], grads[0][~reach], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_minus_inf_key_in_interior_block(backend):
    """A -inf k entry gives a -inf score (weight 0) for every row: they still count as poisoned.
    Unbounded history puts the key in the interior (unmasked) blocks of the later Triton tiles."""
    if backend == "triton" and not has_triton():
        pytest.skip("triton is not installed")
    B, H, N, D = 1, 1, 45, 16
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    q[..., 0] = q[..., 0].abs() + 0.1
    j = random.randrange(1, 8)
    k[0, 0, j, 0] = -INF
    mp = band(None, 2)
    mask = interval_mask(N, N, *mp)
    dout = torch.randn(B, H, N, D)
    pois, rowbad, colbad = _expected(q, k, v, dout, mask, H, H)
    assert pois.sum() > 16
    got = _run(backend, q, k, v, dout, mp, None, None)
    for x, bad in zip(got, (pois, rowbad, colbad, colbad)):
        assert torch.equal(torch.isnan(x), bad[..., None].expand_as(x))


@pytest.mark.skipif(not has_triton(), reason="triton is not installed")
def test_decode_kernel_nonfinite_matches_reference():
    from pyencoder.ops._decode_attention_triton import decode_attention_triton
    from pyencoder.reference.decode_attention import decode_attention_reference
    B, H, M, D, cap = 2, 2, 5, 16, 13
    q = torch.randn(B, H, M, D)
    k, v = torch.randn(B, H, cap, D), torch.randn(B, H, cap, D)
    k[0, 0, random.randrange(cap), random.randrange(D)] = NAN
    v[1, 1, random.randrange(cap), random.randrange(D)] = -INF
    k[1, 0, random.randrange(cap), 0] = -INF
    q[1, 0, random.randrange(M), random.randrange(D)] = INF
    n = torch.tensor([9, 3 * cap + 2])
    qpos = (n - 3)[:, None] - M + torch.arange(M)
    cnt = torch.tensor([M, M - 1])
    args = (q, k, v, qpos, cnt, n, Rope(8).inv_freq("cpu"), False, 1, 6, 2, D ** -0.5)
    ref = decode_attention_reference(*args)
    out = decode_attention_triton(*args)
    nan = torch.isnan(ref)
    assert nan.any() and not nan.all()
    assert torch.equal(torch.isnan(out), nan)
    torch.testing.assert_close(out[~nan], ref[~nan], atol=2e-6, rtol=1e-5)


@pytest.mark.skipif(not has_triton(), reason="triton is not installed")
def test_module_nan_frame_streamed_with_triton_decode():
    m, x, xn, f, rows = _module_case(T=24)
    m.decode_backend = "triton"
    with torch.no_grad():
        y = m(x)
        ys = stream(m, xn, [random.randrange(1, 6) for _ in range(24)], time_dim=1)
    assert torch.equal(torch.isnan(ys[0]).any(-1), rows)
    torch.testing.assert_close(ys[0, ~rows], y[0, ~rows], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gated", [True, False])
def test_wavlm_relpos_nan_frame_offline_and_streamed(gated):
    from pyencoder.nn.relpos import WavLMSelfAttention
    m = WavLMSelfAttention(32, 4, left=5, right=2, num_buckets=12, max_distance=20, gated=gated,
                           rope=True)
    T = 48
    x = torch.randn(1, T, 32)
    f = random.randrange(8, T - 8)
    xn = x.clone()
    xn[0, f, random.randrange(32)] = random.choice([NAN, INF])
    rows = torch.zeros(T, dtype=torch.bool)
    rows[f - 2:f + 6] = True
    with torch.no_grad():
        y, yn = m(x), m(xn)
        assert torch.equal(torch.isnan(yn[0]).all(-1), rows)
        assert torch.equal(torch.isnan(yn[0]).any(-1), rows)
        assert torch.equal(yn[0, ~rows], y[0, ~rows])
        ys = stream(m, xn, [random.randrange(1, 5) for _ in range(T)], time_dim=1)
    assert torch.equal(torch.isnan(ys[0]).any(-1), rows)
    torch.testing.assert_close(ys[0, ~rows], y[0, ~rows], atol=1e-5, rtol=1e-5)


def test_attention_dropout_nonfinite_rows():
    from pyencoder.ops import interval_attention_dropout
    B, H, N, D = 2, 2, 33, 8
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    klen = torch.tensor([N, N - 4])
    mp = band(4, 1)
    kn, vn = k.clone(), v.clone()
    j = random.randrange(5, N - 8)
    kn[0, 1, j, 0] = NAN
    vn[1, :, N - 3:] = INF                     # padding only
    mask = interval_mask(N, N, *mp, key_lengths=klen, batch=B)
    pois, _, _ = _expected(q, kn, vn, q, mask, H, H)
    outs = []
    for kk, vv in ((k, v), (kn, vn)):
        gen = torch.Generator().manual_seed(1234)
        outs.append(interval_attention_dropout(q, kk, vv, block=mp[0], lo_off=mp[1],
                                               hi_off=mp[2], dropout_p=0.3, key_lengths=klen,
                                               generator=gen))
    bad = pois[..., None].expand_as(outs[1])
    assert torch.equal(torch.isnan(outs[1]), bad) and pois.any()
    assert torch.equal(outs[1][~bad], outs[0][~bad])
