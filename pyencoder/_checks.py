"""Input validation shared by the public ops: errors name the argument, what was expected and what
was given."""
import math
import numbers
import operator

import torch

from ._env import env_flag
from ._fifo import put

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
        if isinstance(value, torch.SymInt):
            # a size-derived int under torch.export with dynamic shapes (a default rel_offset
            # from N): no range test, which would guard on the symbol (the eager call of the same
            # code checks it)
            return
        exp = "an int or None" if allow_none else "an int"
        raise TypeError(f"{name} must be {exp}; got {type(value).__name__} {value!r}")
    if min_value is not None and value < min_value:
        raise ValueError(f"{name} must be >= {min_value}; got {value}")
    if max_value is not None and value > max_value:
        raise ValueError(f"{name} must be <= {max_value}; got {value}")


def is_np_bool(v):
    """numpy's bool scalar (np.bool_, named np.bool in numpy 2), without importing numpy."""
    return type(v).__module__ == "numpy" and type(v).__name__ in ("bool_", "bool")


def check_bool(name, value):
    """A flag: True or False (or numpy's bool) only: a truthy string such as "no" is not taken
    for True. Returns it as a Python bool."""
    if not isinstance(value, bool) and not is_np_bool(value):
        raise TypeError(f"{name} must be True or False; got {type(value).__name__} {value!r}")
    return bool(value)


def tensor_arg(name, value, expected):
    """``value`` as a tensor (a list, a numpy array: ``torch.as_tensor``), or a TypeError naming
    ``name``, what was ``expected`` and what was given."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be {expected}; got {type(value).__name__} "
                        f"{value!r}") from None


def clamp_window(value):
    """A mask extent (an int >= 0) clamped to WINDOW_CAP: the same mask (see above)."""
    return min(value, WINDOW_CAP)


def clamp_extents(block, lo_off, hi_off, cap):
    """An interval mask's ints (block, lo_off, hi_off; lo_off -1: unbounded) with every extent
    within ``cap``: the same mask for positions below cap (a block past them puts each query in
    block 0, lo_off past them hides no key, hi_off past them shows every key, or, negative,
    none), and bounds computed from them stay far from integer overflow. Ordinary extents pass
    unchanged."""
    if lo_off > cap:
        lo_off = cap
    return min(block, cap), lo_off, max(-cap, min(hi_off, cap))


def check_chunk_sizes(name, chunk_sizes):
    """A non-empty sequence of ints >= 1 (chunk lengths of a stream driver, cycled); returns it as
    a tuple of Python ints."""
    if isinstance(chunk_sizes, (str, bytes, torch.Tensor)) or not hasattr(chunk_sizes, "__iter__"):
        raise TypeError(f"{name} must be a non-empty sequence of ints >= 1 (e.g. "
                        f"[{chunk_sizes!r}]); got {type(chunk_sizes).__name__} {chunk_sizes!r}")
    if not hasattr(chunk_sizes, "__len__"):
        # an endless iterator (itertools.cycle) would be read until memory ran out
        raise TypeError(f"{name} must be a sized sequence of ints >= 1 (a list, tuple or range; "
                        f"the driver cycles it); got an iterator ({type(chunk_sizes).__name__})")
    sizes = []
    for i, c in enumerate(chunk_sizes):
        if isinstance(c, bool) or isinstance(c, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be an int >= 1; got {type(c).__name__} {c!r}")
        try:
            c = operator.index(c)
        except TypeError:
            raise TypeError(f"{name}[{i}] must be an int >= 1; got {type(c).__name__} "
                            f"{c!r}") from None
        if c < 1:
            raise ValueError(f"{name}[{i}] must be an int >= 1 (a chunk of at least one frame or "
                             f"sample); got {c}")
        sizes.append(c)
    if not sizes:
        raise ValueError(f"{name} must hold at least one chunk size; got {chunk_sizes!r}")
    return tuple(sizes)


def check_tensor(name, t, ndim=None, allow_none=False):
    if t is None and allow_none:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got shape {tuple(t.shape)}")


def check_writable(name, t):
    """``t`` is written in place: no element may alias another (an expanded / stride-0 view)."""
    if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)) or (
            value_checks_enabled() and torch._debug_has_internal_overlap(t) == 1):
        raise ValueError(f"{name} is updated in place and must not be an expanded or "
                         f"self-overlapping view (clone() it); got shape {tuple(t.shape)} with "
                         f"strides {t.stride()}")


def check_module_input(x, axis, size, layout, param, same_dtype=True, name="x"):
    """A module's input ``x`` (called ``name`` in messages): a floating tensor of ``layout`` (a
    string such as "(B, T, 8)") with size ``size`` on ``axis``, on the device of the module's
    parameter ``param``, and (with ``same_dtype``, outside autocast) of its dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}; got {type(x).__name__}")
    if x.dim() != 3 or x.shape[axis] != size:
        raise ValueError(f"{name} must have shape {layout}; got {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype in {[str(d) for d in FLOAT_DTYPES]}; "
                        f"got {x.dtype}")
    if param is not None and x.device != param.device:
        raise ValueError(f"{name} must be on the module's device ({param.device}); got "
                         f"{x.device}")
    if same_dtype and param is not None and x.dtype != param.dtype \
            and not autocast_on(x.device.type):
        raise TypeError(f"{name} must have the module's dtype ({param.dtype}); got {x.dtype}")


def autocast_on(device_type):
    """Whether autocast is on for ``device_type`` (False for meta or a device type autocast does
    not know: torch.is_autocast_enabled raises there)."""
    if device_type == "meta":
        return False
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:        # a device type autocast does not know
        return False


def autocasting(x):
    """Whether autocast is on for tensor x's device (False for a non-tensor)."""
    return isinstance(x, torch.Tensor) and autocast_on(x.device.type)


def autocast_dtype(t):
    """The dtype an autocast op (a conv, a Linear) over ``t`` computes in: under autocast on t's
    device the autocast dtype (floating tensors other than float64 are cast), else t's own. The
    dtype a module's empty outputs take, so that they match its other outputs."""
    if t.dtype != torch.float64 and t.dtype.is_floating_point and autocasting(t):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def autocast_cast(dtype, *ts):
    """``ts`` in ``dtype`` where they are floating tensors other than float64 (autocast's rule; a
    differentiable cast, none where equal); anything else as given (the checks name it)."""
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype.is_floating_point
                 and t.dtype not in (dtype, torch.float64) else t for t in ts)


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


def check_eps(name, eps):
    """A normalisation epsilon: a finite float >= 0 (not a bool)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{name} must be a finite float >= 0; got {type(eps).__name__} {eps!r}")
    if not 0 <= eps < float("inf"):
        raise ValueError(f"{name} must be a finite float >= 0; got {eps!r}")


def check_scale(scale):
    """None or a finite non-zero real number (numbers.Real: Python and numpy ints and floats;
    not a bool, not a tensor: the op takes a Python float)."""
    if scale is None or isinstance(scale, torch.SymFloat):
        return
    if isinstance(scale, (bool, torch.Tensor)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be None or a finite non-zero float; got "
                        f"{type(scale).__name__} {scale!r}")
    if torch.compiler.is_compiling():
        # the value may be traced (a dynamic float: math.isfinite cannot take it); zero still
        # refused, at trace time for a constant, at run time for a traced one
        torch._check(scale != 0, lambda: "scale must be None or a finite non-zero float; got 0")
        return
    if not math.isfinite(scale) or scale == 0:
        raise ValueError(f"scale must be None or a finite non-zero float; got {scale!r}")


def value_checks_enabled():
    """Whether checks that read tensor values on the host may run: not under torch.compile, not
    while a CUDA graph is being captured (a device-to-host read is illegal there), and not with
    PYENCODER_VALUE_CHECKS=0 (each such check is a host synchronisation on a GPU: key_lengths'
    range, rel_bias' finiteness, state_indices' range and repeats; a tensor that passed one is not
    read again while unmodified, ``passed`` / ``remember_passed``). Callers also skip meta
    tensors (no values: a shape-only call runs the ops' fake implementations)."""
    if not env_flag("PYENCODER_VALUE_CHECKS", True):
        return False
    try:
        if torch.compiler.is_compiling():
            return False
    except AttributeError:  # pragma: no cover
        pass
    if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        return False
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
    if value_checks_enabled() and lengths.numel() and not lengths.is_meta:
        # the value check reads the device (a host sync on a GPU): one read (min and max
        # together), and none for a tensor that already passed at this limit, unmodified since
        # (a model's layers share one key_lengths tensor per forward)
        vals = plain_values(lengths)
        key = passed_key("lengths", vals, limit)
        if passed(key, vals):
            return
        lo, hi = (int(x) for x in torch.stack(torch.aminmax(vals)).tolist())
        if lo < 0 or hi > limit:
            raise ValueError(f"{name} values must lie in [0, {limit}]; got min {lo}, max {hi}")
        remember_passed(key, vals)


def plain_values(t):
    """The tensor a value check reads for ``t``: ``t``, or under a torch.func transform (vmap,
    grad) the plain tensor its wrappers hold (vmap's: every mapped entry at once). A wrapped
    tensor has no storage: its data pointer and host reads raised from inside torch."""
    f = torch._C._functorch
    while f.is_functorch_wrapped_tensor(t):
        t = f.get_unwrapped(t)
    return t


# Tensors that passed a value check: (check, id, version, data pointer, extra) -> the tensor. The
# entry holds the tensor, so its id stays its own; an in-place edit bumps the version and a
# ``.data`` swap moves the pointer, so a modified tensor is read again. Inference tensors (no
# version counter) and tensor subclasses are always read.
_PASSED = {}
_PASSED_MAX = 32


def passed_key(check, t, extra=None):
    """The key under which tensor ``t`` passing value check ``check`` is remembered, or None."""
    if type(t) is not torch.Tensor or t.is_inference() or \
            torch._C._functorch.is_functorch_wrapped_tensor(t):
        return None
    return (check, id(t), t._version, t.data_ptr(), extra)


def passed(key, t):
    """Whether ``t`` passed the check of ``key`` (passed_key) and is unmodified since."""
    return key is not None and _PASSED.get(key) is t


def remember_passed(key, t):
    if key is None:
        return
    put(_PASSED, key, t, _PASSED_MAX)


def check_bias_tensors(q, rel_bias, gate, heads, gate_shape, gate_dims, head_name="H",
                       min_columns=1):
    """The relative-position bias inputs shared by interval and decode attention: ``rel_bias``
    (heads, L >= min_columns) and ``gate`` (None or ``gate_shape``, described as
    ``gate_dims``), floating and on q's device. The offset range the columns must cover is the
    caller's check."""
    check_tensor("rel_bias", rel_bias, 2)
    check_float_dtype("rel_bias", rel_bias)
    if rel_bias.device != q.device:
        raise ValueError(f"rel_bias must be on q's device ({q.device}); got {rel_bias.device}")
    if rel_bias.shape[0] != heads or rel_bias.shape[1] < min_columns:
        raise ValueError(f"rel_bias must have shape ({head_name}={heads}, L), L >= "
                         f"{min_columns}; got {tuple(rel_bias.shape)}")
    if gate is not None:
        check_tensor("gate", gate, 3)
        check_float_dtype("gate", gate)
        if gate.device != q.device:
            raise ValueError(f"gate must be on q's device ({q.device}); got {gate.device}")
        if tuple(gate.shape) != tuple(gate_shape):
            raise ValueError(f"gate must have shape {gate_dims} = {tuple(gate_shape)}; got "
                             f"{tuple(gate.shape)}")


def _check_index_tensor(name, t, shape, dims, device):
    check_tensor(name, t)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be an integer tensor; got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {dims} = {shape}; got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device ({device}); got {t.device}")


def check_decode_inputs(q, k_ring, v_ring, q_pos, q_count, n_keys, inv_freq, interleaved, block,
                        lo_off, hi_off, scale):
    """The arguments of pyencoder.ops.decode_attention, from shapes, dtypes, devices and ints
    only (no device read: the decode step stays CUDA-graph capturable). q (B, H, M, D); k_ring and
    v_ring (B, Hk, cap >= 1, D), H % Hk == 0; q_pos (B, M), q_count and n_keys (B,) integer;
    inv_freq None or floating (R,) with 2 R <= D; interleaved bool; the mask ints block >= 1,
    lo_off >= -1 (-1: unbounded), hi_off; scale finite and non-zero."""
    check_tensor("q", q, 4)
    check_float_dtype("q", q)
    B, H, M, D = q.shape
    for name, t in (("k_ring", k_ring), ("v_ring", v_ring)):
        check_tensor(name, t, 4)
        check_float_dtype(name, t)
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}); got {t.device}")
        if t.dtype != q.dtype:          # (it computed in q's dtype silently)
            raise TypeError(f"{name} must have q's dtype ({q.dtype}); got {t.dtype}")
    Hk, cap = k_ring.shape[1], k_ring.shape[2]
    if k_ring.shape[0] != B or k_ring.shape[3] != D or cap < 1:
        raise ValueError(f"k_ring must have shape (B, Hk, cap >= 1, D) = ({B}, Hk, cap, {D}); "
                         f"got {tuple(k_ring.shape)}")
    if v_ring.shape != k_ring.shape:
        raise ValueError(f"v_ring must have k_ring's shape {tuple(k_ring.shape)}; got "
                         f"{tuple(v_ring.shape)}")
    if H < 1 or Hk < 1 or H % Hk:
        raise ValueError(f"q heads must be a positive multiple of the ring's heads (H % Hk == 0); "
                         f"got q {tuple(q.shape)}, k_ring {tuple(k_ring.shape)}")
    _check_index_tensor("q_pos", q_pos, (B, M), "(B, M)", q.device)
    _check_index_tensor("q_count", q_count, (B,), "(B,)", q.device)
    _check_index_tensor("n_keys", n_keys, (B,), "(B,)", q.device)
    if inv_freq is not None:
        check_tensor("inv_freq", inv_freq, 1)
        check_float_dtype("inv_freq", inv_freq)
        if inv_freq.device != q.device:
            raise ValueError(f"inv_freq must be on q's device ({q.device}); got "
                             f"{inv_freq.device}")
        if 2 * inv_freq.shape[0] > D:
            raise ValueError(f"inv_freq must have at most head_dim / 2 = {D // 2} entries (a "
                             f"rotary dim <= head_dim); got {inv_freq.shape[0]}")
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool; got {type(interleaved).__name__} "
                        f"{interleaved!r}")
    check_int("block", block, min_value=1)
    check_int("lo_off", lo_off, min_value=-1)
    check_int("hi_off", hi_off)
    if scale is None:
        raise TypeError("scale must be a finite non-zero float (the decode has no default); "
                        "got None")
    check_scale(scale)
