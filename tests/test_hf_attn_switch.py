"""transformers' attention switching around pyencoder.hf (tiny random configs, no downloads).

- WavLM with ``attn_implementation="pyencoder"`` (no patch) runs pyencoder's WavLM attention
  (a spy counts the calls into it) and matches transformers' eager WavLM at full context, forward
  and gradients, with padding, for the post- and pre-LayerNorm encoders and a CTC head.
- ``set_attn_implementation`` on a patched model is refused with a message naming
  revert_pyencoder (config and outputs unchanged), while transformers' own checks keep their
  meaning: an unknown name raises transformers' ValueError, an unpatched model switches exactly as
  transformers' ``test_can_set_attention_dynamically`` and
  ``test_sdpa_can_dispatch_non_composite_models`` expect, also after a patch was reverted.

fp32 tolerance 1e-5: both sides compute the same function in fp32 (blocked vs dense softmax).
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pyencoder.hf as H  # noqa: E402
import pyencoder.hf.wavlm as hf_wavlm  # noqa: E402

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2),
              num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, hidden_dropout=0.0,
              attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
              final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, mask_feature_prob=0.0)
SAMPLES = 800


def _config(family, impl, stable=False, **over):
    import transformers as T
    kw = dict(COMMON, attn_implementation=impl, **over)
    norm = dict(feat_extract_norm="layer", do_stable_layer_norm=True) if stable else \
        dict(feat_extract_norm="group", do_stable_layer_norm=False)
    if family == "wavlm":
        return T.WavLMConfig(num_buckets=32, max_bucket_distance=64, **norm, **kw)
    if family == "hubert":
        return T.HubertConfig(**norm, **kw)
    return T.Wav2Vec2Config(**norm, **kw)


def _classes(family):
    import transformers as T
    return {"wavlm": (T.WavLMModel, T.WavLMForCTC), "hubert": (T.HubertModel, T.HubertForCTC),
            "w2v2": (T.Wav2Vec2Model, T.Wav2Vec2ForCTC)}[family]


def _model(family, impl, head=False, stable=False):
    cfg = _config(family, impl, stable, vocab_size=12)
    model = _classes(family)[1 if head else 0](cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _out(model, x, mask=None):
    out = model(x, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture
def wavlm_spy(monkeypatch):
    calls = []
    core = hf_wavlm._core_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return core(*args, **kwargs)
    monkeypatch.setattr(hf_wavlm, "_core_attention", spy)
    return calls


# ----------------------------------------------------------------------------------------------
# item: WavLM through the registry

@pytest.mark.parametrize("stable,head", [(False, False), (True, False), (False, True)])
def test_wavlm_registry_runs_pyencoder_and_matches_eager(wavlm_spy, stable, head):
    ours = _model("wavlm", "pyencoder", head=head, stable=stable)
    assert ours.config._attn_implementation == "pyencoder"
    eager = _classes("wavlm")[1 if head else 0](_config("wavlm", "eager", stable, vocab_size=12))
    eager.load_state_dict(ours.state_dict())
    eager.eval()
    x = torch.randn(2, SAMPLES)
    mask = torch.ones(2, SAMPLES, dtype=torch.long)
    mask[1, 530:] = 0
    xo, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo = _out(ours, xo, mask)
    assert len(wavlm_spy) == COMMON["num_hidden_layers"], "every layer runs pyencoder's attention"
    wavlm_spy.clear()
    ye = _out(eager, xe, mask)
    assert not wavlm_spy, "an eager model never calls pyencoder"
    torch.testing.assert_close(yo, ye, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ye)
    (yo * g).sum().backward()
    (ye * g).sum().backward()
    torch.testing.assert_close(xo.grad, xe.grad, atol=1e-5, rtol=1e-5)
    for (n, po), (_, pe) in zip(ours.named_parameters(), eager.named_parameters()):
        if pe.grad is not None:
            scale = max(1.0, pe.grad.abs().max().item())
            torch.testing.assert_close(po.grad, pe.grad, atol=1e-5 * scale, rtol=1e-5, msg=n)


def test_wavlm_registry_then_patch_uses_the_patch(wavlm_spy):
    # a registry model can still be patched (banded attention); reverting returns to the
    # registry's full attention
    model = _model("wavlm", "pyencoder")
    x = torch.randn(1, SAMPLES)
    full = _out(model, x)
    H.apply_pyencoder_to_wav2vec2(model, lookahead_frames=1, left_frames=4, rope=False,
                                  pos_conv="keep", group_norm="keep")
    banded = _out(model, x)
    assert wavlm_spy and (banded - full).abs().max() > 1e-3
    H.revert_pyencoder(model)
    assert torch.equal(_out(model, x), full)


# ----------------------------------------------------------------------------------------------
# item: set_attn_implementation on patched / unpatched models

@pytest.mark.parametrize("family", ["w2v2", "hubert"])
def test_unpatched_switching_is_transformers_own(family):
    # intent of transformers' test_can_set_attention_dynamically, with pyencoder.hf imported
    model = _model(family, "eager", head=True)
    assert model._can_set_attn_implementation()
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match='Specified `attn_implementation="foo"` is not supported'):
        model.set_attn_implementation("foo")
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("pyencoder")
    assert model.config._attn_implementation == "pyencoder"


@pytest.mark.parametrize("family", ["w2v2", "hubert"])
def test_unpatched_from_pretrained_dispatch(family, tmp_path):
    # intent of transformers' test_sdpa_can_dispatch_non_composite_models
    model = _model(family, "eager")
    model.save_pretrained(tmp_path)
    cls = type(model)
    assert cls.from_pretrained(tmp_path).config._attn_implementation == "sdpa"
    assert cls.from_pretrained(tmp_path, attn_implementation="eager").config._attn_implementation \
        == "eager"
    assert cls.from_pretrained(tmp_path, attn_implementation="pyencoder") \
        .config._attn_implementation == "pyencoder"


@pytest.mark.parametrize("family,head", [("w2v2", True), ("hubert", False), ("wavlm", True)])
def test_patched_switching_is_refused(family, head):
    model = _model(family, "eager", head=head)
    H.apply_pyencoder_to_wav2vec2(model, lookahead_frames=2, left_frames=8)
    x = torch.randn(1, SAMPLES)
    before = _out(model, x)
    impl = model.config._attn_implementation
    targets = [model] + ([model.base_model] if head else [])
    for target in targets:
        for name in ("sdpa", "eager", "flash_attention_2", {"": "sdpa"}):
            if name == impl:
                continue
            with pytest.raises(ValueError, match="revert_pyencoder"):
                target.set_attn_implementation(name)
            assert model.config._attn_implementation == impl
        if family != "wavlm":        # WavLM cannot switch at all: transformers only warns
            with pytest.raises(ValueError, match='Specified `attn_implementation="foo"`'):
                target.set_attn_implementation("foo")
    model.set_attn_implementation(impl)               # no change: allowed
    assert torch.equal(_out(model, x), before)
    if family != "wavlm":
        model.set_attn_implementation("pyencoder")   # already pyencoder: a no-op
        # the config setter bypasses set_attn_implementation: the forward refuses instead
        model.config._attn_implementation = "sdpa"
        with pytest.raises(RuntimeError, match="revert_pyencoder"):
            _out(model, x)
        model.config._attn_implementation = "pyencoder"
    # a deep copy of a patched model is patched and guarded too
    twin = copy.deepcopy(model)
    with pytest.raises(ValueError, match="revert_pyencoder"):
        twin.set_attn_implementation("sdpa" if impl != "sdpa" else "eager")
    # after revert, switching is transformers' own again
    H.revert_pyencoder(model)
    if family != "wavlm":
        model.set_attn_implementation("sdpa")
        assert model.config._attn_implementation == "sdpa"
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"


def test_registry_refuses_a_score_bias_it_would_drop():
    """attn_implementation="pyencoder" on a model whose attention adds transformers'
    `position_bias` (T5, Conformer / Wav2Vec2-BERT relative positions) dropped the bias silently
    (T5: 0.21 off eager); refused by name now."""
    import transformers as T
    import pyencoder.hf  # noqa: F401  (registers "pyencoder")
    torch.manual_seed(79)
    cfg = T.T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                     dropout_rate=0.0, attn_implementation="pyencoder")
    m = T.T5EncoderModel(cfg).eval()
    with torch.no_grad(), pytest.raises(NotImplementedError, match=r"T5Attention passes "
                                                                   r"position_bias="):
        m(input_ids=torch.randint(0, 50, (1, 7)))
