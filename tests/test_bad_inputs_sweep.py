"""Bad input found by a randomized sweep of the public API (session 33), each refused by name now
where it used to be taken silently, crash inside torch, or be named in internal words:
- the model configs: EncoderConfig / DecoderConfig fields checked by their config names (num_layers
  0 built one layer, chunk_size under attention='band' was ignored, a NaN eps gave NaN outputs);
- distill: a negative grad_clip turned every step uphill; pos_weight with a CausalEncoder teacher
  looked for transformers' encoder.pos_conv_embed;
- a step after flush continued the ended streams at their positions (no offline call matches);
- StreamingSequential children in the wrong layout (a Linear on (B, C, T) chunks);
- meta tensors through the attention ops (a value check read them);
- truthy non-bools taken for True; an interval mask that shows no key to any query; the Refiner's
  step returning float64 from a float32 module; ConvNeXtBlock naming its transposed input."""
import sys

import pytest
import torch
from torch import nn

import pyencoder
from pyencoder import IntervalMask
from pyencoder import distill as D
from pyencoder.models import (CausalEncoder, ConvNeXtBlock, DecoderConfig, EncoderConfig,
                              StreamingDecoder)
from pyencoder.nn import (BandedSelfAttention, CausalConv1d, FrameCrossAttention, Refiner,
                          TransformerLayer, Transpose, WavLMSelfAttention)
from pyencoder.streaming import StreamingSequential, admit, latency, reset

sys.path.insert(0, __import__("os").path.dirname(__file__))
from test_models import tiny_decoder_config, tiny_encoder_config  # noqa: E402
from test_reliability_states import PAIRS, _feed  # noqa: E402


# ---- configs --------------------------------------------------------------------------------

ENC_BAD = [
    (dict(num_layers=0), ValueError, r"EncoderConfig\.num_layers must be an int >= 1; got 0"),
    (dict(num_heads=0), ValueError, r"EncoderConfig\.num_heads must be an int >= 1; got 0"),
    (dict(chunk_size=4, left_chunks=3), ValueError,
     r"EncoderConfig\.chunk_size \(4\) / left_chunks \(3\) are for attention='chunked'"),
    (dict(attention="chunked", chunk_size=2), ValueError,
     r"EncoderConfig\.left \(6\) is for attention='band'"),
    (dict(lookahead=-1), ValueError, r"EncoderConfig\.lookahead must be an int >= 0 or None"),
    (dict(lookahead_layers=[-1, 0]), ValueError, r"EncoderConfig\.lookahead_layers\[0\]"),
    (dict(lookahead_layers=[1]), ValueError, r"lookahead_layers must hold one int per layer"),
    (dict(conv_stride=(5, 0, 2)), ValueError, r"EncoderConfig\.conv_stride\[1\] must be an int"),
    (dict(conv_dim=(8, 0, 12)), ValueError, r"EncoderConfig\.conv_dim\[1\]"),
    (dict(conv_kernel=(10, 3)), ValueError, r"one entry per conv layer; got 3, 2 and 3"),
    (dict(layer_norm_eps=-1.0), ValueError, r"EncoderConfig\.layer_norm_eps must be a finite"),
    (dict(layer_norm_eps=float("nan")), ValueError, r"EncoderConfig\.layer_norm_eps"),
    (dict(pos_conv_kernel=0), ValueError, r"EncoderConfig\.pos_conv_kernel"),
    (dict(rope="yes"), TypeError, r"EncoderConfig\.rope must be True, False, an even"),
    (dict(rope=3), ValueError, r"EncoderConfig\.rope must be"),
    (dict(rope_base=0.5), ValueError, r"EncoderConfig\.rope_base must be a finite float > 1"),
    (dict(norm_first=1), TypeError, r"EncoderConfig\.norm_first must be a bool; got int 1"),
    (dict(feat_extract_norm="batch"), ValueError, r"EncoderConfig\.feat_extract_norm"),
    (dict(max_context=0), ValueError, r"EncoderConfig\.max_context"),
    (dict(sink=True), TypeError, r"EncoderConfig\.sink must be an int >= 0; got bool"),
]


@pytest.mark.parametrize("over, exc, msg", ENC_BAD, ids=[str(o) for o, _, _ in ENC_BAD])
def test_encoder_config_fields_refused_by_name(over, exc, msg):
    with pytest.raises(exc, match=msg):
        CausalEncoder(tiny_encoder_config(**over))


def test_encoder_config_valid_variants_build():
    CausalEncoder(tiny_encoder_config())
    CausalEncoder(tiny_encoder_config(attention="chunked", left=None, chunk_size=2,
                                      left_chunks=1))
    CausalEncoder(tiny_encoder_config(rope=False, rope_base=0.5))   # base unused without RoPE
    CausalEncoder(tiny_encoder_config(rope=4, lookahead=None))
    CausalEncoder(tiny_encoder_config(lookahead_layers=(2, 0), conv_dim=[8, 12, 12]))
    with pytest.raises(TypeError, match="config must be an EncoderConfig"):
        CausalEncoder(dict(hidden_size=16))


DEC_BAD = [
    (dict(layer_norm_eps=float("nan")), ValueError, r"DecoderConfig\.layer_norm_eps"),
    (dict(layer_norm_eps=-1.0), ValueError, r"DecoderConfig\.layer_norm_eps"),
    (dict(layer_scale_init=float("nan")), ValueError, r"DecoderConfig\.layer_scale_init"),
    (dict(samples_per_frame=0), ValueError, r"DecoderConfig\.samples_per_frame .*got 0"),
    (dict(samples_per_frame=2.5), TypeError, r"DecoderConfig\.samples_per_frame .*float 2\.5"),
    (dict(num_blocks=-1), ValueError, r"DecoderConfig\.num_blocks must be an int >= 0"),
    (dict(input_dim=0), ValueError, r"DecoderConfig\.input_dim"),
    (dict(refiner_chunk=0), ValueError, r"DecoderConfig\.refiner_chunk"),
    (dict(attention_lookahead=-1), ValueError, r"DecoderConfig\.attention_lookahead"),
    (dict(convnext_fused="yes"), TypeError, r"DecoderConfig\.convnext_fused must be a bool"),
]


@pytest.mark.parametrize("over, exc, msg", DEC_BAD, ids=[str(o) for o, _, _ in DEC_BAD])
def test_decoder_config_fields_refused_by_name(over, exc, msg):
    with pytest.raises(exc, match=msg):
        StreamingDecoder(tiny_decoder_config(**over))


def test_convnext_block_arguments_and_input_named_as_given():
    with pytest.raises(ValueError, match="eps must be a finite float >= 0; got -1.0"):
        ConvNeXtBlock(8, 12, eps=-1.0)
    with pytest.raises(ValueError, match="layer_scale_init"):
        ConvNeXtBlock(8, 12, layer_scale_init=float("inf"))
    with pytest.raises(TypeError, match="fused must be None, True or False"):
        ConvNeXtBlock(8, 12, fused="no")
    for fused in (None, True, False):
        b = ConvNeXtBlock(8, 12, fused=fused).eval()
        with pytest.raises(ValueError, match=r"x must have shape \(B, T, 8\); got \(2, 5, 7\)"):
            b(torch.randn(2, 5, 7))
        with pytest.raises(TypeError, match=r"x must have the module's dtype"):
            b(torch.randn(2, 5, 8, dtype=torch.float64))
    b = ConvNeXtBlock(8, 12).eval()
    with pytest.raises(TypeError, match=r"x must have the module's dtype \(torch.float32\)"):
        _feed(b, b.init_state(1), torch.randn(1, 3, 8, dtype=torch.float64))


# ---- distill --------------------------------------------------------------------------------

def _pair():
    torch.manual_seed(0)
    return (CausalEncoder(tiny_encoder_config()), CausalEncoder(tiny_encoder_config(
        lookahead=None)))


@pytest.mark.parametrize("kw, msg", [(dict(grad_clip=-1.0), "grad_clip must be None or a finite"),
                                     (dict(grad_clip=0.0), "grad_clip"),
                                     (dict(grad_clip=float("nan")), "grad_clip"),
                                     (dict(steps=-1), "steps must be None or an int >= 0"),
                                     (dict(pos_weight=float("nan")), "pos_weight must be a finite"),
                                     (dict(pos_weight=-1.0), "pos_weight"),
                                     (dict(pos_weight=1.0, teacher_pos=3), "teacher_pos must be")])
def test_distill_arguments_refused_before_any_step(kw, msg):
    stu, tea = _pair()
    before = [p.detach().clone() for p in stu.parameters()]
    opt = torch.optim.SGD(stu.parameters(), lr=1e-2)
    with pytest.raises((ValueError, TypeError), match=msg):
        D.distill(stu, tea, [torch.randn(2, 800)] * 2, opt, progress=False, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, stu.parameters()))


def test_distill_same_model_and_causal_teacher_positional_loss():
    stu, tea = _pair()
    opt = torch.optim.SGD(stu.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="student and teacher must be different models"):
        D.distill(stu, stu, [torch.randn(2, 800)], opt, progress=False)
    # a CausalEncoder teacher's positional_embedding is the default teacher_pos (it looked for
    # transformers' encoder.pos_conv_embed: AttributeError)
    data = [torch.randn(2, 800)]
    s1, t1 = _pair()
    h1 = D.distill(s1, t1, data, torch.optim.SGD(s1.parameters(), lr=1e-2), pos_weight=0.5,
                   progress=False)
    s2, t2 = _pair()
    h2 = D.distill(s2, t2, data, torch.optim.SGD(s2.parameters(), lr=1e-2), pos_weight=0.5,
                   teacher_pos=t2.positional_embedding, progress=False)
    assert h1[0]["loss"] == h2[0]["loss"]
    h0 = D.distill(*_pair(), data, torch.optim.SGD(_pair()[0].parameters(), lr=1e-2),
                   progress=False)
    assert h1[0]["loss"] != h0[0]["loss"]          # the positional term is in


def test_hidden_state_loss_lengths_and_normalizer():
    s, t = [torch.randn(2, 5, 4)], [torch.randn(2, 5, 4)]
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 5\].*\[16000, 3\]"):
        D.hidden_state_loss(s, t, lengths=torch.tensor([16000, 3]))   # samples, not frames
    with pytest.raises(ValueError, match="normalizer must be None or a finite count >= 0"):
        D.hidden_state_loss(s, t, normalizer=-4)
    full, _ = D.hidden_state_loss(s, t, lengths=torch.tensor([5, 5]))
    torch.testing.assert_close(full, D.hidden_state_loss(s, t)[0])
    with pytest.raises(ValueError, match="n must be a positive int"):
        D.layer_weights(True)


# ---- a step after flush ---------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in PAIRS if n != "norm"])   # RunningGroupNorm: no flush
def test_step_after_flush_is_refused_until_every_slot_is_reset(name):
    make, _, inp = PAIRS[name][:3]
    torch.manual_seed(3)
    m = make().eval()
    x1, x2 = inp(2, 6), inp(2, 5)
    st = m.init_state(2)
    _feed(m, st, x1)
    with torch.no_grad():
        _, st = m.flush(st)
        for call in (lambda: m.step(x2, st), lambda: m.flush(st)):
            with pytest.raises(ValueError, match="this state was flushed"):
                call()
        with pytest.raises(ValueError, match="reset all of its slots"):
            reset(st, torch.tensor([True, False]))
        reset(st, torch.tensor([True, True]))        # fresh streams now: as a new state
        y, st = m.step(x2, st)
        y_new, _ = m.step(x2, m.init_state(2))
    torch.testing.assert_close(y, y_new, rtol=0, atol=0)


def test_cross_attention_step_after_flush_is_refused():
    m = FrameCrossAttention(16, 2, mask=IntervalMask.frames(1, 2, 1, 0), kv_dim=12).eval()
    st = m.init_state(1)
    with torch.no_grad():
        _, st = m.step(torch.randn(1, 3, 16), torch.randn(1, 6, 12), st)
        _, st = m.flush(st)
        with pytest.raises(ValueError, match="flushed"):
            m.step(torch.randn(1, 1, 16), torch.randn(1, 2, 12), st)
        with pytest.raises(ValueError, match="flushed"):
            admit(m, st, 0, [(torch.randn(1, 2, 16), torch.randn(1, 4, 12))], 1)


# ---- layouts, meta, flags, masks ------------------------------------------------------------

def test_sequential_children_layouts_checked_at_construction():
    with pytest.raises(ValueError, match=r"child 1 \(Linear\) takes \(B, T, C\) chunks but gets "
                                         r"\(B, C, T\) chunks there; insert "
                                         r"pyencoder\.nn\.Transpose\(1, 2\)"):
        StreamingSequential(CausalConv1d(8, 8, 3), nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"child 1 \(TransformerLayer\) takes \(B, T, C\)"):
        StreamingSequential(CausalConv1d(8, 8, 3), TransformerLayer(
            BandedSelfAttention(8, 2, left=2, right=0), 16))
    with pytest.raises(ValueError, match=r"child 1 \(PReLU\) takes \(B, C, T\)"):
        StreamingSequential(BandedSelfAttention(8, 2, left=2, right=0), nn.PReLU(8))
    with pytest.raises(ValueError, match=r"child 2 \(CausalConv1d\) takes \(B, C, T\)"):
        StreamingSequential(CausalConv1d(8, 8, 3), Transpose(), CausalConv1d(8, 8, 3))
    ok = StreamingSequential(CausalConv1d(8, 8, 3), nn.GELU(), nn.PReLU(8), Transpose(),
                             nn.LayerNorm(8), nn.Linear(8, 8), nn.PReLU(),
                             StreamingSequential(BandedSelfAttention(8, 2, left=2, right=0)))
    y, _ = _feed(ok, ok.init_state(1), torch.randn(1, 8, 5))
    assert y.shape == (1, 5, 8)


def test_attention_ops_on_meta_tensors_give_meta_outputs():
    q = torch.empty(2, 2, 5, 8, device="meta")
    y = pyencoder.ops.banded_attention(q, q, q, left=2, right=1,
                                       key_lengths=torch.empty(2, dtype=torch.long, device="meta"))
    assert y.shape == q.shape and y.is_meta
    y, lse = pyencoder.ops.interval_attention(q, q, q, mask=IntervalMask.band(2, 1),
                                              return_lse=True)
    assert y.is_meta and lse.shape == (2, 2, 5)
    y = pyencoder.ops.cross_attention(q, torch.empty(2, 2, 10, 8, device="meta"),
                                      torch.empty(2, 2, 10, 8, device="meta"),
                                      mask=IntervalMask.frames(1, 2, 1, 0))
    assert y.shape == q.shape and y.is_meta
    # sink keys with a relative bias: the sink columns' trimming read bucket values ("Cannot
    # copy out of meta tensor"); on meta they take the untrimmed columns, as a trace does
    for m in (BandedSelfAttention(16, 2, left=4, right=1),
              WavLMSelfAttention(16, 2, left=4, right=1),
              WavLMSelfAttention(16, 2, left=4, right=1, sink=2),
              WavLMSelfAttention(16, 2, chunk_size=2, left_chunks=2, lookahead=1, sink=2)):
        out = m.to("meta")(torch.empty(1, 6, 16, device="meta"))
        assert out.shape == (1, 6, 16) and out.is_meta


def test_flags_must_be_bools():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(TypeError, match="return_lse must be True or False; got str 'no'"):
        pyencoder.ops.interval_attention(q, q, q, mask=IntervalMask.band(2, 1), return_lse="no")
    x, w = torch.randn(1, 4, 6), torch.randn(4, 1, 3)
    with pytest.raises(TypeError, match="return_final_state must be True or False"):
        pyencoder.ops.causal_conv1d(x, w, groups=4, return_final_state="no")
    with pytest.raises(TypeError, match="return_final_state must be True or False"):
        pyencoder.ops.convnext_dwconv_ln(x, w, return_final_state=1)
    with pytest.raises(TypeError, match="bias must be True or False"):
        BandedSelfAttention(16, 2, left=4, right=1, bias="no")
    enc = CausalEncoder(tiny_encoder_config()).eval()
    with pytest.raises(TypeError, match="output_hidden_states must be True or False"):
        enc(torch.randn(1, 800), output_hidden_states="yes")
    with pytest.raises(TypeError, match="activation must be None"):
        Refiner(8, 2, activation="relu")


def test_interval_mask_that_shows_no_key_is_refused():
    with pytest.raises(ValueError, match=r"shows no key to any query: lo_off \+ hi_off"):
        IntervalMask(1, 1, -2)
    with pytest.raises(ValueError, match="shows no key"):
        IntervalMask(1, 0, -3, k_block=2)
    IntervalMask(1, 5, -1)             # the five frames before, not itself: a valid band
    IntervalMask(1, -1, -3)            # unbounded history
    IntervalMask(1, 1, -2, sink=2)     # the sink keys only


def test_refiner_step_refuses_another_dtype():
    r = Refiner(8, 2).eval()
    for call in (lambda s: r.step(torch.randn(1, 4, 8, dtype=torch.float64), s),
                 lambda s: r.step_fixed(torch.randn(1, 4, 8, dtype=torch.float64), s)):
        with pytest.raises(TypeError, match=r"x must have the module's dtype \(torch.float32\)"):
            with torch.no_grad():
                call(r.init_state(1))


def test_admit_and_from_pretrained_name_their_first_argument():
    conv = CausalConv1d(4, 4, 3)
    with pytest.raises(TypeError, match="admit: module must be a streaming module"):
        admit(3, conv.init_state(1), 0, [torch.randn(1, 4, 3)], 1)
    pytest.importorskip("transformers")
    import pyencoder.hf as H
    with pytest.raises(TypeError, match="cls must be a transformers model class"):
        H.from_pretrained("Wav2Vec2Model", "/nonexistent")


def test_decoder_config_valid_variants_build():
    StreamingDecoder(tiny_decoder_config())
    StreamingDecoder(DecoderConfig(input_dim=12, dim=16, intermediate_dim=24, num_blocks=0,
                                   samples_per_frame=4, num_attention_layers=1, num_heads=2))
    with pytest.raises(TypeError, match="config must be a DecoderConfig"):
        StreamingDecoder(EncoderConfig())


@pytest.mark.parametrize("kw, why", [(dict(pos_conv="keep"), "pos_conv='keep' cannot stream"),
                                     (dict(group_norm="keep"), "group_norm='keep' cannot stream")])
def test_hf_latency_of_an_offline_only_patch_raises(kw, why):
    """pyencoder.hf.latency and pyencoder.streaming.latency added up the attention and the convs of
    a patch that kept the symmetric positional conv (1.28 s of lookahead) or the GroupNorm over
    time, and printed a small finite latency; they raise with the reason now (as the README
    says, and as StreamingEncoder already did)."""
    pytest.importorskip("transformers")
    import pyencoder.hf as H
    from pyencoder.streaming import NotStreamableError, latency
    from test_hf import make_model
    m = make_model("w2v2_post").eval()
    H.apply_pyencoder_to_wav2vec2(m, lookahead_frames=1, left_frames=3, **kw)
    for f in (H.latency, latency, H.StreamingEncoder):
        with pytest.raises(NotStreamableError, match=why):
            f(m)
    H.revert_pyencoder(m)
    assert not hasattr(m, "not_streamable")
    H.apply_pyencoder_to_wav2vec2(m, lookahead_frames=1, left_frames=3)
    assert H.latency(m).samples == latency(m).samples > 0


def test_cli_info_checks_every_pyencoder_variable():
    """A junk value of a switch that no code path reads on this machine (GPU-only, or the thread
    policy under a 1-thread torch) was accepted without a word; info checks them all."""
    import os
    import _subproc
    env = dict(os.environ, PYENCODER_BACKEND="bogus", PYENCODER_FAST_LAUNCH="maybe",
               PYENCODER_ROPE_MODE="fast", PYENCODER_CPU_THREADS="abc", PYENCODER_FOO="1",
               PYENCODER_VALUE_CHECKS="0")
    out = _subproc.run([sys.executable, "-m", "pyencoder", "info"], env=env)
    assert out.returncode == 1, out.stdout + out.stderr
    for name in ("PYENCODER_BACKEND", "PYENCODER_FAST_LAUNCH", "PYENCODER_ROPE_MODE",
                 "PYENCODER_CPU_THREADS"):
        line = next(ln for ln in out.stdout.splitlines() if ln.strip().startswith(name + "="))
        assert "ERROR" in line and "got" in line, line
    assert "PYENCODER_FOO='1'  (not read by pyencoder" in out.stdout
    assert "PYENCODER_VALUE_CHECKS='0'\n" in out.stdout
    assert "4 PYENCODER_* variable(s) wrong" in out.stderr
    ok = _subproc.run([sys.executable, "-m", "pyencoder", "info"],
                      env=dict(os.environ, PYENCODER_BACKEND="reference"))
    assert ok.returncode == 0 and "PYENCODER_BACKEND='reference'" in ok.stdout


def test_cpu_threads_policy_parsed_under_one_torch_thread(monkeypatch):
    from pyencoder import _cpu_threads
    monkeypatch.setenv("PYENCODER_CPU_THREADS", "abc")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(ValueError, match="PYENCODER_CPU_THREADS must be one of auto, torch"):
            _cpu_threads.choose(1e9)
    finally:
        torch.set_num_threads(n)


def test_flushed_state_round_trips_through_state_dict():
    """A flushed stream saved and loaded into a fresh state stays ended (the flag is saved as
    ``__ended__``); a live stream's checkpoint loaded into a flushed state object resumes it."""
    import io
    m = BandedSelfAttention(16, 2, left=4, right=1).eval()
    st = m.init_state(2)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        m.step(x, st)
        live = st.state_dict()
        m.flush(st)
    assert not any("__ended__" in k for k in live)
    buf = io.BytesIO()
    torch.save(st.state_dict(), buf)
    buf.seek(0)
    loaded = m.init_state(2).load_state_dict(torch.load(buf, weights_only=True))
    with pytest.raises(ValueError, match="flushed"):
        _feed(m, loaded, x)
    st.load_state_dict(live)
    y, _ = _feed(m, st, x)
    y_ref, _ = _feed(m, m.init_state(2).load_state_dict(live), x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="__ended__ must be True"):
        m.init_state(2).load_state_dict({**live, "__ended__": 1})


def test_distill_student_longer_than_teacher_with_lengths():
    """A causal-conv student gives one frame more than a valid-conv teacher: the frames are cut to
    the shorter, and so must the lengths be (the new lengths check refused the uncut ones)."""
    torch.manual_seed(0)
    stu = CausalEncoder(tiny_encoder_config(causal_conv=True))
    tea = CausalEncoder(tiny_encoder_config(lookahead=None))
    wav = torch.randn(2, 1000)
    hist = D.distill(stu, tea, [(wav, torch.tensor([1000, 900]))],
                     torch.optim.SGD(stu.parameters(), lr=1e-3), progress=False)
    assert len(hist) == 1 and torch.isfinite(torch.as_tensor(hist[0]["loss"]))


def test_run_stream_under_autocast_keeps_the_modules_dtype():
    from pyencoder.streaming import run_stream as stream
    m = CausalConv1d(4, 4, 3, groups=4).eval()
    x = torch.randn(1, 4, 9, dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = stream(m, x, [4])
    assert y.shape == (1, 4, 9)
    with pytest.raises(TypeError, match=r"dtype \(torch.bfloat16\) must be the module's"):
        stream(m, x, [4])


# ---- round 2: latency, compat, drivers ------------------------------------------------------

def test_latency_refuses_full_context_attention_and_bad_declarations():
    """latency() recursed into nn.MultiheadAttention (its out_proj child is per-frame) and summed
    0 lookahead for it; a fractional sample rate became 0 Hz; declared hop 0 was taken."""
    from pyencoder.streaming import NotStreamableError, latency
    for m in (nn.MultiheadAttention(8, 2), nn.TransformerEncoderLayer(8, 2, 16),
              [CausalConv1d(8, 8, 3), nn.TransformerEncoderLayer(8, 2, 16)],
              nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2))):
        with pytest.raises(NotStreamableError, match="attention without a declared lookahead"):
            latency(m)
    for rate in (0.5, 22050.5, 0):
        with pytest.raises(ValueError, match="sample_rate must be a positive whole number"):
            latency(CausalConv1d(4, 4, 3), rate)

    class Bad(nn.Module):
        hop, lookahead = 0, 1
    with pytest.raises(ValueError, match=r"declares hop=0; a streaming module's hop must be an "
                                         r"int >= 1"):
        latency(Bad())
    Bad.hop, Bad.lookahead = 1, -3
    with pytest.raises(ValueError, match="lookahead must be an int >= 0"):
        latency(Bad())
    assert latency(CausalConv1d(4, 4, 3), 22050.0).sample_rate == 22050
    assert latency(CausalEncoder(tiny_encoder_config(norm_first=True,
                                                     adapter_attn_dim=4))).samples > 0


def test_compat_on_meta_tensors_and_final_states_out():
    from pyencoder.compat.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    M = "meta"
    x, w, b = (torch.empty(2, 4, 9, device=M), torch.empty(4, 4, device=M),
               torch.empty(4, device=M))
    st = torch.empty(2, 4, 3, device=M)
    y = causal_conv1d_fn(x, w, b, seq_idx=torch.zeros(2, 9, dtype=torch.int32, device=M))
    assert y.shape == (2, 4, 9) and y.is_meta
    for kw in (dict(conv_state_indices=torch.tensor([0, 1], device=M, dtype=torch.int32)),
               dict(cache_seqlens=torch.tensor([0, 1], device=M, dtype=torch.int32))):
        assert causal_conv1d_update(x[..., :1], st, w, b, **kw).shape == (2, 4, 1)
    x, w = torch.randn(2, 4, 9), torch.randn(4, 4)
    buf = torch.zeros(2, 4, 3)
    y0 = causal_conv1d_fn(x, w, final_states_out=buf)       # ignored, as causal-conv1d does
    assert isinstance(y0, torch.Tensor) and not buf.any()
    with pytest.raises(TypeError, match=r"final_states_out must have x's dtype \(torch.float32\)"):
        causal_conv1d_fn(x, w, return_final_states=True, final_states_out=buf.half())
    y, f = causal_conv1d_fn(x, w, return_final_states=True, final_states_out=buf)
    assert f.data_ptr() == buf.data_ptr() and torch.equal(buf, x[..., -3:])


def test_admit_checks_the_steps_inputs():
    m = FrameCrossAttention(16, 2, mask=IntervalMask.frames(1, 2, left=2, right=1),
                            kv_dim=8).eval()
    st = m.init_state(2)
    with torch.no_grad():
        _, st = m.step(torch.randn(2, 2, 16), torch.randn(2, 4, 8), st)
    before = {k: v.clone() for k, v in st.tensors().items()}
    for chunks, got in (([torch.randn(1, 2, 16)], "got tensors"),
                        ([(torch.randn(1, 2, 16), torch.randn(1, 4, 8), torch.randn(1, 4, 8))],
                         "got tuples of 3")):
        with pytest.raises(ValueError, match=rf"FrameCrossAttention\.step takes 2 input\(s\).*"
                                             rf"{got}"):
            admit(m, st, 0, chunks, 2)
    assert all(torch.equal(v, before[k]) for k, v in st.tensors().items())
    conv = CausalConv1d(4, 4, 3)
    with pytest.raises(ValueError, match="takes 1 input"):
        admit(conv, conv.init_state(2), 0, [(torch.randn(1, 4, 3), None)], 1)


def test_run_stream_arguments():
    import itertools
    from pyencoder.streaming import run_stream
    m = CausalConv1d(4, 4, 3)
    with pytest.raises(TypeError, match="chunk_sizes must be a sized sequence .*got an iterator"):
        run_stream(m, torch.randn(1, 4, 6), itertools.cycle([2]))
    with pytest.raises(ValueError, match="x must hold at least one stream"):
        run_stream(m, torch.randn(0, 4, 6), [2])
    with pytest.raises(TypeError, match="takes the state's batch, dtype and device from x; got "
                                        "dtype"):
        run_stream(m, torch.randn(1, 4, 6), [2], dtype=torch.float32)
    assert run_stream(m, torch.randn(1, 4, 6), range(1, 3)).shape == (1, 4, 6)


def test_config_numpy_ints_are_taken_as_ints():
    """Sizes computed with numpy (np.int64) are ints: stored back as Python ints (the config's repr
    is what stream states record), bools and floats refused."""
    np = pytest.importorskip("numpy")
    cfg = tiny_encoder_config(hidden_size=np.int64(16), num_layers=np.int32(2),
                              conv_dim=(np.int64(8), 12, 12), left=np.int64(6),
                              lookahead_layers=[np.int64(2), 0])
    m = CausalEncoder(cfg)
    cfg = m.config                    # the model's own copy, normalised
    assert type(cfg.hidden_size) is int and cfg.conv_dim == (8, 12, 12)
    assert all(type(x) is int for x in cfg.conv_dim + tuple(cfg.lookahead_layers))
    assert "np." not in repr(cfg)
    assert m(torch.randn(1, 800)).last_hidden_state.shape[-1] == 16
    with pytest.raises(TypeError, match=r"EncoderConfig\.num_layers must be an int >= 1; got "
                                        r"float 2\.0"):
        CausalEncoder(tiny_encoder_config(num_layers=2.0))


# ---- round 3: what a stream == offline fuzz of the new checks found -------------------------

def test_cross_attention_state_reset_after_flush_streams_again():
    """CrossAttentionState has its own reset (new buffers): it kept the ended flag, so a flushed
    cross-attention state could never stream again."""
    m = FrameCrossAttention(16, 2, mask=IntervalMask.frames(1, 2, 1, 0), kv_dim=12).eval()
    xq, xkv = torch.randn(1, 3, 16), torch.randn(1, 6, 12)
    st = m.init_state(1)
    with torch.no_grad():
        m.step(xq, xkv, st)
        _, st = m.flush(st)
        reset(st, torch.tensor([True]))
        assert not st.ended
        y, _ = m.step(xq, xkv, st)
        y_new, _ = m.step(xq, xkv, m.init_state(1))
    torch.testing.assert_close(y, y_new, rtol=0, atol=0)


def test_init_state_in_the_autocast_dtype_and_on_meta():
    """A bf16 state under bf16 autocast holds what the stream computes (half the memory) and was
    taken before the dtype check; it is again. Meta sizes a state in any dtype."""
    m = BandedSelfAttention(16, 2, left=4, right=1).eval()
    x = torch.randn(1, 6, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        st16 = m.init_state(1, dtype=torch.bfloat16)
        y16, _ = m.step(x, st16)
        y32, _ = m.step(x, m.init_state(1))
    assert st16.nbytes() < m.init_state(1).nbytes()
    torch.testing.assert_close(y16, y32, rtol=0, atol=0)
    with pytest.raises(TypeError, match="under autocast, its dtype"):
        m.init_state(1, dtype=torch.bfloat16)          # outside autocast: refused
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError):
        m.init_state(1, dtype=torch.float16)           # another dtype than autocast's
    assert m.init_state(1, device="meta", dtype=torch.float16).k.dtype == torch.float16


def test_config_numpy_scalars_of_every_kind():
    np = pytest.importorskip("numpy")
    cfg = tiny_encoder_config(rope=np.int64(4), rope_base=np.float32(1e4),
                              norm_first=np.bool_(True), rel_pos_bias=True,
                              num_buckets=np.int64(8), max_bucket_distance=np.int64(16))
    cfg = CausalEncoder(cfg).config      # the model's own copy, normalised
    assert (type(cfg.rope), type(cfg.rope_base), type(cfg.norm_first), type(cfg.num_buckets)) \
        == (int, float, bool, int)
    dcfg = StreamingDecoder(tiny_decoder_config(layer_scale_init=np.float32(0.1))).config
    assert type(dcfg.layer_scale_init) is float


def test_feature_convs_declare_the_conv_layout():
    """FeatureConv1d (and PaddedConv1d) take (B, C, T) chunks but did not declare it, so the
    layout check refused them after a conv."""
    from pyencoder.models import FeatureConv1d, PaddedConv1d
    from pyencoder.streaming import run_stream
    s = StreamingSequential(CausalConv1d(4, 4, 3), FeatureConv1d(4, 4, 3, 2),
                            PaddedConv1d(4, 4, 3, 1, 1)).double().eval()
    x = torch.randn(2, 4, 19, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(run_stream(s, x, [3, 1, 5]), s(x), rtol=1e-12, atol=1e-12)


def test_state_reset_method_takes_a_list_mask():
    m = CausalConv1d(4, 4, 3)
    st = m.init_state(2)
    _feed(m, st, torch.randn(2, 4, 5))
    st.reset([True, False])
    assert st.seen.tolist() == [0, 5]


def test_config_lists_and_tuples_record_one_config():
    """A list field and the tuple of the same values (a config read back from JSON has lists), or
    an int eps and its float, recorded different config strings: a stream saved from one model did
    not load into the other. validate() stores tuples of ints and floats back."""
    from pyencoder.streaming.state import stream_config
    a = CausalEncoder(tiny_encoder_config(conv_dim=[8, 12, 12], lookahead_layers=[2, 0],
                                          layer_norm_eps=1))
    b = CausalEncoder(tiny_encoder_config(conv_dim=(8, 12, 12), lookahead_layers=(2, 0),
                                          layer_norm_eps=1.0))
    assert type(a.config.conv_dim) is tuple and type(a.config.layer_norm_eps) is float
    assert stream_config(a) == stream_config(b)
    b.load_state_dict(a.state_dict())
    st = a.init_state(1)
    with torch.no_grad():
        a.step(torch.randn(1, 800), st)
    st2 = b.init_state(1)
    st2.load_state_dict(st.state_dict())
    d1, d2 = tiny_decoder_config(layer_norm_eps=0), tiny_decoder_config(layer_norm_eps=0.0)
    assert stream_config(StreamingDecoder(d1)) == stream_config(StreamingDecoder(d2))


def test_run_stream_time_dim_against_the_module_layout():
    """A time_dim that names another axis than the module's chunks use was narrowed there and
    failed inside the step, naming the chunk's shape; refused by name now."""
    from pyencoder.streaming import run_stream
    conv, att = CausalConv1d(4, 4, 3), BandedSelfAttention(8, 2, left=3, right=1)
    with pytest.raises(ValueError, match=r"time_dim \(1\) names axis 1 of x \(shape \(1, 4, 9\)\), "
                                         r"but CausalConv1d takes its chunks with time on axis 2"):
        run_stream(conv, torch.randn(1, 4, 9), [2], time_dim=1)
    with pytest.raises(ValueError, match=r"BandedSelfAttention takes its chunks with time on "
                                         r"axis 1: pass time_dim=1"):
        run_stream(att, torch.randn(1, 9, 8), [2], time_dim=-1)
    with torch.no_grad():
        assert run_stream(conv, torch.randn(1, 4, 9), [2], time_dim=-1).shape == (1, 4, 9)
        assert run_stream(att.eval(), torch.randn(1, 9, 8), [2], time_dim=-2).shape == (1, 9, 8)


def test_running_group_norm_streams_as_a_module():
    """RunningGroupNorm had init_state / step but no flush: run_stream and StreamingSequential
    refused it though pyencoder.nn exports it as a streaming module."""
    from pyencoder.nn import RunningGroupNorm
    from pyencoder.streaming import run_stream
    torch.manual_seed(0)
    norm = RunningGroupNorm(4).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 4, 23, dtype=torch.float64) * 3 + 1
    with torch.no_grad():
        torch.testing.assert_close(run_stream(norm, x, [3, 1, 7]), norm(x), rtol=1e-12,
                                   atol=1e-12)
        s = StreamingSequential(CausalConv1d(4, 4, 3), RunningGroupNorm(4),
                                CausalConv1d(4, 4, 5)).double().eval()
        torch.testing.assert_close(run_stream(s, x, [2, 5, 1]), s(x), rtol=1e-12, atol=1e-12)
        st = norm.init_state(2)
        norm.step(x[..., :4], st, lengths=[4, 2])
        assert st.out_lengths.tolist() == [4, 2]
        y, st = norm.flush(st)
        assert y.shape == (2, 4, 0) and y.dtype == torch.float64 and st.ended
        assert st.out_lengths.tolist() == [0, 0]
        plain = RunningGroupNorm(4, affine=False)          # no parameters: the steps' dtype
        st = plain.init_state(1)
        plain.step(torch.randn(1, 4, 3, dtype=torch.bfloat16), st)
        assert plain.flush(st)[0].dtype == torch.bfloat16
        with pytest.raises(ValueError, match="flush"):
            plain.step(torch.randn(1, 4, 3), st)


def test_causal_conv_refuses_nn_conv1d_arguments_it_does_not_take_by_their_names():
    """CausalConv1d(..., padding=1) failed naming the internal StridedConv1d.__init__; the values
    it does anyway (dilation 1, zero padding mode) are taken."""
    CausalConv1d(4, 4, 3, dilation=1, padding_mode="zeros")
    for kw in (dict(padding=1), dict(padding="same"), dict(dilation=2),
               dict(padding_mode="reflect")):
        with pytest.raises(ValueError, match=rf"CausalConv1d: {next(iter(kw))}=.* is not "
                                             rf"supported: it fixes its own padding"):
            CausalConv1d(4, 4, 3, **kw)
    with pytest.raises(TypeError, match=r"CausalConv1d\.__init__\(\) got an unexpected keyword "
                                        r"argument 'kernel'"):
        CausalConv1d(4, 4, 3, kernel=3)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_a_checkpoint_resumes_twice_to_the_same_outputs(name):
    """load_state_dict kept the dict's tensors on the same device and the steps update a state
    in place, so stepping a loaded state rewrote the caller's in-memory checkpoint: a second
    resume from it (a rollback, two streams branched from one checkpoint) went 1.4 off."""
    make, _, inp = PAIRS[name][:3]
    torch.manual_seed(0)
    m = make().eval()
    x0, x1 = inp(2, 5), inp(2, 4)
    with torch.no_grad():
        st = m.init_state(2)
        _feed(m, st, x0)
        ckpt = st.state_dict()
        saved = {k: v.clone() for k, v in ckpt.items() if isinstance(v, torch.Tensor)}
        outs = []
        for _ in range(2):
            s2 = m.init_state(2).load_state_dict(ckpt)
            outs.append(m.step(x1, s2)[0])
            if hasattr(m, "step_fixed"):
                m.step_fixed(x1, s2)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    for k, v in saved.items():
        assert torch.equal(ckpt[k], v), k


@pytest.mark.parametrize("k, s", [(4, 1), (5, 2), (1, 1)])
def test_conv_step_gradients_equal_offline_and_step_fixed_refuses_by_name(k, s):
    """CausalConv1d.step at stride 1 ran the in-place update op, whose backward torch named as
    "no autograd formula was registered"; step_fixed's backward failed with autograd's in-place
    message. step now replaces its history where autograd records (gradients equal the offline
    forward's), step_fixed says it is for inference."""
    torch.manual_seed(0)
    m = CausalConv1d(4, 4, k, stride=s, groups=2).double()
    x = torch.randn(2, 4, 12, dtype=torch.float64, requires_grad=True)
    st = m.init_state(2)
    ys = []
    for xc in x.split([4, 2, 6], -1):
        y, st = m.step(xc, st)
        ys.append(y)
    g_stream = torch.autograd.grad(torch.cat(ys, -1).pow(2).sum(), (x, m.weight, m.bias))
    g_off = torch.autograd.grad(m(x).pow(2).sum(), (x, m.weight, m.bias))
    for a, b in zip(g_stream, g_off):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    y = m.step_fixed(x[..., :4], m.init_state(2))
    with pytest.raises(RuntimeError, match=r"CausalConv1d\.step_fixed: backward through a "
                                           r"streaming step is not supported"):
        y.sum().backward()


def test_hubert_positional_batch_norm_stays_causal_in_training():
    """HuBERT's BatchNorm before the causal positional conv normalised with batch statistics over
    every frame in training mode: a patched model's frame 0 (and CausalEncoder.from_hf's, the
    distillation student) moved 0.15 / 0.23 when audio 3000 samples later changed, and training
    computed another function than streaming. It reads its running statistics now (weight and
    bias still train, the statistics stay the pretrained ones)."""
    T = pytest.importorskip("transformers")
    import pyencoder.hf as phf
    torch.manual_seed(0)
    cfg = T.HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, conv_dim=(16, 16), conv_kernel=(10, 3),
                         conv_stride=(5, 2), num_conv_pos_embeddings=8,
                         num_conv_pos_embedding_groups=2, conv_pos_batch_norm=True,
                         hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                         feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0)
    hf = T.HubertModel(cfg)
    with torch.no_grad():
        bn = hf.encoder.pos_conv_embed.batch_norm
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    enc = CausalEncoder.from_hf(hf, lookahead=0, left=20, pos_conv="causal")
    phf.apply_pyencoder_to_wav2vec2(hf, lookahead_frames=0, left_frames=20, pos_conv="causal")
    x = torch.randn(2, 4000)
    x2 = x.clone()
    x2[:, 3000:] += 5.0 * torch.randn(2, 1000)
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    for name, run in (("patched", lambda a: hf(a).last_hidden_state),
                      ("from_hf", lambda a: enc(a).last_hidden_state)):
        outs = []
        for mode in (False, True):
            hf.train(mode)
            enc.train(mode)
            with torch.no_grad():
                a, b = run(x), run(x2)
            assert torch.equal(a[:, :10], b[:, :10]), (name, mode)
            outs.append(a)
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)   # train == eval
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])


def test_running_group_norm_keeps_a_copy_of_the_callers_lengths():
    """step kept the caller's lengths tensor as out_lengths, and a later step_fixed filled it in
    place: the caller's [3, 2] became [5, 5]."""
    from pyencoder.nn import RunningGroupNorm
    norm = RunningGroupNorm(4)
    st = norm.init_state(2)
    lengths = torch.tensor([3, 2])
    with torch.no_grad():
        norm.step(torch.randn(2, 4, 3), st, lengths)
        norm.step_fixed(torch.randn(2, 4, 5), st)
    assert lengths.tolist() == [3, 2] and st.out_lengths.tolist() == [5, 5]


def test_convnext_block_ragged_step_equals_each_slots_offline():
    """ConvNeXtBlock.step with every slot's length below the step's width crashed (the conv
    emits max(lengths) frames, the residual had n): a padded batch, or idle slots."""
    torch.manual_seed(0)
    blk = ConvNeXtBlock(8, 12, 5).double().eval()
    xs = [torch.randn(1, 11, 8, dtype=torch.float64) for _ in range(2)]
    plan = [([2, 3], 5), ([0, 0], 4), ([4, 1], 6), ([5, 7], 7)]     # (lengths, padded width)
    st = blk.init_state(2)
    pos, outs = [0, 0], [[], []]
    with torch.no_grad():
        for lengths, n in plan:
            x = torch.randn(2, n, 8, dtype=torch.float64)           # padding: noise
            for b in range(2):
                x[b, :lengths[b]] = xs[b][0, pos[b]:pos[b] + lengths[b]]
            y, st = blk.step(x, st, lengths)
            for b in range(2):
                outs[b].append(y[b, :int(st.out_lengths[b])])
                pos[b] += lengths[b]
        for b in range(2):
            torch.testing.assert_close(torch.cat(outs[b], 0), blk(xs[b][:, :pos[b]])[0],
                                       rtol=1e-12, atol=1e-12)


def test_chain_with_running_group_norm_runs_its_steady_step_and_admits():
    """RunningGroupNorm had step_fixed but no steady_check: a chain holding it never dispatched
    its steady step and admit refused it ("has no steady step")."""
    from pyencoder.nn import RunningGroupNorm
    from pyencoder.streaming import run_stream
    torch.manual_seed(0)
    ch = StreamingSequential(CausalConv1d(4, 4, 3), RunningGroupNorm(4),
                             CausalConv1d(4, 4, 4, stride=2)).double().eval()
    x = torch.randn(2, 4, 64, dtype=torch.float64)
    calls = []
    norm = ch[1]
    orig = norm.step_fixed
    norm.step_fixed = lambda *a, **k: calls.append(1) or orig(*a, **k)
    with torch.no_grad():
        torch.testing.assert_close(run_stream(ch, x, [8]), ch(x), rtol=1e-12, atol=1e-12)
        assert calls, "the chain's steady step never ran"
        st = ch.init_state(2)
        ch.step(x[..., :8], st)
        ch.step(x[..., 8:16], st)
        new = torch.randn(1, 4, 24, dtype=torch.float64)          # a new stream in slot 0
        admit(ch, st, 0, [new[..., :8], new[..., 8:16]], 8)
        y, st = ch.step(torch.cat((new[..., 16:24], x[1:, :, 16:24])), st)
        torch.testing.assert_close(y[1], ch(x[1:, :, :24])[0, :, 8:12], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(y[0], ch(new)[0, :, 8:12], rtol=1e-12, atol=1e-12)


def _measured_lookahead(m, x, time_last):
    """Feed one input step at a time: the worst (input index at which output frame u is out) -
    (last input of u's own hop), in input steps."""
    st = m.init_state(1)
    emit = []
    with torch.no_grad():
        for i in range(x.shape[-1] if time_last else x.shape[1]):
            xi = x[..., i:i + 1] if time_last else x[:, i:i + 1]
            _, st = m.step(xi, st)
            emit += [i] * int(st.out_lengths[0])
    H = latency(m).hop
    return max(e - ((u + 1) * H - 1) for u, e in enumerate(emit))


def test_latency_composes_refiners_and_padded_adapters_exactly():
    """A Refiner declared only its worst frame (chunk - 1), so a chain of two chunk-periodic
    modules added two worst cases that never meet (4 for Refiner(3) -> Refiner(3), which needs
    2); a conv adapter whose window ends before its hop (k - p - s < 0) made CausalEncoder.latency
    raise. Both declare last_input now; the walk equals the measured emission."""
    from pyencoder.nn import ChunkedSelfAttention
    torch.manual_seed(0)
    chains = [StreamingSequential(Refiner(8, 3), Refiner(8, 3)),
              StreamingSequential(ChunkedSelfAttention(8, 2, chunk_size=3, left_chunks=1),
                                  Refiner(8, 3)),
              StreamingSequential(Refiner(8, 2), ChunkedSelfAttention(8, 2, chunk_size=2,
                                                                      left_chunks=1))]
    for ch, want in zip(chains, (2, 2, 1)):
        ch = ch.double().eval()
        assert latency(ch).lookahead_samples == want
        assert _measured_lookahead(ch, torch.randn(1, 24, 8, dtype=torch.float64), False) == want
    enc = CausalEncoder(EncoderConfig(
        conv_dim=(4,), conv_kernel=(2,), conv_stride=(2,), hidden_size=8, num_layers=1,
        num_heads=2, ffn_dim=12, left=4, lookahead=1, add_adapter=True, num_adapter_layers=1,
        adapter_kernel_size=3, adapter_stride=2, adapter_padding=2)).double().eval()
    lat = enc.latency()
    assert lat == latency(enc) and lat.hop == 4
    assert lat.lookahead_samples == _measured_lookahead(
        enc, torch.randn(1, 64, dtype=torch.float64), True) == 0


def test_review_mends_decoder_latency_wrapped_contains_and_feature_conv_kwargs():
    """latency of a decoder held in a list / Sequential of one counted its frames as samples;
    `"samples" in decoder.latency()` worked on the old dict; FeatureConv1d took no nn.Conv1d
    keyword; RunningGroupNorm.step_fixed stays differentiable (its sums are not saved)."""
    from pyencoder.models import FeatureConv1d
    from pyencoder.nn import RunningGroupNorm
    dec = StreamingDecoder(DecoderConfig(input_dim=8, dim=8, intermediate_dim=8, num_blocks=1,
                                         samples_per_frame=4, num_attention_layers=1,
                                         num_heads=2, attention_lookahead=3))
    assert latency(dec).samples == latency([dec]).samples == \
        latency(nn.Sequential(dec)).samples == 16
    lat = dec.latency()
    assert "samples" in lat and "samples_per_frame" in lat and "bogus" not in lat
    FeatureConv1d(2, 2, 3, 1, dilation=1, padding_mode="zeros")
    with pytest.raises(ValueError, match="FeatureConv1d: padding=1 is not supported"):
        FeatureConv1d(2, 2, 3, 1, padding=1)
    norm = RunningGroupNorm(4).double()
    x = torch.randn(1, 4, 8, dtype=torch.float64, requires_grad=True)
    st = norm.init_state(1)
    y = torch.cat([norm.step_fixed(c, st) for c in x.split(4, -1)], -1)
    g, = torch.autograd.grad(y.pow(2).sum(), x)
    g_off, = torch.autograd.grad(norm(x).pow(2).sum(), x)
    torch.testing.assert_close(g, g_off, rtol=1e-10, atol=1e-10)


def test_running_norm_stream_saved_before_out_lengths_still_loads():
    """RunningNormState gained out_lengths: a stream saved without it (an earlier release) loads,
    keeping the fresh state's count of frames out; any other missing key is still refused."""
    from pyencoder.nn import RunningGroupNorm
    from pyencoder.streaming.state import StateKeyError
    norm = RunningGroupNorm(4).double()
    x = torch.randn(2, 4, 9, dtype=torch.float64)
    with torch.no_grad():
        st = norm.init_state(2)
        norm.step(x[..., :5], st)
        old = {k: v for k, v in st.state_dict().items() if k != "out_lengths"}
        st2 = norm.init_state(2).load_state_dict(old)
        y, _ = norm.step(x[..., 5:], st2)
    torch.testing.assert_close(y, norm(x)[..., 5:], rtol=1e-12, atol=1e-12)
    with pytest.raises(StateKeyError, match=r"missing \['count'\]"):
        norm.init_state(2).load_state_dict({k: v for k, v in old.items() if k != "count"})


# ---- session 36's sweep of the newer surfaces ------------------------------------------------

def _conv_state(B=2):
    conv = CausalConv1d(4, 4, 3)
    st = conv.init_state(B)
    _, st = conv.step(torch.randn(B, 4, 5), st)
    return conv, st


def _session36_cases():
    import numpy as np
    m = IntervalMask.band(2, 1)
    x, p = torch.randn(1, 2, 5, 4), torch.arange(5)
    q = torch.randn(1, 2, 6, 4)
    conv, st = _conv_state()
    s, t = [torch.randn(2, 5, 4)] * 2, [torch.randn(2, 5, 8)] * 2
    return [
        # truthy non-bools were taken for True (inverse="no" rotated backwards silently)
        (lambda: FrameCrossAttention(8, 2, mask=m, bias="no"), TypeError, r"bias must be True"),
        (lambda: WavLMSelfAttention(8, 2, left=2, right=1, gated="no"), TypeError,
         r"gated must be True or False"),
        (lambda: WavLMSelfAttention(8, 2, left=2, right=1, has_relative_bias=None), TypeError,
         r"has_relative_bias must be True or False"),
        (lambda: pyencoder.Rope(4).rotate(x, p, inverse="no"), TypeError,
         r"inverse must be True or False"),
        (lambda: FrameCrossAttention(True, True, mask=m, kv_dim=4), ValueError,
         r"embed_dim must be a positive multiple of num_heads; got embed_dim=True"),
        # ignored silently (decode_attention refused it)
        (lambda: pyencoder.ops.banded_attention(q, q, q, left=2, right=1, rel_offset=5),
         ValueError, r"rel_offset needs rel_bias"),
        # a (1,) mask or a bare bool broadcast over the batch: every slot reset
        (lambda: st.reset(torch.tensor([True])), ValueError,
         r"mask must be a bool tensor of shape \(2,\); got torch.bool \(1,\)"),
        (lambda: st.reset(True), ValueError, r"mask must be a bool tensor of shape \(2,\)"),
        (lambda: reset(st, "yes"), TypeError, r"mask must be a bool tensor"),
        (lambda: admit(conv, st, 0, None, 1), TypeError, r"admit: chunks must be a list"),
        (lambda: admit(conv, st, 1.0, [torch.randn(1, 4, 2)], 1), TypeError,
         r"admit: slot must be an int in \[0, 2\); got float"),
        (lambda: conv.init_state(2).load_state_dict(dict(
            st.state_dict(), __config__=np.array([1, 2]))), ValueError, r"does not match"),
        (lambda: conv.init_state(2).load_state_dict(dict(
            st.state_dict(), seen=torch.full((2,), 1 << 60))), ValueError,
         r"seen must be <= 4503599627370496"),
        # distill: raw Python errors, or a silently wrong per-layer error (divided by the first
        # layer's width)
        (lambda: D.layer_weights(2, [True, False]), TypeError, r"schedule must be one of"),
        (lambda: D.layer_weights(3, 5), TypeError, r"schedule must be one of"),
        (lambda: D.hidden_state_loss([s[0], t[0]], [s[0], t[0]]), ValueError,
         r"hidden states must all have the first student state's shape \(2, 5, 4\); pair 1"),
        (lambda: D.hidden_state_loss(s, s, lengths=torch.tensor([True, False])), TypeError,
         r"lengths must be integers"),
        (lambda: D.frame_mask(torch.tensor([1.5, 2.0]), 4, "cpu"), TypeError,
         r"lengths must be integers"),
        (lambda: D.positional_embedding_loss(3, 4, s[0]), TypeError,
         r"student_pos must be a callable"),
    ]


def test_session36_bad_inputs_are_named():
    for call, exc, match in _session36_cases():
        with pytest.raises(exc, match=match):
            call()


def test_decode_scale_takes_what_the_offline_op_takes():
    import numpy as np
    from pyencoder.ops import decode_attention
    q, kr = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8)
    idx = (torch.tensor([[5, 6, 7]]), torch.tensor([3]), torch.tensor([8]))
    a = decode_attention(q, kr, kr, *idx, None, False, 1, 3, 1, 0.3)
    b = decode_attention(q, kr, kr, *idx, None, False, 1, 3, 1, np.float32(0.3))
    torch.testing.assert_close(a, b)
    for bad in (True, "0.3", None):
        with pytest.raises(TypeError, match="scale must be"):
            decode_attention(q, kr, kr, *idx, None, False, 1, 3, 1, bad)


@pytest.mark.parametrize("bad", ["scheduler", "callback", "optimizer", "device"])
def test_distill_refuses_bad_objects_before_any_step(bad):
    torch.manual_seed(0)
    student = CausalEncoder(tiny_encoder_config())
    teacher = CausalEncoder(tiny_encoder_config())
    before = [p.detach().clone() for p in student.parameters()]
    kw = dict(scheduler=None, callback=None, device=None,
              optimizer=torch.optim.SGD(student.parameters(), lr=0.1))
    kw[bad] = {"scheduler": "cosine", "callback": 3, "optimizer": None, "device": "junk"}[bad]
    opt = kw.pop("optimizer")
    with pytest.raises((TypeError, ValueError), match=bad):
        D.distill(student, teacher, [torch.randn(2, 400)], opt, steps=1, progress=False, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_numpy_and_iterables_where_lists_and_bools_are_taken():
    """The refusals above take numpy's arrays, bools and ints, and iterables, as before."""
    import numpy as np
    conv, st = _conv_state()
    reset(st, np.array([True, False]))
    st.reset([np.bool_(False), np.bool_(True)])
    s = [torch.randn(2, 5, 4)] * 2
    a = D.hidden_state_loss(s, s, lengths=np.array([3, 5]))[0]
    b = D.hidden_state_loss(s, s, lengths=[np.int64(3), np.int64(5)])[0]
    assert torch.equal(a, b)
    assert D.frame_mask(np.array([1, 2]), np.int64(3), "cpu").tolist() == \
        [[True, False, False], [True, True, False]]
    assert D.layer_weights(3, np.array([1.0, 2.0, 1.0])) == [0.25, 0.5, 0.25]
    assert D.layer_weights(3, range(1, 4)) == D.layer_weights(3, "linear")
    assert WavLMSelfAttention(8, 2, left=2, right=1, gated=np.bool_(False)).gated is False
    x, p = torch.randn(1, 2, 5, 4), torch.arange(5)
    r = pyencoder.Rope(4)
    assert torch.equal(r.rotate(x, p, inverse=np.bool_(True)), r.rotate(x, p, inverse=True))
    rows = admit(conv, st, 0, (c for c in [torch.randn(1, 4, 2)] * 3), 1)   # a generator
    assert len(rows) == 3


# ---- session 37 ---------------------------------------------------------------------------------

def test_conv_ops_refuse_zero_channels():
    """The README refuses zero channels by name: causal_conv1d of 0 input channels returned
    (B, 0, L) whatever C_out said, and 0 output channels failed in torch's conv words."""
    from pyencoder.ops import causal_conv1d, causal_conv1d_update
    for call, match in (
            (lambda: causal_conv1d(torch.randn(1, 0, 5), torch.randn(4, 0, 3)),
             r"x must have at least one channel"),
            (lambda: causal_conv1d(torch.randn(1, 4, 5), torch.randn(0, 4, 3)),
             r"weight must have at least one output channel"),
            (lambda: causal_conv1d_update(torch.randn(1, 0, 1), torch.randn(1, 0, 2),
                                          torch.randn(4, 0, 3)),
             r"x must have at least one channel"),
            (lambda: causal_conv1d_update(torch.randn(1, 4, 1), torch.randn(1, 4, 2),
                                          torch.randn(0, 4, 3)),
             r"weight must have at least one output channel")):
        with pytest.raises(ValueError, match=match):
            call()


def test_load_state_dict_of_another_batch_names_the_batch():
    """The refusal named init_state's max_chunk (the ring's capacity) for a checkpoint of another
    batch size; it names the batch sizes now."""
    m = BandedSelfAttention(16, 2, left=4, right=1)
    with pytest.raises(ValueError, match=r"the saved stream has batch size 2 \(make the state "
                                         r"with init_state\(2\)\)"):
        m.init_state(1).load_state_dict(m.init_state(2).state_dict())
    with pytest.raises(ValueError, match=r"sized by init_state's max_chunk"):
        m.init_state(1, max_chunk=8).load_state_dict(m.init_state(1).state_dict())
    # batch and ring both differ: the ring's hint (the batch alone does not explain it)
    with pytest.raises(ValueError, match=r"sized by init_state's max_chunk"):
        m.init_state(1, max_chunk=8).load_state_dict(m.init_state(2).state_dict())
    # a loaded unflushed stream keeps ended at its class default (no instance entry: a
    # compiled step guards on its absence)
    st = m.init_state(1)
    st.load_state_dict(m.init_state(1).state_dict())
    assert "ended" not in st.__dict__ and not st.ended


def test_conv_switches_are_checked(monkeypatch):
    """PYENCODER_CONV_ROW is read by the CUDA extension as is ("yes" or " 1" were silently off
    there); the Triton grouped conv's A/B switches were read with == "1" (TAP_MAJOR=yes silently
    off) and `info` listed both as not runtime switches (a wrong value passed unreported)."""
    from pyencoder._env import check_environment, env_exact
    monkeypatch.setenv("PYENCODER_CONV_ROW", " 1")
    with pytest.raises(ValueError, match=r"PYENCODER_CONV_ROW must be exactly one of 0, 1"):
        env_exact("PYENCODER_CONV_ROW", ("0", "1"))
    monkeypatch.setenv("PYENCODER_CONV_TAP_MAJOR", "yes")
    monkeypatch.setenv("PYENCODER_CONV_GRP_TILE", "junk")
    errs = {name: err for name, _, err, _ in check_environment()}
    for name in ("PYENCODER_CONV_ROW", "PYENCODER_CONV_TAP_MAJOR", "PYENCODER_CONV_GRP_TILE"):
        assert errs[name], name
    monkeypatch.setenv("PYENCODER_CONV_ROW", "")                # empty: unset, as everywhere
    assert env_exact("PYENCODER_CONV_ROW", ("0", "1")) is None
    monkeypatch.setenv("PYENCODER_CONV_ROW", "1")
    monkeypatch.setenv("PYENCODER_CONV_TAP_MAJOR", "1")
    monkeypatch.setenv("PYENCODER_CONV_GRP_TILE", "64,64,4,3")
    errs = {name: err for name, _, err, _ in check_environment()}
    assert not any(errs[n] for n in errs if n.startswith("PYENCODER_CONV_"))


def test_convnext_block_takes_an_int_layer_scale():
    """layer_scale_init=1 (an int, as DecoderConfig takes) made an int64 tensor that
    nn.Parameter refused in torch's words."""
    from pyencoder.models.decoder import ConvNeXtBlock
    b = ConvNeXtBlock(8, 16, 3, layer_scale_init=1)
    assert b.gamma.dtype == torch.float32 and torch.equal(b.gamma, torch.ones(8))


# ---- session 38 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(num_layers=1.5), TypeError, r"num_layers must be an int; got float 1.5"),
    (dict(num_layers=None), TypeError, r"num_layers must be an int; got NoneType"),
    (dict(num_layers=True), TypeError, r"num_layers must be an int; got bool"),
    (dict(num_layers=0), ValueError, r"num_layers must be >= 1; got 0"),
    (dict(embed_dim=0), ValueError, r"embed_dim must be >= 1; got 0"),
    (dict(embed_dim=2.5), TypeError, r"embed_dim must be an int; got float"),
    (dict(channels=-3), ValueError, r"channels must be >= 1; got -3"),
    (dict(eps=-1.0), ValueError, r"eps must be a finite float >= 0; got -1.0"),
    (dict(eps=float("nan")), ValueError, r"eps must be a finite float >= 0; got nan"),
    (dict(eps="a"), TypeError, r"eps must be a finite float >= 0; got str"),
])
def test_conv_adapter_arguments_are_named(kwargs, exc, match):
    """ConvAdapter took eps=-1 / nan (a NaN output), eps='a' (a failure at first call), a float
    or bool num_layers (True built 1 layer) and failed in torch's words on a bad embed_dim."""
    from pyencoder.models.adapter import ConvAdapter
    args = dict(embed_dim=6, channels=8, num_layers=1, kernel_size=3, stride=2)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ConvAdapter(**args)


def test_cross_attention_max_context_message_names_the_cause():
    """A bounded mask whose key stream ran ahead of its queries was told to bound its (bounded)
    left; a window wider than max_context is named as such."""
    from pyencoder.nn import FrameCrossAttention

    def overflow(mask, q_frames, kv_frames):
        m = FrameCrossAttention(4, 1, mask=mask, max_context=16)
        st = m.init_state(1)
        with pytest.raises(RuntimeError, match=r"buffered keys exceed max_context=16") as e:
            for _ in range(40):
                _, st = m.step(torch.randn(1, q_frames, 4), torch.randn(1, kv_frames, 4), st)
        return str(e.value)

    assert "the key stream ran ahead of the query stream: 18 keys arrived for 0 queries" in \
        overflow(IntervalMask.frames(1, 2, 1, 0), 0, 2)
    assert "unbounded history" in overflow(IntervalMask.band(None, 0), 1, 1)
    assert "one query sees up to 41 keys" in overflow(IntervalMask.band(40, 0), 1, 1)


@pytest.mark.parametrize("over, match", [
    (dict(conv_kernel=(2,), conv_stride=(3,), conv_dim=(8,)),
     r"EncoderConfig\.conv_stride\[0\] \(3\) exceeds conv_kernel\[0\] \(2\)"),
    (dict(add_adapter=True, adapter_kernel_size=1, adapter_stride=3),
     r"EncoderConfig\.adapter_stride \(3\) exceeds adapter_kernel_size \(1\)"),
    (dict(hidden_size=6, num_heads=2, rope=True),
     r"EncoderConfig\.rope=True rotates the whole head, and the head dim hidden_size // "
     r"num_heads \(3\) is odd: give an even rotary dim below it \(rope=2\) or rope=False"),
    (dict(hidden_size=6, num_heads=2, rope=4),
     r"EncoderConfig\.rope: the rotary dim \(4\) must be <= the head dim"),
    (dict(hidden_size=16, num_heads=3), r"EncoderConfig\.hidden_size \(16\) must be a multiple "
                                        r"of num_heads \(3\)"),
    (dict(sink=4, max_context=2), r"EncoderConfig\.sink \(4\) must be <= max_context \(2\)"),
])
def test_encoder_config_geometry_is_named_by_its_fields(over, match):
    """A conv stride past its kernel, an odd head under rope=True, a rotary dim past the head,
    sinks past max_context were refused in the inner modules' words ('kernel_size (2) must be
    >= stride (3) for a causal conv' with causal_conv=False; 'Rope: dim must be a positive even
    int; got 3'), naming no config field."""
    with pytest.raises(ValueError, match=match):
        CausalEncoder(tiny_encoder_config(**over))
    if "sink" in over:      # a full-context teacher's config: its sink is unused (was taken)
        CausalEncoder(tiny_encoder_config(**over, lookahead=None))


def test_rope_true_on_a_head_of_one_suggests_no_rotary_dim():
    from pyencoder.rope import as_rope
    with pytest.raises(ValueError, match=r"head_dim \(1\) is odd: pass rope=False$"):
        as_rope(True, 1)


def test_decoder_config_attention_heads_are_named_by_its_fields():
    """DecoderConfig has no rope field, yet an odd head was refused with 'pass rope=2 or
    rope=False', and heads not dividing dim in the attention module's words."""
    for dim, heads in ((6, 2), (6, 4)):
        with pytest.raises(ValueError, match=rf"DecoderConfig\.dim \({dim}\) must be num_heads "
                                             rf"\({heads}\) heads of an even size"):
            StreamingDecoder(tiny_decoder_config(dim=dim, num_heads=heads,
                                                 num_attention_layers=1))
    StreamingDecoder(tiny_decoder_config(dim=6, num_heads=4, num_attention_layers=0))
