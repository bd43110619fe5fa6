"""pyencoder.ops.interval_attention_dropout: interval attention with dropout on the probabilities.

Oracle: a dense float64 attention written here (explicit N x M mask from oracle.interval_mask,
rotary from oracle.rope_rotate) that applies the SAME keep-mask, recovered from the function's
debug output (return_keep=True), as transformers' eager does: softmax, then P * keep / (1 - p),
then @ v. Forward and gradients are compared. Statistics: keep rate and unbiasedness over many
independent draws (one call with the batch replicated), with tolerances derived from the exact
per-element variance.
"""
import math

import pytest
import torch

import pyencoder
from pyencoder.ops import interval_attention, interval_attention_dropout

from oracle import band, chunked, interval_mask, rope_rotate

CASES = [
    # (name, (block, lo_off, hi_off), Nq, Nk, q_offset, k_offset)
    ("band", band(5, 2), 70, 70, 0, 0),             # 32-row tiles: 3 tiles
    ("band_unbounded", band(None, 3), 33, 33, 0, 0),
    ("chunked", chunked(4, 2, 1), 45, 45, 0, 0),
    ("chunked_offsets", chunked(3, 1, 2), 19, 27, 10, 2),
    ("n1", band(0, 0), 1, 1, 0, 0),
]


def _inputs(B, Hq, Hk, Nq, Nk, D, dtype):
    q = torch.randn(B, Hq, Nq, D, dtype=dtype)
    k = torch.randn(B, Hk, Nk, D, dtype=dtype)
    v = torch.randn(B, Hk, Nk, D, dtype=dtype)
    return q, k, v


def _dense_keep(keeps, B, Hq, Nq, Nk):
    dense = torch.zeros(B, Hq, Nq, Nk, dtype=torch.bool)
    covered = torch.zeros(Nq, Nk, dtype=torch.bool)
    for i0, i1, j0, j1, keep in keeps:
        assert keep.shape == (B, Hq, i1 - i0, j1 - j0) and keep.dtype == torch.bool
        assert not covered[i0:i1, j0:j1].any(), "tiles overlap"
        dense[:, :, i0:i1, j0:j1] = keep
        covered[i0:i1, j0:j1] = True
    return dense, covered


def dense_dropout_attention(q, k, v, visible, keep, p, scale=None, rope=None, q_offset=0,
                            k_offset=0):
    """Dense float64 eager attention with a given keep-mask: softmax over visible keys (zero rows
    stay 0), dropout P * keep / (1 - p), then @ v. GQA by repeating k and v."""
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    q, k, v = q.double(), k.double(), v.double()
    if rope is not None:
        q = rope_rotate(q, torch.arange(Nq) + q_offset, rope.dim, rope.base, rope.interleaved)
        k = rope_rotate(k, torch.arange(Nk) + k_offset, rope.dim, rope.base, rope.interleaved)
    k = k.repeat_interleave(Hq // Hk, dim=1)
    v = v.repeat_interleave(Hq // Hk, dim=1)
    scale = D ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~visible, float("-inf"))
    any_vis = visible.any(-1, keepdim=True)
    P = torch.softmax(torch.where(any_vis, s, torch.zeros_like(s)), dim=-1) * any_vis
    factor = 0.0 if p >= 1 else 1.0 / (1.0 - p)
    return (P * keep.double() * factor) @ v, P


def _gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,mask,Nq,Nk,qo,ko", CASES, ids=[c[0] for c in CASES])
def test_p0_equals_op(dtype, name, mask, Nq, Nk, qo, ko):
    block, lo, hi = mask
    q, k, v = _inputs(2, 4, 2, Nq, Nk, 8, dtype)
    rope = pyencoder.Rope(4)
    kl = torch.tensor([Nk, max(0, Nk - 3)], dtype=torch.int32)
    kw = dict(block=block, lo_off=lo, hi_off=hi, rope=rope, key_lengths=kl, q_offset=qo,
              k_offset=ko)
    dout = torch.randn(2, 4, Nq, 8, dtype=dtype)

    def run(fn, **extra):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        o = fn(*x, **kw, **extra)
        o = o[0] if isinstance(o, tuple) else o
        o.backward(dout)
        return [o.detach()] + [t.grad for t in x]

    ref = run(interval_attention)
    public = run(interval_attention_dropout, dropout_p=0.0)
    for a, b in zip(public, ref):
        assert torch.equal(a, b)
    # The blocked autograd path itself at p = 0 (forced by return_keep): same tiles and the same
    # ops as the reference forward, so the forward is bit-equal; the gradients come from autograd
    # instead of the FlashAttention-style backward, so they agree to rounding (fp32: 1e-5 on O(1)
    # values over <= 70 keys; fp64: 1e-12).
    plain = run(interval_attention_dropout, dropout_p=0.0, return_keep=True)
    assert torch.equal(plain[0], ref[0])
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in zip(plain[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("name,mask,Nq,Nk,qo,ko", CASES, ids=[c[0] for c in CASES])
def test_same_mask_dense_oracle(p, name, mask, Nq, Nk, qo, ko):
    block, lo, hi = mask
    B, Hq, Hk, D = 2, 4, 2, 8
    q, k, v = _inputs(B, Hq, Hk, Nq, Nk, D, torch.float64)
    rope = pyencoder.Rope(6, interleaved=(name == "chunked"))
    kl = torch.tensor([Nk, max(0, Nk - 4)], dtype=torch.int32)
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    out, keeps = interval_attention_dropout(*x, block=block, lo_off=lo, hi_off=hi, dropout_p=p,
                                            rope=rope, key_lengths=kl, q_offset=qo, k_offset=ko,
                                            scale=0.3, generator=_gen(1234), return_keep=True)
    dout = torch.randn_like(out)
    out.backward(dout)
    keep, covered = _dense_keep(keeps, B, Hq, Nq, Nk)
    visible = interval_mask(Nq, Nk, block, lo, hi, qo, ko, kl, batch=B)
    # Every visible (i, j) lies in exactly one tile, so every visible probability got a draw.
    assert not (visible & ~covered).any()
    y = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, _ = dense_dropout_attention(*y, visible, keep, p, scale=0.3, rope=rope, q_offset=qo,
                                     k_offset=ko)
    ref.backward(dout)
    # float64 on both sides, different summation orders over <= 70 terms: 1e-10.
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(x, y):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)


def test_same_mask_fp32_and_half():
    block, lo, hi = chunked(4, 1, 2)
    q, k, v = _inputs(1, 2, 2, 37, 37, 16, torch.float32)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
        # Half inputs are computed in fp32 after one rounding of q, k, v: the error is that
        # rounding (fp16 2^-11, bf16 2^-8 relative) carried through O(1) softmax weights.
        x = [t.to(dtype) for t in (q, k, v)]
        out, keeps = interval_attention_dropout(*x, block=block, lo_off=lo, hi_off=hi,
                                                dropout_p=0.2, generator=_gen(7),
                                                return_keep=True)
        assert out.dtype == dtype
        keep, _ = _dense_keep(keeps, 1, 2, 37, 37)
        ref, _ = dense_dropout_attention(*x, interval_mask(37, 37, block, lo, hi), keep, 0.2)
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_gradcheck_fixed_mask():
    q, k, v = [t.requires_grad_() for t in _inputs(1, 2, 1, 9, 9, 4, torch.float64)]
    kl = torch.tensor([7], dtype=torch.int32)

    def f(q, k, v):
        return interval_attention_dropout(q, k, v, block=2, lo_off=2, hi_off=2, dropout_p=0.3,
                                          rope=pyencoder.Rope(4), key_lengths=kl,
                                          generator=_gen(99))
    assert torch.autograd.gradcheck(f, (q, k, v))


def test_generator_reproducible():
    q, k, v = _inputs(2, 2, 2, 40, 40, 8, torch.float32)
    kw = dict(block=1, lo_off=6, hi_off=3, dropout_p=0.3)
    a = interval_attention_dropout(q, k, v, **kw, generator=_gen(5))
    b = interval_attention_dropout(q, k, v, **kw, generator=_gen(5))
    c = interval_attention_dropout(q, k, v, **kw, generator=_gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(11)
    d = interval_attention_dropout(q, k, v, **kw)
    torch.manual_seed(11)
    e = interval_attention_dropout(q, k, v, **kw)
    assert torch.equal(d, e)


@pytest.mark.parametrize("p", [0.1, 0.4])
def test_statistics(p):
    """One call on K copies of the same (q, k, v) along the batch gives K independent draws.

    Keep rate: n visible Bernoulli(1 - p) draws; the rate's std is sqrt(p (1 - p) / n); we allow
    6 std. Unbiasedness: out_ki = sum_j P_ij keep_kij v_j / (1 - p), so E[out] = P v (the
    no-dropout output) and, for any fixed direction u, Var[out_i . u] = p / (1 - p) *
    sum_j P_ij^2 (v_j . u)^2 exactly. The D features of a row share its keep draws (correlated),
    rows have independent ones, so the test statistic is one z per row: z_i = (mean_K(out_i) -
    (P v)_i) . u / sqrt(Var / K), u = (1, ..., 1) / sqrt(D). The z_i are independent with mean 0 and
    variance 1; by the CLT (K = 400) |z_i| < 6 for all of the n = Hq * N = 384 rows except with
    probability ~1e-6, and their sample variance is 1 +- sqrt(2 / n) = 1 +- 0.072: we allow 5 of
    those (0.36). A missing 1 / (1 - p) rescale moves the mean of z by ~sqrt(K) (tens of std); a
    keep mask shared across draws makes the variance ~K times too large. The keep draws come from
    a generator seeded from the test seed (PYENCODER_TEST_SEED reproduces a failure)."""
    K, Hq, N, D = 400, 4, 96, 4
    block, lo, hi = band(4, 2)
    q, k, v = _inputs(1, Hq, Hq, N, N, D, torch.float64)
    rep = [t.expand(K, -1, -1, -1).contiguous() for t in (q, k, v)]
    out, keeps = interval_attention_dropout(*rep, block=block, lo_off=lo, hi_off=hi, dropout_p=p,
                                            generator=_gen(int(torch.randint(0, 2 ** 31, ()))),
                                            return_keep=True)
    keep, _ = _dense_keep(keeps, K, Hq, N, N)
    visible = interval_mask(N, N, block, lo, hi, batch=K).expand(K, Hq, N, N)
    n = int(visible.sum())
    rate = keep[visible].double().mean().item()
    assert abs(rate - (1 - p)) < 6 * math.sqrt(p * (1 - p) / n)

    ref, P = dense_dropout_attention(q, k, v, visible[:1],
                                     torch.ones(1, Hq, N, N, dtype=torch.bool), 0.0)
    u = torch.full((D,), D ** -0.5, dtype=torch.float64)
    var = p / (1 - p) * (P ** 2) @ ((v.double() @ u) ** 2)[..., None]
    z = ((out.mean(0, keepdim=True) - ref) @ u)[..., None] / torch.sqrt(var / K)
    rows = z.numel()
    assert rows == Hq * N
    assert z.abs().max() < 6
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / rows)


def test_zero_rows_and_p1():
    # Batch 1 has no valid keys; in batch 0 the queries at positions 0..7 see keys at >= 10 only
    # through a band of right context 1: rows 0..7 are empty (k_offset = 10).
    B, H, N, D = 2, 2, 20, 8
    q, k, v = [t.requires_grad_() for t in _inputs(B, H, H, N, N, D, torch.float32)]
    kl = torch.tensor([N, 0], dtype=torch.int32)
    for p in (0.3, 1.0):
        for t in (q, k, v):
            t.grad = None
        out = interval_attention_dropout(q, k, v, block=1, lo_off=3, hi_off=1, dropout_p=p,
                                         key_lengths=kl, k_offset=10, generator=_gen(3))
        out.backward(torch.randn_like(out))
        assert torch.isfinite(out).all()
        assert (out[1] == 0).all() and (out[0, :, :9] == 0).all()
        if p == 1.0:
            assert (out == 0).all()
        else:
            assert (out[0, :, 9:] != 0).any()
        for t in (q, k, v):
            assert torch.isfinite(t.grad).all()
        assert (q.grad[1] == 0).all() and (q.grad[0, :, :9] == 0).all()


def test_validation():
    q, k, v = _inputs(1, 2, 2, 5, 5, 4, torch.float32)
    kw = dict(block=1, lo_off=1, hi_off=1)
    with pytest.raises(ValueError, match="dropout_p"):
        interval_attention_dropout(q, k, v, **kw, dropout_p=1.5)
    with pytest.raises(TypeError, match="dropout_p"):
        interval_attention_dropout(q, k, v, **kw, dropout_p="0.1")
    with pytest.raises(TypeError, match="dropout_p"):
        interval_attention_dropout(q, k, v, **kw, dropout_p=True)
    with pytest.raises(TypeError, match="generator"):
        interval_attention_dropout(q, k, v, **kw, dropout_p=0.1, generator=3)
    with pytest.raises(TypeError, match="block"):
        interval_attention_dropout(q, k, v, block=1.0, lo_off=1, hi_off=1, dropout_p=0.1)
    with pytest.raises(ValueError, match="head_dim"):
        interval_attention_dropout(q, k, v[..., :3], **kw, dropout_p=0.1)
    with pytest.raises(ValueError, match="key_lengths"):
        interval_attention_dropout(q, k, v, **kw, dropout_p=0.1,
                                   key_lengths=torch.tensor([9], dtype=torch.int32))


def test_memory_is_blocked():
    """No intermediate of the forward or the backward is N x N: every tensor created stays below
    N * N / 16 elements at N = 1024 with a 13-key window (a tile holds 32 x 44 scores)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MaxNumel(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor):
                    MaxNumel.largest = max(MaxNumel.largest, t.numel())
            return t if not isinstance(out, (tuple, list)) else out

    N = 1024
    q, k, v = [t.requires_grad_() for t in _inputs(1, 1, 1, N, N, 4, torch.float32)]
    with MaxNumel():
        out = interval_attention_dropout(q, k, v, block=1, lo_off=8, hi_off=4, dropout_p=0.2,
                                         rope=pyencoder.Rope(4))
        out.sum().backward()
    assert 0 < MaxNumel.largest < N * N // 16


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cuda_same_mask_dense_oracle(dtype, tol):
    """The plain-torch path on CUDA with a CUDA generator: same-mask oracle as on CPU (fp32: TF32
    is off by default for bmm; bf16: input rounding 2^-8 carried through O(1) weights)."""
    block, lo, hi = chunked(8, 2, 3)
    B, Hq, Hk, N, D = 2, 4, 2, 300, 32
    q, k, v = _inputs(B, Hq, Hk, N, N, D, torch.float32)
    kl = torch.tensor([N, 250], dtype=torch.int32)
    g = torch.Generator(device="cuda")
    g.manual_seed(0)
    x = [t.to("cuda", dtype).requires_grad_() for t in (q, k, v)]
    out, keeps = interval_attention_dropout(*x, block=block, lo_off=lo, hi_off=hi, dropout_p=0.1,
                                            rope=pyencoder.Rope(16), key_lengths=kl.cuda(),
                                            generator=g, return_keep=True)
    out.float().sum().backward()
    keep, _ = _dense_keep([(a, b, c, d, m.cpu()) for a, b, c, d, m in keeps], B, Hq, N, N)
    y = [t.detach().cpu().double().requires_grad_() for t in x]
    ref, _ = dense_dropout_attention(*y, interval_mask(N, N, block, lo, hi, key_lengths=kl,
                                                       batch=B), keep, 0.1,
                                     rope=pyencoder.Rope(16))
    ref.sum().backward()
    torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol)
    for a, b in zip(x, y):
        torch.testing.assert_close(a.grad.double().cpu(), b.grad, rtol=tol, atol=tol)
