"""`python -m pyencoder demo`: the main job on whatever device is present, in this order.

1. Streaming: a speech clip (3 s with --quick, else the whole 9.3 s bundled clip)
   streamed in 80 ms chunks through a causal wav2vec2-base-geometry encoder (random weights unless
   --checkpoint) with RoPE attention, left=250 frames and 3 frames (60 ms) of lookahead in layer 0,
   compared with the offline output (a transformers Wav2Vec2Model patched by pyencoder.hf; without
   transformers installed, pyencoder.models.CausalEncoder of the same geometry); prints
   per-chunk compute, the real-time factor (compute time / audio duration: below 1 keeps up
   with live audio, above 1 is slower than real time) and the algorithmic latency. On a GPU the model streams there (float32): a few eager chunks, then the
   steady step captured once in a CUDA graph (pyencoder.streaming.CudaGraphStep) and replayed per
   chunk; if anything fails there it says why and streams on the CPU instead.
2. Kernel check: a wav2vec2-base-sized banded attention problem (B=1, 12 heads, head_dim 64,
   N=1500 frames = 30 s at 50 Hz, left=250, right=3, RoPE) computed by every available backend,
   with the maximum difference from the reference and the median time, against SDPA with a dense
   N x N mask.

Before and after, it prints the device, torch's thread count and the load average, and warns when
the machine is busy (1-minute load average above the usable cores): timings are then slower and
noisier than on a quiet machine, and the CPU path runs with fewer threads (pyencoder._cpu_threads).
"""
import os
import time

import torch


def _time(fn, reps, sync):
    fn()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def _usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_warning(load, cores, where="below"):
    """A warning line when the 1-minute load average exceeds the usable cores, else None."""
    if load is None or load <= cores:
        return None
    return (f"WARNING: this machine is busy (1-minute load average {load:.2f} > {cores} usable "
            f"cores): other processes compete for the CPU, so the times {where} are slower and "
            f"noisier than on a quiet machine.")


def machine_line(load, cores, threads, policy, cuda):
    dev = "cuda + cpu" if cuda else "cpu"
    return (f"== machine: {dev}, {cores} usable cores, torch threads {threads} "
            f"(PYENCODER_CPU_THREADS={policy}: the CPU path lowers this per call for small work "
            f"or a busy machine), 1-minute load average "
            f"{'n/a' if load is None else f'{load:.1f}'}")


def _load():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def report_machine(when):
    cores, load = _usable_cores(), _load()
    if when == "start":
        print(machine_line(load, cores, torch.get_num_threads(),
                           os.environ.get("PYENCODER_CPU_THREADS", "auto"),
                           torch.cuda.is_available()))
    elif load is not None:
        print(f"== load average at the end: {load:.1f} ({cores} usable cores)")
    warn = busy_warning(load, cores, "below" if when == "start" else "above")
    if warn:
        print(warn)
    return warn


def rtf_text(rtf):
    """The real-time factor with its meaning."""
    verdict = ("faster than real time: keeps up with live audio" if rtf < 1 else
               "slower than real time: cannot keep up with live audio here")
    return (f"real-time factor {rtf:.3f} = compute time / audio duration: {verdict} "
            f"(below 1 keeps up, above 1 falls behind)")


def kernel_demo(quick=False):
    import pyencoder
    from pyencoder import _backend
    from pyencoder.ops import banded_attention
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    N = 1500 if quick else 3000
    B, H, D, left, right = 1, 12, 64, 250, 3
    print(f"== banded attention, wav2vec2-base sized: B={B} H={H} N={N} D={D} "
          f"left={left} right={right} RoPE, {dtype} on {device}")
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(device, dtype) for _ in range(3))
    rope = pyencoder.Rope(D)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    ref = banded_attention(q.float(), k.float(), v.float(), left=left, right=right, rope=rope,
                           backend="reference")
    flops = 4 * B * H * N * (left + right + 1) * D
    print(f"  {'backend':<10} {'status':<12} {'median ms':>10} {'GFLOP/s':>9} {'max |diff|':>11}")
    for name, (ok, reason) in _backend.backend_info().items():
        if not ok:
            print(f"  {name:<10} {'unavailable':<12} {reason}")
            continue
        args = dict(q=q, k=k, v=v, inv_freq=rope.inv_freq(q.device), key_lengths=None, block=1,
                    lo_off=left, hi_off=right, q_offset=0, k_offset=0, scale=D ** -0.5,
                    interleaved=False)
        why = _backend._reason_for("attention", name, "forward", q.device.type, args)
        if why is not None:
            print(f"  {name:<10} {'skipped':<12} {why}")
            continue
        fn = lambda: banded_attention(q, k, v, left=left, right=right, rope=rope, backend=name)  # noqa
        out = fn()
        diff = (out.float() - ref).abs().max().item()
        t = _time(fn, 3 if quick else 5, sync)
        print(f"  {name:<10} {'ok':<12} {t * 1e3:10.2f} {flops / t / 1e9:9.1f} {diff:11.2e}")
    i = torch.arange(N, device=device)
    mask = (i[None, :] >= i[:, None] - left) & (i[None, :] <= i[:, None] + right)
    pos = torch.arange(N, device=device)

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(
            rope.rotate(q, pos), rope.rotate(k, pos), v, attn_mask=mask)
    out = sdpa()
    t = _time(sdpa, 3 if quick else 5, sync)
    diff = (out.float() - ref).abs().max().item()
    print(f"  {'sdpa+mask':<10} {'baseline':<12} {t * 1e3:10.2f} {flops / t / 1e9:9.1f} "
          f"{diff:11.2e}   (dense N x N mask, separate RoPE pass)")
    if not cuda:
        from pyencoder import _cpu_threads
        print(f"  (CPU threads: sdpa+mask {torch.get_num_threads()}, reference "
              f"{_cpu_threads.choose(flops)} per call now: PYENCODER_CPU_THREADS="
              f"{os.environ.get('PYENCODER_CPU_THREADS', 'auto')})")


def _build_native_model(lookahead_frames, left_frames):
    """pyencoder.models.CausalEncoder with wav2vec2-base's geometry and the patch's options
    (random weights): the demo's model without transformers."""
    from pyencoder.models import CausalEncoder, EncoderConfig
    torch.manual_seed(0)
    cfg = EncoderConfig(left=left_frames, lookahead=lookahead_frames, lookahead_layers="first",
                        pos_conv="causal")
    return CausalEncoder(cfg).eval(), ("pyencoder.models.CausalEncoder, wav2vec2-base geometry, "
                                       "random weights; transformers is not installed: "
                                       "pip install 'pyencoder[hf]' for the HF patch")


def _build_hf_model(checkpoint, lookahead_frames, left_frames):
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None, "transformers is not installed (pip install 'pyencoder[hf]')"
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    import pyencoder.hf as phf
    if checkpoint:
        model = Wav2Vec2Model.from_pretrained(checkpoint, attn_implementation="pyencoder")
        what = f"checkpoint {checkpoint}"
    else:
        torch.manual_seed(0)
        model = Wav2Vec2Model(Wav2Vec2Config())  # wav2vec2-base geometry, random weights
        what = "wav2vec2-base geometry, random weights"
    model.eval()
    phf.apply_pyencoder_to_wav2vec2(model, lookahead_frames=lookahead_frames,
                                    left_frames=left_frames, lookahead_layers="first", rope=True,
                                    pos_conv="causal", group_norm="running")
    return model, what


def streaming_demo(quick=False, checkpoint=None, chunk_ms=80, lookahead_frames=3,
                   left_frames=250):
    if isinstance(chunk_ms, bool) or not isinstance(chunk_ms, (int, float)) or \
            not chunk_ms * 16 >= 1:
        raise ValueError(f"chunk_ms must be a number giving at least one 16 kHz sample per chunk "
                         f"(>= 0.0625); got {chunk_ms!r}")
    from pyencoder.data import load_speech
    model, what = _build_hf_model(checkpoint, lookahead_frames, left_frames)
    if model is None:
        if checkpoint:          # the checkpoint asked for cannot run: not a silent skip
            raise SystemExit(f"demo --checkpoint: {what}")
        model, what = _build_native_model(lookahead_frames, left_frames)
    audio, sr = load_speech()
    if quick:
        audio = audio[: 3 * sr]
    audio = audio[None]
    if _is_native(model):
        lat = model.latency()
        attention_ms = lookahead_frames * 1000.0 * lat.hop / sr
        frontend_ms = lat.lookahead_ms - attention_ms
    else:
        import pyencoder.hf as phf
        lat = phf.latency(model)
        attention_ms, frontend_ms = lat.attention_ms, lat.frontend_ms
    print(f"== streaming a {audio.shape[1] / sr:.2f} s speech clip through a causal encoder "
          f"({what})")
    print(f"   attention: RoPE band, left={left_frames} frames, {lookahead_frames} frames "
          f"lookahead in layer 0")
    print(f"   algorithmic latency: {lat.lookahead_ms:.1f} ms lookahead = {attention_ms:.0f} ms "
          f"attention + {frontend_ms:.0f} ms feature extractor (plus the "
          f"{lat.hop * 1000 / sr:.0f} ms hop a frame itself spans)")
    chunk = int(sr * chunk_ms / 1000)
    run = None
    if torch.cuda.is_available():
        try:
            run = _stream_on(model, audio, chunk, chunk_ms, "cuda")
        except Exception as e:  # noqa: BLE001 - the demo falls back to the CPU, saying why
            print(f"   streaming on the GPU failed ({type(e).__name__}: {e}); on the CPU instead")
            model.to("cpu")
    if run is None:
        run = _stream_on(model, audio, chunk, chunk_ms, "cpu")
    streamed, offline, times, t_flush, t_off, how = run
    diff = (streamed - offline).abs().max().item()
    scale = offline.abs().max().item()
    times.sort()
    p50 = times[len(times) // 2] * 1e3
    p99 = times[min(len(times) - 1, int(0.99 * len(times)))] * 1e3
    # every call's compute, the final flush's too (it emits the held-back frames)
    rtf = (sum(times) + t_flush) / (audio.shape[1] / sr)
    print(f"   frames: streamed {streamed.shape[1]}, offline {offline.shape[1]}")
    print(f"   per-chunk compute ({how}): p50 {p50:.1f} ms, p99 {p99:.1f} ms for {chunk_ms} ms "
          f"chunks (offline pass {t_off * 1e3:.0f} ms)")
    print(f"   {rtf_text(rtf)}")
    print(f"   max |streamed - offline| = {diff:.2e} (output scale {scale:.2f})")
    return diff / max(scale, 1e-6)


def _stream_on(model, audio, chunk, chunk_ms, device, graph_step=None):
    """Stream ``audio`` through ``model`` (patched) on ``device`` in chunks of ``chunk`` samples:
    on a GPU the steady chunks replay one CUDA graph of the whole step (``graph_step``, default
    pyencoder.streaming.CudaGraphStep, built once the stream is steady), the rest run the
    general step. Returns (streamed, offline, per-chunk seconds, the final flush's seconds,
    offline seconds, what ran).
    ``model``: a patched transformers model (streamed by pyencoder.hf.StreamingEncoder) or a
    pyencoder.models.CausalEncoder (streamed itself)."""
    cuda = device == "cuda"
    if graph_step is None and cuda:
        from pyencoder.streaming import CudaGraphStep as graph_step
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model.to(device)
    audio = audio.to(device)
    with torch.no_grad():
        if cuda:
            model(audio[:, :16000])                # first-call work (compiles) off the clock
            sync()
        t0 = time.perf_counter()
        offline = model(audio).last_hidden_state
        sync()
        t_off = time.perf_counter() - t0
        if _is_native(model):
            enc = model
        else:
            import pyencoder.hf as phf
            enc = phf.StreamingEncoder(model)
        state = enc.init_state(1)
        outs, times, graph = [], [], None
        how = "eager, CPU" if not cuda else "eager, GPU"
        n_chunks = (audio.shape[1] + chunk - 1) // chunk
        for i, t in enumerate(range(0, audio.shape[1], chunk)):
            x = audio[:, t:t + chunk]
            full = x.shape[1] == chunk
            if graph_step is not None and graph is None and full and i >= 4:
                try:                               # steady by now: capture the step once
                    graph = graph_step(enc, state, x)
                    how = f"CUDA graph, {device.upper()}"
                except Exception as e:  # noqa: BLE001 - not steady, or no capture: eager
                    print(f"   (no CUDA graph: {type(e).__name__}: {e}; eager steps instead)")
                    graph = False
            sync()
            t1 = time.perf_counter()
            if graph and full:
                y = graph(x).clone()
            else:
                y, state = enc.step(x, state)
            sync()
            times.append(time.perf_counter() - t1)
            outs.append(y)
            done = sum(o.shape[1] for o in outs)
            if i % max(1, n_chunks // 10) == 0 or i == n_chunks - 1:
                print(f"   chunk {i + 1:4d}/{n_chunks}: +{y.shape[1]} frames (total {done:4d}), "
                      f"{times[-1] * 1e3:6.1f} ms compute for {chunk_ms * x.shape[1] / chunk:g} "
                      f"ms of audio")
        sync()
        t1 = time.perf_counter()
        y, state = enc.flush(state)
        sync()
        t_flush = time.perf_counter() - t1
        outs.append(y)
    return torch.cat(outs, dim=1), offline, times, t_flush, t_off, how


def _is_native(model):
    from pyencoder.models import CausalEncoder
    return isinstance(model, CausalEncoder)


def main(args):
    torch.manual_seed(0)
    quick = getattr(args, "quick", False)
    ckpt = getattr(args, "checkpoint", None)
    if ckpt is not None and not os.path.isfile(os.path.join(ckpt, "config.json")):
        # transformers would take the path for a Hub id and fail ~50 lines later
        raise SystemExit(f"demo --checkpoint: {ckpt!r} is not a local Hugging Face model "
                         f"directory (a folder with config.json and the weights, as "
                         f"save_pretrained writes it; nothing is downloaded)")
    report_machine("start")
    print()
    diff = streaming_demo(quick=quick, checkpoint=getattr(args, "checkpoint", None))
    print()
    kernel_demo(quick=quick or not torch.cuda.is_available())   # the CPU's run stays short
    print()
    report_machine("end")
    if diff is not None and diff > 1e-4:
        print(f"FAILED: streamed output differs from offline by {diff:.2e} of its scale > 1e-4")
        return 1
    if diff is not None:
        print(f"PASSED: streamed output equals offline (max difference {diff:.1e} of the output "
              f"scale, within 1e-4)")
    return 0
