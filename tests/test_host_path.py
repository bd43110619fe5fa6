"""The eager attention call's host path trims (issue 12: eager calls at wav2vec2-base sizes were
host-bound on the H100): memoised IntervalMask constructors, the launcher called without
Function.apply when no graph is recorded, and key_lengths' value check read once per tensor.
The call programs and fast launch plans are checked in tests/test_fast_launch.py."""
import pytest
import torch

import pyencoder
from pyencoder import IntervalMask
from pyencoder._checks import _PASSED, check_lengths


def test_mask_memo_returns_equal_masks_and_keeps_checks():
    a = IntervalMask.band(50, 3)
    assert IntervalMask.band(50, 3) is a and a == IntervalMask(1, 50, 3)
    assert IntervalMask.band(50, 3, sink=2) == IntervalMask(1, 50, 3, sink=2) != a
    assert IntervalMask.band(None, 0).lo_off == -1
    c = IntervalMask.chunked(4, 2, 3)
    assert IntervalMask.chunked(4, 2, 3) is c and c == IntervalMask(4, 8, 6)
    assert IntervalMask.chunked(4, None, 3, sink=1) == IntervalMask(4, -1, 6, sink=1)
    # bad arguments raise the same errors, memo or not (a bad value is never memoised)
    for _ in range(2):
        with pytest.raises(ValueError, match="left"):
            IntervalMask.band(-1, 3)
        with pytest.raises(TypeError, match="right"):
            IntervalMask.band(3, True)
        with pytest.raises(TypeError, match="right"):
            IntervalMask.band(3, 1.0)
        with pytest.raises(ValueError, match="chunk_size"):
            IntervalMask.chunked(0, 1)
    # an equal bool never shares an int's entry (its check raises)
    IntervalMask.band(1, 1)
    with pytest.raises(TypeError):
        IntervalMask.band(True, 1)


def test_check_lengths_reads_values_once_per_unmodified_tensor(monkeypatch):
    reads = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t: reads.append(1) or real(t))
    kl = torch.tensor([3, 5, 1], dtype=torch.int32)
    for _ in range(3):
        check_lengths("key_lengths", kl, 3, 5, kl.device)
    assert len(reads) == 1
    check_lengths("key_lengths", kl, 3, 6, kl.device)       # another limit: read again
    assert len(reads) == 2
    kl[0] = 9                                               # in place: version bump, read again
    with pytest.raises(ValueError, match=r"key_lengths values must lie in \[0, 5\]; got min 1, "
                                         r"max 9"):
        check_lengths("key_lengths", kl, 3, 5, kl.device)
    kl[0] = -2
    with pytest.raises(ValueError, match="got min -2"):
        check_lengths("key_lengths", kl, 3, 5, kl.device)
    with torch.inference_mode():                            # no version counter: always read
        inf = torch.tensor([1, 2, 3])
    n = len(reads)
    check_lengths("key_lengths", inf, 3, 5, inf.device)
    check_lengths("key_lengths", inf, 3, 5, inf.device)
    assert len(reads) == n + 2
    assert len(_PASSED) <= 32


def _qkv(grad, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 19, 16, generator=g).requires_grad_(grad) for _ in range(3)]


@pytest.mark.parametrize("mode", ["no_grad", "no_input_grad", "inference"])
def test_launcher_without_apply_equals_the_op(monkeypatch, mode):
    """Without a graph to record (no_grad, inference_mode, or no input requiring grad) the triton
    backend's eager path calls the launcher without autograd.Function.apply: same results as the
    registered op (PYENCODER_EAGER_FASTPATH=0), no grad_fn; with an input requiring grad it still
    records the graph."""
    pytest.importorskip("triton")
    from pyencoder.ops import attention as AT
    applied = []
    real_apply = AT._EagerTriton.apply
    monkeypatch.setattr(AT._EagerTriton, "apply",
                        staticmethod(lambda *a: applied.append(1) or real_apply(*a)))
    rope = pyencoder.Rope(16)
    q, k, v = _qkv(False)

    def call():
        if mode == "no_grad":
            with torch.no_grad():
                return pyencoder.ops.banded_attention(q, k, v, left=5, right=2, rope=rope,
                                                      backend="triton")
        if mode == "inference":
            with torch.inference_mode():
                return pyencoder.ops.banded_attention(q, k, v, left=5, right=2, rope=rope,
                                                      backend="triton")
        return pyencoder.ops.banded_attention(q, k, v, left=5, right=2, rope=rope,
                                              backend="triton")
    fast = call()
    assert not applied and fast.grad_fn is None
    monkeypatch.setenv("PYENCODER_EAGER_FASTPATH", "0")
    ref = call()
    monkeypatch.delenv("PYENCODER_EAGER_FASTPATH")
    torch.testing.assert_close(fast, ref, rtol=0, atol=0)
    qg, kg, vg = _qkv(True)
    out = pyencoder.ops.banded_attention(qg, kg, vg, left=5, right=2, rope=rope,
                                         backend="triton")
    assert applied and out.grad_fn is not None
    out.sum().backward()
    assert qg.grad is not None and kg.grad is not None and vg.grad is not None


def test_rel_bias_finite_check_once_per_tensor(monkeypatch):
    """interval_attention's rel_bias finiteness check (a host sync on a GPU) reads a tensor once
    while it is unmodified; an in-place edit to a non-finite value is caught; with
    PYENCODER_VALUE_CHECKS=0 no value is read."""
    from pyencoder.ops.attention import _validate_bias
    reads = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: reads.append(1) or real(t))
    q, k = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    rel = torch.randn(3, 40)
    for _ in range(3):
        _validate_bias(q, k, rel, None, -20, 1, 5, 2, 0, 0)
    assert len(reads) == 1
    rel[1, 3] = float("inf")
    with pytest.raises(ValueError, match="rel_bias must be finite"):
        _validate_bias(q, k, rel, None, -20, 1, 5, 2, 0, 0)
    monkeypatch.setenv("PYENCODER_VALUE_CHECKS", "0")
    n = len(reads)
    _validate_bias(q, k, rel, None, -20, 1, 5, 2, 0, 0)
    kl = torch.tensor([20, 30])
    check_lengths("key_lengths", kl, 2, 10, kl.device)       # out of range, unread
    assert len(reads) == n
    monkeypatch.setenv("PYENCODER_VALUE_CHECKS", "maybe")
    with pytest.raises(ValueError, match="PYENCODER_VALUE_CHECKS"):
        _validate_bias(q, k, rel, None, -20, 1, 5, 2, 0, 0)


def test_relative_bias_columns_memo():
    """relative_bias_columns returns the same columns for a repeated call that records no graph
    for the table, recomputes after an in-place edit of the table or of the columns, and never
    memoises where the table needs a graph."""
    from pyencoder.nn.relpos import _COLUMNS, relative_bias_columns
    calls = []

    def bucket(rel):
        calls.append(1)
        return (rel.abs() % 7)
    table = torch.randn(7, 3)
    kw = dict(block=1, lo_off=5, hi_off=2)
    a, r0 = relative_bias_columns(table, bucket, 10, 10, **kw)
    b, r1 = relative_bias_columns(table, bucket, 10, 10, **kw)
    assert b is a and r0 == r1 == -5 and len(calls) == 1
    torch.testing.assert_close(a, table[bucket(torch.arange(-5, 3))].t(), rtol=0, atol=0)
    c, _ = relative_bias_columns(table, bucket, 12, 10, **kw)      # another shape
    assert c is not a
    table.mul_(2)                                                 # edited: recomputed
    d, _ = relative_bias_columns(table, bucket, 10, 10, **kw)
    assert d is not a and torch.equal(d, 2 * a)
    d.zero_()                                                     # the columns edited: recomputed
    e, _ = relative_bias_columns(table, bucket, 10, 10, **kw)
    assert e is not d and torch.equal(e, 2 * a)
    tg = torch.randn(7, 3, requires_grad=True)                    # training: a graph each call
    x, _ = relative_bias_columns(tg, bucket, 10, 10, **kw)
    y, _ = relative_bias_columns(tg, bucket, 10, 10, **kw)
    assert x is not y and x.grad_fn is not None
    with torch.no_grad():
        z, _ = relative_bias_columns(tg, bucket, 10, 10, **kw)
        assert relative_bias_columns(tg, bucket, 10, 10, **kw)[0] is z
    assert len(_COLUMNS) <= 16


def test_columns_of_a_finite_table_skip_the_finite_check(monkeypatch):
    """relative_bias_columns vouches for columns gathered from a finite table (read once per table
    version), so the op's rel_bias check reads nothing per call, in training too (new columns
    every call); a non-finite table vouches for nothing and the op checks the columns itself."""
    from pyencoder.nn.relpos import relative_bias_columns
    from pyencoder.ops.attention import _validate_bias
    reads = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: reads.append(tuple(t.shape)) or real(t))
    table = torch.randn(9, 3, requires_grad=True)
    q = torch.randn(2, 3, 10, 8)
    kw = dict(block=1, lo_off=5, hi_off=2)
    for _ in range(3):              # training: a graph, new columns each call
        cols, r0 = relative_bias_columns(table, lambda r: r.abs() % 9, 10, 10, **kw)
        _validate_bias(q, q, cols, None, r0, 1, 5, 2, 0, 0)
    assert reads == [(9, 3)]        # the table once, no column read
    with torch.no_grad():
        table[4, 1] = float("nan")  # edited: read again, vouches for nothing
    reads.clear()
    cols, r0 = relative_bias_columns(table, lambda r: r.abs() % 9, 10, 10, **kw)
    with pytest.raises(ValueError, match="rel_bias must be finite"):
        _validate_bias(q, q, cols, None, r0, 1, 5, 2, 0, 0)   # offset 4 reads bucket 4
    assert reads == [(9, 3), (3, 8)]
    # a NaN in a bucket no visible offset reads: the columns are finite, the call passes
    with torch.no_grad():
        table[4, 1] = 0.0
        table[8, 0] = float("nan")
    cols, r0 = relative_bias_columns(table, lambda r: r.abs() % 9, 10, 10, **kw)
    _validate_bias(q, q, cols, None, r0, 1, 5, 2, 0, 0)


def test_decode_attention_routes_traced_calls_to_the_op(monkeypatch):
    """decode_attention's triton backend runs its launcher directly only in plain eager mode;
    under make_fx, a torch.func transform, or with PYENCODER_EAGER_FASTPATH=0 it calls the
    registered op (pyencoder::decode_attention_triton), which they understand."""
    pytest.importorskip("triton")
    from pyencoder.ops import _decode_attention_triton as DT
    from pyencoder.ops import decode_attention
    via_op = []
    real = DT.forward_op

    class Spy:
        def __call__(self, *args):
            via_op.append(1)
            return real(*args)
    monkeypatch.setattr(DT, "forward_op", Spy())
    B, H, M, D, cap = 1, 2, 2, 16, 8
    q = torch.randn(B, H, M, D)
    ring = torch.randn(B, H, cap, D)
    q_pos = torch.tensor([[10, 11]])
    args = (q, ring, ring.clone(), q_pos, torch.tensor([2]), torch.tensor([12]), None, False, 1,
            4, 1, D ** -0.5)
    with torch.no_grad():
        direct = decode_attention(*args, backend="triton")
    assert via_op == []
    monkeypatch.setenv("PYENCODER_EAGER_FASTPATH", "0")
    with torch.no_grad():
        op = decode_attention(*args, backend="triton")
    assert via_op == [1]
    torch.testing.assert_close(direct, op, rtol=0, atol=0)
    monkeypatch.delenv("PYENCODER_EAGER_FASTPATH")
    from torch.fx.experimental.proxy_tensor import make_fx
    g = make_fx(lambda q: decode_attention(q, *args[1:], backend="triton"))(q)
    assert len(via_op) == 2 and "decode_attention_triton" in str(g.graph)


class _CountingBucket:
    """A pure bucket function that counts its calls (hashable: keyed by identity)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, rel):
        self.calls += 1
        return (rel.abs() % 7) + (rel > 0).to(rel.dtype) * 7


@pytest.mark.parametrize("sink", [0, 3])
def test_bucket_index_once_per_shape_with_a_training_table(monkeypatch, sink):
    """The columns' bucket indices (and, with sinks, the ends found by a host read) depend on the
    bucket function and the call's ints only: a table that records a graph (training, new
    columns every call) still computes them once per call shape. The columns and their gradient
    equal an uncached computation; another shape or offset computes its own."""
    from pyencoder.nn import relpos
    bucket = _CountingBucket()
    kw = dict(block=1, lo_off=5, hi_off=2)

    def cols(table, nq=10, nk=10, q_offset=0, k_offset=0):
        if sink:
            return relpos.sink_bias_columns(table, bucket, nq, nk, sink=sink, q_offset=q_offset,
                                            k_offset=k_offset, **kw)
        return relpos.relative_bias_columns(table, bucket, nq, nk, q_offset=q_offset,
                                            k_offset=k_offset, **kw)

    table = torch.randn(14, 3, requires_grad=True)
    first, r0 = cols(table)
    calls = bucket.calls
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or real_tolist(t))
    for _ in range(3):
        again, r1 = cols(table)
        assert r1 == r0 and bucket.calls == calls and not reads
        assert again is not first and torch.equal(again, first)
        w = torch.randn_like(again)
        (g,) = torch.autograd.grad((again * w).sum(), table)
        monkeypatch.undo()
        relpos._INDEX.clear()
        fresh, r2 = cols(table)          # uncached
        (g2,) = torch.autograd.grad((fresh * w).sum(), table)
        assert r2 == r0 and torch.equal(fresh, again) and torch.equal(g, g2)
        calls = bucket.calls
        monkeypatch.setattr(torch.Tensor, "tolist",
                            lambda t: reads.append(1) or real_tolist(t))
    monkeypatch.undo()
    before = bucket.calls
    other, ro = cols(table, q_offset=4, k_offset=4)         # a streaming chunk: its own
    assert bucket.calls == before + 1
    relpos._INDEX.clear()
    fresh, rf = cols(table, q_offset=4, k_offset=4)
    assert rf == ro and torch.equal(fresh, other)


@pytest.mark.parametrize("sink", [0, 3])
def test_bucket_index_built_under_inference_mode_is_not_kept(sink):
    """Indices built under torch.inference_mode are inference tensors: kept, a later training
    call's gather could not save them for backward. Such a call builds its own."""
    from pyencoder.nn import relpos
    relpos._INDEX.clear()
    kw = dict(block=1, lo_off=5, hi_off=2, q_offset=0, k_offset=0)
    fn = relpos.sink_bias_columns if sink else relpos.relative_bias_columns
    if sink:
        kw["sink"] = sink
    bucket = _CountingBucket()
    with torch.inference_mode():
        a, _ = fn(torch.randn(14, 3), bucket, 10, 10, **kw)
    table = torch.randn(14, 3, requires_grad=True)
    b, _ = fn(table, bucket, 10, 10, **kw)
    (g,) = torch.autograd.grad(b.sum(), table)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("param", [False, True])
def test_columns_under_inference_mode_then_training(param):
    """A plain (or Parameter) table used under torch.inference_mode, then in a graph: the first
    call's columns are inference tensors, never kept (was: a crash reading their version), and
    the later call's attention backward works (inference tensors cannot be saved for it)."""
    import pyencoder
    from pyencoder.nn import relpos
    relpos._COLUMNS.clear()
    relpos._INDEX.clear()
    table = torch.randn(14, 2)
    table = torch.nn.Parameter(table, requires_grad=False) if param else table
    bucket = _CountingBucket()
    kw = dict(block=1, lo_off=5, hi_off=2)
    with torch.inference_mode():
        a, r0 = relpos.relative_bias_columns(table, bucket, 10, 10, **kw)
    b, r1 = relpos.relative_bias_columns(table, bucket, 10, 10, **kw)
    assert not b.is_inference() and r1 == r0 and torch.equal(a, b)
    q, k, v = (torch.randn(1, 2, 10, 8, requires_grad=True) for _ in range(3))
    out = pyencoder.ops.interval_attention(q, k, v, mask=pyencoder.IntervalMask(1, 5, 2),
                                           rel_bias=b, rel_offset=r1)
    (gq,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(gq).all()


def test_fifo_put_drops_the_oldest_only_for_a_new_key():
    from pyencoder._fifo import put
    c = {}
    for i in range(3):
        assert put(c, i, i * 10, 3) == i * 10
    put(c, 1, "again", 3)                 # an existing key: nothing dropped, order kept
    assert c == {0: 0, 1: "again", 2: 20} and list(c) == [0, 1, 2]
    put(c, 3, 30, 3)                      # full: the oldest (0) goes
    assert list(c) == [1, 2, 3]
