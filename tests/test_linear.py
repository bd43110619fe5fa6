"""pyencoder.nn.Linear / linear: the skinny CPU GEMM path equals F.linear to fp32 rounding.

The oracle is the float64 product; the skinny path's error must be within a small multiple of
F.linear's own fp32 error on the same inputs (both are one fp32 GEMM with different blocking)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyencoder.nn import Linear
from pyencoder.nn import linear as L


def _err(y, ref):
    return (y.double() - ref).abs().max().item()


def _check_close(y, x, w, b):
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    base = F.linear(x, w, b)
    scale = ref.abs().max().item()
    # 2x the stock kernel's error, plus a floor of a few fp32 ulps of the output scale (the
    # stock kernel can be exact by luck on a small product).
    assert _err(y, ref) <= 2 * _err(base, ref) + 8 * 2 ** -24 * scale * (w.shape[1] ** 0.5)
    assert y.shape == base.shape and y.dtype == base.dtype and y.is_contiguous()


@pytest.mark.parametrize("lead", [(1,), (2,), (3,), (4,), (1, 1), (1, 3), (2, 2), (1, 1, 4), (5,),
                                  (2, 3), (2, 8)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("inf", [48, 1536, 3072])
def test_functional_matches_f_linear(lead, bias, inf):
    g = torch.Generator().manual_seed(hash((lead, bias, inf)) % 2 ** 31)
    x = torch.randn(*lead, inf, generator=g)
    w = torch.randn(40, inf, generator=g) / inf ** 0.5
    b = torch.randn(40, generator=g) if bias else None
    rows = x.numel() // inf
    assert L.uses_skinny_path(x, w) == (1 <= rows <= 5)
    _check_close(L.linear(x, w, b), x, w, b)


@pytest.mark.parametrize("inf,nb", [(48, 1), (1024, 1), (1536, 2), (3072, 3), (4096, 4),
                                    (1031, None)])
def test_k_blocks(inf, nb):
    assert L._k_blocks(inf) == nb


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("inf", [1536, 3072, 1031])
def test_module_blocked_weight(rows, inf):
    torch.manual_seed(rows * 7 + inf)
    m = Linear(inf, 24)
    x = torch.randn(1, rows, inf)
    with torch.no_grad():
        y = m(x)
        blk = m._blocks
        assert (blk is not None) == (L._k_blocks(inf) not in (None, 1))
        _check_close(y, x, m.weight, m.bias)
        # The block copy follows in-place weight updates (version bump) ...
        m.weight.mul_(-2.0)
        _check_close(m(x), x, m.weight, m.bias)
        # ... and load_state_dict (copy_ into the same storage).
        ref = nn.Linear(inf, 24)
        m.load_state_dict(ref.state_dict())
        _check_close(m(x), x, ref.weight, ref.bias)
    with torch.inference_mode():
        _check_close(m(x), x, m.weight, m.bias)


def test_module_is_nn_linear():
    m = Linear(16, 8)
    assert isinstance(m, nn.Linear)
    assert list(m.state_dict()) == list(nn.Linear(16, 8).state_dict())
    m.load_state_dict(nn.Linear(16, 8).state_dict())


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("inf", [40, 2048])
def test_gradients(rows, inf):
    torch.manual_seed(rows + inf)
    m = Linear(inf, 12)
    ref = nn.Linear(inf, 12)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(rows, inf, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    g = torch.randn(rows, 12)
    (m(x) * g).sum().backward()
    (ref(xr) * g).sum().backward()
    assert m._blocks is None  # no block copy when autograd records
    for a, b in ((x.grad, xr.grad), (m.weight.grad, ref.weight.grad), (m.bias.grad, ref.bias.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_frozen_weight_input_needs_grad():
    """A frozen layer inside a trained model: x needs a gradient, the weight does not."""
    m = Linear(2048, 8).requires_grad_(False)
    x = torch.randn(2, 2048, requires_grad=True)
    m(x).sum().backward()
    assert m._blocks is None
    torch.testing.assert_close(x.grad, m.weight.sum(0).expand(2, -1), rtol=1e-5, atol=1e-5)


def test_not_taken(monkeypatch):
    w = torch.randn(8, 16)
    assert not L.uses_skinny_path(torch.randn(6, 16), w)
    assert not L.uses_skinny_path(torch.randn(2, 16, dtype=torch.float64), w.double())
    assert not L.uses_skinny_path(torch.randn(2, 16, dtype=torch.bfloat16), w.bfloat16())
    assert not L.uses_skinny_path(torch.randn(0, 16), w)
    monkeypatch.setenv("PYENCODER_CPU_SKINNY_GEMM", "0")
    assert not L.uses_skinny_path(torch.randn(2, 16), w)


def test_shape_error():
    with pytest.raises(ValueError, match="features"):
        L.linear(torch.randn(2, 15), torch.randn(8, 16))


@pytest.mark.parametrize("inf,rows", [(32, 3), (2048, 1), (2048, 5), (2048, 7)])
def test_linear_view(inf, rows):
    """LinearView runs a foreign nn.Linear through the skinny path, reading its parameters at
    call time (updates of the wrapped module are seen)."""
    torch.manual_seed(inf + rows)
    lin = nn.Linear(inf, 10)
    view = L.skinny_view(lin)
    assert isinstance(view, L.LinearView) and view.weight is lin.weight and view.bias is lin.bias
    assert (view.in_features, view.out_features) == (inf, 10)
    assert list(view.parameters()) == list(lin.parameters())
    x = torch.randn(1, rows, inf)
    with torch.no_grad():
        _check_close(view(x), x, lin.weight, lin.bias)
        lin.load_state_dict(nn.Linear(inf, 10).state_dict())
        _check_close(view(x), x, lin.weight, lin.bias)
        lin.weight.add_(1.0)
        _check_close(view(x), x, lin.weight, lin.bias)
    y = view(x.requires_grad_(True))
    y.sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.sum(0).expand_as(x), rtol=1e-5, atol=1e-5)


def test_skinny_view_leaves_other_modules():
    class Lora(nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1

    for mod in (Lora(4, 4), Linear(4, 4), nn.Identity()):
        assert L.skinny_view(mod) is mod
    with pytest.raises(TypeError, match="nn.Linear"):
        L.LinearView(nn.Identity())


def test_cache_not_pickled_and_inference_tensor_reuse(tmp_path):
    """The K-block copy is not saved with the module; a copy built under inference_mode serves
    later no_grad and grad-enabled (nothing requires grad) calls."""
    import copy
    m = Linear(2048, 6).requires_grad_(False)
    x = torch.randn(2, 2048)
    with torch.inference_mode():
        m(x)
    assert m._blocks is not None
    _check_close(m(x), x, m.weight, m.bias)          # grad mode on, nothing requires grad
    with torch.no_grad():
        _check_close(m(x), x, m.weight, m.bias)
    assert "_blocks" not in copy.deepcopy(m).__dict__
    torch.save(m, tmp_path / "m.pt")
    m2 = torch.load(tmp_path / "m.pt", weights_only=False)
    assert "_blocks" not in m2.__dict__
    _check_close(m2(x), x, m.weight, m.bias)
    v = L.LinearView(nn.Linear(2048, 6))
    with torch.no_grad():
        v(x)
    assert v._blocks is not None and "_blocks" not in copy.deepcopy(v).__dict__


def test_streaming_step_takes_skinny_path(monkeypatch):
    """A CPU streaming step of a TransformerLayer (4 frames) runs all six Linear layers through
    the skinny path."""
    from pyencoder.nn import BandedSelfAttention, TransformerLayer
    layer = TransformerLayer(BandedSelfAttention(32, 4, left=8, right=1), 64).eval()
    calls = []
    orig = L._skinny
    monkeypatch.setattr(L, "_skinny", lambda *a: calls.append(a[0].shape) or orig(*a))
    with torch.no_grad():
        st = layer.init_state(1, max_chunk=4)
        for _ in range(3):
            layer.step(torch.randn(1, 4, 32), st)
    assert len(calls) == 3 * 6


def test_autocast_keeps_f_linear_semantics():
    """Under CPU autocast the module is exactly F.linear (autocast picks the output dtype)."""
    m = Linear(2048, 16)
    x = torch.randn(3, 2048)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not L.uses_skinny_path(x, m.weight)
        y, r = m(x), F.linear(x, m.weight, m.bias)
    assert y.dtype == r.dtype == torch.bfloat16 and torch.equal(y, r)
