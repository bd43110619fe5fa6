"""Build script for pyencoder.

Pure-Python install always works. The CUDA extension ``pyencoder._C`` is built only when a CUDA
toolkit and a CUDA build of torch are present:

    PYENCODER_BUILD_CUDA=auto|0|1   (default auto: build when possible; 1: fail if impossible)
    MAX_JOBS, TORCH_CUDA_ARCH_LIST  honoured by torch.utils.cpp_extension
    pip install --no-build-isolation .   (so the build sees the installed torch)

Build metadata (torch and CUDA versions the extension was compiled against) is generated as
``pyencoder/_build_info.py`` in the build directory (``build_py``), never in the source tree, and
checked when the extension is loaded. Only an editable install (``pip install -e .``), whose
installed package *is* the source tree, writes it there (the file is git-ignored).

Triton is an extra (``pip install ".[triton]"``): a CUDA build of torch already brings the Triton
it was built with, and on a CPU-only machine Triton runs the kernels only in its interpreter
(TRITON_INTERPRET=1, for tests). Supported and tested range: TRITON_SPEC below (CI runs 3.6, the
device's version; ``make test-newest`` runs the Triton and HF tests under the newest releases).
"""
import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py as _build_py

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"
# Keep in sync with pyencoder._backend.TRITON_SPEC and pyencoder.hf._compat.TESTED_SPEC
# (tests/test_packaging.py checks).
TRITON_SPEC = "triton>=3.6,<3.10"
HF_SPEC = "transformers>=5.23,<5.25"


def _cuda_sources():
    """The extension's sources, relative to the setup directory (as setuptools wants them)."""
    csrc = os.path.join(HERE, "csrc")
    found = sorted(glob.glob(os.path.join(csrc, "**", "*.cu"), recursive=True))
    found += sorted(glob.glob(os.path.join(csrc, "**", "*.cpp"), recursive=True))
    return [os.path.relpath(p, HERE) for p in found]


def _want_cuda():
    mode = os.environ.get("PYENCODER_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"PYENCODER_BUILD_CUDA must be auto, 0 or 1; got {mode!r}")
    if mode == "0":
        return False, "PYENCODER_BUILD_CUDA=0"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception as e:  # torch absent (e.g. isolated build): pure-Python install
        reason = f"torch not importable in the build environment ({e.__class__.__name__})"
        if mode == "1":
            raise SystemExit("PYENCODER_BUILD_CUDA=1 but " + reason + "; use --no-build-isolation")
        return False, reason
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU build"
    elif CUDA_HOME is None:
        reason = "no CUDA toolkit found (set CUDA_HOME)"
    elif not _cuda_sources():
        reason = (f"the CUDA sources are missing ({os.path.join(HERE, 'csrc')} holds no .cu / "
                  f".cpp: build from a git checkout or a full sdist)")
    else:
        return True, ""
    if mode == "1":
        raise SystemExit("PYENCODER_BUILD_CUDA=1 but " + reason)
    return False, reason


def _build_info_text(built, reason):
    info = {"version": VERSION, "cuda_built": built, "reason": reason,
            "torch": None, "cuda": None}
    if built:
        import torch
        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
    return ("# Generated at build time by setup.py: what pyencoder._C was built against.\n"
            f"BUILD_INFO = {info!r}\n")


class build_py(_build_py):
    """Copies the packages, then generates pyencoder/_build_info.py in the build directory. An
    editable install maps the package to the source tree, so there (only) it goes to the source."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            path = os.path.join(HERE, "pyencoder", "_build_info.py")
        else:
            path = os.path.join(self.build_lib, "pyencoder", "_build_info.py")
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(_build_info_text(*_BUILT))

    def get_outputs(self, include_bytecode=True):
        outs = super().get_outputs(include_bytecode)
        gen = os.path.join(self.build_lib, "pyencoder", "_build_info.py")
        return outs if gen in outs else outs + [gen]


def _extensions():
    built, reason = _BUILT
    if not built:
        print(f"pyencoder: building without the CUDA extension ({reason})", file=sys.stderr)
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    sources = _cuda_sources()
    ext = CUDAExtension(
        name="pyencoder._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                     "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__",
                     "-U__CUDA_NO_HALF2_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"],
        },
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


_BUILT = _want_cuda()
ext_modules, cmdclass = _extensions()
cmdclass["build_py"] = build_py

setup(
    name="pyencoder",
    version=VERSION,
    description="Fused Triton and CUDA kernels for streaming audio encoders and decoders",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(
        os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "pyencoder", "pyencoder.data", "pyencoder.ops", "pyencoder.reference", "pyencoder.nn",
        "pyencoder.streaming", "pyencoder.models", "pyencoder.hf", "pyencoder.compat",
        "pyencoder.triton_kernels",
    ],
    # Triton kernels live in the top-level folder triton_kernels/ but install as the subpackage
    # pyencoder.triton_kernels: the top-level import name `triton_kernels` belongs to others.
    package_dir={"pyencoder.triton_kernels": "triton_kernels"},
    package_data={"pyencoder": ["data/*.wav"]},
    include_package_data=True,
    # torch >= 2.6: torch.library.triton_op / wrap_triton register the Triton backend's ops;
    # tested with torch 2.11 (GPU) and 2.13 (CPU)
    install_requires=[
        "torch>=2.6",
    ],
    extras_require={
        # numpy: Triton's interpreter (TRITON_INTERPRET=1, the kernels on a CPU) imports it
        "triton": [TRITON_SPEC + '; platform_system == "Linux"', "numpy"],
        "test": ["pytest", "hypothesis", "numpy"],
        "hf": [HF_SPEC],
        "bench": ["matplotlib", "tqdm"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
