"""Count the distinct Triton compiles a GPU test tier needs, on a machine without a GPU.

    python tests/_count_compiles.py [--tier gpu_quick|gpu ...] [--autotune 0|1] [--arch sm90|sm80]
                                    [--verbose]
                                    [pytest selection args, default tests/]

How: runs the tier's tests in this process (pytest.main) with
- torch.cuda.is_available() -> True (the gpu tests are collected and not skipped) and a
  TorchFunctionMode that turns device="cuda" / .cuda() / .to("cuda") into CPU tensors; backend
  selection treats those CPU tensors as CUDA tensors (so "auto" picks what a GPU would pick);
- triton's JITFunction.run replaced by a recorder: each launch records the key Triton caches
  compiled kernels by (kernel, its argument specialisation as triton.runtime.jit computes it:
  dtypes, integers equal to 1 or divisible by 16, 16-byte aligned pointers, constexpr values;
  num_warps, num_stages) and returns without running; Autotuner.run records every config that
  survives pruning (PYENCODER_TRITON_AUTOTUNE=1) or the pinned one (=0, the session's setting).
Nothing is computed: torch.testing.assert_close passes everything and the reference attention
(the oracle) returns random tensors, so a test runs on to its first plain `assert` on values;
the launches before it are counted.

Limits (an estimate, not a measurement): a test with a plain `assert` on values between two
launches counts only the launches before it; code that reads torch.cuda state beyond
is_available (CUDA graphs, events, streams, device properties) stops the test where it does; the CUDA extension is
absent here, so "auto" conv calls that a GPU with pyencoder._C would run in CUDA count as Triton
launches (an over-count for conv). The attention launches, which dominate the compile time, are
counted exactly for the tests that call the Triton backend directly or through
pyencoder.ops.interval_attention.
"""
import argparse
import collections
import contextlib
import io
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


class _Recorder:
    def __init__(self):
        self.keys = collections.OrderedDict()
        self.test = None

    def install(self):
        from triton.backends.compiler import BaseBackend
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction, create_function_from_signature

        rec = self
        binders = {}

        def run(fn, *args, grid, warmup, **kwargs):
            binder = binders.get(id(fn))
            if binder is None:
                binder = binders[id(fn)] = create_function_from_signature(
                    fn.signature, fn.params, BaseBackend)
            options = {"num_warps": 4, "num_stages": 3}
            options.update({k: v for k, v in kwargs.items() if k not in fn.arg_names})
            params = {k: v for k, v in kwargs.items() if k in fn.arg_names}
            _, spec, _ = binder(*args, **params)
            key = json.dumps([fn.fn.__name__, spec, sorted(options.items())], default=str)
            rec.keys.setdefault(key, set()).add(rec.test)
            _no_nan(args, params)

        def autotune_run(tuner, *args, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = tuner.prune_configs(kwargs)
            for cfg in configs:
                tuner.fn.run(*args, **kwargs, **cfg.all_kwargs())
            tuner.nargs = None

        JITFunction.run = run
        Autotuner.run = autotune_run

    def per_kernel(self):
        c = collections.Counter(json.loads(k)[0] for k in self.keys)
        return dict(sorted(c.items()))


def _no_nan(args, params):
    """The kernel did not run, so its outputs hold whatever their allocation held: NaN bit
    patterns there would stop a test at a plain ``assert not torch.isnan(y).any()`` before its
    later launches, a different set each run (the Triton cache build then missed a few of the
    launches a GPU makes). Every floating tensor argument has its NaN / inf replaced by 0, as far
    as it can be written in place (a view with overlapping elements is left alone)."""
    import torch
    with torch.no_grad():
        for t in (*args, *params.values()):
            # only where there is something to replace: an in-place op bumps the tensor's
            # version, and a finite input autograd saved for the backward (the RoPE frequencies)
            # would then fail the backward's version check, ending the test before its backward
            # launches
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() \
                    and not bool(torch.isfinite(t).all()):
                try:
                    t.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
                except RuntimeError:
                    pass


def _fused_ok_as_cuda(fused_ok):
    """pyencoder.ops._ring_write_triton.fused_ok / residual_ok (and the running norm's fused_ok,
    which asks the ring write's device check) on the stand-in CPU tensors:
    decided as for CUDA ones (their interpreter branch also needs _interpret(), patched off here
    for the GPU tiles)."""
    def ok(*args):
        import pyencoder.ops._ring_write_triton as rw
        real = rw._interpret
        rw._interpret = lambda: True
        try:
            return fused_ok(*args)
        finally:
            rw._interpret = real
    return ok


def _cuda_to_cpu_mode():
    import torch
    from torch.overrides import TorchFunctionMode

    def cpu(d):
        if isinstance(d, (str, torch.device)) and str(d).startswith("cuda"):
            return "cpu"
        return d

    from pyencoder.streaming import state as _state

    class CudaToCpu(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func is torch.Tensor.cuda:
                return args[0]
            if "device" in kwargs:
                kwargs["device"] = cpu(kwargs["device"])
            if func in (torch.Tensor.to, torch.Tensor.new_empty, torch.Tensor.new_zeros,
                        torch.Tensor.new_full, torch.Tensor.new_ones, torch.Tensor.new_tensor):
                args = tuple(cpu(a) for a in args)
            return func(*args, **kwargs)

        # init_state(device="cuda") of a module whose .cuda() stayed on the CPU: its check of the
        # device against the parameters' (pyencoder.streaming.state) sees "cpu", as the tensors do
        def __enter__(self):
            self._check = _state._check_state_matches_module
            _state._check_state_matches_module = lambda m, dtype, device: self._check(
                m, dtype, cpu(device))
            return super().__enter__()

        def __exit__(self, *exc):
            _state._check_state_matches_module = self._check
            return super().__exit__(*exc)

    return CudaToCpu()


class _Stop(Exception):
    pass


def _stop(*args, **kwargs):
    raise _Stop("compile count: the launches of this test are recorded")


class _Plugin:
    def __init__(self, rec):
        self.rec = rec

    def pytest_runtest_setup(self, item):
        self.rec.test = item.nodeid
        # the tests' dense plain-torch yardstick runs after every kernel launch of its case and
        # is O(N^2) (N up to 32k): stop there
        for name, mod in list(sys.modules.items()):
            if name.startswith("test_") and hasattr(mod, "_plain_attention"):
                mod._plain_attention = _stop


def _cheap_reference():
    """The reference attention returns random tensors of the right shapes (it is the oracle the
    tests compare with; nothing is compared here, and at N=32k it would take minutes)."""
    import torch

    from pyencoder.reference import attention as ref

    def forward(q, k, v, *args, **kwargs):
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return (torch.randn(*q.shape[:-1], v.shape[-1], dtype=q.dtype),
                torch.randn(q.shape[:-1], dtype=lse_dtype))

    def backward(dout, q, k, v, *args, **kwargs):
        return torch.randn_like(q), torch.randn_like(k), torch.randn_like(v)

    ref.forward, ref.backward = forward, backward


def prepare(autotune=False, arch=None):
    """Make this process launch the Triton kernels as on a CUDA device while CPU tensors stand in
    (run it in a process of its own: it patches torch, triton and pyencoder for good): every kernel
    a real JITFunction, TRITON_INTERPRET=1 for the CPU tensors' sake, the GPU tile configs (`arch`
    "sm90"/"sm80" pins the attention tile table row), backend selection as for CUDA, the cheap
    reference and no value checks. Wrap the launches in ``_cuda_to_cpu_mode()``."""
    os.environ["TRITON_INTERPRET"] = "0"        # real JITFunctions (recorded, never compiled)
    os.environ["PYENCODER_TRITON_AUTOTUNE"] = "1" if autotune else "0"
    sys.path[:0] = [ROOT, HERE]
    import torch

    torch.cuda.is_available = lambda: True
    # decorate every kernel as a JITFunction before TRITON_INTERPRET=1 lets CPU tensors through
    import pyencoder.triton_kernels.causal_conv1d  # noqa: F401
    import pyencoder.triton_kernels.convnext  # noqa: F401
    import pyencoder.triton_kernels.decode_attention  # noqa: F401
    import pyencoder.triton_kernels.interval_attention  # noqa: F401
    import pyencoder.triton_kernels.ring_write  # noqa: F401
    import pyencoder.triton_kernels.rope_rotate  # noqa: F401
    import pyencoder.triton_kernels.running_norm  # noqa: F401
    import pyencoder.triton_kernels.channel_norm  # noqa: F401
    os.environ["TRITON_INTERPRET"] = "1"
    from pyencoder import _backend
    from pyencoder.ops import _attention_triton, _ring_write_triton
    _attention_triton._interpret = lambda: False  # the GPU tile configs, not the interpreter's
    _ring_write_triton._interpret = lambda: False
    _ring_write_triton.FORCE_INTERPRET = True     # step_fixed's fused write, as on CUDA
    _ring_write_triton.fused_ok = _fused_ok_as_cuda(_ring_write_triton.fused_ok)
    _ring_write_triton.residual_ok = _fused_ok_as_cuda(_ring_write_triton.residual_ok)
    from pyencoder.ops import _running_norm_triton      # RunningGroupNorm.step_fixed's kernel
    _running_norm_triton.fused_ok = _fused_ok_as_cuda(_running_norm_triton.fused_ok)
    from pyencoder.ops import _channel_norm_triton      # a "layer" extractor's norm + GELU
    _channel_norm_triton.fused_ok = _fused_ok_as_cuda(_channel_norm_triton.fused_ok)
    if arch is not None:
        _attention_triton._arch = lambda device: arch
    select = _backend.select

    def select_as_cuda(family, entry, device_type, args, backend=None):
        return select(family, entry, "cuda" if device_type == "cpu" else device_type, args,
                      backend)
    _backend.select = select_as_cuda
    reason_for = _backend._reason_for
    _backend._reason_for = lambda family, backend, entry, device_type, args: reason_for(
        family, backend, entry, "cuda" if device_type == "cpu" else device_type, args)
    _cheap_reference()
    # value checks pass, so a test goes on to its next launch (plain `assert`s still stop it)
    torch.testing.assert_close = lambda *args, **kwargs: None


def count(tier, autotune, pytest_args, verbose=False, recorder=None, arch=None):
    """`recorder`: a _Recorder (or subclass: benchmarks/triton_cache.py captures the compiles);
    `arch`: "sm90"/"sm80" pins the attention launchers' tile table row (default: what a CPU
    tensor gets, sm80)."""
    prepare(autotune, arch)
    import pytest
    rec = recorder if recorder is not None else _Recorder()
    rec.install()
    sink = io.StringIO()
    with _cuda_to_cpu_mode(), contextlib.redirect_stdout(sink):
        pytest.main(["-q", "-p", "no:cacheprovider", "-m", tier,
                     "--tb=no", "-o", "addopts=", *pytest_args], plugins=[_Plugin(rec)])
    tests = {t for users in rec.keys.values() for t in users}
    if verbose:
        for k, users in rec.keys.items():
            print(k, len(users))
    return {"tier": tier, "autotune": autotune, "compiles": len(rec.keys),
            "tests_that_launch": len(tests), "per_kernel": rec.per_kernel()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tier", default="gpu_quick", help='pytest -m expression (default gpu_quick)')
    p.add_argument("--autotune", type=int, choices=(0, 1), default=0,
                   help="0: pinned tiles, as the GPU session runs (default); 1: every config")
    p.add_argument("--arch", choices=("sm90", "sm80"), default="sm90",
                   help="the attention tile table row (default sm90: the lent H100/H200)")
    p.add_argument("--verbose", action="store_true")
    args, rest = p.parse_known_args(argv)
    res = count(args.tier, bool(args.autotune), rest or ["tests"], args.verbose, arch=args.arch)
    res["arch"] = args.arch
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
