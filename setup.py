"""Builds ckd_ext and its compiled extension ckd_ext._C.

Environment switches:
  CKD_EXT_CUDA=auto|on|off   build the CUDA backend (auto: when nvcc and a CUDA build of torch are present)
  MAX_JOBS=N                 parallel compile jobs (default 2, the size of our machines)
  TORCH_CUDA_ARCH_LIST       CUDA architectures (default "8.0;9.0")
"""
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("MAX_JOBS", "2")

import torch  # noqa: E402  (after MAX_JOBS: cpp_extension reads it)
from torch.utils import cpp_extension  # noqa: E402

CPU_SOURCES = ["csrc/ops.cpp", "csrc/losses.cpp", "csrc/cpu_backend.cpp"]
CUDA_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))


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


def write_build_info(with_cuda: bool) -> None:
    # Read by ckd_ext/__init__.py before loading _C, so a torch upgrade gives a clear message instead
    # of an undefined-symbol error.
    (ROOT / "ckd_ext" / "_build_info.py").write_text(
        "# Written by setup.py at build time.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
    )


def extension():
    with_cuda = cuda_wanted()
    write_build_info(with_cuda)
    define = [("CKD_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx = ["-O3", "-fvisibility=hidden"]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        return cpp_extension.CUDAExtension(
            "ckd_ext._C",
            CPU_SOURCES + CUDA_SOURCES,
            define_macros=define + [("CKD_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-Xptxas=-v", "--expt-relaxed-constexpr"]},
        )
    return cpp_extension.CppExtension("ckd_ext._C", CPU_SOURCES, define_macros=define, extra_compile_args=cxx)


setup(
    name="ckd_ext",
    version="0.1.0",
    description="Fused CKD, BicKD and KD distillation losses for PyTorch (C++/CUDA)",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["ckd_ext", "ckd_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "numpy", "matplotlib", "scikit-learn", "tqdm"],
        "train": ["scikit-learn", "matplotlib", "tqdm"],
        "cifar": ["torchvision"],
        "bench": ["matplotlib", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["ckd-train = ckd_ext.train:main"]},
    zip_safe=False,
)
