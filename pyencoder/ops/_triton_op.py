"""Registration of the Triton launchers as torch ops: ``torch.library.triton_op`` + ``wrap_triton``
(DESIGN.md / STYLE.md: "triton_op/wrap_triton for Triton").

``triton_op(name, mutates_args)`` registers a launcher whose body allocates its outputs with torch
and launches its kernels through ``launch(kernel)[grid](...)`` (``wrap_triton``). On a GPU this is
torch's own mechanism unchanged: eager calls run the kernels directly, the launcher body is the
fake kernel (the kernel launches become no-op ``triton_kernel_wrapper_mutation`` nodes on fake
tensors), and AOTDispatch / torch.compile trace through the body, so Inductor sees the Triton
kernels themselves instead of an opaque op. The ops are registered at their first use
(``torch.library.triton_op`` imports triton; ``import pyencoder`` must not).

Under TRITON_INTERPRET=1 (the CPU tests) ``@triton.jit`` returns an ``InterpretedFunction``, which
``wrap_triton`` hands back unwrapped: the traceable wrapper and its higher-order op need the JIT
metadata (argument names and source, for the mutation analysis) that only a ``JITFunction`` has.
Two consequences, both handled here:

1. Fake tensors. The fake kernel is the launcher body, so a trace would run the interpreter on
   FakeTensors; the interpreter copies inputs through their storage (``data_ptr``), which fake
   tensors do not have ("Attempted to set the storage of a tensor on device "meta" to a storage on
   different device "cpu""). ``launch`` skips an interpreted launch whose arguments are fake: the
   outputs' shapes, dtypes and strides come from the body's allocations, which is all a fake kernel
   gives.
2. Functionalization. AOTDispatch (torch.compile, opcheck's ``test_aot_dispatch_*``) decomposes a
   triton_op into its body; with an interpreted kernel the body traces to bare allocations, and the
   compiled graph would return uninitialised memory. Under the interpreter the op therefore stays
   whole in the graph (as torch.export keeps triton ops) and runs eagerly when the graph runs.

So on the CPU ``torch.library.opcheck`` passes every test_util, but ``test_aot_dispatch_*`` checks
the whole-op graph, not the decomposition into kernels: that one is checked on a GPU
(tests marked ``gpu``).
"""
import os

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["triton_op", "launch", "interpreting", "next_pow2", "cdiv", "block_size",
           "is_plain", "dummy"]


def interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n):
    """The smallest power of two >= n (2 for n = 0, 1 for n < 0): a Triton block extent."""
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a, b):
    """ceil(a / b) for ints: the number of b-sized blocks covering a (a launch grid extent)."""
    return (a + b - 1) // b


def block_size(n, lo, hi):
    """A launcher's block extent for n elements: next_pow2(n) clamped to [lo, hi]."""
    return min(hi, max(lo, next_pow2(n)))


def is_plain(t):
    """Whether tensor ``t`` is a plain real tensor: type ``torch.Tensor`` (FakeTensor,
    FunctionalTensor and the other traceable wrappers are subclasses) and neither a C++
    functionalization nor a functorch wrapper (those keep the plain type)."""
    return (type(t) is torch.Tensor and not torch._is_functional_tensor(t)
            and not torch._C._functorch.is_functorch_wrapped_tensor(t))


def _maybe_fake(t):
    """Whether tensor `t` is fake, cheaply for the common case: a plain tensor (``is_plain``) is
    real, so torch's ``is_fake`` (several isinstance checks and a flatten per tensor, most of a
    launch's host cost here) only runs for the rest."""
    if is_plain(t):
        return False
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


_DUMMIES = {}    # (device, dtype) -> a 1-element tensor: the pointer of an argument never read


def dummy(like, dtype):
    """A 1-element ``dtype`` tensor on ``like``'s device for a pointer argument the kernel never
    reads (its constexpr switch is off). Cached per device when ``like`` is a plain tensor outside
    a trace (one allocation less per argument and call on the host path); traced, fake or
    wrapped tensors get a fresh one of their kind."""
    if not is_plain(like) or torch.compiler.is_compiling():
        return torch.empty(1, dtype=dtype, device=like.device)
    key = (like.device, dtype)
    t = _DUMMIES.get(key)
    if t is None:
        t = _DUMMIES[key] = torch.empty(1, dtype=dtype, device=like.device)
    return t


def _any_fake(args, kwargs):
    for a in args:
        if isinstance(a, torch.Tensor) and _maybe_fake(a):
            return True
    for a in kwargs.values():
        if isinstance(a, torch.Tensor) and _maybe_fake(a):
            return True
    return False


class _Launch:
    """``launch(kernel)[grid](*args, **kwargs)``: see ``launch``."""

    def __init__(self, kernel, grid=None):
        self.kernel, self.grid = kernel, grid

    def __getitem__(self, grid):
        return _Launch(self.kernel, grid)

    def __call__(self, *args, **kwargs):
        fake = _any_fake(args, kwargs)
        if interpreting():
            if fake:
                return None     # module docstring, 1
            return self.kernel[self.grid](*args, **kwargs)
        if fake or _get_current_dispatch_mode() is not None:
            return torch.library.wrap_triton(self.kernel)[self.grid](*args, **kwargs)
        return self.kernel[self.grid](*args, **kwargs)


def launch(kernel):
    """``kernel`` as a triton_op body launches it: through ``wrap_triton`` when it is traced (fake
    tensors, or a dispatch mode such as make_fx's proxy mode is active), straight to the kernel on
    real tensors (what torch's own triton_op does in eager mode, where it turns wrap_triton off;
    here the same holds for a launcher called directly, outside the op). Under the interpreter:
    the interpreted kernel, and no launch on fake tensors (module docstring, 1)."""
    return _Launch(kernel)


_PENDING = {}      # name -> _LazyTritonOp, every triton_op created (at import of its launcher)
_REGISTERED = {}   # name -> torch.library CustomOpDef, filled by register_pending()


class _LazyTritonOp:
    """A triton_op registered at its first use: ``torch.library.triton_op`` imports triton, and
    ``import pyencoder`` must not (pyencoder._backend). The functional ops import
    pyencoder.ops._triton_ops before they call one (that module says why an import); other eager
    callers register it here."""

    def __init__(self, name, mutates_args, fn):
        self.name, self.mutates_args, self.fn = name, mutates_args, fn
        self._autograd = None
        self.__doc__ = fn.__doc__
        _PENDING[name] = self

    def register_autograd(self, backward, *, setup_context=None):
        self._autograd = (backward, setup_context)
        if self.name in _REGISTERED:
            _REGISTERED[self.name].register_autograd(backward, setup_context=setup_context)

    def _register(self):
        if self.name not in _REGISTERED:
            op = _register(self.name, self.mutates_args, self.fn)
            if self._autograd is not None:
                backward, setup = self._autograd
                op.register_autograd(backward, setup_context=setup)
            _REGISTERED[self.name] = op
        return _REGISTERED[self.name]

    @property
    def op(self):
        """The torch.library CustomOpDef (registered now if it was not yet)."""
        op = _REGISTERED.get(self.name)
        return op if op is not None else self._register()

    def __call__(self, *args, **kwargs):
        return self.op(*args, **kwargs)


def register_pending():
    """Register every triton_op created so far."""
    for lazy in list(_PENDING.values()):
        lazy._register()


def _register(name, mutates_args, fn):
    from torch._subclasses.functional_tensor import FunctionalTensorMode
    op = torch.library.triton_op(name, mutates_args=mutates_args)(fn)
    decompose = getattr(op, "_torch_dispatch_fns", {}).get(FunctionalTensorMode)

    def functional(mode, func, types, args, kwargs):
        if interpreting() or decompose is None:
            return mode.__torch_dispatch__(func, types, args, kwargs)
        return decompose(mode, func, types, args, kwargs)
    op.register_torch_dispatch(FunctionalTensorMode, functional)
    return op


def triton_op(name, mutates_args=()):
    """``torch.library.triton_op(name, mutates_args=...)``, registered at first use and kept whole
    by functionalization under the interpreter (module docstring, 2)."""
    def deco(fn):
        return _LazyTritonOp(name, mutates_args, fn)
    return deco
