"""`python -m benchmarks --quick` writes outside the tracked tree by default: results go to
$PYENCODER_RESULTS_DIR (or --results-dir, or the git-ignored bench-results/); only
--commit-results writes into the committed benchmarks/results/. One cheap benchmark module is run
for real (a few seconds); no timing is asserted."""
import argparse
import json
import os
import sys

import pytest

import _subproc
from conftest import has_triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _git_status():
    r = _subproc.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT)
    if r.returncode != 0:
        pytest.skip("not a git checkout")
    return r.stdout


def test_quick_run_leaves_tracked_tree_alone(tmp_path):
    before = _git_status()
    env = dict(os.environ, PYENCODER_RESULTS_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    r = _subproc.run([sys.executable, "-m", "benchmarks", "--quick", "--only", "bench_convnext"],
                       cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "ETA" in r.stdout
    assert _git_status() == before, "a quick benchmark run changed the git checkout"
    (dev,) = os.listdir(tmp_path)
    out = tmp_path / dev
    assert (out / "summary.md").exists()
    recs = [json.loads(line) for line in open(out / "convnext.jsonl")]
    assert recs and all("median_ms" in rec or "error" in rec for rec in recs)
    # the fused op's reference backend is its oracle: no speedup against the composed path
    assert not [rec for rec in recs if rec["provider"].endswith("reference")
                and "speedup_vs_composed" in rec]


def test_results_root_resolution(monkeypatch, tmp_path):
    from benchmarks import __main__ as runner
    from benchmarks import _common

    def ns(**kw):
        return argparse.Namespace(**{"results_dir": None, "commit_results": False, **kw})
    monkeypatch.delenv("PYENCODER_RESULTS_DIR", raising=False)
    assert runner._resolve_results_root(ns()) == os.path.join(ROOT, "bench-results")
    assert runner._resolve_results_root(ns(commit_results=True)) == \
        os.path.join(ROOT, "benchmarks", "results")
    assert runner._resolve_results_root(ns(results_dir=str(tmp_path))) == str(tmp_path)
    monkeypatch.setenv("PYENCODER_RESULTS_DIR", str(tmp_path))
    assert _common.results_dir() == os.path.join(str(tmp_path), _common.device_slug())
    ignored = _subproc.run(["git", "check-ignore", "-q", "bench-results/x.jsonl"], cwd=ROOT)
    assert ignored.returncode == 0, "bench-results/ must be git-ignored"


def test_conv_cpu_label_is_not_cudnn():
    from benchmarks import bench_conv
    from benchmarks.readme import _conv_provider
    assert bench_conv.CPU_ALIASES["cudnn"] == "torch-conv1d"
    assert _conv_provider({"provider": "cudnn", "device": "cpu-x86-64"}) == "torch-conv1d"
    assert _conv_provider({"provider": "cudnn", "device": "nvidia-h100"}) == "cudnn"


class _Stop(Exception):
    pass


def _rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def test_conv_rows_on_disk_as_measured(monkeypatch, tmp_path):
    """bench_conv appends each row when it is measured: the second case finds the first one's
    row in the file before it starts (a run killed there keeps it)."""
    from benchmarks import bench_conv
    from benchmarks._common import device_slug
    monkeypatch.setenv("PYENCODER_RESULTS_DIR", str(tmp_path))
    monkeypatch.setattr(bench_conv, "copy_bandwidth_gbs", lambda: 1.0)
    path = os.path.join(tmp_path, device_slug(), "conv.jsonl")
    real, seen = bench_conv._record, []

    def record(*a, **k):
        seen.append(_rows(path))
        if len(seen) == 2:
            raise _Stop
        return real(*a, **k)

    monkeypatch.setattr(bench_conv, "_record", record)
    with pytest.raises(_Stop):
        bench_conv.main(["--quick", "--suites", "depthwise"])
    assert seen[0] == [] and len(seen[1]) == 1, seen
    row = seen[1][0]
    assert row["bench"] == "conv" and row["suite"] == "depthwise" and row["median_ms"] > 0
    assert "run_id" in row and _rows(path) == seen[1]
    assert row["fwd_host_us"] is None and row["fwd_graph_ms"] is None   # CUDA only


def test_jsonl_rows_append_extend_iadd(monkeypatch, tmp_path):
    from benchmarks._common import JsonlRows, device_slug
    monkeypatch.setenv("PYENCODER_RESULTS_DIR", str(tmp_path))
    path = os.path.join(tmp_path, device_slug(), "x.jsonl")
    rows = JsonlRows("x", extra={"quick": True})
    assert rows.path is None
    rows.append({"a": 1})
    assert rows.path == path and [r["a"] for r in _rows(path)] == [1]
    rows.extend([{"a": 2}])
    rows += [{"a": 3, "quick": False}]
    got = _rows(path)
    assert [r["a"] for r in got] == [1, 2, 3] and all(r["quick"] is True for r in got)
    assert list(rows) == [{"a": 1}, {"a": 2}, {"a": 3, "quick": False}]
    off = JsonlRows("y", write=False)
    off.append({"a": 1})
    assert off.path is None and len(off) == 1
    assert not os.path.exists(os.path.join(tmp_path, device_slug(), "y.jsonl"))


def test_dispatch_overhead_runs(capsys):
    """benchmarks.bench_dispatch_overhead (CPU microbenchmark) runs end to end and restores what
    it stubs (no assertion on the times: a busy machine makes them anything)."""
    import os

    import pytest
    pytest.importorskip("triton")
    from benchmarks import bench_dispatch_overhead as bdo
    from pyencoder import _backend
    from pyencoder.ops import _attention_triton as A
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction
    launch, select = A.launch, _backend.select
    do_compile, active = JITFunction._do_compile, driver._active
    env = {k: os.environ.get(k) for k in ("PYENCODER_EAGER_FASTPATH",
                                          "PYENCODER_TRITON_AUTOTUNE")}
    import torch
    threads = torch.get_num_threads()
    try:
        bdo.main(["--calls", "40"])
    finally:
        torch.set_num_threads(threads)     # main() pins one thread
    out = capsys.readouterr().out
    assert "eager fast path" in out and "registered triton_op" in out
    assert A.launch is launch and _backend.select is select
    # triton's own launch path: measured outside the interpreter, skipped (said so) under it
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction
    assert "triton launch path" in out
    assert JITFunction._do_compile is do_compile and driver._active is active
    assert {k: os.environ.get(k) for k in env} == env


def test_conv_max_seconds_stops_after_the_first_case(monkeypatch, tmp_path, capsys):
    """--max-seconds 0: the first case (every provider of it) runs, no other case starts."""
    from benchmarks import bench_conv
    monkeypatch.setenv("PYENCODER_RESULTS_DIR", str(tmp_path))
    monkeypatch.setattr(bench_conv, "copy_bandwidth_gbs", lambda: 1.0)
    args = argparse.Namespace(quick=True, providers=None, suites=None, dtype="float32",
                              no_write=True, max_seconds=0.0)
    recs = bench_conv.run(args)
    assert [r["suite"] for r in recs] == ["depthwise", "depthwise"], recs
    assert {r["provider"] for r in recs} == {"torch-conv1d", "reference"}
    assert "--max-seconds 0 reached" in capsys.readouterr().out


def test_conv_quick_gpu_cases_target_first():
    """The quick GPU run measures the depthwise bandwidth target's shape (L=16384) first, for the
    providers it compares, and keeps L=2048; the strided suite runs before update and grouped."""
    import inspect
    from benchmarks import bench_conv
    assert bench_conv.QUICK_DEPTHWISE_LS == (16384, 2048)
    # the target's providers, and the row kernel's A/B (PYENCODER_CONV_ROW=1) beside them
    assert set(bench_conv.QUICK_LONG_PROVIDERS) == {"pyencoder-cuda", "pyencoder-cuda-row",
                                                    "pyencoder-triton", "cudnn"}
    src = inspect.getsource(bench_conv.run)
    order = [src.index(f'if "{s}" in suites') for s in ("depthwise", "strided", "update",
                                                         "grouped")]
    assert order == sorted(order)


def test_conv_row_provider_sets_the_flag_around_each_call(monkeypatch):
    """pyencoder-cuda-row runs pyencoder-cuda's call with PYENCODER_CONV_ROW=1 set while the
    extension launches (it reads the variable per call), restored after; it is the depthwise
    forward only."""
    import os

    import torch
    from benchmarks import bench_conv
    seen = []
    monkeypatch.delenv("PYENCODER_CONV_ROW", raising=False)
    monkeypatch.setattr(bench_conv, "_provider_fn", bench_conv._provider_fn)
    real = bench_conv._provider_fn

    def fake(name, *a, **k):
        if name == "pyencoder-cuda":
            return lambda: seen.append(os.environ.get("PYENCODER_CONV_ROW"))
        return real(name, *a, **k)
    monkeypatch.setattr(bench_conv, "_provider_fn", fake)
    x, w = torch.randn(1, 4, 16), torch.randn(4, 1, 3)
    fn = fake("pyencoder-cuda-row", x, w, None, 1, 4)
    fn()
    assert seen == ["1"] and "PYENCODER_CONV_ROW" not in os.environ
    assert "depthwise forward" in fake("pyencoder-cuda-row", x, w, None, 2, 4)
    assert "depthwise forward" in fake("pyencoder-cuda-row", x, torch.randn(4, 4, 3), None, 1,
                                       1)
    assert "depthwise forward" in fake("pyencoder-cuda-row", x, w, None, 1, 4, True)


@pytest.mark.skipif(not has_triton(), reason="triton is not installed")
def test_convnext_step_rows(monkeypatch):
    """bench_convnext's streaming-step providers compute the same thing (y and the final state),
    and _steps writes a composed and a fused row with its speedup (Triton interpreter)."""
    import torch
    from benchmarks import bench_convnext as bc
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    a = bc._inputs(2, 16, 4, 7, torch.float32, "cpu")
    s = torch.randn(2, 16, 6)
    y0, f0 = bc._composed_step(*a, s)
    y1, f1 = bc._fused_step(*a, s)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f1, f0, rtol=0, atol=0)
    rows = bc._steps([torch.float32], 1, 1, [], shapes=((1, 16, 4),), dev="cpu")
    assert [(r["provider"], r["mode"], r["B"], r["L"]) for r in rows] == \
        [("composed", "step", 1, 4), ("fused", "step", 1, 4)]
    assert all("error" not in r and r["median_ms"] > 0 for r in rows)
    assert rows[1]["speedup_vs_composed"] == rows[0]["median_ms"] / rows[1]["median_ms"]


def test_summary_table_keeps_the_measurements_and_skips_rehearsals(tmp_path):
    """summary.md cut its tables at 12 columns after the configuration: the conv table lost
    every time (a wide configuration plus columns None in every row on a CPU), the reference
    table its speedup; a profile's nested fields filled cells; a --dry-run's interpreter timings
    were summarised as results."""
    from benchmarks.summarize import summarize, table
    recs = [dict(bench="conv", provider=p, B=1, C=64 * i, L=1000, k=4, groups=i, stride=1,
                 mode="fwd", dtype="float32", layout="ncl", host_us=None, graph_ms=None,
                 extra_cfg=i, median_ms=0.5 * i + (p == "torch"), gb_per_s=10.0 * i,
                 top_ops=[{"name": "x"}]) for i in (1, 2) for p in ("ours", "torch")]
    head = table(recs).splitlines()[0]
    assert "median_ms" in head and "gb_per_s" in head
    assert "host_us" not in head and "graph_ms" not in head and "top_ops" not in head
    path = tmp_path / "profile_attention.jsonl"
    rows = [dict(bench="p", case="dry", ms=1.0, dry_run=True),
            dict(bench="p", case="b1", ms=2.0), dict(bench="p", case="b2", ms=3.0)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text = open(summarize(str(tmp_path))).read()
    assert "| b1 |" in text and "| b2 |" in text
    assert "dry" not in text.split("## profile_attention")[1]


def test_readme_renderer_has_a_help_and_a_check():
    """`python -m benchmarks.readme --help` rewrote README.md instead of printing help."""
    r = _subproc.run([sys.executable, "-m", "benchmarks.readme", "--help"], cwd=ROOT,
                     timeout=300)
    assert r.returncode == 0 and "--check" in r.stdout
