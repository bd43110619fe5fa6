"""Regression tests for bad input that used to hang, crash inside torch or be read silently:
zero/negative chunk sizes, interval_attention's (block, lo_off, hi_off), in-place conv states that
alias themselves or each other, double backward, junk PYENCODER_* values, Rope's arguments."""
import pytest
import torch

import pyencoder
from pyencoder import streaming
from pyencoder.nn import BandedSelfAttention, CausalConv1d
from pyencoder.ops import (banded_attention, causal_conv1d, causal_conv1d_update,
                           chunked_attention, interval_attention)


def _qkv(B=1, H=2, N=7, D=8, dtype=torch.float32, grad=False):
    return [torch.randn(B, H, N, D, dtype=dtype, requires_grad=grad) for _ in range(3)]


@pytest.mark.parametrize("sizes, match", [
    ([0], r"chunk_sizes\[0\] must be an int >= 1 .*; got 0"),
    ([3, -2], r"chunk_sizes\[1\] .* got -2"),
    ([2.0], r"chunk_sizes\[0\] must be an int"),
    ([False], r"chunk_sizes\[0\] must be an int"),
    ([], r"chunk_sizes must hold at least one"),
    (4, r"chunk_sizes must be a non-empty sequence"),
])
@pytest.mark.parametrize("module", ["attn", "conv"])
def test_run_stream_rejects_bad_chunk_sizes(sizes, match, module):
    if module == "attn":
        m, x = BandedSelfAttention(8, 2, left=3, right=1), torch.randn(1, 9, 8)
    else:
        m, x = CausalConv1d(4, 4, kernel_size=3), torch.randn(1, 4, 9)
    with pytest.raises((ValueError, TypeError), match=match):
        streaming.run_stream(m, x, sizes)


@pytest.mark.parametrize("chunk_ms", [0, -20, 0.01, float("nan"), True, "80"])
def test_streaming_demo_rejects_chunks_without_samples(chunk_ms):
    from pyencoder._demo import streaming_demo
    with pytest.raises(ValueError, match="chunk_ms must be a number"):
        streaming_demo(quick=True, chunk_ms=chunk_ms)


def test_run_stream_accepts_integer_like_sizes():
    m, x = BandedSelfAttention(8, 2, left=3, right=1), torch.randn(2, 9, 8)
    y = streaming.run_stream(m, x, (torch.tensor(2).item(), 3))
    torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(block=0), ValueError, r"block must be >= 1; got 0"),
    (dict(block=-2), ValueError, r"block must be >= 1; got -2"),
    (dict(block=True), TypeError, r"block must be an int"),
    (dict(block=2.0), TypeError, r"block must be an int"),
    (dict(lo_off=-2), ValueError, r"lo_off must be >= -1; got -2"),
    (dict(lo_off=None), TypeError, r"lo_off must be an int"),
    (dict(hi_off=1.5), TypeError, r"hi_off must be an int"),
    (dict(hi_off=False), TypeError, r"hi_off must be an int"),
])
def test_interval_attention_validates_mask_ints(kw, exc, match):
    args = dict(block=1, lo_off=2, hi_off=1)
    args.update(kw)
    with pytest.raises(exc, match=match):
        interval_attention(*_qkv(), **args)


def test_interval_attention_negative_lo_off_is_unbounded():
    q, k, v = _qkv()
    torch.testing.assert_close(interval_attention(q, k, v, block=1, lo_off=-1, hi_off=1),
                               banded_attention(q, k, v, left=None, right=1))


def test_conv_update_rejects_expanded_state():
    x, w = torch.randn(2, 4, 3), torch.randn(4, 1, 3)
    state = torch.randn(1, 4, 2).expand(2, 4, 2)
    with pytest.raises(ValueError, match=r"state is updated in place .* expanded"):
        causal_conv1d_update(x, state, w, groups=4)
    pool = torch.randn(1, 4, 1).expand(3, 4, 2)
    with pytest.raises(ValueError, match=r"state is updated in place"):
        causal_conv1d_update(x, pool, w, groups=4, state_indices=torch.tensor([0, 2]))


def test_conv_update_rejects_duplicate_state_indices():
    x, w = torch.randn(3, 4, 2), torch.randn(4, 1, 3)
    pool = torch.randn(5, 4, 2)
    before = pool.clone()
    with pytest.raises(ValueError, match=r"state_indices must not repeat a slot.*\[1, 4, 1\]"):
        causal_conv1d_update(x, pool, w, groups=4, state_indices=torch.tensor([1, 4, 1]))
    assert torch.equal(pool, before)
    y = causal_conv1d_update(x, pool, w, groups=4, state_indices=torch.tensor([-1, 2, -1]))
    assert torch.equal(y[0], torch.zeros_like(y[0])) and torch.equal(y[2], y[0])
    ref = causal_conv1d(x[1:2], w, groups=4, initial_state=before[2:3])
    torch.testing.assert_close(y[1:2], ref)


def _second_grad(f, inputs):
    out = f(*inputs)
    g = torch.autograd.grad(out.pow(2).sum(), inputs[0], create_graph=True)[0]
    torch.autograd.grad(g.pow(2).sum(), inputs)


@pytest.mark.parametrize("op", ["banded", "chunked", "conv", "convnext"])
def test_double_backward_is_refused_in_our_words(op):
    if op == "banded":
        f, inputs = (lambda q, k, v: banded_attention(q, k, v, left=2, right=1)), _qkv(grad=True)
        what = "interval attention"
    elif op == "chunked":
        f = lambda q, k, v: chunked_attention(q, k, v, chunk_size=2, left_chunks=1)  # noqa: E731
        inputs, what = _qkv(grad=True), "interval attention"
    elif op == "conv":
        f = lambda x, w: causal_conv1d(x, w, groups=4, activation="silu")  # noqa: E731
        inputs = [torch.randn(2, 4, 6, requires_grad=True),
                  torch.randn(4, 1, 3, requires_grad=True)]
        what = "causal_conv1d"
    else:
        from pyencoder.ops import convnext_dwconv_ln
        f = lambda x, w: convnext_dwconv_ln(x, w)  # noqa: E731
        inputs = [torch.randn(2, 4, 6, requires_grad=True),
                  torch.randn(4, 1, 3, requires_grad=True)]
        what = "convnext_dwconv_ln"
    with pytest.raises(NotImplementedError, match=f"pyencoder: {what} does not support double "
                                                  f"backward"):
        _second_grad(f, inputs)
    out = f(*inputs)
    grads = torch.autograd.grad(out.sum(), inputs, create_graph=True)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name, call", [
    ("PYENCODER_DETERMINISTIC",
     lambda: banded_attention(*_qkv(grad=True), left=1, right=0).sum().backward()),
    ("PYENCODER_CPU_SKINNY_GEMM",
     lambda: pyencoder.nn.Linear(8, 4).requires_grad_(False)(torch.randn(2, 8))),
    ("PYENCODER_TRITON_AUTOTUNE",
     lambda: __import__("pyencoder.ops._attention_triton", fromlist=["_"])._autotune_enabled()),
    ("PYENCODER_ROPE_TABLE",
     lambda: __import__("pyencoder.ops._attention_triton", fromlist=["_"])._rope_table_enabled()),
])
@pytest.mark.parametrize("value", ["2", "ture", "enable", "-1"])
def test_junk_env_values_are_rejected(monkeypatch, name, call, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name} must be one of .*; got '{value}'"):
        call()


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), (" ON ", True),
                                             ("0", False), ("no", False), ("", None)])
def test_env_flag_values(monkeypatch, value, expected):
    from pyencoder._env import env_flag
    monkeypatch.setenv("PYENCODER_DETERMINISTIC", value)
    for default in (False, True):
        want = default if expected is None else expected
        assert env_flag("PYENCODER_DETERMINISTIC", default) is want


@pytest.mark.parametrize("args, exc, match", [
    ((8,), None, None),
    ((8, "abc"), TypeError, r"Rope: base must be a finite float > 1; got str 'abc'"),
    ((8, True), TypeError, r"Rope: base .* got bool"),
    ((8, float("nan")), ValueError, r"Rope: base .* got nan"),
    ((8, 0.5), ValueError, r"Rope: base .* got 0.5"),
    ((8, 100.0, 1), TypeError, r"Rope: interleaved must be a bool; got int 1"),
    ((8, 100.0, "no"), TypeError, r"Rope: interleaved must be a bool"),
    ((8.0,), TypeError, r"Rope: dim must be a positive even int; got float"),
    ((True,), TypeError, r"Rope: dim must be a positive even int; got bool"),
    ((0,), ValueError, r"Rope: dim .* got 0"),
    ((-4,), ValueError, r"Rope: dim .* got -4"),
])
def test_rope_arguments(args, exc, match):
    if exc is None:
        assert pyencoder.Rope(*args).dim == 8
        return
    with pytest.raises(exc, match=match):
        pyencoder.Rope(*args)


def test_cuda_backward_outputs_never_alias(monkeypatch):
    """The extension's backward returns dweight and dbias as views of one (C, K + 1) reduction
    buffer when no dtype cast copies them (float32); the backend must hand back distinct tensors,
    since a registered op may not return outputs that alias each other (the first GPU run's
    convnext_dwconv_ln backward failed on exactly this). CPU: a stand-in for the extension."""
    from types import SimpleNamespace

    from pyencoder.ops import _conv_cuda

    C, K = 6, 4
    red = torch.randn(C, K + 1)

    def bwd(grad_y, grad_final_state, x, weight, bias, initial_state, act):
        return (torch.randn_like(x), red.narrow(1, 0, K).reshape(C, 1, K), red.select(1, K),
                torch.randn(x.shape[0], C, K - 1))
    monkeypatch.setattr(_conv_cuda, "_ops", lambda: SimpleNamespace(causal_conv1d_bwd_cuda=bwd))
    monkeypatch.setattr(_conv_cuda, "_kind", lambda *a: "depthwise")
    x, w, b = torch.randn(2, C, 9), torch.randn(C, 1, K), torch.randn(C)
    dx, dw, db, ds = _conv_cuda.backward(torch.randn(2, C, 9), None, x, w, b, None, 1, C, None)
    assert not _conv_cuda._shares_storage(dw, db)
    assert torch.equal(dw, red[:, :K].reshape(C, 1, K)) and torch.equal(db, red[:, K])
    assert ds is None
    # without a bias nothing is cloned and None comes back
    assert _conv_cuda.backward(torch.randn(2, C, 9), None, x, w, None, None, 1, C, None)[2] is None
