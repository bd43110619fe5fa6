"""What the Hugging Face patches rely on, checked when a model is patched.

The patches touch transformers internals (attention modules, encoder sub-modules, the attention
and mask registries). Each patch states what it needs here; ``require`` raises ``PatchError``
naming the missing piece, the installed transformers version and the tested range, so a newer
release that renames something fails loudly at patch time instead of producing wrong numbers.
"""
import inspect

TESTED_RANGE = ("5.23.0", "5.24.x")
TESTED_SPEC = ">=5.23,<5.25"


class PatchError(RuntimeError):
    """A transformers model does not have what a pyencoder patch relies on."""


def transformers_version():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - callers import transformers first
        raise ImportError("pyencoder.hf needs transformers; pip install 'transformers>=5.23,<5.25'"
                          ) from e
    return transformers.__version__


def _parse(v):
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    while len(out) < 3:
        out.append(0)
    return tuple(out)


def in_tested_range(version=None):
    v = _parse(version or transformers_version())
    return (5, 23, 0) <= v < (5, 25, 0)


def fail(what):
    raise PatchError(
        f"pyencoder.hf: {what}. Installed transformers {transformers_version()}; pyencoder.hf is "
        f"tested with transformers {TESTED_SPEC}. Pin transformers to that range or update "
        f"pyencoder.")


def require_attrs(obj, names, where):
    missing = [n for n in names if not hasattr(obj, n)]
    if missing:
        fail(f"{where} ({type(obj).__name__}) has no attribute(s) {missing}")


def require_params(fn, names, where):
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        fail(f"cannot read the signature of {where}")
    missing = [n for n in names if n not in params]
    if missing:
        fail(f"{where} no longer takes the argument(s) {missing}")


def require_source(cls, needle, where):
    import sys
    mod = sys.modules.get(cls.__module__)
    try:
        src = inspect.getsource(mod)
    except (OSError, TypeError):
        fail(f"cannot read the source of {cls.__module__} to check {where}")
    if needle not in src:
        fail(f"{where}: {cls.__module__} does not contain {needle!r}")
