"""The streaming protocol's declarations (pyencoder.streaming.protocol): drivers and latency read
attributes, never module classes of pyencoder.nn."""
import subprocess
import sys

import pytest
import torch
from torch import nn

from pyencoder.nn import CausalConv1d, Transpose
from pyencoder.streaming import StreamingSequential, latency, run_stream
from pyencoder.streaming import protocol


def test_streaming_imports_no_nn():
    code = ("import sys, pyencoder.streaming; "
            "print(sorted(m for m in sys.modules if m.startswith('pyencoder.nn')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_declarations_of_nn_modules():
    conv = CausalConv1d(3, 3, 2)
    assert protocol.time_last(conv) and protocol.is_streaming(conv)
    assert not protocol.is_pointwise(conv)
    t = Transpose()
    assert protocol.is_pointwise(t) and protocol.swaps_time_axis(t) and not protocol.time_last(t)
    assert protocol.is_pointwise(nn.GELU()) and not protocol.swaps_time_axis(nn.GELU())
    assert not protocol.is_pointwise(nn.Softmax(-1))
    assert set(protocol.POINTWISE) < set(protocol.ZERO_LATENCY)


class _Scale(nn.Module):
    streaming_pointwise = True
    lookahead = 0
    hop = 1

    def __init__(self):
        super().__init__()
        self.s = float(torch.rand(()) + 0.5)

    def forward(self, x):
        return x * self.s


class _TimeLastConv(CausalConv1d):
    pass


def test_declared_modules_stream():
    torch.manual_seed(0)
    m = StreamingSequential(_TimeLastConv(4, 4, 3), _Scale(), Transpose(), nn.Linear(4, 5)).eval()
    assert protocol.time_last(m) and not m.out_time_last()
    x = torch.randn(2, 4, 13)
    with torch.no_grad():
        y = run_stream(m, x, (1, 4, 2))
        ref = m[3](m[2](m[1](m[0](x))))
    assert y.shape == ref.shape == (2, 13, 5)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    assert latency(m).lookahead_samples == 0


def test_run_stream_names_a_module_of_several_inputs():
    """run_stream feeds step(x, state): FrameCrossAttention's step(x_q, x_kv, state) failed
    inside it ("missing 1 required positional argument: 'state'")."""
    from pyencoder import IntervalMask
    from pyencoder.nn import FrameCrossAttention
    from pyencoder.streaming import run_stream
    m = FrameCrossAttention(16, 2, mask=IntervalMask.band(2, 1))
    with pytest.raises(TypeError, match=r"run_stream drives modules whose step takes one input.*"
                                        r"FrameCrossAttention.step takes 2 \(x_q, x_kv\)"):
        run_stream(m, torch.randn(1, 10, 16), [3])
