# The README's two commands: `make demo` (the main job) and `make test`.
# Both bootstrap a local virtualenv (.venv) and install what they need. On a machine without an
# NVIDIA GPU, torch is pinned to the CPU build (TORCH_CPU_SPEC) so pip never pulls the CUDA
# wheels; with a GPU, an already installed torch is used (the venv sees system site-packages).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# PyPI's x86-64 Linux torch is the CUDA build (a plain torch==2.13.0 pulls gigabytes of CUDA
# wheels there): there the pin names the CPU build's local version, found where pip finds it (a
# local wheel, as on CI), else on PyTorch's CPU index. PyPI's macOS and aarch64 Linux torch is
# the CPU build.
ifeq ($(shell uname -s)-$(shell uname -m),Linux-x86_64)
TORCH_CPU_SPEC ?= torch==2.13.0+cpu
else
TORCH_CPU_SPEC ?= torch==2.13.0
endif
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_CPU_FALLBACK = echo "pyencoder: $(TORCH_CPU_SPEC) not found where pip looks; trying PyTorch's CPU index $(TORCH_CPU_INDEX)"
TRITON_SPEC ?= triton==3.6.0
HF_SPEC ?= transformers==5.23.0
PIP := $(PY) -m pip install -q --disable-pip-version-check
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

# `make test-newest`: the newest releases inside the supported ranges (setup.py's [triton] and [hf]
# extras) in a second venv: the Triton interpreter tests (conv, convnext, decode, a quick attention
# subset) and the HF tests. CI runs `make test` (the pinned versions above); run this when a new
# Triton or transformers release appears, then widen the ranges if it passes.
NEWEST_VENV ?= .venv-newest
NEWEST_PY := $(NEWEST_VENV)/bin/python
TRITON_NEWEST_SPEC ?= triton>=3.6,<3.10
HF_NEWEST_SPEC ?= transformers>=5.23,<5.25

.PHONY: venv demo test test-gpu test-compile-full test-newest test-transformers bench info docs clean gpu-prep gpu-session-dry

$(VENV)/.ready: setup.py pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	@if ! $(PY) -c "import torch" >/dev/null 2>&1; then \
	  if [ "$(HAS_GPU)" = "1" ]; then $(PIP) torch; else $(PIP) --retries 1 "$(TORCH_CPU_SPEC)" || \
	    { $(TORCH_CPU_FALLBACK); $(PIP) "$(TORCH_CPU_SPEC)" --index-url "$(TORCH_CPU_INDEX)"; }; fi; \
	fi
	@if [ "$$(uname -s)" = "Linux" ] && ! $(PY) -c "import triton" >/dev/null 2>&1; then \
	  $(PIP) "$(TRITON_SPEC)"; fi
	$(PIP) pytest hypothesis numpy "$(HF_SPEC)"
	$(PIP) --no-build-isolation --no-deps -e .
	touch $@

venv: $(VENV)/.ready

demo: $(VENV)/.ready
	$(PY) -m pyencoder demo

test: $(VENV)/.ready
	$(PY) -m pytest -q tests

test-gpu: $(VENV)/.ready
	$(PY) -m pytest -q -m gpu tests

# every config of every Triton launcher over the whole dtype/head-dim/RoPE/conv grid, compiled for
# sm_80 and sm_90 (make test compiles a sample); PYENCODER_COMPILE_MATRIX=quick for a smaller one
test-compile-full: $(VENV)/.ready
	$(PY) -m pytest -q -m compile_full tests/test_triton_compile.py

$(NEWEST_VENV)/.ready: setup.py pyproject.toml
	$(PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_PY) -m pip install -q --disable-pip-version-check --retries 1 "$(TORCH_CPU_SPEC)" || \
	  { $(TORCH_CPU_FALLBACK); $(NEWEST_PY) -m pip install -q --disable-pip-version-check \
	  "$(TORCH_CPU_SPEC)" --index-url "$(TORCH_CPU_INDEX)"; }
	$(NEWEST_PY) -m pip install -q --disable-pip-version-check "$(TORCH_CPU_SPEC)" \
	  "$(TRITON_NEWEST_SPEC)" "$(HF_NEWEST_SPEC)" pytest hypothesis numpy setuptools wheel
	$(NEWEST_PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

test-newest: $(NEWEST_VENV)/.ready
	$(NEWEST_PY) -c "import triton, transformers; print('triton', triton.__version__, 'transformers', transformers.__version__)"
	TRITON_INTERPRET=1 $(NEWEST_PY) -m pytest -q tests/test_conv_triton.py \
	  tests/test_convnext_fused.py tests/test_streaming_decode_triton.py \
	  tests/test_attention_triton.py tests/test_triton_ops.py tests/test_fast_launch.py -m "not slow"
	$(NEWEST_PY) -m pytest -q tests/test_hf.py tests/test_hf_streaming.py

# transformers' own Wav2Vec2/HuBERT/WavLM model tests with the pyencoder patch at full context and
# with attn_implementation="pyencoder" (tests/external/transformers/). The test files live in the
# git-ignored .cache/transformers-tests/ (fetch.py); without it this prints SKIPPED and succeeds.
test-transformers: $(VENV)/.ready
	$(PIP) parameterized
	$(PY) tests/external/transformers/run.py

bench: $(VENV)/.ready
	$(PIP) matplotlib
	$(PY) -m benchmarks

# API reference from the docstrings (docs/make_api.py: inspect only, no extra package) into
# docs/api/ (git-ignored); fails if a public name has no docstring.
docs: $(VENV)/.ready
	$(PY) docs/make_api.py docs/api

info: $(VENV)/.ready
	$(PY) -m pyencoder info

# What the one GPU call carries (benchmarks/GPU_SESSION.md): pyencoder._C prebuilt for sm_90
# against the device's torch in .prebuilt/, the wheels the device lacks in .whl/, Triton's cache of
# the session's first kernels for sm_90 in .triton-cache/ (all ignored; GPU_PREP_TRITON_CACHE=0
# skips the cache and removes a stale build, keeping .triton-cache/device/; GPU_PREP_JOBS sets its
# compile processes).
gpu-prep:
	bash benchmarks/gpu_prep.sh

# The GPU call rehearsed on this CPU (TRITON_INTERPRET=1, tiny shapes, same stages and $$OUT).
gpu-session-dry: $(VENV)/.ready
	$(PY) -m benchmarks.gpu_session --dry-run --out /tmp/pyencoder-gpu-out-dry

clean:
	rm -rf $(VENV) $(NEWEST_VENV) build *.egg-info
