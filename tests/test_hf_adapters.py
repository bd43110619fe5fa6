"""wav2vec2 adapters under pyencoder.hf (tiny random configs, no downloads).

- Conv adapter after the encoder (config.add_adapter: proj + LayerNorm, strided Conv1d + GLU
  layers padded on both sides): a patched model at full context equals the unpatched one (fp32,
  1e-5); a banded patched model streams (random chunk sizes, flush) to exactly its offline output;
  latency() (output hop = frontend hop x adapter stride, lookahead incl. the adapter's right
  context) is checked empirically: perturbing the audio at sample c changes no output frame whose
  claimed dependency ends before c, and does change the frame whose dependency ends exactly at c.
- Attention adapters (config.adapter_attn_dim, MMS): full-context parity, stream == offline, and
  after an MMS ``load_adapter`` from a local folder both follow the new weights.
"""
import copy
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pyencoder.hf as H  # noqa: E402

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2),
              num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, hidden_dropout=0.0,
              attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
              final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, mask_feature_prob=0.0,
              attn_implementation="eager", vocab_size=12)
FULL = dict(lookahead_frames=10_000, lookahead_layers="all", left_frames=None, rope=False,
            pos_conv="keep", group_norm="keep")
BAND = dict(lookahead_frames=2, left_frames=6, pos_conv="causal", group_norm="running")
SAMPLES = 1000     # 99 encoder frames


def _model(stable=False, head=False, wavlm=False, **over):
    import transformers as T
    norm = dict(feat_extract_norm="layer", do_stable_layer_norm=True) if stable else \
        dict(feat_extract_norm="group", do_stable_layer_norm=False)
    if wavlm:
        cfg = T.WavLMConfig(num_buckets=32, max_bucket_distance=64, **norm, **dict(COMMON, **over))
        model = T.WavLMModel(cfg)
    else:
        cfg = T.Wav2Vec2Config(**norm, **dict(COMMON, **over))
        model = (T.Wav2Vec2ForCTC if head else T.Wav2Vec2Model)(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


CONV_ADAPTER = dict(add_adapter=True, output_hidden_size=24, num_adapter_layers=2,
                    adapter_stride=2, adapter_kernel_size=3)


def _out(model, x, mask=None):
    out = model(x, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _stream(model, x, sizes=(1, 7, 23, 150, 400)):
    # ragged chunks: small ones make steps that emit no encoder or no adapter frame. ``model``: a
    # patched transformers model (streamed by H.StreamingEncoder) or a streaming encoder
    enc = model if hasattr(model, "init_state") else H.StreamingEncoder(model)
    state = enc.init_state(x.shape[0])
    outs, t = [], 0
    while t < x.shape[1]:
        n = random.choice(sizes)
        y, state = enc.step(x[:, t:t + n], state)
        outs.append(y)
        t += n
    y, state = enc.flush(state)
    outs.append(y)
    return torch.cat(outs, 1)


@pytest.mark.filterwarnings("ignore:lookahead_layers='all'")
@pytest.mark.parametrize("stable,head,adapter", [
    (False, False, CONV_ADAPTER), (True, True, dict(CONV_ADAPTER, output_hidden_size=32)),
    (True, True, dict(adapter_attn_dim=8))])
def test_adapters_full_context_match_unpatched(stable, head, adapter):
    ref = _model(stable, head, **adapter)
    pat = copy.deepcopy(ref)
    H.apply_pyencoder_to_wav2vec2(pat, **FULL)
    x = torch.randn(2, SAMPLES)
    mask = torch.ones(2, SAMPLES, dtype=torch.long)
    mask[1, 640:] = 0
    for m in (None, mask):
        torch.testing.assert_close(_out(pat, x, m), _out(ref, x, m), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stable,wavlm,adapter", [
    (False, False, CONV_ADAPTER), (True, False, dict(CONV_ADAPTER, num_adapter_layers=1)),
    (True, False, dict(adapter_attn_dim=8)), (False, True, CONV_ADAPTER)])
def test_adapters_stream_equals_offline(stable, wavlm, adapter):
    model = _model(stable, wavlm=wavlm, **adapter)
    H.apply_pyencoder_to_wav2vec2(model, **BAND)
    x = torch.randn(2, SAMPLES + random.randint(0, 400))
    with torch.no_grad():
        torch.testing.assert_close(_stream(model, x), _out(model, x), atol=1e-5, rtol=1e-5)


def test_conv_adapter_state_dict_round_trip_and_reset():
    model = _model(**CONV_ADAPTER)
    H.apply_pyencoder_to_wav2vec2(model, **BAND)
    enc = H.StreamingEncoder(model)
    x = torch.randn(1, SAMPLES)
    with torch.no_grad():
        want = _out(model, x)
        state = enc.init_state(1)
        y1, state = enc.step(x[:, :517], state)
        saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.state_dict().items()}
        fresh = enc.init_state(1)
        fresh.load_state_dict(saved)
        y2, fresh = enc.step(x[:, 517:], fresh)
        y3, fresh = enc.flush(fresh)
        torch.testing.assert_close(torch.cat((y1, y2, y3), 1), want, atol=1e-5, rtol=1e-5)
        fresh.reset(torch.ones(1, dtype=torch.bool))          # full restart == fresh stream
        ya, fresh = enc.step(x, fresh)
        yb, fresh = enc.flush(fresh)
        torch.testing.assert_close(torch.cat((ya, yb), 1), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layers,kernel", [(2, 3), (1, 5)])
def test_conv_adapter_latency_is_exact(layers, kernel):
    model = _model(**dict(CONV_ADAPTER, num_adapter_layers=layers, adapter_kernel_size=kernel))
    H.apply_pyencoder_to_wav2vec2(model, **BAND)
    lat = H.latency(model)
    frontend_hop = 10
    assert lat.adapter_stride == 2 ** layers
    assert lat.hop == frontend_hop * 2 ** layers
    attn = lat.lookahead_frames - lat.adapter_lookahead_frames
    assert attn == BAND["lookahead_frames"]
    assert lat.attention_ms == attn * frontend_hop * 1000.0 / lat.sample_rate
    hop, look = lat.hop, lat.lookahead_samples
    x = torch.randn(1, SAMPLES)
    with torch.no_grad():
        base = _out(model, x)
        n_out = base.shape[1]
        for u in random.sample(range(n_out - 6), 3):
            last = (u + 1) * hop - 1 + look              # last sample output u may depend on
            x2 = x.clone()
            x2[:, last + 1:] += torch.randn_like(x2[:, last + 1:])
            y2 = _out(model, x2)
            torch.testing.assert_close(y2[:, :u + 1], base[:, :u + 1], atol=1e-6, rtol=1e-6)
            x3 = x.clone()
            x3[:, last] += 10.0
            y3 = _out(model, x3)
            assert (y3[:, u] - base[:, u]).abs().max() > 1e-4, "latency is tight"
    enc = H.StreamingEncoder(model)
    assert enc.hop == hop and enc.lookahead == look


def test_mms_load_adapter_offline_and_stream(tmp_path):
    from safetensors.torch import save_file
    model = _model(stable=True, head=True, adapter_attn_dim=8)
    model.config._name_or_path = str(tmp_path)
    weights = {k: (v.detach() + 0.2 * torch.randn_like(v)).contiguous()
               for k, v in model._get_adapters().items()}
    save_file(weights, str(tmp_path / "adapter.xyz.safetensors"))
    H.apply_pyencoder_to_wav2vec2(model, **BAND)
    x = torch.randn(1, SAMPLES)
    with torch.no_grad():
        before = _out(model, x)
        model.load_adapter("xyz")
        after = _out(model, x)
        assert (after - before).abs().max() > 1e-3
        ref = _model(stable=True, head=True, adapter_attn_dim=8)
        ref.load_state_dict(model.state_dict())
        H.apply_pyencoder_to_wav2vec2(ref, **BAND)
        torch.testing.assert_close(after, _out(ref, x), atol=1e-6, rtol=1e-6)
        hidden = _stream(model.wav2vec2, x)
        torch.testing.assert_close(hidden, model.wav2vec2(x).last_hidden_state, atol=1e-5,
                                   rtol=1e-5)


def test_config_add_adapter_without_an_adapter_module():
    """HubertModel ignores config.add_adapter (HuBERT has no conv adapter): such a model (a
    HubertConfig built from a wav2vec2 config dict) runs in transformers, and was refused by the
    patch, which decided from the config and blamed the transformers version. The model's
    ``adapter`` module decides now, as its forward does: no adapter in latency or the stream."""
    import transformers as T
    cfg = T.HubertConfig(**dict(COMMON, **CONV_ADAPTER))
    model = T.HubertModel(cfg).eval()
    assert getattr(model, "adapter", None) is None
    x = torch.randn(2, SAMPLES)
    H.apply_pyencoder_to_wav2vec2(model, **BAND)
    lat = H.latency(model)
    assert lat.adapter_stride is None and lat.hop == 10 and not lat.adapter_lookahead_frames
    with torch.no_grad():
        want = _out(model, x)
        got = _stream(model, x)
    assert want.shape[-1] == COMMON["hidden_size"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_distill_hidden_state_lengths_before_the_conv_adapter():
    """distill.hidden_states reports each clip's frames of the hidden states, which come before
    the conv adapter: transformers' length helper adds the adapter's strides by default (99
    frames were reported as 25)."""
    import transformers as T

    from pyencoder.distill import hidden_states
    x = torch.randn(2, SAMPLES)
    lengths = torch.tensor([SAMPLES, 600])
    for model in (_model(**CONV_ADAPTER), T.HubertModel(T.HubertConfig(**COMMON)).eval()):
        with torch.no_grad():
            hs, frames = hidden_states(model, x, lengths=lengths)
        assert frames.tolist() == [hs[-1].shape[1], 59], type(model).__name__
