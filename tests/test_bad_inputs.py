"""Standards audit: every public op and module entry point against a battery of wrong inputs.

The rule (STYLE.md 7, DESIGN.md): bad input gets a clear error naming the argument, what was
expected and what was given; never a crash inside a kernel, a silent wrong answer or a NaN.

Three tables, each row one entry point and one input:

- ``BAD``: the call must raise ValueError or TypeError (subclasses allowed; never RuntimeError,
  IndexError, AssertionError or a kernel's error) whose message names the argument (whole word).
  Where a backend cannot run an otherwise valid case (float64 on triton), the registry's
  RuntimeError naming the backend and the reason is the documented answer (``REFUSED``).
- ``SAME``: accepted but unusual inputs (non-contiguous, expanded / stride-0, zero-size batch or
  length, mixed integer dtypes of lengths): the result (and the gradients, for differentiable
  ops) must equal the reference backend on contiguous copies of the same inputs. Tolerance:
  float32 with reductions of <= 12 terms, triton interpreter vs the torch reference: the two
  differ by summation order only, < 1e-6 relative here; 1e-5 leaves margin and still catches a
  misread stride (an O(1) error).
- ``NAN``: a NaN / inf entry poisons exactly the rows that read it, like torch's SDPA; every other
  row equals the result on clean input.

Decisions on zero-size dims (as torch / FlashAttention): batch 0 and sequence length 0 work and
return empty results (attention, convs, convnext, modules' forward); zero heads, zero head_dim,
zero channels and an empty ring (decode cap 0) are refused by name; init_state(0) is refused
(a stream state has at least one slot).

A known bug without its fix goes into FWD_XFAIL (or a row's marks) as xfail(strict=True): it
turns into a failure when fixed, so the mark gets removed then. None is open.

Tiny shapes; the Triton backend runs under TRITON_INTERPRET=1 on CPU (float32 only there).
"""
import re
import sys
import warnings

import pytest
import torch

import pyencoder
from pyencoder import IntervalMask, Rope
from pyencoder.nn import (BandedSelfAttention, CausalConv1d, ChunkedSelfAttention,
                          FrameCrossAttention, Refiner, RunningGroupNorm, TransformerLayer,
                          Transpose, WavLMSelfAttention)
from pyencoder.ops import (banded_attention, causal_conv1d, causal_conv1d_update,
                           chunked_attention, convnext_dwconv_ln, cross_attention,
                           decode_attention, interval_attention, interval_attention_dropout)
from pyencoder import streaming
from pyencoder.streaming import StreamingSequential, latency, run_stream

from conftest import has_triton

BACKENDS = ["reference"] + (["triton"] if has_triton() else [])
REFUSED = "cannot run"          # the registry's answer for a backend that cannot run a case


def _named(msg, name):
    return re.search(r"(?<![A-Za-z0-9_])" + re.escape(name) + r"(?![A-Za-z0-9_])", msg)


def expect_named(fn, exc, *names):
    with pytest.raises(exc) as ei:
        fn()
    assert type(ei.value) is not RuntimeError
    msg = str(ei.value)
    for n in names:
        assert _named(msg, n), f"message does not name {n!r}: {msg}"
    return msg


# ------------------------------------------------------------------------------------------------
# inputs (fresh random every test; tiny)
# ------------------------------------------------------------------------------------------------

def qkv(B=2, Hq=2, Hk=2, N=5, D=8, dtype=torch.float32):
    return (torch.randn(B, Hq, N, D, dtype=dtype), torch.randn(B, Hk, N, D, dtype=dtype),
            torch.randn(B, Hk, N, D, dtype=dtype))


def ring_args(**over):
    """decode_attention's positional arguments (in order) for two slots at different positions,
    some replaced by ``over``."""
    a = dict(q=torch.randn(2, 2, 3, 8), k_ring=torch.randn(2, 2, 6, 8),
             v_ring=torch.randn(2, 2, 6, 8), q_pos=torch.tensor([[4, 5, 6], [2, 3, 4]]),
             q_count=torch.tensor([3, 2]), n_keys=torch.tensor([7, 5]),
             inv_freq=Rope(8).inv_freq(torch.device("cpu")), interleaved=False, block=1,
             lo_off=2, hi_off=1, scale=0.3)
    a.update(over)
    return a


def decode(be, **over):
    return decode_attention(*ring_args(**over).values(), be)


def band(be, q, k, v, **kw):
    kw = {"left": 2, "right": 1, "backend": be, **kw}
    return banded_attention(q, k, v, **kw)


def meta(t):
    return t.to("meta")


X = lambda *s: torch.randn(*s)  # noqa: E731


# ------------------------------------------------------------------------------------------------
# ops: bad input raises naming the argument
# ------------------------------------------------------------------------------------------------

def _attn_bad():
    q, k, v = qkv()
    rb = torch.randn(2, 20)
    fm = IntervalMask.frames(2, 3, 1, 0)
    rows = [
        ("q rank", lambda be: band(be, q[0], k, v), ValueError, ["q"]),
        ("k rank", lambda be: band(be, q, k[None], v), ValueError, ["k"]),
        ("q int", lambda be: band(be, q.int(), k.int(), v.int()), TypeError, ["q"]),
        ("q bool", lambda be: band(be, q.bool(), k.bool(), v.bool()), TypeError, ["q"]),
        ("q complex", lambda be: band(be, q.cfloat(), k.cfloat(), v.cfloat()), TypeError, ["q"]),
        ("v dtype", lambda be: band(be, q, k, v.double()), TypeError, ["v"]),
        ("batch", lambda be: band(be, q, k[:1], v[:1]), ValueError, ["batch"]),
        ("k/v length", lambda be: band(be, q, k, v[:, :, :4]), ValueError, ["k", "v"]),
        ("head_dim", lambda be: band(be, q, k, v[..., :4]), ValueError, ["head_dim"]),
        ("heads GQA", lambda be: band(be, q, X(2, 3, 5, 8), X(2, 3, 5, 8)), ValueError,
         ["heads"]),
        ("Hq=0", lambda be: band(be, q[:, :0], k, v), ValueError, ["heads"]),
        ("H=0", lambda be: band(be, q[:, :0], k[:, :0], v[:, :0]), ValueError, ["heads"]),
        ("D=0", lambda be: band(be, q[..., :0], k[..., :0], v[..., :0]), ValueError,
         ["head_dim"]),
        ("k meta", lambda be: band(be, q, meta(k), v), ValueError, ["k"]),
        ("left bool", lambda be: band(be, q, k, v, left=True), TypeError, ["left"]),
        ("left float", lambda be: band(be, q, k, v, left=2.0), TypeError, ["left"]),
        ("left tensor", lambda be: band(be, q, k, v, left=torch.tensor(2)), TypeError, ["left"]),
        ("right negative", lambda be: band(be, q, k, v, right=-1), ValueError, ["right"]),
        ("sink negative", lambda be: band(be, q, k, v, sink=-1), ValueError, ["sink"]),
        ("sink bool", lambda be: band(be, q, k, v, sink=True), TypeError, ["sink"]),
        ("q_offset bool", lambda be: band(be, q, k, v, q_offset=True), TypeError, ["q_offset"]),
        ("k_offset negative", lambda be: band(be, q, k, v, k_offset=-1), ValueError,
         ["k_offset"]),
        ("scale str", lambda be: band(be, q, k, v, scale="1"), TypeError, ["scale"]),
        ("scale nan", lambda be: band(be, q, k, v, scale=float("nan")), ValueError, ["scale"]),
        ("rope type", lambda be: band(be, q, k, v, rope=8), TypeError, ["rope"]),
        ("rope dim", lambda be: band(be, q, k, v, rope=Rope(16)), ValueError, ["rope.dim"]),
        ("key_lengths float", lambda be: band(be, q, k, v, key_lengths=torch.tensor([1., 2.])),
         TypeError, ["key_lengths"]),
        ("key_lengths bool",
         lambda be: band(be, q, k, v, key_lengths=torch.tensor([True, False])), TypeError,
         ["key_lengths"]),
        ("key_lengths 2-D", lambda be: band(be, q, k, v, key_lengths=torch.tensor([[1, 2]])),
         ValueError, ["key_lengths"]),
        ("key_lengths list", lambda be: band(be, q, k, v, key_lengths=[1, 2]), TypeError,
         ["key_lengths"]),
        ("key_lengths > Nk", lambda be: band(be, q, k, v, key_lengths=torch.tensor([6, 1])),
         ValueError, ["key_lengths"]),
        ("key_lengths < 0", lambda be: band(be, q, k, v, key_lengths=torch.tensor([-1, 1])),
         ValueError, ["key_lengths"]),
        ("key_lengths meta",
         lambda be: band(be, q, k, v, key_lengths=torch.tensor([1, 2], device="meta")),
         ValueError, ["key_lengths"]),
        ("chunk_size bool", lambda be: chunked_attention(q, k, v, chunk_size=True, left_chunks=1,
                                                         backend=be), TypeError, ["chunk_size"]),
        ("chunk_size 0", lambda be: chunked_attention(q, k, v, chunk_size=0, left_chunks=1,
                                                      backend=be), ValueError, ["chunk_size"]),
        ("left_chunks float", lambda be: chunked_attention(q, k, v, chunk_size=2, left_chunks=1.0,
                                                           backend=be), TypeError,
         ["left_chunks"]),
        ("lookahead negative", lambda be: chunked_attention(q, k, v, chunk_size=2, left_chunks=1,
                                                            lookahead=-1, backend=be),
         ValueError, ["lookahead"]),
        ("mask str", lambda be: interval_attention(q, k, v, mask="band", backend=be), TypeError,
         ["mask"]),
        ("mask missing", lambda be: interval_attention(q, k, v, backend=be), TypeError, ["mask"]),
        ("backend junk", lambda be: band(be, q, k, v, backend="gpu"), ValueError, ["backend"]),
        ("rel_bias int", lambda be: band(be, q, k, v, rel_bias=rb.int()), TypeError,
         ["rel_bias"]),
        ("rel_bias 1-D", lambda be: band(be, q, k, v, rel_bias=rb[0]), ValueError, ["rel_bias"]),
        ("rel_bias heads", lambda be: band(be, q, k, v, rel_bias=rb[:1]), ValueError,
         ["rel_bias"]),
        ("rel_bias meta", lambda be: band(be, q, k, v, rel_bias=meta(rb)), ValueError,
         ["rel_bias"]),
        ("rel_bias short", lambda be: band(be, q, k, v, rel_bias=rb[:, :2]), ValueError,
         ["rel_bias"]),
        ("rel_bias nan", lambda be: band(be, q, k, v, rel_bias=rb.clone().fill_(float("nan"))),
         ValueError, ["rel_bias"]),
        ("gate without rel_bias", lambda be: band(be, q, k, v, gate=X(2, 2, 5)), ValueError,
         ["gate", "rel_bias"]),
        ("gate shape", lambda be: band(be, q, k, v, rel_bias=rb, gate=X(2, 2, 6)), ValueError,
         ["gate"]),
        ("gate int", lambda be: band(be, q, k, v, rel_bias=rb,
                                     gate=torch.ones(2, 2, 5, dtype=torch.int32)), TypeError,
         ["gate"]),
        ("rel_offset bool", lambda be: band(be, q, k, v, rel_bias=rb, rel_offset=True), TypeError,
         ["rel_offset"]),
        ("cross mask None", lambda be: cross_attention(q, k, v, mask=None, backend=be), TypeError,
         ["mask"]),
        ("cross q rank", lambda be: cross_attention(q[0], k, v, mask=fm, backend=be), ValueError,
         ["q"]),
        ("cross k int", lambda be: cross_attention(q, k.int(), v, mask=fm, backend=be), TypeError,
         ["k"]),
        ("cross key_lengths", lambda be: cross_attention(q, k, v, mask=fm, backend=be,
                                                         key_lengths=torch.tensor([9, 1])),
         ValueError, ["key_lengths"]),
        ("frame mask to interval_attention",
         lambda be: interval_attention(q, k, v, mask=fm, backend=be), ValueError,
         ["cross_attention"]),
        ("dropout_p 2", lambda be: interval_attention_dropout(
            q, k, v, mask=IntervalMask.band(2, 1), dropout_p=2.0), ValueError, ["dropout_p"]),
        ("dropout_p bool", lambda be: interval_attention_dropout(
            q, k, v, mask=IntervalMask.band(2, 1), dropout_p=True), TypeError, ["dropout_p"]),
        ("dropout q int", lambda be: interval_attention_dropout(
            q.int(), k, v, mask=IntervalMask.band(2, 1), dropout_p=0.1), TypeError, ["q"]),
    ]
    return [("attention", *r) for r in rows]


def _decode_bad():
    a = ring_args()
    rows = [
        ("q rank", dict(q=a["q"][0]), ValueError, ["q"]),
        ("q int", dict(q=a["q"].int()), TypeError, ["q"]),
        ("k_ring rank", dict(k_ring=a["k_ring"][0]), ValueError, ["k_ring"]),
        ("k_ring batch", dict(k_ring=a["k_ring"][:1]), ValueError, ["k_ring"]),
        ("k_ring head_dim", dict(k_ring=a["k_ring"][..., :4]), ValueError, ["k_ring"]),
        ("k_ring int", dict(k_ring=a["k_ring"].int()), TypeError, ["k_ring"]),
        ("k_ring meta", dict(k_ring=meta(a["k_ring"])), ValueError, ["k_ring"]),
        ("ring cap 0", dict(k_ring=a["k_ring"][:, :, :0], v_ring=a["v_ring"][:, :, :0]),
         ValueError, ["k_ring"]),
        ("v_ring cap", dict(v_ring=a["v_ring"][:, :, :4]), ValueError, ["v_ring"]),
        ("v_ring head_dim", dict(v_ring=a["v_ring"][..., :4]), ValueError, ["v_ring"]),
        ("GQA heads", dict(k_ring=X(2, 3, 6, 8), v_ring=X(2, 3, 6, 8)), ValueError, ["heads"]),
        ("H=0", dict(q=a["q"][:, :0], k_ring=a["k_ring"][:, :0], v_ring=a["v_ring"][:, :0]),
         ValueError, ["heads"]),
        ("q_pos float", dict(q_pos=a["q_pos"].float()), TypeError, ["q_pos"]),
        ("q_pos shape", dict(q_pos=a["q_pos"][:, :2]), ValueError, ["q_pos"]),
        ("q_pos meta", dict(q_pos=meta(a["q_pos"])), ValueError, ["q_pos"]),
        ("q_count shape", dict(q_count=a["q_count"][:1]), ValueError, ["q_count"]),
        ("q_count bool", dict(q_count=a["q_count"].bool()), TypeError, ["q_count"]),
        ("n_keys float", dict(n_keys=a["n_keys"].float()), TypeError, ["n_keys"]),
        ("n_keys shape", dict(n_keys=a["n_keys"][None]), ValueError, ["n_keys"]),
        ("n_keys list", dict(n_keys=[7, 5]), TypeError, ["n_keys"]),
        ("inv_freq int", dict(inv_freq=torch.ones(4, dtype=torch.int32)), TypeError,
         ["inv_freq"]),
        ("inv_freq too long", dict(inv_freq=torch.ones(8)), ValueError, ["inv_freq"]),
        ("interleaved int", dict(interleaved=1), TypeError, ["interleaved"]),
        ("block 0", dict(block=0), ValueError, ["block"]),
        ("block bool", dict(block=True), TypeError, ["block"]),
        ("lo_off float", dict(lo_off=2.0), TypeError, ["lo_off"]),
        ("lo_off -2", dict(lo_off=-2), ValueError, ["lo_off"]),
        ("hi_off tensor", dict(hi_off=torch.tensor(1)), TypeError, ["hi_off"]),
        ("scale nan", dict(scale=float("nan")), ValueError, ["scale"]),
        ("scale 0", dict(scale=0.0), ValueError, ["scale"]),
    ]
    out = [("decode_attention", name, (lambda be, o=o: decode(be, **o)), exc, names)
           for name, o, exc, names in rows]
    out += [
        ("decode_attention", "rel_bias without bounded left",
         lambda be: decode_attention(*ring_args(lo_off=-1).values(), be, rel_bias=X(2, 10)),
         ValueError, ["rel_bias", "lo_off"]),
        ("decode_attention", "rel_offset without rel_bias",
         lambda be: decode_attention(*ring_args().values(), be, rel_offset=0), ValueError,
         ["rel_offset"]),
    ]
    return out


def _conv_bad():
    x, w = X(2, 4, 10), X(4, 1, 3)
    st = X(2, 4, 2)
    cc = lambda be, *a, **kw: causal_conv1d(*a, backend=be, **{"groups": 4, **kw})  # noqa
    cu = lambda be, *a, **kw: causal_conv1d_update(*a, backend=be, **{"groups": 4, **kw})  # noqa
    rows = [
        ("x rank", lambda be: cc(be, x[0], w), ValueError, ["x"]),
        ("x int", lambda be: cc(be, x.int(), w.int()), TypeError, ["x"]),
        ("x bool", lambda be: cc(be, x.bool(), w.bool()), TypeError, ["x"]),
        ("weight rank", lambda be: cc(be, x, w[0]), ValueError, ["weight"]),
        ("weight dtype", lambda be: cc(be, x, w.double()), TypeError, ["weight"]),
        ("weight meta", lambda be: cc(be, x, meta(w)), ValueError, ["weight"]),
        ("weight shape (grouped)", lambda be: cc(be, x, X(4, 3, 3), groups=2), ValueError,
         ["weight"]),
        ("channels 0", lambda be: cc(be, x[:, :0], w[:0], groups=1), ValueError, ["x"]),
        ("groups bool", lambda be: cc(be, x, w, groups=True), TypeError, ["groups"]),
        ("groups 0", lambda be: cc(be, x, w, groups=0), ValueError, ["groups"]),
        ("groups divides", lambda be: cc(be, x, w, groups=3), ValueError, ["groups"]),
        ("stride float", lambda be: cc(be, x, X(4, 4, 3), groups=1, stride=1.0), TypeError,
         ["stride"]),
        ("stride > k (strided)", lambda be: cc(be, x, X(4, 4, 3), groups=1, stride=4),
         ValueError, ["stride"]),
        ("activation", lambda be: cc(be, x, w, activation="relu"), ValueError, ["activation"]),
        ("bias shape", lambda be: cc(be, x, w, X(3)), ValueError, ["bias"]),
        ("bias rank", lambda be: cc(be, x, w, X(4, 1)), ValueError, ["bias"]),
        ("initial_state shape", lambda be: cc(be, x, w, initial_state=X(2, 4, 3)), ValueError,
         ["initial_state"]),
        ("initial_state meta", lambda be: cc(be, x, w, initial_state=meta(X(2, 4, 2))),
         ValueError, ["initial_state"]),
        ("update x rank", lambda be: cu(be, x[0], st.clone(), w), ValueError, ["x"]),
        ("update x empty", lambda be: cu(be, x[..., :0], st.clone(), w), ValueError, ["x"]),
        ("update state shape", lambda be: cu(be, x[..., :2], X(2, 4, 3), w), ValueError,
         ["state"]),
        ("update state batch", lambda be: cu(be, x[..., :2], X(3, 4, 2), w), ValueError,
         ["state"]),
        ("update state int", lambda be: cu(be, x[..., :2], st.int(), w), TypeError, ["state"]),
        ("update state meta", lambda be: cu(be, x[..., :2], meta(st), w), ValueError, ["state"]),
        ("update state expanded", lambda be: cu(be, x[..., :2], st[:1].expand(2, -1, -1), w),
         ValueError, ["state"]),
        ("update state_indices float", lambda be: cu(be, x[..., :2], st.clone(), w,
                                                     state_indices=torch.tensor([0., 1.])),
         TypeError, ["state_indices"]),
        ("update state_indices shape", lambda be: cu(be, x[..., :2], st.clone(), w,
                                                     state_indices=torch.tensor([0])),
         ValueError, ["state_indices"]),
        ("update state_indices range", lambda be: cu(be, x[..., :2], st.clone(), w,
                                                     state_indices=torch.tensor([-2, 1])),
         ValueError, ["state_indices"]),
        ("update state_indices repeat", lambda be: cu(be, x[..., :2], st.clone(), w,
                                                      state_indices=torch.tensor([1, 1])),
         ValueError, ["state_indices"]),
        ("update state_indices meta",
         lambda be: cu(be, x[..., :2], st.clone(), w,
                       state_indices=torch.tensor([0, 1], device="meta")),
         ValueError, ["state_indices"]),
    ]
    return [("conv", *r) for r in rows]


def _convnext_bad():
    x, w = X(2, 4, 10), X(4, 1, 3)
    cn = lambda be, *a, **kw: convnext_dwconv_ln(*a, backend=be, **kw)  # noqa: E731
    rows = [
        ("x rank", lambda be: cn(be, x[0], w), ValueError, ["x"]),
        ("x int", lambda be: cn(be, x.int(), w.int()), TypeError, ["x"]),
        ("channels 0", lambda be: cn(be, x[:, :0], w[:0]), ValueError, ["x"]),
        ("conv_weight grouped", lambda be: cn(be, x, X(4, 2, 3)), ValueError, ["conv_weight"]),
        ("conv_weight dtype", lambda be: cn(be, x, w.double()), TypeError, ["conv_weight"]),
        ("ln_weight shape", lambda be: cn(be, x, w, None, X(3)), ValueError, ["ln_weight"]),
        ("ln_weight meta", lambda be: cn(be, x, w, None, meta(X(4))), ValueError, ["ln_weight"]),
        ("conv_bias rank", lambda be: cn(be, x, w, X(4, 1)), ValueError, ["conv_bias"]),
        ("eps nan", lambda be: cn(be, x, w, eps=float("nan")), ValueError, ["eps"]),
        ("eps inf", lambda be: cn(be, x, w, eps=float("inf")), ValueError, ["eps"]),
        ("eps negative", lambda be: cn(be, x, w, eps=-1e-6), ValueError, ["eps"]),
        ("eps str", lambda be: cn(be, x, w, eps="1e-6"), TypeError, ["eps"]),
        ("initial_state shape", lambda be: cn(be, x, w, initial_state=X(2, 4, 3)), ValueError,
         ["initial_state"]),
    ]
    return [("convnext", *r) for r in rows]


OP_BAD = _attn_bad() + _decode_bad() + _conv_bad() + _convnext_bad()


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("family,name,fn,exc,names", OP_BAD,
                         ids=[f"{r[0]}-{r[1]}" for r in OP_BAD])
def test_op_bad_input_is_named(be, family, name, fn, exc, names):
    expect_named(lambda: fn(be), exc, *names)


# Valid cases a backend cannot run: the registry refuses by name (RuntimeError, documented).
REFUSALS = [
    ("attention float64", lambda: band("triton", *qkv(dtype=torch.float64))),
    ("decode float64", lambda: decode("triton", q=X(2, 2, 3, 8).double(),
                                      k_ring=X(2, 2, 6, 8).double(),
                                      v_ring=X(2, 2, 6, 8).double())),
    ("conv float64", lambda: causal_conv1d(X(2, 4, 5).double(), X(4, 1, 3).double(), groups=4,
                                           backend="triton")),
    ("convnext width 300", lambda: convnext_dwconv_ln(X(2, 4, 5), X(4, 1, 300),
                                                      backend="triton")),
    ("attention meta tensors", lambda: band("triton", *map(meta, qkv()))),
]


@pytest.mark.skipif(not has_triton(), reason="needs triton")
@pytest.mark.parametrize("name,fn", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_forced_backend_refuses_by_name(name, fn):
    with pytest.raises(RuntimeError, match="backend 'triton' " + REFUSED):
        fn()


# ------------------------------------------------------------------------------------------------
# ops: accepted but unusual inputs equal the reference on contiguous copies
# ------------------------------------------------------------------------------------------------

def noncontig(t):
    """Same values, last two dims stored transposed (strides permuted)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _same_cases():
    B, H, N, D = 2, 2, 5, 8

    def attn(be, q, k, v, kl=None):
        return band(be, q, k, v, rope=Rope(4), key_lengths=kl)

    def chunk(be, q, k, v):
        return chunked_attention(q, k, v, chunk_size=2, left_chunks=1, lookahead=1, backend=be,
                                 sink=1)

    def cross(be, q, k, v):
        return cross_attention(q, k, v, mask=IntervalMask.frames(2, 3, 1, 0), backend=be)

    def biased(be, q, k, v, rb, g):
        return band(be, q, k, v, rel_bias=rb, gate=g)

    def conv(be, x, w, b, s):
        return causal_conv1d(x, w, b, groups=4, activation="silu", initial_state=s, backend=be)

    def conv_grouped(be, x, w):
        return causal_conv1d(x, w, groups=2, backend=be)

    def conv_strided(be, x, w):
        return causal_conv1d(x, w, stride=2, backend=be)

    def conv_bias(be, x, w, b):
        return (causal_conv1d(x, w, b, groups=2, backend=be)
                + causal_conv1d(x, w.repeat(1, 2, 1), b, stride=3, backend=be).repeat_interleave(
                    3, -1))

    def cnext(be, x, w, lw, lb):
        return convnext_dwconv_ln(x, w, None, lw, lb, backend=be)

    def cnext_state(be, x, w, cb, s):
        return convnext_dwconv_ln(x, w, cb, initial_state=s, backend=be)

    q = lambda *s: torch.randn(*s, requires_grad=True)  # noqa: E731
    exp = lambda t, n: t.detach()[:1].expand(n, *t.shape[1:]).requires_grad_()  # noqa: E731
    rows = [
        ("attention non-contiguous q/k/v", attn,
         lambda: [noncontig(q(B, H, N, D)).requires_grad_(),
                  q(B, N, H, D).transpose(1, 2), q(B, H, D, N).transpose(2, 3)]),
        ("attention expanded q, k heads", attn,
         lambda: [exp(q(1, H, N, D), B),
                  q(B, 1, N, D).detach().expand(B, H, N, D).requires_grad_(), q(B, H, N, D)]),
        ("attention batch 0", attn, lambda: [q(0, H, N, D), q(0, H, N, D), q(0, H, N, D)]),
        ("attention length 0", attn, lambda: [q(B, H, 0, D), q(B, H, 0, D), q(B, H, 0, D)]),
        ("attention no keys", attn, lambda: [q(B, H, N, D), q(B, H, 0, D), q(B, H, 0, D)]),
        ("attention key_lengths int8 non-contiguous", attn,
         lambda: [q(B, H, N, D), q(B, H, N, D), q(B, H, N, D),
                  torch.tensor([5, 9, 0, 9], dtype=torch.int8)[::2]]),
        ("attention key_lengths expanded", attn,
         lambda: [q(B, H, N, D), q(B, H, N, D), q(B, H, N, D), torch.tensor([3]).expand(B)]),
        ("chunked sink non-contiguous", chunk,
         lambda: [noncontig(q(B, H, N, D)).requires_grad_(), q(B, H, N, D),
                  q(B, N, H, D).transpose(1, 2)]),
        ("cross non-contiguous, Nq != Nk", cross,
         lambda: [q(B, H, 4, D), noncontig(q(B, H, 7, D)).requires_grad_(), q(B, H, 7, D)]),
        ("cross batch 0", cross, lambda: [q(0, H, 4, D), q(0, H, 7, D), q(0, H, 7, D)]),
        ("bias gated, batch 0", biased,
         lambda: [q(0, H, N, D), q(0, H, N, D), q(0, H, N, D), q(H, 20), q(0, H, N)]),
        ("bias non-contiguous rel_bias, expanded gate", biased,
         lambda: [q(B, H, N, D), q(B, H, N, D), q(B, H, N, D),
                  q(20, H).detach().t().requires_grad_(),
                  q(1, H, N).detach().expand(B, H, N).requires_grad_()]),
        ("conv depthwise non-contiguous x, state", conv,
         lambda: [q(2, 10, 4).transpose(1, 2), q(4, 3, 1).permute(0, 2, 1), q(8)[::2],
                  q(2, 2, 4).transpose(1, 2)]),
        ("conv depthwise expanded x", conv,
         lambda: [exp(q(1, 4, 10), 2), q(4, 1, 3), q(4), q(2, 4, 2)]),
        ("conv depthwise batch 0", conv, lambda: [q(0, 4, 10), q(4, 1, 3), q(4), q(0, 4, 2)]),
        ("conv depthwise length 0", conv, lambda: [q(2, 4, 0), q(4, 1, 3), q(4), q(2, 4, 2)]),
        ("conv grouped non-contiguous", conv_grouped,
         lambda: [q(2, 9, 4).transpose(1, 2), q(4, 2, 3)]),
        ("conv strided non-contiguous, length < stride", conv_strided,
         lambda: [q(2, 1, 4).transpose(1, 2), q(4, 4, 3)]),
        ("conv strided expanded", conv_strided, lambda: [exp(q(1, 4, 9), 2), q(4, 4, 3)]),
        ("conv grouped / strided, strided bias and weight", conv_bias,
         lambda: [q(2, 4, 9), q(3, 2, 4).permute(2, 1, 0), q(8)[::2]]),
        # strided ln_weight / ln_bias were misread by the triton launcher (fixed)
        ("convnext non-contiguous x, strided ln vectors", cnext,
         lambda: [q(2, 10, 4).transpose(1, 2), q(4, 1, 3), q(8)[::2], q(8)[::2]]),
        ("convnext strided conv_bias, expanded state", cnext_state,
         lambda: [q(2, 4, 10), q(4, 1, 3), q(8)[::2], q(1, 4, 2).detach().expand(2, 4, 2)]),
        ("convnext batch 0 / length 0", cnext, lambda: [q(0, 4, 0), q(4, 1, 3), q(4), q(4)]),
    ]
    return rows


SAME = [r if not isinstance(r, tuple) or len(r) != 3 or not isinstance(r[0], str)
        else pytest.param(*r, id=r[0]) for r in _same_cases()]


def _contig(a):
    if not isinstance(a, torch.Tensor):
        return a
    c = a.detach().contiguous().clone()
    return c.requires_grad_() if a.requires_grad else c


def _leaves(args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("name,fn,make", SAME)
def test_unusual_layouts_equal_the_reference(be, name, fn, make):
    # leaves keep their (non-contiguous / expanded) strides: detach() does not copy
    args = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.requires_grad
            and not a.is_leaf else a for a in make()]
    if be == "triton" and any(isinstance(a, torch.Tensor) and a.dtype != torch.float32
                              and a.dtype.is_floating_point for a in args):
        pytest.skip("the interpreter runs float32")
    ref_args = [_contig(a) for a in args]
    out = fn(be, *args)
    ref = fn("reference", *ref_args)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if out.numel() == 0:
        return
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    for a, r in zip(_leaves(args), _leaves(ref_args)):
        assert a.grad is not None and a.grad.shape == a.shape
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_conv_update_unusual_layouts_equal_the_reference(be, idx_dtype):
    """A strided int32 state_indices was misread by the triton launcher (NaN outputs, another
    slot's state overwritten). Fixed; here with non-contiguous x and state too."""
    x, w, b = torch.randn(3, 4, 2), torch.randn(4, 1, 3), torch.randn(4)
    pool = torch.randn(5, 4, 2)
    idx = torch.tensor([4, -1, 2], dtype=idx_dtype)
    got_pool = noncontig(pool)
    got = causal_conv1d_update(noncontig(x), got_pool, w, b, groups=4, activation="silu",
                               state_indices=strided(idx), backend=be)
    ref_pool = pool.clone()
    ref = causal_conv1d_update(x, ref_pool, w, b, groups=4, activation="silu",
                               state_indices=idx, backend="reference")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_pool, ref_pool, rtol=1e-5, atol=1e-5)
    st = torch.randn(3, 4, 2)
    got_st = noncontig(st)
    got = causal_conv1d_update(x[:1].expand(3, -1, -1), got_st, w, groups=4, backend=be)
    ref_st = st.clone()
    ref = causal_conv1d_update(x[:1].expand(3, -1, -1).contiguous(), ref_st, w, groups=4,
                               backend="reference")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_st, ref_st, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("be", BACKENDS)
def test_zero_size_backward_gives_empty_gradients(be):
    """Batch 0 and length 0 are accepted forward and backward (empty gradients, no error). The
    triton conv backward returned dx and dinitial_state as views of one buffer at length 0 or
    pad 0 (k == stride), which the registered op refused as aliased outputs (fixed)."""
    for shape in ((0, 2, 5, 8), (2, 2, 0, 8)):
        q, k, v = (torch.randn(*shape, requires_grad=True) for _ in range(3))
        out, lse = interval_attention(q, k, v, mask=IntervalMask.band(2, 1, sink=1), rope=Rope(4),
                                      return_lse=True, backend=be)
        (out.sum() + lse.sum()).backward()
        assert q.grad.shape == q.shape and k.grad.shape == k.shape
    for L, K, stride, groups in ((0, 3, 1, 4), (0, 2, 2, 1), (6, 2, 2, 1)):
        x = torch.randn(2, 4, L, requires_grad=True)
        w = torch.randn(4, 4 // groups, K, requires_grad=True)
        s0 = torch.randn(2, 4, K - stride, requires_grad=True)
        grads = []
        for b in (be, "reference"):
            y, fin = causal_conv1d(x, w, groups=groups, stride=stride, initial_state=s0,
                                   return_final_state=True, backend=b)
            grads.append(torch.autograd.grad(y.sum() + (2 * fin).sum(), (x, w, s0)))
        for a, r in zip(*grads):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    x = torch.randn(0, 4, 6, requires_grad=True)
    causal_conv1d(x, torch.randn(4, 1, 3), groups=4, backend=be).sum().backward()
    assert x.grad.shape == x.shape


def strided(t):
    """Same values, every other element of a twice-as-long last dim (stride 2 there)."""
    return torch.stack((t, torch.full_like(t, 99)), -1)[..., 0]


@pytest.mark.parametrize("be", BACKENDS)
def test_decode_unusual_layouts_equal_the_reference(be):
    """Strided int32 q_count / n_keys and a strided inv_freq were misread by the triton launcher
    (unit stride assumed): wrong rows, no error. Fixed; here against contiguous copies."""
    a = ring_args()
    out = decode_attention(noncontig(a["q"]), a["k_ring"][:1].expand(2, -1, -1, -1),
                           noncontig(a["v_ring"]), a["q_pos"].t().contiguous().t(),
                           strided(a["q_count"].int()), strided(a["n_keys"].int()),
                           strided(a["inv_freq"]), False, 1, 2, 1, 0.3, be)
    ref = decode_attention(a["q"], a["k_ring"][:1].expand(2, -1, -1, -1).contiguous(),
                           *list(a.values())[2:], "reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    rb, g = torch.randn(2, 10), torch.randn(1, 2, 3)
    out = decode_attention(*a.values(), be, rel_bias=strided(rb), gate=g.expand(2, -1, -1))
    ref = decode_attention(*a.values(), "reference", rel_bias=rb,
                           gate=g.expand(2, -1, -1).contiguous())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for over, shape in ((dict(q=a["q"][:, :, :0], q_pos=a["q_pos"][:, :0]), (2, 2, 0, 8)),
                        (dict(q=a["q"][:0], k_ring=a["k_ring"][:0], v_ring=a["v_ring"][:0],
                              q_pos=a["q_pos"][:0], q_count=a["q_count"][:0],
                              n_keys=a["n_keys"][:0]), (0, 2, 3, 8))):
        assert decode(be, **over).shape == shape


# ------------------------------------------------------------------------------------------------
# NaN / inf: exactly the rows that read them
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_attention_nonfinite_poisons_only_the_rows_that_see_it(be, where):
    q, k, v = qkv(N=9)
    clean = band(be, q, k, v)
    t = {"q": q, "k": k, "v": v}[where].clone()
    t[0, 1, 4, 3] = float("nan") if where != "k" else float("inf")
    args = {"q": q, "k": k, "v": v, where: t}
    out = band(be, args["q"], args["k"], args["v"])
    bad = torch.zeros(2, 2, 9, dtype=torch.bool)
    if where == "q":
        bad[0, 1, 4] = True
    else:                                   # rows i that see key 4: i - 2 <= 4 <= i + 1
        bad[0, 1, 3:7] = True
    assert torch.equal(out.isnan().any(-1), bad)
    torch.testing.assert_close(out[~bad], clean[~bad], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("be", BACKENDS)
def test_decode_nonfinite_poisons_only_its_slot_rows(be):
    a = ring_args()
    clean = decode_attention(*a.values(), be)
    a["q"] = a["q"].clone()
    a["q"][1, 0, 1, 2] = float("nan")
    out = decode_attention(*a.values(), be)
    bad = torch.zeros(2, 2, 3, dtype=torch.bool)
    bad[1, 0, 1] = True
    assert torch.equal(out.isnan().any(-1), bad)
    torch.testing.assert_close(out[~bad], clean[~bad], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("be", BACKENDS)
def test_conv_nonfinite_poisons_only_its_receptive_field(be):
    x, w = X(2, 4, 10), X(4, 1, 3)
    clean = causal_conv1d(x, w, groups=4, backend=be)
    xn = x.clone()
    xn[1, 2, 5] = float("nan")
    out = causal_conv1d(xn, w, groups=4, backend=be)
    bad = torch.zeros_like(out, dtype=torch.bool)
    bad[1, 2, 5:8] = True
    assert torch.equal(out.isnan(), bad)
    torch.testing.assert_close(out[~bad], clean[~bad], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("be", BACKENDS)
def test_convnext_and_cross_nonfinite_poison_only_their_rows(be):
    x, w = X(2, 4, 10), X(4, 1, 3)
    clean = convnext_dwconv_ln(x, w, backend=be)
    xn = x.clone()
    xn[1, 2, 5] = float("nan")
    out = convnext_dwconv_ln(xn, w, backend=be)          # (B, L, C): frames 5..7 of batch 1
    bad = torch.zeros(2, 10, dtype=torch.bool)
    bad[1, 5:8] = True
    assert torch.equal(out.isnan().any(-1), bad) and out[bad].isnan().all()
    torch.testing.assert_close(out[~bad], clean[~bad], rtol=1e-5, atol=1e-5)
    q, k, v = X(2, 2, 4, 8), X(2, 2, 7, 8), X(2, 2, 7, 8)
    m = IntervalMask.frames(2, 3, 0, 0)       # query frame f = p // 2 sees keys 3 f .. 3 f + 2
    clean = cross_attention(q, k, v, mask=m, backend=be)
    kn = k.clone()
    kn[0, 1, 4, 0] = float("nan")
    out = cross_attention(q, kn, v, mask=m, backend=be)
    bad = torch.zeros(2, 2, 4, dtype=torch.bool)
    bad[0, 1, 2:4] = True
    assert torch.equal(out.isnan().any(-1), bad)
    torch.testing.assert_close(out[~bad], clean[~bad], rtol=1e-5, atol=1e-5)


def test_module_nan_in_one_slot_stays_in_that_slot():
    m = BandedSelfAttention(8, 2, left=3, right=1)
    x = torch.randn(2, 7, 8)
    clean, _ = m.step(x, m.init_state(2))
    xn = x.clone()
    xn[0, 2, 1] = float("nan")
    y, _ = m.step(xn, m.init_state(2))
    assert not y[1].isnan().any()
    torch.testing.assert_close(y[1], clean[1], rtol=1e-5, atol=1e-5)
    assert y[0, :1].isfinite().all() and y[0, 1:].isnan().all()   # rows >= 1 see frame 2


# ------------------------------------------------------------------------------------------------
# modules: forward / init_state / step / step_fixed / flush
# ------------------------------------------------------------------------------------------------

E = 8


def _modules():
    """name -> (factory, feature axis, time-last layout)."""
    return {
        "BandedSelfAttention": (lambda: BandedSelfAttention(E, 2, left=3, right=1), False),
        "BandedSelfAttention(sink)": (lambda: BandedSelfAttention(E, 2, left=3, right=1, sink=2),
                                      False),
        "ChunkedSelfAttention": (lambda: ChunkedSelfAttention(E, 2, chunk_size=2, left_chunks=1,
                                                              lookahead=1), False),
        "WavLMSelfAttention": (lambda: WavLMSelfAttention(E, 2, left=3, right=1, num_buckets=8,
                                                          max_distance=16), False),
        "CausalConv1d": (lambda: CausalConv1d(E, E, 3, groups=E), True),
        "CausalConv1d(strided)": (lambda: CausalConv1d(E, E, 4, stride=2), True),
        "TransformerLayer": (lambda: TransformerLayer(BandedSelfAttention(E, 2, left=3, right=1),
                                                      16), False),
        "Refiner": (lambda: Refiner(E, 2), False),
        "RunningGroupNorm": (lambda: RunningGroupNorm(E), True),
        "StreamingSequential": (lambda: StreamingSequential(
            CausalConv1d(E, E, 3, groups=E), Transpose(1, 2),
            BandedSelfAttention(E, 2, left=3, right=1)), True),
    }


MODULES = _modules()


def _x(time_last, B=2, T=6, C=E):
    return torch.randn(B, C, T) if time_last else torch.randn(B, T, C)


def _bad_x(time_last):
    """(case, x builder, exception, names) for a module input named x."""
    def narrow_feat(x):
        return x[:, :4] if time_last else x[..., :4]
    return [
        ("rank 2", lambda x: x[0], ValueError, ["x"]),
        ("rank 4", lambda x: x[None], ValueError, ["x"]),
        ("features", narrow_feat, ValueError, ["x"]),
        ("int", lambda x: x.int(), TypeError, ["x"]),
        ("bool", lambda x: x.bool(), TypeError, ["x"]),
        ("meta", meta, ValueError, ["x"]),
        ("list", lambda x: x.tolist(), TypeError, ["x"]),
    ]


FWD_XFAIL = {}


def _mod_ids(rows):
    return [f"{r[0]}-{r[1]}" for r in rows]


FWD_BAD = [(m, c, f, e, n) for m, (_, tl) in MODULES.items() for c, f, e, n in _bad_x(tl)
           if m != "StreamingSequential" or c != "list"]


@pytest.mark.parametrize("mod,case,bad,exc,names", FWD_BAD, ids=_mod_ids(FWD_BAD))
def test_module_forward_bad_x(mod, case, bad, exc, names):
    factory, tl = MODULES[mod]
    m = factory()
    expect_named(lambda: m(bad(_x(tl))), exc, *names)


def _module_empty_cases():
    rows = []
    for mod in MODULES:
        for case in ("batch 0", "length 0", "non-contiguous", "expanded"):
            marks = [pytest.mark.xfail(strict=True, reason=FWD_XFAIL[(mod, case)])] \
                if (mod, case) in FWD_XFAIL else []
            rows.append(pytest.param(mod, case, marks=marks, id=f"{mod}-{case}"))
    return rows


@pytest.mark.parametrize("mod,case", _module_empty_cases())
def test_module_forward_unusual_inputs(mod, case):
    factory, tl = MODULES[mod]
    m = factory()
    x = _x(tl)
    if case == "batch 0":
        x = x[:0]
    elif case == "length 0":
        x = x[..., :0] if tl else x[:, :0]
    elif case == "non-contiguous":
        x = noncontig(x)
    else:
        x = x[:1].expand(2, -1, -1)
    with torch.no_grad():
        y = m(x)
        ref = m(x.contiguous())
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


STEP_BAD = [(m, c, f, e, n) for m, (_, tl) in MODULES.items() for c, f, e, n in _bad_x(tl)]


@pytest.mark.parametrize("mod,case,bad,exc,names", STEP_BAD, ids=_mod_ids(STEP_BAD))
def test_module_step_bad_x(mod, case, bad, exc, names):
    factory, tl = MODULES[mod]
    m = factory()
    st = m.init_state(2)
    expect_named(lambda: m.step(bad(_x(tl)), st), exc, *names)


def _other_state(m=None):
    """A state of another module class than ``m``'s."""
    return (CausalConv1d(3, 3, 2) if isinstance(m, Refiner) else Refiner(3, 2)).init_state(2)


STATE_BAD = [
    ("batch mismatch", lambda m: m.init_state(3), ValueError, ["batch"]),
    ("another module's state", lambda m: _other_state(m), TypeError, ["state"]),
    ("None", lambda m: None, TypeError, ["state"]),
]


@pytest.mark.parametrize("mod", list(MODULES))
@pytest.mark.parametrize("case,make,exc,names", STATE_BAD, ids=[r[0] for r in STATE_BAD])
def test_module_step_and_flush_bad_state(mod, case, make, exc, names):
    factory, tl = MODULES[mod]
    m = factory()
    expect_named(lambda: m.step(_x(tl), make(m)), exc, *names)
    if case != "batch mismatch" and hasattr(m, "flush"):
        expect_named(lambda: m.flush(make(m)), exc, *names)


def test_state_of_same_class_other_configuration_is_refused():
    a = BandedSelfAttention(E, 2, left=3, right=1)
    b = BandedSelfAttention(E, 2, left=4, right=1)
    expect_named(lambda: a.step(torch.randn(2, 3, E), b.init_state(2)), ValueError, "state")
    expect_named(lambda: a.flush(b.init_state(2)), ValueError, "state")


INIT_BAD = [
    ("batch_size 0", dict(batch_size=0), ValueError, ["batch_size"]),
    ("batch_size -1", dict(batch_size=-1), ValueError, ["batch_size"]),
    ("batch_size bool", dict(batch_size=True), TypeError, ["batch_size"]),
    ("batch_size float", dict(batch_size=2.0), TypeError, ["batch_size"]),
    ("dtype int", dict(batch_size=2, dtype=torch.int32), TypeError, ["dtype"]),
    ("device junk", dict(batch_size=2, device="junk"), ValueError, ["device"]),
]


@pytest.mark.parametrize("mod", list(MODULES))
@pytest.mark.parametrize("case,kw,exc,names", INIT_BAD, ids=[r[0] for r in INIT_BAD])
def test_module_init_state_bad_args(mod, case, kw, exc, names):
    m = MODULES[mod][0]()
    kw = dict(kw)
    bs = kw.pop("batch_size")
    expect_named(lambda: m.init_state(bs, **kw), exc, *names)


LENGTHS_BAD = [
    ("float", torch.tensor([1., 2.]), TypeError),
    ("bool", torch.tensor([True, False]), TypeError),
    ("shape", torch.tensor([1]), ValueError),
    ("out of range", torch.tensor([7, 2]), ValueError),
    ("negative", torch.tensor([-1, 2]), ValueError),
    ("junk", "12", TypeError),
]


@pytest.mark.parametrize("mod", list(MODULES))
@pytest.mark.parametrize("case,lengths,exc", LENGTHS_BAD, ids=[r[0] for r in LENGTHS_BAD])
def test_module_step_bad_lengths(mod, case, lengths, exc):
    factory, tl = MODULES[mod]
    m = factory()
    expect_named(lambda: m.step(_x(tl), m.init_state(2), lengths=lengths), exc, "lengths")


FIXED = [m for m in MODULES if hasattr(MODULES[m][0](), "step_fixed")]


@pytest.mark.parametrize("mod", FIXED)
@pytest.mark.parametrize("case", ["rank 2", "features", "int", "meta", "batch mismatch",
                                  "another module's state"])
def test_module_step_fixed_bad_input(mod, case):
    """step_fixed runs inside CUDA graphs: its checks read shapes, dtypes and devices only."""
    factory, tl = MODULES[mod]
    m = factory()
    x = _x(tl, T=2)
    st = m.init_state(2)
    names = ["x"]
    exc = ValueError
    if case == "rank 2":
        x = x[0]
    elif case == "features":
        x = x[:, :4] if tl else x[..., :4]
    elif case == "int":
        x, exc = x.int(), TypeError
    elif case == "meta":
        x = meta(x)
    elif case == "batch mismatch":
        st, names = m.init_state(3), ["batch"]
    else:
        st, exc, names = _other_state(m), TypeError, ["state"]
    expect_named(lambda: m.step_fixed(x, st), exc, *names)


@pytest.mark.parametrize("mod", FIXED)
def test_module_step_fixed_non_contiguous_equals_step(mod):
    factory, tl = MODULES[mod]
    m = factory()
    x = _x(tl, T=2)
    with torch.no_grad():
        a = m.step_fixed(noncontig(x), m.init_state(2))
        b = m.step_fixed(x.contiguous(), m.init_state(2))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _cross():
    return FrameCrossAttention(E, 2, mask=IntervalMask.frames(2, 3, 1, 0), kv_dim=6)


CROSS_BAD = [
    ("x_q rank", lambda m: m(X(4, E), X(2, 6, 6)), ValueError, ["x_q"]),
    ("x_kv features", lambda m: m(X(2, 4, E), X(2, 6, E)), ValueError, ["x_kv"]),
    ("x_kv int", lambda m: m(X(2, 4, E), X(2, 6, 6).int()), TypeError, ["x_kv"]),
    ("x_kv meta", lambda m: m(X(2, 4, E), meta(X(2, 6, 6))), ValueError, ["x_kv"]),
    ("batch mismatch", lambda m: m(X(2, 4, E), X(1, 6, 6)), ValueError, ["x_q", "x_kv"]),
    ("key_lengths range", lambda m: m(X(2, 4, E), X(2, 6, 6), key_lengths=torch.tensor([7, 1])),
     ValueError, ["key_lengths"]),
    ("step x_kv rank", lambda m: m.step(X(2, 4, E), X(6, 6), m.init_state(2)), ValueError,
     ["x_kv"]),
    ("step batch", lambda m: m.step(X(2, 4, E), X(2, 6, 6), m.init_state(3)), ValueError,
     ["x_q"]),
    ("step other state", lambda m: m.step(X(2, 4, E), None, _other_state()), TypeError,
     ["state"]),
    ("flush other state", lambda m: m.flush(_other_state()), TypeError, ["state"]),
    ("init_state 0", lambda m: m.init_state(0), ValueError, ["batch_size"]),
]


@pytest.mark.parametrize("case,fn,exc,names", CROSS_BAD, ids=[r[0] for r in CROSS_BAD])
def test_frame_cross_attention_bad_input(case, fn, exc, names):
    expect_named(lambda: fn(_cross()), exc, *names)


def test_frame_cross_attention_unusual_inputs():
    m = _cross()
    xq, xk = X(2, 4, E), X(2, 7, 6)
    with torch.no_grad():
        torch.testing.assert_close(m(noncontig(xq), xk[:1].expand(2, -1, -1)),
                                   m(xq, xk[:1].expand(2, -1, -1).contiguous()),
                                   rtol=1e-5, atol=1e-5)
        assert m(xq[:0], xk[:0]).shape == (0, 4, E)
        assert m(xq, xk[:, :0]).shape == (2, 4, E)          # no keys: zeros (then out_proj)


# ------------------------------------------------------------------------------------------------
# streaming wrappers
# ------------------------------------------------------------------------------------------------

class _NoFlush(torch.nn.Module):
    """init_state and step, no flush: not a streaming module."""
    def init_state(self, batch_size, **kw):
        return None

    def step(self, x, state):
        return x, state


RUN_STREAM_BAD = [
    ("chunk_sizes 0", lambda m, x: run_stream(m, x, [0]), ValueError, ["chunk_sizes[0]"]),
    ("chunk_sizes empty", lambda m, x: run_stream(m, x, []), ValueError, ["chunk_sizes"]),
    ("chunk_sizes float", lambda m, x: run_stream(m, x, [1.5]), TypeError, ["chunk_sizes[0]"]),
    ("chunk_sizes str", lambda m, x: run_stream(m, x, "3"), TypeError, ["chunk_sizes"]),
    ("chunk_sizes tensor", lambda m, x: run_stream(m, x, torch.tensor([2])), TypeError,
     ["chunk_sizes"]),
    ("x int", lambda m, x: run_stream(m, x.int(), [2]), TypeError, ["dtype"]),
    ("x list", lambda m, x: run_stream(m, x.tolist(), [2]), TypeError, ["x"]),
    ("x 1-D", lambda m, x: run_stream(m, x[0, 0], [2]), ValueError, ["x"]),
    ("time_dim out of range", lambda m, x: run_stream(m, x, [2], time_dim=5), ValueError,
     ["time_dim"]),
    ("time_dim batch axis", lambda m, x: run_stream(m, x, [2], time_dim=0), ValueError,
     ["time_dim"]),
    ("time_dim str", lambda m, x: run_stream(m, x, [2], time_dim="t"), ValueError, ["time_dim"]),
    ("module junk", lambda m, x: run_stream(3, x, [2]), TypeError, ["module"]),
    ("module without flush", lambda m, x: run_stream(_NoFlush(), x, [2]), TypeError,
     ["module"]),
    ("batch 0", lambda m, x: run_stream(m, x[:0], [2]), ValueError, ["x"]),
    ("reset mask float", lambda m, x: streaming.reset(m.init_state(2), torch.ones(2)),
     ValueError, ["mask"]),
    ("reset mask shape", lambda m, x: streaming.reset(m.init_state(2),
                                                      torch.ones(3, dtype=torch.bool)),
     ValueError, ["mask"]),
    ("reset mask meta", lambda m, x: streaming.reset(m.init_state(2),
                                                     torch.ones(2, dtype=torch.bool,
                                                                device="meta")),
     ValueError, ["mask"]),
    ("reset state junk", lambda m, x: streaming.reset(None, torch.ones(2, dtype=torch.bool)),
     TypeError, ["state"]),
    ("state_nbytes junk", lambda m, x: streaming.state_nbytes(None), TypeError, ["state"]),
    ("latency sample_rate", lambda m, x: latency(m, sample_rate=0), ValueError, ["sample_rate"]),
    ("latency non-module", lambda m, x: latency(3), TypeError, ["model"]),
]


@pytest.mark.parametrize("case,fn,exc,names", RUN_STREAM_BAD, ids=[r[0] for r in RUN_STREAM_BAD])
def test_streaming_wrappers_bad_input(case, fn, exc, names):
    m = MODULES["StreamingSequential"][0]()
    expect_named(lambda: fn(m, torch.randn(2, E, 6)), exc, *names)


def test_run_stream_non_contiguous_equals_offline():
    m = MODULES["StreamingSequential"][0]()
    x = noncontig(torch.randn(2, E, 7))
    with torch.no_grad():
        torch.testing.assert_close(run_stream(m, x, [2, 3]), m(x.contiguous()), rtol=1e-5,
                                   atol=1e-5)


# ------------------------------------------------------------------------------------------------
# compat.causal_conv1d
# ------------------------------------------------------------------------------------------------

def _compat_bad():
    from pyencoder.compat.causal_conv1d import causal_conv1d_fn as fn, causal_conv1d_update as up
    x, w, b = X(2, 4, 7), X(4, 3), X(4)
    st = X(2, 4, 2)
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    return [
        ("fn x rank", lambda: fn(x[0], w, b), ValueError, ["x"]),
        ("fn x int", lambda: fn(x.int(), w, b), TypeError, ["x"]),
        ("fn dim 0", lambda: fn(x[:, :0], w[:0], b[:0]), ValueError, ["x"]),
        ("fn weight rank", lambda: fn(x, w[:, None], b), ValueError, ["weight"]),
        ("fn weight dim", lambda: fn(x, w[:3], b), ValueError, ["weight"]),
        ("fn weight meta", lambda: fn(x, meta(w), b), ValueError, ["weight"]),
        ("fn bias shape", lambda: fn(x, w, b[:3]), ValueError, ["bias"]),
        ("fn activation", lambda: fn(x, w, b, activation="relu"), ValueError, ["activation"]),
        ("fn seq_idx float", lambda: fn(x, w, b, seq_idx=torch.zeros(2, 7)), TypeError,
         ["seq_idx"]),
        ("fn seq_idx shape", lambda: fn(x, w, b, seq_idx=torch.zeros(2, 6, dtype=torch.int32)),
         ValueError, ["seq_idx"]),
        ("fn seq_idx meta",
         lambda: fn(x, w, b, seq_idx=torch.zeros(2, 7, dtype=torch.int32, device="meta")),
         ValueError, ["seq_idx"]),
        ("fn seq_idx with initial_states",
         lambda: fn(x, w, b, seq_idx=torch.zeros(2, 7, dtype=torch.int32),
                    initial_states=X(2, 4, 2)), ValueError, ["initial_states", "seq_idx"]),
        ("fn initial_states shape", lambda: fn(x, w, b, initial_states=X(2, 4, 3)), ValueError,
         ["initial_states"]),
        ("fn return_final_states int", lambda: fn(x, w, b, return_final_states=1), TypeError,
         ["return_final_states"]),
        ("fn final_states_out shape",
         lambda: fn(x, w, b, return_final_states=True, final_states_out=X(2, 4, 3)), ValueError,
         ["final_states_out"]),
        ("fn final_states_out expanded",
         lambda: fn(x, w, b, return_final_states=True,
                    final_states_out=X(1, 4, 2).expand(2, -1, -1)), ValueError,
         ["final_states_out"]),
        ("update x rank", lambda: up(x[None], st.clone(), w, b), ValueError, ["x"]),
        ("update x empty", lambda: up(x[..., :0], st.clone(), w, b), ValueError, ["x"]),
        ("update conv_state short", lambda: up(x[..., :1], st[..., :1].clone(), w, b), ValueError,
         ["conv_state"]),
        ("update conv_state batch", lambda: up(x[..., :1], st[:1].clone(), w, b), ValueError,
         ["conv_state"]),
        ("update conv_state dtype", lambda: up(x[..., :1], st.double(), w, b), TypeError,
         ["conv_state"]),
        ("update conv_state meta", lambda: up(x[..., :1], meta(st), w, b), ValueError,
         ["conv_state"]),
        ("update conv_state expanded", lambda: up(x[..., :1], st[:1].expand(2, -1, -1), w, b),
         ValueError, ["conv_state"]),
        ("update conv_state expanded ring",
         lambda: up(x[..., :1], X(1, 4, 5).expand(2, -1, -1), w, b), ValueError,
         ["conv_state"]),
        ("update cache_seqlens float",
         lambda: up(x[..., :1], st.clone(), w, b, cache_seqlens=torch.tensor([1., 2.])),
         TypeError, ["cache_seqlens"]),
        ("update cache_seqlens negative",
         lambda: up(x[..., :1], st.clone(), w, b, cache_seqlens=i32(-1, 2)), ValueError,
         ["cache_seqlens"]),
        ("update cache_seqlens shape",
         lambda: up(x[..., :1], st.clone(), w, b, cache_seqlens=i32(1)), ValueError,
         ["cache_seqlens"]),
        ("update conv_state_indices range",
         lambda: up(x[..., :1], st.clone(), w, b, conv_state_indices=i32(0, 2)), ValueError,
         ["conv_state_indices"]),
        ("update conv_state_indices bool",
         lambda: up(x[..., :1], st.clone(), w, b,
                    conv_state_indices=torch.tensor([True, False])), TypeError,
         ["conv_state_indices"]),
        ("update conv_state_indices meta",
         lambda: up(x[..., :1], st.clone(), w, b,
                    conv_state_indices=torch.tensor([0, 1], device="meta")), ValueError,
         ["conv_state_indices"]),
    ]


COMPAT_BAD = _compat_bad()


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("case,fn,exc,names", COMPAT_BAD, ids=[r[0] for r in COMPAT_BAD])
def test_compat_causal_conv1d_bad_input(be, case, fn, exc, names):
    with pyencoder.use_backend(be):
        expect_named(fn, exc, *names)


@pytest.mark.parametrize("be", BACKENDS)
def test_compat_unusual_inputs(be):
    from pyencoder.compat.causal_conv1d import causal_conv1d_fn as fn
    x, w, b = torch.randn(2, 4, 7), torch.randn(4, 3), torch.randn(4)
    sid = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 2, 2, 2]], dtype=torch.int32)
    with pyencoder.use_backend(be):
        got = [fn(noncontig(x), w, b), fn(x[:1].expand(2, -1, -1), w, b),
               fn(x, w, b, seq_idx=sid.t().contiguous().t())]
        assert fn(x[:0], w, b, seq_idx=sid[:0]).shape == (0, 4, 7)
        assert fn(x[..., :0], w, b).shape == (2, 4, 0)
    with pyencoder.use_backend("reference"):
        ref = [fn(x, w, b), fn(x[:1].expand(2, -1, -1).contiguous(), w, b),
               fn(x, w, b, seq_idx=sid)]
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Hugging Face patch entry points
# ------------------------------------------------------------------------------------------------

def _hf():
    pytest.importorskip("transformers")
    import pyencoder.hf as H
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from test_hf import make_model
    return H, make_model


@pytest.fixture(scope="module")
def hf_encoder():
    H, make_model = _hf()
    m = make_model("w2v2_post").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        H.apply_pyencoder_to_wav2vec2(m, lookahead_frames=1, left_frames=8)
    return H, m, H.StreamingEncoder(m)


HF_APPLY_BAD = [
    ("lookahead_frames -1", dict(lookahead_frames=-1), ValueError, ["lookahead_frames"]),
    ("lookahead_frames float", dict(lookahead_frames=1.5), TypeError, ["lookahead_frames"]),
    ("lookahead_frames bool", dict(lookahead_frames=True), TypeError, ["lookahead_frames"]),
    ("left_frames -2", dict(left_frames=-2), ValueError, ["left_frames"]),
    ("left_frames str", dict(left_frames="8"), TypeError, ["left_frames"]),
    ("lookahead_layers junk", dict(lookahead_layers="some"), ValueError, ["lookahead_layers"]),
    ("lookahead_layers short", dict(lookahead_layers=[1]), ValueError, ["lookahead_layers"]),
    ("lookahead_layers negative", dict(lookahead_layers=[-1, 0]), ValueError,
     ["lookahead_layers[0]"]),
    ("rope str", dict(rope="yes"), TypeError, ["rope"]),
    ("chunk_size 0", dict(chunk_size=0), ValueError, ["chunk_size"]),
    ("pos_conv junk", dict(pos_conv="zero"), ValueError, ["pos_conv"]),
    ("group_norm junk", dict(group_norm="batch"), ValueError, ["group_norm"]),
]


@pytest.mark.parametrize("case,kw,exc,names", HF_APPLY_BAD, ids=[r[0] for r in HF_APPLY_BAD])
def test_hf_apply_bad_args(case, kw, exc, names):
    H, make_model = _hf()
    m = make_model("w2v2_post")
    expect_named(lambda: H.apply_pyencoder_to_wav2vec2(m, **kw), exc, *names)
    assert H.patch_record(m) is None        # a refused call leaves the model unpatched


def test_hf_entry_points_refuse_non_models_and_unpatched():
    H, make_model = _hf()
    expect_named(lambda: H.apply_pyencoder_to_wav2vec2(torch.nn.Linear(2, 2)), TypeError,
                 "Wav2Vec2Model")
    expect_named(lambda: H.revert_pyencoder(make_model("w2v2_post")), ValueError, "patched")
    expect_named(lambda: H.reapply_pyencoder(make_model("w2v2_post")), ValueError, "pyencoder")
    expect_named(lambda: H.latency(make_model("w2v2_post")), ValueError, "patched")
    expect_named(lambda: H.StreamingEncoder(make_model("w2v2_post").eval()), ValueError,
                 "apply_pyencoder_to_wav2vec2")


HF_STREAM_BAD = [
    ("step 1-D", lambda H, m, e: e.step(torch.randn(800), e.init_state(2)), ValueError, ["audio"]),
    ("step list", lambda H, m, e: e.step([[0.0] * 8] * 2, e.init_state(2)), ValueError, ["audio"]),
    ("step int PCM", lambda H, m, e: e.step(torch.randint(-9, 9, (2, 800)), e.init_state(2)),
     TypeError, ["audio"]),
    ("step meta", lambda H, m, e: e.step(torch.randn(2, 800, device="meta"), e.init_state(2)),
     ValueError, ["audio"]),
    ("step batch", lambda H, m, e: e.step(torch.randn(2, 800), e.init_state(3)), ValueError,
     ["audio"]),
    ("step other state", lambda H, m, e: e.step(torch.randn(2, 800), _other_state()), TypeError,
     ["state"]),
    ("step lengths range", lambda H, m, e: e.step(torch.randn(2, 800), e.init_state(2),
                                               lengths=torch.tensor([900, 1])), ValueError,
     ["lengths"]),
    ("flush None", lambda H, m, e: e.flush(None), TypeError, ["state"]),
    ("init_state 0", lambda H, m, e: e.init_state(0), ValueError, ["batch_size"]),
    ("init_state max_chunk 0", lambda H, m, e: e.init_state(2, max_chunk=0), ValueError,
     ["max_chunk"]),
    ("forward chunk_sizes", lambda H, m, e: e(torch.randn(2, 800), chunk_sizes=[0]), ValueError,
     ["chunk_sizes[0]"]),
    ("forward int PCM", lambda H, m, e: e(torch.randint(-9, 9, (2, 800))), TypeError, ["audio"]),
    ("latency sample_rate", lambda H, m, e: H.latency(m, sample_rate=0), ValueError,
     ["sample_rate"]),
]


@pytest.mark.parametrize("case,fn,exc,names", HF_STREAM_BAD, ids=[r[0] for r in HF_STREAM_BAD])
def test_hf_streaming_encoder_bad_input(hf_encoder, case, fn, exc, names):
    H, m, enc = hf_encoder
    expect_named(lambda: fn(H, m, enc), exc, *names)


def test_hf_patched_attention_mask_checks(hf_encoder):
    from pyencoder.hf.attention import key_lengths_from_mask
    expect_named(lambda: key_lengths_from_mask(torch.ones(2, 4, dtype=torch.long), 2, 5),
                 ValueError, "attention_mask")
    expect_named(lambda: key_lengths_from_mask(torch.ones(2, 1, 5, 5, dtype=torch.bool), 2, 5),
                 ValueError, "attention_mask")
    expect_named(lambda: key_lengths_from_mask(torch.tensor([[1, 0, 1, 1, 1]] * 2), 2, 5),
                 ValueError, "attention_mask")
    additive = torch.tensor([[0.0] * 5, [0.0] * 3 + [float("-inf")] * 2])
    expect_named(lambda: key_lengths_from_mask(additive, 2, 5), ValueError, "attention_mask")
    expect_named(lambda: key_lengths_from_mask(additive.clamp(min=-3e38), 2, 5), ValueError,
                 "attention_mask")
    assert key_lengths_from_mask(torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2]), 2, 5).tolist() \
        == [5, 3]


def test_hf_streaming_nan_in_one_stream_stays_there(hf_encoder):
    H, m, enc = hf_encoder
    a = torch.randn(2, 1600)
    clean, _ = enc.step(a, enc.init_state(2))
    an = a.clone()
    an[0, 100] = float("nan")
    y, _ = enc.step(an, enc.init_state(2))
    assert y[0].isnan().any() and not y[1].isnan().any()
    torch.testing.assert_close(y[1], clean[1], rtol=1e-5, atol=1e-5)
    ync, _ = enc.step(a.t().contiguous().t()[:, :1600], enc.init_state(2))
    torch.testing.assert_close(ync, clean, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# the conftest guard on TRITON_INTERPRET
# ------------------------------------------------------------------------------------------------

def test_conftest_guard_names_a_test_that_leaves_triton_interpret_changed(tmp_path):
    """A test that unsets TRITON_INTERPRET in-process (kernel modules imported afterwards are built
    for a GPU and break later interpreter tests) fails at teardown with a message naming it; one
    that goes through monkeypatch passes, and the next test sees the value restored."""
    import os
    import shutil
    from _subproc import run
    here = os.path.dirname(os.path.abspath(__file__))
    shutil.copy(os.path.join(here, "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_env.py").write_text(
        "import os\n\n"
        "def test_unsets():\n    os.environ.pop('TRITON_INTERPRET', None)\n\n"
        "def test_monkeypatched(monkeypatch):\n    monkeypatch.setenv('TRITON_INTERPRET', '0')\n\n"
        "def test_after():\n    assert os.environ.get('TRITON_INTERPRET') == '1'\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
             str(tmp_path)], cwd=tmp_path, env=env)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "test_env.py::test_unsets changed TRITON_INTERPRET ('1' before the test, unset after" \
        in out, out
    assert "PASSED test_env.py::test_monkeypatched" in out and "PASSED test_env.py::test_after" \
        in out, out
    assert "1 error" in out, out


# ------------------------------------------------------------------------------------------------
# models (CausalEncoder, StreamingDecoder)
# ------------------------------------------------------------------------------------------------

def _encoder():
    from pyencoder.models import CausalEncoder, EncoderConfig
    cfg = EncoderConfig(conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2), hidden_size=8,
                        num_layers=1, num_heads=2, ffn_dim=16, left=8, lookahead=1)
    return CausalEncoder(cfg).eval()


def _decoder():
    from pyencoder.models import DecoderConfig, StreamingDecoder
    return StreamingDecoder(DecoderConfig(input_dim=8, dim=8, intermediate_dim=16, num_blocks=1,
                                          kernel_size=3, embed_kernel_size=3,
                                          samples_per_frame=4)).eval()


MODEL_BAD = [
    ("encoder wav 1-D", lambda e, d: e(torch.randn(400)), ValueError, ["wav"]),
    ("encoder wav list", lambda e, d: e([[0.0] * 400]), TypeError, ["wav"]),
    ("encoder wav int PCM", lambda e, d: e(torch.randint(-9, 9, (2, 400))), TypeError, ["wav"]),
    ("encoder wav float64", lambda e, d: e(torch.randn(2, 400).double()), TypeError, ["wav"]),
    ("encoder wav meta", lambda e, d: e(torch.randn(2, 400, device="meta")), ValueError,
     ["wav"]),
    ("encoder lengths float", lambda e, d: e(torch.randn(2, 400), lengths=torch.tensor([4., 2.])),
     TypeError, ["lengths"]),
    ("encoder lengths > samples",
     lambda e, d: e(torch.randn(2, 400), lengths=torch.tensor([500, 400])), ValueError,
     ["lengths"]),
    ("encoder lengths shape", lambda e, d: e(torch.randn(2, 400), lengths=torch.tensor([400])),
     ValueError, ["lengths"]),
    ("encoder step int PCM",
     lambda e, d: e.step(torch.randint(-9, 9, (2, 400)), e.init_state(2)), TypeError, ["wav"]),
    ("encoder step meta", lambda e, d: e.step(torch.randn(2, 400, device="meta"),
                                              e.init_state(2)), ValueError, ["wav"]),
    ("encoder step batch", lambda e, d: e.step(torch.randn(2, 400), e.init_state(3)), ValueError,
     ["wav"]),
    ("encoder step other state", lambda e, d: e.step(torch.randn(2, 400), _other_state()),
     TypeError, ["state"]),
    ("encoder flush other state", lambda e, d: e.flush(_other_state()), TypeError, ["state"]),
    ("decoder x features", lambda e, d: d(torch.randn(2, 5, 4)), ValueError, ["x"]),
    ("decoder x int", lambda e, d: d(torch.randn(2, 5, 8).int()), TypeError, ["x"]),
    ("decoder step x meta", lambda e, d: d.step(torch.randn(2, 5, 8, device="meta"),
                                                d.init_state(2)), ValueError, ["x"]),
    ("decoder step batch", lambda e, d: d.step(torch.randn(2, 5, 8), d.init_state(3)),
     ValueError, ["batch"]),
    ("decoder step other state", lambda e, d: d.step(torch.randn(2, 5, 8), _other_state()),
     TypeError, ["state"]),
]


@pytest.mark.parametrize("case,fn,exc,names", MODEL_BAD, ids=[r[0] for r in MODEL_BAD])
def test_models_bad_input(case, fn, exc, names):
    expect_named(lambda: fn(_encoder(), _decoder()), exc, *names)


def test_models_unusual_inputs():
    e, d = _encoder(), _decoder()
    wav = torch.randn(2, 400)
    with torch.no_grad():
        torch.testing.assert_close(e(wav.t().contiguous().t()).last_hidden_state,
                                   e(wav).last_hidden_state, rtol=1e-5, atol=1e-5)
        assert e(wav[:0]).last_hidden_state.shape[0] == 0
        assert e(wav[:, :0]).last_hidden_state.shape[:2] == (2, 0)
        x = torch.randn(2, 5, 8)
        torch.testing.assert_close(d(noncontig(x)), d(x), rtol=1e-5, atol=1e-5)
        assert d(x[:0]).shape == (0, 20)            # was a reshape(-1) error at batch 0
        assert d(x[:, :0]).shape == (2, 0)


@pytest.mark.parametrize("entry", ["apply_pyencoder_to_wav2vec2", "revert_pyencoder",
                                   "reapply_pyencoder", "latency", "patch_record",
                                   "StreamingEncoder"])
def test_hf_entry_points_name_themselves_for_a_non_model(entry):
    H, _ = _hf()
    expect_named(lambda: getattr(H, entry)(None), TypeError, entry, "Wav2Vec2Model")


@pytest.mark.parametrize("be", BACKENDS)
def test_compat_update_repeated_slot_is_named(be):
    from pyencoder.compat.causal_conv1d import causal_conv1d_update as up
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    x, w = torch.randn(3, 4, 1), torch.randn(4, 3)
    with pyencoder.use_backend(be):
        for pool_len in (2, 5):         # the direct op path, and the gather / scatter path
            expect_named(lambda: up(x, torch.randn(4, 4, pool_len), w,
                                    conv_state_indices=i32(1, -1, 1)),
                         ValueError, "conv_state_indices")
        up(x, torch.randn(4, 4, 2), w, conv_state_indices=i32(-1, 2, -1))   # padding may repeat


# ------------------------------------------------------------------------------------------------
# module constructors: window / size / eps arguments
# ------------------------------------------------------------------------------------------------

def _layer(**kw):
    return TransformerLayer(BandedSelfAttention(E, 2, left=2, right=1), **kw)


CTOR_BAD = [
    ("banded left bool", lambda: BandedSelfAttention(E, 2, left=True, right=1), TypeError,
     ["left"]),
    ("banded right negative", lambda: BandedSelfAttention(E, 2, left=2, right=-1), ValueError,
     ["right"]),
    ("banded sink float", lambda: BandedSelfAttention(E, 2, left=2, right=1, sink=1.0),
     TypeError, ["sink"]),
    ("banded heads", lambda: BandedSelfAttention(E, 3, left=2, right=1), ValueError,
     ["num_heads"]),
    ("banded embed_dim bool", lambda: BandedSelfAttention(True, 1, left=2, right=1), ValueError,
     ["embed_dim"]),
    ("banded rope junk", lambda: BandedSelfAttention(E, 2, left=2, right=1, rope="yes"),
     TypeError, ["rope"]),
    ("banded max_context 0", lambda: BandedSelfAttention(E, 2, left=2, right=1, max_context=0),
     ValueError, ["max_context"]),
    ("chunked chunk_size 0", lambda: ChunkedSelfAttention(E, 2, chunk_size=0, left_chunks=1),
     ValueError, ["chunk_size"]),
    ("chunked lookahead float",
     lambda: ChunkedSelfAttention(E, 2, chunk_size=2, left_chunks=1, lookahead=1.0), TypeError,
     ["lookahead"]),
    ("wavlm num_buckets bool",
     lambda: WavLMSelfAttention(E, 2, left=2, right=1, num_buckets=True), ValueError,
     ["num_buckets"]),
    ("wavlm no mask", lambda: WavLMSelfAttention(E, 2), ValueError, ["right", "chunk_size"]),
    ("cross mask junk", lambda: FrameCrossAttention(E, 2, mask=3), TypeError, ["mask"]),
    ("cross kv_dim 0", lambda: FrameCrossAttention(E, 2, mask=IntervalMask.frames(2, 3, 1, 0),
                                                   kv_dim=0), ValueError, ["kv_dim"]),
    ("conv kernel_size bool", lambda: CausalConv1d(4, 4, True), TypeError, ["kernel_size"]),
    ("conv stride > kernel_size", lambda: CausalConv1d(4, 4, 3, stride=4), ValueError,
     ["stride"]),
    ("conv groups", lambda: CausalConv1d(4, 4, 3, groups=3), ValueError, ["groups"]),
    ("conv activation", lambda: CausalConv1d(4, 4, 3, activation="relu"), ValueError,
     ["activation"]),
    ("refiner chunk_size bool", lambda: Refiner(E, True), TypeError, ["chunk_size"]),
    ("refiner embed_dim 0", lambda: Refiner(0, 2), ValueError, ["embed_dim"]),
    ("refiner embed_dim float", lambda: Refiner(8.0, 2), TypeError, ["embed_dim"]),
    ("norm num_channels 0", lambda: RunningGroupNorm(0), ValueError, ["num_channels"]),
    ("norm num_channels float", lambda: RunningGroupNorm(4.0), TypeError, ["num_channels"]),
    ("norm eps negative", lambda: RunningGroupNorm(4, eps=-1), ValueError, ["eps"]),
    ("norm eps nan", lambda: RunningGroupNorm(4, eps=float("nan")), ValueError, ["eps"]),
    ("layer attention junk", lambda: TransformerLayer(3, 16), TypeError, ["attention"]),
    ("layer ffn_dim 0", lambda: _layer(ffn_dim=0), ValueError, ["ffn_dim"]),
    ("layer ffn_dim float", lambda: _layer(ffn_dim=16.0), TypeError, ["ffn_dim"]),
    ("layer layer_norm_eps str", lambda: _layer(ffn_dim=16, layer_norm_eps="1"), TypeError,
     ["layer_norm_eps"]),
]


@pytest.mark.parametrize("case,fn,exc,names", CTOR_BAD, ids=[r[0] for r in CTOR_BAD])
def test_module_constructor_bad_args(case, fn, exc, names):
    expect_named(fn, exc, *names)


# ------------------------------------------------------------------------------------------------
# Rope.rotate / RotaryEmbedding.forward
# ------------------------------------------------------------------------------------------------

ROTATE_BAD = [
    ("x int", lambda r: r(X(2, 2, 5, 8).int(), torch.arange(5)), TypeError, ["x"]),
    ("x head_dim < dim", lambda r: r(X(2, 2, 5, 2), torch.arange(5)), ValueError, ["x"]),
    ("x list", lambda r: r([[0.0]], torch.arange(1)), TypeError, ["x"]),
    ("positions float", lambda r: r(X(2, 2, 5, 8), torch.arange(5) + 0.5), TypeError,
     ["positions"]),
    ("positions list", lambda r: r(X(2, 2, 5, 8), [0, 1, 2, 3, 4]), TypeError, ["positions"]),
    ("positions length", lambda r: r(X(2, 2, 5, 8), torch.arange(3)), ValueError,
     ["positions"]),
    ("positions batch", lambda r: r(X(2, 2, 5, 8), torch.arange(5).expand(3, 5)), ValueError,
     ["positions"]),
    ("positions meta", lambda r: r(X(2, 2, 5, 8), torch.arange(5, device="meta")), ValueError,
     ["positions"]),
]


@pytest.mark.parametrize("case,fn,exc,names", ROTATE_BAD, ids=[r[0] for r in ROTATE_BAD])
def test_rotary_bad_input(case, fn, exc, names):
    from pyencoder.nn import RotaryEmbedding
    expect_named(lambda: fn(RotaryEmbedding(4)), exc, *names)
    expect_named(lambda: fn(Rope(4).rotate), exc, *names)


def test_rotary_unusual_layouts():
    r = Rope(4, interleaved=True)
    x, pos = torch.randn(2, 2, 5, 8), torch.arange(5) + 3
    ref = r.rotate(x, pos)
    torch.testing.assert_close(r.rotate(noncontig(x), strided(pos)), ref)
    torch.testing.assert_close(r.rotate(x, pos.expand(2, 5).int()), ref)
    assert r.rotate(x[:, :, :0], pos[:0]).shape == (2, 2, 0, 8)
