"""torch.compile / torch.export of the models as a user compiles them (found by a compile sweep):

- a Python float ``scale`` traced as a SymFloat (dynamic=True; transformers passes
  ``scaling=self.scaling``) failed fullgraph in check_scale (math.isfinite of a traced float):
  every patched HF model under torch.compile(fullgraph=True, dynamic=True);
- WavLM attention with sink keys trimmed its bias table by a host read (data-dependent sizes):
  fullgraph failed, graph breaks, export failed; the coverage check guarded on min/max of the
  length (1 - T <= max(-4, 1 - T), which an export range cannot prove);
- CausalEncoder's valid strided convs sliced to the last whole window, which guarded on the
  length's residue (a recompile per residue class, export failed); EncoderOutput was no pytree
  node (export refused it).

Checked on the aot_eager backend (what Inductor receives): values equal eager's exactly, one
graph over the lengths (Dynamo's first-call restart aside), exports with a dynamic length.
"""
import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

from pyencoder.models import CausalEncoder, EncoderConfig
from pyencoder.nn import WavLMSelfAttention
from pyencoder.ops import banded_attention


def _counting():
    graphs = []

    def backend(gm, example):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example)
    return backend, graphs


def test_symfloat_scale_compiles_fullgraph():
    q = torch.randn(1, 2, 9, 8)

    def f(q, s):
        return banded_attention(q, q, q, left=2, right=1, scale=s)
    torch._dynamo.reset()
    cf = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for s in (0.3, 0.25):
        torch.testing.assert_close(cf(q, s), f(q, s), rtol=0, atol=0)


def test_wavlm_sink_attention_compiles_and_exports():
    torch.manual_seed(0)
    m = WavLMSelfAttention(16, 2, left=4, right=1, num_buckets=16, max_distance=40,
                           sink=2).eval()
    backend, graphs = _counting()
    torch._dynamo.reset()
    cf = torch.compile(m, backend=backend, fullgraph=True, dynamic=True)
    for T in (11, 14, 23):
        x = torch.randn(2, T, 16)
        torch.testing.assert_close(cf(x), m(x), rtol=0, atol=0)
    assert len(graphs) <= 2, len(graphs)          # one graph (and Dynamo's restart)
    from torch.export import Dim, export
    ep = export(m, (torch.randn(2, 11, 16),), dynamic_shapes=({1: Dim("T", min=4, max=64)},),
                strict=False)
    x = torch.randn(2, 17, 16)
    torch.testing.assert_close(ep.module()(x), m(x), rtol=0, atol=0)


def test_encoder_one_graph_over_lengths_and_export():
    torch.manual_seed(1)
    m = CausalEncoder(EncoderConfig(conv_dim=(8, 8, 8), conv_kernel=(4, 3, 2),
                                    conv_stride=(2, 2, 2), hidden_size=16, num_layers=1,
                                    num_heads=2, ffn_dim=24, left=4, lookahead=1)).eval()
    backend, graphs = _counting()
    torch._dynamo.reset()
    cf = torch.compile(lambda w: m(w).last_hidden_state, backend=backend, fullgraph=True,
                       dynamic=True)
    with torch.no_grad():
        for L in range(100, 108):
            w = torch.randn(1, L)
            torch.testing.assert_close(cf(w), m(w).last_hidden_state, rtol=0, atol=0)
    assert len(graphs) <= 2, len(graphs)
    from torch.export import export
    w = torch.randn(1, 101)
    out = export(m, (w,), strict=False).module()(w)
    assert type(out).__name__ == "EncoderOutput"
    torch.testing.assert_close(out.last_hidden_state, m(w).last_hidden_state, rtol=0, atol=0)


@pytest.mark.parametrize("L", [40, 41, 42, 43, 47])
def test_valid_conv_drops_the_samples_past_the_last_window(L):
    """FeatureConv1d's valid conv no longer slices to the last whole window: the same frames."""
    from pyencoder.models import FeatureConv1d
    torch.manual_seed(L)
    c = FeatureConv1d(3, 4, 5, 3)
    x = torch.randn(2, 3, L)
    want = torch.nn.functional.conv1d(x, c.weight, c.bias, stride=3)
    torch.testing.assert_close(c(x), want, rtol=1e-5, atol=1e-5)


def test_compiled_calls_still_refuse_bad_scale_and_narrow_bias():
    """The traced-value allowances stay narrow: a zero or bool scale and a bias table that does
    not cover the call's offsets are refused under torch.compile too (with fixed shapes the
    coverage check runs; only symbolic lengths skip it)."""
    q = torch.randn(1, 2, 8, 8)
    for kw in (dict(scale=0.0), dict(scale=True),
               dict(rel_bias=torch.randn(2, 2), rel_offset=0)):
        torch._dynamo.reset()
        f = torch.compile(lambda q: banded_attention(q, q, q, left=3, right=1, **kw),
                          backend="aot_eager", fullgraph=True)
        with pytest.raises(Exception, match="scale must be|rel_bias must cover"):
            f(q)


def test_running_norm_compiles_for_zero_frames():
    """Traced, the running norm runs one block whatever the length (a loop over blocks
    specialised the graph per length): with zero frames it indexed the empty sums' last column
    (IndexError), so a compiled CausalEncoder on audio shorter than its first conv kernel, or a
    compiled stream step of one sample, failed where eager returns no frames."""
    from pyencoder.nn import RunningGroupNorm
    torch.manual_seed(2)
    m = RunningGroupNorm(8).eval()
    torch._dynamo.reset()
    cf = torch.compile(m, backend="aot_eager", fullgraph=True)
    for T in (0, 5):
        x = torch.randn(2, 8, T)
        torch.testing.assert_close(cf(x), m(x), rtol=0, atol=0)
    enc = CausalEncoder(EncoderConfig(conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2),
                                      hidden_size=16, num_layers=1, num_heads=2, ffn_dim=24,
                                      left=4, lookahead=1, feat_extract_norm="group")).eval()
    torch._dynamo.reset()
    ce = torch.compile(lambda w: enc(w).last_hidden_state, backend="aot_eager")
    with torch.no_grad():
        for L in (5, 60):
            w = torch.randn(2, L)
            torch.testing.assert_close(ce(w), enc(w).last_hidden_state, rtol=0, atol=0)


def test_compiled_fixed_step_does_not_recompile_after_reset():
    """reset() wrote ended = False into the state's __dict__: a compiled step guards on the
    attribute's absence (the class default), so each reset cost a recompile. It goes back to the
    class default now; values stay eager's."""
    from pyencoder.nn import BandedSelfAttention
    from pyencoder.streaming import reset
    torch.manual_seed(2)
    m = BandedSelfAttention(16, 2, left=4, right=1).eval()
    backend, graphs = _counting()
    torch._dynamo.reset()
    step = torch.compile(m.step_fixed, backend=backend, fullgraph=True)
    st, ref = m.init_state(2, max_chunk=4), m.init_state(2, max_chunk=4)
    with torch.no_grad():
        _, st = m.step(torch.randn(2, 4, 16), st)
        ref.load_state_dict(st.state_dict())
        for i in range(6):
            x = torch.randn(2, 4, 16)
            torch.testing.assert_close(step(x, st), m.step_fixed(x, ref), rtol=0, atol=0)
            if i in (1, 3):
                for s in (st, ref):
                    reset(s, torch.tensor([True, False]))
                    s.reset(torch.tensor([False, False]))
                _, st = m.step(torch.randn(2, 4, 16), st)
                ref.load_state_dict(st.state_dict())
    assert len(graphs) == 1, len(graphs)


def test_compiled_fixed_step_of_a_state_made_under_inference_mode():
    """The serving pattern: a state made and stepped under torch.inference_mode, the fixed step
    compiled with fullgraph. The inference-mode check of check_state queried the mode, which
    dynamo cannot trace (Unsupported); it is skipped while tracing."""
    from pyencoder.nn import BandedSelfAttention
    torch.manual_seed(2)
    m = BandedSelfAttention(16, 2, left=4, right=1).eval()
    backend, graphs = _counting()
    torch._dynamo.reset()
    with torch.inference_mode():
        st, ref = m.init_state(2, max_chunk=4), m.init_state(2, max_chunk=4)
        x0 = torch.randn(2, 4, 16)
        _, st = m.step(x0, st)
        _, ref = m.step(x0, ref)
        step = torch.compile(m.step_fixed, backend=backend, fullgraph=True)
        for _ in range(3):
            x = torch.randn(2, 4, 16)
            torch.testing.assert_close(step(x, st), m.step_fixed(x, ref), rtol=0, atol=0)
    assert len(graphs) == 1
