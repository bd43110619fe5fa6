"""Streaming state: batched slots at different positions, slot reset, checkpoint / resume in a
fresh process, bounded memory over a one-hour stream, unbounded-history cap."""
import os
import sys

import pytest

import _subproc
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from _stream_utils import rel_err
from pyencoder.nn import (BandedSelfAttention, CausalConv1d, ChunkedSelfAttention, Refiner,
                          TransformerLayer, Transpose)
from pyencoder.streaming import StreamingSequential, reset

TOL = 1e-5


def _stack(lookaheads=(2, 0, 1), E=8):
    layers = [CausalConv1d(1, 4, 4, stride=2, activation="gelu"),
              CausalConv1d(4, 4, 3, stride=2, activation="gelu"), Transpose(), nn.Linear(4, E)]
    for i, la in enumerate(lookaheads):
        att = (BandedSelfAttention(E, 2, left=5, right=la) if i % 2 == 0 else
               ChunkedSelfAttention(E, 2, chunk_size=2, left_chunks=2, lookahead=la))
        layers.append(TransformerLayer(att, 16))
    layers.append(Refiner(E, 2, hidden_dim=8))
    return StreamingSequential(*layers).eval()


def _slot_out(y, lengths, b):
    return y[b, :int(lengths[b])]


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 4))
def test_batched_slots_at_different_positions_and_reset(seed, B):
    """Each slot gets its own random chunk lengths (0..n) per step, so slots sit at different
    positions; some slots are reset mid-stream and start a new signal. Every slot's outputs equal
    the offline forward of its own signal (the prefix emitted before a reset included)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = _stack()
    signals = [torch.randn(1, 1, 150) for _ in range(B)]
    done = [[] for _ in range(B)]       # finished (signal, outputs) pairs
    ptr = [0] * B
    outs = [[] for _ in range(B)]
    state = model.init_state(B, max_chunk=int(torch.randint(1, 6, (1,), generator=g)))
    with torch.no_grad():
        for it in range(40):
            n = int(torch.randint(1, 12, (1,), generator=g))
            lengths = torch.tensor([min(int(torch.randint(0, n + 1, (1,), generator=g)),
                                        150 - ptr[b]) for b in range(B)])
            x = torch.zeros(B, 1, n)
            for b in range(B):
                x[b, :, :lengths[b]] = signals[b][0, :, ptr[b]:ptr[b] + lengths[b]]
                ptr[b] += int(lengths[b])
            y, state = model.step(x, state, lengths)
            for b in range(B):
                outs[b].append(_slot_out(y, state.out_lengths, b))
            if it in (15, 27):
                b = it % B
                done[b].append((signals[b][..., :ptr[b]], torch.cat(outs[b], 0)))
                state = reset(state, torch.arange(B) == b)
                signals[b], ptr[b], outs[b] = torch.randn(1, 1, 150), 0, []
        y, state = model.flush(state)
        for b in range(B):
            outs[b].append(_slot_out(y, state.out_lengths, b))
            done[b].append((signals[b][..., :ptr[b]], None, torch.cat(outs[b], 0)))
        for b in range(B):
            for item in done[b]:
                if len(item) == 2:  # reset without flush: a prefix of the offline output
                    sig, got = item
                    ref = model(sig)[0]
                    assert got.shape[0] <= ref.shape[0]
                    assert rel_err(got, ref[:got.shape[0]]) <= TOL
                else:
                    sig, _, got = item
                    ref = model(sig)[0]
                    assert got.shape == ref.shape
                    assert rel_err(got, ref) <= TOL


def test_slot_alone_equals_slot_in_batch():
    """Slot 1 of a batch whose slots sit at different positions gives the same frames as the same
    stream run alone (batch 1)."""
    torch.manual_seed(0)
    model = _stack()
    x = torch.randn(3, 1, 97)
    starts = [7, 3, 0]
    with torch.no_grad():
        sb, s1 = model.init_state(3), model.init_state(1)
        yb, sb = model.step(x[..., :7], sb, torch.tensor(starts))
        y1, s1 = model.step(x[1:2, :, :3], s1)
        got = [yb[1, :int(sb.out_lengths[1])]]
        want = [y1[0, :int(s1.out_lengths[0])]]
        for n in (10, 1, 25):
            xb = torch.stack([x[b, :, starts[b]:starts[b] + n] for b in range(3)], 0)
            starts = [s + n for s in starts]
            yb, sb = model.step(xb, sb)
            y1, s1 = model.step(xb[1:2], s1)
            got.append(yb[1, :int(sb.out_lengths[1])])
            want.append(y1[0, :int(s1.out_lengths[0])])
    got, want = torch.cat(got, 0), torch.cat(want, 0)
    assert got.shape == want.shape and got.shape[0] > 0
    assert rel_err(got, want) <= TOL


def test_state_dict_roundtrip_and_nbytes():
    model = _stack()
    st_ = model.init_state(2)
    with torch.no_grad():
        model.step(torch.randn(2, 1, 33), st_)
    sd = st_.state_dict()
    fresh = model.init_state(2).load_state_dict(sd)
    for k, v in fresh.tensors().items():
        assert torch.equal(v, sd[k])
    with pytest.raises(KeyError, match="missing"):
        model.init_state(2).load_state_dict({k: v for k, v in list(sd.items())[1:]})


_RESUME = r"""
import sys, torch
sys.path.insert(0, {tests!r})
blob = torch.load({path!r}, weights_only=False)
model = blob["model"]
state = model.init_state(2)
state.load_state_dict(blob["state"])
x = blob["x"]
outs, counts = [], []
with torch.no_grad():
    for t in range(blob["t"], x.shape[-1], 9):
        y, state = model.step(x[..., t:t + 9], state)
        outs.append(y); counts.append(state.out_lengths.clone())
    y, state = model.flush(state)
    outs.append(y); counts.append(state.out_lengths.clone())
torch.save({{"outs": outs, "counts": counts}}, {out!r})
"""


def test_checkpoint_resume_in_fresh_process(tmp_path):
    torch.manual_seed(1)
    model = _stack()
    x = torch.randn(2, 1, 180)
    outs, counts = [], []
    with torch.no_grad():
        ref = model(x)
        state = model.init_state(2)
        for t in range(0, 85, 13):
            y, state = model.step(x[..., t:t + 13], state)
            outs.append(y)
            counts.append(state.out_lengths.clone())
    path, out = str(tmp_path / "ckpt.pt"), str(tmp_path / "out.pt")
    torch.save({"model": model, "state": state.state_dict(), "x": x, "t": 91}, path)
    code = _RESUME.format(tests=os.path.dirname(__file__), path=path, out=out)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = _subproc.run([sys.executable, "-c", code], env=env)
    assert r.returncode == 0, r.stderr
    rest = torch.load(out, weights_only=False)
    outs += rest["outs"]
    counts += rest["counts"]
    for b in range(2):
        got = torch.cat([o[b, :int(c[b])] for o, c in zip(outs, counts)], 0)
        assert got.shape == ref[b].shape
        assert rel_err(got, ref[b]) <= TOL


def test_one_hour_stream_memory_is_flat():
    """180k frames (one hour at 20 ms) through a bounded-left attention layer and a conv: the
    state's tensors keep their shapes and total bytes at every step."""
    torch.manual_seed(0)
    model = StreamingSequential(Transpose(), CausalConv1d(4, 4, 3, groups=4), Transpose(),
                                BandedSelfAttention(4, 1, left=8, right=2)).eval()
    state = model.init_state(1, max_chunk=1000)
    shapes = {k: v.shape for k, v in state.tensors().items()}
    nbytes = state.nbytes()
    emitted = 0
    with torch.no_grad():
        for _ in range(90):
            y, state = model.step(torch.randn(1, 2000, 4), state)
            emitted += int(state.out_lengths[0])
            assert state.nbytes() == nbytes
            assert {k: v.shape for k, v in state.tensors().items()} == shapes
        y, state = model.flush(state)
    emitted += int(state.out_lengths[0])
    assert emitted == 180_000


def test_unbounded_left_raises_past_max_context():
    m = BandedSelfAttention(4, 1, left=None, right=1, max_context=50)
    st_ = m.init_state(1)
    with torch.no_grad():
        m.step(torch.randn(1, 50, 4), st_)
        with pytest.raises(RuntimeError, match="max_context=50"):
            m.step(torch.randn(1, 1, 4), st_)


def test_reset_mask_validation():
    m = BandedSelfAttention(4, 1, left=3, right=1)
    s = m.init_state(2)
    with pytest.raises(ValueError, match="mask must be a bool tensor of shape"):
        reset(s, torch.tensor([1, 0]))


def test_step_fixed_equals_step():
    """The graph-friendly steady-state step gives the same frames as step and keeps the state
    tensors in place."""
    torch.manual_seed(3)
    layers = [CausalConv1d(1, 4, 4, stride=2, activation="gelu"), CausalConv1d(4, 4, 2, stride=2),
              Transpose(), nn.Linear(4, 8)]
    layers += [TransformerLayer(BandedSelfAttention(8, 2, left=6, right=r), 16) for r in (2, 0, 1)]
    model = StreamingSequential(*layers).eval()
    x = torch.randn(2, 1, 8 * 30)
    with torch.no_grad():
        ref = model(x)
        s = model.init_state(2, max_chunk=2)
        outs = []
        for t in range(0, 8 * 3, 8):   # warm-up past the lookahead with the general step
            y, s = model.step(x[..., t:t + 8], s)
            outs.append(y[:, :int(s.out_lengths[0])])
        ptrs = {k: v.data_ptr() for k, v in s.tensors().items()}
        for t in range(8 * 3, x.shape[-1], 8):
            outs.append(model.step_fixed(x[..., t:t + 8], s))
        assert {k: v.data_ptr() for k, v in s.tensors().items()} == ptrs
        got = torch.cat(outs, 1)
    assert rel_err(got, ref[:, :got.shape[1]]) <= TOL


def _step_modules():
    from pyencoder.models import FeatureConv1d, PaddedConv1d
    from pyencoder.nn import RunningGroupNorm
    # (module, feature axis, feature size): every step checks its input the same way
    return [(CausalConv1d(3, 4, 4, stride=2), 1, 3), (FeatureConv1d(3, 4, 5, 2), 1, 3),
            (PaddedConv1d(3, 4, 3, 2, 1), 1, 3), (RunningGroupNorm(3), 1, 3),
            (Refiner(6, 2, hidden_dim=8), -1, 6)]


@pytest.mark.parametrize("case", range(5))
def test_step_input_checked_by_name(case):
    """A step's input of the wrong batch or feature size is refused naming x, the expected and
    the given values (streaming.state.check_step_input / check_step_slots)."""
    module, axis, size = _step_modules()[case]
    state = module.init_state(2)
    shape = [2, size, 5] if axis == 1 else [2, 5, size]
    module.step(torch.randn(*shape), state)          # the right input steps
    wrong_batch = list(shape)
    wrong_batch[0] = 3
    with pytest.raises(ValueError, match=r"x has batch 3 but the state holds 2 slots"):
        module.step(torch.randn(*wrong_batch), state)
    if isinstance(module, CausalConv1d):
        return                                        # its shape check is check_module_input's
    wrong_size = list(shape)
    wrong_size[axis] = size + 1
    layout = f"\\(B, {size}, n\\)" if axis == 1 else f"\\(B, n, {size}\\)"
    given = ", ".join(map(str, wrong_size))
    with pytest.raises(ValueError, match=rf"x must have shape {layout}; got \({given}\)"):
        module.step(torch.randn(*wrong_size), state)


def test_feature_conv_validated_like_causal_conv():
    """FeatureConv1d takes CausalConv1d's argument checks (nn.conv.StridedConv1d)."""
    from pyencoder.models import FeatureConv1d
    with pytest.raises(ValueError, match=r"kernel_size \(2\) must be >= stride \(3\)"):
        FeatureConv1d(1, 4, 2, 3)
    with pytest.raises(ValueError, match=r"activation must be None, 'silu' or 'gelu'; got 'relu'"):
        FeatureConv1d(1, 4, 4, 2, activation="relu")
    with pytest.raises(TypeError, match=r"bias must be a bool; got int 1"):
        FeatureConv1d(1, 4, 4, 2, bias=1)
    with pytest.raises(ValueError, match=r"in_channels"):
        FeatureConv1d(0, 4, 4, 2)
