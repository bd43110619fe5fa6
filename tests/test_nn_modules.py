"""Offline behaviour of the drop-in modules: weight compatibility (nn.Conv1d, wav2vec2), masks
against a dense plain-torch oracle at tiny sizes, and argument errors."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyencoder import Rope
from pyencoder.nn import (BandedSelfAttention, CausalConv1d, ChunkedSelfAttention, Refiner,
                          RotaryEmbedding, TransformerLayer)


def _dense_attention(m, x, lo, hi, rope):
    """Dense oracle: explicit (T, T) mask, RoPE via Rope.rotate, float64."""
    B, T, E = x.shape
    H, D = m.num_heads, m.head_dim
    xd = x.double()
    def heads(p):
        return F.linear(xd, p.weight.double(), p.bias.double()).view(B, T, H, D).transpose(1, 2)
    q, k, v = heads(m.q_proj), heads(m.k_proj), heads(m.v_proj)
    pos = torch.arange(T)
    if rope is not None:
        q, k = rope.rotate(q, pos), rope.rotate(k, pos)
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    p, t = pos[:, None], pos[None, :]
    mask = (t >= lo(p)) & (t <= hi(p))
    s = s.masked_fill(~mask, float("-inf"))
    a = torch.softmax(s, -1).nan_to_num(0.0)
    o = (a @ v).transpose(1, 2).reshape(B, T, E)
    return F.linear(o, m.out_proj.weight.double(), m.out_proj.bias.double())


@pytest.mark.parametrize("left,right", [(3, 0), (0, 2), (None, 1), (5, 4)])
def test_banded_matches_dense(left, right):
    m = BandedSelfAttention(12, 3, left=left, right=right)
    x = torch.randn(2, 23, 12)
    ref = _dense_attention(m, x, (lambda p: p - left) if left is not None else (lambda p: p * 0 - 10**9),
                           lambda p: p + right, Rope(4))
    # fp32 op vs float64 oracle: a few ulp of fp32 on O(1) outputs.
    assert torch.allclose(m(x).double(), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("c,lc,la", [(4, 1, 0), (3, None, 2), (1, 2, 1), (5, 0, 3)])
def test_chunked_matches_dense(c, lc, la):
    m = ChunkedSelfAttention(8, 2, chunk_size=c, left_chunks=lc, lookahead=la, rope=False)
    x = torch.randn(1, 19, 8)
    lo = (lambda p: (p // c - lc) * c) if lc is not None else (lambda p: p * 0 - 10**9)
    ref = _dense_attention(m, x, lo, lambda p: (p // c + 1) * c - 1 + la, None)
    assert torch.allclose(m(x).double(), ref, atol=2e-5, rtol=1e-5)


def test_attention_rope_options():
    assert BandedSelfAttention(8, 2, left=1, right=0, rope=False).rope is None
    assert BandedSelfAttention(8, 2, left=1, right=0).rope == Rope(4)
    assert BandedSelfAttention(8, 2, left=1, right=0, rope=2).rope == Rope(2)
    r = RotaryEmbedding(4, interleaved=True)
    assert BandedSelfAttention(8, 2, left=1, right=0, rope=r).rope == r.rope
    assert RotaryEmbedding(4).state_dict() == {}
    with pytest.raises(ValueError, match=r"rope.dim must be <= head_dim \(4\); got 6"):
        BandedSelfAttention(8, 2, left=1, right=0, rope=6)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        BandedSelfAttention(10, 3, left=1, right=0)


def test_transformer_layer_loads_wav2vec2_layer():
    tr = pytest.importorskip("transformers")
    from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2EncoderLayer
    cfg = tr.Wav2Vec2Config(hidden_size=16, num_attention_heads=2, intermediate_size=32)
    hf = Wav2Vec2EncoderLayer(cfg).eval()
    ours = TransformerLayer(BandedSelfAttention(16, 2, left=None, right=40, rope=False), 32,
                            norm_first=False).eval()
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(2, 17, 16)
    with torch.no_grad():
        ref = hf(x)
        ref = ref[0] if isinstance(ref, tuple) else ref
        got = ours(x)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k,s,groups,act", [(3, 1, 1, None), (4, 2, 1, "gelu"), (5, 5, 2, "silu"),
                                             (1, 1, 4, None), (10, 5, 1, "gelu")])
def test_causal_conv_is_a_conv1d(k, s, groups, act):
    conv = nn.Conv1d(4, 8, k, stride=s, groups=groups)
    m = CausalConv1d(4, 8, k, stride=s, groups=groups, activation=act)
    assert isinstance(m, nn.Conv1d)
    assert m.state_dict().keys() == conv.state_dict().keys()
    m.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 41)
    ref = conv(F.pad(x, (k - s, 0)))
    ref = {None: ref, "gelu": F.gelu(ref), "silu": F.silu(ref)}[act]
    assert torch.allclose(m(x), ref[..., :41 // s], atol=1e-5)
    assert m.lookahead == 0 and m.hop == s


def test_causal_conv_errors():
    with pytest.raises(ValueError, match="activation"):
        CausalConv1d(2, 2, 3, activation="relu")
    with pytest.raises(ValueError, match="kernel_size"):
        CausalConv1d(2, 2, 2, stride=3)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2, L\)"):
        CausalConv1d(2, 2, 3)(torch.randn(1, 3, 5))


def test_refiner_matches_manual():
    m = Refiner(4, 3, hidden_dim=5)
    x = torch.randn(2, 7, 4)
    xp = F.pad(x, (0, 0, 0, 2)).reshape(2, 3, 12)
    ref = (xp + m.fc2(F.gelu(m.fc1(xp)))).reshape(2, 9, 4)[:, :7]
    assert torch.allclose(m(x), ref, atol=1e-6)
    assert m.lookahead == 2


def test_key_lengths_padding():
    m = BandedSelfAttention(8, 2, left=4, right=2)
    x = torch.randn(2, 10, 8)
    y = m(x, key_lengths=torch.tensor([10, 6]))
    assert torch.allclose(y[1, :4], m(x[1:2, :6])[0, :4], atol=1e-5)


def test_transformer_layer_bad_input():
    layer = TransformerLayer(BandedSelfAttention(16, 2, left=4, right=1), 32)
    st = layer.init_state(2)
    for bad in (torch.randn(2, 4, 15), torch.randn(4, 16)):
        with pytest.raises(ValueError, match=r"x must have shape \(B, T, 16\)"):
            layer(bad)
        with pytest.raises(ValueError, match=r"x must have shape \(B, T, 16\)"):
            layer.step(bad, st)
