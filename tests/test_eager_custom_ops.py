"""The eager fast path around the registered ops (pyencoder.ops._call, issue 12): the custom-op
backends (reference; cuda through a stand-in) run the op's body directly when no autograd graph is
needed, and through ``_EagerOp`` (the op's own setup_context and backward) when one is; the
families' backward ops go direct inside a backward without create_graph.

Every case compares the fast path with PYENCODER_EAGER_FASTPATH=0 (every call through the
registered op) on the same fresh random inputs: outputs, gradients and the update step's state
must be bit-identical (``torch.equal``), since both run the same body with the same arguments
(PYENCODER_CPU_THREADS=1 pins the reference's thread count, so no reduction order can differ).
Spies count the registered custom ops' calls (``CustomOpDef.__call__``) and the fast path's body
calls (``_call._run_body``); the triton backend (tiny fp32 shapes under TRITON_INTERPRET=1) counts
its triton_ops through pyencoder.ops._triton_op._REGISTERED, as tests/test_triton_ops.py does.
The cuda backend cannot run here: its routing is checked with a stand-in conv backend registered
as "cuda" (the reference's functions behind recording wrappers)."""
import os
import types

import pytest
import torch
from torch._library.custom_ops import CustomOpDef

from conftest import has_triton

import pyencoder
from pyencoder import _backend
from pyencoder.mask import IntervalMask
from pyencoder.ops import (_call, banded_attention, causal_conv1d, causal_conv1d_update,
                           convnext_dwconv_ln, cross_attention)
from pyencoder.ops import conv as conv_mod
from pyencoder.reference import conv as ref_conv

_TRITON = has_triton() and os.environ.get("TRITON_INTERPRET") == "1" \
    and not torch.cuda.is_available()
BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not _TRITON, reason="needs triton under TRITON_INTERPRET=1 (CPU tensors)"))]


@pytest.fixture(autouse=True)
def _pinned(monkeypatch):
    monkeypatch.setenv("PYENCODER_CPU_THREADS", "1")
    monkeypatch.delenv("PYENCODER_EAGER_FASTPATH", raising=False)
    monkeypatch.delenv("PYENCODER_BACKEND", raising=False)


@pytest.fixture
def spy(monkeypatch):
    """{"op": names of registered custom ops called, "fast": names of custom op bodies run by the
    fast path, "triton": names of triton_ops called}."""
    calls = {"op": [], "fast": [], "triton": []}
    orig_call = CustomOpDef.__call__

    def op_call(self, *a, **k):
        calls["op"].append(self._name)
        return orig_call(self, *a, **k)
    monkeypatch.setattr(CustomOpDef, "__call__", op_call)
    orig_body = _call._run_body

    def body(op, args):
        calls["fast"].append(op._name)
        return orig_body(op, args)
    monkeypatch.setattr(_call, "_run_body", body)
    if _TRITON:
        from pyencoder.ops import (_attention_triton as A, _conv_triton as C,
                                   _convnext_triton as X, _triton_op)
        for lazy in (A.forward_op, A.backward_op, C.forward_op, C.backward_op, C.update_op,
                     X.forward_op):
            orig = lazy.op

            def tspy(*a, _orig=orig, _name=lazy.name):
                calls["triton"].append(_name)
                return _orig(*a)
            monkeypatch.setitem(_triton_op._REGISTERED, lazy.name, tspy)

    return _Calls(calls)


class _Calls(dict):
    def clear(self):
        for v in self.values():
            v.clear()


def _r(*shape, grad=False, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _fresh(tensors, grad):
    """Detached copies (same values), requiring grad where ``grad`` and floating."""
    return [t if not isinstance(t, torch.Tensor) else
            t.detach().clone().requires_grad_(grad and t.dtype.is_floating_point)
            for t in tensors]


# ---- the cases: (name, make inputs, call) per family; every tensor input is a float leaf ------

def _conv_dw(backend):
    def make():
        return [_r(2, 6, 11), _r(6, 1, 4), _r(6), _r(2, 6, 3)]

    def call(x, w, b, s0):
        return causal_conv1d(x, w, b, groups=6, activation="silu", initial_state=s0,
                             return_final_state=True, backend=backend)
    return make, call


def _conv_grouped(backend):
    def make():
        return [_r(2, 8, 13), _r(8, 4, 5), _r(8)]

    def call(x, w, b):
        return causal_conv1d(x, w, b, groups=2, activation="gelu", backend=backend)
    return make, call


def _conv_strided(backend):
    def make():
        return [_r(1, 3, 17), _r(5, 3, 4), _r(1, 3, 2)]

    def call(x, w, s0):
        return causal_conv1d(x, w, stride=2, initial_state=s0, return_final_state=True,
                             backend=backend)
    return make, call


def _convnext(backend):
    def make():
        return [_r(2, 6, 9), _r(6, 1, 5), _r(6), _r(6), _r(6), _r(2, 6, 4)]

    def call(x, cw, cb, lw, lb, s0):
        return convnext_dwconv_ln(x, cw, cb, lw, lb, eps=1e-5, initial_state=s0,
                                  return_final_state=True, backend=backend)
    return make, call


def _attn_band(backend):
    kl = torch.tensor([12, 7], dtype=torch.int32)

    def make():
        return [_r(2, 4, 10, 16), _r(2, 2, 12, 16), _r(2, 2, 12, 16)]

    def call(q, k, v):
        return banded_attention(q, k, v, left=3, right=2, rope=pyencoder.Rope(8),
                                key_lengths=kl, q_offset=2, backend=backend)
    return make, call


def _attn_bias_sink(backend):
    def make():
        return [_r(1, 2, 9, 8), _r(1, 2, 9, 8), _r(1, 2, 9, 8), _r(2, 9), _r(1, 2, 9)]

    def call(q, k, v, rel, gate):
        return banded_attention(q, k, v, left=2, right=1, sink=2, rel_bias=rel, gate=gate,
                                rel_offset=-4, backend=backend)
    return make, call


def _attn_frames(backend):
    def make():
        return [_r(1, 2, 6, 8), _r(1, 2, 10, 8), _r(1, 2, 10, 8)]

    def call(q, k, v):
        return cross_attention(q, k, v, mask=IntervalMask.frames(2, 3, 1, 0), backend=backend)
    return make, call


CASES = {"conv_dw": _conv_dw, "conv_grouped": _conv_grouped, "conv_strided": _conv_strided,
         "convnext": _convnext, "attn_band": _attn_band, "attn_bias_sink": _attn_bias_sink,
         "attn_frames": _attn_frames}
# the registered ops each case reaches on the reference backend: forward, backward
OPS = {"conv": ("causal_conv1d", "causal_conv1d_backward"),
       "convnext": ("convnext_dwconv_ln", "convnext_dwconv_ln_backward"),
       "attn": ("interval_attention", "interval_attention_backward")}


def _family(name):
    return "convnext" if name == "convnext" else name.split("_")[0]


def _tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _run(call, inputs, grad, seeds):
    """Outputs, and with ``grad`` the gradients of sum(out_i * seed_i) w.r.t. every input."""
    ins = _fresh(inputs, grad)
    if not grad:
        with torch.no_grad():
            return _tuple(call(*ins)), None
    outs = _tuple(call(*ins))
    loss = sum((o * s).sum() for o, s in zip(outs, seeds))
    grads = torch.autograd.grad(loss, [t for t in ins if t.requires_grad])
    return tuple(o.detach() for o in outs), grads


def _equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y), (x - y).abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("case", list(CASES))
def test_fast_path_matches_registered_op(case, grad, backend, spy, monkeypatch):
    """Bit-identical outputs (and gradients of a random linear loss over every output, with
    ``grad``) with and without the fast path; on the reference backend the fast path calls no
    registered op (attention's backward formula calls its backward op through call_custom too)
    and the registered path calls each once."""
    if backend == "triton" and case == "conv_strided":
        pytest.skip("the triton conv of a dense strided case is the slow interpreted GEMM; "
                    "grouped and depthwise cover its routing")
    make, call = CASES[case](backend)
    inputs = make()
    with torch.no_grad():
        seeds = [torch.randn_like(o) for o in _tuple(call(*_fresh(inputs, False)))]
    spy.clear()
    fast = _run(call, inputs, grad, seeds)
    fast_calls = {k: list(v) for k, v in spy.items()}
    spy.clear()
    monkeypatch.setenv("PYENCODER_EAGER_FASTPATH", "0")
    slow = _run(call, inputs, grad, seeds)
    _equal(fast[0], slow[0])
    if grad:
        _equal(fast[1], slow[1])
    if backend == "triton" and not case.startswith("attn"):
        # the triton convs / ConvNeXt op: no registered triton_op on the fast path, with a graph
        # too (pyencoder.ops._call._EagerOp; the backward op direct), each op once without
        assert fast_calls["triton"] == [], fast_calls
        assert spy["triton"] and len(spy["triton"]) == len(set(spy["triton"])), dict(spy.items())
    if backend != "reference":
        return
    fwd, bwd = OPS[_family(case)]
    if grad:
        assert fast_calls["op"] == []
        assert fast_calls["fast"] == [fwd, bwd]
        assert spy["op"] == [fwd, bwd]
    else:
        assert fast_calls["op"] == [] and fast_calls["fast"] == [fwd]
        assert spy["op"] == [fwd]
    assert spy["fast"] == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pool", [False, True], ids=["state", "state_indices"])
def test_update_step_matches_and_bumps_the_version(pool, backend, spy, monkeypatch):
    """The streaming step (mutates ``state``): same outputs, same new state and the same version
    counter bump with and without the fast path; no registered op on the fast path (reference)."""
    B, C, k = 3, 6, 5
    x, w, b = _r(B, C, 2), _r(C, 1, k), _r(C)
    state0 = _r(4 if pool else B, C, k - 1)
    idx = torch.tensor([2, -1, 0]) if pool else None
    res = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("PYENCODER_EAGER_FASTPATH", flag)
        spy.clear()
        state = state0.clone()
        v0 = state._version
        y = causal_conv1d_update(x, state, w, b, groups=C, activation="silu", state_indices=idx,
                                 backend=backend)
        res[flag] = (y, state, state._version - v0, list(spy["op"]), list(spy["fast"]))
    (y1, s1, d1, op1, fast1), (y0, s0, d0, op0, fast0) = res["1"], res["0"]
    assert torch.equal(y1, y0) and torch.equal(s1, s0) and not torch.equal(s1, state0)
    assert d1 == d0 and d1 > 0
    if backend == "reference":
        assert op1 == [] and fast1 == ["causal_conv1d_update"]
        assert op0 == ["causal_conv1d_update"] and fast0 == []


def test_update_step_inference_tensors(spy, monkeypatch):
    """Inference tensors have no version counter: inside inference_mode the step runs on the fast
    path and updates the state; outside it, writing an inference state raises torch's error on
    both paths."""
    x, w = _r(1, 4, 1), _r(4, 1, 3)
    with torch.inference_mode():
        state = _r(1, 4, 2)
        before = state.clone()
        causal_conv1d_update(x, state, w, groups=4, backend="reference")
    assert not torch.equal(state, before) and spy["fast"] == ["causal_conv1d_update"]
    msgs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("PYENCODER_EAGER_FASTPATH", flag)
        with pytest.raises(RuntimeError, match="inference tensor") as e:
            causal_conv1d_update(x, state, w, groups=4, backend="reference")
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1]


def test_parameters_take_the_fast_path_and_needs_input_grad_is_the_ops(spy, monkeypatch):
    """nn.Parameter inputs (a module's weights) take the fast path; the registered backward sees
    the same ``ctx.needs_input_grad`` (the op's inputs, backend string included) on both paths,
    and only the inputs that require grad get gradients."""
    seen = []
    op = conv_mod._causal_conv1d_op
    orig = op._backward_fn

    def backward(ctx, *grads):
        seen.append(tuple(ctx.needs_input_grad))
        return orig(ctx, *grads)
    monkeypatch.setattr(op, "_backward_fn", backward)
    w = torch.nn.Parameter(_r(4, 1, 3))
    x = _r(2, 4, 6)
    grads = []
    for flag in ("1", "0"):
        monkeypatch.setenv("PYENCODER_EAGER_FASTPATH", flag)
        spy.clear()
        w.grad = None
        causal_conv1d(x, w, groups=4, backend="reference").square().sum().backward()
        grads.append(w.grad.clone())
        if flag == "1":
            assert spy["op"] == [] and spy["fast"] == ["causal_conv1d", "causal_conv1d_backward"]
    assert len(seen) == 2 and seen[0] == seen[1]
    assert seen[0] == (False, True) + (False,) * 6
    assert torch.equal(grads[0], grads[1]) and x.grad is None


@pytest.mark.parametrize("case", ["conv_dw", "convnext", "attn_band"])
def test_unused_outputs_get_zero_grads_as_in_the_op(case, monkeypatch):
    """A loss over one output only (the conv's final state, attention's lse through return_lse is
    not public: its output alone): the other output's gradient is materialised as the registered
    op's generated Function does, so gradients match bit for bit."""
    make, call = CASES[case]("reference")
    inputs = make()
    res = []
    for flag in ("1", "0"):
        monkeypatch.setenv("PYENCODER_EAGER_FASTPATH", flag)
        ins = _fresh(inputs, True)
        out = _tuple(call(*ins))[-1]
        res.append(torch.autograd.grad(out.sin().sum(), ins, allow_unused=True))
    for a, b in zip(*res):
        assert (a is None) == (b is None)
        assert a is None or torch.equal(a, b)


@pytest.mark.parametrize("case", ["conv_dw", "convnext", "attn_band"])
def test_double_backward_refused_on_both_paths(case, monkeypatch):
    """create_graph=True keeps the backward op registered (its inputs require grad), whose
    formula refuses a second backward by name: the same error on both paths."""
    make, call = CASES[case]("reference")
    inputs = make()
    msgs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("PYENCODER_EAGER_FASTPATH", flag)
        ins = _fresh(inputs, True)
        out = _tuple(call(*ins))[0]
        g = torch.autograd.grad(out.square().sum(), ins[0], create_graph=True)[0]
        with pytest.raises(NotImplementedError, match="does not support double backward") as e:
            g.sum().backward()
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1]


# ---- the registered op under traces and transforms -------------------------------------------

def _conv_call(x, w):
    return causal_conv1d(x, w, groups=4, activation="silu", backend="reference")


def test_torch_compile_traces_the_registered_op(spy):
    """Dynamo sees pyencoder::causal_conv1d (fullgraph; a capturing backend), the fast path never
    runs, and AOTAutograd's forward and backward (aot_eager) give the eager gradients."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward
    x, w = _r(2, 4, 9, grad=True), _r(4, 1, 3, grad=True)
    torch._dynamo.reset()
    y = torch.compile(_conv_call, backend=capture, fullgraph=True)(x, w)
    assert any("pyencoder.causal_conv1d" in g for g in graphs)
    torch._dynamo.reset()
    yc = torch.compile(_conv_call, backend="aot_eager", fullgraph=True)(x, w)
    gc = torch.autograd.grad(yc.sum(), (x, w))
    assert spy["fast"] == []
    ye = _conv_call(x, w)
    ge = torch.autograd.grad(ye.sum(), (x, w))
    torch._dynamo.reset()
    assert torch.equal(y, ye) and torch.equal(yc, ye)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-6) for a, b in zip(gc, ge))


def test_make_fx_and_fake_tensors_see_the_registered_op(spy):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    x, w = _r(2, 4, 9), _r(4, 1, 3)
    gm = make_fx(_conv_call)(x, w)
    assert "pyencoder.causal_conv1d" in str(gm.graph)
    state = _r(2, 4, 2)
    gm = make_fx(lambda x, s, w: causal_conv1d_update(x, s, w, groups=4, backend="reference"))(
        x[..., :1], state, w)
    assert "pyencoder.causal_conv1d_update" in str(gm.graph)
    with FakeTensorMode():
        xf, wf = _r(2, 4, 9), _r(4, 1, 3)
        y = _conv_call(xf, wf)
        assert y.shape == (2, 4, 9)
        banded_attention(_r(1, 2, 5, 8), _r(1, 2, 5, 8), _r(1, 2, 5, 8), left=2, right=0,
                         backend="reference")
    assert spy["fast"] == []
    assert spy["op"].count("causal_conv1d") >= 2 and "interval_attention" in spy["op"]


def test_fake_tensor_arguments_outside_a_mode_take_the_op():
    from torch._subclasses.fake_tensor import FakeTensorMode
    mode = FakeTensorMode()
    fake = mode.from_tensor(torch.randn(2, 3))
    real = torch.randn(2, 3)
    with mode:
        fake_param = torch.nn.Parameter(torch.randn(2))
    assert _call.route((real, 1, "reference")) == _call.DIRECT
    assert _call.route((real, fake, "reference")) == _call.OP
    assert _call.route((real, fake_param)) == _call.OP


def test_torch_func_transforms_see_the_registered_op(spy, monkeypatch):
    """vmap runs the registered op (its batching fallback) and gives the per-sample results;
    torch.func.grad reaches the op too (which refuses it: torch.library's generated Function has
    no setup_context), with the same error on both settings of the flag."""
    xs, w = _r(3, 2, 4, 9), _r(4, 1, 3)
    y = torch.func.vmap(lambda x: _conv_call(x, w))(xs)
    assert spy["op"] == ["causal_conv1d"] and spy["fast"] == []
    with torch.no_grad():
        loop = torch.stack([_conv_call(x, w) for x in xs])
    assert torch.equal(y, loop)
    msgs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("PYENCODER_EAGER_FASTPATH", flag)
        spy.clear()
        try:
            torch.func.grad(lambda x: _conv_call(x, w).sum())(xs[0])
            msgs.append(None)
        except RuntimeError as e:
            msgs.append(str(e))
        assert spy["op"] == ["causal_conv1d"] and spy["fast"] == []
    assert msgs[0] == msgs[1]


def test_forward_ad_and_subclasses_take_the_op(spy):
    """Inside a forward-AD dual level, and with a tensor subclass argument, the registered op runs
    (the body's aten ops would otherwise propagate tangents / dispatch to the subclass where the
    op does not); an input that carries a tangent is refused by name (the op has no forward
    formula: torch gave its output no tangent, silently)."""
    import torch.autograd.forward_ad as fwAD
    x, w = _r(2, 4, 9), _r(4, 1, 3)
    with fwAD.dual_level():
        assert _call.route((x, w, "reference")) == _call.OP
        with pytest.raises(NotImplementedError, match="causal_conv1d has no forward-mode AD"):
            _conv_call(fwAD.make_dual(x, torch.randn_like(x)), w)
        y = _conv_call(x, w)
        assert fwAD.unpack_dual(y).tangent is None
    assert spy["op"] == ["causal_conv1d"] and spy["fast"] == []

    class Sub(torch.Tensor):
        pass
    assert _call.route((x.as_subclass(Sub), w)) == _call.OP
    assert _call.route((x, torch.nn.Parameter(w))) == _call.AUTOGRAD
    assert _call.route((x, torch.nn.Parameter(w, requires_grad=False))) == _call.DIRECT
    with torch.no_grad():
        assert _call.route((x, torch.nn.Parameter(w))) == _call.DIRECT


# ---- errors ----------------------------------------------------------------------------------

_BAD = [
    lambda: causal_conv1d(_r(2, 4, 5), _r(4, 1, 3), groups=3, backend="reference"),
    lambda: causal_conv1d(_r(2, 4, 5), _r(4, 1, 3), groups=4, initial_state=_r(2, 4, 3),
                          backend="reference"),
    lambda: causal_conv1d(_r(2, 4, 5), _r(4, 1, 3), groups=4, activation="relu",
                          backend="reference"),
    lambda: causal_conv1d_update(_r(2, 4, 1), _r(2, 4, 3), _r(4, 1, 3), groups=4,
                                 backend="reference"),
    lambda: causal_conv1d_update(_r(2, 4, 1), _r(1, 4, 2).expand(2, 4, 2), _r(4, 1, 3),
                                 groups=4, backend="reference"),
    lambda: convnext_dwconv_ln(_r(2, 4, 5), _r(4, 2, 3), backend="reference"),
    lambda: banded_attention(_r(1, 2, 5, 8), _r(1, 2, 5, 4), _r(1, 2, 5, 8), left=1, right=0,
                             backend="reference"),
]


@pytest.mark.parametrize("i", range(len(_BAD)))
def test_bad_inputs_raise_the_same_error(i, monkeypatch):
    errs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("PYENCODER_EAGER_FASTPATH", flag)
        with pytest.raises(Exception) as e:
            _BAD[i]()
        errs.append((type(e.value), str(e.value)))
    assert errs[0] == errs[1]


def _stand_in(**entries):
    """A conv backend module: the reference's functions, some replaced."""
    mod = types.SimpleNamespace(**{n: getattr(ref_conv, n) for n in (
        "forward", "backward", "update", "supports_forward", "supports_backward",
        "supports_update")})
    for k, v in entries.items():
        setattr(mod, k, v)
    return mod


def test_aliasing_output_raises_the_ops_error(monkeypatch):
    """A backend whose forward returns its input as an output: the op refuses it (a custom op may
    not return an input or a view of one) and so does the fast path, with the same message, with
    and without grad."""
    def fwd(x, weight, bias, initial_state, stride, groups, activation):
        return x, initial_state[..., :1]
    monkeypatch.setitem(_backend._IMPLS, ("conv", "reference"), _stand_in(forward=fwd))
    x, w, s0 = _r(1, 2, 3), _r(2, 1, 2), _r(1, 2, 1)
    for grad in (False, True):
        msgs = []
        for flag in ("1", "0"):
            monkeypatch.setenv("PYENCODER_EAGER_FASTPATH", flag)
            with pytest.raises(RuntimeError, match="may not alias any inputs") as e:
                causal_conv1d(x.clone().requires_grad_(grad), w, groups=2, initial_state=s0,
                              backend="reference")
            msgs.append(str(e.value))
        assert msgs[0] == msgs[1]


# ---- the cuda backend's routing (a stand-in: no GPU here) ------------------------------------

def test_cuda_backend_routing_with_a_stand_in(spy, monkeypatch):
    """The cuda conv backend is a custom-op backend like the reference: with a stand-in module
    registered as ("conv", "cuda") and the selection pinned to it, the fast path calls the stand-in's
    forward / backward / update with exactly the arguments the registered op's body passes
    (recorded on both paths), never the registered op, and gives the op's results."""
    log = []

    def rec(name):
        fn = getattr(ref_conv, name)

        def entry(*args):
            log.append((name, args))
            return fn(*args)
        return entry
    monkeypatch.setitem(_backend._IMPLS, ("conv", "cuda"),
                        _stand_in(forward=rec("forward"), backward=rec("backward"),
                                  update=rec("update")))
    orig_select = _backend.select
    monkeypatch.setattr(_backend, "select", lambda family, *a, **k: "cuda" if family == "conv"
                        else orig_select(family, *a, **k))
    x, w, b, s0 = _r(2, 4, 7), _r(4, 1, 3), _r(4), _r(2, 4, 2)
    res = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("PYENCODER_EAGER_FASTPATH", flag)
        spy.clear()
        log.clear()
        with torch.no_grad():
            y = causal_conv1d(x, w, b, groups=4, activation="gelu", initial_state=s0)
        state = s0.clone()
        u = causal_conv1d_update(x[..., :2], state, w, b, groups=4)
        xg = x.clone().requires_grad_(True)
        yg, fin = causal_conv1d(xg, w, b, groups=4, initial_state=s0, return_final_state=True)
        gx, = torch.autograd.grad((yg.sum() + fin.sum()), xg)
        res[flag] = (y, u, state, yg.detach(), fin.detach(), gx, list(log), list(spy["op"]))
    fast, slow = res["1"], res["0"]
    _equal(fast[:6], slow[:6])
    assert [n for n, _ in fast[6]] == ["forward", "update", "forward", "backward"]
    for (n1, a1), (n0, a0) in zip(fast[6], slow[6]):
        assert n1 == n0 and len(a1) == len(a0)
        for p, q in zip(a1, a0):
            assert (torch.equal(p, q) if isinstance(p, torch.Tensor) else p == q)
    assert fast[7] == [] and slow[7] == ["causal_conv1d", "causal_conv1d_update",
                                         "causal_conv1d", "causal_conv1d_backward"]


def test_streaming_module_step_uses_the_fast_path(spy):
    """A streaming module's step (pyencoder.nn.CausalConv1d under no_grad) calls no registered
    op."""
    m = pyencoder.nn.CausalConv1d(4, 4, 3, groups=4)
    st = m.init_state(2)
    with torch.no_grad():
        m.step(_r(2, 4, 5), st)
    assert spy["op"] == [] and spy["fast"]
