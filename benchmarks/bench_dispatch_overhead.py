"""Eager dispatcher overhead of a registered op on the streaming step (CPU microbenchmark).

    python -m benchmarks.bench_dispatch_overhead [--calls 20000]

The decode-step attention launcher (pyencoder.ops._decode_attention_triton) is called with M = 0
pending queries, so its body allocates the output and returns before any kernel launch, once
directly and once through its ``torch.library.triton_op`` (pyencoder::decode_attention_triton):
the difference is the dispatcher's cost per call (custom-op dispatch, autograd and
ADInplaceOrView keys, the triton_op's eager wrapper). A reference decode step of a
wav2vec2-base-sized layer (H=12, D=64, 4 queries over a 257-entry ring) is timed beside it for
scale. Prints medians of 7 repeats in microseconds per call; writes nothing. Needs triton
installed (no GPU: no kernel runs). Then the interval attention forward's host cost on the eager
fast path vs through its registered triton_op (launches stubbed; ``_interval_attention``).
Last, the same call with Triton's own launch path included (``_triton_launch_path``), once with
the fast launch path (PYENCODER_FAST_LAUNCH=1, the default: plans recorded by the first call serve
the launches, and the attention call programs replay whole forwards / backwards) and once through
JITFunction.run every time (=0): a stand-in
driver (sm_90 target, stream 0) lets triton's JITFunction.run bind, specialise and look up the
kernel as on a GPU; only the compile (a stand-in kernel is cached) and the C launcher (a no-op)
are left out; forward and forward+backward, RoPE off and on (the table mode at band(50,3)).
Before that, the custom-op backends (``_custom_op_backends``): host time per call of eager
reference-backend calls (conv update step, causal_conv1d, the grouped positional conv, a streaming
attention chunk; without and with gradients) with the eager fast path (PYENCODER_EAGER_FASTPATH=1:
the op's body directly, pyencoder.ops._call) and through the registered custom ops (=0).
"""
import argparse
import statistics
import time

import torch

from benchmarks._common import temp_env


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
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
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
    _interval_attention(args.calls // 20)
    _custom_op_backends(args.calls)
    _triton_launch_path(args.calls // 40)


def _interval_attention(calls):
    """Host cost of one interval attention forward with gradients (wav2vec2-base: B=8, H=12,
    N=1500, D=64, band(50,3), RoPE) on the eager fast path (pyencoder.ops.attention._EagerTriton)
    and through the registered triton_op (PYENCODER_EAGER_FASTPATH=0): the whole Python path of
    the call, validation included, with the Triton launches replaced by no-ops (no GPU here) and
    the backend pinned to triton. Triton's own launcher cost comes on top on a GPU."""
    import os

    import pyencoder
    from pyencoder import _backend
    from pyencoder.ops import _attention_triton as A

    class _NoLaunch:
        def __getitem__(self, grid):
            return self

        def __call__(self, *args, **kwargs):
            return None
    saved = (A.launch, _backend.select, os.environ.get("PYENCODER_EAGER_FASTPATH"),
             os.environ.get("PYENCODER_TRITON_AUTOTUNE"))
    A.launch = lambda kernel: _NoLaunch()
    _backend.select = lambda *a, **k: "triton"
    os.environ["PYENCODER_TRITON_AUTOTUNE"] = "0"
    try:
        q, k, v = (torch.randn(8, 12, 1500, 64, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        rope = pyencoder.Rope(64)

        def call():
            return pyencoder.ops.banded_attention(q, k, v, left=50, right=3, rope=rope,
                                                  backend="triton")
        res = {}
        for label, flag in (("eager fast path", "1"), ("registered triton_op", "0")):
            os.environ["PYENCODER_EAGER_FASTPATH"] = flag
            res[label] = _per_call_us(call, max(200, calls))
    finally:
        A.launch, _backend.select = saved[:2]
        for name, val in zip(("PYENCODER_EAGER_FASTPATH", "PYENCODER_TRITON_AUTOTUNE"),
                             saved[2:]):
            if val is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = val
    for label, us in res.items():
        print(f"interval attention fwd, {label + ':':22s}{us:8.1f} us/call (launches stubbed)")


def _grad_of(fn, leaves):
    """Gradients of fn().sum() w.r.t. ``leaves``, which require grad for this call only."""
    for t in leaves:
        t.requires_grad_(True)
    try:
        return torch.autograd.grad(fn().sum(), leaves)
    finally:
        for t in leaves:
            t.requires_grad_(False)


def _triton_launch_path(calls):
    """Host cost per call of the eager Triton path with triton's JITFunction.run included
    (module docstring). Run last: it replaces triton's active driver for the process."""
    import os

    import pyencoder
    from pyencoder import _backend
    from pyencoder.ops import _attention_triton as A
    from pyencoder.ops._triton_op import clear_launch_plans
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from benchmarks.triton_cache import TARGET, _FakeDriver

    class _Kernel:
        function, packed_metadata = 0, ()

        def launch_metadata(self, grid, stream, *args):
            return None

        def run(self, *args):
            return None
    stand_in = _Kernel()

    def do_compile(fn, key, signature, device, constexprs, options, attrs, warmup):
        fn.device_caches[device][0][key] = stand_in
        return stand_in
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("triton launch path: skipped (TRITON_INTERPRET=1 has no JITFunction.run)")
        return
    saved = (_backend.select, A._interpret, A._arch, JITFunction._do_compile)
    active = driver._active         # None here (no GPU driver), set lazily on a GPU machine
    driver.set_active(_FakeDriver(TARGET))   # sm_90, device 0, null stream
    _backend.select = lambda *a, **k: "triton"
    A._interpret, A._arch = (lambda: False), (lambda device: "sm90")
    JITFunction._do_compile = do_compile
    try:
        with temp_env(PYENCODER_TRITON_AUTOTUNE="0", PYENCODER_EAGER_FASTPATH="1"):
            q, k, v = (torch.randn(8, 12, 1500, 64, dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            dout = torch.randn_like(q)
            for rope in (None, pyencoder.Rope(64)):
                def fwd():
                    return pyencoder.ops.banded_attention(q, k, v, left=50, right=3, rope=rope,
                                                          backend="triton")

                def fwd_nograd():
                    with torch.no_grad():
                        return fwd()

                def fwdbwd():
                    return torch.autograd.grad(fwd(), (q, k, v), dout)
                tag = "RoPE" if rope is not None else "no RoPE"
                for fast in ("1", "0"):
                    with temp_env(PYENCODER_FAST_LAUNCH=fast):
                        f = _per_call_us(fwd_nograd, max(100, calls))
                        fb = _per_call_us(fwdbwd, max(50, calls // 2))
                    path = "fast launch" if fast == "1" else "triton run "
                    print(f"interval attention band(50,3) {tag + ',':8s} {path} path: "
                          f"fwd {f:8.1f} us/call  fwd+bwd {fb:8.1f} us/call (compile and C "
                          f"launcher left out)")
    finally:
        _backend.select, A._interpret, A._arch, JITFunction._do_compile = saved
        driver._active = active
        clear_launch_plans()    # they hold the stand-in kernel


def _custom_op_backends(calls):
    """Host us/call of eager calls on the reference backend (a custom-op backend, like cuda) with
    the eager fast path (PYENCODER_EAGER_FASTPATH=1: the op's body, or ``_EagerOp`` with
    gradients, pyencoder.ops._call) and through the registered custom ops (=0), in one process and
    paired: each of 7 repeats times both settings back to back; medians. The reference computes
    for real here, so the difference (not the ratio) is what the dispatcher costs; "grad" times
    forward + backward (torch.autograd.grad of a sum over every input that requires grad). The
    update step has no autograd formula: no-grad only. The two large convs (B=8 L=1500, the
    positional conv) run only with ``calls`` >= 5000 (the default)."""
    import pyencoder
    from pyencoder.ops import banded_attention, causal_conv1d, causal_conv1d_update

    def conv_case(B, C, k, L, groups):
        x, w, b = torch.randn(B, C, L), torch.randn(C, C // groups, k), torch.randn(C)

        def fwd():
            return causal_conv1d(x, w, b, groups=groups, backend="reference")

        return fwd, lambda: _grad_of(fwd, (x, w, b))
    x1, st, w4 = torch.randn(1, 768, 1), torch.randn(1, 768, 3), torch.randn(768, 1, 4)

    def update():
        return causal_conv1d_update(x1, st, w4, groups=768, backend="reference")
    q = torch.randn(1, 12, 4, 64)
    k, v = torch.randn(1, 12, 54, 64), torch.randn(1, 12, 54, 64)
    rope = pyencoder.Rope(64)

    def attn():
        return banded_attention(q, k, v, left=50, right=3, rope=rope, q_offset=50,
                                backend="reference")

    def attn_grad():
        return _grad_of(attn, (q, k, v))
    cases = [("conv update B=1 C=768 k=4, 1 frame", update, None),
             ("causal_conv1d B=1 C=768 k=4 L=4", *conv_case(1, 768, 4, 4, 768))]
    big = [("causal_conv1d B=8 C=768 k=31 L=1500", (8, 768, 31, 1500, 768)),
           ("positional conv C=768 g=16 k=128 L=50", (1, 768, 128, 50, 16))]
    if calls >= 5000:       # ~30 s of reference compute (the GPU session's --calls 1000 skips it)
        cases += [(label, *conv_case(*shape)) for label, shape in big]
    cases.append(("attention B=1 H=12 N=4 D=64, 54 keys", attn, attn_grad))
    budget = calls * 5e-6           # seconds per repeat and setting (0.1 s at the default)
    repeats = 7 if calls >= 1000 else 2
    print("custom-op backends, reference, host us/call (paired medians; fast path = "
          "PYENCODER_EAGER_FASTPATH=1, op = 0):")
    for label, fwd, fwdbwd in cases:
        for mode, fn in (("no grad", fwd), ("grad", fwdbwd)):
            if fn is None:
                continue
            run = fn
            if mode == "no grad":
                def run(fn=fn):
                    with torch.no_grad():
                        return fn()
            first = {}
            for flag in ("1", "0"):                 # warm-up, and the size of a repeat
                with temp_env(PYENCODER_EAGER_FASTPATH=flag):
                    t0 = time.perf_counter()
                    run()
                    first[flag] = time.perf_counter() - t0
            n = max(1, int(budget / max(first.values())))
            reps = {"1": [], "0": []}
            for _ in range(repeats):
                for flag in ("1", "0"):
                    with temp_env(PYENCODER_EAGER_FASTPATH=flag):
                        t0 = time.perf_counter()
                        for _ in range(n):
                            run()
                        reps[flag].append((time.perf_counter() - t0) / n * 1e6)
            fast, op = statistics.median(reps["1"]), statistics.median(reps["0"])
            print(f"  {label + ', ' + mode + ':':48s} fast path {fast:9.1f}  op {op:9.1f}  "
                  f"saved {op - fast:7.1f} us/call")
    if calls < 5000:
        print(f"  {', '.join(label for label, _ in big)}: skipped (--calls {calls} < 5000)")

if __name__ == "__main__":
    main()
