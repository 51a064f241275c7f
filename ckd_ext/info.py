"""What this ckd_ext installation is built with, and, when its compiled part cannot run, why and how to build it.

    python -m ckd_ext.info            the report (as ``python -m xformers.info`` and ``torch.utils.collect_env``)
    python -m ckd_ext.info --json     the same as one JSON object
    python -m ckd_ext.info --check    also exits with status 1 when the fused ops cannot run

What the compiled extension holds is read from the extension itself, so the report describes the binary that is
imported: the CPU instruction sets from the loaded module, the CUDA architectures from the device code embedded in
its file (the ELF section ``.nv_fatbin``; a build without the CUDA backend has none).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import struct
import sys
from typing import Dict, List, Optional

import torch

from . import _extension
from ._version import __version__

ENVIRONMENT_VARIABLES = ("CKD_EXT_WORKSPACE_MB", "CKD_EXT_CPU_ISA")

# The CUDA fat binary layout (as cuobjdump reads it): a header {u32 magic, u16 version, u16 header size, u64 size}
# followed by entries {u16 kind (1 PTX, 2 SASS), u16, u32 header size, u64 size, ..., u32 architecture at byte 28}.
_FATBIN_MAGIC = 0xBA55ED50
_FATBIN_KINDS = {1: "ptx", 2: "sass"}


def _elf_section(data: bytes, wanted: bytes) -> Optional[memoryview]:
    """The bytes of section `wanted` of a 64-bit little-endian ELF file, or None (no such section, or not that kind
    of file)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    section_offset, = struct.unpack_from("<Q", data, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", data, 0x3A)

    def header(index):  # name, type, flags, address, offset, size
        return struct.unpack_from("<IIQQQQ", data, section_offset + index * entry_size)

    names_offset = header(names_index)[4]
    for index in range(count):
        name, _, _, _, offset, size = header(index)
        start = names_offset + name
        if data[start:data.index(b"\0", start)] == wanted:
            return memoryview(data)[offset:offset + size]
    return None


def cuda_architectures(path: str) -> Optional[Dict[str, List[str]]]:
    """{"sass": ["sm_80", ...], "ptx": ["compute_90", ...]} embedded in the shared library at `path`: empty lists
    when it has no CUDA device code, None when its format cannot be read (not a 64-bit ELF file)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        section = _elf_section(data, b".nv_fatbin")
    except (struct.error, ValueError):
        return None
    if section is None:
        return None if data[:4] != b"\x7fELF" else {"sass": [], "ptx": []}
    found = {"sass": set(), "ptx": set()}
    position = 0
    while position + 16 <= len(section):
        magic, _, header_size, size = struct.unpack_from("<IHHQ", section, position)
        if magic != _FATBIN_MAGIC:  # fat binaries are 8-byte aligned in the section, padding between them
            position += 8
            continue
        entry, end = position + header_size, position + header_size + size
        while entry + 32 <= end:
            kind, _, entry_header, entry_size = struct.unpack_from("<HHIQ", section, entry)
            architecture, = struct.unpack_from("<I", section, entry + 28)
            if kind in _FATBIN_KINDS:
                prefix = "sm" if kind == 2 else "compute"
                found[_FATBIN_KINDS[kind]].add(f"{prefix}_{architecture}")
            entry += entry_header + entry_size
        position = end
    order = lambda name: int(name.rsplit("_", 1)[1])  # noqa: E731
    return {kind: sorted(names, key=order) for kind, names in found.items()}


def _runs_on(architectures: Dict[str, List[str]], capability) -> bool:
    """Whether a device of compute capability (major, minor) runs the build's device code: SASS of the same major
    version and a minor version not above the device's, or PTX of a capability not above it (compiled at load)."""
    major, minor = capability
    for name in architectures["sass"]:
        number = int(name.split("_")[1])
        if number // 10 == major and number % 10 <= minor:
            return True
    return any(int(name.split("_")[1]) <= 10 * major + minor for name in architectures["ptx"])


def _extension_path() -> Optional[str]:
    module = _extension._module
    if module is not None:
        return module.__file__
    spec = importlib.util.find_spec("ckd_ext._C")
    return None if spec is None else spec.origin


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2 ** 20:.1f} MiB"


def collect() -> dict:
    """The report as a dictionary (what ``--json`` prints)."""
    info = _extension._build_info()
    path = _extension_path()
    report = {
        "ckd_ext": {"version": __version__, "path": os.path.dirname(os.path.abspath(__file__))},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "devices": [],
        },
        "extension": {
            "available": _extension.is_available(),
            "reason": _extension.unavailable_reason(),
            "build_command": _extension.REBUILD,
            "path": path,
            "built_against_torch": None if info is None else info.TORCH_VERSION,
        },
        "cpu_backend": None,
        "cuda_backend": None,
        "emulated_backend": {"built": _extension.emulated_available(),
                             "reason": _extension.emulated_unavailable_reason()},
        "workspace": {},
        "environment": {name: os.environ.get(name) for name in ENVIRONMENT_VARIABLES},
    }
    architectures = cuda_architectures(path) if path and os.path.exists(path) else None
    if architectures is not None:
        report["cuda_backend"] = {"compiled": bool(architectures["sass"] or architectures["ptx"]), **architectures}
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            capability = torch.cuda.get_device_capability(index)
            report["torch"]["devices"].append({
                "name": f"cuda:{index}", "model": torch.cuda.get_device_name(index),
                "capability": f"{capability[0]}.{capability[1]}",
                "runs_the_build": None if architectures is None else _runs_on(architectures, capability),
            })
    if _extension.is_available():
        import ckd_ext
        report["cpu_backend"] = {"isa": ckd_ext.cpu_isa(), "available_isas": ckd_ext.available_cpu_isas()}
        explicitly_set = bool(_extension.require_extension().workspace_setting())
        for device in ["cpu"] + [d["name"] for d in report["torch"]["devices"]]:
            report["workspace"][device] = {"bytes": ckd_ext.workspace_bytes(device),
                                           "source": "set" if explicitly_set else "default"}
    return report


def format_report(report: dict) -> str:
    """The report as aligned `name: value` lines."""
    lines = []

    def add(name, value):
        lines.append(f"{name + ':':<28}{value}")

    torch_info, extension = report["torch"], report["extension"]
    add("ckd_ext", f"{report['ckd_ext']['version']} ({report['ckd_ext']['path']})")
    add("python", f"{report['python']} on {report['platform']}")
    add("torch", f"{torch_info['version']} (CUDA {torch_info['cuda'] or 'none: a CPU-only build'}, "
                 f"CPU capability {torch_info['cpu_capability']})")
    if torch_info["devices"]:
        for device in torch_info["devices"]:
            runs = {True: "runs this build", False: "NOT covered by this build's architectures",
                    None: "unknown"}[device["runs_the_build"]]
            add(f"GPU {device['name']}", f"{device['model']}, compute capability {device['capability']}: {runs}")
    else:
        add("GPU", "none visible to torch" if torch_info["cuda"] else "none (torch has no CUDA)")
    if extension["available"]:
        add("compiled extension", f"loaded ({extension['path']})")
    else:
        add("compiled extension", "NOT LOADED: the fused ops cannot run (ckd_ext.reference can)")
        add("  why", extension["reason"])
        add("  build it with", extension["build_command"])
    add("  built against torch", extension["built_against_torch"] or "unknown (no build record)")
    cpu = report["cpu_backend"]
    if cpu is not None:
        add("CPU backend", f"{cpu['isa']} (instruction sets this build and CPU have: "
                           f"{', '.join(cpu['available_isas'])}; CKD_EXT_CPU_ISA or ckd_ext.set_cpu_isa pick one)")
    cuda = report["cuda_backend"]
    if extension["path"] is None:
        add("CUDA backend", "none (no compiled extension)")
    elif cuda is None:
        add("CUDA backend", "unknown (the extension file is not a 64-bit ELF library)")
    elif cuda["compiled"]:
        ptx = f", PTX {', '.join(cuda['ptx'])}" if cuda["ptx"] else ""
        add("CUDA backend", f"compiled: SASS {', '.join(cuda['sass']) or 'none'}{ptx}")
    else:
        add("CUDA backend", "not compiled (CKD_EXT_CUDA=on and nvcc at build time add it)")
    emulated = report["emulated_backend"]
    add("emulated CUDA backend", "built (tests: ckd_ext.testing.emulated_cuda())" if emulated["built"]
        else f"not built: {emulated['reason']}")
    for device, workspace in report["workspace"].items():
        how = ("set by CKD_EXT_WORKSPACE_MB or ckd_ext.set_workspace_bytes" if workspace["source"] == "set"
               else "the device default")
        add(f"workspace {device}", f"{_mib(workspace['bytes'])} ({how})")
    for name, value in report["environment"].items():
        if value is not None:
            add(name, repr(value))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ckd_ext.info", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--check", action="store_true", help="exit with status 1 when the fused ops cannot run")
    args = parser.parse_args(argv)
    report = collect()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if args.check and not report["extension"]["available"] else 0


if __name__ == "__main__":
    sys.exit(main())
