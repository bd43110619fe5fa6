"""Triton conv backend vs the plain-torch reference (CPU: TRITON_INTERPRET=1, tiny shapes).

Tolerances: both sides accumulate in fp32 from the same inputs, so fp32 differs only by
summation order (a few ulp of the K*CG-term sums: 1e-5 with O(1) data). fp16 outputs are rounded
once from fp32 on both sides; order differences can flip a rounding, so 1 fp16 ulp (~1e-3
relative) plus a small absolute term. bf16 is only tested on GPU (the interpreter's bf16 dot is
wrong)."""
import pytest
import torch

from conftest import has_triton

pytestmark = pytest.mark.skipif(not has_triton(), reason="triton is not installed")

from pyencoder.reference import conv as R  # noqa: E402

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}


def _tr():
    from pyencoder.ops import _conv_triton
    return _conv_triton


def _inputs(B, C, Cout, L, K, stride, groups, dtype, state, bias, channel_last):
    x = torch.randn(B, C, L, dtype=dtype)
    if channel_last:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    w = (torch.randn(Cout, C // groups, K) / (C // groups * K) ** 0.5).to(dtype)
    b = torch.randn(Cout, dtype=dtype) if bias else None
    s = torch.randn(B, C, K - stride, dtype=dtype) if state else None
    return x, w, b, s


CASES = [
    # B, C, Cout, L, K, stride, groups
    (2, 5, 5, 11, 1, 1, 5),
    (2, 5, 5, 11, 2, 1, 5),
    (1, 3, 3, 9, 4, 1, 3),
    (2, 6, 6, 7, 9, 1, 6),     # L < K
    (2, 4, 4, 1, 3, 1, 4),     # L == 1
    (2, 6, 6, 13, 6, 3, 6),    # strided depthwise
    (2, 8, 8, 11, 5, 1, 2),    # grouped
    (1, 6, 12, 9, 7, 1, 3),    # grouped, channel multiplier 2
    (2, 4, 6, 23, 10, 5, 1),   # dense strided (feature-extractor-like)
    (1, 4, 4, 3, 4, 4, 1),     # T == 0
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}C{}O{}L{}K{}s{}g{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_backward(case, dtype):
    B, C, Cout, L, K, stride, groups = case
    act = (None, "silu", "gelu")[(L + K) % 3]
    state = (L + C) % 2 == 0
    x, w, b, s = _inputs(B, C, Cout, L, K, stride, groups, dtype, state, bias=K % 2 == 1,
                         channel_last=C % 2 == 0)
    y0, f0 = R.forward(x, w, b, s, stride, groups, act)
    y1, f1 = _tr().forward(x, w, b, s, stride, groups, act)
    assert y1.shape == y0.shape and f1.shape == f0.shape and y1.dtype == dtype
    torch.testing.assert_close(y1, y0, **TOL[dtype])
    torch.testing.assert_close(f1, f0, atol=0, rtol=0)
    gy = torch.randn_like(y0)
    gf = torch.randn_like(f0) if f0.shape[-1] > 0 else None
    r0 = R.backward(gy, gf, x, w, b, s, stride, groups, act)
    r1 = _tr().backward(gy, gf, x, w, b, s, stride, groups, act)
    for name, a, c in zip(("dx", "dweight", "dbias", "dinitial_state"), r1, r0):
        assert (a is None) == (c is None), name
        if a is not None:
            assert a.shape == c.shape and a.dtype == c.dtype, name
            scale = max(1.0, float(c.abs().max())) if c.numel() else 1.0
            tol = TOL[dtype]
            torch.testing.assert_close(a, c, atol=tol["atol"] * scale, rtol=tol["rtol"],
                                       msg=lambda m: f"{name}: {m}")


def test_backward_deterministic():
    x, w, b, s = _inputs(3, 4, 4, 37, 5, 1, 4, torch.float32, True, True, False)
    gy = torch.randn(3, 4, 37)
    a = _tr().backward(gy, None, x, w, b, s, 1, 4, "silu")
    c = _tr().backward(gy, None, x, w, b, s, 1, 4, "silu")
    assert torch.equal(a[1], c[1]) and torch.equal(a[0], c[0])


@pytest.mark.parametrize("groups", [4, 2])
def test_chunked_equals_offline(groups):
    from pyencoder.ops import causal_conv1d
    B, C, L, K = 2, 4, 23, 6
    x = torch.randn(B, C, L)
    w = torch.randn(C, C // groups, K) * 0.3
    b = torch.randn(C)
    y_full = causal_conv1d(x, w, b, groups=groups, activation="gelu", backend="triton")
    state, ys = None, []
    for lo, hi in ((0, 1), (1, 4), (4, 5), (5, 16), (16, 23)):
        y, state = causal_conv1d(x[..., lo:hi], w, b, groups=groups, activation="gelu",
                                 initial_state=state, return_final_state=True, backend="triton")
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, -1), y_full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("groups", [6, 3])
@pytest.mark.parametrize("pool", [False, True])
def test_update_sequence(groups, pool):
    B, C, K = 3, 6, 5
    w = torch.randn(C, C // groups, K) * 0.3
    b = torch.randn(C)
    steps = [torch.randn(B, C, t) for t in (1, 2, 1, 3)]
    if pool:
        S = 5
        idx = torch.tensor([3, -1, 0], dtype=torch.int32)
        st1 = torch.randn(S, C, K - 1)
    else:
        idx = None
        st1 = torch.randn(B, C, K - 1)
    st0 = st1.clone()
    untouched = st1[[1, 2, 4]].clone() if pool else None
    for xs in steps:
        y0 = R.update(xs, st0, w, b, idx, groups, "silu")
        y1 = _tr().update(xs, st1, w, b, idx, groups, "silu")
        torch.testing.assert_close(y1, y0, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(st1, st0, atol=0, rtol=0)
    if pool:
        assert torch.equal(y1[1], torch.zeros_like(y1[1]))
        assert torch.equal(st1[[1, 2, 4]], untouched)


def test_update_equals_offline():
    B, C, K = 2, 4, 4
    w = torch.randn(C, 1, K) * 0.4
    x = torch.randn(B, C, 9)
    y_off = R.forward(x, w, None, None, 1, C, None)[0]
    st = torch.zeros(B, C, K - 1)
    ys = [_tr().update(x[..., lo:hi], st, w, None, None, C, None)
          for lo, hi in ((0, 1), (1, 3), (3, 4), (4, 9))]
    torch.testing.assert_close(torch.cat(ys, -1), y_off, atol=2e-5, rtol=1e-5)


def test_public_autograd_triton():
    from pyencoder.ops import causal_conv1d
    x = torch.randn(2, 4, 10, requires_grad=True)
    w = (torch.randn(4, 1, 3) * 0.5).requires_grad_()
    b = torch.randn(4, requires_grad=True)
    s = torch.randn(2, 4, 2, requires_grad=True)
    outs = []
    for backend in ("triton", "reference"):
        y, f = causal_conv1d(x, w, b, groups=4, activation="silu", initial_state=s,
                             return_final_state=True, backend=backend)
        grads = torch.autograd.grad((y * y).sum() + (f * 3).sum(), (x, w, b, s))
        outs.append((y.detach(), f.detach()) + grads)
    for a, c in zip(*outs):
        torch.testing.assert_close(a, c, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("groups,stride,C", [(4, 1, 4), (2, 1, 4), (1, 2, 4)],
                         ids=["depthwise", "grouped", "dense_strided"])
def test_output_only_call_skips_state_kernel(groups, stride, C, monkeypatch):
    """causal_conv1d on the triton backend without return_final_state (eager, no autograd): one
    launch, the conv's; the final state's kernel is not launched and y equals the full call's
    bit for bit. With the final state asked for, or autograd recording, the op runs both."""
    if not _interpret():
        pytest.skip("needs TRITON_INTERPRET=1")
    from pyencoder.ops import causal_conv1d
    T = _tr()
    states = []
    real = T._launch_state
    monkeypatch.setattr(T, "_launch_state", lambda *a: states.append(1) or real(*a))
    x = torch.randn(2, C, 12)
    w = torch.randn(C, C // groups, 3) * 0.5
    b = torch.randn(C)
    s = torch.randn(2, C, 3 - stride)
    kw = dict(stride=stride, groups=groups, activation="gelu", initial_state=s,
              backend="triton")
    with torch.no_grad():
        y_full, fin = causal_conv1d(x, w, b, return_final_state=True, **kw)
        assert states == [1] and fin.shape == (2, C, 3 - stride)
        y = causal_conv1d(x, w, b, **kw)
    assert states == [1] and torch.equal(y, y_full)
    xg = x.clone().requires_grad_()
    yg = causal_conv1d(xg, w, b, **kw)
    assert states == [1, 1] and torch.equal(yg.detach(), y_full)
    yg.sum().backward()
    assert xg.grad is not None


def _interpret():
    import os
    return os.environ.get("TRITON_INTERPRET") == "1"


def test_unsupported_dtype_reason():
    x = torch.randn(1, 2, 4, dtype=torch.float64)
    w = torch.randn(2, 1, 3, dtype=torch.float64)
    assert "float64" in _tr().supports_forward(x=x, weight=w)


@pytest.mark.parametrize("groups", [1, 4])
def test_noncontiguous_weight_and_bias(groups):
    """Strided views of weight and bias (e.g. slices of a larger parameter) give the reference
    result; the Triton launch once read a strided bias densely (a silent wrong answer)."""
    from pyencoder.ops import causal_conv1d, causal_conv1d_update
    x = torch.randn(2, 4, 9)
    w = torch.randn(4, 4 // groups, 3, 2)[..., 0]
    b = torch.randn(8)[::2]
    assert not w.is_contiguous() and not b.is_contiguous()
    want = causal_conv1d(x, w.contiguous(), b.contiguous(), groups=groups, backend="reference")
    got = causal_conv1d(x, w, b, groups=groups, backend="triton")
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    if groups == 4:
        s1, s2 = torch.randn(2, 4, 2), None
        s2 = s1.clone()
        xu = torch.randn(2, 4, 1)
        u_want = causal_conv1d_update(xu, s1, w.contiguous(), b.contiguous(), groups=4,
                                      backend="reference")
        u_got = causal_conv1d_update(xu, s2, w, b, groups=4, backend="triton")
        torch.testing.assert_close(u_got, u_want, **TOL[torch.float32])
        torch.testing.assert_close(s2, s1)


def test_opcheck_triton_backend():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(2, 4, 13, device=dev, requires_grad=True)
    w = torch.randn(4, 1, 5, device=dev, requires_grad=True)
    b = torch.randn(4, device=dev, requires_grad=True)
    s0 = torch.randn(2, 4, 4, device=dev, requires_grad=True)
    torch.library.opcheck(torch.ops.pyencoder.causal_conv1d.default,
                          (x, w, b, s0, 1, 4, "silu", "triton"))


@pytest.mark.parametrize("tile", ["16,16,2,2", "32,32,4,1", "128,64,8,3", "512,256,16,8"])
@pytest.mark.parametrize("case", [(2, 8, 8, 37, 5, 1, 2), (1, 6, 12, 70, 7, 1, 3),
                                  (2, 4, 6, 53, 10, 5, 1), (1, 16, 16, 9, 33, 1, 4)],
                         ids=lambda c: "B{}C{}O{}L{}K{}s{}g{}".format(*c))
def test_grouped_forward_tile_override(case, tile, monkeypatch):
    """PYENCODER_CONV_GRP_TILE (the implicit-GEMM forward's time / reduction blocks, warps and
    stages, for a tile A/B on a GPU) computes the same function at every tile: blocks larger and
    smaller than the time steps and the reduction (channels per group x k), with state, bias and
    activation; the final state is untouched by it."""
    B, C, Cout, L, K, stride, groups = case
    x, w, b, s = _inputs(B, C, Cout, L, K, stride, groups, torch.float32, True, True, False)
    y0, f0 = R.forward(x, w, b, s, stride, groups, "silu")
    monkeypatch.setenv("PYENCODER_CONV_GRP_TILE", tile)
    y1, f1 = _tr().forward(x, w, b, s, stride, groups, "silu")
    torch.testing.assert_close(y1, y0, **TOL[torch.float32])
    torch.testing.assert_close(f1, f0, rtol=0, atol=0)


@pytest.mark.parametrize("raw", ["64,64,4", "64,64,4,3,1", "48,64,4,3", "64,8,4,3", "64,64,3,3",
                                 "64,64,4,0", "1024,64,4,3", "a,b,c,d"])
def test_grouped_tile_override_bad_value(raw, monkeypatch):
    x, w, b, s = _inputs(1, 8, 8, 12, 3, 1, 2, torch.float32, False, False, False)
    monkeypatch.setenv("PYENCODER_CONV_GRP_TILE", raw)
    with pytest.raises(ValueError, match=f"PYENCODER_CONV_GRP_TILE .*got '{raw}'"):
        _tr().forward(x, w, b, s, 1, 2, None)


def _spy_tap_major(monkeypatch):
    """The TAP_MAJOR value of every grouped-forward launch, appended to the returned list."""
    mod = _tr()
    real = mod.launch
    seen = []

    def spy(kernel):
        launcher = real(kernel)
        if getattr(kernel, "__name__", "") != "_causal_conv1d_grp_fwd_kernel" and \
                "grp_fwd" not in str(getattr(kernel, "fn", kernel)):
            return launcher

        class Grid:
            def __getitem__(self, grid):
                run = launcher[grid]

                def call(*a, **kw):
                    seen.append(kw.get("TAP_MAJOR", False))
                    return run(*a, **kw)
                return call
        return Grid()
    monkeypatch.setattr(mod, "launch", spy)
    return seen


@pytest.mark.parametrize("tile", [None, "32,32,4,1", "128,16,8,3"])
@pytest.mark.parametrize("case", [(2, 8, 8, 37, 5, 1, 2), (1, 6, 12, 70, 7, 1, 3),
                                  (2, 4, 6, 53, 10, 5, 1), (1, 96, 96, 21, 9, 1, 2),
                                  (2, 64, 64, 19, 4, 1, 4), (1, 16, 32, 40, 3, 2, 1)],
                         ids=lambda c: "B{}C{}O{}L{}K{}s{}g{}".format(*c))
@pytest.mark.parametrize("channel_last", [False, True])
def test_grouped_forward_tap_major(case, tile, channel_last, monkeypatch):
    """PYENCODER_CONV_TAP_MAJOR=1 (the implicit-GEMM reduction walked tap by tap over a tap-major
    weight copy) computes the same function: channels per group that a block divides (16, 32,
    48 -> blocks of 16, 64) and that it does not (2, 4, 6, 8: padded, masked), strided dense,
    channel multipliers, state, bias, activation, both memory layouts, with and without a tile
    override."""
    B, C, Cout, L, K, stride, groups = case
    x, w, b, s = _inputs(B, C, Cout, L, K, stride, groups, torch.float32, True, True,
                         channel_last)
    y0, f0 = R.forward(x, w, b, s, stride, groups, "gelu")
    monkeypatch.setenv("PYENCODER_CONV_TAP_MAJOR", "1")
    if tile is not None:
        monkeypatch.setenv("PYENCODER_CONV_GRP_TILE", tile)
    seen = _spy_tap_major(monkeypatch)
    y1, f1 = _tr().forward(x, w, b, s, stride, groups, "gelu")
    assert seen == [True]
    torch.testing.assert_close(y1, y0, **TOL[torch.float32])
    torch.testing.assert_close(f1, f0, rtol=0, atol=0)
    monkeypatch.delenv("PYENCODER_CONV_TAP_MAJOR")
    _tr().forward(x, w, b, s, stride, groups, "gelu")
    assert seen == [True, False]        # unset: the default order


def test_grouped_forward_tap_major_fp16_and_grad(monkeypatch):
    """Tap-major in float16 against the reference, and the public op's gradients (the backward
    recomputes nothing through it without an activation; with one it reruns the forward kernel)."""
    monkeypatch.setenv("PYENCODER_CONV_TAP_MAJOR", "1")
    seen = _spy_tap_major(monkeypatch)
    x, w, b, s = _inputs(2, 32, 32, 25, 6, 1, 2, torch.float16, False, True, True)
    y0, _ = R.forward(x.float(), w.float(), b.float(), None, 1, 2, "silu")
    y1, _ = _tr().forward(x, w, b, None, 1, 2, "silu")
    torch.testing.assert_close(y1.float(), y0, **TOL[torch.float16])
    from pyencoder.ops import causal_conv1d
    xs = torch.randn(1, 16, 20, dtype=torch.float64)
    ws = torch.randn(16, 4, 5, dtype=torch.float64)
    x32, w32 = xs.float().requires_grad_(), ws.float().requires_grad_()
    out = causal_conv1d(x32, w32, groups=4, activation="silu", backend="triton")
    g = torch.randn_like(out)
    dx, dw = torch.autograd.grad(out, (x32, w32), g)
    xr, wr = xs.clone().requires_grad_(), ws.clone().requires_grad_()
    ref = causal_conv1d(xr, wr, groups=4, activation="silu", backend="reference")
    rdx, rdw = torch.autograd.grad(ref, (xr, wr), g.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), rdx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dw.double(), rdw, rtol=1e-4, atol=1e-4)
    assert seen and all(seen)
