"""Frame-rate bands for cross-attention (issue 15 item 3): IntervalMask.frames / frame_chunked
(query frame f = p // q_frame sees key frames [f - left, f + right], key frame = s // k_frame),
pyencoder.ops.cross_attention (Nq != Nk, positions in each side's own units, optional RoPE),
against an independent dense float64 oracle written here from the issue's definition: forward
and gradients over frame ratios 1:1, 1:2, 2:1, 16:3, offsets, padding, GQA; gradcheck; band and
chunked unchanged."""
import random

import pytest
import torch

import pyencoder
from pyencoder import IntervalMask
from pyencoder.ops import cross_attention, interval_attention

from conftest import attention_op_args
from oracle import dense_attention

RATIOS = [(1, 1), (1, 2), (2, 1), (16, 3)]


def _frame_visible(nq, nk, q_frame, k_frame, left, right, extra=0, q_offset=0, k_offset=0,
                   key_lengths=None, batch=1, chunk=None):
    """(B, 1, Nq, Nk) bool from the issue's words, loop over pairs: key frame g = s // k_frame is
    visible to query frame f = p // q_frame iff f - left <= g <= f + right (left None: no lower
    bound); ``extra`` more key positions after the last visible frame. ``chunk`` (frames): the
    chunked form, chunk c = f // chunk sees key frames of chunks [c - left, c] plus ``extra``
    key frames."""
    m = torch.zeros(batch, 1, nq, nk, dtype=torch.bool)
    for i in range(nq):
        f = (q_offset + i) // q_frame
        for j in range(nk):
            s = k_offset + j
            g = s // k_frame
            if chunk is None:
                first, last = (None if left is None else f - left), f + right
                ok = (first is None or g >= first) and (
                    g <= last or s < (last + 1) * k_frame + extra)
            else:
                c, gc = f // chunk, g // chunk
                ok = (left is None or gc >= c - left) and (gc <= c or g < (c + 1) * chunk + extra)
            m[:, 0, i, j] = ok
    if key_lengths is not None:
        j = torch.arange(nk)
        m &= (j[None, :] < key_lengths[:, None])[:, None, None, :]
    return m


def _rng():
    return random.Random(torch.randint(1 << 30, ()).item())


def test_frames_and_frame_chunked_lo_hi_match_the_definition():
    rng = _rng()
    for _ in range(40):
        qf, kf = rng.choice(RATIOS)
        left, right, extra = rng.choice([None, 0, rng.randint(1, 4)]), rng.randint(0, 3), \
            rng.randint(0, 5)
        m = IntervalMask.frames(qf, kf, left, right, extra)
        nq, nk = 40, 40
        dense = _frame_visible(nq, nk, qf, kf, left, right, extra)[0, 0]
        assert torch.equal(m.dense(nq, nk), dense), m
        ps = torch.arange(nq)
        assert torch.equal(m.hi(ps), torch.tensor([m.hi(int(p)) for p in ps]))
        # lo and hi stay non-decreasing, so the kernels' block skipping stays valid
        assert bool((m.lo(ps).diff() >= 0).all()) and bool((m.hi(ps).diff() >= 0).all())
        c = rng.randint(1, 3)
        mc = IntervalMask.frame_chunked(qf, kf, c, left, extra)
        # chunked in frames: query frame f in chunk f // c; lookahead in key frames
        dc = _frame_visible(nq, nk, qf, kf, left, 0, extra, chunk=c)[0, 0]
        # extra is in key frames for frame_chunked: the oracle counts it in key frames too
        assert torch.equal(mc.dense(nq, nk), dc), mc


def test_frames_equal_band_and_chunked_and_keep_their_params():
    assert IntervalMask.frames(1, 1, 3, 2) == IntervalMask.band(3, 2)
    assert IntervalMask.frames(1, 1, None, 0) == IntervalMask.band(None, 0)
    assert IntervalMask.frames(4, 4, 2, 0, 3) == IntervalMask.chunked(4, 2, 3)
    assert IntervalMask.frame_chunked(1, 1, 4, 1, 2) == IntervalMask.chunked(4, 1, 2)
    assert IntervalMask.band(3, 2).params == (1, 3, 2)
    assert IntervalMask.chunked(4, 1, 3).params == (4, 4, 6)
    assert IntervalMask.chunked(4, 1, 3).frame_params == (4, 4, 4, 6)
    assert not IntervalMask.chunked(4, 1, 3).is_frame
    m = IntervalMask.frames(2, 1, 1, 0)
    assert m.is_frame and m.frame_params == (2, 1, 1, 0)
    with pytest.raises(ValueError, match="frame-rate mask.*k_block=1 != block=2"):
        m.params


def test_frame_repr_round_trips_and_bad_arguments_are_named():
    for m in [IntervalMask.frames(2, 3, None, 1, 5), IntervalMask.frames(16, 3, 2, 0),
              IntervalMask.frame_chunked(1, 2, 3, 1, 1), IntervalMask(3, 1, 0, 2)]:
        assert eval(repr(m), {"IntervalMask": IntervalMask}) == m
    assert repr(IntervalMask.frames(2, 1, 1, 0)) == \
        "IntervalMask.frames(q_frame=2, k_frame=1, left=1, right=0, extra=0)"
    for make, match in [(lambda: IntervalMask.frames(0, 1, 1, 0), "q_frame"),
                        (lambda: IntervalMask.frames(1, 0, 1, 0), "k_frame"),
                        (lambda: IntervalMask.frames(1, 2, -1, 0), "left"),
                        (lambda: IntervalMask.frames(1, 2, 1, -1), "right"),
                        (lambda: IntervalMask.frames(1, 2, 1, 0, -2), "extra"),
                        (lambda: IntervalMask.frame_chunked(1, 2, 0, 1), "chunk_frames"),
                        (lambda: IntervalMask(2, 1, 0, 0), "k_block")]:
        with pytest.raises((ValueError, TypeError), match=match):
            make()


def _case(rng, ratio, dtype=torch.float64):
    qf, kf = ratio
    B = rng.randint(1, 2)
    Hk = rng.choice([1, 2])
    Hq = Hk * rng.choice([1, 2])
    D = rng.choice([4, 8])
    nq_frames, nk_frames = rng.randint(1, 5), rng.randint(1, 5)
    Nq = nq_frames * qf + rng.randint(0, qf - 1)
    Nk = nk_frames * kf + rng.randint(0, kf - 1)
    q = torch.randn(B, Hq, Nq, D, dtype=dtype)
    k = torch.randn(B, Hk, Nk, D, dtype=dtype)
    v = torch.randn(B, Hk, Nk, D, dtype=dtype)
    lengths = (torch.randint(0, Nk + 1, (B,)) if rng.random() < 0.5 else None)
    return q, k, v, lengths


@pytest.mark.parametrize("ratio", RATIOS, ids=lambda r: f"{r[0]}:{r[1]}")
@pytest.mark.parametrize("chunked", [False, True], ids=["band", "chunked"])
def test_reference_matches_dense_oracle_fwd_and_grads(ratio, chunked):
    rng = _rng()
    for _ in range(6):
        qf, kf = ratio
        q, k, v, lengths = _case(rng, ratio)
        left = rng.choice([None, 0, 1, 2])
        right, extra = rng.randint(0, 2), rng.randint(0, 3)
        q_offset = rng.choice([0, rng.randint(0, 3 * qf)])
        k_offset = rng.choice([0, rng.randint(0, 3 * kf)])
        rope_dim = rng.choice([0, q.shape[-1]])
        if chunked:
            c = rng.randint(1, 2)
            mask = IntervalMask.frame_chunked(qf, kf, c, left, extra)
            vis = _frame_visible(q.shape[2], k.shape[2], qf, kf, left, 0, extra, q_offset,
                                 k_offset, lengths, q.shape[0], chunk=c)
        else:
            mask = IntervalMask.frames(qf, kf, left, right, extra)
            vis = _frame_visible(q.shape[2], k.shape[2], qf, kf, left, right, extra, q_offset,
                                 k_offset, lengths, q.shape[0])
        rope = pyencoder.Rope(rope_dim) if rope_dim else None
        args = [t.clone().requires_grad_() for t in (q, k, v)]
        out = cross_attention(*args, mask=mask, rope=rope, key_lengths=lengths,
                              q_offset=q_offset, k_offset=k_offset, backend="reference")
        ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = dense_attention(*ref_in, vis, rope_dim=rope_dim, q_offset=q_offset,
                              k_offset=k_offset)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        dout = torch.randn_like(ref)
        got = torch.autograd.grad(out, args, dout)
        want = torch.autograd.grad(ref, ref_in, dout)
        for name, a, b in zip("qkv", got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"d{name} {mask}")


def test_rows_that_see_no_key_are_zero_with_zero_gradient():
    # 2 query positions per frame, 3 key positions per frame, 4 keys given: query frames >= 2 see
    # only keys >= 6 with left=0: none exist
    q = torch.randn(1, 1, 8, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    out = cross_attention(q, k, v, mask=IntervalMask.frames(2, 3, 0, 0))
    assert torch.equal(out[0, 0, 4:], torch.zeros(4, 4, dtype=torch.float64))
    out.sum().backward()
    assert torch.equal(q.grad[0, 0, 4:], torch.zeros(4, 4, dtype=torch.float64))
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_gradcheck_tiny_frame_masks():
    torch.manual_seed(0)
    for mask, nq, nk in [(IntervalMask.frames(2, 1, 1, 0, 1), 5, 3),
                         (IntervalMask.frames(1, 2, None, 1), 3, 7),
                         (IntervalMask.frame_chunked(16, 3, 1, 1, 1), 17, 7)]:
        q = torch.randn(1, 2, nq, 4, dtype=torch.float64, requires_grad=True)
        k = torch.randn(1, 1, nk, 4, dtype=torch.float64, requires_grad=True)
        v = torch.randn(1, 1, nk, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda a, b, c: cross_attention(a, b, c, mask=mask, rope=pyencoder.Rope(4),
                                            q_offset=1, k_offset=2), (q, k, v))


def test_same_rate_masks_run_interval_attention_bit_for_bit():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    for mask in [IntervalMask.band(2, 1), IntervalMask.chunked(3, 1, 1),
                 IntervalMask.frames(2, 2, 1, 0)]:
        assert torch.equal(cross_attention(q, k, v, mask=mask),
                           interval_attention(q, k, v, mask=mask))


def test_frame_masks_are_refused_where_they_are_not_supported():
    q, k, v = (torch.randn(1, 1, 4, 4) for _ in range(3))
    m = IntervalMask.frames(2, 1, 0, 0)
    with pytest.raises(TypeError, match="mask must be a pyencoder.IntervalMask"):
        cross_attention(q, k, v, mask=(2, 1, 0, 0))
    with pytest.raises(ValueError, match="frame-rate mask"):
        interval_attention(q, k, v, mask=m)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck_frame_op(backend):
    if backend == "triton" and (torch.cuda.is_available() or not _has_triton()):
        pytest.skip("the interpreter case (CPU with triton)")
    from torch.library import opcheck
    q = torch.randn(1, 2, 5, 16, requires_grad=True)
    k = torch.randn(1, 1, 7, 16, requires_grad=True)
    v = torch.randn(1, 1, 7, 16, requires_grad=True)
    opcheck(torch.ops.pyencoder.interval_attention.default,
            (*attention_op_args(q, k, v, None, torch.tensor([6], dtype=torch.int32), block=2,
                                lo_off=3, hi_off=5, k_block=3, q_offset=1, scale=0.5), backend))


def _has_triton():
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


# Triton under the interpreter (CPU) on tiny shapes, against the float64 oracle. Shapes span
# several 16-row query tiles and 16-key blocks so block skipping and the dk/dv kernel's inversion
# of the frame mask (query blocks of a key block) are exercised. Tolerances as in
# tests/test_attention_triton.py: fp32 (IEEE dots) 1e-4; fp16 (probabilities and dS rounded to
# fp16 before each dot) 6e-3 forward / 1.2e-2 gradients, absolute and relative.
_TRITON_CASES = [  # (q_frame, k_frame, left, right, extra, chunk frames or None, Nq, Nk)
    (1, 1, 5, 2, 0, None, 40, 40),      # 1:1 (a band through the frame op)
    (1, 2, 3, 1, 1, None, 37, 75),      # 1:2
    (2, 1, 2, 0, 0, None, 70, 36),      # 2:1
    (16, 3, 1, 1, 0, None, 70, 17),     # 16:3
    (2, 3, 1, 0, 1, 2, 50, 70),         # chunked in frames (2 frames a chunk, 1 frame lookahead)
    (3, 2, None, 0, 1, None, 45, 40),   # unbounded history
]


@pytest.mark.skipif(torch.cuda.is_available() or not _has_triton(),
                    reason="interpreter test (CPU with triton)")
@pytest.mark.parametrize("dtype,tol_o,tol_g", [(torch.float32, 1e-4, 1e-4),
                                                (torch.float16, 6e-3, 1.2e-2)],
                         ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", range(len(_TRITON_CASES)))
def test_triton_interpreter_matches_oracle_fwd_bwd(case, dtype, tol_o, tol_g, monkeypatch):
    from pyencoder.ops import _attention_triton as tri
    monkeypatch.setattr(tri, "POISON_OUTPUTS", True)
    qf, kf, left, right, extra, chunk, nq, nk = _TRITON_CASES[case]
    mask = (IntervalMask.frames(qf, kf, left, right, extra) if chunk is None
            else IntervalMask.frame_chunked(qf, kf, chunk, left, extra))
    torch.manual_seed(case)
    B, Hq, Hk, D = 2, 2, 1, 16
    q = torch.randn(B, Hq, nq, D).to(dtype)
    k = torch.randn(B, Hk, nk, D).to(dtype)
    v = torch.randn(B, Hk, nk, D).to(dtype)
    lengths = torch.tensor([nk, max(1, nk - 7)])
    q_offset, k_offset = 2, 3
    rope = pyencoder.Rope(8)
    args = [t.clone().requires_grad_() for t in (q, k, v)]
    out = cross_attention(*args, mask=mask, rope=rope, key_lengths=lengths, q_offset=q_offset,
                          k_offset=k_offset, backend="triton")
    vis = _frame_visible(nq, nk, qf, kf, left, right, extra, q_offset, k_offset, lengths, B,
                         chunk=chunk)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = dense_attention(*ref_in, vis, rope_dim=8, q_offset=q_offset, k_offset=k_offset)
    torch.testing.assert_close(out.double(), ref, rtol=tol_o, atol=tol_o)
    dout = torch.randn(ref.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, args, dout.to(dtype))
    want = torch.autograd.grad(ref, ref_in, dout)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a.double(), b, rtol=tol_g, atol=tol_g,
                                   msg=f"d{name} {mask} {dtype}")


def gpu_quick(name, p):
    return name == "test_gpu_frame_masks_fa_rule"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_frame_masks_fa_rule(dtype):
    """On a GPU: the Triton frame-mask kernels (50 Hz keys -> 25 fps queries, and 16:3 chunked)
    vs the float32 reference; error <= 2x (forward) / 3x (gradients) the error of plain torch in
    the same dtype (dense oracle, upcast=False) plus a tiny floor: the FlashAttention rule of
    tests/test_attention_triton.py."""
    torch.manual_seed(0)
    for mask, nq, nk in [(IntervalMask.frames(1, 2, 5, 2), 1000, 2000),
                         (IntervalMask.frame_chunked(16, 3, 4, 8, 1), 3000, 600)]:
        q = torch.randn(2, 4, nq, 64, device="cuda")
        k = torch.randn(2, 2, nk, 64, device="cuda")
        v = torch.randn(2, 2, nk, 64, device="cuda")
        lengths = torch.tensor([nk, nk - 37], device="cuda")
        dout = torch.randn(2, 4, nq, 64, device="cuda")
        vis = (mask.dense(nq, nk, q_offset=1, k_offset=2, device="cuda")[None, None]
               & (torch.arange(nk, device="cuda")[None, :] < lengths[:, None])[:, None, None, :])

        def run(dt, backend):
            a = [t.to(dt).requires_grad_() for t in (q, k, v)]
            if backend == "plain":
                o = dense_attention(*a, vis, upcast=False)
            else:
                o = cross_attention(*a, mask=mask, key_lengths=lengths, q_offset=1, k_offset=2,
                                    backend=backend)
            return [o] + list(torch.autograd.grad(o, a, dout.to(dt)))

        ref = run(torch.float32, "reference")
        plain = run(dtype, "plain")
        tri = run(dtype, "triton")
        for i, (r, pl, t) in enumerate(zip(ref, plain, tri)):
            bound = (2 if i == 0 else 3) * (pl.float() - r).abs().max().item() + 1e-4
            err = (t.float() - r).abs().max().item()
            assert err <= bound, (mask, "out dq dk dv".split()[i], err, bound)


def test_sink_with_frame_mask_is_refused():
    # Sinks are defined for same-rate masks only; a frame mask with sinks names the argument.
    with pytest.raises(ValueError, match="sink"):
        IntervalMask(2, 2, 5, 3, 1)
    with pytest.raises(ValueError, match="sink"):
        IntervalMask.frames(2, 3, 1, 1).with_sink(2)
    assert IntervalMask.band(2, 1, sink=3).with_sink(0) == IntervalMask.band(2, 1)
