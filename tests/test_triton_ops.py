"""The Triton backends registered the torch way: ``torch.library.triton_op`` + ``wrap_triton``
(pyencoder.ops._triton_op; issue 14 item 5).

Every Triton op is checked with ``torch.library.opcheck`` (schema, fake kernel, autograd
registration, AOTDispatch static and dynamic) on fresh random inputs, and the public functions are
compiled with ``torch.compile(fullgraph=True)`` on the triton backend, forward and backward, against
eager. On the CPU the kernels run in the Triton interpreter, where wrap_triton cannot build its
higher-order op (pyencoder.ops._triton_op explains why): the fake kernel skips the interpreted
launch and AOTDispatch keeps the op whole, which ``test_interpreter_keeps_op_whole`` pins down.
The decomposition into ``triton_kernel_wrapper_*`` nodes, which only a compiled kernel allows, is
checked by the GPU tests (``-m gpu``).

Tolerances: opcheck compares the op against itself (eager vs traced) with torch's defaults; the
compiled-vs-eager comparisons run the same kernels in the same order, so fp32 agrees to 1e-6.
"""
import functools
import os

import pytest
import torch

from conftest import attention_op_args, compiled_matches_eager, has_triton

pytestmark = pytest.mark.skipif(
    not has_triton() or not (torch.cuda.is_available()
                             or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton (a GPU, or TRITON_INTERPRET=1)")

import pyencoder  # noqa: E402
from pyencoder import Rope  # noqa: E402
from pyencoder.ops import banded_attention, causal_conv1d, causal_conv1d_update  # noqa: E402

_DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _ops():
    from pyencoder.ops import (_attention_triton as A, _conv_triton as C, _convnext_triton as X,
                               _decode_attention_triton as D)
    return A, C, X, D


def _r(*shape, grad=False, dtype=torch.float32):
    return torch.randn(*shape, device=_DEV, dtype=dtype).requires_grad_(grad)


def _cases():
    A, C, X, D = _ops()
    q, k, v = _r(2, 2, 10, 16, grad=True), _r(2, 1, 12, 16, grad=True), _r(2, 1, 12, 16, grad=True)
    inv = Rope(8).inv_freq().to(_DEV)
    kl = torch.tensor([12, 7], dtype=torch.int32, device=_DEV)
    att = attention_op_args(q, k, v, inv, kl, block=1, lo_off=3, hi_off=2)
    out, lse = A.forward_op(*(t.detach() if isinstance(t, torch.Tensor) else t for t in att))
    att_bwd = (_r(*out.shape), q.detach(), k.detach(), v.detach(), out, lse, inv, kl, None, None,
               *att[7:], True)
    x, w, b, s0 = _r(2, 4, 13, grad=True), _r(4, 1, 5, grad=True), _r(4, grad=True), \
        _r(2, 4, 4, grad=True)
    conv = (x, w, b, s0, 1, 4, "silu")
    xg, wg = _r(2, 4, 12, grad=True), _r(6, 2, 4, grad=True)
    conv_grp = (xg, wg, None, None, 2, 2, "")
    conv_bwd = (_r(2, 4, 13), _r(2, 4, 4), x.detach(), w.detach(), b.detach(), s0.detach(), 1, 4,
                "gelu")
    upd = (_r(2, 4, 3), _r(2, 4, 4), w.detach(), b.detach(), None, 4, "silu")
    xn = (_r(2, 6, 5, grad=True), _r(6, 1, 4, grad=True), _r(6, grad=True), _r(6, grad=True),
          _r(6, grad=True), _r(2, 6, 3, grad=True), 1e-6)
    n = torch.tensor([4, 25], device=_DEV)
    dec = (_r(2, 2, 3, 16), _r(2, 2, 11, 16), _r(2, 2, 11, 16),
           (n - 2)[:, None] + torch.arange(3, device=_DEV), torch.tensor([3, 2], device=_DEV), n,
           inv, False, 1, 5, 1, 0.25)
    # relative bias over the window's offsets [-5, 1], per-row gate, GQA ring (1 head for 2)
    dec_bias = (dec[0], _r(2, 1, 11, 16), _r(2, 1, 11, 16)) + dec[3:] + (
        _r(2, 7), _r(2, 2, 3), -5)
    # resident sink keys (3 positions; the slot with n = 4 holds 1 window key past them): alone,
    # and with the gated bias and the GQA ring
    dec_sink = dec + (None, None, 0, _r(2, 2, 3, 16), _r(2, 2, 3, 16))
    dec_bias_sink = dec_bias + (_r(2, 1, 3, 16), _r(2, 1, 3, 16))
    return {
        "attention": (A.forward_op, att), "attention_backward": (A.backward_op, att_bwd),
        "conv": (C.forward_op, conv), "conv_grouped_strided": (C.forward_op, conv_grp),
        "conv_backward": (C.backward_op, conv_bwd), "conv_update": (C.update_op, upd),
        "convnext": (X.forward_op, xn), "decode_attention": (D.forward_op, dec),
        "decode_attention_bias": (D.forward_op, dec_bias),
        "decode_attention_sink": (D.forward_op, dec_sink),
        "decode_attention_bias_sink": (D.forward_op, dec_bias_sink),
    }


@pytest.mark.parametrize("name", ["attention", "attention_backward", "conv", "conv_grouped_strided",
                                  "conv_backward", "conv_update", "convnext", "decode_attention",
                                  "decode_attention_bias", "decode_attention_sink",
                                  "decode_attention_bias_sink"])
def test_opcheck(name):
    op, args = _cases()[name]
    res = torch.library.opcheck(op.op, args)
    assert set(res) >= {"test_schema", "test_faketensor", "test_autograd_registration",
                        "test_aot_dispatch_dynamic"}
    assert all(v == "SUCCESS" for v in res.values()), res


def test_registered_as_triton_ops(monkeypatch):
    """The functional API runs the triton_ops (not the opaque backend-string ops) on triton."""
    from torch._library.triton import triton_ops_to_kernels
    A, C, X, D = _ops()
    for lazy in (A.forward_op, A.backward_op, C.forward_op, C.backward_op, C.update_op,
                 X.forward_op, D.forward_op):
        assert lazy.op is not None and lazy.name in triton_ops_to_kernels, lazy.name
    from pyencoder.ops import _triton_op
    seen = []
    orig = A.forward_op.op

    def spy(*a):
        seen.append(1)
        return orig(*a)
    monkeypatch.setitem(_triton_op._REGISTERED, A.forward_op.name, spy)
    q = _r(1, 2, 6, 8)
    # eager calls take the fast path (pyencoder.ops.attention._EagerTriton: same launcher, no
    # dispatcher); PYENCODER_EAGER_FASTPATH=0 sends them through the triton_op
    banded_attention(q, q, q, left=2, right=1, backend="triton")
    assert seen == []
    monkeypatch.setenv("PYENCODER_EAGER_FASTPATH", "0")
    banded_attention(q, q, q, left=2, right=1, backend="triton")
    assert seen == [1]


@pytest.mark.parametrize("bias", [False, True])
def test_eager_fast_path_equals_registered_op(monkeypatch, bias):
    """The eager fast path and the registered triton_op run the same launcher and the same
    autograd formula: forward, all gradients (bias table and gate included) and lse are bitwise
    equal, GQA + RoPE + key_lengths + sink keys; a second-order gradient is refused in our words
    on both paths."""
    from pyencoder import IntervalMask
    from pyencoder.ops import interval_attention

    q, k, v = _r(2, 4, 11, 16, grad=True), _r(2, 2, 11, 16, grad=True), _r(2, 2, 11, 16,
                                                                          grad=True)
    kl = torch.tensor([11, 6], device=_DEV)
    extra = {}
    if bias:
        extra = dict(rel_bias=_r(4, 9, grad=True), gate=_r(2, 4, 11, grad=True), rel_offset=-6)
    mask = IntervalMask.band(4, 2, sink=2)
    leaves = [q, k, v] + list(extra.values())[:2]

    def run():
        out, lse = interval_attention(q, k, v, mask=mask, rope=Rope(8), key_lengths=kl,
                                      backend="triton", return_lse=True, **extra)
        g = torch.autograd.grad((out * out.detach().cos()).sum(), leaves)
        return (out, lse) + g

    fast = run()
    monkeypatch.setenv("PYENCODER_EAGER_FASTPATH", "0")
    slow = run()
    for a, b in zip(fast, slow):
        assert torch.equal(a, b) if not bias else torch.allclose(a, b, atol=1e-6, rtol=0)
    monkeypatch.delenv("PYENCODER_EAGER_FASTPATH")
    out = interval_attention(q, k, v, mask=mask, backend="triton", **extra)
    g = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)[0]
    with pytest.raises(NotImplementedError, match="pyencoder: interval attention does not "
                                                  "support double backward"):
        torch.autograd.grad(g.pow(2).sum(), (q, k, v))


def _graphs():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward
    return graphs, backend


def _compiled_matches_eager(f, args):
    """Same kernels in the same order compiled and eager: fp32 agrees to 1e-6."""
    return compiled_matches_eager(f, args, 1e-6)


def _attention_fn(q, k, v):
    return banded_attention(q, k, v, left=3, right=1, rope=Rope(8), backend="triton").square().sum()


def _conv_fn(x, w, b):
    y, f = causal_conv1d(x, w, b, groups=4, activation="silu", return_final_state=True,
                         backend="triton")
    return y.square().sum() + f.sum()


def test_torch_compile_fullgraph_attention_and_conv():
    g = _compiled_matches_eager(_attention_fn, (_r(1, 2, 9, 16, grad=True),
                                                _r(1, 2, 9, 16, grad=True),
                                                _r(1, 2, 9, 16, grad=True)))
    assert "interval_attention_triton" in g
    g = _compiled_matches_eager(_conv_fn, (_r(2, 4, 11, grad=True), _r(4, 1, 3, grad=True),
                                           _r(4, grad=True)))
    assert "causal_conv1d_triton" in g


def test_update_op_mutates_state_under_compile():
    x, w, b = _r(2, 4, 3), _r(4, 1, 5), _r(4)
    s1, s2 = _r(2, 4, 4), None
    s2 = s1.clone()
    f = torch.compile(lambda x, s: causal_conv1d_update(x, s, w, b, groups=4, backend="triton"),
                      backend="aot_eager", fullgraph=True)
    y1 = f(x, s1)
    y2 = causal_conv1d_update(x, s2, w, b, groups=4, backend="triton")
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s1, s2, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["decode_attention", "decode_attention_bias",
                                  "decode_attention_sink", "decode_attention_bias_sink"])
def test_decode_attention_compiles_through_the_op_eager_calls_direct(monkeypatch, case):
    """Eager: the direct launcher (no dispatcher); compiled: the registered triton_op (with the
    relative bias, gate and GQA ring too, and with resident sink keys)."""
    from pyencoder.ops.decode_attention import decode_attention
    A, C, X, D = _ops()
    args = _cases()[case][1]
    if case != "decode_attention":
        names = ("rel_bias", "gate", "rel_offset", "sink_k", "sink_v")
        args, extra = args[:12], {k: a for k, a in zip(names, args[12:]) if a is not None}
        if "rel_bias" not in extra:
            extra.pop("rel_offset")
        decode_attention = functools.partial(decode_attention, **extra)
    direct = []
    launcher = D.forward

    def counted(*a):
        direct.append(1)
        return launcher(*a)
    monkeypatch.setattr(D, "forward", counted)
    with pyencoder.use_backend(decode_attention="triton"):
        eager = decode_attention(*args)
        assert direct == [1]
        graphs, backend = _graphs()
        torch._dynamo.reset()
        out = torch.compile(lambda *a: decode_attention(*a), backend=backend,
                            fullgraph=True)(*args)
    assert "decode_attention_triton" in "\n".join(graphs)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's behaviour")
def test_interpreter_keeps_op_whole():
    """Under TRITON_INTERPRET=1 AOTDispatch keeps the triton_op as one node (its body would trace
    to bare allocations: pyencoder.ops._triton_op)."""
    g = _compiled_matches_eager(_conv_fn, (_r(2, 4, 11, grad=True), _r(4, 1, 3, grad=True),
                                           _r(4, grad=True)))
    assert "causal_conv1d_triton" in g and "triton_kernel_wrapper" not in g


@pytest.mark.gpu
@pytest.mark.gpu_quick
def test_gpu_compile_decomposes_into_kernels():
    """On a GPU AOTDispatch traces the triton_ops down to their kernels (wrap_triton's
    higher-order op), forward and backward: band, relative bias (gated), frame-rate mask."""
    import test_attention_op as T
    g = _compiled_matches_eager(_attention_fn, (_r(1, 2, 70, 64, grad=True),
                                                _r(1, 2, 70, 64, grad=True),
                                                _r(1, 2, 70, 64, grad=True)))
    assert "triton_kernel_wrapper_functional" in g and "interval_attention_triton" not in g
    for case in ("biased", "frame"):    # the masks that had no triton_op before the one op
        f, inputs = (T._biased_fn, T._biased_inputs) if case == "biased" else \
            (T._frame_fn, T._frame_inputs)
        g = compiled_matches_eager(f("triton"), inputs(torch.float32), 1e-5)
        assert "triton_kernel_wrapper_functional" in g and "interval_attention_triton" not in g, \
            case
    g = _compiled_matches_eager(_conv_fn, (_r(2, 4, 11, grad=True), _r(4, 1, 3, grad=True),
                                           _r(4, grad=True)))
    assert "triton_kernel_wrapper_functional" in g


def test_direct_path_without_autograd(monkeypatch):
    """Eager calls that need no autograd graph run the triton_op's launcher body directly
    (pyencoder.ops._call.direct_ok): the registered op is not called, results equal the op's,
    the conv update step still bumps the state's version counter (it mutates it), a call whose
    inputs require grad takes the eager autograd path (no registered op either), and
    PYENCODER_EAGER_FASTPATH=0 goes through the op."""
    from pyencoder.ops import _triton_op, convnext_dwconv_ln
    A, C, X, D = _ops()
    seen = []
    for lazy in (C.forward_op, C.update_op, X.forward_op):
        orig = lazy.op

        def spy(*a, _orig=orig, _name=lazy.name):
            seen.append(_name)
            return _orig(*a)
        monkeypatch.setitem(_triton_op._REGISTERED, lazy.name, spy)
    x, w, b = _r(2, 4, 13), _r(4, 1, 5), _r(4)
    with torch.no_grad():
        y_direct = causal_conv1d(x, w, b, groups=4, activation="silu", backend="triton")
    xn, wn = _r(2, 6, 5), _r(6, 1, 4)
    z_direct = convnext_dwconv_ln(xn, wn, backend="triton", return_final_state=True)
    state = _r(2, 4, 4)
    v0 = state._version
    u_direct = causal_conv1d_update(_r(2, 4, 1), state, w, b, groups=4, activation="silu",
                                    backend="triton")
    assert seen == [] and state._version > v0
    with torch.inference_mode():     # inference tensors have no version counter to bump
        st_inf = _r(2, 4, 4)
        before = st_inf.clone()
        causal_conv1d_update(_r(2, 4, 1), st_inf, w, b, groups=4, activation="silu",
                             backend="triton")
        assert not torch.equal(st_inf, before) and seen == []
    monkeypatch.setenv("PYENCODER_EAGER_FASTPATH", "0")
    y_op = causal_conv1d(x, w, b, groups=4, activation="silu", backend="triton")
    z_op = convnext_dwconv_ln(xn, wn, backend="triton", return_final_state=True)
    assert torch.equal(y_direct, y_op) and torch.equal(z_direct[0], z_op[0])
    assert u_direct.shape == (2, 4, 1)
    assert seen == [C.forward_op.name, X.forward_op.name]
    monkeypatch.delenv("PYENCODER_EAGER_FASTPATH")
    seen.clear()
    # with a graph: the eager autograd path (pyencoder.ops._call._EagerOp, the op's own
    # formula), still no registered op; with the fast path off, the op, same gradients
    xg = x.clone().requires_grad_(True)
    causal_conv1d(xg, w, b, groups=4, activation="silu", backend="triton").sum().backward()
    assert seen == [] and xg.grad is not None
    monkeypatch.setenv("PYENCODER_EAGER_FASTPATH", "0")
    xo = x.clone().requires_grad_(True)
    causal_conv1d(xo, w, b, groups=4, activation="silu", backend="triton").sum().backward()
    assert seen == [C.forward_op.name] and torch.equal(xg.grad, xo.grad)


def test_launch_fake_check_matches_torch_is_fake():
    """The launcher's cheap fakeness check (pyencoder.ops._triton_op._maybe_fake: plain tensors
    short-circuit, everything else goes to torch's is_fake) agrees with torch's is_fake on real,
    fake, parameter, functional and functorch-wrapped tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake
    from torch._subclasses.functional_tensor import FunctionalTensorMode, FunctionalTensor

    from pyencoder.ops._triton_op import _any_fake, _maybe_fake
    real = torch.randn(3, 4)
    seen = []
    cases = [real, torch.nn.Parameter(torch.randn(2)), real[:, 1:], torch.randn(0)]
    with FakeTensorMode() as mode:
        fake = torch.randn(3, 4)
        cases += [fake, torch.nn.Parameter(torch.randn(2)), mode.from_tensor(real)]
        with FunctionalTensorMode():
            cases.append(FunctionalTensor.to_functional(fake))
    cases.append(torch._to_functional_tensor(real))

    def probe(x):
        seen.append((is_fake(x), _maybe_fake(x)))
        return x.sin()
    torch.func.vmap(probe)(real)
    torch.func.grad(lambda x: probe(x).sum())(real)
    for t in cases:
        seen.append((is_fake(t), _maybe_fake(t)))
    assert [a for a, _ in seen] == [b for _, b in seen]
    assert sum(a for a, _ in seen) >= 4     # the fake cases are there
    assert not _any_fake((real, 1, None), {"X": real})
    assert _any_fake((real, 1), {"X": cases[4]}) and _any_fake((cases[4],), {})
    # the placeholder pointers: one cached tensor per (device, dtype) for plain tensors, a fresh
    # one of the same kind for the others (a cached real tensor must not enter a trace)
    from pyencoder.ops._triton_op import dummy, is_plain
    d = dummy(real, torch.float32)
    assert d is dummy(real[:, 1:], torch.float32) and d.dtype == torch.float32 and is_plain(d)
    assert dummy(real, torch.int32) is not d and dummy(real, torch.int32).dtype == torch.int32
    with FakeTensorMode():
        f = dummy(cases[4], torch.float32)
    assert is_fake(f) and f is not d
