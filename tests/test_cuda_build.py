"""The CUDA kernels compile with nvcc for the default architectures and no kernel spills registers
(tools/ptxas_report.py; the build writes the same report to build/ptxas_report.md)."""
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import ptxas_report  # noqa: E402


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: the CUDA kernels cannot be compiled here")
def test_no_kernel_spills():
    archs = ptxas_report.default_archs()
    # the build's own report when it is of these sources (it was just made, and ptxas takes minutes), else ptxas here
    rows = ptxas_report.recorded_rows(archs) or [r for arch in archs for r in ptxas_report.ptxas_usage(arch)]
    kernels = {r["kernel"].split("<")[0] for r in rows}
    # Every kernel of the GPU backend was compiled, for every architecture.
    assert len(kernels) == 15, sorted(kernels)
    assert {r["arch"] for r in rows} == {f"sm_{a}" for a in ptxas_report.default_archs()}
    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, ptxas_report.markdown(spilling)
