"""benchmarks/sass_stats.py: a real sm_90 compile of one attention launch, disassembled, and the
statistics it reports (a launch variant that spills must show it)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("triton")


def test_sass_stats_frame_case(tmp_path):
    from benchmarks import sass_stats as ss
    try:
        ss.cuobjdump()
    except SystemExit as e:
        pytest.skip(str(e))
    out = tmp_path / "rows.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "benchmarks.sass_stats", "--case", "frame",
                        "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    import json
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["kernel"] for x in rows] == ["_interval_attention_fwd_kernel"]
    row = rows[0]
    assert row["constexprs"]["K_BLOCK"] == 1 and row["num_warps"] in (4, 8)
    assert 0 < row["registers"] <= 255 and row["instructions"] > 500
    assert row["HGMMA"]["HGMMA"] > 0                       # sm_90 tensor-core path
    assert any(k.endswith(".128") for k in row["LDGSTS"])  # 16-byte async copies (aligned)
    assert row["spill_stores"] >= 0 and "fwd_kernel" in r.stdout
