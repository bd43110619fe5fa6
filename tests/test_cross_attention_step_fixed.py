"""FrameCrossAttention.step_fixed: the streaming cross-attention (video frames attending to audio
features at their own rates) in lockstep steps of whole frames, CUDA-graph capturable.

Checked (float64): bounded frame masks at 1:1, 1:2, 2:1, 16:3 and the chunked form, with and
without RoPE; after general steps (independent chunkings first, then lockstep until steady),
step_fixed (check once, then without host synchronisation) == the general step on a copy of the
state (outputs, out_lengths, every state tensor, in place) and the stream == offline; the
alignment record survives fixed steps and is dropped by load_state_dict and reset (then
RuntimeError until check=True); clear errors for unbounded history, steps that are not whole
frames in lockstep, a missing chunk, a state that is not steady; reset() of every slot starts
over, of some slots raises. GPU (marked): captured in a CUDA graph, replays == eager.

Tolerance: float64, the same op on the same rows (RoPE applied before the op instead of inside
it): 1e-12; stream vs offline 1e-10.
"""
import random

import pytest
import torch

from _stream_utils import rel_err
from test_streaming_fixed import NoHostSync, _capture
from pyencoder import IntervalMask
from pyencoder.nn import FrameCrossAttention
from pyencoder.streaming import reset

MASKS = [IntervalMask.frames(1, 1, 2, 1), IntervalMask.frames(1, 2, 1, 1, 1),
         IntervalMask.frames(2, 1, 2, 0), IntervalMask.frames(16, 3, 1, 0, 2),
         IntervalMask.frame_chunked(2, 3, 2, 1, 1)]


def _module(mask, rope, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return FrameCrossAttention(16, 2, mask=mask, kv_dim=12, rope=rope).to(dtype).eval()


def _warm(m, xq, xkv, F, rng):
    """Independent chunkings of both streams, then lockstep steps of F frames until a fixed
    step would keep the state's shapes. Returns (state, outs, tq, tk)."""
    mk = m.mask
    st = m.init_state(xq.shape[0], dtype=xq.dtype)
    outs, tq, tk = [], 0, 0
    for _ in range(3):                          # off lockstep: keys ahead or behind
        a, b = rng.randint(0, 3) * mk.block, rng.randint(0, 3) * mk.k_block
        y, st = m.step(xq[:, tq:tq + a], xkv[:, tk:tk + b], st)
        outs.append(y)
        tq, tk = tq + a, tk + b
    n_q, n_k = F * mk.block, F * mk.k_block
    for i in range(40):
        P, K = st.q.shape[2], st.k.shape[2]
        if m._steady_after(int(st.q_pos[0]) - P, P, int(st.k_pos[0]) - K, K, n_q, n_k):
            return st, outs, tq, tk
        y, st = m.step(xq[:, tq:tq + n_q], xkv[:, tk:tk + n_k], st)
        outs.append(y)
        tq, tk = tq + n_q, tk + n_k
    raise AssertionError("never steady")


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("mask", MASKS, ids=repr)
def test_step_fixed_equals_step_and_offline(mask, rope):
    rng = random.Random(hash((repr(mask), rope)) & 0xffff)
    m = _module(mask, rope, seed=rng.randint(0, 99))
    F, B, steps = 2, 2, 6
    Tq, Tk = 400 * mask.block, 400 * mask.k_block
    xq = torch.randn(B, Tq, 16, dtype=torch.float64)
    xkv = torch.randn(B, Tk, 12, dtype=torch.float64)
    n_q, n_k = F * mask.block, F * mask.k_block
    with torch.no_grad():
        st, outs, tq, tk = _warm(m, xq, xkv, F, rng)
        oracle = m.init_state(B, dtype=torch.float64)
        oracle.load_state_dict(st.state_dict())
        ptrs = {k: v.data_ptr() for k, v in st.tensors().items()}
        for i in range(steps):
            a, b = xq[:, tq:tq + n_q], xkv[:, tk:tk + n_k]
            if i == 0:
                y = m.step_fixed(a, b, st, check=True)
            else:
                with NoHostSync():
                    y = m.step_fixed(a, b, st)
            y2, oracle = m.step(a, b, oracle)
            assert y.shape == (B, n_q, 16) and st.out_lengths.tolist() == [n_q] * B
            assert rel_err(y, y2) <= 1e-12, i
            outs.append(y)
            tq, tk = tq + n_q, tk + n_k
        assert {k: v.data_ptr() for k, v in st.tensors().items()} == ptrs
        for k, v in st.tensors().items():
            assert rel_err(v.double(), oracle.tensors()[k].double()) <= 1e-12 if \
                v.is_floating_point() else torch.equal(v, oracle.tensors()[k]), k
        got = torch.cat(outs, 1)
        ref = m(xq[:, :tq], xkv[:, :tk])
        assert rel_err(got, ref[:, :got.shape[1]]) <= 1e-10


def test_alignment_record_and_errors():
    mask = IntervalMask.frames(2, 1, 2, 0)
    m = _module(mask, True)
    rng = random.Random(3)
    xq = torch.randn(1, 200, 16, dtype=torch.float64)
    xkv = torch.randn(1, 100, 12, dtype=torch.float64)
    with torch.no_grad():
        st, _, tq, tk = _warm(m, xq, xkv, 1, rng)
        a, b = xq[:, tq:tq + 2], xkv[:, tk:tk + 1]
        m.step_fixed(a, b, st)                      # the general steps recorded the alignment
        m.step_fixed(a, b, st)                      # and the fixed steps keep it
        other = m.init_state(1, dtype=torch.float64)
        other.load_state_dict(st.state_dict())
        with pytest.raises(RuntimeError, match="alignment of this state is not known"):
            m.step_fixed(a, b, other)
        m.step_fixed(a, b, other, check=True)
        m.step_fixed(a, b, other)
        with pytest.raises(ValueError, match="whole frames of both streams in lockstep"):
            m.step_fixed(xq[:, :2], xkv[:, :2], st)
        with pytest.raises(ValueError, match="whole frames"):
            m.step_fixed(xq[:, :3], xkv[:, :1], st)
        with pytest.raises(ValueError, match="needs both chunks"):
            m.step_fixed(None, b, st)
        with pytest.raises(ValueError, match="unbounded history"):
            u = _module(IntervalMask.frames(2, 1, None, 0), False)
            u.step_fixed(a, b, u.init_state(1, dtype=torch.float64))
        fresh = m.init_state(1, dtype=torch.float64)
        _, fresh = m.step(xq[:, :2], xkv[:, :1], fresh)
        with pytest.raises(ValueError, match="needs a steady state"):
            m.step_fixed(a, b, fresh, check=True)
        # reset: every slot starts over (the record dropped); a subset refuses
        reset(st, torch.tensor([True]))
        assert st.q.shape[2] == st.k.shape[2] == 0 and st.q_pos.tolist() == [0]
        with pytest.raises(RuntimeError, match="not known"):
            m.step_fixed(a, b, st)
        two = m.init_state(2, dtype=torch.float64)
        with pytest.raises(ValueError, match="reset every slot at once"):
            reset(two, torch.tensor([True, False]))
        # after a reset the stream equals a fresh one
        y1, st = m.step(xq[:, :6], xkv[:, :3], st)
        y2, _ = m.step(xq[:, :6], xkv[:, :3], m.init_state(1, dtype=torch.float64))
        assert torch.equal(y1, y2)


@pytest.mark.gpu
@pytest.mark.parametrize("rope", [False, True])
def test_cuda_graph_cross_attention(rope):
    mask = IntervalMask.frames(1, 2, 2, 1)
    m = _module(mask, rope, dtype=torch.float32).cuda()
    B, F = 2, 2
    xq = torch.randn(B, 200, 16, device="cuda")
    xkv = torch.randn(B, 400, 12, device="cuda")
    with torch.no_grad():
        st, _, tq, tk = _warm(m, xq, xkv, F, random.Random(5))
        eager = m.init_state(B)
        eager.load_state_dict(st.state_dict())
        m.step_fixed(xq[:, tq:tq + F], xkv[:, tk:tk + 2 * F], eager, check=True)
        qb, kb = xq[:, tq:tq + F].clone(), xkv[:, tk:tk + 2 * F].clone()
        m.step_fixed(qb, kb, st, check=True)
        g, yb = _capture(lambda: m.step_fixed(qb, kb, st))    # the warm-up ran one step
        tq, tk = tq + F, tk + 2 * F
        m.step_fixed(xq[:, tq:tq + F], xkv[:, tk:tk + 2 * F], eager)
        for _ in range(6):
            tq, tk = tq + F, tk + 2 * F
            qb.copy_(xq[:, tq:tq + F])
            kb.copy_(xkv[:, tk:tk + 2 * F])
            g.replay()
            ye = m.step_fixed(xq[:, tq:tq + F], xkv[:, tk:tk + 2 * F], eager)
            torch.cuda.synchronize()
            assert rel_err(yb, ye) <= 1e-5


@pytest.mark.gpu
def test_cuda_graph_step_helper_with_two_inputs():
    """pyencoder.streaming.CudaGraphStep with a tuple example: step(video, audio) replays
    equal the eager fixed step; admit refuses (a single-input step only)."""
    from pyencoder.streaming import CudaGraphStep
    mask = IntervalMask.frames(1, 2, 2, 1)
    m = _module(mask, True, dtype=torch.float32).cuda()
    B, F = 2, 2
    xq = torch.randn(B, 200, 16, device="cuda")
    xkv = torch.randn(B, 400, 12, device="cuda")
    with torch.no_grad():
        st, _, tq, tk = _warm(m, xq, xkv, F, random.Random(6))
        eager = m.init_state(B)
        eager.load_state_dict(st.state_dict())
        g = CudaGraphStep(m, st, (xq[:, tq:tq + F], xkv[:, tk:tk + 2 * F]))
        first = True
        for _ in range(6):
            a, b = xq[:, tq:tq + F], xkv[:, tk:tk + 2 * F]
            y = g(a, b).clone()
            ye = m.step_fixed(a, b, eager, check=first)
            first = False
            torch.cuda.synchronize()
            assert rel_err(y, ye) <= 1e-5
            tq, tk = tq + F, tk + 2 * F
        with pytest.raises(ValueError, match="takes 2 input"):
            g(a)
        with pytest.raises(TypeError, match="single-input step"):
            g.admit(0, [a[:1]])
