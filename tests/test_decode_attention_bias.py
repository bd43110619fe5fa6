"""Decode-step attention with a relative bias (pyencoder.ops.decode_attention's rel_bias / gate /
rel_offset) and GQA rings: the reference backend vs an independent dense float64 oracle written
here (explicit loops over slots, heads, rows and key positions), the Triton kernel under the
interpreter (fp32, fp16) vs the reference, and the argument checks.

Tolerances. Reference vs oracle, float64: the same float64 math up to summation order, 1e-12 on
O(1) outputs. Triton fp32 (ieee dot) vs the fp32 reference: a few ulp of the O(10) scores
through exp, 2e-6 absolute (the unbiased kernel test uses the same). Triton fp16 vs the fp32
reference of the same fp16 inputs: the kernel rounds the rotated q and the probabilities to fp16
before tl.dot (relative 2**-11 each), so about 1e-3 on O(1) outputs; 4e-3 leaves room for the sum
over a few dozen keys.
"""
import math
import random

import pytest
import torch

from conftest import has_triton
from pyencoder import Rope
from pyencoder.ops.decode_attention import decode_attention, window_offsets
from pyencoder.reference.decode_attention import decode_attention_reference


def oracle(q, k, v, q_pos, q_count, n_keys, rot_dim, block, lo_off, hi_off, scale, rel_bias,
           gate, rel_offset):
    """Dense float64 decode attention from the definition: ring index of position s is s % cap,
    the ring holds positions [max(0, n - cap), n - 1]; RoPE (NeoX, first rot_dim features, angle
    float32(p) * float32(inv_freq)) on q; score += gate * rel_bias[h, s - p - rel_offset]."""
    B, H, M, D = q.shape
    Hk, cap = k.shape[1], k.shape[2]
    out = torch.zeros(B, H, M, D, dtype=torch.float64)
    inv = None
    if rot_dim:
        inv = 1.0 / 10000.0 ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
        inv = inv.float()
    for b in range(B):
        n = int(n_keys[b])
        for h in range(H):
            hk = h // (H // Hk)
            for i in range(int(q_count[b])):
                p = int(q_pos[b, i])
                qi = q[b, h, i].double().clone()
                if inv is not None:
                    ang = (torch.tensor(float(p), dtype=torch.float32) * inv).double()
                    half = rot_dim // 2
                    a, c = qi[:half].clone(), qi[half:rot_dim].clone()
                    qi[:half] = a * torch.cos(ang) - c * torch.sin(ang)
                    qi[half:rot_dim] = c * torch.cos(ang) + a * torch.sin(ang)
                base = (p // block) * block
                lo = max(base - lo_off, n - cap, 0)
                hi = min(base + hi_off, n - 1)
                keys = list(range(lo, hi + 1))
                if not keys:
                    continue
                sc = []
                for s in keys:
                    x = scale * float(qi @ k[b, hk, s % cap].double())
                    if rel_bias is not None:
                        g = 1.0 if gate is None else float(gate[b, h, i])
                        x += g * float(rel_bias[h, s - p - rel_offset])
                    sc.append(x)
                mx = max(sc)
                w = [math.exp(x - mx) for x in sc]
                tot = sum(w)
                for s, wi in zip(keys, w):
                    out[b, h, i] += wi / tot * v[b, hk, s % cap].double()
    return out


def random_case(dtype=torch.float64, device="cpu", gated=None, gqa=None, rope=None):
    """Random shapes: slots with partial fills (n < cap), wrapped rings (n > cap), empty slots,
    padding rows, GQA, band or chunked windows, extra table columns on both sides."""
    B = random.randint(1, 3)
    Hk = random.choice([1, 2])
    G = random.choice([1, 2, 3]) if gqa is None else gqa
    H = Hk * G
    M = random.randint(1, 6)
    D = random.choice([8, 12, 16])
    block = random.choice([1, 1, 2, 4])
    lo_off = random.randint(0, 9)
    hi_off = random.randint(block - 1, block - 1 + 3)
    cap = lo_off + hi_off + M + random.randint(0, 4)
    q = torch.randn(B, H, M, D, dtype=dtype, device=device)
    k = torch.randn(B, Hk, cap, D, dtype=dtype, device=device)
    v = torch.randn(B, Hk, cap, D, dtype=dtype, device=device)
    n = torch.tensor([random.choice([0, random.randint(1, cap), random.randint(cap, 4 * cap)])
                      for _ in range(B)], device=device)
    cnt = torch.tensor([random.randint(0, M) for _ in range(B)], device=device)
    # the pending queries of a stream: consecutive positions ending where hi(p) <= n - 1 allows
    first = (n - hi_off - M).clamp(min=0)
    qpos = first[:, None] + torch.arange(M, device=device)[None, :]
    r_min, r_max = window_offsets(block, lo_off, hi_off)
    pad_lo, pad_hi = random.randint(0, 3), random.randint(0, 3)
    L = r_max - r_min + 1 + pad_lo + pad_hi
    rel = torch.randn(H, L, dtype=dtype, device=device)
    use_gate = random.random() < 0.7 if gated is None else gated
    gate = (torch.rand(B, H, M, dtype=dtype, device=device) * 2) if use_gate else None
    rot = 0 if rope is False else random.choice([0, D // 2, D]) if rope is None else rope
    inv = Rope(rot).inv_freq(device) if rot else None
    args = (q, k, v, qpos, cnt, n, inv, False, block, lo_off, hi_off, D ** -0.5)
    return args, dict(rel_bias=rel, gate=gate, rel_offset=r_min - pad_lo), rot


@pytest.mark.parametrize("trial", range(12))
def test_reference_with_bias_matches_dense_oracle(trial):
    args, bias, rot = random_case()
    q, k, v, qpos, cnt, n, inv, il, block, lo, hi, scale = args
    out = decode_attention(*args, backend="reference", **bias)
    ref = oracle(q, k, v, qpos, cnt, n, rot, block, lo, hi, scale, **bias)
    assert torch.allclose(out, ref, atol=1e-12, rtol=1e-12), (out - ref).abs().max()
    plain = decode_attention(*args, backend="reference")
    ref0 = oracle(q, k, v, qpos, cnt, n, rot, block, lo, hi, scale, None, None, 0)
    assert torch.allclose(plain, ref0, atol=1e-12, rtol=1e-12)
    if (ref0 - ref).abs().max() > 1e-3:      # a row sees two or more keys: the bias matters
        assert (plain - out).abs().max() > 1e-3


def test_reference_without_bias_is_unchanged():
    """rel_bias=None runs the code of before; a zero bias adds +0.0 to each score: bit-identical."""
    for _ in range(4):
        args, bias, _ = random_case(torch.float32, gated=False)
        plain = decode_attention(*args, backend="reference")
        zero = decode_attention(*args, backend="reference",
                                rel_bias=torch.zeros_like(bias["rel_bias"]),
                                rel_offset=bias["rel_offset"])
        assert torch.equal(plain, zero)
        assert torch.equal(plain, decode_attention_reference(*args))


def test_nonfinite_gate_poisons_exactly_its_rows():
    args, bias, _ = random_case(torch.float64, gated=True, gqa=1, rope=False)
    q, k, v, qpos, cnt, n, *_ = args
    B, H, M, _ = q.shape
    n.fill_(k.shape[2] + 5)              # every slot full: every valid row sees keys
    cnt.fill_(M)
    qpos.copy_((n - args[10] - M).clamp(min=0)[:, None] + torch.arange(M)[None, :])
    gate = bias["gate"].clone()
    gate[0, 0, 0] = float("nan")
    out = decode_attention(*args, backend="reference", **dict(bias, gate=gate))
    clean = decode_attention(*args, backend="reference", **bias)
    bad = torch.zeros(B, H, M, dtype=torch.bool)
    bad[0, 0, 0] = True
    assert torch.isnan(out[bad]).all()
    assert torch.equal(out[~bad], clean[~bad])


def test_bias_argument_checks():
    args, bias, _ = random_case(torch.float32, gated=True, gqa=1)
    q = args[0]
    B, H, M, _ = q.shape
    block, lo, hi = args[8:11]
    r_min, r_max = window_offsets(block, lo, hi)
    rel, gate = bias["rel_bias"], bias["gate"]
    with pytest.raises(ValueError, match="gate needs rel_bias"):
        decode_attention(*args, gate=gate)
    with pytest.raises(ValueError, match="rel_offset needs rel_bias"):
        decode_attention(*args, rel_offset=-3)
    with pytest.raises(ValueError, match="rel_bias must be 2-D"):
        decode_attention(*args, rel_bias=rel[:, None])
    with pytest.raises(ValueError, match=r"rel_bias must have shape \(H="):
        decode_attention(*args, rel_bias=torch.zeros(H + 1, 40))
    with pytest.raises(TypeError, match="rel_bias must have a floating dtype"):
        decode_attention(*args, rel_bias=torch.zeros(H, 40, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"gate must have shape \(B, H, M\)"):
        decode_attention(*args, rel_bias=rel, gate=gate.new_zeros(B, H, M + 1))
    with pytest.raises(TypeError, match="gate must have a floating dtype"):
        decode_attention(*args, rel_bias=rel, gate=gate.to(torch.int32))
    # one column short (a one-offset window leaves no column: the shape check names that first)
    short = "must cover the window's relative offsets" if r_max > r_min else r"L >= 1; got"
    with pytest.raises(ValueError, match=short):
        decode_attention(*args, rel_bias=rel[:, :r_max - r_min], rel_offset=r_min)
    with pytest.raises(ValueError, match="must cover the window's relative offsets"):
        decode_attention(*args, rel_bias=torch.zeros(H, r_max - r_min + 1), rel_offset=r_min + 1)
    with pytest.raises(TypeError, match="rel_offset must be an int"):
        decode_attention(*args, rel_bias=rel, rel_offset=1.5)
    unbounded = args[:9] + (-1,) + args[10:]
    with pytest.raises(ValueError, match="bounded left context"):
        decode_attention(*unbounded, rel_bias=rel)
    with pytest.raises(ValueError, match="H % Hk == 0"):
        k3 = torch.randn(B, 3, args[1].shape[2], q.shape[-1]) if H != 3 else \
            torch.randn(B, 2, args[1].shape[2], q.shape[-1])
        decode_attention(q, k3, k3, *args[3:])
    # exactly covering is accepted (default rel_offset = r_min)
    decode_attention(*args, rel_bias=torch.zeros(H, r_max - r_min + 1))


@pytest.mark.skipif(not has_triton(), reason="triton is not installed")
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-6), (torch.float16, 4e-3)])
@pytest.mark.parametrize("trial", range(3))
def test_triton_kernel_with_bias_matches_reference(dtype, atol, trial):
    from pyencoder.ops._decode_attention_triton import decode_attention_triton
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    args, bias, _ = random_case(dtype, dev, gated=trial != 1, gqa=2 if trial == 2 else None)
    ref = decode_attention_reference(*args, bias["rel_bias"], bias["gate"],
                                     bias["rel_offset"]).float()
    out = decode_attention_triton(*args, **bias).float()
    assert torch.allclose(out, ref, atol=atol, rtol=atol), (out - ref).abs().max()
    cnt = args[4]
    for b in range(out.shape[0]):
        assert torch.all(out[b, :, int(cnt[b]):] == 0)


@pytest.mark.skipif(not has_triton(), reason="triton is not installed")
def test_triton_kernel_nonfinite_gate_and_gqa_without_bias():
    from pyencoder.ops._decode_attention_triton import decode_attention_triton
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    args, bias, _ = random_case(torch.float32, dev, gated=True, gqa=2)
    q, k, v, qpos, cnt, n, *_ = args
    n.fill_(k.shape[2] + 3)
    cnt.fill_(q.shape[2])
    qpos.copy_((n - args[10] - q.shape[2]).clamp(min=0)[:, None]
               + torch.arange(q.shape[2], device=dev)[None, :])
    gate = bias["gate"].clone()
    gate[0, 1, 0] = float("inf")
    out = decode_attention_triton(*args, **dict(bias, gate=gate))
    ref = decode_attention_reference(*args, bias["rel_bias"], gate, bias["rel_offset"])
    assert torch.isnan(out[0, 1, 0]).all() and torch.isnan(ref[0, 1, 0]).all()
    ok = ~torch.isnan(ref)
    assert torch.allclose(out[ok], ref[ok], atol=2e-6, rtol=1e-5)
    # a NaN table column: NaN exactly in the rows that see its offset, on both backends
    rel = bias["rel_bias"].clone()
    p0, blk = int(qpos[0, 0]), args[8]
    seen = min((p0 // blk) * blk + args[10], int(n[0]) - 1) - p0     # an offset row 0 sees
    rel[0, seen - bias["rel_offset"]] = float("nan")
    out = decode_attention_triton(*args, **dict(bias, rel_bias=rel))
    ref = decode_attention_reference(*args, rel, bias["gate"], bias["rel_offset"])
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.isnan(ref).any()
    ok = ~torch.isnan(ref)
    assert torch.allclose(out[ok], ref[ok], atol=2e-6, rtol=1e-5)
    # GQA without a bias (GROUP constexpr alone)
    out = decode_attention_triton(*args)
    ref = decode_attention_reference(*args)
    assert torch.allclose(out, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_decode_refuses_gradients_and_tangents_by_name(backend, monkeypatch):
    """decode_attention is forward only: on the Triton path a gradient asked of it was dropped
    silently (no grad_fn: a loss mixing it with other terms backpropagated 1.69 off the
    offline op's), a jvp came back zero; on the reference autograd failed in its own words (an
    in-place softmax). Both are refused by name (a jvp of the reference, its torch ops, is
    right); under no_grad it runs as before."""
    if backend == "triton":
        if not has_triton():
            pytest.skip("triton is not installed")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(3)
    B, H, M, D, cap = 1, 2, 2, 4, 6
    q = torch.randn(B, H, M, D, requires_grad=True)
    kr, vr = torch.randn(B, H, cap, D), torch.randn(B, H, cap, D, requires_grad=True)
    args = (torch.tensor([[4, 5]]), torch.tensor([2]), torch.tensor([6]), None, False, 1, 3, 0,
            D ** -0.5)
    with pytest.raises(RuntimeError, match="decode_attention is forward only"):
        decode_attention(q, kr, vr, *args, backend=backend)
    jvp = lambda: torch.func.jvp(  # noqa: E731
        lambda v: decode_attention(q.detach(), kr, v, *args, backend=backend),
        (vr.detach(),), (torch.ones_like(vr),))
    if backend == "triton":        # no forward-mode formula: refused, not a zero tangent
        with pytest.raises(NotImplementedError, match="decode_attention has no forward-mode AD"):
            jvp()
    else:                          # the reference's torch ops carry the tangent: linear in v
        y, t = jvp()
        torch.testing.assert_close(t, decode_attention(q.detach(), kr, torch.ones_like(vr),
                                                       *args, backend=backend))
    with torch.no_grad():
        y = decode_attention(q, kr, vr, *args, backend=backend)
    assert y.shape == (B, H, M, D) and not y.requires_grad
