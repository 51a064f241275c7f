"""What ckd_ext's compiled modules are built from: the sources and compiler flags, in one place for setup.py (the
package build) and CMakeLists.txt (C++ work, compile_commands.json, ctest), so that the two builds cannot drift.

    python tools/build_config.py --cmake FILE    writes the lists as CMake variables (CMakeLists.txt includes it)

Paths are relative to the repository root.
"""
import sys
from pathlib import Path

# ckd_ext._C: the op library with the CPU backend (and the CUDA backend when built with CUDA).
OPS_SOURCES = [
    "csrc/ops.cpp", "csrc/ckd.cpp", "csrc/bickd.cpp", "csrc/kd.cpp",
    "csrc/orchestration/common.cpp", "csrc/orchestration/gemm.cpp", "csrc/orchestration/plan.cpp",
    "csrc/orchestration/workspace.cpp", "csrc/backends/select.cpp", "csrc/backends/cpu/cpu_backend.cpp",
]
CUDA_SOURCES = ["csrc/backends/cuda/cuda_backend.cu"]
# ckd_ext._emulated (CKD_EXT_EMULATED=1): the CUDA kernels compiled by the host compiler with the CPU emulator's
# runtime, a backend that _C runs CPU tensors through in tests (csrc/backends/backends.h says why it is a
# separate module).
EMULATED_SOURCES = ["csrc/backends/emulated/emulated_backend.cpp", "csrc/device/emulator.cpp"]
INCLUDE_DIRS = ["csrc"]

# -fno-trapping-math lets GCC if-convert the float compares in the CPU kernels' exp and max-shift loops and
# vectorise them (about 3x on KD); IEEE results are unchanged, only FP-exception traps are not kept.
# -fopenmp: at::parallel_for is an inline template whose OpenMP pragma is compiled in *our* sources; without the
# flag every CPU kernel runs on one thread.
CXX_FLAGS = ["-O3", "-fvisibility=hidden", "-fno-trapping-math", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
# --expt-relaxed-constexpr: the kernels call constexpr host functions (std::numeric_limits) on the device, and
# c10::Half / c10::BFloat16 need it under nvcc.
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-std=c++20"]
# The emulator runs every CUDA thread as an OS thread.
EMULATED_CXX_FLAGS = ["-O2", "-pthread", "-fvisibility=hidden"]
EMULATED_LINK_FLAGS = ["-pthread"]
# Ampere and Hopper, the GPUs the package is built for unless TORCH_CUDA_ARCH_LIST says otherwise, plus Hopper's PTX,
# which the driver compiles for newer GPUs (sm_100, sm_120) that would otherwise find "no kernel image".
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _cmake_list(name, values):
    return f'set({name} {" ".join(values)})\n'


def write_cmake(path: Path) -> None:
    path.write_text(
        "# Written by tools/build_config.py; do not edit.\n"
        + _cmake_list("CKD_OPS_SOURCES", OPS_SOURCES)
        + _cmake_list("CKD_CUDA_SOURCES", CUDA_SOURCES)
        + _cmake_list("CKD_EMULATED_SOURCES", EMULATED_SOURCES)
        + _cmake_list("CKD_INCLUDE_DIRS", INCLUDE_DIRS)
        + _cmake_list("CKD_CXX_FLAGS", CXX_FLAGS)
        + _cmake_list("CKD_LINK_FLAGS", LINK_FLAGS)
        + _cmake_list("CKD_NVCC_FLAGS", NVCC_FLAGS)
        + _cmake_list("CKD_EMULATED_CXX_FLAGS", EMULATED_CXX_FLAGS)
        + _cmake_list("CKD_EMULATED_LINK_FLAGS", EMULATED_LINK_FLAGS)
        + f'set(CKD_DEFAULT_CUDA_ARCHS "{DEFAULT_CUDA_ARCHS}")\n'
    )


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--cmake":
        raise SystemExit("usage: python tools/build_config.py --cmake FILE")
    write_cmake(Path(sys.argv[2]))
