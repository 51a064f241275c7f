"""Builds the CMake project's C++ unit tests (torch-free kernels; CKD_BUILD_OPS=OFF skips the slow
libtorch library) and runs them with ctest, so the CMake build cannot rot."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ninja") is None, reason="cmake/ninja missing")
def test_cpp_kernel_unit_tests_pass_under_ctest(tmp_path):
    build = tmp_path / "cmake"
    subprocess.run(["cmake", "-S", ROOT, "-B", build, "-G", "Ninja", "-DCKD_BUILD_OPS=OFF"], check=True,
                   capture_output=True)
    subprocess.run(["cmake", "--build", build, "--target", "test_cpu_kernels"], check=True, capture_output=True)
    result = subprocess.run(["ctest", "--test-dir", build, "-R", "^cpu_kernels$", "--output-on-failure"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 tests passed" in result.stdout or "100% tests passed" in result.stdout
