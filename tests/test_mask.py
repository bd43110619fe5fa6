"""pyencoder.IntervalMask: the one mask value (issue 14 item 1). Constructors against an
independent per-position formula, int and tensor lo/hi, repr round trip, hashing, named errors,
and the mask-taking API against the loose-int API (bit-identical)."""
import random

import pytest
import torch

import pyencoder
from pyencoder import IntervalMask
from pyencoder.ops.attention import band_params, chunked_params


def _oracle_bounds(kind, args, p):
    """Per-position bounds written from DESIGN.md's table (None: unbounded below)."""
    if kind == "band":
        left, right = args
        return (None if left is None else p - left), p + right
    c, lc, la = args
    return (None if lc is None else (p // c - lc) * c), (p // c + 1) * c - 1 + la


def _random_case(rng):
    if rng.random() < 0.5:
        return "band", (rng.choice([None, 0, rng.randint(1, 9)]), rng.randint(0, 6))
    return "chunked", (rng.randint(1, 7), rng.choice([None, 0, rng.randint(1, 4)]),
                       rng.randint(0, 5))


def _build(kind, args):
    return IntervalMask.band(*args) if kind == "band" else IntervalMask.chunked(*args)


def test_lo_hi_match_the_design_table_for_ints_and_tensors():
    rng = random.Random(torch.randint(1 << 30, ()).item())
    for _ in range(60):
        kind, args = _random_case(rng)
        m = _build(kind, args)
        ps = torch.randint(0, 200, (17,))
        for p in ps.tolist():
            lo, hi = _oracle_bounds(kind, args, p)
            assert m.hi(p) == hi
            assert m.lo(p) == (0 if lo is None else max(0, lo))
        assert torch.equal(m.hi(ps), torch.tensor([m.hi(p) for p in ps.tolist()]))
        assert torch.equal(m.lo(ps), torch.tensor([m.lo(p) for p in ps.tolist()]))
        # latency: worst-case hi(p) - p; lookahead: the user's extra frames.
        assert m.latency() == max(_oracle_bounds(kind, args, p)[1] - p for p in range(50))
        assert m.lookahead == (args[1] if kind == "band" else args[2])


def test_constructors_equal_the_older_param_functions_and_compare_by_value():
    assert IntervalMask.band(6, 2).params == band_params(6, 2) == (1, 6, 2)
    assert IntervalMask.band(None, 0).params == band_params(None, 0) == (1, -1, 0)
    assert IntervalMask.chunked(4, 1, 3).params == chunked_params(4, 1, 3) == (4, 4, 6)
    assert IntervalMask.chunked(4, None, 0) == IntervalMask(4, -1, 3)
    assert len({IntervalMask.band(6, 2), IntervalMask(1, 6, 2), IntervalMask.band(6, 3)}) == 2
    with pytest.raises(Exception):
        IntervalMask.band(1, 2).block = 3   # frozen


def test_repr_is_readable_and_round_trips():
    rng = random.Random(torch.randint(1 << 30, ()).item())
    cases = [_build(*_random_case(rng)) for _ in range(30)] + [IntervalMask(3, 5, 7)]
    for m in cases:
        r = repr(m)
        assert r.startswith("IntervalMask")
        assert eval(r, {"IntervalMask": IntervalMask}) == m
    assert repr(IntervalMask.band(None, 3)) == "IntervalMask.band(left=None, right=3)"
    assert repr(IntervalMask.chunked(4, 2, 1)) == \
        "IntervalMask.chunked(chunk_size=4, left_chunks=2, lookahead=1)"
    assert repr(IntervalMask.chunked(4, 2)) == \
        "IntervalMask.chunked(chunk_size=4, left_chunks=2, lookahead=0)"
    # raw masks no constructor builds (hi_off below the block's end) printed as a band /
    # chunked call that refuses its own arguments: every valid mask's repr reads back
    raw = [IntervalMask(1, 4, -1), IntervalMask(4, 8, 1), IntervalMask(2, -1, 0),
           IntervalMask(4, 8, 2, sink=3), IntervalMask(1, 3, -2, sink=2),
           IntervalMask(2, 4, 0, k_block=3), IntervalMask(3, 6, 2, k_block=3)]
    for b in range(1, 5):
        for lo in range(-1, 9):
            for hi in range(-3, 8):
                for kb in (None, 1, 3):
                    for sink in (0, 2):
                        try:
                            raw.append(IntervalMask(b, lo, hi, kb, sink))
                        except ValueError:
                            pass
    for m in raw:
        assert eval(repr(m), {"IntervalMask": IntervalMask}) == m, repr(m)


@pytest.mark.parametrize("make, exc, match", [
    (lambda: IntervalMask.band(-1, 2), ValueError, r"left must be >= 0; got -1"),
    (lambda: IntervalMask.band(1, 2.0), TypeError, r"right must be an int; got float"),
    (lambda: IntervalMask.chunked(0, 1), ValueError, r"chunk_size must be >= 1; got 0"),
    (lambda: IntervalMask.chunked(4, -2), ValueError, r"left_chunks must be >= 0; got -2"),
    (lambda: IntervalMask.chunked(4, 1, -1), ValueError, r"lookahead must be >= 0; got -1"),
    (lambda: IntervalMask(1, -2, 0), ValueError, r"lo_off must be >= -1; got -2"),
    (lambda: IntervalMask(True, 0, 0), TypeError, r"block must be an int; got bool"),
])
def test_bad_masks_name_the_argument(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_huge_extents_clamp_to_the_window_cap():
    from pyencoder._checks import WINDOW_CAP
    assert IntervalMask.band(1 << 60, 1 << 60).params == (1, WINDOW_CAP, WINDOW_CAP)


def test_dense_matches_lo_hi():
    m = IntervalMask.chunked(3, 1, 2)
    d = m.dense(11, 13, q_offset=2, k_offset=1)
    for i in range(11):
        for j in range(13):
            assert bool(d[i, j]) == (m.lo(i + 2) <= j + 1 <= m.hi(i + 2))


def test_interval_attention_with_a_mask_equals_the_loose_ints_bit_for_bit():
    B, H, N, D = 2, 2, 23, 8
    q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
    m = IntervalMask.chunked(4, 1, 2)
    a = pyencoder.ops.interval_attention(q, k, v, mask=m, q_offset=3, k_offset=3)
    b = pyencoder.ops.interval_attention(q, k, v, block=4, lo_off=4, hi_off=5, q_offset=3,
                                         k_offset=3)
    c = pyencoder.ops.chunked_attention(q, k, v, chunk_size=4, left_chunks=1, lookahead=2,
                                        q_offset=3, k_offset=3)
    assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(ValueError, match="either mask or block/lo_off/hi_off"):
        pyencoder.ops.interval_attention(q, k, v, mask=m, block=4, lo_off=4, hi_off=5)
    with pytest.raises(TypeError, match="mask must be a pyencoder.IntervalMask"):
        pyencoder.ops.interval_attention(q, k, v, mask=(4, 4, 5))
    with pytest.raises(TypeError, match="mask must be a pyencoder.IntervalMask"):
        pyencoder.ops.interval_attention(q, k, v)


def test_modules_and_hf_specs_carry_the_mask():
    pytest.importorskip("transformers")
    from pyencoder.hf.patch import build_specs
    from pyencoder.nn import BandedSelfAttention, ChunkedSelfAttention
    a = BandedSelfAttention(16, 2, left=5, right=2)
    assert a.mask == IntervalMask.band(5, 2) and a.lookahead == a.mask.latency() == 2
    c = ChunkedSelfAttention(16, 2, chunk_size=4, left_chunks=2, lookahead=1)
    assert c.mask == IntervalMask.chunked(4, 2, 1)
    assert (c.block, c.lo_off, c.hi_off) == c.mask.params and c.lookahead == 4
    assert c.lookahead_frames == 1
    specs = build_specs(3, 8, 2, None, "first", False, 4, 3)
    assert [s.mask for s in specs] == [IntervalMask.chunked(4, 3, 2)] + \
        [IntervalMask.chunked(4, 3, 0)] * 2
    assert [s.mask.lookahead for s in specs] == [2, 0, 0] and specs[0].mask.left == 12
    specs = build_specs(2, 8, 3, 7, "all", False, None, None)
    assert [s.mask for s in specs] == [IntervalMask.band(7, 3)] * 2
