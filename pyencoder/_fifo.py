"""Bounded FIFO memo tables: plain dicts (insertion-ordered) that drop their oldest entry when
full. Every memo of the host path (masks, value checks, RoPE tables, call programs, bias columns
and their bucket indices) stores through ``put``; they are process-wide, so ``put`` tolerates
threads storing at once (a lookup, ``cache.get``, is one atomic dict operation)."""


def put(cache, key, value, limit):
    """``cache[key] = value``; a new key in a cache holding ``limit`` entries first drops the
    oldest one. Returns ``value``."""
    if key not in cache:
        # threads share these tables (a server's requests): another one may evict the same
        # oldest key first, or change the dict under the iterator (then a few entries more than
        # limit stay until the next store trims them)
        while len(cache) >= limit:
            try:
                cache.pop(next(iter(cache)), None)
            except (RuntimeError, StopIteration):
                break
    cache[key] = value
    return value
