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
    released, q_pos = RW.ring_write(st, q, k, v, None, False, 2)
    assert torch.equal(st.v[1, :, 4:5], v[1, :, :1])
    assert torch.equal(released[1], q[1]) and torch.equal(q_pos[2], torch.tensor([7, 8]))
    x, a = torch.randn(5, n, D), torch.randn(5, n, D)
    s, _ = RW.residual_step(torch.zeros(5, 4, D), torch.zeros(5, dtype=torch.int64), x, a, 2)
    assert torch.equal(s, x + a)
    # a kernel that puts the batch on a limited axis meets the clear error
    from pyencoder.triton_kernels.ring_write import _ring_write_kernel
    with pytest.raises(ValueError, match="axis 1"):
        TO.launch(_ring_write_kernel)[(1, 4)]()
