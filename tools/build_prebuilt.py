#!/usr/bin/env python3
"""Builds ckd_ext._C for another machine, here: against a torch wheel (not installed, never imported) and a Python's
headers, for given CUDA architectures, without a GPU. For the lent GPU machine, whose minutes are too few to spend
compiling (docs/cuda.md, "The GPU check"):

    python3 tools/build_prebuilt.py --torch-wheel torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl \\
        --python-include /path/to/include/python3.12 --arch 9.0

writes build/prebuilt-gpu/ckd_ext/_C.cpython-312-x86_64-linux-gnu.so and its _build_info.py (with the wheel's torch
version, which ckd_ext checks before loading), and build/prebuilt-gpu/manifest.json; checks that every undefined
symbol of the .so is defined by the libraries it links (the wheel's torch/lib, the CUDA toolkit's cudart, the C/C++
runtime) or, for Python's C API, left to the interpreter; and prints what to carry. tools/gpu_check.py's build step
copies a carried build/prebuilt-gpu into ckd_ext/.

The compile and link commands are torch.utils.cpp_extension's for a CUDAExtension (setup.py's), written out here
because importing torch is what this must not do: the defines TORCH_API_INCLUDE_EXTENSION_H and
TORCH_EXTENSION_NAME, torch's include folders, the nvcc flags of cpp_extension.COMMON_NVCC_FLAGS, the C++ standard
the wheel's cpp_extension adds, and the libraries c10, torch, torch_cpu, torch_python, cudart, c10_cuda, torch_cuda.
The sources and our flags are tools/build_config.py's. Without --full it is the CKD_EXT_QUICK_BUILD=1 build (no
AVX2 / AVX-512 variants of the CPU backend); no debug information (-g) either, so the .so stays small to carry.

Python's headers: --python-include DIR (the folder with Python.h and patchlevel.h), or --python EXE (asked for its
include folder and extension suffix, without importing torch), or, by default, this interpreter when it is the
wheel's Python version. They must be of the wheel's Python version (checked in patchlevel.h).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path
from typing import Dict, List, NoReturn, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

CARRY_LIMIT = 64 << 20  # bytes the device tool carries: the working tree plus the carried ignored paths
# torch.utils.cpp_extension.COMMON_NVCC_FLAGS (the same in torch 2.11 and 2.14)
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
TORCH_DEFINES = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
TORCH_CUDA_LIBRARIES = ["c10", "torch", "torch_cpu", "torch_python", "cudart", "c10_cuda", "torch_cuda"]
# What Python's distutils compiler puts before every compilation (sysconfig CFLAGS of a release build), less -g.
PYTHON_CFLAGS = ["-DNDEBUG", "-fwrapv", "-O3", "-fPIC"]
# Undefined symbols the interpreter that imports the module provides: Python's C API.
PYTHON_SYMBOL = re.compile(r"^_?Py|^PyInit_")


def fail(message: str) -> NoReturn:
    raise SystemExit(f"build_prebuilt: {message}")


def run(argv: List[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, text=True, capture_output=True, **kwargs)


# --------------------------------------------------------------------------------------------------- the inputs
def parse_wheel_name(wheel: Path) -> Tuple[str, str]:
    """(torch version, python tag) of torch-<version>-<python tag>-<abi tag>-<platform>.whl."""
    m = re.match(r"^torch-([^-]+)-(cp\d+)-(cp\d+t?)-(\S+)\.whl$", wheel.name)
    if not m:
        fail(f"--torch-wheel {wheel.name!r} is not named like torch-<version>-cp3XY-cp3XY-<platform>.whl")
    if "x86_64" not in m.group(4):
        fail(f"--torch-wheel {wheel.name!r} is not an x86-64 wheel; this builds with the host's x86-64 compilers")
    if m.group(3).endswith("t"):
        fail(f"--torch-wheel {wheel.name!r} is for a free-threaded Python, which this does not build for")
    return m.group(1), m.group(2)


def unpack_torch(wheel: Path, cache: Path) -> Path:
    """The parts of the wheel a build reads (headers, libraries, version.py, cpp_extension.py) under cache/torch;
    unpacked once per wheel."""
    done = cache / ".unpacked"
    if done.exists() and done.read_text() == str(wheel.stat().st_size):
        return cache / "torch"
    if cache.exists():
        shutil.rmtree(cache)
    keep = ("torch/include/", "torch/lib/", "torch/version.py", "torch/utils/cpp_extension.py")
    with zipfile.ZipFile(wheel) as z:
        members = [n for n in z.namelist() if n.startswith(keep)]
        if "torch/version.py" not in members:
            fail(f"{wheel} has no torch/version.py: not a torch wheel")
        z.extractall(cache, members)
    done.write_text(str(wheel.stat().st_size))
    return cache / "torch"


def torch_facts(torch_dir: Path) -> Dict[str, str]:
    version_py = (torch_dir / "version.py").read_text()
    facts = {}
    for key in ("__version__", "cuda"):
        m = re.search(rf"^{key}\s*(?::[^=]*)?=\s*'([^']*)'", version_py, flags=re.M)
        facts[key] = m.group(1) if m else ""
    if not facts["cuda"]:
        fail(f"the wheel's torch {facts['__version__']} is not a CUDA build (torch/version.py has no cuda version)")
    text = (torch_dir / "utils" / "cpp_extension.py").read_text()
    m = re.search(r"cpp_flag_prefix \+ '(c\+\+\d+)'", text)
    if not m:
        fail("could not read which C++ standard the wheel's torch.utils.cpp_extension adds (no \"cpp_flag_prefix + "
             "'c++NN'\" in it); pass --std")
    facts["std"] = m.group(1)
    return facts


def python_headers(a, tag: str) -> Tuple[Path, str]:
    """(the folder with Python.h, the extension module suffix) for the wheel's Python, checked against the tag."""
    want = (int(tag[2]), int(tag[3:]))
    if a.python:
        out = run([a.python, "-c", "import sysconfig; print(sysconfig.get_paths()['include']); "
                   "print(sysconfig.get_config_var('EXT_SUFFIX'))"]).stdout.split()
        include, suffix = Path(out[0]), out[1]
    elif a.python_include:
        include, suffix = Path(a.python_include), f".cpython-{want[0]}{want[1]}-x86_64-linux-gnu.so"
    elif sys.version_info[:2] == want:
        include, suffix = Path(sysconfig.get_paths()["include"]), sysconfig.get_config_var("EXT_SUFFIX")
    else:
        fail(f"the wheel is for Python {want[0]}.{want[1]}, this is {sys.version.split()[0]}: pass --python-include "
             f"(the folder of Python {want[0]}.{want[1]}'s Python.h) or --python (a Python {want[0]}.{want[1]})")
    if not (include / "Python.h").exists():
        fail(f"no Python.h in {include}")
    patchlevel = (include / "patchlevel.h").read_text()
    got = tuple(int(re.search(rf"#define\s+PY_{k}_VERSION\s+(\d+)", patchlevel).group(1)) for k in ("MAJOR", "MINOR"))
    if got != want:
        fail(f"{include} holds Python {got[0]}.{got[1]}'s headers; the wheel ({tag}) needs {want[0]}.{want[1]}'s")
    return include, suffix


def cuda_home() -> Path:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home:
        nvcc = shutil.which("nvcc")
        if nvcc is None:
            fail("no nvcc on PATH and no CUDA_HOME: the CUDA toolkit is needed")
        out = run(["nvcc", "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull]).stderr
        tops = [l.split("=", 1)[1].strip() for l in out.splitlines() if l.startswith("#$ TOP=")]
        home = str(Path(tops[0]).resolve()) if tops else str(Path(nvcc).resolve().parents[1])
    return Path(home)


def nvcc_version(home: Path) -> str:
    out = run([str(home / "bin" / "nvcc"), "--version"]).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "?"


def gencode_flags(archs: str) -> List[str]:
    flags = []
    for arch in re.split(r"[;\s,]+", archs.strip()):
        if not arch:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", arch)
        if not m:
            fail(f"--arch {arch!r} is not like 9.0 or 9.0+PTX")
        num = m.group(1) + m.group(2) + m.group(3)
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if m.group(4):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        fail("--arch names no architecture")
    return flags


# ----------------------------------------------------------------------------------------------------- the build
def ninja_escape(path) -> str:
    return str(path).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def write_ninja(build: Path, so: Path, torch_dir: Path, py_include: Path, home: Path, std: str, archs: str,
                full: bool) -> Path:
    import build_config as cfg  # after main() has set CKD_EXT_QUICK_BUILD
    includes = [f"-I{ROOT / d}" for d in cfg.INCLUDE_DIRS] + [
        f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
        f"-I{home / 'include'}", f"-I{py_include}"]
    cflags = PYTHON_CFLAGS + ["-DCKD_WITH_CUDA=1"] + includes
    post_cflags = cfg.CXX_FLAGS + TORCH_DEFINES + [f"-std={std}"]
    cuda_cflags = ["-DCKD_WITH_CUDA=1"] + includes
    cuda_post = TORCH_NVCC_FLAGS + ["--compiler-options", "-fPIC"] + cfg.NVCC_FLAGS + TORCH_DEFINES \
        + gencode_flags(archs)
    ldflags = ["-shared", f"-L{torch_dir / 'lib'}", f"-L{home / 'lib64'}"] + cfg.LINK_FLAGS \
        + [f"-l{lib}" for lib in TORCH_CUDA_LIBRARIES]
    q = shlex.join
    lines = ["ninja_required_version = 1.3", f"cxx = {shutil.which('c++') or 'c++'}", f"nvcc = {home / 'bin' / 'nvcc'}",
             f"cflags = {q(cflags)}", f"post_cflags = {q(post_cflags)}", f"cuda_cflags = {q(cuda_cflags)}",
             f"cuda_post_cflags = {q(cuda_post)}", f"ldflags = {q(ldflags)}", "",
             "rule compile", "  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out $post_cflags",
             "  depfile = $out.d", "  deps = gcc", "",
             "rule cuda_compile", "  command = $nvcc -MD -MF $out.d $cuda_cflags -c $in -o $out $cuda_post_cflags",
             "  depfile = $out.d", "  deps = gcc", "",
             "rule link", "  command = $cxx $in -o $out $ldflags", ""]
    objects = []
    for source in cfg.OPS_SOURCES + cfg.CUDA_SOURCES:
        obj = build / (source.replace("/", "_") + ".o")
        rule = "cuda_compile" if source.endswith(".cu") else "compile"
        lines.append(f"build {ninja_escape(obj)}: {rule} {ninja_escape(ROOT / source)}")
        objects.append(obj)
    # The instruction-set variants after the sources' objects, lowest first (build_config.py says why).
    for isa, flags in cfg.CPU_ISA_FLAGS.items():
        obj = build / f"cpu_backend_{isa}.o"
        lines.append(f"build {ninja_escape(obj)}: compile {ninja_escape(ROOT / cfg.CPU_BACKEND_SOURCE)}")
        lines.append(f"  post_cflags = $post_cflags {q(flags)} -DCKD_CPU_ISA={isa}")
        objects.append(obj)
    lines.append(f"build {ninja_escape(so)}: link {' '.join(ninja_escape(o) for o in objects)}")
    lines.append(f"default {ninja_escape(so)}")
    path = build / "build.ninja"
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ symbol check
def dynamic_symbols(lib: Path, defined: bool) -> Set[str]:
    """Names (with @VERSION where versioned) of a library's dynamic symbols, defined or undefined."""
    out = run(["nm", "-D", "--with-symbol-versions", "--defined-only" if defined else "--undefined-only",
               str(lib)]).stdout
    names = set()
    for line in out.splitlines():
        parts = line.split()
        if not parts:
            continue
        name = parts[-1]
        if not defined and parts[0] in ("w", "v"):
            continue  # weak: may stay unresolved
        names.add(name.replace("@@", "@"))
    return names


def needed(lib: Path) -> List[str]:
    out = run(["readelf", "-d", str(lib)]).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def system_library(name: str) -> Optional[Path]:
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith(name + " ") and "x86-64" in line:
            return Path(line.rsplit("=> ", 1)[1])
    return None


def check_symbols(so: Path, torch_dir: Path, home: Path) -> Dict[str, object]:
    """Every undefined dynamic symbol of `so` must be defined by a library it needs (found in the wheel's torch/lib,
    the CUDA toolkit, or the system), directly or through those libraries' own needs in torch/lib, or be Python's C
    API (the interpreter defines it). Versioned references (name@VERSION) must match a definition of that version."""
    search = [torch_dir / "lib", home / "lib64"]
    found: Dict[str, str] = {}
    provided: Set[str] = set()
    direct = needed(so)
    queue = [(name, None) for name in direct]
    while queue:
        name, needed_by = queue.pop(0)
        if name in found:
            continue
        path = next((d / name for d in search if (d / name).exists()), None) or system_library(name)
        if path is None:
            # A library of torch's own (cuBLAS, cuDNN, ... from other wheels, found through torch's RPATH at run
            # time) is not needed for the check unless we link it ourselves.
            found[name] = "NOT FOUND" if needed_by is None else f"not here (needed by {needed_by}, not by us)"
            continue
        found[name] = str(path)
        provided |= dynamic_symbols(path, defined=True)
        if str(path).startswith(str(torch_dir)):
            queue += [(n, name) for n in needed(path)]
    bare = {s.split("@", 1)[0] for s in provided}
    undefined = sorted(dynamic_symbols(so, defined=False))
    python_api = [s for s in undefined if PYTHON_SYMBOL.match(s)]
    unresolved = [s for s in undefined if not PYTHON_SYMBOL.match(s)
                  and s not in provided and not ("@" not in s and s in bare)]
    versions = sorted({s.split("@", 1)[1] for s in undefined if "@" in s})
    return {"libraries": found, "undefined": len(undefined), "python_api": len(python_api),
            "unresolved": unresolved, "symbol_versions": versions}


# ------------------------------------------------------------------------------------------------------- carrying
def tree_bytes() -> int:
    """Bytes of the working tree the device tool sends (tracked and untracked files that git does not ignore)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True).stdout
    return sum((ROOT / p).stat().st_size for p in out.split("\0") if p and (ROOT / p).is_file())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--torch-wheel", required=True, type=Path, help="the torch wheel of the target machine")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--python-include", help="the folder of the target Python's Python.h")
    g.add_argument("--python", help="a Python of the target's version (asked for its headers; torch not imported)")
    ap.add_argument("--arch", default="9.0", help="TORCH_CUDA_ARCH_LIST-style architectures (default 9.0: H100)")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "prebuilt-gpu",
                    help="where ckd_ext/_C*.so, ckd_ext/_build_info.py and manifest.json go")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    ap.add_argument("--full", action="store_true", help="also the AVX2 / AVX-512 variants of the CPU backend")
    ap.add_argument("--std", default=None, help="the C++ standard for .cpp files (default: the wheel's own)")
    a = ap.parse_args(argv)
    if not a.full:
        os.environ["CKD_EXT_QUICK_BUILD"] = "1"  # before build_config is imported
    started = time.monotonic()
    wheel = a.torch_wheel.resolve()
    if not wheel.is_file():
        fail(f"--torch-wheel {wheel} does not exist")
    version, tag = parse_wheel_name(wheel)
    py_include, suffix = python_headers(a, tag)
    cache = ROOT / "build" / "prebuilt-cache" / wheel.stem
    t0 = time.monotonic()
    torch_dir = unpack_torch(wheel, cache)
    unpack_s = time.monotonic() - t0
    facts = torch_facts(torch_dir)
    home = cuda_home()
    nvcc = nvcc_version(home)
    if nvcc.split(".")[0] != facts["cuda"].split(".")[0]:
        fail(f"nvcc {nvcc} ({home}) and the wheel's CUDA {facts['cuda']} differ in their major version")
    print(f"torch {facts['__version__']} (CUDA {facts['cuda']}, {facts['std']}) from {wheel.name}; Python headers "
          f"{py_include}; nvcc {nvcc}; arch {a.arch}; {'full' if a.full else 'quick'} build, {a.jobs} jobs", flush=True)

    build = cache / f"obj-{tag}-{re.sub(r'[^0-9A-Za-z]+', '_', a.arch)}{'-full' if a.full else ''}"
    build.mkdir(parents=True, exist_ok=True)
    so = build / f"_C{suffix}"
    ninja_file = write_ninja(build, so, torch_dir, py_include, home, a.std or facts["std"], a.arch, a.full)
    t0 = time.monotonic()
    proc = subprocess.run(["ninja", "-f", str(ninja_file), "-j", str(a.jobs)], cwd=build)
    if proc.returncode:
        fail(f"the build failed (ninja exit {proc.returncode}); commands: {ninja_file}")
    build_s = time.monotonic() - t0

    check = check_symbols(so, torch_dir, home)
    missing_libs = [n for n, p in check["libraries"].items() if p == "NOT FOUND"]
    print(f"symbols: {check['undefined']} undefined in {so.name}: {check['python_api']} Python C API (the "
          f"interpreter's), {len(check['unresolved'])} unresolved; versions required: "
          f"{', '.join(check['symbol_versions'])}")
    for name, path in check["libraries"].items():
        print(f"  {name}: {path}")
    if missing_libs:
        fail(f"libraries not found: {missing_libs}")
    if check["unresolved"]:
        fail(f"{len(check['unresolved'])} symbols resolve nowhere, e.g. {check['unresolved'][:10]}")

    out_pkg = a.out / "ckd_ext"
    if a.out.exists():
        shutil.rmtree(a.out)
    out_pkg.mkdir(parents=True)
    shutil.copy2(so, out_pkg / so.name)
    (out_pkg / "_build_info.py").write_text(
        "# Written by tools/build_prebuilt.py.\n"
        f"TORCH_VERSION = {facts['__version__']!r}\n"
        "WITH_EMULATED = False\n")
    manifest = {"torch": facts["__version__"], "wheel": wheel.name, "python_tag": tag, "arch": a.arch,
                "full": a.full, "so": so.name, "so_bytes": so.stat().st_size, "so_sha256": sha256(so),
                "unpack_s": round(unpack_s, 1), "build_s": round(build_s, 1),
                "undefined_symbols": check["undefined"], "python_api_symbols": check["python_api"],
                "symbol_versions": check["symbol_versions"], "libraries": check["libraries"]}
    (a.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    carried = sum(p.stat().st_size for p in a.out.rglob("*") if p.is_file())
    tree = tree_bytes()
    try:
        carry = a.out.resolve().relative_to(ROOT)
    except ValueError:
        carry = a.out
    print(f"\nbuilt in {build_s:.0f} s (unpacking the wheel {unpack_s:.0f} s; {time.monotonic() - started:.0f} s in "
          "all)\ncarry:")
    for p in sorted(a.out.rglob("*")):
        if p.is_file():
            print(f"  {p.relative_to(a.out.parent) if a.out.parent != Path('.') else p}  {p.stat().st_size:,} bytes")
    print(f"carry path: {carry}  ({carried / 2**20:.1f} MiB; with the working tree's {tree / 2**20:.1f} MiB: "
          f"{(carried + tree) / 2**20:.1f} MiB of the {CARRY_LIMIT >> 20} MiB the device tool carries)")
    if carried + tree > CARRY_LIMIT:
        fail("too large to carry with the working tree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
