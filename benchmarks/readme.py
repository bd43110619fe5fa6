"""Render the README's results section from the committed JSON lines.

    python -m benchmarks.readme            # rewrites README.md between the GENERATED markers

Every number shown comes from benchmarks/results/<device>/*.jsonl (newest run of each file), with
the device, versions, commit and date it was measured with. A device folder only appears if it has
results: GPU rows exist only where a GPU run was committed.
"""
import glob
import os

from benchmarks.summarize import _latest_run, load

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BEGIN, END = "<!-- BEGIN GENERATED: results -->", "<!-- END GENERATED: results -->"


def _f(v, nd=1):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _meta(recs):
    r = recs[0]
    quick = ", a `--quick` run (fewer steps / reps)" if all(x.get("quick") for x in recs) else ""
    return (f"*{r.get('device_name') or r.get('device')}, torch {r.get('torch')}, "
            f"triton {r.get('triton')}, commit {r.get('commit')}, {str(r.get('date', ''))[:10]}"
            f"{quick}*")


def _full_runs(recs):
    """A `--quick` run's rows beside a full run's of the same results: the full run's only (a
    quick run at one commit replaced or joined the full rows: 2 layers and 1 s of audio under a
    12-layer header)."""
    full = [r for r in recs if not r.get("quick")]
    return full if full and len(full) < len(recs) else recs


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def reference_cpu(recs):
    rows = [[str(r["N"]), r["provider"], _f(r.get("median_ms")), _f(r.get("peak_mem_mb")),
             _f(r.get("output_mb"))] for r in recs if r.get("provider") != "ratio"
            and "median_ms" in r]
    rows += [[str(r["N"]), r["provider"], r["skipped"], "", ""] for r in recs if "skipped" in r]
    ratios = [f"N={r['N']}: reference {r['speedup']:.2f}x faster, {r['memory_ratio']:.1f}x less "
              f"peak memory ({r['workspace_ratio']:.1f}x less beyond the output)"
              for r in recs if r.get("provider") == "ratio"]
    return ("Offline banded attention on CPU, B=1 H=12 D=64 left=250 right=3 fp32, RoPE on both "
            "sides: the reference path vs SDPA with a dense mask.\n\n"
            + _table(["N", "provider", "median ms", "peak MB", "output MB"], rows) + "\n\n"
            + "; ".join(ratios))


def _flex_ratio(r, recs, key="fwd_graph_ms"):
    """Flex's GPU time (CUDA-graph replay, ``key``) over this row's, same shape, N, mask, RoPE."""
    if r.get("provider") == "flex" or not r.get(key):
        return "–"
    for f in recs:
        if (f.get("provider") == "flex" and f.get(key) and
                all(f.get(k) == r.get(k) for k in ("shape", "N", "mask", "rope", "dtype"))):
            return f"{f[key] / r[key]:.2f}x"
    return "–"


def attention(recs):
    graph = any(r.get("fwd_graph_ms") for r in recs)
    rows = [[r.get("shape", ""), str(r["N"]), r["mask"], "on" if r.get("rope", True) else "off",
             r["provider"] + (f" (autotune {r['triton_autotune']})"
                              if r.get("triton_autotune") else ""), r.get("dtype", ""),
             _f(r.get("fwd_ms"), 2), _f(r.get("bwd_ms"), 2), _f(r.get("fwdbwd_ms"), 2),
             _f(r.get("fwd_tflops"), 3)]
            + ([_f(r.get("fwd_graph_ms"), 3), _f(r.get("fwd_host_us"), 0), _flex_ratio(r, recs)]
               if graph else [])
            + ([_f(r.get("fwdbwd_graph_ms"), 3), _flex_ratio(r, recs, "fwdbwd_graph_ms")]
               if any(x.get("fwdbwd_graph_ms") for x in recs) else [])
            for r in recs if "fwd_ms" in r]
    first = [[r.get("shape", ""), str(r["N"]), r["mask"], "on" if r.get("rope", True) else "off",
              r["provider"], str(r.get("autotune") or "–"), _f(r.get("first_fwd_s"), 1),
              _f(r.get("first_fwdbwd_s"), 1), _f(r.get("second_fwd_ms"), 2)]
             for r in recs if "first_fwd_s" in r]
    text = ("Banded / chunked attention (median ms); RoPE on: counted in every provider (fused in "
            "ours, compiled with the attention call in the anchors); off: attention only."
            + (" fwd, bwd, fwd+bwd: triton.testing.do_bench per call (host launch time included "
               "where it exceeds the kernels'); fwd graph: the forward replayed from a CUDA graph "
               "(GPU time only); host: one call's host time in us; vs Flex: Flex's fwd graph time "
               "over the row's (> 1: faster than Flex)." if graph else "") + "\n\n"
            + _table(["shape", "N", "mask", "RoPE", "provider", "dtype", "fwd", "bwd", "fwd+bwd",
                      "fwd TFLOP/s"] + (["fwd graph", "host us", "vs Flex"] if graph else [])
                     + (["fwd+bwd graph", "vs Flex"]
                        if any(x.get("fwdbwd_graph_ms") for x in recs) else []),
                     rows))
    if first:
        text += ("\n\nFirst call in a fresh process with empty compile caches (compile, autotune "
                 "and run), by PYENCODER_TRITON_AUTOTUNE.\n\n"
                 + _table(["shape", "N", "mask", "RoPE", "provider", "autotune", "first fwd s",
                           "first fwd+bwd s", "then fwd ms"], first))
    return text


def _conv_provider(r):
    """Runs recorded before the CPU label fix call F.conv1d "cudnn" on a CPU too."""
    if r["provider"] == "cudnn" and str(r.get("device", "")).startswith("cpu"):
        return "torch-conv1d"
    return r["provider"]


def conv(recs):
    rows = [[r.get("suite", ""), _conv_provider(r), r.get("dtype", ""),
             f"B={r['B']} C={r['C']} L={r['L']} k={r['k']} g={r['groups']} s={r['stride']}"
             + (" channels-last" if r.get("layout") == "cl" else ""),
             r.get("mode", ""), _f(r.get("median_ms"), 4), _f(r.get("gb_per_s"), 1),
             _f(100 * r["frac_of_copy"], 0) if isinstance(r.get("frac_of_copy"), float) else "–"]
            for r in recs if "median_ms" in r]
    return _table(["suite", "provider", "dtype", "shape", "mode", "median ms", "GB/s",
                   "% of copy"], rows)


def streaming(recs):
    rows = []
    for r in recs:
        m = r.get("mode")
        if m == "offline":
            rows.append(["offline", _f(r["compute_s_per_audio_s"] * 1e3, 0), "1.0x", ""])
        elif m == "streaming":
            rows.append([f"streaming, {r['chunk_ms']} ms chunks",
                         _f(r["compute_s_per_audio_s"] * 1e3, 0),
                         _f(r.get("ratio_vs_offline"), 2) + "x",
                         f"target <= {r['target_ratio']}x" if r.get("target_ratio") else ""])
        elif m == "floor_80ms":
            rows.append([f"floor at {r['chunk_ms']} ms chunks (weights {r['weight_mb']:.0f} MB per "
                         f"step at {r['read_gb_per_s']:.0f} GB/s + conv extractor)",
                         _f(r["compute_s_per_audio_s"] * 1e3, 0),
                         _f(r.get("ratio_vs_offline"), 2) + "x", "no batch-1 fp32 step can be faster"])
        elif m == "naive_rerun_5s_every_80ms":
            rows.append(["naive: re-run 5 s every 80 ms", _f(r["compute_s_per_audio_s"] * 1e3, 0),
                         "", f"{r['ratio_vs_streaming_80ms']:.1f}x streaming at 80 ms "
                             f"(target >= {r['target_ratio']:.0f}x)"])
        elif m == "step_latency":
            rows.append(["step latency, batch 1" + (f", {r['mask']} mask" if r.get("mask") else "")
                         + (f", variant {r['variant']}" if r.get("variant") else ""),
                         f"p50 {r['p50_ms']:.2f} / p99 {r['p99_ms']:.2f} ms",
                         "", f"target p99 <= {r.get('target_p99_ms')} ms"])
        elif m == "realtime_streams":
            got = str(r["streams"])
            if r.get("search_cut"):
                got = f">= {got} (search cut short)"
            elif r.get("capped_at_max_batch"):
                got = f">= {got} (the search's largest batch)"
            elif r.get("streams_upper"):
                got = f"{got} (< {r['streams_upper']})"
            rows.append([f"concurrent real-time streams ({r.get('step_ms', 20)} ms steps"
                         + (f", {r['mask']} mask)" if r.get("mask") else ")"), got, "",
                         f"target >= {r['target_streams']}" if r.get("target_streams") else
                         "largest batch whose step fits the chunk"])
        elif m == "step_profile" and r.get("kinds") is not None:
            kinds = ", ".join(f"{k} {v:.0f}" for k, v in list(r["kinds"].items())[:4])
            gpu = r.get("gpu_p50_us")
            rows.append([f"step kernels, batch 1, {r.get('source')}"
                         + (f", {r['mask']} mask" if r.get("mask") else "")
                         + (f", variant {r['variant']}" if r.get("variant") else ""),
                         f"{r['kernels_per_step']:.0f} kernels, {r['kernel_us_per_step']:.0f} us"
                         + (f" of {gpu:.0f} us" if gpu and r.get("source") == "graph" else ""),
                         "", f"us by kind: {kinds}"])
    r0 = recs[0]
    return (f"wav2vec2-base-sized stack ({r0.get('layers')} layers, {r0.get('dim')} dim, "
            f"{r0.get('heads')} heads, left={r0.get('left')}, {r0.get('lookahead_frames')} frames "
            f"lookahead in layer 0), {r0.get('dtype')}, {r0.get('threads', '')} threads.\n\n"
            + _table(["mode", "measured (ms compute per s of audio, unless stated)", "vs offline",
                      "note"], rows))


def hf(recs):
    rows = []
    for r in recs:
        if r.get("bench") == "hf_streaming_step":
            rows.append([r["provider"], f"step, {r['chunk_ms']} ms chunks",
                         _f(r["median_ms"], 1), "", ""])
        elif "median_ms" in r:
            peak = r.get("peak_mem_bytes")
            rows.append([r["provider"], f"offline, {_f(r.get('seconds'), 0)} s audio",
                         _f(r["median_ms"], 0), _f(r.get("x_realtime"), 1),
                         _f(peak / 2**20, 0) if isinstance(peak, (int, float)) else "–"])
    return ("wav2vec2-base (random weights), left=250, right=3: patched vs unpatched transformers."
            "\n\n" + _table(["provider", "run", "median ms", "x real time", "peak MB"], rows))


def distill(recs):
    rows = [[f"{r['lookahead_frames']} ({r['lookahead_ms']:.0f} ms)", _f(r["latency_ms"], 1),
             _f(r["rel_dist_before"], 4), _f(r["rel_dist_after"], 4),
             _f(r["rel_dist_last_layer_after"], 4)] for r in recs]
    r0 = recs[0]
    return (f"Miniature of DyStream's Table 3: students with 0-3 frames of lookahead distilled from a "
            f"full-context teacher ({r0.get('layers')} layers, dim {r0.get('dim')}, "
            f"{r0.get('audio')} audio, {r0.get('student_steps')} steps each). Relative "
            f"student-teacher distance on held-out clips (lower is better).\n\n"
            + _table(["lookahead frames", "latency ms", "before", "after", "last layer after"],
                     rows))


def cpu_contention(recs):
    rows = []
    for r in recs:
        if "median_ms" not in r or not str(r.get("op", "")).startswith("banded"):
            continue
        pol = r.get("policy")
        # auto: the count the policy chose (auto_threads), not torch's default (threads)
        auto = r.get("auto_threads")
        auto = "/".join(map(str, auto)) if isinstance(auto, (list, tuple)) else auto
        label = (f"{r['provider']} auto ({auto if auto is not None else r.get('threads')} thr)"
                 if pol == "auto" else f"{r['provider']} {r.get('threads')} thr")
        rows.append([str(r.get("burners")), r["op"], label, _f(r["median_ms"]),
                     _f(r.get("speedup_vs_sdpa_default"), 2)])
    return ("The CPU path on a quiet machine and beside 1-2 CPU burner processes "
            "(`benchmarks/bench_cpu_contention.py`; banded left=250 right=3 with RoPE, B=1 H=12 D=64 fp32 "
            "(SDPA: dense mask, RoPE applied eagerly), variants interleaved; `auto` is the default PYENCODER_CPU_THREADS policy).\n\n"
            + _table(["burners", "case", "provider", "median ms", "vs SDPA (2 threads)"], rows))


def attention_ext(recs):
    """Issue 15's kernels (relative bias, sink keys, frame bands) vs Flex, one row per provider and
    case; vs Flex from the run's `ratio` rows (Flex's median over the provider's)."""
    ratios = {(r.get("suite"), r.get("mask"), r.get("N"), r.get("rope")): r
              for r in recs if r.get("provider") == "ratio"}
    graph = any(r.get("fwd_graph_ms") for r in recs)

    def x(q, p, key):
        v = q.get(f"{p}_{key}_x")
        return "–" if p == "flex" or v is None else f"{v:.2f}x"
    rows = []
    for r in recs:
        if "fwd_ms" not in r:
            continue
        q = ratios.get((r.get("suite"), r.get("mask"), r.get("N"), r.get("rope")), {})
        p = r["provider"]
        rows.append([r.get("suite", ""), r["mask"], f"{r.get('Nq')} x {r.get('Nk')}",
                     "on" if r.get("rope") else "off", p, r.get("dtype", ""),
                     _f(r.get("fwd_ms"), 3), _f(r.get("fwdbwd_ms"), 3),
                     x(q, p, "fwd"), x(q, p, "fwdbwd")]
                    + ([_f(r.get("fwd_graph_ms"), 3), _f(r.get("fwdbwd_graph_ms"), 3),
                        x(q, p, "fwd_graph"), x(q, p, "fwdbwd_graph")] if graph else []))
    return ("Interval attention's extensions (sinks, relative bias, frame-rate bands), B=8 H=12 "
            "D=64: `bias` = WavLM's gated "
            "relative position bias fused in the kernels (vs Flex with a `score_mod` reading the "
            "same table and gate, and the plain-torch `unfused` path), `sink` = sink keys, `frame` = "
            "cross-attention between two frame rates (Flex with the equivalent `mask_mod`). Median "
            "ms per call (triton.testing.do_bench, host time included where it exceeds the "
            "kernels'); vs Flex: Flex's time over the row's (> 1: faster; targets >= 1.5x forward, "
            ">= 1.3x forward+backward). Every provider was checked against the float32 reference "
            "before it was timed."
            + (" graph: the call replayed from a CUDA graph (GPU time only) and its ratio."
               if graph else "") + "\n\n"
            + _table(["suite", "mask", "Nq x Nk", "RoPE", "provider", "dtype", "fwd ms",
                      "fwd+bwd ms", "fwd vs Flex", "fwd+bwd vs Flex"]
                     + (["fwd graph ms", "fwd+bwd graph ms", "fwd graph vs Flex",
                         "fwd+bwd graph vs Flex"] if graph else []), rows))


def convnext(recs):
    rows = []
    for r in recs:
        if "median_ms" not in r:
            continue
        shape = f"B={r['B']} C={r['C']} L={r['L']} k={r['k']}"
        sp = r.get("speedup_vs_composed")
        rows.append([r["provider"], r.get("mode", ""), r.get("dtype", ""), shape,
                     _f(r["median_ms"], 4), _f(r.get("gb_per_s"), 0),
                     _f(100 * r["frac_of_copy"], 0) if isinstance(r.get("frac_of_copy"), float)
                     else "–", "–" if sp is None else f"{sp:.2f}x"])
    return ("ConvNeXt block (depthwise conv, LayerNorm, MLP, residual): the fused op vs the composed "
            "ops (`ConvNeXtBlock`'s default follows these rows).\n\n"
            + _table(["provider", "mode", "dtype", "shape", "median ms", "GB/s", "% of copy",
                      "vs composed"], rows))


def wavlm_bias(recs):
    rows = []
    ratio = {r["mode"]: r for r in recs if r.get("path") == "ratio_before_over_fused"}
    for r in recs:
        if "s_per_audio_s" not in r:
            continue
        q = ratio.get(r["mode"], {}).get("ratio")
        rows.append([r["mode"].replace("_", " "), r["path"],
                     _f(r["s_per_audio_s"] * 1e3, 0),
                     f"{_f(r['s_per_audio_s_min'] * 1e3, 0)} - {_f(r['s_per_audio_s_max'] * 1e3, 0)}",
                     f"{q:.2f}x" if r["path"] == "fused" and q else "",
                     f"{r.get('max_abs_diff_stream_vs_offline', 0):.1e}"])
    r0 = next(r for r in recs if "s_per_audio_s" in r)
    diff = next((r.get("max_abs_diff_fused_vs_before") for r in ratio.values()), None)
    return (f"Causal WavLM-base ({r0['layers']} layers, FocalCodec-Stream's chunked mask: 4-frame "
            f"chunks, 62 chunks of history, 3 frames of lookahead), fp32, {r0['seconds_audio']:.0f} s "
            f"of audio, {r0.get('threads')} threads: the relative-position bias fused in interval "
            f"attention (`fused`; on a CPU the blocked reference, streaming through the decode "
            f"op's bias) vs the path before it (`before`: relpos' plain-torch tiles and ring decode). "
            f"Medians of {r0.get('reps')} rounds, the paths alternating in each; speedup = before / "
            f"fused; both paths agree to {diff:.1e} (max abs) and each stream equals its offline "
            f"output to the last column.\n\n"
            + _table(["mode", "path", "ms compute per s of audio", "min - max", "speedup",
                      "stream vs offline"], rows))


SECTIONS = [("reference_cpu", "Reference path vs dense SDPA (CPU)", reference_cpu),
            ("cpu_contention", "CPU path under contention", cpu_contention),
            ("attention", "Attention", attention),
            ("attention_ext", "Attention extensions: relative bias, sinks, frame bands",
             attention_ext),
            ("conv", "Causal convolution", conv), ("convnext", "ConvNeXt block", convnext),
            ("streaming", "Streaming engine", streaming), ("hf", "Hugging Face patch", hf),
            ("wavlm_bias", "Causal WavLM: fused relative bias", wavlm_bias),
            ("distill_lookahead", "Causal distillation vs lookahead", distill)]


def render():
    parts = ["## Measured results\n",
             "Generated by `python -m benchmarks.readme` from the committed JSON lines in "
             "`benchmarks/results/`; each table names the machine, versions, commit and date. "
             "CPU tables were measured on a 2-core x86-64 CPU VM shared with other work, so treat "
             "CPU times as indicative; GPU tables come from the one-call GPU sessions "
             "(benchmarks/GPU_SESSION.md).\n"]
    for dev in sorted(glob.glob(os.path.join(HERE, "results", "*"))):
        if not os.path.isdir(dev):
            continue
        parts.append(f"### Device `{os.path.basename(dev)}`\n")
        for name, title, fn in SECTIONS:
            path = os.path.join(dev, name + ".jsonl")
            if not os.path.exists(path):
                continue
            recs = _full_runs(_latest_run(load(path)))
            if not recs:
                continue
            try:
                body = fn(recs)
            except (KeyError, TypeError) as e:
                body = f"(could not render: {e!r})"
            parts.append(f"#### {title}\n\n{_meta(recs)}\n\n{body}\n")
        for png in sorted(glob.glob(os.path.join(dev, "*.png"))):
            rel = os.path.relpath(png, ROOT)
            parts.append(f"![{os.path.basename(png)}]({rel})\n")
    return "\n".join(parts)


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.readme",
        description="Rewrite README.md's measured-results section from the committed "
                    "benchmarks/results/ (between its BEGIN / END markers).")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if README.md's section is not what the results "
                        "give")
    args = p.parse_args(argv)
    path = os.path.join(ROOT, "README.md")
    old = open(path).read()
    a, b = old.index(BEGIN), old.index(END)
    text = old[:a + len(BEGIN)] + "\n" + render() + "\n" + old[b:]
    if args.check:
        print(f"{path}: {'up to date' if text == old else 'out of date'}")
        return 0 if text == old else 1
    with open(path, "w") as f:
        f.write(text)
    print(f"updated {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
