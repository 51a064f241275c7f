"""The fused losses' autograd as `torch.autograd.Function` classes over the custom ops (the pattern FlashAttention
uses): the same setup and backward functions that `torch.library.register_autograd` attaches to the ops
(`ckd_ext.ops.AUTOGRAD`), so both paths save the same tensors and compute the same gradients.

Each `apply` takes the forward op's arguments on (N, C) rows, with `compute_grad` (whether the forward also computes
the student gradient; `ckd_ext.ops._grad_needed` says when that pays) and returns the op's outputs; the gradient
output is not differentiable. The public losses call these in eager mode, where an autograd.Function costs less per
call than the op's registered autograd (docs/benchmarks.md, "Per-call overhead"); traced code (torch.compile, opcheck)
sees the ops themselves either way.

    loss, _ = CKDFunction.apply(student, teacher, None, 1.0, "student", "mean", True)
"""
from .ops import BicKDFunction, CKDFunction, KDFunction

__all__ = ["CKDFunction", "KDFunction", "BicKDFunction"]
