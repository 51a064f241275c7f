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


_forward_gradient_setting = None


def forward_gradient_bytes(device=None) -> int:
    """The largest gradient CKD and BicKD compute in their forward for a 16-bit student and keep, in float32, until
    backward (docs/math.md 6.3): the value set by set_forward_gradient_bytes, else the device's default (CUDA: a
    quarter of the device's memory; CPU: no limit). Above it the forward computes the loss alone and backward
    computes the gradient again, which costs the similarity GEMMs a second time but holds nothing beyond the inputs.
    float32 and float64 students always get their gradient in the forward (it is no larger than the student)."""
    if _forward_gradient_setting is not None:
        return _forward_gradient_setting
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return 2 ** 63 - 1


def set_forward_gradient_bytes(nbytes) -> None:
    """Sets that limit for every device (0: always recompute in backward); None returns to each device's default."""
    global _forward_gradient_setting
    if nbytes is not None and (isinstance(nbytes, bool) or int(nbytes) != nbytes or nbytes < 0):
        raise ValueError(f"set_forward_gradient_bytes: nbytes must be a non-negative integer or None, got {nbytes!r}")
    _forward_gradient_setting = None if nbytes is None else int(nbytes)
