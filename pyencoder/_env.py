"""The PYENCODER_* environment variables are read through these helpers: a value outside the
allowed set raises ValueError naming the variable, the allowed values and the given value (never a
silent on/off). Unset or empty means the default. Read at each use, so a change takes effect on
the next call; parsed values are cached per raw string."""
import os


def _constant(fn):
    """What ``torch.compiler.assume_constant_result(fn)`` does (it marks the function, no
    wrapper: eager calls cost nothing more), without importing torch._dynamo (and triton) at
    import; tests/test_compile_fakes.py checks that the public call sets the same mark. The
    readers below are constants to torch.compile: Dynamo calls them at trace time and bakes the
    value in, instead of tracing into the caches here and guarding on their contents. It did
    trace them: a process whose first pyencoder call was a compiled one filled a cache while
    Dynamo traced it and failed its own guard ("Guard failed on the same frame it was
    created"), and an eager call that filled one later cost a recompile."""
    fn._dynamo_marked_constant = True
    return fn

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_cache = {}
_NAMES = {}     # name -> its key in os.environ's raw mapping


@_constant
def env_raw(name):
    """``os.environ.get(name)``, cheaper: on POSIX the mapping behind ``os.environ`` (``_data``,
    bytes to bytes, updated by every set / delete through os.environ: what os.environ.get reads)
    is read directly, with the name encoded once (~0.8 -> ~0.15 us; the Triton launch path reads
    a dozen variables per attention call). Elsewhere, or if os.environ has no such mapping,
    ``os.environ.get``."""
    env = os.environ
    data = getattr(env, "_data", None)
    if data is None or os.name != "posix":
        return env.get(name)
    key = _NAMES.get(name)
    if key is None:
        key = _NAMES[name] = env.encodekey(name)
    raw = data.get(key)
    return None if raw is None else env.decodevalue(raw)


_SNAP_KEYS = {}  # names -> their keys in os.environ's raw mapping


@_constant
def env_snapshot(names):
    """A hashable summary of the raw values of the variables ``names`` (a tuple): equal for two
    calls iff every variable has the same raw value (unset included). Cheaper than reading each
    (one C-level map over os.environ's raw mapping; ``env_raw`` says why it is that mapping)."""
    env = os.environ
    data = getattr(env, "_data", None)
    if data is None or os.name != "posix":
        return tuple(env.get(n) for n in names)
    keys = _SNAP_KEYS.get(names)
    if keys is None:
        keys = _SNAP_KEYS[names] = tuple(env.encodekey(n) for n in names)
    return tuple(map(data.get, keys))


@_constant
def env_choice(name, choices, default):
    """The value of ``name`` (stripped, lower-cased), one of ``choices``; ``default`` if unset."""
    raw = env_raw(name)
    key = (name, raw, choices, default)
    hit = _cache.get(key)
    if hit is not None:
        return hit
    val = default if raw is None else (raw.strip().lower() or default)
    if val not in choices:
        raise ValueError(f"environment variable {name} must be one of {', '.join(choices)} (or "
                         f"unset); got {raw!r}")
    _cache[key] = val
    return val


def env_exact(name, choices):
    """A variable a compiled extension reads itself (``strcmp``): unset, empty, or exactly one
    of ``choices`` (no stripping or case folding, which the extension would not do: " 1" or
    "yes" were silently off there). Returns the raw value (None if unset or empty)."""
    raw = env_raw(name)
    if raw is not None and raw != "" and raw not in choices:
        raise ValueError(f"environment variable {name} must be exactly one of "
                         f"{', '.join(choices)} (or unset / empty; the CUDA extension reads it "
                         f"as is); got {raw!r}")
    return raw or None


@_constant
def env_flag(name, default):
    """A boolean variable: 1/true/yes/on or 0/false/no/off; ``default`` (a bool) if unset."""
    raw = env_raw(name)
    key = (name, raw, None, default)
    hit = _cache.get(key)
    if hit is not None:
        return hit
    val = default
    if raw is not None and raw.strip():
        s = raw.strip().lower()
        if s in _TRUE:
            val = True
        elif s in _FALSE:
            val = False
        else:
            raise ValueError(f"environment variable {name} must be one of "
                             f"{', '.join(_TRUE + _FALSE)} (or unset); got {raw!r}")
    _cache[key] = val
    return val


@_constant
def grp_tile():
    """None, or (BLOCK_T, BLOCK_R, num_warps, num_stages) from PYENCODER_CONV_GRP_TILE (the
    Triton grouped conv's tile A/B switch: pyencoder/ops/_conv_triton.py)."""
    name = "PYENCODER_CONV_GRP_TILE"
    raw = env_raw(name)
    if raw is None or not raw.strip():
        return None
    key = (name, raw)
    hit = _cache.get(key)
    if hit is not None:
        return hit
    try:
        t, r, w, st = (int(v) for v in raw.split(","))
    except ValueError:
        t = None
    pow2 = lambda v: v >= 1 and v & (v - 1) == 0  # noqa: E731
    if t is None or not (pow2(t) and pow2(r) and 16 <= t <= 512 and 16 <= r <= 256
                         and w in (1, 2, 4, 8, 16) and 1 <= st <= 8):
        raise ValueError(f"{name} must be 'BLOCK_T,BLOCK_R,WARPS,STAGES' with BLOCK_T a power of "
                         f"two in [16, 512], BLOCK_R one in [16, 256], WARPS in 1, 2, 4, 8, 16 "
                         f"and STAGES in [1, 8]; got {raw!r}")
    _cache[key] = val = (t, r, w, st)
    return val


@_constant
def env_choice_or_int(name, choices, default, min_value=1):
    """One of ``choices`` (a str) or an int >= ``min_value``; ``default`` if unset."""
    raw = env_raw(name)
    key = (name, raw, choices, default, min_value)
    hit = _cache.get(key)
    if hit is not None:
        return hit
    val = default if raw is None else (raw.strip().lower() or default)
    if val not in choices:
        try:
            val = int(val)
        except ValueError:
            val = None
        if val is None or val < min_value:
            raise ValueError(f"environment variable {name} must be one of {', '.join(choices)} or "
                             f"an integer >= {min_value}; got {raw!r}")
    _cache[key] = val
    return val


def test_seed():
    """PYENCODER_TEST_SEED: an int in [0, 2**32) (the tests' seed), or None when unset / empty."""
    raw = env_raw("PYENCODER_TEST_SEED")
    if raw is None or not raw.strip():
        return None
    try:
        val = int(raw.strip())
    except ValueError:
        val = -1
    if not 0 <= val < 2 ** 32:
        raise ValueError(f"environment variable PYENCODER_TEST_SEED must be an integer in "
                         f"[0, 2**32) (a failing test prints its seed); got {raw!r}")
    return val


def check_environment():
    """Every PYENCODER_* variable that is set, a runtime switch parsed as its use parses it:
    [(name, raw, error message or None, known)], in name order (``python -m pyencoder info``
    prints it). Each use raises on a bad value too, but only when a code path reads it: a junk
    value of a GPU-only switch sits unnoticed on a CPU machine otherwise. ``known`` is False for
    a name pyencoder never reads (a typo of a known one does nothing)."""
    from ._backend import requested_backend
    from .ops import _attention_triton as at

    def backend():
        requested_backend("attention")

    checks = {
        "PYENCODER_BACKEND": backend,
        "PYENCODER_BUILD_CUDA": lambda: env_choice("PYENCODER_BUILD_CUDA", ("auto", "0", "1"),
                                                   "auto"),
        "PYENCODER_TRITON_AUTOTUNE": at._autotune_mode,
        "PYENCODER_ROPE_MODE": lambda: env_choice("PYENCODER_ROPE_MODE", at._ROPE_MODES, "auto"),
        "PYENCODER_ROPE_TABLE": lambda: env_choice("PYENCODER_ROPE_TABLE", at._ROPE_TABLE_MODES,
                                                   "auto"),
        "PYENCODER_CONV_ROW": lambda: env_exact("PYENCODER_CONV_ROW", ("0", "1")),
        # A/B switches of the Triton grouped conv (read per call on a GPU)
        "PYENCODER_CONV_TAP_MAJOR": lambda: env_choice("PYENCODER_CONV_TAP_MAJOR", ("0", "1"),
                                                       "0"),
        "PYENCODER_CONV_GRP_TILE": lambda: grp_tile(),
        "PYENCODER_CPU_THREADS": lambda: env_choice_or_int("PYENCODER_CPU_THREADS",
                                                           ("auto", "torch"), "auto"),
        # the tests' and the compile test's (the values they document; stricter than
        # tests/test_triton_compile.py, which takes any PTXAS other than 1 for off)
        "PYENCODER_TEST_SEED": lambda: test_seed(),
        "PYENCODER_COMPILE_MATRIX": lambda: env_choice("PYENCODER_COMPILE_MATRIX",
                                                       ("sample", "quick", "full"), "sample"),
        "PYENCODER_COMPILE_PTXAS": lambda: env_choice("PYENCODER_COMPILE_PTXAS", ("0", "1"),
                                                      "0"),
    }
    for name, default in (("DETERMINISTIC", False), ("PIPELINE_MASKED", False),
                          ("FUSED_RING", True), ("STEADY_DISPATCH", True),
                          ("EAGER_FASTPATH", True), ("FAST_LAUNCH", True),
                          ("VALUE_CHECKS", True), ("CPU_SKINNY_GEMM", True)):
        checks["PYENCODER_" + name] = (lambda n, d: lambda: env_flag(n, d))("PYENCODER_" + name,
                                                                            default)
    # read by the benchmarks, the tests and the build (not runtime switches)
    other = ("PYENCODER_RESULTS_DIR", "PYENCODER_COMPILE_CACHE", "PYENCODER_CPU_CORES",
             "PYENCODER_COMMIT", "PYENCODER_TF_CACHE", "PYENCODER_TF_MODE", "PYENCODER_TF_REPORT")
    out = []
    for name in sorted(n for n in os.environ if n.startswith("PYENCODER_")):
        raw, err = os.environ[name], None
        if name in checks:
            try:
                checks[name]()
            except ValueError as e:
                err = str(e)
        out.append((name, raw, err, name in checks or name in other))
    return out
