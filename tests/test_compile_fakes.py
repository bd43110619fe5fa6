"""What a fuzz of the ops under torch's tracing stacks found (session 34), each failing without
its fix:

- the fake kernels of the backward ops (pyencoder::interval_attention_backward,
  causal_conv1d_backward, convnext_dwconv_ln_backward) returned torch.empty_like(input): a
  transposed input's strides, where the backends return contiguous gradients. The attention
  modules pass q / k / v as x.view(B, T, H, D).transpose(1, 2), so torch.compile of any of them
  failed in the backward ("view size is not compatible", an inductor stride assert); opcheck's
  fake-tensor test failed on such inputs;
- a process whose first pyencoder call was a compiled one failed inside Dynamo ("Guard failed on
  the same frame it was created"): pyencoder._env filled its caches while Dynamo traced them.

aot_eager traces the fakes and autograd as inductor does, without a C++ build (seconds here).
"""
import pytest
import torch

import pyencoder
from pyencoder import _env

P = torch.ops.pyencoder


def _t(b, h, n, d, dt=torch.float64):
    return torch.randn(b, n, h, d, dtype=dt).transpose(1, 2)     # as the modules pass q / k / v


def test_opcheck_backward_ops_with_transposed_inputs():
    torch.manual_seed(0)
    q, k, v = _t(2, 2, 7, 8), _t(2, 1, 7, 8), _t(2, 1, 7, 8)
    fw = (q, k, v, None, None, None, None, 1, 1, 3, 1, 0, 0, 0, 0, 0.3, False)
    out, lse = P.interval_attention.default(*fw, "reference")
    torch.library.opcheck(P.interval_attention_backward.default,
                          (torch.randn_like(out), q, k, v, out, lse, *fw[3:], "reference", True))
    x = torch.randn(2, 9, 4, dtype=torch.float64).transpose(1, 2)   # channel-last (B, C, L)
    w = torch.randn(4, 1, 3, dtype=torch.float64)
    y, _ = P.causal_conv1d.default(x, w, None, None, 1, 4, "", "reference")
    torch.library.opcheck(P.causal_conv1d_backward.default,
                          (torch.randn_like(y), None, x, w, None, None, 1, 4, "", "reference"))
    y, _ = P.convnext_dwconv_ln.default(x, w, None, None, None, None, 1e-6, "reference")
    torch.library.opcheck(P.convnext_dwconv_ln_backward.default,
                          (torch.randn_like(y), None, x, w, None, None, None, None, 1e-6))


@pytest.fixture
def empty_env_caches():
    """The state of a fresh process: pyencoder._env's caches empty (restored after)."""
    saved = [(d, dict(d)) for d in (_env._NAMES, _env._cache, _env._SNAP_KEYS)]
    for d, _ in saved:
        d.clear()
    try:
        yield
    finally:
        for d, old in saved:
            d.clear()
            d.update(old)


@pytest.mark.parametrize("make", [
    lambda: pyencoder.nn.BandedSelfAttention(16, 2, left=3, right=1),
    lambda: pyencoder.nn.TransformerLayer(pyencoder.nn.ChunkedSelfAttention(
        16, 2, chunk_size=2, left_chunks=1, lookahead=1), 24),
    lambda: pyencoder.nn.WavLMSelfAttention(16, 2, left=4, right=1, num_buckets=16,
                                            max_distance=40),
], ids=["banded", "layer_chunked", "wavlm"])
def test_compiled_module_first_call_forward_and_backward_equal_eager(make, empty_env_caches):
    torch.manual_seed(0)
    m = make().double()
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    torch._dynamo.reset()
    try:
        cm = torch.compile(m, backend="aot_eager", fullgraph=True)
        y = cm(x)                                   # the process's first pyencoder call
        got = torch.autograd.grad(y.square().sum(), [x, *m.parameters()])
    finally:
        torch._dynamo.reset()
    want_y = m(x)
    want = torch.autograd.grad(want_y.square().sum(), [x, *m.parameters()])
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("make, shape", [
    (lambda: pyencoder.nn.RunningGroupNorm(4), lambda T: (2, 4, T)),
    (lambda: pyencoder.nn.BandedSelfAttention(16, 2, left=3, right=1, rope=True),
     lambda T: (2, T, 16)),
], ids=["running_norm", "banded_rope"])
def test_one_compiled_graph_for_every_length(make, shape):
    """The running norm's blocked loop over time specialised a compiled graph to T (a recompile
    per length: FailOnRecompileLimitHit after 8 with fullgraph=True); traced, the time is one
    block. A Rope filled its per-device cache while Dynamo traced: a recompile on the 2nd call."""
    from torch._dynamo.backends.registry import lookup_backend
    graphs = [0]

    def counting(gm, example):
        graphs[0] += 1
        return lookup_backend("aot_eager")(gm, example)
    m = make().double()
    torch._dynamo.reset()
    try:
        cm = torch.compile(m, backend=counting, fullgraph=True, dynamic=True)
        for T in (5, 9, 14, 23):
            x = torch.randn(*shape(T), dtype=torch.float64)
            torch.testing.assert_close(cm(x), m(x), rtol=1e-12, atol=1e-12)
    finally:
        torch._dynamo.reset()
    assert graphs[0] == 1


def test_export_with_a_dynamic_length():
    """check_int refused the SymInt of a size-derived argument (WavLM's default rel_offset) under
    torch.export; the running norm's block loop fixed T."""
    from torch.export import Dim, export
    torch.manual_seed(0)
    T = Dim("T", min=4, max=64)
    for m, shape in ((pyencoder.nn.WavLMSelfAttention(16, 2, left=4, right=1, num_buckets=16,
                                                      max_distance=40).eval(), (2, 12, 16)),
                     (pyencoder.nn.RunningGroupNorm(4), (2, 4, 12))):
        x = torch.randn(*shape)
        axis = 1 if len(shape) == 3 and shape[-1] == 16 else 2
        ep = export(m, (x,), dynamic_shapes=({axis: T},), strict=False)
        x2 = torch.randn(*[17 if i == axis else s for i, s in enumerate(shape)])
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x2), m(x2), rtol=1e-5, atol=1e-5)


def test_forward_mode_ad_is_refused_not_a_silent_zero_tangent():
    """torch gives a custom op without a forward formula a zero (torch.func.jvp) or no
    (forward_ad) tangent without a word; the ops refuse a tangent by name. Without one (inside
    a dual level, other tensors carry the tangent) they run."""
    import torch.autograd.forward_ad as fwad
    from pyencoder.ops import banded_attention, causal_conv1d, convnext_dwconv_ln
    q = torch.randn(1, 2, 6, 8, dtype=torch.float64)
    x, w = torch.randn(1, 4, 7, dtype=torch.float64), torch.randn(4, 1, 3, dtype=torch.float64)
    calls = {"interval attention": lambda a: banded_attention(a, q, q, left=2, right=1),
             "causal_conv1d": lambda a: causal_conv1d(a, w, groups=4),
             "convnext_dwconv_ln": lambda a: convnext_dwconv_ln(a, w)}
    for name, f in calls.items():
        a = q if name == "interval attention" else x
        with pytest.raises(NotImplementedError, match=f"pyencoder: {name} has no forward-mode AD"):
            torch.func.jvp(f, (a,), (torch.randn_like(a),))
        with fwad.dual_level():
            with pytest.raises(NotImplementedError, match="forward-mode AD"):
                f(fwad.make_dual(a, torch.randn_like(a)))
            fwad.make_dual(torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
            assert f(a).shape[0] == 1                        # no tangent on a: it runs


def test_env_readers_carry_dynamos_constant_mark():
    """pyencoder._env marks its readers as torch.compiler.assume_constant_result does, without
    importing torch._dynamo at import: the public call must still set that mark."""
    def probe():
        return 1
    torch.compiler.assume_constant_result(probe)
    assert probe.__dict__ == {"_dynamo_marked_constant": True}
    for fn in (_env.env_raw, _env.env_flag, _env.env_choice, _env.env_choice_or_int,
               _env.env_snapshot):
        assert fn._dynamo_marked_constant is True
