"""The interval mask: one immutable value describing which keys every query of an interval
attention sees (DESIGN.md, "One attention: interval attention").

This is the only place the mask formula is written. Query at absolute position p sees key at
absolute position s iff lo(p) <= s <= hi(p), where, with base(p) = (p // block) * block,

    lo(p) = base(p) - lo_off        (lo_off = -1: unbounded history, lo(p) = -inf)
    hi(p) = base(p) + hi_off

or s < sink (the first ``sink`` absolute key positions, "attention sinks" / a global prefix, are
visible to every query in addition to its interval; sink = 0: none), and, as everywhere,
s < k_offset + key_lengths[b]. Sinks change neither lo/hi nor ``latency()``.

For a frame-rate (cross-attention) mask whose key side has its own block ``k_block``
(default: ``block``), base(p) = (p // block) * k_block: the query's block index times the key
side's block, so query and key positions are each counted in their own units (no sinks there).

lo and hi are non-decreasing in p, which is what lets kernels skip every key block outside
[lo(first row), hi(last row)] (plus the sink blocks).

    IntervalMask.band(left, right)                       = IntervalMask(1, left, right)
    IntervalMask.chunked(chunk_size, left_chunks, lookahead)
        = IntervalMask(chunk_size, left_chunks * chunk_size, chunk_size - 1 + lookahead)

    IntervalMask.frames(q_frame, k_frame, left, right, extra)
        = IntervalMask(q_frame, left * k_frame, (right + 1) * k_frame - 1 + extra, k_frame)
    IntervalMask.frame_chunked(q_frame, k_frame, chunk_frames, left_chunks, lookahead_frames)
        = IntervalMask.frames(chunk_frames * q_frame, chunk_frames * k_frame, left_chunks, 0,
                              lookahead_frames * k_frame)

(DESIGN.md "Frame-rate bands": query frame f = p // q_frame sees key frames [f - left,
f + right], plus ``extra`` key positions; frames(1, 1, left, right) is band(left, right) and
frames(c, c, left_chunks, 0, lookahead) is chunked(c, left_chunks, lookahead), equal values.)
(left / left_chunks None: lo_off = -1.) Three different "lookaheads" meet here and have distinct
names: ``lookahead`` (a chunked mask's parameter and ``IntervalMask.lookahead``) is the user's
extra frames past the end of a query's block; ``latency()`` (= hi_off) is the frames a query waits
for past its own position in the worst case, the number a streamable module reports to
``pyencoder.streaming.latency`` (its ``lookahead`` attribute); samples of audio are
``lookahead_samples`` (``pyencoder.hf.StreamingEncoder``, ``Latency``).

Extents at or beyond ``WINDOW_CAP`` (2**53) are clamped to it: the same mask for every position a
tensor can index. Kernels and registered ops take the three ints (``mask.params``) at their
boundary; a frame mask (k_block != block) has no three-int form: ``mask.frame_params`` gives its
four ints (block, k_block, lo_off, hi_off), which ``pyencoder.ops.cross_attention`` takes."""
from dataclasses import dataclass
from typing import Optional

import torch

from ._checks import WINDOW_CAP, check_int, clamp_window
from ._fifo import put

__all__ = ["IntervalMask"]


# IntervalMask.band / .chunked of recent arguments: the masks are immutable, and an attention
# call builds one per call (its checks cost ~3 us, as much as a tenth of an eager call's host
# path). Only plain ints / None are memoised (a bool or numpy int equal to an int would otherwise
# share its entry and skip its own checks).
_MEMO = {}
_MEMO_MAX = 256
_MEMO_TYPES = (int, type(None))


def _memo_get(key):
    for x in key[2:]:
        if type(x) not in _MEMO_TYPES:
            return None
    return _MEMO.get(key)


def _memo_put(key, mask):
    if all(type(x) in _MEMO_TYPES for x in key[2:]):
        put(_MEMO, key, mask, _MEMO_MAX)
    return mask


_BASE_CAP = 4 * WINDOW_CAP      # IntervalMask.base's saturation on tensors (<= 2**55 + k_block)


@dataclass(frozen=True)
class IntervalMask:
    """Immutable, hashable interval mask (block, lo_off, hi_off, k_block, sink): see the module
    docstring for the formula. Build it with ``IntervalMask.band``, ``IntervalMask.chunked``,
    ``IntervalMask.frames`` or ``IntervalMask.frame_chunked``; the raw constructor takes ints
    ``block`` >= 1, ``lo_off`` >= -1 (-1: unbounded history), ``hi_off``, optionally ``k_block``
    >= 1 (the key side's block of a frame mask; None: ``block``) and ``sink`` >= 0."""
    block: int
    lo_off: int
    hi_off: int
    k_block: Optional[int] = None
    sink: int = 0

    def __post_init__(self):
        check_int("block", self.block, min_value=1)
        check_int("lo_off", self.lo_off, min_value=-1)
        # hi_off below -WINDOW_CAP would hide every key of every position a tensor can index
        # (with lo_off >= 0 it is refused below anyway): refused, so bounds stay in int64
        check_int("hi_off", self.hi_off, min_value=-WINDOW_CAP)
        check_int("k_block", self.k_block, min_value=1, allow_none=True)
        check_int("sink", self.sink, min_value=0)
        object.__setattr__(self, "sink", clamp_window(self.sink))
        object.__setattr__(self, "block", clamp_window(self.block))
        object.__setattr__(self, "k_block", self.block if self.k_block is None
                           else clamp_window(self.k_block))
        object.__setattr__(self, "lo_off", -1 if self.lo_off < 0 else clamp_window(self.lo_off))
        object.__setattr__(self, "hi_off", clamp_window(self.hi_off))
        if self.lo_off >= 0 and self.lo_off + self.hi_off < 0 and not self.sink:
            # every query's interval [base - lo_off, base + hi_off] is empty: all-zero outputs
            raise ValueError(f"IntervalMask(block={self.block}, lo_off={self.lo_off}, "
                             f"hi_off={self.hi_off}) shows no key to any query: lo_off + hi_off "
                             f"must be >= 0 (or lo_off = -1, unbounded, or sink > 0)")
        if self.sink and self.k_block != self.block:
            raise ValueError(f"sink ({self.sink}) is not supported with a frame-rate mask "
                             f"(k_block={self.k_block} != block={self.block}); expected sink=0")

    @classmethod
    def band(cls, left, right, *, sink=0):
        """Query p sees keys [p - left, p + right] (plus the ``sink`` first keys); ``left`` None:
        unbounded history."""
        key = ("band", cls, left, right, sink)
        hit = _memo_get(key)
        if hit is not None:
            return hit
        check_int("left", left, min_value=0, allow_none=True)
        check_int("right", right, min_value=0)
        return _memo_put(key, cls(1, -1 if left is None else clamp_window(left),
                                  clamp_window(right), sink=sink))

    @classmethod
    def chunked(cls, chunk_size, left_chunks, lookahead=0, *, sink=0):
        """Query p in chunk c = p // chunk_size sees from the start of chunk c - left_chunks (None:
        from the beginning) to the end of chunk c plus ``lookahead`` frames (plus the ``sink``
        first keys)."""
        key = ("chunked", cls, chunk_size, left_chunks, lookahead, sink)
        hit = _memo_get(key)
        if hit is not None:
            return hit
        check_int("chunk_size", chunk_size, min_value=1)
        check_int("left_chunks", left_chunks, min_value=0, allow_none=True)
        check_int("lookahead", lookahead, min_value=0)
        chunk_size = clamp_window(chunk_size)
        lo = -1 if left_chunks is None else clamp_window(left_chunks * chunk_size)
        return _memo_put(key, cls(chunk_size, lo,
                                  clamp_window(chunk_size - 1 + clamp_window(lookahead)),
                                  sink=sink))

    @classmethod
    def frames(cls, q_frame, k_frame, left, right, extra=0):
        """Frame-rate band (cross-attention between sequences at different rates): query frame
        f = p // q_frame sees key frames [f - left, f + right] (key frame = s // k_frame) plus
        ``extra`` key positions past the last one; ``left`` None: unbounded history."""
        check_int("q_frame", q_frame, min_value=1)
        check_int("k_frame", k_frame, min_value=1)
        check_int("left", left, min_value=0, allow_none=True)
        check_int("right", right, min_value=0)
        check_int("extra", extra, min_value=0)
        q_frame, k_frame = clamp_window(q_frame), clamp_window(k_frame)
        lo = -1 if left is None else clamp_window(clamp_window(left) * k_frame)
        hi = clamp_window((clamp_window(right) + 1) * k_frame - 1 + clamp_window(extra))
        return cls(q_frame, lo, hi, k_frame)

    @classmethod
    def frame_chunked(cls, q_frame, k_frame, chunk_frames, left_chunks, lookahead_frames=0):
        """The chunked mask in frame units: query frame f in chunk c = f // chunk_frames sees key
        frames from the start of chunk c - left_chunks (None: from the beginning) to the end of
        chunk c plus ``lookahead_frames`` key frames."""
        check_int("q_frame", q_frame, min_value=1)
        check_int("k_frame", k_frame, min_value=1)
        check_int("chunk_frames", chunk_frames, min_value=1)
        check_int("left_chunks", left_chunks, min_value=0, allow_none=True)
        check_int("lookahead_frames", lookahead_frames, min_value=0)
        return cls.frames(clamp_window(chunk_frames * q_frame),
                          clamp_window(chunk_frames * k_frame), left_chunks, 0,
                          clamp_window(clamp_window(lookahead_frames) * k_frame))

    @classmethod
    def full(cls, n_keys):
        """Every query sees every key of a sequence of ``n_keys`` (hi_off = max(n_keys, 1))."""
        check_int("n_keys", n_keys, min_value=0)
        return cls(1, -1, max(n_keys, 1))

    # ---- the boundary with registered ops and kernels ---------------------------------------
    @property
    def params(self):
        """(block, lo_off, hi_off) as plain ints: what kernels and registered ops take (with
        ``sink``, passed on its own). A frame mask (k_block != block) has no such form and raises:
        use ``frame_params``."""
        if self.is_frame:
            raise ValueError(f"{self!r} is a frame-rate mask (k_block={self.k_block} != "
                             f"block={self.block}): it has no (block, lo_off, hi_off) form; use "
                             f"pyencoder.ops.cross_attention (mask.frame_params)")
        return self.block, self.lo_off, self.hi_off

    @property
    def frame_params(self):
        """(block, k_block, lo_off, hi_off) as plain ints (any mask)."""
        return self.block, self.k_block, self.lo_off, self.hi_off

    @property
    def is_frame(self):
        """True when the key side has its own block (k_block != block): a cross-attention mask
        between sequences at different rates."""
        return self.k_block != self.block

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def bounded(self):
        """True when history is limited (lo_off >= 0)."""
        return self.lo_off >= 0

    @property
    def is_band(self):
        """True for block == 1 on both sides (a band mask)."""
        return self.block == 1 and self.k_block == 1

    @property
    def left(self):
        """Frames of history a query at the start of its block sees (None: unbounded)."""
        return self.lo_off if self.lo_off >= 0 else None

    @property
    def lookahead(self):
        """The user's extra frames past the end of a query's block (band: right; chunked:
        lookahead; frames: key positions past the end of the query's own key-side block)."""
        return self.hi_off - self.k_block + 1

    def latency(self):
        """Worst-case frames a query waits for past its own position (hi(p) - p at a block's first
        row, = hi_off): the ``lookahead`` a streamable module reports. For a frame mask, key
        positions past the key-side base (p // block) * k_block of the query's block."""
        return self.hi_off

    def with_sink(self, sink):
        """The same interval with ``sink`` leading keys visible to every query."""
        return IntervalMask(self.block, self.lo_off, self.hi_off, self.k_block, sink)

    def width(self):
        """Most keys one query can see (None when history is unbounded)."""
        return None if self.lo_off < 0 else self.lo_off + self.hi_off + 1 + self.sink

    def base(self, p):
        """(p // block) * k_block (k_block = block unless a frame mask); p an int or an integer
        tensor. On tensors it saturates at the first multiple of k_block >= _BASE_CAP: every key
        position (< WINDOW_CAP) lies below base - lo_off and base + hi_off there (both extents
        are within WINDOW_CAP), so a larger base shows the same keys (none with bounded history,
        all without), and int64 never overflows (a frame mask's huge k_block times the query
        block index wrapped: rows that saw every key saw none)."""
        if isinstance(p, torch.Tensor) and self.k_block > self.block and \
                (WINDOW_CAP // self.block + 1) * self.k_block >= _BASE_CAP:
            # (only a frame mask whose key block outgrows its query block can get there: a
            # band's or chunk's base is at most p, and a clamp kernel per call costs a stream)
            return (p // self.block).clamp(max=-(-_BASE_CAP // self.k_block)) * self.k_block
        return (p // self.block) * self.k_block

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
        if self.is_frame:
            kb = self.k_block
            if (self.lo_off < 0 or self.lo_off % kb == 0) and self.hi_off >= kb - 1:
                left = None if self.lo_off < 0 else self.lo_off // kb
                right = (self.hi_off + 1) // kb - 1
                extra = self.hi_off + 1 - (right + 1) * kb
                return (f"IntervalMask.frames(q_frame={self.block}, k_frame={kb}, left={left}, "
                        f"right={right}, extra={extra})")
            return (f"IntervalMask(block={self.block}, lo_off={self.lo_off}, "
                    f"hi_off={self.hi_off}, k_block={kb})")
        if self.block == 1 and self.hi_off >= 0:
            return f"IntervalMask.band(left={self.left}, right={self.hi_off}{sk})"
        if self.block > 1 and self.hi_off >= self.block - 1 and (
                self.lo_off < 0 or self.lo_off % self.block == 0):
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

