"""The fused streaming-state write of ``step_fixed`` (triton_kernels/ring_write.py via
pyencoder.ops._ring_write_triton): one kernel writes the rotated keys, the values and the
queries of every slot, where the plain-torch step runs ~20 small kernels per layer.

Checked on CPU under TRITON_INTERPRET=1 (``FORCE_INTERPRET``): the state tensors it writes equal
the plain-torch write's (the ring wraps, slots sit at different positions and pending counts, NeoX /
interleaved / partial / no RoPE, a bfloat16 ring fed float32 frames), except the rotated keys,
which agree to float32 rounding (cos / sin from another library), and step_fixed with it equals
step_fixed without it and the offline forward over a whole stream (band and chunked
masks, the tolerance of tests/test_streaming_fixed.py). With held-back queries (``keep``) the
write also advances the query queue, and ``residual_step`` advances a layer's residual queue,
adds the attention output and applies the LayerNorm after it: both equal the torch path's write
/ index_put, read, shift copy and layer_norm (slots at different queue lengths, steps shorter and
longer than the queue, mixed dtypes; the norm to float32 rounding).
GPU (``-m gpu``): the same compiled;
the CUDA-graph tests of tests/test_streaming_fixed.py replay step_fixed with it (the CUDA
default).
"""
import os

import pytest
import torch

from conftest import has_triton

pytestmark = pytest.mark.skipif(not has_triton() or not (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton (a GPU, or TRITON_INTERPRET=1)")

from pyencoder import Rope  # noqa: E402
from pyencoder.nn import (AttentionAdapter, BandedSelfAttention, ChunkedSelfAttention,  # noqa: E402
                          TransformerLayer)
from pyencoder.ops import _ring_write_triton as RW  # noqa: E402
from pyencoder.rope import apply_rope  # noqa: E402

_DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _force(monkeypatch):
    monkeypatch.setattr(RW, "FORCE_INTERPRET", True)


class _State:
    def __init__(self, B, H, cap, qcap, D, dtype, pos, pend):
        self.k = torch.randn(B, H, cap, D, device=_DEV).to(dtype)
        self.v = torch.randn(B, H, cap, D, device=_DEV).to(dtype)
        self.q = torch.randn(B, H, qcap, D, device=_DEV).to(dtype)
        self.pos = torch.tensor(pos, device=_DEV)
        self.pending = torch.tensor(pend, device=_DEV)

    def clone(self):
        c = object.__new__(_State)
        c.__dict__ = {k: v.clone() for k, v in self.__dict__.items()}
        return c


def _torch_write(st, q, k, v, inv, interleaved):
    B, H, n, D = q.shape
    ar = torch.arange(n, device=_DEV)
    kpos = st.pos[:, None] + ar[None, :]
    if inv is not None:
        k = apply_rope(k, kpos, inv, interleaved)
    bidx = torch.arange(B, device=_DEV)[:, None].expand(B, n)
    slot = torch.remainder(kpos, st.k.shape[2])
    st.k[bidx, :, slot] = k.transpose(1, 2).to(st.k.dtype)
    st.v[bidx, :, slot] = v.transpose(1, 2).to(st.v.dtype)
    st.q[bidx, :, st.pending[:, None] + ar[None, :]] = q.transpose(1, 2).to(st.q.dtype)


@pytest.mark.parametrize("rope", [None, (16, False), (16, True), (8, False)],
                         ids=["norope", "neox", "interleaved", "partial"])
@pytest.mark.parametrize("ring_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16ring"])
def test_fused_write_equals_torch_write(rope, ring_dtype):
    B, H, n, D, cap, qcap = 3, 2, 5, 16, 7, 9
    st = _State(B, H, cap, qcap, D, ring_dtype, [0, 13, 1000003], [0, 2, 4])
    # new frames as the module makes them: (B, n, H, D) projections viewed as (B, H, n, D)
    q, k, v = (torch.randn(B, n, H, D, device=_DEV).transpose(1, 2) for _ in range(3))
    inv = None if rope is None else Rope(rope[0], interleaved=rope[1]).inv_freq(_DEV)
    inter = False if rope is None else rope[1]
    want = st.clone()
    _torch_write(want, q, k, v, inv, inter)
    pos, pend = st.pos.clone(), st.pending.clone()
    released, q_pos, n_keys = RW.ring_write(st, q, k, v, inv, inter)
    assert released is None
    # the released queries' positions (the decode's q_pos): pos - pending + i
    assert q_pos.dtype == torch.int64
    assert torch.equal(q_pos, pos[:, None] - pend[:, None] + torch.arange(n, device=_DEV))
    # the decode's key count: pos + n; pos itself is the caller's to advance
    assert n_keys.dtype == torch.int64 and torch.equal(n_keys, pos + n)
    assert torch.equal(st.pos, pos)
    # values and queries are copies (exact in float32; a bf16 ring: the interpreter's float32 ->
    # bfloat16 conversion may round differently from torch's, one bf16 ulp); the keys' rotation
    # agrees to float32 rounding (cos / sin of another library: an ulp here and there)
    tol = 1e-6 if ring_dtype == torch.float32 else 8e-3
    if ring_dtype == torch.float32:
        assert torch.equal(st.v, want.v) and torch.equal(st.q, want.q)
    for name in ("v", "q"):
        torch.testing.assert_close(getattr(st, name).float(), getattr(want, name).float(),
                                   rtol=tol, atol=tol, msg=name)
    torch.testing.assert_close(st.k.float(), want.k.float(), rtol=tol, atol=tol)


def _torch_queue_step(st, q, k, v, inv, interleaved, keep):
    """The module's torch path with held-back queries: write, attend rows :n, shift by n."""
    n = q.shape[2]
    _torch_write(st, q, k, v, inv, interleaved)
    released = st.q[:, :, :n].clone()
    src = st.q[:, :, n:n + keep].clone()
    st.q[:, :, :keep] = src
    return released


@pytest.mark.parametrize("n,keep,pend", [(1, 3, [3, 0, 2]), (4, 3, [0, 3, 1]), (5, 6, [6, 2, 5]),
                                         (2, 1, [1, 0, 1])])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16buf"])
def test_fused_write_advances_query_queue(n, keep, pend, q_dtype):
    """keep > 0: the released queries (pending first, then new) and the queue's front after the
    step equal the torch path's; rows past a slot's pending count are not written."""
    B, H, D, cap = 3, 2, 16, 11
    qcap = keep + n + 2
    st = _State(B, H, cap, qcap, D, torch.float32, [5, 0, 40], pend)
    st.q = st.q.to(q_dtype)
    q, k, v = (torch.randn(B, n, H, D, device=_DEV).transpose(1, 2) for _ in range(3))
    inv = Rope(16).inv_freq(_DEV)
    want = st.clone()
    before = st.q.clone()
    rel_want = _torch_queue_step(want, q, k, v, inv, False, keep)
    pos = st.pos.clone()
    rel, q_pos, n_keys = RW.ring_write(st, q, k, v, inv, False, keep)
    assert torch.equal(q_pos, pos[:, None] - torch.tensor(pend, device=_DEV)[:, None]
                       + torch.arange(n, device=_DEV))
    assert torch.equal(n_keys, pos + n) and torch.equal(st.pos, pos)
    assert rel is not None and rel.shape == (B, H, n, D) and rel.dtype == q_dtype
    assert torch.equal(rel, rel_want)
    for b, p in enumerate(pend):
        assert torch.equal(st.q[b, :, :p], want.q[b, :, :p]), b
        assert torch.equal(st.q[b, :, p:], before[b, :, p:]), b     # untouched
    assert torch.equal(st.v, want.v)
    torch.testing.assert_close(st.k, want.k, rtol=1e-6, atol=1e-6)


def test_fused_write_queue_limits():
    """No queue (keep 0) or more than MAX_QUEUE_ROWS rows: the plain write (None returned, the
    caller attends state.q and shifts it)."""
    B, H, D = 2, 2, 8
    big = RW.MAX_QUEUE_ROWS + 1
    for n, keep in ((3, 0), (big, 2), (2, big)):
        st = _State(B, H, 2 * big, 2 * big + 4, D, torch.float32, [0, 7], [0, min(keep, 2)])
        q, k, v = (torch.randn(B, H, n, D, device=_DEV) for _ in range(3))
        want = st.clone()
        _torch_write(want, q, k, v, None, False)
        assert RW.ring_write(st, q, k, v, None, False, keep)[0] is None
        assert torch.equal(st.q, want.q) and torch.equal(st.k, want.k)


def _torch_residual(res, count, x, a, keep):
    B, n, E = x.shape
    bidx = torch.arange(B, device=_DEV)[:, None].expand(B, n)
    res[bidx, count[:, None] + torch.arange(n, device=_DEV)[None, :]] = x.to(res.dtype)
    out = res[:, :n].to(a.dtype) + a
    src = res[:, n:n + keep].clone()
    res[:, :keep] = src
    return out


@pytest.mark.parametrize("n,keep,cnt", [(1, 3, [3, 0, 1]), (4, 3, [0, 3, 2]), (3, 5, [5, 4, 0])])
@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.float16,) * 3,
                                    (torch.float32, torch.float32, torch.float16),
                                    (torch.float16, torch.float32, torch.float32)],
                         ids=["fp32", "fp16", "fp32_fp16res", "fp16x_fp32a"])
def test_residual_step_queue_equals_torch(n, keep, cnt, dtypes):
    """The residual queue's fused step == index_put + res.to(a.dtype) + a + shift copy (float32
    sums rounded once to a's dtype, as torch's half / float adds); E spans several column
    blocks with a ragged last one."""
    x_dt, a_dt, r_dt = dtypes
    B, E = 3, 300
    res = torch.randn(B, keep + n + 1, E, device=_DEV).to(r_dt)
    count = torch.tensor(cnt, device=_DEV)
    x = torch.randn(B, n, E, device=_DEV).to(x_dt)
    a = torch.randn(B, n, E, device=_DEV).to(a_dt)
    assert RW.residual_ok(x, a, res, keep)
    want = res.clone()
    before = res.clone()
    out_want = _torch_residual(want, count, x, a, keep)
    out, none = RW.residual_step(res, count, x, a, keep)
    assert none is None and out.dtype == a_dt and out.shape == (B, n, E)
    assert torch.equal(out, out_want)
    for b, c in enumerate(cnt):
        assert torch.equal(res[b, :c], want[b, :c]), b
        assert torch.equal(res[b, c:], before[b, c:]), b


def _layer_norm(E, affine, dtype):
    ln = torch.nn.LayerNorm(E, eps=0.05, elementwise_affine=affine != "none",
                            bias=affine == "full").to(_DEV)
    if affine != "none":
        with torch.no_grad():
            ln.weight.copy_(torch.randn(E) * 0.5 + 1)
            if ln.bias is not None:
                ln.bias.copy_(torch.randn(E))
    return ln.to(dtype)


@pytest.mark.parametrize("keep,cnt", [(3, [3, 0, 1]), (0, [0, 0, 0])], ids=["queue", "noqueue"])
@pytest.mark.parametrize("affine", ["full", "weight", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("need_sum", [True, False], ids=["sum", "nosum"])
def test_residual_step_layer_norm(keep, cnt, affine, dtype, need_sum):
    """With the LayerNorm after the sum in the same launch: the sum and the queue exactly as
    without it, the normalised rows == torch's layer_norm of the torch path's sum (float32
    statistics in another order: float32 to 1e-5, float16 to one ulp); E = 300 padded to 512."""
    B, n, E = 3, 4, 300
    res = torch.randn(B, keep + n + 1, E, device=_DEV).to(dtype)
    count = torch.tensor(cnt, device=_DEV)
    x = torch.randn(B, n, E, device=_DEV).to(dtype) * 3 + 1
    a = torch.randn(B, n, E, device=_DEV).to(dtype)
    ln = _layer_norm(E, affine, dtype)
    assert RW.residual_ok(x, a, res, keep)
    want = res.clone()
    before = res.clone()
    if keep:
        s_want = _torch_residual(want, count, x, a, keep)
    else:
        s_want = x.to(res.dtype).to(a.dtype) + a
    with torch.no_grad():
        y_want = ln(s_want)
        s, y = RW.residual_step(res, count, x, a, keep, ln, need_sum=need_sum)
    for b, c in enumerate(cnt):
        assert torch.equal(res[b, :c], want[b, :c]) and torch.equal(res[b, c:], before[b, c:])
    if need_sum:
        assert torch.equal(s, s_want)
    else:
        assert s is None
    assert y.dtype == dtype and y.shape == (B, n, E)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(y, y_want, rtol=tol, atol=tol)


def test_residual_step_norm_fallback():
    """A LayerNorm tile over MAX_NORM_TILE (or not an nn.LayerNorm) runs torch's norm on the
    fused sum: the same values as the torch path, bit for bit."""
    E = RW.MAX_NORM_TILE // 4 + 1                    # 4 rows of next_pow2(E) > the tile
    x, a = (torch.randn(2, 4, E, device=_DEV) for _ in range(2))
    res = torch.randn(2, 8, E, device=_DEV)
    ln = _layer_norm(E, "full", torch.float32)
    with torch.no_grad():
        s, y = RW.residual_step(res, torch.tensor([0, 0], device=_DEV), x, a, 0, ln)
        assert torch.equal(s, x + a) and torch.equal(y, ln(x + a))
        rms = torch.nn.RMSNorm(8).to(_DEV)
        x8 = x[..., :8].contiguous()
        s, y = RW.residual_step(res[..., :8], None, x8, x8, 0, rms, need_sum=False)
        assert torch.equal(y, rms(x8 + x8))


@pytest.mark.parametrize("norm", ["ln", "none", "big"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_residual_step_sum_bias(norm, dtype):
    """sum_bias: the returned sum is torch's s + bias (rounded once to a's dtype: bit for bit)
    while the norm stays that of s; in the launch with the LayerNorm (ln), a torch add without
    it (none) or with a tile over MAX_NORM_TILE (big)."""
    E = RW.MAX_NORM_TILE // 4 + 1 if norm == "big" else 300
    B, n, keep = 3, 4, 3
    cnt = [3, 0, 1]
    res = torch.randn(B, keep + n + 1, E, device=_DEV).to(dtype)
    count = torch.tensor(cnt, device=_DEV)
    x, a = (torch.randn(B, n, E, device=_DEV).to(dtype) for _ in range(2))
    bias = torch.randn(E, device=_DEV).to(dtype) * 4
    ln = None if norm == "none" else _layer_norm(E, "full", dtype)
    want = res.clone()
    s_want = _torch_residual(want, count, x, a, keep)
    with torch.no_grad():
        s, y = RW.residual_step(res, count, x, a, keep, ln, sum_bias=bias)
        assert torch.equal(s, s_want + bias), (s - s_want - bias).abs().max()
        if ln is None:
            assert y is None
        else:
            tol = 1e-5 if dtype == torch.float32 else 2e-3
            torch.testing.assert_close(y, ln(s_want), rtol=tol, atol=tol)
    for b, c in enumerate(cnt):
        assert torch.equal(res[b, :c], want[b, :c]), b             # the queue's new front


def test_ffn_fold_conditions(monkeypatch):
    """TransformerLayer._ffn_fold (the FFN's residual add folded into its output GEMM): only
    for a FeedForward whose output projection computes F.linear (nn.Linear, Linear, a LinearView
    of an nn.Linear), without hooks, autocast or recorded gradients for its parameters, and in
    the attention output's dtype."""
    from torch import nn as tnn
    from pyencoder.nn import FeedForward
    from pyencoder.nn.linear import LinearView

    def layer():
        return TransformerLayer(BandedSelfAttention(16, 2, left=4, right=1), 32).to(_DEV)
    a = torch.randn(1, 2, 16, device=_DEV)
    m = layer()
    with torch.no_grad():
        w, b = m._ffn_fold(a)
        assert w is m.feed_forward.output_dense.weight and b is m.feed_forward.output_dense.bias
        assert m._ffn_fold(a.half()) is None                      # another dtype
        plain = tnn.Linear(32, 16).to(_DEV)
        m.feed_forward.output_dense = plain
        assert m._ffn_fold(a)[0] is plain.weight
        m.feed_forward.output_dense = LinearView(plain)
        assert m._ffn_fold(a)[0] is plain.weight
        m.feed_forward.output_dense = tnn.Linear(32, 16, bias=False).to(_DEV)
        assert m._ffn_fold(a)[1] is None                          # no bias: still folded

        class Lora(tnn.Linear):
            pass
        m.feed_forward.output_dense = Lora(32, 16).to(_DEV)     # may compute something else
        assert m._ffn_fold(a) is None
        m.feed_forward.output_dense = LinearView(plain)
        h = plain.register_forward_hook(lambda *args: None)
        assert m._ffn_fold(a) is None                             # a hook the GEMM would skip
        h.remove()
        h = m.feed_forward.register_forward_pre_hook(lambda *args: None)
        assert m._ffn_fold(a) is None
        h.remove()
        h = tnn.modules.module.register_module_forward_hook(lambda *args: None)   # global
        assert m._ffn_fold(a) is None
        h.remove()
        assert m._ffn_fold(a) is not None

        class MyFF(FeedForward):
            def forward(self, x):
                return 2 * super().forward(x)
        m.feed_forward.__class__ = MyFF
        assert m._ffn_fold(a) is None
        m.feed_forward.__class__ = FeedForward
    m = layer()
    assert m._ffn_fold(a) is None           # grad enabled and the parameters record it
    with torch.no_grad():
        assert m._ffn_fold(a) is not None
        with torch.autocast(_DEV, dtype=torch.bfloat16):
            assert m._ffn_fold(a) is None


def test_residual_ok_conditions(monkeypatch):
    x = torch.randn(2, 3, 8, device=_DEV)
    res = torch.zeros(2, 6, 8, device=_DEV)
    assert RW.residual_ok(x, x, res, 2)
    assert RW.residual_ok(x, x, res, 0)                             # nothing held back
    assert not RW.residual_ok(x, x, res, RW.MAX_QUEUE_ROWS + 1)
    assert not RW.residual_ok(x.double(), x.double(), res.double(), 2)
    assert not RW.residual_ok(x, x[:, :2], res, 2)
    xg = x.clone().requires_grad_()
    assert not RW.residual_ok(x, xg, res, 2)                        # autograd records a
    with torch.no_grad():
        assert RW.residual_ok(x, xg, res, 2)
        # autocast: the torch ops promote the sum and run the LayerNorm in float32
        with torch.autocast(_DEV, dtype=torch.bfloat16):
            assert not RW.residual_ok(x, x, res, 2)
    monkeypatch.setenv("PYENCODER_FUSED_RING", "0")
    assert not RW.residual_ok(x, x, res, 2)


def test_residual_step_norm_with_grad_params_runs_torch_norm():
    """A LayerNorm whose parameters autograd records is torch's (on the fused sum), so its
    weight and bias get gradients."""
    x, a = (torch.randn(2, 4, 16, device=_DEV) for _ in range(2))
    ln = _layer_norm(16, "full", torch.float32)
    s, y = RW.residual_step(x, None, x, a, 0, ln)
    assert y.grad_fn is not None and torch.equal(y, ln(x + a))
    y.sum().backward()
    assert ln.weight.grad is not None and ln.bias.grad is not None


def test_fused_ok_conditions(monkeypatch):
    st = _State(1, 2, 4, 4, 8, torch.float32, [0], [0])
    q = torch.randn(1, 2, 1, 8, device=_DEV)
    assert RW.fused_ok(q, st, q)
    assert not RW.fused_ok(q, st, torch.randn(1, 4, 1, 8, device=_DEV))   # other head count
    monkeypatch.setenv("PYENCODER_FUSED_RING", "0")
    assert not RW.fused_ok(q, st, q)
    monkeypatch.delenv("PYENCODER_FUSED_RING")
    monkeypatch.setattr(RW, "FORCE_INTERPRET", False)
    assert RW.fused_ok(q, st, q) == (_DEV == "cuda")


_STEP_CASES = [
    (lambda: BandedSelfAttention(16, 2, left=6, right=2, rope=True), 1),
    (lambda: ChunkedSelfAttention(16, 2, chunk_size=3, left_chunks=2, lookahead=2, rope=True), 3),
]


@pytest.mark.parametrize("case", range(len(_STEP_CASES)), ids=["band", "chunked"])
def test_step_fixed_with_fused_write(case, monkeypatch):
    """step_fixed with the fused write == step_fixed with the torch write == offline (float32)."""
    _stream_case(*_STEP_CASES[case], monkeypatch, spied=("ring",))


_LAYER_CASES = [
    (lambda: TransformerLayer(BandedSelfAttention(16, 2, left=6, right=2, rope=True), 32), 1),
    (lambda: TransformerLayer(ChunkedSelfAttention(16, 2, chunk_size=3, left_chunks=2,
                                                   lookahead=0), 32, norm_first=False), 3),
    (lambda: TransformerLayer(ChunkedSelfAttention(16, 2, chunk_size=2, left_chunks=3,
                                                   lookahead=2, rope=True), 32), 4),
    (lambda: TransformerLayer(BandedSelfAttention(16, 2, left=4, right=0), 32,
                              norm_first=False), 2),
    (lambda: TransformerLayer(BandedSelfAttention(16, 2, left=4, right=1), 32,
                              adapter=AttentionAdapter(16, 8)), 1),
]


def _stream_case(make, n, monkeypatch, spied=("ring", "res")):
    """Module ``make()`` streamed (a ragged first step: slots at different queue lengths, then
    step_fixed of n frames, then flush) with and without the fused kernels (``spied``: those
    that must run exactly when fused): fused == torch == offline, per slot (float32)."""
    torch.manual_seed(0)
    m = make().to(_DEV).eval()
    x = torch.randn(2, 31, 16, device=_DEV)
    outs = {}
    for fused in (True, False):
        monkeypatch.setenv("PYENCODER_FUSED_RING", "1" if fused else "0")
        calls = []
        real_rw, real_res = RW.ring_write, RW.residual_step
        monkeypatch.setattr(RW, "ring_write",
                            lambda *a: calls.append("ring") or real_rw(*a))
        monkeypatch.setattr(RW, "residual_step",
                            lambda *a, **k: calls.append("res") or real_res(*a, **k))
        real_fold = TransformerLayer._ffn_fold

        def fold(self, a):
            r = real_fold(self, a)
            calls.append("fold" if r is not None else "nofold")
            return r
        monkeypatch.setattr(TransformerLayer, "_ffn_fold", fold)
        with torch.no_grad():
            st = m.init_state(2, max_chunk=n)
            # slots at different queue lengths: a ragged first step
            y, st = m.step(x[:, :5], st, torch.tensor([5, 4], device=_DEV))
            ys = [[y[b, :int(st.out_lengths[b])]] for b in range(2)]
            t = [5, 4]
            while max(t) + n <= x.shape[1]:
                xs = torch.stack([x[b, t[b]:t[b] + n] for b in range(2)])
                y = m.step_fixed(xs, st, check=(t[0] == 5))
                for b in range(2):
                    ys[b].append(y[b])
                    t[b] += n
            y, st = m.flush(st)
            for b in range(2):
                ys[b].append(y[b, :int(st.out_lengths[b])])
        outs[fused] = [torch.cat(v) for v in ys]
        assert all((name in calls) == fused for name in spied), (spied, calls)
        # a fused pre-LN layer folds its feed-forward's residual add into the output GEMM
        pre_ln = isinstance(m, TransformerLayer) and m.norm_first
        assert ("fold" in calls) == (fused and pre_ln) and "nofold" not in calls, calls
        monkeypatch.setattr(RW, "ring_write", real_rw)
        monkeypatch.setattr(RW, "residual_step", real_res)
        monkeypatch.setattr(TransformerLayer, "_ffn_fold", real_fold)
    with torch.no_grad():
        for b, t_end in enumerate(t):
            ref = m(x[b:b + 1, :t_end])[0]
            assert outs[True][b].shape == ref.shape
            assert (outs[True][b] - outs[False][b]).abs().max() <= 1e-5
            assert (outs[True][b] - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("case", range(len(_LAYER_CASES)),
                         ids=["band_pre", "chunked_la0_post", "chunked_la2_pre",
                              "band_nolookahead_post", "band_adapter_pre"])
def test_layer_step_fixed_with_fused_queues(case, monkeypatch):
    """A TransformerLayer's step_fixed with the fused query and residual queues == the torch
    path's == the offline forward (float32), over slots at different queue lengths."""
    _stream_case(*_LAYER_CASES[case], monkeypatch)


def gpu_quick(name, p):
    return name == "test_gpu_step_fixed_with_fused_write"


@pytest.mark.gpu
def test_gpu_step_fixed_with_fused_write(monkeypatch):
    """The same on a GPU (the kernel compiled, not interpreted); the CUDA-graph tests of
    tests/test_streaming_fixed.py replay step_fixed with it (the default on CUDA)."""
    for make, n in _STEP_CASES:
        _stream_case(make, n, monkeypatch, spied=("ring",))
    for make, n in _LAYER_CASES:
        _stream_case(make, n, monkeypatch)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA path emulated on CPU tensors")
@pytest.mark.parametrize("mask", ["banded", "chunked"])
def test_bench_stack_step_fixed_fused_equals_torch(mask, monkeypatch):
    """bench_streaming's stack (tiny dims, 2 layers: frontend convs, a layer with lookahead and
    one without (banded) / two chunked layers holding 3 frames back) streamed by step_fixed with
    the fused query / residual queues == the torch path's step, over several steps (float32),
    with the same counters after each."""
    import copy

    from benchmarks.bench_streaming import GPU_MASKS, HOP, _warm_steps, build
    cfg = dict(GPU_MASKS[mask])
    sf = cfg.pop("step_frames")
    torch.manual_seed(1)
    model = build(layers=2, dim=16, heads=2, ffn=32, conv_dim=8, **cfg).eval()
    st = model.init_state(2, max_chunk=sf)
    with torch.no_grad():
        for _ in range(_warm_steps(model, sf)):
            model.step(torch.randn(2, 1, HOP * sf), st)
        st2 = copy.deepcopy(st)
        calls = []
        real = RW.residual_step
        monkeypatch.setattr(RW, "residual_step", lambda *a, **k: calls.append(1) or real(*a, **k))
        for i in range(4):
            x = torch.randn(2, 1, HOP * sf)
            monkeypatch.setenv("PYENCODER_FUSED_RING", "0")
            want = model.step_fixed(x, st, check=(i == 0))
            monkeypatch.setenv("PYENCODER_FUSED_RING", "1")
            got = model.step_fixed(x, st2)
            assert (got - want).abs().max() <= 1e-5 * want.abs().max(), i
            ta, tb = st.tensors(), st2.tensors()
            for name, a in ta.items():
                if not a.is_floating_point():
                    assert torch.equal(a, tb[name]), (i, name)
                elif name.endswith((".k", ".v")):     # the rings (queues: only the front counts)
                    assert (a - tb[name]).abs().max() <= 1e-5 * a.abs().max(), (i, name)
        assert len(calls) == 4 * 2         # every layer, pre-LN: one launch each
