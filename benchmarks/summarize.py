"""Markdown summary and PNG plots generated from the JSON lines of one results folder.

    python -m benchmarks.summarize benchmarks/results/<device-slug> [--compare OLD_DIR]

Writes <dir>/summary.md (one table per benchmark file, columns chosen from the fields that vary)
and <dir>/*.png (matplotlib, when installed). Nothing here is measured: it only reformats.
"""
import argparse
import glob
import json
import os
import sys

ENV_KEYS = {"device", "device_name", "torch", "triton", "cuda", "commit", "date", "time",
            "timestamp", "python", "platform", "bench", "hostname", "cpu", "cuda_version",
            "triton_version", "torch_version", "peak_bw_gbs", "copy_bw_gbs", "git_commit",
            "cudnn", "driver", "error", "skipped", "checksum"}


def load(path):
    """The records of a JSON lines file, without a rehearsal's (``dry_run``: interpreter timings
    of a --dry-run on a CPU, no results)."""
    recs = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not (isinstance(rec, dict) and rec.get("dry_run")):
                    recs.append(rec)
    return recs


# what names a measured case (rows of one commit measured twice: the later one is kept)
_CASE_KEYS = ("bench", "suite", "provider", "shape", "B", "H", "D", "N", "Nq", "Nk", "mask",
              "rope", "rope_mode", "rope_table", "dtype", "mode", "C", "L", "k", "groups", "stride",
              "layout", "batch", "chunk_ms", "autotune", "triton_autotune", "layers", "threads",
              "op", "case", "burners", "sink", "name", "variant", "source", "model")


def _latest_run(recs):
    """Keep the records of the newest run (files are appended across runs): those sharing the
    last record's commit when every record of it names one (a device session's calls all name
    theirs: PYENCODER_COMMIT), else its run_id. A case (the _CASE_KEYS fields) measured by more
    than one run there keeps the rows of the last run that measured it (a run's own rows of one
    case are all kept), in file order."""
    if not recs:
        return recs
    last = recs[-1]
    if last.get("commit") and "run_id" in last:
        run = [r for r in recs if r.get("commit") == last["commit"]]
    elif "run_id" in last:
        run = [r for r in recs if r.get("run_id") == last["run_id"]]
    else:
        return recs  # no run id: show everything
    cases = [tuple(repr(r.get(k)) for k in _CASE_KEYS) for r in run]
    newest = {c: r.get("run_id") for c, r in zip(cases, run)}
    return [r for c, r in zip(cases, run) if r.get("run_id") == newest[c]]


def _fmt(v):
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return "x".join(str(x) for x in v)
    return "" if v is None else str(v)


def _nested(v):
    return isinstance(v, dict) or (isinstance(v, (list, tuple)) and any(
        isinstance(x, (dict, list, tuple)) for x in v))


def _minor(k):
    """Sort key of a measurement column: spreads and extremes (p20 / p80, min / max, std) after
    the main figures (times, rates, ratios)."""
    return any(t in k for t in ("p20", "p80", "min", "max", "std", "mean"))


def table(recs, max_cols=14):
    recs = [r for r in recs if isinstance(r, dict)]
    if not recs:
        return "(no records)\n"
    keys = []
    for r in recs:
        for k in r:
            # nested records (a profile's top ops) do not fit a cell; a column empty in every
            # row says nothing
            if k not in keys and k not in ENV_KEYS and not _nested(r[k]) and \
                    any(x.get(k) is not None for x in recs):
                keys.append(k)
    varying = [k for k in keys if len({json.dumps(r.get(k), sort_keys=True) for r in recs}) > 1
               or not isinstance(recs[0].get(k), (int, float, str))]
    cfg = [k for k in varying if all(not isinstance(r.get(k), float) for r in recs)
           and k != "run_id"]
    met = sorted((k for k in varying if k not in cfg and k != "run_id"), key=_minor)
    # the configuration that tells the rows apart (in order, each column kept only if it
    # separates rows the earlier ones did not), then the main measurements before spreads and
    # extremes: cut at max_cols, a wide configuration pushed every time out of the table, a
    # plain cut of the configuration merged rows (fwd and fwd+bwd)
    cols, seen = [], {()}
    for k in cfg:
        keyed = {tuple(json.dumps(r.get(c), sort_keys=True) for c in cols + [k]) for r in recs}
        if len(keyed) > len(seen):
            cols.append(k)
            seen = keyed
    cols += met[:max(4, max_cols - len(cols))]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in recs:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k in cols) + " |")
    return "\n".join(lines) + "\n"


def _env_line(recs):
    r = recs[0]
    parts = [f"{k} {r[k]}" for k in ("device", "device_name", "torch", "triton", "cuda", "commit",
                                      "date") if r.get(k)]
    return ", ".join(parts)


def plots(results_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots: skipped, matplotlib is not installed (make bench installs it; or pip "
              "install matplotlib); the JSON lines and summary.md are written", file=sys.stderr)
        return []
    made = []
    path = os.path.join(results_dir, "attention.jsonl")
    if os.path.exists(path):
        # the kernel-vs-anchor rows with RoPE (not the attention-only or first-call rows)
        recs = [r for r in load(path) if "N" in r and "provider" in r
                and r.get("bench", "attention") == "attention" and r.get("rope", True)]
        ms_key = next((k for k in ("fwd_ms", "fwd_median_ms", "median_ms") if recs
                       and k in recs[0]), None)
        if recs and ms_key:
            masks = sorted({str(r.get("mask")) for r in recs})
            fig, axes = plt.subplots(1, len(masks), figsize=(4 * len(masks), 3.5), squeeze=False)
            for ax, m in zip(axes[0], masks):
                for prov in sorted({r["provider"] for r in recs}):
                    pts = sorted((r["N"], r[ms_key]) for r in recs if str(r.get("mask")) == m
                                 and r["provider"] == prov and isinstance(r.get(ms_key), float))
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=prov)
                ax.set_title(m, fontsize=9)
                ax.set_xlabel("N")
                ax.set_ylabel(ms_key)
                ax.set_xscale("log")
                ax.set_yscale("log")
            axes[0][0].legend(fontsize=7)
            fig.tight_layout()
            out = os.path.join(results_dir, "attention_time_vs_n.png")
            fig.savefig(out, dpi=100)
            plt.close(fig)
            made.append(out)
    path = os.path.join(results_dir, "conv.jsonl")
    if os.path.exists(path):
        recs = [r for r in load(path) if "width" in r and "provider" in r]
        gb = next((k for k in ("gbs", "GB/s", "gb_s") if recs and k in recs[0]), None)
        if recs and gb:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for prov in sorted({r["provider"] for r in recs}):
                pts = {}
                for r in recs:
                    if r["provider"] == prov and isinstance(r.get(gb), float):
                        pts[r["width"]] = max(pts.get(r["width"], 0.0), r[gb])
                if pts:
                    ax.plot(*zip(*sorted(pts.items())), marker="o", label=prov)
            ax.set_xlabel("width")
            ax.set_ylabel("best GB/s")
            ax.set_xscale("log")
            ax.legend(fontsize=7)
            fig.tight_layout()
            out = os.path.join(results_dir, "conv_gbs_vs_width.png")
            fig.savefig(out, dpi=100)
            plt.close(fig)
            made.append(out)
    path = os.path.join(results_dir, "streaming.jsonl")
    if os.path.exists(path):
        recs = [r for r in load(path) if isinstance(r.get("step_ms_all"), list)]
        if recs:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for r in recs:
                ax.hist(r["step_ms_all"], bins=50, alpha=0.6,
                        label=f"{r.get('chunk_ms', '?')} ms chunks")
            ax.set_xlabel("per-step latency (ms)")
            ax.legend(fontsize=7)
            fig.tight_layout()
            out = os.path.join(results_dir, "streaming_latency_hist.png")
            fig.savefig(out, dpi=100)
            plt.close(fig)
            made.append(out)
    return made


def summarize(results_dir, compare=None):
    os.makedirs(results_dir, exist_ok=True)
    parts = [f"# Benchmark summary: {os.path.basename(os.path.normpath(results_dir))}\n",
             "Generated by `python -m benchmarks.summarize` from the JSON lines in this folder.\n"]
    for path in sorted(glob.glob(os.path.join(results_dir, "*.jsonl"))):
        recs = _latest_run(load(path))
        if not recs:
            continue
        name = os.path.basename(path)[:-len(".jsonl")]
        parts.append(f"## {name}\n\n{_env_line(recs)}\n\n{table(recs)}")
        if compare:
            old = os.path.join(compare, os.path.basename(path))
            if os.path.exists(old):
                parts.append(f"### {name}: previous run ({compare})\n\n{table(_latest_run(load(old)))}")
    for png in plots(results_dir):
        parts.append(f"![{os.path.basename(png)}]({os.path.basename(png)})\n")
    out = os.path.join(results_dir, "summary.md")
    with open(out, "w") as f:
        f.write("\n".join(parts))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("results_dir")
    p.add_argument("--compare", default=None)
    a = p.parse_args(argv)
    print(summarize(a.results_dir, a.compare))


if __name__ == "__main__":
    main()
