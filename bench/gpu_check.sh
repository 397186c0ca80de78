#!/usr/bin/env bash
# The GPU check: GPU-marked tests and every benchmark, within 8 minutes, from the checkout (no install, no network).
#   bash bench/gpu_check.sh             # CUDA machine: writes bench/results/<date>-<gpu>.{json,md}, table printed last
#   bash bench/gpu_check.sh --dry-run   # anywhere: same parts on CPU with tiny sizes, results in a temp folder
# A failing part is reported with its log tail; the others still run. See bench/gpu_check.py for the parts.
set -u
cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-python3}
exec timeout 490 "$PYTHON" -m bench.gpu_check "$@"
