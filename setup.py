"""Builds ckd_ext and its compiled extension ckd_ext._C (and, for tests, ckd_ext._emulated).

Environment switches:
  CKD_EXT_CUDA=auto|on|off   build the CUDA backend (auto: when nvcc and a CUDA build of torch are present)
  CKD_EXT_EMULATED=0|1       also build ckd_ext._emulated: the CUDA kernels compiled for the host, a backend
                             that runs CPU tensors through the CUDA emulator (csrc/cuda_emulator/) inside
                             ckd_ext.testing.emulated_cuda(), for tests without a GPU
  CKD_EXT_QUICK_BUILD=0|1    1: only what running the ops needs (the GPU check's build on a lent machine): no
                             AVX2 / AVX-512 variants of the CPU backend (its kernels run their baseline code, the
                             same results, slower) and no build/ptxas_report.md
  MAX_JOBS=N                 parallel compile jobs (default 2, the size of our machines); every object, the
                             instruction-set variants and the ptxas report included, is one job of one ninja build
  TORCH_CUDA_ARCH_LIST       CUDA architectures (default: tools/build_config.py)
  CUDA_HOME                  the CUDA toolkit (default: found from nvcc on PATH)

Sources and flags: tools/build_config.py (shared with CMakeLists.txt).
"""
import contextlib
import os
import shlex
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

sys.path.insert(0, str(ROOT / "tools"))
import build_config as cfg  # noqa: E402


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


def write_build_info(with_emulated: bool) -> None:
    # Read by ckd_ext/_extension.py before loading _C, so a torch upgrade gives a clear message instead
    # of an undefined-symbol error.
    (ROOT / "ckd_ext" / "_build_info.py").write_text(
        "# Written by setup.py at build time.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"WITH_EMULATED = {with_emulated!r}\n"
    )


WITH_CUDA = cuda_wanted()


def _ninja_path(path: str) -> str:
    return os.path.abspath(path).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


@contextlib.contextmanager
def ninja_statements_appended(statements: str):
    """Within the block, every build.ninja torch's BuildExtension writes also gets `statements`, so that they run
    in its one parallel ninja build (MAX_JOBS jobs). torch has no public hook for objects with their own flags;
    _write_ninja_file (torch 2.11 to 2.14: called with path= and writing a `compile` rule whose command ends in
    $post_cflags) is where its compile step writes the file. They go before torch's own build statements: they are
    the build's longest jobs, and ninja starts ready jobs in the file's order."""
    original = cpp_extension._write_ninja_file

    def write(*args, **kwargs):
        original(*args, **kwargs)
        path = kwargs["path"] if "path" in kwargs else args[0]
        with open(path) as f:
            text = f.read()
        first_build = text.find("\nbuild ")
        at = len(text) if first_build < 0 else first_build + 1
        with open(path, "w") as f:
            f.write(text[:at] + statements.lstrip("\n") + "\n" + text[at:])

    cpp_extension._write_ninja_file = write
    try:
        yield
    finally:
        cpp_extension._write_ninja_file = original


class BuildExtension(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """Adds to _C's ninja build, as jobs beside its sources' compilations: the CPU backend once per instruction set
    of cfg.CPU_ISA_FLAGS, and (with CUDA) build/ptxas_report.md (registers, shared memory, spills per CUDA
    kernel). CKD_EXT_QUICK_BUILD=1 leaves both out."""

    def build_extension(self, ext):
        if ext.name != "ckd_ext._C":
            return super().build_extension(ext)
        statements, isa_objects = "\n", []
        for isa, flags in cfg.CPU_ISA_FLAGS.items():
            # Each instruction set is the same compile command (the flags torch's build_extensions has given
            # $cflags and $post_cflags) plus its own flags. Linked as extra objects: after the sources' objects and
            # lowest set first, as build_config.py requires.
            obj = os.path.join(os.path.abspath(self.build_temp), f"cpu_isa_{isa}", "cpu_backend.o")
            isa_objects.append(obj)
            statements += (f"build {_ninja_path(obj)}: compile {_ninja_path(str(ROOT / cfg.CPU_BACKEND_SOURCE))}\n"
                           f"  post_cflags = $post_cflags {' '.join(flags)} -DCKD_CPU_ISA={isa}\n")
        if WITH_CUDA and not cfg.quick_build():
            # Its own nvcc runs (-Xptxas=-v, per architecture) beside the build's; the output is never written, so
            # the report is remade by every build, and a spill fails the build (ptxas_report.py exits 1).
            report = ROOT / "build" / "ptxas_report.md"
            command = shlex.join([sys.executable, str(ROOT / "tools" / "ptxas_report.py"), "--out", str(report)])
            statements += (f"rule ptxas_report\n  command = {command.replace('$', '$$')}\n"
                           f"  description = ptxas report -> {report}\n"
                           f"build {_ninja_path(str(report) + '.always')}: ptxas_report\n")
        ext.extra_objects = list(ext.extra_objects) + isa_objects
        with ninja_statements_appended(statements):
            super().build_extension(ext)


def extensions():
    with_emulated = emulated_wanted()
    write_build_info(with_emulated)
    include_dirs = [str(ROOT / d) for d in cfg.INCLUDE_DIRS]
    if WITH_CUDA:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", cfg.DEFAULT_CUDA_ARCHS)
        ops = cpp_extension.CUDAExtension(
            "ckd_ext._C", cfg.OPS_SOURCES + cfg.CUDA_SOURCES, include_dirs=include_dirs,
            define_macros=[("CKD_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cfg.CXX_FLAGS, "nvcc": cfg.NVCC_FLAGS}, extra_link_args=cfg.LINK_FLAGS,
        )
    else:
        ops = cpp_extension.CppExtension("ckd_ext._C", cfg.OPS_SOURCES, include_dirs=include_dirs,
                                         extra_compile_args=cfg.CXX_FLAGS, extra_link_args=cfg.LINK_FLAGS)
    if not with_emulated:
        return [ops]
    emulated = cpp_extension.CppExtension(
        "ckd_ext._emulated", cfg.EMULATED_SOURCES, include_dirs=include_dirs,
        extra_compile_args=cfg.EMULATED_CXX_FLAGS, extra_link_args=cfg.EMULATED_LINK_FLAGS,
    )
    return [ops, emulated]


def requirements(path: str):
    lines = (line.split("#", 1)[0].strip() for line in (ROOT / path).read_text().splitlines())
    return [line for line in lines if line]


def version() -> str:
    scope = {}
    exec((ROOT / "ckd_ext" / "_version.py").read_text(), scope)
    return scope["__version__"]


setup(
    name="ckd_ext",
    version=version(),
    description="Fused CKD, BicKD and KD distillation losses for PyTorch (C++/CUDA)",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["ckd_ext", "ckd_ext.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    install_requires=["torch>=2.11", "numpy"],  # the oldest torch: tools/check_oldest_torch.sh builds and tests on it
    extras_require={
        "test": requirements("requirements-test.txt"),
        "train": ["scikit-learn", "matplotlib", "tqdm"],
        "lm": ["tokenizers"],
        "cifar": ["torchvision"],
        "bench": ["matplotlib", "pytest-benchmark"],
        "transformers": ["transformers", "accelerate"],  # ckd_ext.integrations.transformers (Trainer: accelerate)
        "torchdistill": ["torchdistill"],  # ckd_ext.integrations.torchdistill
        "lightning": ["lightning"],  # ckd_ext.integrations.lightning
    },
    entry_points={"console_scripts": ["ckd-train = ckd_ext.demos.classify:cli", "ckd-train-lm = ckd_ext.demos.lm:cli"]},
    zip_safe=False,
)
