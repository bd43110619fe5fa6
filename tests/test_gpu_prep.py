"""benchmarks/gpu_prep.sh without running the prep (it downloads ~3 GB and builds): its
GPU_PREP_TRITON_CACHE=0 cleanup (clean_triton_cache, run by sourcing the script into a bash in a
temporary folder) removes a stale cache build but keeps .triton-cache/device/, the device's own
compiles that `python -m benchmarks.triton_cache merge` keeps and no build can remake."""
import os
import random
import re
import shutil
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(os.path.dirname(HERE), "benchmarks", "gpu_prep.sh")
sys.path.insert(0, HERE)
import _subproc  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _bash(cwd, code, *args):
    """``code`` in a bash that sourced gpu_prep.sh (its $0 is not the script: the script runs
    only when it is $0), run in ``cwd`` with ``args`` as $1..."""
    # no Python 3.12 and no nvcc: should the script ever run past the sourcing guard, it stops at
    # its first check (exit 2) instead of downloading and building
    env = {**os.environ, "GPU_PREP_SCRIPT": SCRIPT, "GPU_PREP_PYTHON": "/nonexistent/python3.12",
           "CUDA_HOME": "/nonexistent/cuda"}
    r = _subproc.run(["bash", "-c", f'source "$GPU_PREP_SCRIPT" || exit 9\n{code}', "bash",
                      *args], cwd=cwd, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _tree(root):
    """{relative path: file bytes or None for a folder} under root."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs:
            out[os.path.relpath(os.path.join(d, n), root)] = None
        for n in files:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


def _write(path, rng):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(rng.randbytes(rng.randint(1, 64)))


def _cache(root, rng, device=True):
    """A .triton-cache as a build and merges leave it (random contents), with device/ when asked."""
    tc = os.path.join(root, ".triton-cache")
    for rel in ("entries.tgz", "build_info.json", ".hidden-tmp", "stage-old/entries.tgz",
                "stage-old/device/entries.tgz", "devices/x.json", "device.bak"):
        _write(os.path.join(tc, rel), rng)
    if device:
        for rel in ("entries.tgz", "inductor.tgz", "device_cache_info.json", "sub/a.json"):
            _write(os.path.join(tc, "device", rel), rng)
    return tc


def test_sourcing_runs_nothing(tmp_path):
    """Sourced, the script defines its functions and stops: no folder made, no venv, no cd."""
    out = _bash(str(tmp_path), 'type -t clean_triton_cache; pwd')
    assert out.split() == ["function", str(tmp_path)]
    assert os.listdir(tmp_path) == []


def test_clean_keeps_device(tmp_path):
    rng = random.Random(os.urandom(8))
    tc = _cache(str(tmp_path), rng)
    device = _tree(os.path.join(tc, "device"))
    assert len(device) == 5
    _bash(str(tmp_path), 'clean_triton_cache .triton-cache')
    assert os.listdir(tc) == ["device"]
    assert _tree(os.path.join(tc, "device")) == device


def test_clean_without_device_removes_the_folder(tmp_path):
    rng = random.Random(os.urandom(8))
    _cache(str(tmp_path), rng, device=False)
    os.makedirs(tmp_path / "other")
    _bash(str(tmp_path), 'clean_triton_cache .triton-cache; clean_triton_cache absent')
    assert os.listdir(tmp_path) == ["other"]


def test_a_device_file_is_not_kept(tmp_path):
    """Only a device/ folder is kept: a stray file of that name is part of the stale build."""
    tc = tmp_path / ".triton-cache"
    tc.mkdir()
    (tc / "device").write_bytes(b"not a folder")
    (tc / "entries.tgz").write_bytes(b"x")
    _bash(str(tmp_path), 'clean_triton_cache "$1"', str(tc))
    assert not tc.exists()


def test_skip_branch_uses_the_cleanup():
    """GPU_PREP_TRITON_CACHE=0 runs clean_triton_cache on .triton-cache, and nothing in the script
    removes .triton-cache wholesale."""
    text = open(SCRIPT).read()
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    branch = re.search(r'if \[ "\$TRITON_CACHE" != "0" \]; then\n(.*?)\nelse\n(.*?)\nfi\n', code,
                       re.S)
    assert branch, "the GPU_PREP_TRITON_CACHE branch of gpu_prep.sh was not found"
    assert re.search(r"^\s*clean_triton_cache \.triton-cache\s*$", branch[2], re.M)
    assert not re.search(r"rm\s+-\w*\s+[\"']?(\./)?\.triton-cache", code)
