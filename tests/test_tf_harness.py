"""The harness that runs transformers' own model tests under pyencoder (tests/external/transformers).

- Its full-context patch settings reproduce the unpatched model (fp32 1e-5, with padding, forward
  and input gradient) in all three families: the harness's passes mean "pyencoder computes
  transformers' function", not "pyencoder changed nothing".
- The __init__ wrapper patches a head model exactly once (outermost __init__ only) and the patched
  model runs pyencoder's attention; registry mode picks "pyencoder" only when no implementation
  was asked for.
- run.py skips loudly (exit 0, SKIPPED banner) without the fetched files; expected.py's matching.
"""
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "external", "transformers")
sys.path.insert(0, HARNESS)
import expected  # noqa: E402
import pyencoder_tf_plugin as plugin  # noqa: E402

import pyencoder.hf as H  # noqa: E402
from pyencoder.hf.patch import base_model  # noqa: E402

SMALL = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=20,
             conv_dim=(32, 32, 32), conv_stride=(4, 4, 4), conv_kernel=(8, 8, 8), conv_bias=False,
             num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, hidden_dropout=0.0,
             attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
             layerdrop=0.0, mask_time_prob=0.0, vocab_size=32)


def _config(family, stable):
    norm = dict(feat_extract_norm="layer", do_stable_layer_norm=True) if stable else {}
    cls = {"wav2vec2": transformers.Wav2Vec2Config, "hubert": transformers.HubertConfig,
           "wavlm": transformers.WavLMConfig}[family]
    return cls(**SMALL, **norm)


def _head(family):
    return {"wav2vec2": transformers.Wav2Vec2ForCTC, "hubert": transformers.HubertForCTC,
            "wavlm": transformers.WavLMForCTC}[family]


@pytest.mark.parametrize("stable", [False, True])
@pytest.mark.parametrize("family", ["wav2vec2", "hubert", "wavlm"])
def test_full_context_patch_reproduces_model(family, stable):
    torch.manual_seed(0)
    ref = _head(family)(_config(family, stable)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pat = plugin.full_context_patch(_head(family)(_config(family, stable)).eval())
    pat.load_state_dict(ref.state_dict())
    x = torch.randn(3, 1037)
    mask = torch.ones(3, 1037, dtype=torch.long)
    mask[1, 700:] = 0
    mask[2, 401:] = 0
    outs = []
    for m in (ref, pat):
        xi = x.clone().requires_grad_(True)
        y = m(xi, attention_mask=mask).logits
        valid = m._get_feature_vector_attention_mask(y.shape[1], mask).bool()
        (y[valid] ** 2).sum().backward()
        outs.append((y[valid], xi.grad))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-4, atol=1e-6)
    assert H.patch_record(pat) is not None and H.patch_record(ref) is None


def test_init_wrapper_patches_outermost_once(monkeypatch):
    monkeypatch.setattr(plugin, "MODE", "patch")
    cls = transformers.HubertForSequenceClassification
    inner = transformers.HubertModel
    saved = {c: c.__init__ for c in (cls, inner)}
    try:
        for c in (cls, inner):
            plugin._wrap_init(c)
        model = cls(_config("hubert", False))
        base, _ = base_model(model)
        assert getattr(base, "_pyencoder_patch", None) is not None
        assert base.encoder.layers[0].attention._pyencoder_attn.mask.hi_off >= plugin.FULL_LOOKAHEAD
        plain = inner(_config("hubert", False))
        assert getattr(plain, "_pyencoder_patch", None) is not None
    finally:
        for c, init in saved.items():
            c.__init__ = init


@pytest.mark.parametrize("asked, got", [(None, "pyencoder"), ("eager", "eager")])
def test_registry_mode_only_fills_the_default(monkeypatch, asked, got):
    monkeypatch.setattr(plugin, "MODE", "registry")
    cls = transformers.Wav2Vec2Model
    saved = cls.__init__
    try:
        plugin._wrap_init(cls)
        cfg = _config("wav2vec2", False)
        if asked:
            cfg._attn_implementation = asked
        assert cls(cfg).config._attn_implementation == got
    finally:
        cls.__init__ = saved


def test_run_skips_loudly_without_cache(tmp_path):
    env = dict(os.environ, PYENCODER_TF_CACHE=str(tmp_path / "absent"))
    r = subprocess.run([sys.executable, os.path.join(HARNESS, "run.py")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "SKIPPED" in r.stdout and "fetch.py" in r.stdout


def test_expected_matching():
    nid = "tests/models/hubert/test_modeling_hubert.py::HubertRobustModelTest::test_attention_outputs"
    assert "refused by design" in expected.expected_for("patch", nid)
    assert expected.expected_for("registry", nid) is None
    assert expected.expected_for("none", nid.replace("test_attention_outputs", "test_config"))
    wavlm = "tests/models/wavlm/test_modeling_wavlm.py::WavLMModelTest::"
    assert expected.expected_for("patch", wavlm + "test_retain_grad_hidden_states_attentions") is None
    assert expected.expected_for("patch", wavlm + "test_model") is None


def test_run_counts_per_family(tmp_path):
    import run

    pre = ".cache.transformers-tests.tests.models"
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite>'
        f'<testcase classname="{pre}.hubert.test_modeling_hubert.HubertModelTest" name="a"/>'
        f'<testcase classname="{pre}.hubert.test_modeling_hubert.HubertModelTest" name="b">'
        '<failure message="boom"/></testcase>'
        f'<testcase classname="{pre}.wavlm.test_modeling_wavlm.WavLMModelTest" name="c">'
        '<skipped type="pytest.xfail" message="refused by design: x"/></testcase>'
        f'<testcase classname="{pre}.wavlm.test_modeling_wavlm.WavLMModelTest" name="d">'
        '<skipped type="pytest.xfail" message="harness: y"/></testcase>'
        f'<testcase classname="{pre}.wav2vec2.test_modeling_wav2vec2.Wav2Vec2ModelTest" name="e">'
        '<skipped type="pytest.skip" message="slow"/></testcase>'
        '</testsuite></testsuites>')
    c = run.count(xml)
    assert c["hubert"] == dict(passed=1, failed=1, refused=0, harness=0, skipped=0)
    assert c["wavlm"] == dict(passed=0, failed=0, refused=1, harness=1, skipped=0)
    assert c["wav2vec2"] == dict(passed=0, failed=0, refused=0, harness=0, skipped=1)
