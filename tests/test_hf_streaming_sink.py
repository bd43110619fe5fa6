"""Attention sinks in the transformers integration: ``apply_pyencoder_to_wav2vec2(...,
sink_frames=S)`` (Wav2Vec2 / HuBERT / WavLM) and pyencoder.hf.StreamingEncoder over it. Streaming equals
the patched model's offline forward for random chunkings (fp32 1e-5, as tests/test_hf_streaming);
uniform steps run the layers' step_fixed (spied) once every sink frame has arrived; the encoder's
layer stack steps with ``step_fixed`` without host synchronisation and (GPU, marked) replays from
a CUDA graph equal to the eager step; the option is recorded in config.pyencoder (absent when 0,
so earlier entries are unchanged) and re-applied; WavLM takes it too (its relative bias with the
saturated bucket rule), and a WavLM patched with sink_frames=0 is unchanged.
"""
import random

import pytest
import torch

pytest.importorskip("transformers")

import pyencoder.hf as H  # noqa: E402
from pyencoder.nn import BandedSelfAttention, ChunkedSelfAttention  # noqa: E402
from test_hf import audio, make_model  # noqa: E402
from test_streaming_fixed import NoHostSync, _capture, _count_fixed  # noqa: E402

SETTINGS = {
    "band": dict(lookahead_frames=2, left_frames=4, pos_conv="causal", sink_frames=3),
    "chunk": dict(chunk_size=2, left_chunks=1, lookahead_frames=1, lookahead_layers="first",
                  pos_conv="drop", sink_frames=5),
}
# unbounded history (left_frames's default): no fixed step; WavLM's plain-torch ring path left
# the sink keys ahead of the first frames' bands out (0.24 off offline at frame 0)
UNBOUNDED = {"band_unbounded": dict(lookahead_frames=0, pos_conv="causal", sink_frames=4)}
HOP = 10          # samples per frame of make_model's conv front end (strides 5, 2)


def _patched(family, setting):
    model = make_model(family).eval()
    H.apply_pyencoder_to_wav2vec2(model, **{**SETTINGS, **UNBOUNDED}[setting])
    return model


@pytest.mark.parametrize("family", ["w2v2_post", "hubert", "wavlm"])
@pytest.mark.parametrize("setting", list(SETTINGS) + list(UNBOUNDED))
def test_stream_with_sinks_equals_offline(family, setting):
    model = _patched(family, setting)
    S = {**SETTINGS, **UNBOUNDED}[setting]["sink_frames"]
    enc = H.StreamingEncoder(model)
    assert all(a.mask.sink == S for a in enc.attn)
    x = audio(2, 1234)
    rng = random.Random(torch.randint(0, 2 ** 31, ()).item())
    with torch.no_grad():
        ref = model(x).last_hidden_state
        st = enc.init_state(2)
        outs, t = [], 0
        while t < x.shape[1]:
            c = rng.choice([1, 2, 9, 37, 160, 401])
            y, st = enc.step(x[:, t:t + c], st)
            outs.append(y)
            t += c
        outs.append(enc.flush(st)[0])
    got = torch.cat(outs, 1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    unsunk = make_model(family).eval()
    unsunk.load_state_dict(model.state_dict())
    H.apply_pyencoder_to_wav2vec2(unsunk, **dict({**SETTINGS, **UNBOUNDED}[setting],
                                                 sink_frames=0))
    with torch.no_grad():
        assert (unsunk(x).last_hidden_state - ref).abs().max() > 1e-4   # the sinks matter


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_uniform_steps_run_step_fixed_with_sinks(setting, monkeypatch):
    model = _patched("w2v2_post", setting)
    enc = H.StreamingEncoder(model)
    cls = type(enc.attn[0])
    assert cls in (BandedSelfAttention, ChunkedSelfAttention)
    block = enc.attn[0].block
    x = audio(2, 1500)
    with torch.no_grad():
        ref = model(x).last_hidden_state
        calls = _count_fixed(monkeypatch, cls)
        st = enc.init_state(2)
        outs, t = [], 0
        step = HOP * 2 * block
        y, st = enc.step(x[:, :step + 3], st)      # the first frame comes after a partial hop
        outs.append(y)
        t = step + 3
        while t < x.shape[1]:
            y, st = enc.step(x[:, t:t + step], st)
            outs.append(y)
            t += step
        outs.append(enc.flush(st)[0])
    assert len(calls) >= 10, len(calls)
    torch.testing.assert_close(torch.cat(outs, 1), ref, atol=1e-5, rtol=1e-5)


def test_encoder_layers_step_fixed_with_sinks_no_host_sync():
    model = _patched("hubert", "band")
    enc = H.StreamingEncoder(model)
    layers = enc.encoder.layers
    E = model.config.hidden_size
    h = torch.randn(2, 30, E)
    with torch.no_grad():
        ref = layers(h)
        st = layers.init_state(2, max_chunk=2)
        ys = []
        y, st = layers.step(h[:, :12], st)
        ys.append(y[:, :int(st.out_lengths[0])])
        for lay, ls in zip(layers, st.layers):
            lay.attention.check_step_fixed(ls.attention, 1)
        t = 12
        with NoHostSync():
            for _ in range(3):
                ys.append(layers.step_fixed(h[:, t:t + 1], st))
                t += 1
        while t < 30:
            ys.append(layers.step_fixed(h[:, t:t + 1], st))
            t += 1
        got = torch.cat(ys, 1)
    torch.testing.assert_close(got, ref[:, :got.shape[1]], atol=1e-5, rtol=1e-5)


def test_sink_frames_option_recorded_checked_and_refused_for_wavlm():
    model = _patched("w2v2_pre", "band")
    assert model.config.pyencoder["sink_frames"] == 3
    plain = make_model("w2v2_pre").eval()
    H.apply_pyencoder_to_wav2vec2(plain, lookahead_frames=2, left_frames=4)
    assert "sink_frames" not in plain.config.pyencoder
    other = make_model("w2v2_pre").eval()
    other.config.pyencoder = dict(model.config.pyencoder)
    H.reapply_pyencoder(other)
    assert [s.mask for s in other._pyencoder_patch.specs] == \
        [s.mask for s in model._pyencoder_patch.specs]
    assert all(s.mask.sink == 3 for s in other._pyencoder_patch.specs)
    with pytest.raises(ValueError, match="sink_frames must be >= 0; got -1"):
        H.apply_pyencoder_to_wav2vec2(make_model("hubert"), sink_frames=-1)
    with pytest.raises(TypeError, match="sink_frames must be an int"):
        H.apply_pyencoder_to_wav2vec2(make_model("hubert"), sink_frames=1.5)
    # WavLM takes sink_frames too (issue 15; it used to refuse them by name)
    wl = H.apply_pyencoder_to_wav2vec2(make_model("wavlm"), sink_frames=2)
    assert wl.config.pyencoder["sink_frames"] == 2
    assert all(s.mask.sink == 2 for s in wl._pyencoder_patch.specs)


@pytest.mark.gpu
def test_cuda_graph_streaming_encoder_layers_with_sinks():
    """StreamingEncoder's layer stack with sink keys captured as ``layers.step_fixed`` and
    replayed equals the eager stack step (fp32, 1e-5)."""
    torch.manual_seed(14)
    model = _patched("w2v2_post", "band").cuda()
    enc = H.StreamingEncoder(model)
    layers = enc.encoder.layers
    E, B, n, dev = model.config.hidden_size, 2, 1, "cuda"
    with torch.no_grad():
        st = layers.init_state(B, max_chunk=2, device=dev)
        _, st = layers.step(torch.randn(B, 10, E, device=dev), st)
        layers.step_fixed(torch.randn(B, n, E, device=dev), st, check=True)
        eager = layers.init_state(B, max_chunk=2, device=dev).load_state_dict(st.state_dict())
        xbuf = torch.randn(B, n, E, device=dev)
        g, ybuf = _capture(lambda: layers.step_fixed(xbuf, st))
        layers.step_fixed(xbuf.clone(), eager)
        for _ in range(5):
            xbuf.copy_(torch.randn(B, n, E, device=dev))
            g.replay()
            ye = layers.step_fixed(xbuf.clone(), eager)
            torch.cuda.synchronize()
            assert (ybuf - ye).abs().max() <= 1e-5 * max(ye.abs().max().item(), 1e-6)


@pytest.mark.parametrize("family", ["w2v2_post", "hubert", "wavlm"])
def test_training_with_sinks_and_attention_dropout_is_refused_in_the_patchs_words(family):
    """No kernel drops the sink keys' probabilities: the ops refused it naming their own
    arguments (mask.sink, dropout_p, fused); the patched forward names the model's dropout and
    what to do. Without dropout it trains; in eval mode dropout is off."""
    model = _patched(family, "band").train()
    for m in model.modules():
        if hasattr(m, "_pyencoder_attn"):
            m.dropout = 0.1
    with pytest.raises(NotImplementedError, match=r"pyencoder\.hf: a model patched with "
                                                  r"sink_frames \(3\) trains without attention "
                                                  r"dropout \(got 0\.1 in training mode"):
        model(audio(1, 300))
    model.eval()(audio(1, 300))
    for m in model.modules():
        if hasattr(m, "_pyencoder_attn"):
            m.dropout = 0.0
    model.train()(audio(1, 300)).last_hidden_state.sum().backward()
