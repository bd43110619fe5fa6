"""Input validation shared by the public ops: errors name the argument, what was expected and what
was given."""
import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# Absolute positions (q_offset, k_offset) are limited to MAX_POSITION; mask extents (left, right,
# chunk_size, left_chunks, lookahead and the derived lo_off / hi_off) at or beyond WINDOW_CAP are
# clamped to it. Two positions of one call then differ by less than WINDOW_CAP (sequence lengths
# are far below 2**52), so a clamped extent still reaches every key the original reached (the
# same mask), and every bound computed from them stays far from int64 overflow (2**63).
MAX_POSITION = 1 << 52
WINDOW_CAP = 1 << 53


def is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def check_int(name, value, *, min_value=None, max_value=None, allow_none=False):
    if value is None and allow_none:
        return
    if not is_int(value):
        exp = "an int or None" if allow_none else "an int"
        raise TypeError(f"{name} must be {exp}; got {type(value).__name__} {value!r}")
    if min_value is not None and value < min_value:
        raise ValueError(f"{name} must be >= {min_value}; got {value}")
    if max_value is not None and value > max_value:
        raise ValueError(f"{name} must be <= {max_value}; got {value}")


def clamp_window(value):
    """A mask extent (an int >= 0) clamped to WINDOW_CAP: the same mask (see above)."""
    return min(value, WINDOW_CAP)


def check_tensor(name, t, ndim=None, allow_none=False):
    if t is None and allow_none:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got shape {tuple(t.shape)}")


def check_float_dtype(name, t):
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype in "
                        f"{[str(d) for d in FLOAT_DTYPES]}; got {t.dtype}")


def check_same(name, t, ref_name, ref):
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}); "
                         f"got {t.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the same dtype as {ref_name} ({ref.dtype}); got {t.dtype}")


def check_scale(scale):
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
            or scale == 0:
        raise ValueError(f"scale must be None or a finite non-zero float; got {scale!r}")


def value_checks_enabled():
    try:
        if torch.compiler.is_compiling():
            return False
    except AttributeError:  # pragma: no cover
        pass
    return True


def check_lengths(name, lengths, batch, limit, device):
    """lengths: integer tensor (batch,) with values in [0, limit] on ``device``."""
    if lengths is None:
        return
    check_tensor(name, lengths)
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.is_complex():
        raise TypeError(f"{name} must be an integer tensor; got {lengths.dtype}")
    if tuple(lengths.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one length per batch entry); "
                         f"got {tuple(lengths.shape)}")
    if lengths.device != device:
        raise ValueError(f"{name} must be on the same device as q ({device}); got {lengths.device}")
    if value_checks_enabled() and lengths.numel():
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > limit:
            raise ValueError(f"{name} values must lie in [0, {limit}]; got min {lo}, max {hi}")
