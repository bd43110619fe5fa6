"""Every public op rejects bad input with a ValueError/TypeError naming the argument."""
import pytest
import torch

import pyencoder
from pyencoder.ops import (banded_attention, causal_conv1d, causal_conv1d_update,
                           chunked_attention)


def qkv(B=2, Hq=4, Hk=2, N=8, D=8, dtype=torch.float32):
    return (torch.randn(B, Hq, N, D, dtype=dtype), torch.randn(B, Hk, N, D, dtype=dtype),
            torch.randn(B, Hk, N, D, dtype=dtype))


ATTN_BAD = [
    (lambda q, k, v: banded_attention(q[0], k, v, left=1, right=0), ValueError, "q must be 4-D"),
    (lambda q, k, v: banded_attention(q, k[:1], v, left=1, right=0), ValueError, "batch"),
    (lambda q, k, v: banded_attention(q, k[:, :, :5], v, left=1, right=0), ValueError, "k and v"),
    (lambda q, k, v: banded_attention(q[..., :6], k, v, left=1, right=0), ValueError, "head_dim"),
    (lambda q, k, v: banded_attention(q[:, :3], k, v, left=1, right=0), ValueError, "multiple"),
    (lambda q, k, v: banded_attention(q, k, v, left=-1, right=0), ValueError, "left must be >= 0"),
    (lambda q, k, v: banded_attention(q, k, v, left=1, right=-2), ValueError, "right must be >= 0"),
    (lambda q, k, v: banded_attention(q, k, v, left=1.5, right=0), TypeError, "left must be"),
    (lambda q, k, v: chunked_attention(q, k, v, chunk_size=0, left_chunks=1), ValueError,
     "chunk_size must be >= 1"),
    (lambda q, k, v: chunked_attention(q, k, v, chunk_size=2, left_chunks=-1), ValueError,
     "left_chunks"),
    (lambda q, k, v: chunked_attention(q, k, v, chunk_size=2, left_chunks=1, lookahead=-1),
     ValueError, "lookahead"),
    (lambda q, k, v: banded_attention(q, k.double(), v, left=1, right=0), TypeError, "dtype"),
    (lambda q, k, v: banded_attention(q.int(), k, v, left=1, right=0), TypeError, "floating"),
    (lambda q, k, v: banded_attention(q, k, v, left=1, right=0, key_lengths=torch.tensor([9, 1])),
     ValueError, "key_lengths values must lie in [0, 8]"),
    (lambda q, k, v: banded_attention(q, k, v, left=1, right=0, key_lengths=torch.tensor([-1, 1])),
     ValueError, "key_lengths values"),
    (lambda q, k, v: banded_attention(q, k, v, left=1, right=0, key_lengths=torch.tensor([1])),
     ValueError, "key_lengths must have shape (2,)"),
    (lambda q, k, v: banded_attention(q, k, v, left=1, right=0,
                                      key_lengths=torch.tensor([1.0, 2.0])),
     TypeError, "integer"),
    (lambda q, k, v: banded_attention(q, k, v, left=1, right=0, rope=pyencoder.Rope(16)),
     ValueError, "rope.dim must be <= head_dim"),
    (lambda q, k, v: banded_attention(q, k, v, left=1, right=0, rope=16), TypeError, "rope"),
    (lambda q, k, v: banded_attention(q, k, v, left=1, right=0, q_offset=-3), ValueError,
     "q_offset"),
    (lambda q, k, v: banded_attention(q, k, v, left=1, right=0, scale=float("nan")), ValueError,
     "scale"),
    (lambda q, k, v: banded_attention(q, k, v, left=1, right=0, backend="gpu"), ValueError,
     "backend must be one of"),
]


@pytest.mark.parametrize("fn,exc,msg", ATTN_BAD)
def test_attention_bad_input(fn, exc, msg):
    q, k, v = qkv()
    with pytest.raises(exc) as ei:
        fn(q, k, v)
    assert msg in str(ei.value)


def test_rope_bad_dim():
    with pytest.raises(ValueError, match="Rope: dim must be a positive even int; got 7"):
        pyencoder.Rope(7)


def test_mixed_devices_message():
    q, k, v = qkv()
    meta_k = torch.empty(k.shape, device="meta")
    with pytest.raises(ValueError, match="same device"):
        banded_attention(q, meta_k, v, left=1, right=0)


CONV_BAD = [
    (lambda x, w: causal_conv1d(x[0], w, groups=4), ValueError, "x must be 3-D"),
    (lambda x, w: causal_conv1d(x, w[:, :, :, None], groups=4), ValueError, "weight must be 3-D"),
    (lambda x, w: causal_conv1d(x, w, groups=3), ValueError, "groups (3) must divide"),
    (lambda x, w: causal_conv1d(x, w, groups=2), ValueError, "weight must have shape"),
    (lambda x, w: causal_conv1d(x, w, groups=4, stride=0), ValueError, "stride must be >= 1"),
    (lambda x, w: causal_conv1d(x, w, groups=4, stride=6), ValueError, "kernel size (5) must be"),
    (lambda x, w: causal_conv1d(x, w, groups=4, activation="relu"), ValueError, "activation"),
    (lambda x, w: causal_conv1d(x, w, torch.randn(3), groups=4), ValueError, "bias must have"),
    (lambda x, w: causal_conv1d(x, w.double(), groups=4), TypeError, "dtype"),
    (lambda x, w: causal_conv1d(x, w, groups=4, initial_state=torch.randn(2, 4, 3)), ValueError,
     "initial_state must have shape (B, C_in, k - stride) = (2, 4, 4)"),
    (lambda x, w: causal_conv1d_update(x, torch.randn(2, 4, 5), w, groups=4), ValueError,
     "state must have shape (B, C_in, k - 1) = (2, 4, 4)"),
    (lambda x, w: causal_conv1d_update(x, torch.randn(3, 4, 4), w, groups=4,
                                       state_indices=torch.tensor([0, 3])), ValueError,
     "state_indices values must lie in [-1, 2]"),
    (lambda x, w: causal_conv1d_update(x, torch.randn(3, 4, 4), w, groups=4,
                                       state_indices=torch.tensor([0])), ValueError,
     "state_indices must have shape (2,)"),
    (lambda x, w: causal_conv1d_update(x[..., :0], torch.randn(2, 4, 4), w, groups=4), ValueError,
     "at least one new frame"),
]


@pytest.mark.parametrize("fn,exc,msg", CONV_BAD)
def test_conv_bad_input(fn, exc, msg):
    x = torch.randn(2, 4, 10)
    w = torch.randn(4, 1, 5)
    with pytest.raises(exc) as ei:
        fn(x, w)
    assert msg in str(ei.value)
