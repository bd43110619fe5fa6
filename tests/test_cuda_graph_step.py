"""pyencoder.streaming.CudaGraphStep (a module's step_fixed captured in a CUDA graph) and
mirror_step_caches (the per-state caches of a warm-up on a copy, built on the state itself).

CPU: argument errors; mirror_step_caches leaves a state whose first step_fixed dispatches the ops
of a steady step and no more (no counter fill, no index arithmetic: what a graph captured then
would replay) and computes the same outputs as without it (float64, bit for bit), for the bench
stack and a whole CausalEncoder; states of another structure are refused.
GPU (marked): replays equal the eager step_fixed on a copy of the state (fp32 1e-5, bf16 2e-2:
only a cuBLAS algorithm choice may differ under capture), construction does not advance the
stream, check() catches a state whose tensors a general step replaced, a bad input is refused.
"""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _stream_utils import rel_err
from test_encoder_step_fixed import _encoder, _frames
from pyencoder.streaming import CudaGraphStep
from pyencoder.streaming.state import mirror_step_caches


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _stack():
    from benchmarks.bench_streaming import build
    torch.manual_seed(0)
    return build(layers=2, dim=16, heads=2, ffn=32, conv_dim=8, mask="chunked", chunk=2,
                 left_chunks=3, lookahead=1).double()


def _warm(model, n, steps, B=2, max_chunk=4):
    x = torch.randn(B, 1, n * (steps + 4), dtype=torch.float64)
    st = model.init_state(B, max_chunk=max_chunk)
    for i in range(steps):
        model.step(x[..., i * n:(i + 1) * n], st)
    return st, x


@pytest.mark.parametrize("which", ["stack", "encoder"])
def test_mirror_step_caches_first_step_is_steady(which):
    if which == "stack":
        model, n = _stack(), 320 * 2
    else:
        model = _encoder("w2v2_geometry_hubert_bn")
        n = model.hop * _frames(model)
    with torch.no_grad():
        st, x = _warm(model, n, 6)
        plain = copy.deepcopy(st)
        scratch = copy.deepcopy(st)
        model.step_fixed(x[..., 6 * n:7 * n], scratch, check=True)
        model.step_fixed(x[..., 6 * n:7 * n], scratch)
        mirror_step_caches(scratch, st)
        first = _Ops()
        with first:
            y1 = model.step_fixed(x[..., 6 * n:7 * n], st)
        steady = _Ops()
        with steady:
            y2 = model.step_fixed(x[..., 7 * n:8 * n], st)
        # without the mirror the first step builds its caches (fills, index arithmetic)
        cold = _Ops()
        with cold:
            z1 = model.step_fixed(x[..., 6 * n:7 * n], plain)
        z2 = model.step_fixed(x[..., 7 * n:8 * n], plain)
    assert sorted(first.names) == sorted(steady.names)
    assert "fill_" not in first.names, first.names
    assert len(cold.names) > len(first.names)
    assert torch.equal(y1, z1) and torch.equal(y2, z2)


def test_mirror_step_caches_refuses_other_states():
    a = _stack()
    b = _encoder("band_postln_valid")
    with pytest.raises(ValueError, match="states differ"):
        mirror_step_caches(a.init_state(1), b.init_state(1))


def test_cuda_graph_step_argument_errors():
    m = _stack()
    st = m.init_state(1)
    with pytest.raises(ValueError, match="CUDA tensor"):
        CudaGraphStep(m, st, torch.randn(1, 1, 640, dtype=torch.float64))
    with pytest.raises(TypeError, match="has no step_fixed"):
        CudaGraphStep(torch.nn.Linear(2, 2), st, torch.randn(1, 1, 640))
    with pytest.raises(TypeError, match="StreamState"):
        CudaGraphStep(m, {"k": 1}, torch.randn(1, 1, 640))
    with pytest.raises(TypeError, match="example must be a torch.Tensor"):
        CudaGraphStep(m, st, [0.0] * 640)
    with pytest.raises(TypeError, match="or a tuple of them"):
        CudaGraphStep(m, st, ())
    with pytest.raises(ValueError, match="every input on one device"):
        CudaGraphStep(m, st, (torch.randn(1, 1, 640), torch.randn(1, 2)))


def test_admit_of_a_two_input_step_wants_tuples():
    """CudaGraphStep.admit of a captured two-input step (FrameCrossAttention) names the chunk
    form it wants (the capture itself needs a GPU: the helper is built around one here)."""
    from pyencoder import IntervalMask
    from pyencoder.nn import FrameCrossAttention
    m = FrameCrossAttention(8, 2, mask=IntervalMask.frames(1, 2, 1, 1))
    g = CudaGraphStep.__new__(CudaGraphStep)
    g.module, g.state = m, m.init_state(2)
    g.xs = (torch.randn(2, 1, 8), torch.randn(2, 2, 8))
    g.x = g.xs[0]
    for bad in (torch.randn(1, 1, 8), [torch.randn(1, 1, 8)], [(torch.randn(1, 1, 8),)]):
        with pytest.raises(ValueError, match="list of 2-tuples"):
            g.admit(1, bad)


# ---- GPU ---------------------------------------------------------------------------------

def gpu_quick(name, p):
    """The fast GPU tier (tests/conftest.py): the encoder in bf16."""
    return name == "test_cuda_graph_step_replays" and p["dtype"] == torch.bfloat16 and \
        p["which"] == "encoder"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("which", ["stack", "encoder"])
def test_cuda_graph_step_replays(which, dtype):
    dev = "cuda"
    if which == "stack":
        model, n = _stack(), 320 * 2
    else:
        model = _encoder("w2v2_geometry_hubert_bn", dtype=torch.float32, seed=8)
        n = model.hop * _frames(model)
    model = model.to(dev, dtype)
    B, steps = 2, 6
    x = torch.randn(B, 1, n * (6 + steps), device=dev, dtype=dtype)
    with torch.no_grad():
        st = model.init_state(B, max_chunk=4)
        for i in range(6):
            model.step(x[..., i * n:(i + 1) * n], st)
        eager = copy.deepcopy(st)
        before = {k: v.clone() for k, v in st.tensors().items()}
        g = CudaGraphStep(model, st, x[..., :n])
        torch.cuda.synchronize()
        for k, v in st.tensors().items():          # the stream was not advanced
            if not k.endswith("out_lengths"):
                assert torch.equal(v, before[k]), k
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for i in range(6, 6 + steps):
            xi = x[..., i * n:(i + 1) * n]
            y = g(xi, check=i == 6).clone()
            ye = model.step_fixed(xi, eager)
            torch.cuda.synchronize()
            assert rel_err(y.float(), ye.float()) <= tol, i
        with pytest.raises(ValueError, match="x must be"):
            g(x[..., :n + 1])
        model.step(x[..., :n], st)                  # a general step replaces state tensors
        with pytest.raises(RuntimeError, match="replaced since capture"):
            g.check()
        model.flush(st)                             # the streams end: replays are refused
        with pytest.raises(ValueError, match="CudaGraphStep: this state was flushed"):
            g(x[..., :n])
