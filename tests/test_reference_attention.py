"""Reference interval attention vs the independent dense float64 oracle, gradcheck, opcheck,
torch.compile, zero-row rule."""
import random

import pytest
import torch

import pyencoder
from pyencoder.ops import banded_attention, chunked_attention, interval_attention

from conftest import attention_op_args, gradcheck_inputs
from oracle import band, chunked, dense_attention, interval_mask


def _random_case(rng):
    B = rng.randint(1, 3)
    Hk = rng.choice([1, 2])
    Hq = Hk * rng.choice([1, 2, 3])
    D = rng.choice([8, 12, 16])
    Nq = rng.choice([1, 2, 7, 33, 70])
    same = rng.random() < 0.5
    Nk = Nq if same else rng.choice([1, 5, 33, 81])
    if rng.random() < 0.5:
        mask = band(rng.choice([None, 0, 1, 5, 17]), rng.randint(0, 5))
    else:
        mask = chunked(rng.choice([1, 3, 4, 8]), rng.choice([None, 0, 2]), rng.randint(0, 3))
    rope = rng.choice([None, (D, False), (D, True), (D // 2 if (D // 2) % 2 == 0 else 2, False)])
    q_off = rng.choice([0, 0, 5, 1000])
    k_off = q_off if rng.random() < 0.6 else rng.choice([0, 3])
    lengths = None
    if rng.random() < 0.5:
        lengths = torch.tensor([rng.randint(0, Nk) for _ in range(B)], dtype=torch.int64)
    return B, Hq, Hk, D, Nq, Nk, mask, rope, q_off, k_off, lengths


@pytest.mark.parametrize("case_seed", range(40))
def test_reference_matches_dense_oracle(case_seed):
    rng = random.Random(case_seed * 7919 + torch.randint(0, 10**6, ()).item())
    B, Hq, Hk, D, Nq, Nk, (block, lo, hi), rope, qo, ko, lengths = _random_case(rng)
    q = torch.randn(B, Hq, Nq, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hk, Nk, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hk, Nk, D, dtype=torch.float64, requires_grad=True)
    r = None if rope is None else pyencoder.Rope(rope[0], interleaved=rope[1])
    _check_against_oracle(q, k, v, block, lo, hi, r, lengths, qo, ko)


def _check_against_oracle(q, k, v, block, lo, hi, r, lengths, qo, ko):
    """The reference backend vs the dense float64 oracle, forward and the q / k / v gradients."""
    out = interval_attention(q, k, v, block=block, lo_off=lo, hi_off=hi, rope=r,
                             key_lengths=lengths, q_offset=qo, k_offset=ko, backend="reference")
    mask = interval_mask(q.shape[2], k.shape[2], block, lo, hi, qo, ko, lengths,
                         batch=q.shape[0])
    ref = dense_attention(q, k, v, mask, rope_dim=0 if r is None else r.dim,
                          interleaved=False if r is None else r.interleaved,
                          q_offset=qo, k_offset=ko)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    exp = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        assert torch.isfinite(a).all()


@pytest.mark.parametrize("rope,interleaved", [(8, False), (4, True)])
def test_reference_beyond_one_rope_block_matches_dense_oracle(rope, interleaved):
    """The reference rotates keys in blocks of 256 positions and pads keys per tile: the random
    cases above stay below 82 keys, so a wrong position for the blocks after the first (every
    key at index >= 256 rotated at the block's start) and an off-by-one in the padding bound
    passed them. 3 rope blocks, key lengths across block and tile edges, offsets, GQA."""
    torch.manual_seed(11)
    B, Hq, Hk, D, Nq, Nk = 3, 4, 2, 8, 530, 600
    q = torch.randn(B, Hq, Nq, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hk, Nk, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hk, Nk, D, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([257, 511, 600])
    r = pyencoder.Rope(rope, interleaved=interleaved)
    for block, lo, hi, qo, ko in ((1, 300, 7, 40, 3), (16, 64, 17, 0, 0), (1, -1, 0, 5, 5)):
        _check_against_oracle(q, k, v, block, lo, hi, r, lengths, qo, ko)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float16, 2e-3),
                                       (torch.bfloat16, 1.6e-2)])
def test_reference_low_precision(dtype, tol):
    # The reference upcasts to float32, so its only error vs float64 is the fp32 accumulation
    # plus the final rounding to dtype (half an ulp: 2^-11 for fp16, 2^-8 for bf16).
    B, H, N, D = 2, 3, 45, 16
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    r = pyencoder.Rope(D)
    out = banded_attention(q.to(dtype), k.to(dtype), v.to(dtype), left=6, right=2, rope=r)
    assert out.dtype == dtype
    mask = interval_mask(N, N, *band(6, 2), batch=B)
    ref = dense_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask, rope_dim=D)
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_zero_rows_and_fully_padded():
    B, H, N, D = 2, 2, 9, 8
    q = torch.randn(B, H, N, D, requires_grad=True)
    k = torch.randn(B, H, N, D, requires_grad=True)
    v = torch.randn(B, H, N, D, requires_grad=True)
    lengths = torch.tensor([0, 4])
    # keys offset far into the future: queries 0..3 see nothing even without padding
    out = banded_attention(q, k, v, left=0, right=1, key_lengths=lengths, q_offset=0, k_offset=4)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    assert (out[0] == 0).all() and (q.grad[0] == 0).all()
    assert (out[1, :, :3] == 0).all() and (q.grad[1, :, :3] == 0).all()
    assert (k.grad[0] == 0).all() and (v.grad[1, :, 4:] == 0).all()


def test_chunked_equals_explicit_interval():
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64) for _ in range(3))
    a = chunked_attention(q, k, v, chunk_size=4, left_chunks=2, lookahead=3)
    b = interval_attention(q, k, v, block=4, lo_off=8, hi_off=6)
    assert torch.equal(a, b)


def test_gradcheck_banded_and_chunked():
    q, k, v, r, kl = gradcheck_inputs()
    assert torch.autograd.gradcheck(
        lambda q, k, v: banded_attention(q, k, v, left=3, right=2, rope=r, key_lengths=kl,
                                         q_offset=2, k_offset=1), (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: chunked_attention(q, k, v, chunk_size=3, left_chunks=1, lookahead=1,
                                          rope=r), (q, k, v))


def test_opcheck():
    op = torch.ops.pyencoder.interval_attention.default
    q = torch.randn(2, 2, 10, 8, requires_grad=True)
    k = torch.randn(2, 1, 12, 8, requires_grad=True)
    v = torch.randn(2, 1, 12, 8, requires_grad=True)
    inv = pyencoder.Rope(8).inv_freq()
    kl = torch.tensor([12, 7], dtype=torch.int32)
    torch.library.opcheck(op, (*attention_op_args(q, k, v, inv, kl, block=1, lo_off=3, hi_off=2),
                               "reference"))
    torch.library.opcheck(op, (*attention_op_args(q, k, v, block=4, lo_off=-1, hi_off=5,
                                                  q_offset=3, k_offset=1, interleaved=True),
                               "reference"))


def test_torch_compile_fullgraph():
    r = pyencoder.Rope(8)

    def f(q, k, v):
        return banded_attention(q, k, v, left=4, right=1, rope=r).sum()

    q, k, v = (torch.randn(1, 2, 17, 8, requires_grad=True) for _ in range(3))
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = cf(q, k, v)
    y.backward()
    gq = q.grad.clone()
    q.grad = None
    f(q, k, v).backward()
    torch.testing.assert_close(y, f(q, k, v))
    torch.testing.assert_close(gq, q.grad)


def test_memory_is_linear_in_n():
    """No intermediate of the forward or backward is quadratic in N: a dispatch mode records the
    largest tensor any aten op produces. A dense N x N score or mask would be N^2 = 6.7e7
    elements here; the blocked reference's largest tensors are the N x D inputs/outputs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MaxNumel(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    MaxNumel.largest = max(MaxNumel.largest, t.numel())
            return out

    from pyencoder.reference import attention as ra
    N, D = 8192, 16
    q, k, v = (torch.randn(1, 1, N, D) for _ in range(3))
    inv = pyencoder.Rope(D).inv_freq()
    with MaxNumel():  # the reference functions themselves: a custom op hides its internals
        out, lse = ra.forward(q, k, v, inv, None, 1, 20, 3, 0, 0, D ** -0.5, False)
        dq, dk, dv = ra.backward(torch.randn_like(out), q, k, v, out, lse, inv, None, 1, 20, 3,
                                 0, 0, D ** -0.5, False)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all()
    assert MaxNumel.largest <= 4 * N * D, f"largest intermediate {MaxNumel.largest} elements"
