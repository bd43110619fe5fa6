"""Streaming benchmark: a wav2vec2-base-sized causal stack streamed chunk by chunk.

Model (random weights): 7-layer causal conv extractor (512 channels, kernels 10,3,3,3,3,2,2, strides
5,2,2,2,2,2,2: 320 samples = 20 ms per frame at 16 kHz) -> LayerNorm -> Linear(512, 768) -> 12
pre-LN TransformerLayers (768 dim, 12 heads, FFN 3072, RoPE, BandedSelfAttention left=250,
right=3 frames = 60 ms in the first layer, 0 elsewhere).

CPU (fp32):
  * offline compute per second of audio (one forward over --seconds of audio);
  * streaming compute per second of audio at 20 ms and 80 ms chunks (step over the same audio);
    ratio streaming / offline (target <= 1.5 at 80 ms);
  * the floor at 80 ms chunks: weight bytes x steps per second / measured read bandwidth, plus the
    conv extractor streamed alone (batch 1 reads every weight once per step);
  * concurrent real-time streams at 80 ms chunks: the largest batch whose steady-state step takes
    at most 80 ms (doubling from 1, then bisection);
  * the naive way: re-run the offline model over the last 5 s at each 80 ms step (per second of
    audio = 12.5 forwards of 5 s); ratio naive / streaming-80ms (target >= 10).
GPU (bf16, --gpu): the steady-state step (``step_fixed``) captured in a CUDA graph, for two masks
(--mask banded|chunked|both): the banded stack above with 1-frame (20 ms) steps, and the same stack
with ChunkedSelfAttention (chunks of 4 frames = 80 ms, 62 chunks of history, no lookahead) with
one-chunk (80 ms) steps (step_fixed on a chunked mask needs steps that are whole chunks):
  * per-step latency p50 / p99 at batch 1 (target p99 <= 2 ms on H100): wall clock around
    (copy the next audio chunk into the static input, replay, synchronize), and the GPU time
    between CUDA events around the same;
  * concurrent real-time streams: the largest batch whose step (median GPU time) fits the step's
    audio duration (20 / 80 ms): doubling from 256, then bisection (target >= 2000 on one H100).
    Each batch is warmed up with the general step to the steady state, checked
    (``step_fixed(check=True)``), warmed up on a side stream, then captured.
--dry-run: the GPU code path on CPU (tiny model, bf16, no CUDA graphs, 3 steps, batches up to 4);
writes nothing (tests/test_bench_streaming.py runs it).

Writes JSON lines to <results root>/<device>/streaming.jsonl, each row appended as soon as it is
measured (a run cut by a time limit keeps the finished rows).
Usage: python -m benchmarks.bench_streaming [--seconds 10] [--gpu] [--layers 12] [--mask both]
                                            [--quick] [--dry-run]
"""
import argparse
import gc
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyencoder.nn import (BandedSelfAttention, CausalConv1d, ChunkedSelfAttention,  # noqa
                          Linear, TransformerLayer, Transpose)
from pyencoder.streaming import StreamingSequential, latency  # noqa

from benchmarks._common import JsonlRows, env_info, write_jsonl  # noqa: E402

SR = 16000
HOP = 320


def build(layers=12, dim=768, heads=12, ffn=3072, left=250, lookahead=3, conv_dim=512,
          mask="banded", chunk=4, left_chunks=62):
    """``mask="banded"``: frame p sees [p - left, p + right], right = lookahead in layer 0 and 0
    elsewhere. ``mask="chunked"``: chunks of ``chunk`` frames, ``left_chunks`` chunks of history,
    ``lookahead`` frames past the chunk in layer 0 (0 elsewhere)."""
    ks, ss = (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)
    mods, cin = [], 1
    for k, s in zip(ks, ss):
        mods.append(CausalConv1d(cin, conv_dim, k, stride=s, bias=False, activation="gelu"))
        cin = conv_dim
    mods += [Transpose(), nn.LayerNorm(conv_dim), Linear(conv_dim, dim)]
    for i in range(layers):
        la = lookahead if i == 0 else 0
        if mask == "banded":
            att = BandedSelfAttention(dim, heads, left=left, right=la)
        elif mask == "chunked":
            att = ChunkedSelfAttention(dim, heads, chunk_size=chunk, left_chunks=left_chunks,
                                       lookahead=la)
        else:
            raise ValueError(f"mask must be 'banded' or 'chunked'; got {mask!r}")
        mods.append(TransformerLayer(att, ffn, norm_first=True))
    return StreamingSequential(*mods).eval()


def _time(fn, reps=3, warm=True):
    from benchmarks._common import wall_times
    return wall_times(fn, reps, warm)[0]


def _floor(model, x, t_off, chunk_ms=80):
    """Lower bound of streaming compute at ``chunk_ms`` chunks on this machine: every step reads
    every weight once (batch 1: no reuse across steps, the weights do not fit in cache), at best at
    the measured read bandwidth (a 512 MB torch.sum), plus the conv extractor streamed alone
    (compute-bound, as much work as offline). Ratio to the offline compute."""
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buf = torch.randn(128 * 2 ** 20)  # distinct pages (a constant buffer reads faster on a VM)
    bw = buf.numel() * 4 / _time(buf.sum, 3)
    del buf
    steps = 1000 / chunk_ms
    conv = StreamingSequential(*[m for m in model if isinstance(m, CausalConv1d)])
    c = chunk_ms * SR // 1000

    def run_conv():
        st = conv.init_state(1, max_chunk=c // HOP)
        for t in range(0, x.shape[-1], c):
            conv.step(x[..., t:t + c], st)
    t_conv = _time(run_conv, 2) / (x.shape[-1] / SR)
    t_w = wbytes * steps / bw
    return dict(chunk_ms=chunk_ms, weight_mb=wbytes / 1e6, read_gb_per_s=bw / 1e9,
                weights_s_per_audio_s=t_w, conv_s_per_audio_s=t_conv,
                compute_s_per_audio_s=t_w + t_conv, ratio_vs_offline=(t_w + t_conv) / t_off)


def _cpu_streams(model, args, chunk_ms=80, recs=None, base=None):
    """Concurrent real-time streams on this CPU: the largest batch whose steady-state step of
    ``chunk_ms`` of audio per stream (median of a few steps after a warm-up that fills the left
    context's ring) takes at most ``chunk_ms``. A batch of B streams reads every weight once per
    step, so B streams cost far less than B single streams. Rows (``base`` merged in) are
    appended to ``recs`` as measured and returned."""
    c = chunk_ms * SR // 1000
    frames = c // HOP
    warm = _warm_steps(model, frames)
    recs = [] if recs is None else recs
    base = base or {}

    def measure(B):
        x = torch.randn(B, 1, c * (warm + args.cpu_steps))
        st = model.init_state(B, max_chunk=frames)
        for i in range(warm):
            model.step(x[..., i * c:(i + 1) * c], st)
        ts = []
        for i in range(warm, warm + args.cpu_steps):
            t0 = time.perf_counter()
            model.step(x[..., i * c:(i + 1) * c], st)
            ts.append((time.perf_counter() - t0) * 1e3)
        ms = statistics.median(ts)
        recs.append(dict(base, mode="cpu_batch_step", chunk_ms=chunk_ms, batch=B, median_ms=ms))
        print(f"  batch {B}: {ms:.1f} ms per {chunk_ms} ms step")
        return ms

    streams, capped = search_streams(measure, float(chunk_ms), start=1,
                                     max_batch=args.cpu_max_batch)
    recs.append(dict(base, mode="realtime_streams", chunk_ms=chunk_ms, step_ms=chunk_ms,
                     streams=streams, capped_at_max_batch=capped, target_streams=None))
    print(f"concurrent real-time streams at {chunk_ms} ms chunks on this CPU: {streams}")
    return recs


def bench_cpu(args, recs=None):
    torch.manual_seed(0)
    model = build(layers=args.layers)
    lat = latency(model)
    n = int(args.seconds * SR)
    x = torch.randn(1, 1, n)
    recs = [] if recs is None else recs    # a JsonlRows writes each row as it is appended
    base = dict(bench="streaming", dtype="float32", layers=args.layers, dim=768, heads=12,
                left=250, lookahead_frames=3, latency_ms=lat.ms, audio_seconds=args.seconds,
                threads=torch.get_num_threads())
    warm = not args.quick     # --quick: one cold run per measurement
    with torch.inference_mode():
        t_off = _time(lambda: model(x), args.reps, warm) / args.seconds
        recs.append(dict(base, mode="offline", compute_s_per_audio_s=t_off))
        print(f"offline: {t_off * 1000:.1f} ms compute per s of audio")
        stream = {}
        for chunk_ms in ((80,) if args.quick else (20, 80)):
            c = chunk_ms * SR // 1000

            def run():
                st = model.init_state(1, max_chunk=max(4, c // HOP))
                for t in range(0, n, c):
                    model.step(x[..., t:t + c], st)
                model.flush(st)
            t_s = _time(run, args.reps, warm) / args.seconds
            stream[chunk_ms] = t_s
            recs.append(dict(base, mode="streaming", chunk_ms=chunk_ms, compute_s_per_audio_s=t_s,
                             ratio_vs_offline=t_s / t_off, target_ratio=1.5 if chunk_ms == 80
                             else None))
            print(f"streaming {chunk_ms} ms chunks: {t_s * 1000:.1f} ms per s of audio "
                  f"({t_s / t_off:.2f}x offline)")
        recs.append(dict(base, mode="floor_80ms", **_floor(model, x, t_off)))
        fl = recs[-1]
        print(f"floor at 80 ms chunks: weights {fl['weight_mb']:.0f} MB read per step at "
              f"{fl['read_gb_per_s']:.1f} GB/s = {fl['weights_s_per_audio_s'] * 1000:.0f} ms per s "
              f"of audio + conv extractor {fl['conv_s_per_audio_s'] * 1000:.0f} ms = "
              f"{fl['ratio_vs_offline']:.2f}x offline")
        _cpu_streams(model, args, recs=recs, base=base)
        win_s = 2 if args.quick else 5    # the naive server's window
        win = torch.randn(1, 1, win_s * SR)
        t5 = _time(lambda: model(win), args.reps, warm)
        naive = t5 * (1000 / 80)
        recs.append(dict(base, mode=f"naive_rerun_{win_s}s_every_80ms",
                         compute_s_per_audio_s=naive,
                         ratio_vs_streaming_80ms=naive / stream[80], target_ratio=10.0))
        print(f"naive ({win_s} s re-run every 80 ms): {naive * 1000:.1f} ms per s of audio "
              f"({naive / stream[80]:.1f}x streaming at 80 ms)")
    return recs


# Masks of the GPU benchmark: the step is ``step_frames`` frames (a multiple of the chunk for the
# chunked mask, so every step releases exactly step_frames frames; see
# ChunkedSelfAttention.step_fixed).
GPU_MASKS = {
    "banded": dict(mask="banded", left=250, lookahead=3, step_frames=1),
    "chunked": dict(mask="chunked", chunk=4, left_chunks=62, lookahead=0, step_frames=4),
}
DRY = dict(layers=2, dim=64, heads=4, ffn=128, conv_dim=32)


def _warm_steps(model, step_frames):
    """General steps that bring every layer to the steady state step_fixed needs."""
    la = sum(m.attention.lookahead_frames + m.attention.block for m in model
             if isinstance(m, TransformerLayer))
    return -(-la // step_frames) + 2


class StepRunner:
    """One batch of B streams at steady state, advanced by ``step_fixed``: captured in a CUDA graph
    (``graph=True``; static input buffer ``x``, warm-up on a side stream before capture, then only
    ``replay``) or run eagerly (``--dry-run``: same code path, no graph). Each call first copies
    the next chunk of a small device-resident pool of audio into ``x`` (what a server does before
    a replay), then advances every stream by one step."""

    def __init__(self, model, B, device, dtype, step_frames, graph):
        self.model, self.graph = model, None
        samples = HOP * step_frames
        self.pool = torch.randn(4, B, 1, samples, device=device, dtype=dtype)
        self.x = self.pool[0].clone()
        self.i = 0
        if torch.device(device).type == "cuda":
            import pyencoder.nn
            pyencoder.nn.pack_qkv_(model)       # one q/k/v GEMM per layer (opt-in)
        with torch.no_grad():
            st = model.init_state(B, device=device, dtype=dtype, max_chunk=step_frames)
            for _ in range(_warm_steps(model, step_frames)):
                model.step(self.x, st)
            self.y = model.step_fixed(self.x, st, check=True)
            if graph:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):
                        model.step_fixed(self.x, st)
                torch.cuda.current_stream().wait_stream(side)
                torch.cuda.synchronize()
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.y = model.step_fixed(self.x, st)
        self.state = st

    def __call__(self):
        self.i = (self.i + 1) % self.pool.shape[0]
        self.x.copy_(self.pool[self.i])
        if self.graph is not None:
            self.graph.replay()
        else:
            with torch.no_grad():
                self.y = self.model.step_fixed(self.x, self.state)


def _timed(run, steps, cuda):
    """Per-step times (ms): wall clock around run + synchronize, and CUDA-event GPU time."""
    wall, gpu = [], []
    for _ in range(steps):
        if cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            e0.record()
            run()
            e1.record()
            torch.cuda.synchronize()
            wall.append((time.perf_counter() - t0) * 1e3)
            gpu.append(e0.elapsed_time(e1))
        else:
            t0 = time.perf_counter()
            run()
            wall.append((time.perf_counter() - t0) * 1e3)
    return wall, gpu


def _q(ts, f):
    ts = sorted(ts)
    return ts[min(len(ts) - 1, int(f * len(ts)))] if ts else None


def search_streams(measure, budget_ms, start=256, max_batch=16384):
    """Largest batch B <= max_batch with ``measure(B)`` (ms per step; None = does not fit) within
    ``budget_ms``: doubling from ``start``, then bisection to 1/32 relative resolution (exact
    below 32). Returns (streams, capped): capped when max_batch itself passed the doubling;
    streams is 0 when no batch >= 1 fits the budget."""
    ok = lambda b: (lambda ms: ms is not None and ms <= budget_ms)(measure(b))  # noqa: E731
    lo, hi, B = 0, None, max(1, min(start, max_batch))
    while hi is None:
        if ok(B):
            lo = B
            if B == max_batch:
                return lo, True
            B = min(2 * B, max_batch)
        else:
            hi = B
    while hi - lo > max(1, lo // 32):
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, False


def _fits(model, B, dtype, step_frames):
    """Rough pre-check on CUDA: the streaming state (sized on the meta device) x 1.5 for
    activations must fit in free memory, so large batches fail here rather than mid-capture."""
    st = model.init_state(B, device="meta", dtype=dtype, max_chunk=step_frames)
    free, _ = torch.cuda.mem_get_info()
    return 1.5 * st.nbytes() + 64 * 2 ** 20 < free


def bench_gpu(args, recs=None):
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    dtype = torch.bfloat16
    graph = not dry
    masks = list(GPU_MASKS) if args.mask == "both" else [args.mask]
    dims = DRY if dry else dict(layers=args.layers, dim=768, heads=12, ffn=3072, conv_dim=512)
    recs = [] if recs is None else recs    # a JsonlRows writes each row as it is appended
    for name in masks:
        cfg = GPU_MASKS[name]
        sf = cfg["step_frames"]
        step_ms_audio = sf * HOP * 1000 // SR
        torch.manual_seed(0)
        model = build(**dims, **{k: v for k, v in cfg.items() if k != "step_frames"})
        model = model.to(device, dtype)
        base = dict(bench="streaming", dtype="bfloat16", **dims, **cfg, chunk_ms=step_ms_audio,
                    step_ms=step_ms_audio, lookahead_frames=cfg["lookahead"],
                    latency_ms=latency(model).ms, cuda_graph=graph)
        run = StepRunner(model, 1, device, dtype, sf, graph)
        for _ in range(3 if dry else 50):
            run()
        if not dry:
            torch.cuda.synchronize()
        wall, gpu = _timed(run, args.steps, cuda=not dry)
        rec = dict(base, mode="step_latency", batch=1, steps=args.steps,
                   p50_ms=_q(wall, 0.5), p99_ms=_q(wall, 0.99), gpu_p50_ms=_q(gpu, 0.5),
                   gpu_p99_ms=_q(gpu, 0.99), target_p99_ms=2.0, step_ms_all=wall)
        recs.append(rec)
        print(f"[{name}] batch 1, {step_ms_audio} ms steps: wall p50 {rec['p50_ms']:.3f} ms, "
              f"p99 {rec['p99_ms']:.3f} ms" + ("" if dry else
                                              f"; GPU p50 {rec['gpu_p50_ms']:.3f} ms, "
                                              f"p99 {rec['gpu_p99_ms']:.3f} ms"))
        del run

        def measure(B):
            if not dry and not _fits(model, B, dtype, sf):
                ms = None
            else:
                try:
                    r = StepRunner(model, B, device, dtype, sf, graph)
                    for _ in range(2 if dry else 5):
                        r()
                    w, g = _timed(r, 3 if dry else 20, cuda=not dry)
                    ms = statistics.median(g if g else w)
                    del r
                except (torch.OutOfMemoryError, RuntimeError) as e:
                    if not isinstance(e, torch.OutOfMemoryError) and \
                            "out of memory" not in str(e).lower():
                        raise
                    ms = None
                if not dry:
                    gc.collect()
                    torch.cuda.empty_cache()
            recs.append(dict(base, mode="batch_step", batch=B, median_ms=ms))
            print(f"[{name}] batch {B}: {ms} ms per {step_ms_audio} ms step")
            return ms

        streams, capped = search_streams(measure, float(step_ms_audio),
                                         start=1 if dry else 256, max_batch=args.max_batch)
        recs.append(dict(base, mode="realtime_streams", streams=streams, target_streams=2000,
                         capped_at_max_batch=capped))
        print(f"[{name}] concurrent real-time streams at {step_ms_audio} ms steps: {streams}"
              + (" (capped at --max-batch)" if capped else ""))
    return recs


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--gpu", action="store_true", help="GPU benchmark (default when CUDA is present)")
    ap.add_argument("--cpu", action="store_true", help="CPU benchmark even when CUDA is present")
    ap.add_argument("--mask", choices=("banded", "chunked", "both"), default="both",
                    help="attention masks of the GPU benchmark")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--max-batch", type=int, default=16384)
    ap.add_argument("--cpu-steps", type=int, default=5,
                    help="timed steps per batch in the CPU concurrent-streams search")
    ap.add_argument("--cpu-max-batch", type=int, default=256)
    ap.add_argument("--quick", action="store_true",
                    help="CPU: 2 layers, 1 s of audio, 80 ms chunks only, one cold run per "
                         "measurement, batch 1, a 2 s naive window (seconds, not minutes; "
                         "records carry quick=true); GPU: 300 steps")
    ap.add_argument("--dry-run", action="store_true",
                    help="run the GPU benchmark's code path on CPU (tiny model, no CUDA graphs, "
                         "3 steps, batches up to 4) and write nothing")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.reps, args.steps = min(args.seconds, 4.0), 1, min(args.steps, 300)
        if not (args.gpu or (torch.cuda.is_available() and not args.cpu)):
            args.seconds, args.layers = min(args.seconds, 1.0), min(args.layers, 2)
            args.cpu_max_batch, args.cpu_steps = min(args.cpu_max_batch, 1), min(args.cpu_steps, 2)
    if args.dry_run:
        args.steps, args.max_batch = 3, min(args.max_batch, 4)
        bench_gpu(args)
        print("dry run: nothing written")
        return
    gpu = args.gpu or (torch.cuda.is_available() and not args.cpu)
    # each row on disk once measured (a run cut by its time box keeps them)
    recs = JsonlRows("streaming", extra={"quick": True} if args.quick else None)
    (bench_gpu if gpu else bench_cpu)(args, recs)
    print(recs.path or write_jsonl("streaming", []))


if __name__ == "__main__":
    main()
