"""benchmarks/bench_streaming.py: the GPU path's logic runs on CPU (--dry-run) and writes nothing;
the concurrent-streams search finds the largest batch within budget."""
import os
import sys

import pytest

import _subproc

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
    assert "dry run: nothing written" in r.stdout
    assert _listing(results) == before


@pytest.mark.parametrize("limit", [0, 1, 5, 31, 100, 257, 300, 2500, 16384, 20000])
def test_search_streams(limit):
    from benchmarks.bench_streaming import search_streams
    seen = []

    def measure(b):
        seen.append(b)
        return None if b > 5000 else 10.0 * b / max(limit, 1) if limit else 1e9

    got, capped = search_streams(measure, 10.0, start=256, max_batch=16384)
    want = min(limit, 5000)
    assert capped is False
    assert want - max(1, want // 32) <= got <= want, (got, want)
    assert len(seen) < 30
    got, capped = search_streams(lambda b: 1.0, 10.0, start=256, max_batch=1000)
    assert (got, capped) == (1000, True)
