"""FrameCrossAttention.step_fixed: the streaming cross-attention (video frames attending to audio
features at their own rates) in lockstep steps of whole frames, CUDA-graph capturable.

Checked (float64): bounded frame masks at 1:1, 1:2, 2:1, 16:3 and the chunked form, band and
chunked masks with sink keys (resident in the state apart from the window), with and without
RoPE; after general steps (independent chunkings first, then lockstep until steady), step_fixed
(check once, then without host synchronisation) == the general step on a copy of the state
(outputs, out_lengths, every state tensor, in place) and the stream == offline; the
alignment record survives fixed steps and is dropped by load_state_dict and reset (then
RuntimeError until check=True); clear errors for unbounded history, steps that are not whole
frames in lockstep, a missing chunk, a state that is not steady; reset() of every slot starts
over, of some slots raises. Admission: a new stream copied into a slot of a running batch
(pyencoder.streaming.admit with (x_q, x_kv) chunks) is advanced by the fixed step at its own
positions == its offline forward, the other slot undisturbed; refused (nothing written) at other
counts, another mask pattern, an unknown alignment. GPU (marked): captured in a CUDA graph,
replays == eager; CudaGraphStep with two inputs, admit into its graph.

Tolerance: float64, the same op on the same rows (RoPE applied before the op instead of inside
it): 1e-12; stream vs offline 1e-10.
"""
import copy
import random

import pytest
import torch

from _stream_utils import rel_err
from test_streaming_fixed import NoHostSync, _capture
from pyencoder import IntervalMask
from pyencoder.nn import FrameCrossAttention
from pyencoder.streaming import admit, reset

MASKS = [IntervalMask.frames(1, 1, 2, 1), IntervalMask.frames(1, 2, 1, 1, 1),
         IntervalMask.frames(2, 1, 2, 0), IntervalMask.frames(16, 3, 1, 0, 2),
         IntervalMask.frame_chunked(2, 3, 2, 1, 1), IntervalMask.band(2, 1, sink=2),
         IntervalMask.chunked(2, 1, 1, sink=3), IntervalMask.band(1, 0, sink=6)]


def _module(mask, rope, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return FrameCrossAttention(16, 2, mask=mask, kv_dim=12, rope=rope).to(dtype).eval()


def _warm(m, xq, xkv, F, rng, apart=True):
    """Independent chunkings of both streams (``apart``), then lockstep steps of F frames until a
    fixed step would keep the state's shapes. Returns (state, outs, tq, tk)."""
    mk = m.mask
    st = m.init_state(xq.shape[0], dtype=xq.dtype)
    outs, tq, tk = [], 0, 0
    for _ in range(3 if apart else 0):          # off lockstep: keys ahead or behind
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


def _admit_lockstep(m, st, slot, xq, xkv, F, max_chunks=40):
    """admit the stream (xq, xkv) (batch 1) into ``slot`` fed whole frames of both streams in
    lockstep from its start, with as few chunks as admission takes (not steady yet: more).
    Returns (warm-up outputs, query frames fed, key frames fed)."""
    mk = m.mask
    n_q, n_k = F * mk.block, F * mk.k_block
    chunks = []
    for w in range(1, max_chunks + 1):
        chunks.append((xq[:, (w - 1) * n_q:w * n_q], xkv[:, (w - 1) * n_k:w * n_k]))
        try:
            outs = admit(m, st, slot, chunks, n_q)
        except ValueError as e:
            assert "not yet in the steady state" in str(e)
            continue
        return outs, w * n_q, w * n_k
    raise AssertionError("never admitted")


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("mask", MASKS, ids=repr)
def test_admit_a_stream_into_a_running_batch(mask, rope):
    """A new stream takes slot 1 of a batch that step_fixed advances (as a CUDA graph would): its
    warm-up runs the general step on a private state, which is copied into the slot in place;
    then fixed steps advance both slots, each at its own positions (RoPE), one mask alignment
    for the batch. Each slot's stream == its own offline forward; the other slot is untouched;
    the general step refuses the batch now that its slots stand apart."""
    rng = random.Random(hash((repr(mask), rope, "admit")) & 0xffff)
    m = _module(mask, rope, seed=rng.randint(0, 99))
    F, B = 2, 2
    n_q, n_k = F * mask.block, F * mask.k_block
    xq = torch.randn(B, 300 * mask.block, 16, dtype=torch.float64)
    xkv = torch.randn(B, 300 * mask.k_block, 12, dtype=torch.float64)
    cq = torch.randn(1, 200 * mask.block, 16, dtype=torch.float64)
    ckv = torch.randn(1, 200 * mask.k_block, 12, dtype=torch.float64)
    with torch.no_grad():
        # a server feeds every stream whole frames of both streams in lockstep from its start
        st, outs, tq, tk = _warm(m, xq, xkv, F, rng, apart=False)
        for i in range(3):
            outs.append(m.step_fixed(xq[:, tq:tq + n_q], xkv[:, tk:tk + n_k], st, check=i == 0))
            tq, tk = tq + n_q, tk + n_k
        ptrs = {k: v.data_ptr() for k, v in st.tensors().items()}
        warm, uq, uk = _admit_lockstep(m, st, 1, cq, ckv, F)
        assert {k: v.data_ptr() for k, v in st.tensors().items()} == ptrs    # in place
        assert st.q_pos.tolist() == [tq, uq] and st.k_pos.tolist() == [tk, uk]
        assert st.out_lengths.tolist() == [n_q, n_q]
        new = list(warm)
        for i in range(5):
            a = torch.cat([xq[:1, tq:tq + n_q], cq[:, uq:uq + n_q]])
            b = torch.cat([xkv[:1, tk:tk + n_k], ckv[:, uk:uk + n_k]])
            # the record survived the copy: no check needed (as under a graph)
            with NoHostSync():
                y = m.step_fixed(a, b, st)
            outs.append(y)
            new.append(y[1:])
            tq, tk, uq, uk = tq + n_q, tk + n_k, uq + n_q, uk + n_k
        m.step_fixed(xq[:, :n_q], xkv[:, :n_k], copy.deepcopy(st), check=True)  # same pattern
        old = torch.cat([o[:1] for o in outs], 1)
        ref0 = m(xq[:1, :tq], xkv[:1, :tk])
        assert rel_err(old, ref0[:, :old.shape[1]]) <= 1e-10
        got = torch.cat(new, 1)
        ref1 = m(cq[:, :uq], ckv[:, :uk])
        assert got.shape[1] >= uq - 3 * n_q - mask.block * 4
        assert rel_err(got, ref1[:, :got.shape[1]]) <= 1e-10
        with pytest.raises(ValueError, match="advances the slots together"):
            m.step(xq[:, tq:tq + n_q], xkv[:, tk:tk + n_k], st)


def test_admit_refusals():
    """Nothing is written when: the new stream holds other counts than the batch's (its keys
    fed a frame ahead); its mask pattern is not the batch's; the batch's alignment is not known
    (loaded, no step since); a chunk tuple is malformed; the step is not whole query frames."""
    mask = IntervalMask.frames(2, 1, 2, 0)
    m = _module(mask, True)
    rng = random.Random(4)
    xq = torch.randn(2, 200, 16, dtype=torch.float64)
    xkv = torch.randn(2, 100, 12, dtype=torch.float64)
    cq, ckv = torch.randn(1, 200, 16, dtype=torch.float64), torch.randn(1, 100, 12,
                                                                          dtype=torch.float64)
    with torch.no_grad():
        st, _, tq, tk = _warm(m, xq, xkv, 1, rng, apart=False)
        before = {k: v.clone() for k, v in st.tensors().items()}
        # keys fed a frame ahead of the queries: steady, with one key more buffered than the
        # batch's streams hold
        ahead = [(None, ckv[:, :1])] + [(cq[:, 2 * i:2 * i + 2], ckv[:, i + 1:i + 2])
                                        for i in range(30)]
        with pytest.raises(RuntimeError, match="feed it as the batch's streams were fed"):
            admit(m, st, 1, ahead, 2)
        # the same counts at another phase of the 2-query block (a state edited here: streams
        # fed alike reach one pattern per count in these masks; the guard stays)
        sub, _, _, _ = _warm(m, cq, ckv, 1, rng, apart=False)
        sub.q_pos += 1
        with pytest.raises(RuntimeError, match="mask pattern other than the batch's"):
            m._admit_check(st, sub, 1)
        loaded = m.init_state(2, dtype=torch.float64).load_state_dict(st.state_dict())
        with pytest.raises(RuntimeError, match="alignment is not known"):
            _admit_lockstep(m, loaded, 0, cq, ckv, 1)
        with pytest.raises(ValueError, match="tuples of them"):
            admit(m, st, 1, [(None, None)], 2)
        with pytest.raises(ValueError, match="tuples of them"):
            admit(m, st, 1, [(cq[:, :2], ckv[:, :1]), (cq[:, 2:4],)], 2)
        for k, v in st.tensors().items():
            assert torch.equal(v, before[k]), k
        with pytest.raises(ValueError, match="no steady step of length 3"):
            admit(m, st, 1, [(cq[:, :2], ckv[:, :1])], 3)     # not whole query frames


@pytest.mark.gpu
@pytest.mark.parametrize("mask", [IntervalMask.frames(1, 2, 2, 1),
                                  IntervalMask.band(2, 1, sink=2)], ids=repr)
@pytest.mark.parametrize("rope", [False, True])
def test_cuda_graph_cross_attention(rope, mask):
    m = _module(mask, rope, dtype=torch.float32).cuda()
    B, F = 2, 2
    nq, nk = F * mask.block, F * mask.k_block
    xq = torch.randn(B, 200, 16, device="cuda")
    xkv = torch.randn(B, 400, 12, device="cuda")
    with torch.no_grad():
        st, _, tq, tk = _warm(m, xq, xkv, F, random.Random(5))
        eager = m.init_state(B)
        eager.load_state_dict(st.state_dict())
        m.step_fixed(xq[:, tq:tq + nq], xkv[:, tk:tk + nk], eager, check=True)
        qb, kb = xq[:, tq:tq + nq].clone(), xkv[:, tk:tk + nk].clone()
        m.step_fixed(qb, kb, st, check=True)
        g, yb = _capture(lambda: m.step_fixed(qb, kb, st))    # the warm-up ran one step
        tq, tk = tq + nq, tk + nk
        m.step_fixed(xq[:, tq:tq + nq], xkv[:, tk:tk + nk], eager)
        for _ in range(6):
            tq, tk = tq + nq, tk + nk
            qb.copy_(xq[:, tq:tq + nq])
            kb.copy_(xkv[:, tk:tk + nk])
            g.replay()
            ye = m.step_fixed(xq[:, tq:tq + nq], xkv[:, tk:tk + nk], eager)
            torch.cuda.synchronize()
            assert rel_err(yb, ye) <= 1e-5


@pytest.mark.gpu
def test_cuda_graph_step_helper_with_two_inputs():
    """pyencoder.streaming.CudaGraphStep with a tuple example: step(video, audio) replays
    equal the eager fixed step; admit takes a new stream into slot 1 (chunks as tuples) and the
    replays then give its offline forward, slot 0 going on undisturbed."""
    from pyencoder.streaming import CudaGraphStep
    mask = IntervalMask.frames(1, 2, 2, 1)
    m = _module(mask, True, dtype=torch.float32).cuda()
    B, F = 2, 2
    xq = torch.randn(B, 200, 16, device="cuda")
    xkv = torch.randn(B, 400, 12, device="cuda")
    cq, ckv = torch.randn(1, 200, 16, device="cuda"), torch.randn(1, 400, 12, device="cuda")
    with torch.no_grad():
        st, _, tq, tk = _warm(m, xq, xkv, F, random.Random(6), apart=False)
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
        new, uq, uk = _admit_lockstep(m, st, 1, cq, ckv, F)        # via admit(): as g.admit
        n = len(new)
        assert torch.equal(st.q_pos, torch.tensor([tq, uq], device="cuda"))
        new = [y.clone() for y in new]
        old = []
        for _ in range(4):
            y = g(torch.cat([xq[:1, tq:tq + F], cq[:, uq:uq + F]]),
                  torch.cat([xkv[:1, tk:tk + 2 * F], ckv[:, uk:uk + 2 * F]]))
            old.append(y[:1].clone())
            new.append(y[1:].clone())
            tq, tk, uq, uk = tq + F, tk + 2 * F, uq + F, uk + 2 * F
        got = torch.cat(new, 1)
        assert rel_err(got, m(cq[:, :uq], ckv[:, :uk])[:, :got.shape[1]]) <= 1e-4
        P = st.q.shape[2]                      # a step emits the oldest n_q queries
        ref0 = m(xq[:1, :tq], xkv[:1, :tk])
        assert rel_err(torch.cat(old, 1), ref0[:, tq - P - 4 * F:tq - P]) <= 1e-4
        # and through the helper's own admit (another new stream, slot 0)
        w = g.admit(0, [(cq[:, i * F:(i + 1) * F], ckv[:, 2 * i * F:2 * (i + 1) * F])
                        for i in range(n)])
        assert len(w) == n
