"""Streaming benchmark: a wav2vec2-base-sized causal stack streamed chunk by chunk.

Model (random weights): 7-layer causal conv extractor (512 channels, kernels 10,3,3,3,3,2,2, strides
5,2,2,2,2,2,2: 320 samples = 20 ms per frame at 16 kHz) -> LayerNorm -> Linear(512, 768) -> 12
pre-LN TransformerLayers (768 dim, 12 heads, FFN 3072, RoPE, BandedSelfAttention left=250,
right=3 frames = 60 ms in the first layer, 0 elsewhere).

CPU (fp32):
  * offline compute per second of audio (one forward over --seconds of audio);
  * streaming compute per second of audio at 20 ms and 80 ms chunks (step over the same audio);
    ratio streaming / offline (target <= 1.5 at 80 ms);
  * the naive way: re-run the offline model over the last 5 s at each 80 ms step (per second of
    audio = 12.5 forwards of 5 s); ratio naive / streaming-80ms (target >= 10).
GPU (bf16, --gpu): steady-state step (``step_fixed``) captured in a CUDA graph:
  * per-step latency p50 / p99 at batch 1, 20 ms steps (target p99 <= 2 ms on H100);
  * concurrent real-time streams at 20 ms steps: the largest batch whose graph replay takes
    <= 20 ms (doubling, then bisection) (target >= 2000 on one H100).

Writes JSON lines to benchmarks/results/<device>/streaming.jsonl.
Usage: python benchmarks/bench_streaming.py [--seconds 10] [--gpu] [--layers 12]
"""
import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyencoder.nn import BandedSelfAttention, CausalConv1d, TransformerLayer, Transpose  # noqa
from pyencoder.streaming import StreamingSequential, latency  # noqa

try:
    from benchmarks._common import env_info, write_jsonl
except Exception:  # pragma: no cover - minimal local fallbacks
    import json
    import platform

    def env_info():
        return {"device": "cuda" if torch.cuda.is_available() else f"cpu-{platform.machine()}",
                "torch": torch.__version__}

    def write_jsonl(name, records):
        d = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                         env_info()["device"])
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"{name}.jsonl")
        with open(path, "a") as f:
            for r in records:
                f.write(json.dumps({**env_info(), **r}) + "\n")
        return path

SR = 16000
HOP = 320


def build(layers=12, dim=768, heads=12, ffn=3072, left=250, lookahead=3, conv_dim=512):
    ks, ss = (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)
    mods, cin = [], 1
    for k, s in zip(ks, ss):
        mods.append(CausalConv1d(cin, conv_dim, k, stride=s, bias=False, activation="gelu"))
        cin = conv_dim
    mods += [Transpose(), nn.LayerNorm(conv_dim), nn.Linear(conv_dim, dim)]
    for i in range(layers):
        att = BandedSelfAttention(dim, heads, left=left, right=lookahead if i == 0 else 0)
        mods.append(TransformerLayer(att, ffn, norm_first=True))
    return StreamingSequential(*mods).eval()


def _time(fn, reps=3):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_cpu(args):
    torch.manual_seed(0)
    model = build(layers=args.layers)
    lat = latency(model)
    n = int(args.seconds * SR)
    x = torch.randn(1, 1, n)
    recs = []
    base = dict(bench="streaming", dtype="float32", layers=args.layers, dim=768, heads=12,
                left=250, lookahead_frames=3, latency_ms=lat.ms, audio_seconds=args.seconds,
                threads=torch.get_num_threads())
    with torch.inference_mode():
        t_off = _time(lambda: model(x), args.reps) / args.seconds
        recs.append(dict(base, mode="offline", compute_s_per_audio_s=t_off))
        print(f"offline: {t_off * 1000:.1f} ms compute per s of audio")
        stream = {}
        for chunk_ms in (20, 80):
            c = chunk_ms * SR // 1000

            def run():
                st = model.init_state(1, max_chunk=max(4, c // HOP))
                for t in range(0, n, c):
                    model.step(x[..., t:t + c], st)
                model.flush(st)
            t_s = _time(run, args.reps) / args.seconds
            stream[chunk_ms] = t_s
            recs.append(dict(base, mode="streaming", chunk_ms=chunk_ms, compute_s_per_audio_s=t_s,
                             ratio_vs_offline=t_s / t_off, target_ratio=1.5 if chunk_ms == 80
                             else None))
            print(f"streaming {chunk_ms} ms chunks: {t_s * 1000:.1f} ms per s of audio "
                  f"({t_s / t_off:.2f}x offline)")
        win = torch.randn(1, 1, 5 * SR)
        t5 = _time(lambda: model(win), args.reps)
        naive = t5 * (1000 / 80)
        recs.append(dict(base, mode="naive_rerun_5s_every_80ms", compute_s_per_audio_s=naive,
                         ratio_vs_streaming_80ms=naive / stream[80], target_ratio=10.0))
        print(f"naive (5 s re-run every 80 ms): {naive * 1000:.1f} ms per s of audio "
              f"({naive / stream[80]:.1f}x streaming at 80 ms)")
    return recs


def _graph_step(model, B, device, dtype, warm_frames=8):
    st = model.init_state(B, device=device, dtype=dtype, max_chunk=1)
    x = torch.randn(B, 1, HOP, device=device, dtype=dtype)
    with torch.inference_mode():
        for _ in range(warm_frames):
            model.step(x, st)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                model.step_fixed(x, st)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            model.step_fixed(x, st)
    return g, st


def bench_gpu(args):
    device, dtype = "cuda", torch.bfloat16
    torch.manual_seed(0)
    model = build(layers=args.layers).to(device, dtype)
    recs = []
    base = dict(bench="streaming", dtype="bfloat16", layers=args.layers, dim=768, heads=12,
                left=250, lookahead_frames=3, step_ms=20, cuda_graph=True)
    g, _ = _graph_step(model, 1, device, dtype)
    for _ in range(50):
        g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(args.steps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1))
    ts.sort()
    p50, p99 = ts[len(ts) // 2], ts[min(len(ts) - 1, int(0.99 * len(ts)))]
    recs.append(dict(base, mode="step_latency", batch=1, p50_ms=p50, p99_ms=p99,
                     target_p99_ms=2.0, steps=args.steps))
    print(f"batch 1 step latency: p50 {p50:.3f} ms, p99 {p99:.3f} ms")
    del g

    def step_ms(B):
        try:
            g, st = _graph_step(model, B, device, dtype)
        except torch.OutOfMemoryError:
            return None
        for _ in range(5):
            g.replay()
        torch.cuda.synchronize()
        t = []
        for _ in range(20):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            g.replay()
            e1.record()
            e1.synchronize()
            t.append(e0.elapsed_time(e1))
        del g, st
        torch.cuda.empty_cache()
        return statistics.median(t)

    budget = 20.0
    lo, hi, B = 1, None, 256
    while hi is None and B <= args.max_batch:
        ms = step_ms(B)
        print(f"batch {B}: {ms} ms per 20 ms step")
        recs.append(dict(base, mode="batch_step", batch=B, median_ms=ms))
        if ms is not None and ms <= budget:
            lo, B = B, B * 2
        else:
            hi = B
    if hi is not None:
        while hi - lo > max(16, lo // 32):
            mid = (lo + hi) // 2
            ms = step_ms(mid)
            recs.append(dict(base, mode="batch_step", batch=mid, median_ms=ms))
            if ms is not None and ms <= budget:
                lo = mid
            else:
                hi = mid
    recs.append(dict(base, mode="realtime_streams", streams=lo, target_streams=2000,
                     capped_at_max_batch=hi is None))
    print(f"concurrent real-time streams at 20 ms steps: {lo}")
    return recs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--gpu", action="store_true", help="GPU benchmark (default when CUDA is present)")
    ap.add_argument("--cpu", action="store_true", help="CPU benchmark even when CUDA is present")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--max-batch", type=int, default=16384)
    ap.add_argument("--quick", action="store_true", help="4 s of audio, 1 rep, 300 GPU steps")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.reps, args.steps = min(args.seconds, 4.0), 1, min(args.steps, 300)
    import torch
    gpu = args.gpu or (torch.cuda.is_available() and not args.cpu)
    recs = bench_gpu(args) if gpu else bench_cpu(args)
    print(write_jsonl("streaming", recs))


if __name__ == "__main__":
    main()
