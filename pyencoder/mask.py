"""The interval mask: one immutable value describing which keys every query of an interval
attention sees (DESIGN.md, "One attention: interval attention").

This is the only place the mask formula is written. Query at absolute position p sees key at
absolute position s iff lo(p) <= s <= hi(p), where, with base(p) = (p // block) * block,

    lo(p) = base(p) - lo_off        (lo_off = -1: unbounded history, lo(p) = -inf)
    hi(p) = base(p) + hi_off

or s < sink (the first ``sink`` absolute key positions, "attention sinks" / a global prefix, are
visible to every query in addition to its interval; sink = 0: none), and, as everywhere,
s < k_offset + key_lengths[b]. Sinks change neither lo/hi nor ``latency()``. lo and hi are
non-decreasing in p, which is what lets kernels skip every key block outside
[lo(first row), hi(last row)] (plus the sink blocks).

    IntervalMask.band(left, right)                       = IntervalMask(1, left, right)
    IntervalMask.chunked(chunk_size, left_chunks, lookahead)
        = IntervalMask(chunk_size, left_chunks * chunk_size, chunk_size - 1 + lookahead)

(left / left_chunks None: lo_off = -1.) Three different "lookaheads" meet here and have distinct
names: ``lookahead`` (a chunked mask's parameter and ``IntervalMask.lookahead``) is the user's
extra frames past the end of a query's block; ``latency()`` (= hi_off) is the frames a query waits
for past its own position in the worst case, the number a streamable module reports to
``pyencoder.streaming.latency`` (its ``lookahead`` attribute); samples of audio are
``lookahead_samples`` (``pyencoder.hf.StreamingEncoder``, ``Latency``).

Extents at or beyond ``WINDOW_CAP`` (2**53) are clamped to it: the same mask for every position a
tensor can index. Kernels and registered ops take the three ints (``mask.params``) at their
boundary."""
from dataclasses import dataclass
import torch

from .ops._checks import check_int, clamp_window

__all__ = ["IntervalMask"]


@dataclass(frozen=True)
class IntervalMask:
    """Immutable, hashable interval mask (block, lo_off, hi_off, sink): see the module docstring
    for the formula. Build it with ``IntervalMask.band`` or ``IntervalMask.chunked``; the raw
    constructor takes ints ``block`` >= 1, ``lo_off`` >= -1 (-1: unbounded history), ``hi_off``
    and ``sink`` >= 0."""
    block: int
    lo_off: int
    hi_off: int
    sink: int = 0

    def __post_init__(self):
        check_int("block", self.block, min_value=1)
        check_int("lo_off", self.lo_off, min_value=-1)
        check_int("hi_off", self.hi_off)
        check_int("sink", self.sink, min_value=0)
        object.__setattr__(self, "sink", clamp_window(self.sink))
        object.__setattr__(self, "block", clamp_window(self.block))
        object.__setattr__(self, "lo_off", -1 if self.lo_off < 0 else clamp_window(self.lo_off))
        object.__setattr__(self, "hi_off", clamp_window(self.hi_off))

    @classmethod
    def band(cls, left, right, *, sink=0):
        """Query p sees keys [p - left, p + right] (plus the ``sink`` first keys); ``left`` None:
        unbounded history."""
        check_int("left", left, min_value=0, allow_none=True)
        check_int("right", right, min_value=0)
        return cls(1, -1 if left is None else clamp_window(left), clamp_window(right), sink)

    @classmethod
    def chunked(cls, chunk_size, left_chunks, lookahead=0, *, sink=0):
        """Query p in chunk c = p // chunk_size sees from the start of chunk c - left_chunks (None:
        from the beginning) to the end of chunk c plus ``lookahead`` frames (plus the ``sink``
        first keys)."""
        check_int("chunk_size", chunk_size, min_value=1)
        check_int("left_chunks", left_chunks, min_value=0, allow_none=True)
        check_int("lookahead", lookahead, min_value=0)
        chunk_size = clamp_window(chunk_size)
        lo = -1 if left_chunks is None else clamp_window(left_chunks * chunk_size)
        return cls(chunk_size, lo, clamp_window(chunk_size - 1 + clamp_window(lookahead)), sink)

    @classmethod
    def full(cls, n_keys):
        """Every query sees every key of a sequence of ``n_keys`` (hi_off = max(n_keys, 1))."""
        check_int("n_keys", n_keys, min_value=0)
        return cls(1, -1, max(n_keys, 1))

    # ---- the boundary with registered ops and kernels ---------------------------------------
    @property
    def params(self):
        """(block, lo_off, hi_off) as plain ints: what kernels and registered ops take (with
        ``sink``, passed on its own)."""
        return self.block, self.lo_off, self.hi_off

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def bounded(self):
        """True when history is limited (lo_off >= 0)."""
        return self.lo_off >= 0

    @property
    def is_band(self):
        """True for block == 1 (a band mask)."""
        return self.block == 1

    @property
    def left(self):
        """Frames of history a query at the start of its block sees (None: unbounded)."""
        return self.lo_off if self.lo_off >= 0 else None

    @property
    def lookahead(self):
        """The user's extra frames past the end of a query's block (band: right; chunked:
        lookahead)."""
        return self.hi_off - self.block + 1

    def latency(self):
        """Worst-case frames a query waits for past its own position (hi(p) - p at a block's first
        row, = hi_off): the ``lookahead`` a streamable module reports."""
        return self.hi_off

    def with_sink(self, sink):
        """The same interval with ``sink`` leading keys visible to every query."""
        return IntervalMask(self.block, self.lo_off, self.hi_off, sink)

    def width(self):
        """Most keys one query can see (None when history is unbounded)."""
        return None if self.lo_off < 0 else self.lo_off + self.hi_off + 1 + self.sink

    def base(self, p):
        """(p // block) * block; p an int or an integer tensor."""
        return (p // self.block) * self.block

    def lo(self, p):
        """First visible key position of query position p, clamped at 0 (positions are >= 0, so
        unbounded history gives 0); p an int or an integer tensor."""
        if isinstance(p, torch.Tensor):
            if self.lo_off < 0:
                return torch.zeros_like(p)
            return (self.base(p) - self.lo_off).clamp(min=0)
        if self.lo_off < 0:
            return 0
        return max(0, self.base(p) - self.lo_off)

    def hi(self, p):
        """Last visible key position of query position p; p an int or an integer tensor."""
        return self.base(p) + self.hi_off

    def dense(self, n_queries, n_keys, *, q_offset=0, k_offset=0, device=None):
        """(n_queries, n_keys) bool visibility matrix (tests, pictures; never on a hot path)."""
        p = torch.arange(n_queries, device=device) + q_offset
        s = torch.arange(n_keys, device=device) + k_offset
        vis = (s[None, :] >= self.lo(p)[:, None]) & (s[None, :] <= self.hi(p)[:, None])
        return vis | (s < self.sink)[None, :]

    def __repr__(self):
        sk = f", sink={self.sink}" if self.sink else ""
        if self.block == 1:
            return f"IntervalMask.band(left={self.left}, right={self.hi_off}{sk})"
        if self.lo_off < 0 or self.lo_off % self.block == 0:
            lc = None if self.lo_off < 0 else self.lo_off // self.block
            return (f"IntervalMask.chunked(chunk_size={self.block}, left_chunks={lc}, "
                    f"lookahead={self.lookahead}{sk})")
        return (f"IntervalMask(block={self.block}, lo_off={self.lo_off}, hi_off={self.hi_off}"
                f"{sk})")


def as_mask(mask=None, block=None, lo_off=None, hi_off=None):
    """``mask`` (an IntervalMask) or the loose ints (block, lo_off, hi_off) of the older keyword
    API, exactly one of the two: returns an IntervalMask."""
    loose = (block, lo_off, hi_off)
    if mask is not None:
        if not isinstance(mask, IntervalMask):
            raise TypeError(f"mask must be a pyencoder.IntervalMask; got "
                            f"{type(mask).__name__} {mask!r}")
        if any(x is not None for x in loose):
            raise ValueError(f"give either mask or block/lo_off/hi_off, not both; got "
                             f"mask={mask!r}, block={block!r}, lo_off={lo_off!r}, "
                             f"hi_off={hi_off!r}")
        return mask
    if all(x is None for x in loose):
        raise TypeError("mask must be a pyencoder.IntervalMask (or give the ints block, lo_off, "
                        "hi_off); got none of them")
    return IntervalMask(block, lo_off, hi_off)

