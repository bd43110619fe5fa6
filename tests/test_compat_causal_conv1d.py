"""pyencoder.compat.causal_conv1d (causal-conv1d's API) against an independent loop oracle.

The oracle below is written from causal-conv1d's documented semantics, tap by tap in float64
Python loops (no conv, no gather), and is differentiable, so forward outputs, final states and
the gradients of x, weight, bias and initial_states are all checked against it. Parameters come
from a sampled grid over causal-conv1d's test grid (widths 1..5, 7, 31; seqlen 1 and awkward
sizes; fp64/fp32/fp16/bf16 x with fp32 or same-dtype weights; channel-last x; bias; activation
None/silu/swish; initial/final states, final_states_out; update with seqlen 1..5, state_len >=
width - 1, ring positions incl. wrap-around and large cache_seqlens, state pools with negative
padding indices); the case list is fixed, the data is fresh random each run (conftest seed).

Tolerances (|ours - oracle| <= atol * max(1, max|oracle|) + rtol * |oracle|):
- float64: 1e-10 (same arithmetic up to summation order).
- float32: 2e-5 relative to the data scale: sums of <= 31 products of O(1) values, each step
  rounding at 6e-8.
- float16 / bfloat16 x: pyencoder accumulates in fp32 and rounds the output once, so the error is
  one rounding of the result (fp16 2^-11 = 4.9e-4, bf16 2^-8 = 3.9e-3) plus the rounding of the
  upstream gradient to x's dtype in the backward: 4e-3 (fp16) and 3e-2 (bf16). fp32 weight
  gradients sum B * seqlen such terms: same bounds.
Stored conv_state columns are copies, so states are compared exactly.
"""
import random

import pytest
import torch

from conftest import has_triton
from pyencoder.compat.causal_conv1d import causal_conv1d_fn, causal_conv1d_update

TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5),
       torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


def assert_close(got, ref, dtype, what):
    rtol, atol = TOL[dtype]
    got, ref = got.double(), ref.double()
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    err = (got - ref).abs()
    bound = atol * scale + rtol * ref.abs()
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    assert bool((err <= bound).all()), f"{what}: max err {err.max().item():.3g} ({dtype})"


# ----------------------------------------------------------------------------------------------
# oracle

def _silu(v):
    return v * torch.sigmoid(v)


def oracle_fn(x, weight, bias=None, seq_idx=None, initial_states=None, activation=None):
    """float64 loops: returns (out (B, D, L), final_states (B, D, W - 1))."""
    B, D, L = x.shape
    W = weight.shape[1]
    xs, w = x.double(), weight.double()
    hist = (initial_states.double() if initial_states is not None
            else torch.zeros(B, D, W - 1, dtype=torch.float64))
    full = torch.cat((hist, xs), dim=2)          # input position s lives at column s + W - 1
    rows = []
    for b in range(B):
        cols = []
        for t in range(L):
            if seq_idx is not None and int(seq_idx[b, t]) < 0:
                cols.append(torch.zeros(D, dtype=torch.float64))
                continue
            acc = bias.double() if bias is not None else torch.zeros(D, dtype=torch.float64)
            for j in range(W):
                s = t - (W - 1) + j
                if seq_idx is not None and (s < 0 or int(seq_idx[b, s]) != int(seq_idx[b, t])):
                    continue
                acc = acc + w[:, j] * full[b, :, s + W - 1]
            cols.append(_silu(acc) if activation in ("silu", "swish") else acc)
        rows.append(torch.stack(cols, dim=-1) if cols else torch.zeros(D, 0, dtype=torch.float64))
    final = full[:, :, full.shape[2] - (W - 1):]
    return torch.stack(rows), final


def oracle_update(x3, pool, weight, bias, activation, cache_seqlens, indices):
    """Loops over rows and columns. Returns (out float64 (B, D, L), new pool in pool's dtype)."""
    B, D, L = x3.shape
    W = weight.shape[1]
    S = pool.shape[2]
    pool = pool.clone()
    w = weight.double()
    outs = []
    for b in range(B):
        slot = b if indices is None else int(indices[b])
        if slot < 0:
            outs.append(torch.zeros(D, L, dtype=torch.float64))
            continue
        cols = [pool[slot, :, j].clone() for j in range(S)]
        xcols = [x3[b, :, i] for i in range(L)]
        if cache_seqlens is None:
            seq = cols + xcols
            hist = seq[S - (W - 1):S]
            new = seq[len(seq) - S:]
        else:
            p = int(cache_seqlens[b]) % S if S else 0
            hist = [cols[(p - (W - 1) + j) % S] for j in range(W - 1)]
            for i in range(L):
                cols[(p + i) % S] = xcols[i]
            new = cols
        window = hist + xcols
        out = []
        for i in range(L):
            acc = bias.double() if bias is not None else torch.zeros(D, dtype=torch.float64)
            for j in range(W):
                acc = acc + w[:, j] * window[i + j].double()
            out.append(_silu(acc) if activation in ("silu", "swish") else acc)
        outs.append(torch.stack(out, dim=-1))
        if S:
            pool[slot] = torch.stack(new, dim=-1)
    return torch.stack(outs), pool


# ----------------------------------------------------------------------------------------------
# helpers

def _x(B, D, L, dtype, channel_last):
    if channel_last:
        return torch.randn(B, L, D, dtype=dtype).transpose(1, 2)
    return torch.randn(B, D, L, dtype=dtype)


def _wdtype(dtype, rng):
    # causal-conv1d's tests keep fp32 weights with half inputs; also test same-dtype weights
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32 if rng.random() < 0.7 else dtype
    return dtype


def _fn_cases(n=28, seed=17):
    rng = random.Random(seed)
    cases = []
    widths = [1, 2, 3, 4, 5, 7, 31]
    for i in range(n):
        dtype = [torch.float64, torch.float32, torch.float32, torch.float16, torch.bfloat16][i % 5]
        W = widths[i % len(widths)]
        L = rng.choice([1, 2, 5, 8, 13, 37])
        cases.append(dict(
            B=rng.choice([1, 2, 3]), D=rng.choice([3, 8, 16]), L=L, W=W, dtype=dtype,
            wdtype=_wdtype(dtype, rng), bias=rng.random() < 0.6,
            act=rng.choice([None, "silu", "swish"]), channel_last=rng.random() < 0.5,
            init=rng.random() < 0.5, final=rng.random() < 0.6, out_buf=rng.random() < 0.5))
    return cases


def _cid(c):
    return "W{W}L{L}B{B}D{D}-{dt}".format(dt=str(c["dtype"])[6:], **c) + \
        "".join(k[0] for k in ("bias", "channel_last", "init", "final", "out_buf") if c[k]) + \
        (c["act"] or "")


# ----------------------------------------------------------------------------------------------
# causal_conv1d_fn

@pytest.mark.parametrize("c", _fn_cases(), ids=_cid)
def test_fn_matches_oracle_forward_backward(c):
    B, D, L, W, dtype, wdt = c["B"], c["D"], c["L"], c["W"], c["dtype"], c["wdtype"]
    x = _x(B, D, L, dtype, c["channel_last"]).requires_grad_()
    weight = (torch.randn(D, W) / W ** 0.5).to(wdt).requires_grad_()
    bias = torch.randn(D).to(wdt).requires_grad_() if c["bias"] else None
    init = None
    if c["init"]:
        init = torch.randn(B, W - 1, D, dtype=dtype).transpose(1, 2).requires_grad_()
    out_buf = torch.full((B, D, W - 1), float("nan"), dtype=dtype) if c["out_buf"] else None
    res = causal_conv1d_fn(x, weight, bias, initial_states=init, return_final_states=c["final"],
                           final_states_out=out_buf, activation=c["act"])
    leaves = [t for t in (x, weight, bias, init) if t is not None]
    refs = [t.detach().double().requires_grad_() for t in leaves]
    rmap = dict(zip(map(id, leaves), refs))
    y_ref, f_ref = oracle_fn(refs[0], rmap[id(weight)], rmap.get(id(bias)), None,
                             rmap.get(id(init)), c["act"])
    if c["final"]:
        y, final = res
        assert final.dtype == dtype and final.shape == (B, D, W - 1)
        if out_buf is not None:
            assert final is out_buf
        assert_close(final, f_ref, dtype, "final_states")
    else:
        y = res
    assert y.dtype == dtype and y.shape == (B, D, L)
    if c["channel_last"] and L > 1 and D > 1:
        assert y.stride(1) == 1, "channel-last x gives a channel-last out"
    assert_close(y, y_ref, dtype, "out")

    g = torch.randn(B, D, L, dtype=torch.float64)
    loss = (y.double() * g).sum()
    loss_ref = (y_ref * g.to(dtype).double()).sum()
    if c["final"] and W > 1:
        gf = torch.randn(B, D, W - 1, dtype=torch.float64)
        loss = loss + (torch.sigmoid(final.double()) * gf).sum()
        loss_ref = loss_ref + (torch.sigmoid(f_ref) * gf).sum()
    grads = torch.autograd.grad(loss, leaves)
    grads_ref = torch.autograd.grad(loss_ref, refs)
    for name, t, gr, gref in zip(("x", "weight", "bias", "initial_states"),
                                 leaves, grads, grads_ref):
        assert gr.dtype == t.dtype
        assert_close(gr, gref, t.dtype if t.dtype != torch.float32 else dtype, f"d{name}")


def _seq_idx(B, L, rng, monotone=True, pad=True):
    rows = []
    for _ in range(B):
        ids, cur = [], 0
        while len(ids) < L:
            n = rng.randint(1, 7)
            ids += [cur] * n
            cur = cur + 1 if monotone else rng.randint(0, 2)
        ids = ids[:L]
        if pad and rng.random() < 0.7:
            npad = rng.randint(1, max(1, L // 4))
            ids[L - npad:] = [-1] * npad
        rows.append(ids)
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize("W,dtype,monotone", [
    (2, torch.float64, True), (4, torch.float32, True), (5, torch.float64, False),
    (7, torch.float32, True), (31, torch.float64, True), (3, torch.float16, True),
    (1, torch.float32, True)])
def test_fn_seq_idx_varlen(W, dtype, monotone):
    rng = random.Random(torch.randint(0, 2**31, ()).item())
    B, D, L = 3, 8, 29
    seq_idx = _seq_idx(B, L, rng, monotone=monotone)
    x = _x(B, D, L, dtype, channel_last=True).requires_grad_()
    wdt = torch.float32 if dtype == torch.float16 else dtype
    weight = torch.randn(D, W, dtype=wdt, requires_grad=True)
    bias = torch.randn(D, dtype=wdt, requires_grad=True)
    y = causal_conv1d_fn(x, weight, bias, seq_idx=seq_idx, activation="silu")
    refs = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    y_ref, _ = oracle_fn(refs[0], refs[1], refs[2], seq_idx, None, "silu")
    assert_close(y, y_ref, dtype, "out")
    assert bool((y[seq_idx.unsqueeze(1).expand_as(y) < 0] == 0).all()), "padding outputs are 0"
    g = torch.randn(B, D, L, dtype=torch.float64)
    grads = torch.autograd.grad((y.double() * g).sum(), (x, weight, bias))
    grads_ref = torch.autograd.grad((y_ref * g.to(dtype).double()).sum(), refs)
    for name, gr, gref in zip(("x", "weight", "bias"), grads, grads_ref):
        assert_close(gr, gref, dtype, f"d{name}")


def test_fn_seq_idx_single_sequence_equals_plain():
    x = torch.randn(2, 6, 17, dtype=torch.float64)
    w = torch.randn(6, 5, dtype=torch.float64)
    seq_idx = torch.zeros(2, 17, dtype=torch.int32)
    torch.testing.assert_close(causal_conv1d_fn(x, w, seq_idx=seq_idx), causal_conv1d_fn(x, w))


def test_fn_chunked_with_states_equals_whole():
    # final_states of one call as initial_states of the next reproduce the whole sequence
    x = torch.randn(2, 5, 23, dtype=torch.float64)
    w = torch.randn(5, 6, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    whole = causal_conv1d_fn(x, w, b, activation="silu")
    outs, state = [], None
    for lo, hi in ((0, 2), (2, 3), (3, 11), (11, 23)):
        y, state = causal_conv1d_fn(x[:, :, lo:hi], w, b, initial_states=state,
                                    return_final_states=True, activation="silu")
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, dim=2), whole, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# causal_conv1d_update

def _update_cases(n=30, seed=29):
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        W = [1, 2, 3, 4, 5, 7][i % 6]
        dtype = [torch.float32, torch.float64, torch.float16, torch.float32, torch.bfloat16][i % 5]
        ring = i % 2 == 1
        cases.append(dict(
            W=W, L=rng.randint(1, 5), dtype=dtype, wdtype=_wdtype(dtype, rng),
            extra=rng.choice([0, 0, 1, 3, 10]), ring=ring, pool=rng.random() < 0.5,
            pad=rng.random() < 0.5, bias=rng.random() < 0.6, act=rng.choice([None, "silu"]),
            x2d=rng.random() < 0.3, channel_last=rng.random() < 0.5, B=rng.choice([1, 3, 4])))
    return cases


def _uid(c):
    return "W{W}L{L}B{B}+{extra}-{dt}".format(dt=str(c["dtype"])[6:], **c) + \
        "".join(k[:2] for k in ("ring", "pool", "pad", "bias", "x2d", "channel_last") if c[k]) + \
        (c["act"] or "")


@pytest.mark.parametrize("c", _update_cases(), ids=_uid)
def test_update_matches_oracle(c):
    W, B, D, dtype = c["W"], c["B"], 16, c["dtype"]
    L = 1 if c["x2d"] else c["L"]
    S = W - 1 + c["extra"]
    if c["ring"] and S == 0:
        S = 1
    n_slots = 3 * B if c["pool"] else B
    pool = torch.randn(n_slots, S, D, dtype=dtype).transpose(1, 2) if c["channel_last"] \
        else torch.randn(n_slots, D, S, dtype=dtype)
    x3 = _x(B, D, L, dtype, c["channel_last"])
    x = x3[:, :, 0] if c["x2d"] else x3
    weight = torch.randn(D, W).to(c["wdtype"])
    bias = torch.randn(D).to(c["wdtype"]) if c["bias"] else None
    indices = None
    if c["pool"]:
        indices = torch.randperm(n_slots)[:B].to(torch.int32)
        if c["pad"]:
            indices[torch.rand(B) < 0.5] = -1
            if B > 1:
                indices[0] = -3     # any negative index is padding
    seqlens = None
    if c["ring"]:
        seqlens = torch.randint(0, 1024, (B,), dtype=torch.int32)
        seqlens[0] = S - 1 if S > 1 else 0     # the write wraps around the end of the ring
    y_ref, pool_ref = oracle_update(x3, pool, weight, bias, c["act"], seqlens, indices)
    y = causal_conv1d_update(x, pool, weight, bias, activation=c["act"], cache_seqlens=seqlens,
                             conv_state_indices=indices)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y.reshape(B, D, L), y_ref, dtype, "out")
    assert torch.equal(pool, pool_ref), "conv_state"
    if indices is not None:
        assert bool((y.reshape(B, D, L)[indices < 0] == 0).all()), "padding rows output 0"


@pytest.mark.parametrize("ring", [False, True])
def test_update_gradients(ring):
    B, D, L, W, S = 3, 5, 4, 4, 6
    pool = torch.randn(B, D, S, dtype=torch.float64)
    x = torch.randn(B, D, L, dtype=torch.float64, requires_grad=True)
    w = torch.randn(D, W, dtype=torch.float64, requires_grad=True)
    b = torch.randn(D, dtype=torch.float64, requires_grad=True)
    seqlens = torch.randint(0, 50, (B,), dtype=torch.int32) if ring else None
    refs = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    y_ref, _ = oracle_update(refs[0], pool, refs[1], refs[2], "silu", seqlens, None)
    y = causal_conv1d_update(x, pool, w, b, activation="silu", cache_seqlens=seqlens)
    g = torch.randn_like(y)
    for gr, gref in zip(torch.autograd.grad((y * g).sum(), (x, w, b)),
                        torch.autograd.grad((y_ref * g).sum(), refs)):
        assert_close(gr, gref, torch.float64, "grad")


@pytest.mark.parametrize("W,extra", [(4, 0), (5, 2), (7, 9), (2, 0)])
def test_update_ring_stream_equals_offline(W, extra):
    # Streaming through the ring with cache_seqlens advanced by the caller (any start offset,
    # chunks of 1..S+3 frames, slots in a larger pool) reproduces the offline conv.
    B, D, T = 3, 6, 41
    S = W - 1 + extra
    x = torch.randn(B, D, T, dtype=torch.float64)
    w = torch.randn(D, W, dtype=torch.float64)
    b = torch.randn(D, dtype=torch.float64)
    want = causal_conv1d_fn(x, w, b, activation="silu")
    slots = torch.tensor([5, 0, 3], dtype=torch.int32)
    ring = torch.randn(7, D, S, dtype=torch.float64)
    ring[slots.long()] = 0                       # zero history = offline zero padding
    lin = torch.zeros(B, D, S, dtype=torch.float64)
    seqlens = torch.tensor([0, 1000, 2**20 + 3], dtype=torch.int32)
    outs_ring, outs_lin, t = [], [], 0
    while t < T:
        n = min(T - t, random.randint(1, S + 3))
        xc = x[:, :, t:t + n]
        outs_ring.append(causal_conv1d_update(xc, ring, w, b, "silu", seqlens, slots))
        outs_lin.append(causal_conv1d_update(xc, lin, w, b, "silu"))
        seqlens += n
        t += n
    torch.testing.assert_close(torch.cat(outs_ring, 2), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat(outs_lin, 2), want, rtol=1e-12, atol=1e-12)
    # the ring read in linear order from its write position is the linear state
    pos = (seqlens.long() % S).unsqueeze(1) + torch.arange(S)
    unrolled = ring[slots.long()].gather(2, (pos % S).unsqueeze(1).expand(B, D, S))
    torch.testing.assert_close(unrolled[:, :, S - (W - 1):], lin[:, :, S - (W - 1):])


# ----------------------------------------------------------------------------------------------
# errors

def test_bad_arguments():
    x = torch.randn(2, 4, 5)
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_fn(x, w, activation="gelu")
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d_fn(x, torch.randn(4, 1, 3))
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d_fn(x, torch.randn(5, 3))
    with pytest.raises(ValueError, match="bias"):
        causal_conv1d_fn(x, w, torch.randn(3))
    sid = torch.zeros(2, 5, dtype=torch.int32)
    with pytest.raises(ValueError, match="initial_states"):
        causal_conv1d_fn(x, w, seq_idx=sid, initial_states=torch.randn(2, 4, 2))
    with pytest.raises(ValueError, match="return_final_states"):
        causal_conv1d_fn(x, w, seq_idx=sid, return_final_states=True)
    with pytest.raises(TypeError, match="seq_idx"):
        causal_conv1d_fn(x, w, seq_idx=sid.float())
    with pytest.raises(ValueError, match="seq_idx"):
        causal_conv1d_fn(x, w, seq_idx=sid[:, :4])
    with pytest.raises(ValueError, match="initial_states"):
        causal_conv1d_fn(x, w, initial_states=torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="final_states_out"):
        causal_conv1d_fn(x, w, return_final_states=True, final_states_out=torch.empty(2, 4, 3))
    with pytest.raises(TypeError, match="x"):
        causal_conv1d_fn(x.long(), w)
    state = torch.randn(2, 4, 2)
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv1d_update(x, torch.randn(2, 4, 1), w)
    with pytest.raises(TypeError, match="conv_state"):
        causal_conv1d_update(x, state.double(), w)
    with pytest.raises(TypeError, match="cache_seqlens"):
        causal_conv1d_update(x, state, w, cache_seqlens=torch.zeros(2))
    with pytest.raises(ValueError, match="cache_seqlens"):
        causal_conv1d_update(x, state, w, cache_seqlens=torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="conv_state_indices"):
        causal_conv1d_update(x, state, w, conv_state_indices=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="conv_state_indices"):
        causal_conv1d_update(x, state, w, conv_state_indices=torch.tensor([0]))
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv1d_update(x, torch.randn(3, 4, 2), w)


# ----------------------------------------------------------------------------------------------
# Triton backend (CPU: interpreter, tiny shapes)

triton_only = pytest.mark.skipif(not has_triton(), reason="triton is not installed")


@triton_only
def test_triton_backend_slice():
    import pyencoder
    B, D, L, W = 2, 8, 9, 5
    with pyencoder.use_backend(conv="triton"):
        x = _x(B, D, L, torch.float32, channel_last=True).requires_grad_()
        w = torch.randn(D, W, requires_grad=True)
        b = torch.randn(D, requires_grad=True)
        init = torch.randn(B, D, W - 1, requires_grad=True)
        y, final = causal_conv1d_fn(x, w, b, initial_states=init, return_final_states=True,
                                    activation="silu")
        refs = [t.detach().double().requires_grad_() for t in (x, w, b, init)]
        y_ref, f_ref = oracle_fn(refs[0], refs[1], refs[2], None, refs[3], "silu")
        assert_close(y, y_ref, torch.float32, "out")
        assert_close(final, f_ref, torch.float32, "final")
        g = torch.randn(B, D, L)
        for gr, gref in zip(torch.autograd.grad((y * g).sum(), (x, w, b, init)),
                            torch.autograd.grad((y_ref * g.double()).sum(), refs)):
            assert_close(gr, gref, torch.float32, "grad")

        rng = random.Random(torch.randint(0, 2**31, ()).item())
        seq_idx = _seq_idx(B, L, rng)
        xs = x.detach()
        ys = causal_conv1d_fn(xs, w.detach(), seq_idx=seq_idx)
        assert_close(ys, oracle_fn(xs, w.detach(), None, seq_idx)[0], torch.float32, "varlen")

        # in-place fast path (state_len == width - 1, one dtype) with a padded slot pool, and
        # the ring path
        for seqlens, S in ((None, W - 1), (torch.tensor([3, 11], dtype=torch.int32), W + 1)):
            pool = torch.randn(5, D, S)
            idx = torch.tensor([3, -1], dtype=torch.int32)
            xu = torch.randn(B, D, 2)
            y_ref, pool_ref = oracle_update(xu, pool, w.detach(), b.detach(), "silu", seqlens,
                                            idx)
            yu = causal_conv1d_update(xu, pool, w.detach(), b.detach(), "silu", seqlens, idx)
            assert_close(yu, y_ref, torch.float32, "update")
            assert torch.equal(pool, pool_ref)


@pytest.mark.parametrize("ring", [False, True])
def test_update_reads_a_state_that_requires_grad_without_gradient(ring):
    """conv_state is read without gradient on every path: a state that requires grad (a leaf,
    or the final states of a training graph) made the fast path's output require grad and its
    backward failed inside torch ("no autograd formula was registered"), while the ring path
    dropped the gradient. Both give the values of a detached state now, and update it."""
    torch.manual_seed(8)
    B, D, W = 2, 8, 4
    w, x1 = torch.randn(D, W), torch.randn(B, D, 1)
    S = W + 1 if ring else W - 1
    kw = dict(cache_seqlens=torch.tensor([1, 2])) if ring else {}
    st = torch.randn(B, D, S, requires_grad=True)
    plain = st.detach().clone()
    y = causal_conv1d_update(x1, st, w, **kw)
    y_ref = causal_conv1d_update(x1, plain, w, **kw)
    assert not y.requires_grad
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(st.detach(), plain, rtol=0, atol=0)
    x0 = torch.randn(B, D, 6, requires_grad=True)
    _, fs = causal_conv1d_fn(x0, w, return_final_states=True)
    y = causal_conv1d_update(x1, fs, w)
    assert not y.requires_grad


def test_update_with_a_meta_pool_gives_shapes():
    """A meta conv_state_indices with a ring or a longer state: torch.nonzero has no meta
    kernel (NotImplementedError); the shapes come back as for the short state."""
    D, W = 8, 4
    x = torch.empty(2, D, 1, device="meta")
    w = torch.empty(D, W, device="meta")
    idx = torch.empty(2, dtype=torch.int32, device="meta")
    for S, kw in ((W + 1, {}), (W - 1, dict(cache_seqlens=torch.empty(2, dtype=torch.int32,
                                                                       device="meta")))):
        st = torch.empty(3, D, S, device="meta")
        y = causal_conv1d_update(x, st, w, conv_state_indices=idx, **kw)
        assert y.shape == (2, D, 1) and y.is_meta
