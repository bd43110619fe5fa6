"""GPU tests of the cuda and triton conv backends against the reference (``pytest -m gpu``).

Tolerances (kernel vs the reference run on fp32/fp64 copies of the same inputs): both accumulate
in fp32; fp32 differs by summation order only (K up to 256 terms: 1e-4 abs on O(1) outputs).
fp16/bf16 outputs are rounded once from fp32 on both sides, so a differing order can flip one
rounding: 1 ulp (fp16 ~1e-3, bf16 ~8e-3 relative) plus a small absolute term scaled to the
output. The grouped Triton kernel feeds fp16/bf16 operands to tensor cores with fp32
accumulation (products exact), same bound. Weight gradients sum B*L products: scaled by the
gradient's max."""
import pytest
import torch

from pyencoder.reference import conv as R

pytestmark = pytest.mark.gpu

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
WIDTHS = (1, 2, 3, 4, 5, 6, 7, 8, 31, 127, 128, 256)

# The fast GPU tier (-m gpu_quick, tests/conftest.py). The CUDA backend compiles nothing at run
# time: every test of it at widths 1, 4, 7, 31, 128, 256 (every dtype, both layouts, state round
# trips, update with slot indices). Triton: one compile per kernel path and dtype.
_QUICK_WIDTHS = (1, 2, 4, 7, 31, 128, 256)
_QUICK_TRITON = {
    "test_depthwise_widths": lambda p: (p["K"], p["dtype"]) in (
        (4, torch.bfloat16), (31, torch.float16), (256, torch.float32)),
    "test_depthwise_shapes": lambda p: (p["C"], p["L"]) == (768, 2049),
    "test_grouped_triton": lambda p: p["dtype"] == torch.bfloat16 and p["K"] == 128,
    "test_strided": lambda p: p["k"] == 10,
    "test_chunked_round_trip": lambda p: (p["K"], p["dtype"]) == (4, torch.bfloat16),
    "test_update_sequence_vs_offline": lambda p: (p["K"], p["dtype"]) in (
        (4, torch.bfloat16), (31, torch.float32)),
    "test_update_state_indices": lambda p: True,
}


def gpu_quick(name, p):
    if name == "test_depthwise_row_kernel":   # every tap bound it instantiates (4, 8, 16, 32)
        return p["K"] in (1, 4, 5, 9, 16, 17, 31, 32)
    if name == "test_nonfinite_input_reaches_only_its_outputs":   # the CUDA fix, every width
        return p["backend"] == "cuda"
    if p.get("backend", "cuda") == "cuda" and name != "test_grouped_triton":
        return "K" not in p or p["K"] in _QUICK_WIDTHS
    return _QUICK_TRITON.get(name, lambda p: False)(p)


def _backend_ok(name):
    from pyencoder import _backend
    r = _backend._global_reason(name)
    if r is not None:
        pytest.skip(f"{name} backend unavailable: {r}")


def _close(a, b, dtype, name):
    atol, rtol = TOL[dtype]
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    torch.testing.assert_close(a, b, atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")


def _mk(B, C, Cout, L, K, stride, groups, dtype, state, bias, channel_last):
    dev = "cuda"
    x = torch.randn(B, C, L, device=dev, dtype=dtype)
    if channel_last:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    w = (torch.randn(Cout, C // groups, K, device=dev) / (C // groups * K) ** 0.5).to(dtype)
    b = torch.randn(Cout, device=dev, dtype=dtype) if bias else None
    s = torch.randn(B, C, K - stride, device=dev, dtype=dtype) if state else None
    return x, w, b, s


def _impl(name):
    from pyencoder import _backend
    mod, r = _backend.impl_module("conv", name)
    assert mod is not None, r
    return mod


def _check_fwd_bwd(backend, B, C, Cout, L, K, stride, groups, dtype, act, state, bias, cl):
    impl = _impl(backend)
    x, w, b, s = _mk(B, C, Cout, L, K, stride, groups, dtype, state, bias, cl)
    r = impl.supports_forward(x=x, weight=w, bias=b, initial_state=s, stride=stride,
                              groups=groups, activation=act)
    if r is not None:
        pytest.skip(r)
    y0, f0 = R.forward(x, w, b, s, stride, groups, act)
    y1, f1 = impl.forward(x, w, b, s, stride, groups, act)
    assert not torch.isnan(y1).any()
    _close(y1, y0, dtype, "y")
    torch.testing.assert_close(f1, f0, atol=0, rtol=0)
    # the output-only forward (causal_conv1d without return_final_state): the same y, bit for
    # bit, no final state (cuda depthwise: the extension's causal_conv1d_fwd_y_cuda)
    if backend == "cuda" and groups == C and stride == 1:
        assert hasattr(torch.ops.pyencoder, "causal_conv1d_fwd_y_cuda"), "stale pyencoder._C"
    y2, f2 = impl.forward(x, w, b, s, stride, groups, act, need_final=False)
    assert f2 is None and torch.equal(y2, y1)
    gy = torch.randn_like(y0)
    gf = torch.randn_like(f0) if f0.shape[-1] else None
    g0 = R.backward(gy, gf, x, w, b, s, stride, groups, act)
    g1 = impl.backward(gy, gf, x, w, b, s, stride, groups, act)
    for name, a, c in zip(("dx", "dweight", "dbias", "dstate"), g1, g0):
        assert (a is None) == (c is None), name
        if a is not None:
            assert a.shape == c.shape, name
            _close(a, c, dtype, name)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("K", WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_depthwise_widths(backend, K, dtype):
    _backend_ok(backend)
    for L, cl in ((1, False), (37, True), (1000, False), (K - 1 if K > 1 else 3, True)):
        if L < 1:
            continue
        act = (None, "silu", "gelu")[(K + L) % 3]
        _check_fwd_bwd(backend, 3, 40, 40, L, K, 1, 40, dtype, act, state=(K + L) % 2 == 0,
                       bias=L % 2 == 1, cl=cl)


ROW_WIDTHS = (1, 2, 3, 4, 5, 8, 9, 16, 17, 31, 32)


@pytest.mark.parametrize("K", ROW_WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_depthwise_row_kernel(K, dtype, monkeypatch):
    """PYENCODER_CONV_ROW=1 (an A/B flag, off by default): the register-only row kernel of the
    CUDA forward (channel-first rows, 16-byte aligned, K <= 32; csrc/causal_conv1d/
    causal_conv1d_fwd.cu) against the reference: lengths below one vector, at and across the
    block's 4 x 128-vector span and its tail, with and without initial state, bias and
    activation; the final state is exact. A non-finite input reaches only the outputs whose taps
    read it (the padding taps of the K < KMAX instantiations are skipped, not multiplied by 0)."""
    _backend_ok("cuda")
    impl = _impl("cuda")
    for i, L in enumerate((8, 16, 1024, 1032, 4096, 4160, 9000, 16448)):
        state, bias = i % 2 == 0, i % 3 != 1
        act = (None, "silu", "gelu")[i % 3]
        x, w, b, s = _mk(3, 40, 40, L, K, 1, 40, dtype, state, bias, False)
        y0, f0 = R.forward(x, w, b, s, 1, 40, act)
        monkeypatch.setenv("PYENCODER_CONV_ROW", "1")
        y1, f1 = impl.forward(x, w, b, s, 1, 40, act)
        monkeypatch.delenv("PYENCODER_CONV_ROW")
        assert not torch.isnan(y1).any()
        _close(y1, y0, dtype, f"row y L={L}")
        torch.testing.assert_close(f1, f0, atol=0, rtol=0)
    x, w, b, s = _mk(2, 16, 16, 2048, K, 1, 16, dtype, True, True, False)
    x[0, 3, 1000] = float("inf")
    x[1, 5, 7] = float("-inf")
    y0, _ = R.forward(x, w, b, s, 1, 16, None)
    monkeypatch.setenv("PYENCODER_CONV_ROW", "1")
    y1, _ = impl.forward(x, w, b, s, 1, 16, None)
    assert torch.equal(torch.isfinite(y1), torch.isfinite(y0))
    fin = torch.isfinite(y0)
    _close(y1[fin], y0[fin], dtype, "row y (finite outputs)")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("K", (3, 4, 5, 31))
def test_nonfinite_input_reaches_only_its_outputs(backend, K):
    """An inf in x reaches exactly the outputs whose taps read it, as in the reference: the CUDA
    tile kernel multiplied the zero-weight padding taps of its last tap chunk (K not a multiple
    of the chunk) by real inputs, so 0 * inf put NaN into an output that does not read it.
    Both layouts; finite outputs within the usual tolerance."""
    _backend_ok(backend)
    impl = _impl(backend)
    for cl in (False, True):
        x, w, b, s = _mk(2, 16, 16, 300, K, 1, 16, torch.float32, True, True, cl)
        x[0, 3, 100] = float("inf")
        x[1, 5, 7] = float("-inf")
        x[1, 6, 299] = float("nan")
        y0, _ = R.forward(x, w, b, s, 1, 16, None)
        y1, _ = impl.forward(x, w, b, s, 1, 16, None)
        # which outputs read a non-finite input: the padded input's indicator summed over each
        # output's K taps (an oracle independent of any conv algorithm's handling of inf)
        bad = (~torch.isfinite(torch.cat((s, x), -1))).double().cpu()
        reach = torch.nn.functional.conv1d(bad, torch.ones(16, 1, K, dtype=torch.float64),
                                           groups=16) > 0
        assert torch.equal(~torch.isfinite(y1).cpu(), reach), (cl, K)
        fin = ~reach.to(y0.device)
        _close(y1[fin], y0[fin], torch.float32, "finite outputs")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("C,L", [(1, 5), (7, 129), (33, 64), (768, 2049)])
def test_depthwise_shapes(backend, C, L):
    _backend_ok(backend)
    for cl in (False, True):
        _check_fwd_bwd(backend, 2, C, C, L, 4, 1, C, torch.float16, "silu", True, True, cl)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C,G,K", [(768, 16, 128), (96, 4, 9), (64, 1, 3)])
def test_grouped_triton(dtype, C, G, K):
    _backend_ok("triton")
    _check_fwd_bwd("triton", 2, C, C, 301, K, 1, G, dtype, "gelu", True, True, False)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("k,s,Cin", [(10, 5, 1), (3, 2, 64), (2, 2, 64)])
def test_strided(backend, k, s, Cin):
    _backend_ok(backend)
    _check_fwd_bwd(backend, 2, Cin, 64, 1003, k, s, 1, torch.float32, "gelu", True, True, False)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("K", [2, 4, 31, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunked_round_trip(backend, K, dtype):
    _backend_ok(backend)
    from pyencoder.ops import causal_conv1d
    x, w, b, _ = _mk(2, 48, 48, 777, K, 1, 48, dtype, False, True, False)
    y_full = causal_conv1d(x, w, b, groups=48, activation="silu", backend=backend)
    st, ys, lo = None, [], 0
    for n in (1, 5, 64, 100, 3, 604):
        y, st = causal_conv1d(x[..., lo:lo + n], w, b, groups=48, activation="silu",
                              initial_state=st, return_final_state=True, backend=backend)
        ys.append(y)
        lo += n
    assert lo == 777
    _close(torch.cat(ys, -1), y_full, dtype, "chunked")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("K", [1, 2, 4, 7, 31, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_update_sequence_vs_offline(backend, K, dtype):
    _backend_ok(backend)
    impl = _impl(backend)
    B, C = 3, 40
    x, w, b, _ = _mk(B, C, C, 12, K, 1, C, dtype, False, True, False)
    y_off = R.forward(x, w, b, None, 1, C, "gelu")[0]
    st = torch.zeros(B, C, K - 1, device="cuda", dtype=dtype)
    ys, lo = [], 0
    for n in (1, 1, 3, 2, 5):
        ys.append(impl.update(x[..., lo:lo + n], st, w, b, None, C, "gelu"))
        lo += n
    _close(torch.cat(ys, -1), y_off, dtype, "update")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_update_state_indices(backend):
    _backend_ok(backend)
    impl = _impl(backend)
    B, C, K, S = 4, 40, 5, 9
    dt = torch.float16
    w = (torch.randn(C, 1, K, device="cuda") * 0.4).to(dt)
    pool1 = torch.randn(S, C, K - 1, device="cuda", dtype=dt)
    pool0 = pool1.clone()
    idx = torch.tensor([7, -1, 0, 3], device="cuda", dtype=torch.int32)
    for t in (1, 2, 1):
        x = torch.randn(B, C, t, device="cuda", dtype=dt)
        y0 = R.update(x, pool0, w, None, idx, C, "silu")
        y1 = impl.update(x, pool1, w, None, idx, C, "silu")
        _close(y1, y0, dt, "y")
        assert torch.equal(y1[1], torch.zeros_like(y1[1]))
        torch.testing.assert_close(pool1, pool0, atol=0, rtol=0)


def test_cuda_dweight_deterministic():
    _backend_ok("cuda")
    impl = _impl("cuda")
    x, w, b, s = _mk(4, 256, 256, 4099, 31, 1, 256, torch.float32, True, True, False)
    gy = torch.randn(4, 256, 4099, device="cuda")
    a = impl.backward(gy, None, x, w, b, s, 1, 256, "silu")
    c = impl.backward(gy, None, x, w, b, s, 1, 256, "silu")
    assert torch.equal(a[1], c[1]) and torch.equal(a[2], c[2])


def test_poisoned_outputs_fully_written():
    """The kernels allocate their outputs; a NaN-filled caching-allocator block must be fully
    overwritten (checked by poisoning the allocator's free memory first)."""
    _backend_ok("cuda")
    impl = _impl("cuda")
    junk = torch.full((1 << 22,), float("nan"), device="cuda")
    del junk
    x, w, b, s = _mk(2, 100, 100, 333, 7, 1, 100, torch.float16, True, True, True)
    y, f = impl.forward(x, w, b, s, 1, 100, None)
    assert not torch.isnan(y).any() and not torch.isnan(f).any()
