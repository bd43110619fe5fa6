"""Plain-torch implementations of every op: the CPU path and the test oracle."""
from . import attention, conv, convnext, decode_attention

__all__ = ["attention", "conv", "convnext", "decode_attention"]
