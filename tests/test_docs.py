"""The API reference (docs/make_api.py, `make docs`) builds from the docstrings: one page per
public module, every public name documented, and building it neither initialises CUDA nor opens a
network connection (run in a subprocess whose sockets refuse to connect)."""
import os
import sys

import pytest

import _subproc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, socket, sys
def _refuse(*a, **k):
    raise OSError("network access while building the API docs")
socket.socket.connect = _refuse
socket.create_connection = _refuse
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[1] + "/docs")
import make_api
paths = make_api.build(sys.argv[2])
import torch
print(json.dumps({"paths": paths, "missing": make_api.missing_docstrings(),
                  "modules": list(make_api.MODULES),
                  "cuda_initialized": torch.cuda.is_initialized()}))
"""


def test_api_docs_build(tmp_path):
    pytest.importorskip("transformers")            # the pyencoder.hf page imports it
    import json
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = _subproc.run([sys.executable, "-c", SCRIPT, ROOT, str(tmp_path)], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert not out["cuda_initialized"]
    assert out["missing"] == [], f"public names without a docstring: {out['missing']}"
    for mod in ("pyencoder", "pyencoder.ops", "pyencoder.nn", "pyencoder.streaming",
                "pyencoder.models", "pyencoder.hf", "pyencoder.distill"):
        assert mod in out["modules"]
        page = (tmp_path / f"{mod}.md").read_text()
        assert page.startswith(f"# `{mod}`")
    ops = (tmp_path / "pyencoder.ops.md").read_text()
    assert "## banded_attention" in ops and "chunk_size" in ops
    index = (tmp_path / "index.md").read_text()
    assert "(pyencoder.distill.md)" in index


def test_missing_docstring_is_reported(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "docs"))
    try:
        import make_api
    finally:
        sys.path.pop(0)
    mod = tmp_path / "undoc_mod.py"
    mod.write_text('"""A module."""\n__all__ = ["f", "g"]\ndef f():\n    """Doc."""\n'
                   'def g():\n    pass\n')
    sys.path.insert(0, str(tmp_path))
    try:
        assert make_api.missing_docstrings(["undoc_mod"]) == ["undoc_mod.g"]
    finally:
        sys.path.pop(0)
        sys.modules.pop("undoc_mod", None)
