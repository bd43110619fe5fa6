"""The causal convs under autocast follow F.conv1d / nn.Conv1d (CPU bf16 autocast here; CUDA
autocast takes the same code path).

Found by a streaming sweep: CausalConv1d's offline forward refused a bf16 input under autocast
("weight must have the same dtype as x") while its stream took it, so CausalEncoder(pos_conv=
"causal") and the HF patch with pos_conv="causal" could not run offline under autocast (mixed
precision training / distillation of the patched model failed at its positional conv).

Now: pyencoder.ops.causal_conv1d casts its floating inputs to the autocast dtype (float64 kept),
as F.conv1d does, so the output is in that dtype and gradients reach float32 weights as float32;
causal_conv1d_update computes in its state's dtype (the state is updated in place); the conv
modules' steps compute in the autocast dtype whatever their state's dtype (a float32 history
takes the concatenating path), every output of a stream (empty ones too) is in that dtype, and
the stream equals the offline forward.

Tolerance: bf16 against bf16 computed from the same bf16-rounded operands (the reference conv
accumulates in float32; the two differ by summation order and one final rounding): 2 bf16 ulps
relative to the output scale (2 * 2**-8); against float32 math, 2**-6 (operands rounded to
8 bits of mantissa).
"""
import pytest
import torch
import torch.nn.functional as F

from pyencoder.models import FeatureConv1d, PaddedConv1d
from pyencoder.nn import CausalConv1d
from pyencoder.ops import causal_conv1d, causal_conv1d_update
from pyencoder.streaming import run_stream

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _close(a, b, tol):
    scale = b.abs().max().clamp(min=1e-6)
    assert (a.float() - b.float()).abs().max() <= tol * scale, \
        float((a.float() - b.float()).abs().max() / scale)


def test_op_follows_f_conv1d_under_autocast():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 40)
    w = torch.randn(8, 2, 5, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    init = torch.randn(2, 8, 3)
    with torch.autocast(**BF16):
        y = causal_conv1d(x, w, b, stride=2, groups=4, initial_state=init)
        want = F.conv1d(torch.cat([init, x], -1), w, b, stride=2, groups=4)
    assert y.dtype == want.dtype == torch.bfloat16
    _close(y, want, 2 * 2 ** -8)
    y.float().square().sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    gw = w.grad.clone()
    w.grad = None
    want.float().square().sum().backward()
    _close(gw, w.grad, 2 ** -5)
    # a bf16 input with float32 weights (after an autocast Linear): taken, not refused
    with torch.autocast(**BF16):
        y16 = causal_conv1d(x.bfloat16(), w, b, stride=2, groups=4, initial_state=init)
    assert y16.dtype == torch.bfloat16
    # float64 stays float64 (autocast leaves it), outside autocast nothing changes
    with torch.autocast(**BF16):
        y64 = causal_conv1d(x.double(), w.double(), b.double(), groups=4)
    assert y64.dtype == torch.float64
    with pytest.raises(TypeError, match="weight must have the same dtype as x"):
        causal_conv1d(x.bfloat16(), w, b, groups=4)


def test_update_computes_in_the_states_dtype_under_autocast():
    torch.manual_seed(1)
    x = torch.randn(2, 6, 3)
    w, b = torch.randn(6, 1, 4), torch.randn(6)
    for sdt in (torch.float32, torch.bfloat16):
        st0 = torch.randn(2, 6, 3).to(sdt)
        st1 = st0.clone()
        with torch.autocast(**BF16):
            y = causal_conv1d_update(x, st0, w, b, groups=6)
        y_ref = causal_conv1d_update(x.to(sdt), st1, w.to(sdt), b.to(sdt), groups=6)
        assert y.dtype == sdt
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
        torch.testing.assert_close(st0, st1, rtol=0, atol=0)


def _modules():
    return [CausalConv1d(8, 8, 4, groups=8, activation="silu"), CausalConv1d(8, 6, 3, groups=2),
            CausalConv1d(8, 8, 6, stride=3), FeatureConv1d(8, 6, 5, 2),
            FeatureConv1d(8, 8, 4, 2, causal=True), PaddedConv1d(8, 8, 3, 1, 1)]


@pytest.mark.parametrize("i", range(6))
@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_modules_offline_and_stream_under_autocast(i, state_dtype):
    """Offline under autocast == nn.Conv1d's rule (bf16 out, a bf16 input taken); the stream in
    uniform steps (an empty one among them) and flush, from a float32 or a bf16 state, is bf16
    throughout and equals the offline forward; so is a ragged step's output."""
    torch.manual_seed(2 + i)
    m = _modules()[i].eval()
    x = torch.randn(2, 8, 37)
    with torch.no_grad():
        want32 = m(x)
        with torch.autocast(**BF16):
            off = m(x)
            off16 = m(x.bfloat16())
            st = m.init_state(2, dtype=state_dtype)
            outs, t = [], 0
            for n in (5, 0, 7, 6, 1, 18):
                y, st = m.step(x[..., t:t + n], st)
                assert y.dtype == torch.bfloat16, n
                outs.append(y)
                t += n
            y, st = m.flush(st)
            assert y.dtype == torch.bfloat16
            outs.append(y)
            rag, st = m.step(x[..., :9], m.init_state(2, dtype=state_dtype),
                             lengths=torch.tensor([9, 4]))
    assert off.dtype == off16.dtype == rag.dtype == torch.bfloat16
    _close(off, want32, 2 ** -6)
    _close(off16, off, 0)
    got = torch.cat(outs, -1)
    _close(got, off, 2 * 2 ** -8)
    _close(rag[:1], off[:1, :, :rag.shape[-1]], 2 * 2 ** -8)
    # run_stream (a state in the module's dtype) to the end
    with torch.no_grad(), torch.autocast(**BF16):
        y = run_stream(m, x, [5, 3, 9])
    assert y.dtype == torch.bfloat16
    _close(y, off, 2 * 2 ** -8)


def test_causal_positional_conv_under_autocast():
    """CausalEncoder(pos_conv="causal") and a wav2vec2 patched with pos_conv="causal" run
    offline under autocast (both refused at the positional conv before: the feature
    projection's bf16 output met the conv's float32 weights), close to their float32 outputs;
    the encoder's stream equals its offline forward there."""
    from pyencoder.models import CausalEncoder
    from test_models import tiny_encoder_config
    torch.manual_seed(7)
    enc = CausalEncoder(tiny_encoder_config(pos_conv="causal")).eval()
    wav = torch.randn(2, 1200)
    with torch.no_grad():
        want = enc(wav).last_hidden_state
        with torch.autocast(**BF16):
            got = enc(wav).last_hidden_state
            st = enc.init_state(2)
            ys = []
            for a, b in ((0, 500), (500, 720), (720, 1200)):
                y, st = enc.step(wav[:, a:b], st)
                ys.append(y)
            y, st = enc.flush(st)
            ys.append(y)
    assert got.dtype == torch.bfloat16
    _close(got, want, 2 ** -4)
    stream = torch.cat(ys, 1)
    _close(stream, got, 2 ** -4)
    transformers = pytest.importorskip("transformers")
    from pyencoder.hf import apply_pyencoder_to_wav2vec2
    cfg = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2)
    model = transformers.Wav2Vec2Model(cfg).eval()
    apply_pyencoder_to_wav2vec2(model, pos_conv="causal")
    wav = torch.randn(1, 800)
    with torch.no_grad():
        want = model(wav).last_hidden_state
        with torch.autocast(**BF16):
            got = model(wav).last_hidden_state
    assert got.dtype == torch.bfloat16
    _close(got, want, 2 ** -4)


def test_compat_layer_is_autocast_free_as_causal_conv1d():
    """pyencoder.compat.causal_conv1d under autocast computes as causal-conv1d does (no
    autocast: the promoted dtype, returned in x's): final states are x's values exactly (they
    came back rounded to bf16), every update path gives one precision (the gathering path
    computed in bf16, the in-place one in float32), and an fp16 update with float32 weights
    under bf16 autocast runs (autocast's cat refused the mix)."""
    from pyencoder.compat.causal_conv1d import causal_conv1d_fn, causal_conv1d_update as upd
    torch.manual_seed(11)
    x, w, b = torch.randn(2, 3, 9), torch.randn(3, 4), torch.randn(3)
    with torch.autocast(**BF16):
        y, fs = causal_conv1d_fn(x, w, b, return_final_states=True)
    y_ref, fs_ref = causal_conv1d_fn(x, w, b, return_final_states=True)
    assert y.dtype == fs.dtype == torch.float32
    torch.testing.assert_close(fs, x[..., -3:], rtol=0, atol=0)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    xs, st = torch.randn(2, 3, 1), torch.randn(2, 3, 3)
    want = upd(xs, st.clone(), w, b)
    with torch.autocast(**BF16):
        fast = upd(xs, st.clone(), w, b)
        longer = upd(xs, torch.cat([torch.randn(2, 3, 2), st], 2), w, b)   # gathering path
        wg = w.clone().requires_grad_()
        graph = upd(xs, st.clone(), wg, b)
        half = upd(xs.half(), st.half(), w, b)
    for got in (fast, longer, graph):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert half.dtype == torch.float16
