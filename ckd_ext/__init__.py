"""ckd_ext: fused contrastive knowledge distillation losses (CKD, BicKD, KD) for PyTorch.

    ckd_ext.ckd_loss / bickd_loss / kd_loss     fused ops (need the compiled extension)
    ckd_ext.CKDLoss / BicKDLoss / KDLoss        nn.Module wrappers
    ckd_ext.fused_linear_ckd_loss / fused_linear_kd_loss
                                                the same losses on hidden states and LM heads, no logits held
    ckd_ext.FusedLinearCKDLoss / FusedLinearKDLoss   their nn.Module wrappers
    ckd_ext.fused_linear_teacher_gram           a frozen teacher head's Gram matrix, once, for fused-linear CKD
    ckd_ext.topk_kd_loss / fused_linear_topk_kd_loss / teacher_topk
                                                KD from an offline top-k teacher (ids + log-probabilities), and
                                                its producer; TopKKDLoss / FusedLinearTopKKDLoss their modules
    ckd_ext.topk_ckd_loss / fused_linear_topk_ckd_loss
                                                CKD (student anchor) from a top-k teacher with its moments;
                                                TopKCKDLoss / FusedLinearTopKCKDLoss their modules
    ckd_ext.reference                           plain PyTorch, the float64 oracle (no extension needed)
    ckd_ext.autograd                            CKDFunction / KDFunction / BicKDFunction over the ops
    ckd_ext.distributed                         global_batch=True / "ring" across ranks (docs/distributed.md)
    ckd_ext.testing                             test-only switches (the emulated CUDA backend)
    ckd_ext.workspace_bytes / set_workspace_bytes / forward_gradient_bytes / set_forward_gradient_bytes /
        cpu_isa / available_cpu_isas / set_cpu_isa
                                                process-wide settings of the fused ops (ckd_ext.settings)
    ckd_ext.demos                               the ckd-train and ckd-train-lm demos (not the library's API)
"""
from . import autograd, reference  # noqa: F401
from ._extension import is_available, require_extension  # noqa: F401  (require_extension: _C, for tools)
from ._version import __version__  # noqa: F401
from .fused_linear import (TeacherGram, fused_linear_ckd_loss, fused_linear_kd_loss, fused_linear_teacher_gram,
                           fused_linear_topk_ckd_loss, fused_linear_topk_kd_loss, teacher_topk)
from .modules import (BicKDLoss, CKDLoss, FusedLinearCKDLoss, FusedLinearKDLoss, FusedLinearTopKCKDLoss,
                      FusedLinearTopKKDLoss, KDLoss, TopKCKDLoss, TopKKDLoss)
from .losses import bickd_loss, ckd_loss, kd_loss
from .topk import TeacherTopK, topk_kd_loss
from .topk_ckd import topk_ckd_loss
from .settings import (available_cpu_isas, cpu_isa, forward_gradient_bytes, set_cpu_isa, set_forward_gradient_bytes,
                       set_workspace_bytes, workspace_bytes)

__all__ = [
    "ckd_loss", "bickd_loss", "kd_loss", "CKDLoss", "BicKDLoss", "KDLoss", "reference",
    "fused_linear_ckd_loss", "fused_linear_kd_loss", "FusedLinearCKDLoss", "FusedLinearKDLoss",
    "fused_linear_teacher_gram", "TeacherGram",
    "topk_kd_loss", "fused_linear_topk_kd_loss", "teacher_topk", "TeacherTopK", "TopKKDLoss", "FusedLinearTopKKDLoss",
    "topk_ckd_loss", "fused_linear_topk_ckd_loss", "TopKCKDLoss", "FusedLinearTopKCKDLoss",
    "is_available", "workspace_bytes", "set_workspace_bytes", "forward_gradient_bytes", "set_forward_gradient_bytes",
    "cpu_isa", "available_cpu_isas", "set_cpu_isa",
]

