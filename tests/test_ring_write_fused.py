"""The fused streaming-state write of ``step_fixed`` (triton_kernels/ring_write.py via
pyencoder.ops._ring_write_triton): one kernel writes the rotated keys, the values and the
queries of every slot, where the plain-torch step runs ~20 small kernels per layer.

Checked on CPU under TRITON_INTERPRET=1 (``FORCE_INTERPRET``): the state tensors it writes equal
the plain-torch write's (the ring wraps, slots sit at different positions and pending counts, NeoX /
interleaved / partial / no RoPE, a bfloat16 ring fed float32 frames), except the rotated keys,
which agree to float32 rounding (cos / sin from another library), and step_fixed with it equals
step_fixed without it and the offline forward over a whole stream (band and chunked
masks, the tolerance of tests/test_streaming_fixed.py). GPU (``-m gpu``): the same compiled;
the CUDA-graph tests of tests/test_streaming_fixed.py replay step_fixed with it (the CUDA
default).
"""
import os

import pytest
import torch

from conftest import has_triton

pytestmark = pytest.mark.skipif(not has_triton() or not (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton (a GPU, or TRITON_INTERPRET=1)")

from pyencoder import Rope  # noqa: E402
from pyencoder.nn import BandedSelfAttention, ChunkedSelfAttention  # noqa: E402
from pyencoder.ops import _ring_write_triton as RW  # noqa: E402
from pyencoder.rope import apply_rope  # noqa: E402

_DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _force(monkeypatch):
    monkeypatch.setattr(RW, "FORCE_INTERPRET", True)


class _State:
    def __init__(self, B, H, cap, qcap, D, dtype, pos, pend):
        self.k = torch.randn(B, H, cap, D, device=_DEV).to(dtype)
        self.v = torch.randn(B, H, cap, D, device=_DEV).to(dtype)
        self.q = torch.randn(B, H, qcap, D, device=_DEV).to(dtype)
        self.pos = torch.tensor(pos, device=_DEV)
        self.pending = torch.tensor(pend, device=_DEV)

    def clone(self):
        c = object.__new__(_State)
        c.__dict__ = {k: v.clone() for k, v in self.__dict__.items()}
        return c


def _torch_write(st, q, k, v, inv, interleaved):
    B, H, n, D = q.shape
    ar = torch.arange(n, device=_DEV)
    kpos = st.pos[:, None] + ar[None, :]
    if inv is not None:
        k = apply_rope(k, kpos, inv, interleaved)
    bidx = torch.arange(B, device=_DEV)[:, None].expand(B, n)
    slot = torch.remainder(kpos, st.k.shape[2])
    st.k[bidx, :, slot] = k.transpose(1, 2).to(st.k.dtype)
    st.v[bidx, :, slot] = v.transpose(1, 2).to(st.v.dtype)
    st.q[bidx, :, st.pending[:, None] + ar[None, :]] = q.transpose(1, 2).to(st.q.dtype)


@pytest.mark.parametrize("rope", [None, (16, False), (16, True), (8, False)],
                         ids=["norope", "neox", "interleaved", "partial"])
@pytest.mark.parametrize("ring_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16ring"])
def test_fused_write_equals_torch_write(rope, ring_dtype):
    B, H, n, D, cap, qcap = 3, 2, 5, 16, 7, 9
    st = _State(B, H, cap, qcap, D, ring_dtype, [0, 13, 1000003], [0, 2, 4])
    # new frames as the module makes them: (B, n, H, D) projections viewed as (B, H, n, D)
    q, k, v = (torch.randn(B, n, H, D, device=_DEV).transpose(1, 2) for _ in range(3))
    inv = None if rope is None else Rope(rope[0], interleaved=rope[1]).inv_freq(_DEV)
    inter = False if rope is None else rope[1]
    want = st.clone()
    _torch_write(want, q, k, v, inv, inter)
    RW.ring_write(st, q, k, v, inv, inter)
    # values and queries are copies (exact in float32; a bf16 ring: the interpreter's float32 ->
    # bfloat16 conversion may round differently from torch's, one bf16 ulp); the keys' rotation
    # agrees to float32 rounding (cos / sin of another library: an ulp here and there)
    tol = 1e-6 if ring_dtype == torch.float32 else 8e-3
    if ring_dtype == torch.float32:
        assert torch.equal(st.v, want.v) and torch.equal(st.q, want.q)
    for name in ("v", "q"):
        torch.testing.assert_close(getattr(st, name).float(), getattr(want, name).float(),
                                   rtol=tol, atol=tol, msg=name)
    torch.testing.assert_close(st.k.float(), want.k.float(), rtol=tol, atol=tol)


def test_fused_ok_conditions(monkeypatch):
    st = _State(1, 2, 4, 4, 8, torch.float32, [0], [0])
    q = torch.randn(1, 2, 1, 8, device=_DEV)
    assert RW.fused_ok(q, st, q)
    assert not RW.fused_ok(q, st, torch.randn(1, 4, 1, 8, device=_DEV))   # other head count
    monkeypatch.setenv("PYENCODER_FUSED_RING", "0")
    assert not RW.fused_ok(q, st, q)
    monkeypatch.delenv("PYENCODER_FUSED_RING")
    monkeypatch.setattr(RW, "FORCE_INTERPRET", False)
    assert RW.fused_ok(q, st, q) == (_DEV == "cuda")


_STEP_CASES = [
    (lambda: BandedSelfAttention(16, 2, left=6, right=2, rope=True), 1),
    (lambda: ChunkedSelfAttention(16, 2, chunk_size=3, left_chunks=2, lookahead=2, rope=True), 3),
]


def _step_fixed_case(make, n, monkeypatch):
    torch.manual_seed(0)
    m = make().to(_DEV).eval()
    x = torch.randn(2, 30, 16, device=_DEV)
    outs = {}
    for fused in (True, False):
        monkeypatch.setenv("PYENCODER_FUSED_RING", "1" if fused else "0")
        calls = []
        real = RW.ring_write
        monkeypatch.setattr(RW, "ring_write", lambda *a: calls.append(1) or real(*a))
        with torch.no_grad():
            st = m.init_state(2, max_chunk=n)
            y, st = m.step(x[:, :5], st)
            ys, t = [y[:, :int(st.out_lengths[0])]], 5
            while t + n <= x.shape[1]:
                ys.append(m.step_fixed(x[:, t:t + n], st, check=(t == 5)))
                t += n
        outs[fused] = torch.cat(ys, 1)
        assert bool(calls) == fused
        monkeypatch.setattr(RW, "ring_write", real)
    assert (outs[True] - outs[False]).abs().max() <= 1e-5
    with torch.no_grad():
        ref = m(x)
    assert (outs[True] - ref[:, :outs[True].shape[1]]).abs().max() <= 1e-5


@pytest.mark.parametrize("case", range(len(_STEP_CASES)), ids=["band", "chunked"])
def test_step_fixed_with_fused_write(case, monkeypatch):
    """step_fixed with the fused write == step_fixed with the torch write == offline (float32)."""
    _step_fixed_case(*_STEP_CASES[case], monkeypatch)


def gpu_quick(name, p):
    return name == "test_gpu_step_fixed_with_fused_write"


@pytest.mark.gpu
def test_gpu_step_fixed_with_fused_write(monkeypatch):
    """The same on a GPU (the kernel compiled, not interpreted); the CUDA-graph tests of
    tests/test_streaming_fixed.py replay step_fixed with it (the default on CUDA)."""
    for make, n in _STEP_CASES:
        _step_fixed_case(make, n, monkeypatch)
