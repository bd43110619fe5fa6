"""pyencoder.hf: patching transformers wav2vec2 / HuBERT / WavLM models.

Random-weight models from tiny configs (no downloads). Faithfulness: a patched model with unbounded
left, lookahead >= sequence length in every layer, rope=False, pos_conv="keep", group_norm="keep"
reproduces the unpatched eager model (fp32, 1e-5), forward and gradients, eval and train mode
(dropout off), with and without padding. Oracle: banded/chunked settings with RoPE against an
eager float64 attention with an explicit dense mask and rotary written here.
"""
import copy
import types

import pytest
import torch
import torch.nn.functional as F

import pyencoder

transformers = pytest.importorskip("transformers")

import pyencoder.hf as H  # noqa: E402
from pyencoder.hf import frontend  # noqa: E402
import pyencoder.streaming as S  # noqa: E402

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2),
              num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, hidden_dropout=0.0,
              attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
              final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, mask_feature_prob=0.0,
              attn_implementation="eager")

FAMILIES = ("w2v2_post", "w2v2_pre", "hubert", "wavlm")


def make_model(family, head=None, **over):
    import transformers as T
    kw = dict(COMMON)
    kw.update(over)
    if family == "w2v2_post":
        cfg = T.Wav2Vec2Config(feat_extract_norm="group", do_stable_layer_norm=False, **kw)
        cls = {None: T.Wav2Vec2Model, "ctc": T.Wav2Vec2ForCTC}[head]
    elif family == "w2v2_pre":
        cfg = T.Wav2Vec2Config(feat_extract_norm="layer", do_stable_layer_norm=True, **kw)
        cls = {None: T.Wav2Vec2Model, "ctc": T.Wav2Vec2ForCTC}[head]
    elif family == "hubert":
        cfg = T.HubertConfig(feat_extract_norm="group", do_stable_layer_norm=False, **kw)
        cls = {None: T.HubertModel, "ctc": T.HubertForCTC}[head]
    elif family == "wavlm":
        kw.setdefault("num_buckets", 32)
        kw.setdefault("max_bucket_distance", 64)
        cfg = T.WavLMConfig(feat_extract_norm="group", do_stable_layer_norm=False, **kw)
        cls = {None: T.WavLMModel, "ctc": T.WavLMForCTC}[head]
    else:
        raise ValueError(family)
    if head == "ctc":
        cfg.vocab_size = 12
    model = cls(cfg)
    _randomize(model)
    return model


def _randomize(model):
    """HF initialises some tensors to constants (biases 0, gru_rel_pos_const 1, weight_norm g);
    perturb every parameter so no term can hide."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


def audio(batch, samples=800):
    return torch.randn(batch, samples)


def padding_mask(batch, samples, lengths):
    m = torch.zeros(batch, samples, dtype=torch.long)
    for b, n in enumerate(lengths):
        m[b, :n] = 1
    return m


SAMPLES = 800          # -> 79 frames with the tiny conv stack
FULL = dict(lookahead_frames=10_000, lookahead_layers="all", left_frames=None, rope=False,
            pos_conv="keep", group_norm="keep")


def _out(model, x, mask=None):
    out = model(x, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _fwd_bwd(model, x, mask, w):
    # In train mode HF's feature encoder sets requires_grad on a view of the input itself, so the
    # input gradient is only taken in eval mode.
    x = x.clone().requires_grad_(not model.training)
    model.zero_grad(set_to_none=True)
    y = _out(model, x, mask)
    (y * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), (x.grad.clone() if x.grad is not None else None), grads


# fp32 faithfulness: both sides compute the same function in fp32 with different summation
# orders (blocked online softmax vs dense softmax); observed errors are ~1e-6.
@pytest.mark.filterwarnings("ignore:lookahead_layers='all'")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_faithful_full_context(family, padded, train):
    ref = make_model(family)
    pat = copy.deepcopy(ref)
    H.apply_pyencoder_to_wav2vec2(pat, **FULL)
    ref.train(train)
    pat.train(train)
    x = audio(2, SAMPLES)
    mask = padding_mask(2, SAMPLES, [SAMPLES, 530]) if padded else None
    ref_out = _out(ref, x, mask)
    w = torch.randn_like(ref_out)
    y0, gx0, g0 = _fwd_bwd(ref, x, mask, w)
    y1, gx1, g1 = _fwd_bwd(pat, x, mask, w)
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
    if not train:
        torch.testing.assert_close(gx1, gx0, atol=1e-5, rtol=1e-5)
    assert len(g0) > 10 and g0.keys() == g1.keys()
    for n in g0:
        scale = max(1.0, g0[n].abs().max().item())
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5 * scale, rtol=1e-5, msg=n)


@pytest.mark.parametrize("family", ["w2v2_post", "wavlm"])
def test_faithful_head_and_revert_bit_identical(family):
    model = make_model(family, head="ctc").eval()
    x = audio(2, SAMPLES)
    mask = padding_mask(2, SAMPLES, [SAMPLES, 610])
    before = _out(model, x, mask).detach()
    keys = list(model.state_dict())
    impl = model.config._attn_implementation
    H.apply_pyencoder_to_wav2vec2(model, lookahead_frames=2, left_frames=5)
    assert list(model.state_dict()) == keys  # checkpoints stay loadable by the unpatched class
    patched = _out(model, x, mask).detach()
    assert not torch.allclose(patched, before)
    with pytest.raises(ValueError, match="already patched"):
        H.apply_pyencoder_to_wav2vec2(model)
    H.revert_pyencoder(model)
    assert model.config._attn_implementation == impl
    assert torch.equal(_out(model, x, mask).detach(), before)
    with pytest.raises(ValueError, match="not patched"):
        H.revert_pyencoder(model)
    H.apply_pyencoder_to_wav2vec2(model, lookahead_frames=2, left_frames=5)
    torch.testing.assert_close(_out(model, x, mask).detach(), patched, atol=0, rtol=0)


# ---------------------------------------------------------------- float64 oracle (dense, eager)

def _rotate64(x, positions, rope):
    """Rotary per DESIGN.md: angle = float32(pos) * float32 inv_freq, cos/sin in float32."""
    half = rope.dim // 2
    inv = (1.0 / (rope.base ** (torch.arange(0, rope.dim, 2, dtype=torch.float64) / rope.dim))
           ).float()
    ang = positions.float()[:, None] * inv[None, :]
    cos, sin = torch.cos(ang).double(), torch.sin(ang).double()
    if rope.interleaved:
        a, b = x[..., 0:rope.dim:2], x[..., 1:rope.dim:2]
        r = torch.stack((a * cos - b * sin, b * cos + a * sin), -1).flatten(-2)
    else:
        a, b = x[..., :half], x[..., half:rope.dim]
        r = torch.cat((a * cos - b * sin, b * cos + a * sin), -1)
    return torch.cat((r, x[..., rope.dim:]), -1)


def _dense_visible(spec, n, key_valid):
    p = torch.arange(n)[:, None]
    s = torch.arange(n)[None, :]
    m = spec.mask
    base = (p // m.block) * m.block
    vis = s <= base + m.hi_off
    if m.lo_off >= 0:
        vis = vis & (s >= base - m.lo_off)
    return vis[None, None] & key_valid[:, None, None, :]


def _dense_softmax_attend(scores, vis, v):
    scores = scores.masked_fill(~vis, float("-inf"))
    m = scores.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - m)
    l = p.sum(-1, keepdim=True)
    return torch.where(l > 0, (p @ v) / l.clamp_min(1e-300), torch.zeros_like(p @ v))


def oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    spec = module._pyencoder_attn
    B, Hh, N, D = query.shape
    q, k, v = query.double(), key.double(), value.double()
    if spec.rope is not None:
        pos = torch.arange(N)
        q, k = _rotate64(q, pos, spec.rope), _rotate64(k, pos, spec.rope)
    if attention_mask is None:
        key_valid = torch.ones(B, N, dtype=torch.bool)
    else:  # eager_mask's additive (B, 1, N, N) mask: 0 = visible
        key_valid = attention_mask[:, 0, 0, :] == 0
    out = _dense_softmax_attend(q @ k.transpose(-1, -2) * scaling, _dense_visible(spec, N, key_valid),
                                v)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def oracle_wavlm_forward(self, hidden_states, attention_mask=None, position_bias=None, index=0,
                         **kw):
    spec = self._pyencoder_attn
    B, N, E = hidden_states.shape
    Hh = self.num_heads
    D = E // Hh
    table = self.rel_attn_embed.weight if position_bias is None else position_bias
    x = hidden_states.double()
    q = self.q_proj(x).view(B, N, Hh, D).transpose(1, 2)
    k = self.k_proj(x).view(B, N, Hh, D).transpose(1, 2)
    v = self.v_proj(x).view(B, N, Hh, D).transpose(1, 2)
    if spec.rope is not None:
        pos = torch.arange(N)
        q, k = _rotate64(q, pos, spec.rope), _rotate64(k, pos, spec.rope)
    rel = torch.arange(N)[None, :] - torch.arange(N)[:, None]
    bias = table.double()[self._relative_positions_bucket(rel)].permute(2, 0, 1)
    gx = self.gru_rel_pos_linear(x.view(B, N, Hh, D).permute(0, 2, 1, 3))
    ga, gb = torch.sigmoid(gx.view(B, Hh, N, 2, 4).sum(-1)).unbind(-1)
    gate = ga * (gb * self.gru_rel_pos_const.view(1, Hh, 1) - 1.0) + 2.0
    key_valid = (torch.ones(B, N, dtype=torch.bool) if attention_mask is None
                 else attention_mask.bool())
    scores = q @ k.transpose(-1, -2) * self.scaling + gate[..., None] * bias
    out = _dense_softmax_attend(scores, _dense_visible(spec, N, key_valid), v)
    out = self.out_proj(out.transpose(1, 2).reshape(B, N, E))
    return out, None, table


@pytest.fixture(scope="module")
def _oracle_registered():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    AttentionInterface.register("pyencoder_test_oracle", oracle_attention)
    AttentionMaskInterface.register("pyencoder_test_oracle", eager_mask)
    yield


def _oracle_model(patched):
    ora = copy.deepcopy(patched).double()
    base, family = H.patch.base_model(ora)
    rec = H.patch_record(ora)
    if family == "wavlm":
        for layer in base.encoder.layers:
            layer.attention.forward = types.MethodType(oracle_wavlm_forward, layer.attention)
    else:
        rec.hook.remove()
        base.config._attn_implementation_internal = "pyencoder_test_oracle"
    return ora


ORACLE_SETTINGS = {
    "band_first_rope": dict(lookahead_frames=3, left_frames=4, rope=True, pos_conv="causal"),
    "band_list_unbounded": dict(lookahead_layers=[1, 2], left_frames=None, rope=True,
                                pos_conv="drop"),
    "band_all_norope": dict(lookahead_frames=2, lookahead_layers="all", left_frames=0,
                            rope=False, pos_conv="causal"),
    "chunk_left1": dict(chunk_size=4, left_chunks=1, lookahead_frames=1, rope=True,
                        pos_conv="causal"),
    "chunk_unbounded_all": dict(chunk_size=5, left_chunks=None, lookahead_frames=2,
                                lookahead_layers="all", rope=pyencoder.Rope(4, interleaved=True),
                                pos_conv="drop"),
}


# fp32 patched model vs float64 oracle: the patched model rounds every op to fp32 through two
# layers (plus front end); 2e-5 absolute on O(1) layer-normed outputs, plus what the front end
# brings: the causal (running) group norm divides by the variance of the samples seen so far,
# which on the first frames can be ~0, so it amplifies the fp32 rounding of its input by up to
# eps**-0.5 ~ 316 (seed 341794431 gave 2.2e-5 at frame 0 from 1.8e-5 in the front end). That
# error is measured (hidden_states[0], fp32 vs float64 of the same patched model) and the layers
# may carry it 4x (observed <= 1.2x over 900 seeded models). The float64 patched model must match
# the oracle to 1e-7 (same math, different summation order; a mask or rotary error is O(1)).
@pytest.mark.filterwarnings("ignore:lookahead_layers='all'")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("setting", list(ORACLE_SETTINGS))
def test_oracle(family, setting, _oracle_registered):
    model = make_model(family).eval()
    H.apply_pyencoder_to_wav2vec2(model, **ORACLE_SETTINGS[setting])
    ora = _oracle_model(model)
    x = audio(2, SAMPLES)
    mask = padding_mask(2, SAMPLES, [SAMPLES, 455])
    with torch.no_grad():
        want = _out(ora, x.double(), mask)
        o32 = model(x, attention_mask=mask, output_hidden_states=True)
        o64 = copy.deepcopy(model).double()(x.double(), attention_mask=mask,
                                            output_hidden_states=True)
    got32, got64 = o32.last_hidden_state, o64.last_hidden_state
    n_valid = model._get_feat_extract_output_lengths(torch.tensor([455])).item()
    front = max((o32.hidden_states[0][0].double() - o64.hidden_states[0][0]).abs().max().item(),
                (o32.hidden_states[0][1, :n_valid].double()
                 - o64.hidden_states[0][1, :n_valid]).abs().max().item())
    atol32 = 2e-5 + 4 * front
    torch.testing.assert_close(got64, want, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(got32[0], want[0].float(), atol=atol32, rtol=1e-5)
    torch.testing.assert_close(got32[1, :n_valid], want[1, :n_valid].float(), atol=atol32,
                               rtol=1e-5)


# ---------------------------------------------------------------- front end

def test_running_group_norm_formula_and_chunking():
    B, C, T = 2, 3, 50
    x = torch.randn(B, C, T, dtype=torch.float64) * 3 + 1
    w, b = torch.randn(C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
    y, _ = frontend.running_group_norm(x, w, b, 1e-5)
    for t in (0, 1, 7, T - 1):
        seg = x[..., : t + 1]
        mean = seg.mean(-1)
        var = seg.var(-1, unbiased=False)
        want = (x[..., t] - mean) / torch.sqrt(var + 1e-5) * w + b
        torch.testing.assert_close(y[..., t], want, atol=1e-10, rtol=1e-10)
    x32 = torch.randn(B, C, 777)
    full, _ = frontend.running_group_norm(x32, None, None, 1e-5)
    state, outs, t0 = None, [], 0
    for n in (1, 100, 5, 300, 371):
        o, state = frontend.running_group_norm(x32[..., t0:t0 + n], None, None, 1e-5, state)
        outs.append(o)
        t0 += n
    assert torch.equal(torch.cat(outs, -1), full)  # same additions in the same order


def test_causal_pos_conv_matches_left_padded_conv():
    model = make_model("w2v2_post").eval()
    pc = model.encoder.pos_conv_embed
    x = torch.randn(2, 40, 32)
    y = frontend.causal_pos_conv(pc, x)
    k = pc.conv.kernel_size[0]
    want = F.gelu(F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), pc.conv.weight, pc.conv.bias,
                           groups=pc.conv.groups)).transpose(1, 2)
    torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-5)
    x2 = x.clone()
    x2[:, 25:] = torch.randn_like(x2[:, 25:])
    assert torch.equal(frontend.causal_pos_conv(pc, x2)[:, :25], y[:, :25])


# ---------------------------------------------------------------- registry, guards, latency

def test_registry_from_pretrained_and_round_trip(tmp_path):
    model = make_model("w2v2_post").eval()
    model.save_pretrained(tmp_path)
    x = audio(2, SAMPLES)
    mask = padding_mask(2, SAMPLES, [SAMPLES, 500])
    ref = _out(model, x, mask)
    m2 = transformers.Wav2Vec2Model.from_pretrained(tmp_path, attn_implementation="pyencoder")
    m2.eval()
    assert m2.config._attn_implementation == "pyencoder"
    torch.testing.assert_close(_out(m2, x, mask), ref, atol=1e-5, rtol=1e-5)  # no spec: full
    H.apply_pyencoder_to_wav2vec2(m2, lookahead_frames=3, left_frames=10)
    y = _out(m2, x, mask)
    H.revert_pyencoder(m2)
    assert m2.config._attn_implementation == "pyencoder"
    model.set_attn_implementation("pyencoder")
    torch.testing.assert_close(_out(model, x, mask), ref, atol=1e-5, rtol=1e-5)
    model.set_attn_implementation("eager")
    assert torch.equal(_out(model, x, mask), ref)
    H.apply_pyencoder_to_wav2vec2(model, lookahead_frames=3, left_frames=10)
    torch.testing.assert_close(_out(model, x, mask), y, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="revert_pyencoder"):   # switching a patched model
        model.set_attn_implementation("sdpa")
    model.config._attn_implementation = "sdpa"                   # bypassing the method
    with pytest.raises(RuntimeError, match="revert_pyencoder"):
        _out(model, x, mask)
    model.set_attn_implementation("pyencoder")
    torch.testing.assert_close(_out(model, x, mask), y, atol=1e-6, rtol=1e-6)


def test_bad_arguments():
    model = make_model("hubert")
    with pytest.raises(ValueError, match="pos_conv"):
        H.apply_pyencoder_to_wav2vec2(model, pos_conv="same")
    with pytest.raises(ValueError, match="group_norm"):
        H.apply_pyencoder_to_wav2vec2(model, group_norm="batch")
    with pytest.raises(ValueError, match="lookahead_layers"):
        H.apply_pyencoder_to_wav2vec2(model, lookahead_layers=[1, 2, 3])
    with pytest.raises(ValueError, match="left_chunks needs chunk_size"):
        H.apply_pyencoder_to_wav2vec2(model, left_chunks=2)
    with pytest.raises(ValueError, match="left_frames"):
        H.apply_pyencoder_to_wav2vec2(model, chunk_size=4, left_frames=8)
    with pytest.raises(TypeError, match="lookahead_frames"):
        H.apply_pyencoder_to_wav2vec2(model, lookahead_frames=1.5)
    with pytest.raises(TypeError, match="Wav2Vec2Model"):
        H.apply_pyencoder_to_wav2vec2(torch.nn.Linear(2, 2))
    assert H.patch_record(model) is None
    assert model.config._attn_implementation == "eager"


def test_missing_internals_raise_with_version():
    model = make_model("wavlm")
    del model.encoder.layers[1].attention.gru_rel_pos_linear
    with pytest.raises(H.PatchError, match=transformers.__version__.replace(".", r"\.")):
        H.apply_pyencoder_to_wav2vec2(model)
    assert H.patch_record(model) is None


def test_latency_dystream():
    model = make_model("w2v2_post", conv_dim=(8,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2),
                       conv_stride=(5, 2, 2, 2, 2, 2, 2))
    H.apply_pyencoder_to_wav2vec2(model, lookahead_frames=3)
    lat = H.latency(model)
    assert isinstance(lat, S.Latency)   # one type for pyencoder.hf and pyencoder.streaming
    assert lat.hop == 320 and lat.frontend_lookahead_samples == 80
    assert lat.lookahead_frames == 3 and lat.per_layer_lookahead[0] == 3
    assert lat.attention_ms == 60.0 and lat.frontend_ms == 5.0 and lat.lookahead_ms == 65.0
    assert lat.lookahead_samples == 1040 and lat.samples == 1360 and lat.ms == 85.0
    assert S.latency(model).lookahead_samples == lat.lookahead_samples
    assert "lookahead 1040 samples = 65.000 ms" in str(lat) and "(60.0 ms)" in str(lat)
    # the dict it used to return still reads: "samples"/"ms" keep their old meaning there
    assert lat["hop_samples"] == 320 and lat["frontend_ms"] == 5.0
    with pytest.warns(DeprecationWarning, match="lookahead_ms"):
        assert lat["ms"] == 65.0
    with pytest.warns(DeprecationWarning, match="lookahead_samples"):
        assert lat["samples"] == 1040
    with pytest.raises(KeyError):
        lat["bogus"]
    assert H.latency(model, sample_rate=8000).lookahead_ms == 130.0
    with pytest.raises(ValueError, match="sample_rate"):
        H.latency(model, sample_rate=0)
    H.revert_pyencoder(model)
    with pytest.warns(UserWarning, match="compounds"):
        H.apply_pyencoder_to_wav2vec2(model, lookahead_frames=1, lookahead_layers="all")
    assert H.latency(model)["lookahead_frames"] == 2
    H.revert_pyencoder(model)
    H.apply_pyencoder_to_wav2vec2(model, chunk_size=4, left_chunks=2, lookahead_frames=1)
    assert H.latency(model)["lookahead_frames"] == 4  # chunk start waits 3 frames + 1 lookahead
