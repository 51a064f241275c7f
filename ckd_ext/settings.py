"""Process-wide settings of the fused ops: the workspace budget per call and the CPU kernels' instruction set.
Environment variables CKD_EXT_WORKSPACE_MB and CKD_EXT_CPU_ISA set the same at import (ckd_ext._extension)."""
import torch

from ._extension import require_extension


def workspace_bytes(device=None) -> int:
    """Bytes of work buffers (similarity strips, coefficient matrices, converted blocks) one fused op call on `device`
    (default: the CPU) may use: the value set by set_workspace_bytes or CKD_EXT_WORKSPACE_MB, else the device's default
    (CPU: 64 MiB; CUDA: an eighth of the device's free memory at its first call, within [1 GiB, 4 GiB])."""
    ext = require_extension()
    setting = ext.workspace_setting()
    if setting:
        return setting
    return ext.default_workspace_bytes(str(torch.device("cpu" if device is None else device)))


def set_workspace_bytes(nbytes) -> None:
    """Sets that budget for every device; None returns to each device's default. Larger budgets mean fewer,
    bigger GEMMs."""
    ext = require_extension()
    if nbytes is None:
        ext.reset_workspace_bytes()
    else:
        ext.set_workspace_bytes(int(nbytes))


def cpu_isa() -> str:
    """The instruction set the CPU kernels run with: "baseline" (SSE2 on x86-64; the only one elsewhere), "avx2"
    (AVX2 + FMA + F16C) or "avx512" (AVX-512 F/BW/VL/DQ). By default the highest in available_cpu_isas(); every one
    gives the same results to the bit (docs/benchmarks.md, "CPU instruction sets")."""
    return require_extension().cpu_isa()


def available_cpu_isas() -> list:
    """The instruction sets this build has CPU kernels for and this CPU runs, lowest first."""
    return require_extension().available_cpu_isas()


def set_cpu_isa(name: str) -> None:
    """Runs the CPU kernels with instruction set `name` from now on, process-wide (as CKD_EXT_CPU_ISA does at
    import); one not in available_cpu_isas() is a RuntimeError."""
    require_extension().set_cpu_isa(name)
