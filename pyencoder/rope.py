"""Rotary position embedding description, applied inside the attention kernels.

``Rope(dim, base, interleaved)`` rotates the first ``dim`` features of each head (partial rotary
when dim < head_dim). Frequencies are ``inv_freq[i] = base ** (-2i / dim)`` in float32; the angle of
absolute position p is ``p * inv_freq[i]`` in float32, and cos/sin are taken in float32.

Layouts: half-split / NeoX (default) pairs feature i with i + dim/2; interleaved / GPT-J pairs 2i
with 2i + 1.
"""
import math
import numbers

import torch

from ._checks import check_bool

MAX_DIM = 1 << 16


class Rope:
    """Rotary embedding on the first ``dim`` features of each head, applied inside the attention
    kernels at absolute positions (see the module docstring for the layouts and precision)."""
    def __init__(self, dim, base=10000.0, interleaved=False):
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"Rope: dim must be a positive even int; got {type(dim).__name__} "
                            f"{dim!r}")
        if dim < 2 or dim % 2:
            raise ValueError(f"Rope: dim must be a positive even int; got {dim!r}")
        if dim > MAX_DIM:
            raise ValueError(f"Rope: dim must be <= {MAX_DIM} (the rotated features of one "
                             f"head); got {dim!r}")
        if isinstance(base, bool) or not isinstance(base, numbers.Real):
            raise TypeError(f"Rope: base must be a finite float > 1; got {type(base).__name__} "
                            f"{base!r}")
        base = float(base)
        if not math.isfinite(base) or base <= 1.0:
            raise ValueError(f"Rope: base must be a finite float > 1; got {base!r}")
        if not isinstance(interleaved, bool):
            raise TypeError(f"Rope: interleaved must be a bool; got {type(interleaved).__name__} "
                            f"{interleaved!r}")
        self.dim = dim
        self.base = base
        self.interleaved = interleaved
        self._inv_freq = (1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64,
                                                       device="cpu") / dim))).float()
        self._cache = {}

    def inv_freq(self, device=None):
        """float32 tensor (dim // 2,) on ``device``, cached per device."""
        device = torch.device("cpu") if device is None else torch.device(device)
        if torch.compiler.is_compiling():
            # traced: not through the cache, which Dynamo would guard on (an entry added during
            # the trace, or by an eager call after it, cost a compiled module a recompile)
            return self._inv_freq.to(device)
        key = str(device)
        t = self._cache.get(key)
        if t is None:
            t = self._inv_freq.to(device)
            self._cache[key] = t
        return t

    def __repr__(self):
        return f"Rope(dim={self.dim}, base={self.base}, interleaved={self.interleaved})"

    def __eq__(self, other):
        return (isinstance(other, Rope) and other.dim == self.dim and other.base == self.base
                and other.interleaved == self.interleaved)

    def __hash__(self):
        return hash((self.dim, self.base, self.interleaved))

    def rotate(self, x, positions, inverse=False):
        """Plain-torch rotation of x (..., N, D) at integer ``positions`` (N,) or (B, N)."""
        self._check_rotate(x, positions)
        inverse = check_bool("inverse", inverse)   # a truthy "no" rotated backwards silently
        return apply_rope(x, positions, self.inv_freq(x.device), self.interleaved, inverse)

    def _check_rotate(self, x, positions):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor (..., N, D); got {type(x).__name__}")
        if x.dim() < 2 or x.shape[-1] < self.dim:
            raise ValueError(f"x must have shape (..., N, D) with D >= the rotary dim {self.dim}; "
                             f"got {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"x must have a floating dtype; got {x.dtype}")
        if not isinstance(positions, torch.Tensor):
            raise TypeError(f"positions must be an integer tensor (N,) or (B, N); got "
                            f"{type(positions).__name__}")
        if positions.dtype.is_floating_point or positions.is_complex() \
                or positions.dtype == torch.bool:
            raise TypeError(f"positions must be an integer tensor; got {positions.dtype}")
        N = x.shape[-2]
        ok = (positions.dim() == 1 and positions.shape[0] == N) or (
            positions.dim() == 2 and x.dim() == 4 and tuple(positions.shape) == (x.shape[0], N))
        if not ok:
            raise ValueError(f"positions must have shape (N,) = ({N},) or (B, N) = "
                             f"({x.shape[0]}, {N}) for x (B, H, N, D); got "
                             f"{tuple(positions.shape)}")
        if positions.device != x.device:
            raise ValueError(f"positions must be on x's device ({x.device}); got "
                             f"{positions.device}")


def rope_cos_sin(positions, inv_freq, dtype=torch.float32):
    """cos, sin of shape positions.shape + (R/2,). The angle is always float32(pos) * inv_freq in
    float32; cos/sin are taken in float32, or in float64 when dtype is float64 (the oracle)."""
    ang = (positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(torch.float32)).to(dtype)
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x, positions, inv_freq, interleaved=False, inverse=False):
    """Rotate the first 2*len(inv_freq) features of x (B, H, N, D) at absolute ``positions``.

    positions: (N,) shared by the batch, or (B, N). Computed in float32 (float64 stays float64),
    returned in x's dtype. ``inverse=True`` applies the transpose rotation (used for gradients).
    """
    half = inv_freq.numel()
    r = 2 * half
    if half == 0:
        return x
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = rope_cos_sin(positions, inv_freq, cdt)
    if positions.dim() == 2:  # (B, N, R/2) -> (B, 1, N, R/2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if inverse:
        sin = -sin
    xr = x[..., :r].to(cdt)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        rot = torch.stack((o1, o2), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        rot = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    if r == x.shape[-1]:
        return rot.to(x.dtype)
    return torch.cat((rot.to(x.dtype), x[..., r:]), dim=-1)


def as_rope(rope, head_dim):
    """Normalise a module's ``rope`` argument: True (rotary over the whole head), False/None (no
    rotary), an int rotary dim, a Rope, or an object holding one as ``.rope`` (RotaryEmbedding)."""
    if rope is True:
        if isinstance(head_dim, int) and (head_dim < 2 or head_dim % 2):
            raise ValueError(f"rope=True rotates the whole head, and head_dim ({head_dim}) is "
                             f"odd: pass " + (f"an even rotary dim below it (rope={head_dim - 1})"
                                              f" or " if head_dim > 2 else "") + "rope=False")
        return Rope(head_dim)
    if rope is None or rope is False:
        return None
    if isinstance(rope, int):
        if rope > head_dim:
            raise ValueError(f"rope.dim must be <= head_dim ({head_dim}); got {rope}")
        if rope < 2 or rope % 2:
            raise ValueError(f"rope as an int is the rotary dim: a positive even int; got {rope}")
        rope = Rope(rope)
    elif not isinstance(rope, Rope) and isinstance(getattr(rope, "rope", None), Rope):
        rope = rope.rope
    if not isinstance(rope, Rope):
        raise TypeError(f"rope must be True, False, an int rotary dim, a pyencoder.Rope or a "
                        f"RotaryEmbedding; got {type(rope).__name__}")
    if rope.dim > head_dim:
        raise ValueError(f"rope.dim must be <= head_dim ({head_dim}); got {rope.dim}")
    return rope
