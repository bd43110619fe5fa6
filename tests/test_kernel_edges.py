"""Kernel paths no other CPU test reached (found by mutation testing: each mutation survived every
CPU test until these): the Triton kernels under the interpreter on tiny shapes chosen to hit the
path, against the plain-torch reference.

- attention forward: a NaN query on a row whose band sees no key while the sink span is empty
  (sink <= k_offset): the "sees a key" test; every visible score far below 0 (the running max's
  initial value: exp2(s - m) underflowed if it started at 0); dk/dv's first interior query block
  at the rounding edge (hi_off = 14 mod the 16-row tile); the forward's padded bias table covers
  the largest tuned tile (a GPU-only reach, checked as an invariant);
- decode: a step of more rows than one row tile (the launcher's grid);
- conv: the weight gradient's split over more work items than splits (the last split ran past
  the batch); the state scatter of more than 1024 entries per slot (the update's grid);
- the feature conv's steady fixed step with a step shorter than the kernel but not the stride."""
import pytest
import torch

from conftest import has_triton

needs_triton = pytest.mark.skipif(not has_triton(), reason="triton is not installed")


def _attention(q, k, v, mask, qo=0, ko=0, sink=0, bwd=True):
    from pyencoder.ops import _attention_triton as tri
    from pyencoder.reference import attention as ref
    block, lo, hi = mask
    a = (None, None, block, lo, hi, qo, ko, q.shape[-1] ** -0.5, False)
    o, lse = tri.forward(q, k, v, *a, sink=sink)
    c = [t.double() for t in (q, k, v)]
    o_ref, lse_ref = ref.forward(*c, *a, sink=sink)
    torch.testing.assert_close(o.double(), o_ref, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    if bwd:
        do = torch.randn_like(o)
        got = tri.backward(do, q, k, v, o, lse, *a, True)
        want = ref.backward(do.double(), *c, o_ref, lse_ref, *a, True)
        for g, w in zip(got[:3], want[:3]):
            torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)


@needs_triton
def test_attention_nan_query_that_sees_no_key_with_an_empty_sink_span():
    from pyencoder.ops.attention import band_params
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 8, 32) for _ in range(3))
    q[0, 0, 0] = float("nan")
    _attention(q, k, v, band_params(2, 0), qo=0, ko=4, sink=4, bwd=False)


@needs_triton
def test_attention_every_visible_score_far_below_zero():
    from pyencoder.ops.attention import band_params
    torch.manual_seed(1)
    k, q, v = torch.ones(1, 1, 20, 32), -20 * torch.ones(1, 1, 20, 32), torch.randn(1, 1, 20, 32)
    _attention(q, k, v, band_params(3, 0), bwd=False)


@needs_triton
def test_attention_dkdv_interior_blocks_at_the_rounding_edge():
    from pyencoder.ops.attention import band_params
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 1, 64, 32) for _ in range(3))
    _attention(q, k, v, band_params(40, 14))


def test_vec_bias_pad_covers_the_largest_forward_tile():
    from pyencoder.ops import _attention_triton as tri
    assert tri._VEC_BIAS_PAD >= max(m + n for m, n, *_ in tri._TUNED["fwd"])


@needs_triton
def test_decode_step_of_more_rows_than_one_tile():
    from pyencoder.ops._decode_attention_triton import decode_attention_triton
    from pyencoder.reference.decode_attention import decode_attention_reference
    from test_streaming_decode_triton import _args
    torch.manual_seed(3)
    args = _args(3, 2, 20, 16, 40, None, 6, 2, 1, torch.float32, "cpu")   # M = 20 > 16
    torch.testing.assert_close(decode_attention_triton(*args), decode_attention_reference(*args),
                               atol=2e-6, rtol=1e-5)


@needs_triton
def test_conv_weight_grad_split_past_the_batch():
    from pyencoder.ops import _conv_triton as T
    torch.manual_seed(4)
    B, C, K, L = 3, 4, 3, 736        # 69 (batch, time block) items: more than the splits
    x, w = torch.randn(B, C, L), torch.randn(C, 1, K)
    big = torch.full((B + 2, C, L), float("nan"))
    big[:B] = torch.randn(B, C, L)
    g = big[:B]                      # memory past the batch is NaN: a read there shows
    res = T.backward(g, None, x, w, None, None, 1, C, None)
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    torch.nn.functional.conv1d(torch.nn.functional.pad(xx, (K - 1, 0)), ww, groups=C).backward(g)
    dw = [r for r in res if r is not None and r.shape == w.shape][0]
    torch.testing.assert_close(dw, ww.grad, atol=1e-3, rtol=1e-4)


@needs_triton
def test_conv_update_scatters_a_state_over_1024_entries():
    from pyencoder.ops import _conv_triton as T
    torch.manual_seed(5)
    B, C, K = 2, 400, 4              # C * (K - 1) = 1200 entries per slot
    x, w, st = torch.randn(B, C, 1), torch.randn(C, 1, K), torch.randn(B, C, K - 1)
    want = torch.cat([st, x], -1)[..., -(K - 1):].clone()
    T.update(x, st, w, None, None, C, None)
    assert torch.equal(st, want)


def test_feature_conv_fixed_step_shorter_than_the_kernel():
    from pyencoder.models.frontend import FeatureConv1d
    torch.manual_seed(6)
    m = FeatureConv1d(2, 3, 10, 5).eval()
    x = torch.randn(1, 2, 60)
    with torch.no_grad():
        st, want = m.init_state(1), []
        for t in range(0, 60, 5):
            y, st = m.step(x[..., t:t + 5], st)
            want.append(y)
        st, got = m.init_state(1), []
        for t in range(0, 20, 5):
            y, st = m.step(x[..., t:t + 5], st)
            got.append(y)
        held = int(m.held_after(st.seen)[0])
        for t in range(20, 60, 5):           # n = 5 = stride, < k - 1 = 9
            got.append(m.step_fixed(x[..., t:t + 5], st, held))
    torch.testing.assert_close(torch.cat(got, -1), torch.cat(want, -1), atol=1e-6, rtol=1e-6)
