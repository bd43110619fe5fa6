"""Finite inputs whose products overflow: a key no row sees contributes nothing, whatever it holds.

Found by a numerics sweep: the plain-torch reference added the mask's -inf to the score product, so
a masked key holding large finite values (a q . k that overflows to +inf) gave NaN in rows that
cannot see it, and in the backward p = 0 times an overflowed dout . v gave NaN gradients there
(the Triton kernels were right). The reference now bounds every product from the inputs' largest
magnitudes (one aminmax pass, which also replaced the slower isfinite check) and, where one may
overflow, fills the mask in after the product and zeroes ds on masked pairs (the dropout path,
autograd through plain torch, always does). The streaming decode reference turned a finite
value row whose sum overflows into NaN (rowsum(v) * 0): v * 0 first now.

Checks: rows that do not see the huge key equal (forward, and dq / dk / dv of a loss over them)
the same call with that key replaced by ordinary values, on the reference and, where Triton is
installed, the Triton kernels in the interpreter (float32: 1e-5 relative, float64: 1e-12; the
overflow path fills the mask instead of adding it, an exact change); rows that see it are not
compared (they overflow). The fast path is kept for ordinary inputs (the bound says so).
"""
import math

import numpy as np
import pytest
import torch

from conftest import has_triton
from pyencoder import IntervalMask
from pyencoder.ops import banded_attention, decode_attention, interval_attention
from pyencoder.reference import attention as ref

MASKS = [IntervalMask.band(1, 0), IntervalMask.chunked(2, 1, 0), IntervalMask.band(2, 1, sink=1)]


def _case(dtype, mask, j_big):
    torch.manual_seed(0)
    B, Hq, Hk, N, D = 2, 2, 1, 12, 8
    q = torch.randn(B, Hq, N, D, dtype=dtype)
    k = torch.randn(B, Hk, N, D, dtype=dtype)
    v = torch.randn(B, Hk, N, D, dtype=dtype)
    dout = torch.randn(B, Hq, N, D, dtype=dtype)
    twin_k, twin_v = k.clone(), v.clone()
    big = torch.finfo(dtype).max
    k[0, 0, j_big] = big
    v[0, 0, j_big] = -big
    vis = mask.dense(N, N)                      # (N, N)
    blind = ~vis[:, j_big]                      # rows that do not see the huge key
    assert blind.any() and (~blind).any()
    # keys no row that sees the huge key sees: their gradients come from blind rows alone (the
    # rows that see it overflow: their output is not finite, nor are the gradients they send)
    clean = ~vis[~blind].any(0)
    assert clean.any()
    return q, (k, v), (twin_k, twin_v), dout, blind, clean


def _run(backend, mask, q, k, v, dout, blind):
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = interval_attention(q, k, v, mask=mask, backend=backend)
    # a loss over batch item 0's blind rows (and all of item 1)
    w = torch.ones_like(out)
    w[0, :, ~blind] = 0
    (out * dout * w).sum().backward()
    return out, q.grad, k.grad, v.grad


def _compare(dtype, got, want, blind, clean):
    """out and dq on batch item 0's blind rows (all of item 1), dk and dv on its clean keys."""
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for i, (g, w) in enumerate(zip(got, want)):
        rows = blind if i < 2 else clean
        torch.testing.assert_close(g[0, :, rows], w[0, :, rows], **tol)
        torch.testing.assert_close(g[1], w[1], **tol)


BACKENDS = ["reference"] + (["triton"] if has_triton() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask", MASKS, ids=repr)
def test_a_huge_masked_key_contributes_nothing(backend, dtype, mask):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton kernels take float16 / bfloat16 / float32")
    j_big = 9
    q, (k, v), (tk, tv), dout, blind, clean = _case(dtype, mask, j_big)
    out, dq, dk, dv = _run(backend, mask, q, k, v, dout, blind)
    want, wdq, wdk, wdv = _run(backend, mask, q, tk, tv, dout, blind)
    _compare(dtype, (out, dq, dk, dv), (want, wdq, wdk, wdv), blind, clean)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_dropout_a_huge_masked_key_contributes_nothing(dtype):
    """The dropout path (autograd through plain torch): the masked probabilities are filled with
    0 after the softmax so that the gradient stops there (0 * an overflowed dout . v in the
    softmax's backward was NaN for the whole row)."""
    from pyencoder.ops.attention_dropout import interval_attention_dropout
    mask, j_big = MASKS[0], 9
    q, (k, v), (tk, tv), dout, blind, clean = _case(dtype, mask, j_big)

    def run(k, v):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = interval_attention_dropout(qq, kk, vv, mask=mask, dropout_p=0.2,
                                         generator=torch.Generator().manual_seed(5))
        w = torch.ones_like(out)
        w[0, :, ~blind] = 0
        (torch.where(w > 0, out, 0) * dout).sum().backward()
        return out, qq.grad, kk.grad, vv.grad
    out, dq, dk, dv = run(k, v)
    want, wdq, wdk, wdv = run(tk, tv)
    _compare(dtype, (out, dq, dk, dv), (want, wdq, wdk, wdv), blind, clean)


def test_the_fast_path_stays_for_ordinary_inputs():
    """The bound of ordinary inputs is far below the limit; a scale or magnitude near the
    overflow takes the filling path; magnitudes reports NaN / inf as the old isfinite test did."""
    q, k = torch.randn(1, 2, 50, 64), torch.randn(1, 2, 50, 64)
    mq, mk = ref.magnitudes(q, k)
    assert not ref.overflow_risk(torch.float32, ref._score_bound(q, (mq, mk), 0.125, None, None))
    assert ref.overflow_risk(torch.float32, ref._score_bound(q, (mq, mk), 1e37, None, None))
    assert ref.overflow_risk(torch.float16, 1e38) and not ref.overflow_risk(torch.float64, 1e38)
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = torch.randn(3, 7).to(dt)
        assert ref.all_finite(x, None, x[:0])
        for bad in (float("nan"), float("inf"), float("-inf")):
            y = x.clone()
            y[2, 5] = bad
            assert not ref.all_finite(x, y)
            m = ref.magnitudes(y)[0]
            assert math.isnan(m) if math.isnan(bad) else m == math.inf
    assert ref.magnitudes(None, torch.tensor([-3.0, 2.0])) == [0.0, 3.0]


def test_decode_a_finite_value_row_whose_sum_overflows():
    """The streaming decode reference (and Triton's) equals the offline op on a visible value
    row [3e38, 3e38, -1, 1] (finite; its sum is not)."""
    torch.manual_seed(0)
    B, H, D, N, cap = 1, 1, 4, 6, 8
    K, V = torch.randn(B, H, N, D), torch.randn(B, H, N, D)
    V[0, 0, 3] = torch.tensor([3e38, 3e38, -1.0, 1.0])
    q = torch.randn(B, H, 1, D)
    kr, vr = torch.zeros(B, H, cap, D), torch.zeros(B, H, cap, D)
    kr[:, :, :N], vr[:, :, :N] = K, V
    off = banded_attention(torch.cat([torch.zeros(B, H, 5, D), q], 2), K, V, left=3,
                           right=0)[:, :, 5:]
    assert torch.isfinite(off).all()
    for backend in BACKENDS:
        o = decode_attention(q, kr, vr, torch.tensor([[5]]), torch.tensor([1]), torch.tensor([N]),
                             None, False, 1, 3, 0, D ** -0.5, backend=backend)
        torch.testing.assert_close(o, off, rtol=1e-5, atol=0)


def test_scale_takes_numpy_reals_and_refuses_other_types_by_name():
    q = k = v = torch.randn(1, 1, 4, 8)
    want = banded_attention(q, k, v, left=1, right=0, scale=0.5)
    for s in (np.float32(0.5), np.float64(0.5), 0.5):
        torch.testing.assert_close(banded_attention(q, k, v, left=1, right=0, scale=s), want,
                                   rtol=0, atol=0)
    for s in (torch.tensor(0.5), "0.5", True):
        with pytest.raises(TypeError, match="scale must be None or a finite non-zero float"):
            banded_attention(q, k, v, left=1, right=0, scale=s)
    for s in (0.0, float("inf"), np.float32("nan")):
        with pytest.raises(ValueError, match="scale must be None or a finite non-zero float"):
            banded_attention(q, k, v, left=1, right=0, scale=s)
