"""What torch.library knows of the custom ops `torch.ops.ckd_ext.*` beyond their schemas (csrc/schemas.cpp): their
fake (meta) implementations and their autograd, one row of FORWARD_OPS per forward op, and the fakes of the GEMM
policy's products (GEMM_OPS). ckd_ext.autograd builds its
autograd.Function classes from the same rows.
"""
from typing import Callable, NamedTuple

import torch

from ._extension import is_available, require_extension
from .rows import accumulation_dtype

DOUBLE_BACKWARD = ("double backward through ckd_ext losses is not supported; use ckd_ext.reference (plain "
                   "PyTorch) for higher-order gradients")


def _forward_gradient(student, reduction, compute_grad, in_acc):
    """The forward op's gradient output: empty unless it computes one; in the accumulation dtype (`in_acc`: CKD, BicKD)
    or the student's."""
    if not compute_grad or reduction == "none":
        return student.new_empty((0,))
    return torch.empty_like(student, dtype=accumulation_dtype(student.dtype) if in_acc else student.dtype)


def _loss_and_gradient_fake(gradient_in_acc: bool):
    def fake(student, teacher, mask, *hyperparameters):
        reduction, compute_grad = hyperparameters[-2:]
        loss = student.new_empty((student.shape[0],) if reduction == "none" else (),
                                 dtype=accumulation_dtype(student.dtype))
        return loss, _forward_gradient(student, reduction, compute_grad, gradient_in_acc)
    return fake


_ACC_GRADIENT_FAKE = _loss_and_gradient_fake(gradient_in_acc=True)  # CKD's, and the first part of BicKD's


def _bickd_forward_fake(student, teacher, mask, *hyperparameters):
    loss, grad = _ACC_GRADIENT_FAKE(student, teacher, mask, *hyperparameters)
    reduction = hyperparameters[-2]
    class_terms = student.new_empty((student.shape[1],) if reduction == "none" else (0,),
                                    dtype=accumulation_dtype(student.dtype))
    return loss, class_terms, grad


def _gradient_fake(upstream_gradients: int):
    """The fake of a backward op whose arguments are `upstream_gradients` upstream gradients, then the student."""
    def fake(*args):
        return torch.empty_like(args[upstream_gradients])
    return fake


def _save_for_backward(ctx, inputs, grad, reduction, compute_grad):
    """Keeps the inputs themselves (never copies) and, where forward computed it, the gradient: backward scales
    that gradient once (`_scaled_precomputed`) and recomputes from the inputs on any later backward."""
    student, teacher, mask = inputs[:3]
    # The forward's gradient output is never used downstream; materialised, its zero upstream gradient would be a
    # second N x C tensor in every backward. Unused outputs' gradients arrive as None instead.
    ctx.set_materialize_grads(False)
    ctx.precomputed = bool(compute_grad) and reduction != "none"
    ctx.save_for_backward(student, teacher, mask, *((grad,) if ctx.precomputed else ()))


def _is_eager(t: torch.Tensor) -> bool:
    """A plain tensor outside any tracing (no compiler, no FakeTensor / FunctionalTensor, no dispatch mode)."""
    return (type(t) is torch.Tensor and not torch.compiler.is_compiling()
            and not torch.utils._python_dispatch.is_in_torch_dispatch_mode())


def _scaled_precomputed(ctx, grad_loss):
    """The gradient kept from forward times grad_loss, or None where backward has to recompute it.

    None too for an upstream gradient of None (the loss unused: it contributes nothing). Where the gradient output
    went nowhere (the public losses drop it: `ctx.gradient_private`), the first backward scales it in place: the op
    made it and nothing else holds it, so memory holds one gradient where `grad * grad_loss` held two. It is then
    scaled and no longer the gradient for an upstream 1, so a second backward (retain_graph=True) recomputes. The
    scaling goes through `.data`, which shares the storage but not the version counter: the saved tensor still
    unpacks on that second backward. Where the caller holds the gradient output (ckd_ext.autograd's Functions, the
    ops' registered autograd), the product is a new tensor: a tensor handed out must never change afterwards. When
    traced (torch.compile, opcheck's AOT checks) it stays out of place too: the compiler owns buffer reuse,
    functionalisation rejects the mutation of a saved tensor, and a traced graph must not depend on how many
    backwards ran."""
    if not ctx.precomputed or grad_loss is None:
        return None
    student, grad = ctx.saved_tensors[0], ctx.saved_tensors[3]
    # a 16-bit student's gradient is kept in float32 (CKD, BicKD) and rounded here, once, after the upstream scale
    if not (_is_eager(grad) and getattr(ctx, "gradient_private", False)):
        return (grad * grad_loss).to(student.dtype)
    ctx.precomputed = False
    return grad.data.mul_(grad_loss).to(student.dtype)


def _once_differentiable(backward):
    """The ops' backward is not itself differentiable (it is a fused kernel), so a second derivative would be
    silently 0: under create_graph=True the gradients it returns are marked so that differentiating them raises
    DOUBLE_BACKWARD (what torch.autograd.function.once_differentiable does for autograd.Functions). First-order
    gradients with create_graph=True still work."""

    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled() or torch.compiler.is_compiling() or outputs[0] is None:
            return outputs
        return tuple(None if grad is None else
                     torch._C._functions.DelayedError(DOUBLE_BACKWARD.encode(), 1)(grad.detach().requires_grad_())
                     for grad in outputs)

    return wrapper


def _row_loss_setup(ctx, inputs, output):
    """A forward op (student, teacher, mask, *hyperparameters, reduction, compute_grad) -> (loss, grad)."""
    ctx.hyperparameters, compute_grad = inputs[3:-1], inputs[-1]
    _save_for_backward(ctx, inputs, output[1], inputs[-2], compute_grad)


def _row_loss_backward(backward_op):
    """Its backward: `backward_op(grad_loss, student, teacher, mask, *hyperparameters, reduction)`."""
    def backward(ctx, grad_loss, _grad_of_grad):
        grad = _scaled_precomputed(ctx, grad_loss)
        if grad is None and grad_loss is not None:
            student, teacher, mask = ctx.saved_tensors[:3]
            grad = backward_op()(grad_loss, student, teacher, mask, *ctx.hyperparameters)
        return (grad,) + (None,) * (3 + len(ctx.hyperparameters))
    return backward


def _bickd_setup(ctx, inputs, output):
    (_, _, _, ctx.temperature, ctx.tau, ctx.w_sample, ctx.w_class, ctx.symmetric, ctx.reduction,
     compute_grad) = inputs
    ctx.loss_shape, ctx.class_terms_shape = output[0].shape, output[1].shape
    _save_for_backward(ctx, inputs, output[2], ctx.reduction, compute_grad)


def _bickd_backward(ctx, grad_loss, grad_class, _grad_of_grad):
    grad = _scaled_precomputed(ctx, grad_loss)
    if grad is None and (grad_loss is not None or grad_class is not None):
        student, teacher, mask = ctx.saved_tensors[:3]
        # An output that was not used (reduction="none": the per-sample or the per-class terms) contributes 0.
        dtype = accumulation_dtype(student.dtype)
        if grad_loss is None:
            grad_loss = student.new_zeros(ctx.loss_shape, dtype=dtype)
        if grad_class is None:
            grad_class = student.new_zeros(ctx.class_terms_shape, dtype=dtype)
        grad = torch.ops.ckd_ext.bickd_backward(grad_loss, grad_class, student, teacher, mask, ctx.temperature,
                                                ctx.tau, ctx.w_sample, ctx.w_class, ctx.symmetric, ctx.reduction)
    return (grad,) + (None,) * 9


class ForwardOp(NamedTuple):
    """What torch.library needs of one forward op and its backward op beyond their schemas."""
    fake: Callable
    backward_op: str
    backward_fake: Callable
    setup_context: Callable
    backward: Callable


def _row_loss(name: str, forward_fake: Callable) -> ForwardOp:
    """A loss whose forward op returns (loss, grad), faked by `forward_fake`, and whose backward op takes one upstream
    gradient."""
    backward_op = f"{name}_backward"
    return ForwardOp(forward_fake, backward_op, _gradient_fake(1), _row_loss_setup,
                     _once_differentiable(_row_loss_backward(lambda: getattr(torch.ops.ckd_ext, backward_op))))


# One row per forward op: registered on the ops below, and the same setup and backward make the autograd.Function
# classes of ckd_ext.autograd.
FORWARD_OPS = {
    "ckd_forward": _row_loss("ckd", _ACC_GRADIENT_FAKE),
    "kd_forward": _row_loss("kd", _loss_and_gradient_fake(gradient_in_acc=False)),
    "bickd_forward": ForwardOp(_bickd_forward_fake, "bickd_backward", _gradient_fake(2), _bickd_setup,
                               _once_differentiable(_bickd_backward)),
}


def _gemm_similarity_fake(a, b):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=accumulation_dtype(a.dtype))


def _gemm_product_fake(out, coef, rows, accumulate):
    return None


def _gemm_exact_int8_fake(a, b):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.float64)


# The GEMM policy's products (csrc/orchestration/gemm.h) as ops, for the fused-linear losses' orchestration. They have
# no autograd of their own: their callers are autograd.Functions whose backward issues the products it needs.
GEMM_OPS = {"gemm_similarity": _gemm_similarity_fake, "gemm_product": _gemm_product_fake,
            "gemm_exact_int8": _gemm_exact_int8_fake}


def _register():
    for op, fake in GEMM_OPS.items():
        torch.library.register_fake(f"ckd_ext::{op}")(fake)
    for op, spec in FORWARD_OPS.items():
        torch.library.register_fake(f"ckd_ext::{op}")(spec.fake)
        torch.library.register_fake(f"ckd_ext::{spec.backward_op}")(spec.backward_fake)
        torch.library.register_autograd(f"ckd_ext::{op}", spec.backward, setup_context=spec.setup_context)


# Once per process: _C outlives a re-import of this package (importlib.reload, tests that purge sys.modules), and
# torch.library refuses a second fake / autograd registration of an op.
if is_available() and not getattr(require_extension(), "python_registrations_done", False):
    _register()
    require_extension().python_registrations_done = True
