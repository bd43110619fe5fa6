"""The Triton attention backward's delta (rowsum(dout * out), float32) computed by the dq kernel.

The backward launches two attention kernels, dq then dk/dv: the dq kernel stores each query
tile's delta for the dk/dv kernel before its key loops, so every row of every (b, h) must be
written whatever its tile sees (a tile with no visible key, padded rows past Nq, a fully padded
batch, rows that see only sink keys, frame masks). The launches are recorded through the
launcher's ``launch`` (the delta buffer is the dk/dv launch's DELTA argument); outputs are
poisoned with NaN before the kernels write them (POISON_OUTPUTS), so a row the dq kernel skips
shows as NaN. dk/dv (which read delta) and dq are compared with the float64 reference.

Tolerances (Triton interpreter, float32 / float16 as tests/test_attention_triton.py): float32
1e-4 relative, 1e-5 absolute (IEEE fp32 dots, short sums); float16 6e-3 / 1.2e-2 (q, k,
probabilities and dS rounded to fp16 before each dot). delta itself: float32 products of the
same values, summed in another order than torch's: 1e-5 relative and absolute for O(1) rows of
at most 32 features.
"""
import pytest
import torch

from conftest import has_triton

pytestmark = pytest.mark.skipif(not has_triton(), reason="triton is not installed")

if has_triton():
    from pyencoder.ops import _attention_triton as tri
from pyencoder import Rope
from pyencoder.mask import IntervalMask
from pyencoder.reference import attention as ref

_DEV = "cuda" if torch.cuda.is_available() else "cpu"
_DQ = "_interval_attention_bwd_dq_kernel"
_DKDV = "_interval_attention_bwd_dkdv_kernel"
_DELTA_ARG = 7   # the dk/dv kernel's DELTA: Q, K, V, DO, DK, DV, LSE, DELTA, ...


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    if has_triton():
        monkeypatch.setattr(tri, "POISON_OUTPUTS", True)


def _kernel_name(kernel):
    while not hasattr(kernel, "__name__") and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return getattr(kernel, "__name__", None) or kernel.fn.__name__


def _record_launches(monkeypatch):
    """[(kernel name, positional args)] of every launch through the launcher's ``launch``."""
    calls = []
    real = tri.launch

    class _Recorded:
        def __init__(self, kernel):
            self.kernel, self.inner = kernel, real(kernel)

        def __getitem__(self, grid):
            run = self.inner[grid]

            def go(*args, **kwargs):
                calls.append((_kernel_name(self.kernel), args))
                return run(*args, **kwargs)
            return go

    monkeypatch.setattr(tri, "launch", _Recorded)
    return calls


def _mask_args(mask):
    """(block, lo_off, hi_off) and the keyword arguments (sink, kb) of the launchers."""
    kw = {}
    if mask.sink:
        kw["sink"] = mask.sink
    if mask.is_frame:
        kw["kb"] = mask.k_block
    return (mask.block, mask.lo_off, mask.hi_off), kw


def _run(q, k, v, mask, rope, lens, qo, ko, dout_fn=torch.randn_like, out_fn=None):
    """Kernel forward and backward (launches recorded by the caller), then the float64 oracle's
    on the same inputs and upstream gradient. ``dout_fn(out)``: the upstream gradient (any
    strides); ``out_fn(out)``: the out the backward is given (same values, any strides)."""
    (block, lo, hi), kw = _mask_args(mask)
    D = q.shape[-1]
    inv = None if rope is None else rope.inv_freq(q.device)
    il = False if rope is None else rope.interleaved
    kl = None if lens is None else torch.tensor(lens, dtype=torch.int32, device=q.device)
    args = (inv, kl, block, lo, hi, qo, ko, D ** -0.5, il)
    out, lse = tri.forward(q, k, v, *args, **kw)
    dout = dout_fn(out)
    out_b = out if out_fn is None else out_fn(out)
    grads = tri.backward(dout, q, k, v, out_b, lse, *args, True, **kw)
    c = [t.double() for t in (q, k, v)]
    out_r, lse_r = ref.forward(*c, *args, **kw)
    grads_r = ref.backward(dout.double(), *c, out_r, lse_r, *args, True, **kw)
    return out, dout, grads, grads_r


def _tol(dtype):
    return (1e-4, 1e-5) if dtype == torch.float32 else (6e-3, 1.2e-2)


def _close(name, got, want, dtype):
    rtol, atol = _tol(dtype)
    assert got.dtype == dtype and got.shape == want.shape, name
    assert torch.isfinite(got).all(), f"{name}: non-finite entries"
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol,
                               msg=lambda m: f"{name}: {m}")


# (name, B, Hq, Hk, Nq, Nk, D, mask, rope dim, key_lengths, q_offset, k_offset); the interpreter's
# query tile is 16 rows (pyencoder.ops._attention_triton._build_kernels)
_CASES = [
    # rows 0..19 see no key (keys start at position 20, band(2, 0)): tile 0 has no visible key;
    # Nq = 45 pads the last tile; batch 1 has no key at all; GQA
    ("empty-tile-padded-rows", 2, 2, 1, 45, 30, 32, IntervalMask.band(2, 0), 32, [30, 0], 0, 20),
    # batch 1: rows >= 15 see only the sink keys 0..3 (their band lies past key_lengths = 12)
    ("sink-only-tiles", 2, 2, 2, 40, 40, 32, IntervalMask.band(3, 0, sink=4), 16, [40, 12], 0, 0),
    # frame mask (2 query positions per frame, 3 key positions per frame): rows 0..19 see nothing
    ("frames-empty-tile", 1, 2, 1, 37, 40, 16, IntervalMask.frames(2, 3, 1, 0), 8, [40], 0, 30),
    # chunked, lengths cut the second batch mid-tile; no RoPE
    ("chunked-lengths", 2, 1, 1, 33, 33, 32, IntervalMask.chunked(5, 1, 2), None, [33, 9], 0, 0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", _CASES, ids=[c[0] for c in _CASES])
def test_delta_of_every_row_and_gradients(case, dtype, monkeypatch):
    """The delta the dk/dv kernel reads is rowsum(dout * out) on every row (tiles with no visible
    key, padded rows, fully padded batches, sink-only rows included; NaN-poisoned buffer), and
    dq, dk, dv match the float64 reference."""
    _, B, Hq, Hk, Nq, Nk, D, mask, rdim, lens, qo, ko = case
    calls = _record_launches(monkeypatch)
    q = torch.randn(B, Hq, Nq, D, device=_DEV).to(dtype)
    k = torch.randn(B, Hk, Nk, D, device=_DEV).to(dtype)
    v = torch.randn(B, Hk, Nk, D, device=_DEV).to(dtype)
    rope = None if rdim is None else Rope(rdim)
    out, dout, grads, grads_r = _run(q, k, v, mask, rope, lens, qo, ko)
    names = [n for n, _ in calls]
    assert names.count(_DKDV) == 1, names
    delta = [a for n, a in calls if n == _DKDV][0][_DELTA_ARG]
    assert delta.shape == (B, Hq, Nq) and delta.dtype == torch.float32
    want = (out.float() * dout.float()).sum(-1)
    assert torch.isfinite(delta).all(), "rows whose delta the dq kernel did not write"
    torch.testing.assert_close(delta, want, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("dq", "dk", "dv"), grads, grads_r):
        _close(name, a, b, dtype)


def test_empty_tile_case_has_an_empty_tile_and_padded_rows():
    """The first case is what it claims: a query tile with no visible key, rows of a batch with
    no key, and Nq not a multiple of the interpreter's 16-row tile (not a vacuous case)."""
    _, B, Hq, Hk, Nq, Nk, D, mask, rdim, lens, qo, ko = _CASES[0]
    q, k, v = (torch.randn(B, h, n, D) for h, n in ((Hq, Nq), (Hk, Nk), (Hk, Nk)))
    (block, lo, hi), _ = _mask_args(mask)
    kl = torch.tensor(lens, dtype=torch.int32)
    _, lse = ref.forward(q, k, v, None, kl, block, lo, hi, qo, ko, D ** -0.5, False)
    assert torch.isinf(lse[0, :, :20]).all() and torch.isfinite(lse[0, :, 20:]).all()
    assert torch.isinf(lse[1]).all() and Nq % 16
    # the sink case: batch 1's rows past 15 see keys (the sinks) only through the sink span
    _, B, Hq, Hk, Nq, Nk, D, mask, rdim, lens, qo, ko = _CASES[1]
    q, k, v = (torch.randn(B, h, n, D) for h, n in ((Hq, Nq), (Hk, Nk), (Hk, Nk)))
    kl = torch.tensor(lens, dtype=torch.int32)
    (block, lo, hi), kw = _mask_args(mask)
    _, lse_s = ref.forward(q, k, v, None, kl, block, lo, hi, qo, ko, D ** -0.5, False, **kw)
    _, lse_b = ref.forward(q, k, v, None, kl, block, lo, hi, qo, ko, D ** -0.5, False)
    assert torch.isinf(lse_b[1, :, 16:]).all() and torch.isfinite(lse_s[1, :, 16:]).all()


def _bias_kwargs(Hq, B, Nq, Nk):
    L = Nq + Nk + 1
    return dict(rel_bias=torch.randn(Hq, L), gate=torch.rand(B, Hq, Nq), rel_offset=-Nq)


@pytest.mark.parametrize("mode", ["kernel", "table", "pre", "bias", "deterministic-off"])
def test_backward_launches_two_attention_kernels(mode, monkeypatch):
    """A backward launches the dq kernel, then the dk/dv kernel, and no other attention kernel
    (no preprocess pass); outside the prerotate mode (which adds its rotation kernels) nothing
    else at all. The gradients stay right (float64 reference)."""
    monkeypatch.setenv("PYENCODER_ROPE_MODE", mode if mode in ("kernel", "table", "pre")
                       else "table")
    B, Hq, Hk, Nq, Nk, D = 2, 4, 2, 35, 35, 32
    q, k, v = (torch.randn(B, h, Nq, D, device=_DEV) for h in (Hq, Hk, Hk))
    (block, lo, hi) = IntervalMask.band(6, 2).params
    inv = Rope(32).inv_freq(q.device)
    kl = torch.tensor([35, 20], dtype=torch.int32, device=q.device)
    args = (inv, kl, block, lo, hi, 0, 0, D ** -0.5, False)
    kw = _bias_kwargs(Hq, B, Nq, Nk) if mode == "bias" else {}
    out, lse = tri.forward(q, k, v, *args, **kw)
    dout = torch.randn_like(out)
    calls = _record_launches(monkeypatch)
    grads = tri.backward(dout, q, k, v, out, lse, *args, mode != "deterministic-off", **kw)
    names = [n for n, _ in calls]
    assert [n for n in names if "interval_attention" in n] == [_DQ, _DKDV], names
    if mode != "pre":
        assert names == [_DQ, _DKDV], names
    else:
        assert all(n == "_rope_rotate_kernel" for n in names if "interval_attention" not in n)
    c = [t.double() for t in (q, k, v)]
    kw_r = {n: (t.double() if torch.is_tensor(t) else t) for n, t in kw.items()}
    out_r, lse_r = ref.forward(*c, *args, **kw_r)
    grads_r = ref.backward(dout.double(), *c, out_r, lse_r, *args, True, **kw_r)
    names_g = ("dq", "dk", "dv", "drel", "dgate")
    for name, a, b in zip(names_g, grads, grads_r):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{mode} {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_noncontiguous_dout_and_out(dtype):
    """dout with every stride unusual (head and row axes swapped, every other feature) and an out
    of the same values in another layout: delta and the gradients read them through their
    strides."""
    B, Hq, Hk, Nq, Nk, D = 2, 2, 1, 29, 29, 32
    q = torch.randn(B, Hq, Nq, D, device=_DEV).to(dtype)
    k = torch.randn(B, Hk, Nk, D, device=_DEV).to(dtype)
    v = torch.randn(B, Hk, Nk, D, device=_DEV).to(dtype)

    def dout_fn(out):
        d = torch.randn(B, Nq, Hq, 2 * D, device=out.device).to(out.dtype)[..., ::2]
        d = d.transpose(1, 2)
        assert d.shape == out.shape and not d.is_contiguous() and d.stride(-1) == 2
        return d

    def out_fn(out):
        o = torch.empty(B, Nq, Hq, D, device=out.device, dtype=out.dtype).transpose(1, 2)
        return o.copy_(out)

    _, _, grads, grads_r = _run(q, k, v, IntervalMask.band(4, 1), Rope(16), [29, 17], 3, 3,
                                dout_fn=dout_fn, out_fn=out_fn)
    for name, a, b in zip(("dq", "dk", "dv"), grads, grads_r):
        _close(name, a, b, dtype)


def test_noncontiguous_dout_through_the_public_op():
    """Autograd hands the backward a non-contiguous dout (the gradient of a transpose): the
    Triton backend's gradients equal the reference backend's."""
    from pyencoder.ops import banded_attention
    B, H, N, D = 1, 2, 27, 32
    base = [torch.randn(B, H, N, D, device=_DEV) for _ in range(3)]
    w = torch.randn(B, N, H, D, device=_DEV)
    grads = {}
    for backend in ("triton", "reference"):
        x = [t.clone().requires_grad_() for t in base]
        y = banded_attention(*x, left=5, right=2, rope=Rope(32), backend=backend)
        (y.transpose(1, 2) * w).sum().backward()
        grads[backend] = [t.grad for t in x]
    for name, a, b in zip(("dq", "dk", "dv"), grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
