"""The public fused losses (library ckd_ext: CPU and CUDA kernels)."""
from ._extension import is_available, ops_module
from .ops import LossOps

_ops = LossOps("ckd_ext", ops_module.require)
if is_available():
    _ops.register()


def ckd_loss(student, teacher, *, tau=1.0, anchor="student", mask=None, reduction="mean"):
    """CKD loss (docs/math.md). `student`, `teacher`: logits (..., C); `mask`: bool (...), False rows take
    no part; returns a scalar, or per-anchor terms of shape (...) for reduction="none"."""
    return _ops.ckd_loss(student, teacher, tau=tau, anchor=anchor, mask=mask, reduction=reduction)


def kd_loss(student, teacher, *, temperature=4.0, mask=None, reduction="mean"):
    """Vanilla KD: T^2 * KL(softmax(t/T) || softmax(s/T)) per row (docs/math.md)."""
    return _ops.kd_loss(student, teacher, temperature=temperature, mask=mask, reduction=reduction)


def bickd_loss(student, teacher, *, temperature=4.0, tau=0.1, w_sample=1.0, w_class=1.0, symmetric=False,
               mask=None, reduction="mean"):
    """BicKD loss (this project's definition, docs/math.md). reduction="none" returns the pair
    (per-sample terms (...), per-class terms (C,)), already weighted by w_sample and w_class."""
    return _ops.bickd_loss(student, teacher, temperature=temperature, tau=tau, w_sample=w_sample,
                           w_class=w_class, symmetric=symmetric, mask=mask, reduction=reduction)
