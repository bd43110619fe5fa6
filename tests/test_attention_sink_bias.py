"""Relative bias WITH sink keys (issue 15, "one mask concept covers all of this"): the saturated
bucket rule. The bias of query p and visible key s is

    gate[b, h, i] * rel_bias[h, clamp(s - p - rel_offset, 0, L - 1)]

(a sink key outside the table reads its edge column; band keys are always inside it).

- reference vs an independent dense float64 oracle written here (the full (Nq, Nk) bias with the
  clamp by explicit loops, the sink + interval mask, padding), forward and every gradient (q, k,
  v, rel_bias, gate), over random shapes, sinks (1, inside the band, beyond it, >= N), offsets,
  padding (a batch item may have no key), GQA, gate None / given, RoPE on / off; gradcheck; a
  wide table equals the exact (unclamped) bias; the clamp is exercised (a test that would pass
  without it fails here); sink keys that hold no key leave a biased call bit-identical.
- WavLM's rule: biased_interval_attention with sinks equals a dense oracle that applies
  relative_position_bucket at the TRUE offsets (float64, 1e-10), N well beyond max_distance, and
  its table (sink_bias_columns) is the cheapest exact one.
- Triton under the interpreter (fp32, fp16): out, lse and all gradients vs the reference; opcheck
  of the reference op and the triton_op; a GPU FlashAttention-rule test (``-m gpu``).
"""
import os
import random

import pytest
import torch

import pyencoder
from pyencoder import IntervalMask
from pyencoder.ops import interval_attention
from pyencoder.ops.attention import relative_offsets
from pyencoder.nn.relpos import (biased_interval_attention, relative_position_bucket,
                                 sink_bias_columns)

import oracle
from conftest import attention_op_args, gradcheck_inputs


# ---- the independent dense oracle ---------------------------------------------------------------

def _dense_mask(m, nq, nk, q_offset, k_offset, key_lengths, batch):
    """(B, 1, Nq, Nk) visibility: interval (tests/oracle.py's loops) OR s < sink, AND padding."""
    vis = oracle.interval_mask(nq, nk, m.block, m.lo_off, m.hi_off, q_offset, k_offset, None,
                               batch)
    s = torch.arange(nk) + k_offset
    vis = vis | (s < m.sink)[None, None, None, :]
    if key_lengths is not None:
        vis = vis & (torch.arange(nk)[None, :] < key_lengths[:, None])[:, None, None, :]
    return vis


def _clamped_columns(nq, nk, L, rel_offset, q_offset, k_offset):
    """(Nq, Nk) int64 column of every (query, key): clamp(s - p - rel_offset, 0, L - 1), by an
    explicit loop."""
    idx = torch.empty(nq, nk, dtype=torch.int64)
    for i in range(nq):
        for j in range(nk):
            c = (k_offset + j) - (q_offset + i) - rel_offset
            idx[i, j] = min(max(c, 0), L - 1)
    return idx


def _dense_bias(rel_bias, gate, idx, batch):
    """(B, Hq, Nq, Nk) float64 gate * rel_bias[:, idx] (differentiable in both)."""
    b = rel_bias.to(torch.float64)[:, idx]                 # (H, Nq, Nk)
    b = b[None].expand(batch, -1, -1, -1)
    return b if gate is None else b * gate.to(torch.float64)[..., None]


def _oracle(q, k, v, m, rel_bias, gate, rel_offset, q_offset, k_offset, kl, rope, scale=None):
    B, _, nq, D = q.shape
    nk = k.shape[2]
    idx = _clamped_columns(nq, nk, rel_bias.shape[1], rel_offset, q_offset, k_offset)
    vis = _dense_mask(m, nq, nk, q_offset, k_offset, kl, B)
    return oracle.dense_biased_attention(
        q, k, v, vis, _dense_bias(rel_bias, gate, idx, B), scale=scale,
        rope_dim=0 if rope is None else rope.dim,
        interleaved=False if rope is None else rope.interleaved, q_offset=q_offset,
        k_offset=k_offset)


# ---- random cases --------------------------------------------------------------------------------

def _case(rng, kind):
    """(B, Hq, Hk, D, nq, nk, q_offset, k_offset, mask, key_lengths, rope, gated) with the sink
    of ``kind``: one key, inside the band of the first rows, beyond every band, or >= N."""
    B, Hk, g = rng.randint(1, 3), rng.randint(1, 2), rng.choice([1, 2, 3])
    D = rng.choice([4, 6, 8])
    nq, nk = rng.randint(1, 30), rng.randint(1, 30)
    k_offset = rng.randint(0, 10)
    q_offset = k_offset + rng.randint(0, 12)
    sink = {"1": k_offset + 1, "inside": k_offset + rng.randint(1, 4),
            "beyond": k_offset + nk // 2 + rng.randint(1, 4),
            ">=N": k_offset + nk + rng.randint(0, 6)}[kind]
    if rng.random() < 0.5:
        m = IntervalMask.band(rng.choice([0, 1, 3, 6]), rng.randint(0, 3), sink=sink)
    else:
        m = IntervalMask.chunked(rng.randint(1, 5), rng.choice([0, 1, 2]), rng.randint(0, 2),
                                 sink=sink)
    kl = None
    if rng.random() < 0.6:
        kl = torch.randint(0, nk + 1, (B,))
        if B > 1 and rng.random() < 0.5:
            kl[rng.randrange(B)] = 0                    # a batch item with no key at all
    rope = rng.choice([None, pyencoder.Rope(D), pyencoder.Rope(D - 2, interleaved=True)])
    return B, Hk * g, Hk, D, nq, nk, q_offset, k_offset, m, kl, rope, rng.random() < 0.6


def _table(rng, Hq, nq, nk, m, q_offset, k_offset, dtype=torch.float64, extra=True):
    """A random table covering the band's offsets (relative_offsets), exactly (the narrowest the
    op accepts: sink keys outside it clamp) or with a few more columns on each side."""
    r_min, r_max = relative_offsets(nq, nk, block=m.block, lo_off=m.lo_off, hi_off=m.hi_off,
                                    q_offset=q_offset, k_offset=k_offset)
    if r_min > r_max:
        r_min = r_max = 0
    lo_more, hi_more = (rng.randint(0, 3), rng.randint(0, 3)) if extra else (0, 0)
    r0 = r_min - lo_more
    return torch.randn(Hq, r_max - r0 + 1 + hi_more, dtype=dtype), r0


@pytest.mark.parametrize("kind", ["1", "inside", "beyond", ">=N"])
@pytest.mark.parametrize("trial", range(3))
def test_reference_matches_dense_float64_oracle_forward_and_all_gradients(kind, trial):
    """The reference backend (blocked, the CPU path) against the dense oracle, float64: output
    and the gradients of q, k, v, rel_bias and gate, to 1e-10 (both float64; the two differ only
    in summation order)."""
    rng = random.Random(torch.randint(1 << 30, ()).item())
    B, Hq, Hk, D, nq, nk, qo, ko, m, kl, rope, gated = _case(rng, kind)
    q = torch.randn(B, Hq, nq, D, dtype=torch.float64)
    k, v = (torch.randn(B, Hk, nk, D, dtype=torch.float64) for _ in range(2))
    rel, r0 = _table(rng, Hq, nq, nk, m, qo, ko, extra=rng.random() < 0.5)
    gate = torch.rand(B, Hq, nq, dtype=torch.float64) * 2 if gated else None
    go = torch.randn(B, Hq, nq, D, dtype=torch.float64)
    res = []
    for f in ("ref", "oracle"):
        xs = [x.clone().requires_grad_(True) for x in (q, k, v, rel)]
        gx = None if gate is None else gate.clone().requires_grad_(True)
        if f == "ref":
            o = interval_attention(*xs[:3], mask=m, rope=rope, key_lengths=kl, q_offset=qo,
                                   k_offset=ko, rel_bias=xs[3], gate=gx, rel_offset=r0,
                                   backend="reference")
        else:
            o = _oracle(*xs[:3], m, xs[3], gx, r0, qo, ko, kl, rope)
        ins = xs + ([] if gx is None else [gx])
        res.append((o,) + torch.autograd.grad(o, ins, go))
    what = (m, qo, ko, kl, rope, (B, Hq, Hk, nq, nk), r0, rel.shape, gated)
    for name, a, b in zip(("out", "dq", "dk", "dv", "drel", "dgate"), *res):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda s: f"{name} {what} {s}")


def test_the_clamp_is_exercised_sink_keys_read_the_edge_columns():
    """Sink keys far behind the queries read column 0 and an early query's sink keys ahead of
    its band read column L - 1: the op equals the clamped oracle, and differs from the oracle
    that gives them the bias 0 (the in-table-only rule of tests/oracle.py) - so the comparison
    above would catch a kernel that drops or misplaces the clamp. drel_bias's edge columns hold
    the sum over every clamped offset."""
    B, H, N, D = 1, 2, 24, 8
    m = IntervalMask.band(2, 0, sink=6)
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64) for _ in range(3))
    r_min, r_max = relative_offsets(N, N, block=1, lo_off=2, hi_off=0)
    assert (r_min, r_max) == (-2, 0)
    rel = torch.randn(H, 3, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(B, H, N, dtype=torch.float64)
    out = interval_attention(q, k, v, mask=m, rel_bias=rel, gate=gate, rel_offset=-2,
                             backend="reference")
    torch.testing.assert_close(out, _oracle(q, k, v, m, rel, gate, -2, 0, 0, None, None),
                               rtol=1e-10, atol=1e-10)
    vis = _dense_mask(m, N, N, 0, 0, None, B)
    unclamped = oracle.dense_biased_attention(
        q, k, v, vis, oracle.relative_bias_matrix(rel.detach(), gate, -2, N, N))
    assert (out - unclamped).abs().max() > 1e-3
    # query 0 sees sink keys 1..5 ahead of it (offsets 1..5 > r_max = 0): column 2 clamps them
    idx = _clamped_columns(N, N, 3, -2, 0, 0)
    assert idx[0, 1:6].tolist() == [2] * 5 and idx[20, 0:6].tolist() == [0] * 6
    # drel: every visible pair adds dS * gate to its clamped column (oracle's autograd agrees)
    go = torch.randn_like(out)
    d_ref, = torch.autograd.grad(out, rel, go)
    rel2 = rel.detach().clone().requires_grad_(True)
    d_or, = torch.autograd.grad(_oracle(q, k, v, m, rel2, gate, -2, 0, 0, None, None), rel2, go)
    torch.testing.assert_close(d_ref, d_or, rtol=1e-10, atol=1e-10)


def test_a_wide_table_gives_the_exact_bias_of_every_sink_key():
    """A table wide enough for every visible offset (rel_offset = k_offset - last query position,
    through the sink keys' largest offset): the clamp never fires and the result equals the exact
    bias rel_bias[h, s - p - rel_offset] (tests/oracle.py's relative_bias_matrix, no clamp)."""
    rng = random.Random(torch.randint(1 << 30, ()).item())
    for _ in range(3):
        B, Hq, Hk, D, nq, nk, qo, ko, m, kl, rope, gated = _case(rng, "beyond")
        r_min, r_max = relative_offsets(nq, nk, block=m.block, lo_off=m.lo_off,
                                        hi_off=m.hi_off, q_offset=qo, k_offset=ko)
        lo = min(ko - (qo + nq - 1), r_min)
        hi = max(r_max, min(m.sink, ko + nk) - 1 - qo)
        rel = torch.randn(Hq, hi - lo + 1, dtype=torch.float64)
        gate = torch.rand(B, Hq, nq, dtype=torch.float64) if gated else None
        q = torch.randn(B, Hq, nq, D, dtype=torch.float64)
        k, v = (torch.randn(B, Hk, nk, D, dtype=torch.float64) for _ in range(2))
        out = interval_attention(q, k, v, mask=m, rope=rope, key_lengths=kl, q_offset=qo,
                                 k_offset=ko, rel_bias=rel, gate=gate, rel_offset=lo)
        exact = oracle.dense_biased_attention(
            q, k, v, _dense_mask(m, nq, nk, qo, ko, kl, B),
            oracle.relative_bias_matrix(rel, gate, lo, nq, nk, qo, ko, batch=B),
            rope_dim=0 if rope is None else rope.dim,
            interleaved=False if rope is None else rope.interleaved, q_offset=qo, k_offset=ko)
        torch.testing.assert_close(out, exact, rtol=1e-10, atol=1e-10)


def test_gradcheck_reference_with_sinks_and_a_gated_bias():
    """float64 gradcheck of q, k, v, rel_bias and gate through the reference op with sink keys,
    a narrow table (the clamp fires), GQA, partial interleaved RoPE, padding and offsets."""
    q, k, v, rope, kl = gradcheck_inputs()
    m = IntervalMask.band(2, 1, sink=4)
    r_min, r_max = relative_offsets(11, 13, block=1, lo_off=2, hi_off=1, q_offset=3, k_offset=1)
    rel = torch.randn(2, r_max - r_min + 1, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(1, 2, 11, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, rel, gate):
        return interval_attention(q, k, v, mask=m, rope=rope, key_lengths=kl, q_offset=3,
                                  k_offset=1, rel_bias=rel, gate=gate, rel_offset=r_min,
                                  backend="reference")
    assert torch.autograd.gradcheck(f, (q, k, v, rel, gate))


def test_sink_keys_that_hold_no_key_leave_a_biased_call_bit_identical():
    """sink <= k_offset (no key of this call is a sink key): the same code as without sinks,
    bit for bit, forward and backward (the sink = 0 path is the code before the rule)."""
    q, k, v = (torch.randn(2, 2, 17, 8) for _ in range(3))
    rel, gate = torch.randn(2, 24), torch.rand(2, 2, 17)
    res = []
    for sink in (0, 3):
        xs = [x.clone().requires_grad_(True) for x in (q, k, v, rel, gate)]
        o = interval_attention(*xs[:3], mask=IntervalMask.band(5, 2, sink=sink), q_offset=9,
                               k_offset=4, rel_bias=xs[3], gate=xs[4], backend="reference")
        res.append((o,) + torch.autograd.grad(o.sum(), xs))
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_bias_with_sinks_needs_a_column_and_still_covers_the_band():
    """Errors name the argument: a call whose band sees no key (hi_off far behind) needs no
    column for the band, but its visible sink keys need one (they clamp into the table); the
    columns must still cover the band's offsets (relative_offsets()) with sinks."""
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    with pytest.raises(ValueError, match=r"rel_bias needs at least one column .* got 0 columns "
                                         r"with sink=2"):
        interval_attention(q, k, v, mask=IntervalMask(1, 0, -20, sink=2),
                           rel_bias=torch.zeros(2, 0), rel_offset=0)
    with pytest.raises(ValueError, match=r"must cover the relative offsets s - p in \[-2, 0\]"):
        interval_attention(q, k, v, mask=IntervalMask.band(2, 0, sink=2),
                           rel_bias=torch.zeros(2, 2), rel_offset=-1)
    # one column is enough: every visible (sink) key reads it
    out = interval_attention(q, k, v, mask=IntervalMask(1, 0, -20, sink=2),
                             rel_bias=torch.full((2, 1), 0.5), rel_offset=0)
    want = interval_attention(q, k[:, :, :2], v[:, :, :2], mask=IntervalMask.band(None, 10))
    torch.testing.assert_close(out, want)


# ---- WavLM's bucket rule (pyencoder.nn.relpos) ---------------------------------------------------

def _wavlm_oracle(q, k, v, table, gate, m, nb, md, qo, ko, kl):
    """Dense float64 attention with the bias table[bucket(s - p)] at the TRUE offsets."""
    B, H, nq, D = q.shape
    nk = k.shape[2]
    rel = (torch.arange(nk)[None, :] + ko) - (torch.arange(nq)[:, None] + qo)
    bias = table.to(torch.float64)[relative_position_bucket(rel, nb, md)].permute(2, 0, 1)
    bias = bias[None].expand(B, -1, -1, -1)
    if gate is not None:
        bias = bias * gate.to(torch.float64)[..., None]
    return oracle.dense_biased_attention(q, k, v, _dense_mask(m, nq, nk, qo, ko, kl, B), bias)


@pytest.mark.parametrize("trial", range(4))
def test_wavlm_bias_with_sinks_equals_the_bucket_at_the_true_offsets(trial):
    """biased_interval_attention with a sink mask (the fused op, its table from
    sink_bias_columns) against the dense oracle applying relative_position_bucket at the true
    offsets s - p, forward and the gradients of q, k, v, table and gate, float64 to 1e-10, for N
    well beyond max_distance (small num_buckets / max_distance keep it cheap)."""
    rng = random.Random(torch.randint(1 << 30, ()).item())
    nb, md = rng.choice([(8, 6), (12, 10), (16, 9)])
    B, H, D = rng.randint(1, 2), 2, 8
    nq, nk = rng.randint(md * 2, md * 5), rng.randint(md * 2, md * 5)
    ko = rng.randint(0, 6)
    qo = ko + rng.randint(0, 10)
    sink = ko + rng.choice([1, 3, nk // 2, nk + 2])
    m = rng.choice([IntervalMask.band(rng.randint(0, 4), rng.randint(0, 2), sink=sink),
                    IntervalMask.chunked(rng.randint(2, 4), 1, 1, sink=sink)])
    kl = None if rng.random() < 0.5 else torch.randint(1, nk + 1, (B,))
    q = torch.randn(B, H, nq, D, dtype=torch.float64)
    k, v = (torch.randn(B, H, nk, D, dtype=torch.float64) for _ in range(2))
    table = torch.randn(nb, H, dtype=torch.float64)
    gate = torch.rand(B, H, nq, dtype=torch.float64) * 2 if rng.random() < 0.7 else None
    go = torch.randn(B, H, nq, D, dtype=torch.float64)
    bucket = lambda r: relative_position_bucket(r, nb, md)   # noqa: E731
    res = []
    for f in ("fused", "oracle"):
        xs = [x.clone().requires_grad_(True) for x in (q, k, v, table)]
        gx = None if gate is None else gate.clone().requires_grad_(True)
        if f == "fused":
            o = biased_interval_attention(*xs[:3], gx, xs[3], bucket, mask=m, key_lengths=kl,
                                          q_offset=qo, k_offset=ko)
        else:
            o = _wavlm_oracle(*xs[:3], xs[3], gx, m, nb, md, qo, ko, kl)
        ins = xs + ([] if gx is None else [gx])
        res.append((o,) + torch.autograd.grad(o, ins, go))
    what = (m, nb, md, qo, ko, nq, nk, kl)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dtable", "dgate"), *res):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda s: f"{name} {what} {s}")


@pytest.mark.parametrize("trial", range(6))
def test_sink_bias_columns_are_exact_and_the_cheapest(trial):
    """sink_bias_columns' table: (1) clamping any visible offset r (band or sink) to it reads
    bucket(r) itself; (2) it covers the band (relative_offsets); (3) cheapest: each end is the
    band's end, the end of the visible range, or removing its column would make the offset just
    past it read another bucket (the bucket changes there). For WavLM's bucket it is at most
    about 2 * max_distance + the band wide, however long the sequence."""
    rng = random.Random(torch.randint(1 << 30, ()).item())
    nb, md = rng.choice([(8, 6), (16, 9), (32, 20)])
    nq, nk = rng.randint(1, 200), rng.randint(1, 200)
    ko = rng.randint(0, 20)
    qo = rng.randint(0, 40)
    sink = ko + rng.randint(1, nk + 3)
    m = rng.choice([IntervalMask.band(rng.randint(0, 5), rng.randint(0, 3), sink=sink),
                    IntervalMask.chunked(rng.randint(2, 5), 1, 2, sink=sink)])
    H = 2
    table = torch.arange(nb * H, dtype=torch.float64).view(nb, H)   # column t identifies bucket
    bucket = lambda r: relative_position_bucket(r, nb, md)   # noqa: E731
    rel_bias, r0 = sink_bias_columns(table, bucket, nq, nk, block=m.block, lo_off=m.lo_off,
                                     hi_off=m.hi_off, sink=m.sink, q_offset=qo, k_offset=ko)
    L = rel_bias.shape[1]
    vis = _dense_mask(m, nq, nk, qo, ko, None, 1)[0, 0]
    rel = (torch.arange(nk)[None, :] + ko) - (torch.arange(nq)[:, None] + qo)
    offs = torch.unique(rel[vis])
    got = rel_bias[0, (offs - r0).clamp(0, L - 1)]
    assert torch.equal(got, table[bucket(offs), 0]), (m, qo, ko, nq, nk)
    r_min, r_max = relative_offsets(nq, nk, block=m.block, lo_off=m.lo_off, hi_off=m.hi_off,
                                    q_offset=qo, k_offset=ko)
    if r_min <= r_max:
        assert r0 <= r_min and r0 + L - 1 >= r_max
    # an end column can only go if the offset it holds reads the same bucket from its neighbour
    lo_end, hi_end = r0, r0 + L - 1
    band = r_min <= r_max
    assert L == 1 or (band and lo_end == r_min) or (
        bucket(torch.tensor([lo_end + 1])) != bucket(torch.tensor([lo_end]))).item()
    assert L == 1 or (band and hi_end == r_max) or (
        bucket(torch.tensor([hi_end - 1])) != bucket(torch.tensor([hi_end]))).item()
    if band:
        assert lo_end >= min(int(offs.min()), r_min) and hi_end <= max(int(offs.max()), r_max)
    else:
        assert lo_end >= int(offs.min()) and hi_end <= int(offs.max())
    band = 0 if r_min > r_max else r_max - r_min + 1
    assert L <= band + 2 * (md + 1), (L, band, md)


def test_dropout_and_the_unfused_path_still_refuse_sinks_by_name():
    """Sinks run on the fused bias only; attention-probability dropout and fused=False (the
    plain-torch tiles) refuse them, naming the arguments."""
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    m = IntervalMask.band(2, 0, sink=1)
    bucket = lambda r: r.clamp(-3, 4) + 3   # noqa: E731
    with pytest.raises(NotImplementedError, match=r"sink.*dropout_p=0.5"):
        biased_interval_attention(q, k, v, None, torch.randn(8, 2), bucket, mask=m,
                                  dropout_p=0.5)
    with pytest.raises(NotImplementedError, match=r"sink.*fused=False"):
        biased_interval_attention(q, k, v, None, torch.randn(8, 2), bucket, mask=m, fused=False)


# ---- opcheck ------------------------------------------------------------------------------------

def test_opcheck_reference_op_with_sinks_and_bias():
    """torch.library.opcheck of pyencoder::interval_attention (reference backend) with sink keys
    and a gated bias whose table is narrower than the sink offsets."""
    q = torch.randn(2, 2, 10, 8, requires_grad=True)
    k = torch.randn(2, 1, 12, 8, requires_grad=True)
    v = torch.randn(2, 1, 12, 8, requires_grad=True)
    kl = torch.tensor([12, 7], dtype=torch.int32)
    r_min, r_max = relative_offsets(10, 12, block=1, lo_off=3, hi_off=2, q_offset=2, k_offset=1)
    rel = torch.randn(2, r_max - r_min + 1, requires_grad=True)
    gate = torch.rand(2, 2, 10, requires_grad=True)
    args = attention_op_args(q, k, v, pyencoder.Rope(4).inv_freq(), kl, block=1, lo_off=3,
                             hi_off=2, sink=5, rel_bias=rel, gate=gate, rel_offset=r_min,
                             q_offset=2, k_offset=1)
    torch.library.opcheck(torch.ops.pyencoder.interval_attention.default, (*args, "reference"))


def _needs_interpreter():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 (set before triton is imported) or a GPU")


def test_opcheck_triton_backend_with_sinks_and_bias():
    """opcheck of pyencoder::interval_attention with backend "triton" and of the triton_op
    pyencoder::interval_attention_triton with sink keys and a gated bias (interpreter on CPU)."""
    _needs_interpreter()
    from pyencoder.ops import _triton_ops  # noqa: F401  (registers the triton_ops)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(2, 2, 10, 16, device=dev, requires_grad=True)
    k = torch.randn(2, 1, 12, 16, device=dev, requires_grad=True)
    v = torch.randn(2, 1, 12, 16, device=dev, requires_grad=True)
    kl = torch.tensor([12, 7], dtype=torch.int32, device=dev)
    r_min, r_max = relative_offsets(10, 12, block=1, lo_off=3, hi_off=2)
    rel = torch.randn(2, r_max - r_min + 1, device=dev, requires_grad=True)
    gate = torch.rand(2, 2, 10, device=dev, requires_grad=True)
    args = attention_op_args(q, k, v, pyencoder.Rope(8).inv_freq().to(dev), kl, block=1,
                             lo_off=3, hi_off=2, sink=5, rel_bias=rel, gate=gate,
                             rel_offset=r_min)
    torch.library.opcheck(torch.ops.pyencoder.interval_attention.default, (*args, "triton"))
    torch.library.opcheck(torch.ops.pyencoder.interval_attention_triton.default, args)


# ---- Triton -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["1", "inside", "beyond", ">=N"])
def test_triton_sinks_with_bias_match_the_reference_under_the_interpreter(dtype, kind,
                                                                         monkeypatch):
    """Tiny shapes through interval_attention(backend="triton") (TRITON_INTERPRET=1 on CPU; fp32
    and fp16, the interpreter's bf16 dot is wrong) with outputs poisoned before the kernels write
    them: out, lse, dq, dk, dv, drel_bias and dgate against the reference in float64 on the same
    inputs, narrow tables (the clamp fires in the sink spans of all three kernels), band and
    chunked masks, offsets, padding, GQA, RoPE off / on. Tolerances those of
    tests/test_attention_relbias_triton.py relative to max(1, the largest reference value):
    fp32 1e-4 (IEEE dots, exp2, another order), fp16 6e-3 out / 1.2e-2 gradients (q/k/P/dS
    rounded to fp16 before each dot); drel_bias sums dS * gate over up to B * Nq pairs per
    column (the edge columns gather many clamped offsets), so its bound is scaled by that count,
    as there. A misplaced clamp moves O(1) of bias: far outside these."""
    _needs_interpreter()
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1")
    from pyencoder.ops import _attention_triton as tri
    monkeypatch.setattr(tri, "POISON_OUTPUTS", True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rng = random.Random(torch.randint(1 << 30, ()).item())
    for _ in range(2):
        B, Hq, Hk, _, nq, nk, qo, ko, m, kl, rope, gated = _case(rng, kind)
        D = 16
        rope = None if rope is None else pyencoder.Rope(rng.choice([16, 8]),
                                                        interleaved=rope.interleaved)
        q = torch.randn(B, Hq, nq, D, dtype=dtype, device=dev)
        k, v = (torch.randn(B, Hk, nk, D, dtype=dtype, device=dev) for _ in range(2))
        rel, r0 = _table(rng, Hq, nq, nk, m, qo, ko, dtype=dtype, extra=False)
        rel = rel.to(dev)
        gate = (torch.rand(B, Hq, nq, device=dev) * 2).to(dtype) if gated else None
        go = torch.randn(B, Hq, nq, D, dtype=dtype, device=dev)
        kl_d = None if kl is None else kl.to(dev)
        res = {}
        for be in ("triton", "reference"):
            cast = (lambda x: x.double()) if be == "reference" else (lambda x: x)
            xs = [cast(x).clone().requires_grad_(True) for x in (q, k, v, rel)]
            gx = None if gate is None else cast(gate).clone().requires_grad_(True)
            o, lse = interval_attention(*xs[:3], mask=m, rope=rope, key_lengths=kl_d,
                                        q_offset=qo, k_offset=ko, rel_bias=xs[3], gate=gx,
                                        rel_offset=r0, backend=be, return_lse=True)
            ins = xs + ([] if gx is None else [gx])
            res[be] = (o, lse.double()) + torch.autograd.grad(o, ins, cast(go))
        what = (m, qo, ko, kl, rope, (B, Hq, Hk, nq, nk), r0, tuple(rel.shape), gated)
        lse_t, lse_r = res["triton"][1], res["reference"][1]
        assert torch.equal(torch.isinf(lse_t), torch.isinf(lse_r)), ("zero rows differ", what)
        fin = torch.isfinite(lse_r)
        tl_ = 1e-4 if dtype == torch.float32 else 5e-3
        assert torch.allclose(lse_t[fin], lse_r[fin], rtol=tl_, atol=tl_), what
        names = ("out", "-", "dq", "dk", "dv", "drel", "dgate")
        for name, a, b in zip(names, res["triton"], res["reference"]):
            if name == "-":
                continue
            assert not torch.isnan(a).any(), (name, what)
            tol = 1e-4 if dtype == torch.float32 else (6e-3 if name == "out" else 1.2e-2)
            if name == "drel":
                tol *= B * nq
            err = (a.double() - b).abs().max().item() if a.numel() else 0.0
            assert err <= tol * max(1.0, b.abs().max().item()), (name, err, what)


def gpu_quick(name, p):
    """The fast GPU tier (tests/conftest.py): the sink + bias kernels once, band in bf16."""
    return (name == "test_gpu_triton_sinks_with_bias_follow_the_flash_attention_rule"
            and p["dtype"] == torch.bfloat16 and p["mask"].sink == 4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("mask", [IntervalMask.band(250, 3, sink=4),
                                  IntervalMask.chunked(16, 2, 3, sink=64),
                                  IntervalMask.band(8, 0, sink=700)], ids=repr)
def test_gpu_triton_sinks_with_bias_follow_the_flash_attention_rule(dtype, mask):
    """On a GPU with the tuned tiles: N=1000 (padding, GQA, NeoX RoPE, offsets), a gated bias
    whose table covers only the band (sink keys clamp): kernel error against the float32
    reference <= 2x (forward) / 3x (gradients) the error of the reference run in the same dtype
    plus a small absolute floor (tests/test_attention_triton.py's FlashAttention rule); the
    bias gradients with the floor scaled by their size (sums over up to B * N pairs); float32
    within 1e-4 relative (drel, dgate: 1e-3, float32 atomics in another order)."""
    B, Hq, Hk, N, D = 2, 4, 2, 1000, 64
    q = torch.randn(B, Hq, N, D, device="cuda", dtype=dtype)
    k, v = (torch.randn(B, Hk, N, D, device="cuda", dtype=dtype) for _ in range(2))
    go = torch.randn_like(q)
    kl = torch.tensor([N, 613], device="cuda")
    rope = pyencoder.Rope(D)
    r_min, r_max = relative_offsets(N, N, block=mask.block, lo_off=mask.lo_off,
                                    hi_off=mask.hi_off, q_offset=5, k_offset=3)
    rel = torch.randn(Hq, r_max - r_min + 1, device="cuda", dtype=dtype)
    gate = (torch.rand(B, Hq, N, device="cuda") * 2).to(dtype)

    def run(be, cast):
        xs = [cast(x).clone().requires_grad_(True) for x in (q, k, v, rel, gate)]
        o = interval_attention(*xs[:3], mask=mask, rope=rope, key_lengths=kl, q_offset=5,
                               k_offset=3, backend=be, rel_bias=xs[3], gate=xs[4],
                               rel_offset=r_min)
        return (o,) + torch.autograd.grad(o, xs, cast(go))

    got = run("triton", lambda x: x)
    want = run("reference", lambda x: x.float())
    same = run("reference", lambda x: x)
    for name, a, b, c in zip(("out", "dq", "dk", "dv", "drel", "dgate"), got, want, same):
        err = (a.float() - b).abs().max().item()
        big = max(1.0, b.abs().max().item())
        if dtype == torch.float32:
            assert err <= (1e-3 if name in ("drel", "dgate") else 1e-4) * big, (name, err)
        else:
            base = (c.float() - b).abs().max().item()
            floor = 1e-3 * (big if name in ("drel", "dgate") else 1.0)
            assert err <= (2 if name == "out" else 3) * base + floor, (name, err, base)
