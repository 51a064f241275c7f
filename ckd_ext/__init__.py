"""ckd_ext: fused contrastive knowledge distillation losses (CKD, BicKD, KD) for PyTorch.

    ckd_ext.ckd_loss / bickd_loss / kd_loss     fused ops (need the compiled extension)
    ckd_ext.CKDLoss / BicKDLoss / KDLoss        nn.Module wrappers
    ckd_ext.reference                           plain PyTorch, the float64 oracle (no extension needed)
    ckd_ext.distributed                         global_batch=True / "ring" across ranks (docs/distributed.md)
    ckd_ext.testing                             test-only switches (the emulated CUDA backend)
"""
from . import reference  # noqa: F401
from ._extension import is_available, require_extension
from ._version import __version__  # noqa: F401
from .modules import BicKDLoss, CKDLoss, KDLoss
from .ops import bickd_loss, ckd_loss, kd_loss
__all__ = [
    "ckd_loss", "bickd_loss", "kd_loss", "CKDLoss", "BicKDLoss", "KDLoss", "reference",
    "is_available", "workspace_bytes", "set_workspace_bytes",
]


def workspace_bytes() -> int:
    """Bytes of work buffers (similarity strips, converted blocks) one fused op call may use."""
    return require_extension().workspace_bytes()


def set_workspace_bytes(nbytes: int) -> None:
    """Sets that budget (default 64 MiB, or CKD_EXT_WORKSPACE_MB). Larger strips mean fewer, bigger GEMMs."""
    require_extension().set_workspace_bytes(int(nbytes))
