"""The conv adapter's steady-state step (transformers' ``config.add_adapter``: strided zero-padded
Conv1d + GLU layers after the encoder): PaddedConv1d.step_fixed, ConvAdapter.step_fixed and
steady_check, and CausalEncoder.step_fixed with an adapter (tests/test_encoder_step_fixed.py runs
its encoder cases with adapters too).

The encoder holds frames back for lookahead, so the adapter's layers meet a steady stream at any
phase modulo their stride, slots at different phases; the fixed step reads each slot's phase on
the device. Checked (float64): after ragged warm-ups that leave every phase (slots differing),
step_fixed sequences equal the general step (outputs, out_lengths, every state tensor, in place:
same data pointers) and the offline forward; random geometries (k, stride, padding incl. k <
stride and k - stride > padding, where the first frames are not yet steady); no host
synchronisation; ``check=True`` refuses a state before ``steady_from()``; clear errors for steps
that are not whole strides. HF: pyencoder.hf.StreamingEncoder.step_fixed on a patched wav2vec2
with a conv adapter equals its general step and the model's offline output.

Tolerance: float64, the same windows summed in the same order by the same conv op: 1e-12.
"""
import random

import pytest
import torch

from _stream_utils import rel_err
from test_streaming_fixed import NoHostSync, _general_only, fixed_vs_general
from pyencoder.models.adapter import ConvAdapter, PaddedConv1d

F64_TOL = 1e-12


def _geometries():
    # (k, stride, padding): wav2vec2's (3, 2, 1); k == stride; k - stride > padding
    # (steady_from > 0); stride 1; stride 3 with several paddings
    return [(3, 2, 1), (3, 3, 0), (2, 2, 1), (5, 2, 1), (5, 2, 0), (4, 1, 2), (7, 3, 0),
            (7, 3, 6), (6, 3, 2)]


def _warm(module, C, lens_per_slot, rng, dtype=torch.float64):
    """General steps of ragged per-slot lengths; returns the state and each slot's outputs."""
    B = len(lens_per_slot)
    st = module.init_state(B, dtype=dtype)
    outs = [[] for _ in range(B)]
    feeds = [[] for _ in range(B)]
    steps = max(len(v) for v in lens_per_slot)
    for i in range(steps):
        ls = [v[i] if i < len(v) else 0 for v in lens_per_slot]
        n = max(ls)
        x = torch.randn(B, C, n, dtype=dtype)
        y, st = module.step(x, st, torch.tensor(ls))
        for b in range(B):
            feeds[b].append(x[b, :, :ls[b]])
            outs[b].append(y[b, :, :int(st.out_lengths[b])])
    return st, feeds, outs


@pytest.mark.parametrize("geo", _geometries(), ids=str)
def test_padded_conv_step_fixed_any_phase(geo):
    k, s, p = geo
    torch.manual_seed(sum(geo))
    rng = random.Random(sum(geo))
    conv = PaddedConv1d(3, 5, k, s, p).double()
    B = 4
    start = conv.steady_from()
    # slot b ends its warm-up at its own phase (some slots at several phases' worth of frames)
    lens = []
    for b in range(B):
        first = [rng.randint(0, 4) for _ in range(3)]
        last = start + rng.randint(0, s)
        last += (b - sum(first) - last) % s             # slot b's phase: b mod s
        lens.append(first + [last])
    with torch.no_grad():
        st, feeds, outs = _warm(conv, 3, lens, rng)
        assert len({int(v) % s for v in st.seen}) == min(s, B) or s == 1
        xs = [torch.randn(B, 3, n, dtype=torch.float64) for n in (s, 3 * s, 0, 2 * s, s)]
        fixed_vs_general(conv, st, xs, lambda n: (B, 5, n // s), feeds, outs, F64_TOL,
                         time_axis=-1)
        for b in range(B):                   # stream (+ flush) == offline, per slot
            full = torch.cat(feeds[b], -1)[None]
            got = torch.cat(outs[b], -1)
            want = conv(full)[0, :, :got.shape[-1]]
            assert rel_err(got, want) <= F64_TOL, b


def test_padded_conv_step_fixed_refuses_an_unsteady_state():
    conv = PaddedConv1d(2, 2, 5, 2, 0).double()            # steady_from() = 3
    assert conv.steady_from() == 3
    st = conv.init_state(2, dtype=torch.float64)
    _, st = conv.step(torch.randn(2, 2, 2, dtype=torch.float64), st)
    with pytest.raises(ValueError, match=r"steady state.*past 3 frames.*seen=\[2, 2\]"):
        conv.step_fixed(torch.randn(2, 2, 2, dtype=torch.float64), st, check=True)
    _, st = conv.step(torch.randn(2, 2, 1, dtype=torch.float64), st)
    with pytest.raises(ValueError, match="multiple of the stride 2; got 3"):
        conv.step_fixed(torch.randn(2, 2, 3, dtype=torch.float64), st)
    with pytest.raises(ValueError, match="slots"):
        conv.step_fixed(torch.randn(3, 2, 2, dtype=torch.float64), st)
    conv.step_fixed(torch.randn(2, 2, 2, dtype=torch.float64), st, check=True)


@pytest.mark.parametrize("layers,geo", [(3, (3, 2, 1)), (2, (5, 2, 0)), (2, (3, 3, 2))],
                         ids=str)
def test_conv_adapter_step_fixed_and_steady_check(layers, geo):
    k, s, p = geo
    torch.manual_seed(layers + k)
    rng = random.Random(layers * 10 + k)
    ad = ConvAdapter(6, 4, layers, k, s, p).double()
    with torch.no_grad():
        for prm in ad.parameters():
            prm.add_(0.1 * torch.randn_like(prm))
    S, B = ad.stride, 3
    assert S == s ** layers
    # per-slot ragged warm-ups of (B, n, E) frames: every layer at some phase
    st = ad.init_state(B, dtype=torch.float64)
    feeds, outs = [[] for _ in range(B)], [[] for _ in range(B)]
    with torch.no_grad():
        for i in range(6):
            ls = [rng.randint(0, 2 * S) for _ in range(B)]
            h = torch.randn(B, max(ls), 6, dtype=torch.float64)
            y, st = ad.step(h, st, torch.tensor(ls))
            for b in range(B):
                feeds[b].append(h[b, :ls[b]])
                outs[b].append(y[b, :int(st.out_lengths[b])])
        assert ad.steady_check(S + 1, st) is None and ad.steady_check(0, st) is None
        chk = ad.steady_check(2 * S, st)
        assert chk.n_out == 2
        cond = chk.ok()
        need = any(layer.conv.steady_from() for layer in ad.layers)
        assert (cond is None) == (not need) and (cond is None or bool(cond.all()))
        oracle = ad.init_state(B, dtype=torch.float64)
        oracle.load_state_dict(st.state_dict())
        for i, m in enumerate([1, 2, 0, 1]):
            h = torch.randn(B, m * S, 6, dtype=torch.float64)
            with NoHostSync():
                y = ad.step_fixed(h, st)
            y2, oracle = ad.step(h, oracle)
            assert y.shape == (B, m, 4) and st.out_lengths.tolist() == [m] * B
            assert rel_err(y, y2) <= F64_TOL, i
            for b in range(B):
                feeds[b].append(h[b])
                outs[b].append(y[b])
        for key, v in st.tensors().items():
            assert torch.equal(v, oracle.tensors()[key]), key
        for b in range(B):
            got = torch.cat(outs[b], 0)
            want = ad(torch.cat(feeds[b], 0)[None])[0, :got.shape[0]]
            assert rel_err(got, want) <= F64_TOL, b
        with pytest.raises(ValueError, match=rf"multiple of the adapter's stride \({S}\)"):
            ad.step_fixed(torch.randn(B, S + 1, 6, dtype=torch.float64), st)


def test_conv_adapter_steady_check_before_steady_from():
    """k - stride > padding: a fresh layer holds fewer than k - stride frames, the condition is
    False for those slots until their first frames are through."""
    ad = ConvAdapter(4, 4, 2, 5, 2, 0).double()
    st = ad.init_state(2, dtype=torch.float64)
    with torch.no_grad():
        assert ad.steady_check(4, st).ok().tolist() == [False, False]
        _, st = ad.step(torch.randn(2, 12, 4, dtype=torch.float64), st, torch.tensor([12, 3]))
        assert ad.steady_check(4, st).ok().tolist() == [True, False]


# ---- HF ---------------------------------------------------------------------------------------

def test_hf_streaming_encoder_step_fixed_with_conv_adapter():
    pytest.importorskip("transformers")
    import pyencoder.hf as H
    from test_hf_adapters import CONV_ADAPTER, _model

    torch.manual_seed(3)
    model = _model(False, **CONV_ADAPTER).eval()
    H.apply_pyencoder_to_wav2vec2(model, lookahead_frames=2, left_frames=6, pos_conv="causal")
    enc = H.StreamingEncoder(model)
    n = enc.hop
    assert n == 10 * 2 ** CONV_ADAPTER["num_adapter_layers"]
    x = torch.randn(2, n * 14 + 7)
    with torch.no_grad():
        ref = model(x).last_hidden_state
        st = enc.init_state(2, max_chunk=4)
        oracle = None
        outs = []
        y, st = enc.step(x[:, :n + 7], st)       # off the grid of the adapter's stride...
        outs.append(y[:, :int(st.out_lengths[0])])
        with pytest.raises(ValueError):
            enc.step_fixed(x[:, n + 7:2 * n + 7], st, check=True)
        t = n + 7
        y, st = enc.step(x[:, t:t + n - 7], st)  # ...back on it, the adapter at some phase
        outs.append(y[:, :int(st.out_lengths[0])])
        t += n - 7
        for i in range(3):
            y, st = enc.step(x[:, t:t + n], st)
            outs.append(y[:, :int(st.out_lengths[0])])
            t += n
        oracle = enc.init_state(2, max_chunk=4)
        oracle.load_state_dict(st.state_dict())
        for i in range(8):
            outs.append(enc.step_fixed(x[:, t:t + n], st, check=i == 0))
            with _general_only():
                y, oracle = enc.step(x[:, t:t + n], oracle)
            torch.testing.assert_close(outs[-1], y, atol=1e-6, rtol=1e-6)
            t += n
    got = torch.cat(outs, 1)
    assert got.shape[1] >= 8
    torch.testing.assert_close(got, ref[:, :got.shape[1]], atol=1e-5, rtol=1e-5)


def test_conv_adapter_bad_input_names_h():
    """Offline, step and step_fixed name the argument and what was expected (it used to be
    torch's matmul error from the projection, or an 'x' the caller never passed)."""
    ad = ConvAdapter(6, 4, 2, 3, 2, 1)
    st = ad.init_state(2)
    calls = (lambda h: ad(h), lambda h: ad.step(h, st), lambda h: ad.step_fixed(h, st))
    for call in calls:
        with pytest.raises(ValueError, match=r"h must have shape \(B, n, 6\); got \(2, 4, 5\)"):
            call(torch.randn(2, 4, 5))
        with pytest.raises(TypeError, match=r"h must have the module's dtype \(torch.float32\)"):
            call(torch.randn(2, 4, 6, dtype=torch.float64))
        with pytest.raises(TypeError, match="h must be a torch.Tensor"):
            call([0.0])
    for call in calls[1:]:
        with pytest.raises(ValueError, match="h has batch 3 but the state holds 2 slots"):
            call(torch.randn(3, 4, 6))


def test_adapter_check_reads_every_layer_before_the_first_runs():
    """ConvAdapter.step_fixed(check=True): layer 0 took the chunk before layer 1 refused its
    unsteady state (a retry 0.077 off offline, silently); every layer's condition is read
    first now, the state untouched."""
    from pyencoder.models.adapter import ConvAdapter
    torch.manual_seed(20)
    ad = ConvAdapter(8, 8, 2, 5, 2, padding=1).double().eval()
    h = torch.randn(1, 24, 8, dtype=torch.float64)
    with torch.no_grad():
        ref = ad(h)
        y0, st = ad.step(h[:, :4], ad.init_state(1, dtype=torch.float64))
        with pytest.raises(ValueError, match="needs every slot in its steady state"):
            ad.step_fixed(h[:, 4:8], st, check=True)
        assert not st.ended
        y1, st = ad.step(h[:, 4:], st)
        y2, st = ad.flush(st)
    torch.testing.assert_close(torch.cat([y0, y1, y2], 1), ref, rtol=1e-12, atol=1e-12)
