#!/usr/bin/env bash
# One-shot GPU check (see benchmarks/gpu_check.py): GPU tests with compiled kernels, the LFA
# kernel benchmark, and a 1-GPU 2B training run with Triton LFA and with the reference.
# Writes benchmarks/results/gpu_<device>_<date>.json; at most ~8 minutes on an H100/H200.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine (no network needed)
#   bash benchmarks/gpu_check.sh --dry-run   # anywhere: every stage's CPU stand-in
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
