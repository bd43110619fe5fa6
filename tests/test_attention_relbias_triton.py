"""Triton interval attention with the fused relative-position bias (issue 15 item 1) against
the reference (itself checked against a dense float64 oracle in test_attention_relbias.py).

CPU: the kernels run under TRITON_INTERPRET=1 on tiny shapes in float32 and float16, forward
(out, lse) and backward (dq, dk, dv, drel_bias, dgate), band / chunked / causal masks, GQA, RoPE,
padding and offsets. Tolerances are those of test_attention_triton.py (float32: IEEE dots, 1e-4;
float16: q/k/P/dS rounded to fp16 before the dots, 6e-3 / 1.2e-2), with the bias gradients
checked against the same bound relative to their size: drel_bias sums dS * gate over every query
of a diagonal (up to Nq * B terms), so it gets the gradient tolerance times that magnitude.
"""
import pytest
import torch

from conftest import has_triton

pytestmark = pytest.mark.skipif(not has_triton(), reason="triton is not installed")

if has_triton():
    from pyencoder.ops import _attention_triton as tri
from pyencoder import Rope
from pyencoder.ops.attention import band_params, chunked_params, relative_offsets
from pyencoder.reference import attention as ref

_DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    if has_triton():
        monkeypatch.setattr(tri, "POISON_OUTPUTS", True)


CASES = [
    # (mask, B, Hq, Hk, Nq, Nk, D, rope, klen, q_offset, k_offset, gated)
    (("band", 5, 2, None), 1, 2, 1, 19, 19, 16, None, None, 0, 0, True),
    (("chunked", 4, 1, 1), 2, 2, 2, 21, 21, 16, "neox", (21, 15), 3, 3, True),
    (("band", None, 0, None), 1, 2, 2, 18, 18, 32, "partial", None, 0, 0, False),
    (("band", 3, 1, None), 2, 4, 2, 9, 26, 16, "interleaved", (26, 20), 20, 3, True),
]


def _mask(kind):
    name, a, b, c = kind
    return band_params(a, b) if name == "band" else chunked_params(a, b, c)


def _inputs(case, dtype):
    """(block, lo_off, hi_off, inv_freq, interleaved, q, k, v, key_lengths) of CASES[case],
    fresh random q / k / v."""
    kind, B, Hq, Hk, Nq, Nk, D, rope, klen, q_offset, k_offset, gated = CASES[case]
    block, lo, hi = _mask(kind)
    rope = {None: None, "neox": Rope(D), "partial": Rope(D // 2),
            "interleaved": Rope(D, interleaved=True)}[rope]
    inv = None if rope is None else rope.inv_freq(_DEV)
    il = False if rope is None else rope.interleaved
    q = torch.randn(B, Hq, Nq, D, device=_DEV, dtype=dtype)
    k = torch.randn(B, Hk, Nk, D, device=_DEV, dtype=dtype)
    v = torch.randn(B, Hk, Nk, D, device=_DEV, dtype=dtype)
    kl = None if klen is None else torch.tensor(klen, dtype=torch.int32, device=_DEV)
    return block, lo, hi, inv, il, q, k, v, kl


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_triton_bias_forward_backward_matches_reference(case, dtype):
    kind, B, Hq, Hk, Nq, Nk, D, rope, klen, q_offset, k_offset, gated = CASES[case]
    block, lo, hi, inv, il, q, k, v, kl = _inputs(case, dtype)
    r_min, r_max = relative_offsets(Nq, Nk, block=block, lo_off=lo, hi_off=hi,
                                    q_offset=q_offset, k_offset=k_offset)
    r0 = r_min - 1
    rel = torch.randn(Hq, r_max - r0 + 2, device=_DEV, dtype=dtype)
    gate = (torch.rand(B, Hq, Nq, device=_DEV) * 2).to(dtype) if gated else None
    scale = D ** -0.5
    args = (inv, kl, block, lo, hi, q_offset, k_offset, scale, il)
    bias = dict(rel_bias=rel, gate=gate, rel_offset=r0)
    out, lse = tri.forward(q, k, v, *args, **bias)
    dout = torch.randn_like(out)
    dq, dk, dv, drel, dgate = tri.backward(dout, q, k, v, out, lse, *args, True, **bias)
    c = [t.to(torch.float64) for t in (q, k, v)]
    rbias = dict(rel_bias=rel.double(), gate=None if gate is None else gate.double(),
                 rel_offset=r0)
    out_r, lse_r = ref.forward(*c, *args, **rbias)
    dq_r, dk_r, dv_r, drel_r, dgate_r = ref.backward(dout.double(), *c, out_r, lse_r, *args, True,
                                                     **rbias)
    tol_o, tol_g = (1e-4, 1e-4) if dtype == torch.float32 else (6e-3, 1.2e-2)
    for name, got, want, tol in (("out", out, out_r, tol_o), ("lse", lse, lse_r, tol_o),
                                 ("dq", dq, dq_r, tol_g), ("dk", dk, dk_r, tol_g),
                                 ("dv", dv, dv_r, tol_g)):
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got.double()), finite), name
        torch.testing.assert_close(got.double()[finite], want[finite], rtol=tol, atol=tol,
                                   msg=lambda m: f"{name}: {m}")
    assert drel.shape == rel.shape and drel.dtype == rel.dtype
    mag = max(1.0, float(drel_r.abs().max()))
    torch.testing.assert_close(drel.double(), drel_r, rtol=tol_g, atol=tol_g * mag)
    if gated:
        assert dgate.shape == gate.shape and dgate.dtype == gate.dtype
        torch.testing.assert_close(dgate.double(), dgate_r, rtol=tol_g, atol=tol_g)
    else:
        assert dgate is None
    # the bias reaches the kernel: the unbiased kernel gives another answer
    plain, _ = tri.forward(q, k, v, *args)
    assert (plain.double() - out_r).abs().max() > 10 * tol_o


def test_triton_bias_nonfinite_gate_row_is_nan_and_contained():
    B, H, N, D = 1, 2, 20, 16
    block, lo, hi = band_params(4, 1)
    q, k, v = (torch.randn(B, H, N, D, device=_DEV) for _ in range(3))
    r_min, r_max = relative_offsets(N, N, block=block, lo_off=lo, hi_off=hi)
    rel = torch.randn(H, r_max - r_min + 1, device=_DEV)
    gate = torch.rand(B, H, N, device=_DEV)
    gate[0, 1, 9] = float("nan")
    args = (None, None, block, lo, hi, 0, 0, D ** -0.5, False)
    bias = dict(rel_bias=rel, gate=gate, rel_offset=r_min)
    out, lse = tri.forward(q, k, v, *args, **bias)
    out_r, lse_r = ref.forward(q.double(), k.double(), v.double(), *args,
                               rel_bias=rel.double(), gate=gate.double(), rel_offset=r_min)
    assert torch.equal(torch.isnan(out), torch.isnan(out_r))
    assert torch.isnan(out[0, 1, 9]).all()
    ok = ~torch.isnan(out_r)
    torch.testing.assert_close(out.double()[ok], out_r[ok], rtol=1e-4, atol=1e-4)
    dout = torch.randn_like(out)
    dq, dk, dv, drel, dgate = tri.backward(dout, q, k, v, out, lse, *args, True, **bias)
    g_r = ref.backward(dout.double(), q.double(), k.double(), v.double(), out_r, lse_r, *args,
                       True, rel_bias=rel.double(), gate=gate.double(), rel_offset=r_min)
    for name, got, want in zip(("dq", "dk", "dv", "drel", "dgate"), (dq, dk, dv, drel, dgate),
                               g_r):
        assert torch.equal(torch.isnan(got), torch.isnan(want)), name
        m = ~torch.isnan(want)
        torch.testing.assert_close(got.double()[m], want[m], rtol=1e-4, atol=1e-4,
                                   msg=lambda s: f"{name}: {s}")


def test_wavlm_module_on_the_kernels_matches_the_reference_path():
    """nn.WavLMSelfAttention (gated bias, chunked mask with lookahead) on the Triton kernels:
    output and every parameter gradient (bucket table and gate parameters included) match the
    reference path (float32: 1e-4, see the module docstring)."""
    import pyencoder
    from pyencoder.nn import WavLMSelfAttention
    m = WavLMSelfAttention(32, 2, chunk_size=4, left_chunks=2, lookahead=2, num_buckets=16,
                           max_distance=40).to(_DEV)
    with torch.no_grad():
        m.gru_rel_pos_const.uniform_(0.5, 1.5)
        m.rel_attn_embed.weight.normal_()
    x = torch.randn(2, 19, 32, device=_DEV)
    klen = torch.tensor([19, 14], device=_DEV)
    outs, grads = [], []
    for backend in ("reference", "triton"):
        with pyencoder.use_backend(backend):
            y = m(x, key_lengths=klen)
        dy = torch.ones_like(y)
        outs.append(y)
        grads.append(torch.autograd.grad(y, list(m.parameters()), dy))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    for (n, _), a, b in zip(m.named_parameters(), grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(b.abs().max())),
                                   msg=lambda s: f"{n}: {s}")


@pytest.mark.parametrize("case", range(len(CASES)))
def test_vectorised_bias_layout_matches_plain_gather(case, monkeypatch):
    """The forward reads the bias from the 16-byte-aligned shifted copies (_vec_bias,
    VEC_BIAS) when there are no sink keys: the same values as the plain gather (bitwise: the
    same floats are added in the same order), across offsets, padding, GQA, RoPE; and the
    layout puts a (t, y) entry where the kernel reads it."""
    kind, B, Hq, Hk, Nq, Nk, D, rope, klen, q_offset, k_offset, gated = CASES[case]
    block, lo, hi, inv, il, q, k, v, kl = _inputs(case, torch.float32)
    r_min, r_max = relative_offsets(Nq, Nk, block=block, lo_off=lo, hi_off=hi,
                                    q_offset=q_offset, k_offset=k_offset)
    rel = torch.randn(Hq, r_max - r_min + 3, device=_DEV)
    gate = torch.rand(B, Hq, Nq, device=_DEV) * 2 if gated else None
    args = (inv, kl, block, lo, hi, q_offset, k_offset, D ** -0.5, il)
    bias = dict(rel_bias=rel, gate=gate, rel_offset=r_min - 1)
    seen = []
    real = tri._vec_bias
    monkeypatch.setattr(tri, "_vec_bias", lambda *a: seen.append(1) or real(*a))
    out, lse = tri.forward(q, k, v, *args, **bias)
    assert seen, "the forward without sinks takes the vectorised layout"
    monkeypatch.setattr(tri, "_vec_bias", lambda *a: {})
    out0, lse0 = tri.forward(q, k, v, *args, **bias)
    assert torch.equal(out, out0) and torch.equal(lse, lse0)
    # layout: copy t at x holds padded[x + t]
    v4 = real(rel, 7)
    pad = tri._VEC_BIAS_PAD
    r4, L4 = v4["REL"], v4["rel_len"]
    assert r4.shape == (Hq, 4, L4) and L4 % 16 == 0 and r4.is_contiguous()
    assert v4["rel_offset"] == 7 - pad
    for t in range(4):
        for x in (pad - t, pad - t + rel.shape[1] - 1):
            assert torch.equal(r4[:, t, x], rel[:, x + t - pad])
    assert float(r4[:, :, :pad - 3].abs().max()) == 0.0
