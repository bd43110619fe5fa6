"""Triton interval attention with the RoPE table mode forced on (PYENCODER_ROPE_TABLE=1).

The kernels then load cos/sin from float32 tables built by the launcher
(pyencoder.rope.rope_cos_sin, the reference's formula) instead of computing them. Same oracle,
cases and tolerances as tests/test_attention_triton.py (see its docstring), on a subset covering
band and chunked masks, NeoX / interleaved / partial rotary, offsets (tables starting at
min(q_offset, k_offset)), GQA, padding, N = 1, float32 and float16, forward and backward. GPU
tests (``-m gpu``) run the FlashAttention tolerance rule of tests/test_attention_triton.py in
table mode, bfloat16 included.
"""
import pytest
import torch

from conftest import has_triton

pytestmark = pytest.mark.skipif(not has_triton(), reason="triton is not installed")

# the case table: plain data, for the parametrize decorators (collected without Triton too)
from test_attention_triton import _CASES, _case_id  # noqa: E402
if has_triton():
    from pyencoder.ops import _attention_triton as tri
    from test_attention_triton import _close, _do_case, _fa_rule_case, _inputs, _run_pair
from pyencoder import Rope
from pyencoder.ops.attention import band_params

_DEV = "cuda" if torch.cuda.is_available() else "cpu"

# band GQA + padding (NeoX), offsets (interleaved), GQA + partial interleaved + q_offset only,
# Nq = 1 at an offset, chunked padding, chunked GQA + offsets (interleaved), chunked with
# q_offset > k_offset, D = 80 partial NeoX
_FP32 = (1, 2, 4, 6, 8, 9, 12, 13)
_FP16 = (1, 12)


@pytest.fixture(autouse=True)
def _table_mode(monkeypatch):
    if not has_triton():
        return
    monkeypatch.setattr(tri, "POISON_OUTPUTS", True)
    monkeypatch.setenv("PYENCODER_ROPE_TABLE", "1")
    used = []
    build = tri._rope_tables

    def spy(*a, **kw):
        res = build(*a, **kw)
        used.append(res[3])
        return res
    monkeypatch.setattr(tri, "_rope_tables", spy)
    return used


@pytest.mark.parametrize("case", [_CASES[i] for i in _FP32],
                         ids=[_case_id(_CASES[i]) for i in _FP32])
def test_table_fp32_forward_backward(case, _table_mode):
    _do_case(case, torch.float32)
    assert _table_mode == [True, True]


@pytest.mark.parametrize("case", [_CASES[i] for i in _FP16],
                         ids=[_case_id(_CASES[i]) for i in _FP16])
def test_table_fp16_forward_backward(case, _table_mode):
    _do_case(case, torch.float16)
    assert _table_mode == [True, True]


def test_table_zero_rows_and_padding(_table_mode):
    # keys start at position 12 (table from 0 to 32); queries 0..9 see nothing; batch 1 padded
    q, k, v = _inputs(2, 2, 2, 20, 20, 32, torch.float32)
    kl = torch.tensor([20, 0], dtype=torch.int32, device=_DEV)
    (out, lse, g), (out_r, lse_r, g_r) = _run_pair(q, k, v, Rope(32, interleaved=True), kl,
                                                   band_params(2, 0), 0, 12, torch.float64)
    assert torch.isinf(lse[0, :, :10]).all() and torch.isinf(lse[1]).all()
    assert (out[0, :, :10] == 0).all() and (out[1] == 0).all()
    _close("out", out, out_r, 1e-4, 1e-5)
    for name, a, b in zip(("dq", "dk", "dv"), g, g_r):
        _close(name, a, b, 1e-4, 1e-5)
    assert _table_mode == [True, True]


def test_table_matches_in_kernel_mode(monkeypatch):
    # both modes take float32 cos/sin of the same float32 angle: they agree to a few ulps of cos/sin
    q, k, v = _inputs(1, 2, 1, 29, 33, 32, torch.float32)
    args = (Rope(32).inv_freq(q.device), None, *band_params(6, 2), 5, 1, 32 ** -0.5, False)
    out_t, lse_t = tri.forward(q, k, v, *args)
    monkeypatch.setenv("PYENCODER_ROPE_TABLE", "0")
    out_k, lse_k = tri.forward(q, k, v, *args)
    torch.testing.assert_close(out_t, out_k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse_t, lse_k, rtol=1e-5, atol=1e-6)


def test_table_tables_and_env(monkeypatch):
    inv = Rope(16).inv_freq()
    q = torch.empty(1, 1, 4, 16)
    cos, sin, base, on = tri._rope_tables(q, inv, 4, 6, 7, 3)
    # the base moves down to 5 mod 16 (one kernel specialisation for every offset): -11
    assert on and base == -11 and cos.shape == (22, 8) and sin.shape == (22, 8)
    ang = torch.arange(-11, 11, dtype=torch.float32)[:, None] * inv[None, :]
    assert torch.equal(cos, torch.cos(ang)) and torch.equal(sin, torch.sin(ang))
    assert not tri._rope_tables(q, None, 4, 6, 7, 3)[3]
    for mode, want in (("0", False), ("auto", False), ("", False), ("1", True)):
        monkeypatch.setenv("PYENCODER_ROPE_TABLE", mode)
        assert tri._rope_tables(q, inv, 4, 6, 0, 0)[3] is want
    monkeypatch.setenv("PYENCODER_ROPE_TABLE", "yes")
    with pytest.raises(ValueError, match="PYENCODER_ROPE_TABLE"):
        tri.forward(q, q, q, inv, None, 1, 2, 0, 0, 0, 1.0, False)


def gpu_quick(name, p):
    """The fast GPU tier (tests/conftest.py): one bf16 table case, one partial-RoPE case."""
    if name == "test_gpu_table_grid":
        return p["dtype"] == torch.bfloat16 and p["D"] == 64 and p["kind"][0] == "band"
    return name == "test_gpu_table_offsets_partial" and p["rope"] == (32, False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("kind", [("band", 250, 3, 0), ("chunked", 4, 128, 3)])
def test_gpu_table_grid(dtype, D, kind, _table_mode):
    _fa_rule_case(2, 4, 2, 1000, 1000, D, kind, Rope(D), [1000, 613], dtype)
    assert _table_mode and all(_table_mode)


@pytest.mark.gpu
@pytest.mark.parametrize("rope", [(64, True), (32, False)])
def test_gpu_table_offsets_partial(rope, _table_mode):
    rope = Rope(rope[0], interleaved=rope[1])
    _fa_rule_case(1, 4, 1, 517, 520, 64, ("chunked", 4, 2, 3), rope, None, torch.bfloat16, 0, 7)
    _fa_rule_case(2, 2, 2, 129, 129, 64, ("band", 50, 3, 0), rope, None, torch.float16, 5, 5)
    assert _table_mode and all(_table_mode)


def test_table_cache_reuses_only_the_same_inv_freq(monkeypatch):
    """The RoPE tables are cached per (inv_freq tensor, version, device, base, end): a repeated
    call reuses them, another inv_freq with the same shape (another base) or an in-place edit
    of it builds new ones, and the cached values equal a fresh build."""
    tri._TABLES.clear()
    q = torch.empty(1, 1, 4, 16)
    inv = Rope(16).inv_freq()
    a = tri._rope_tables(q, inv, 4, 6, 7, 3)
    b = tri._rope_tables(q, inv, 4, 6, 7, 3)
    assert a[0] is b[0] and a[1] is b[1] and len(tri._TABLES) == 1
    other = Rope(16, base=500.0).inv_freq()
    c = tri._rope_tables(q, other, 4, 6, 7, 3)
    assert c[0] is not a[0] and not torch.equal(c[0], a[0])
    inv2 = inv.clone()
    d = tri._rope_tables(q, inv2, 4, 6, 7, 3)
    assert d[0] is not a[0] and torch.equal(d[0], a[0])
    inv2.mul_(2.0)                               # in place: version bump, new tables
    e = tri._rope_tables(q, inv2, 4, 6, 7, 3)
    ang = torch.arange(-11, 11, dtype=torch.float32)[:, None] * inv2[None, :]
    assert torch.equal(e[0], torch.cos(ang)) and torch.equal(e[1], torch.sin(ang))
    for i in range(40):                          # bounded
        tri._rope_tables(q, inv, 4, 6 + i, 7, 3)
    assert len(tri._TABLES) <= tri._TABLES_MAX
    with torch.inference_mode():                 # an inference tensor has no version: no cache
        inv_inf = Rope(16).inv_freq().clone()
        n0 = len(tri._TABLES)
        f = tri._rope_tables(q, inv_inf, 4, 6, 7, 3)
        assert torch.equal(f[0], a[0]) and len(tri._TABLES) == n0
