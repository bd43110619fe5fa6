"""The feature extractors' norms on their Triton kernels against the torch paths they replace
where autograd does not record: the running GroupNorm (wav2vec2-base's conv layer 0 made causal;
pyencoder.nn.norm) and the channel LayerNorm + GELU of a "layer" extractor (wav2vec2-large-lv60 /
HuBERT-large / WavLM-large's conv layers; pyencoder.models.frontend.ChannelLayerNorm.norm_gelu).

    python -m benchmarks.bench_running_norm [--quick] [--no-write] [--dry-run]

Providers (GPU, bf16, C = 512)
- kernel: pyencoder.nn.norm.running_norm under no_grad (one launch: _running_norm_step_kernel;
  the offline call rounds its tile count up to a power of two);
- torch: running_norm_torch, the differentiable path (float64 blocks sized for the GPU: 32 MiB
  temporaries), what runs while autograd records;
- torch-cpu-blocks: the torch path with the CPU's 1 MiB blocks, which the GPU ran before the
  kernel (~15 small kernels per block of 32 frames at batch 8): the cost that was removed.
Channel norm (rows ``norm="channel"``; the others ``norm="running"``): kernel (one launch of
_channel_norm_act_kernel) against torch (layer_norm over the transposed view, which CUDA copies to
contiguous first, then the GELU: three kernels).
Shapes: offline B = 8, T = 32000 (10 s of 16 kHz audio after the 5x stride; --quick: T = 8000)
and a streaming step B = 1, T = 256 (80 ms; every provider from the same running sums).
Records: median / p20 / p80 ms, GB/s of x read + y written, ``speedup_vs_torch``; JSON lines to
<results root>/<device>/running_norm.jsonl as measured.
--dry-run: the same code on CPU at tiny shapes (the kernel through the interpreter; nothing
timed seriously, nothing written).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import JsonlRows, bench, env_info  # noqa: E402

C = 512


def _providers():
    from pyencoder.nn import norm

    def kernel(*a):
        with torch.no_grad():
            return norm.running_norm(*a)

    def cpu_blocks(*a):
        saved = norm._GPU_BLOCK, norm._GPU_BLOCK_ELEMS
        norm._GPU_BLOCK, norm._GPU_BLOCK_ELEMS = norm.BLOCK, norm._BLOCK_ELEMS
        try:
            return norm.running_norm_torch(*a)
        finally:
            norm._GPU_BLOCK, norm._GPU_BLOCK_ELEMS = saved
    return {"kernel": kernel, "torch": norm.running_norm_torch, "torch-cpu-blocks": cpu_blocks}


def _channel_providers(ln):
    """ChannelLayerNorm ``ln`` + GELU: its kernel (norm_gelu under no_grad) and torch's ops."""
    def kernel(x):
        with torch.no_grad():
            return ln.norm_gelu(x)

    def torch_ops(x):
        with torch.no_grad():
            return torch.nn.functional.gelu(ln(x))
    return {"kernel": kernel, "torch": torch_ops}


def _row(recs, norm, mode, name, B, c, T, dt, x, y, ref, t, base_ms):
    err = float((y.float() - ref).abs().max())
    gbs = 2 * x.numel() * x.element_size() / (t["median_ms"] * 1e-3) / 1e9
    rec = dict(bench="running_norm", norm=norm, mode=mode, provider=name, B=B, C=c, T=T,
               dtype=str(dt).replace("torch.", ""), max_abs_err_vs_torch=err, gbs=gbs,
               speedup_vs_torch=base_ms / t["median_ms"], **t)
    recs.append(rec)
    print(f"{mode:8s} {norm:7s} B={B} T={T:6d} {name:17s} {t['median_ms']:9.3f} ms "
          f"{gbs:8.1f} GB/s  x{rec['speedup_vs_torch']:.2f} vs torch  max |err| {err:.2e}",
          flush=True)


def run(args):
    from pyencoder.ops import _ring_write_triton as rw
    dev = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if args.dry_run:
        rw.FORCE_INTERPRET = True        # the kernel through the interpreter, on CPU tensors
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    shapes = [("offline", 8, 8000 if args.quick else 32000), ("step", 1, 256)]
    if args.dry_run:
        shapes = [("offline", 2, 130), ("step", 1, 16)]
    c = 16 if args.dry_run else C
    recs = JsonlRows("running_norm", write=not (args.no_write or args.dry_run),
                     extra={"quick": True} if args.quick else None)
    provs = _providers()
    for mode, B, T in shapes:
        torch.manual_seed(0)
        x = torch.randn(B, c, T, device=dev).to(dt)
        w = (1 + 0.1 * torch.randn(c, device=dev)).to(dt)
        b = (0.1 * torch.randn(c, device=dev)).to(dt)
        n0 = torch.full((B,), 0 if mode == "offline" else 6400, device=dev)
        tot = torch.randn(B, c, dtype=torch.float64, device=dev) * (0 if mode == "offline" else 9)
        tsq = tot * tot / 6400 + (0 if mode == "offline" else 6400)
        ref = None
        base_ms = None
        for name in ("torch", "kernel", "torch-cpu-blocks"):
            if name == "torch-cpu-blocks" and dev != "cuda":
                continue                 # the CPU's blocks are the torch path's there
            fn = provs[name]
            y = fn(x, w, b, 1e-5, n0, tot, tsq)[0]
            if ref is None:
                ref = y.float()
            t = bench(lambda fn=fn: fn(x, w, b, 1e-5, n0, tot, tsq),
                      warmup=1 if args.dry_run else 25, rep=1 if args.dry_run else 100)
            if name == "torch":
                base_ms = t["median_ms"]
            _row(recs, "running", mode, name, B, c, T, dt, x, y, ref, t, base_ms)
        # the channel LayerNorm + GELU at the same shape (a "layer" extractor's conv layer)
        from pyencoder.models.frontend import ChannelLayerNorm
        ln = ChannelLayerNorm(c).to(dev, dt)
        with torch.no_grad():
            ln.weight.copy_(w)
            ln.bias.copy_(b)
        cprovs = _channel_providers(ln)
        ref = cprovs["torch"](x).float()
        for name in ("torch", "kernel"):
            fn = cprovs[name]
            y = fn(x)
            t = bench(lambda fn=fn: fn(x), warmup=1 if args.dry_run else 25,
                      rep=1 if args.dry_run else 100)
            if name == "torch":
                base_ms = t["median_ms"]
            _row(recs, "channel", mode, name, B, c, T, dt, x, y, ref, t, base_ms)
    if args.dry_run:
        print("dry run: nothing written")
    return recs


def main(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--quick", action="store_true", help="offline T = 8000 (2.5 s of audio)")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny shapes, the kernel through the interpreter; writes nothing")
    args = p.parse_args(argv)
    if args.dry_run:     # before the kernels are imported (benchmarks._common imports nothing)
        os.environ["TRITON_INTERPRET"] = "1"
    print(env_info()["device_name"])
    run(args)


if __name__ == "__main__":
    main()
