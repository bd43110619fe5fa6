"""Plain-torch implementations of every op: the CPU path and the test oracle."""
from . import attention, conv

__all__ = ["attention", "conv"]
