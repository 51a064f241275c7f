"""ckd_ext: fused contrastive knowledge distillation losses (CKD, BicKD, KD) for PyTorch.

    ckd_ext.ckd_loss / bickd_loss / kd_loss     fused ops (need the compiled extension)
    ckd_ext.CKDLoss / BicKDLoss / KDLoss        nn.Module wrappers
    ckd_ext.fused_linear_ckd_loss / fused_linear_kd_loss
                                                the same losses on hidden states and LM heads, no logits held
    ckd_ext.FusedLinearCKDLoss / FusedLinearKDLoss   their nn.Module wrappers
    ckd_ext.reference                           plain PyTorch, the float64 oracle (no extension needed)
    ckd_ext.autograd                            CKDFunction / KDFunction / BicKDFunction over the ops
    ckd_ext.distributed                         global_batch=True / "ring" across ranks (docs/distributed.md)
    ckd_ext.testing                             test-only switches (the emulated CUDA backend)
"""
from . import autograd, reference  # noqa: F401
from ._extension import is_available, require_extension
from ._version import __version__  # noqa: F401
from .fused_linear import fused_linear_ckd_loss, fused_linear_kd_loss
from .modules import BicKDLoss, CKDLoss, FusedLinearCKDLoss, FusedLinearKDLoss, KDLoss
from .ops import bickd_loss, ckd_loss, kd_loss
__all__ = [
    "ckd_loss", "bickd_loss", "kd_loss", "CKDLoss", "BicKDLoss", "KDLoss", "reference",
    "fused_linear_ckd_loss", "fused_linear_kd_loss", "FusedLinearCKDLoss", "FusedLinearKDLoss",
    "is_available", "workspace_bytes", "set_workspace_bytes", "cpu_isa", "available_cpu_isas", "set_cpu_isa",
]


def workspace_bytes(device=None) -> int:
    """Bytes of work buffers (similarity strips, coefficient matrices, converted blocks) one fused op call on `device`
    (default: the CPU) may use: the value set by set_workspace_bytes or CKD_EXT_WORKSPACE_MB, else the device's default
    (CPU: 64 MiB; CUDA: an eighth of the device's free memory at its first call, within [1 GiB, 4 GiB])."""
    ext = require_extension()
    setting = ext.workspace_setting()
    if setting:
        return setting
    import torch
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
