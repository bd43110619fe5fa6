"""benchmarks/bench_streaming.py: the GPU path's logic runs on CPU (--dry-run) and writes nothing;
the concurrent-streams search finds the largest batch within budget."""
import os
import sys
import types

import pytest

import _subproc
from conftest import has_triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _listing(folder):
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            out[p] = os.stat(p).st_mtime_ns
    return out


def test_dry_run_gpu_path_on_cpu():
    results = os.path.join(ROOT, "benchmarks", "results")
    before = _listing(results)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    r = _subproc.run([sys.executable, "-m", "benchmarks.bench_streaming", "--dry-run"],
                     cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    for mask, ms in (("banded", 20), ("chunked", 80)):
        assert f"[{mask}] batch 1, {ms} ms steps" in r.stdout
        assert f"[{mask}] concurrent real-time streams at {ms} ms steps" in r.stdout
        # the batch-1 step's profile ran (the dry run profiles the eager step's aten ops)
        assert f"[{mask}] step profile (eager):" in r.stdout
    # the A/B variant of the 80 ms step: the triton conv backend cannot run here (no GPU, no
    # interpreter): its failure is a line, not the run's end
    assert "[chunked] variant conv-triton failed: RuntimeError: pyencoder: backend 'triton'" \
        in r.stdout, r.stdout
    assert "dry run: nothing written" in r.stdout
    assert _listing(results) == before


@pytest.mark.parametrize("variant,interpret", [
    pytest.param("conv-triton", True, marks=pytest.mark.skipif(
        not has_triton(), reason="triton is not installed")),
    ("encoder", False), ("decoder", False)])
def test_dry_run_step_variant(variant, interpret):
    """--variants conv-triton: the chunked stack's 80 ms step with the feature extractor's convs
    on the triton backend (here interpreted); --variants encoder: the converted wav2vec2-base
    CausalEncoder's whole step_fixed (the reference backends here); --variants decoder:
    FocalCodec-Stream's decoder's step_fixed (codec frames in). Each: its latency and profile
    lines, tagged."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    r = _subproc.run([sys.executable, "-m", "benchmarks.bench_streaming", "--dry-run", "--mask",
                      "chunked", "--variants", variant, "--max-batch", "0"],
                     cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"[chunked, variant {variant}] batch 1, 80 ms steps" in r.stdout, r.stdout
    assert f"[chunked, variant {variant}] step profile (eager):" in r.stdout
    assert "failed" not in r.stdout


@pytest.mark.parametrize("limit", [0, 1, 5, 31, 100, 257, 300, 2500, 16384, 20000])
def test_search_streams(limit):
    from benchmarks.bench_streaming import search_streams
    seen = []

    def measure(b):
        seen.append(b)
        return None if b > 5000 else 10.0 * b / max(limit, 1) if limit else 1e9

    got, capped, upper, cut = search_streams(measure, 10.0, start=256, max_batch=16384)
    want = min(limit, 5000)
    assert capped is False and cut is False
    assert want - max(1, want // 32) <= got <= want, (got, want)
    assert upper is not None and got < upper <= want + max(1, want // 32) + 1, (got, upper)
    # every batch measured at or below the answer fits, every one above does not
    assert all(b <= want for b in seen if b <= got) and upper in seen
    assert len(seen) < 30
    got, capped, upper, cut = search_streams(lambda b: 1.0, 10.0, start=256, max_batch=1000)
    assert (got, capped, upper, cut) == (1000, True, None, False)


@pytest.mark.parametrize("resolution", [4, 8, 32])
def test_search_streams_resolution(resolution):
    from benchmarks.bench_streaming import search_streams
    seen = []

    def measure(b):
        seen.append(b)
        return 1.0 if b <= 3712 else 99.0

    found = search_streams(measure, 10.0, start=2048, max_batch=16384, resolution=resolution)
    assert found.streams <= 3712 < found.upper
    assert found.upper - found.streams <= max(1, found.streams // resolution)
    assert seen[0] == 2048 and not found.cut
    # a coarser resolution never measures more
    if resolution == 8:
        n8 = len(seen)
        seen.clear()
        search_streams(measure, 10.0, start=2048, max_batch=16384, resolution=32)
        assert len(seen) > n8


def test_search_streams_deadline(monkeypatch):
    """No measurement starts after the deadline except the first; a cut search says so and
    returns what it proved (a lower bound) and the bracket's top when one failed."""
    import time
    import benchmarks.bench_streaming as bs
    seen = []

    def measure(b):
        seen.append(b)
        return 1.0 if b <= 3000 else None

    found = bs.search_streams(measure, 10.0, start=256, deadline=time.monotonic() - 1)
    assert seen == [256] and found == (256, False, None, True)
    # a deadline far away changes nothing
    seen.clear()
    found = bs.search_streams(measure, 10.0, start=256, deadline=time.monotonic() + 3600)
    assert not found.cut and found.streams <= 3000 < found.upper
    assert found == bs.search_streams(measure, 10.0, start=256)
    # the deadline passes while 4096 is measured (the doubling's first miss): the bisection
    # starts nothing, and the bracket [2048, 4096) comes back
    seen.clear()
    now = time.monotonic()
    clock = {"t": now}
    # the module's clock only (the real time.monotonic stays for pytest)
    monkeypatch.setattr(bs, "time", types.SimpleNamespace(monotonic=lambda: clock["t"]))

    def late_measure(b):
        r = measure(b)
        if b == 4096:
            clock["t"] = now + 100
        return r
    found = bs.search_streams(late_measure, 10.0, start=256, deadline=now + 50)
    assert seen == [256, 512, 1024, 2048, 4096]
    assert found == (2048, False, 4096, True)


@pytest.mark.parametrize("name,kind", [
    ("nvjet_tst_64x8_64x16_4x1_v_bz_TNN", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64", "gemm"),
    ("void gemv2T_kernel_val<int, int, __nv_bfloat16, float, 128, 16, 4, 4, false>", "gemm"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>", "gemm"),
    ("_decode_attention_fwd_kernel", "attention"),
    ("_ring_write_kernel", "ring_write"),
    ("_residual_kernel", "ring_write"),
    ("_causal_conv1d_grp_fwd_kernel", "conv"),
    ("void dw_update_kernel<__nv_bfloat16, 4>(DwUpdateParams)", "conv"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16>", "norm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::bfloat16_copy_kernel_cuda>",
     "copy"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>",
     "elementwise"),
    ("Memset (Device)", "copy"),
    ("some_new_kernel", "other"),
])
def test_kernel_kind(name, kind):
    from benchmarks.bench_streaming import kernel_kind
    assert kernel_kind(name) == kind


def test_profile_step_sums_device_kernels_per_step(monkeypatch):
    """On CUDA the step profile keeps the device (kernel) entries only, per step, by kind; the
    host-side entries (aten ops, cudaGraphLaunch) never count as kernel time."""
    import torch
    import torch.profiler
    from benchmarks import bench_streaming as bs
    CUDA, CPU = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    ev = lambda key, dt, us, n: types.SimpleNamespace(  # noqa: E731
        key=key, device_type=dt, count=n, self_device_time_total=us if dt == CUDA else 0.0,
        self_cpu_time_total=us if dt == CPU else 0.0)
    events = [ev("cudaGraphLaunch", CPU, 5000.0, 10), ev("aten::addmm", CPU, 900.0, 490),
              ev("nvjet_tst_64x8_64x16_4x1_v_bz_TNN", CUDA, 4900.0, 490),
              ev("_decode_attention_fwd_kernel", CUDA, 600.0, 120),
              ev("void at::native::vectorized_elementwise_kernel<4, add>", CUDA, 300.0, 360)]

    class FakeProfile:
        def __init__(self, activities):
            assert torch.profiler.ProfilerActivity.CUDA in activities

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def key_averages(self):
            return events
    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    calls = []
    prof = bs.profile_step(lambda: calls.append(1), 10, cuda=True, top=2)
    assert len(calls) == 10
    assert prof["kernels_per_step"] == pytest.approx(97.0)
    assert prof["kernel_us_per_step"] == pytest.approx(580.0)
    assert prof["kinds"] == pytest.approx({"gemm": 490.0, "attention": 60.0, "elementwise": 30.0})
    assert list(prof["kinds"]) == ["gemm", "attention", "elementwise"]
    assert [r["name"] for r in prof["top"]] == ["nvjet_tst_64x8_64x16_4x1_v_bz_TNN",
                                               "_decode_attention_fwd_kernel"]
    assert prof["top"][1]["calls_per_step"] == 12.0 and prof["top"][1]["us_per_step"] == 60.0


def test_readme_streaming_rows():
    """The README's streaming table shows a cut search as a lower bound, a finished one with its
    bracket, and the step profile's kernels and kinds (graph rows against the GPU step time)."""
    from benchmarks.readme import streaming
    base = dict(bench="streaming", layers=12, dim=768, heads=12, left=250, lookahead_frames=3,
                dtype="bfloat16", mask="chunked", step_ms=80)
    text = streaming([
        dict(base, mode="step_latency", p50_ms=2.05, p99_ms=2.15, target_p99_ms=2.0),
        dict(base, mode="realtime_streams", streams=5120, streams_upper=5632, search_cut=False,
             target_streams=2000),
        dict(base, mode="realtime_streams", streams=2048, streams_upper=None, search_cut=True,
             target_streams=2000),
        dict(base, mode="step_profile", source="graph", kernels_per_step=224.0,
             kernel_us_per_step=1432.4, gpu_p50_us=1994.0,
             kinds={"gemm": 800.0, "conv": 300.0, "attention": 200.0, "copy": 100.0,
                    "other": 32.4}),
        dict(base, mode="step_profile", source="eager", error="RuntimeError: x"),
        dict(base, mode="step_latency", variant="conv-triton", p50_ms=1.5, p99_ms=1.6,
             target_p99_ms=2.0),
        dict(base, mode="variant_error", variant="conv-triton", error="RuntimeError: y"),
    ])
    assert "step latency, batch 1, chunked mask, variant conv-triton | p50 1.50 / p99 1.60 ms" \
        in text, text
    assert "5120 (< 5632)" in text and ">= 2048 (search cut short)" in text
    assert "step kernels, batch 1, graph, chunked mask" in text
    assert "224 kernels, 1432 us of 1994 us" in text
    assert "gemm 800, conv 300, attention 200, copy 100" in text and "other 32" not in text
    assert "eager" not in text     # a failed profile has no row
