"""Shared by the fused norm kernels' tests (tests/test_running_norm_triton.py,
tests/test_channel_norm_triton.py): where they run (a GPU, or TRITON_INTERPRET=1 with the fused
kernels' ``FORCE_INTERPRET``), the launchers' NaN-poisoned outputs, and the tolerances of a
kernel that rounds as torch does."""
import os

import pytest
import torch

from conftest import has_triton

NEEDS_TRITON_RUN = pytest.mark.skipif(not has_triton() or not (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton (a GPU, or TRITON_INTERPRET=1)")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
ULP = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def force_fused(monkeypatch, launcher):
    """The fused kernels on CPU tensors through the interpreter (the ring write's switch, which
    every fused launcher shares), the launcher's outputs NaN-filled before each launch (an
    element the kernel does not write reads NaN)."""
    from pyencoder.ops import _ring_write_triton
    monkeypatch.setattr(_ring_write_triton, "FORCE_INTERPRET", True)
    monkeypatch.setattr(launcher, "POISON_OUTPUTS", True)


def check_ulp(y, want, dt):
    """y within one ulp of its magnitude (a rounding tie that another summation order moved)."""
    tol = ULP[dt] * want.abs().float().clamp_min(1e-3) + 1e-30
    err = (y.float() - want.float()).abs()
    assert (err <= tol).all(), err.max()


def check_act(y, want, dt):
    """A kernel's output with a GELU (or whose float32 statistics are summed in another order):
    float32 within 2e-5 relative / 2e-6 absolute (erf's implementations, the interpreter's or
    Triton's and torch's, a few float32 ulps apart, more relative to a negative input's small
    GELU, where 1 + erf(x) cancels); 16-bit within two ulps of the value (the GELU of an input one
    ulp apart), absolute near zero."""
    if dt == torch.float32:
        torch.testing.assert_close(y, want, rtol=2e-5, atol=2e-6)
        return
    tol = 2 * ULP[dt] * want.abs().float().clamp_min(2e-2)
    err = (y.float() - want.float()).abs()
    assert (err <= tol).all(), err.max()


def norm_inputs(B, C, T, dt, affine, seed):
    """Random x (B, C, T) off zero mean and an affine (weight near 1, bias) of dtype dt, or None;
    bfloat16 skips under the interpreter (it rounds float32 -> bfloat16 by truncation)."""
    if dt == torch.bfloat16 and DEV == "cpu":
        pytest.skip("the interpreter rounds float32 -> bfloat16 by truncation (bf16 on a GPU)")
    torch.manual_seed(seed)
    x = (torch.randn(B, C, T, device=DEV) * 2 + 0.5).to(dt)
    w = (1 + 0.3 * torch.randn(C, device=DEV)).to(dt) if affine else None
    b = (0.2 * torch.randn(C, device=DEV)).to(dt) if affine else None
    return x, w, b
