"""CPU benchmark: causal WavLM-base (12 layers) with the relative-position bias fused in interval
attention (the op's ``rel_bias=`` / ``gate=``: on a CPU the blocked reference) vs the path before
it (pyencoder.nn.relpos' plain-torch tiles and ring decode, ``WavLMSelfAttention.fused_bias =
False``).

Model (random weights, fp32): pyencoder.models.CausalEncoder with WavLM-base's shape (768 dim, 12
heads, FFN 3072, post-LN, 320 buckets up to 800, gated bias) and FocalCodec-Stream's mask: chunked
attention, 4-frame (80 ms) chunks, 62 chunks of history, 3 frames of lookahead in layer 0; no RoPE,
no positional conv (WavLM's symmetric conv cannot stream).
  * offline: seconds of compute per second of audio (one forward over --seconds of audio);
  * streaming at 80 ms chunks: the same per second of audio (step + flush over the audio).
Streaming: the fused path decodes with pyencoder.ops.decode_attention's relative bias (on a CPU
its reference; the general step runs as step_fixed in the steady state), the path before with
relpos' plain-torch ring decode.
Reports before / fused ratios (> 1: the fused path is faster), the two paths alternating in each
timed round. Both paths are checked first: offline outputs equal, each stream equal to its offline
output (float32 summation order). Writes JSON lines to <results root>/<device>/wavlm_bias.jsonl.
CPU only (in `python -m benchmarks` on a CPU; the GPU numbers of the fused bias are
bench_attention_ext's `bias` suite).

Usage: python -m benchmarks.bench_wavlm_bias [--seconds 10] [--layers 12] [--reps 3] [--quick]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import write_jsonl  # noqa: E402
from pyencoder.models import CausalEncoder, EncoderConfig  # noqa: E402
from pyencoder.nn import WavLMSelfAttention  # noqa: E402

SR = 16000


def build(layers=12):
    cfg = EncoderConfig(num_layers=layers, attention="chunked", chunk_size=4, left_chunks=62,
                        lookahead=3, rope=False, pos_conv=None, rel_pos_bias=True)
    return CausalEncoder(cfg).eval()


def set_fused(model, fused):
    for m in model.modules():
        if isinstance(m, WavLMSelfAttention):
            m.fused_bias = fused


def _stream(model, wav, chunk):
    st = model.init_state(wav.shape[0], max_chunk=8)
    ys = []
    for t in range(0, wav.shape[-1], chunk):
        y, st = model.step(wav[:, t:t + chunk], st)
        ys.append(y[:, :int(st.out_lengths[0])])
    y, st = model.flush(st)
    ys.append(y[:, :int(st.out_lengths[0])])
    return torch.cat(ys, 1)


def run(seconds=10.0, layers=12, reps=3, quick=False):
    """Rows: per (mode, path) the median / min / max seconds of compute per second of audio over
    ``reps`` rounds, the two paths alternating within each round (one warm-up call each first), so
    that drift on a shared machine hits both; then per mode the ratio before / fused. Before any
    timing each path's offline output is compared with the other path's and with its own stream
    (a wrong path gives no number: AssertionError)."""
    torch.manual_seed(0)
    model = build(layers)
    wav = torch.randn(1, int(seconds * SR))
    chunk = 80 * SR // 1000
    paths = {"fused": True, "before": False}
    with torch.no_grad():
        outs, errs = {}, {}
        for name, fused in paths.items():
            set_fused(model, fused)
            outs[name] = model(wav).last_hidden_state.clone()
            streamed = _stream(model, wav, chunk)
            if streamed.shape != outs[name].shape:
                raise AssertionError(f"{name}: streamed {streamed.shape[1]} frames, offline "
                                     f"{outs[name].shape[1]}")
            errs[name] = float((streamed - outs[name]).abs().max())
        err = float((outs["fused"] - outs["before"]).abs().max())
        scale = float(outs["before"].abs().max())
        # float32 through `layers` post-LN layers: summation order only (measured ~1e-6 to ~3e-6)
        for what, e in [("fused vs before", err)] + [(f"{k} streamed vs offline", v)
                                                      for k, v in errs.items()]:
            if not e <= 1e-4 * max(scale, 1.0):
                raise AssertionError(f"{what}: max abs diff {e:.3g} (output scale {scale:.3g})")
        fns = {"offline": lambda: model(wav), "streaming_80ms": lambda: _stream(model, wav, chunk)}
        times = {(m, p): [] for m in fns for p in paths}
        for rnd in range(reps + 1):                   # round 0 warms each path up, untimed
            for mode, fn in fns.items():
                for name, fused in (paths.items() if rnd % 2 == 0 else
                                    reversed(list(paths.items()))):
                    set_fused(model, fused)
                    t0 = time.perf_counter()
                    fn()
                    if rnd:
                        times[(mode, name)].append(time.perf_counter() - t0)
    records = []
    for (mode, name), ts in times.items():
        ts.sort()
        records.append(dict(bench="wavlm_bias", mode=mode, path=name, layers=layers,
                            seconds_audio=seconds, reps=reps, quick=quick,
                            s_per_audio_s=statistics.median(ts) / seconds,
                            s_per_audio_s_min=ts[0] / seconds, s_per_audio_s_max=ts[-1] / seconds,
                            max_abs_diff_stream_vs_offline=errs[name],
                            threads=torch.get_num_threads()))
    by = {(r["mode"], r["path"]): r["s_per_audio_s"] for r in records}
    for mode in fns:
        ratio = by[(mode, "before")] / by[(mode, "fused")]
        records.append(dict(bench="wavlm_bias", mode=mode, path="ratio_before_over_fused",
                            layers=layers, seconds_audio=seconds, reps=reps, quick=quick,
                            ratio=ratio, max_abs_diff_fused_vs_before=err))
    return records


def main(argv=None):
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true",
                    help="2 layers, 2 s of audio, 2 rounds (the runner's --quick)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.layers, args.reps = 2.0, 2, 2
    recs = run(args.seconds, args.layers, args.reps, quick=args.quick)
    for r in recs:
        # 4 significant digits, not 4 decimals: a difference of 1e-6 printed as 0.0 before
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in r.items()))
    path = write_jsonl("wavlm_bias", recs)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
