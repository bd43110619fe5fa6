"""Streaming == offline, property-based: random inputs, random ragged chunkings (sizes 1..N) and
random configurations of every module and of a conv -> projection -> attention-layers stack.

Tolerance: fp32 max abs error <= 1e-5 relative to the output's max magnitude. Streamed and offline
paths compute the same float32 values per element (keys rotated once with the same formula) and
differ only in dot-product / softmax summation order (a few ulp per layer).
"""
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from _stream_utils import rel_err, stream
from pyencoder import Rope
from pyencoder.nn import (BandedSelfAttention, CausalConv1d, ChunkedSelfAttention, Refiner,
                          TransformerLayer, Transpose)
from pyencoder.streaming import StreamingSequential

TOL = 1e-5
SETTINGS = settings(max_examples=25, deadline=None)

sizes_st = st.lists(st.integers(1, 9), min_size=1, max_size=6)
rope_st = st.sampled_from(["full", "none", "partial", "interleaved"])


def _rope(kind, head_dim):
    return {"full": True, "none": False, "partial": Rope(2 * (head_dim // 4) or 2),
            "interleaved": Rope(head_dim, interleaved=True)}[kind]


@st.composite
def attention_st(draw):
    heads = draw(st.sampled_from([1, 2]))
    hd = draw(st.sampled_from([4, 6, 8]))
    rope = _rope(draw(rope_st), hd)
    if draw(st.booleans()):
        left = draw(st.one_of(st.none(), st.integers(0, 6)))
        return BandedSelfAttention(heads * hd, heads, left=left, right=draw(st.integers(0, 4)),
                                   rope=rope)
    return ChunkedSelfAttention(heads * hd, heads, chunk_size=draw(st.integers(1, 5)),
                                left_chunks=draw(st.one_of(st.none(), st.integers(0, 3))),
                                lookahead=draw(st.integers(0, 3)), rope=rope)


@SETTINGS
@given(attention_st(), st.integers(1, 40), st.integers(1, 2), sizes_st,
       st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_attention_stream_equals_offline(m, T, B, sizes, max_chunk, seed):
    torch.manual_seed(seed)
    x = torch.randn(B, T, m.embed_dim)
    with torch.no_grad():
        ref = m(x)
        y = stream(m, x, sizes, 1, max_chunk=max_chunk)
    assert y.shape == ref.shape
    assert rel_err(y, ref) <= TOL


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 5), st.data(),
       st.sampled_from([None, "silu", "gelu"]), st.integers(0, 40), sizes_st,
       st.integers(0, 2**31 - 1))
def test_causal_conv_stream_equals_offline(cin, cout, k, data, act, L, sizes, seed):
    torch.manual_seed(seed)
    s = data.draw(st.integers(1, k))
    groups = cin if (cin == cout and data.draw(st.booleans())) else 1
    m = CausalConv1d(cin, cout, k, stride=s, groups=groups, activation=act)
    x = torch.randn(2, cin, L)
    with torch.no_grad():
        ref = m(x)
        y = stream(m, x, sizes, -1) if L else m.flush(m.init_state(2))[0]
    assert y.shape == ref.shape
    if L:
        assert rel_err(y, ref) <= TOL


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 25), sizes_st, st.integers(0, 2**31 - 1))
def test_refiner_stream_equals_offline(C, T, sizes, seed):
    torch.manual_seed(seed)
    m = Refiner(6, C, hidden_dim=12)
    x = torch.randn(2, T, 6)
    with torch.no_grad():
        ref = m(x)
        y = stream(m, x, sizes, 1)
    assert rel_err(y, ref) <= TOL


@st.composite
def stack_st(draw):
    layers = []
    cin = 1
    for _ in range(draw(st.integers(1, 2))):
        c = draw(st.sampled_from([3, 4]))
        k = draw(st.integers(2, 5))
        layers.append(CausalConv1d(cin, c, k, stride=draw(st.integers(1, min(3, k))),
                                   activation="gelu"))
        cin = c
    E, H = 8, 2
    layers += [Transpose(), nn.LayerNorm(cin), nn.Linear(cin, E)]
    for _ in range(draw(st.integers(1, 3))):
        la = draw(st.integers(0, 2))
        if draw(st.booleans()):
            att = BandedSelfAttention(E, H, left=draw(st.integers(1, 6)), right=la)
        else:
            att = ChunkedSelfAttention(E, H, chunk_size=draw(st.integers(1, 3)), left_chunks=1,
                                       lookahead=la)
        layers.append(TransformerLayer(att, 16, norm_first=draw(st.booleans())))
    if draw(st.booleans()):
        layers.append(Refiner(E, draw(st.integers(1, 3)), hidden_dim=8))
    return StreamingSequential(*layers)


@settings(max_examples=20, deadline=None)
@given(stack_st(), st.integers(1, 120), st.lists(st.integers(1, 17), min_size=1, max_size=5),
       st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_stack_stream_equals_offline(model, L, sizes, max_chunk, seed):
    torch.manual_seed(seed)
    x = torch.randn(2, 1, L)
    with torch.no_grad():
        ref = model(x)
        y = stream(model, x, sizes, -1, max_chunk=max_chunk)
    if ref.shape[1] == 0:
        assert y is None or y.shape[1] == 0
        return
    assert y.shape == ref.shape
    assert rel_err(y, ref) <= TOL
