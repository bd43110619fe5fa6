"""benchmarks/bench_wavlm_bias.py (issue 15's CPU numbers: causal WavLM with the fused relative
bias vs the relpos path before it) and the README renderers of the extension benchmarks. A tiny run
checks the rows and that a wrong path stops the benchmark before any timing; no timing is
asserted."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import bench_wavlm_bias as bw  # noqa: E402
from benchmarks import readme  # noqa: E402


def test_rows_ratios_and_checks():
    recs = bw.run(seconds=0.4, layers=1, reps=1)
    timed = {(r["mode"], r["path"]): r for r in recs if "s_per_audio_s" in r}
    assert set(timed) == {(m, p) for m in ("offline", "streaming_80ms")
                          for p in ("fused", "before")}
    for r in timed.values():
        assert r["s_per_audio_s_min"] <= r["s_per_audio_s"] <= r["s_per_audio_s_max"]
        # float32 summation order only
        assert 0 <= r["max_abs_diff_stream_vs_offline"] < 1e-4
    ratios = {r["mode"]: r for r in recs if r["path"] == "ratio_before_over_fused"}
    assert set(ratios) == {"offline", "streaming_80ms"}
    for mode, r in ratios.items():
        want = timed[(mode, "before")]["s_per_audio_s"] / timed[(mode, "fused")]["s_per_audio_s"]
        assert r["ratio"] == pytest.approx(want)
        assert 0 < r["max_abs_diff_fused_vs_before"] < 1e-4   # two paths: not bit-identical
    text = readme.wavlm_bias(recs)
    assert "| streaming 80ms | fused |" in text and "x |" in text


def test_a_wrong_stream_gives_no_number(monkeypatch):
    real = bw._stream

    def off_by_a_little(model, wav, chunk):
        return real(model, wav, chunk) + 1e-2
    monkeypatch.setattr(bw, "_stream", off_by_a_little)
    with pytest.raises(AssertionError, match="streamed vs offline"):
        bw.run(seconds=0.2, layers=1, reps=1)


def test_paths_that_disagree_give_no_number(monkeypatch):
    real, delta = bw.set_fused, {}

    def fused_path_perturbed(model, fused):
        """The fused path runs with a perturbed bias table (not a constant shift per head:
        softmax ignores that), the path before with the model's own."""
        real(model, fused)
        w = model.layers[0].attention.rel_attn_embed.weight
        with torch.no_grad():
            if fused:
                delta["d"] = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
                w.add_(delta["d"])
            elif "d" in delta:
                w.sub_(delta.pop("d"))
    monkeypatch.setattr(bw, "set_fused", fused_path_perturbed)
    with pytest.raises(AssertionError, match="fused vs before"):
        bw.run(seconds=0.2, layers=1, reps=1)


def test_runner_runs_it_on_a_cpu():
    from benchmarks import __main__ as runner
    (entry,) = [b for b in runner.BENCHES if b[0] == "bench_wavlm_bias"]
    assert entry[1:3] == (True, False)


def _ext_rows(graph):
    base = dict(suite="sink", mask="band(250, 3) sink=4", N=1500, Nq=1500, Nk=1500, rope=False,
                dtype="bfloat16")
    ours = dict(base, provider="pyencoder-triton", fwd_ms=0.1, fwdbwd_ms=0.4)
    flex = dict(base, provider="flex", fwd_ms=0.2, fwdbwd_ms=0.3)
    ratio = dict(base, provider="ratio", vs="flex", **{"pyencoder-triton_fwd_x": 2.0,
                                                       "pyencoder-triton_fwdbwd_x": 0.75})
    if graph:
        ours.update(fwd_graph_ms=0.05, fwdbwd_graph_ms=0.2)
        flex.update(fwd_graph_ms=0.15, fwdbwd_graph_ms=0.3)
        ratio.update({"pyencoder-triton_fwd_graph_x": 3.0, "pyencoder-triton_fwdbwd_graph_x": 1.5})
    return [ours, flex, ratio]


@pytest.mark.parametrize("graph", [False, True])
def test_readme_attention_ext(graph):
    text = readme.attention_ext(_ext_rows(graph))
    lines = [x for x in text.splitlines() if x.startswith("| sink")]
    assert len(lines) == 2                        # the ratio row is folded into ours
    ours = [c.strip() for c in lines[0].strip("|").split("|")]
    assert "2.00x" in ours and "0.75x" in ours
    assert ("3.00x" in ours and "1.50x" in ours) == graph
    assert lines[1].count("–") >= 2               # Flex against itself: no ratio


def test_readme_convnext():
    recs = [dict(provider="composed", mode="fwd", B=8, C=768, L=2048, k=7, dtype="bfloat16",
                 median_ms=0.08, gb_per_s=650.0, frac_of_copy=0.22),
            dict(provider="fused", mode="fwd", B=8, C=768, L=2048, k=7, dtype="bfloat16",
                 median_ms=0.12, gb_per_s=410.0, frac_of_copy=0.14, speedup_vs_composed=0.63)]
    text = readme.convnext(recs)
    assert "| fused | fwd | bfloat16 | B=8 C=768 L=2048 k=7 | 0.1200 | 410 | 14 | 0.63x |" in text
