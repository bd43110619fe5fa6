"""pyencoder.hf under misuse: zero/negative chunk sizes, pickling a patched model, a
StreamingEncoder whose model was reverted or re-patched, and save_pretrained -> from_pretrained of
a patched model (config.pyencoder records the patch; one call re-applies it)."""
import io
import pickle
import warnings

import pytest
import torch

pytest.importorskip("transformers")

import pyencoder  # noqa: E402
import pyencoder.hf as H  # noqa: E402
from pyencoder.hf import attention as hf_attention  # noqa: E402
from test_hf import audio, make_model  # noqa: E402


def _fold_weight_norm(model):
    """torch's weight_norm parametrization (HF's positional conv) cannot be pickled whole, patched
    or not; fold it so that the model itself is picklable."""
    from torch.nn.utils import parametrize
    conv = H.patch.base_model(model)[0].encoder.pos_conv_embed.conv
    if parametrize.is_parametrized(conv):
        parametrize.remove_parametrizations(conv, "weight")
    for key, hook in list(conv._load_state_dict_pre_hooks.items()):
        if "weight_norm" in getattr(getattr(hook, "hook", hook), "__qualname__", ""):
            del conv._load_state_dict_pre_hooks[key]
    return model


@pytest.mark.parametrize("sizes", [(0,), (3200, 0), (-5,), (2.0,), (True,), (), 5, "12"])
def test_streaming_encoder_forward_rejects_bad_chunk_sizes(sizes):
    model = make_model("w2v2_post").eval()
    H.apply_pyencoder_to_wav2vec2(model, lookahead_frames=1, left_frames=4, pos_conv="causal")
    enc = H.StreamingEncoder(model)
    with pytest.raises((ValueError, TypeError), match=r"chunk_sizes"):
        enc(audio(1, 700), chunk_sizes=sizes)


@pytest.mark.parametrize("audio_in", [[0.1, 0.2], torch.randn(700), torch.randn(1, 1, 700)])
def test_streaming_encoder_forward_rejects_bad_audio(audio_in):
    model = make_model("w2v2_post").eval()
    H.apply_pyencoder_to_wav2vec2(model, lookahead_frames=1, left_frames=4)
    with pytest.raises(ValueError, match=r"audio must be a \(batch, samples\) tensor"):
        H.StreamingEncoder(model)(audio_in)


@pytest.mark.parametrize("family", ["w2v2_post", "w2v2_pre", "wavlm"])
def test_patched_model_pickles_and_torch_saves(family):
    model = _fold_weight_norm(make_model(family, head="ctc")).eval()
    H.apply_pyencoder_to_wav2vec2(model, lookahead_frames=2, left_frames=3, pos_conv="causal")
    x = audio(2, 900)
    with torch.no_grad():
        ref = model(x).logits
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = [pickle.loads(pickle.dumps(model)), torch.load(buf, weights_only=False)]
    for m in loaded:
        assert H.patch_record(m) is not None
        with torch.no_grad():
            torch.testing.assert_close(m(x).logits, ref, rtol=0, atol=0)
        H.revert_pyencoder(m)
        assert H.patch_record(m) is None
        assert "forward" not in H.patch.base_model(m)[0].encoder.pos_conv_embed.__dict__
    unpatched = _fold_weight_norm(make_model(family, head="ctc")).eval()
    unpatched.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded[1](x).logits, unpatched(x).logits, rtol=0, atol=0)


def test_streaming_encoder_refuses_reverted_or_repatched_model():
    model = make_model("w2v2_post").eval()
    H.apply_pyencoder_to_wav2vec2(model, lookahead_frames=1, left_frames=4, pos_conv="causal")
    enc = H.StreamingEncoder(model)
    state = enc.init_state(1)
    y, state = enc.step(audio(1, 700), state)
    H.revert_pyencoder(model)
    for call in (lambda: enc.step(audio(1, 400), state), lambda: enc.flush(state),
                 lambda: enc.init_state(1), lambda: enc(audio(1, 400))):
        with pytest.raises(RuntimeError, match="reverted"):
            call()
    H.apply_pyencoder_to_wav2vec2(model, lookahead_frames=3, left_frames=2, pos_conv="drop")
    with pytest.raises(RuntimeError, match="re-patched"):
        enc.step(audio(1, 400), state)
    fresh = H.StreamingEncoder(model)
    fresh.flush(fresh.step(audio(1, 700), fresh.init_state(1))[1])


@pytest.mark.parametrize("family, rope", [("w2v2_post", True), ("hubert", 4),
                                          ("wavlm", "object")])
def test_save_pretrained_records_patch_and_from_pretrained_reapplies(tmp_path, family, rope):
    import transformers as T
    cls = {"w2v2_post": T.Wav2Vec2Model, "hubert": T.HubertModel, "wavlm": T.WavLMModel}[family]
    rope = pyencoder.Rope(4, base=500.0, interleaved=True) if rope == "object" else rope
    model = make_model(family).eval()
    opts = dict(lookahead_frames=2, left_frames=5, lookahead_layers=[2, 1], rope=rope,
                pos_conv="causal")
    H.apply_pyencoder_to_wav2vec2(model, **opts)
    x = audio(1, 1000)
    with torch.no_grad():
        ref = model(x).last_hidden_state
    model.save_pretrained(tmp_path)
    plain = cls.from_pretrained(tmp_path).eval()
    assert H.patch_record(plain) is None
    assert plain.config.pyencoder["lookahead_layers"] == [2, 1]
    loaded = H.from_pretrained(cls, tmp_path).eval()
    rec = H.patch_record(loaded)
    assert rec is not None and rec.specs == H.patch_record(model).specs
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).last_hidden_state, ref, rtol=1e-6, atol=1e-6)
    H.reapply_pyencoder(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x).last_hidden_state, ref, rtol=1e-6, atol=1e-6)
    H.revert_pyencoder(model)
    assert not hasattr(model.config, "pyencoder")
    with pytest.raises(ValueError, match="pyencoder"):
        H.reapply_pyencoder(model)
    # a model patched from its recorded entry (loaded, re-applied) reverts to an unpatched model
    # that saves and loads unpatched (its entry used to come back with the revert)
    for m in (loaded, plain):
        H.revert_pyencoder(m)
        assert not hasattr(m.config, "pyencoder") and H.patch_record(m) is None
    loaded.save_pretrained(tmp_path / "reverted")
    again = H.from_pretrained(cls, tmp_path / "reverted").eval()
    assert H.patch_record(again) is None and not hasattr(again.config, "pyencoder")
    with torch.no_grad():
        torch.testing.assert_close(again(x).last_hidden_state, loaded(x).last_hidden_state,
                                   rtol=0, atol=0)


def test_unpatched_model_with_recorded_patch_warns_once(tmp_path):
    import transformers as T
    model = make_model("w2v2_post").eval()
    H.apply_pyencoder_to_wav2vec2(model, lookahead_frames=1, left_frames=4)
    model.save_pretrained(tmp_path)
    plain = T.Wav2Vec2Model.from_pretrained(tmp_path, attn_implementation="pyencoder").eval()
    hf_attention._warned_unpatched[0] = False
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with torch.no_grad():
            plain(audio(1, 600))
            plain(audio(1, 600))
    msgs = [str(m.message) for m in w if "reapply_pyencoder" in str(m.message)]
    assert len(msgs) == 1


def test_corrupt_config_entry_is_refused():
    model = make_model("w2v2_post").eval()
    model.config.pyencoder = {"format": 1, "lookahead_frame": 3}
    with pytest.raises(ValueError, match="unknown options"):
        H.reapply_pyencoder(model)
    model.config.pyencoder = [1, 2]
    with pytest.raises(ValueError, match="config.pyencoder"):
        H.reapply_pyencoder(model)


@pytest.mark.parametrize("family", ["w2v2_post", "w2v2_pre"])
def test_output_attentions_warns_on_patched_model(family):
    # The interval kernels never form attention probabilities: the weights are None (as with
    # transformers' sdpa), and a warning naming the argument and the way back says so (before:
    # silently).
    model = make_model(family).eval()
    x = audio(1, 700)
    with torch.no_grad():
        ref = model(x, output_attentions=True)
    assert ref.attentions is not None and ref.attentions[0] is not None   # unpatched: eager works
    H.apply_pyencoder_to_wav2vec2(model, lookahead_frames=1, left_frames=4)
    with pytest.warns(UserWarning, match=r"output_attentions=True.*revert_pyencoder"):
        with torch.no_grad():
            out = model(x, output_attentions=True)
    assert all(a is None for a in (out.attentions or (None,)))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="pyencoder attention: output_attentions")
        with torch.no_grad():
            assert model(x).last_hidden_state.shape == ref.last_hidden_state.shape


@pytest.mark.parametrize("family", ["w2v2_post", "wavlm"])
@pytest.mark.parametrize("head", [None, "ctc"])
def test_patch_leaves_a_model_sharing_the_config_alone(tmp_path, family, head):
    """transformers does not copy a config: a student built as ``cls(teacher.config)`` shares
    the teacher's object. Patching the student wrote its attention switch and config.pyencoder
    entry onto the never-patched teacher (output_attentions came back empty, and the teacher
    saved as patched: pyencoder.hf.from_pretrained loaded it causal, 1.8 off). The patched model
    takes a copy of the config now (head, base and layers alike); revert keeps the copy."""
    teacher = make_model(family, head).eval()
    cfg = teacher.config
    student = type(teacher)(cfg).eval()
    assert student.config is cfg
    x = audio(1, 1000)
    with torch.no_grad():
        ref = teacher(x, output_attentions=True)
    H.apply_pyencoder_to_wav2vec2(student, lookahead_frames=1, left_frames=3, pos_conv="causal")
    base = H.patch.base_model(student)[0]
    assert student.config is not cfg and base.config is student.config
    assert all(m.config is student.config for m in student.modules() if "config" in m.__dict__)
    assert not hasattr(cfg, "pyencoder") and cfg._attn_implementation != "pyencoder"
    with torch.no_grad():
        out = teacher(x, output_attentions=True)
        torch.testing.assert_close(out.logits if head else out.last_hidden_state,
                                   ref.logits if head else ref.last_hidden_state, rtol=0, atol=0)
        assert len(out.attentions) == len(ref.attentions) == cfg.num_hidden_layers
        y = student(x)
    teacher.save_pretrained(tmp_path)
    again = H.from_pretrained(type(teacher), tmp_path).eval()
    assert H.patch_record(again) is None and not hasattr(again.config, "pyencoder")
    student.save_pretrained(tmp_path / "student")
    loaded = H.from_pretrained(type(teacher), tmp_path / "student").eval()
    with torch.no_grad():
        torch.testing.assert_close((loaded(x).logits if head else loaded(x).last_hidden_state),
                                   y.logits if head else y.last_hidden_state, rtol=1e-6, atol=1e-6)
    H.revert_pyencoder(student)
    assert student.config is not cfg and not hasattr(student.config, "pyencoder")
    assert student.config._attn_implementation == cfg._attn_implementation


def test_patching_a_heads_base_keeps_the_heads_config(tmp_path):
    """Patching ``ctc.wav2vec2`` writes the config the head shares (the head saves as patched
    and reloads patched); with a teacher sharing that config too, the student's head and base
    take one copy together and the teacher keeps the original."""
    x = audio(1, 1000)
    ctc = make_model("w2v2_post", "ctc").eval()
    cfg = ctc.config
    H.apply_pyencoder_to_wav2vec2(ctc.wav2vec2, lookahead_frames=1, left_frames=3,
                                  pos_conv="causal")
    # the head and its base take one copy; the caller's config object is never written
    assert ctc.config is ctc.wav2vec2.config is not cfg
    assert hasattr(ctc.config, "pyencoder") and not hasattr(cfg, "pyencoder")
    later = type(ctc)(cfg)                    # a model built from that config afterwards
    assert later.config._attn_implementation != "pyencoder"
    with torch.no_grad():
        y = ctc(x).logits
    ctc.save_pretrained(tmp_path)
    again = H.from_pretrained(type(ctc), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, y, rtol=1e-6, atol=1e-6)
    teacher = make_model("w2v2_post", "ctc").eval()
    student = type(teacher)(teacher.config).eval()
    H.apply_pyencoder_to_wav2vec2(student.wav2vec2, lookahead_frames=1, left_frames=3,
                                  pos_conv="causal")
    assert student.config is student.wav2vec2.config is not teacher.config
    assert hasattr(student.config, "pyencoder") and not hasattr(teacher.config, "pyencoder")
    assert all(m.config is teacher.config for m in teacher.modules() if "config" in m.__dict__)


def test_a_refused_patch_leaves_the_model_and_names_an_odd_head_dim():
    """apply_pyencoder_to_wav2vec2 swapped in its own config copy before checking its arguments:
    a student built from the teacher's config (Wav2Vec2Model(teacher.config)) no longer shared it
    after a refused patch. rope=True with an odd head_dim said 'Rope: dim must be a positive even
    int; got 9' without naming the head or what to pass."""
    from transformers import Wav2Vec2Model
    teacher = make_model("w2v2_post")
    student = Wav2Vec2Model(teacher.config)
    with pytest.raises(ValueError, match="lookahead_frames must be >= 0"):
        H.apply_pyencoder_to_wav2vec2(student, lookahead_frames=-1)
    assert student.config is teacher.config and H.patch_record(student) is None
    odd = make_model("w2v2_post", hidden_size=36, num_attention_heads=4, intermediate_size=40)
    with pytest.raises(ValueError, match=r"head_dim \(9\) is odd: pass an even rotary dim below "
                                         r"it \(rope=8\) or rope=False"):
        H.apply_pyencoder_to_wav2vec2(odd, lookahead_frames=1)
    assert H.patch_record(odd) is None
