"""Resource usage of ckd_ext's CUDA kernels, as ptxas reports it (registers, shared memory, spills), per
kernel and architecture. setup.py writes it to build/ptxas_report.md when it builds the CUDA backend, with the rows
and a digest of what produced them in build/ptxas_report.json; the test suite checks that no kernel spills, from that
file when its digest matches the sources (a CI run's build has just made it: ptxas is not run twice), else by running
ptxas itself.

    python tools/ptxas_report.py [--arch 80 --arch 90] [--out build/ptxas_report.md]
"""
import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import build_config as cfg  # noqa: E402  (tools/ is this script's folder)

ROOT = Path(__file__).resolve().parents[1]
# The flags torch's cpp_extension gives nvcc for 16-bit types (c10::Half / c10::BFloat16 on the device).
HALF_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-D__CUDA_NO_HALF2_OPERATORS__"]


def torch_include_dir() -> str:
    import importlib.util
    spec = importlib.util.find_spec("torch")
    return os.path.join(spec.submodule_search_locations[0], "include")


def default_archs():
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", cfg.DEFAULT_CUDA_ARCHS)
    return [a.replace(".", "").replace("+PTX", "") for a in re.split(r"[;\s]+", archs) if a]


def _demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def ptxas_usage(arch: str, nvcc: str = "nvcc"):
    """[{kernel, arch, registers, shared_bytes, spill_stores, spill_loads, stack_bytes}] for one architecture."""
    includes = [f"-I{ROOT / d}" for d in cfg.INCLUDE_DIRS] + [f"-I{torch_include_dir()}"]
    stderr = ""
    with tempfile.TemporaryDirectory() as tmp:
        for source in cfg.CUDA_SOURCES:
            cmd = [nvcc, *cfg.NVCC_FLAGS, *HALF_FLAGS, f"-arch=sm_{arch}", "-Xptxas=-v", "-c", str(ROOT / source),
                   "-o", os.path.join(tmp, "k.o"), *includes]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{proc.stderr[-5000:]}")
            stderr += proc.stderr
    rows, current = [], None
    for line in stderr.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            current = {"kernel": m.group(1), "arch": m.group(2), "registers": 0, "shared_bytes": 0,
                       "spill_stores": 0, "spill_loads": 0, "stack_bytes": 0}
            rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack_bytes"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["shared_bytes"] = int(s.group(1)) if s else 0
    for row, name in zip(rows, _demangle([r["kernel"] for r in rows])):
        row["kernel"] = name
    return rows


def inputs_digest(archs) -> str:
    """What ptxas_usage's result depends on: every CUDA-side source and header of csrc/, the nvcc flags, the
    architectures, nvcc's version and torch's headers' folder."""
    h = hashlib.sha256()
    for path in sorted(p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cu", ".cuh", ".h", ".hpp")):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    h.update(json.dumps([cfg.NVCC_FLAGS, HALF_FLAGS, cfg.CUDA_SOURCES, list(archs), nvcc,
                         torch_include_dir()]).encode())
    return h.hexdigest()


def recorded_rows(archs, report=ROOT / "build" / "ptxas_report.json"):
    """The rows a build recorded for these architectures and these very inputs, else None."""
    try:
        recorded = json.loads(Path(report).read_text())
    except (OSError, ValueError):
        return None
    return recorded["rows"] if recorded.get("inputs") == inputs_digest(archs) else None


def markdown(rows) -> str:
    lines = ["| kernel | arch | registers | shared bytes | spill stores | spill loads | stack bytes |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["arch"], r["kernel"])):
        lines.append(f"| `{r['kernel']}` | {r['arch']} | {r['registers']} | {r['shared_bytes']} | "
                     f"{r['spill_stores']} | {r['spill_loads']} | {r['stack_bytes']} |")
    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    lines.append("")
    lines.append(f"{len(rows)} kernel instantiations, max {max(r['registers'] for r in rows)} registers, "
                 f"{len(spilling)} with spills.")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="compute capability without the dot (default: 80, 90)")
    parser.add_argument("--out", default=str(ROOT / "build" / "ptxas_report.md"))
    args = parser.parse_args(argv)
    archs = args.arch or default_archs()
    rows = [r for arch in archs for r in ptxas_usage(arch)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(markdown(rows))
    Path(args.out).with_suffix(".json").write_text(json.dumps({"inputs": inputs_digest(archs), "rows": rows}))
    print(markdown(rows).splitlines()[-1], f"(report: {args.out})")
    return 1 if any(r["spill_stores"] or r["spill_loads"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
