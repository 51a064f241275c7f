#!/usr/bin/env bash
# Builds ckd_ext against the oldest torch the package supports (the "torch>=X.Y" of setup.py's install_requires)
# in a throw-away virtual environment, from a copy of the working tree (the tree's own build is left alone), and
# runs the CPU tests there. A torch release older than that floor is not supported; raise the floor in setup.py,
# pyproject.toml and requirements-test.txt together (tests/test_build_tools.py checks they agree).
#
#     tools/check_oldest_torch.sh
#
# Environment: PYTHON (the environment's base Python, default python3), CKD_EXT_CUDA (default auto: with nvcc the
# CUDA backend is compiled too, against that torch), MAX_JOBS (default 2), CHECK_DIR (default a new folder under
# /tmp, removed afterwards unless KEEP=1). Needs the network (PyPI) for torch and the test requirements.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
MIN=$(sed -n 's/.*"torch>=\([0-9][0-9.]*\)".*/\1/p' "$ROOT/setup.py" | head -n 1)
[ -n "$MIN" ] || { echo "check_oldest_torch: no \"torch>=X.Y\" in setup.py" >&2; exit 1; }
CHECK_DIR=${CHECK_DIR:-$(mktemp -d /tmp/ckd-oldest-torch.XXXXXX)}
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$CHECK_DIR"' EXIT
# The CPU tests: every op, error, layout and module test on the CPU backend (the emulated and GPU suites, the
# fuzzer and the demos' training runs are left to the full suite).
CPU_TESTS=(tests/test_ops.py tests/test_reference.py tests/test_validation.py tests/test_errors.py
           tests/test_autograd_functions.py tests/test_modules.py tests/test_layouts.py tests/test_fused_linear.py
           tests/test_cpu_isa.py tests/test_gemm_policy.py tests/test_build_info.py tests/test_bickd_outputs.py)
started=$(date +%s)
say() { echo "check_oldest_torch [$(( $(date +%s) - started )) s]: $*"; }

say "torch $MIN.* in $CHECK_DIR"
mkdir -p "$CHECK_DIR/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$CHECK_DIR/src"
rm -f "$CHECK_DIR"/src/ckd_ext/_C*.so "$CHECK_DIR"/src/ckd_ext/_emulated*.so "$CHECK_DIR/src/ckd_ext/_build_info.py"
"$PYTHON" -m venv "$CHECK_DIR/venv"
PY="$CHECK_DIR/venv/bin/python"
"$PY" -m pip install -q "torch==$MIN.*"
echo "torch==$MIN.*" > "$CHECK_DIR/constraints.txt"
"$PY" -m pip install -q -c "$CHECK_DIR/constraints.txt" -r "$CHECK_DIR/src/requirements-test.txt"
say "installed: $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')"
cd "$CHECK_DIR/src"
CKD_EXT_EMULATED=0 MAX_JOBS=${MAX_JOBS:-2} CKD_EXT_CUDA=${CKD_EXT_CUDA:-auto} \
  "$PY" -m pip install -q --no-build-isolation --no-deps -e .
say "built: $("$PY" -c 'import ckd_ext, ckd_ext._build_info as b; print("ckd_ext._C for torch", b.TORCH_VERSION, "available:", ckd_ext.is_available())')"
"$PY" -m pytest "${CPU_TESTS[@]}" -q -p no:cacheprovider
say "passed"
