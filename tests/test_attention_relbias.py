"""Relative-position bias in interval attention (issue 15 item 1): the reference (blocked, the
CPU path) against an independent dense float64 oracle (tests/oracle.py: explicit (i, j) loops for
the bias, explicit mask), forward and every gradient (q, k, v, rel_bias, gate), over random
shapes, masks, offsets, padding, GQA and RoPE; float64 gradcheck; argument errors."""
import random

import pytest
import torch

import pyencoder
from pyencoder.ops import interval_attention
from pyencoder.ops.attention import relative_offsets

import oracle
from conftest import attention_op_args


def _spy_biased_op(monkeypatch):
    """Record every call of the interval attention op (pyencoder.ops.attention.
    _interval_attention_op, the reference backend's) that carries a fused bias (rel_bias, its
    sixth argument, not None)."""
    import pyencoder.ops.attention as A
    calls = []
    real = A._interval_attention_op

    def spy(*a):
        if a[5] is not None:
            calls.append(a)
        return real(*a)
    monkeypatch.setattr(A, "_interval_attention_op", spy)
    return calls


def _case(rng, gqa=True):
    B = rng.randint(1, 2)
    Hk = rng.randint(1, 2)
    g = rng.choice([1, 2, 3]) if gqa else 1
    Hq = Hk * g
    D = rng.choice([8, 12, 16])
    Nq = rng.randint(1, 37)
    Nk = rng.randint(1, 41)
    kind = rng.choice(["band", "chunked", "causal"])
    if kind == "band":
        block, lo, hi = oracle.band(rng.randint(0, 9), rng.randint(0, 4))
    elif kind == "chunked":
        block, lo, hi = oracle.chunked(rng.randint(1, 5), rng.choice([None, 0, 1, 2]),
                                       rng.randint(0, 3))
    else:
        block, lo, hi = oracle.band(None, rng.randint(0, 2))
    q_offset = rng.choice([0, rng.randint(0, 30)])
    k_offset = rng.choice([q_offset, rng.randint(0, 30)])
    klen = None
    if rng.random() < 0.5:
        klen = torch.tensor([rng.randint(0, Nk) for _ in range(B)])
    rope = rng.choice([None, pyencoder.Rope(D), pyencoder.Rope(D // 2, interleaved=True)])
    gated = rng.random() < 0.7
    return B, Hq, Hk, D, Nq, Nk, block, lo, hi, q_offset, k_offset, klen, rope, gated


def _inputs(B, Hq, Hk, D, Nq, Nk, block, lo, hi, q_offset, k_offset, gated, pad=(2, 3),
            dtype=torch.float64):
    r_min, r_max = relative_offsets(Nq, Nk, block=block, lo_off=lo, hi_off=hi,
                                    q_offset=q_offset, k_offset=k_offset)
    r0 = r_min - pad[0]
    L = max(1, r_max - r0 + 1 + pad[1])
    q = torch.randn(B, Hq, Nq, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hk, Nk, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hk, Nk, D, dtype=dtype, requires_grad=True)
    rel = torch.randn(Hq, L, dtype=dtype, requires_grad=True)
    gate = (torch.rand(B, Hq, Nq, dtype=dtype) * 2).requires_grad_() if gated else None
    return q, k, v, rel, gate, r0


@pytest.mark.parametrize("trial", range(12))
def test_reference_matches_dense_oracle_forward_and_all_gradients(trial):
    rng = random.Random(torch.randint(0, 2**31, ()).item())
    (B, Hq, Hk, D, Nq, Nk, block, lo, hi, q_offset, k_offset, klen, rope,
     gated) = _case(rng)
    q, k, v, rel, gate, r0 = _inputs(B, Hq, Hk, D, Nq, Nk, block, lo, hi, q_offset, k_offset,
                                      gated)
    out = interval_attention(q, k, v, block=block, lo_off=lo, hi_off=hi, rope=rope,
                             key_lengths=klen, q_offset=q_offset, k_offset=k_offset,
                             rel_bias=rel, gate=gate, rel_offset=r0, backend="reference")
    mask = oracle.interval_mask(Nq, Nk, block, lo, hi, q_offset, k_offset, klen, B)
    bias = oracle.relative_bias_matrix(rel, gate, r0, Nq, Nk, q_offset, k_offset, B)
    ref = oracle.dense_biased_attention(q, k, v, mask, bias,
                                        rope_dim=0 if rope is None else rope.dim,
                                        interleaved=False if rope is None else rope.interleaved,
                                        q_offset=q_offset, k_offset=k_offset)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    dout = torch.randn_like(out)
    leaves = [t for t in (q, k, v, rel, gate) if t is not None]
    got = torch.autograd.grad(out, leaves, dout, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(ref, leaves, dout, allow_unused=True, materialize_grads=True)
    for name, a, b in zip(("dq", "dk", "dv", "drel_bias", "dgate"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")
    # the bias matters (a test that cannot fail otherwise): without it the output differs
    # wherever a row sees two keys or more
    if (mask.sum(-1) >= 2).any():
        plain = interval_attention(q, k, v, block=block, lo_off=lo, hi_off=hi, rope=rope,
                                   key_lengths=klen, q_offset=q_offset, k_offset=k_offset,
                                   backend="reference")
        assert not torch.allclose(plain, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_low_precision_against_float64(dtype):
    """fp32 / fp16 inputs compute in float32: error vs the float64 oracle within the rounding of
    the inputs' own dtype (outputs are stored in that dtype)."""
    B, Hq, Hk, D, Nq, Nk = 2, 4, 2, 16, 45, 45
    block, lo, hi = oracle.chunked(4, 2, 1)
    q, k, v, rel, gate, r0 = _inputs(B, Hq, Hk, D, Nq, Nk, block, lo, hi, 0, 0, True,
                                      dtype=dtype)
    out = interval_attention(q, k, v, block=block, lo_off=lo, hi_off=hi, rel_bias=rel,
                             gate=gate, rel_offset=r0, backend="reference")
    assert out.dtype == dtype
    mask = oracle.interval_mask(Nq, Nk, block, lo, hi, batch=B)
    bias = oracle.relative_bias_matrix(rel, gate, r0, Nq, Nk, batch=B)
    ref = oracle.dense_biased_attention(q, k, v, mask, bias)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_gradcheck_float64():
    B, Hq, Hk, D, Nq, Nk = 1, 2, 1, 4, 7, 9
    block, lo, hi = oracle.band(3, 1)
    q, k, v, rel, gate, r0 = _inputs(B, Hq, Hk, D, Nq, Nk, block, lo, hi, 2, 0, True)
    klen = torch.tensor([8])

    def f(q, k, v, rel, gate):
        return interval_attention(q, k, v, block=block, lo_off=lo, hi_off=hi, q_offset=2,
                                  key_lengths=klen, rope=pyencoder.Rope(4), rel_bias=rel,
                                  gate=gate, rel_offset=r0, backend="reference")
    assert torch.autograd.gradcheck(f, (q, k, v, rel, gate))
    assert torch.autograd.gradcheck(lambda q, k, v, rel: f(q, k, v, rel, None), (q, k, v, rel))


def test_nonfinite_gate_poisons_exactly_its_row():
    B, Hq, Hk, D, N = 1, 2, 2, 8, 20
    block, lo, hi = oracle.band(4, 1)
    q, k, v, rel, gate, r0 = _inputs(B, Hq, Hk, D, N, N, block, lo, hi, 0, 0, True)
    g2 = gate.detach().clone()
    g2[0, 1, 7] = float("nan")
    kw = dict(block=block, lo_off=lo, hi_off=hi, rel_bias=rel.detach(), rel_offset=r0,
              backend="reference")
    out = interval_attention(q.detach(), k.detach(), v.detach(), gate=g2, **kw)
    g3 = g2.clone()
    g3[0, 1, 7] = 0.5
    clean = interval_attention(q.detach(), k.detach(), v.detach(), gate=g3, **kw)
    bad = torch.zeros(B, Hq, N, dtype=torch.bool)
    bad[0, 1, 7] = True
    assert torch.isnan(out[bad]).all()
    assert torch.equal(out[~bad], clean[~bad])


def test_relative_offsets_cover_exactly_the_visible_pairs():
    rng = random.Random(torch.randint(0, 2**31, ()).item())
    for _ in range(30):
        (B, Hq, Hk, D, Nq, Nk, block, lo, hi, q_offset, k_offset, klen, rope,
         gated) = _case(rng)
        r_min, r_max = relative_offsets(Nq, Nk, block=block, lo_off=lo, hi_off=hi,
                                        q_offset=q_offset, k_offset=k_offset)
        m = oracle.interval_mask(Nq, Nk, block, lo, hi, q_offset, k_offset)[0, 0]
        i, j = torch.nonzero(m, as_tuple=True)
        if i.numel():
            r = (j + k_offset) - (i + q_offset)
            assert r_min <= int(r.min()) and int(r.max()) <= r_max


def test_bad_bias_arguments_raise_naming_them():
    q = torch.randn(1, 2, 10, 8)
    k = v = torch.randn(1, 2, 10, 8)
    kw = dict(block=1, lo_off=3, hi_off=1, backend="reference")
    with pytest.raises(ValueError, match=r"rel_bias must have shape \(Hq=2, L\)"):
        interval_attention(q, k, v, rel_bias=torch.randn(3, 5), **kw)
    with pytest.raises(ValueError, match=r"rel_bias must cover the relative offsets s - p in "
                                         r"\[-3, 1\].*rel_offset=-2"):
        interval_attention(q, k, v, rel_bias=torch.randn(2, 5), rel_offset=-2, **kw)
    with pytest.raises(ValueError, match=r"gate must have shape \(B, Hq, Nq\) = \(1, 2, 10\)"):
        interval_attention(q, k, v, rel_bias=torch.randn(2, 5), gate=torch.rand(1, 2, 9), **kw)
    with pytest.raises(ValueError, match="gate needs rel_bias"):
        interval_attention(q, k, v, gate=torch.rand(1, 2, 10), **kw)
    with pytest.raises(ValueError, match="rel_bias must be finite"):
        interval_attention(q, k, v, rel_bias=torch.full((2, 5), float("nan")), **kw)
    # the default rel_offset is r_min: 5 columns cover [-3, 1]
    out = interval_attention(q, k, v, rel_bias=torch.randn(2, 5), **kw)
    assert out.shape == q.shape


def _wavlm_oracle(m, x, key_lengths=None):
    """WavLMSelfAttention's function from its parameters through the dense float64 oracle:
    explicit bucket bias matrix table[bucket(s - p)], gate from the module's own formula."""
    from pyencoder.nn.relpos import relative_bias_gate
    B, T, E = x.shape
    H = m.num_heads
    q, k, v = (proj(x).view(B, T, H, -1).transpose(1, 2) for proj in (m.q_proj, m.k_proj, m.v_proj))
    rel = torch.arange(T)[None, :] - torch.arange(T)[:, None]
    table = m.relative_bias_table()
    bias = table.double()[m.bucket(rel)].permute(2, 0, 1)[None]          # (1, H, T, T)
    if m.gated:
        gate = relative_bias_gate(x, m.gru_rel_pos_linear, m.gru_rel_pos_const, H)
        bias = bias * gate.double()[..., None]
    mask = oracle.interval_mask(T, T, m.block, m.lo_off, m.hi_off, key_lengths=key_lengths,
                                batch=B)
    o = oracle.dense_biased_attention(q, k, v, mask, bias, scale=m.scale)
    return m.out_proj(o.to(x.dtype).transpose(1, 2).reshape(B, T, E))


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("mask", [dict(left=6, right=2), dict(chunk_size=4, left_chunks=2,
                                                                lookahead=3),
                                  dict(left=None, right=0)])
def test_wavlm_module_runs_the_fused_bias_and_matches_the_oracle(gated, mask, monkeypatch):
    """nn.WavLMSelfAttention offline (training: every parameter's gradient, the bucket table and
    the gate's included) runs the op's fused bias and matches the dense float64 oracle."""
    from pyencoder.nn import WavLMSelfAttention
    calls = _spy_biased_op(monkeypatch)
    m = WavLMSelfAttention(16, 2, num_buckets=16, max_distance=40, gated=gated, **mask).double()
    if gated:
        with torch.no_grad():
            m.gru_rel_pos_const.uniform_(0.5, 1.5)
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    klen = torch.tensor([23, 17])
    y = m(x, key_lengths=klen)
    assert calls, "the fused-bias op was not called"
    ref = _wavlm_oracle(m, x, klen)
    valid = (torch.arange(23)[None, :] < klen[:, None])[..., None]
    torch.testing.assert_close(y * valid, ref * valid, rtol=1e-9, atol=1e-10)
    params = [p for p in m.parameters()]
    dy = torch.randn_like(y) * valid
    g1 = torch.autograd.grad(y, params, dy, allow_unused=True, materialize_grads=True)
    g2 = torch.autograd.grad(ref, params, dy, allow_unused=True, materialize_grads=True)
    names = [n for n, _ in m.named_parameters()]
    assert "rel_attn_embed.weight" in names
    for n, a, b in zip(names, g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=lambda s: f"{n}: {s}")
    assert g1[names.index("rel_attn_embed.weight")].abs().sum() > 0


def test_opcheck_biased_op_reference():
    """torch.library.opcheck of the registered biased op (schema, fake kernel, autograd
    registration) on the reference backend, gated and plain."""
    from pyencoder.ops.attention import _interval_attention_op
    B, Hq, Hk, D, N = 1, 2, 1, 8, 11
    q = torch.randn(B, Hq, N, D, requires_grad=True)
    k = torch.randn(B, Hk, N, D, requires_grad=True)
    v = torch.randn(B, Hk, N, D, requires_grad=True)
    rel = torch.randn(Hq, 7, requires_grad=True)
    for gate in (torch.rand(B, Hq, N, requires_grad=True), None):
        args = attention_op_args(q, k, v, rel_bias=rel, gate=gate, rel_offset=-4, block=1,
                                 lo_off=4, hi_off=2, scale=D ** -0.5)
        torch.library.opcheck(_interval_attention_op, (*args, "reference"))


def test_wavlm_fused_bias_equals_the_plain_torch_tiles():
    """The fused path and relpos' plain-torch tiles (fused_bias=False, the path before) compute
    the same function (float64: to rounding), outputs and table / gate-parameter gradients."""
    from pyencoder.nn import WavLMSelfAttention
    m = WavLMSelfAttention(16, 2, chunk_size=3, left_chunks=1, lookahead=2, num_buckets=12,
                           max_distance=30).double()
    x = torch.randn(2, 17, 16, dtype=torch.float64)
    res = []
    for fused in (True, False):
        m.fused_bias = fused
        y = m(x)
        res.append((y, torch.autograd.grad(y.square().sum(), list(m.parameters()))))
    torch.testing.assert_close(res[0][0], res[1][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_hf_wavlm_chunked_patch_runs_the_fused_bias_and_matches_the_plain_tiles(monkeypatch):
    """A transformers WavLM patched with chunked attention (FocalCodec-Stream's mask) runs the
    fused-bias op in every layer and equals relpos' plain-torch tiles (the path before), output
    and the gradients of the bucket table and the gate parameters (train mode, dropout 0)."""
    T = pytest.importorskip("transformers")
    import functools

    import pyencoder.hf as H
    import pyencoder.hf.wavlm as W
    cfg = T.WavLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, conv_dim=(8, 8), conv_kernel=(10, 3),
                        conv_stride=(5, 2), num_buckets=32, max_bucket_distance=64,
                        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                        feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0,
                        feat_extract_norm="group", do_stable_layer_norm=False)
    model = T.WavLMModel(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    H.apply_pyencoder_to_wav2vec2(model, chunk_size=4, left_chunks=2, lookahead_frames=2,
                                  rope=False)
    model.train()
    wav = torch.randn(2, 1200, dtype=torch.float64)
    calls = _spy_biased_op(monkeypatch)
    names = [n for n, _ in model.named_parameters() if "rel_attn_embed" in n or "gru_rel" in n]
    params = [p for n, p in model.named_parameters() if n in names]
    assert any("rel_attn_embed" in n for n in names)
    out = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(W, "_core_attention",
                                functools.partial(W._core_attention, fused=False))
        calls.clear()
        y = model(wav).last_hidden_state
        assert bool(calls) == fused
        out.append((y, torch.autograd.grad(y.square().sum(), params)))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-9, atol=1e-10)
    for n, a, b in zip(names, out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=lambda s: f"{n}: {s}")


@pytest.mark.parametrize("path", ["fused", "unfused", "dropout"])
def test_biased_attention_where_no_query_sees_a_key_has_zero_gradients(path):
    """Every row empty (the band ends before the first key): zeros out, and zero gradients for
    q, k, v, the bucket table and the gate. The unfused and dropout tile paths built their empty
    tiles with new_zeros: the output had no graph and a backward raised "element 0 of tensors
    does not require grad" (a WavLM training batch whose keys are all padding)."""
    from pyencoder.nn.relpos import biased_interval_attention, relative_position_bucket
    torch.manual_seed(6)
    q, k, v = (torch.randn(2, 2, 5, 4, requires_grad=True) for _ in range(3))
    table = torch.randn(32, 2, requires_grad=True)
    gate = torch.rand(2, 2, 5, requires_grad=True)
    kw = dict(fused=path == "fused", dropout_p=0.2 if path == "dropout" else 0.0)
    out = biased_interval_attention(q, k, v, gate, table,
                                    lambda r: relative_position_bucket(r, 32, 100),
                                    mask=pyencoder.IntervalMask.band(0, 0), k_offset=10, **kw)
    assert torch.equal(out, torch.zeros_like(out)) and out.requires_grad
    out.backward(torch.randn_like(out))
    for t in (q, k, v, table, gate):
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t)), path
