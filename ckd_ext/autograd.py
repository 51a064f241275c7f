"""The fused losses' autograd as `torch.autograd.Function` classes over the custom ops (the pattern FlashAttention
uses): the same setup and backward functions that `torch.library.register_autograd` attaches to the ops
(`ckd_ext.custom_ops.FORWARD_OPS`), so both paths save the same tensors and compute the same gradients.

Each `apply` takes the forward op's arguments on (N, C) rows, with `compute_grad` (whether the forward also computes
the student gradient; `ckd_ext.losses._grad_needed` says when that pays) and returns the op's outputs; the gradient
output (for an upstream gradient of 1; CKD and BicKD keep a 16-bit student's in float32, KD in its dtype) is not
differentiable. The public losses call these in eager mode, where an autograd.Function costs less per
call than the op's registered autograd (docs/benchmarks.md, "Per-call overhead"); traced code (torch.compile, opcheck)
sees the ops themselves either way.

    loss, _ = CKDFunction.apply(student, teacher, None, 1.0, "student", "mean", True)
"""
import torch

from .custom_ops import FORWARD_OPS

__all__ = ["CKDFunction", "KDFunction", "BicKDFunction"]


def _function(name: str, op: str, doc: str, gradient_private: bool = False) -> type:
    """An autograd.Function over `op` with the op's own setup and backward (ckd_ext.autograd). Its forward calls the
    op below the Autograd dispatch key, where the op's registered autograd (a second autograd.Function in Python,
    torch._library.autograd) would otherwise run again; it takes ctx itself (no setup_context), which spares
    apply() binding the arguments to a signature on every call. `gradient_private`: the caller drops the gradient
    output, so backward may scale it in place (custom_ops._scaled_precomputed)."""
    spec = FORWARD_OPS[op]

    def forward(ctx, *args):
        if torch.compiler.is_compiling():
            output = getattr(torch.ops.ckd_ext, op)(*args)
        else:
            with torch._C._AutoDispatchBelowAutograd():
                output = getattr(torch.ops.ckd_ext, op)(*args)
        ctx.mark_non_differentiable(output[-1])
        ctx.gradient_private = gradient_private
        spec.setup_context(ctx, args, output)
        return output

    return type(name, (torch.autograd.Function,), {
        "__doc__": doc, "__module__": __name__, "forward": staticmethod(forward),
        "backward": staticmethod(spec.backward)})


CKDFunction = _function(
    "CKDFunction", "ckd_forward",
    "apply(student, teacher, mask, tau, anchor, reduction, compute_grad) -> (loss, grad): torch.ops.ckd_ext.ckd_forward "
    "with its autograd.")
KDFunction = _function(
    "KDFunction", "kd_forward",
    "apply(student, teacher, mask, temperature, divergence, beta, alpha, scale_t2, reduction, compute_grad) -> "
    "(loss, grad): torch.ops.ckd_ext.kd_forward with its autograd (beta / alpha 0.0 where the divergence has none).")
BicKDFunction = _function(
    "BicKDFunction", "bickd_forward",
    "apply(student, teacher, mask, temperature, tau, w_sample, w_class, symmetric, reduction, compute_grad) -> "
    "(loss, class_terms, grad): torch.ops.ckd_ext.bickd_forward with its autograd.")
# What the public losses call: the same Functions, for callers that drop the gradient output.
_CKD_LOSS = _function("CKDFunction", "ckd_forward", CKDFunction.__doc__, gradient_private=True)
_KD_LOSS = _function("KDFunction", "kd_forward", KDFunction.__doc__, gradient_private=True)
_BICKD_LOSS = _function("BicKDFunction", "bickd_forward", BicKDFunction.__doc__, gradient_private=True)
