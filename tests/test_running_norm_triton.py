"""The running GroupNorm's Triton kernel (triton_kernels/running_norm.py: on CUDA,
RunningGroupNorm.step_fixed and, where autograd does not record, running_norm) against
pyencoder.nn.norm's torch path.

CPU under TRITON_INTERPRET=1 (``_ring_write_triton.FORCE_INTERPRET``, which the launcher shares):
random x (outputs NaN-poisoned before the launch) of several step lengths (one tile, several
tiles with a ragged last one), channel counts that are not a multiple of the channel block, slots
with different counts and non-zero running sums from earlier steps, with and without the affine,
float32 / float16 (bfloat16 on a GPU: the interpreter truncates float32 -> bfloat16): y equals
the torch path's to its dtype's last bit (1 ulp: the float64 sums are added in another order,
which may move a value across a rounding tie) and the sums to float64 rounding (1e-12
relative), in place, the count not written. A NaN enters only its own channel's sums (as the
torch path). The module takes the kernel only where it applies (not while autograd records, not
for float64 or a weight of another dtype, not with PYENCODER_FUSED_RING=0); the offline call
rounds its tile count up to a power of two; a CausalEncoder step_fixed with it equals the
general step. GPU (``-m gpu``): the same compiled, bfloat16 included, at the bench shape.
"""
import os

import pytest
import torch

from _norm_kernel_utils import (DEV as _DEV, NEEDS_TRITON_RUN, check_act, check_ulp, force_fused,
                                norm_inputs)

pytestmark = NEEDS_TRITON_RUN

from pyencoder.nn.norm import RunningGroupNorm, running_norm, running_norm_torch  # noqa: E402
from pyencoder.ops import _running_norm_triton as RN  # noqa: E402

_check, _check_gelu = check_ulp, check_act


def _check_norm(y, want, dt, gelu):
    """y against the torch path's normalised ``want`` (its GELU with ``gelu``)."""
    if gelu:
        _check_gelu(y, torch.nn.functional.gelu(want), dt)
    else:
        _check(y, want, dt)


@pytest.fixture(autouse=True)
def _force(monkeypatch):
    force_fused(monkeypatch, RN)


def _sums(B, C):
    n0 = torch.tensor([0, 37, 5][:B], device=_DEV)
    tot = torch.randn(B, C, dtype=torch.float64, device=_DEV) * n0[:, None] * 0.3
    tsq = tot * tot / n0.clamp_min(1)[:, None] + n0[:, None] * torch.rand(
        B, C, dtype=torch.float64, device=_DEV)
    return n0, tot, tsq


@pytest.mark.parametrize("dt", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,C,T", [(1, 16, 4), (2, 21, 64), (3, 8, 150), (2, 33, 1)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("gelu", [False, True])
def test_kernel_equals_torch_path(dt, B, C, T, affine, gelu):
    x, w, b = norm_inputs(B, C, T, dt, affine, seed=B * 100 + C + T)
    n0, tot, tsq = _sums(B, C)
    want, wt, wq = running_norm_torch(x, w, b, 1e-5, n0, tot, tsq)
    tot2, tsq2, n1 = tot.clone(), tsq.clone(), n0.clone()
    ptr = (tot2.data_ptr(), tsq2.data_ptr())
    y = RN.running_norm_step(x, w, b, 1e-5, n1, tot2, tsq2, gelu=gelu)
    assert y.dtype == dt and y.shape == x.shape
    _check_norm(y, want, dt, gelu)
    torch.testing.assert_close(tot2, wt, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tsq2, wq, rtol=1e-12, atol=1e-12)
    assert (tot2.data_ptr(), tsq2.data_ptr()) == ptr and torch.equal(n1, n0)


def test_kernel_strided_input_and_empty_steps():
    """A channel-last view of x (the kernel reads any strides) and T = 0 (no launch, sums
    untouched)."""
    torch.manual_seed(3)
    x = torch.randn(2, 40, 24, device=_DEV).transpose(1, 2)        # (2, 24, 40) strided
    n0, tot, tsq = _sums(2, 24)
    want, wt, _ = running_norm_torch(x, None, None, 1e-5, n0, tot, tsq)
    t2, q2 = tot.clone(), tsq.clone()
    _check(RN.running_norm_step(x, None, None, 1e-5, n0, t2, q2), want, torch.float32)
    torch.testing.assert_close(t2, wt, rtol=1e-12, atol=1e-12)
    before = t2.clone()
    y = RN.running_norm_step(x[..., :0], None, None, 1e-5, n0, t2, q2)
    assert y.shape == (2, 24, 0)
    assert torch.equal(t2, before)


def test_kernel_nan_stays_in_its_channel():
    x = torch.randn(1, 4, 10, device=_DEV)
    x[0, 2, 3] = float("nan")
    n0, tot, tsq = _sums(1, 4)
    y = RN.running_norm_step(x, None, None, 1e-5, n0, tot, tsq)
    assert torch.isnan(y[0, 2, 3:]).all() and not torch.isnan(y[0, 2, :3]).any()
    assert not torch.isnan(y[0, [0, 1, 3]]).any()
    assert torch.isnan(tot[0, 2]) and not torch.isnan(tot[0, [0, 1, 3]]).any()


@pytest.mark.parametrize("T", [1, 63, 64, 65, 300])
def test_offline_running_norm_takes_the_kernel(T, monkeypatch):
    """running_norm (the offline forward's and the general step's, pyencoder.hf's running
    GroupNorm) on the kernel where autograd does not record: the tile count rounded up to a power
    of two (masked tiles past T), equal to the torch path, the input sums not written; the torch
    path while autograd records."""
    torch.manual_seed(T)
    calls = _spy(monkeypatch)
    x = torch.randn(2, 19, T, device=_DEV) * 2 + 1
    w = 1 + 0.3 * torch.randn(19, device=_DEV)
    b = 0.2 * torch.randn(19, device=_DEV)
    n0, tot, tsq = _sums(2, 19)
    keep = tot.clone(), tsq.clone()
    want, wt, wq = running_norm_torch(x, w, b, 1e-5, n0, tot, tsq)
    with torch.no_grad():
        y, t2, q2 = running_norm(x, w, b, 1e-5, n0, tot, tsq)
    assert calls == ["offline"]
    _check(y, want, torch.float32)
    torch.testing.assert_close(t2, wt, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q2, wq, rtol=1e-12, atol=1e-12)
    assert torch.equal(tot, keep[0]) and torch.equal(tsq, keep[1])
    wg = w.clone().requires_grad_()
    y, _, _ = running_norm(x, wg, b, 1e-5, n0, tot, tsq)
    assert calls == ["offline"] and y.requires_grad


def test_offline_tile_counts_share_compiles(monkeypatch):
    """offline=True: lengths 65..128 frames (2 tiles of 64) launch with NUM_T=2, 129..256 with
    4: one compile per power of two, not per length."""
    seen = []
    real = RN.launch

    def spy(kernel):
        ln = real(kernel)

        class G:
            def __getitem__(self, grid):
                f = ln[grid]

                def call(*a, **k):
                    seen.append(k["NUM_T"])
                    return f(*a, **k)
                return call
        return G()
    monkeypatch.setattr(RN, "launch", spy)
    for T in (65, 128, 129, 200, 256):
        n0, tot, tsq = _sums(1, 16)
        RN.running_norm_step(torch.randn(1, 16, T, device=_DEV), None, None, 1e-5, n0, tot, tsq,
                             offline=True)
    assert seen == [2, 2, 4, 4, 4]


def _spy(monkeypatch):
    calls = []
    real = RN.running_norm_step

    def spy(*a, **k):
        calls.append("offline" if k.get("offline") else "step")
        return real(*a, **k)
    monkeypatch.setattr(RN, "running_norm_step", spy)
    return calls


def test_module_step_fixed_takes_the_kernel(monkeypatch):
    """step_fixed == step (one ulp), in place, through the kernel; the torch path where the
    kernel does not apply."""
    torch.manual_seed(4)
    norm = RunningGroupNorm(20).to(_DEV)
    with torch.no_grad():
        norm.weight.add_(torch.randn(20, device=_DEV) * 0.3)
        norm.bias.add_(torch.randn(20, device=_DEV) * 0.3)
    calls = _spy(monkeypatch)
    st, ref = norm.init_state(2), norm.init_state(2)
    with torch.no_grad():
        for T in (5, 70, 1):
            x = torch.randn(2, 20, T, device=_DEV) * 3 + 1
            y = norm.step_fixed(x, st)
            with monkeypatch.context() as mp:           # the reference: the torch path
                mp.setattr(RN, "fused_ok", lambda *a: False)
                y2, ref = norm.step(x, ref)
            _check(y, y2, torch.float32)
            torch.testing.assert_close(st.total, ref.total, rtol=1e-12, atol=1e-12)
            assert torch.equal(st.count, ref.count)
    assert calls == ["step"] * 3
    # with the GELU in the launch (a wav2vec2 extractor's first layer), and the module's forward
    with torch.no_grad():
        x = torch.randn(2, 20, 9, device=_DEV) * 3 + 1
        y = norm.step_fixed(x, st, gelu=True)
        with monkeypatch.context() as mp:
            mp.setattr(RN, "fused_ok", lambda *a: False)
            y2, ref = norm.step(x, ref, gelu=True)
            want = norm(x, gelu=True)
        _check_gelu(y, y2, torch.float32)
        _check_gelu(norm(x, gelu=True), want, torch.float32)
        torch.testing.assert_close(want, torch.nn.functional.gelu(norm(x)), rtol=0, atol=0)
    assert calls == ["step"] * 4 + ["offline"] * 2
    del calls[4:]
    x = torch.randn(2, 20, 3, device=_DEV)
    norm.step_fixed(x, st)                                  # grad mode, weight requires grad
    norm.double().step_fixed(x.double(), norm.init_state(2))            # float64
    with torch.no_grad():
        monkeypatch.setenv("PYENCODER_FUSED_RING", "0")
        RunningGroupNorm(20).to(_DEV).step_fixed(x, RunningGroupNorm(20).init_state(2))
    assert calls == ["step"] * 4


def test_encoder_step_fixed_with_the_kernel(monkeypatch):
    """A CausalEncoder with a running GroupNorm front end: step_fixed (the norm and its GELU on
    the kernel, the positional embedding's add and the post-LN LayerNorm in the residual
    kernel, the layers on the fused ring write) equals the general step (float32, 1e-5)."""
    from _stream_utils import rel_err
    from test_encoder_step_fixed import _encoder, _frames
    from pyencoder.models import encoder as E

    calls = _spy(monkeypatch)
    pos_adds = []
    real = E._ring.residual_step

    def spy(res, count, x, a, keep, *rest, **kw):
        if res is x and keep == 0:          # the encoder's call (a layer passes its queue)
            pos_adds.append(1)
        return real(res, count, x, a, keep, *rest, **kw)
    monkeypatch.setattr(E._ring, "residual_step", spy)
    m = _encoder("band_group_valid", dtype=torch.float32).to(_DEV)
    B, n = 2, m.hop * _frames(m)
    x = torch.randn(B, n * 9, device=_DEV)
    with torch.no_grad():
        st = m.init_state(B, max_chunk=4)
        for i in range(5):
            _, st = m.step(x[:, i * n:(i + 1) * n], st)
        ref = m.init_state(B, max_chunk=4)
        ref.load_state_dict(st.state_dict())
        for i in range(5, 9):
            y = m.step_fixed(x[:, i * n:(i + 1) * n], st, check=i == 5)
            with monkeypatch.context() as mp:     # the reference: torch's add and LayerNorm
                mp.setattr(E._ring, "residual_ok", lambda *a: False)
                y2, ref = m.step(x[:, i * n:(i + 1) * n], ref)
            assert rel_err(y, y2) <= 1e-5, i
    assert len(calls) >= 4     # (the steady general steps run step_fixed too)
    assert len(pos_adds) >= 4


@pytest.mark.gpu
@pytest.mark.gpu_quick
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_kernel_at_the_bench_shape(dt):
    """Compiled, at the converted wav2vec2-base's 80 ms step (C = 512, T = 256: 4 tiles), two
    steps in a row: y within one ulp of the torch path (bfloat16 included), the sums to 1e-12."""
    torch.manual_seed(9)
    B, C, T = 2, 512, 256
    w = (1 + 0.3 * torch.randn(C, device="cuda")).to(dt)
    b = (0.2 * torch.randn(C, device="cuda")).to(dt)
    n0, tot, tsq = _sums(B, C)
    t2, q2 = tot.clone(), tsq.clone()
    for gelu in (False, True):      # the second with the GELU (the encoder's first layer)
        x = (torch.randn(B, C, T, device="cuda") * 2 + 0.5).to(dt)
        want, tot, tsq = running_norm_torch(x, w, b, 1e-5, n0, tot, tsq)
        y = RN.running_norm_step(x, w, b, 1e-5, n0, t2, q2, gelu=gelu)
        _check_norm(y, want, dt, gelu)
        torch.testing.assert_close(t2, tot, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(q2, tsq, rtol=1e-12, atol=1e-9)
        n0 = n0 + T


def test_benchmark_dry_run():
    """benchmarks/bench_running_norm.py --dry-run: every CPU provider row of both norms (the
    kernels through the interpreter), errors against the torch paths printed, nothing
    written."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_running_norm", "--dry-run"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    for mode in ("offline", "step"):
        for norm in ("running", "channel"):     # and the channel LayerNorm + GELU's rows
            for prov in ("torch", "kernel"):
                line = [ln for ln in r.stdout.splitlines()
                        if ln.startswith(mode) and f" {norm} " in ln and f" {prov} " in ln]
                assert line, r.stdout
                err = float(line[0].split("max |err|")[1])
                assert err <= 1e-5, line
    assert "dry run: nothing written" in r.stdout


def test_output_dtype_is_the_same_on_every_path():
    """A half input with float32 parameters came back float32 from full steps and the forward
    but float16 from an empty forward, a ragged step and flush (the stream mixed dtypes)."""
    from pyencoder.nn.norm import RunningGroupNorm
    torch.manual_seed(71)
    m = RunningGroupNorm(4)
    x = torch.randn(2, 4, 6).half()
    with torch.no_grad():
        dts = {m(x).dtype, m(x[..., :0]).dtype}
        st = m.init_state(2)
        y, st = m.step(x[..., :3], st)
        dts.add(y.dtype)
        y, st = m.step(x[..., 3:], st, lengths=torch.tensor([3, 1]))
        dts.add(y.dtype)
        dts.add(m.step_fixed(x[..., :2], st).dtype)
        dts.add(m.flush(st)[0].dtype)
    assert dts == {torch.float32}
