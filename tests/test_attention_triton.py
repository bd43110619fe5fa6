"""Triton interval attention (pyencoder.ops._attention_triton) against the reference.

CPU CI runs the kernels under TRITON_INTERPRET=1 (set by conftest) on tiny shapes in float32 and
float16: forward (out, lse) and backward (dq, dk, dv) for band and chunked masks, RoPE layouts,
padding, GQA, offsets and awkward lengths. GPU tests (``-m gpu``) run the full grid including
bfloat16 and long sequences with the FlashAttention tolerance rule.

Tolerances:
- float32: the kernels use IEEE fp32 dots and fp32 cos/sin, so they agree with a float64 oracle
  to fp32 rounding accumulated over short sums: 1e-4 relative (the issue's requirement).
- float16 (CPU): the kernels round rotated q/k, probabilities and dS to fp16 before each dot
  (like FlashAttention); with O(1) inputs that is ~1e-3 absolute per element after the fp32
  accumulation, so 6e-3 / 1.2e-2 (out / grads) bounds it with margin while still catching any
  masking or RoPE error (those are O(0.1-1)).
- GPU, 16-bit: kernel error vs the fp32 reference <= 2x (forward) / 3x (gradients) the error of
  plain torch in the same dtype, plus a tiny absolute floor (the FlashAttention rule).
"""
import pytest
import torch

from conftest import attention_op_args, has_triton

pytestmark = pytest.mark.skipif(not has_triton(), reason="triton is not installed")

if has_triton():
    from pyencoder.ops import _attention_triton as tri
from pyencoder import Rope
from pyencoder.ops.attention import band_params, chunked_params
from pyencoder.reference import attention as ref

_ON_GPU = torch.cuda.is_available()
_DEV = "cuda" if _ON_GPU else "cpu"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    if has_triton():
        monkeypatch.setattr(tri, "POISON_OUTPUTS", True)


def _mask(kind):
    name, a, b, c = kind
    return band_params(a, b) if name == "band" else chunked_params(a, b, c)


def _inputs(B, Hq, Hk, Nq, Nk, D, dtype, device=_DEV, noncontig=False):
    def mk(h, n):
        if noncontig:
            return torch.randn(B, n, h, D, device=device, dtype=dtype).transpose(1, 2)
        return torch.randn(B, h, n, D, device=device, dtype=dtype)
    return mk(Hq, Nq), mk(Hk, Nk), mk(Hk, Nk)


def _run_pair(q, k, v, rope, key_lengths, mask, q_offset, k_offset, oracle_dtype):
    """(kernel fwd, bwd) and (oracle fwd, bwd) on the same inputs and upstream gradient."""
    block, lo, hi = mask
    D = q.shape[-1]
    scale = D ** -0.5
    inv = None if rope is None else rope.inv_freq(q.device)
    il = False if rope is None else rope.interleaved
    args = (inv, key_lengths, block, lo, hi, q_offset, k_offset, scale, il)
    out, lse = tri.forward(q, k, v, *args)
    dout = torch.randn_like(out)
    grads = tri.backward(dout, q, k, v, out, lse, *args, True)
    c = [t.to(oracle_dtype) for t in (q, k, v)]
    o_args = (inv, key_lengths, block, lo, hi, q_offset, k_offset, scale, il)
    out_r, lse_r = ref.forward(*c, *o_args)
    grads_r = ref.backward(dout.to(oracle_dtype), *c, out_r, lse_r, *o_args, True)
    return (out, lse, grads), (out_r, lse_r, grads_r)


def _close(name, got, want, rtol, atol):
    got = got.to(want.dtype)
    assert not torch.isnan(got).any(), f"{name}: NaN in kernel output"
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _check_lse(lse, lse_r, tol):
    assert not torch.isnan(lse).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_r)), "zero rows (lse=-inf) differ"
    fin = torch.isfinite(lse_r)
    torch.testing.assert_close(lse[fin].double(), lse_r[fin].double(), rtol=tol, atol=tol)


# (B, Hq, Hk, Nq, Nk, D, mask, rope, key_lengths, q_offset, k_offset)
_CASES = [
    (1, 2, 2, 33, 33, 32, ("band", None, 0, 0), None, None, 0, 0),
    (2, 2, 1, 37, 29, 32, ("band", 5, 2, 0), (32, False), [29, 11], 0, 0),
    (1, 2, 2, 41, 41, 32, ("band", 0, 3, 0), (32, True), None, 7, 7),
    (2, 1, 1, 50, 50, 32, ("band", 20, 1, 0), (16, False), [50, 0], 0, 0),
    (1, 4, 2, 23, 40, 32, ("band", None, 2, 0), (16, True), None, 17, 0),
    (1, 1, 1, 1, 1, 32, ("band", 0, 0, 0), (32, False), None, 0, 0),
    (1, 1, 1, 1, 19, 32, ("band", None, 1, 0), (32, True), None, 18, 0),
    (1, 2, 2, 19, 1, 32, ("band", 3, 0, 0), None, None, 0, 10),
    (2, 2, 2, 45, 45, 32, ("chunked", 4, None, 0), (32, False), [45, 3], 0, 0),
    (1, 2, 1, 38, 38, 32, ("chunked", 5, 0, 0), (32, True), None, 2, 2),
    (1, 2, 2, 47, 47, 32, ("chunked", 5, 2, 3), (16, False), None, 0, 0),
    (2, 2, 2, 48, 50, 32, ("chunked", 16, None, 3), (32, False), [50, 31], 0, 0),
    (1, 2, 2, 30, 52, 32, ("chunked", 8, 2, 1), (32, True), None, 20, 0),
    (1, 1, 1, 27, 27, 80, ("band", 6, 3, 0), (64, False), None, 0, 0),
    (1, 1, 1, 21, 21, 80, ("chunked", 7, 1, 2), (80, True), None, 0, 0),
]


def _case_id(c):
    m = c[6]
    r = "norope" if c[7] is None else f"rope{c[7][0]}{'i' if c[7][1] else 'n'}"
    return (f"{m[0]}{m[1:]}-N{c[3]}x{c[4]}-H{c[1]}/{c[2]}-D{c[5]}-{r}"
            f"{'-len' if c[8] else ''}{'-off' if c[9] or c[10] else ''}").replace(" ", "")


def _do_case(case, dtype, noncontig=False):
    B, Hq, Hk, Nq, Nk, D, kind, rope, lens, qo, ko = case
    q, k, v = _inputs(B, Hq, Hk, Nq, Nk, D, dtype, noncontig=noncontig)
    rope = None if rope is None else Rope(rope[0], interleaved=rope[1])
    kl = None if lens is None else torch.tensor(lens, dtype=torch.int32, device=_DEV)
    oracle = torch.float64
    (out, lse, g), (out_r, lse_r, g_r) = _run_pair(q, k, v, rope, kl, _mask(kind), qo, ko, oracle)
    if dtype == torch.float32:
        rtol, atol_o, atol_g = 1e-4, 1e-5, 1e-5
    else:
        rtol, atol_o, atol_g = 6e-3, 6e-3, 1.2e-2
    _close("out", out, out_r, rtol, atol_o)
    _check_lse(lse, lse_r, 1e-4 if dtype == torch.float32 else 2e-3)
    for name, a, b in zip(("dq", "dk", "dv"), g, g_r):
        assert a.dtype == dtype and a.shape == b.shape
        _close(name, a, b, rtol, atol_g)


@pytest.mark.parametrize("case", _CASES, ids=[_case_id(c) for c in _CASES])
def test_fp32_forward_backward(case):
    _do_case(case, torch.float32)


@pytest.mark.parametrize("case", [_CASES[i] for i in (1, 4, 8, 11, 13)],
                         ids=[_case_id(_CASES[i]) for i in (1, 4, 8, 11, 13)])
def test_fp16_forward_backward(case):
    _do_case(case, torch.float16)


def test_noncontiguous_inputs():
    _do_case((1, 2, 1, 25, 25, 32, ("band", 4, 2, 0), (32, False), None, 3, 3), torch.float32,
             noncontig=True)


def test_zero_rows_and_fully_padded():
    # queries 0..9 see nothing (keys start at position 12, band(2, 0)); batch 1 is fully padded
    q, k, v = _inputs(2, 2, 2, 20, 20, 32, torch.float32)
    kl = torch.tensor([20, 0], dtype=torch.int32, device=_DEV)
    (out, lse, g), (out_r, lse_r, g_r) = _run_pair(q, k, v, Rope(32), kl, band_params(2, 0), 0, 12,
                                                   torch.float64)
    assert torch.isinf(lse[0, :, :10]).all() and torch.isinf(lse[1]).all()
    assert (out[0, :, :10] == 0).all() and (out[1] == 0).all()
    for t in (out, *g):
        assert torch.isfinite(t).all()
    assert (g[0][1] == 0).all() and (g[1][1] == 0).all() and (g[2][1] == 0).all()
    _close("out", out, out_r, 1e-4, 1e-5)
    for name, a, b in zip(("dq", "dk", "dv"), g, g_r):
        _close(name, a, b, 1e-4, 1e-5)


def test_backward_is_deterministic():
    q, k, v = _inputs(1, 4, 2, 40, 40, 32, torch.float16)
    mask = chunked_params(8, 1, 2)
    inv = Rope(32).inv_freq(q.device)
    args = (inv, None, *mask, 0, 0, 32 ** -0.5, False)
    out, lse = tri.forward(q, k, v, *args)
    dout = torch.randn_like(out)
    g1 = tri.backward(dout, q, k, v, out, lse, *args, True)
    g2 = tri.backward(dout, q, k, v, out, lse, *args, True)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_public_ops_route_to_triton(monkeypatch):
    import pyencoder
    calls = []
    fwd, bwd = tri.forward, tri.backward
    monkeypatch.setattr(tri, "forward", lambda *a, **kw: calls.append("fwd") or fwd(*a, **kw))
    monkeypatch.setattr(tri, "backward", lambda *a, **kw: calls.append("bwd") or bwd(*a, **kw))
    q, k, v = _inputs(1, 2, 2, 21, 21, 32, torch.float32)
    rope = Rope(32)
    for op, kw in ((pyencoder.ops.banded_attention, dict(left=4, right=1)),
                   (pyencoder.ops.chunked_attention, dict(chunk_size=4, left_chunks=1,
                                                          lookahead=1))):
        calls.clear()
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = op(*leaves, rope=rope, backend="triton", **kw)
        out.square().sum().backward()
        assert calls == ["fwd", "bwd"]
        leaves_r = [t.clone().requires_grad_() for t in (q, k, v)]
        out_r = op(*leaves_r, rope=rope, backend="reference", **kw)
        out_r.square().sum().backward()
        torch.testing.assert_close(out, out_r, rtol=1e-4, atol=1e-5)
        for a, b in zip(leaves, leaves_r):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_supports_reasons():
    q = torch.randn(1, 1, 4, 32, dtype=torch.float64)
    r = tri.supports_forward(q=q, k=q, v=q, inv_freq=None, key_lengths=None, block=1, lo_off=1,
                             hi_off=0, q_offset=0, k_offset=0, scale=1.0, interleaved=False)
    assert r is not None and "float64" in r
    q = torch.randn(1, 1, 4, 320)
    assert "head_dim" in tri.supports_forward(q=q, k=q, v=q)
    q = torch.randn(1, 1, 4, 32)
    assert tri.supports_forward(q=q, k=q, v=q, q_offset=1 << 24) is not None
    assert tri.supports_forward(q=q, k=q, v=q) is None
    assert not hasattr(tri, "supports_backward")


def test_opcheck_triton_backend():
    op = torch.ops.pyencoder.interval_attention.default
    q = torch.randn(2, 2, 10, 16, device=_DEV, requires_grad=True)
    k = torch.randn(2, 1, 12, 16, device=_DEV, requires_grad=True)
    v = torch.randn(2, 1, 12, 16, device=_DEV, requires_grad=True)
    inv = Rope(8).inv_freq().to(_DEV)
    kl = torch.tensor([12, 7], dtype=torch.int32, device=_DEV)
    torch.library.opcheck(op, (*attention_op_args(q, k, v, inv, kl, block=1, lo_off=3, hi_off=2),
                               "triton"))


# ----------------------------------------------------------------------------------------------
# GPU: full grid with the FlashAttention tolerance rule


def _dense_mask(Nq, Nk, mask, q_offset, k_offset, key_lengths, device):
    block, lo_off, hi_off = mask
    p = torch.arange(Nq, device=device) + q_offset
    s = torch.arange(Nk, device=device) + k_offset
    base = (p // block) * block
    m = s[None, :] <= (base + hi_off)[:, None]
    if lo_off >= 0:
        m &= s[None, :] >= (base - lo_off)[:, None]
    m = m[None, None]
    if key_lengths is not None:
        m = m & (torch.arange(Nk, device=device)[None, :] < key_lengths[:, None])[:, None, None]
    return m


def _plain_attention(q, k, v, rope, key_lengths, mask, q_offset, k_offset):
    """Plain torch in the inputs' dtype (no upcast): the error yardstick of the FA rule."""
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    if rope is not None:
        q = rope.rotate(q, torch.arange(q_offset, q_offset + Nq, device=q.device))
        k = rope.rotate(k, torch.arange(k_offset, k_offset + Nk, device=q.device))
    g = Hq // Hk
    k = k.repeat_interleave(g, 1)
    v = v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * (D ** -0.5)
    m = _dense_mask(Nq, Nk, mask, q_offset, k_offset, key_lengths, q.device)
    s = s.masked_fill(~m, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


def _fa_rule_case(B, Hq, Hk, Nq, Nk, D, kind, rope, lens, dtype, q_offset=0, k_offset=0):
    import pyencoder
    mask = _mask(kind)
    q, k, v = _inputs(B, Hq, Hk, Nq, Nk, D, dtype, device="cuda")
    kl = None if lens is None else torch.tensor(lens, dtype=torch.int32, device="cuda")
    block, lo, hi = mask
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = pyencoder.ops.interval_attention(*leaves, block=block, lo_off=lo, hi_off=hi, rope=rope,
                                           key_lengths=kl, q_offset=q_offset, k_offset=k_offset,
                                           backend="triton")
    dout = torch.randn_like(out)
    out.backward(dout)
    ref_leaves = [t.float().clone().requires_grad_() for t in (q, k, v)]
    out_r = pyencoder.ops.interval_attention(*ref_leaves, block=block, lo_off=lo, hi_off=hi,
                                             rope=rope, key_lengths=kl, q_offset=q_offset,
                                             k_offset=k_offset, backend="reference")
    out_r.backward(dout.float())
    assert torch.isfinite(out).all()
    if dtype == torch.float32:
        torch.testing.assert_close(out, out_r, rtol=1e-4, atol=1e-5)
        for a, b in zip(leaves, ref_leaves):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)
        return
    plain_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out_p = _plain_attention(*plain_leaves, rope, kl, mask, q_offset, k_offset)
    out_p.backward(dout)
    err = (out.float() - out_r).abs().max().item()
    err_p = (out_p.float() - out_r).abs().max().item()
    assert err <= 2 * err_p + 1e-5, f"out: kernel err {err:.3e} > 2 x plain {err_p:.3e}"
    for name, a, b, c in zip(("dq", "dk", "dv"), leaves, ref_leaves, plain_leaves):
        e = (a.grad.float() - b.grad).abs().max().item()
        e_p = (c.grad.float() - b.grad).abs().max().item()
        assert e <= 3 * e_p + 1e-5, f"{name}: kernel err {e:.3e} > 3 x plain {e_p:.3e}"


_GPU_MASKS = [("band", None, 0, 0), ("band", None, 3, 0), ("band", 250, 3, 0), ("band", 50, 3, 0),
              ("band", 0, 0, 0), ("chunked", 4, 128, 3), ("chunked", 64, 2, 0),
              ("chunked", 16, None, 5)]


# The fast GPU tier (-m gpu_quick, tests/conftest.py): every dtype at D=64, bf16 on the
# wav2vec2 masks, RoPE layouts incl. partial and interleaved, GQA, padding, offsets, N=16k.
_QUICK_GRID = {(torch.bfloat16, ("band", 250, 3, 0)), (torch.bfloat16, ("chunked", 4, 128, 3)),
               (torch.float16, ("band", None, 0, 0)), (torch.float32, ("chunked", 16, None, 5))}


def gpu_quick(name, p):
    if name == "test_gpu_grid":
        return p["D"] == 64 and (p["dtype"], p["kind"]) in _QUICK_GRID
    if name == "test_gpu_rope_and_sizes":
        return (p["rope"], p["N"]) in (((64, False), 1027), ((32, True), 17))
    if name == "test_gpu_long_sequences":
        return p["N"] == 16384
    return name in ("test_gpu_lengths_do_not_recompile", "test_gpu_deterministic_bitwise")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("D", [32, 64, 80, 96, 128])
@pytest.mark.parametrize("kind", _GPU_MASKS)
def test_gpu_grid(dtype, D, kind):
    _fa_rule_case(2, 4, 2, 1000, 1000, D, kind, Rope(D), [1000, 613], dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("rope", [None, (64, False), (64, True), (32, False), (32, True)])
@pytest.mark.parametrize("N", [1, 17, 129, 1027])
def test_gpu_rope_and_sizes(rope, N):
    rope = None if rope is None else Rope(rope[0], interleaved=rope[1])
    _fa_rule_case(2, 2, 2, N, N, 64, ("band", 50, 3, 0), rope, None, torch.bfloat16, 5, 5)
    _fa_rule_case(1, 4, 1, N, N + 3, 64, ("chunked", 4, 2, 3), rope, None, torch.float16, 0, 7)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [8192, 16384, 32768])
@pytest.mark.parametrize("kind", [("band", 250, 3, 0), ("chunked", 4, 128, 3)])
def test_gpu_long_sequences(N, kind):
    _fa_rule_case(1, 2, 2, N, N, 64, kind, Rope(64), None, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_lengths_do_not_recompile(monkeypatch):
    monkeypatch.setenv("PYENCODER_TRITON_AUTOTUNE", "0")
    from pyencoder.triton_kernels import interval_attention as ia
    fn = ia._interval_attention_fwd_kernel
    q, k, v = _inputs(2, 2, 2, 300, 300, 64, torch.bfloat16, device="cuda")
    inv = Rope(64).inv_freq("cuda")

    def run(lens, qo):
        kl = torch.tensor(lens, dtype=torch.int32, device="cuda")
        tri.forward(q, k, v, inv, kl, 1, 50, 3, qo, qo, 0.125, False)

    run([300, 200], 0)
    count = sum(len(c[0]) for c in fn.device_caches.values())
    for lens, qo in (([17, 299], 13), ([0, 5], 1000), ([300, 300], 77)):
        run(lens, qo)
    assert sum(len(c[0]) for c in fn.device_caches.values()) == count


@pytest.mark.gpu
def test_gpu_deterministic_bitwise():
    q, k, v = _inputs(2, 8, 2, 3000, 3000, 64, torch.bfloat16, device="cuda")
    inv = Rope(64).inv_freq("cuda")
    args = (inv, None, *band_params(250, 3), 0, 0, 0.125, False)
    out, lse = tri.forward(q, k, v, *args)
    dout = torch.randn_like(out)
    g1 = tri.backward(dout, q, k, v, out, lse, *args, True)
    g2 = tri.backward(dout, q, k, v, out, lse, *args, True)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


_OFFSET_KEYS = r"""
import json, os, sys, torch
sys.path.insert(0, sys.argv[1])
from _count_compiles import _Recorder
rec = _Recorder(); rec.install()
os.environ["PYENCODER_TRITON_AUTOTUNE"] = "0"
from pyencoder.ops import _attention_triton as tri
from pyencoder import Rope
tables = tri._rope_tables
RAW = sys.argv[2:] == ["raw"]
bases = []
def seen_tables(q, inv_freq, Nq, Nk, q_offset, k_offset, win=None):
    cos, sin, base, table = tables(q, inv_freq, Nq, Nk, q_offset, k_offset, win)
    if RAW and table:
        # rows cut so that the table starts at min(q_offset, k_offset) itself (the launcher moves
        # its base down to 5 mod 16): the kernels get the streaming offset's own value
        cut = min(q_offset, k_offset) - base
        cos, sin, base = cos[cut:], sin[cut:], base + cut
    bases.append(base if table else None)
    return cos, sin, base, table
tri._rope_tables = seen_tables
q, k, v = (torch.randn(2, 2, 300, 64, dtype=torch.float16) for _ in range(3))
inv = Rope(64).inv_freq()
for i, (lens, qo) in enumerate((([300, 200], 0), ([17, 299], 13), ([0, 5], 1000),
                                ([300, 300], 77), ([5, 300], 1), ([300, 100], 32))):
    rec.test = i
    kl = torch.tensor(lens, dtype=torch.int32)
    out, lse = tri.forward(q, k, v, inv, kl, 1, 50, 3, qo, qo, 0.125, False)
    tri.backward(torch.randn_like(out), q, k, v, out, lse, inv, kl, 1, 50, 3, qo, qo, 0.125, False)
print(json.dumps({"keys": rec.per_kernel(), "bases": bases}))
"""


def _offset_keys(*mode):
    import json
    import os
    import sys

    import _subproc
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "PYENCODER_ROPE_MODE", "PYENCODER_ROPE_TABLE")}
    r = _subproc.run([sys.executable, "-c", _OFFSET_KEYS, os.path.join(root, "tests"), *mode],
                     env=env, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_offsets_and_lengths_share_one_compile_key():
    """Triton specialises integer arguments (== 1, divisible by 16): q_offset / k_offset are
    do_not_specialize, so streaming offsets 0, 13, 1000, 77, 1, 32 and any key_lengths reuse one
    compiled kernel per launcher (launch keys recorded with Triton's own binder, nothing compiled;
    the CPU twin of test_gpu_lengths_do_not_recompile). The calls use the RoPE tables (a 50 + 3
    window: the auto mode's table), whose base moves with the offsets."""
    got = _offset_keys()
    counts = got["keys"]
    assert counts and all(n == 1 for n in counts.values()), counts
    assert len(got["bases"]) == 12 and None not in got["bases"]


def test_rope_table_base_is_not_specialised():
    """The RoPE table base tab_base is do_not_specialize in the three kernels: tables starting at
    the streaming offset itself (0 and 32: divisible by 16, 1: == 1, 13, 77, 1000: neither; three
    specialisations of a plain int) still share one compiled kernel per launcher."""
    got = _offset_keys("raw")
    counts = got["keys"]
    assert sorted(counts) == ["_interval_attention_bwd_dkdv_kernel",
                              "_interval_attention_bwd_dq_kernel",
                              "_interval_attention_fwd_kernel"], counts
    assert all(n == 1 for n in counts.values()), counts
    assert got["bases"] == [b for qo in (0, 13, 1000, 77, 1, 32) for b in (qo, qo)]
