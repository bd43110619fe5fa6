"""pyencoder: fused Triton and CUDA kernels for streaming audio encoders and decoders.

Importing this package never loads the compiled extension and never initialises CUDA.
"""
from ._backend import use_backend, available_backends, backend_info
from .rope import Rope
from . import ops
from .mask import IntervalMask

__version__ = "0.1.0"

__all__ = ["IntervalMask", "Rope", "ops", "use_backend", "available_backends", "backend_info",
           "__version__"]


def __getattr__(name):
    # Heavier subpackages load on first use.
    import importlib
    if name in ("nn", "streaming", "models", "hf", "reference", "distill", "compat"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'pyencoder' has no attribute {name!r}")
