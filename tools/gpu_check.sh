#!/usr/bin/env bash
# The GPU check (docs/cuda.md, "The GPU check"): on the lent GPU machine, from the repository root of a checkout
# (with build/prebuilt-gpu carried, when tools/build_prebuilt.py made one):
#
#     OUT=$OUT tools/gpu_check.sh             the first call: the plan's steps by value, each under its own limit
#     OUT=$OUT tools/gpu_check.sh --call 2    the second call: BicKD at 128k, the compiled provider, NCCL
#     tools/gpu_check.sh --dry-run            both plans, each step's command and budget; no GPU needed
#
# Results: $OUT/gpu-check.tar.gz (every step's log and table, rewritten after every step) and $OUT/summary.md.
# The steps live in tools/gpu_check.py; this wrapper picks the Python (PYTHON, else python3, where the GPU
# machine's torch is, else python) and runs it unbuffered. Exit status 1 if any step failed, 2 for bad arguments.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3 || command -v python || echo python3)}
export PYTHON

case "${1:-}" in
  --dry-run) [ $# -eq 1 ] || { echo "usage: tools/gpu_check.sh [--dry-run | --call 1|2]" >&2; exit 2; }
             exec "$PYTHON" -u tools/gpu_check.py run --dry-run ;;
  --call) [ $# -eq 2 ] && { [ "$2" = 1 ] || [ "$2" = 2 ]; } || { echo "usage: tools/gpu_check.sh [--dry-run | --call 1|2]" >&2; exit 2; }
          exec "$PYTHON" -u tools/gpu_check.py run --call "$2" ;;
  "") exec "$PYTHON" -u tools/gpu_check.py run --call 1 ;;
  *) echo "usage: tools/gpu_check.sh [--dry-run | --call 1|2]" >&2; exit 2 ;;
esac
