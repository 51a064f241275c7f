"""The fused losses: thin wrappers over the custom ops `torch.ops.ckd_ext.*` (schemas in csrc/ops.cpp), with
their fake (meta) implementations and autograd registered below through torch.library, next to the ops they
serve.

Each forward op can return the student gradient along with the loss (for "mean" and "sum", when the
student requires grad): the loss is nearly always the last node of the graph, so computing the gradient
while the similarity strips are in cache saves recomputing them, and backward only scales it. For
"none" the upstream weights are only known in backward, which then recomputes; so do 16-bit students (below).

The ops return the loss in float32 (float64 for float64 students), as they accumulate it; it is rounded to the
student's dtype here, except under torch.autocast, where the losses behave like torch's own losses on autocast's
float32 list (cross_entropy, kl_div): the loss stays float32, the 16-bit inputs are read as they are (no copy).
"""
import torch

from . import _validation, distributed
from ._extension import is_available, require_extension

DOUBLE_BACKWARD = ("double backward through ckd_ext losses is not supported; use ckd_ext.reference (plain "
                   "PyTorch) for higher-order gradients")


def _grad_needed(student: torch.Tensor) -> bool:
    """Whether the forward computes the gradient: for float32 and float64 students. A 16-bit gradient computed for
    an upstream gradient of 1 would be rounded twice once backward scales it: in float16 its small entries (below
    2^-24) are already 0 when GradScaler's 2^16 arrives, and in bfloat16 (float32's range, no underflow) a quarter
    of the entries end one ulp off for an upstream gradient that is not a power of two. Recomputed in backward, the
    gradient is rounded once, after the upstream scale (measured: 1.3-1.8x the forward + backward time, no saved
    bytes beyond the inputs; keeping a float32 gradient instead would save 2x a 16-bit input)."""
    return torch.is_grad_enabled() and student.requires_grad and student.dtype not in (torch.float16, torch.bfloat16)


def _output(loss: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    if loss.dtype == student.dtype:  # float32 and float64 students: nothing to decide (and no autocast query)
        return loss
    return loss if torch.is_autocast_enabled(student.device.type) else loss.to(student.dtype)


def _forward(function, op: str, *args):
    """A forward op with autograd: in eager mode through its autograd.Function (ckd_ext.autograd; less per-call cost
    than the op's registered autograd, docs/benchmarks.md "Per-call overhead"), when traced through the op itself,
    which torch.compile and opcheck know by its schema, fake kernel and registered autograd."""
    require_extension()
    if torch.compiler.is_compiling():
        return getattr(torch.ops.ckd_ext, op)(*args)
    return function.apply(*args)


def ckd_loss(student, teacher, *, tau=1.0, anchor="student", mask=None, reduction="mean", global_batch=False,
             group=None):
    """CKD loss (docs/math.md). `student`, `teacher`: logits (..., C); `mask`: bool (...), False rows take
    no part; returns a scalar, or per-anchor terms of shape (...) for reduction="none". `global_batch` True or
    "ring": negatives from the rows of every rank of `group` (docs/distributed.md)."""
    p = _validation.prepare_ckd("ckd_loss", student, teacher, tau, anchor, mask, reduction)
    distributed.check_arguments("ckd_loss", global_batch, group)
    if global_batch is not False:
        return _output(distributed.ckd_loss(ckd_loss, p, tau=tau, anchor=anchor, reduction=reduction,
                                            global_batch=global_batch, group=group), student)
    loss, _ = _forward(_CKD_LOSS, "ckd_forward", p.student, p.teacher, p.mask, float(tau), anchor, reduction,
                       _grad_needed(p.student))
    loss = _output(loss, student)
    return loss.reshape(p.lead_shape) if reduction == "none" else loss


def kd_loss(student, teacher, *, temperature=4.0, mask=None, reduction="mean", global_batch=False, group=None):
    """Vanilla KD: T^2 * KL(softmax(t/T) || softmax(s/T)) per row (docs/math.md). `global_batch` and `group`
    are checked and otherwise ignored: KD is row-separable, each rank's rows need nothing from the others."""
    p = _validation.prepare_kd("kd_loss", student, teacher, temperature, mask, reduction)
    distributed.check_arguments("kd_loss", global_batch, group)
    loss, _ = _forward(_KD_LOSS, "kd_forward", p.student, p.teacher, p.mask, float(temperature), reduction,
                       _grad_needed(p.student))
    loss = _output(loss, student)
    return loss.reshape(p.lead_shape) if reduction == "none" else loss


def bickd_loss(student, teacher, *, temperature=4.0, tau=0.1, w_sample=1.0, w_class=1.0, symmetric=False,
               mask=None, reduction="mean", global_batch=False, group=None):
    """BicKD loss (this project's definition, docs/math.md). reduction="none" returns the pair
    (per-sample terms (...), per-class terms (C,)), already weighted by w_sample and w_class. `global_batch` True
    or "ring": sample-side candidates and column statistics from the rows of every rank of `group`
    (docs/distributed.md)."""
    p = _validation.prepare_bickd("bickd_loss", student, teacher, temperature, tau, w_sample, w_class, symmetric,
                                  mask, reduction)
    distributed.check_arguments("bickd_loss", global_batch, group)
    if global_batch is not False:
        out = distributed.bickd_loss(bickd_loss, p, temperature=temperature, tau=tau, w_sample=w_sample,
                                     w_class=w_class, symmetric=symmetric, reduction=reduction,
                                     global_batch=global_batch, group=group)
        return tuple(_output(o, student) for o in out) if reduction == "none" else _output(out, student)
    loss, class_terms, _ = _forward(
        _BICKD_LOSS, "bickd_forward", p.student, p.teacher, p.mask, float(temperature), float(tau), float(w_sample),
        float(w_class), bool(symmetric), reduction, _grad_needed(p.student),
    )
    loss = _output(loss, student)
    if reduction == "none":
        return loss.reshape(p.lead_shape), _output(class_terms, student)
    return loss


# --- torch.library registrations -------------------------------------------------------------------

def _loss_dtype(student):
    return torch.float64 if student.dtype == torch.float64 else torch.float32


def _forward_fake(student, reduction, compute_grad):
    loss = student.new_empty((student.shape[0],) if reduction == "none" else (), dtype=_loss_dtype(student))
    grad = torch.empty_like(student) if compute_grad and reduction != "none" else student.new_empty((0,))
    return loss, grad


def _ckd_forward_fake(student, teacher, mask, tau, anchor, reduction, compute_grad):
    return _forward_fake(student, reduction, compute_grad)


def _kd_forward_fake(student, teacher, mask, temperature, reduction, compute_grad):
    return _forward_fake(student, reduction, compute_grad)


def _bickd_forward_fake(student, teacher, mask, temperature, tau, w_sample, w_class, symmetric, reduction,
                        compute_grad):
    loss, grad = _forward_fake(student, reduction, compute_grad)
    class_terms = student.new_empty((student.shape[1],) if reduction == "none" else (0,), dtype=_loss_dtype(student))
    return loss, class_terms, grad


def _ckd_backward_fake(grad_loss, student, teacher, mask, tau, anchor, reduction):
    return torch.empty_like(student)


def _kd_backward_fake(grad_loss, student, teacher, mask, temperature, reduction):
    return torch.empty_like(student)


def _bickd_backward_fake(grad_sample, grad_class, student, *hyperparameters):
    return torch.empty_like(student)


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
    grad = ctx.saved_tensors[3]
    if not (_is_eager(grad) and getattr(ctx, "gradient_private", False)):
        return grad * grad_loss
    ctx.precomputed = False
    return grad.data.mul_(grad_loss)


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


def _ckd_setup(ctx, inputs, output):
    _, _, _, ctx.tau, ctx.anchor, ctx.reduction, compute_grad = inputs
    _save_for_backward(ctx, inputs, output[1], ctx.reduction, compute_grad)


def _ckd_backward(ctx, grad_loss, _grad_of_grad):
    grad = _scaled_precomputed(ctx, grad_loss)
    if grad is None and grad_loss is not None:
        student, teacher, mask = ctx.saved_tensors[:3]
        grad = torch.ops.ckd_ext.ckd_backward(grad_loss, student, teacher, mask, ctx.tau, ctx.anchor, ctx.reduction)
    return grad, None, None, None, None, None, None


def _kd_setup(ctx, inputs, output):
    _, _, _, ctx.temperature, ctx.reduction, compute_grad = inputs
    _save_for_backward(ctx, inputs, output[1], ctx.reduction, compute_grad)


def _kd_backward(ctx, grad_loss, _grad_of_grad):
    grad = _scaled_precomputed(ctx, grad_loss)
    if grad is None and grad_loss is not None:
        student, teacher, mask = ctx.saved_tensors[:3]
        grad = torch.ops.ckd_ext.kd_backward(grad_loss, student, teacher, mask, ctx.temperature, ctx.reduction)
    return grad, None, None, None, None, None


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
        dtype = _loss_dtype(student)
        if grad_loss is None:
            grad_loss = student.new_zeros(ctx.loss_shape, dtype=dtype)
        if grad_class is None:
            grad_class = student.new_zeros(ctx.class_terms_shape, dtype=dtype)
        grad = torch.ops.ckd_ext.bickd_backward(grad_loss, grad_class, student, teacher, mask, ctx.temperature,
                                                ctx.tau, ctx.w_sample, ctx.w_class, ctx.symmetric, ctx.reduction)
    return (grad,) + (None,) * 9


# (op, setup_context, backward) of each forward op: registered on the op below, and the same functions make the
# autograd.Function classes of ckd_ext.autograd.
AUTOGRAD = {
    "ckd_forward": (_ckd_setup, _once_differentiable(_ckd_backward)),
    "kd_forward": (_kd_setup, _once_differentiable(_kd_backward)),
    "bickd_forward": (_bickd_setup, _once_differentiable(_bickd_backward)),
}


def _function(name: str, op: str, doc: str, gradient_private: bool = False) -> type:
    """An autograd.Function over `op` with the op's own setup and backward (ckd_ext.autograd). Its forward calls the
    op below the Autograd dispatch key, where the op's registered autograd (a second autograd.Function in Python,
    torch._library.autograd) would otherwise run again; it takes ctx itself (no setup_context), which spares
    apply() binding the arguments to a signature on every call. `gradient_private`: the caller drops the gradient
    output, so backward may scale it in place (`_scaled_precomputed`)."""
    setup_context, backward = AUTOGRAD[op]

    def forward(ctx, *args):
        if torch.compiler.is_compiling():
            output = getattr(torch.ops.ckd_ext, op)(*args)
        else:
            with torch._C._AutoDispatchBelowAutograd():
                output = getattr(torch.ops.ckd_ext, op)(*args)
        ctx.mark_non_differentiable(output[-1])
        ctx.gradient_private = gradient_private
        setup_context(ctx, args, output)
        return output

    return type(name, (torch.autograd.Function,), {
        "__doc__": doc, "__module__": "ckd_ext.autograd", "forward": staticmethod(forward),
        "backward": staticmethod(backward)})


CKDFunction = _function(
    "CKDFunction", "ckd_forward",
    "apply(student, teacher, mask, tau, anchor, reduction, compute_grad) -> (loss, grad): torch.ops.ckd_ext.ckd_forward "
    "with its autograd.")
KDFunction = _function(
    "KDFunction", "kd_forward",
    "apply(student, teacher, mask, temperature, reduction, compute_grad) -> (loss, grad): "
    "torch.ops.ckd_ext.kd_forward with its autograd.")
BicKDFunction = _function(
    "BicKDFunction", "bickd_forward",
    "apply(student, teacher, mask, temperature, tau, w_sample, w_class, symmetric, reduction, compute_grad) -> "
    "(loss, class_terms, grad): torch.ops.ckd_ext.bickd_forward with its autograd.")
# What the public losses call: the same Functions, for callers that drop the gradient output.
_CKD_LOSS = _function("CKDFunction", "ckd_forward", CKDFunction.__doc__, gradient_private=True)
_KD_LOSS = _function("KDFunction", "kd_forward", KDFunction.__doc__, gradient_private=True)
_BICKD_LOSS = _function("BicKDFunction", "bickd_forward", BicKDFunction.__doc__, gradient_private=True)


def _register():
    lib = "ckd_ext::"
    torch.library.register_fake(lib + "ckd_forward")(_ckd_forward_fake)
    torch.library.register_fake(lib + "kd_forward")(_kd_forward_fake)
    torch.library.register_fake(lib + "bickd_forward")(_bickd_forward_fake)
    torch.library.register_fake(lib + "ckd_backward")(_ckd_backward_fake)
    torch.library.register_fake(lib + "kd_backward")(_kd_backward_fake)
    torch.library.register_fake(lib + "bickd_backward")(_bickd_backward_fake)
    for op, (setup_context, backward) in AUTOGRAD.items():
        torch.library.register_autograd(lib + op, backward, setup_context=setup_context)


# Once per process: _C outlives a re-import of this package (importlib.reload, tests that purge sys.modules), and
# torch.library refuses a second fake / autograd registration of an op.
if is_available() and not getattr(require_extension(), "python_registrations_done", False):
    _register()
    require_extension().python_registrations_done = True
