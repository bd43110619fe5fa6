"""CUDA's launch grid allows at most 65535 programs along its second and third axes. Kernels whose
program count grows with batch * heads (the streaming ring write: many streams x 12 heads passes
65535 at ~5,500 streams, within an H200's memory) put it on the first axis; the others say so in
their ``supports_*`` (auto selection then takes another backend), and a forced launch past the
limit raises a clear error (``_triton_op._check_grid``) instead of CUDA's "invalid argument"."""
import os

import pytest
import torch

from conftest import has_triton

pytestmark = pytest.mark.skipif(not has_triton(), reason="triton is not installed")

from pyencoder.ops import _triton_op as TO  # noqa: E402


def test_check_grid_names_kernel_axis_and_limit():
    from pyencoder.triton_kernels.ring_write import _ring_write_kernel
    TO._check_grid(_ring_write_kernel, (10 ** 6, 1, 1))         # the first axis: no limit here
    TO._check_grid(_ring_write_kernel, (1, TO.MAX_GRID_YZ, TO.MAX_GRID_YZ))
    for grid, axis in (((1, TO.MAX_GRID_YZ + 1), 1), ((1, 2, 70000), 2),
                       (TO.BlockGrid(100, "BLOCK_M", 70000), 1)):
        with pytest.raises(ValueError) as e:
            TO._check_grid(_ring_write_kernel, grid)
        msg = str(e.value)
        assert "_ring_write_kernel" in msg and f"axis {axis}" in msg and "65535" in msg


def _big(*shape, dtype=torch.float32):
    # the shape the check sees, without the memory
    return torch.zeros((1,) + shape[1:], dtype=dtype).expand(shape)


def test_supports_reasons_past_the_grid_limit():
    """Batch * heads (attention) or batch (convs, fused ConvNeXt) past 65535: a reason, so auto
    selection takes another backend and a forced one names the limit."""
    from pyencoder.ops import _attention_triton as AT
    from pyencoder.ops import _conv_triton as CT
    from pyencoder.ops import _convnext_triton as XT
    q = _big(7000, 10, 4, 8)
    assert "65535" in AT.supports_forward(q, q, q)
    assert AT.supports_forward(q[:6000], q[:6000], q[:6000]) is None     # 60000 rows: fine
    x, w = _big(70000, 2, 8), torch.randn(2, 1, 3)
    assert "65535" in CT.supports_forward(x=x, weight=w)
    assert CT.supports_forward(x=x[:65535], weight=w) is None
    assert "65535" in XT.supports_forward(x=x, conv_weight=torch.randn(2, 1, 7))
    # pyencoder._C's depthwise kernels (batch on grid axis 2 / 1); its cuDNN route has no limit
    from pyencoder.ops import _conv_cuda as CU
    assert "65535" in CU._kind(x, w, 1, 2) and CU._kind(x[:9], w, 1, 2) == "depthwise"
    assert CU._kind(x, torch.randn(4, 2, 3), 2, 1) == "cudnn"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                    reason="the interpreter on CPU tensors")
def test_streaming_kernels_take_batch_times_heads_on_axis0(monkeypatch):
    """With the limit lowered to 3, the ring write (B * H = 6 programs per frame block) and the
    residual kernel (B = 5) still run: their batch axis is the unlimited one."""
    from pyencoder.ops import _ring_write_triton as RW
    monkeypatch.setattr(TO, "MAX_GRID_YZ", 3)
    monkeypatch.setattr(RW, "FORCE_INTERPRET", True)
    B, H, n, D = 3, 2, 2, 8

    class St:
        pass
    st = St()
    st.k, st.v = torch.zeros(B, H, 5, D), torch.zeros(B, H, 5, D)
    st.q = torch.zeros(B, H, 6, D)
    st.pos, st.pending = torch.tensor([0, 4, 9]), torch.tensor([1, 0, 2])
    q, k, v = (torch.randn(B, H, n, D) for _ in range(3))
    released, q_pos, n_keys = RW.ring_write(st, q, k, v, None, False, 2)
    assert torch.equal(st.v[1, :, 4:5], v[1, :, :1])
    assert torch.equal(released[1], q[1]) and torch.equal(q_pos[2], torch.tensor([7, 8]))
    assert torch.equal(n_keys, torch.tensor([2, 6, 11]))
    x, a = torch.randn(5, n, D), torch.randn(5, n, D)
    s, _ = RW.residual_step(torch.zeros(5, 4, D), torch.zeros(5, dtype=torch.int64), x, a, 2)
    assert torch.equal(s, x + a)
    # a kernel that puts the batch on a limited axis meets the clear error
    from pyencoder.triton_kernels.ring_write import _ring_write_kernel
    with pytest.raises(ValueError, match="axis 1"):
        TO.launch(_ring_write_kernel)[(1, 4)]()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                    reason="the interpreter on CPU tensors")
@pytest.mark.parametrize("case", ["band_rope_lengths", "chunked_bias_gate", "gqa_sink"])
def test_attention_splits_a_batch_past_the_grid_limit(case, monkeypatch):
    """Batch * heads past the grid limit (lowered to 5 here) on the triton backend: the batch is
    split into launches that fit (2 + 2 + 1 of B = 5, H = 2), and the result, the lse and every
    gradient equal the reference's; no launch past the limit."""
    import pyencoder
    from pyencoder import IntervalMask, Rope
    from pyencoder.ops import interval_attention
    from pyencoder.ops import _attention_triton as AT
    torch.manual_seed(3)
    monkeypatch.setattr(TO, "MAX_GRID_YZ", 5)
    B, H, N, D = 5, 2, 12, 16
    Hk = 1 if case == "gqa_sink" else H
    q = torch.randn(B, H, N, D, requires_grad=True)
    k, v = (torch.randn(B, Hk, N, D, requires_grad=True) for _ in range(2))
    kw = {}
    if case == "band_rope_lengths":
        mask = IntervalMask.band(3, 1)
        kw = dict(rope=Rope(D), key_lengths=torch.tensor([12, 7, 12, 3, 9]))
    elif case == "chunked_bias_gate":
        mask = IntervalMask.chunked(4, 1, 1)
        from pyencoder.ops.attention import relative_offsets
        lo, hi = relative_offsets(N, N, block=4, lo_off=-4, hi_off=4)
        kw = dict(rel_bias=torch.randn(H, hi - lo + 1, requires_grad=True),
                  gate=torch.rand(B, H, N, requires_grad=True))
    else:
        mask = IntervalMask.band(2, 0, sink=2)
    launches = []
    real = AT.launch

    class Spy:
        def __init__(self, kernel):
            self.ln = real(kernel)

        def __getitem__(self, grid):
            launches.append(tuple(grid) if isinstance(grid, (tuple, list)) else (None, grid.rows))
            return self.ln[grid]
    monkeypatch.setattr(AT, "launch", Spy)
    outs = {}
    for backend in ("triton", "reference"):
        out, lse = interval_attention(q, k, v, mask=mask, backend=backend, return_lse=True, **kw)
        grads = torch.autograd.grad(out.square().sum(), [q, k, v] + [
            t for t in kw.values() if isinstance(t, torch.Tensor) and t.requires_grad])
        outs[backend] = (out, lse, grads)
    assert launches and all(g[1] is None or g[1] <= 5 for g in launches), launches
    (o1, l1, g1), (o2, l2, g2) = outs["triton"], outs["reference"]
    torch.testing.assert_close(o1, o2, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(l1, l2, rtol=2e-5, atol=2e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pyencoder.use_backend(attention="triton"):
        # one part alone fits: no split
        y = interval_attention(q[:2].detach(), k[:2].detach(), v[:2].detach(), mask=mask)
    assert y.shape == (2, H, N, D)
