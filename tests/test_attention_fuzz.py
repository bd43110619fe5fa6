"""Randomised cross-feature check of the Triton attention kernels (interpreter, CPU) against the
reference backend in float64: each case draws its own combination of mask (band, chunked, sink
keys, frame-rate band, frame-rate chunked, full), RoPE (partial, interleaved or off), positions
(q / k offsets), key padding, GQA, head_dim, the gated relative bias and dtype (float32 / float16),
and compares the output and every gradient (q, k, v, bias table, gate). The grids of the other
attention tests hold one feature at a time against a default for the rest; combinations are where
a mask's bounds, the key padding and the RoPE positions meet (a silent wrong answer there passes
every single-feature grid). Ten more cases run at the GPU's tiles (sm_90 table: 128 x 64, 64 x
128, 64 x 32, ...) instead of the interpreter's 16 x 16, over up to ~200 positions.

Both sides get the same inputs: the kernel's dtype-rounded q, k, v and output cotangent (float64
copies of them for the reference), so the differences are the kernel's own arithmetic. Tolerances
(max |error| / max(1, max |reference|), per tensor): float32 1e-5 (IEEE dots in the interpreter;
a run of 80 such cases showed at most 8e-7), float16 2e-2 (the probabilities and dS are rounded to
float16 for the tensor-core dots and the output to float16: ~5e-4 each; 80 cases showed at most
5.7e-3). Fixed seeds: every run draws the same cases.
"""
import random

import pytest
import torch

import pyencoder
from pyencoder import IntervalMask
from pyencoder.ops.attention import cross_attention, interval_attention, relative_offsets


def _has_triton():
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


pytestmark = pytest.mark.skipif(torch.cuda.is_available() or not _has_triton(),
                                reason="interpreter test (CPU with triton)")

TOL = {torch.float32: 1e-5, torch.float16: 2e-2}
N_CASES = 32


def _mask(rng):
    kind = rng.choice(["band", "chunked", "sink", "frames", "frame_chunked", "full"])
    qf = kf = 1
    if kind == "band":
        m = IntervalMask.band(rng.choice([None, 0, 1, 5, 17, 40]), rng.choice([0, 1, 3, 9]))
    elif kind == "chunked":
        m = IntervalMask.chunked(rng.randint(1, 20), rng.choice([None, 0, 1, 3]),
                                 rng.choice([0, 1, 3]))
    elif kind == "sink":
        m = IntervalMask.band(rng.choice([0, 2, 9]), rng.choice([0, 3]), sink=rng.randint(1, 6))
    elif kind == "full":
        m = None     # built from Nk below
    else:
        qf, kf = rng.choice([(1, 2), (2, 1), (16, 3), (3, 16), (2, 3)])
        if kind == "frames":
            m = IntervalMask.frames(qf, kf, rng.choice([None, 0, 1, 4]), rng.choice([0, 1, 2]),
                                    extra=rng.choice([0, 0, 2]))
        else:
            m = IntervalMask.frame_chunked(qf, kf, rng.randint(1, 4), rng.choice([None, 0, 1]),
                                           rng.choice([0, 1, 2]))
    return kind, m, qf, kf


def _case(seed, n_max=70):
    rng = random.Random(seed)
    B, Hk, G = rng.randint(1, 2), rng.randint(1, 2), rng.choice([1, 2])
    D = rng.choice([8, 16, 24, 32])
    kind, m, qf, kf = _mask(rng)
    Nq = rng.randint(1, n_max)
    Nk = max(1, (Nq * kf) // qf + rng.randint(-3, 3)) if m is not None and m.is_frame else Nq
    if m is None:
        m = IntervalMask.full(Nk)
    rope = None
    if rng.random() < 0.6:
        rope = pyencoder.Rope(rng.choice([d for d in (2, 4, 8, 16, 24, 32) if d <= D]),
                              interleaved=rng.random() < 0.4)
    q_off = rng.choice([0, 0, 3, 17, 100])
    k_off = q_off if (not m.is_frame and rng.random() < 0.6) else rng.choice([0, 5, 17, 100])
    key_lengths = (torch.tensor([rng.randint(0, Nk) for _ in range(B)])
                   if rng.random() < 0.4 else None)
    dtype = rng.choice([torch.float32, torch.float16])
    bias = None
    if not m.is_frame and rng.random() < 0.35:
        block, lo, hi = m.params
        r_min, r_max = relative_offsets(Nq, Nk, block=block, lo_off=lo, hi_off=hi,
                                        q_offset=q_off, k_offset=k_off)
        if r_min <= r_max:
            rel_offset = r_min - rng.randint(0, 2)
            L = r_max - rel_offset + 1 + rng.randint(0, 3)
            bias = (L, rel_offset, rng.random() < 0.5)
    return dict(B=B, Hq=Hk * G, Hk=Hk, D=D, Nq=Nq, Nk=Nk, mask=m, kind=kind, rope=rope,
                q_offset=q_off, k_offset=k_off, key_lengths=key_lengths, dtype=dtype, bias=bias)


def _run(c, backend, inputs, cot):
    dt = torch.float64 if backend == "reference" else c["dtype"]
    q, k, v = (x.to(dt).requires_grad_(True) for x in inputs[:3])
    leaves, extra = [q, k, v], {}
    if c["bias"] is not None:
        bt = torch.float64 if backend == "reference" else torch.float32
        rel = inputs[3].to(bt).requires_grad_(True)
        gate = None if inputs[4] is None else inputs[4].to(bt).requires_grad_(True)
        extra = dict(rel_bias=rel, gate=gate, rel_offset=c["bias"][1])
        leaves += [rel] + ([gate] if gate is not None else [])
    kw = dict(rope=c["rope"], key_lengths=c["key_lengths"], q_offset=c["q_offset"],
              k_offset=c["k_offset"], backend=backend)
    if c["mask"].is_frame:
        out = cross_attention(q, k, v, mask=c["mask"], **kw)
    else:
        out = interval_attention(q, k, v, mask=c["mask"], **kw, **extra)
    grads = torch.autograd.grad(out, leaves, cot.to(out.dtype))
    return [out.double()] + [g.double() for g in grads]


@pytest.mark.parametrize("seed", range(N_CASES))
def test_triton_matches_reference_on_random_feature_combinations(seed):
    _check_case(_case(seed), seed)


# The interpreter runs 16 x 16 tiles (ops/_attention_triton._build_kernels); a GPU runs the sm_90
# table's. These cases run the kernels at the GPU's tiles (the first choice of the plain, the
# biased and the frame rows: M != N, tiles larger than the sequence and several per sequence),
# so a tile-shape-dependent bound is caught here, not first on a device.
GPU_TILES = {
    "plain": ((128, 64), (128, 64), (64, 128)),
    "biased": ((64, 64), (64, 32), (32, 64)),
    "frame": ((128, 32), (128, 32), (32, 64)),
}
# (tiles, seed, n_max): longer sequences (up to 195 queries, 196 keys); the plain tiles on sink,
# band and full masks, the biased ones on chunked masks with the (gated) bias, the frame ones on
# frame bands and frame chunks (with padding, GQA, RoPE in several)
GPU_TILE_CASES = [(t, seed, 200) for t, seeds in (("plain", (14, 6, 3)),
                                                   ("biased", (10, 18, 24, 31)),
                                                   ("frame", (21, 16, 37)))
                  for seed in seeds]


@pytest.mark.parametrize("tiles,seed,n_max", GPU_TILE_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in GPU_TILE_CASES])
def test_triton_at_the_gpu_tiles_matches_reference(tiles, seed, n_max, monkeypatch):
    import triton
    from pyencoder.ops import _attention_triton as AT
    from pyencoder.triton_kernels import interval_attention as ia
    fns = (ia._interval_attention_fwd_kernel, ia._interval_attention_bwd_dq_kernel,
           ia._interval_attention_bwd_dkdv_kernel)
    monkeypatch.setattr(AT, "_kernels", {
        name: (fn, triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=4, num_stages=1), None)
        for name, fn, (m, n) in zip(("fwd", "dq", "dkdv"), fns, GPU_TILES[tiles])})
    used, tile = [], AT._tile

    def spy(configs):
        used.append(tile(configs)[:2])
        return tile(configs)
    monkeypatch.setattr(AT, "_tile", spy)
    _check_case(_case(seed, n_max), seed)
    assert set(used) == set(GPU_TILES[tiles]), used        # the launches ran at these tiles


def _check_case(c, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    B, Hq, Hk, D, Nq, Nk = (c[x] for x in ("B", "Hq", "Hk", "D", "Nq", "Nk"))
    # the kernel's dtype-rounded values, for both sides
    q, k, v = (torch.randn(*s, generator=g).to(c["dtype"]).double()
               for s in ((B, Hq, Nq, D), (B, Hk, Nk, D), (B, Hk, Nk, D)))
    cot = torch.randn(B, Hq, Nq, D, generator=g).to(c["dtype"]).double()
    rel = gate = None
    if c["bias"] is not None:
        L, _, gated = c["bias"]
        rel = torch.randn(Hq, L, generator=g).float().double()
        gate = torch.randn(B, Hq, Nq, generator=g).float().double() if gated else None
    inputs = (q, k, v, rel, gate)
    ref = _run(c, "reference", inputs, cot)
    tri = _run(c, "triton", inputs, cot)
    names = ["out", "dq", "dk", "dv", "drel_bias", "dgate"][:len(ref)]
    tol = TOL[c["dtype"]]
    desc = {k_: (v_ if k_ != "rope" or v_ is None else (v_.dim, v_.interleaved))
            for k_, v_ in c.items()}
    for name, a, b in zip(names, ref, tri):
        assert a.shape == b.shape, (name, desc)
        assert not torch.isnan(b).any(), (name, desc)
        if a.numel() == 0:
            continue
        err = (a - b).abs().max().item()
        scale = max(1.0, a.abs().max().item())
        assert err <= tol * scale, (name, err, scale, desc)


def test_the_cases_cover_every_feature():
    """The fixed seeds draw every mask kind, both dtypes, RoPE on (interleaved too) and off,
    padding, GQA, offsets and the gated and plain bias (so the fuzz exercises what it claims)."""
    cases = [_case(s) for s in range(N_CASES)]
    assert {c["kind"] for c in cases} == {"band", "chunked", "sink", "frames", "frame_chunked",
                                          "full"}
    assert {c["dtype"] for c in cases} == {torch.float32, torch.float16}
    assert any(c["rope"] is None for c in cases)
    assert any(c["rope"] is not None and c["rope"].interleaved for c in cases)
    assert any(c["rope"] is not None and c["rope"].dim < c["D"] for c in cases)
    assert any(c["key_lengths"] is not None for c in cases)
    assert any(c["Hq"] > c["Hk"] for c in cases)
    assert any(c["q_offset"] != c["k_offset"] for c in cases)
    assert any(c["bias"] is not None and c["bias"][2] for c in cases)
    assert any(c["bias"] is not None and not c["bias"][2] for c in cases)
