"""Builds ckd_ext and its compiled extension ckd_ext._C.

Environment switches:
  CKD_EXT_CUDA=auto|on|off   build the CUDA backend (auto: when nvcc and a CUDA build of torch are present)
  CKD_EXT_EMULATED=0|1       also build ckd_ext._emulated: the CUDA kernels compiled for the host and run on
                             CPU tensors by the CUDA emulator (csrc/device/), for tests without a GPU
  MAX_JOBS=N                 parallel compile jobs (default 2, the size of our machines)
  TORCH_CUDA_ARCH_LIST       CUDA architectures (default "8.0;9.0")
  CUDA_HOME                  the CUDA toolkit (default: found from nvcc on PATH)
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("MAX_JOBS", "2")


def find_cuda_home():
    """The toolkit folder of the nvcc on PATH. nvcc may be a wrapper script outside the toolkit, so torch's
    guess (the parent of nvcc's folder) can be wrong: ask nvcc itself."""
    if shutil.which("nvcc") is None:
        return None
    try:
        out = subprocess.run(["nvcc", "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.startswith("#$ TOP="):
            return str(Path(line.split("=", 1)[1].strip()).resolve())  # TOP is the toolkit folder (bin/..)
    return None


if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    _cuda_home = find_cuda_home()
    if _cuda_home:
        os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402  (after MAX_JOBS: cpp_extension reads it)
from torch.utils import cpp_extension  # noqa: E402

CPU_SOURCES = ["csrc/ops.cpp", "csrc/losses.cpp", "csrc/cpu_backend.cpp"]
CUDA_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
EMULATED_SOURCES = ["csrc/emulated/ops_emulated.cpp", "csrc/emulated/losses_emulated.cpp",
                    "csrc/emulated/gpu_backend_emulated.cpp", "csrc/device/emulator.cpp"]
INCLUDE_DIRS = [str(ROOT / "csrc")]


def cuda_wanted() -> bool:
    mode = os.environ.get("CKD_EXT_CUDA", "auto").lower()
    if mode not in ("auto", "on", "off"):
        raise SystemExit(f"CKD_EXT_CUDA must be auto, on or off, got {mode!r}")
    if mode == "off":
        return False
    reasons = []
    if torch.version.cuda is None:
        reasons.append("torch is a CPU-only build")
    if cpp_extension.CUDA_HOME is None:
        reasons.append("no CUDA toolkit (nvcc) was found; set CUDA_HOME")
    if not CUDA_SOURCES:
        reasons.append("this version has no CUDA backend sources yet (csrc/cuda/*.cu)")
    if reasons and mode == "on":
        raise SystemExit("CKD_EXT_CUDA=on but the CUDA backend cannot be built: " + "; ".join(reasons))
    if reasons:
        print("ckd_ext: building the CPU backend only: " + "; ".join(reasons))
    return not reasons


def emulated_wanted() -> bool:
    value = os.environ.get("CKD_EXT_EMULATED", "0").lower()
    if value not in ("0", "1", "off", "on"):
        raise SystemExit(f"CKD_EXT_EMULATED must be 0 or 1, got {value!r}")
    return value in ("1", "on")


def write_build_info(with_cuda: bool, with_emulated: bool) -> None:
    # Read by ckd_ext/_extension.py before loading _C, so a torch upgrade gives a clear message instead
    # of an undefined-symbol error.
    (ROOT / "ckd_ext" / "_build_info.py").write_text(
        "# Written by setup.py at build time.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"WITH_EMULATED = {with_emulated!r}\n"
    )


WITH_CUDA = cuda_wanted()


class BuildExtension(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """Also writes build/ptxas_report.md (registers, shared memory, spills per CUDA kernel)."""

    def run(self):
        super().run()
        if WITH_CUDA:
            subprocess.run([sys.executable, str(ROOT / "tools" / "ptxas_report.py")], check=True)


def extensions():
    with_cuda, with_emulated = WITH_CUDA, emulated_wanted()
    write_build_info(with_cuda, with_emulated)
    define = [("CKD_TORCH_VERSION", f'"{torch.__version__}"')]
    # -fno-trapping-math lets GCC if-convert the float compares in the CPU kernels' exp and max-shift loops
    # and vectorise them (about 3x on KD); IEEE results are unchanged, only FP-exception traps are not kept.
    # -fopenmp: at::parallel_for is an inline template whose OpenMP pragma is compiled in *our* sources;
    # without the flag every CPU kernel runs on one thread.
    cxx = ["-O3", "-fvisibility=hidden", "-fno-trapping-math", "-fopenmp"]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ops = cpp_extension.CUDAExtension(
            "ckd_ext._C",
            CPU_SOURCES + CUDA_SOURCES,
            include_dirs=INCLUDE_DIRS,
            define_macros=define + [("CKD_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr", "-std=c++20"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ops = cpp_extension.CppExtension("ckd_ext._C", CPU_SOURCES, include_dirs=INCLUDE_DIRS, define_macros=define,
                                         extra_compile_args=cxx, extra_link_args=["-fopenmp"])
    if not with_emulated:
        return [ops]
    emulated = cpp_extension.CppExtension(
        "ckd_ext._emulated", EMULATED_SOURCES, include_dirs=INCLUDE_DIRS, define_macros=define,
        extra_compile_args=["-O2", "-pthread", "-fvisibility=hidden"], extra_link_args=["-pthread"],
    )
    return [ops, emulated]


setup(
    name="ckd_ext",
    version="0.1.0",
    description="Fused CKD, BicKD and KD distillation losses for PyTorch (C++/CUDA)",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["ckd_ext", "ckd_ext.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    install_requires=["torch", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "numpy", "matplotlib", "scikit-learn", "tqdm"],
        "train": ["scikit-learn", "matplotlib", "tqdm"],
        "cifar": ["torchvision"],
        "bench": ["matplotlib", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["ckd-train = ckd_ext.train:cli"]},
    zip_safe=False,
)
