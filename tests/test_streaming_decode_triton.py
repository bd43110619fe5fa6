"""Triton decode-step attention vs the reference, under TRITON_INTERPRET=1 on CPU at tiny shapes
(and natively on a GPU), plus a module streamed with the Triton decode path."""
import pytest
import torch

from conftest import has_triton
from pyencoder import Rope
from pyencoder.reference.decode_attention import decode_attention_reference

pytestmark = pytest.mark.skipif(not has_triton(), reason="triton is not installed")


def _args(B, H, M, D, cap, rope, lo_off, hi_off, block, dtype, device):
    q = torch.randn(B, H, M, D, dtype=dtype, device=device)
    k = torch.randn(B, H, cap, D, dtype=dtype, device=device)
    v = torch.randn(B, H, cap, D, dtype=dtype, device=device)
    n = torch.tensor([0, 5, 3 * cap + 2][:B], device=device)
    cnt = torch.tensor([0, 2, M][:B], device=device)
    qpos = (n - hi_off - 1).clamp(min=0)[:, None] + torch.arange(M, device=device)
    inv = None if rope is None else rope.inv_freq(device)
    return (q, k, v, qpos, cnt, n, inv, False if rope is None else rope.interleaved, block,
            lo_off, hi_off, D ** -0.5)


@pytest.mark.parametrize("D", [16, 24])
@pytest.mark.parametrize("rope", [None, Rope(8), Rope(16, interleaved=True)])
@pytest.mark.parametrize("mask", [(1, 6, 2), (4, 8, 5), (1, -1, 0)])
def test_decode_kernel_matches_reference(D, rope, mask):
    from pyencoder.ops._decode_attention_triton import decode_attention_triton
    block, lo, hi = mask
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    args = _args(3, 2, 5, D, 13, rope, lo, hi, block, torch.float32, dev)
    ref = decode_attention_reference(*args)
    out = decode_attention_triton(*args)
    # fp32 with ieee dot: same math, different summation order -> a few ulp on O(1) values.
    assert torch.allclose(out, ref, atol=2e-6, rtol=1e-5)
    assert torch.all(out[0] == 0) and torch.all(out[1, :, 2:] == 0)


def test_module_step_with_triton_decode_equals_offline():
    from _stream_utils import rel_err, stream
    from pyencoder.nn import BandedSelfAttention
    m = BandedSelfAttention(16, 2, left=5, right=2)
    m.decode_backend = "triton"
    x = torch.randn(2, 23, 16)
    with torch.no_grad():
        assert rel_err(stream(m, x, [3, 1, 5], 1, max_chunk=4), m(x)) <= 1e-5


@pytest.mark.gpu
@pytest.mark.gpu_quick
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_decode_kernel_half_on_gpu(dtype, tol):
    # Half inputs: the kernel rounds rotated q and p to the input dtype before tl.dot, the
    # reference stays in fp32; tolerance ~ a few ulp of the dtype on O(1) outputs.
    from pyencoder.ops._decode_attention_triton import decode_attention_triton
    args = _args(3, 4, 7, 64, 300, Rope(64), 250, 3, 1, dtype, "cuda")
    ref = decode_attention_reference(*args).float()
    out = decode_attention_triton(*args).float()
    assert torch.allclose(out, ref, atol=tol, rtol=tol)
