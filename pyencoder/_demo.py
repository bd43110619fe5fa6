"""`python -m pyencoder demo`: the main job on whatever device is present.

1. Kernel check: a wav2vec2-base-sized banded attention problem (12 heads, head_dim 64, 60 s of
   50 Hz frames, left=250, right=3, RoPE) computed by every available backend, with the maximum
   difference from the reference and the time each takes.
2. Streaming (when pyencoder.streaming provides an encoder stack): a short clip streamed chunk by
   chunk through a causal encoder with 60 ms lookahead, compared with the offline output.
"""
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


def main(args):
    torch.manual_seed(0)
    kernel_demo(quick=getattr(args, "quick", False))
    return 0


def latency_main(args):
    raise SystemExit("latency: needs pyencoder.streaming (not available in this build)")
