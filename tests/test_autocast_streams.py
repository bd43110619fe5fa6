"""Mixed precision: the ops follow their torch equivalents under autocast, and every stream gives
what the offline forward gives there (values within bf16 rounding, and the same dtype for every
output: empty steps and flush included).

Found by an autocast sweep (CPU bf16 autocast; CUDA autocast takes the same code):
- attention steps that emitted nothing returned float32 among bf16 frames, so a stack's flush (its
  last layer's empty piece) and CausalEncoder / hf.StreamingEncoder flushes returned their real
  frames as float32 (cat_time took the last piece's dtype);
- TransformerLayer's stream cast the residual to the attention output's dtype (a float32 input's
  residual rounded to bf16: the stream 3-4e-3 off offline and bf16, offline float32);
- Refiner / ConvNeXtBlock flush outputs took the state's dtype, not the steps' (a bf16 state);
- the fused ConvNeXt op (and ConvNeXtBlock(fused=True), StreamingDecoder(convnext_fused=True))
  refused a bf16 input with float32 weights under autocast;
- the attention ops refused mixed q / k / v dtypes under autocast where SDPA casts them;
- FeatureConv1d / PaddedConv1d steps cast a chunk of another dtype silently outside autocast
  (offline refused it); admit refused ConvNeXtBlock (its state is its conv's).

Tolerance: bf16 against float32 or another bf16 order of summation: 2**-6 relative to the
output's scale (operands rounded to 8 mantissa bits, a few roundings deep).
"""
import pytest
import torch

from pyencoder import IntervalMask
from pyencoder.models import (CausalEncoder, ConvNeXtBlock, EncoderConfig, FeatureConv1d,
                              PaddedConv1d)
from pyencoder.nn import (BandedSelfAttention, ChunkedSelfAttention, Refiner, TransformerLayer,
                          WavLMSelfAttention)
from pyencoder.ops import banded_attention, convnext_dwconv_ln, cross_attention
from pyencoder.streaming import StreamingSequential, admit

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)
TOL = 2 ** -6


def _close(a, b, tol=TOL):
    scale = b.float().abs().max().clamp(min=1e-6)
    err = float((a.float() - b.float()).abs().max() / scale)
    assert err <= tol, err


def _stream(m, x, sizes, state_dtype=None, axis=1):
    """Steps of the given sizes (cycled to the end of x), then flush, under autocast; returns
    the outputs (each kept, empty ones too)."""
    st = m.init_state(x.shape[0], dtype=state_dtype)
    outs, t, i = [], 0, 0
    while t < x.shape[axis]:
        n = sizes[i % len(sizes)]
        y, st = m.step(x.narrow(axis, t, min(n, x.shape[axis] - t)), st)
        outs.append(y)
        t, i = t + n, i + 1
    y, st = m.flush(st)
    outs.append(y)
    return outs


def _attention_modules():
    return [BandedSelfAttention(16, 2, left=6, right=2),
            ChunkedSelfAttention(16, 2, chunk_size=4, left_chunks=1, lookahead=1),
            WavLMSelfAttention(16, 2, chunk_size=2, left_chunks=2, lookahead=1, sink=2,
                               num_buckets=8, max_distance=16)]


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("i", range(3))
def test_attention_streams_every_output_in_the_offline_dtype(i, state_dtype):
    torch.manual_seed(i)
    m = _attention_modules()[i].eval()
    x = torch.randn(2, 23, 16)
    with torch.no_grad(), torch.autocast(**BF16):
        off = m(x)
        outs = _stream(m, x, [1, 0, 3, 5], state_dtype)
    assert off.dtype == torch.bfloat16
    assert {o.dtype for o in outs} == {torch.bfloat16}, [o.dtype for o in outs]
    _close(torch.cat(outs, 1), off)


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("norm_first", [True, False])
def test_transformer_layer_stream_keeps_the_residual_of_its_input(norm_first, state_dtype):
    """A float32 input: offline adds it to the bf16 branch in float32; the stream too (its
    residual was rounded to bf16). A bf16 input (a stack's inner layer): bf16 both ways."""
    torch.manual_seed(3)
    m = TransformerLayer(BandedSelfAttention(16, 2, left=6, right=2), 24,
                         norm_first=norm_first).eval()
    for x in (torch.randn(2, 19, 16), torch.randn(2, 19, 16).bfloat16()):
        with torch.no_grad(), torch.autocast(**BF16):
            off = m(x)
            outs = _stream(m, x, [1, 0, 4], state_dtype)
        assert {o.dtype for o in outs} == {off.dtype}, ([o.dtype for o in outs], off.dtype)
        tol = TOL if state_dtype is None or x.dtype == torch.bfloat16 else 2 * TOL
        _close(torch.cat(outs, 1), off, tol)


def test_stack_and_encoder_flush_in_the_steps_dtype():
    torch.manual_seed(4)
    seq = StreamingSequential(BandedSelfAttention(16, 2, left=6, right=2),
                              BandedSelfAttention(16, 2, left=6, right=0)).eval()
    x = torch.randn(2, 14, 16)
    with torch.no_grad(), torch.autocast(**BF16):
        off = seq(x)
        outs = _stream(seq, x, [4])
    assert {o.dtype for o in outs if o.shape[1]} == {torch.bfloat16}
    _close(torch.cat(outs, 1), off)
    enc = CausalEncoder(EncoderConfig(conv_dim=(8,) * 7, hidden_size=16, num_layers=2,
                                      num_heads=2, ffn_dim=24, left=20, lookahead=2)).eval()
    wav = torch.randn(1, 3200)
    with torch.no_grad(), torch.autocast(**BF16):
        off = enc(wav).last_hidden_state
        outs = _stream(enc, wav, [640])
    assert outs[-1].shape[1] and {o.dtype for o in outs} == {torch.bfloat16}
    _close(torch.cat(outs, 1), off)


@pytest.mark.parametrize("fused", [False, True])
def test_refiner_and_convnext_flush_in_the_steps_dtype_with_a_bf16_state(fused):
    torch.manual_seed(5)
    blk = ConvNeXtBlock(8, 16, fused=fused).eval()
    ref = Refiner(16, 4).eval()
    for m, x in ((blk, torch.randn(2, 10, 8)), (ref, torch.randn(2, 10, 16))):
        if m is ref and fused:
            continue
        with torch.no_grad(), torch.autocast(**BF16):
            off = m(x)
            st = m.init_state(2, dtype=torch.bfloat16)
            outs, t = [], 0
            for n in (3, 3, 4):
                y, st = m.step(x[:, t:t + n], st)
                outs.append(y)
                t += n
            y, st = m.flush(st)
            outs.append(y)
        assert {o.dtype for o in outs} == {off.dtype}, (type(m).__name__, [o.dtype for o in outs])
        _close(torch.cat(outs, 1), off)
        if m is blk:
            assert st.hist.dtype == torch.bfloat16      # the state keeps its dtype


def test_fused_convnext_under_autocast_follows_the_composed_ops():
    torch.manual_seed(6)
    x = torch.randn(2, 8, 20)
    w, b = torch.randn(8, 1, 7), torch.randn(8)
    lw, lb = torch.randn(8), torch.randn(8)
    with torch.autocast(**BF16):
        y = convnext_dwconv_ln(x.bfloat16(), w, b, lw, lb)
    want = torch.nn.functional.layer_norm(
        torch.nn.functional.conv1d(torch.nn.functional.pad(x.bfloat16().float(), (6, 0)),
                                   w.bfloat16().float(), b.bfloat16().float(), groups=8)
        .transpose(1, 2), (8,), lw.bfloat16().float(), lb.bfloat16().float(), 1e-6)
    assert y.dtype == torch.bfloat16
    _close(y, want)
    blk = ConvNeXtBlock(8, 16, fused=True).eval()
    plain = ConvNeXtBlock(8, 16, fused=False).eval()
    plain.load_state_dict(blk.state_dict())
    h = torch.randn(2, 12, 8).bfloat16()
    with torch.no_grad(), torch.autocast(**BF16):
        _close(blk(h), plain(h))


def test_attention_ops_cast_mixed_dtypes_as_sdpa():
    torch.manual_seed(7)
    q = torch.randn(1, 2, 9, 8).bfloat16()
    k = torch.randn(1, 2, 9, 8, requires_grad=True)
    v = torch.randn(1, 2, 9, 8, requires_grad=True)
    with torch.autocast(**BF16):
        y = banded_attention(q, k, v, left=2, right=1)
        yc = cross_attention(q, k, v, mask=IntervalMask.frames(1, 1, 2, 1))
    want = banded_attention(q.float(), k.bfloat16().float(), v.bfloat16().float(), left=2,
                            right=1)
    assert y.dtype == yc.dtype == torch.bfloat16
    _close(y, want)
    _close(yc, want)
    y.float().sum().backward()
    assert k.grad.dtype == v.grad.dtype == torch.float32
    with torch.autocast(**BF16):          # float64 is left as it is (autocast's rule)
        y64 = banded_attention(q.double(), k.double(), v.double(), left=2, right=1)
    assert y64.dtype == torch.float64
    with pytest.raises(TypeError, match="k must have the same dtype as q"):
        banded_attention(q, k, v, left=2, right=1)          # outside autocast: refused


def test_feature_conv_steps_refuse_another_dtype_and_admit_takes_convnext():
    x = torch.randn(1, 4, 12).bfloat16()
    for m in (FeatureConv1d(4, 4, 3, 2), PaddedConv1d(4, 4, 3, 1, 1)):
        with pytest.raises(TypeError, match=r"x must have the module's dtype \(torch.float32\)"):
            m.step(x, m.init_state(1))
    torch.manual_seed(8)
    m = ConvNeXtBlock(8, 16).eval()
    x, c = torch.randn(2, 40, 8), torch.randn(1, 24, 8)
    with torch.no_grad():
        st = m.init_state(2)
        for i in range(3):
            _, st = m.step(x[:, 4 * i:4 * i + 4], st)
        warm = admit(m, st, 0, [c[:, :4]], 4)
        ys = [torch.cat(warm, 1)]
        for i in range(1, 6):
            y = m.step_fixed(torch.cat([c[:, 4 * i:4 * i + 4], x[1:, 12 + 4 * i:16 + 4 * i]]), st)
            ys.append(y[:1])
        torch.testing.assert_close(torch.cat(ys, 1), m(c), rtol=1e-5, atol=1e-5)


def test_compiled_under_autocast_fullgraph():
    """The ops' autocast handling traces whole (the attention ops' first version entered the
    autocast context by hand: Dynamo refused it, graph breaks and fullgraph failures)."""
    torch.manual_seed(9)
    att = BandedSelfAttention(16, 2, left=6, right=2)
    blk = ConvNeXtBlock(8, 16, fused=True)
    x, h = torch.randn(2, 20, 16), torch.randn(2, 12, 8)

    def f(x, h):
        with torch.autocast(**BF16):
            return att(x), blk(h), cross_attention(x.view(2, 20, 2, 8).transpose(1, 2), x.view(
                2, 20, 2, 8).transpose(1, 2), x.view(2, 20, 2, 8).transpose(1, 2),
                mask=IntervalMask.frames(1, 1, 2, 0))
    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x, h)
    want = f(x, h)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_a_resumed_stream_flushes_as_the_uninterrupted_one():
    """The dtype a module records for its flush (the steps' input / output dtype, a Python
    attribute of the state) travels in state_dict ('__in_dtype__' / '__out_dtype__' entries):
    a stream saved and resumed flushes in the same dtype, to the same values; an entry that
    names no floating dtype is refused, a saved stream without one loads (as a fresh state)."""
    torch.manual_seed(10)
    mods = [TransformerLayer(BandedSelfAttention(16, 2, left=6, right=2), 24).eval(),
            Refiner(16, 4).eval(), ConvNeXtBlock(16, 24).eval()]
    x = torch.randn(2, 11, 16)
    for m in mods:
        with torch.no_grad(), torch.autocast(**BF16):
            st = m.init_state(2, dtype=torch.bfloat16)
            _, st = m.step(x[:, :6], st)
            saved = st.state_dict()
            keys = [k for k in saved if k.endswith("_dtype__")]
            assert keys and all(saved[k] == "float32" for k in keys), (type(m).__name__, keys)
            want, _ = m.flush(st)
            back = m.init_state(2, dtype=torch.bfloat16).load_state_dict(saved)
            got, _ = m.flush(back)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        with torch.autocast(**BF16):
            fresh = m.init_state(2, dtype=torch.bfloat16)
        bad = dict(saved, **{keys[0]: "int64"})
        with pytest.raises(ValueError, match="must name a floating torch dtype"):
            fresh.load_state_dict(bad)
        fresh.load_state_dict({k: v for k, v in saved.items() if k not in keys})
    # a checkpoint without the entries keeps the state's own (RunningGroupNorm's fresh one)
    from pyencoder.nn import RunningGroupNorm
    norm = RunningGroupNorm(2, 4)
    with torch.autocast(**BF16):
        st = norm.init_state(1, dtype=torch.bfloat16)
        old = {k: v for k, v in st.state_dict().items() if not k.endswith("_dtype__")}
        back = norm.init_state(1, dtype=torch.bfloat16).load_state_dict(old)
        assert norm.flush(back)[0].dtype == norm.flush(st)[0].dtype == torch.bfloat16


def test_decode_attention_refuses_mixed_dtypes():
    """The decode op computed in q's dtype whatever the rings held: a ring of another dtype
    than q is refused by name (the streaming modules always pass one dtype)."""
    from pyencoder.ops import decode_attention
    q = torch.randn(1, 2, 1, 8)
    ring = torch.randn(1, 2, 6, 8)
    args = (torch.tensor([[5]]), torch.tensor([1]), torch.tensor([6]), None, False, 1, 3, 0,
            8 ** -0.5)
    decode_attention(q, ring, ring.clone(), *args)
    for k, v, name in ((ring.half(), ring, "k_ring"), (ring, ring.bfloat16(), "v_ring")):
        with pytest.raises(TypeError, match=f"{name} must have q's dtype"):
            decode_attention(q, k, v, *args)


def test_meta_tensors_meet_the_dtype_checks_by_name():
    """The autocast test of the dtype checks asked torch about the meta device, which raises
    ("unknown device type for autocast"): a meta input of another dtype got that instead of the
    named refusal, and a meta module's init_state(dtype=) crashed; a meta module sizes a state in
    any dtype, as init_state(device="meta") does."""
    from pyencoder.nn import CausalConv1d
    m = CausalConv1d(4, 4, 3).to("meta")
    with pytest.raises(TypeError, match=r"x must have the module's dtype \(torch.float32\)"):
        m(torch.empty(1, 4, 9, device="meta", dtype=torch.bfloat16))
    assert m.init_state(1, dtype=torch.bfloat16).hist.dtype == torch.bfloat16


def test_an_autocast_state_stepped_outside_autocast_is_named():
    """A state made under autocast with init_state(dtype=bfloat16), stepped once outside it,
    failed inside the conv op naming neither the state nor autocast ("weight must have the
    same dtype as x (torch.bfloat16)"); a state of the parameters' dtype made under autocast
    steps anywhere, and the named refusal leaves the state usable under autocast."""
    torch.manual_seed(6)
    enc = CausalEncoder(EncoderConfig(conv_dim=(8,) * 7, hidden_size=16, num_layers=2,
                                      num_heads=2, ffn_dim=24, left=20, lookahead=2)).eval()
    att = BandedSelfAttention(16, 2, left=6, right=2).eval()
    wav, x = torch.randn(1, 3200), torch.randn(1, 8, 16)
    with torch.no_grad():
        for m, inp in ((enc, wav[:, :640]), (att, x)):
            with torch.autocast(**BF16):
                st = m.init_state(1, dtype=torch.bfloat16)
                plain = m.init_state(1)
            with pytest.raises(ValueError, match=r"holds torch.bfloat16 activations \(made under "
                                                 r"autocast.*step it under torch.autocast"):
                m.step(inp, st)
            with torch.autocast(device_type="cpu", dtype=torch.float16), \
                    pytest.raises(ValueError, match="holds torch.bfloat16"):
                m.step(inp, st)
            assert not st.ended
            with torch.autocast(**BF16):
                y, st = m.step(inp, st)
            m.step(inp, plain)                  # float32 state: no autocast needed
