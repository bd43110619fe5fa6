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
from typing import NamedTuple, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyencoder  # noqa: E402
from pyencoder.nn import (BandedSelfAttention, CausalConv1d, ChunkedSelfAttention,  # noqa
                          Linear, TransformerLayer, Transpose)
from pyencoder.streaming import StreamingSequential, latency  # noqa

from benchmarks._common import JsonlRows, write_jsonl  # noqa: E402

SR = 16000
HOP = 320


def build(layers=12, dim=768, heads=12, ffn=3072, left=250, lookahead=3, conv_dim=512,
          mask="banded", chunk=4, left_chunks=62, norm_first=True):
    """``mask="banded"``: frame p sees [p - left, p + right], right = lookahead in layer 0 and 0
    elsewhere. ``mask="chunked"``: chunks of ``chunk`` frames, ``left_chunks`` chunks of history,
    ``lookahead`` frames past the chunk in layer 0 (0 elsewhere). ``norm_first``: pre-LN layers
    (the benchmark's; wav2vec2-large's), or post-LN (False, wav2vec2-base's)."""
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
        mods.append(TransformerLayer(att, ffn, norm_first=norm_first))
    return StreamingSequential(*mods).eval()


def build_encoder(layers=12, dim=768, heads=12, ffn=3072, left=250, lookahead=3, conv_dim=512,
                  mask="banded", chunk=4, left_chunks=62, norm_first=False, pos_kernel=128,
                  pos_groups=16, feat_norm="group", adapter_layers=0):
    """What ``CausalEncoder.from_hf`` makes of wav2vec2-base (random weights): its valid conv
    extractor (the first conv layer's GroupNorm streamed as the running GroupNorm), the feature
    projection's LayerNorm, the causal positional conv (``pos_kernel`` taps, ``pos_groups``
    groups, GELU), post-LN layers (``norm_first=False``) with the mask of ``build``. Its whole
    step is ``CausalEncoder.step_fixed``. ``feat_norm="layer"``: the extractor of
    wav2vec2-large-lv60 / HuBERT-large / WavLM-large (a LayerNorm over channels and a GELU after
    every conv). ``adapter_layers``: transformers' conv adapter after the encoder
    (``config.add_adapter``: that many kernel-3, stride-2 Conv1d + GLU layers, padding 1)."""
    from pyencoder.models import CausalEncoder, EncoderConfig
    att = dict(attention="band", left=left) if mask == "banded" else dict(
        attention="chunked", chunk_size=chunk, left_chunks=left_chunks)
    if mask not in ("banded", "chunked"):
        raise ValueError(f"mask must be 'banded' or 'chunked'; got {mask!r}")
    cfg = EncoderConfig(conv_dim=(conv_dim,) * 7, feat_extract_norm=feat_norm, hidden_size=dim,
                        num_layers=layers, num_heads=heads, ffn_dim=ffn, norm_first=norm_first,
                        pos_conv="causal", pos_conv_kernel=pos_kernel,
                        pos_conv_groups=pos_groups, lookahead=lookahead,
                        lookahead_layers="first", add_adapter=adapter_layers > 0,
                        num_adapter_layers=max(1, adapter_layers), **att)
    return CausalEncoder(cfg).eval()


def _time(fn, reps=3, warm=True):
    from benchmarks._common import wall_times
    return wall_times(fn, reps, warm)[0]


def _floor(model, x, t_off, chunk_ms=80):
    """Lower bound of streaming compute at ``chunk_ms`` chunks on this machine: every step reads
    every weight once (batch 1: no reuse across steps, the weights do not fit in cache), at best at
    the measured read bandwidth (a 512 MB torch.sum), plus the conv extractor streamed alone
    (compute-bound, as much work as offline). Ratio to the offline compute."""
    # the conv extractor's weights are read by its own streamed run (t_conv) below: not twice
    wbytes = sum(p.numel() * p.element_size() for m in model if not isinstance(m, CausalConv1d)
                 for p in m.parameters())
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

    found = search_streams(measure, float(chunk_ms), start=1, max_batch=args.cpu_max_batch)
    recs.append(dict(base, mode="realtime_streams", chunk_ms=chunk_ms, step_ms=chunk_ms,
                     streams=found.streams, streams_upper=found.upper,
                     capped_at_max_batch=found.capped, target_streams=None))
    print(f"concurrent real-time streams at {chunk_ms} ms chunks on this CPU: {found.streams}"
          + (" (capped at --cpu-max-batch: at least this many)" if found.capped else ""))
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

# A/B variants of the 80 ms step (--variants), each a pyencoder.use_backend(...) around its
# capture: "conv-triton" runs the feature extractor's dense strided convs as one Triton launch
# each (state and GELU fused) where a CUDA build runs them through cuDNN (cat, conv, GELU: the
# 7 convs' 21 kernels + 7 history copies against 7 + 7); cuDNN won offline on the H100 (2.1 vs
# 28.7 ms), steps of 4-256 frames were never timed
STEP_VARIANTS = {"conv-triton": dict(conv="triton")}
# Model variants of the 80 ms step (--variants): "encoder" is what users capture, the
# converted wav2vec2-base CausalEncoder's whole step_fixed (build_encoder: running GroupNorm,
# valid convs, the 128-tap grouped positional conv, post-LN layers; chunked mask as GPU_MASKS),
# where the stack above is its layers behind a LayerNorm-free causal conv front end
# (benchmarks.count_step_kernels --model encoder: 145 kernels against the stack's 139)
def build_decoder(dim=768, ffn=3072, **_):
    """FocalCodec-Stream's causal ConvNeXt decoder (pyencoder.models.DecoderConfig's defaults:
    1024-d codec frames in, a causal conv embed, 8 ConvNeXt blocks of width 512 (1536 inside),
    320 samples a frame) at the GPU dims; scaled down with the dry run's (dim < 512). Its 80 ms
    step is 4 frames in, 1280 samples out."""
    from pyencoder.models import DecoderConfig, StreamingDecoder
    d = dict(input_dim=1024, dim=512, intermediate_dim=1536) if dim >= 512 else \
        dict(input_dim=2 * dim, dim=dim, intermediate_dim=ffn)
    return StreamingDecoder(DecoderConfig(**d)).eval()


# "decoder": the other side of a codec stream, FocalCodec-Stream's decoder's 80 ms step
# (count_step_kernels --model decoder: 71 kernels)
MODEL_VARIANTS = {"encoder": build_encoder, "decoder": build_decoder}


def _step_input(model, B, step_frames, device, dtype):
    """A step's input: audio (B, 1, step_frames * HOP), or a decoder's frames (B, step_frames,
    input_dim)."""
    if hasattr(model, "samples_per_frame"):
        return torch.randn(B, step_frames, model.config.input_dim, device=device, dtype=dtype)
    return torch.randn(B, 1, HOP * step_frames, device=device, dtype=dtype)


def _warm_steps(model, step_frames):
    """General steps that bring every layer to the steady state step_fixed needs (a
    CausalEncoder: its layers, plus one step for its valid convs' first windows)."""
    layers = getattr(model, "layers", None) or getattr(model, "net", model)
    la = sum(m.attention.lookahead_frames + m.attention.block for m in layers
             if isinstance(m, TransformerLayer))
    return -(-la // step_frames) + 2 + (layers is not model)


class StepRunner:
    """One batch of B streams at steady state, advanced by ``step_fixed``: captured in a CUDA graph
    (``graph=True``; static input buffer ``x``, warm-up on a side stream before capture, then only
    ``replay``) or run eagerly (``--dry-run``: same code path, no graph). Each call first copies
    the next chunk of a small device-resident pool of audio into ``x`` (what a server does before
    a replay), then advances every stream by one step."""

    def __init__(self, model, B, device, dtype, step_frames, graph):
        self.model, self.graph = model, None
        self.pool = torch.stack([_step_input(model, B, step_frames, device, dtype)
                                 for _ in range(4)])
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

    def eager(self):
        """The same streams (model, state, input buffer) advanced by launching ``step_fixed``
        directly instead of replaying the graph (a profile of each kernel on its own)."""
        other = object.__new__(StepRunner)
        other.__dict__.update(self.__dict__, graph=None)
        return other

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


class Search(NamedTuple):
    """Result of ``search_streams``: ``streams`` fits the budget (0: no batch >= 1 does);
    ``upper``: the smallest batch measured not to fit (None: none failed), so the answer lies in
    [streams, upper); ``capped``: max_batch itself fits; ``cut``: the deadline stopped the search
    before its resolution was reached (``streams`` is then a lower bound only)."""
    streams: int
    capped: bool
    upper: Optional[int]
    cut: bool


def search_streams(measure, budget_ms, start=256, max_batch=16384, resolution=32,
                   deadline=None):
    """Largest batch B <= max_batch with ``measure(B)`` (ms per step; None = does not fit) within
    ``budget_ms``: doubling from ``start``, then bisection until the bracket is at most
    1/``resolution`` of the batch found (exact below ``resolution``). ``deadline`` (a
    time.monotonic() value): no measurement starts after it, except the first. Returns a
    ``Search``."""
    ok = lambda b: (lambda ms: ms is not None and ms <= budget_ms)(measure(b))  # noqa: E731
    late = lambda: deadline is not None and time.monotonic() >= deadline  # noqa: E731
    lo, hi, B = 0, None, max(1, min(start, max_batch))
    first = True
    while hi is None:
        if not first and late():
            return Search(lo, False, None, True)
        first = False
        if ok(B):
            lo = B
            if B == max_batch:
                return Search(lo, True, None, False)
            B = min(2 * B, max_batch)
        else:
            hi = B
    while hi - lo > max(1, lo // resolution):
        if late():
            return Search(lo, False, hi, True)
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return Search(lo, False, hi, False)


def _fits(model, B, dtype, step_frames):
    """Rough pre-check on CUDA: the streaming state (sized on the meta device) x 1.5 for
    activations must fit in free memory, so large batches fail here rather than mid-capture."""
    st = model.init_state(B, device="meta", dtype=dtype, max_chunk=step_frames)
    free, _ = torch.cuda.mem_get_info()
    return 1.5 * st.nbytes() + 64 * 2 ** 20 < free


# Kernel kinds of a step's profile, first match wins (cuBLAS / CUTLASS GEMMs are named nvjet_*,
# sm90_xmma_*, cutlass*, *gemm* / *gemv* (+ splitKreduce); pyencoder._C's depthwise conv kernels
# dw_*; the CPU dry run profiles aten ops, named aten::*).
KERNEL_KINDS = (
    ("gemm", r"gemm|gemv|splitk|nvjet|xmma|cutlass|cublas|addmm|aten::mm|aten::bmm|aten::linear"),
    ("attention", r"decode_attention|interval_attention"),
    ("ring_write", r"ring_write|residual_kernel"),
    ("conv", r"conv|dw_update|dw_final_state|dw_dweight"),
    ("norm", r"layer_norm|layernorm"),
    ("copy", r"copy|index_put|scatter|gather|memcpy|memset|fill|clone"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce|gelu|add|mul|remainder"),
)


def kernel_kind(name):
    import re
    low = name.lower()
    for kind, pat in KERNEL_KINDS:
        if re.search(pat, low):
            return kind
    return "other"


def profile_step(run, steps, cuda, top=15):
    """Where one step's device time goes: ``run`` called ``steps`` times under torch.profiler.
    GPU: the CUDA kernels (device type CUDA entries of key_averages, self device time; kernels
    replayed by a CUDA graph are reported per kernel by CUPTI); CPU (the dry run): the aten ops'
    self CPU time, so the code path runs. Returns kernels_per_step, kernel_us_per_step (summed
    durations: against the step's GPU time, the rest is idle time between kernels), kinds
    (``KERNEL_KINDS``: us per step each) and the ``top`` entries (name cut to 120 characters,
    kind, calls_per_step, us_per_step)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            run()
        if cuda:
            torch.cuda.synchronize()
    dev_cuda = getattr(torch.autograd.DeviceType, "CUDA", None)
    rows = []
    for e in prof.key_averages():
        is_dev = getattr(e, "device_type", None) == dev_cuda
        if cuda != is_dev:
            continue
        name = str(getattr(e, "key", "?"))
        if not cuda and not name.startswith("aten::"):
            continue
        us = getattr(e, "self_device_time_total", None) if cuda else None
        if us is None:
            us = getattr(e, "self_cuda_time_total" if cuda else "self_cpu_time_total", 0.0)
        rows.append(dict(name=name[:120], kind=kernel_kind(name),
                         calls_per_step=int(getattr(e, "count", 0)) / steps,
                         us_per_step=float(us) / steps))
    rows.sort(key=lambda r: -r["us_per_step"])
    kinds = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0.0) + r["us_per_step"]
    return dict(kernels_per_step=sum(r["calls_per_step"] for r in rows),
                kernel_us_per_step=sum(r["us_per_step"] for r in rows),
                kinds=dict(sorted(kinds.items(), key=lambda kv: -kv[1])), top=rows[:top])


def _print_profile(name, source, prof, gpu_us=None):
    gap = ""
    if gpu_us is not None:
        idle = max(gpu_us - prof["kernel_us_per_step"], 0.0)
        gap = f" of {gpu_us:.0f} us GPU time per step ({idle:.0f} us idle between kernels)"
    print(f"[{name}] step profile ({source}): {prof['kernels_per_step']:.0f} kernels, "
          f"{prof['kernel_us_per_step']:.0f} us of kernels{gap}; by kind: "
          + ", ".join(f"{k} {v:.0f}" for k, v in prof["kinds"].items()))
    for r in prof["top"][:8]:
        print(f"    {r['us_per_step']:8.1f} us {r['calls_per_step']:5.1f}x  {r['kind']:11s} "
              f"{r['name'][:90]}")


def _latency_rows(name, model, base, sf, step_ms_audio, args, recs, sources):
    """Batch-1 step latency (wall and GPU p50 / p99) of ``model``'s step_fixed, then the kernel
    profile of each of ``sources`` ("graph": the replayed graph, what the latency measured;
    "eager": the same step_fixed launched eagerly, each kernel's own duration). Appends rows."""
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    graph = not dry
    label = name + (f", variant {base['variant']}" if base.get("variant") else "")
    tag = f"[{label}]"
    run = StepRunner(model, 1, device, torch.bfloat16, sf, graph)
    for _ in range(3 if dry else 50):
        run()
    if not dry:
        torch.cuda.synchronize()
    wall, gpu = _timed(run, args.steps, cuda=not dry)
    rec = dict(base, mode="step_latency", batch=1, steps=args.steps,
               p50_ms=_q(wall, 0.5), p99_ms=_q(wall, 0.99), gpu_p50_ms=_q(gpu, 0.5),
               gpu_p99_ms=_q(gpu, 0.99), target_p99_ms=2.0, step_ms_all=wall)
    recs.append(rec)
    print(f"{tag} batch 1, {step_ms_audio} ms steps: wall p50 {rec['p50_ms']:.3f} ms, "
          f"p99 {rec['p99_ms']:.3f} ms" + ("" if dry else
                                          f"; GPU p50 {rec['gpu_p50_ms']:.3f} ms, "
                                          f"p99 {rec['gpu_p99_ms']:.3f} ms"))
    n_prof = 2 if dry else args.profile_steps
    fns = {"graph": run if graph else None, "eager": run.eager()}
    for source in sources:
        fn = fns[source]
        if fn is None:
            continue
        try:
            prof = profile_step(fn, n_prof, cuda=not dry)
        except Exception as e:  # noqa: BLE001 - a profiler failure must not cost the rows
            recs.append(dict(base, mode="step_profile", batch=1, source=source,
                             error=f"{type(e).__name__}: {e}"[:300]))
            print(f"{tag} step profile ({source}) failed: {type(e).__name__}: {e}")
            continue
        gpu_us = None if dry else rec["gpu_p50_ms"] * 1e3
        recs.append(dict(base, mode="step_profile", batch=1, source=source, steps=n_prof,
                         gpu_p50_us=gpu_us, **prof))
        _print_profile(label, source, prof, gpu_us if source == "graph" else None)
    del run, fns


def bench_gpu(args, recs=None):
    """Per mask: batch-1 step latency and its kernel profile first (both masks), then the
    concurrent-streams searches, which share what is left of ``--max-seconds``."""
    t_start = time.monotonic()
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    dtype = torch.bfloat16
    graph = not dry
    masks = list(GPU_MASKS) if args.mask == "both" else [args.mask]
    dims = DRY if dry else dict(layers=args.layers, dim=768, heads=12, ffn=3072, conv_dim=512)
    recs = [] if recs is None else recs    # a JsonlRows writes each row as it is appended
    built = {}
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
        built[name] = (model, base, sf, step_ms_audio)
        _latency_rows(name, model, base, sf, step_ms_audio, args, recs, ("graph", "eager"))
    # the A/B variants of the 80 ms step (the 2 ms target's), batch-1 latency and graph profile
    for vname in args.variants:
        name = "chunked" if "chunked" in built else masks[0]
        model, base, sf, step_ms_audio = built[name]
        try:
            backend = STEP_VARIANTS.get(vname, {})
            if vname in MODEL_VARIANTS:
                torch.manual_seed(0)
                cfg = {k: v for k, v in GPU_MASKS[name].items() if k != "step_frames"}
                model = MODEL_VARIANTS[vname](**dims, **cfg).to(device, dtype)
                if vname == "decoder":
                    c = model.config
                    base = dict(base, model=type(model).__name__, input_dim=c.input_dim,
                                dim=c.dim, ffn=c.intermediate_dim, layers=c.num_blocks,
                                samples_per_frame=c.samples_per_frame,
                                latency_ms=model.latency()["ms"])
                else:
                    base = dict(base, model=type(model).__name__, norm_first=False,
                                feat_extract_norm="group", pos_conv_kernel=128,
                                latency_ms=latency(model).ms)
            with pyencoder.use_backend(**backend):
                _latency_rows(name, model, dict(base, variant=vname), sf, step_ms_audio, args,
                              recs, ("graph",) if graph else ("eager",))
        except Exception as e:  # noqa: BLE001 - a variant must not cost the searches
            recs.append(dict(base, variant=vname, mode="variant_error", batch=1,
                             error=f"{type(e).__name__}: {e}"[:300]))
            print(f"[{name}] variant {vname} failed: {type(e).__name__}: {e}")
    searches = masks if args.max_batch > 0 else []
    for i, name in enumerate(searches):
        model, base, sf, step_ms_audio = built[name]
        deadline = None
        if args.max_seconds is not None:
            left = args.max_seconds - (time.monotonic() - t_start)
            deadline = time.monotonic() + max(left, 0.0) / (len(searches) - i)

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

        found = search_streams(measure, float(step_ms_audio),
                               start=1 if dry else args.start_batch, max_batch=args.max_batch,
                               resolution=args.resolution, deadline=deadline)
        recs.append(dict(base, mode="realtime_streams", streams=found.streams,
                         streams_upper=found.upper, search_cut=found.cut,
                         resolution=args.resolution, target_streams=2000,
                         capped_at_max_batch=found.capped))
        print(f"[{name}] concurrent real-time streams at {step_ms_audio} ms steps: "
              f"{found.streams}" + (" (capped at --max-batch)" if found.capped else "")
              + (f" (fewer than {found.upper})" if found.upper else "")
              + (" (search cut by --max-seconds: a lower bound)" if found.cut else ""))
    return recs


def main(argv=None):
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--gpu", action="store_true", help="GPU benchmark (default when CUDA is present)")
    ap.add_argument("--cpu", action="store_true", help="CPU benchmark even when CUDA is present")
    ap.add_argument("--mask", choices=("banded", "chunked", "both"), default="both",
                    help="attention masks of the GPU benchmark")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--max-batch", type=int, default=16384,
                    help="largest batch of the concurrent-streams search (0: no search)")
    ap.add_argument("--start-batch", type=int, default=256,
                    help="GPU: the search's first batch (doubled until a step misses its time)")
    ap.add_argument("--resolution", type=int, default=32,
                    help="GPU: bisect until the bracket is within 1/RESOLUTION of the answer")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="GPU: no search measurement starts after this many seconds of the run "
                         "(the batch-1 latency and profile always run; the masks' searches "
                         "share what is left; a cut search reports a lower bound)")
    ap.add_argument("--profile-steps", type=int, default=20,
                    help="GPU: steps under torch.profiler per mask and source (graph, eager)")
    ap.add_argument("--cpu-steps", type=int, default=5,
                    help="timed steps per batch in the CPU concurrent-streams search")
    ap.add_argument("--cpu-max-batch", type=int, default=256)
    ap.add_argument("--quick", action="store_true",
                    help="CPU: 2 layers, 1 s of audio, 80 ms chunks only, one cold run per "
                         "measurement, batch 1, a 2 s naive window (seconds, not minutes; "
                         "records carry quick=true); GPU: 300 steps, the search from batch "
                         "2048 (the target) to 1/8 resolution")
    variants = sorted(STEP_VARIANTS) + sorted(MODEL_VARIANTS)
    ap.add_argument("--variants", nargs="*", choices=variants, default=variants,
                    help="GPU: A/B variants of the chunked (80 ms) batch-1 step, after the "
                         "masks' latencies (rows carry variant=NAME; none: --variants): "
                         "conv-triton (the stack's strided convs on the triton backend), "
                         "encoder (the converted wav2vec2-base CausalEncoder's whole step)")
    ap.add_argument("--dry-run", action="store_true",
                    help="run the GPU benchmark's code path on CPU (tiny model, no CUDA graphs, "
                         "3 steps, batches up to 4) and write nothing")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.reps, args.steps = min(args.seconds, 4.0), 1, min(args.steps, 300)
        args.start_batch, args.resolution = max(args.start_batch, 2048), min(args.resolution, 8)
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
