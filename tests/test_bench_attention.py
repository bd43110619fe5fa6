"""benchmarks/bench_attention.py's anchors on the CPU, tiny shapes, the ``eager`` compile backend
(Dynamo traces exactly as with Inductor; only the code generation is skipped, so a test costs
seconds): Flex compiles at most two graphs per case (inference, training) across several
(N, mask) cases in a row, never recompiles in the timed calls and never takes the unfused path;
a run that does raises CompiledAnchorError. Also the attention-only rows and the first-call
record (a fresh process)."""
import math
import os
import time

import pytest
import torch

ba = pytest.importorskip("benchmarks.bench_attention")


from conftest import needs_flex  # noqa: E402
_CASES = [(48, ("band", 8, 2)), (64, ("chunked", 4, 2, 3)), (40, ("band", None, 0)),
          (56, ("band", 5, 1))]


def _run(name, n, m, rope=True):
    # FlexAttention has no CPU backward: its rows are forward-only here
    return ba.measure(name, "tiny", 1, 2, 16, n, m, torch.float32, "cpu", 1, 1, 1.0,
                      rope=rope, compile_backend="eager", grad=name != "flex")


@needs_flex
def test_flex_compiles_once_per_case_and_never_falls_back():
    # 4 cases against a recompile limit of 2: only the per-case reset keeps every case compiled
    old = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = 2
    try:
        for n, m in _CASES:
            rec = _run("flex", n, m)
            assert "error" not in rec and "skipped" not in rec, rec
            assert rec["graphs"] == 1, rec      # forward only: the inference graph
            assert rec["fwd_ms"] > 0 and rec["rope"] is True
    finally:
        torch._dynamo.config.recompile_limit = old


@needs_flex
def test_shared_compiled_function_would_fail(monkeypatch):
    """Without the per-case reset the cases share Dynamo's cache entry: past the recompile limit
    the run stops with CompiledAnchorError (fullgraph), it does not time a fallback."""
    monkeypatch.setattr(ba.torch._dynamo, "reset", lambda: None)
    # Dynamo's own patch (monkeypatch's setattr / restore of a config entry left it hidden in a
    # torch without Triton: every later compile failed on a missing recompile_limit)
    with torch._dynamo.config.patch(recompile_limit=2), pytest.raises(ba.CompiledAnchorError):
        for n, m in _CASES:
            _run("flex", n, m)


class _GraphRecorder(ba._Compiler):
    """The eager backend, keeping each compiled graph's code and its subgraphs' (the mask_mod and
    score_mod Flex inlines into its kernels), and the constants the graph holds."""

    def __init__(self):
        super().__init__("eager")
        self.codes = []

    def _compile_graph(self, gm, example_inputs):
        subs = tuple(sorted((name, mod.code) for name, mod in gm.named_children()))
        consts = [n.target for n in gm.graph.nodes
                  if n.op == "get_attr" and not isinstance(getattr(gm, n.target), torch.nn.Module)]
        self.codes.append((gm.code, subs, consts))
        return super()._compile_graph(gm, example_inputs)


@needs_flex
@pytest.mark.parametrize("rope", [False, True])
def test_flex_masks_of_one_n_share_one_graph(rope):
    """Every mask at one N traces the same graph (its mask parameters are graph inputs, not
    constants baked into the code): what Inductor's FX graph cache and Triton's cache key on, so a
    GPU run compiles Flex once per (N, RoPE), not once per mask. Outputs still follow each mask."""
    import pyencoder
    n = 48
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    r = pyencoder.Rope(16) if rope else None
    codes = []
    for m in (("band", 8, 2), ("chunked", 4, 2, 3), ("band", None, 0), ("band", 5, 1)):
        rec = _GraphRecorder()
        got = ba.make_provider("flex", q, k, v, m, r, rec)()
        want = ba.make_provider("reference", q, k, v, m, r)()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert len(rec.codes) == 1 and rec.codes[0][2] == [], rec.codes
        codes.append(rec.codes[0])
    assert all(c == codes[0] for c in codes[1:])
    assert "flex_attention" in codes[0][0]


@needs_flex
def test_flex_with_gradients_on_cpu_is_skipped():
    rec = ba.measure("flex", "tiny", 1, 2, 16, 48, ("band", 8, 2), torch.float32, "cpu", 1, 1,
                     1.0, compile_backend="eager")
    assert "no backward on CPU" in rec["skipped"]


@needs_flex
def test_flex_matches_reference():
    import pyencoder
    from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    n, m = 48, ("band", 8, 2)
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    torch._dynamo.reset()
    rope = pyencoder.Rope(16)
    want = ba.make_provider("reference", q, k, v, m, rope)()
    got = ba.make_provider("flex", q, k, v, m, rope, ba._Compiler("eager"))()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_flex
def test_unfused_flex_raises(monkeypatch):
    # a "compiler" that does not compile: Flex runs eagerly, i.e. unfused
    monkeypatch.setattr(ba._Compiler, "__call__", lambda self, fn: fn)
    with pytest.raises(ba.CompiledAnchorError):
        _run("flex", 48, ("band", 8, 2))


@needs_flex
def test_recompile_in_timed_region_raises(monkeypatch):
    # inputs whose shape changes after the warm-up calls: the timed calls would recompile
    calls = {"n": 0}
    real = ba.make_provider

    def shifting(name, q, k, v, m, rope, compiler=None):
        fn = real(name, q, k, v, m, rope, compiler)
        compiled = compiler(lambda x: x * 2)
        sizes = iter(range(3, 10**6))

        def run():
            calls["n"] += 1
            out = fn()
            if calls["n"] > 3:
                compiled(torch.randn(next(sizes)))
            return out
        return run

    monkeypatch.setattr(ba, "make_provider", shifting)
    with pytest.raises(ba.CompiledAnchorError):
        _run("flex", 48, ("band", 8, 2))


def test_sdpa_anchor_compiles_rope_with_attention():
    rec = _run("sdpa-mask", 40, ("band", 8, 2))
    assert "error" not in rec, rec
    assert rec["compiled"] == "eager" and rec["graphs"] == 2   # inference and training
    assert rec["fwdbwd_ms"] > 0


def test_attention_only_rows():
    for name in ("reference", "sdpa-mask"):
        rec = _run(name, 40, ("chunked", 4, 2, 3), rope=False)
        assert rec["rope"] is False and "error" not in rec and rec["fwd_ms"] > 0
    # without RoPE the sdpa anchor is the plain call: nothing compiled
    assert rec["graphs"] == 0 and rec["compiled"] is None


def test_first_call_record_in_fresh_process():
    rec = ba.first_call("reference", "tiny", 1, 2, 16, 40, ("band", 8, 2), torch.float32, "cpu",
                        "auto", rope=True, compile_backend="eager", timeout=600)
    assert "error" not in rec, rec
    assert rec["bench"] == "attention-first-call" and rec["autotune"] is None
    for key in ("first_fwd_s", "first_bwd_s", "first_fwdbwd_s", "second_fwd_ms"):
        assert math.isfinite(rec[key]) and rec[key] > 0
    assert rec["first_fwdbwd_s"] >= rec["first_fwd_s"]


def test_bad_compile_backend_is_named():
    with pytest.raises(ValueError, match="compile_backend"):
        ba._Compiler("cudagraphs")


class _Stop(Exception):
    pass


def _rows(path):
    import json
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_rows_on_disk_as_measured(monkeypatch, tmp_path, capsys):
    """A run cut after its first case (the time box's SIGTERM/SIGKILL) keeps that case's row:
    the second case checks the file before it starts, then stops the run."""
    from benchmarks._common import device_slug
    monkeypatch.setenv("PYENCODER_RESULTS_DIR", str(tmp_path))
    monkeypatch.setattr(ba, "copy_bandwidth_gbs", lambda: 1.0)
    path = tmp_path / device_slug() / "attention.jsonl"
    real, seen = ba.measure, []

    def measure(name, *args, **kw):
        seen.append(_rows(path))
        if len(seen) == 2:
            raise _Stop
        return real(name, *args, **kw)

    monkeypatch.setattr(ba, "measure", measure)
    with pytest.raises(_Stop):
        ba.main(["--quick", "--n", "48", "--providers", "reference", "sdpa-mask"])
    assert seen[0] == []
    assert len(seen[1]) == 1, seen[1]
    row = seen[1][0]
    assert row["provider"] == "reference" and row["N"] == 48 and row["fwd_ms"] > 0
    assert row["bench"] == "attention" and row["mask"] == "band(50, 3)" and "run_id" in row
    assert "reference" in capsys.readouterr().out      # the printed line came with it
    assert _rows(path) == seen[1]


def test_no_write_writes_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("PYENCODER_RESULTS_DIR", str(tmp_path))
    monkeypatch.setattr(ba, "copy_bandwidth_gbs", lambda: 1.0)
    monkeypatch.setattr(ba, "measure", lambda name, *a, **k: {"provider": name, "skipped": "x"})
    assert ba.main(["--quick", "--n", "48", "--providers", "reference", "--no-write"]) == 0
    assert not any(tmp_path.rglob("*.jsonl"))


def test_host_us_and_graph_ms_on_cpu():
    from benchmarks import _common
    calls = []

    def fn():
        calls.append(1)
        return torch.randn(64, 64) @ torch.randn(64, 64)

    us = _common.host_us(fn, calls=7, repeats=3, budget_ms=1e6)
    assert isinstance(us, float) and math.isfinite(us) and us > 0
    assert len(calls) == 2 + 7 * 3            # a warm-up and a probe call, then 3 x 7
    calls.clear()

    def slow():
        calls.append(1)
        time.sleep(0.01)
    us = _common.host_us(slow, calls=20, repeats=2, budget_ms=45)   # at most 2 calls per repeat
    assert len(calls) in (2 + 1 * 2, 2 + 2 * 2) and us >= 1e4
    assert _common.graph_ms(fn) is None
    assert _common.host_graph_fields(fn) == {"fwd_host_us": None, "fwd_graph_ms": None}


def test_failed_capture_is_recorded_not_raised(monkeypatch):
    from benchmarks import _common
    monkeypatch.setattr(_common.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_common.torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(_common, "host_us", lambda fn: 123.4)

    def boom(fn, warmup, rep):
        raise RuntimeError("operation not permitted when stream is capturing\nsecond line")
    monkeypatch.setattr(_common, "graph_ms", boom)
    rec = _common.host_graph_fields(lambda: None)
    assert rec == {"fwd_host_us": 123.4, "fwd_graph_ms": None,
                   "fwd_graph_error": "RuntimeError: operation not permitted when stream is "
                                      "capturing"}
    assert _common.host_graph_text(rec) == "  host 123 us  graph failed"
    assert _common.host_graph_text({"fwd_host_us": 123.4, "fwd_graph_ms": 0.0451}) == \
        "  host 123 us  graph 0.045 ms"
    assert _common.host_graph_text({"fwd_host_us": None, "fwd_graph_ms": None}) == ""


def test_attention_rows_carry_host_and_graph_fields_none_on_cpu():
    rec = _run("reference", 40, ("band", 8, 2))
    assert "error" not in rec, rec
    assert rec["fwd_host_us"] is None and rec["fwd_graph_ms"] is None
    assert "fwd_graph_error" not in rec


def test_masks_argument_and_rope_variant_rows(monkeypatch, tmp_path):
    """--masks parses band:L:R / chunked:C:L:A (None = unbounded); rope-off rows run
    pyencoder-triton once, not its RoPE-mode variants."""
    assert ba.parse_mask("band:None:0") == ("band", None, 0)
    assert ba.parse_mask("chunked:4:128:3") == ("chunked", 4, 128, 3)
    for bad in ("band:1", "banded:1:2", "chunked:4:x:3", "band:1:2:3"):
        with pytest.raises(ValueError, match="--masks"):
            ba.parse_mask(bad)
    monkeypatch.setenv("PYENCODER_RESULTS_DIR", str(tmp_path))
    monkeypatch.setattr(ba, "copy_bandwidth_gbs", lambda: 1.0)
    seen = []

    def fake(name, shape, B, H, D, n, m, *a, rope=True, **k):
        seen.append((name, m, rope))
        return {"provider": name, "skipped": "fake"}
    monkeypatch.setattr(ba, "measure", fake)
    provs = ["pyencoder-triton", "pyencoder-triton-ropetable", "pyencoder-triton-prerot"]
    assert ba.main(["--n", "48", "--masks", "band:None:0", "chunked:4:128:3", "--rope", "both",
                    "--providers", *provs, "--no-write"]) == 0
    masks = [("band", None, 0), ("chunked", 4, 128, 3)]
    assert seen == [(p, m, True) for m in masks for p in provs] + \
        [("pyencoder-triton", m, False) for m in masks]
    with pytest.raises(SystemExit):
        ba.main(["--masks", "band:x:0", "--no-write"])


def test_rope_variant_environment_is_set_and_restored(monkeypatch):
    monkeypatch.setenv("PYENCODER_ROPE_MODE", "kernel")
    monkeypatch.delenv("PYENCODER_ROPE_TABLE", raising=False)
    with ba._rope_table_env("pyencoder-triton-prerot"):
        assert os.environ["PYENCODER_ROPE_MODE"] == "pre"
    with ba._rope_table_env("pyencoder-triton-ropetable"):
        assert os.environ["PYENCODER_ROPE_MODE"] == "table"
        assert os.environ["PYENCODER_ROPE_TABLE"] == "1"
    with ba._rope_table_env("pyencoder-triton"):
        assert os.environ["PYENCODER_ROPE_MODE"] == "kernel"
    assert os.environ["PYENCODER_ROPE_MODE"] == "kernel" and "PYENCODER_ROPE_TABLE" not in os.environ


def test_tuned_tiles_and_autotune_option(monkeypatch):
    """A tuned run's rows name the tile the autotuner chose last per kernel and mode; --autotune
    sets PYENCODER_TRITON_AUTOTUNE for the run."""
    import types

    import pytest
    triton = pytest.importorskip("triton")
    from benchmarks import bench_attention as ba
    from pyencoder.ops import _attention_triton as A
    cfg = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)
    old = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3)
    tuner = types.SimpleNamespace(cache={"key0": old, "key1": cfg})
    monkeypatch.setattr(A, "_kernels", {"fwd": (None, [], {"full": tuner,
                                                           "auto": types.SimpleNamespace()}),
                                        "dq": (None, [], None)})
    assert ba.tuned_tiles() == {"fwd/full": "64x32 w4 s2"}
    monkeypatch.delenv("PYENCODER_TRITON_AUTOTUNE", raising=False)
    ba.main(["--autotune", "full", "--n", "16", "--providers", "reference", "--no-write",
             "--masks", "band:2:1"])
    import os
    assert os.environ["PYENCODER_TRITON_AUTOTUNE"] == "full"
    monkeypatch.delenv("PYENCODER_TRITON_AUTOTUNE")


def test_compiled_pyencoder_provider_matches_reference_and_compiles_once():
    """pyencoder-triton-compiled: our call under torch.compile (fullgraph) like the compiled
    anchors: matches the reference, compiles one graph per mode (inference, training) and never
    recompiles while timed; on the CPU the triton_op stays whole in the graph (interpreter)."""
    pytest.importorskip("triton")
    import pyencoder
    n, m = 48, ("band", 8, 2)
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    rope = pyencoder.Rope(16)
    want = ba.make_provider("reference", q, k, v, m, rope)()
    got = ba.make_provider("pyencoder-triton-compiled", q, k, v, m, rope,
                           ba._Compiler("eager"))()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for n, m in _CASES[:2]:
        rec = _run("pyencoder-triton-compiled", n, m)
        assert "error" not in rec and "skipped" not in rec, rec
        assert rec["graphs"] == 2 and rec["compiled"] == "eager", rec   # inference, training
        assert rec["fwd_ms"] > 0 and rec["fwdbwd_ms"] > 0 and rec["rope_mode"] == "auto"


def test_compiled_pyencoder_failure_is_a_row_error_not_a_broken_anchor(monkeypatch):
    """A compile failure of our own compiled provider is recorded in its row (the run goes on);
    the same failure of an anchor stops the run (no ratio against a broken anchor)."""
    err = ba.CompiledAnchorError("boom")
    assert ba._anchor_failure("pyencoder-triton-compiled", err) is None
    assert ba._anchor_failure("flex", err) is err
    rec = ba.record_failure({}, "pyencoder-triton-compiled", RuntimeError("x"), "cpu")
    assert rec["error"].startswith("RuntimeError")
