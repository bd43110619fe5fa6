"""pyencoder.nn.FrameCrossAttention (issue 15 item 3): offline forward against a plain-torch
composition over the dense float64 oracle; streaming == offline over random chunkings of both
streams (chunked independently), for frame ratios 1:1, 1:2, 2:1, 16:3, the chunked form,
unbounded history, sink keys (band / chunked, sinks inside and beyond the window) and RoPE; a
query frame is emitted exactly when the keys it needs have arrived (latency, the last sink key);
state round trip (also of a stream saved before the state held sink keys) and refusals."""
import random

import pytest
import torch

from pyencoder import IntervalMask
from pyencoder.nn import CrossAttentionState, FrameCrossAttention

from oracle import dense_attention

MASKS = [IntervalMask.frames(1, 1, 2, 1), IntervalMask.frames(1, 2, 1, 1, 1),
         IntervalMask.frames(2, 1, 2, 0), IntervalMask.frames(16, 3, 1, 0, 2),
         IntervalMask.frame_chunked(2, 3, 2, 1, 1), IntervalMask.frames(3, 2, None, 1),
         IntervalMask.band(2, 1, sink=2), IntervalMask.chunked(2, 1, 1, sink=3),
         IntervalMask.band(1, 0, sink=6), IntervalMask.band(None, 1, sink=2)]


def _chunks(rng, T):
    out, t = [], 0
    while t < T:
        c = rng.randint(0, min(T - t, 9))
        out.append(c)
        t += c
    return out


def _stream(m, xq, xkv, rng):
    """Feed both streams in independent random chunkings, interleaved at random; returns the
    concatenated outputs and the per-step (queries fed, keys fed, emitted) log."""
    state = m.init_state(xq.shape[0])
    cq, ck = _chunks(rng, xq.shape[1]), _chunks(rng, xkv.shape[1])
    n = max(len(cq), len(ck))
    cq += [0] * (n - len(cq))
    ck += [0] * (n - len(ck))
    outs, log, tq, tk = [], [], 0, 0
    for a, b in zip(cq, ck):
        xa = xq[:, tq:tq + a] if rng.random() < 0.8 or a else None
        xb = xkv[:, tk:tk + b] if rng.random() < 0.8 or b else None
        y, state = m.step(xa, xb, state)
        tq, tk = tq + a, tk + b
        outs.append(y)
        log.append((tq, tk, int(state.out_lengths[0])))
    y, state = m.flush(state)
    outs.append(y)
    return torch.cat(outs, 1), log


@pytest.mark.parametrize("mask", MASKS, ids=repr)
def test_stream_equals_offline_over_random_chunkings(mask):
    rng = random.Random(torch.randint(1 << 30, ()).item())
    torch.manual_seed(rng.randint(0, 1 << 30))
    m = FrameCrossAttention(16, 2, mask=mask, kv_dim=12, rope=rng.choice([False, True]))
    for _ in range(4):
        Tq, Tk = rng.randint(1, 40), rng.randint(1, 40)
        xq, xkv = torch.randn(2, Tq, 16), torch.randn(2, Tk, 12)
        ref = m(xq, xkv)
        got, log = _stream(m, xq, xkv, rng)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        # emission: after a step with tq queries and tk keys fed, exactly the queries p < tq with
        # last_key(p) < tk have come out (a query waits for its keys, and no longer)
        done = 0
        for tq, tk, e in log:
            ready = sum(1 for p in range(tq) if m.last_key(p) < tk)
            assert done + e == ready, (mask, tq, tk, done, e)
            done += e


def test_offline_matches_dense_float64_oracle_and_latency():
    torch.manual_seed(0)
    mask = IntervalMask.frames(1, 2, 1, 1, 1)   # 25 fps queries, 50 Hz keys
    m = FrameCrossAttention(8, 2, mask=mask, kv_dim=6, rope=False).double()
    xq, xkv = torch.randn(1, 7, 8, dtype=torch.float64), torch.randn(1, 15, 6,
                                                                      dtype=torch.float64)
    lengths = torch.tensor([12])
    q = m.q_proj(xq).view(1, 7, 2, 4).transpose(1, 2)
    k = m.k_proj(xkv).view(1, 15, 2, 4).transpose(1, 2)
    v = m.v_proj(xkv).view(1, 15, 2, 4).transpose(1, 2)
    vis = torch.zeros(1, 1, 7, 15, dtype=torch.bool)
    for f in range(7):
        for s in range(15):
            vis[0, 0, f, s] = (f - 1 <= s // 2 <= f + 1 or s == 2 * (f + 2)) and s < 12
    o = dense_attention(q, k, v, vis)
    ref = m.out_proj(o.transpose(1, 2).reshape(1, 7, 8))
    torch.testing.assert_close(m(xq, xkv, key_lengths=lengths), ref, rtol=1e-10, atol=1e-10)
    # query frame f waits for key frame f + 1 (right) and one more key (extra): 2 * 1 + 1 keys
    # past the end of its own key frame
    assert m.latency() == 3 and m.hop == 1 and m.lookahead == 0
    assert [m.last_key(p) for p in range(3)] == [4, 6, 8]


def test_state_round_trip_and_refusals():
    torch.manual_seed(1)
    m = FrameCrossAttention(8, 2, mask=IntervalMask.frames(2, 1, 1, 0), rope=True)
    xq, xkv = torch.randn(1, 10, 8), torch.randn(1, 6, 8)
    st = m.init_state(1)
    y1, st = m.step(xq[:, :5], xkv[:, :2], st)
    saved = st.state_dict()
    st2 = m.init_state(1)
    st2.load_state_dict(saved)
    a, _ = m.step(xq[:, 5:], xkv[:, 2:], st)
    b, _ = m.step(xq[:, 5:], xkv[:, 2:], st2)
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="mask must be a pyencoder.IntervalMask"):
        FrameCrossAttention(8, 2, mask=(2, 1, 1, 0))
    with pytest.raises(ValueError, match="batch size"):
        m.step(torch.randn(2, 1, 8), None, m.init_state(1))
    other = FrameCrossAttention(8, 2, mask=IntervalMask.frames(1, 2, 1, 0))
    with pytest.raises(ValueError, match="state was made by"):
        other.step(None, None, m.init_state(1))
    assert isinstance(st, CrossAttentionState)


def test_slots_at_different_positions_are_refused():
    """The general step advances one position for the batch: a state whose slots stand apart
    (edited, copied, or admitted streams, which step_fixed serves) is refused by step and flush
    (it was stepped at slot 0's position, silently wrong for the others), naming the positions;
    load_state_dict takes it (a checkpoint of admitted streams)."""
    torch.manual_seed(2)
    m = FrameCrossAttention(8, 2, mask=IntervalMask.frames(1, 2, 1, 1), rope=True)
    st = m.init_state(2)
    _, st = m.step(torch.randn(2, 3, 8), torch.randn(2, 4, 8), st)
    saved = st.state_dict()
    apart = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in saved.items()}
    apart["q_pos"][1] += 2
    fresh = m.init_state(2).load_state_dict(apart)
    with pytest.raises(ValueError, match=r"advances the slots together.*q_pos=\[3, 5\]"):
        m.step(torch.randn(2, 1, 8), None, fresh)
    st.k_pos[0] += 1
    with pytest.raises(ValueError, match=r"advances the slots together.*k_pos=\[5, 4\]"):
        m.step(torch.randn(2, 1, 8), torch.randn(2, 2, 8), st)
    with pytest.raises(ValueError, match="advances the slots together"):
        m.flush(st)
    st.k_pos[0] -= 1                                       # back together: steps again
    y, st = m.step(torch.randn(2, 1, 8), torch.randn(2, 2, 8), st)
    assert y.shape[0] == 2 and torch.equal(st.q_pos, torch.tensor([4, 4]))


def test_sink_keys_offline_and_streamed():
    """A mask with sink keys: the offline forward against the dense float64 oracle with the sinks
    visible; the stream keeps the sink keys resident once the window drops them (it gave outputs
    0.77 away from offline when it dropped them, and was refused since) and equals offline, with
    RoPE too; a query waits for the last sink key; a stream saved before the state held sink keys
    (no sink_k / sink_v) still loads."""
    torch.manual_seed(3)
    mask = IntervalMask.band(2, 1, sink=4)
    m = FrameCrossAttention(8, 2, mask=mask).double()
    xq, xkv = torch.randn(1, 12, 8).double(), torch.randn(1, 12, 8).double()
    with torch.no_grad():
        got = m(xq, xkv)
        q, k, v = (m._heads(x, p) for x, p in ((xq, m.q_proj), (xkv, m.k_proj),
                                               (xkv, m.v_proj)))
        vis = mask.dense(12, 12)
        assert vis[:, :4].all() and not vis[8:, 4:6].any()     # sinks seen, the gap not
        o = dense_attention(q, k, v, vis)
        want = m.out_proj(o.transpose(1, 2).reshape(1, 12, 8))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert [m.last_key(p) for p in range(4)] == [3, 3, 3, 4] and m.latency() == 1
    for rope in (False, True):
        torch.manual_seed(4)
        m = FrameCrossAttention(8, 2, mask=mask, rope=rope).double()
        xq, xkv = torch.randn(2, 40, 8).double(), torch.randn(2, 40, 8).double()
        with torch.no_grad():
            ref = m(xq, xkv)
            st = m.init_state(2, dtype=torch.float64)
            y0, st = m.step(xq[:, :10], xkv[:, :3], st)        # the 4th sink key not here yet
            assert y0.shape[1] == 0
            y1, st = m.step(None, xkv[:, 3:20], st)
            assert y1.shape[1] == 10 and int(st.k_pos[0]) - st.k.shape[2] > 4   # sinks apart
            assert torch.equal(st.sink_k, m._heads(xkv[:, :4], m.k_proj))
            y2, st = m.step(xq[:, 10:], xkv[:, 20:], st)
            y3, st = m.flush(st)
        torch.testing.assert_close(torch.cat([y0, y1, y2, y3], 1), ref, rtol=1e-10, atol=1e-10)
    # a stream of a mask without sinks saved before the state had sink_k / sink_v
    plain = FrameCrossAttention(8, 2, mask=IntervalMask.frames(1, 2, 1, 0))
    st = plain.init_state(1)
    _, st = plain.step(torch.randn(1, 3, 8), torch.randn(1, 5, 8), st)
    old = {k: v for k, v in st.state_dict().items() if k not in ("sink_k", "sink_v")}
    back = plain.init_state(1).load_state_dict(old)
    assert back.sink_k.shape == (1, 2, 0, 4) and torch.equal(back.k, st.k)


def test_step_fixed_waits_for_the_sink_keys_to_leave_the_window():
    """step_fixed reads every sink key from the state: while the buffer still holds sink keys it
    is refused by name (check=True), then it runs == the general step."""
    torch.manual_seed(5)
    m = FrameCrossAttention(8, 2, mask=IntervalMask.band(1, 0, sink=6)).double()
    xq, xkv = torch.randn(1, 30, 8).double(), torch.randn(1, 30, 8).double()
    st = m.init_state(1, dtype=torch.float64)
    with torch.no_grad():
        _, st = m.step(xq[:, :2], xkv[:, :2], st)
        with pytest.raises(ValueError, match="still hold sink keys"):
            m.step_fixed(xq[:, 2:4], xkv[:, 2:4], st, check=True)
        t = 2
        while int(st.k_pos[0]) - st.k.shape[2] < 6:
            _, st = m.step(xq[:, t:t + 2], xkv[:, t:t + 2], st)
            t += 2
        ref = m.init_state(1, dtype=torch.float64).load_state_dict(st.state_dict())
        y = m.step_fixed(xq[:, t:t + 2], xkv[:, t:t + 2], st, check=True)
        y2, _ = m.step(xq[:, t:t + 2], xkv[:, t:t + 2], ref)
    torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mask", [
    IntervalMask.frames(1, 2, 2, 1), IntervalMask.frames(1, 2, 1, 1, 1),
    IntervalMask.frames(2, 1, 1, 1), IntervalMask.frames(16, 3, 1, 0),
    IntervalMask.frame_chunked(1, 2, 3, 1, 1), IntervalMask.frame_chunked(2, 3, 2, 1, 0),
    IntervalMask.chunked(4, 1, 0), IntervalMask.chunked(3, None, 2)])
def test_latency_is_the_measured_worst_wait(mask):
    """Keys arrive one position at a time and each query frame with the last key of its own key
    frame (frames: the finest the mask's blocks share, gcd(block, k_block)); the most key
    positions any frame then waits past its own key frame is latency(). A chunked mask's first
    frames wait for the whole chunk's keys: latency() counted the chunk as one frame (2 for
    frame_chunked(1, 2, 3, 1, 1), which waits 6; 0 for chunked(4, 1, 0), which waits 3 and
    whose self-attention reports 3)."""
    import math
    g = math.gcd(mask.block, mask.k_block)
    qf, kf = mask.block // g, mask.k_block // g
    m = FrameCrossAttention(8, 2, mask=mask, rope=False)
    st = m.init_state(1)
    frames, emitted, worst = 12, 0, 0
    with torch.no_grad():
        for s in range(frames * kf):
            done = (s + 1) % kf == 0
            y, st = m.step(torch.randn(1, qf, 8) if done else None, torch.randn(1, 1, 8), st)
            assert y.shape[1] % qf == 0                  # whole query frames
            for f in range(emitted, emitted + y.shape[1] // qf):
                worst = max(worst, s - ((f + 1) * kf - 1))
            emitted += y.shape[1] // qf
    assert emitted > frames // 2
    assert m.latency() == worst, (m.latency(), worst)
