"""benchmarks/profile_attention.py end to end on the CPU (--dry-run: tiny shapes, float32, the
Triton kernels in the interpreter): one row per case with the host time, do_bench's median and the
top ops from torch.profiler, on disk as measured; --max-seconds stops starting cases; the CUDA
kernel-time sum over key_averages entries on fake events (no GPU here)."""
import json
import os
import sys
import types

import pytest
import torch

import _subproc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
pa = pytest.importorskip("benchmarks.profile_attention")
pytest.importorskip("triton")


def _dry_run(tmp_path, *extra):
    env = dict(os.environ, PYENCODER_RESULTS_DIR=str(tmp_path), TRITON_INTERPRET="1",
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    r = _subproc.run([sys.executable, "-m", "benchmarks.profile_attention", "--dry-run",
                      "--n", "24", *extra], cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    files = list(tmp_path.rglob("profile_attention.jsonl"))
    assert len(files) == 1, files
    return r.stdout, [json.loads(x) for x in files[0].read_text().splitlines() if x.strip()]


def test_dry_run_end_to_end(tmp_path):
    out, rows = _dry_run(tmp_path, "--trace")
    want = [f"{label}-{mode}" for label, _, _ in pa.CASES for mode in pa.MODES]
    assert [r["case"] for r in rows] == want
    assert "Self CPU time total" in out                 # the profiler tables were printed
    assert out.count("host profile (cProfile") == len(rows)
    for r in rows:
        assert r["bench"] == "profile_attention" and r["provider"] == "pyencoder-triton"
        assert (r["B"], r["H"], r["D"], r["N"], r["dtype"]) == (1, 2, 16, 24, "float32")
        assert r["host_us"] > 0 and r["ms"] > 0 and r["p20_ms"] <= r["p80_ms"]
        assert r["host_us_triton_run"] > 0     # the fast launch A/B
        assert r["kernel_us"] is None and r["graph_ms"] is None      # CPU: no CUDA figures
        assert 1 <= len(r["top_ops"]) <= pa.TOP_OPS
        names = [op["name"] for op in r["top_ops"]]
        # the attention call leads (the custom op, the eager fast path's autograd.Function, or
        # the direct call's record_function label when no graph is recorded)
        assert "triton" in names[0].lower(), names
        if r["mode"] == "fwdbwd":
            assert any("backward" in x.lower() for x in names), names
        for op in r["top_ops"]:
            assert op["calls"] >= 1 and op["cpu_us"] >= 0 and op["cuda_us"] is None
        assert os.path.isfile(r["trace"]) and r["trace"].startswith(str(tmp_path))
        # the host time by Python function: pyencoder's launch path among the top entries
        hp = r["host_profile"]
        assert 1 <= len(hp) <= pa.HOST_TOP
        assert [h["self_us"] for h in hp] == sorted((h["self_us"] for h in hp), reverse=True)
        assert all(h["calls"] > 0 and h["cum_us"] >= h["self_us"] >= 0 for h in hp)
        assert f"-- {r['case']}: host " in out
    assert [(r["mask"], r["rope"]) for r in rows[::2]] == \
        [("band(50, 3)", False), ("band(50, 3)", True), ("band(None, 0)", False)]
    assert len({r["run_id"] for r in rows}) == 1


def test_max_seconds_stops_new_cases(tmp_path):
    out, rows = _dry_run(tmp_path, "--max-seconds", "0")
    assert len(rows) == 1 and "--max-seconds 0 reached: stopping" in out   # the first case runs
    assert rows[0]["trace"] is None


def test_needs_a_gpu_or_dry_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        pa.main([])


def test_kernel_us_sums_cuda_self_time_per_call():
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    ev = [types.SimpleNamespace(key="k1", count=10, device_type=cuda, self_device_time_total=30.0,
                                cpu_time_total=0.0, device_time_total=30.0),
          types.SimpleNamespace(key="k2", count=10, device_type=cuda, self_device_time_total=50.0,
                                cpu_time_total=0.0, device_time_total=50.0),
          types.SimpleNamespace(key="op", count=10, device_type=cpu, self_device_time_total=0.0,
                                cpu_time_total=900.0, device_time_total=80.0)]
    assert pa.kernel_us(ev, 10) == pytest.approx(8.0)
    # an older profiler's field name
    old = [types.SimpleNamespace(key="k", count=1, device_type=cuda, self_cuda_time_total=7.0)]
    assert pa.kernel_us(old, 1) == pytest.approx(7.0)
    assert pa.kernel_us([ev[2]], 10) is None                      # no CUDA entries
    top = pa.top_ops(ev, cuda=True, k=2)
    assert [t["name"] for t in top] == ["op", "k2"]               # by CUDA time, then CPU time
    assert pa.top_ops(ev, cuda=False, k=1)[0] == {"name": "op", "calls": 10, "cpu_us": 900.0,
                                                  "cuda_us": None}
