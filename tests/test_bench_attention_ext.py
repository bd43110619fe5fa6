"""benchmarks/bench_attention_ext.py (fused WavLM bias, sink keys, frame-rate cross-attention vs
FlexAttention) in its CPU / --dry-run form: every suite runs end to end in seconds and writes its
records and ratio rows; each provider is checked against the float32 reference before timing, so
a deliberately wrong anchor mask_mod, a wrong score_mod or a wrong kernel output stops the run
with CheckError instead of writing a number. No wall-clock assertions."""
import json
import os
import sys

import pytest
import torch

import _subproc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from conftest import has_triton  # noqa: E402
be = pytest.importorskip("benchmarks.bench_attention_ext")


from conftest import needs_flex  # noqa: E402
_SHAPE = ("tiny", 1, 2, 16)


def _measure(name, suite, spec, n=48, grad=True):
    return be.measure(name, suite, spec, _SHAPE, n, torch.float32, "cpu", 0, 0, grad, "eager")


@needs_flex
def test_dry_run_writes_every_suite_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("PYENCODER_RESULTS_DIR", str(tmp_path))
    # the interpreter case has its own test (unsetting TRITON_INTERPRET instead would let a
    # kernel module imported now be built for a GPU, breaking later interpreter tests)
    monkeypatch.setattr(be, "_interpreting", lambda: False)
    assert be.main(["--dry-run"]) == 0
    (path,) = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path) for f in fs
               if f == "attention_ext.jsonl"]
    recs = [json.loads(x) for x in open(path)]
    for suite in be.SUITES:
        rows = [r for r in recs if r["suite"] == suite]
        assert {r["mask"] for r in rows} == {be.mask_name(s) for s in be.CPU_CASES[suite]}
        provs = {r["provider"] for r in rows}
        assert set(be.CPU_PROVIDERS[suite]) | {"ratio"} == provs, (suite, provs)
        for r in rows:
            assert "error" not in r and "skipped" not in r, r
            if r["provider"] == "ratio":
                assert r["vs"] == "flex" and any(k.endswith("_fwd_x") for k in r), r
                continue
            assert r["fwd_ms"] > 0 and r["check_err"]["out"] <= be.TOL[torch.float32][0], r
            if r["provider"] != "flex":         # Flex has no CPU backward: forward rows only
                assert r["fwdbwd_ms"] > 0 and "dq" in r["check_err"] and "dv" in r["check_err"]
            if suite == "bias" and r["provider"] != "flex":
                assert {"dtable", "dgate"} <= set(r["check_err"]), r
    frame = [r for r in recs if r["suite"] == "frame" and r["provider"] == "reference"]
    assert {(r["Nq"], r["Nk"]) for r in frame} == {(96, 48), (256, 48)}


@needs_flex
@pytest.mark.parametrize("suite,spec", [("sink", ("band", 12, 3, 4)),
                                        ("frame", ("frames", 16, 3, 3, 2)),
                                        ("bias", ("chunked", 4, 2, 3))])
def test_wrong_anchor_mask_stops_the_run(monkeypatch, suite, spec):
    right = be.mask_mod_for

    def off_by_one(s, *a):                  # one key too many past hi(p)
        mod = right(s, *a)
        return lambda b, h, qi, kj: mod(b, h, qi, kj) | mod(b, h, qi, kj - 1)
    rec = _measure("flex", suite, spec)
    assert rec["check_err"]["out"] < 1e-4
    monkeypatch.setattr(be, "mask_mod_for", off_by_one)
    with pytest.raises(be.CheckError, match="out differs from the float32 reference"):
        _measure("flex", suite, spec)


@needs_flex
def test_wrong_score_mod_stops_the_run(monkeypatch):
    right = be.bias_score_mod
    monkeypatch.setattr(be, "bias_score_mod", lambda gate, cols, r0: right(gate, cols, r0 + 1))
    with pytest.raises(be.CheckError, match="flex: out"):
        _measure("flex", "bias", ("band", 12, 3))
    monkeypatch.setattr(be, "bias_score_mod", lambda gate, cols, r0: right(gate * 0, cols, r0))
    with pytest.raises(be.CheckError):
        _measure("flex", "bias", ("band", 12, 3))


def test_wrong_kernel_gradient_stops_the_run(monkeypatch):
    """A provider whose table gradient is wrong (here: the unfused path with the bias table's
    gradient scaled) fails the check even when its output is right."""
    class _Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return 1.5 * g

    right = be.make_provider

    def wrong(name, suite, spec, leaves, compiler):
        if name != "unfused":
            return right(name, suite, spec, leaves, compiler)
        from pyencoder.nn.relpos import biased_interval_attention
        m = be.interval_mask(spec)
        return lambda: biased_interval_attention(
            leaves["q"], leaves["k"], leaves["v"], leaves["gate"], _Scale.apply(leaves["table"]),
            be._bucket, mask=m, fused=False)
    monkeypatch.setattr(be, "make_provider", wrong)
    with pytest.raises(be.CheckError, match="unfused: dtable"):
        _measure("unfused", "bias", ("band", 12, 3))


def test_check_names_tensor_error_and_tolerance():
    ref = torch.randn(4, 8)
    assert be.check("p", {"out": ref + 1e-7}, {"out": ref}, torch.float32)["out"] < 1e-5
    with pytest.raises(be.CheckError, match=r"p: dq .*relative RMS error .* > tolerance 0.02"):
        be.check("p", {"dq": ref * 1.1}, {"dq": ref}, torch.bfloat16)
    with pytest.raises(be.CheckError, match="inf"):
        be.check("p", {"out": ref * float("nan")}, {"out": ref}, torch.float16)


def test_masks_match_pyencoder_masks():
    """The Flex mask_mods (written from the definitions) and pyencoder's IntervalMask agree on
    every CPU and GPU case (at small sizes): the anchors compute the same function."""
    for suite in be.SUITES:
        for spec in be.CPU_CASES[suite] + be.CASES[suite]:
            nq, nk = be.sizes(spec, 96 if spec[0] == "frames" else 300)
            qi, kj = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
            got = be.mask_mod_for(spec)(0, 0, qi, kj)
            want = be.interval_mask(spec).dense(nq, nk)
            assert torch.equal(got, want), spec


@pytest.mark.skipif(not has_triton(), reason="triton is not installed")
def test_triton_interpreter_case_is_checked(tmp_path):
    """Under TRITON_INTERPRET=1 the dry run adds pyencoder-triton at the first case of each suite,
    checked (output and every gradient) against the reference; in its own process, as the GPU
    session's dry run runs it."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYENCODER_RESULTS_DIR=str(tmp_path))
    r = _subproc.run([sys.executable, "-m", "benchmarks.bench_attention_ext", "--dry-run"],
                     cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (path,) = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs
               if f == "attention_ext.jsonl"]
    tri = [json.loads(x) for x in open(path) if '"pyencoder-triton"' in x]
    assert sorted(r["suite"] for r in tri) == sorted(be.SUITES), tri
    for r in tri:
        assert r["untimed"] and "dq" in r["check_err"] and "dv" in r["check_err"], r
        assert max(r["check_err"].values()) <= be.TOL[torch.float32][0], r


def test_bad_arguments_are_refused():
    for argv in (["--n", "0"], ["--suites", "nope"]):
        with pytest.raises(SystemExit) as e:
            be.main(argv)
        assert e.value.code == 2


def test_quick_run_leaves_it_out():
    """`python -m benchmarks --quick` does not run it (a Flex compile per case: not cheap); a full
    run does on a GPU only (the CPU form is a rehearsal, not a measurement)."""
    from benchmarks import __main__ as runner
    (entry,) = [b for b in runner.BENCHES if b[0] == "bench_attention_ext"]
    assert entry[1:3] == (False, True)
    assert "bench_attention_ext" in runner.NOT_QUICK


def test_visible_pairs_counts_the_dense_mask():
    for suite in be.SUITES:
        for spec in be.CPU_CASES[suite] + be.CASES[suite]:
            nq, nk = be.sizes(spec, 96 if spec[0] == "frames" else 300)
            want = int(be.interval_mask(spec).dense(nq, nk).sum())
            assert be.visible_pairs(spec, nq, nk) == want, spec


@needs_flex
@pytest.mark.parametrize("suite", ["sink", "bias"])
def test_cases_of_one_size_share_one_flex_graph(suite):
    """The sink and bias suites' cases at one N trace the same graph (mask integers are graph
    inputs; the bias anchor gathers the columns of every offset of the call, not of the mask's
    window), so a GPU run compiles Flex once per suite and size: what Inductor's and Triton's
    caches key on. Outputs still follow each case."""
    import test_bench_attention as tba
    codes = []
    for spec in be.CPU_CASES[suite]:
        rec = tba._GraphRecorder()
        leaves = be.make_leaves(suite, spec, 1, 2, 16, 48, torch.float32, "cpu", False)
        got = be.make_provider("flex", suite, spec, leaves, rec)()
        want = be.reference_result(suite, spec, leaves, False, None)["out"]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert len(rec.codes) == 1 and rec.codes[0][2] == [], rec.codes
        codes.append(rec.codes[0])
    assert codes[0] == codes[1]
