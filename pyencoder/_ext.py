"""Lazy loader for the compiled extension pyencoder._C, with a readable availability report."""
import importlib
import threading

_lock = threading.Lock()
_state = {"tried": False, "module": None, "reason": None}


def _build_info():
    try:
        from ._build_info import BUILD_INFO
        return BUILD_INFO
    except ImportError:
        return None


def load():
    """Return the loaded pyencoder._C module, or None (see `reason()`)."""
    with _lock:
        if _state["tried"]:
            return _state["module"]
        _state["tried"] = True
        info = _build_info()
        if info is not None and not info.get("cuda_built"):
            _state["reason"] = ("pyencoder was built without the CUDA extension ("
                                f"{info.get('reason')}); rebuild with a CUDA torch and toolkit: "
                                "PYENCODER_BUILD_CUDA=1 pip install --no-build-isolation .")
            return None
        import torch
        if info is not None and info.get("torch"):
            built = info["torch"].split("+")[0]
            have = torch.__version__.split("+")[0]
            if built != have:
                _state["reason"] = (f"pyencoder._C was built for torch {info['torch']}, you have "
                                    f"torch {torch.__version__}; rebuild with "
                                    "pip install --no-build-isolation --force-reinstall .")
                return None
        try:
            mod = importlib.import_module("pyencoder._C")
        except ImportError as e:
            _state["reason"] = (f"pyencoder._C could not be imported ({e}); build it with "
                                "PYENCODER_BUILD_CUDA=1 pip install --no-build-isolation .")
            return None
        _state["module"] = mod
        return mod


def reason():
    load()
    return _state["reason"]
