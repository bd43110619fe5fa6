"""Sink keys (issue 15 item 2): IntervalMask.sink = S makes absolute key positions s < S visible
to every query besides its interval. The reference path (fast blocked CPU path) against an
independent dense float64 oracle (tests/oracle.py's interval mask OR an explicit sink column
mask) over random shapes, sinks (0, 1, within and beyond the band, S >= N), offsets, padding,
RoPE and GQA, forward and gradients; gradcheck; NaN poisoning through sinks; sink = 0 leaves
band and chunked bit-identical."""
import random

import pytest
import torch

import pyencoder
from pyencoder import IntervalMask
from pyencoder.ops import interval_attention
from conftest import gradcheck_inputs
from oracle import dense_attention, interval_mask


def _oracle_mask(m, nq, nk, q_offset, k_offset, key_lengths, batch):
    vis = interval_mask(nq, nk, m.block, m.lo_off, m.hi_off, q_offset, k_offset, None, batch)
    s = torch.arange(nk) + k_offset
    vis = vis | (s < m.sink)[None, None, None, :]
    if key_lengths is not None:
        vis &= (torch.arange(nk)[None, :] < key_lengths[:, None])[:, None, None, :]
    return vis


def _random_case(rng):
    B, Hk, g = rng.randint(1, 2), rng.randint(1, 2), rng.choice([1, 2, 3])
    D = rng.choice([4, 6, 8])
    nq, nk = rng.randint(1, 45), rng.randint(1, 45)
    k_offset = rng.randint(0, 12)
    q_offset = k_offset + rng.randint(0, 8)
    window = rng.randint(0, 9)
    sink = rng.choice([0, 1, rng.randint(1, 6), k_offset + window + rng.randint(1, 10),
                       k_offset + nk + rng.randint(0, 5)])     # none, one, in/beyond band, >= N
    if rng.random() < 0.5:
        m = IntervalMask.band(rng.choice([None, 0, window]), rng.randint(0, 4), sink=sink)
    else:
        m = IntervalMask.chunked(rng.randint(1, 5), rng.choice([None, 0, 1, 2]),
                                 rng.randint(0, 3), sink=sink)
    kl = None if rng.random() < 0.5 else torch.randint(0, nk + 1, (B,))
    rope = rng.choice([None, pyencoder.Rope(D), pyencoder.Rope(D - 2, interleaved=True)])
    return B, Hk, g, D, nq, nk, q_offset, k_offset, m, kl, rope


@pytest.mark.parametrize("trial", range(6))
def test_reference_matches_dense_float64_oracle_forward_and_gradients(trial):
    rng = random.Random(torch.randint(1 << 30, ()).item())
    for _ in range(12):
        B, Hk, g, D, nq, nk, qo, ko, m, kl, rope = _random_case(rng)
        q = torch.randn(B, Hk * g, nq, D, dtype=torch.float64, requires_grad=True)
        k = torch.randn(B, Hk, nk, D, dtype=torch.float64, requires_grad=True)
        v = torch.randn(B, Hk, nk, D, dtype=torch.float64, requires_grad=True)
        out = interval_attention(q, k, v, mask=m, rope=rope, key_lengths=kl, q_offset=qo,
                                 k_offset=ko, backend="reference")
        vis = _oracle_mask(m, nq, nk, qo, ko, kl, B)
        ref = dense_attention(q, k, v, vis, rope_dim=0 if rope is None else rope.dim,
                              interleaved=False if rope is None else rope.interleaved,
                              q_offset=qo, k_offset=ko)
        what = (m, qo, ko, kl, rope)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10, msg=lambda e: f"{what}: {e}")
        go = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), go)
        exp = torch.autograd.grad(ref, (q, k, v), go)
        for name, a, b in zip("qkv", got, exp):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9,
                                       msg=lambda e: f"d{name} {what}: {e}")


def test_sinks_change_the_output_only_where_they_add_keys():
    # A sink beyond every row's interval changes every row that did not see it; sink=0 is the
    # plain mask bit for bit.
    q, k, v = (torch.randn(1, 2, 30, 8) for _ in range(3))
    plain = pyencoder.ops.banded_attention(q, k, v, left=3, right=1)
    assert torch.equal(plain, pyencoder.ops.banded_attention(q, k, v, left=3, right=1, sink=0))
    with_sink = pyencoder.ops.banded_attention(q, k, v, left=3, right=1, sink=2)
    assert torch.equal(with_sink[:, :, :4], plain[:, :, :4])     # rows 0..3 already see keys 0, 1
    assert not torch.isclose(with_sink[:, :, 4:], plain[:, :, 4:]).all(-1).any()


def test_gradcheck_with_sinks():
    q, k, v, r, kl = gradcheck_inputs()
    assert torch.autograd.gradcheck(
        lambda q, k, v: pyencoder.ops.banded_attention(q, k, v, left=2, right=1, rope=r,
                                                       key_lengths=kl, q_offset=2, k_offset=1,
                                                       sink=3), (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: pyencoder.ops.chunked_attention(q, k, v, chunk_size=3, left_chunks=0,
                                                        lookahead=1, sink=2), (q, k, v))


def test_a_nonfinite_sink_key_poisons_every_row_and_only_them():
    q, k, v = (torch.randn(1, 2, 20, 8, requires_grad=True) for _ in range(3))
    kk = k.detach().clone()
    kk[0, 1, 1, 3] = float("nan")
    kk.requires_grad_(True)
    out = pyencoder.ops.banded_attention(q, kk, v, left=2, right=0, sink=2)
    assert torch.isnan(out[0, 1]).all() and not torch.isnan(out[0, 0]).any()
    out2 = pyencoder.ops.banded_attention(q, kk, v, left=2, right=0, sink=1)   # key 1 not a sink
    assert torch.isnan(out2[0, 1, 1:4]).all() and not torch.isnan(out2[0, 1, 4:]).any()
    dq, dk, dv = torch.autograd.grad(out2.nan_to_num().sum(), (q, kk, v))
    assert not torch.isnan(dk[0, 1, 4:]).any() and not torch.isnan(dk[0, 0]).any()


@pytest.mark.parametrize("make, match", [
    (lambda: IntervalMask.band(1, 0, sink=-1), r"sink must be >= 0; got -1"),
    (lambda: IntervalMask.chunked(2, 1, sink=1.5), r"sink must be an int; got float"),
])
def test_bad_sink_names_the_argument(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make()


def test_sink_is_part_of_the_mask_value():
    m = IntervalMask.band(4, 1, sink=3)
    assert m != IntervalMask.band(4, 1) and m.params == (1, 4, 1) and m.sink == 3
    assert m.latency() == IntervalMask.band(4, 1).latency() == 1
    assert repr(m) == "IntervalMask.band(left=4, right=1, sink=3)"
    assert eval(repr(m), {"IntervalMask": IntervalMask}) == m
    assert IntervalMask.chunked(4, 1, 2).with_sink(5) == IntervalMask.chunked(4, 1, 2, sink=5)



def test_triton_backend_refuses_sinks_by_name():
    """The Triton kernels have no sink path yet: a forced triton backend raises and names sink,
    and the backend's supports_forward gives the reason (auto on CUDA then runs the reference)."""
    from pyencoder.ops import _attention_triton as tri
    q, k, v = (torch.randn(1, 1, 4, 8) for _ in range(3))
    assert "sink" in tri.supports_forward(q, k, v, sink=2)
    with pytest.raises(RuntimeError, match="sink"):
        pyencoder.ops.banded_attention(q, k, v, left=1, right=0, sink=1, backend="triton")

@pytest.mark.parametrize("trial", range(4))
def test_streaming_with_sinks_equals_offline_over_random_chunkings(trial):
    """Sink keys stay resident in the stream state (SinkAttentionState) while the ring wraps:
    cat(step outputs) + flush == offline forward for random ragged chunkings and max_chunk
    (fp32: 1e-5 relative, the streaming contract), and the first queries wait for the sink keys
    the offline op lets them see."""
    from _stream_utils import rel_err, stream
    from pyencoder.nn import BandedSelfAttention, ChunkedSelfAttention
    rng = random.Random(torch.randint(1 << 30, ()).item())
    sink = rng.choice([1, 3, 9])
    if rng.random() < 0.5:
        mod = BandedSelfAttention(16, 2, left=rng.choice([0, 2, 5]), right=rng.randint(0, 2),
                                  sink=sink)
    else:
        mod = ChunkedSelfAttention(16, 2, chunk_size=rng.randint(1, 4),
                                   left_chunks=rng.choice([0, 1]), lookahead=rng.randint(0, 2),
                                   sink=sink)
    mod.eval()
    T = rng.randint(20, 70)
    x = torch.randn(2, T, 16)
    with torch.no_grad():
        ref = mod(x)
        sizes = [rng.randint(1, 9) for _ in range(12)]
        got = stream(mod, x, sizes, time_dim=1, max_chunk=rng.choice([None, 4, 11]))
    assert got.shape == ref.shape
    assert rel_err(got, ref) < 1e-5, (mod, sizes)
    assert mod.lookahead == mod.mask.latency() == type(mod.mask)(
        mod.mask.block, mod.mask.lo_off, mod.mask.hi_off).latency()


def test_step_fixed_refuses_sinks_by_name():
    from pyencoder.nn import BandedSelfAttention
    mod = BandedSelfAttention(16, 2, left=4, right=0, sink=2)
    st = mod.init_state(1)
    with pytest.raises(ValueError, match="sink"):
        mod.step_fixed(torch.randn(1, 1, 16), st)
    with pytest.raises(ValueError, match="sink must be <= max_context"):
        BandedSelfAttention(16, 2, left=4, right=0, sink=100, max_context=50)


def test_paths_without_sinks_refuse_a_sink_mask_by_name():
    from pyencoder.nn.relpos import biased_interval_attention
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    m = IntervalMask.band(2, 0, sink=1)
    with pytest.raises(NotImplementedError, match="sink"):
        pyencoder.ops.interval_attention_dropout(q, k, v, mask=m, dropout_p=0.5)
    with pytest.raises(NotImplementedError, match="sink"):
        biased_interval_attention(q, k, v, None, torch.randn(8, 2), lambda r: r.clamp(0, 7),
                                  mask=m)
    torch.testing.assert_close(pyencoder.ops.interval_attention_dropout(q, k, v, mask=m,
                                                                         dropout_p=0.0),
                               interval_attention(q, k, v, mask=m))
