"""pyencoder.models: CausalEncoder and StreamingDecoder.

Streaming == offline for random ragged chunkings (float64, so any difference above 1e-10 is a bug,
not rounding), per-slot lengths, state checkpoint/resume mid-stream, exact decoder emission
schedule, gradients through the attention and conv ops (float64 gradcheck of the whole encoder
and decoder on the reference backend, and every parameter receives a gradient), and from_hf
against the transformers model patched by pyencoder.hf with the same options.
"""
import random

import pytest
import torch

from pyencoder.models import (CausalEncoder, DecoderConfig, EncoderConfig, StreamingDecoder)
from pyencoder.models.frontend import FeatureConv1d

from _stream_utils import check_encoder_ragged_stream, check_encoder_slot_reset

F64_TOL = 1e-10   # streaming and offline run the same float64 ops up to summation order


def tiny_encoder_config(**over):
    kw = dict(conv_dim=(8, 12, 12), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2),
              feat_extract_norm="layer", hidden_size=16, num_layers=2, num_heads=2, ffn_dim=24,
              pos_conv="causal", pos_conv_kernel=6, pos_conv_groups=4, left=6, lookahead=2,
              lookahead_layers="all")
    kw.update(over)
    return EncoderConfig(**kw)


ENC_CASES = {
    "band_postln_valid": dict(),
    "band_preln_group_causalconv": dict(norm_first=True, feat_extract_norm="group",
                                        causal_conv=True, pos_conv=None, left=None),
    "chunked_first_nonorm": dict(attention="chunked", left=None,
                                 chunk_size=3, left_chunks=1, lookahead=1,
                                 lookahead_layers="first", feat_extract_norm=None, rope=4),
    "band_per_layer": dict(lookahead_layers=[3, 0], norm_first=True, conv_bias=True),
}


def _stream(model, x, chunks, time_dim=1, **kw):
    st = model.init_state(x.shape[0], **kw)
    outs, t = [], 0
    T = x.shape[time_dim]
    while t < T:
        n = min(next(chunks), T - t)
        y, st = model.step(x.narrow(time_dim, t, n), st)
        outs.append(y)
        t += n
    y, st = model.flush(st)
    outs.append(y)
    return torch.cat(outs, 1), st


def _rand_chunks(hi, rng=random):
    while True:
        yield rng.randint(1, hi)


@pytest.mark.parametrize("case", sorted(ENC_CASES))
def test_encoder_stream_equals_offline(case):
    m = CausalEncoder(tiny_encoder_config(**ENC_CASES[case])).double().eval()
    wav = torch.randn(2, 733, dtype=torch.float64)
    ref = m(wav).last_hidden_state
    for hi in (1, 37, 400):
        y, _ = _stream(m, wav, _rand_chunks(hi), max_chunk=8)
        assert y.shape == ref.shape
        torch.testing.assert_close(y, ref, rtol=0, atol=F64_TOL)


def test_encoder_frame_lengths_and_padding():
    m = CausalEncoder(tiny_encoder_config()).double().eval()
    wav = torch.randn(2, 500, dtype=torch.float64)
    out = m(wav, lengths=torch.tensor([500, 321]))
    assert out.lengths.tolist() == [m.frame_lengths(500), m.frame_lengths(321)]
    alone = m(wav[1:, :321]).last_hidden_state
    n = int(out.lengths[1])
    torch.testing.assert_close(out.last_hidden_state[1, :n], alone[0], rtol=0, atol=F64_TOL)


def test_encoder_ragged_slots_and_resume():
    m = CausalEncoder(tiny_encoder_config(feat_extract_norm="group")).double().eval()
    check_encoder_ragged_stream(m, [411, 287], 60, F64_TOL)


def test_encoder_latency_counts_lookahead():
    m = CausalEncoder(tiny_encoder_config(lookahead=2, lookahead_layers=[2, 1]))
    lat = m.latency()
    fe = (10 - 5) + (3 - 2) * 5 + 0
    assert lat.hop == 20 and lat.lookahead_samples == fe + 3 * 20
    full = CausalEncoder(tiny_encoder_config(lookahead=None))
    with pytest.raises(ValueError, match="full-context"):
        full.init_state(1)


@pytest.mark.parametrize("k,s,causal", [(10, 5, False), (3, 2, False), (4, 4, False),
                                        (7, 3, True), (2, 2, True)])
def test_feature_conv_matches_torch(k, s, causal):
    conv = FeatureConv1d(3, 5, k, s, bias=True, causal=causal).double()
    x = torch.randn(2, 3, 41, dtype=torch.float64)
    xp = torch.nn.functional.pad(x, (k - s, 0)) if causal else x
    ref = torch.nn.functional.conv1d(xp, conv.weight, conv.bias, stride=s)
    torch.testing.assert_close(conv(x), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(_stream_conv(conv, x), ref, rtol=0, atol=1e-12)


def _stream_conv(conv, x):
    st = conv.init_state(x.shape[0])
    outs, t = [], 0
    while t < x.shape[-1]:
        n = random.randint(1, 7)
        y, st = conv.step(x[..., t:t + n], st)
        outs.append(y)
        t += n
    return torch.cat(outs, -1)


def test_encoder_gradients_through_kernels():
    torch.manual_seed(random.randrange(2**31))
    m = CausalEncoder(tiny_encoder_config(hidden_size=8, ffn_dim=8, conv_dim=(4, 4, 4),
                                          pos_conv_kernel=4)).double()
    wav = torch.randn(1, 130, dtype=torch.float64, requires_grad=True)
    out = m(wav).last_hidden_state
    out.pow(2).sum().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n
    m.zero_grad()
    w = torch.randn(1, 80, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m(x).last_hidden_state, (w,), eps=1e-6, atol=1e-6)


def test_encoder_uses_registered_ops(monkeypatch):
    import pyencoder.ops.attention as A
    import pyencoder.ops.conv as C
    calls = {"att": 0, "conv": 0}
    fa, fc = A._interval_attention_op, C._causal_conv1d_op

    def att(*a, **k):
        calls["att"] += 1
        return fa(*a, **k)

    def conv(*a, **k):
        calls["conv"] += 1
        return fc(*a, **k)
    monkeypatch.setattr(A, "_interval_attention_op", att)
    monkeypatch.setattr(C, "_causal_conv1d_op", conv)
    m = CausalEncoder(tiny_encoder_config())
    m(torch.randn(1, 200)).last_hidden_state.sum().backward()
    assert calls["att"] == 2 and calls["conv"] == 4   # 3 front-end convs + positional conv


def tiny_decoder_config(**over):
    kw = dict(input_dim=6, dim=8, intermediate_dim=12, num_blocks=2, samples_per_frame=5,
              num_heads=2, attention_left=4, attention_lookahead=1)
    kw.update(over)
    return DecoderConfig(**kw)


DEC_CASES = {"convnext": dict(), "attention": dict(num_attention_layers=2),
             "refiner_attention": dict(num_attention_layers=1, refiner_chunk=3)}


@pytest.mark.parametrize("case", sorted(DEC_CASES))
def test_decoder_stream_equals_offline(case):
    m = StreamingDecoder(tiny_decoder_config(**DEC_CASES[case])).double().eval()
    x = torch.randn(2, 29, 6, dtype=torch.float64)
    ref = m(x)
    assert ref.shape == (2, 29 * 5)
    for hi in (1, 4, 40):
        y, _ = _stream(m, x, _rand_chunks(hi), max_chunk=4)
        torch.testing.assert_close(y, ref, rtol=0, atol=F64_TOL)


@pytest.mark.parametrize("case", sorted(DEC_CASES))
def test_decoder_emission_matches_latency(case):
    m = StreamingDecoder(tiny_decoder_config(**DEC_CASES[case])).double()
    R, K = m.lookahead_frames, m.samples_per_frame
    assert m.latency()["samples"] == (R + 1) * K
    # one Latency from the model and from pyencoder.streaming.latency, whose walk of the layers
    # used to count the input frames as 16 kHz samples (5 "samples" for 4 frames of lookahead);
    # the old dict's keys read the same values
    from pyencoder.streaming import Latency, latency
    lat = latency(m, sample_rate=24000)
    assert isinstance(lat, Latency) and lat == m.latency(24000)
    assert (lat.samples, lat.hop, lat.lookahead_samples, lat.lookahead_frames) == \
        ((R + 1) * K, K, R * K, R)
    assert (lat["samples_per_frame"], lat["lookahead_frames"], lat["ms"]) == \
        (K, R, 1000.0 * (R + 1) * K / 24000)
    st = m.init_state(1)
    emitted = 0
    for t in range(1, 15):
        y, st = m.step(torch.randn(1, 1, 6, dtype=torch.float64), st)
        emitted += y.shape[1]
        assert emitted >= max(0, t - R) * K
        if m.config.refiner_chunk is None:
            assert emitted == max(0, t - R) * K


def test_decoder_gradients():
    m = StreamingDecoder(tiny_decoder_config(num_attention_layers=1, refiner_chunk=2)).double()
    x = torch.randn(1, 9, 6, dtype=torch.float64, requires_grad=True)
    m(x).pow(2).sum().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert torch.autograd.gradcheck(lambda z: m(z), (torch.randn(1, 7, 6, dtype=torch.float64,
                                                                 requires_grad=True),),
                                    eps=1e-6, atol=1e-6)


# ---- from_hf -----------------------------------------------------------------------------------

HF_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                 conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2),
                 num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, hidden_dropout=0.0,
                 attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                 final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, mask_feature_prob=0.0,
                 attn_implementation="eager")


def _hf_model(family):
    T = pytest.importorskip("transformers")
    if family == "w2v2_post":
        cfg = T.Wav2Vec2Config(feat_extract_norm="group", do_stable_layer_norm=False, **HF_COMMON)
        model = T.Wav2Vec2Model(cfg)
    elif family == "w2v2_pre":
        cfg = T.Wav2Vec2Config(feat_extract_norm="layer", do_stable_layer_norm=True,
                               conv_bias=True, **HF_COMMON)
        model = T.Wav2Vec2ForCTC(cfg)
    else:
        cfg = T.HubertConfig(feat_extract_norm="layer", do_stable_layer_norm=True, **HF_COMMON)
        model = T.HubertModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


HF_CASES = {
    "w2v2_post_band_causalpos": ("w2v2_post", dict(lookahead=2, lookahead_layers="first",
                                                   left=7, pos_conv="causal")),
    "w2v2_pre_chunked_drop": ("w2v2_pre", dict(lookahead=1, lookahead_layers="all",
                                               chunk_size=4, left_chunks=2, pos_conv="drop")),
    "hubert_band_list": ("hubert", dict(lookahead=0, lookahead_layers=[2, 1], left=None,
                                        pos_conv="causal")),
}


@pytest.mark.filterwarnings("ignore:lookahead_layers='all'")
@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_from_hf_matches_patched_model(case):
    pytest.importorskip("transformers")
    import pyencoder.hf as H
    family, opts = HF_CASES[case]
    hf = _hf_model(family).double()
    enc = CausalEncoder.from_hf(hf, **opts)
    assert next(enc.parameters()).dtype == torch.float64
    H.apply_pyencoder_to_wav2vec2(hf, lookahead_frames=opts["lookahead"],
                                  lookahead_layers=opts["lookahead_layers"],
                                  left_frames=opts.get("left"), rope=True,
                                  pos_conv=opts["pos_conv"], group_norm="running",
                                  chunk_size=opts.get("chunk_size"),
                                  left_chunks=opts.get("left_chunks"))
    wav = torch.randn(2, 800, dtype=torch.float64)
    mask = torch.ones(2, 800, dtype=torch.long)
    mask[1, 613:] = 0
    with torch.no_grad():
        base = getattr(hf, "wav2vec2", hf)   # the base model inside a ForCTC head
        ref = base(wav, attention_mask=mask, output_hidden_states=True)
        out = enc(wav, lengths=mask.sum(1), output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states)
    n1 = int(out.lengths[1])
    for a, b in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-9)
        torch.testing.assert_close(a[1, :n1], b[1, :n1], rtol=0, atol=1e-9)
    # streaming the converted encoder reproduces the patched model too
    y, _ = _stream(enc, wav[:1], _rand_chunks(200), max_chunk=16)
    torch.testing.assert_close(y[0], ref.last_hidden_state[0], rtol=0, atol=1e-9)
    torch.testing.assert_close(out.last_hidden_state[0], ref.last_hidden_state[0], rtol=0, atol=1e-9)


def test_from_hf_converts_wavlm():
    # equivalence with the patched WavLM model is tested in tests/test_models_wavlm.py
    T = pytest.importorskip("transformers")
    cfg = T.WavLMConfig(num_buckets=8, max_bucket_distance=16, **HF_COMMON)
    enc = CausalEncoder.from_hf(T.WavLMModel(cfg))
    assert enc.config.rel_pos_bias and enc.config.num_buckets == 8


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16,
                                                               marks=pytest.mark.gpu_quick)])
def test_encoder_decoder_cuda_matches_reference(dtype):
    # GPU kernels (auto backend) vs the reference backend in float32: bf16 tolerance follows the
    # bf16 rounding of ~20 chained ops at unit scale.
    import pyencoder
    tol = dict(float32=2e-4, bfloat16=6e-2)[str(dtype).split(".")[1]]
    m = CausalEncoder(tiny_encoder_config(hidden_size=64, num_heads=2, ffn_dim=128,
                                          pos_conv_groups=4)).cuda()
    wav = torch.randn(2, 4000, device="cuda")
    with pyencoder.use_backend("reference"):
        ref = m(wav).last_hidden_state
    out = m.to(dtype)(wav.to(dtype)).last_hidden_state.float()
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    # the stream before the backward, and its chunk sizes from a fixed generator: the CPU build
    # of the Triton cache (benchmarks.triton_cache, which runs no kernel) then reaches and
    # captures the stream's launch specialisations (the pieces' lengths) instead of stopping at
    # the gradients' isfinite assert on unwritten values, so the device compiles nothing here
    y, _ = _stream(m, wav.to(dtype), _rand_chunks(900, random.Random(20261129)), max_chunk=32)
    torch.testing.assert_close(y.float(), out.detach(), rtol=tol, atol=tol)
    out.sum().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_encoder_reset_slot_starts_fresh_stream():
    m = CausalEncoder(tiny_encoder_config(feat_extract_norm="group")).double().eval()
    a, b, c = (torch.randn(n, dtype=torch.float64) for n in (300, 250, 270))
    check_encoder_slot_reset(m, a, b, c, 250, F64_TOL)


def test_from_hf_keeps_first_layers():
    hf = _hf_model("w2v2_post").double()
    import pyencoder.hf as H
    enc = CausalEncoder.from_hf(hf, lookahead=2, num_layers=1, pos_conv="causal")
    assert len(enc.layers) == 1
    H.apply_pyencoder_to_wav2vec2(hf, lookahead_frames=2, pos_conv="causal")
    wav = torch.randn(1, 500, dtype=torch.float64)
    with torch.no_grad():
        ref = hf(wav, output_hidden_states=True).hidden_states
        out = enc(wav, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out[1], ref[1], rtol=0, atol=1e-9)
    # an int in [1, layers]: 2.7 built 2 layers and True 1
    for bad, exc in ((2.7, TypeError), (True, TypeError), (0, ValueError), (99, ValueError)):
        with pytest.raises(exc, match="num_layers must"):
            CausalEncoder.from_hf(hf, lookahead=2, num_layers=bad)


def test_models_keep_their_own_config():
    """CausalEncoder / StreamingDecoder kept the caller's config object and read it at run time:
    editing it to build a second model (a post-LN -> pre-LN sweep; the teacher as the student's
    config with lookahead=None) changed the first model's output / made it unstreamable."""
    torch.manual_seed(0)
    cfg = tiny_encoder_config(lookahead=2)
    a = CausalEncoder(cfg).double().eval()
    wav = torch.randn(1, 1600, dtype=torch.float64)
    with torch.no_grad():
        y0 = a(wav).last_hidden_state
        cfg.norm_first = not cfg.norm_first
        cfg.lookahead = None
        CausalEncoder(cfg)
        assert torch.equal(a(wav).last_hidden_state, y0)
        a.init_state(1)                          # still streamable (lookahead 2, not None)
    assert a.config is not cfg and a.config.lookahead == 2
    dcfg = tiny_decoder_config()
    d = StreamingDecoder(dcfg)
    assert d.config is not dcfg and d.config == dcfg
