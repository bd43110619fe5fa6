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


def _setup_constant(name):
    import re
    src = open(os.path.join(ROOT, "setup.py")).read()
    m = re.search(rf'^{name} = "([^"]+)"$', src, re.M)
    assert m, f"setup.py has no {name}"
    return m.group(1)


def test_supported_hf_range_agrees():
    """setup.py's [hf] extra states the range pyencoder.hf checks (skipped without transformers:
    pyencoder.hf needs it to import)."""
    pytest.importorskip("transformers")
    from pyencoder.hf import _compat
    assert _setup_constant("HF_SPEC") == "transformers" + _compat.TESTED_SPEC
    assert _compat.in_tested_range("5.23.0") and _compat.in_tested_range("5.24.0")
    assert not _compat.in_tested_range("5.22.9") and not _compat.in_tested_range("5.25.0")


def test_supported_ranges_agree():
    """setup.py's [triton] extra states the range the runtime checks and reports (with numpy:
    Triton's interpreter imports it); python_requires is what the extras resolve on."""
    from pyencoder import _backend
    assert _setup_constant("TRITON_SPEC") == "triton" + _backend.TRITON_SPEC
    src = open(os.path.join(ROOT, "setup.py")).read()
    assert 'python_requires=">=3.10"' in src
    assert "Python 3.10" in open(os.path.join(ROOT, "README.md")).read()
    start = src.index('"triton": [')
    assert '"numpy"' in src[start:src.index("]", start)]
    start = src.index("install_requires=[")
    assert "triton" not in src[start:src.index("]", start)], \
        "triton must be an extra: a CPU-only install cannot run its kernels (a CUDA torch brings it)"
    assert _backend.triton_version_note("3.6.0") is None
    assert _backend.triton_version_note("3.9.1") is None
    assert "outside the tested range" in _backend.triton_version_note("3.5.0")
    assert "outside the tested range" in _backend.triton_version_note("3.10.0")
    missing = ModuleNotFoundError("No module named 'numpy'", name="numpy")
    assert "needs numpy: pip install numpy" in _backend.triton_import_reason(missing)
    absent = ModuleNotFoundError("No module named 'triton'", name="triton")
    assert _backend.triton_import_reason(absent).startswith("triton is not installed")
    for broken in ("triton.language", "triton._C.libtriton", None):    # installed, broken
        e = ImportError("cannot import", name=broken)
        assert _backend.triton_import_reason(e).startswith("triton is installed but does not")


def _git_status():
    r = _subproc.run(["git", "status", "--porcelain"], cwd=ROOT)
    if r.returncode != 0:
        pytest.skip("not a git checkout")
    return r.stdout


def test_install_does_not_write_into_source_tree(tmp_path):
    """A non-editable `pip install .` from the checkout generates _build_info.py in the build
    directory only: the source tree (tracked files and the editable install's own
    pyencoder/_build_info.py) is left as it was."""
    info = os.path.join(ROOT, "pyencoder", "_build_info.py")
    before = (os.stat(info).st_mtime_ns, open(info).read()) if os.path.exists(info) else None
    status = _git_status()
    target = tmp_path / "site"
    env = dict(os.environ, PYENCODER_BUILD_CUDA="0")
    r = _subproc.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                      "--no-build-isolation", "--disable-pip-version-check", "--target",
                      str(target), ROOT], env=env)
    if r.returncode != 0:
        pytest.skip(f"could not pip install here: {r.stderr.strip()[-300:]}")
    after = (os.stat(info).st_mtime_ns, open(info).read()) if os.path.exists(info) else None
    assert after == before, "pip install . rewrote pyencoder/_build_info.py in the source tree"
    assert _git_status() == status
    ns = {}
    exec(open(target / "pyencoder" / "_build_info.py").read(), ns)
    assert ns["BUILD_INFO"]["cuda_built"] is False
    assert ns["BUILD_INFO"]["reason"] == "PYENCODER_BUILD_CUDA=0"


def test_sdist_has_the_cuda_sources_and_the_test_helpers(tmp_path):
    """The sdist lacked csrc/ (a CUDA build from it failed in setuptools with 'At least one
    source is required') and the tests' helpers (conftest.py, oracle.py: 72 collection errors):
    MANIFEST.in names them."""
    import tarfile
    src = tmp_path / "pyencoder-src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.egg-info", "*.so", "__pycache__", ".pytest_cache",
        ".hypothesis", ".whl", ".gl", "results", ".prebuilt", ".triton-cache", "bench-results",
        ".cache", "dist"))
    env = dict(os.environ, PYENCODER_BUILD_CUDA="0")
    r = _subproc.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
                     cwd=str(src), env=env)
    if r.returncode != 0:
        pytest.skip(f"could not build an sdist here: {r.stderr.strip()[-300:]}")
    (sd,) = os.listdir(tmp_path / "dist")
    with tarfile.open(tmp_path / "dist" / sd) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    csrc = _subproc.run(["git", "ls-files", "csrc"], cwd=ROOT).stdout.split()
    assert csrc and not set(csrc) - names
    for helper in ("tests/conftest.py", "tests/oracle.py", "tests/_subproc.py",
                   "tests/_stream_utils.py", "MANIFEST.in", "setup.py", "pyproject.toml",
                   "benchmarks/__init__.py", "benchmarks/gpu_prep.sh", "docs/make_api.py",
                   "triton_kernels/interval_attention.py", "pyencoder/data/speech_16k.wav",
                   "docs/masks.png"):
        assert helper in names, helper


@pytest.mark.parametrize("missing, says", [
    ("numpy", "triton: triton is installed but does not import (No module named 'numpy'); its "
              "interpreter (TRITON_INTERPRET=1) needs numpy: pip install numpy"),
    ("triton", "triton: not installed (optional: pip install 'pyencoder[triton]'")])
def test_info_tells_a_missing_triton_from_a_missing_numpy(missing, says, monkeypatch, capsys):
    """`python -m pyencoder info` said "triton: not installed" where triton was installed and
    its interpreter lacked numpy ([triton] extra without numpy)."""
    import builtins
    from pyencoder.__main__ import _info
    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "triton":
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake)
    _info(None)
    assert says in capsys.readouterr().out
