"""The wheel: Triton kernels ship as pyencoder.triton_kernels (never a top-level triton_kernels
module), the demo clip ships as package data, and the pure-Python build needs no torch."""
import os
import shutil
import sys
import zipfile

import pytest

import _subproc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # Build from a copy: setup.py writes pyencoder/_build_info.py, which must not overwrite the
    # metadata of an extension built in the working tree.
    src = tmp_path_factory.mktemp("src") / "pyencoder-src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "*.so", "__pycache__", ".pytest_cache",
        ".hypothesis", ".whl", ".gl", "results"))
    out = tmp_path_factory.mktemp("wheel")
    env = dict(os.environ, PYENCODER_BUILD_CUDA="0")
    r = _subproc.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                      "-q", "-w", str(out), str(src)], env=env)
    if r.returncode != 0:
        pytest.skip(f"could not build a wheel here: {r.stderr.strip()[-300:]}")
    (whl,) = [p for p in os.listdir(out) if p.endswith(".whl")]
    with zipfile.ZipFile(os.path.join(out, whl)) as z:
        return z.namelist()


def test_triton_kernels_are_a_subpackage(wheel):
    assert "pyencoder/triton_kernels/__init__.py" in wheel
    assert "pyencoder/triton_kernels/interval_attention.py" in wheel
    assert not [n for n in wheel if n.startswith("triton_kernels/")], \
        "a top-level triton_kernels package would collide with other projects"


def test_package_data_and_subpackages(wheel):
    assert "pyencoder/data/speech_16k.wav" in wheel
    for sub in ("ops", "reference", "nn", "streaming", "models", "hf", "compat"):
        assert f"pyencoder/{sub}/__init__.py" in wheel, sub
    assert not [n for n in wheel if n.startswith("tests/") or n.startswith("benchmarks/")]
