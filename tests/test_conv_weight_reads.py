"""A CausalConv1d reads its weight once per forward / step: SharedCausalConv1d (the HF streaming
encoder's positional conv) computes its weight-norm parametrisation on every read, so a second
read per step is a second full weight norm. The outputs are checked against a plain-torch
reference on the same (parametrised) weight."""
import torch
import torch.nn.functional as F
from torch import nn

from pyencoder.models.encoder import SharedCausalConv1d


def _shared(C=24, k=7, groups=4):
    src = nn.Conv1d(C, C, k, groups=groups)
    src = nn.utils.parametrizations.weight_norm(src, name="weight", dim=2)
    return SharedCausalConv1d(src, nn.GELU()).eval(), src


def _count_reads(monkeypatch):
    reads = []
    orig = SharedCausalConv1d.weight

    def weight(self):
        reads.append(1)
        return orig.fget(self)
    monkeypatch.setattr(SharedCausalConv1d, "weight", property(weight))
    return reads


def _ref(x, src):
    k = src.kernel_size[0]
    return F.gelu(F.conv1d(F.pad(x.double(), (k - 1, 0)), src.weight.double(),
                           src.bias.double(), groups=src.groups)).float()


def test_step_and_forward_read_weight_once(monkeypatch):
    m, src = _shared()
    x = torch.randn(2, 24, 11)
    reads = _count_reads(monkeypatch)
    with torch.no_grad():
        y = m(x)
        assert len(reads) == 1
        torch.testing.assert_close(y, _ref(x, src), rtol=1e-5, atol=1e-5)
        st = m.init_state(2)
        reads.clear()
        outs = []
        for a, b in ((0, 4), (4, 5), (5, 11)):
            y, st = m.step(x[..., a:b], st)
            outs.append(y)
            assert len(reads) == 1
            reads.clear()
        torch.testing.assert_close(torch.cat(outs, -1), _ref(x, src), rtol=1e-5, atol=1e-5)
