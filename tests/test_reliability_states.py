"""Stream states carry what made them (issue 13, items 2 and 4): a state from another module
configuration, batch size, dtype or type is refused by step / flush / load_state_dict with a
message naming both sides; corrupt saved states and bad init_state / lengths arguments raise
ValueError / TypeError naming the argument. Round trips keep working."""
import copy
import io
import sys

import pytest
import torch

from pyencoder.models import CausalEncoder, StreamingDecoder
from pyencoder.nn import (BandedSelfAttention, CausalConv1d, ChunkedSelfAttention,
                          RunningGroupNorm, TransformerLayer, WavLMSelfAttention)
from pyencoder.nn.refiner import Refiner
from pyencoder.streaming import StreamingSequential, reset

sys.path.insert(0, __import__("os").path.dirname(__file__))
from test_models import tiny_decoder_config, tiny_encoder_config  # noqa: E402


def _att(**kw):
    return BandedSelfAttention(16, 2, **{"left": 6, "right": 1, **kw})


# name -> (make module a, make module b with another configuration, input (B, n) maker[, input
# maker for b])
PAIRS = {
    "banded_left": (lambda: _att(), lambda: _att(left=100), lambda B, n: torch.randn(B, n, 16)),
    "banded_dim": (lambda: _att(), lambda: BandedSelfAttention(32, 2, left=6, right=1),
                   lambda B, n: torch.randn(B, n, 16), lambda B, n: torch.randn(B, n, 32)),
    "chunked": (lambda: ChunkedSelfAttention(16, 2, chunk_size=2, left_chunks=1),
                lambda: ChunkedSelfAttention(16, 2, chunk_size=2, left_chunks=None),
                lambda B, n: torch.randn(B, n, 16)),
    "wavlm": (lambda: WavLMSelfAttention(16, 2, left=4, right=1),
              lambda: WavLMSelfAttention(16, 2, left=4, right=1, num_buckets=16, max_distance=40),
              lambda B, n: torch.randn(B, n, 16)),
    "conv": (lambda: CausalConv1d(4, 4, 3), lambda: CausalConv1d(4, 4, 5),
             lambda B, n: torch.randn(B, 4, n)),
    "norm": (lambda: RunningGroupNorm(4), lambda: RunningGroupNorm(4, eps=1e-3),
             lambda B, n: torch.randn(B, 4, n)),
    "refiner": (lambda: Refiner(8, 2), lambda: Refiner(8, 3), lambda B, n: torch.randn(B, n, 8)),
    "layer": (lambda: TransformerLayer(_att(), 24), lambda: TransformerLayer(_att(), 24,
                                                                             norm_first=False),
              lambda B, n: torch.randn(B, n, 16)),
    "layer_attention": (lambda: TransformerLayer(_att(), 24),
                        lambda: TransformerLayer(_att(left=2), 24),
                        lambda B, n: torch.randn(B, n, 16)),
    "stack": (lambda: StreamingSequential(_att(), torch.nn.GELU()),
              lambda: StreamingSequential(_att(), torch.nn.ReLU()),
              lambda B, n: torch.randn(B, n, 16)),
    "encoder": (lambda: CausalEncoder(tiny_encoder_config()),
                lambda: CausalEncoder(tiny_encoder_config(left=3)),
                lambda B, n: torch.randn(B, 20 * n)),
    "decoder": (lambda: StreamingDecoder(tiny_decoder_config()),
                lambda: StreamingDecoder(tiny_decoder_config(attention_left=2)),
                lambda B, n: torch.randn(B, n, 6)),
}


def _feed(m, st, x):
    with torch.no_grad():
        return m.step(x, st)


@pytest.mark.parametrize("name", list(PAIRS))
def test_state_of_another_configuration_is_refused(name):
    make_a, make_b, inp = PAIRS[name][:3]
    inp_b = PAIRS[name][3] if len(PAIRS[name]) > 3 else inp
    torch.manual_seed(len(name))
    a, b = make_a().eval(), make_b().eval()
    sa = a.init_state(2)
    _, sa = _feed(a, sa, inp(2, 5))
    with pytest.raises(ValueError, match="state was made by"):
        _feed(b, sa, inp_b(2, 3))
    if hasattr(b, "flush"):
        with pytest.raises(ValueError, match="state was made by"):
            b.flush(sa)
    with pytest.raises((ValueError, KeyError), match="does not match"):
        b.init_state(2).load_state_dict(sa.state_dict())


@pytest.mark.parametrize("name", list(PAIRS))
def test_state_dict_roundtrip_batch_and_dtype(name):
    """Round trip through torch.save (weights_only) resumes the stream exactly; another batch
    size or dtype is refused and leaves the target untouched."""
    make_a, _, inp = PAIRS[name][:3]
    torch.manual_seed(3 + len(name))
    a = make_a().eval()
    x1, x2 = inp(3, 5), inp(3, 4)
    st = a.init_state(3)
    _, st = _feed(a, st, x1)
    buf = io.BytesIO()
    torch.save(st.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = a.init_state(3).load_state_dict(saved)
    y_ref, _ = _feed(a, st, x2)
    y, _ = _feed(a, resumed, x2)
    assert torch.equal(y, y_ref)
    two = a.init_state(2)
    before = {k: v.clone() for k, v in two.tensors().items()}
    with pytest.raises(ValueError, match=r"shape .*this state holds"):
        two.load_state_dict(saved)
    assert all(torch.equal(v, before[k]) for k, v in two.tensors().items())
    other = copy.deepcopy(a).double().init_state(3)   # a float64 module's state
    if any(v.dtype != saved[k].dtype for k, v in other.tensors().items()):
        with pytest.raises(ValueError, match="dtype"):
            other.load_state_dict(saved)


def test_load_into_larger_ring_refused():
    """Issue 13: a left=6 state loaded into a left=100 stream used to shrink its ring."""
    a, b = _att(), _att(left=100)
    sd = a.init_state(1).state_dict()
    st = b.init_state(1)
    with pytest.raises(ValueError, match=r"left=6.*left=100"):
        st.load_state_dict(sd)
    assert st.k.shape[2] == 100 + 1 + 64


def test_unbounded_ring_grows_and_round_trips():
    m = BandedSelfAttention(16, 2, left=None, right=1, max_context=4096).eval()
    st = m.init_state(1, max_chunk=4)
    x = torch.randn(1, 200, 16)
    with torch.no_grad():
        _, st = m.step(x[:, :150], st)
        assert st.k.shape[2] > m.init_state(1, max_chunk=4).k.shape[2]
        st2 = m.init_state(1, max_chunk=4).load_state_dict(st.state_dict())
        assert torch.equal(m.step(x[:, 150:], st)[0], m.step(x[:, 150:], st2)[0])


def test_wrong_state_type_and_corrupt_values():
    att, conv = _att(), CausalConv1d(16, 16, 3)
    with pytest.raises(TypeError, match="AttentionState.*got ConvState"):
        att.step(torch.randn(1, 2, 16), conv.init_state(1))
    with pytest.raises(TypeError, match="ConvState.*got AttentionState"):
        conv.step(torch.randn(1, 16, 2), att.init_state(1))
    sd = att.init_state(2).state_dict()
    with pytest.raises(TypeError, match="pos must be a torch.Tensor; got int"):
        att.init_state(2).load_state_dict({**sd, "pos": 3})
    with pytest.raises(ValueError, match="pos must be >= 0"):
        att.init_state(2).load_state_dict({**sd, "pos": torch.tensor([4, -1])})
    with pytest.raises(ValueError, match="pending"):
        att.init_state(2).load_state_dict({**sd, "pending": torch.tensor([1000, 0])})
    with pytest.raises(ValueError, match="dtype"):
        att.init_state(2).load_state_dict({**sd, "pos": torch.tensor([1.0, 2.0])})
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        att.init_state(2).load_state_dict([1, 2])
    with pytest.raises(KeyError, match="__config__"):
        att.init_state(2).load_state_dict({k: v for k, v in sd.items() if "config" not in k})


def test_embed_dim_mismatch_names_both():
    """Issue 13: an E=16 state in an E=32 module failed with a broadcast error in ring.py."""
    a, b = BandedSelfAttention(16, 2, left=6, right=1), BandedSelfAttention(32, 2, left=6, right=1)
    with pytest.raises(ValueError, match=r"embed_dim=16.*embed_dim=32"):
        b.step(torch.randn(1, 3, 32), a.init_state(1))


@pytest.mark.parametrize("name", list(PAIRS))
def test_init_state_arguments(name):
    m = PAIRS[name][0]()
    for bad in (2.0, True, "2", None):
        with pytest.raises(TypeError, match="batch_size must be an int >= 1"):
            m.init_state(bad)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            m.init_state(bad)
    for bad in (torch.int64, torch.bool, "float32"):
        with pytest.raises(TypeError, match="dtype must be None or a floating"):
            m.init_state(1, dtype=bad)


@pytest.mark.parametrize("name", list(PAIRS))
def test_init_state_dtype_and_device_must_be_the_modules(name):
    """A dtype or device other than the weights' used to fail only at the first step (inside a
    kernel's dtype check), or to run mixed: a float64 state under a float32 attention took float32
    chunks and cast them into its ring silently."""
    m = PAIRS[name][0]().eval()
    x = PAIRS[name][2](1, 4)
    if name == "norm":  # no weights to match: its statistics are float64 whatever the input
        for dt in (torch.float32, torch.float64):
            _feed(m, m.init_state(1, dtype=dt), x.to(dt))
        return
    for dt in (torch.float64, torch.bfloat16):
        with pytest.raises(TypeError, match=rf"{type(m).__name__}\.init_state: dtype "
                                            rf"\({dt}\) must be the module's parameter dtype "
                                            rf"\(torch.float32\).*module.to"):
            m.init_state(1, dtype=dt)
    sized = m.init_state(1, device="meta")       # sizing a state without memory is allowed
    assert all(t.device.type == "meta" for t in sized.tensors().values())
    with pytest.raises(ValueError, match=r"device \(cpu\) must be the module's parameter "
                                         r"device \(meta\)"):
        copy.deepcopy(m).to("meta").init_state(1, device="cpu")
    _feed(m, m.init_state(1, dtype=torch.float32, device="cpu"), x)
    m64 = PAIRS[name][0]().eval().double()
    _feed(m64, m64.init_state(1, dtype=torch.float64), x.double())


def test_encoder_step_refuses_audio_of_another_dtype():
    """Offline refused float64 audio into a float32 model; a step cast it silently."""
    m = CausalEncoder(tiny_encoder_config()).eval()
    st = m.init_state(1)
    for call in (lambda w: m(w), lambda w: m.step(w, st), lambda w: m.step_fixed(w, st)):
        with pytest.raises(TypeError, match=r"wav must have the model's dtype \(torch.float32\); "
                                            r"got torch.float64"):
            call(torch.randn(1, 320, dtype=torch.float64))
    assert int(st.out_lengths[0]) == 0 and int(st.frontend.convs[0].seen[0]) == 0


def test_max_context_must_be_int():
    for bad in (True, 2.0):
        with pytest.raises(TypeError, match="max_context"):
            BandedSelfAttention(16, 2, left=None, right=1, max_context=bad)
    with pytest.raises(ValueError, match="max_context"):
        BandedSelfAttention(16, 2, left=None, right=1, max_context=0)


# ---- item 4: lengths --------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PAIRS))
def test_step_lengths_checked(name):
    make_a, _, inp = PAIRS[name][:3]
    m = make_a().eval()
    x = inp(2, 4)
    n = x.shape[-1] if isinstance(m, (CausalConv1d, RunningGroupNorm)) or name == "encoder" \
        else x.shape[1]
    for bad in (torch.tensor([n + 1, 1]), torch.tensor([-1, 1]), [n, n + 3]):
        with pytest.raises(ValueError, match=rf"lengths must lie in \[0, {n}\]"):
            _feed_len(m, m.init_state(2), x, bad)
    for bad in (torch.tensor([1.0, 2.0]), torch.tensor([True, False]), [1.5, 2], 2.0):
        with pytest.raises(TypeError, match="lengths"):
            _feed_len(m, m.init_state(2), x, bad)
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\)"):
        _feed_len(m, m.init_state(2), x, torch.tensor([1, 1, 1]))


def _feed_len(m, st, x, lengths):
    with torch.no_grad():
        return m.step(x, st, lengths)


def test_conv_lengths_regression():
    """Issue 13: CausalConv1d.step accepted lengths beyond the chunk and corrupted the slot."""
    conv = CausalConv1d(3, 3, 4)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 5\]"):
        conv.step(torch.randn(2, 3, 5), conv.init_state(2), torch.tensor([9, 5]))


def test_encoder_lengths_name_the_samples():
    """CausalEncoder.step reported a conv layer's frame range instead of the samples given."""
    enc = CausalEncoder(tiny_encoder_config()).eval()
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 300\]"):
        enc.step(torch.randn(2, 300), enc.init_state(2), torch.tensor([301, 2]))


# ---- item 5: mask bounds near int64 ------------------------------------------------------------

def test_huge_windows_are_exact_and_offsets_named():
    from pyencoder.ops import banded_attention, chunked_attention
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    full = banded_attention(q, k, v, left=None, right=10 ** 6)
    for big in (sys.maxsize, 2 ** 63, 2 ** 62 + 5, 2 ** 100):
        assert torch.equal(banded_attention(q, k, v, left=None, right=big), full)
        assert torch.equal(banded_attention(q, k, v, left=big, right=big), full)
        assert torch.equal(chunked_attention(q, k, v, chunk_size=big, left_chunks=big,
                                             lookahead=big), full)
        assert torch.equal(chunked_attention(q, k, v, chunk_size=4, left_chunks=big,
                                             lookahead=0),
                           chunked_attention(q, k, v, chunk_size=4, left_chunks=None))
    band = banded_attention(q, k, v, left=3, right=1)
    off = 1 << 52
    assert torch.equal(banded_attention(q, k, v, left=3, right=1, q_offset=off, k_offset=off),
                       band)
    for name in ("q_offset", "k_offset"):
        for bad in (2 ** 62, 2 ** 63, 2 ** 70):
            with pytest.raises(ValueError, match=rf"{name} must be <= {off}"):
                banded_attention(q, k, v, left=3, right=1, **{name: bad})


def test_huge_window_modules():
    x = torch.randn(1, 12, 16)
    wide = BandedSelfAttention(16, 2, left=None, right=sys.maxsize).eval()
    ref = BandedSelfAttention(16, 2, left=None, right=100).eval()
    ref.load_state_dict(wide.state_dict())
    with torch.no_grad():
        assert torch.equal(wide(x), ref(x))
    with pytest.raises(ValueError, match="max_context"):
        wide.init_state(1)
    with pytest.raises(ValueError, match="max_context"):
        BandedSelfAttention(16, 2, left=2 ** 40, right=1).init_state(1)


def test_hf_streaming_encoder_state_of_another_patch_refused():
    pytest.importorskip("transformers")
    import pyencoder.hf as H
    from test_hf import make_model
    torch.manual_seed(5)
    encs = []
    for lookahead in (2, 1):
        model = make_model("w2v2_pre").eval()
        H.apply_pyencoder_to_wav2vec2(model, lookahead_frames=lookahead, left_frames=3,
                                      pos_conv="causal")
        encs.append(H.StreamingEncoder(model))
    a, b = encs
    x = torch.randn(1, 400)
    with torch.no_grad():
        _, st = a.step(x, a.init_state(1))
        with pytest.raises(ValueError, match="state was made by"):
            b.step(x, st)
        with pytest.raises(ValueError, match="state was made by"):
            b.flush(st)
        with pytest.raises(ValueError, match="does not match"):
            b.init_state(1).load_state_dict(st.state_dict())
        with pytest.raises(ValueError, match="shape"):
            a.init_state(2).load_state_dict(st.state_dict())
        with pytest.raises(TypeError, match="EncoderStreamState"):
            a.step(x, a.attn[0].init_state(1))
        for bad in (0, 1.0, True):
            with pytest.raises((TypeError, ValueError), match="batch_size"):
                a.init_state(bad)
        st = a.init_state(1)                # the encoder's records travel to its state
        assert st.weights_dtype == torch.float32 and st.config is not None
        a.double()
        with pytest.raises(ValueError, match=r"StreamingEncoder: this state was made when"):
            a.step(x.double(), st)


def test_counters_beyond_their_buffers_refused():
    ref, layer = Refiner(8, 2), TransformerLayer(_att(), 24)
    sd = ref.init_state(2).state_dict()
    with pytest.raises(ValueError, match="count"):
        ref.init_state(2).load_state_dict({**sd, "count": torch.tensor([0, 3])})
    sd = layer.init_state(1).state_dict()
    with pytest.raises(ValueError, match="count"):
        layer.init_state(1).load_state_dict({**sd, "count": torch.tensor([10 ** 6])})


def test_huge_windows_in_biased_and_dropout_attention():
    from pyencoder.nn.relpos import biased_interval_attention, relative_position_bucket
    from pyencoder.ops.attention_dropout import interval_attention_dropout
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    table = torch.randn(320, 2)
    full = biased_interval_attention(q, k, v, None, table, relative_position_bucket,
                                     hi_off=10 ** 6)
    big = biased_interval_attention(q, k, v, None, table, relative_position_bucket,
                                    lo_off=sys.maxsize, hi_off=sys.maxsize)
    assert torch.equal(big, full)
    g = torch.Generator().manual_seed(0)
    a = interval_attention_dropout(q, k, v, block=1, lo_off=-1, hi_off=10 ** 6, dropout_p=0.3,
                                   generator=g)
    g.manual_seed(0)
    b = interval_attention_dropout(q, k, v, block=1, lo_off=2 ** 70, hi_off=sys.maxsize,
                                   dropout_p=0.3, generator=g)
    assert torch.equal(a, b)


def test_ring_capacity_and_sink_fields_are_checked_on_load():
    """A bounded attention ring is indexed by position % its capacity: a checkpoint whose ring
    has another length (or k and v of different lengths) is refused, naming max_chunk (it
    loaded and resumed 0.1-1 off); an unbounded ring may differ (it grows) but must hold every
    key. A FrameCrossAttention checkpoint of a mask with sink keys that lacks sink_k / sink_v is
    refused (it resumed on zero sink keys, 0.25 off); one of a mask without sinks may lack them
    (saved before the fields existed)."""
    from pyencoder import IntervalMask
    from pyencoder.nn import FrameCrossAttention
    from pyencoder.streaming.state import StateKeyError
    torch.manual_seed(0)
    m = _att()
    x = torch.randn(1, 20, 16)
    with torch.no_grad():
        st = m.init_state(1, max_chunk=4)
        _, st = m.step(x[:, :12], st)
    sd = st.state_dict()
    for cap in (4, 200):
        d = dict(sd)
        for key in ("k", "v"):
            t = d[key]
            d[key] = t[:, :, :cap].clone() if cap < t.shape[2] else torch.cat(
                [t, t.new_zeros(*t.shape[:2], cap - t.shape[2], t.shape[3])], 2)
        with pytest.raises(ValueError, match="max_chunk"):
            m.init_state(1, max_chunk=4).load_state_dict(d)
    with pytest.raises(ValueError, match="max_chunk"):
        m.init_state(1, max_chunk=8).load_state_dict(sd)
    un = _att(left=None)
    with torch.no_grad():
        _, su = un.step(x[:, :12], un.init_state(1))
    sdu = su.state_dict()
    big = {k: (torch.cat([v, v.new_zeros(*v.shape[:2], 100, v.shape[3])], 2)
               if k in ("k", "v") else v) for k, v in sdu.items()}
    un.init_state(1).load_state_dict(big)                       # a grown ring: taken
    small = dict(sdu, k=sdu["k"][:, :, :5].clone(), v=sdu["v"][:, :, :5].clone())
    with pytest.raises(ValueError, match="holds 5 keys, fewer than"):
        un.init_state(1).load_state_dict(small)
    odd = dict(sdu, v=big["v"])
    with pytest.raises(ValueError, match="differ in shape"):
        un.init_state(1).load_state_dict(odd)
    xa = FrameCrossAttention(8, 2, mask=IntervalMask.band(2, 1, sink=3))
    with torch.no_grad():
        _, sa = xa.step(torch.randn(1, 12, 8), torch.randn(1, 12, 8), xa.init_state(1))
    lack = {k: v for k, v in sa.state_dict().items() if k not in ("sink_k", "sink_v")}
    with pytest.raises(StateKeyError, match="missing \\['sink_k', 'sink_v'\\]"):
        xa.init_state(1).load_state_dict(lack)


@pytest.mark.parametrize("name", list(PAIRS))
def test_state_refused_after_module_converted(name):
    """A module converted after init_state (.double(), .half(), .to(dtype), or its parameters
    replaced by load_state_dict(assign=True)) refuses its old states by name: the attention
    step cast the new keys into the float32 ring silently (3e-8 off a float64 stream) and the
    convs failed in a kernel's dtype check naming neither the state nor the conversion."""
    make_a, _, inp = PAIRS[name][:3]
    torch.manual_seed(11 + len(name))
    m = make_a().eval()
    if not any(p.is_floating_point() for p in m.parameters()):
        pytest.skip("no parameters: the state's dtype is its own")
    x1, x2 = inp(2, 5), inp(2, 4)
    st = m.init_state(2)
    _, st = _feed(m, st, x1)
    kept = copy.deepcopy(st)
    msg = r"made when the module's parameters were torch.float32; they are torch.float64 now"
    m.double()
    with pytest.raises(ValueError, match=msg):
        _feed(m, st, x2.double())
    if hasattr(m, "flush"):
        with pytest.raises(ValueError, match=msg):
            m.flush(st)
    m.float()                        # converted back: the state streams on as before
    y, _ = _feed(m, st, x2)
    y_ref, _ = _feed(m, kept, x2)
    assert torch.equal(y, y_ref)
    m.load_state_dict({k: v.double() for k, v in m.state_dict().items()}, assign=True)
    with pytest.raises(ValueError, match=msg):
        _feed(m, st, x2.double())


@pytest.mark.parametrize("name", list(PAIRS))
def test_reset_slot_streams_as_a_fresh_state(name):
    """reset(state, mask) returns the masked slots to a fresh stream, counters included (a reset
    that left the integer counters was caught only by a slow property test), and leaves the
    other slots' streams going."""
    make_a, _, inp = PAIRS[name][:3]
    torch.manual_seed(21 + len(name))
    m = make_a().eval()
    old, new, more = inp(2, 6), inp(2, 40), inp(2, 40)
    st = m.init_state(2)
    _, st = _feed(m, st, old)
    keep = copy.deepcopy(st)
    reset(st, torch.tensor([True, False]))
    y, st = _feed(m, st, torch.cat([new[:1], more[1:]]))
    y_fresh, fresh = _feed(m, m.init_state(2), new)
    y_keep, keep = _feed(m, keep, more)
    axis = -1 if y.dim() == 2 or name in ("conv", "norm") else 1
    for b, (want, ws) in enumerate(((y_fresh, fresh), (y_keep, keep))):
        n = int(st.out_lengths[b])
        assert n == int(ws.out_lengths[b]) and n > 0, (b, n)
        torch.testing.assert_close(y[b].narrow(axis - 1 if axis > 0 else -1, 0, n),
                                   want[b].narrow(axis - 1 if axis > 0 else -1, 0, n))


def test_converted_after_a_submodule_was_replaced():
    """The first parameter's place is kept per module; a submodule swapped in afterwards is
    followed (a kept owner reference read the detached old module: init_state refused the
    float64 dtype of an all-float64 stack as 'not the module's (float32)')."""
    stack = StreamingSequential(CausalConv1d(2, 4, 3), CausalConv1d(4, 4, 3)).eval()
    stack.init_state(1)
    stack[0] = CausalConv1d(2, 4, 3)
    stack.double()
    st = stack.init_state(1, dtype=torch.float64)
    assert st.weights_dtype == torch.float64
    stack.float()
    with pytest.raises(ValueError, match="they are torch.float32 now"):
        _feed(stack, st, torch.randn(1, 2, 5, dtype=torch.float64))


@pytest.mark.parametrize("name", list(PAIRS))
def test_state_made_under_inference_mode(name):
    """A state made under torch.inference_mode holds inference tensors: stepped, reset or loaded
    outside that mode it failed inside torch ("Inplace update to inference tensor", naming no
    state). It is refused by name now; under inference_mode it streams as a no_grad state
    does, and a copy made outside the mode (normal tensors) streams outside it."""
    make_a, _, inp = PAIRS[name][:3]
    torch.manual_seed(31 + len(name))
    m = make_a().eval()
    x1, x2 = inp(2, 5), inp(2, 4)
    with torch.inference_mode():
        st = m.init_state(2)
        y1, st = m.step(x1, st)
    ref = m.init_state(2)
    y1_ref, ref = _feed(m, ref, x1)
    torch.testing.assert_close(y1, y1_ref, rtol=0, atol=0)
    msg = r"made under torch.inference_mode\(\)"
    with pytest.raises(RuntimeError, match=msg):
        _feed(m, st, x2)
    with pytest.raises(RuntimeError, match=msg):
        reset(st, torch.tensor([True, False]))
    with pytest.raises(RuntimeError, match=msg):
        st.load_state_dict(ref.state_dict())
    copied = copy.deepcopy(st)                   # outside the mode: normal tensors
    y2c, _ = _feed(m, copied, x2)
    with torch.inference_mode():
        y2, st = m.step(x2, st)
    y2_ref, _ = _feed(m, ref, x2)
    torch.testing.assert_close(y2, y2_ref, rtol=0, atol=0)
    torch.testing.assert_close(y2c, y2_ref, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["causal_conv", "feature_conv", "spectral", "encoder_pos_conv"])
def test_hook_based_weight_norm_streams_the_current_weight(kind):
    """torch.nn.utils.weight_norm / spectral_norm keep ``weight`` as an attribute their forward
    pre-hook recomputes; a step is not a __call__, so it read the weight of the last forward (a
    checkpoint loaded, an optimizer step: 5.0 off the forward; a .double() model: refused with
    the wrong dtype named)."""
    import warnings
    from pyencoder.models.frontend import FeatureConv1d
    from pyencoder.nn import CausalConv1d
    from test_models import tiny_encoder_config
    from pyencoder.models import CausalEncoder
    torch.manual_seed(31)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if kind == "encoder_pos_conv":
        m = CausalEncoder(tiny_encoder_config(lookahead=1)).double().eval()
        m.pos_conv = torch.nn.utils.weight_norm(m.pos_conv, dim=2)
        g = m.pos_conv.weight_g
        x, n = torch.randn(1, m.hop * 12, dtype=torch.float64), m.hop * 3
    else:
        conv = FeatureConv1d(8, 8, 4, 2) if kind == "feature_conv" else \
            CausalConv1d(8, 8, 4, groups=2)
        if kind == "spectral":
            m = torch.nn.utils.spectral_norm(conv).eval()
            g = m.weight_orig
        else:
            m = torch.nn.utils.weight_norm(conv, dim=2)
            g = m.weight_g
        m = m.double()
        x, n = torch.randn(2, 8, 40, dtype=torch.float64), 5
    with torch.no_grad():
        g.mul_(3.0)                          # new weights, no forward since
        st = m.init_state(x.shape[0])
        assert st.tensors() and all(t.dtype == torch.float64 for t in st.tensors().values()
                                    if t.is_floating_point())
        g.mul_(0.5)                          # and again after init_state (which recomputed it)
        if kind == "encoder_pos_conv":
            ys = []
            for t in range(0, x.shape[-1], n):
                y, st = m.step(x[..., t:t + n], st)
                ys.append(y)
            y, st = m.flush(st)
            ys.append(y)
            got, ref = torch.cat(ys, 1), m(x).last_hidden_state
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
            return
        # a conv's output frame reads its own window only: general steps on the first half
        # equal the forward with the weights then, fixed steps after a second change (an
        # optimizer step mid-stream) the forward with the new ones
        n = 4 if kind == "feature_conv" else n       # whole strides for step_fixed
        half = x.shape[-1] // 2
        first = [m.step(x[..., t:t + n], st)[0] for t in range(0, half, n)]
        ref1 = m(x)
        g.mul_(2.0)
        second = [m.step_fixed(x[..., t:t + n], st, int(m.held_after(st.seen)[0]))
                  if kind == "feature_conv" else m.step_fixed(x[..., t:t + n], st)
                  for t in range(half, x.shape[-1], n)]
        ref2 = m(x)
        got1, got2 = torch.cat(first, -1), torch.cat(second, -1)
    torch.testing.assert_close(got1, ref1[..., :got1.shape[-1]], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got2, ref2[..., got1.shape[-1]:], rtol=1e-10, atol=1e-10)
