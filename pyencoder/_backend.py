"""Backend registry and selection (DESIGN.md, "Backends").

Order of precedence: the per-call ``backend=`` argument, then the innermost
``pyencoder.use_backend(...)`` context of the calling thread / asyncio task, then the
``PYENCODER_BACKEND`` environment variable, then auto. Auto picks the fastest available backend
that supports the case and never a different function: every backend computes the same op. A
forced backend that cannot run the case raises ``RuntimeError`` saying why.

Op families: ``attention``, ``decode_attention``, ``conv``, ``convnext``. Each family's functional
file (pyencoder/ops/<family>.py) imports its backend modules with plain imports, the reference from
pyencoder/reference/ and the launchers beside it in pyencoder/ops/, and hands them to
``register``. A backend module exposes ``supports_<entry>(**args) -> str | None`` (None: supported;
otherwise the reason) next to the entry points themselves. Launcher modules import triton and
their kernels only when they launch, so ``import pyencoder`` stays light.
"""
import contextlib
import contextvars
import threading

from pyencoder._env import env_choice, env_raw

BACKENDS = ("reference", "triton", "cuda")

# The Triton releases the kernels are tested with (setup.py's [triton] extra; CI: 3.6, and
# `make test-triton-newest`: the newest release). Triton is not a hard dependency: a CUDA torch
# brings its own, and on CPU it only runs the kernels in its interpreter.
TRITON_SPEC = ">=3.6,<3.10"
_TRITON_RANGE = ((3, 6), (3, 10))


def triton_version_note(version):
    """None if ``version`` (a triton.__version__ string) is in TRITON_SPEC, else a warning."""
    try:
        v = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    except ValueError:
        return f"cannot parse triton version {version!r}; tested: triton{TRITON_SPEC}"
    lo, hi = _TRITON_RANGE
    if lo <= v < hi:
        return None
    return (f"triton {version} is outside the tested range triton{TRITON_SPEC}; the kernels may "
            "fail to compile or run")

# Auto preference, fastest first, for CUDA tensors. CPU tensors always use the reference in auto
# mode: the Triton interpreter is a correctness tool, not a production path.
_AUTO_ORDER = {
    "attention": ("triton", "cuda", "reference"),
    "decode_attention": ("triton", "reference"),
    "conv": ("cuda", "triton", "reference"),
    "convnext": ("triton", "reference"),
}
FAMILIES = tuple(_AUTO_ORDER)

# Forced backends of the innermost use_backend() block, {family: name}: a ContextVar, so each
# thread and each asyncio task sees its own blocks (a new thread starts with none). torch.compile
# cannot trace a ContextVar read, so use_backend also mirrors the current thread's setting in a
# threading.local, which dynamo reads and guards on (a changed setting recompiles); compiled code
# therefore sees the per-thread setting.
_forced_var = contextvars.ContextVar("pyencoder_forced_backends", default=None)
_forced_mirror = threading.local()


def _forced():
    if torch_compiling():
        return getattr(_forced_mirror, "forced", None) or {}
    return _forced_var.get() or {}


def torch_compiling():
    import torch
    return torch.compiler.is_compiling()


def _check_name(name, what):
    if name is None or name == "auto":
        return name
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS + ('auto',)} or None; got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name=None, **per_family):
    """Force a backend inside a ``with`` block: ``use_backend("triton")`` for every op family, or
    ``use_backend(attention="triton", conv="cuda")`` per family. ``"auto"`` restores auto."""
    for fam, val in per_family.items():
        if fam not in FAMILIES:
            raise ValueError(f"use_backend: unknown op family {fam!r}; expected one of {FAMILIES}")
        _check_name(val, f"use_backend({fam}=...)")
    _check_name(name, "use_backend(name)")
    forced = dict(_forced_var.get() or {})
    if name is not None:
        forced.update((fam, name) for fam in FAMILIES)
    forced.update(per_family)
    token = _forced_var.set(forced)
    _forced_mirror.forced = forced
    try:
        yield
    finally:
        _forced_var.reset(token)
        _forced_mirror.forced = _forced_var.get()


def _interpret():
    return env_raw("TRITON_INTERPRET") == "1"


_global_cache = {}


def _global_reason(backend):
    """None if the backend can run at all on this machine, else why not (cached per process and
    TRITON_INTERPRET setting)."""
    key = (backend, _interpret())
    if key not in _global_cache:
        _global_cache[key] = _compute_global_reason(backend)
    return _global_cache[key]


def triton_import_reason(e):
    """Why ``import triton`` failed with ImportError ``e``: triton absent, or installed but a
    module it imports missing (its interpreter, TRITON_INTERPRET=1, imports numpy)."""
    missing = getattr(e, "name", None)
    if missing != "triton":     # triton itself found, a module it imports (or part of it) not
        return (f"triton is installed but does not import ({e})"
                + ("; its interpreter (TRITON_INTERPRET=1) needs numpy: pip install numpy"
                   if missing == "numpy" else ""))
    return (f"triton is not installed ({e}); a CUDA build of torch brings it, or pip install "
            f"'pyencoder[triton]' (triton{TRITON_SPEC}, Linux; without a GPU it runs the "
            f"kernels only under TRITON_INTERPRET=1)")


def _compute_global_reason(backend):
    if backend == "reference":
        return None
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as e:
            return triton_import_reason(e)
        import torch
        if not torch.cuda.is_available() and not _interpret():
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"
        return None
    if backend == "cuda":
        from . import _ext
        if _ext.load() is None:
            return _ext.reason()
        import torch
        if not torch.cuda.is_available():
            return "pyencoder._C is built but no CUDA device is available"
        return None
    raise ValueError(f"unknown backend {backend!r}")


def backend_info():
    """{backend: (available, reason_or_None)} for this machine."""
    out = {}
    for b in BACKENDS:
        r = _global_reason(b)
        out[b] = (r is None, r)
    return out


def available_backends():
    """Names of the backends that can run on this machine, e.g. ("reference", "triton")."""
    return tuple(b for b, (ok, _) in backend_info().items() if ok)


# (family, backend) -> implementation module, filled by register() from pyencoder/ops/<family>.py
_IMPLS = {}


class NoSuchBackendError(ValueError, RuntimeError):
    """A forced backend that has no implementation of the op family at all: a bad argument
    (ValueError) as much as a backend that cannot run the case (RuntimeError)."""


def register(family, **modules):
    """Register the backend modules of one op family: ``register("conv", reference=mod, ...)``."""
    if family not in _AUTO_ORDER:
        raise ValueError(f"register: unknown op family {family!r}; expected one of {FAMILIES}")
    for backend, mod in modules.items():
        _check_name(backend, f"register({family}, ...)")
        _IMPLS[(family, backend)] = mod


def implemented_backends(family):
    """The backends with an implementation of ``family``, in BACKENDS order."""
    return tuple(b for b in BACKENDS if (family, b) in _IMPLS)


def auto_order(family):
    """The implemented backends of ``family`` in auto preference order (fastest first, CUDA)."""
    return tuple(b for b in _AUTO_ORDER[family] if (family, b) in _IMPLS)


def impl_module(family, backend):
    """(module, None), or (None, why) when ``family`` has no ``backend`` implementation."""
    mod = _IMPLS.get((family, backend))
    if mod is None:
        return None, (f"there is no {backend} implementation of the {family} ops (implemented: "
                      f"{implemented_backends(family)})")
    return mod, None


def requested_backend(family, backend=None):
    if backend is not None:
        return _check_name(backend, "backend")
    forced = _forced().get(family)
    if forced is not None:
        return forced
    env = env_raw("PYENCODER_BACKEND")
    if env and env.strip():           # unset, empty or blank: None (as every switch's default)
        return env_choice("PYENCODER_BACKEND", BACKENDS + ("auto",), None)
    return None


def _reason_for(family, backend, entry, device_type, args):
    if (family, backend) not in _IMPLS:
        return impl_module(family, backend)[1]
    r = _global_reason(backend)
    if r is not None:
        return r
    if backend == "triton" and device_type != "cuda" and not (device_type == "cpu" and _interpret()):
        return f"triton runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); got {device_type}"
    if backend == "cuda" and device_type != "cuda":
        return f"the cuda backend needs CUDA tensors; got {device_type} tensors"
    mod, r = impl_module(family, backend)
    if mod is None:
        return r
    fn = getattr(mod, f"supports_{entry}", None)
    if fn is None:
        return f"the {backend} {family} backend has no {entry} entry point"
    return fn(**args)


def select(family, entry, device_type, args, backend=None):
    """Resolve the backend name for one call. ``args`` are the keyword arguments the entry point
    will receive; they are passed to the backend's ``supports_<entry>``."""
    req = requested_backend(family, backend)
    if req is not None and req != "auto":
        r = _reason_for(family, req, entry, device_type, args)
        if r is not None:
            err = NoSuchBackendError if (family, req) not in _IMPLS else RuntimeError
            raise err(f"pyencoder: backend {req!r} cannot run {family}.{entry} here: {r}")
        return req
    if device_type == "cuda":
        for b in _AUTO_ORDER[family]:
            if _reason_for(family, b, entry, device_type, args) is None:
                return b
    return "reference"


def get_entry(family, backend, entry):
    mod, r = impl_module(family, backend)
    if mod is None:
        raise RuntimeError(f"pyencoder: {r}")
    return getattr(mod, entry)
