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

import threading

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from pyencoder._env import env_flag, env_raw

__all__ = ["triton_op", "launch", "interpreting", "next_pow2", "cdiv", "block_size",
           "is_plain", "dummy", "BlockGrid", "clear_launch_plans", "last_plan", "MAX_GRID_YZ"]


def interpreting():
    return env_raw("TRITON_INTERPRET") == "1"


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


# CUDA's limit on a launch grid's second and third extents (the first reaches 2**31 - 1). Kernels
# put batch * heads (or the batch) on the first axis or check this in their supports_*, so auto
# selection never reaches a larger grid; a forced backend meets the clear error of _check_grid.
MAX_GRID_YZ = 65535


def _check_grid(kernel, grid):
    if isinstance(grid, BlockGrid):
        ext = (None, grid.rows)
    elif isinstance(grid, (tuple, list)):
        ext = tuple(grid)
    else:
        return
    for axis in (1, 2):
        if axis < len(ext) and ext[axis] is not None and int(ext[axis]) > MAX_GRID_YZ:
            fn = getattr(kernel, "fn", kernel)
            raise ValueError(
                f"pyencoder: {getattr(fn, '__name__', type(kernel).__name__)} needs a launch grid "
                f"of {tuple(ext)} programs, and CUDA allows at most {MAX_GRID_YZ} along its "
                f"axis {axis} (a batch or batch * heads this large): split the batch, or use "
                f"backend='reference'")


class _Launch:
    """``launch(kernel)[grid](*args, **kwargs)``: see ``launch``."""

    def __init__(self, kernel, grid=None):
        self.kernel, self.grid = kernel, grid

    def __getitem__(self, grid):
        return _Launch(self.kernel, grid)

    def __call__(self, *args, **kwargs):
        _LAST.plan = None
        if interpreting():
            if _any_fake(args, kwargs):
                return None     # module docstring, 1
            _check_grid(self.kernel, self.grid)
            return self.kernel[self.grid](*args, **kwargs)
        traced = _get_current_dispatch_mode() is not None
        if not traced and not torch._C._are_functorch_transforms_active():
            known = _PLANS.get(id(self.kernel))
            if known is not None and env_flag("PYENCODER_FAST_LAUNCH", True):
                try:
                    plan = known[2].get(_plan_key(self.grid, args, kwargs, known[1]))
                except Exception:   # a fake / storage-less tensor, an unhashable or keyless arg
                    plan = None
                if plan is not None:
                    _LAST.plan = plan
                    return plan.launch(args, kwargs)
        if traced or _any_fake(args, kwargs):
            return torch.library.wrap_triton(self.kernel)[self.grid](*args, **kwargs)
        _check_grid(self.kernel, self.grid)     # (a plan above was recorded for a valid grid)
        compiled = self.kernel[self.grid](*args, **kwargs)
        _LAST.plan = _record(self.kernel, self.grid, args, kwargs, compiled)
        return compiled


class BlockGrid:
    """A callable launch grid ``(cdiv(n, meta[block]), rows)`` for an autotuned launch (the tile
    is the autotuner's choice) that the fast launch path can key on: a lambda is a new object per
    call, this compares by value."""
    __slots__ = ("n", "block", "rows", "key")

    def __init__(self, n, block, rows):
        self.n, self.block, self.rows = int(n), block, int(rows)
        self.key = ("BlockGrid", self.n, block, self.rows)

    def __call__(self, meta):
        return (cdiv(self.n, meta[self.block]), self.rows)


# ------------------------------------------------------------------------------------------------
# The fast launch path (PYENCODER_FAST_LAUNCH, default on). Triton's JITFunction.run binds every
# argument, specialises it, builds and looks up a cache key, checks the kernel's globals and only
# then calls the compiled kernel's launcher: ~30 us of host time per launch on the CPU machine
# here, plus ~10 us of our own fakeness check, against kernels of ~100 us at wav2vec2-base sizes
# (the H100 call measured eager forwards that were host-bound). A launch that went through
# Triton once leaves a plan here, keyed by a summary of the launch that is at least as fine as
# Triton's specialisation: the grid, the current device, and every argument with tensors replaced
# by (dtype, data pointer 16-byte aligned) and everything else by its value (Triton specialises
# ints on == 1, divisibility by 16 and range, and constexprs on their value: the raw value decides
# all of these), except the kernel's do_not_specialize ints, which Triton types by range only and
# so are keyed by range (streaming offsets change every call and share one plan). The next launch
# with the same key calls the compiled kernel's launcher with the same bound arguments Triton
# would pass (the positional arguments, then the remaining parameters from the keywords, the
# autotuner's chosen config and the defaults) and the current stream: what
# ``CompiledKernel[grid](*args)`` does. Not recorded, so they always take Triton's path: a launch
# under a dispatch mode or a torch.func transform, or with fake tensors (a tensor subclass makes
# its key raise, and the launch falls through to the checks below), a kernel with pre-run hooks,
# an autotuner config with a pre_hook and a callable grid other than BlockGrid. With a Triton
# launch hook installed (a profiler) a fast launch builds Triton's launch metadata for it as
# Triton does. Triton's debug and instrumentation knobs are taken as they were when the plan was
# recorded.

# id(kernel) (JITFunction or Autotuner; by id: a JITFunction hashes through its source's
# cache_key, under a lock) -> (kernel: held, so the id stays its own; positions of its
# do_not_specialize parameters; {plan key: _Plan})
_PLANS = {}
_PLANS_MAX = 512     # per kernel; a full kernel records no more plans (a streaming caller's
                     # positions change every call: such keys miss, and are no longer recorded)


_TRITON = []
# The _Plan of this thread's last launch through _Launch (served by it or recorded by it):
# per thread, so that a call program never records another thread's launch
_LAST = threading.local()


def last_plan():
    """The _Plan the last ``launch(kernel)[grid](...)`` of this process was served by or recorded,
    or None (not recorded: traced, interpreted, hooks, a lambda grid, a full plan table...). A
    caller that replays a whole call (pyencoder.ops._attention_triton's call programs) reads it
    right after its own launch."""
    return getattr(_LAST, "plan", None)


def _triton():
    """(triton's driver holder, triton's knobs), imported once (an import statement in the launch
    path costs a sys.modules lookup per launch)."""
    if not _TRITON:
        from triton import knobs
        from triton.runtime.driver import driver
        _TRITON[:] = [driver, knobs]
    return _TRITON


def _no_key(t):
    raise TypeError(f"no fast launch plan for a {type(t).__name__}")


def _plan_key(grid, args, kwargs, dns=()):
    """The plan key of a launch (comment above). Tensors of another type than torch.Tensor or
    nn.Parameter (FakeTensor and the other traceable subclasses: a FakeTensor outside its mode
    still hands out a data pointer) raise, as does a grid that is neither a tuple nor keyed.
    Wrappers of the plain type (C++ functionalization, functorch) only exist under a dispatch
    mode or a torch.func transform, where no plan is used (``_Launch.__call__``)."""
    T, P, S = torch.Tensor, torch.nn.Parameter, _SCALARS
    # positional arguments, then the keywords' values (their names are in the key too)
    vals = [a if type(a) in S else (a.dtype, a.data_ptr() % 16 == 0)
            if type(a) is T or type(a) is P else _no_key(a) if isinstance(a, T) else a
            for a in (*args, *kwargs.values())]
    for i in dns:       # Triton types these by range only: streaming offsets share one plan
        a = vals[i]
        if type(a) is int:
            vals[i] = ("dns", 0 if -2**31 <= a < 2**31 else 1 if -2**63 <= a < 2**63 else 2)
    return (grid if type(grid) is tuple else grid.key,
            _triton()[0].active.get_current_device(), tuple(kwargs), tuple(vals))


_SCALARS = frozenset((int, float, bool, str, type(None)))


class _Plan:
    __slots__ = ("compiled", "grid", "tail", "names")

    def __init__(self, compiled, grid, tail, names):
        self.compiled, self.grid, self.tail, self.names = compiled, grid, tail, names

    def launch(self, args, kwargs):
        driver, knobs = _triton()
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        active = driver.active
        stream = active.get_current_stream(active.get_current_device())
        if self.names is None:
            vals = args + self.tail
        else:   # tensor keywords: the current ones (the plan holds no tensor)
            vals = args + tuple([kwargs[v] if k else v for v, k in zip(self.tail, self.names)])
        c, g = self.compiled, self.grid
        # Triton's launch metadata only matters to a launch hook (a profiler): built as Triton
        # builds it when one is installed (an empty hook chain is called with None instead)
        md = c.launch_metadata(g, stream, *vals) \
            if getattr(enter, "calls", enter) or getattr(leave, "calls", leave) else None
        c.run(g[0], g[1], g[2], stream, c.function, c.packed_metadata, md, enter, leave, *vals)
        return c


def _record(kernel, grid, args, kwargs, compiled):
    """Leave a _Plan for this launch (module comment above) and return it, or None where the fast
    path does not apply."""
    if compiled is None or not env_flag("PYENCODER_FAST_LAUNCH", True) \
            or len(_PLANS.get(id(kernel), (None, None, ()))[2]) >= _PLANS_MAX:
        return
    from triton.runtime.jit import JITFunction
    if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
        return
    kw = dict(kwargs)
    if isinstance(kernel, JITFunction):
        jit = kernel
    else:       # an autotuner: its chosen config's keywords were passed too
        jit, best = getattr(kernel, "fn", None), getattr(kernel, "best_config", None)
        if not isinstance(jit, JITFunction) or best is None or best.pre_hook is not None \
                or type(kernel).__name__ != "Autotuner":
            return
        kw.update(best.all_kwargs())
    if jit.pre_run_hooks:
        return
    params = jit.params
    if len(args) > len(params):
        return
    tail, names = [], []     # names[i]: tail[i] is the name of a tensor keyword (read per call)
    for p in params[len(args):]:
        if p.name in kw:
            v = kw[p.name]
            if isinstance(v, torch.Tensor):
                if p.name not in kwargs:
                    return
                tail.append(p.name)
                names.append(True)
                continue
        elif p.has_default:
            v = p.default
        else:
            return
        tail.append(v)
        names.append(False)
    dns = tuple(i for i, p in enumerate(params[:len(args)])
                if getattr(p, "do_not_specialize", False))
    try:
        key = _plan_key(grid, args, kwargs, dns)
    except Exception:       # a list or lambda grid, an unhashable argument
        return
    if callable(grid):
        grid = grid({**dict(zip(jit.arg_names, args)), **kw})
    grid = tuple(grid) + (1,) * (3 - len(grid))
    plans = _PLANS.setdefault(id(kernel), (kernel, dns, {}))[2]
    plan = plans[key] = _Plan(compiled, grid, tuple(tail), tuple(names) if any(names) else None)
    return plan


_CLEAR_HOOKS = []    # callables run by clear_launch_plans (caches holding plans: call programs)


def on_clear_launch_plans(fn):
    """Register ``fn()`` to run whenever the plans are cleared (a cache that holds _Plans)."""
    _CLEAR_HOOKS.append(fn)
    return fn


def clear_launch_plans():
    """Forget every fast launch plan (tests; a plan holds its compiled kernel alive), and every
    cache built on them."""
    _PLANS.clear()
    _LAST.plan = None
    for fn in _CLEAR_HOOKS:
        fn()


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
