"""pyencoder.nn.Linear / linear: the skinny CPU GEMM path equals F.linear to fp32 rounding.

The oracle is the float64 product; the skinny path's error must be within a small multiple of
F.linear's own fp32 error on the same inputs (both are one fp32 GEMM with different blocking)."""
import pytest
import torch
import torch.nn.utils.prune  # noqa: F401
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


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("inf", [1536, 3072, 1031])
def test_module_follows_weight_updates(rows, inf):
    torch.manual_seed(rows * 7 + inf)
    m = Linear(inf, 24)
    x = torch.randn(1, rows, inf)
    with torch.no_grad():
        _check_close(m(x), x, m.weight, m.bias)
        m.weight.mul_(-2.0)
        _check_close(m(x), x, m.weight, m.bias)
        ref = nn.Linear(inf, 24)
        m.load_state_dict(ref.state_dict())
        _check_close(m(x), x, ref.weight, ref.bias)
    with torch.inference_mode():
        _check_close(m(x), x, m.weight, m.bias)


def _fresh(t, g):
    return torch.randn(t.shape, generator=g) * 0.02


def _update_data_mul(m, g):
    m.weight.data.mul_(0.5)


def _update_data_copy(m, g):
    m.weight.data.copy_(_fresh(m.weight, g))


def _update_no_grad_mul(m, g):
    with torch.no_grad():
        m.weight.mul_(-1.5)


def _update_load_state_dict(m, g):
    m.load_state_dict({k: _fresh(v, g) for k, v in m.state_dict().items()})


def _update_ema(m, g):
    target = [_fresh(p, g) for p in m.parameters()]
    torch._foreach_lerp_([p.data for p in m.parameters()], target, 0.3)


def _update_ema_swa(m, g):
    swa = torch.optim.swa_utils
    avg = swa.AveragedModel(m, multi_avg_fn=swa.get_ema_multi_avg_fn(0.5))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(_fresh(p, g))
    avg.update_parameters(m)
    m.load_state_dict(avg.module.state_dict())


def _update_swap_parameter(m, g):
    m.weight = nn.Parameter(_fresh(m.weight, g))


_UPDATES = [_update_data_mul, _update_data_copy, _update_no_grad_mul, _update_load_state_dict,
            _update_ema, _update_ema_swa, _update_swap_parameter]


@pytest.mark.parametrize("update", _UPDATES, ids=lambda f: f.__name__[8:])
@pytest.mark.parametrize("ctx", ["no_grad", "inference_mode"])
def test_weight_updates_are_seen(update, ctx):
    """Regression (issue 13, item 1): after a weight update through any of the paths users take,
    the next call computes with the new weight (a cached K-blocked copy used to miss ``.data``
    writes: error 0.79 on a 2048 -> 16 layer)."""
    g = torch.Generator().manual_seed(1000 + _UPDATES.index(update))
    m = Linear(2048, 16).requires_grad_(False)
    x = torch.randn(3, 2048, generator=g)
    mode = torch.no_grad if ctx == "no_grad" else torch.inference_mode
    with mode():
        m(x)
    update(m, g)
    with mode():
        y = m(x)
    _check_close(y, x, m.weight.detach(), m.bias.detach())


@pytest.mark.parametrize("update", _UPDATES, ids=lambda f: f.__name__[8:])
def test_layer_streams_its_updated_weights(update):
    """A TransformerLayer streamed after an in-place update of all its weights equals its own
    offline forward (issue 13: 0.075 off after ``p.data.mul_(0.5)``)."""
    from pyencoder.nn import BandedSelfAttention, TransformerLayer
    g = torch.Generator().manual_seed(2000 + _UPDATES.index(update))
    torch.manual_seed(2000 + _UPDATES.index(update))
    layer = TransformerLayer(BandedSelfAttention(32, 4, left=6, right=1), 2048).eval()
    x = torch.randn(1, 12, 32, generator=g)

    def streamed():
        st = layer.init_state(1, max_chunk=4)
        outs = []
        for c in range(0, 12, 3):
            y, st = layer.step(x[:, c:c + 3], st)
            outs.append(y)
        outs.append(layer.flush(st)[0])
        return torch.cat(outs, 1)

    with torch.no_grad():
        streamed()
    for mod in [layer.feed_forward.output_dense, layer.feed_forward.intermediate_dense,
                layer.attention.q_proj]:
        update(mod, g)
    with torch.no_grad():
        ref = layer(x)
        torch.testing.assert_close(streamed(), ref, rtol=1e-5, atol=1e-5)


def test_no_skinny_path_under_autograd_or_off_cpu():
    """Issue 14 item 8: training / autograd and non-CPU tensors take F.linear itself."""
    w = torch.randn(8, 16)
    x = torch.randn(3, 16)
    assert L.uses_skinny_path(x, w)
    assert not L.uses_skinny_path(x.requires_grad_(True), w)
    assert not L.uses_skinny_path(x.detach(), w.requires_grad_(True))
    with torch.no_grad():
        assert L.uses_skinny_path(x, w)
    assert not L.uses_skinny_path(torch.randn(3, 16, device="meta"), w)
    m = Linear(16, 8).train()
    xr = torch.randn(3, 16, requires_grad=True)
    assert torch.equal(m(xr), F.linear(xr, m.weight, m.bias))
    assert m(xr).grad_fn is not None


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
    for a, b in ((x.grad, xr.grad), (m.weight.grad, ref.weight.grad), (m.bias.grad, ref.bias.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_frozen_weight_input_needs_grad():
    """A frozen layer inside a trained model: x needs a gradient, the weight does not."""
    m = Linear(2048, 8).requires_grad_(False)
    x = torch.randn(2, 2048, requires_grad=True)
    m(x).sum().backward()
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


def test_nothing_cached_on_the_module(tmp_path):
    """The module holds only nn.Linear's state: pickling, deepcopy and inference_mode calls
    followed by grad-mode calls all see the current weight."""
    import copy
    m = Linear(2048, 6).requires_grad_(False)
    x = torch.randn(2, 2048)
    with torch.inference_mode():
        m(x)
    assert set(m.__dict__) == set(nn.Linear(4, 4).__dict__)
    _check_close(m(x), x, m.weight, m.bias)
    torch.save(m, tmp_path / "m.pt")
    m2 = torch.load(tmp_path / "m.pt", weights_only=False)
    _check_close(m2(x), x, m.weight, m.bias)
    _check_close(copy.deepcopy(m)(x), x, m.weight, m.bias)


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


def _forbid_skinny(monkeypatch):
    def boom(*a):
        raise AssertionError("the CPU skinny GEMM ran")
    monkeypatch.setattr(L, "_skinny", boom)


def test_training_step_and_compile_never_take_skinny_path(monkeypatch):
    """Issue 14 item 8: a training step of a model built from pyencoder.nn.Linear (3-row batch,
    the skinny row range) and torch.compile'd inference run F.linear, never the CPU trick."""
    from pyencoder.nn import BandedSelfAttention, TransformerLayer
    layer = TransformerLayer(BandedSelfAttention(16, 2, left=2, right=1), 32).train()
    ref = {n: p.detach().clone() for n, p in layer.named_parameters()}
    x = torch.randn(1, 3, 16)
    y_eager = layer(x)
    _forbid_skinny(monkeypatch)
    y = layer(x)
    torch.testing.assert_close(y, y_eager, rtol=0, atol=0)
    y.pow(2).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    assert all(torch.equal(p, ref[n]) for n, p in layer.named_parameters())
    m = Linear(16, 8)
    f = torch.compile(lambda t: m(t), backend="eager", fullgraph=True)
    with torch.no_grad():
        x2 = torch.randn(3, 16)
        torch.testing.assert_close(f(x2), F.linear(x2, m.weight, m.bias), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.gpu_quick
def test_gpu_never_takes_skinny_path(monkeypatch):
    """On CUDA tensors pyencoder.nn.Linear is F.linear, bit for bit, with or without autograd."""
    _forbid_skinny(monkeypatch)
    m = Linear(64, 32).cuda()
    for rows in (1, 3, 5):
        x = torch.randn(rows, 64, device="cuda")
        assert not L.uses_skinny_path(x, m.weight)
        with torch.no_grad():
            assert torch.equal(m(x), F.linear(x, m.weight, m.bias))
        assert torch.equal(m(x), F.linear(x, m.weight, m.bias))


@pytest.mark.parametrize("rows", [1, 2, 5, 6])
def test_linear_view_runs_the_wrapped_modules_hooks_and_subclass(rows):
    """LinearView computed the product itself for 1-5 rows, skipping the wrapped module's
    forward hooks (a pruned projection's pre-hook keeps its weight current: a stream of a
    from_hf(share_weights=True) encoder differed from offline by 3e-4) and an nn.Linear
    subclass's own forward (QAT, LoRA); from 6 rows it called the module. Every row count gives
    the module's output now."""
    torch.manual_seed(rows)
    x = torch.randn(rows, 16)
    hooked = nn.Linear(16, 8)
    hooked.register_forward_hook(lambda m, i, o: o * 0 + 7)
    pruned = nn.Linear(16, 8)
    torch.nn.utils.prune.l1_unstructured(pruned, "weight", amount=0.5)
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)
    for m in (hooked, pruned, Doubled(16, 8)):
        view = L.LinearView(m)
        with torch.no_grad():
            if m is pruned:
                m.weight_orig.mul_(3)            # the pre-hook recomputes weight at the call
            torch.testing.assert_close(view(x), m(x), rtol=0, atol=0)


def test_sparse_input_takes_f_linear():
    x = torch.randn(2, 16).to_sparse()
    m = Linear(16, 8)
    with torch.no_grad():
        torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias))


def test_jit_trace_of_a_one_row_call_runs_other_row_counts():
    """A trace recorded the skinny path's 1-row branch (an expand to 2 rows): the traced Linear
    failed on 3 rows, where nn.Linear's trace runs."""
    import warnings
    from pyencoder.nn import Linear
    torch.manual_seed(67)
    lin = Linear(8, 4).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(lin, torch.randn(1, 8))
        x = torch.randn(3, 8)
        torch.testing.assert_close(traced(x), torch.nn.functional.linear(x, lin.weight, lin.bias))


def test_pack_qkv_refuses_tied_projections():
    """With k_proj.weight tied to q_proj.weight, pack_qkv_ said it packed (the step still ran
    three GEMMs), left v sharing the tied storage, and unpack_qkv_ could not undo it (safetensors
    then refused the model)."""
    from pyencoder.nn import BandedSelfAttention
    a = BandedSelfAttention(8, 2, left=3, right=1)
    a.k_proj.weight = a.q_proj.weight
    ptrs = {n: p.untyped_storage().data_ptr() for n, p in a.named_parameters()}
    assert a.pack_qkv_() is False and a._packed_qkv(a._qkv_modules()) is None
    assert {n: p.untyped_storage().data_ptr() for n, p in a.named_parameters()} == ptrs
