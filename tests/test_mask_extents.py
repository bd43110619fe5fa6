"""Mask extents far beyond the positions of a call (sentinels such as right = 2**31 - 1, a frame
mask's huge key block) give the mask's values on every path:

- the Triton kernels compute bounds in int32: ``kernel_mask`` cuts every extent to what the
  call's positions reach (exact), and a frame mask whose bounds would still pass 2**31 is not
  taken by them (the reference runs it); a right = 2**31 - 1 band saw no key before;
- the reference's int64 bounds saturate the base (IntervalMask.base): a frame mask with
  k_frame = 2**52 overflowed int64 and rows that see every key saw none;
- hi_off below -WINDOW_CAP is refused (it hides every key any tensor can index)."""
import random

import pytest
import torch

from pyencoder import IntervalMask, Rope
from pyencoder._checks import WINDOW_CAP
from pyencoder.ops import _attention_triton as tri
from pyencoder.ops import cross_attention, interval_attention

from conftest import has_triton

needs_triton = pytest.mark.skipif(not has_triton(), reason="triton is not installed")


def _visible(block, kb, lo_off, hi_off, p, s):
    """The mask formula in Python ints (no overflow)."""
    base = (p // block) * kb
    return (lo_off < 0 or s >= base - lo_off) and s <= base + hi_off


def test_kernel_mask_is_exact_and_fits_int32():
    # ordinary extents reach the kernels unchanged (their integer specialisations, autotune keys)
    assert tri.kernel_mask(1, None, 250, 3, 40, 40) == (1, None, 250, 3)
    assert tri.kernel_mask(4, 4, 512, 6, 40, 40) == (4, 4, 512, 6)
    assert tri.kernel_mask(2, 1, -1, 2 ** 25, 9, 5) == (2, 1, -1, 2 ** 25)
    # a same-rate block cut to 2**25 keeps its key block equal (no frame-mask kernel variant)
    assert tri.kernel_mask(2 ** 40, 2 ** 40, -1, 0, 9, 5) == (2 ** 25, 2 ** 25, -1, 0)
    rnd = random.Random(0)
    big = [0, 1, 3, 17, 2 ** 20, 2 ** 31 - 1, 2 ** 40, WINDOW_CAP]
    for _ in range(400):
        block = rnd.choice([1, 2, 3, 5, 8, 2 ** 26, 2 ** 31 - 3])
        kb = rnd.choice([None, None, 1, 2, 3, 7])
        q_end, k_end = rnd.randint(1, 40), rnd.randint(1, 40)
        lo = rnd.choice([-1] + big)
        hi = rnd.choice(big + [-b for b in big[1:5]])
        k = block if kb is None else kb
        if lo >= 0 and lo + hi < 0:
            continue
        b2, kb2, lo2, hi2 = tri.kernel_mask(block, kb, lo, hi, q_end, k_end)
        assert tri.kernel_mask(b2, kb2, lo2, hi2, q_end, k_end) == (b2, kb2, lo2, hi2)
        assert max(b2 if kb is None or kb == block else 0, lo2, abs(hi2)) <= 2 ** 25
        assert (kb2 is None) == (kb is None) and (kb2 == b2) == (kb == block)
        for p in range(q_end):
            for s in range(k_end):
                assert _visible(block, k, lo, hi, p, s) == _visible(
                    b2, b2 if kb2 is None else kb2, lo2, hi2, p, s), \
                    (block, kb, lo, hi, p, s, (b2, kb2, lo2, hi2))


@needs_triton
@pytest.mark.parametrize("mask, qo, ko", [
    (IntervalMask.band(5, 2 ** 31 - 1), 1, 0),
    (IntervalMask.band(None, 2 ** 31 - 1), 1, 0),
    (IntervalMask.band(2 ** 31 - 1, 0), 3, 0),
    (IntervalMask.chunked(8, None, 2 ** 31 - 8), 8, 8),
    (IntervalMask.chunked(2 ** 31 - 5, 1, 0), 4, 0),
    (IntervalMask(1, -1, -(2 ** 31 - 3)), 0, 0),
    (IntervalMask.frames(2, 1, None, 2 ** 31 - 1), 6, 0),
    # chunks past 2**25 (and 2**31): the key block follows the cut block (it had become a
    # frame-mask variant: K_BLOCK = 2**40 out of int32, sinks refused in the RoPE backward)
    (IntervalMask.chunked(2 ** 40, None, 0), 3, 0),
    (IntervalMask.chunked(2 ** 33, 1, 3), 3, 0),
    (IntervalMask.chunked(2 ** 26, None, 0, sink=2), 3, 0),
])
@pytest.mark.parametrize("rope", [False, True])
def test_triton_huge_extents_equal_reference(mask, qo, ko, rope):
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 8, 16, requires_grad=True) for _ in range(3))
    outs = []
    for backend in ("reference", "triton"):
        for t in (q, k, v):
            t.grad = None
        fn = cross_attention if mask.is_frame else interval_attention
        y = fn(q, k, v, mask=mask, q_offset=qo, k_offset=ko, backend=backend,
               rope=Rope(16) if rope else None)
        y.backward(torch.ones_like(y))
        outs.append([y.detach()] + [t.grad.clone() for t in (q, k, v)])
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if not mask.is_frame and mask.lo_off >= -1 and mask.hi_off >= 0:
        assert outs[0][0].abs().sum(-1).min() > 0     # every row sees a key: no zero rows


def test_frame_mask_past_int32_is_not_taken_by_the_kernels():
    """The kernels would wrap; auto runs the reference, which has the mask's values. The dk/dv
    kernel's cdiv adds k_block - 1 to a key position plus the extent: counted too."""
    q = torch.randn(1, 1, 4, 8)
    assert tri.supports_forward(q, torch.randn(1, 1, 64, 8), torch.randn(1, 1, 64, 8),
                                block=2 ** 20, kb=2 ** 31 - 300, lo_off=0, hi_off=3, q_offset=1,
                                k_offset=2 ** 24 - 300) is not None
    reason = tri.supports_forward(q, q, q, block=1, kb=256, lo_off=-1, hi_off=255,
                                  q_offset=2 ** 23 + 5, k_offset=0)
    assert reason is not None and "2**31" in reason
    assert tri.supports_forward(q, q, q, block=1, kb=256, lo_off=-1, hi_off=255,
                                q_offset=5, k_offset=0) is None


@pytest.mark.parametrize("mask, qo, ko", [
    (IntervalMask.frames(1, 2 ** 52, None, 0), 3072, 0),
    (IntervalMask.frames(1, 2 ** 52, None, 0), 4096, 0),
    (IntervalMask.frames(2, 2 ** 40, None, 0), 2 ** 24, 5),
    (IntervalMask.frames(1, 2 ** 50, 2, 0), 8193, 2 ** 40),
])
def test_reference_frame_mask_with_a_huge_key_block(mask, qo, ko):
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 1, n, 4, dtype=torch.float64) for n in (3, 4, 4))
    y = cross_attention(q, k, v, mask=mask, q_offset=qo, k_offset=ko)
    block, kb, lo, hi = mask.frame_params
    for i in range(3):
        vis = torch.tensor([_visible(block, kb, lo, hi, qo + i, ko + j) for j in range(4)])
        if vis.any():
            s = (q[0, 0, i] @ k[0, 0].T) * 0.5
            p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1)
            torch.testing.assert_close(y[0, 0, i], p @ v[0, 0])
        else:
            assert torch.equal(y[0, 0, i], torch.zeros(4, dtype=torch.float64))
    assert IntervalMask(1, -1, 0, 2 ** 52).base(torch.tensor([2 ** 52])).item() > 0


def test_hi_off_below_minus_window_cap_is_refused():
    with pytest.raises(ValueError, match="hi_off"):
        IntervalMask(1, -1, -WINDOW_CAP - 1)
    IntervalMask(1, -1, -WINDOW_CAP)


# ---- decode attention (the streaming step over the ring) ------------------------------------

def _decode_args(n, qpos, cap, block, lo_off, hi_off, rope=None):
    torch.manual_seed(14)
    B, H, D = len(n), 2, 8
    M = len(qpos[0])
    q = torch.randn(B, H, M, D)
    k, v = torch.randn(B, H, cap, D), torch.randn(B, H, cap, D)
    inv = None if rope is None else rope.inv_freq("cpu")
    return (q, k, v, torch.tensor(qpos), torch.full((B,), M), torch.tensor(n), inv, False,
            block, lo_off, hi_off, D ** -0.5)


def _with(args, block, lo_off, hi_off):
    return args[:8] + (block, lo_off, hi_off) + args[11:]


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_decode_huge_extents_equal_their_saturated_masks(backend):
    """Extents past every position give the mask's values: hi_off = 2**31 - 1 wrapped in the
    Triton kernel's int32 bounds and 2**63 - 1 in the reference's int64 ones (rows that see
    every key saw none); 2**64 failed as "int too big to convert", naming no argument."""
    from pyencoder.ops import decode_attention
    args = _decode_args([205, 12], [[200, 201], [9, 10]], 8, 1, 3, 0)
    for ext in (2 ** 31 - 1, 2 ** 31 - 100, 2 ** 63 - 1, 2 ** 64):
        for (b, lo, hi), same in (((1, 3, ext), (1, 3, 10 ** 6)),        # every later key
                                  ((1, ext, 0), (1, -1, 0)),             # no lower bound
                                  ((ext, 3, 0), (10 ** 9, 3, 0)),        # every query in block 0
                                  ((1, -1, -ext), (1, -1, -10 ** 6))):   # no key at all
            got = decode_attention(*_with(args, b, lo, hi), backend=backend)
            want = decode_attention(*_with(args, *same), backend="reference")
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=str((ext, b, lo, hi)))


@needs_triton
@pytest.mark.parametrize("base", [2 ** 24 + 7, 2 ** 30 - 70, 2 ** 30 - 2])
@pytest.mark.parametrize("mask", [(1, 3, 0), (1, -1, 0), (4, 8, 2), (1, 2 ** 31 - 1, 2 ** 31 - 1)])
def test_triton_decode_at_large_positions_equals_reference(base, mask):
    """The Triton decode kernel's bounds are int32: it takes positions below POSITION_LIMIT
    (2**30, the README's limit), with every extent cut to it (a 2**31 - 1 extent wrapped)."""
    from pyencoder.ops._decode_attention_triton import POSITION_LIMIT, kernel_extents
    assert base < POSITION_LIMIT
    assert kernel_extents(1, 250, 3) == (1, 250, 3)
    from pyencoder.ops import decode_attention
    block, lo, hi = mask
    n = [base, base - 3]
    qpos = [[base - 4, base - 3], [base - 6, base - 5]]
    for cap in (6, 100):
        args = _decode_args(n, qpos, cap, block, lo, hi, rope=None)
        ref = decode_attention(*args, backend="reference")
        out = decode_attention(*args, backend="triton")
        assert ref.abs().sum() > 0
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_int32_reason_counts_the_inverse_and_negative_extents():
    """The dk/dv kernel inverts a frame mask's base (key position // k_block * block): a mask
    whose inverse passes 2**31 is left to the reference, and a negative hi_off counts by its
    size."""
    q, k = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 64, 8)
    assert tri.supports_forward(q, k, k, block=2 ** 28, kb=1, lo_off=-1, hi_off=3) is not None
    assert tri.supports_forward(q, k, k, block=2, kb=1, lo_off=-1, hi_off=3) is None
    assert tri.supports_forward(q, k, k, block=1, kb=128, lo_off=-1, hi_off=-(2 ** 31 - 330),
                                q_offset=2 ** 24 - 9) is not None


def test_vmap_over_stacked_wavlm_parameters():
    """vmap over modules' stacked parameters (torch.func.stack_module_state + functional_call):
    the bias columns' memo read the storage-less table's data pointer."""
    import copy
    from torch.func import functional_call, stack_module_state
    from pyencoder.nn import WavLMSelfAttention
    torch.manual_seed(17)
    ms = [WavLMSelfAttention(16, 2, left=4, right=1).eval() for _ in range(3)]
    params, bufs = stack_module_state(ms)
    base = copy.deepcopy(ms[0]).to("meta")
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        y = torch.vmap(lambda p, b, x: functional_call(base, (p, b), (x,)),
                       in_dims=(0, 0, None))(params, bufs, x)
        torch.testing.assert_close(y, torch.stack([m(x) for m in ms]))
