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
Reports fused / before ratios (> 1: the fused path is faster). Writes JSON lines to
<results root>/<device>/wavlm_bias.jsonl.

Usage: python -m benchmarks.bench_wavlm_bias [--seconds 10] [--layers 12]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import wall_times, write_jsonl  # noqa: E402
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


def run(seconds=10.0, layers=12, reps=3):
    torch.manual_seed(0)
    model = build(layers)
    wav = torch.randn(1, int(seconds * SR))
    chunk = 80 * SR // 1000
    records = []
    with torch.no_grad():
        outs = {}
        for fused in (True, False):
            set_fused(model, fused)
            outs[fused] = model(wav).last_hidden_state.clone()

            def offline():
                model(wav)

            def stream():
                st = model.init_state(1, max_chunk=8)
                for t in range(0, wav.shape[-1], chunk):
                    model.step(wav[:, t:t + chunk], st)
                model.flush(st)
            for mode, fn in (("offline", offline), ("streaming_80ms", stream)):
                med, lo, hi = wall_times(fn, reps)
                records.append(dict(bench="wavlm_bias", mode=mode,
                                    path="fused" if fused else "before", layers=layers,
                                    seconds_audio=seconds, s_per_audio_s=med / seconds,
                                    s_per_audio_s_min=lo / seconds,
                                    s_per_audio_s_max=hi / seconds,
                                    threads=torch.get_num_threads()))
        err = float((outs[True] - outs[False]).abs().max())
    by = {(r["mode"], r["path"]): r["s_per_audio_s"] for r in records}
    for mode in ("offline", "streaming_80ms"):
        ratio = by[(mode, "before")] / by[(mode, "fused")]
        records.append(dict(bench="wavlm_bias", mode=mode, path="ratio_before_over_fused",
                            layers=layers, seconds_audio=seconds, ratio=ratio,
                            max_abs_diff_fused_vs_before=err))
    return records


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    recs = run(args.seconds, args.layers, args.reps)
    for r in recs:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    path = write_jsonl("wavlm_bias", recs)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
