"""Bounded FIFO memo tables: plain dicts (insertion-ordered) that drop their oldest entry when
full. Every memo of the host path (masks, value checks, RoPE tables, call programs, bias columns
and their bucket indices) stores through ``put``."""


def put(cache, key, value, limit):
    """``cache[key] = value``; a new key in a cache holding ``limit`` entries first drops the
    oldest one. Returns ``value``."""
    if key not in cache and len(cache) >= limit:
        cache.pop(next(iter(cache)))
    cache[key] = value
    return value
