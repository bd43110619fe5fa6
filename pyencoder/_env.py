"""The PYENCODER_* environment variables are read through these helpers: a value outside the
allowed set raises ValueError naming the variable, the allowed values and the given value (never a
silent on/off). Unset or empty means the default. Read at each use, so a change takes effect on
the next call; parsed values are cached per raw string."""
import os

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_cache = {}
_NAMES = {}     # name -> its key in os.environ's raw mapping


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
