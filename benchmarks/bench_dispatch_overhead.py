"""Eager dispatcher overhead of a registered op on the streaming step (CPU microbenchmark).

    python -m benchmarks.bench_dispatch_overhead [--calls 20000]

The decode-step attention launcher (pyencoder.ops._decode_attention_triton) is called with M = 0
pending queries, so its body allocates the output and returns before any kernel launch, once
directly and once through its ``torch.library.triton_op`` (pyencoder::decode_attention_triton):
the difference is the dispatcher's cost per call (custom-op dispatch, autograd and
ADInplaceOrView keys, the triton_op's eager wrapper). A reference decode step of a
wav2vec2-base-sized layer (H=12, D=64, 4 queries over a 257-entry ring) is timed beside it for
scale. Prints medians of 7 repeats in microseconds per call; writes nothing. Needs triton
installed (no GPU: no kernel runs).
"""
import argparse
import statistics
import time

import torch


def _per_call_us(fn, calls):
    fn()
    reps = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        reps.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(reps)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from pyencoder.ops import _decode_attention_triton as DT
    from pyencoder.reference import decode_attention as DR
    B, H, D, cap = 1, 12, 64, 257
    ring = torch.randn(B, H, cap, D)
    inv = torch.rand(D // 2)
    empty = (torch.randn(B, H, 0, D), ring, ring, torch.zeros(B, 0, dtype=torch.long),
             torch.zeros(B, dtype=torch.long), torch.full((B,), 300), inv, False, 1, 250, 3, 0.125)
    step = (torch.randn(B, H, 4, D), ring, ring, torch.arange(4)[None] + 290,
            torch.full((B,), 4), torch.full((B,), 297), inv, False, 1, 250, 3, 0.125)
    with torch.no_grad():
        direct = _per_call_us(lambda: DT.decode_attention_triton(*empty), args.calls)
        op = _per_call_us(lambda: DT.forward_op(*empty), args.calls)
        ref = _per_call_us(lambda: DR.forward(*step), max(200, args.calls // 20))
    print(f"direct launcher (M=0):        {direct:8.1f} us/call")
    print(f"triton_op (M=0):              {op:8.1f} us/call")
    print(f"dispatcher overhead:          {op - direct:8.1f} us/call")
    print(f"reference decode step (CPU):  {ref:8.1f} us/call (for scale)")


if __name__ == "__main__":
    main()
