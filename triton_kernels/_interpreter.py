"""Compatibility fix for running the kernels under TRITON_INTERPRET=1 (CPU tests).

Triton 3.6's interpreter keeps scalar kernel arguments as 1-element NumPy arrays and converts loop
bounds with int(array), which NumPy >= 2.3 rejects for arrays with ndim > 0, so every loop with a
runtime bound fails. The fix gives the interpreter's tensors an ``__index__`` that reads the single
element. Applied once per process, only when TRITON_INTERPRET=1; compiled (GPU) runs are untouched.
"""
import os


def patch_interpreter():
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    base = getattr(interpreter, "_patch_lang_tensor", None)
    if base is None or getattr(base, "_pyencoder_fixed", False):
        return

    def _patched(tensor, scope):
        base(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _patched._pyencoder_fixed = True
    interpreter._patch_lang_tensor = _patched


if os.environ.get("TRITON_INTERPRET", "0") == "1":
    patch_interpreter()
