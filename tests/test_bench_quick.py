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
