"""Randomised cross-feature check of the causal convolutions: the Triton backend (interpreter, CPU)
AND the reference backend against an independent float64 oracle written here (F.conv1d on the
left-padded float64 input, the state concatenated by hand, the activation by its formula). Each
case draws its own combination of what the public ops expose: depthwise (widths 1..128),
grouped (C_in != C_out), dense, channel multipliers, stride (kernel not a multiple of it too),
bias, activation (None, silu, gelu), channel-first / channel-last / non-contiguous x, initial
state given or not (contiguous or not), the final state returned or not, lengths 1, < K, = K and
longer than a kernel's time block, batch 1 and > 1, float32 / float16; stride-1 cases also run
the streaming update (state in place, or a slot pool through ``state_indices`` with a -1 padding
row). Compared: the output, the final state (exactly: it is a copy of input samples), every
gradient (x, weight, bias, initial state, with a cotangent on the final state when returned) and
the updated state (exactly). The single-feature grids of test_conv_triton.py and
test_reference_conv.py hold the other features at a default; combinations (a state with a
stride, a channel-last input into the grouped kernel, a long input through a pool slot) are
where a silent wrong answer hides.

Both sides get the same inputs: the case dtype's rounded x, weight, bias, state and cotangents
(float64 copies of them for the oracle), so the differences are the backends' own arithmetic.
Error measure: max |error| / max(1, max |oracle|), per tensor. Both backends accumulate in
float32 and round once to the case dtype. Tolerances:
- float32 5e-6: fp32 sums of up to CG*K = 128 products (forward) and B*T ~ 400 (weight
  gradient) of O(1) values; a run of 300 cases (seeds 0..299) measured at most 5.9e-7
  (reference) and 5.3e-7 (Triton): a 8x margin.
- float16 1e-3: every output and gradient is one rounding to float16 of a float32 value
  |v| <= max(1, max |oracle|), at most half an ulp: 2^-11 = 4.9e-4 of the scale (plus the fp32
  accumulation, ~1e-6); the same 300 cases measured 4.8e-4 for both backends, the rounding
  itself. 1e-3 is twice that bound; a wrong tap, state sample or bias is an O(1) error.
Fixed seeds: every run draws the same cases; test_the_cases_cover_every_feature keeps them
covering every feature. Checked once by mutation: shifting the oracle's padded input by one
sample failed 76 of the 80 cases (the 4 others have K == stride and L < stride: no output and an
empty state), an off-by-one updated state in the oracle failed all 15 update cases with K > 1.
Dilation is not drawn: the ops have none (DESIGN.md's causal_conv1d has no dilation argument).
"""
import math
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import has_triton

from pyencoder.ops import causal_conv1d, causal_conv1d_update

TOL = {torch.float32: 5e-6, torch.float16: 1e-3}
N_CASES = 40
DW_WIDTHS = (1, 2, 3, 4, 5, 7, 16, 31, 33, 64, 128)
# time-block extents of the Triton kernels (pyencoder.ops._conv_triton): depthwise forward and
# dx up to 128 positions, the grouped (implicit GEMM) kernels up to 64
SPAN = {"depthwise": 128, "grouped": 64, "dense": 64, "multiplier": 64}
# the Triton side runs CPU tensors in the interpreter (conftest sets TRITON_INTERPRET=1 when there
# is no CUDA device); on a GPU machine test_conv_gpu.py covers the compiled kernels
BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    torch.cuda.is_available() or not has_triton(), reason="interpreter test (CPU with triton)"))]


# ------------------------------------------------------------------------------------------------
# the oracle

def _act(pre, activation):
    if activation is None:
        return pre
    if activation == "silu":
        return pre / (1.0 + torch.exp(-pre))
    return 0.5 * pre * (1.0 + torch.erf(pre / math.sqrt(2.0)))


def oracle(x, w, b, state, stride, groups, activation):
    """float64 (y, final_state) of DESIGN.md's causal conv: x left-padded by K - stride samples
    (``state`` or zeros), output t = taps [t*stride, t*stride + K) of the padded input, final
    state = the K - stride padded samples from T*stride on."""
    B, C, L = x.shape
    K = w.shape[-1]
    pad = K - stride
    head = state if state is not None else x.new_zeros(B, C, pad)
    xp = torch.cat((head, x), dim=-1)
    T = L // stride
    if T > 0:
        pre = F.conv1d(xp[..., :T * stride + pad], w, b, stride=stride, groups=groups)
    else:
        pre = x.new_zeros(B, w.shape[0], 0)
    return _act(pre, activation), xp[..., T * stride: T * stride + pad]


# ------------------------------------------------------------------------------------------------
# the cases

def _length(rng, K, stride, span):
    kind = rng.choice(["1", "<K", "=K", ">span", "mid"])
    if kind == "<K" and K == 1:
        kind = "1"
    if kind == "1":
        return kind, 1
    if kind == "<K":
        return kind, rng.randint(1, K - 1)
    if kind == "=K":
        return kind, K
    if kind == ">span":
        return kind, (span + rng.randint(1, 40)) * stride + rng.randint(0, stride - 1)
    return kind, rng.randint(2, 40)


def _case(seed):
    rng = random.Random(seed)
    # the first len(DW_WIDTHS) seeds are depthwise, one per width; the rest draw their kind
    kind = "depthwise" if seed < len(DW_WIDTHS) else rng.choice(
        ["depthwise"] * 2 + ["grouped"] * 2 + ["dense", "multiplier"])
    if kind == "depthwise":
        C = rng.choice([1, 3, 4, 6, 17, 20])
        Cout, groups = C, C
        K = DW_WIDTHS[seed] if seed < len(DW_WIDTHS) else rng.choice(DW_WIDTHS)
    elif kind == "grouped":
        groups = rng.choice([2, 3, 4])
        C = groups * rng.choice([1, 2, 3, 5])
        Cout = groups * rng.choice([1, 2, 4])
        K = rng.choice([1, 2, 3, 5, 7, 10, 16, 33])
    elif kind == "dense":
        groups, C, Cout = 1, rng.choice([1, 2, 5]), rng.choice([1, 3, 6])
        K = rng.choice([1, 2, 3, 5, 7, 10, 16, 33])
    else:
        C = rng.choice([2, 3, 5])
        groups, Cout = C, C * rng.choice([2, 3])
        K = rng.choice([2, 3, 4, 7, 16])
    stride = 1
    if K > 1 and rng.random() < 0.35:
        stride = rng.choice([s for s in (2, 3, 4, 5) if s <= K])
    len_kind, L = _length(rng, K, stride, SPAN[kind])
    if len_kind == ">span":
        if kind == "depthwise":         # a long depthwise input: few channels
            C = Cout = groups = min(C, 6)
    return_final = rng.random() < 0.6
    update = None
    if stride == 1:
        update = rng.choice([None, "plain", "indices"])
    c = dict(kind=kind, B=rng.choice([1, 1, 2, 3]), C=C, Cout=Cout, groups=groups, K=K,
             stride=stride, L=L, len_kind=len_kind, bias=rng.random() < 0.6,
             activation=rng.choice([None, "silu", "gelu"]),
             layout=rng.choice(["first", "last", "strided"]),
             state=rng.choice([None, "contiguous", "transposed"]),
             return_final=return_final, update=update,
             update_len=rng.choice([1, 2, 3, 9]),
             dtype=rng.choice([torch.float32, torch.float16]))
    if L < stride:
        # no output frame: the final state (the initial state itself) is the only output, so
        # give one and return it
        c["return_final"] = True
        c["state"] = c["state"] or "contiguous"
    return c


def _laid_out(t, layout):
    """A float copy of t (B, C, L) in memory layout ``layout``: channel-first contiguous,
    channel-last (a transposed view) or strided (every other sample of a wider buffer)."""
    B, C, L = t.shape
    if layout == "first":
        return t.clone()
    if layout == "last":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.randn(B, C, 2 * L + 1, dtype=t.dtype)
    wide[..., 1::2] = t
    out = wide[..., 1::2]
    assert torch.equal(out, t) and (not out.is_contiguous() or t.numel() == 1)
    return out


def _inputs(c, g):
    """The case's inputs rounded to its dtype, as float64 tensors (x, w, b, state, gy, gf)."""
    dt, B, C, Co, K, s, L = (c[n] for n in ("dtype", "B", "C", "Cout", "K", "stride", "L"))
    cg = C // c["groups"]

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dt).double()
    x = r(B, C, L)
    w = r(Co, cg, K, scale=(cg * K) ** -0.5)
    b = r(Co) if c["bias"] else None
    st = r(B, C, K - s) if c["state"] is not None else None
    gy = r(B, Co, L // s)
    gf = r(B, C, K - s) if c["return_final"] else None
    return x, w, b, st, gy, gf


def _err(got, want):
    if want.numel() == 0:
        return 0.0
    return (got.double() - want).abs().max().item() / max(1.0, want.abs().max().item())


def _desc(c):
    return {k: v for k, v in c.items()}


# ------------------------------------------------------------------------------------------------
# the fuzz

def _run_conv(c, backend, inputs):
    x64, w64, b64, s64, gy, gf = inputs
    dt = c["dtype"]
    x = _laid_out(x64.to(dt), c["layout"]).requires_grad_(True)
    w = w64.to(dt).requires_grad_(True)
    b = None if b64 is None else b64.to(dt).requires_grad_(True)
    s = None
    if s64 is not None:
        s = (s64.to(dt).clone() if c["state"] == "contiguous"
             else s64.to(dt).transpose(1, 2).contiguous().transpose(1, 2))
        s.requires_grad_(True)
    out = causal_conv1d(x, w, b, stride=c["stride"], groups=c["groups"],
                        activation=c["activation"], initial_state=s,
                        return_final_state=c["return_final"], backend=backend)
    y, fin = out if c["return_final"] else (out, None)
    assert y.dtype == dt and y.shape == gy.shape, (y.dtype, y.shape, _desc(c))
    leaves = [t for t in (x, w, b, s) if t is not None]
    outs, cots = [y], [gy.to(dt)]
    if fin is not None:
        assert fin.dtype == dt and fin.shape == gf.shape, (fin.dtype, fin.shape, _desc(c))
        outs.append(fin)
        cots.append(gf.to(dt))
    return outs, _grads(outs, leaves, cots)


def _grads(outs, leaves, cots):
    """Gradients of sum(out * cot) for every leaf; zeros where no output depends on it (an
    oracle output with no frame has no graph)."""
    pairs = [(o, g) for o, g in zip(outs, cots) if o.requires_grad]
    grads = [None] * len(leaves)
    if pairs:
        grads = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs],
                                    allow_unused=True)
    return [torch.zeros_like(l) if gr is None else gr for l, gr in zip(leaves, grads)]


def _oracle_conv(c, inputs):
    x64, w64, b64, s64, gy, gf = inputs
    leaves = [t.clone().requires_grad_(True) for t in (x64, w64, b64, s64) if t is not None]
    it = iter(leaves)
    x, w = next(it), next(it)
    b = next(it) if b64 is not None else None
    s = next(it) if s64 is not None else None
    y, fin = oracle(x, w, b, s, c["stride"], c["groups"], c["activation"])
    outs, cots = [y], [gy]
    if gf is not None:
        outs.append(fin)
        cots.append(gf)
    return outs, _grads(outs, leaves, cots)


def _run_update(c, backend, x64, w64, b64, st64, idx):
    """The streaming update on x64 with state (or pool) st64: returns (y, state after)."""
    dt = c["dtype"]
    x = _laid_out(x64.to(dt), c["layout"])
    st = st64.to(dt)
    if c["layout"] != "first":     # a channel-last stream keeps a channel-last state (or pool)
        st = st.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        st = st.clone()
    y = causal_conv1d_update(x, st, w64.to(dt), None if b64 is None else b64.to(dt),
                             groups=c["groups"], activation=c["activation"],
                             state_indices=idx, backend=backend)
    return y, st


def _oracle_update(c, x64, w64, b64, st64, idx):
    B = x64.shape[0]
    rows = list(range(B)) if idx is None else idx.tolist()
    pool = st64.clone()
    ys = []
    for bi, slot in enumerate(rows):
        if slot < 0:
            ys.append(x64.new_zeros(1, w64.shape[0], x64.shape[-1]))
            continue
        y, _ = oracle(x64[bi:bi + 1], w64, b64, st64[slot:slot + 1], 1, c["groups"],
                      c["activation"])
        ys.append(y)
        if w64.shape[-1] > 1:           # the last K - 1 samples of state + x
            pool[slot] = torch.cat((st64[slot], x64[bi]), dim=-1)[:, -(w64.shape[-1] - 1):]
    return torch.cat(ys, 0), pool


def _check(name, got, want, tol, c):
    assert got.shape == want.shape, (name, got.shape, want.shape, _desc(c))
    assert not torch.isnan(got).any(), (name, _desc(c))
    err = _err(got, want)
    assert err <= tol, (name, err, _desc(c))
    return err


def check_case(seed, backend):
    """Runs case ``seed`` on ``backend`` against the oracle; returns {tensor name: error}."""
    c = _case(seed)
    g = torch.Generator().manual_seed(7000 + seed)
    inputs = _inputs(c, g)
    tol = TOL[c["dtype"]]
    errs = {}
    outs, grads = _run_conv(c, backend, inputs)
    oouts, ograds = _oracle_conv(c, inputs)
    errs["y"] = _check("y", outs[0], oouts[0].detach(), tol, c)
    if c["return_final"]:
        assert torch.equal(outs[1].double(), oouts[1].detach()), ("final_state", _desc(c))
    names = ["dx", "dweight"] + (["dbias"] if c["bias"] else []) + \
        (["dinitial_state"] if c["state"] is not None else [])
    for name, a, e in zip(names, grads, ograds):
        errs[name] = _check(name, a, e, tol, c)
    if c["update"] is not None:
        x64, w64, b64 = inputs[:3]
        B, C, K = c["B"], c["C"], c["K"]
        xu = x64[..., :c["update_len"]] if x64.shape[-1] >= c["update_len"] else x64
        idx = None
        if c["update"] == "plain":
            st64 = (torch.randn(B, C, K - 1, generator=g)).to(c["dtype"]).double()
        else:
            S = B + 2
            st64 = (torch.randn(S, C, K - 1, generator=g)).to(c["dtype"]).double()
            slots = torch.randperm(S, generator=g)[:B]
            if B > 1:
                slots[torch.randint(B, (1,), generator=g)] = -1
            idx = slots.to(torch.int32 if seed % 2 else torch.int64)
        uy, ust = _run_update(c, backend, xu, w64, b64, st64, idx)
        oy, ost = _oracle_update(c, xu, w64, b64, st64, idx)
        errs["update_y"] = _check("update_y", uy, oy, tol, c)
        assert torch.equal(ust.double(), ost), ("update state", _desc(c))
        if idx is not None:
            for bi in (idx < 0).nonzero().flatten().tolist():
                assert torch.equal(uy[bi], torch.zeros_like(uy[bi])), ("padding row", _desc(c))
    return errs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(N_CASES))
def test_conv_matches_oracle_on_random_feature_combinations(seed, backend):
    check_case(seed, backend)


def test_the_cases_cover_every_feature():
    """The fixed seeds draw every feature the fuzz claims (so it cannot silently shrink)."""
    cases = [_case(s) for s in range(N_CASES)]
    assert {c["kind"] for c in cases} == {"depthwise", "grouped", "dense", "multiplier"}
    assert {c["K"] for c in cases if c["kind"] == "depthwise"} == set(DW_WIDTHS)
    assert any(c["kind"] == "grouped" and c["C"] != c["Cout"] for c in cases)
    assert any(c["kind"] == "grouped" and c["C"] // c["groups"] > 1 for c in cases)
    assert any(c["stride"] > 1 and c["K"] % c["stride"] for c in cases)
    assert any(c["stride"] > 1 and c["K"] % c["stride"] == 0 for c in cases)
    assert any(c["stride"] > 1 and c["kind"] == "depthwise" for c in cases)
    assert any(c["stride"] > 1 and c["kind"] != "depthwise" for c in cases)
    assert any(c["stride"] > 1 and c["state"] is not None for c in cases)
    assert {c["bias"] for c in cases} == {True, False}
    assert {c["activation"] for c in cases} == {None, "silu", "gelu"}
    assert {c["layout"] for c in cases} == {"first", "last", "strided"}
    assert {c["state"] for c in cases} == {None, "contiguous", "transposed"}
    assert {c["return_final"] for c in cases} == {True, False}
    assert {c["update"] for c in cases} == {None, "plain", "indices"}
    assert any(c["update"] == "indices" and c["B"] > 1 for c in cases)     # a -1 padding row
    for u in ("plain", "indices"):      # contiguous and channel-last state / pool
        assert {c["layout"] == "first" for c in cases if c["update"] == u} == {True, False}, u
    assert {c["len_kind"] for c in cases} == {"1", "<K", "=K", ">span", "mid"}
    assert any(c["len_kind"] == ">span" and c["kind"] == "depthwise" for c in cases)
    assert any(c["len_kind"] == ">span" and c["kind"] != "depthwise" for c in cases)
    assert any(c["L"] // c["stride"] == 0 for c in cases)                  # no output frame
    assert {c["B"] for c in cases} == {1, 2, 3}
    assert {c["dtype"] for c in cases} == {torch.float32, torch.float16}
    for kind in ("depthwise", "grouped"):
        for dt in (torch.float32, torch.float16):
            assert any(c["kind"] == kind and c["dtype"] == dt for c in cases), (kind, dt)


# ------------------------------------------------------------------------------------------------
# streaming: random chunkings through the state API equal the offline output

STREAM_CASES = [  # kind, C, C_out, groups, K, stride, activation, bias
    ("depthwise", 4, 4, 4, 7, 1, "silu", True),
    ("depthwise", 3, 3, 3, 33, 1, "gelu", False),
    ("depthwise", 4, 4, 4, 5, 2, None, True),
    ("grouped", 6, 9, 3, 5, 1, "gelu", True),
    ("multiplier", 3, 6, 3, 4, 1, None, False),
    ("dense", 2, 3, 1, 10, 5, "silu", True),
]


def _chunks(rng, L, hi):
    out, pos = [], 0
    while pos < L:
        n = min(L - pos, rng.randint(1, hi))
        out.append((pos, pos + n))
        pos += n
    return out


def _stream_conv(x, w, b, stride, groups, act, backend, chunks):
    """Chunk by chunk through initial_state / return_final_state; the samples past the last
    whole stride of a chunk are fed again in front of the next (DESIGN.md's convention)."""
    state, pending, ys = None, x[..., :0], []
    for lo, hi in chunks:
        chunk = torch.cat((pending, x[..., lo:hi]), dim=-1)
        y, state = causal_conv1d(chunk, w, b, stride=stride, groups=groups, activation=act,
                                 initial_state=state, return_final_state=True, backend=backend)
        pending = chunk[..., (chunk.shape[-1] // stride) * stride:]
        ys.append(y)
    return torch.cat(ys, dim=-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ci", range(len(STREAM_CASES)),
                         ids=["{}-K{}-s{}".format(c[0], c[4], c[5]) for c in STREAM_CASES])
def test_chunked_streaming_equals_offline(ci, backend):
    """Random ragged chunkings (sizes 1..K+3) through causal_conv1d's state, and at stride 1
    through causal_conv1d_update (state in place, and a slot pool with a -1 padding row), equal
    the offline output, float32. DESIGN.md's contract is 1e-5 relative with bit-exactness the
    target: the Triton depthwise kernel (a tap loop in a fixed order, whatever the chunking) is
    held to bitwise equality; the reference backend is not bitwise (oneDNN picks its conv
    algorithm by shape: a length-1 chunk of a grouped conv measured 3e-8 off the offline output,
    0 with oneDNN disabled) and neither is the Triton grouped kernel (tl.dot blocks the reduction
    by the tile shape, which the chunk length changes): 1e-5 relative. The offline output is
    checked against the oracle too (the fuzz's float32 tolerance)."""
    kind, C, Co, G, K, s, act, bias = STREAM_CASES[ci]
    rng = random.Random(500 + ci)
    g = torch.Generator().manual_seed(600 + ci)
    B, L = 2, 2 * K + 9
    x = torch.randn(B, C, L, generator=g)
    w = torch.randn(Co, C // G, K, generator=g) * (C // G * K) ** -0.5
    b = torch.randn(Co, generator=g) if bias else None
    want = causal_conv1d(x, w, b, stride=s, groups=G, activation=act, backend=backend)
    ref, _ = oracle(x.double(), w.double(), None if b is None else b.double(), None, s, G, act)
    assert _err(want, ref) <= TOL[torch.float32]
    exact = backend == "triton" and kind == "depthwise"

    def same(got, what):
        if exact:
            assert torch.equal(got, want), (what, (got - want).abs().max().item())
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=what)

    for trial in range(2):
        chunks = _chunks(rng, L, K + 3)
        same(_stream_conv(x, w, b, s, G, act, backend, chunks), f"conv chunks {chunks}")
        if s != 1:
            continue
        st = torch.zeros(B, C, K - 1)
        ys = [causal_conv1d_update(x[..., lo:hi], st, w, b, groups=G, activation=act,
                                   backend=backend) for lo, hi in chunks]
        same(torch.cat(ys, -1), f"update chunks {chunks}")
        # the same two streams in slots 2 and 0 of a pool, beside a padding row (-1)
        pool = torch.randn(4, C, K - 1, generator=g)
        pool[[0, 2]] = 0
        idle = pool[[1, 3]].clone()
        idx = torch.tensor([2, -1, 0])
        xp = torch.stack((x[0], torch.randn(C, L, generator=g), x[1]))
        ys = [causal_conv1d_update(xp[..., lo:hi], pool, w, b, groups=G, activation=act,
                                   state_indices=idx, backend=backend) for lo, hi in chunks]
        y = torch.cat(ys, -1)
        same(y[[0, 2]], f"pool chunks {chunks}")
        assert torch.equal(y[1], torch.zeros_like(y[1]))
        assert torch.equal(pool[[1, 3]], idle)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compat_ring_streaming_equals_offline(backend):
    """causal-conv1d's update API (pyencoder.compat): a ring buffer (state_len > width - 1,
    cache_seqlens advanced by the caller, wrapping around) in a slot pool (conv_state_indices,
    a negative padding row), random chunk sizes, equals the oracle's offline output (float32
    tolerance: the ring path runs the conv with a gathered initial state)."""
    import pyencoder
    from pyencoder.compat.causal_conv1d import causal_conv1d_update as compat_update
    g = torch.Generator().manual_seed(11)
    rng = random.Random(11)
    B, D, W, S_len, L = 2, 5, 4, 6, 29
    x = torch.randn(B, D, L, generator=g)
    w = torch.randn(D, W, generator=g) * 0.5
    b = torch.randn(D, generator=g)
    want, _ = oracle(x.double(), w.double().unsqueeze(1), b.double(), None, 1, D, "silu")
    pool = torch.zeros(4, D, S_len)
    idx = torch.tensor([3, -1, 1], dtype=torch.int32)
    xs = torch.stack((x[0], torch.randn(D, L, generator=g), x[1]))
    seqlens = torch.tensor([0, 0, 0], dtype=torch.int32)
    ys = []
    with pyencoder.use_backend(conv=backend):
        for lo, hi in _chunks(rng, L, 4):
            ys.append(compat_update(xs[..., lo:hi], pool, w, b, activation="silu",
                                    cache_seqlens=seqlens, conv_state_indices=idx))
            seqlens += hi - lo
    y = torch.cat(ys, -1)
    assert _err(y[[0, 2]], want) <= TOL[torch.float32]
    assert torch.equal(y[1], torch.zeros_like(y[1]))
