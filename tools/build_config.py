"""What ckd_ext's compiled modules are built from: the sources and compiler flags, in one place for setup.py (the
package build) and CMakeLists.txt (C++ work, compile_commands.json, ctest), so that the two builds cannot drift.

    python tools/build_config.py --cmake FILE    writes the lists as CMake variables (CMakeLists.txt includes it)

Paths are relative to the repository root.
"""
import hashlib
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The CPU backend (with its kernels, cpu_kernels.h): in OPS_SOURCES for the baseline instruction set, and compiled
# again, into the same library, once per entry of CPU_ISA_FLAGS below.
CPU_BACKEND_SOURCE = "csrc/backends/cpu/cpu_backend.cpp"

# ckd_ext._C: the op library with the CPU backend (and the CUDA backend when built with CUDA).
OPS_SOURCES = [
    "csrc/schemas.cpp", "csrc/python_module.cpp", "csrc/ckd.cpp", "csrc/bickd.cpp", "csrc/kd.cpp",
    "csrc/orchestration/op_call.cpp", "csrc/orchestration/gemm.cpp", "csrc/orchestration/plan.cpp",
    "csrc/orchestration/plan_inputs.cpp", "csrc/orchestration/workspace.cpp", "csrc/backends/select.cpp",
    "csrc/backends/cpu/cpu_isa.cpp",
    CPU_BACKEND_SOURCE,
]
CUDA_SOURCES = ["csrc/backends/cuda/cuda_backend.cu"]
# ckd_ext._emulated (CKD_EXT_EMULATED=1): the CUDA kernels compiled by the host compiler with the CPU emulator's
# runtime, a backend that _C runs CPU tensors through in tests (csrc/backends/backends.h says why it is a
# separate module).
EMULATED_SOURCES = ["csrc/backends/emulated/emulated_backend.cpp", "csrc/cuda_emulator/emulator.cpp"]
INCLUDE_DIRS = ["csrc"]

# -fno-trapping-math lets GCC if-convert the float compares in the CPU kernels' exp and max-shift loops and
# vectorise them (about 3x on KD); IEEE results are unchanged, only FP-exception traps are not kept.
# -fopenmp: at::parallel_for is an inline template whose OpenMP pragma is compiled in *our* sources; without the
# flag every CPU kernel runs on one thread.
# -ffp-contract=off: no a * b + c is fused into one FMA, so that every instruction set of CPU_ISA_FLAGS (and every
# platform) rounds every operation as the baseline does and the CPU results are the same to the bit whichever
# csrc/backends/cpu/cpu_isa.h picks: the kernels never reassociate (no -ffast-math: their sums run in a fixed order),
# so the vector width does not change a result either. Reproducible losses across machines, and one set of test
# expectations, for what contraction would gain (the FMAs of fast_exp's polynomial; not measured).
# -g0 undoes the -g of Python's own CFLAGS, which setuptools puts first: debug information for the kernels' template
# instantiations and torch's headers cost 18 % of the CPU backend's compile time (measured side by side, 199 s -> 163 s
# of CPU) and most of the library's size, in every user's and CI's build; a release wheel of torch carries none either.
CXX_FLAGS = ["-O3", "-g0", "-fvisibility=hidden", "-fno-trapping-math", "-fopenmp", "-ffp-contract=off"]

# What _C and _emulated must agree on to share a backend (csrc/backends/backends.h: EmulatedBackendTable): the
# kernel interface's headers. Their digest is compiled into both modules, so that a stale _emulated built from other
# headers is refused at load instead of calling through a different vtable; nothing to bump by hand.
KERNEL_INTERFACE_HEADERS = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc" / "kernel_interface").glob("*.h"))]
KERNEL_INTERFACE_HEADERS.append("csrc/backends/backends.h")


def kernel_interface_digest() -> str:
    digest = hashlib.sha256()
    for header in KERNEL_INTERFACE_HEADERS:
        digest.update((ROOT / header).read_bytes())
    return "0x" + digest.hexdigest()[:15]  # 60 bits: a positive int64 literal


ABI_FLAG = f"-DCKD_KERNEL_INTERFACE_DIGEST={kernel_interface_digest()}"
CXX_FLAGS.append(ABI_FLAG)
LINK_FLAGS = ["-fopenmp"]

# The instruction sets CPU_BACKEND_SOURCE is compiled for besides the baseline (x86-64 only; elsewhere the baseline
# alone), each with its flags and -DCKD_CPU_ISA=<name>, added to CXX_FLAGS; csrc/backends/cpu/cpu_isa.cpp checks the
# same features at run time. avx512 is the x86-64-v4 set (F, BW, VL, DQ), whose BW has the 16-bit moves bf16 needs;
# -mf16c makes c10::Half convert in hardware (the same values). Their objects must be linked after the baseline ones
# and in this order, lowest set first: inline functions of headers (std::, c10::) are emitted in every object that
# calls them out of line and the linker keeps the first copy, so a baseline caller always gets a baseline copy and
# an AVX2 caller never an AVX-512 one. Both builds add them after OPS_SOURCES. tests/test_cpu_isa.py checks both
# promises: the same bits from every set, and VEX code only in the ISA compilations.
_X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def quick_build() -> bool:
    """CKD_EXT_QUICK_BUILD=1: only what running the ops needs, for a build on a machine lent for minutes (the GPU
    check): no CPU_ISA_FLAGS variants (the CPU kernels run their baseline code, the same bits, slower) and no ptxas
    report. Read here so that setup.py and CMakeLists.txt drop the same objects."""
    value = os.environ.get("CKD_EXT_QUICK_BUILD", "0").strip().lower()
    if value not in ("0", "1", "off", "on", ""):
        raise SystemExit(f"CKD_EXT_QUICK_BUILD must be 0 or 1, got {value!r}")
    return value in ("1", "on")


CPU_ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
} if _X86_64 and not quick_build() else {}
if CPU_ISA_FLAGS:
    CXX_FLAGS.append("-DCKD_CPU_MULTI_ISA")  # cpu_isa.cpp then dispatches to them
# --expt-relaxed-constexpr: the kernels call constexpr host functions (std::numeric_limits) on the device, and
# c10::Half / c10::BFloat16 need it under nvcc.
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-std=c++20"]
# The emulator runs every CUDA thread as an OS thread.
EMULATED_CXX_FLAGS = ["-O2", "-g0", "-pthread", "-fvisibility=hidden", ABI_FLAG]
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
        + f"set(CKD_CPU_BACKEND_SOURCE {CPU_BACKEND_SOURCE})\n"
        + _cmake_list("CKD_CPU_ISAS", list(CPU_ISA_FLAGS))
        + "".join(_cmake_list(f"CKD_CPU_ISA_FLAGS_{name}", flags) for name, flags in CPU_ISA_FLAGS.items())
        + _cmake_list("CKD_LINK_FLAGS", LINK_FLAGS)
        + _cmake_list("CKD_NVCC_FLAGS", NVCC_FLAGS)
        + _cmake_list("CKD_EMULATED_CXX_FLAGS", EMULATED_CXX_FLAGS)
        + _cmake_list("CKD_EMULATED_LINK_FLAGS", EMULATED_LINK_FLAGS)
        + f'set(CKD_DEFAULT_CUDA_ARCHS "{DEFAULT_CUDA_ARCHS}")\n'
        + _cmake_list("CKD_KERNEL_INTERFACE_HEADERS", KERNEL_INTERFACE_HEADERS)
    )


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--cmake":
        raise SystemExit("usage: python tools/build_config.py --cmake FILE")
    write_cmake(Path(sys.argv[2]))
