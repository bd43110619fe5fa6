"""Triton interval attention with the RoPE prerotate mode (PYENCODER_ROPE_MODE=pre).

q and k are rotated once by the rotation kernel (triton_kernels/rope_rotate.py) and the attention
kernels run their no-RoPE variants; the backward runs the no-RoPE backward on the rotated q and k
with float32 dq / dk and un-rotates them into q's and k's dtypes. Same oracle, cases and
tolerances as tests/test_attention_triton.py (see its docstring): the rotated tiles are rounded
to the input dtype before the dots in both modes, and the gradients are rounded once after the
float32 un-rotation in both, so the in-kernel mode's tolerances hold unchanged. The rotation
kernel itself is checked against pyencoder.rope.apply_rope (the reference's formula): float32
agrees to a few ulps of cos/sin. GPU tests (``-m gpu``) run the FlashAttention tolerance rule in
this mode, bfloat16 included.
"""
import pytest
import torch

from conftest import has_triton

pytestmark = pytest.mark.skipif(not has_triton(), reason="triton is not installed")

# the case table: plain data, for the parametrize decorators (collected without Triton too)
from test_attention_triton import _CASES, _case_id  # noqa: E402
if has_triton():
    from pyencoder.ops import _attention_triton as tri
    from test_attention_triton import _do_case, _fa_rule_case, _inputs
from pyencoder import IntervalMask, Rope
from pyencoder.rope import apply_rope

_DEV = "cuda" if torch.cuda.is_available() else "cpu"
_FP32 = (1, 2, 4, 6, 8, 9, 12, 13)
_FP16 = (1, 12)


def _triton_runs():
    import os
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def _pre_mode(monkeypatch):
    """Forces the mode and records each rotation (inverse flag) the launchers run."""
    if not has_triton():
        return
    monkeypatch.setattr(tri, "POISON_OUTPUTS", True)
    monkeypatch.setenv("PYENCODER_ROPE_MODE", "pre")
    used = []
    rot = tri.rotate

    def spy(x, *a, **kw):
        used.append(bool(kw.get("inverse", False)))
        return rot(x, *a, **kw)
    monkeypatch.setattr(tri, "rotate", spy)
    return used


@pytest.mark.parametrize("case", [_CASES[i] for i in _FP32],
                         ids=[_case_id(_CASES[i]) for i in _FP32])
def test_pre_fp32_forward_backward(case, _pre_mode):
    _do_case(case, torch.float32)
    # forward rotates q and k; the backward rotates them again and un-rotates dq and dk
    assert _pre_mode == [False, False, False, False, True, True]


@pytest.mark.parametrize("case", [_CASES[i] for i in _FP16],
                         ids=[_case_id(_CASES[i]) for i in _FP16])
def test_pre_fp16_forward_backward(case, _pre_mode):
    _do_case(case, torch.float16)
    assert _pre_mode == [False, False, False, False, True, True]


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("R, D", [(16, 16), (8, 24), (10, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotate_matches_apply_rope(interleaved, R, D, dtype):
    if not _triton_runs():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    rope = Rope(R, interleaved=interleaved)
    inv = rope.inv_freq(_DEV)
    x = torch.randn(2, 3, 37, D, device=_DEV, dtype=dtype).transpose(1, 2).contiguous() \
        .transpose(1, 2)       # non-contiguous strides
    for inverse in (False, True):
        want = apply_rope(x.float(), torch.arange(5, 42, device=_DEV), inv, interleaved,
                          inverse)
        got = tri.rotate(x, inv, 5, interleaved, inverse=inverse)
        assert got.dtype == dtype and got.is_contiguous()
        tol = 2e-6 if dtype == torch.float32 else 1e-3      # fp16: one rounding of the output
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
        got32 = tri.rotate(x, inv, 5, interleaved, inverse=inverse, dtype=torch.float32)
        torch.testing.assert_close(got32, want, rtol=2e-6, atol=2e-6)
    # a rotation and its inverse give back x (float32)
    xf = x.float()
    back = tri.rotate(tri.rotate(xf, inv, 3, interleaved), inv, 3, interleaved, inverse=True)
    torch.testing.assert_close(back, xf, rtol=1e-5, atol=1e-5)


def test_pre_matches_in_kernel_mode_with_sink_bias_gqa(monkeypatch):
    """The prerotate and in-kernel modes agree (float32) on a call with every feature: GQA,
    sink keys, a gated relative bias, key_lengths, offsets, partial interleaved RoPE: forward and
    all gradients."""
    if not _triton_runs():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    from pyencoder.ops import interval_attention
    q, k, v = _inputs(2, 4, 2, 19, 23, 32, torch.float32)
    for t in (q, k, v):
        t.requires_grad_(True)
    rel = torch.randn(4, 40, device=_DEV, requires_grad=True)
    gate = torch.rand(2, 4, 19, device=_DEV, requires_grad=True)
    kl = torch.tensor([23, 14], device=_DEV)
    mask = IntervalMask.chunked(3, 2, 2, sink=3)
    rope = Rope(16, interleaved=True)

    def run():
        out = interval_attention(q, k, v, mask=mask, rope=rope, key_lengths=kl, q_offset=4,
                                 k_offset=2, rel_bias=rel, gate=gate, rel_offset=-25,
                                 backend="triton")
        return (out,) + torch.autograd.grad((out * out.detach().cos()).sum(),
                                            (q, k, v, rel, gate))
    pre = run()
    monkeypatch.setenv("PYENCODER_ROPE_MODE", "kernel")
    ker = run()
    for name, a, b in zip(("out", "dq", "dk", "dv", "drel", "dgate"), pre, ker):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6, msg=name)


@pytest.mark.parametrize("case", [_CASES[i] for i in _FP32],
                         ids=[_case_id(_CASES[i]) for i in _FP32])
def test_kernel_mode_fp32_forward_backward(case, _pre_mode, monkeypatch):
    """The in-kernel mode (cos/sin computed on every tile visit; no longer any window's auto
    choice) keeps its own coverage: the same oracle and tolerances, no rotation launched."""
    monkeypatch.setenv("PYENCODER_ROPE_MODE", "kernel")
    used = []
    build = tri._rope_tables
    monkeypatch.setattr(tri, "_rope_tables", lambda *a, **k: used.append(1) or build(*a, **k))
    _do_case(case, torch.float32)
    assert _pre_mode == [] and used == [1, 1]
    assert not tri._rope_table_enabled(16)


def test_rope_mode_env(monkeypatch):
    monkeypatch.delenv("PYENCODER_ROPE_MODE")
    for table, want in (("1", "table"), ("0", "kernel")):
        monkeypatch.setenv("PYENCODER_ROPE_TABLE", table)
        assert tri._rope_mode() == want and tri._rope_mode(16) == want
    # auto: the table mode up to a 256-key window bucket, the prerotate mode above (H100 timings)
    for table in ("auto", ""):
        monkeypatch.setenv("PYENCODER_ROPE_TABLE", table)
        assert [tri._rope_mode(w) for w in (16, 64, 256, 512, 4096, None)] == \
            ["table"] * 3 + ["pre"] * 3
    for mode in ("kernel", "table", "pre"):
        monkeypatch.setenv("PYENCODER_ROPE_MODE", mode)
        monkeypatch.setenv("PYENCODER_ROPE_TABLE", "1")
        assert tri._rope_mode() == mode        # the new variable wins
    monkeypatch.setenv("PYENCODER_ROPE_MODE", "prerotate")
    with pytest.raises(ValueError, match="PYENCODER_ROPE_MODE"):
        tri._rope_mode()


def gpu_quick(name, p):
    """The fast GPU tier (tests/conftest.py): one bf16 prerotate case."""
    return name == "test_gpu_pre_grid" and p["dtype"] == torch.bfloat16 and p["D"] == 64 \
        and p["kind"][0] == "band"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("kind", [("band", 250, 3, 0), ("chunked", 4, 128, 3)])
def test_gpu_pre_grid(dtype, D, kind, _pre_mode):
    _fa_rule_case(2, 4, 2, 1000, 1000, D, kind, Rope(D), [1000, 613], dtype)
    assert _pre_mode and True in _pre_mode and False in _pre_mode
