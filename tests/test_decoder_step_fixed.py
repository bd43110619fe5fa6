"""The streaming decoder's steady-state step (FocalCodec-Stream's causal ConvNeXt decoder):
ConvNeXtBlock.step_fixed (composed and fused conv + LayerNorm), Refiner.step_fixed and
StreamingDecoder.step_fixed / steady_check, so a decoder stream runs its general step as the fixed
one once steady (its StreamingSequential's dispatch) and captures in a CUDA graph.

A Refiner holds each slot's frames of its next chunk; a steady stream (steps of whole chunks)
keeps that count whatever it is, slots may differ: the fixed step reads the counts on the device
and gathers each slot's sequence. Checked (float64): after ragged per-slot warm-ups,
step_fixed == the pure general step (outputs, out_lengths, every state tensor, in place, no host
synchronisation) == offline; the decoder's general step dispatches (one host read, then none;
none at all without attention layers);
errors for steps that are not whole chunks; backward through a fixed step raises the
inference-only error. GPU (marked): the decoder's step_fixed captured in a CUDA graph, replays
== offline (fp32).

Tolerance: float64, the same ops on the same rows: 1e-12 (decoder: 1e-10 as tests/test_models.py).
"""
import random

import pytest
import torch

from _stream_utils import rel_err, spy_calls
from test_encoder_step_fixed import _Syncs
from test_models import tiny_decoder_config
from test_streaming_fixed import NoHostSync, _capture, _general_only, fixed_vs_general
from pyencoder.models import StreamingDecoder
from pyencoder.models.decoder import ConvNeXtBlock
from pyencoder.nn import Refiner


def _ragged(module, B, E, rng, steps=4, hi=5, mod=1):
    """General steps of ragged per-slot lengths; slot b ends with a total of b modulo ``mod``
    frames (a Refiner of chunk ``mod`` then holds b % mod frames of its next chunk)."""
    st = module.init_state(B, dtype=torch.float64)
    feeds, outs = [[] for _ in range(B)], [[] for _ in range(B)]
    for i in range(steps):
        ls = [rng.randint(0, hi) for _ in range(B)]
        if i == steps - 1:
            tot = [sum(f.shape[0] for f in feeds[b]) for b in range(B)]
            ls = [ls[b] + (b - tot[b] - ls[b]) % mod for b in range(B)]
        x = torch.randn(B, max(ls), E, dtype=torch.float64)
        y, st = module.step(x, st, torch.tensor(ls))
        for b in range(B):
            feeds[b].append(x[b, :ls[b]])
            outs[b].append(y[b, :int(st.out_lengths[b])])
    return st, feeds, outs


def _fixed_vs_general(module, st, feeds, outs, B, E, ns, tol=1e-12):
    """(B, n, E) chunks of the given lengths: fixed steps == general steps, in place."""
    xs = [torch.randn(B, n, E, dtype=torch.float64) for n in ns]
    fixed_vs_general(module, st, xs, lambda n: (B, n, E), feeds, outs, tol, exact_state=False)


@pytest.mark.parametrize("C", [1, 2, 3])
def test_refiner_step_fixed_any_count(C):
    torch.manual_seed(C)
    rng = random.Random(C)
    ref = Refiner(4, C, hidden_dim=10).double()
    B = 4
    with torch.no_grad():
        st, feeds, outs = _ragged(ref, B, 4, rng, mod=C)
        assert st.count.tolist() == [b % C for b in range(B)]      # slots at different counts
        chk = ref.steady_check(2 * C, st)
        assert chk.n_out == 2 * C and chk.ok() is None
        assert ref.steady_check(C + 1, st) is None or C == 1
        _fixed_vs_general(ref, st, feeds, outs, B, 4, [C, 3 * C, 2 * C])
        y, st = ref.flush(st)
        for b in range(B):            # stream + flush == offline per slot
            got = torch.cat(outs[b] + [y[b, :int(st.out_lengths[b])]], 0)
            want = ref(torch.cat(feeds[b], 0)[None])[0]
            assert got.shape == want.shape and rel_err(got, want) <= 1e-12, b


def test_refiner_step_fixed_errors():
    ref = Refiner(4, 3).double()
    st = ref.init_state(2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"multiple of chunk_size \(3\); got 4"):
        ref.step_fixed(torch.randn(2, 4, 4, dtype=torch.float64), st)
    with pytest.raises(ValueError, match="batch"):
        ref.step_fixed(torch.randn(3, 3, 4, dtype=torch.float64), st)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    y = ref.step_fixed(x, st)
    with pytest.raises(RuntimeError, match="inference"):
        y.sum().backward()


@pytest.mark.parametrize("fused", [False, True])
def test_convnext_block_step_fixed(fused):
    torch.manual_seed(3)
    rng = random.Random(3)
    blk = ConvNeXtBlock(6, 10, kernel_size=5, layer_scale_init=0.5, fused=fused).double()
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(0.1 * torch.randn_like(p))
        B = 3
        st, feeds, outs = _ragged(blk, B, 6, rng)
        assert blk.steady_check(1, st).n_out == 1 and blk.steady_check(0, st) is None
        _fixed_vs_general(blk, st, feeds, outs, B, 6, [1, 4, 2, 7])
        for b in range(B):
            got = torch.cat(outs[b], 0)
            want = blk(torch.cat(feeds[b], 0)[None])[0]
            assert rel_err(got, want) <= 1e-12, b


DEC = {"convnext": dict(), "refiner_attention": dict(num_attention_layers=1, refiner_chunk=3),
       "refiner2_attention2": dict(num_attention_layers=2, refiner_chunk=2,
                                   convnext_fused=True)}


def _decoder(case):
    torch.manual_seed(sum(map(ord, case)))
    m = StreamingDecoder(tiny_decoder_config(**DEC[case])).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("case", sorted(DEC))
def test_decoder_step_fixed_equals_step_and_offline(case, monkeypatch):
    m = _decoder(case)
    K, C = m.samples_per_frame, m.config.refiner_chunk or 1
    n = 2 * C
    B, warm, fixed = 2, [1, 2, 4, 1], 6
    x = torch.randn(B, sum(warm) + n * (fixed + 8), 6, dtype=torch.float64)
    with torch.no_grad():
        st = m.init_state(B, max_chunk=6)
        outs, t = [], 0
        for c in warm:
            y, st = m.step(x[:, t:t + c], st)
            outs.append(y[:, :int(st.out_lengths[0])])
            t += c
        chk = m.steady_check(n, st)
        assert chk is not None and chk.n_out == n * K
        oracle = m.init_state(B, max_chunk=6)
        oracle.load_state_dict(st.state_dict())
        ptrs = {k: v.data_ptr() for k, v in st.tensors().items()}
        for i in range(fixed):
            xi = x[:, t:t + n]
            if i == 1:
                with NoHostSync():
                    y = m.step_fixed(xi, st)
            else:
                y = m.step_fixed(xi, st, check=i == 0)
            assert y.shape == (B, n * K) and st.out_lengths.tolist() == [n * K] * B
            with _general_only():
                y2, oracle = m.step(xi, oracle)
            assert oracle.out_lengths.tolist() == [n * K] * B
            assert rel_err(y, y2) <= 1e-10, i
            outs.append(y)
            t += n
        assert {k: v.data_ptr() for k, v in st.tensors().items()} == ptrs
        a, b = st.tensors(), oracle.tensors()
        for k in a:
            if k.endswith((".attention.q", ".res")):
                continue       # per-query queues: slots past `pending` are unused
            assert rel_err(a[k].double(), b[k].double()) <= 1e-10, k
        # the general step now runs as step_fixed by itself: one host read, then none
        calls = spy_calls(monkeypatch, StreamingDecoder)
        reads = []
        for i in range(3):
            _Syncs.n = 0
            with _Syncs():
                y, st = m.step(x[:, t:t + n], st)
            reads.append(_Syncs.n)
            assert st.out_lengths.tolist() == [n * K] * B
            outs.append(y)
            t += n
        first = 0 if chk.ok() is None else 1        # convs and blocks alone: nothing to read
        assert len(calls) == 3 and reads == [first, 0, 0], reads
        assert first == (m.config.num_attention_layers > 0)
        y, st = m.flush(st)
        outs.append(y[:, :int(st.out_lengths[0])])
        ref = m(x[:, :t])                 # the stream ended (flushed) after t frames
    got = torch.cat(outs, 1)
    assert got.shape == ref.shape == (B, t * K)
    assert rel_err(got, ref) <= 1e-10


def test_decoder_step_fixed_errors():
    m = _decoder("refiner_attention")
    st = m.init_state(2, max_chunk=6)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"x must have shape \(B, n, 6\)"):
            m.step_fixed(torch.randn(2, 3, 5, dtype=torch.float64), st)
        with pytest.raises(ValueError, match="slots"):
            m.step_fixed(torch.randn(3, 3, 6, dtype=torch.float64), st)
        with pytest.raises(ValueError, match=r"multiple of chunk_size \(3\)"):
            m.step_fixed(torch.randn(2, 4, 6, dtype=torch.float64), st)
        assert m.steady_check(4, st) is None


@pytest.mark.gpu
def test_cuda_graph_decoder():
    """Replays of the captured decoder step equal the offline forward (fp32 1e-4)."""
    m = _decoder("refiner2_attention2").float().cuda()
    n, B = 4, 2
    x = torch.randn(B, 3 + n * 12, 6, device="cuda")
    with torch.no_grad():
        ref = m(x)
        st = m.init_state(B, max_chunk=4)
        outs = []
        y, st = m.step(x[:, :3], st)
        outs.append(y[:, :int(st.out_lengths[0])])
        outs.append(m.step_fixed(x[:, 3:3 + n], st, check=True))
        xbuf = x[:, 3 + n:3 + 2 * n].clone()
        g, ybuf = _capture(lambda: m.step_fixed(xbuf, st))      # the warm-up ran this step
        outs.append(ybuf.clone())
        t = 3 + 2 * n
        while t + n <= x.shape[1]:
            xbuf.copy_(x[:, t:t + n])
            g.replay()
            outs.append(ybuf.clone())
            t += n
        torch.cuda.synchronize()
    got = torch.cat(outs, 1)
    assert rel_err(got, ref[:, :got.shape[1]]) <= 1e-4


@pytest.mark.parametrize("case", ["ragged", "not_whole_chunks", "autograd"])
def test_decoder_dispatch_not_taken(monkeypatch, case):
    """The decoder's general step stays general for ragged lengths, steps that are not whole
    Refiner chunks, and where autograd records through a differentiable decoder (ConvNeXt
    blocks only; one holding attention / Refiner steps records nothing and may dispatch:
    test_grad_mode_steps_keep_no_graph)."""
    m = _decoder("convnext" if case == "autograd" else "refiner_attention")
    calls = []
    monkeypatch.setattr(StreamingDecoder, "step_fixed", lambda *a, **k: calls.append(1))
    x = torch.randn(2, 60, 6, dtype=torch.float64)
    with torch.set_grad_enabled(case == "autograd"):
        st = m.init_state(2, max_chunk=6)
        t = 0
        for _ in range(6):
            if case == "ragged":
                m.step(x[:, t:t + 6], st, lengths=torch.tensor([6, 3]))
            elif case == "not_whole_chunks":
                m.step(x[:, t:t + 4], st)
            else:
                m.step(x[:, t:t + 6], st)
            t += 6
    assert calls == []


def test_decoder_admit():
    """pyencoder.streaming.admit: a new stream takes slot 0 of a steady decoder batch in place
    (its warm-up on a private state); its rows then equal its own offline decode, slot 1's are
    unchanged, no state tensor replaced."""
    from pyencoder.streaming import admit
    m = _decoder("refiner_attention")
    n = 6
    x = torch.randn(2, 60, 6, dtype=torch.float64)
    new = torch.randn(1, 60, 6, dtype=torch.float64)
    with torch.no_grad():
        st = m.init_state(2, max_chunk=6)
        outs1, t = [], 0
        for _ in range(4):
            y, st = m.step(x[:, t:t + n], st)
            outs1.append(y[1:, :int(st.out_lengths[1])])
            t += n
        ptrs = {k: v.data_ptr() for k, v in st.tensors().items()}
        rows = admit(m, st, 0, [new[:, :4], new[:, 4:12]], n)
        assert {k: v.data_ptr() for k, v in st.tensors().items()} == ptrs
        tn = 12
        for _ in range(5):
            xi = torch.cat([new[:, tn:tn + n], x[1:, t:t + n]], 0)
            y = m.step_fixed(xi, st)
            rows.append(y[:1])
            outs1.append(y[1:])
            tn, t = tn + n, t + n
        got_new = torch.cat(rows, 1)
        want_new = m(new)[:, :got_new.shape[1]]
        assert rel_err(got_new, want_new) <= 1e-10
        got1 = torch.cat(outs1, 1)
        assert rel_err(got1, m(x[1:])[:, :got1.shape[1]]) <= 1e-10


def test_refiner_index_built_once_per_count():
    """The fixed step's sequence index is built once (a fixed_index entry of the count): a
    second fixed step dispatches no index arithmetic; a reset slot (new count) rebuilds it and
    stays equal to the general step."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from pyencoder.streaming import reset

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))
    torch.manual_seed(2)
    ref = Refiner(4, 2, hidden_dim=6).double()
    with torch.no_grad():
        st = ref.init_state(2, dtype=torch.float64)
        _, st = ref.step(torch.randn(2, 3, 4, dtype=torch.float64), st)
        ref.step_fixed(torch.randn(2, 2, 4, dtype=torch.float64), st)
        ops = Ops()
        with ops:
            ref.step_fixed(torch.randn(2, 2, 4, dtype=torch.float64), st)
        assert "where" in ops.names and ops.names.count("where") == 1, ops.names  # the buffer's
        assert "lt" not in ops.names and "clamp_max_" not in ops.names, ops.names
        reset(st, torch.tensor([True, False]))
        oracle = ref.init_state(2, dtype=torch.float64)
        oracle.load_state_dict(st.state_dict())
        x = torch.randn(2, 4, 4, dtype=torch.float64)
        y = ref.step_fixed(x, st)
        y2, oracle = ref.step(x, oracle)
        assert rel_err(y, y2) <= 1e-12 and torch.equal(st.buf, oracle.buf)


def test_a_refused_fixed_step_leaves_no_silent_damage():
    """A child of the stack refusing step_fixed after the children before it had taken the chunk
    left them advanced: a caller who retried the chunk with step() got a stream 1.6 off offline,
    silently. With check=True the device conditions of every child are read before any runs (the
    state untouched: the retry equals offline); a refusal midway marks the streams inconsistent,
    refused by name until every slot is reset."""
    from pyencoder.models import DecoderConfig, StreamingDecoder
    from pyencoder.streaming import reset
    torch.manual_seed(15)
    x = torch.randn(1, 16, 12, dtype=torch.float64)
    # (b) attention not yet steady, check=True: refused before any child runs
    dec = StreamingDecoder(DecoderConfig(
        input_dim=12, dim=16, intermediate_dim=24, num_blocks=2, samples_per_frame=5,
        num_attention_layers=1, num_heads=2, attention_lookahead=2,
        attention_left=4)).double().eval()
    with torch.no_grad():
        ref = dec(x)
        y0, st = dec.step(x[:, :1], dec.init_state(1))
        with pytest.raises(ValueError, match="needs every slot in its steady state"):
            dec.step_fixed(x[:, 1:3], st, check=True)
        y1, st = dec.step(x[:, 1:], st)
        y2, st = dec.flush(st)
    torch.testing.assert_close(torch.cat([y0, y1, y2], 1), ref, rtol=1e-12, atol=1e-12)
    # (a) the Refiner refuses 4 frames (chunks of 3) after the blocks before it ran
    dec = StreamingDecoder(DecoderConfig(
        input_dim=12, dim=16, intermediate_dim=24, num_blocks=2, samples_per_frame=5,
        refiner_chunk=3)).double().eval()
    with torch.no_grad():
        ref = dec(x)
        _, st = dec.step(x[:, :3], dec.init_state(1))
        with pytest.raises(ValueError, match="multiple of"):
            dec.step_fixed(x[:, 3:7], st)
        with pytest.raises(ValueError, match=r"streams are inconsistent \(StreamingSequential"
                                             r"\.step_fixed failed at child"):
            dec.step(x[:, 3:], st)
        reset(st, torch.tensor([True]))
        y0, st = dec.step(x, st)
        y1, st = dec.flush(st)
    torch.testing.assert_close(torch.cat([y0, y1], 1), ref, rtol=1e-12, atol=1e-12)


def test_refusals_that_change_nothing_leave_the_stream_usable():
    """Only a refusal after a streaming child took the chunk marks the streams inconsistent: a
    chunk of another dtype refused by the first streaming child (behind a per-frame Transpose)
    leaves the stream as it was (it was marked broken); the decoder's own state carries a mark
    of its stack's (a CUDA graph step reads the top state's flag); a broken state refuses
    state_dict and a partial reset by name, and a load clears the mark."""
    from pyencoder.models import DecoderConfig, StreamingDecoder
    from pyencoder.streaming import reset
    torch.manual_seed(18)
    x = torch.randn(1, 12, 12, dtype=torch.float64)
    dec = StreamingDecoder(DecoderConfig(input_dim=12, dim=16, intermediate_dim=24, num_blocks=2,
                                         samples_per_frame=5, refiner_chunk=3)).double().eval()
    with torch.no_grad():
        ref = dec(x)
        y0, st = dec.step(x[:, :3], dec.init_state(1))
        with pytest.raises((TypeError, ValueError)):
            dec.step_fixed(x[:, 3:6].float(), st)
        assert not st.ended and not st.net.ended
        y1, st = dec.step(x[:, 3:], st)
        y2, st = dec.flush(st)
        torch.testing.assert_close(torch.cat([y0, y1, y2], 1), ref, rtol=1e-12, atol=1e-12)
        _, st = dec.step(torch.cat([x[:, :3]] * 2), dec.init_state(2))
        fresh = st.state_dict()
        with pytest.raises(ValueError, match="multiple of"):
            dec.step_fixed(torch.cat([x[:, 3:7]] * 2), st)
        assert st.ended and "failed at child" in st.broken           # the top state too
        with pytest.raises(ValueError, match="state_dict: this state's streams are inconsistent"):
            st.state_dict()
        with pytest.raises(ValueError, match="streams are inconsistent.*reset all of its slots"):
            reset(st, torch.tensor([True, False]))
        st.load_state_dict(fresh)
        assert not st.ended and "broken" not in st.__dict__ and "broken" not in st.net.__dict__
