"""Decode-step attention with resident sink keys (pyencoder.ops.decode_attention's sink_k /
sink_v): the reference backend vs an independent dense float64 loop oracle written here (sinks
alone, with the gated relative bias, GQA rings, n_keys < S, padding rows, RoPE on and off), the
Triton kernel under the interpreter (fp32, fp16) vs the reference, the rule that ring entries at
positions < S are skipped, and the argument checks.

Tolerances: as tests/test_decode_attention_bias.py. Reference vs oracle, float64: the same
float64 math up to summation order, 1e-12 on O(1) outputs. Triton fp32 (ieee dot) vs the fp32
reference: 2e-6 (a few ulp of O(10) scores through exp). Triton fp16 vs the fp32 reference of the
same fp16 inputs: q and the probabilities are rounded to fp16 before tl.dot (2**-11 relative
each): 4e-3 on O(1) outputs.
"""
import math
import random

import pytest
import torch

from conftest import has_triton
from pyencoder import Rope
from pyencoder.ops.decode_attention import decode_attention, window_offsets
from pyencoder.reference.decode_attention import decode_attention_reference


def oracle(q, k, v, sk, sv, q_pos, q_count, n_keys, rot_dim, block, lo_off, hi_off, scale,
           rel_bias=None, gate=None, rel_offset=0):
    """Dense float64 decode attention with sinks from the definition: key position s is visible
    to valid row i (position p) iff s < n and (s < S, read from the sink buffer at index s, or
    s >= S within [lo(p), hi(p)] and still in the ring, read at index s % cap); RoPE (NeoX, first
    rot_dim features, float32 angles) on q; score += gate * rel_bias[h, clamp(s - p - rel_offset,
    0, L - 1)]."""
    B, H, M, D = q.shape
    Hk, cap = k.shape[1], k.shape[2]
    S = sk.shape[2]
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
                lo = max(base - lo_off if lo_off >= 0 else 0, n - cap, 0, S)
                hi = min(base + hi_off, n - 1)
                keys = [(s, sk[b, hk, s], sv[b, hk, s]) for s in range(min(S, n))]
                keys += [(s, k[b, hk, s % cap], v[b, hk, s % cap]) for s in range(lo, hi + 1)]
                if not keys:
                    continue
                sc = []
                for s, ks, _ in keys:
                    x = scale * float(qi @ ks.double())
                    if rel_bias is not None:
                        g = 1.0 if gate is None else float(gate[b, h, i])
                        col = min(max(s - p - rel_offset, 0), rel_bias.shape[1] - 1)
                        x += g * float(rel_bias[h, col])
                    sc.append(x)
                mx = max(sc)
                w = [math.exp(x - mx) for x in sc]
                tot = sum(w)
                for (_, _, vs), wi in zip(keys, w):
                    out[b, h, i] += wi / tot * vs.double()
    return out


def random_case(dtype=torch.float64, device="cpu", bias=None, gqa=None, rope=None, S=None,
                small_n=False):
    """Random shapes with sinks S in [0, 12] (inside and beyond the window): slots with n < S,
    partial fills, wrapped rings, empty slots, padding rows (q_count < M), GQA, band / chunked /
    unbounded windows; the ring's entries at positions < S hold other values than the sink
    buffer (they must be skipped)."""
    B = random.randint(1, 3)
    Hk = random.choice([1, 2])
    G = random.choice([1, 2, 3]) if gqa is None else gqa
    H = Hk * G
    M = random.randint(1, 6)
    D = random.choice([8, 12, 16])
    block = random.choice([1, 1, 2, 4])
    use_bias = random.random() < 0.5 if bias is None else bias
    lo_off = random.randint(0, 9) if use_bias or random.random() < 0.8 else -1
    hi_off = random.randint(block - 1, block - 1 + 3)
    cap = max(lo_off, 0) + hi_off + M + random.randint(0, 4)
    S = random.choice([0, 1, 3, 7, 12]) if S is None else S
    q = torch.randn(B, H, M, D, dtype=dtype, device=device)
    k = torch.randn(B, Hk, cap, D, dtype=dtype, device=device)
    v = torch.randn(B, Hk, cap, D, dtype=dtype, device=device)
    sk = torch.randn(B, Hk, S, D, dtype=dtype, device=device)
    sv = torch.randn(B, Hk, S, D, dtype=dtype, device=device)
    top = max(S, 1) if small_n else 4 * cap
    n = torch.tensor([random.choice([0, random.randint(1, min(cap, top)),
                                     random.randint(1, top)]) for _ in range(B)], device=device)
    cnt = torch.tensor([random.randint(0, M) for _ in range(B)], device=device)
    first = (n - hi_off - M).clamp(min=0)
    qpos = first[:, None] + torch.arange(M, device=device)[None, :]
    kw = dict(sink_k=sk, sink_v=sv)
    if use_bias:
        r_min, r_max = window_offsets(block, lo_off, hi_off)
        pad_lo, pad_hi = random.randint(0, 3), random.randint(0, 3)
        L = r_max - r_min + 1 + pad_lo + pad_hi
        kw["rel_bias"] = torch.randn(H, L, dtype=dtype, device=device)
        kw["gate"] = (torch.rand(B, H, M, dtype=dtype, device=device) * 2
                      if random.random() < 0.7 else None)
        kw["rel_offset"] = r_min - pad_lo
    rot = 0 if rope is False else random.choice([0, D // 2, D]) if rope is None else rope
    inv = Rope(rot).inv_freq(device) if rot else None
    args = (q, k, v, qpos, cnt, n, inv, False, block, lo_off, hi_off, D ** -0.5)
    return args, kw, rot


def _oracle(args, kw, rot):
    q, k, v, qpos, cnt, n, inv, il, block, lo, hi, scale = args
    bias = {key: kw[key] for key in ("rel_bias", "gate", "rel_offset") if key in kw}
    return oracle(q, k, v, kw["sink_k"], kw["sink_v"], qpos, cnt, n, rot, block, lo, hi, scale,
                  **bias)


@pytest.mark.parametrize("trial", range(16))
def test_reference_with_sinks_matches_dense_oracle(trial):
    args, kw, rot = random_case(bias=trial % 2 == 1, gqa=2 if trial % 4 == 3 else None,
                                rope=(trial % 3 != 0) and None, small_n=trial % 5 == 0)
    out = decode_attention(*args, backend="reference", **kw)
    ref = _oracle(args, kw, rot)
    assert torch.allclose(out, ref, atol=1e-12, rtol=1e-12), (out - ref).abs().max()
    cnt = args[4]
    for b in range(out.shape[0]):
        assert torch.all(out[b, :, int(cnt[b]):] == 0)


def test_sink_bias_uses_the_saturated_edge_column():
    """A sink key far left of the window reads column 0 of the table (clamped), and changing
    that column changes exactly the rows that see a sink key outside the table."""
    args, kw, rot = random_case(bias=True, S=3, gqa=1)
    q, k, v, qpos, cnt, n = args[:6]
    n.fill_(40)
    cnt.fill_(q.shape[2])
    qpos.copy_((n - args[10] - q.shape[2])[:, None] + torch.arange(q.shape[2])[None, :])
    out = decode_attention(*args, backend="reference", **kw)
    assert torch.allclose(out, _oracle(args, kw, rot), atol=1e-12, rtol=1e-12)
    rel = kw["rel_bias"].clone()
    rel[:, 0] += 3.0
    out2 = decode_attention(*args, backend="reference", **dict(kw, rel_bias=rel))
    assert torch.allclose(out2, _oracle(args, dict(kw, rel_bias=rel), rot), atol=1e-12,
                          rtol=1e-12)
    assert (out2 - out).abs().max() > 1e-6


def test_without_sinks_the_code_is_unchanged():
    """sink_k=None runs the code of before (bit-identical to the reference without the keyword);
    an empty sink buffer (S = 0) is the same function."""
    for _ in range(4):
        args, kw, _ = random_case(torch.float32, bias=False, S=0)
        plain = decode_attention(*args, backend="reference")
        assert torch.equal(plain, decode_attention_reference(*args))
        assert torch.allclose(decode_attention(*args, backend="reference", **kw), plain,
                              atol=1e-6, rtol=1e-6)


def test_ring_entries_below_the_sink_are_skipped():
    """Ring entries at positions < S hold other values than the sink buffer: the result depends
    only on the sink buffer there (a backend reading both would count those keys twice)."""
    args, kw, rot = random_case(torch.float64, bias=False, S=4, gqa=1, rope=False)
    q, k, v, qpos, cnt, n = args[:6]
    n.fill_(5)                 # ring holds positions 0..4, sink buffer 0..3
    cnt.fill_(q.shape[2])
    qpos.copy_(torch.arange(q.shape[2])[None, :].expand_as(qpos))
    out = decode_attention(*args, backend="reference", **kw)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :4] = torch.randn_like(k2[:, :, :4])
    v2[:, :, :4] = torch.randn_like(v2[:, :, :4])
    args2 = (q, k2, v2) + args[3:]
    assert torch.equal(decode_attention(*args2, backend="reference", **kw), out)
    assert torch.allclose(out, _oracle(args, kw, rot), atol=1e-12, rtol=1e-12)


def test_nonfinite_sink_key_poisons_exactly_the_rows_that_see_it():
    args, kw, _ = random_case(torch.float64, bias=False, S=3, gqa=1, rope=False)
    q, k, v, qpos, cnt, n = args[:6]
    B, H, M, _ = q.shape
    n.fill_(2)
    n[0] = 1
    cnt.fill_(M)
    sk = kw["sink_k"].clone()
    sk[0, 0, 1, 0] = float("nan")           # position 1: not yet appended in slot 0
    sk[-1, 0, 0, 0] = float("inf")          # position 0: seen by every row of the last slot
    out = decode_attention(*args, backend="reference", **dict(kw, sink_k=sk))
    bad = torch.zeros(B, H, M, dtype=torch.bool)
    bad[-1, 0] = True
    assert torch.isnan(out[bad]).all()
    assert not torch.isnan(out[~bad]).any()


def test_sink_argument_checks():
    args, kw, _ = random_case(torch.float32, bias=False, S=3, gqa=1)
    q, k = args[0], args[1]
    B, Hk, S, D = kw["sink_k"].shape
    with pytest.raises(ValueError, match="sink_k and sink_v go together.*sink_k alone"):
        decode_attention(*args, sink_k=kw["sink_k"])
    with pytest.raises(ValueError, match="sink_v alone"):
        decode_attention(*args, sink_v=kw["sink_v"])
    with pytest.raises(ValueError, match="sink_k must be 4-D"):
        decode_attention(*args, sink_k=kw["sink_k"][0], sink_v=kw["sink_v"])
    with pytest.raises(ValueError, match=r"sink_v must have shape \(B, Hk, S, D\) = "
                                         rf"\({B}, {Hk}, {S}, {D}\).*got \({B}, {Hk}, {S + 1}"):
        decode_attention(*args, sink_k=kw["sink_k"], sink_v=torch.randn(B, Hk, S + 1, D))
    with pytest.raises(ValueError, match=r"sink_k must have shape"):
        decode_attention(*args, sink_k=torch.randn(B, Hk + 1, S, D),
                         sink_v=torch.randn(B, Hk + 1, S, D))
    with pytest.raises(TypeError, match="sink_k must have the same dtype as k_ring"):
        decode_attention(*args, sink_k=kw["sink_k"].double(), sink_v=kw["sink_v"])
    with pytest.raises(TypeError, match="sink_v must be a torch.Tensor"):
        decode_attention(*args, sink_k=kw["sink_k"], sink_v=[1.0])


@pytest.mark.skipif(not has_triton(), reason="triton is not installed")
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-6), (torch.float16, 4e-3)])
@pytest.mark.parametrize("trial", range(4))
def test_triton_kernel_with_sinks_matches_reference(dtype, atol, trial):
    """Sinks alone (trial 0, 2) and with the gated bias (1, 3); GQA in 2 and 3; n < S in 0."""
    from pyencoder.ops._decode_attention_triton import decode_attention_triton
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    args, kw, _ = random_case(dtype, dev, bias=trial % 2 == 1, gqa=2 if trial >= 2 else None,
                              S=random.choice([1, 3, 7, 12]), small_n=trial == 0)
    bias = [kw.get(key) for key in ("rel_bias", "gate", "rel_offset")]
    ref = decode_attention_reference(*args, *bias, kw["sink_k"], kw["sink_v"]).float()
    out = decode_attention_triton(*args, **kw).float()
    assert torch.allclose(out, ref, atol=atol, rtol=atol), (out - ref).abs().max()
    cnt = args[4]
    for b in range(out.shape[0]):
        assert torch.all(out[b, :, int(cnt[b]):] == 0)


@pytest.mark.skipif(not has_triton(), reason="triton is not installed")
def test_triton_kernel_sinks_skip_the_ring_and_poison_like_the_reference():
    from pyencoder.ops._decode_attention_triton import decode_attention_triton
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    args, kw, _ = random_case(torch.float32, dev, bias=True, S=4, gqa=1, rope=False)
    q, k, v, qpos, cnt, n = args[:6]
    M = q.shape[2]
    n.fill_(6)
    cnt.fill_(M)
    qpos.copy_(torch.arange(M, device=dev)[None, :].expand_as(qpos))
    out = decode_attention_triton(*args, **kw)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :4] += 1.0
    v2[:, :, :4] -= 1.0
    assert torch.equal(decode_attention_triton(q, k2, v2, *args[3:], **kw), out)
    bias = [kw[key] for key in ("rel_bias", "gate", "rel_offset")]
    ref = decode_attention_reference(*args, *bias, kw["sink_k"], kw["sink_v"])
    assert torch.allclose(out, ref, atol=2e-6, rtol=2e-6)
    sk = kw["sink_k"].clone()
    sk[0, 0, 2, 1] = float("nan")
    qn = q.clone()
    qn[-1, 0, 0, 0] = float("inf")
    out = decode_attention_triton(qn, *args[1:], **dict(kw, sink_k=sk))
    ref = decode_attention_reference(qn, *args[1:], *bias, sk, kw["sink_v"])
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.isnan(ref[0, 0]).all()
    ok = ~torch.isnan(ref)
    assert torch.allclose(out[ok], ref[ok], atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("dt", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_narrow_index_dtypes_give_the_int64_result(dt):
    """The checks take any integer index tensor; the reference computed its bounds in the
    indices' own dtype: uint8 wrapped (a row at position 1 with lo_off 3 saw no key, a padding
    row's -1 bound became 255) and int8 overflowed near 127."""
    torch.manual_seed(5)
    q = torch.randn(2, 2, 3, 8)
    kr, vr = torch.randn(2, 1, 16, 8), torch.randn(2, 1, 16, 8)
    qp = torch.tensor([[120, 123, 125], [1, 2, 3]])
    qc, nk = torch.tensor([3, 2]), torch.tensor([127, 4])
    for lo, hi in ((3, 1), (3, 5), (-1, 0)):
        want = decode_attention_reference(q, kr, vr, qp, qc, nk, None, False, 1, lo, hi, 0.3)
        got = decode_attention(q, kr, vr, qp.to(dt), qc.to(dt), nk.to(dt), None, False, 1, lo,
                               hi, 0.3, backend="reference")
        assert torch.equal(got, want), (lo, hi)
        assert got[1, :, 2].abs().max() == 0        # the padding row
