#!/usr/bin/env bash
# The one GPU call (benchmarks/gpu_session.py, plan in benchmarks/GPU_SESSION.md), kept as a
# shell entry point: `bash benchmarks/gpu_session.sh [--budget 480] [--dry-run] [--out DIR]`.
# Uses $PYTHON (default python3: on the device, the interpreter that holds torch).
cd "$(dirname "$0")/.." && exec "${PYTHON:-python3}" -m benchmarks.gpu_session "$@"
