"""Compile-only check of every CUDA kernel file (csrc/**/*.cu) for sm_80 and sm_90.

Runs the installed nvcc with ``-Xptxas -v``, fails on compile errors and reports register spills
(printed; a spill is not a failure). The .cu files are torch-free, so this needs only nvcc. The
compiles run in parallel (one per core) and are cached by content hash under
``.pytest_cache/nvcc`` so an unchanged tree recompiles nothing. Skipped when nvcc is absent."""
import concurrent.futures as cf
import glob
import hashlib
import os
import re
import shutil

import pytest

import _subproc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
ARCHS = ("sm_80", "sm_90")
FLAGS = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__",
         "-U__CUDA_NO_HALF2_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-Xptxas", "-v"]


def _nvcc():
    path = shutil.which("nvcc")
    if path is None:
        home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
        cand = os.path.join(home, "bin", "nvcc")
        path = cand if os.path.exists(cand) else None
    return path


def _sources():
    return sorted(glob.glob(os.path.join(CSRC, "**", "*.cu"), recursive=True))


def _tree_hash():
    h = hashlib.sha256()
    for f in sorted(glob.glob(os.path.join(CSRC, "**", "*"), recursive=True)):
        if os.path.isfile(f):
            h.update(f.encode())
            with open(f, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()[:16]


def _compile(nvcc, src, arch, outdir):
    out = os.path.join(outdir, f"{os.path.basename(src)}.{arch}.o")
    cmd = [nvcc, *FLAGS, f"-arch={arch}", "-I", CSRC, "-c", src, "-o", out]
    p = _subproc.run(cmd)
    return src, arch, p.returncode, p.stdout + p.stderr


_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_FUNC = re.compile(r"Compiling entry function '([^']+)'")


def _spills(log):
    """[(function, store_bytes, load_bytes)] for functions that spill."""
    res, func = [], None
    for line in log.splitlines():
        m = _FUNC.search(line)
        if m:
            func = m.group(1)
        m = _SPILL.search(line)
        if m and (int(m.group(1)) or int(m.group(2))):
            res.append((func, int(m.group(1)), int(m.group(2))))
    return res


def test_nvcc_compile_all_kernels():
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH); CUDA kernels not "
                    "compile-checked")
    sources = _sources()
    if not sources:
        pytest.skip("no .cu files under csrc/")
    cache = os.path.join(ROOT, ".pytest_cache", "nvcc", _tree_hash())
    stamp = os.path.join(cache, "ok")
    if os.path.exists(stamp):
        with open(stamp) as f:
            print(f.read())
        return
    os.makedirs(cache, exist_ok=True)
    jobs = [(s, a) for s in sources for a in ARCHS]
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with cf.ThreadPoolExecutor(workers) as ex:
        results = list(ex.map(lambda j: _compile(nvcc, j[0], j[1], cache), jobs))
    errors, report = [], []
    for src, arch, rc, log in results:
        rel = os.path.relpath(src, ROOT)
        if rc != 0:
            errors.append(f"{rel} [{arch}] failed (rc={rc}):\n{log[-4000:]}")
            continue
        for func, st, ld in _spills(log):
            report.append(f"{rel} [{arch}] {func}: {st} B spill stores, {ld} B spill loads")
    summary = (f"nvcc compiled {len(sources)} files x {len(ARCHS)} archs; "
               f"{len(report)} kernel(s) spill" + ("".join("\n  " + r for r in report)))
    print(summary)
    assert not errors, "\n\n".join(errors)
    with open(stamp, "w") as f:
        f.write(summary)
