"""Sink keys (issue 15 item 2): IntervalMask.sink = S makes absolute key positions s < S visible
to every query besides its interval. The reference path (fast blocked CPU path) against an
independent dense float64 oracle (tests/oracle.py's interval mask OR an explicit sink column
mask) over random shapes, sinks (0, 1, within and beyond the band, S >= N), offsets, padding,
RoPE and GQA, forward and gradients; gradcheck; NaN poisoning through sinks; sink = 0 leaves
band and chunked bit-identical. The Triton kernels with sinks (HAS_SINK) against the reference
under the interpreter, their launch keys, and on a GPU (``-m gpu``)."""
import os
import random

import pytest
import torch

import pyencoder
from pyencoder import IntervalMask
from pyencoder.ops import interval_attention
from conftest import gradcheck_inputs
from oracle import dense_attention, interval_mask


def _oracle_mask(m, nq, nk, q_offset, k_offset, key_lengths, batch):
    vis = interval_mask(nq, nk, m.block, m.lo_off, m.hi_off, q_offset, k_offset, None, batch)
    s = torch.arange(nk) + k_offset
    vis = vis | (s < m.sink)[None, None, None, :]
    if key_lengths is not None:
        vis &= (torch.arange(nk)[None, :] < key_lengths[:, None])[:, None, None, :]
    return vis


def _random_case(rng):
    B, Hk, g = rng.randint(1, 2), rng.randint(1, 2), rng.choice([1, 2, 3])
    D = rng.choice([4, 6, 8])
    nq, nk = rng.randint(1, 45), rng.randint(1, 45)
    k_offset = rng.randint(0, 12)
    q_offset = k_offset + rng.randint(0, 8)
    window = rng.randint(0, 9)
    sink = rng.choice([0, 1, rng.randint(1, 6), k_offset + window + rng.randint(1, 10),
                       k_offset + nk + rng.randint(0, 5)])     # none, one, in/beyond band, >= N
    if rng.random() < 0.5:
        m = IntervalMask.band(rng.choice([None, 0, window]), rng.randint(0, 4), sink=sink)
    else:
        m = IntervalMask.chunked(rng.randint(1, 5), rng.choice([None, 0, 1, 2]),
                                 rng.randint(0, 3), sink=sink)
    kl = None if rng.random() < 0.5 else torch.randint(0, nk + 1, (B,))
    rope = rng.choice([None, pyencoder.Rope(D), pyencoder.Rope(D - 2, interleaved=True)])
    return B, Hk, g, D, nq, nk, q_offset, k_offset, m, kl, rope


@pytest.mark.parametrize("trial", range(6))
def test_reference_matches_dense_float64_oracle_forward_and_gradients(trial):
    rng = random.Random(torch.randint(1 << 30, ()).item())
    for _ in range(12):
        B, Hk, g, D, nq, nk, qo, ko, m, kl, rope = _random_case(rng)
        q = torch.randn(B, Hk * g, nq, D, dtype=torch.float64, requires_grad=True)
        k = torch.randn(B, Hk, nk, D, dtype=torch.float64, requires_grad=True)
        v = torch.randn(B, Hk, nk, D, dtype=torch.float64, requires_grad=True)
        out = interval_attention(q, k, v, mask=m, rope=rope, key_lengths=kl, q_offset=qo,
                                 k_offset=ko, backend="reference")
        vis = _oracle_mask(m, nq, nk, qo, ko, kl, B)
        ref = dense_attention(q, k, v, vis, rope_dim=0 if rope is None else rope.dim,
                              interleaved=False if rope is None else rope.interleaved,
                              q_offset=qo, k_offset=ko)
        what = (m, qo, ko, kl, rope)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10, msg=lambda e: f"{what}: {e}")
        go = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), go)
        exp = torch.autograd.grad(ref, (q, k, v), go)
        for name, a, b in zip("qkv", got, exp):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9,
                                       msg=lambda e: f"d{name} {what}: {e}")


def test_sinks_change_the_output_only_where_they_add_keys():
    # A sink beyond every row's interval changes every row that did not see it; sink=0 is the
    # plain mask bit for bit.
    q, k, v = (torch.randn(1, 2, 30, 8) for _ in range(3))
    plain = pyencoder.ops.banded_attention(q, k, v, left=3, right=1)
    assert torch.equal(plain, pyencoder.ops.banded_attention(q, k, v, left=3, right=1, sink=0))
    with_sink = pyencoder.ops.banded_attention(q, k, v, left=3, right=1, sink=2)
    assert torch.equal(with_sink[:, :, :4], plain[:, :, :4])     # rows 0..3 already see keys 0, 1
    assert not torch.isclose(with_sink[:, :, 4:], plain[:, :, 4:]).all(-1).any()


def test_gradcheck_with_sinks():
    q, k, v, r, kl = gradcheck_inputs()
    assert torch.autograd.gradcheck(
        lambda q, k, v: pyencoder.ops.banded_attention(q, k, v, left=2, right=1, rope=r,
                                                       key_lengths=kl, q_offset=2, k_offset=1,
                                                       sink=3), (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: pyencoder.ops.chunked_attention(q, k, v, chunk_size=3, left_chunks=0,
                                                        lookahead=1, sink=2), (q, k, v))


def test_a_nonfinite_sink_key_poisons_every_row_and_only_them():
    q, k, v = (torch.randn(1, 2, 20, 8, requires_grad=True) for _ in range(3))
    kk = k.detach().clone()
    kk[0, 1, 1, 3] = float("nan")
    kk.requires_grad_(True)
    out = pyencoder.ops.banded_attention(q, kk, v, left=2, right=0, sink=2)
    assert torch.isnan(out[0, 1]).all() and not torch.isnan(out[0, 0]).any()
    out2 = pyencoder.ops.banded_attention(q, kk, v, left=2, right=0, sink=1)   # key 1 not a sink
    assert torch.isnan(out2[0, 1, 1:4]).all() and not torch.isnan(out2[0, 1, 4:]).any()
    dq, dk, dv = torch.autograd.grad(out2.nan_to_num().sum(), (q, kk, v))
    assert not torch.isnan(dk[0, 1, 4:]).any() and not torch.isnan(dk[0, 0]).any()


@pytest.mark.parametrize("make, match", [
    (lambda: IntervalMask.band(1, 0, sink=-1), r"sink must be >= 0; got -1"),
    (lambda: IntervalMask.chunked(2, 1, sink=1.5), r"sink must be an int; got float"),
])
def test_bad_sink_names_the_argument(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make()


def test_sink_is_part_of_the_mask_value():
    m = IntervalMask.band(4, 1, sink=3)
    assert m != IntervalMask.band(4, 1) and m.params == (1, 4, 1) and m.sink == 3
    assert m.latency() == IntervalMask.band(4, 1).latency() == 1
    assert repr(m) == "IntervalMask.band(left=4, right=1, sink=3)"
    assert eval(repr(m), {"IntervalMask": IntervalMask}) == m
    assert IntervalMask.chunked(4, 1, 2).with_sink(5) == IntervalMask.chunked(4, 1, 2, sink=5)



def test_triton_backend_refuses_sinks_with_frame_masks_by_name():
    """The Triton kernels run sink keys (below), with a relative bias too (the saturated bucket
    rule: tests/test_attention_sink_bias.py), but not with a frame-rate mask (K_BLOCK): the
    launchers and supports_forward say so, naming sink."""
    from pyencoder.ops import _attention_triton as tri
    q, k, v = (torch.randn(1, 1, 4, 8) for _ in range(3))
    assert tri.supports_forward(q, k, v, sink=2) is None
    assert "sink=2" in tri.supports_forward(q, k, v, block=4, sink=2, kb=3)
    assert tri.supports_forward(q, k, v, sink=2, rel_bias=torch.zeros(1, 8)) is None
    with pytest.raises(ValueError, match=r"sink=2 with k_block=3 != block=4"):
        tri.forward(q, k, v, None, None, 4, 0, 3, 0, 0, 1.0, False, sink=2, kb=3)


@pytest.mark.parametrize("trial", range(4))
def test_streaming_with_sinks_equals_offline_over_random_chunkings(trial):
    """Sink keys stay resident in the stream state (SinkAttentionState) while the ring wraps:
    cat(step outputs) + flush == offline forward for random ragged chunkings and max_chunk
    (fp32: 1e-5 relative, the streaming contract), and the first queries wait for the sink keys
    the offline op lets them see."""
    from _stream_utils import rel_err, stream
    from pyencoder.nn import BandedSelfAttention, ChunkedSelfAttention
    rng = random.Random(torch.randint(1 << 30, ()).item())
    sink = rng.choice([1, 3, 9])
    if rng.random() < 0.5:
        mod = BandedSelfAttention(16, 2, left=rng.choice([0, 2, 5]), right=rng.randint(0, 2),
                                  sink=sink)
    else:
        mod = ChunkedSelfAttention(16, 2, chunk_size=rng.randint(1, 4),
                                   left_chunks=rng.choice([0, 1]), lookahead=rng.randint(0, 2),
                                   sink=sink)
    mod.eval()
    T = rng.randint(20, 70)
    x = torch.randn(2, T, 16)
    with torch.no_grad():
        ref = mod(x)
        sizes = [rng.randint(1, 9) for _ in range(12)]
        got = stream(mod, x, sizes, time_dim=1, max_chunk=rng.choice([None, 4, 11]))
    assert got.shape == ref.shape
    assert rel_err(got, ref) < 1e-5, (mod, sizes)
    assert mod.lookahead == mod.mask.latency() == type(mod.mask)(
        mod.mask.block, mod.mask.lo_off, mod.mask.hi_off).latency()


def test_step_fixed_names_the_sinks_before_steady_state():
    """step_fixed supports sink keys (tests/test_streaming_fixed_sink.py) once every sink key
    has arrived: before that, its check names the sink."""
    from pyencoder.nn import BandedSelfAttention
    mod = BandedSelfAttention(16, 2, left=4, right=0, sink=2)
    st = mod.init_state(1)
    with pytest.raises(ValueError, match="sink=2"):
        mod.step_fixed(torch.randn(1, 1, 16), st, check=True)
    _, st = mod.step(torch.randn(1, 1, 16), st)        # position 0: waits for sink key 1
    with pytest.raises(ValueError, match="sink=2"):
        mod.step_fixed(torch.randn(1, 1, 16), st, check=True)
    with pytest.raises(ValueError, match="sink must be <= max_context"):
        BandedSelfAttention(16, 2, left=4, right=0, sink=100, max_context=50)


def test_paths_without_sinks_refuse_a_sink_mask_by_name():
    from pyencoder.nn.relpos import biased_interval_attention
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    m = IntervalMask.band(2, 0, sink=1)
    with pytest.raises(NotImplementedError, match="sink"):
        pyencoder.ops.interval_attention_dropout(q, k, v, mask=m, dropout_p=0.5)
    with pytest.raises(NotImplementedError, match="sink"):     # the fused bias runs sinks
        biased_interval_attention(q, k, v, None, torch.randn(8, 2), lambda r: r.clamp(0, 7),
                                  mask=m, dropout_p=0.5)
    torch.testing.assert_close(pyencoder.ops.interval_attention_dropout(q, k, v, mask=m,
                                                                         dropout_p=0.0),
                               interval_attention(q, k, v, mask=m))



_SINK_KEYS = r"""
import json, os, sys, torch
sys.path.insert(0, sys.argv[1])
from _count_compiles import _Recorder
rec = _Recorder(); rec.install()
os.environ["PYENCODER_TRITON_AUTOTUNE"] = "0"
from pyencoder.ops import _attention_triton as tri
from pyencoder import Rope
q, k, v = (torch.randn(2, 2, 300, 64, dtype=torch.float16) for _ in range(3))
inv = Rope(64).inv_freq()
kl = torch.tensor([300, 200], dtype=torch.int32)
keys = {}
for i, sink in enumerate((None, 0, 1, 5, 16, 300, 10 ** 9)):
    rec.test = i
    kw = {} if sink is None else {"sink": sink}
    out, lse = tri.forward(q, k, v, inv, kl, 4, 48, 5, 13, 13, 0.125, False, **kw)
    tri.backward(torch.randn_like(out), q, k, v, out, lse, inv, kl, 4, 48, 5, 13, 13, 0.125,
                 False, True, **kw)
    keys[str(sink)] = rec.per_kernel()
print(json.dumps(keys))
"""


def test_sinks_add_one_compile_key_and_leave_the_plain_kernels_alone():
    """Launch keys recorded with Triton's own binder (nothing compiled): a call without sinks and
    one with sink=0 share one key per launcher (the band/chunked kernels as before: sink and
    HAS_SINK are None); every sink > 0 (1, 5, 16, 300, 10**9: no integer specialisation, sink is
    do_not_specialize, and capped at k_offset + Nk) adds exactly one more (HAS_SINK=True) to the
    fwd, dq and dk/dv kernels (the backward has no other attention kernel)."""
    import json
    import sys

    pytest.importorskip("triton")
    import _subproc
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = _subproc.run([sys.executable, "-c", _SINK_KEYS, os.path.join(root, "tests")], env=env,
                     cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    keys = json.loads(r.stdout.strip().splitlines()[-1])
    assert keys["None"] and all(n == 1 for n in keys["None"].values()), keys
    assert keys["0"] == keys["None"], keys
    sinky = {"_interval_attention_fwd_kernel", "_interval_attention_bwd_dq_kernel",
             "_interval_attention_bwd_dkdv_kernel"}
    assert sinky <= set(keys["None"]) and set(keys["1"]) == set(keys["None"]), keys
    assert keys["1"] == {name: 2 if name in sinky else 1 for name in keys["None"]}, keys
    for sink in ("5", "16", "300", str(10 ** 9)):
        assert keys[sink] == keys["1"], keys


def _triton_case(rng, kind):
    """(B, Hq, Hk, nq, nk, q_offset, k_offset, mask, key_lengths, rope) with the sink of
    ``kind``: 0, 1, inside the band of the first rows, beyond every row's band, or >= N."""
    B, Hk, g = rng.randint(1, 2), rng.randint(1, 2), rng.choice([1, 2])
    nq, nk = rng.randint(1, 40), rng.randint(1, 40)
    ko = rng.randint(0, 5)
    qo = ko + rng.randint(0, 20)
    left, right = rng.choice([None, 0, 2, 5]), rng.randint(0, 2)
    sink = {"0": 0, "1": 1, "inside": ko + rng.randint(1, 4),
            "beyond": ko + nk // 2 + rng.randint(1, 3), ">=N": ko + nk + rng.randint(0, 40)}[kind]
    if rng.random() < 0.5:
        m = IntervalMask.band(left, right, sink=sink)
    else:
        m = IntervalMask.chunked(rng.randint(2, 5), rng.choice([None, 0, 1]), rng.randint(0, 2),
                                 sink=sink)
    kl = None if rng.random() < 0.4 else torch.randint(0, nk + 1, (B,))
    rope = rng.choice([None, pyencoder.Rope(16), pyencoder.Rope(8, interleaved=True)])
    return B, Hk * g, Hk, nq, nk, qo, ko, m, kl, rope


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["0", "1", "inside", "beyond", ">=N"])
def test_triton_sinks_match_the_reference_under_the_interpreter(dtype, kind, monkeypatch):
    """Tiny shapes through the Triton kernels (TRITON_INTERPRET=1 on CPU; fp32 and fp16, as the
    interpreter's bf16 dot is wrong), through interval_attention(backend="triton") with outputs
    poisoned before the kernels write them: out, lse and dq, dk, dv against the reference in
    float64 on the same inputs, over sinks 0, 1, inside and beyond the band and >= N, band and
    chunked masks, q/k offsets, padding (a batch may have no key), GQA, RoPE off / NeoX /
    interleaved partial. Tolerances relative to max(1, the largest reference value): fp32 1e-4
    (IEEE fp32 dots, exp2 vs exp, another summation order); fp16 6e-3 out / 1.2e-2 gradients
    (rotated q/k, P and dS rounded to fp16 before each dot: ~1e-3 per element with O(1) inputs,
    as in tests/test_attention_triton.py), far below a masking error (O(0.1-1))."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set it before triton is imported)")
    from pyencoder.ops import _attention_triton as tri
    monkeypatch.setattr(tri, "POISON_OUTPUTS", True)
    rng = random.Random(torch.randint(1 << 30, ()).item())
    for _ in range(2):
        B, Hq, Hk, nq, nk, qo, ko, m, kl, rope = _triton_case(rng, kind)
        q = torch.randn(B, Hq, nq, 16, dtype=dtype)
        k, v = (torch.randn(B, Hk, nk, 16, dtype=dtype) for _ in range(2))
        go = torch.randn(B, Hq, nq, 16, dtype=dtype)
        res = {}
        for be in ("triton", "reference"):
            xs = [(x.double() if be == "reference" else x).clone().requires_grad_(True)
                  for x in (q, k, v)]
            o, lse = interval_attention(*xs, mask=m, rope=rope, key_lengths=kl, q_offset=qo,
                                        k_offset=ko, backend=be, return_lse=True)
            res[be] = (o, lse.double()) + torch.autograd.grad(o, xs, go.to(o.dtype))
        what = (m, qo, ko, kl, rope, (B, Hq, Hk, nq, nk))
        lse_t, lse_r = res["triton"][1], res["reference"][1]
        assert torch.equal(torch.isinf(lse_t), torch.isinf(lse_r)), ("zero rows differ", what)
        fin = torch.isfinite(lse_r)
        assert torch.allclose(lse_t[fin], lse_r[fin], rtol=1e-4 if dtype == torch.float32
                              else 5e-3, atol=1e-4 if dtype == torch.float32 else 5e-3), what
        for name, a, b in zip(("out", "-", "dq", "dk", "dv"), res["triton"], res["reference"]):
            if name == "-":
                continue
            assert not torch.isnan(a).any(), (name, what)
            tol = 1e-4 if dtype == torch.float32 else (6e-3 if name == "out" else 1.2e-2)
            err = (a.double() - b).abs().max().item() if a.numel() else 0.0
            assert err <= tol * max(1.0, b.abs().max().item()), (name, err, what)


def test_triton_sink_keys_poison_like_the_reference_under_the_interpreter():
    """A non-finite sink key poisons every row (it is visible to all), a non-finite key that is
    not a sink only the rows whose band holds it: the Triton kernels give NaN exactly where the
    reference does, forward and dk."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set it before triton is imported)")
    q, k, v = (torch.randn(1, 2, 20, 8) for _ in range(3))
    k[0, 1, 1, 3] = float("nan")
    for sink in (2, 1):
        nan = {}
        for be in ("triton", "reference"):
            xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
            out = pyencoder.ops.banded_attention(*xs, left=2, right=0, sink=sink, backend=be)
            dk = torch.autograd.grad(out.nan_to_num().sum(), xs)[1]
            nan[be] = (torch.isnan(out), torch.isnan(dk))
        assert all(torch.equal(a, b) for a, b in zip(nan["triton"], nan["reference"])), sink
        assert nan["triton"][0][0, 1].all() == (sink == 2)


def gpu_quick(name, p):
    """The fast GPU tier (tests/conftest.py): the sink kernels once per dtype, band in bf16."""
    if name != "test_gpu_triton_sinks_follow_the_flash_attention_rule":
        return False
    band = p["mask"].block == 1 and p["mask"].sink == 4
    return (p["dtype"] == torch.bfloat16 and band) or (p["dtype"] == torch.float16 and not band
                                                        and p["mask"].sink == 64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("mask", [IntervalMask.band(250, 3, sink=4),
                                  IntervalMask.chunked(16, 2, 3, sink=64),
                                  IntervalMask.band(None, 0, sink=1),
                                  IntervalMask.band(8, 0, sink=700)], ids=repr)
def test_gpu_triton_sinks_follow_the_flash_attention_rule(dtype, mask):
    """On a GPU with the tuned tiles: N=1000 (padding, GQA, NeoX RoPE, offsets), kernel error
    against the float32 reference <= 2x (forward) / 3x (gradients) the error of the reference
    run in the same dtype, plus a small absolute floor (the FlashAttention rule of
    tests/test_attention_triton.py); float32 within 1e-4 relative."""
    B, Hq, Hk, N, D = 2, 4, 2, 1000, 64
    q = torch.randn(B, Hq, N, D, device="cuda", dtype=dtype)
    k, v = (torch.randn(B, Hk, N, D, device="cuda", dtype=dtype) for _ in range(2))
    go = torch.randn_like(q)
    kl = torch.tensor([N, 613], device="cuda")
    rope = pyencoder.Rope(D)

    def run(be, cast):
        xs = [cast(x).clone().requires_grad_(True) for x in (q, k, v)]
        o = interval_attention(*xs, mask=mask, rope=rope, key_lengths=kl, q_offset=5,
                               k_offset=3, backend=be)
        return (o,) + torch.autograd.grad(o, xs, cast(go))

    got = run("triton", lambda x: x)
    want = run("reference", lambda x: x.float())
    same = run("reference", lambda x: x)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, want, same):
        err = (a.float() - b).abs().max().item()
        if dtype == torch.float32:
            assert err <= 1e-4 * max(1.0, b.abs().max().item()), (name, err)
        else:
            base = (c.float() - b).abs().max().item()
            assert err <= (2 if name == "out" else 3) * base + 1e-3, (name, err, base)


def test_auto_picks_the_triton_kernels_for_sinks_on_cuda():
    """Backend choice for CUDA tensors (``auto``): sink keys go to the Triton kernels, with a
    relative bias too (the saturated bucket rule)."""
    pytest.importorskip("triton")
    from pyencoder import _backend
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    args = dict(q=q, k=k, v=v, inv_freq=None, key_lengths=None, block=1, lo_off=2, hi_off=0,
                q_offset=0, k_offset=0, scale=1.0, interleaved=False, sink=3)
    assert _backend.select("attention", "forward", "cuda", args) == "triton"
    assert _backend.select("attention", "forward", "cuda",
                           dict(args, rel_bias=torch.zeros(2, 8))) == "triton"


def test_opcheck_triton_backend_with_sinks():
    """torch.library.opcheck of the interval attention ops with sink keys on the Triton backend
    (interpreter on CPU): pyencoder::interval_attention with backend "triton" and the triton_op
    pyencoder::interval_attention_triton (what interval_attention calls): schema, fake kernel,
    autograd."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or a GPU")
    from conftest import attention_op_args
    from pyencoder.ops import _triton_ops  # noqa: F401  (registers the triton_ops)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(2, 2, 10, 16, device=dev, requires_grad=True)
    k = torch.randn(2, 1, 12, 16, device=dev, requires_grad=True)
    v = torch.randn(2, 1, 12, 16, device=dev, requires_grad=True)
    inv = pyencoder.Rope(8).inv_freq().to(dev)
    kl = torch.tensor([12, 7], dtype=torch.int32, device=dev)
    args = attention_op_args(q, k, v, inv, kl, block=1, lo_off=3, hi_off=2, sink=5)
    torch.library.opcheck(torch.ops.pyencoder.interval_attention.default, (*args, "triton"))
    torch.library.opcheck(torch.ops.pyencoder.interval_attention_triton.default, args)
