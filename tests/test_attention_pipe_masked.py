"""PYENCODER_PIPELINE_MASKED: the boundary-block loops of the Triton attention kernels pipelined
(constexpr PIPE_MASKED). Off by default (None: the kernels' code before the flag); on, 16-bit
head_dim <= 128 only. Results are the same either way (a scheduling choice): checked in the
interpreter against the float64 reference, forward and all gradients."""
import pytest
import torch

A = pytest.importorskip("pyencoder.ops._attention_triton")
pytest.importorskip("triton")

import pyencoder  # noqa: E402


def _spy(monkeypatch):
    seen = []
    real = A._launch

    def spy(name, grid_fn, args, consts, pinned=False):
        seen.append((name, consts.get("PIPE_MASKED")))
        return real(name, grid_fn, args, consts, pinned)
    monkeypatch.setattr(A, "_launch", spy)
    return seen


@pytest.mark.parametrize("flag,dtype,D,want", [
    (None, torch.float16, 32, None), ("0", torch.float16, 32, None),
    ("1", torch.float16, 32, True), ("1", torch.float32, 32, None),
    ("1", torch.float16, 160, None)])
def test_flag_reaches_every_kernel(monkeypatch, flag, dtype, D, want):
    if flag is None:
        monkeypatch.delenv("PYENCODER_PIPELINE_MASKED", raising=False)
    else:
        monkeypatch.setenv("PYENCODER_PIPELINE_MASKED", flag)
    q = torch.empty(1, 2, 8, D, dtype=dtype)
    assert A._consts(q, D, 0, D, 3, None, False, False)["PIPE_MASKED"] is want


def test_flag_rejects_bad_value(monkeypatch):
    monkeypatch.setenv("PYENCODER_PIPELINE_MASKED", "maybe")
    q = torch.empty(1, 2, 8, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="PYENCODER_PIPELINE_MASKED must be one of"):
        A._consts(q, 32, 0, 32, 3, None, False, False)


@pytest.mark.parametrize("mask", [pyencoder.IntervalMask.band(5, 2),
                                  pyencoder.IntervalMask.chunked(4, 1, 1),
                                  pyencoder.IntervalMask.band(3, 1, sink=2)])
def test_pipelined_matches_reference(monkeypatch, mask):
    monkeypatch.setenv("PYENCODER_PIPELINE_MASKED", "1")
    seen = _spy(monkeypatch)
    g = torch.Generator().manual_seed(11)
    B, H, N, D = 2, 2, 37, 16
    leaves = [torch.randn(B, H, N, D, generator=g, dtype=torch.float16).requires_grad_()
              for _ in range(3)]
    rope = pyencoder.Rope(D)
    out = pyencoder.ops.interval_attention(*leaves, mask=mask, rope=rope, backend="triton")
    do = torch.randn(out.shape, generator=g, dtype=torch.float16)
    grads = torch.autograd.grad(out, leaves, do)
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref = pyencoder.ops.interval_attention(*ref_leaves, mask=mask, rope=rope,
                                           backend="reference")
    ref_grads = torch.autograd.grad(ref, ref_leaves, do.double())
    # fp16 inputs, float32 accumulation: fp16 output rounding plus the fp16 P / dS operands
    torch.testing.assert_close(out.double(), ref, atol=3e-3, rtol=3e-3)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, atol=1e-2, rtol=1e-2)
    assert {n for n, _ in seen} >= {"fwd", "dq", "dkdv"}
    assert all(v is True for n, v in seen if n in ("fwd", "dq", "dkdv"))
