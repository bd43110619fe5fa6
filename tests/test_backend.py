"""Backend selection, availability report, and an import that never touches CUDA or _C."""
import os
import sys

import pytest

import _subproc
import torch

import pyencoder
from pyencoder import _backend
from pyencoder.ops import banded_attention, causal_conv1d


def test_import_does_not_initialise_cuda_or_load_extension():
    code = (
        "import sys, torch\n"
        "import pyencoder, pyencoder.ops\n"
        "assert 'pyencoder._C' not in sys.modules, 'extension loaded eagerly'\n"
        "assert 'triton' not in sys.modules, 'triton imported eagerly'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'\n"
        "print('ok')\n")
    env = dict(os.environ)
    out = _subproc.run([sys.executable, "-c", code], env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_info_reports_every_backend():
    info = pyencoder.backend_info()
    assert set(info) == {"reference", "triton", "cuda"}
    assert info["reference"] == (True, None)
    for name, (ok, reason) in info.items():
        assert ok or (isinstance(reason, str) and reason)


def test_cli_info_runs():
    out = _subproc.run([sys.executable, "-m", "pyencoder", "info"])
    assert out.returncode == 0, out.stderr
    for name in ("reference", "triton", "cuda"):
        assert name in out.stdout


def test_cpu_auto_is_reference():
    assert _backend.select("attention", "forward", "cpu", {}, None) == "reference"
    assert _backend.select("conv", "forward", "cpu", {}, None) == "reference"


def test_precedence_call_context_env(monkeypatch):
    monkeypatch.setenv("PYENCODER_BACKEND", "cuda")
    assert _backend.requested_backend("attention") == "cuda"
    with pyencoder.use_backend("reference"):
        assert _backend.requested_backend("attention") == "reference"
        with pyencoder.use_backend(conv="auto"):
            assert _backend.requested_backend("conv") == "auto"
            assert _backend.requested_backend("attention") == "reference"
        assert _backend.requested_backend("conv") == "reference"
        assert _backend.requested_backend("attention", "triton") == "triton"
    assert _backend.requested_backend("attention") == "cuda"
    monkeypatch.delenv("PYENCODER_BACKEND")
    assert _backend.requested_backend("attention") is None


def test_env_backend_is_validated(monkeypatch):
    monkeypatch.setenv("PYENCODER_BACKEND", "fastest")
    with pytest.raises(ValueError, match="PYENCODER_BACKEND must be one of"):
        banded_attention(*(torch.randn(1, 1, 4, 4) for _ in range(3)), left=1, right=0)


def test_use_backend_rejects_unknown():
    with pytest.raises(ValueError, match="unknown op family"):
        with pyencoder.use_backend(mlp="triton"):
            pass
    with pytest.raises(ValueError, match="must be one of"):
        with pyencoder.use_backend("tpu"):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_forced_cuda_backend_on_cpu_raises_with_reason():
    x = torch.randn(1, 4, 10)
    w = torch.randn(4, 1, 3)
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run conv.forward here: .+"):
        causal_conv1d(x, w, groups=4, backend="cuda")
    q = torch.randn(1, 1, 4, 4)
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run attention.forward"):
        banded_attention(q, q, q, left=1, right=0, backend="cuda")


def test_forced_reference_runs_everywhere():
    q = torch.randn(1, 2, 6, 4)
    with pyencoder.use_backend("reference"):
        out = banded_attention(q, q, q, left=1, right=1)
    assert out.shape == q.shape
