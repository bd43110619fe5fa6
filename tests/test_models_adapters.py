"""CausalEncoder.from_hf with wav2vec2 adapters (issue 17 item 1): the conv adapter after the
encoder (config.add_adapter: proj + LayerNorm, strided zero-padded Conv1d + GLU layers) and the MMS
attention adapters of pre-LN layers (config.adapter_attn_dim). Tiny random configs, no downloads.

- offline: the converted encoder (copied or shared weights) equals the same transformers model
  patched by pyencoder.hf with the same options (fp32: the two run the same ops on the same
  weights, observed differences ~1e-7);
- stream == offline over random ragged chunkings (fp32 1e-5: summation order of streamed windows);
- latency(): hop = frontend hop x adapter stride, lookahead checked empirically on the converted
  encoder (a perturbation after the claimed last sample changes nothing up to that frame, one at
  that sample changes the frame), equal to pyencoder.hf.latency of the patched model;
- PaddedConv1d / ConvAdapter against F.conv1d + GLU (float64, forward and backward);
- what cannot be converted or streamed raises and says why.
"""
import copy
import random

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import pyencoder.hf as H  # noqa: E402
from pyencoder.models import CausalEncoder  # noqa: E402
from pyencoder.models.adapter import ConvAdapter, PaddedConv1d  # noqa: E402
from pyencoder.models.encoder import EncoderConfig  # noqa: E402
from pyencoder.streaming import latency  # noqa: E402
from test_hf_adapters import CONV_ADAPTER, _model, _stream  # noqa: E402

OPTS = dict(lookahead=2, left=6, pos_conv="causal")
PATCH = dict(lookahead_frames=2, left_frames=6, pos_conv="causal", group_norm="running")
CASES = {
    "conv_post": (dict(stable=False), CONV_ADAPTER),
    "conv_pre_1layer_k5": (dict(stable=True), dict(CONV_ADAPTER, num_adapter_layers=1,
                                                   adapter_kernel_size=5)),
    "conv_same_width": (dict(stable=True), dict(CONV_ADAPTER, output_hidden_size=32)),
    "attn_adapter": (dict(stable=True), dict(adapter_attn_dim=8)),
    "both": (dict(stable=True), dict(CONV_ADAPTER, adapter_attn_dim=8)),
    "wavlm_conv": (dict(wavlm=True), CONV_ADAPTER),
}


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_from_hf_adapters_offline_and_stream(case, share):
    kw, adapter = CASES[case]
    model = _model(**kw, **adapter)
    enc = CausalEncoder.from_hf(model, share_weights=share, **OPTS).eval()
    if "add_adapter" in adapter:
        assert isinstance(enc.adapter, ConvAdapter)
        assert enc.hop == 10 * 2 ** adapter["num_adapter_layers"]
    if "adapter_attn_dim" in adapter:
        assert all(layer.adapter is not None for layer in enc.layers)
    patched = copy.deepcopy(model)
    H.apply_pyencoder_to_wav2vec2(patched, **PATCH)
    x = torch.randn(2, 1000 + random.randint(0, 400))
    with torch.no_grad():
        want = patched(x).last_hidden_state
        got = enc(x).last_hidden_state
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(_stream(enc, x), got, atol=1e-5, rtol=1e-5)
    lengths = torch.tensor([x.shape[1], 700])
    assert enc(x, lengths=lengths).lengths.tolist() == enc.output_lengths(lengths).tolist()
    assert enc.output_lengths(x.shape[1]) == got.shape[1]


def test_share_weights_follows_load_adapter_and_copy_does_not(tmp_path):
    """share_weights=True reads the model's parameters (MMS load_adapter swaps the attention
    adapters in place: the encoder follows); the default copies them (it does not)."""
    from safetensors.torch import save_file
    model = _model(stable=True, head=True, adapter_attn_dim=8)
    model.config._name_or_path = str(tmp_path)
    save_file({k: (v.detach() + 0.2 * torch.randn_like(v)).contiguous()
               for k, v in model._get_adapters().items()}, str(tmp_path / "adapter.xyz.safetensors"))
    shared = CausalEncoder.from_hf(model, share_weights=True, **OPTS).eval()
    copied = CausalEncoder.from_hf(model, **OPTS).eval()
    x = torch.randn(1, 900)
    with torch.no_grad():
        before = copied(x).last_hidden_state
        model.load_adapter("xyz")
        patched = copy.deepcopy(model)
        H.apply_pyencoder_to_wav2vec2(patched, **PATCH)
        want = patched.wav2vec2(x).last_hidden_state
        torch.testing.assert_close(shared(x).last_hidden_state, want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(copied(x).last_hidden_state, before, atol=0, rtol=0)
        assert (want - before).abs().max() > 1e-3


@pytest.mark.parametrize("layers,kernel,chunk", [(2, 3, None), (1, 5, None), (2, 3, 4)])
def test_from_hf_adapter_latency_is_exact(layers, kernel, chunk):
    model = _model(**dict(CONV_ADAPTER, num_adapter_layers=layers, adapter_kernel_size=kernel))
    opts = dict(OPTS, left=None, chunk_size=chunk, left_chunks=2) if chunk else OPTS
    enc = CausalEncoder.from_hf(model, **opts).eval()
    patched = copy.deepcopy(model)
    H.apply_pyencoder_to_wav2vec2(patched, **dict(PATCH, left_frames=opts["left"],
                                                  chunk_size=chunk,
                                                  left_chunks=2 if chunk else None))
    lat, hf_lat = enc.latency(), H.latency(patched)
    assert lat.hop == hf_lat.hop == 10 * 2 ** layers
    assert lat.lookahead_samples == hf_lat.lookahead_samples
    assert latency(enc).lookahead_samples == lat.lookahead_samples
    hop, look = lat.hop, lat.lookahead_samples
    x = torch.randn(1, 1200)
    with torch.no_grad():
        base = enc(x).last_hidden_state
        worst_tight = False
        for u in range(base.shape[1] - 6):
            last = (u + 1) * hop - 1 + look              # last sample output u may depend on
            x2 = x.clone()
            x2[:, last + 1:] += torch.randn_like(x2[:, last + 1:])
            torch.testing.assert_close(enc(x2).last_hidden_state[:, :u + 1], base[:, :u + 1],
                                       atol=1e-6, rtol=1e-6)
            x3 = x.clone()
            x3[:, last] += 10.0
            if (enc(x3).last_hidden_state[:, u] - base[:, u]).abs().max() > 1e-4:
                worst_tight = True
            if u > 12 and worst_tight:
                break
        assert worst_tight, "latency is an upper bound that no frame reaches"


def test_padded_conv_and_adapter_match_conv1d_glu_float64():
    torch.manual_seed(random.randint(0, 2**31))
    C, k, s, p = 5, 4, 3, 2
    conv = PaddedConv1d(C, 2 * C, k, s, p).double()
    x = torch.randn(2, C, 23, dtype=torch.float64, requires_grad=True)
    y = conv(x)
    ref = F.conv1d(F.pad(x, (p, p)), conv.weight, conv.bias, stride=s)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-12)
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, conv.weight), g)
    rx, rw = torch.autograd.grad(ref, (x, conv.weight), g)
    torch.testing.assert_close(dx, rx, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(dw, rw, atol=1e-12, rtol=1e-12)
    ad = ConvAdapter(6, 4, 2, 3, 2, 1).double()
    h = torch.randn(2, 19, 6, dtype=torch.float64)
    r = ad.proj_layer_norm(ad.proj(h)).transpose(1, 2)
    for layer in ad.layers:
        r = F.glu(F.conv1d(r, layer.conv.weight, layer.conv.bias, stride=2, padding=1), dim=1)
    torch.testing.assert_close(ad(h), r.transpose(1, 2), atol=1e-12, rtol=1e-12)
    assert ad.out_length(19) == r.shape[-1]


def test_unstreamable_or_unconvertible_adapters_raise():
    model = _model(**CONV_ADAPTER)
    conv = model.adapter.layers[1].conv
    conv.padding = (conv.kernel_size[0],)          # the window would start past the left pad
    with pytest.raises(NotImplementedError, match="padding <= kernel - 1"):
        CausalEncoder.from_hf(model, **OPTS)
    conv.padding, conv.dilation = (1,), (2,)
    with pytest.raises(NotImplementedError, match="undilated"):
        CausalEncoder.from_hf(model, **OPTS)
    with pytest.raises(ValueError, match="adapter_attn_dim"):
        CausalEncoder(EncoderConfig(conv_dim=(8,), conv_kernel=(4,), conv_stride=(2,),
                                    hidden_size=16, num_layers=1, num_heads=2, ffn_dim=24,
                                    norm_first=False, adapter_attn_dim=4))
    with pytest.raises(ValueError, match="padding must be an int in"):
        PaddedConv1d(4, 8, 3, 2, 3)
    teacher = CausalEncoder.from_hf(_model(**CONV_ADAPTER), lookahead=None)
    with pytest.raises(ValueError, match="full-context"):
        teacher.init_state(1)


@pytest.mark.parametrize("share", [False, True])
def test_from_hf_hubert_pos_conv_batch_norm(share):
    """HuBERT's conv_pos_batch_norm (BatchNorm1d before the positional conv, per frame in eval
    mode) is converted (copied or shared) and streams; it used to be refused by from_hf."""
    import transformers as T
    from test_hf import COMMON, _randomize
    model = T.HubertModel(T.HubertConfig(feat_extract_norm="group", conv_pos_batch_norm=True,
                                         **COMMON))
    _randomize(model)
    bn = model.encoder.pos_conv_embed.batch_norm
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    enc = CausalEncoder.from_hf(model, share_weights=share, **OPTS).eval()
    assert enc.pos_conv_norm is not None and (enc.pos_conv_norm is bn) == share
    patched = copy.deepcopy(model)
    H.apply_pyencoder_to_wav2vec2(patched, **PATCH)
    x = torch.randn(2, 1100)
    with torch.no_grad():
        got = enc(x).last_hidden_state
        torch.testing.assert_close(got, patched(x).last_hidden_state, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(_stream(enc, x), got, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["w2v2_post", "w2v2_pre"])
def test_shared_weights_run_the_models_activations(family):
    """share_weights=True (and so pyencoder.hf.StreamingEncoder) runs the model's own activation
    modules, so non-GELU configs stream too; copied weights keep GELU only and say so."""
    from test_hf import make_model
    model = make_model(family, hidden_act="relu", feat_extract_activation="silu").eval()
    with pytest.raises(NotImplementedError, match="only GELU"):
        CausalEncoder.from_hf(model, **OPTS)
    H.apply_pyencoder_to_wav2vec2(model, **PATCH)
    x = torch.randn(2, 1000)
    with torch.no_grad():
        want = model(x).last_hidden_state
        enc = CausalEncoder.from_hf(model, share_weights=True, **OPTS).eval()
        torch.testing.assert_close(enc(x).last_hidden_state, want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(_stream(enc, x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(H.StreamingEncoder(model)(x, chunk_sizes=(13, 250)), want,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["conv_post", "conv_pre_1layer_k5", "wavlm_conv"])
def test_padded_batch_rows_equal_their_clips_through_the_conv_adapter(case):
    """A padded batch's row gives what its clip alone (and its stream) gives on every frame
    ``lengths`` counts: the adapter's convs read the padded encoder frames (non-zero layer
    outputs) where the clip alone sees its zero padding (the last valid frame 0.17 off)."""
    kw, adapter = CASES[case]
    torch.manual_seed(9)
    enc = CausalEncoder.from_hf(_model(**kw, **adapter), **OPTS).eval()
    x = torch.randn(2, 1400)
    lengths = torch.tensor([1400, 830])
    with torch.no_grad():
        out = enc(x, lengths=lengths)
        for b in range(2):
            n = int(out.lengths[b])
            alone = enc(x[b:b + 1, :int(lengths[b])]).last_hidden_state
            assert alone.shape[1] == n
            torch.testing.assert_close(out.last_hidden_state[b, :n], alone[0], rtol=1e-5,
                                       atol=1e-5)
            torch.testing.assert_close(_stream(enc, x[b:b + 1, :int(lengths[b])]), alone,
                                       rtol=1e-5, atol=1e-5)


def test_conv_adapter_lengths_are_checked():
    ad = ConvAdapter(8, 8, 2, 3, 2)
    h = torch.randn(2, 9, 8)
    for bad in ([9, 9], torch.tensor([9.0, 9.0]), torch.tensor([9]), torch.tensor([True, True]),
                torch.tensor([9, 9], device="meta")):
        with pytest.raises(ValueError, match=r"lengths must be None or an integer tensor of "
                                             r"shape \(2,\)"):
            ad(h, bad)
    with torch.no_grad():
        torch.testing.assert_close(ad(h, torch.tensor([9, 9])), ad(h), rtol=0, atol=0)
