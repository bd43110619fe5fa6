"""Attention dropout of patched transformers models in training mode (config.attention_dropout > 0).

Eager attention computes softmax(scores), then ``F.dropout(P, p, training)`` on the dense
(B, H, N, N) tensor, then ``@ v``. The patched path (pyencoder.ops.interval_attention_dropout) draws
the keep-mask tile by tile with the same ``bernoulli_(1 - p)`` call on a (B, H, tq, tk) tile.

Can the patched model reproduce eager's dropout exactly from the same RNG state? Only when both
draw the same tensor in the same order: on CPU, when one query tile covers the whole (B, H, N, N)
score matrix (full context, N <= 256 frames, no padding so the key range is all N keys), the tile
draw IS eager's draw, and the outputs agree to fp32 rounding (test_same_rng_state_equals_eager).
In general it is not achievable without materialising an N x N random tensor (which the O(N * W)
contract forbids): several tiles draw in another order, padding shrinks the key range of the draw,
and on CUDA F.dropout is the fused native_dropout kernel with its own Philox layout. There we test
(1) the same function given the same mask: the masks our path drew are replayed into eager's
F.dropout (test_padded_same_mask_equals_eager), and (2) equality in distribution: means of many
independent draws (batch replicated) agree within a two-sample z bound (test_distribution).
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pyencoder.hf as H  # noqa: E402
import pyencoder.hf.attention as HA  # noqa: E402
from test_hf import FULL, SAMPLES, _fwd_bwd, _out, audio, make_model, padding_mask  # noqa: E402

P = 0.1
EAGER_FAMILIES = ("w2v2_post", "w2v2_pre", "hubert")


@pytest.mark.filterwarnings("ignore:lookahead_layers='all'")
@pytest.mark.parametrize("family", EAGER_FAMILIES + ("wavlm",))
def test_train_forward_backward(family):
    model = make_model(family, attention_dropout=P)
    H.apply_pyencoder_to_wav2vec2(model, lookahead_frames=2, left_frames=6)
    model.train()
    x = audio(2, SAMPLES)
    mask = padding_mask(2, SAMPLES, [SAMPLES, 530])
    y1 = _out(model, x, mask)
    y1.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 10 and all(torch.isfinite(g).all() for g in grads)
    y2 = _out(model, x, mask)
    assert torch.isfinite(y1).all() and not torch.allclose(y1, y2)  # dropout is active
    model.eval()
    with torch.no_grad():
        assert torch.equal(_out(model, x, mask), _out(model, x, mask))


@pytest.mark.filterwarnings("ignore:lookahead_layers='all'")
@pytest.mark.parametrize("family", EAGER_FAMILIES)
def test_same_rng_state_equals_eager(family):
    """One tile per layer (79 frames <= 256, full context, no padding): the keep-mask draw is
    eager's draw, so with the same RNG state the outputs and gradients agree to fp32 rounding
    (summation orders differ: ~1e-6)."""
    ref, x, y0, state = _same_rng_as_eager(make_model(family, attention_dropout=P).train())
    with torch.no_grad():
        torch.set_rng_state(state)
        other = _out(ref.eval(), x)
    assert not torch.allclose(y0, other, atol=1e-3)  # dropout did change eager's output


def _same_rng_as_eager(ref):
    """Eager ``ref`` and its full-context patch, forward + backward from one RNG state: outputs
    and gradients to fp32 rounding. Returns (ref, x, eager output, the RNG state)."""
    pat = copy.deepcopy(ref)
    H.apply_pyencoder_to_wav2vec2(pat, **FULL)
    x = audio(2, SAMPLES)
    w = torch.randn(2, 79, 32)
    state = torch.get_rng_state()
    y0, _, g0 = _fwd_bwd(ref, x, None, w)
    torch.set_rng_state(state)
    y1, _, g1 = _fwd_bwd(pat, x, None, w)
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
    assert len(g0) > 10 and g0.keys() == g1.keys()
    for n in g0:
        scale = max(1.0, g0[n].abs().max().item())
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5 * scale, rtol=1e-5, msg=n)
    return ref, x, y0, state


@pytest.mark.filterwarnings("ignore:lookahead_layers='all'")
@pytest.mark.parametrize("family", EAGER_FAMILIES + ("wavlm",))
def test_hidden_dropout_same_rng_state_equals_eager(family):
    """The layers' hidden / activation dropout (attention dropout off) draws on the attention's
    output: with the same RNG state a full-context patch equals eager at batch 2. WavLM's
    patched attention returned a (B, N, E)-contiguous output where eager's is a view of a
    time-major one; the dropout drew its mask in memory order and dropped other elements
    (1.9e-2 off at batch 2, equal at batch 1)."""
    _same_rng_as_eager(make_model(family, hidden_dropout=P, activation_dropout=P).train())


def _record_keeps(monkeypatch):
    keeps = []
    real = HA.interval_attention_dropout

    def recording(*args, **kwargs):
        out, tiles = real(*args, **kwargs, return_keep=True)
        keeps.append(tiles)
        return out

    monkeypatch.setattr(HA, "interval_attention_dropout", recording)
    return keeps


def _replay_into_eager(monkeypatch, keeps):
    real = torch.nn.functional.dropout
    queue = list(keeps)

    def replay(input, p=0.5, training=True, inplace=False):
        if not (training and p > 0 and input.dim() == 4):
            return real(input, p, training, inplace)
        B, Hh, N, M = input.shape
        keep = torch.zeros(B, Hh, N, M, dtype=torch.bool)
        for i0, i1, j0, j1, k in queue.pop(0):
            keep[:, :, i0:i1, j0:j1] = k
        return input * keep.to(input.dtype) / (1 - p)

    monkeypatch.setattr(torch.nn.functional, "dropout", replay)
    return queue


@pytest.mark.filterwarnings("ignore:lookahead_layers='all'")
@pytest.mark.parametrize("family", EAGER_FAMILIES)
def test_padded_same_mask_equals_eager(family, monkeypatch):
    """Padding: the patched path draws only over the valid key range, so its RNG consumption
    differs from eager's. Replaying the masks it drew into eager's F.dropout (keys outside every
    tile are padding, probability 0 either way) gives the same outputs and gradients: the dropout
    sits where eager's does (after softmax, before v), with the same scaling."""
    ref = make_model(family, attention_dropout=0.3).train()
    pat = copy.deepcopy(ref)
    H.apply_pyencoder_to_wav2vec2(pat, **FULL)
    x = audio(2, SAMPLES)
    mask = padding_mask(2, SAMPLES, [530, 410])
    w = torch.randn(2, 79, 32)
    keeps = _record_keeps(monkeypatch)
    y1, _, g1 = _fwd_bwd(pat, x, mask, w)
    assert len(keeps) == 2 and all(keeps)
    queue = _replay_into_eager(monkeypatch, keeps)
    y0, _, g0 = _fwd_bwd(ref, x, mask, w)
    assert not queue
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
    for n in g0:
        scale = max(1.0, g0[n].abs().max().item())
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5 * scale, rtol=1e-5, msg=n)


@pytest.mark.filterwarnings("ignore:lookahead_layers='all'")
@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("family", ["w2v2_post", "wavlm"])
def test_distribution(family):
    """Equality in distribution where the draws differ (padding; WavLM's eager attention drops
    inside F.multi_head_attention_forward / SDPA). K copies of a padded pair along the batch are
    K independent draws on each side. Means: per element z = (m1 - m0) / sqrt((s1^2 + s0^2) / K)
    is approximately N(0, 1) (CLT, K = 200); we require |z| < 6 for all ~5000 elements (false
    alarm ~1e-5) and the sample variance of z within 1 +- 0.25 (its std is ~0.02; the margin
    covers the correlation between elements). Spread: per element s1^2 / s0^2 ~ F(199, 199)
    (log-std ~0.14); its median over the elements must be within 1 +- 0.1. Power: the same
    spread check against eager with dropout 0.15 instead of 0.3 fails by far (the ratio is ~2)."""
    K = 200
    ref = make_model(family, attention_dropout=0.3).train()
    pat = copy.deepcopy(ref)
    H.apply_pyencoder_to_wav2vec2(pat, **FULL)
    x = audio(2, SAMPLES).repeat(K, 1)
    mask = padding_mask(2, SAMPLES, [SAMPLES, 530]).repeat(K, 1)
    with torch.no_grad():
        y0 = _out(ref, x, mask).view(K, 2, 79, 32).double()
        y1 = _out(pat, x, mask).view(K, 2, 79, 32).double()
        for layer in ref.encoder.layers:
            layer.attention.dropout = 0.15
        y0_other = _out(ref, x, mask).view(K, 2, 79, 32).double()
    z = (y1.mean(0) - y0.mean(0)) / torch.sqrt((y1.var(0) + y0.var(0)) / K)
    assert z.abs().max() < 6
    assert abs(z.var().item() - 1) < 0.25
    assert abs((y1.var(0) / y0.var(0)).median().item() - 1) < 0.1
    assert (y1.var(0) / y0_other.var(0)).median().item() > 1.5


def test_eval_and_zero_dropout_use_the_op(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the plain-torch dropout path ran")

    monkeypatch.setattr(HA, "interval_attention_dropout", refuse)
    model = make_model("w2v2_post", attention_dropout=P)
    H.apply_pyencoder_to_wav2vec2(model, lookahead_frames=1)
    _out(model.eval(), audio(1, SAMPLES))
    for layer in model.encoder.layers:
        layer.attention.dropout = 0.0
    _out(model.train(), audio(1, SAMPLES))
    layer.attention.dropout = P
    with pytest.raises(AssertionError, match="plain-torch"):
        _out(model, audio(1, SAMPLES))
