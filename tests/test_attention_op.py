"""The one interval attention op pair (pyencoder.ops._attention_op): every variant (band, chunked
with RoPE and GQA, sink keys, gated and plain relative bias, frame-rate masks with Nq != Nk) goes
through ``pyencoder::interval_attention`` (reference op, trailing backend string) or
``pyencoder::interval_attention_triton`` (triton_op), with one schema and one autograd formula.

- ``torch.library.opcheck`` (schema, fake kernel, autograd registration, AOTDispatch static and
  dynamic) of the forward and backward ops for every variant: the reference op on the reference
  backend, the triton_op under TRITON_INTERPRET=1 (or on a GPU). opcheck compares each op with
  itself (eager vs traced) at torch's default tolerances.
- ``torch.compile(fullgraph=True)`` of the public functions over the reference path for the
  biased and frame masks (the same custom op calls eager and compiled: float64 agrees to 1e-12),
  and on the triton backend, where the graph holds the triton_op (the interpreter keeps it whole;
  the GPU test in test_triton_ops checks the decomposition into the kernels).
Correctness against the dense float64 oracles stays with each variant's tests
(test_reference_attention, test_attention_sink, test_attention_relbias*, test_frame_attention).
"""
import os

import pytest
import torch

import pyencoder
from pyencoder import IntervalMask, Rope
from pyencoder.ops import cross_attention, interval_attention

from conftest import attention_op_args, compiled_matches_eager, has_triton

_DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_available():
    return has_triton() and (torch.cuda.is_available()
                             or os.environ.get("TRITON_INTERPRET") == "1")


def _r(*shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape, device=_DEV, dtype=dtype).requires_grad_(grad)


def _variant(name, dtype=torch.float32):
    """(op arguments without the backend, dense visibility of the mask) of one variant."""
    B, Hq, Hk, D = 2, 2, 1, 16
    kl = torch.tensor([12, 7], dtype=torch.int32, device=_DEV)
    inv = Rope(8).inv_freq().to(_DEV)
    q, k, v = _r(B, Hq, 10, D, dtype=dtype), _r(B, Hk, 12, D, dtype=dtype), \
        _r(B, Hk, 12, D, dtype=dtype)
    if name == "band":
        return attention_op_args(q, k, v, inv, kl, block=1, lo_off=3, hi_off=2, q_offset=1)
    if name == "chunked":
        return attention_op_args(q, k, v, inv, None, block=4, lo_off=4, hi_off=5,
                                 interleaved=True, k_offset=2, q_offset=2)
    if name == "sink":
        return attention_op_args(q, k, v, inv, kl, block=1, lo_off=2, hi_off=1, sink=3)
    if name in ("biased_gated", "biased"):
        gate = _r(B, Hq, 10, dtype=dtype) if name == "biased_gated" else None
        return attention_op_args(q, k, v, inv, kl, rel_bias=_r(Hq, 9, dtype=dtype), gate=gate,
                                 rel_offset=-5, block=2, lo_off=2, hi_off=3)
    if name == "frame":     # 10 queries in frames of 2 against 15 keys in frames of 3
        k, v = _r(B, Hk, 15, D, dtype=dtype), _r(B, Hk, 15, D, dtype=dtype)
        return attention_op_args(q, k, v, inv, torch.tensor([15, 11], dtype=torch.int32,
                                                            device=_DEV),
                                 block=2, k_block=3, lo_off=3, hi_off=5, q_offset=1, k_offset=0)
    raise ValueError(name)


_VARIANTS = ["band", "chunked", "sink", "biased_gated", "biased", "frame"]


def _backward_args(args, backend):
    """The backward op's arguments for the forward op's ``args``: dout, the detached inputs
    with out and lse after v, then (backend,) deterministic."""
    det = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    if backend is None:
        from pyencoder.ops import _attention_triton as A, _triton_ops  # noqa: F401
        out, lse = A.forward_op(*det)
        tail = (True,)
    else:
        out, lse = torch.ops.pyencoder.interval_attention.default(*det, backend)
        tail = (backend, True)
    return (torch.randn_like(out), *det[:3], out, lse, *det[3:], *tail)


def _check(op, args):
    res = torch.library.opcheck(op, args)
    assert set(res) >= {"test_schema", "test_faketensor", "test_autograd_registration",
                        "test_aot_dispatch_dynamic"}
    assert all(v == "SUCCESS" for v in res.values()), res


@pytest.mark.parametrize("variant", _VARIANTS)
def test_opcheck_reference_op(variant):
    args = _variant(variant, torch.float64)
    _check(torch.ops.pyencoder.interval_attention.default, (*args, "reference"))
    _check(torch.ops.pyencoder.interval_attention_backward.default,
           _backward_args(args, "reference"))


def _triton_skip(args):
    if not _triton_available():
        pytest.skip("needs triton (a GPU, or TRITON_INTERPRET=1)")
    from pyencoder.ops import _attention_triton as A
    q, k, v, inv = args[:4]
    reason = A.supports_forward(q=q, k=k, v=v, inv_freq=inv, sink=args[11])
    if reason is not None:
        pytest.skip(f"the triton backend refuses this variant: {reason}")


@pytest.mark.parametrize("variant", _VARIANTS)
def test_opcheck_triton_op(variant):
    args = _variant(variant)
    _triton_skip(args)
    from pyencoder.ops import _attention_triton as A, _triton_ops  # noqa: F401
    _check(A.forward_op.op, args)
    _check(A.backward_op.op, _backward_args(args, None))


def test_the_ops_have_one_schema():
    """The reference op and the triton_op take the same arguments (the reference op adds its
    backend string); the backward ops add dout, out, lse and deterministic."""
    from pyencoder.ops import _attention_op as S
    fwd = torch.ops.pyencoder.interval_attention.default._schema
    bwd = torch.ops.pyencoder.interval_attention_backward.default._schema
    names = [a.name for a in fwd.arguments]
    assert names[:S.N_TENSORS] == ["q", "k", "v", "inv_freq", "key_lengths", "rel_bias", "gate"]
    assert len(names) == S.N_TENSORS + S.N_PARAMS + 1 and names[-1] == "backend"
    assert [a.name for a in bwd.arguments] == (["dout", "q", "k", "v", "out", "lse"] + names[3:]
                                               + ["deterministic"])
    assert len(bwd.returns) == 5
    for gone in ("interval_attention_biased", "frame_attention"):
        assert not hasattr(torch.ops.pyencoder, gone), gone
    if has_triton():
        from pyencoder.ops import _attention_triton as A, _triton_ops  # noqa: F401
        tri = A.forward_op.op._opoverload._schema
        assert [a.name for a in tri.arguments] == names[:-1]
        tri_b = A.backward_op.op._opoverload._schema
        assert [a.name for a in tri_b.arguments] == [a.name for a in bwd.arguments
                                                     if a.name != "backend"]


# ---- torch.compile over the public functions ----------------------------------------------------

def _biased_fn(backend):
    def f(q, k, v, rel, gate):
        return interval_attention(q, k, v, mask=IntervalMask.chunked(3, 1, 1), rope=Rope(8),
                                  rel_bias=rel, gate=gate, rel_offset=-6,
                                  backend=backend).square().sum()
    return f


def _frame_fn(backend):
    def f(q, k, v):
        return cross_attention(q, k, v, mask=IntervalMask.frames(2, 3, 1, 1, 1), rope=Rope(8),
                               q_offset=1, backend=backend).square().sum()
    return f


def _biased_inputs(dtype):
    return (_r(1, 2, 9, 16, dtype=dtype), _r(1, 1, 9, 16, dtype=dtype),
            _r(1, 1, 9, 16, dtype=dtype), _r(2, 12, dtype=dtype), _r(1, 2, 9, dtype=dtype))


def _frame_inputs(dtype):
    return (_r(1, 2, 9, 16, dtype=dtype), _r(1, 1, 14, 16, dtype=dtype),
            _r(1, 1, 14, 16, dtype=dtype))


@pytest.mark.parametrize("case", ["biased", "frame"])
def test_compile_fullgraph_reference(case):
    """Before the one op these masks ran their own custom ops (no graph break either: compile
    treated each as one opaque node); now the graph holds the one reference op."""
    f, inputs = (_biased_fn, _biased_inputs) if case == "biased" else (_frame_fn, _frame_inputs)
    g = compiled_matches_eager(f("reference"), inputs(torch.float64), 1e-12)
    assert "pyencoder.interval_attention.default" in g
    assert "pyencoder.interval_attention_backward.default" in g


@pytest.mark.parametrize("case", ["biased", "frame"])
def test_compile_fullgraph_triton(case):
    """The biased and frame masks now reach the triton_op (the compile path of the interval op):
    under the interpreter the op stays whole in the graph (pyencoder.ops._triton_op)."""
    if not _triton_available():
        pytest.skip("needs triton (a GPU, or TRITON_INTERPRET=1)")
    f, inputs = (_biased_fn, _biased_inputs) if case == "biased" else (_frame_fn, _frame_inputs)
    # fp32, same kernels eager and compiled; drel_bias sums float32 atomics (order may vary on a
    # GPU): 1e-5.
    g = compiled_matches_eager(f("triton"), inputs(torch.float32), 1e-5)
    if not torch.cuda.is_available():
        assert "interval_attention_triton" in g


def test_vmap_over_key_lengths_and_rel_bias():
    """vmap with a batched key_lengths or rel_bias: the value checks read a storage-less
    functorch wrapper (torch's "Cannot access data pointer"); they read the plain tensor the
    wrapper holds now, so the call equals the loop and a bad mapped entry is still named."""
    torch.manual_seed(5)
    q, k, v = (torch.randn(3, 2, 2, 11, 8, dtype=torch.float64) for _ in range(3))
    kl = torch.tensor([[11, 4], [0, 7], [9, 11]])
    rb = torch.randn(3, 2, 20, dtype=torch.float64)
    mask = IntervalMask.band(3, 1)

    def f(q, k, v, kl, rb):
        return interval_attention(q, k, v, mask=mask, key_lengths=kl, rel_bias=rb,
                                  rel_offset=-10)
    y = torch.vmap(f)(q, k, v, kl, rb)
    loop = torch.stack([f(q[i], k[i], v[i], kl[i], rb[i]) for i in range(3)])
    torch.testing.assert_close(y, loop, rtol=0, atol=0)
    bad = kl.clone()
    bad[2, 1] = 12
    with pytest.raises(ValueError, match=r"key_lengths values must lie in \[0, 11\]; got min 0, "
                                         r"max 12"):
        torch.vmap(f)(q, k, v, bad, rb)
    nan = rb.clone()
    nan[1, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="rel_bias must be finite"):
        torch.vmap(f)(q, k, v, kl, nan)


def test_nested_vmap_over_key_lengths():
    """Wrappers nest (vmap of vmap): the value check unwraps them all."""
    torch.manual_seed(7)
    q = torch.randn(2, 3, 1, 2, 6, 4, dtype=torch.float64)
    kl = torch.randint(0, 7, (2, 3, 1))
    f = lambda q, kl: interval_attention(q, q, q, mask=IntervalMask.band(2, 1),  # noqa: E731
                                         key_lengths=kl)
    y = torch.vmap(torch.vmap(f))(q, kl)
    loop = torch.stack([torch.stack([f(q[i, j], kl[i, j]) for j in range(3)]) for i in range(2)])
    torch.testing.assert_close(y, loop, rtol=0, atol=0)
    bad = kl.clone()
    bad[1, 2, 0] = 7
    with pytest.raises(ValueError, match=r"key_lengths values must lie in \[0, 6\]"):
        torch.vmap(torch.vmap(f))(q, bad)
