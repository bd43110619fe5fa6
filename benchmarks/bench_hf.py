"""Hugging Face integration: a wav2vec2-base-sized Wav2Vec2Model (random weights, no download)
patched by pyencoder.hf against the unpatched transformers model with eager and sdpa attention.

Offline: forward time (inference mode) on ``--seconds`` of 16 kHz audio (default 60 s, about 3000
frames), batch ``--batch``; providers hf-eager, hf-sdpa (full attention, as shipped) and
pyencoder (apply_pyencoder_to_wav2vec2 with left=250, right=3 in the first layer, RoPE,
pos_conv="causal", group_norm="running": the streaming configuration, computed offline). Peak
memory (torch.cuda.max_memory_allocated above the weights) on GPU; None on CPU.
Streaming: StreamingEncoder per-step time for 20 ms and 100 ms chunks after ``--warm-seconds`` of
audio were streamed (so the ring holds the full left context), median and quantiles over steps.
GPU runs in bf16 (weights cast), CPU in float32. Records go to
<results root>/<device>/hf.jsonl, each appended as soon as it is measured.

    python -m benchmarks.bench_hf [--quick] [--seconds S] [--batch B]
"""
import argparse
import copy
import time

import torch

from benchmarks._common import JsonlRows, bench, env_info, write_jsonl

SR = 16000
LEFT, RIGHT = 250, 3


def make_model(dtype, device, layers=12):
    from transformers import Wav2Vec2Config, Wav2Vec2Model
    # the base architecture: 12 x 768, group norm (--quick: fewer layers)
    cfg = Wav2Vec2Config(attn_implementation="eager", num_hidden_layers=layers)
    torch.manual_seed(0)
    model = Wav2Vec2Model(cfg).eval()
    return model.to(device=device, dtype=dtype)


def _model_name(args):
    return "wav2vec2-base (random)" if args.layers == 12 else \
        f"wav2vec2-base, {args.layers} layers (random)"


def _peak(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def offline(args, device, dtype, recs=None):
    """Rows appended to ``recs`` (a JsonlRows writes each at once) and returned."""
    import pyencoder.hf as H
    base = make_model(dtype, device, args.layers)
    x = torch.randn(args.batch, int(args.seconds * SR), device=device, dtype=dtype)

    def patched():
        m = copy.deepcopy(base)
        H.apply_pyencoder_to_wav2vec2(m, lookahead_frames=RIGHT, left_frames=LEFT, rope=True,
                                      pos_conv="causal", group_norm="running")
        return m

    def unpatched(impl):
        def make():
            m = copy.deepcopy(base)
            m.set_attn_implementation(impl)
            return m
        return make

    # most valuable first (a run cut by its time box keeps the rows it wrote): ours, then the
    # anchor it is compared with, then eager; each model built only when its turn comes
    providers = {"pyencoder": patched, "hf-sdpa": unpatched("sdpa"),
                 "hf-eager": unpatched("eager")}
    recs = [] if recs is None else recs
    for name, make in providers.items():
        if args.providers and name not in args.providers:
            continue
        m = make()

        def fn(m=m):
            with torch.inference_mode():
                return m(x).last_hidden_state

        try:
            t = bench(fn, warmup=args.warmup_ms, rep=args.rep_ms)
            mem = _peak(fn, device)
        except torch.OutOfMemoryError as e:  # pragma: no cover - GPU only
            print(f"{name}: out of memory ({e})")
            t, mem = {"median_ms": None, "p20_ms": None, "p80_ms": None}, "oom"
        frames = m._get_feat_extract_output_lengths(x.shape[1])
        rec = dict(bench="hf_offline", provider=name, model=_model_name(args),
                   batch=args.batch, seconds=args.seconds, frames=int(frames),
                   dtype=str(dtype).replace("torch.", ""), left=LEFT, right=RIGHT,
                   peak_mem_bytes=mem, **t)
        if t["median_ms"]:
            rec["x_realtime"] = args.seconds * args.batch / (t["median_ms"] / 1e3)
        ms = "-" if t["median_ms"] is None else f"{t['median_ms']:.1f}"
        peak = mem if not isinstance(mem, int) else f"{mem / 2 ** 20:.0f} MiB"
        print(f"{name:10s} median {ms} ms  peak memory {peak or 'not measured (CPU)'}",
              flush=True)
        recs.append(rec)
        del m, fn
    del base
    return recs


def streaming(args, device, dtype, recs=None):
    """Rows appended to ``recs`` (a JsonlRows writes each at once) and returned."""
    import pyencoder.hf as H
    model = make_model(dtype, device, args.layers)
    H.apply_pyencoder_to_wav2vec2(model, lookahead_frames=RIGHT, left_frames=LEFT, rope=True,
                                  pos_conv="causal", group_norm="running")
    enc = H.StreamingEncoder(model)
    recs = [] if recs is None else recs
    for chunk_ms in (20, 100):
        n = SR * chunk_ms // 1000
        state = enc.init_state(args.batch)
        warm = torch.randn(args.batch, int(args.warm_seconds * SR), device=device, dtype=dtype)
        with torch.inference_mode():
            for t in range(0, warm.shape[1], 3200):
                _, state = enc.step(warm[:, t:t + 3200], state)
            chunk = torch.randn(args.batch, n, device=device, dtype=dtype)
            times = []
            for _ in range(args.steps):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                _, state = enc.step(chunk, state)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
        rec = dict(bench="hf_streaming_step", provider="pyencoder-StreamingEncoder",
                   model=_model_name(args), batch=args.batch, chunk_ms=chunk_ms,
                   chunk_samples=n, steps=args.steps, dtype=str(dtype).replace("torch.", ""),
                   left=LEFT, right=RIGHT, median_ms=q(0.5), p20_ms=q(0.2), p80_ms=q(0.8),
                   lookahead_ms=H.latency(model).lookahead_ms)
        print(f"stream step {chunk_ms} ms chunk: median {rec['median_ms']:.2f} ms")
        recs.append(rec)
    return recs


def main(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--quick", action="store_true",
                   help="GPU: 10 s audio, fewer steps; CPU: 2 layers, 1 s audio, 3 steps after "
                        "0.5 s of warm-up (seconds, not minutes); records carry quick=true")
    p.add_argument("--layers", type=int, default=None, help="transformer layers (default 12)")
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warm-seconds", type=float, default=None)
    p.add_argument("--providers", nargs="*", default=None)
    p.add_argument("--no-stream", action="store_true")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gpu = device.type == "cuda"
    cpu_quick = args.quick and not gpu
    if args.layers is None:
        args.layers = 2 if cpu_quick else 12
    if args.seconds is None:
        args.seconds = (1.0 if cpu_quick else 10.0) if args.quick else 60.0
    if args.steps is None:
        args.steps = (3 if cpu_quick else 20) if args.quick else (200 if gpu else 50)
    if args.warm_seconds is None:
        args.warm_seconds = 0.5 if cpu_quick else 6.0
    args.warmup_ms = 25 if gpu else 1
    args.rep_ms = 200 if gpu else 1
    print(env_info()["device_name"], dtype, f"{args.seconds} s x {args.batch}, "
          f"{args.layers} layers")
    if cpu_quick:
        print("(quick: 1 s of audio through 2 layers, a smoke run of both paths; the patched "
              "model computes a different, causal function, and at this size its fixed costs "
              "weigh: the README's table is the 60 s measurement)")
    # each row on disk once measured (a run cut by its time box keeps them)
    recs = JsonlRows("hf", extra={"quick": True} if args.quick else None)
    offline(args, device, dtype, recs)
    if not args.no_stream:
        streaming(args, device, dtype, recs)
    print("wrote", recs.path or write_jsonl("hf", []))


if __name__ == "__main__":
    main()
