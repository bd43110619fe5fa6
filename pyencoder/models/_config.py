"""Field checks of the model configs (EncoderConfig, DecoderConfig): a bad field is refused by its
config name ("EncoderConfig.num_layers must be an int >= 1; got 0"), before the modules it builds
would refuse it in their own argument names (right, stride, in_channels) or build something else
(num_layers=0 built one layer; a NaN eps gave NaN outputs)."""
import math
import numbers
import operator

import torch

from .._checks import is_int, is_np_bool


def _where(cfg, name):
    return f"{type(cfg).__name__}.{name}"


def _as_int(v):
    """A Python int for an int-like value (numpy / torch integers: ``__index__``), else None;
    bools are not ints here."""
    if is_int(v):
        return v
    if isinstance(v, (bool, float)) or is_np_bool(v) or \
            isinstance(v, torch.Tensor) and v.dtype == torch.bool:
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def cfg_int(cfg, name, min_value, allow_none=False):
    """An int >= min_value (None with ``allow_none``); an int-like value (a numpy integer) is
    stored back as a Python int, so the config's repr (which stream states record) is plain."""
    v = getattr(cfg, name)
    if v is None and allow_none:
        return
    exp = f"an int >= {min_value}" + (" or None" if allow_none else "")
    i = _as_int(v)
    if i is None:
        raise TypeError(f"{_where(cfg, name)} must be {exp}; got {type(v).__name__} {v!r}")
    if i < min_value:
        raise ValueError(f"{_where(cfg, name)} must be {exp}; got {i}")
    if type(v) is not int:
        setattr(cfg, name, i)


def cfg_ints(cfg, name, min_value):
    """A non-empty tuple / list of ints >= min_value, stored back as a tuple of Python ints, so a
    list and a tuple of the same values give one config repr (which stream states record)."""
    v = getattr(cfg, name)
    if isinstance(v, (str, bytes)) or not isinstance(v, (tuple, list)) or not v:
        raise TypeError(f"{_where(cfg, name)} must be a non-empty tuple of ints >= {min_value}; "
                        f"got {v!r}")
    out = []
    for i, x in enumerate(v):
        n = _as_int(x)
        if n is None:
            raise TypeError(f"{_where(cfg, name)}[{i}] must be an int >= {min_value}; got "
                            f"{type(x).__name__} {x!r}")
        if n < min_value:
            raise ValueError(f"{_where(cfg, name)}[{i}] must be an int >= {min_value}; got {n}")
        out.append(n)
    if type(v) is not tuple or any(type(x) is not int for x in v):
        setattr(cfg, name, tuple(out))


def cfg_bool(cfg, name, allow_none=False):
    """A bool (a numpy bool is stored back as one); not an int or a string."""
    v = getattr(cfg, name)
    if v is None and allow_none:
        return
    if not isinstance(v, bool):
        if is_np_bool(v):
            setattr(cfg, name, bool(v))
            return
        raise TypeError(f"{_where(cfg, name)} must be a bool" + (" or None" if allow_none else "")
                        + f"; got {type(v).__name__} {v!r}")


def cfg_float(cfg, name, *, positive, allow_none=False):
    """A finite float (> 0 with ``positive=True``, >= 0 with False, any sign with None); ints are
    taken (stored back as floats: 1 and 1.0 give one config repr), bools are not."""
    v = getattr(cfg, name)
    if v is None and allow_none:
        return
    bound = {True: " > 0", False: " >= 0", None: ""}[positive]
    exp = f"{'None or ' if allow_none else ''}a finite float{bound}"
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or is_np_bool(v):
        raise TypeError(f"{_where(cfg, name)} must be {exp}; got {type(v).__name__} {v!r}")
    if not math.isfinite(v) or (positive is not None and (v < 0 or (positive and v == 0))):
        raise ValueError(f"{_where(cfg, name)} must be {exp}; got {v!r}")
    if type(v) is not float:                   # an int, a numpy float: stored as a Python float
        setattr(cfg, name, float(v))


def cfg_choice(cfg, name, choices):
    v = getattr(cfg, name)
    if not any(v is c or (isinstance(v, str) and v == c) for c in choices):
        raise ValueError(f"{_where(cfg, name)} must be one of {choices!r}; got {v!r}")
