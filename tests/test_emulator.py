"""Self-tests of the CUDA-on-CPU emulator (csrc/cuda_emulator), run through the ctest project in csrc/cuda_emulator/tests.

Each configuration (plain, ThreadSanitizer, AddressSanitizer+UBSan) is configured and built in a cached
directory under build/ and its ctest suite must pass: the correct kernels run clean and every planted bug
(divergent shuffle, divergent barrier, shuffle of a returned lane, warp split, deadlock, missing
__syncthreads under TSan, shared-memory overflows under ASan) is caught. The plain configuration also
compiles the test kernels with nvcc when nvcc exists.

Set CKD_EMU_BUILD_DIR to build elsewhere.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIR = REPO / "csrc" / "cuda_emulator" / "tests"
BUILD_ROOT = Path(os.environ.get("CKD_EMU_BUILD_DIR", REPO / "build" / "emulator-tests"))
# Two jobs: the whole file (three builds and test runs) takes well under three minutes on two cores.
JOBS = "2"

_missing = [tool for tool in ("cmake", "ninja", "g++") if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(
    bool(_missing), reason=f"emulator self-tests need {', '.join(_missing)} on PATH (not found)"
)


def _run(cmd, timeout):
    proc = subprocess.run(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-20000:]}"
    return proc.stdout


@pytest.mark.parametrize(
    "sanitizer", ["", "thread", "address"], ids=["plain", "thread-sanitizer", "address-ub-sanitizer"]
)
def test_emulator_ctest(sanitizer):
    build_dir = BUILD_ROOT / (sanitizer or "plain")
    _run(
        [
            "cmake", "-S", SOURCE_DIR, "-B", build_dir, "-G", "Ninja",
            f"-DCKD_SANITIZER={sanitizer}", f"-DPython3_EXECUTABLE={sys.executable}",
        ],
        timeout=120,
    )
    _run(["cmake", "--build", build_dir, "-j", JOBS], timeout=300)
    out = _run(["ctest", "--test-dir", build_dir, "-j", JOBS, "--output-on-failure"], timeout=300)
    assert "100% tests passed" in out, out
