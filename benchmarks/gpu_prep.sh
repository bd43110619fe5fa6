#!/usr/bin/env bash
# `make gpu-prep`: prepare on this CPU machine what the one GPU call (benchmarks/gpu_session.py)
# carries to the device, so that the device spends none of its minutes on downloads or builds.
#
# What it does
#   1. a build venv (.gpu-prep/venv, Python 3.12) with the device's exact torch
#      ($GPU_PREP_TORCH, default torch==2.11.0 = 2.11.0+cu130 from PyPI, cp312) and its CUDA
#      runtime wheels (torch cannot be imported without them);
#   2. builds pyencoder._C for sm_90 ($TORCH_CUDA_ARCH_LIST, default 9.0) against that torch with
#      CUDA_HOME=/usr/local/cuda (torch guesses wrong from an nvcc wrapper on PATH), in a copy of
#      the tree (the worktree's own pyencoder/_build_info.py is left alone), strips debug info,
#      and stages it as .prebuilt/_C.cpython-312-x86_64-linux-gnu.so with .prebuilt/build_info.json
#      (torch, CUDA, arch list, sha256 of csrc/: the device checks both before loading it and
#      builds there when either differs);
#   3. downloads the wheels the device image lacks into .whl/ (transformers==5.23.0; the device
#      has 5.17; every other requirement of it is on the device image, see
#      benchmarks/GPU_SESSION.md) and prints their Requires-Dist;
#   4. builds the Triton cache .triton-cache/ (benchmarks/triton_cache.py) in the same venv, whose
#      triton is the one torch 2.11.0 pins (3.6.0, cp312: the device's; Triton's cache key hashes
#      its own .so, so another Python or wheel would never hit): the launches of the session's
#      gpu_quick tests (autotuner pinned, as the session runs them) are captured through Triton's
#      JIT on a fake sm_90 driver and compiled for sm_90 in $GPU_PREP_JOBS processes (default 2,
#      ~190 kernels, ~9 CPU-minutes), pruned to the .cubin and metadata of each entry and packed
#      into .triton-cache/entries.tgz (~8 MB), with build_info.json (the key facts: triton,
#      sha256 of triton_key(), ptxas/arch backend hash, env; the device prints and compares them
#      and compiles what misses). The build keeps .triton-cache/device/ (the device's own
#      compiles, kept there by `python -m benchmarks.triton_cache merge`; the session's setup
#      installs them; on a fresh machine it is first seeded from the committed
#      benchmarks/device_cache/, which merge keeps in step). GPU_PREP_TRITON_CACHE=0 skips it and removes a stale build (everything in
#      .triton-cache/ but device/, which stays and is still carried and installed;
#      clean_triton_cache below); GPU_PREP_TRITON_VERIFY=1 then replays the launches against an
#      installed copy (~3 min: every kernel must load from it, python -m
#      benchmarks.triton_cache verify).
# .gpu-prep/, .prebuilt/, .whl/ and .triton-cache/ are git-ignored; all but .gpu-prep/ are carried.
#
# Limits: Linux x86-64 with nvcc 13.x under $CUDA_HOME and network access to PyPI; the first run
# downloads ~3 GB (torch and its CUDA wheels, cached in .gpu-prep/) and needs ~6 GB of disk; later
# runs reuse the venv and rebuild the extension and the Triton cache. The build compiles every .cu
# file once (MAX_JOBS, default 2). Re-run it after any change to csrc/ or triton_kernels/: a
# kernel's cache entry is keyed by its source and line numbers (a stale one only misses).
# Sourced (tests/test_gpu_prep.py), it only defines its functions and runs nothing.

# clean_triton_cache DIR: remove the Triton cache build in DIR (entries.tgz, build_info.json and
# anything else) but keep DIR/device/ (the device's compiles that merge keeps: no build can remake
# them); DIR itself goes when nothing is left.
clean_triton_cache() {
  local dir=$1
  [ -d "$dir" ] || return 0
  find "$dir" -mindepth 1 -maxdepth 1 ! \( -name device -type d \) -exec rm -rf -- {} +
  rmdir -- "$dir" 2>/dev/null || true
}

[ "${BASH_SOURCE[0]}" = "$0" ] || return 0

set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PREP=${GPU_PREP_DIR:-$ROOT/.gpu-prep}
PY312=${GPU_PREP_PYTHON:-/root/.pyenv/versions/3.12.1/bin/python}
TORCH_SPEC=${GPU_PREP_TORCH:-torch==2.11.0}
TRITON_CACHE=${GPU_PREP_TRITON_CACHE:-1}
export GPU_PREP_JOBS=${GPU_PREP_JOBS:-2}
WHEELS=${GPU_PREP_WHEELS:-transformers==5.23.0}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
t0=$(date +%s)
say() { echo "[gpu-prep $(( $(date +%s) - t0 ))s] $*"; }

[ -x "$PY312" ] || { echo "gpu-prep: no Python 3.12 at $PY312 (set GPU_PREP_PYTHON)" >&2; exit 2; }
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "gpu-prep: no nvcc under CUDA_HOME=$CUDA_HOME" >&2; exit 2; }
mkdir -p "$PREP/dl" .prebuilt .whl

# 1. build venv with the device's torch
VPY=$PREP/venv/bin/python
want=${TORCH_SPEC#torch==}
have=$("$VPY" -c "import torch; print(torch.__version__)" 2>/dev/null || true)
if [ "${have%%+*}" != "$want" ]; then
  say "build venv: $TORCH_SPEC (+ its CUDA runtime wheels) into $PREP/venv"
  [ -x "$VPY" ] || "$PY312" -m venv "$PREP/venv"
  "$VPY" -m pip download -q --no-deps "${PLAT[@]}" -d "$PREP/dl" "$TORCH_SPEC"
  "$VPY" -m pip install -q --find-links "$PREP/dl" "$TORCH_SPEC" "setuptools<82" wheel ninja numpy
fi
# the Triton cache build runs the tests' launch code: pytest and hypothesis (small), and
# bench_hf's (transformers, the version carried to the device)
"$VPY" -c "import pytest, hypothesis" 2>/dev/null || "$VPY" -m pip install -q pytest hypothesis
"$VPY" -c "import transformers" 2>/dev/null || "$VPY" -m pip install -q "$WHEELS" \
  || say "no transformers in the build venv: the Triton cache will miss bench_hf's launches"
"$VPY" -c "import torch, triton; print('build torch', torch.__version__, 'cuda', torch.version.cuda,
      'triton', triton.__version__)"

# 2. build the extension in a copy of the tree
say "build pyencoder._C for sm_${TORCH_CUDA_ARCH_LIST//./} (MAX_JOBS=$MAX_JOBS)"
SRC=$PREP/src
rm -rf "$SRC" && mkdir -p "$SRC"
cp -r setup.py README.md csrc pyencoder triton_kernels "$SRC"/
# build_ext --inplace does not run build_py, so setup.py writes no _build_info.py here: a copied
# one would describe the worktree's own install (e.g. a CPU torch); the record is made below
rm -f "$SRC"/pyencoder/_C*.so "$SRC"/pyencoder/_build_info.py
(cd "$SRC" && PYENCODER_BUILD_CUDA=1 "$VPY" setup.py -q build_ext --inplace >build.log 2>&1) \
  || { tail -40 "$SRC/build.log"; echo "gpu-prep: build failed (log: $SRC/build.log)" >&2; exit 1; }
so=$(ls "$SRC"/pyencoder/_C*.so)
raw=$(stat -c %s "$so")
rm -f .prebuilt/_C*.so
cp "$so" .prebuilt/
so=.prebuilt/$(basename "$so")
strip --strip-debug "$so"
"$VPY" - "$SRC" "$so" "$raw" <<'EOF'
import json, os, re, sys
import torch
src, so, raw = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, os.path.dirname(os.path.abspath(so)) + "/..")
from benchmarks.gpu_session import csrc_hash
# what setup.py's _build_info_text records for a CUDA build (PYENCODER_BUILD_CUDA=1 built it with
# this venv's torch)
version = re.search(r'^VERSION = "(.+?)"', open(os.path.join(src, "setup.py")).read(), re.M)[1]
assert torch.version.cuda, f"torch {torch.__version__} in the build venv is not a CUDA build"
info = dict(version=version, cuda_built=True, reason="", torch=torch.__version__,
            cuda=torch.version.cuda, arch_list=os.environ["TORCH_CUDA_ARCH_LIST"],
            csrc_sha256=csrc_hash(os.path.join(src, "csrc")), so=os.path.basename(so),
            so_bytes=os.path.getsize(so), so_bytes_unstripped=raw)
json.dump(info, open(".prebuilt/build_info.json", "w"), indent=1)
print("prebuilt:", json.dumps(info))
EOF

# 3. wheels the device lacks
say "wheels: $WHEELS"
for spec in $WHEELS; do
  name=${spec%%==*}
  rm -f .whl/"${name//-/_}"-*.whl
  "$VPY" -m pip download -q --no-deps "${PLAT[@]}" -d .whl "$spec"
done
for w in .whl/*.whl; do
  echo "$w requires (the device image has these names; see benchmarks/GPU_SESSION.md):"
  unzip -p "$w" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/    /'
done
# 4. the Triton cache, built with the device's Triton (this venv's); first .triton-cache/device/
#    from the committed copy of earlier calls' device compiles (benchmarks/device_cache/, which
#    `triton_cache merge` keeps) when this machine has none: a session's machine starts fresh
"$VPY" -m benchmarks.triton_cache seed --out .triton-cache \
  || echo "gpu-prep: warning: could not seed .triton-cache/device/ (the device compiles again)" >&2
if [ "$TRITON_CACHE" != "0" ]; then
  say "Triton cache for sm_90: the session's gpu_quick launches ($GPU_PREP_JOBS jobs)"
  tc0=$(date +%s)
  (unset TRITON_INTERPRET; "$VPY" -m benchmarks.triton_cache build --out .triton-cache \
     --jobs "$GPU_PREP_JOBS") || { echo "gpu-prep: Triton cache build failed" >&2; exit 1; }
  say "Triton cache built in $(( $(date +%s) - tc0 )) s"
  if [ "${GPU_PREP_TRITON_VERIFY:-0}" = "1" ]; then
    (unset TRITON_INTERPRET; "$VPY" -m benchmarks.triton_cache verify --cache .triton-cache) \
      || { echo "gpu-prep: the Triton cache misses some launches (see above)" >&2; exit 1; }
  fi
else
  clean_triton_cache .triton-cache
  if [ -d .triton-cache/device ]; then
    say "Triton cache skipped (GPU_PREP_TRITON_CACHE=0): .triton-cache/device/ kept (the" \
        "device's own compiles); the device compiles every other kernel"
  else
    say "Triton cache skipped (GPU_PREP_TRITON_CACHE=0): the device compiles every kernel"
  fi
fi
say "done: carried paths"
du -sh .prebuilt .whl $( [ -d .triton-cache ] && echo .triton-cache)
