"""The cuda backend's dense strided path (groups == 1, stride > 1: cuDNN in the input dtype,
pyencoder/ops/_conv_cuda.py ``_cudnn_forward`` / ``_cudnn_backward``). The bodies are plain torch,
so on CPU they are called directly with CPU tensors, against pyencoder.reference.conv and against
the float64 loop oracle (tests/oracle.py), forward and backward (x, weight, bias, initial_state and
the final-state gradient). The GPU tests at the end compare the cuda backend with the reference
on the device (``pytest -m gpu``).

Tolerances. float32: both sides accumulate in float32 (CPU), products exact, sums of at most
C_in*k (forward, dx) or B*T (dweight, dbias) terms: 1e-5 relative to the tensor's max vs float64,
1e-5 vs the reference. On the GPU float32 runs cuDNN under torch.backends.cudnn.allow_tf32 (default
True) on both sides, so the GPU test uses tests/test_conv_gpu.py's TOL (1e-4). float16/bfloat16:
the reference computes in float32 and rounds once; this path convolves in the input dtype
(cuDNN: float32 accumulation expected, which the GPU tests check; CPU: torch's CPU conv) and,
with a fused activation, rounds the gradient to the dtype once before the conv gradients. The
bound is the flash-attention rule: error vs the float64 oracle <= 2 x the reference's own error
+ 4 ulp of the dtype (fp16 2**-10, bf16 2**-7) scaled to the tensor's max (the extra roundings:
the output, the gradient before the conv gradients, summation order)."""
import random

import pytest
import torch

from pyencoder.ops import _conv_cuda as CU
from pyencoder.reference import conv as R

from oracle import naive_causal_conv

# (k, stride) of the cases the "cudnn" kind gets (groups == 1, stride > 1): wav2vec2's layer 0
# (10, 5), layers 1-4 (3, 2), layers 5-6 (2, 2), and a k > 2*stride case.
KS = [(10, 5), (3, 2), (2, 2), (7, 3)]
ULP = {torch.float32: 1e-5, torch.float16: 4 * 2.0 ** -10, torch.bfloat16: 4 * 2.0 ** -7}


def _shape(k, s):
    # L < k, L < stride (no frame), L not a multiple of the stride, a longer one
    return random.choice([k - 1, s - 1 if s > 1 else 1, 5 * s + random.randint(1, s - 1),
                          random.randint(3 * k, 12 * k)])


def _inputs(B, C, Co, L, k, s, dtype, bias, state):
    x = torch.randn(B, C, L).to(dtype)
    w = (torch.randn(Co, C, k) / (C * k) ** 0.5).to(dtype)
    b = torch.randn(Co).to(dtype) if bias else None
    st = torch.randn(B, C, k - s).to(dtype) if state else None
    return x, w, b, st


def _oracle(x, w, b, st, s, act, gy, gf):
    leaves = [t.detach().double().requires_grad_(True) if t is not None else None
              for t in (x, w, b, st)]
    y, xp = naive_causal_conv(leaves[0], leaves[1], leaves[2], s, 1, act, leaves[3])
    T = x.shape[-1] // s
    k = w.shape[-1]
    fin = xp[..., T * s: T * s + k - s]
    outs, grads = [y], [gy.double()]
    if gf is not None:
        outs.append(fin)
        grads.append(gf.double())
    want = [t for t in leaves if t is not None]
    keep = [i for i, o in enumerate(outs) if o.requires_grad]  # y has no graph when T == 0
    g = torch.autograd.grad([outs[i] for i in keep], want, [grads[i] for i in keep],
                            allow_unused=True) if keep else [None] * len(want)
    it = iter(g)
    full = [next(it) if t is not None else None for t in leaves]
    full = [torch.zeros_like(t) if (gg is None and t is not None) else gg
            for gg, t in zip(full, leaves)]
    return y.detach(), fin.detach(), full


def _err(a, e):
    return float((a.double() - e).abs().max()) if a.numel() else 0.0


def _scale(e):
    return max(1.0, float(e.abs().max())) if e.numel() else 1.0


@pytest.mark.parametrize("k,s", KS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", [None, "silu", "gelu"])
def test_cudnn_path_vs_oracle_and_reference(k, s, dtype, act):
    for _ in range(3):
        B, C, Co = random.randint(1, 3), random.randint(1, 9), random.randint(1, 12)
        L = _shape(k, s)
        bias, state = random.random() < 0.5, random.random() < 0.5
        x, w, b, st = _inputs(B, C, Co, L, k, s, dtype, bias, state)
        T = L // s
        what = f"B={B} C={C} Co={Co} L={L} k={k} s={s} {dtype} act={act} bias={bias} state={state}"
        try:
            y, fin = CU._cudnn_forward(x, w, b, st, s, act)
        except RuntimeError as e:  # CPU conv without a kernel for this dtype
            if dtype != torch.float32 and "not implemented" in str(e):
                pytest.skip(f"CPU conv in {dtype}: {e}")
            raise
        y0, f0 = R.forward(x, w, b, st, s, 1, act)
        assert y.shape == (B, Co, T) and y.dtype == dtype and y.is_contiguous(), what
        assert fin.shape == (B, C, k - s) and fin.is_contiguous(), what
        assert fin.untyped_storage().data_ptr() != x.untyped_storage().data_ptr(), what
        torch.testing.assert_close(fin, f0, atol=0, rtol=0, msg=lambda m: f"{what}: final {m}")
        gy = torch.randn(B, Co, T).to(dtype)
        gf = torch.randn(B, C, k - s).to(dtype) if k > s and random.random() < 0.7 else None
        got = CU._cudnn_backward(gy, gf, x, w, b, st, s, act)
        ref = R.backward(gy, gf, x, w, b, st, s, 1, act)
        if got[3] is not None and got[3].numel() and got[0].numel():
            assert got[0].untyped_storage().data_ptr() != got[3].untyped_storage().data_ptr()
        oy, ofin, og = _oracle(x, w, b, st, s, act, gy, gf)
        names = ("dx", "dweight", "dbias", "dstate")
        for name, a, r, o, inp in zip(("y",) + names, (y,) + got, (y0,) + ref, (oy,) + tuple(og),
                                      (None, x, w, b, st)):
            assert (a is None) == (r is None) == (o is None), f"{what}: {name}"
            if a is None:
                continue
            assert a.shape == r.shape == o.shape, f"{what}: {name}"
            if inp is not None:
                assert a.dtype == inp.dtype and a.is_contiguous(), f"{what}: {name}"
                assert a.numel() == 0 or all(
                    a.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
                    for t in (x, w, b, st, gy, gf) if t is not None), f"{what}: {name} aliases"
            sc = _scale(o)
            if dtype == torch.float32:
                torch.testing.assert_close(a.double(), o, atol=1e-5 * sc, rtol=1e-5,
                                           msg=lambda m: f"{what}: {name} vs oracle: {m}")
                torch.testing.assert_close(a, r, atol=1e-5 * sc, rtol=1e-5,
                                           msg=lambda m: f"{what}: {name} vs reference: {m}")
            else:
                bound = 2 * _err(r, o) + ULP[dtype] * sc
                assert _err(a, o) <= bound, (f"{what}: {name}: error {_err(a, o):.3g} vs the "
                                             f"oracle > {bound:.3g} (reference {_err(r, o):.3g})")


def test_no_padded_copy_when_no_trailing_frame(monkeypatch):
    """k=3, stride=2 at even L (wav2vec2 layers 1-4): cuDNN pads, no F.pad / cat copy of x, no
    output slice; the result still equals the reference."""
    x, w, b, _ = _inputs(2, 8, 8, 64, 3, 2, torch.float32, True, False)
    assert CU._extra_frames(64, 3, 2) == 0 and not CU._pad_copy(x, w, 2)

    def boom(*a, **kw):
        raise AssertionError("the input was copied")
    y0, f0 = R.forward(x, w, b, None, 2, 1, "gelu")
    gy, gf = torch.randn_like(y0), torch.randn_like(f0)
    g0 = R.backward(gy, gf, x, w, b, None, 2, 1, "gelu")
    monkeypatch.setattr(torch.nn.functional, "pad", boom)
    monkeypatch.setattr(torch, "cat", boom)
    y, f = CU._cudnn_forward(x, w, b, None, 2, "gelu")
    g = CU._cudnn_backward(gy, gf, x, w, b, None, 2, "gelu")
    torch.testing.assert_close(y, y0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f, f0, atol=0, rtol=0)
    for a, r in zip(g[:3], g0[:3]):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-5)


def test_trailing_frame_copy_choice():
    """With a trailing extra frame (k=10, stride=5) the cheaper copy is taken: padding the 1-channel
    waveform of wav2vec2's layer 0, slicing the output when C_in is as wide as C_out."""
    L = 1000
    assert CU._extra_frames(L, 10, 5) == 1
    assert CU._pad_copy(torch.empty(1, 1, L), torch.empty(512, 1, 10), 5)
    assert not CU._pad_copy(torch.empty(1, 512, L), torch.empty(512, 512, 10), 5)
    assert not CU._pad_copy(torch.empty(1, 512, L), torch.empty(512, 512, 3), 2)
    assert CU._extra_frames(L + 1, 3, 2) == 1


def test_dispatch_reaches_cudnn_path(monkeypatch):
    """forward/backward of the backend send groups == 1, stride > 1 to the plain-torch bodies (no
    extension needed for them) and run the same numbers."""
    monkeypatch.setattr(CU, "_ops", lambda: (_ for _ in ()).throw(AssertionError("ext used")))
    x, w, b, st = _inputs(2, 4, 6, 23, 3, 2, torch.float32, True, True)
    y, f = CU.forward(x, w, b, st, 2, 1, "silu")
    y1, f1 = CU._cudnn_forward(x, w, b, st, 2, "silu")
    assert torch.equal(y, y1) and torch.equal(f, f1)
    gy = torch.randn_like(y)
    for a, c in zip(CU.backward(gy, None, x, w, b, st, 2, 1, "silu"),
                    CU._cudnn_backward(gy, None, x, w, b, st, 2, "silu")):
        assert torch.equal(a, c)


def test_output_only_call_skips_final_state(monkeypatch):
    """causal_conv1d on the cuDNN route without return_final_state (a streaming step_fixed): the
    body runs directly without the final state's copy, with the op's output bit for bit; where
    the final state is asked for, autograd records an input or the fast path is off, the op
    runs as before (final state computed, gradients flow)."""
    from pyencoder import _backend
    from pyencoder.ops.conv import causal_conv1d
    real_select = _backend.select
    monkeypatch.setattr(_backend, "select",
                        lambda fam, entry, dev, args, backend=None: "cuda" if fam == "conv"
                        else real_select(fam, entry, dev, args, backend))
    monkeypatch.setattr(CU, "_ops", lambda: (_ for _ in ()).throw(AssertionError("ext used")))
    finals = []
    real_final = CU._final_state
    monkeypatch.setattr(CU, "_final_state", lambda *a: finals.append(1) or real_final(*a))
    x, w, b, st = _inputs(2, 4, 6, 24, 3, 2, torch.float32, True, True)
    with torch.no_grad():
        y_full, fin = causal_conv1d(x, w, b, stride=2, activation="gelu", initial_state=st,
                                    return_final_state=True)
    assert finals == [1] and fin.shape == (2, 4, 1)
    with torch.no_grad():
        y = causal_conv1d(x, w, b, stride=2, activation="gelu", initial_state=st)
    assert finals == [1] and torch.equal(y, y_full)          # no final state made
    monkeypatch.setenv("PYENCODER_EAGER_FASTPATH", "0")
    with torch.no_grad():
        assert torch.equal(causal_conv1d(x, w, b, stride=2, activation="gelu",
                                         initial_state=st), y_full)
    assert finals == [1, 1]                                   # the registered op
    monkeypatch.delenv("PYENCODER_EAGER_FASTPATH")
    xg = x.clone().requires_grad_()
    yg = causal_conv1d(xg, w, b, stride=2, activation="gelu", initial_state=st)
    assert finals == [1, 1, 1] and torch.equal(yg.detach(), y_full)
    yg.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_depthwise_output_only_uses_the_y_op(monkeypatch):
    """The cuda backend's depthwise forward without need_final calls the extension's
    causal_conv1d_fwd_y_cuda (no final-state kernel); an extension built before that op existed
    runs causal_conv1d_fwd_cuda and the final state is dropped (stand-in ops, CPU tensors)."""
    calls = []

    class Ops:
        def causal_conv1d_fwd_y_cuda(self, x, w, b, st, act):
            calls.append(("y", act))
            return x * 2

        def causal_conv1d_fwd_cuda(self, x, w, b, st, act):
            calls.append(("full", act))
            return x * 2, x[..., :2].clone()

    class OldOps:
        causal_conv1d_fwd_cuda = Ops.causal_conv1d_fwd_cuda
    x = torch.randn(2, 4, 9)
    w = torch.randn(4, 1, 3)
    monkeypatch.setattr(CU, "_ops", lambda: Ops())
    y, f = CU.forward(x, w, None, None, 1, 4, "gelu", need_final=False)
    assert f is None and torch.equal(y, x * 2) and calls == [("y", 2)]
    y, f = CU.forward(x, w, None, None, 1, 4, None)
    assert f.shape == (2, 4, 2) and calls[-1] == ("full", 0)
    monkeypatch.setattr(CU, "_ops", lambda: OldOps())
    y, f = CU.forward(x, w, None, None, 1, 4, "silu", need_final=False)
    assert f is None and torch.equal(y, x * 2) and calls[-1] == ("full", 1)


TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


@pytest.mark.gpu
@pytest.mark.gpu_quick
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k,s,C,L,state", [(10, 5, 1, 4003, False), (3, 2, 512, 2000, False),
                                           (3, 2, 64, 1001, True), (2, 2, 64, 998, False),
                                           (10, 5, 64, 1003, False)])
def test_cuda_cudnn_kind_vs_reference(dtype, k, s, C, L, state):
    """The cuda backend's cudnn kind (input-dtype cuDNN) vs the reference on the GPU; tolerances
    as tests/test_conv_gpu.py (both accumulate in float32; one rounding may differ)."""
    from pyencoder import _backend
    if _backend._global_reason("cuda") is not None:
        pytest.skip(f"cuda backend unavailable: {_backend._global_reason('cuda')}")
    dev = "cuda"
    x = torch.randn(2, C, L, device=dev, dtype=dtype)
    w = (torch.randn(64, C, k, device=dev) / (C * k) ** 0.5).to(dtype)
    b = torch.randn(64, device=dev, dtype=dtype)
    st = torch.randn(2, C, k - s, device=dev, dtype=dtype) if state else None
    assert CU._kind(x, w, s, 1) == "cudnn"
    y, f = CU.forward(x, w, b, st, s, 1, "gelu")
    y0, f0 = R.forward(x, w, b, st, s, 1, "gelu")
    atol, rtol = TOL[dtype]

    def close(a, c, name):
        sc = max(1.0, float(c.abs().max())) if c.numel() else 1.0
        torch.testing.assert_close(a, c, atol=atol * sc, rtol=rtol, msg=lambda m: f"{name}: {m}")
    close(y, y0, "y")
    torch.testing.assert_close(f, f0, atol=0, rtol=0)
    gy, gf = torch.randn_like(y0), torch.randn_like(f0)
    for name, a, c in zip(("dx", "dweight", "dbias", "dstate"),
                          CU.backward(gy, gf, x, w, b, st, s, 1, "gelu"),
                          R.backward(gy, gf, x, w, b, st, s, 1, "gelu")):
        assert (a is None) == (c is None), name
        if a is not None:
            assert a.dtype == c.dtype and a.shape == c.shape, name
            close(a, c, name)


@pytest.mark.parametrize("backend", ["cudnn", "reference", "triton"])
@pytest.mark.parametrize("k,s", [(10, 5), (3, 2), (7, 3)])
def test_strided_view_initial_state(backend, k, s):
    """CausalConv1d.step_fixed passes its history's tail as a strided view (hist[..., s - 1:]),
    not a copy: every backend that gets a strided conv reads it as it is (the cuDNN route and
    the reference concatenate it, the Triton kernel takes its strides); the result and the final
    state equal those of the contiguous copy, bit for bit."""
    import os
    if backend == "triton":
        from conftest import has_triton
        if not has_triton() or os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("needs triton under TRITON_INTERPRET=1")
        from pyencoder.ops import _conv_triton as T
        fwd = T.forward
    else:
        fwd = CU._cudnn_forward if backend == "cudnn" else R.forward
    B, C, Co, L = 2, 5, 6, 4 * s * 3
    x = torch.randn(B, C, L)
    w = torch.randn(Co, C, k) / (C * k) ** 0.5
    b = torch.randn(Co)
    hist = torch.randn(B, C, k - 1)
    view = hist[..., s - 1:]
    assert not view.is_contiguous()
    if backend == "cudnn":
        got, want = fwd(x, w, b, view, s, "gelu"), fwd(x, w, b, view.contiguous(), s, "gelu")
    else:
        got, want = (fwd(x, w, b, st, s, 1, "gelu") for st in (view, view.contiguous()))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
