"""The channel LayerNorm + GELU kernel (triton_kernels/channel_norm.py: on CUDA, a "layer"
feature extractor's conv-layer norm and activation, ChannelLayerNorm.norm_gelu) against torch's
ops (gelu(layer_norm(x.transpose(1, 2)).transpose(1, 2))).

CPU under TRITON_INTERPRET=1 (``_ring_write_triton.FORCE_INTERPRET``, which the launcher shares):
random x (outputs NaN-poisoned before the launch) with channel counts that are not a power of two,
frame counts that are not a multiple of the tile, with and without the affine and the GELU,
float32 / float16 (bfloat16 on a GPU: the interpreter truncates float32 -> bfloat16), strided
input, empty tensors; the module takes the kernel only where it applies (not while autograd
records, not for float64, a lone weight or other dtypes, too many channels, with
PYENCODER_FUSED_RING=0, an approximate GELU); a CausalEncoder with a "layer" extractor gives the
same offline and streamed outputs with it. GPU (``-m gpu``): compiled, bfloat16 included, at the
shapes of a wav2vec2-large extractor's 80 ms step.
"""
import pytest
import torch
from torch import nn

from _stream_utils import spy_calls
from _norm_kernel_utils import (DEV as _DEV, NEEDS_TRITON_RUN, check_act as _check, force_fused,
                                norm_inputs)

pytestmark = NEEDS_TRITON_RUN

from pyencoder.models.frontend import FeatureConvLayer, _exact_gelu  # noqa: E402
from pyencoder.ops import _channel_norm_triton as CN  # noqa: E402


@pytest.fixture(autouse=True)
def _force(monkeypatch):
    force_fused(monkeypatch, CN)


def _torch(x, w, b, eps, gelu):
    y = torch.nn.functional.layer_norm(x.transpose(1, 2), (x.shape[1],), w, b,
                                       eps).transpose(1, 2)
    return torch.nn.functional.gelu(y) if gelu else y


@pytest.mark.parametrize("dt", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,C,T", [(1, 16, 4), (2, 21, 37), (3, 512, 20), (2, 7, 1)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("gelu", [True, False])
def test_kernel_equals_torch(dt, B, C, T, affine, gelu):
    x, w, b = norm_inputs(B, C, T, dt, affine, seed=B * 1000 + C + T)
    y = CN.channel_norm_act(x, w, b, 1e-5, gelu=gelu)
    assert y.dtype == dt and y.shape == x.shape and y.is_contiguous()
    _check(y, _torch(x, w, b, 1e-5, gelu), dt)


def test_kernel_strided_input_and_empty():
    torch.manual_seed(1)
    x = torch.randn(2, 40, 24).transpose(1, 2).to(_DEV)     # (2, 24, 40), time stride 24
    w, b = torch.randn(24, device=_DEV), torch.randn(24, device=_DEV)
    _check(CN.channel_norm_act(x, w, b, 1e-5), _torch(x, w, b, 1e-5, True), torch.float32)
    # the (B, T, C) layout a LayerNorm over the transposed view returns (the feature projection)
    y = CN.channel_norm_act(x, w, b, 1e-5, gelu=False, time_major=True)
    assert y.shape == x.shape and y.transpose(1, 2).is_contiguous()
    _check(y, _torch(x, w, b, 1e-5, False), torch.float32)
    for shape in ((2, 24, 0), (0, 24, 5)):
        e = torch.randn(*shape, device=_DEV)
        assert CN.channel_norm_act(e, w, b, 1e-5).shape == shape


def test_fused_ok_conditions(monkeypatch):
    x = torch.randn(2, 8, 5, device=_DEV)
    w, b = torch.randn(8, device=_DEV), torch.randn(8, device=_DEV)
    assert CN.fused_ok(x, w, b) and CN.fused_ok(x, None, None)
    assert not CN.fused_ok(x.double(), w.double(), b.double())
    assert not CN.fused_ok(x, w, None)
    assert not CN.fused_ok(x, w.half(), b.half())
    assert not CN.fused_ok(torch.randn(1, CN.MAX_C + 1, 2, device=_DEV), None, None)
    assert not CN.fused_ok(x[0], w, b)
    wg = w.clone().requires_grad_()
    assert not CN.fused_ok(x, wg, b)
    with torch.no_grad():
        assert CN.fused_ok(x, wg, b)
    monkeypatch.setenv("PYENCODER_FUSED_RING", "0")
    assert not CN.fused_ok(x, w, b)


def test_exact_gelu_recognised():
    assert _exact_gelu(nn.GELU()) and not _exact_gelu(nn.GELU(approximate="tanh"))
    assert not _exact_gelu(nn.SiLU())
    transformers = pytest.importorskip("transformers")
    from transformers.activations import GELUActivation
    assert _exact_gelu(GELUActivation())
    assert not _exact_gelu(GELUActivation(use_gelu_python=True))
    del transformers


def test_feature_conv_layer_takes_the_kernel_where_it_applies(monkeypatch):
    torch.manual_seed(2)
    layer = FeatureConvLayer(4, 12, 3, 2, False, "layer", False).to(_DEV).eval()
    with torch.no_grad():
        layer.layer_norm.weight.normal_()
        layer.layer_norm.bias.normal_()
    calls = _spy(monkeypatch)
    x = torch.randn(2, 4, 41, device=_DEV)
    with torch.no_grad():
        y = layer(x)
        assert calls
        want = torch.nn.functional.gelu(layer.layer_norm(layer.conv(x)))
        _check(y, want, torch.float32)
    calls.clear()
    y2 = layer(x)                        # autograd records: torch's ops (differentiable)
    assert not calls and y2.requires_grad
    y2.sum().backward()
    assert layer.layer_norm.weight.grad is not None
    layer.activation = nn.GELU(approximate="tanh")
    with torch.no_grad():
        layer(x)
    assert not calls


def _spy(monkeypatch):
    return spy_calls(monkeypatch, CN, "channel_norm_act")


def test_layer_norm_module_reads_a_transposed_input(monkeypatch):
    """pyencoder.nn.LayerNorm: nn.LayerNorm's keys and results; the (B, T, C) view of a
    (B, C, T) tensor in one launch (contiguous output, as torch's), everything else torch's:
    a contiguous input, one frame, another normalized shape, autograd recording, float64."""
    from pyencoder.nn import LayerNorm
    from pyencoder.streaming.protocol import is_pointwise
    torch.manual_seed(5)
    ln = LayerNorm(24, eps=1e-6).to(_DEV)
    ref = nn.LayerNorm(24, eps=1e-6).to(_DEV)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    ref.load_state_dict(ln.state_dict())
    assert list(ln.state_dict()) == list(ref.state_dict()) and is_pointwise(ln)
    calls = _spy(monkeypatch)
    x = torch.randn(3, 24, 19, device=_DEV) * 2 + 0.3
    with torch.no_grad():
        y = ln(x.transpose(1, 2))
        assert calls == [1] and y.is_contiguous() and y.shape == (3, 19, 24)
        _check(y, ref(x.transpose(1, 2)), torch.float32)
        for other in (x.transpose(1, 2).contiguous(), x[..., :1].transpose(1, 2)):
            torch.testing.assert_close(ln(other), ref(other), rtol=0, atol=0)
        ln.double()(x.double().transpose(1, 2))
        ln.float()
    assert calls == [1]
    y = ln(x.transpose(1, 2))                           # autograd: torch's, differentiable
    assert calls == [1] and y.requires_grad


def test_convnext_block_norm_and_layer_scale(monkeypatch):
    """ConvNeXtBlock: the depthwise conv's output normalised as it lies (one launch offline,
    per step and per fixed step) and x + gamma * h as one addcmul; equal to the torch
    composition offline, streamed and in its fixed steps."""
    from pyencoder.models.decoder import ConvNeXtBlock
    torch.manual_seed(6)
    blk = ConvNeXtBlock(16, 24, kernel_size=5, layer_scale_init=0.3).to(_DEV).eval()
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(0.1 * torch.randn_like(p))

    def composed(x):
        h = blk.dwconv(x.transpose(1, 2)).transpose(1, 2)
        h = blk.pwconv2(blk.act(blk.pwconv1(nn.functional.layer_norm(
            h, (16,), blk.norm.weight, blk.norm.bias, blk.norm.eps))))
        return x + h * blk.gamma
    calls = _spy(monkeypatch)
    x = torch.randn(2, 23, 16, device=_DEV)
    with torch.no_grad():
        want = composed(x)
        _check(blk(x), want, torch.float32)
        assert calls == [1]
        st = blk.init_state(2)
        outs = []
        for t, c in ((0, 3), (3, 4), (7, 8), (15, 8)):
            if t < 7:
                y, st = blk.step(x[:, t:t + c], st)
            else:
                y = blk.step_fixed(x[:, t:t + c], st)
            outs.append(y)
        assert len(calls) == 5
        _check(torch.cat(outs, 1), want, torch.float32)


def test_decoder_embed_norm_reads_the_conv_output(monkeypatch):
    """The decoder's embed LayerNorm (after the conv and a Transpose) and every block's norm:
    one launch each per call; the stream equals offline."""
    from pyencoder.models import DecoderConfig, StreamingDecoder
    from pyencoder.nn import LayerNorm
    torch.manual_seed(7)
    m = StreamingDecoder(DecoderConfig(input_dim=6, dim=16, intermediate_dim=24, num_blocks=2,
                                       samples_per_frame=5)).to(_DEV).eval()
    assert isinstance(m.net[3], LayerNorm)
    calls = _spy(monkeypatch)
    x = torch.randn(2, 20, 6, device=_DEV)
    with torch.no_grad():
        want = m(x)
        assert len(calls) == 3
        st = m.init_state(2)
        outs = []
        for t in range(0, 20, 4):
            y, st = m.step(x[:, t:t + 4], st)
            outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), want, rtol=1e-5, atol=1e-5)


def test_feature_projection_reads_the_transposed_features(monkeypatch):
    """The encoder's feature projection LayerNorm on the (B, T, C) view of the conv features:
    one launch reading them as they lie (torch's layer_norm would copy them first), equal to
    torch's; not for a contiguous (B, T, C) input or a LayerNorm without bias."""
    from pyencoder.models.encoder import FeatureProjection
    torch.manual_seed(5)
    fp = FeatureProjection(24, 16, True, 1e-5).to(_DEV).eval()
    with torch.no_grad():
        fp.layer_norm.weight.normal_()
        fp.layer_norm.bias.normal_()
    calls = []
    real = CN.channel_norm_act
    monkeypatch.setattr(CN, "channel_norm_act", lambda *a, **k: calls.append(1) or real(*a, **k))
    feats = torch.randn(2, 24, 9, device=_DEV)
    with torch.no_grad():
        h, n = fp(feats.transpose(1, 2))
        assert calls == [1] and n.is_contiguous()
        want = torch.nn.functional.layer_norm(feats.transpose(1, 2), (24,),
                                              fp.layer_norm.weight, fp.layer_norm.bias, 1e-5)
        _check(n, want, torch.float32)
        torch.testing.assert_close(h, fp.projection(want), rtol=1e-5, atol=1e-5)
        fp(feats.transpose(1, 2).contiguous())
        assert calls == [1]


def test_encoder_with_a_layer_extractor():
    """A CausalEncoder with a "layer" extractor (WavLM-large's kind): offline and streamed
    (general steps, then step_fixed) through the kernel, equal to its torch path."""
    from _stream_utils import rel_err
    from pyencoder.models import CausalEncoder
    from test_models import tiny_encoder_config
    torch.manual_seed(3)
    m = CausalEncoder(tiny_encoder_config(feat_extract_norm="layer", left=6)).to(_DEV).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    n = m.hop * 2
    x = torch.randn(2, n * 8, device=_DEV)
    with torch.no_grad():
        ref = m(x).last_hidden_state
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(CN, "fused_ok", lambda *a: False)
            want = m(x).last_hidden_state
        assert rel_err(ref, want) <= 1e-5
        st = m.init_state(2, max_chunk=4)
        outs = []
        for i in range(8):
            if i < 4:
                y, st = m.step(x[:, i * n:(i + 1) * n], st)
                y = y[:, :int(st.out_lengths[0])]
            else:
                y = m.step_fixed(x[:, i * n:(i + 1) * n], st, check=i == 4)
            outs.append(y)
        got = torch.cat(outs, 1)
    assert rel_err(got, ref[:, :got.shape[1]]) <= 1e-5


@pytest.mark.gpu
@pytest.mark.gpu_quick
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_kernel_at_the_extractor_shapes(dt):
    """Compiled on the GPU (bf16 only here): C = 512 at an 80 ms step's frame counts per conv
    layer of wav2vec2-large's extractor, and an utterance's first layer offline."""
    torch.manual_seed(4)
    for B, T in ((1, 256), (1, 128), (1, 4), (4, 3200)):
        x = torch.randn(B, 512, T, device="cuda").to(dt)
        w = (1 + 0.3 * torch.randn(512, device="cuda")).to(dt)
        b = (0.2 * torch.randn(512, device="cuda")).to(dt)
        _check(CN.channel_norm_act(x, w, b, 1e-5), _torch(x, w, b, 1e-5, True), dt)


@NEEDS_TRITON_RUN
def test_not_taken_under_autocast_for_half_inputs():
    """autocast runs layer_norm in float32 (CUDA's list; a float32 output): the fused kernel
    returns x's dtype, so a half input under autocast takes torch's layer_norm (the drop-in's
    dtype), float32 inputs keep the kernel."""
    x = torch.randn(1, 8, 5, dtype=torch.bfloat16, device=_DEV)
    w = torch.ones(8, dtype=torch.bfloat16, device=_DEV)
    assert CN.fused_ok(x, w, torch.zeros_like(w))
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        assert not CN.fused_ok(x, w, torch.zeros_like(w))
        assert CN.fused_ok(x.float(), w.float(), torch.zeros_like(w).float())
