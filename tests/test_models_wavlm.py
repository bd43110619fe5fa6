"""WavLM in pyencoder: pyencoder.nn.WavLMSelfAttention and CausalEncoder's WavLM variant.

- nn module vs a dense float64 oracle written here (explicit N x N mask and bias, scalar bucket
  formula, per-query gate), offline and streamed (random ragged per-slot chunks), band and chunked,
  RoPE on and off, gated and not, padding; no transformers needed.
- the shared relative-bias table: later layers read layer 0's embedding by reference (state_dict
  keys are transformers', deepcopy keeps the sharing, gradients reach the one table).
- CausalEncoder.from_hf(WavLM) vs the same model patched by pyencoder.hf (float64, every hidden
  state, band and chunked, RoPE on and off, padding, post-LN and pre-LN, a CTC head), and its
  stream; CausalEncoder WavLM streaming == offline for ragged slots with a mid-stream checkpoint.

float64 throughout: both sides run the same float64 math up to summation order, so 1e-10 (module,
encoder streaming) and 1e-9 (whole HF model, as tests/test_models.py) are far above rounding and
far below any mask / bias / gate error (O(1e-2) and up with these weights).
"""
import copy
import math
import random

import pytest
import torch

from pyencoder.models import CausalEncoder, EncoderConfig
from pyencoder.nn import TransformerLayer, WavLMSelfAttention
from pyencoder.nn.relpos import relative_position_bucket
from pyencoder.streaming import latency

from _stream_utils import check_encoder_ragged_stream, check_encoder_slot_reset

F64_TOL = 1e-10


# ---------------------------------------------------------------- dense float64 oracle

def oracle_bucket(rel, num_buckets, max_distance):
    """WavLM's T5-style bucket of one relative position, from the formula (scalar, float64)."""
    half = num_buckets // 2
    max_exact = half // 2
    b = half if rel > 0 else 0
    a = abs(rel)
    if a < max_exact:
        return b + a
    return b + min(half - 1, int(max_exact + math.log(a / max_exact)
                                 / math.log(max_distance / max_exact) * (half - max_exact)))


def oracle_rotate(x, dim, base=10000.0):
    """NeoX rotary of the first ``dim`` features of x (B, H, N, D) at positions 0..N-1, angle
    float32(p) * float32(inv_freq) as DESIGN.md defines it, cos/sin in float64."""
    if not dim:
        return x
    N = x.shape[2]
    half = dim // 2
    inv = (1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)).float()
    ang = (torch.arange(N, dtype=torch.float32)[:, None] * inv[None, :]).double()
    c, s = torch.cos(ang), torch.sin(ang)
    a, b = x[..., :half], x[..., half:dim]
    return torch.cat((a * c - b * s, b * c + a * s, x[..., dim:]), -1)


def oracle_mask(N, block, lo_off, hi_off, key_lengths):
    m = torch.zeros(len(key_lengths), N, N, dtype=torch.bool)
    for b, L in enumerate(key_lengths):
        for p in range(N):
            base = (p // block) * block
            for s in range(min(N, L)):
                if s <= base + hi_off and (lo_off < 0 or s >= base - lo_off):
                    m[b, p, s] = True
    return m[:, None]


def oracle_wavlm(att, x, key_lengths, table=None):
    """Dense float64 WavLM attention of module ``att`` (its weights) on x (B, N, E)."""
    B, N, E = x.shape
    H, D = att.num_heads, att.head_dim
    x = x.double()
    lin = lambda m, t: t @ m.weight.double().T + m.bias.double()  # noqa: E731
    heads = lambda t: t.view(B, N, H, D).transpose(1, 2)  # noqa: E731
    q, k, v = heads(lin(att.q_proj, x)), heads(lin(att.k_proj, x)), heads(lin(att.v_proj, x))
    rd = 0 if att.rope is None else att.rope.dim
    q, k = oracle_rotate(q, rd), oracle_rotate(k, rd)
    table = (att.relative_bias_table() if table is None else table).double()
    idx = torch.tensor([[oracle_bucket(s - p, att.num_buckets, att.max_distance)
                         for s in range(N)] for p in range(N)])
    bias = table[idx].permute(2, 0, 1)[None]                       # (1, H, N, N)
    if att.gated:
        g = lin(att.gru_rel_pos_linear, x.view(B, N, H, D).transpose(1, 2))   # (B, H, N, 8)
        ga = torch.sigmoid(g[..., :4].sum(-1))
        gb = torch.sigmoid(g[..., 4:].sum(-1))
        const = att.gru_rel_pos_const.double().view(1, H, 1)
        bias = (ga * (gb * const - 1.0) + 2.0)[..., None] * bias
    scores = q @ k.transpose(-1, -2) / math.sqrt(D) + bias
    vis = oracle_mask(N, att.block, att.lo_off, att.hi_off, key_lengths)
    scores = scores.masked_fill(~vis, float("-inf"))
    any_vis = vis.any(-1, keepdim=True)
    p = torch.softmax(torch.where(any_vis, scores, torch.zeros_like(scores)), -1) * any_vis
    o = (p @ v).transpose(1, 2).reshape(B, N, E)
    return lin(att.out_proj, o)


def _perturb(module, scale=0.3):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


MASKS = {
    "band": dict(left=5, right=2),
    "band_unbounded": dict(left=None, right=1),
    "band_causal": dict(left=0, right=0),
    "chunked": dict(chunk_size=4, left_chunks=1, lookahead=1),
    "chunked_unbounded": dict(chunk_size=3, left_chunks=None, lookahead=0),
}


def _module(mask, rope, gated, **kw):
    return _perturb(WavLMSelfAttention(16, 2, num_buckets=12, max_distance=20, gated=gated,
                                       rope=rope, **MASKS[mask], **kw)).double()


def _stream_ragged(att, x, lengths, max_chunk, checkpoint_at=None):
    """Feed per-slot chunks of random (possibly zero) length; returns each slot's output."""
    B = x.shape[0]
    st = att.init_state(B, max_chunk=max_chunk)
    got, pos, it = [[] for _ in range(B)], [0] * B, 0
    while any(pos[b] < lengths[b] for b in range(B)):
        n = [min(random.randint(0, 9), lengths[b] - pos[b]) for b in range(B)]
        xc = torch.zeros(B, max(n), x.shape[2], dtype=x.dtype)
        for b in range(B):
            xc[b, :n[b]] = x[b, pos[b]:pos[b] + n[b]]
            pos[b] += n[b]
        y, st = att.step(xc, st, lengths=torch.tensor(n))
        for b in range(B):
            got[b].append(y[b, :int(st.out_lengths[b])])
        it += 1
        if it == checkpoint_at:
            st = att.init_state(B, max_chunk=max_chunk).load_state_dict(st.state_dict())
    y, st = att.flush(st)
    for b in range(B):
        got[b].append(y[b, :int(st.out_lengths[b])])
    return [torch.cat(g, 0) for g in got]


@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.parametrize("rope,gated", [(False, True), (True, True), (4, False)])
def test_module_matches_dense_oracle(mask, rope, gated):
    att = _module(mask, rope, gated)
    N = 23
    x = torch.randn(2, N, 16, dtype=torch.float64)
    kl = [N, 15]
    want = oracle_wavlm(att, x, kl)
    got = att(x, key_lengths=torch.tensor(kl, dtype=torch.int32))
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=F64_TOL)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=F64_TOL)
    # streaming: slot b is a stream of kl[b] frames (its padding never arrives)
    alone = oracle_wavlm(att, x[1:, :15], [15])[0]
    for mc in (3, 64):
        outs = _stream_ragged(att, x, kl, mc, checkpoint_at=4)
        torch.testing.assert_close(outs[0], want[0], rtol=0, atol=F64_TOL)
        torch.testing.assert_close(outs[1], alone, rtol=0, atol=F64_TOL)


def test_module_long_sequence_uses_log_buckets_and_tiles():
    """N larger than a query tile and than max_distance: log buckets, clamped buckets, many tiles."""
    att = _perturb(WavLMSelfAttention(8, 2, left=40, right=3, num_buckets=16, max_distance=24,
                                      rope=True)).double()
    N = 90
    x = torch.randn(1, N, 8, dtype=torch.float64)
    want = oracle_wavlm(att, x, [N])
    torch.testing.assert_close(att(x), want, rtol=0, atol=F64_TOL)
    out = _stream_ragged(att, x, [N], 16)[0]
    torch.testing.assert_close(out, want[0], rtol=0, atol=F64_TOL)


def test_module_float32_stream_equals_offline():
    # DESIGN.md streaming contract in fp32 (1e-5 relative): same fp32 ops up to summation order.
    att = _perturb(WavLMSelfAttention(16, 2, chunk_size=3, left_chunks=2, lookahead=2,
                                      num_buckets=12, max_distance=20, rope=True))
    x = torch.randn(2, 41, 16)
    ref = att(x)
    outs = _stream_ragged(att, x, [41, 41], 5)
    for b in range(2):
        torch.testing.assert_close(outs[b], ref[b], rtol=1e-5, atol=1e-5)


def test_bucket_matches_transformers():
    T = pytest.importorskip("transformers")
    rel = torch.arange(-3000, 3001)[None, :] - torch.arange(0, 7)[:, None]
    for nb, md in ((320, 800), (32, 64), (12, 20), (33, 100)):
        hf = T.models.wavlm.modeling_wavlm.WavLMAttention(8, 2, num_buckets=nb, max_distance=md)
        assert torch.equal(relative_position_bucket(rel, nb, md),
                           hf._relative_positions_bucket(rel))


# ---------------------------------------------------------------- shared table, gradients

def test_shared_table_state_dict_copy_and_gradients():
    a0 = _module("band", True, True)
    a1 = _perturb(WavLMSelfAttention(16, 2, left=5, right=2, num_buckets=12, max_distance=20,
                                     has_relative_bias=False, rel_attn_embed=a0.rel_attn_embed,
                                     rope=True)).double()
    assert "rel_attn_embed.weight" in a0.state_dict()
    assert sorted(a1.state_dict()) == sorted(k for k in a0.state_dict() if "rel_attn" not in k)
    assert a1.relative_bias_table() is a0.rel_attn_embed.weight
    pair = torch.nn.ModuleList([a0, a1])
    cp = copy.deepcopy(pair)
    assert cp[1].relative_bias_table() is cp[0].rel_attn_embed.weight
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    want = oracle_wavlm(a1, x, [13, 13], table=a0.rel_attn_embed.weight)
    torch.testing.assert_close(a1(x), want, rtol=0, atol=F64_TOL)
    a1(a0(x)).pow(2).sum().backward()
    for name, p in pair.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    g_both = a0.rel_attn_embed.weight.grad.clone()
    a0.zero_grad()
    a1(a0(x).detach()).pow(2).sum().backward()     # layer 1 alone also reaches the table
    assert a0.rel_attn_embed.weight.grad.abs().sum() > 0
    assert not torch.equal(a0.rel_attn_embed.weight.grad, g_both)
    lone = WavLMSelfAttention(16, 2, left=5, right=2, num_buckets=12, max_distance=20,
                              has_relative_bias=False)
    with pytest.raises(RuntimeError, match="shared table"):
        lone(x.float())
    lone.share_relative_bias(a0.rel_attn_embed)
    with pytest.raises(ValueError, match="Embedding"):
        lone.share_relative_bias(torch.nn.Embedding(11, 2))


def test_module_gradcheck():
    att = _module("chunked", True, True)
    x = torch.randn(1, 9, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: att(z, key_lengths=torch.tensor([7])), (x,),
                                    eps=1e-6, atol=1e-6)


def test_module_arguments_and_protocol():
    with pytest.raises(ValueError, match="right"):
        WavLMSelfAttention(8, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        WavLMSelfAttention(8, 2, left=2, right=1, chunk_size=4)
    with pytest.raises(ValueError, match="num_buckets"):
        WavLMSelfAttention(8, 2, right=1, num_buckets=2)
    with pytest.raises(ValueError, match="max_distance"):
        WavLMSelfAttention(8, 2, right=1, num_buckets=32, max_distance=8)
    att = WavLMSelfAttention(8, 2, chunk_size=4, left_chunks=2, lookahead=1)
    assert att.lookahead == 4 and att.hop == 1
    assert latency(att).lookahead_samples == 4
    st = att.init_state(1)
    with pytest.raises(ValueError, match="multiple of the mask block"):
        att.step_fixed(torch.randn(1, 2, 8), st)
    unbounded = WavLMSelfAttention(8, 2, left=None, right=1)
    with pytest.raises(ValueError, match="step_fixed needs a finite left context"):
        unbounded.step_fixed(torch.randn(1, 2, 8), unbounded.init_state(1))
    layer = TransformerLayer(att, 12)
    y, st = layer.step(torch.randn(1, 4, 8), layer.init_state(1))
    assert y.shape == (1, 0, 8) and int(st.out_lengths[0]) == 0   # chunk 0..3 waits for frame 4
    y, st = layer.step(torch.randn(1, 1, 8), st)
    assert y.shape == (1, 4, 8) and int(st.out_lengths[0]) == 4


# ---------------------------------------------------------------- CausalEncoder WavLM variant

def tiny_wavlm_config(**over):
    kw = dict(conv_dim=(8, 12, 12), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2),
              feat_extract_norm="group", hidden_size=16, num_layers=3, num_heads=2, ffn_dim=24,
              pos_conv="causal", pos_conv_kernel=6, pos_conv_groups=4, left=6, lookahead=2,
              lookahead_layers=[2, 0, 1], rel_pos_bias=True, num_buckets=12,
              max_bucket_distance=20)
    kw.update(over)
    return EncoderConfig(**kw)


def test_encoder_bucket_arguments_named_by_config_field():
    """They were refused by the attention module in its own names (max_distance)."""
    with pytest.raises(ValueError, match=r"max_bucket_distance must be an int > num_buckets // 4 "
                                         r"= 3.*got 3"):
        CausalEncoder(tiny_wavlm_config(max_bucket_distance=3))
    with pytest.raises(ValueError, match=r"num_buckets must be an int >= 4.*got 2"):
        CausalEncoder(tiny_wavlm_config(num_buckets=2))
    with pytest.raises(ValueError, match=r"max_bucket_distance .*got True"):
        CausalEncoder(tiny_wavlm_config(max_bucket_distance=True))
    CausalEncoder(tiny_wavlm_config(max_bucket_distance=4))
    CausalEncoder(tiny_wavlm_config(rel_pos_bias=False, max_bucket_distance=3))  # not read


ENC_CASES = {
    "band_rope": dict(),
    "chunked_norope_preln": dict(attention="chunked", left=None, chunk_size=3, left_chunks=1,
                                 lookahead_layers="first", rope=False, norm_first=True),
    "band_unbounded_ungated": dict(left=None, gated_rel_pos=False, feat_extract_norm="layer"),
}


def _perturbed_encoder(cfg):
    m = CausalEncoder(cfg).double().eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "gru_rel_pos" in n or "rel_attn_embed" in n:
                p.add_(0.5 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("case", sorted(ENC_CASES))
def test_encoder_ragged_stream_and_resume(case):
    m = _perturbed_encoder(tiny_wavlm_config(**ENC_CASES[case]))
    assert isinstance(m.layers[1].attention, WavLMSelfAttention)
    assert m.layers[2].attention.relative_bias_table() is m.layers[0].attention.rel_attn_embed.weight
    check_encoder_ragged_stream(m, [433, 291], 70, F64_TOL)


def test_encoder_reset_slot_and_latency():
    m = _perturbed_encoder(tiny_wavlm_config())
    plain = CausalEncoder(tiny_wavlm_config(rel_pos_bias=False))
    assert m.latency() == plain.latency()
    a, c = torch.randn(300, dtype=torch.float64), torch.randn(260, dtype=torch.float64)
    check_encoder_slot_reset(m, a, torch.randn(200, dtype=torch.float64), c, 200, F64_TOL)


def test_encoder_gradients_reach_every_parameter():
    m = _perturbed_encoder(tiny_wavlm_config(hidden_size=8, ffn_dim=8, conv_dim=(4, 4, 4),
                                             pos_conv_kernel=4)).train()
    wav = torch.randn(2, 300, dtype=torch.float64, requires_grad=True)
    out = m(wav, lengths=torch.tensor([300, 211])).last_hidden_state
    out.pow(2).sum().backward()
    assert wav.grad is not None and wav.grad.abs().sum() > 0
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


# ---------------------------------------------------------------- from_hf(WavLM)

HF_COMMON = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                 conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2),
                 num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4, hidden_dropout=0.0,
                 attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                 final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, mask_feature_prob=0.0,
                 num_buckets=16, max_bucket_distance=40, attn_implementation="eager")


def _hf_wavlm(stable, head=None):
    T = pytest.importorskip("transformers")
    cfg = T.WavLMConfig(feat_extract_norm="layer" if stable else "group",
                        do_stable_layer_norm=stable, conv_bias=stable, **HF_COMMON)
    if head == "ctc":
        cfg.vocab_size = 7
    model = (T.WavLMForCTC if head == "ctc" else T.WavLMModel)(cfg)
    with torch.no_grad():   # HF initialises gru_rel_pos_const to 1, biases to 0: perturb all
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.double().eval()


HF_CASES = {
    "post_band_rope_causalpos": (False, None, dict(lookahead=2, lookahead_layers="first", left=7,
                                                   pos_conv="causal", rope=True)),
    "post_band_norope_unbounded": (False, None, dict(lookahead=1, lookahead_layers=[1, 2],
                                                     left=None, pos_conv="drop", rope=False)),
    "pre_chunked_rope_ctc": (True, "ctc", dict(lookahead=1, lookahead_layers="all", chunk_size=4,
                                               left_chunks=2, pos_conv="causal", rope=True)),
    "pre_chunked_norope": (True, None, dict(lookahead=0, lookahead_layers="first", chunk_size=3,
                                            left_chunks=None, pos_conv="drop", rope=False)),
}


@pytest.mark.filterwarnings("ignore:lookahead_layers='all'")
@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_from_hf_wavlm_matches_patched_model(case):
    pytest.importorskip("transformers")
    import pyencoder.hf as H
    stable, head, opts = HF_CASES[case]
    hf = _hf_wavlm(stable, head)
    enc = CausalEncoder.from_hf(hf, **opts)
    assert enc.config.rel_pos_bias and enc.config.num_buckets == 16
    assert next(enc.parameters()).dtype == torch.float64
    H.apply_pyencoder_to_wav2vec2(hf, lookahead_frames=opts["lookahead"],
                                  lookahead_layers=opts["lookahead_layers"],
                                  left_frames=opts.get("left"), rope=opts["rope"],
                                  pos_conv=opts["pos_conv"], group_norm="running",
                                  chunk_size=opts.get("chunk_size"),
                                  left_chunks=opts.get("left_chunks"))
    wav = torch.randn(2, 800, dtype=torch.float64)
    mask = torch.ones(2, 800, dtype=torch.long)
    mask[1, 577:] = 0
    with torch.no_grad():
        base = getattr(hf, "wavlm", hf)
        ref = base(wav, attention_mask=mask, output_hidden_states=True)
        out = enc(wav, lengths=mask.sum(1), output_hidden_states=True)
        assert len(out.hidden_states) == len(ref.hidden_states) == 3
        n1 = int(out.lengths[1])
        for a, b in zip(out.hidden_states, ref.hidden_states):
            torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-9)
            torch.testing.assert_close(a[1, :n1], b[1, :n1], rtol=0, atol=1e-9)
        torch.testing.assert_close(out.last_hidden_state[0], ref.last_hidden_state[0], rtol=0,
                                   atol=1e-9)
        torch.testing.assert_close(out.last_hidden_state[1, :n1], ref.last_hidden_state[1, :n1],
                                   rtol=0, atol=1e-9)
        st = enc.init_state(1, max_chunk=16)
        ys, t = [], 0
        while t < 800:
            c = random.randint(1, 200)
            y, st = enc.step(wav[:1, t:t + c], st)
            ys.append(y)
            t += c
        ys.append(enc.flush(st)[0])
    torch.testing.assert_close(torch.cat(ys, 1)[0], ref.last_hidden_state[0], rtol=0, atol=1e-9)


def test_from_hf_wavlm_first_layers_and_keys():
    pytest.importorskip("transformers")
    hf = _hf_wavlm(False)
    enc = CausalEncoder.from_hf(hf, lookahead=2, num_layers=1, left=5)
    assert len(enc.layers) == 1
    keys = set(enc.layers[0].attention.state_dict())
    assert keys == set(hf.encoder.layers[0].attention.state_dict())
    enc2 = CausalEncoder.from_hf(hf, lookahead=2, left=5)
    assert set(enc2.layers[1].attention.state_dict()) == \
        set(hf.encoder.layers[1].attention.state_dict())


@pytest.mark.parametrize("opts", [dict(lookahead_frames=2, left_frames=3, pos_conv="causal"),
                                  dict(chunk_size=3, left_chunks=None, lookahead_frames=1,
                                       lookahead_layers=[1, 0], rope=False, pos_conv="drop")])
def test_hf_streaming_encoder_wavlm_uses_shared_module(opts):
    """pyencoder.hf.StreamingEncoder streams WavLM through WavLMSelfAttention (sharing the HF
    parameters and layer 0's table): float64 stream == patched offline model, every depth."""
    pytest.importorskip("transformers")
    import pyencoder.hf as H
    hf = _hf_wavlm(False, "ctc")
    H.apply_pyencoder_to_wav2vec2(hf, **opts)
    enc = H.StreamingEncoder(hf, output_hidden_states=True)
    assert all(isinstance(a, WavLMSelfAttention) for a in enc.attn)
    assert enc.attn[0].rel_attn_embed is hf.wavlm.encoder.layers[0].attention.rel_attn_embed
    assert enc.attn[1].relative_bias_table() is enc.attn[0].rel_attn_embed.weight
    wav = torch.randn(1, 900, dtype=torch.float64)
    with torch.no_grad():
        ref = hf.wavlm(wav, output_hidden_states=True)
        st = enc.init_state(1)
        outs, t = [], 0
        while t < 900:
            c = random.choice([1, 7, 40, 161, 333])
            outs.append(enc.step(wav[:, t:t + c], st)[0])
            t += c
            if len(outs) == 5:
                st = enc.init_state(1).load_state_dict(st.state_dict())
        outs.append(enc.flush(st)[0])
    for d in range(len(ref.hidden_states)):
        got = torch.cat([o[1][d] for o in outs], 1)
        torch.testing.assert_close(got, ref.hidden_states[d], rtol=0, atol=1e-9)
    torch.testing.assert_close(torch.cat([o[0] for o in outs], 1), ref.last_hidden_state, rtol=0,
                               atol=1e-9)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
def test_from_hf_wavlm_full_context_equals_unpatched_transformers():
    """lookahead=None, rope=False, no positional conv: the converted encoder is transformers' own
    eager WavLM (dense position_bias through F.multi_head_attention_forward), padding included."""
    pytest.importorskip("transformers")
    hf = _hf_wavlm(True)
    with torch.no_grad():   # silence the symmetric positional conv: gelu(0 * x + 0) = 0
        hf.encoder.pos_conv_embed.conv.parametrizations.weight.original0.zero_()
        hf.encoder.pos_conv_embed.conv.bias.zero_()
    enc = CausalEncoder.from_hf(hf, lookahead=None, rope=False, pos_conv="drop")
    wav = torch.randn(2, 700, dtype=torch.float64)
    mask = torch.ones(2, 700, dtype=torch.long)
    mask[1, 431:] = 0
    with torch.no_grad():
        ref = hf(wav, attention_mask=mask, output_hidden_states=True)
        out = enc(wav, lengths=mask.sum(1), output_hidden_states=True)
    n1 = int(out.lengths[1])
    for a, b in zip(out.hidden_states + (out.last_hidden_state,),
                    ref.hidden_states + (ref.last_hidden_state,)):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-9)
        torch.testing.assert_close(a[1, :n1], b[1, :n1], rtol=0, atol=1e-9)


@pytest.mark.gpu
def test_wavlm_encoder_cuda_matches_cpu_float64():
    # fp32 on the GPU vs float64 on the CPU: ~10 chained fp32 ops at unit scale -> 1e-4.
    m = _perturbed_encoder(tiny_wavlm_config(hidden_size=32, num_heads=4, ffn_dim=64))
    wav = torch.randn(2, 1500, dtype=torch.float64)
    lengths = torch.tensor([1500, 1111])
    ref = m(wav, lengths=lengths).last_hidden_state
    mc = copy.deepcopy(m).float().cuda()
    assert mc.layers[1].attention.relative_bias_table().is_cuda
    out = mc(wav.float().cuda(), lengths=lengths.cuda()).last_hidden_state
    n1 = int(m.frame_lengths(1111))
    torch.testing.assert_close(out[0].double().cpu(), ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1, :n1].double().cpu(), ref[1, :n1], rtol=1e-4, atol=1e-4)
    st = mc.init_state(2, max_chunk=32)
    ys, t = [], 0
    while t < 1500:
        c = random.randint(1, 400)
        y, st = mc.step(wav[:, t:t + c].float().cuda(), st)
        ys.append(y)
        t += c
    ys.append(mc.flush(st)[0])
    torch.testing.assert_close(torch.cat(ys, 1)[0].double().cpu(), ref[0], rtol=1e-4, atol=1e-4)
    out.sum().backward()
    for n, p in mc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
