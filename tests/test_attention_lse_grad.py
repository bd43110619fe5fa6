"""What a randomized fuzz of the attention ops against an independent float64 oracle found
(session 34), each with the test that fails without its fix:

- the gradient through ``return_lse``'s log-sum-exp was silently zero (the backward ignored
  dlse; lse came back with a grad_fn): a loss that merges partial attentions by their lse trained
  on wrong gradients. lse_i = log sum_j exp(s_ij) gives dS_ij = dlse_i * P_ij, computed by the
  same backward on (v = 0, delta = -dlse) (pyencoder.ops.attention._lse_backward_inputs);
- the reference backend (the CPU default) crashed inside the op on a query in the transformers /
  SDPA view layout ((B, N, Hq, D).transpose(1, 2)) with GQA and more than one query;
- interval_attention_dropout returned a constant (no grad_fn) when no query saw any key, where
  interval_attention returns zeros that backward reaches (zero gradients).

Oracle: tests/test_attention_sink_bias.py's dense float64 mask and bias (explicit loops), its
random cases (band / chunked, sinks, offsets, padding with empty batch items, GQA, RoPE, gated
bias); lse by torch.logsumexp over the visible scores.
"""
import random

import pytest
import torch

from pyencoder import IntervalMask
from pyencoder.ops import interval_attention, interval_attention_dropout

import oracle
from test_attention_sink_bias import (_case, _clamped_columns, _dense_bias, _dense_mask, _table,
                                      _needs_interpreter)


def _oracle_out_lse(q, k, v, m, rel, gate, r0, qo, ko, kl, rope):
    """(out, lse) in float64, differentiable in every input; lse of a row without a visible key
    is -inf (its gradient 0)."""
    B, Hq, nq, D = q.shape
    Hk, nk = k.shape[1], k.shape[2]
    vis = _dense_mask(m, nq, nk, qo, ko, kl, B)
    bias = _dense_bias(rel, gate, _clamped_columns(nq, nk, rel.shape[1], r0, qo, ko), B)
    q64, k64, v64 = q.double(), k.double(), v.double()
    if rope is not None:
        q64 = oracle.rope_rotate(q64, torch.arange(nq) + qo, rope.dim,
                                 interleaved=rope.interleaved)
        k64 = oracle.rope_rotate(k64, torch.arange(nk) + ko, rope.dim,
                                 interleaved=rope.interleaved)
    k64 = k64.repeat_interleave(Hq // Hk, 1)
    v64 = v64.repeat_interleave(Hq // Hk, 1)
    s = (q64 @ k64.transpose(-1, -2)) * D ** -0.5 + bias
    any_vis = vis.any(-1, keepdim=True)
    s = torch.where(vis, s, torch.full_like(s, float("-inf")))
    s = torch.where(any_vis, s, torch.zeros_like(s))         # empty rows: finite, masked below
    lse = torch.logsumexp(s, -1)
    out = (torch.softmax(s, -1) * any_vis) @ v64
    lse = torch.where(any_vis[..., 0], lse, torch.full_like(lse, float("-inf")))
    return out, lse


def _loss_grads(out, lse, go, gl, ins):
    """Gradients of sum(out * go) + sum(lse * gl) over the finite lse rows."""
    fin = torch.isfinite(lse)
    loss = (out.double() * go).sum() + torch.where(fin, lse.double() * gl, 0.0).sum()
    return torch.autograd.grad(loss, ins, allow_unused=True)


@pytest.mark.parametrize("lse_only", [False, True], ids=["out+lse", "lse-only"])
@pytest.mark.parametrize("trial", range(6))
def test_lse_gradient_matches_the_dense_oracle_reference(trial, lse_only):
    """float64, every input's gradient (q, k, v, rel_bias, gate) of a loss through out and lse
    (or lse alone) vs the oracle at 1e-9: it was the out-only gradient (lse's part 0)."""
    rng = random.Random(1000 + trial)
    kind = ["1", "inside", "beyond", ">=N"][trial % 4]
    B, Hq, Hk, D, nq, nk, qo, ko, m, kl, rope, gated = _case(rng, kind)
    q = torch.randn(B, Hq, nq, D, dtype=torch.float64)
    k, v = (torch.randn(B, Hk, nk, D, dtype=torch.float64) for _ in range(2))
    rel, r0 = _table(rng, Hq, nq, nk, m, qo, ko)
    gate = torch.rand(B, Hq, nq, dtype=torch.float64) * 2 if gated else None
    go = torch.zeros(B, Hq, nq, D, dtype=torch.float64) if lse_only else \
        torch.randn(B, Hq, nq, D, dtype=torch.float64)
    gl = torch.randn(B, Hq, nq, dtype=torch.float64)
    ins = [t.clone().requires_grad_(True) for t in (q, k, v, rel)]
    gi = None if gate is None else gate.clone().requires_grad_(True)
    ins_all = ins + ([] if gi is None else [gi])
    o, lse = interval_attention(*ins[:3], mask=m, rope=rope, key_lengths=kl, q_offset=qo,
                                k_offset=ko, rel_bias=ins[3], gate=gi, rel_offset=r0,
                                backend="reference", return_lse=True)
    if lse_only:
        got = torch.autograd.grad(torch.where(torch.isfinite(lse), lse * gl, 0.0).sum(), ins_all,
                                  allow_unused=True)
    else:
        got = _loss_grads(o, lse, go, gl, ins_all)
    refs = [t.clone().requires_grad_(True) for t in (q, k, v, rel)]
    gr = None if gate is None else gate.clone().requires_grad_(True)
    ro, rl = _oracle_out_lse(*refs[:3], m, refs[3], gr, r0, qo, ko, kl, rope)
    torch.testing.assert_close(lse, rl, rtol=1e-10, atol=1e-10)
    no_lse = torch.autograd.grad((ro * go).sum(), refs[:2], retain_graph=True)
    want = _loss_grads(ro, rl, go, gl, refs + ([] if gr is None else [gr]))
    what = (m, qo, ko, kl, rope, (B, Hq, Hk, nq, nk), gated)
    for name, a, b in zip(("dq", "dk", "dv", "drel", "dgate"), got, want):
        a = torch.zeros_like(b) if a is None else a
        assert (a - b).abs().max().item() <= 1e-9 * max(1.0, b.abs().max().item()), (name, what)
    # the case tests the lse part: without it the gradients differ (what the op used to give)
    if torch.isfinite(rl).any():
        assert any((a - b).abs().max() > 1e-6 for a, b in zip(no_lse, want[:2])), what


def test_lse_gradcheck_reference():
    torch.manual_seed(0)
    m = IntervalMask.chunked(2, 1, 1, sink=1)
    q = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 1, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def f(q, k, v):
        o, lse = interval_attention(q, k, v, mask=m, backend="reference", return_lse=True)
        return o, lse
    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_lse_gradient_triton_matches_the_reference_under_the_interpreter(dtype):
    """The triton backend's two backward passes (out's, lse's) vs the reference in float64 on the
    same inputs; tolerances of test_attention_sink_bias's interpreter test (fp32 1e-4, fp16
    1.2e-2 on gradients: q/k/P/dS rounded to fp16 before each dot; -dlse enters in a two-term
    split, ~16 bits)."""
    _needs_interpreter()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rng = random.Random(7)
    for trial in range(2):
        B, Hq, Hk, _, nq, nk, qo, ko, m, kl, _, _ = _case(rng, ["inside", "beyond"][trial])
        D = 16
        q = torch.randn(B, Hq, nq, D, dtype=dtype, device=dev)
        k, v = (torch.randn(B, Hk, nk, D, dtype=dtype, device=dev) for _ in range(2))
        go = torch.randn(B, Hq, nq, D, dtype=torch.float64, device=dev)
        gl = torch.randn(B, Hq, nq, dtype=torch.float64, device=dev)
        kl_d = None if kl is None else kl.to(dev)
        res = {}
        for be in ("triton", "reference"):
            cast = (lambda x: x.double()) if be == "reference" else (lambda x: x)
            xs = [cast(x).clone().requires_grad_(True) for x in (q, k, v)]
            o, lse = interval_attention(*xs, mask=m, key_lengths=kl_d, q_offset=qo, k_offset=ko,
                                        backend=be, return_lse=True)
            res[be] = _loss_grads(o, lse, go, gl, xs)
        tol = 1e-4 if dtype == torch.float32 else 1.2e-2
        for name, a, b in zip(("dq", "dk", "dv"), res["triton"], res["reference"]):
            err = (a.double() - b).abs().max().item() if a.numel() else 0.0
            assert err <= tol * max(1.0, b.abs().max().item()), (name, err, m, kl, qo, ko)


def test_reference_takes_a_transposed_gqa_query():
    """q as transformers / SDPA hold it, (B, N, Hq, D).transpose(1, 2), with Hq = 2 Hk: the
    reference crashed in a .view (the CPU default path); forward and gradients now equal the
    contiguous query's, and the oracle's."""
    torch.manual_seed(1)
    q = torch.randn(2, 5, 4, 8, dtype=torch.float64).transpose(1, 2)
    k, v = (torch.randn(2, 2, 5, 8, dtype=torch.float64) for _ in range(2))
    gate = torch.rand(2, 5, 4, dtype=torch.float64).transpose(1, 2)    # a transposed gate too
    rel = torch.randn(4, 9, dtype=torch.float64)
    res = []
    for qq, gg in ((q, gate), (q.contiguous(), gate.contiguous())):
        xs = [t.clone().requires_grad_(True) for t in (qq, k, v, gg)]
        o = interval_attention(xs[0], xs[1], xs[2], mask=IntervalMask.band(2, 1),
                               rel_bias=rel, gate=xs[3], rel_offset=-4, backend="reference")
        res.append((o,) + torch.autograd.grad(o.sum(), xs))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    want = oracle.dense_biased_attention(
        q, k, v, _dense_mask(IntervalMask.band(2, 1), 5, 5, 0, 0, None, 2),
        _dense_bias(rel, gate, _clamped_columns(5, 5, 9, -4, 0, 0), 2))
    torch.testing.assert_close(res[0][0], want, rtol=1e-10, atol=1e-10)


def test_dropout_op_keeps_the_graph_when_no_query_sees_a_key():
    q = torch.randn(1, 2, 3, 4, requires_grad=True)
    k, v = (torch.randn(1, 1, 6, 4, requires_grad=True) for _ in range(2))
    for kw in (dict(k_offset=5), dict(key_lengths=torch.tensor([0]))):
        out = interval_attention_dropout(q, k, v, mask=IntervalMask.band(None, 0),
                                         dropout_p=0.2, **kw)
        assert out.requires_grad and torch.equal(out, torch.zeros_like(out))
        gq, gk, gv = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(torch.equal(g, torch.zeros_like(g)) for g in (gq, gk, gv))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_lse_pass_inputs_carry_large_and_small_dlse_in_half_precision(dtype):
    """-dlse enters the second pass through out' and dout' in the input dtype: cast to float16
    directly, a loss-scaled |dlse| > 65504 became inf (NaN rows). rowsum(dout' * out') in float32
    (as the kernels form delta) equals -dlse to ~16 bits from 1e-8 to 1e9."""
    from pyencoder.ops.attention import _lse_backward_inputs
    dlse = torch.tensor([1e9, -7e5, 65536.0 * 3.3, 1.2345678, -3e-4, 5e-8, 0.0, -123456.789])
    dlse = dlse.reshape(1, 1, 8).expand(2, 3, 8).contiguous()
    do2, o2 = _lse_backward_inputs(torch.randn(2, 3, 8, 4).to(dtype), dlse)
    assert do2.dtype == o2.dtype == dtype
    delta = (do2.float() * o2.float()).sum(-1)
    assert torch.isfinite(delta).all()
    torch.testing.assert_close(delta, -dlse, rtol=2e-5 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-12)


def gpu_quick(name, p):
    """The fast GPU tier (tests/conftest.py): the lse gradient once, in bf16."""
    return p.get("dtype") == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_gpu_lse_gradient_follows_the_flash_attention_rule(dtype):
    """The triton backend's gradient of a loss through out and lse (the second backward pass:
    v = 0, delta = -dlse split in two terms of the input dtype) on a GPU, N=1000, GQA, RoPE,
    padding, sinks: error against the float32 reference <= 3x the reference's own error in the
    same dtype plus 1e-3 (tests/test_attention_triton.py's FlashAttention rule); float32 1e-4."""
    import pyencoder
    B, Hq, Hk, N, D = 2, 4, 2, 1000, 64
    q = torch.randn(B, Hq, N, D, device="cuda", dtype=dtype)
    k, v = (torch.randn(B, Hk, N, D, device="cuda", dtype=dtype) for _ in range(2))
    go = torch.randn(B, Hq, N, D, device="cuda")
    gl = torch.randn(B, Hq, N, device="cuda")
    kl = torch.tensor([N, 613], device="cuda")
    mask = IntervalMask.band(250, 3, sink=4)

    def run(be, cast):
        xs = [cast(x).clone().requires_grad_(True) for x in (q, k, v)]
        o, lse = interval_attention(*xs, mask=mask, rope=pyencoder.Rope(D), key_lengths=kl,
                                    backend=be, return_lse=True)
        loss = (o.float() * go).sum() + (lse.float() * gl).sum()
        return torch.autograd.grad(loss, xs)

    got = run("triton", lambda x: x)
    want = run("reference", lambda x: x.float())
    same = run("reference", lambda x: x)
    for name, a, b, c in zip(("dq", "dk", "dv"), got, want, same):
        err = (a.float() - b).abs().max().item()
        if dtype == torch.float32:
            assert err <= 1e-4 * max(1.0, b.abs().max().item()), (name, err)
        else:
            base = (c.float() - b).abs().max().item()
            assert err <= 3 * base + 1e-3, (name, err, base)
