"""The fused losses: thin wrappers over the custom ops `torch.ops.ckd_ext.*` (schemas in csrc/schemas.cpp), with
their fake (meta) implementations and autograd registered below through torch.library, next to the ops they
serve.

Each forward op can return the student gradient along with the loss (for "mean" and "sum", when the
student requires grad): the loss is nearly always the last node of the graph, so computing the gradient
while the similarity strips are in cache saves recomputing them, and backward only scales it. For
"none" the upstream weights are only known in backward, which then recomputes; so does KD for 16-bit students,
and CKD / BicKD for 16-bit students whose float32 gradient would exceed `forward_gradient_bytes` (below).

The ops return the loss in float32 (float64 for float64 students), as they accumulate it; it is rounded to the
student's dtype here, except under torch.autocast, where the losses behave like torch's own losses on autocast's
float32 list (cross_entropy, kl_div): the loss stays float32, the 16-bit inputs are read as they are (no copy).
"""
import torch

from . import _validation, distributed
from ._compile import assume_constant_result
from ._extension import require_extension
from .autograd import _BICKD_LOSS, _CKD_LOSS, _KD_LOSS
from .settings import forward_gradient_bytes


@assume_constant_result
def _forward_gradient_limit(device: str) -> int:
    # A constant for torch.compile: a graph is specialised to the limit (as the fused-linear ops are to the workspace).
    return forward_gradient_bytes(device)


def _grad_needed(student: torch.Tensor, keeps_float32: bool = False) -> bool:
    """Whether the forward computes the gradient: for float32 and float64 students, and for 16-bit ones where the
    op keeps that gradient in float32 (`keeps_float32`: CKD, BicKD) and it fits `forward_gradient_bytes`. A 16-bit
    gradient computed for an upstream gradient of 1 would be rounded twice once backward scales it (in float16 its
    entries below 2^-24 are 0 before GradScaler's 2^16 arrives); kept in float32 it is rounded once, after the
    upstream scale, as when backward recomputes it, and the similarity GEMMs run once instead of twice (KD has no
    GEMMs to save: it recomputes)."""
    if not (torch.is_grad_enabled() and student.requires_grad):
        return False
    if student.dtype not in (torch.float16, torch.bfloat16):
        return True
    return keeps_float32 and 4 * student.numel() <= _forward_gradient_limit(str(student.device))


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
    with distributed.global_batch_checks(global_batch, group):
        p = _validation.prepare_ckd("ckd_loss", student, teacher, tau, anchor, mask, reduction)
        distributed.check_arguments("ckd_loss", global_batch, group)
    if global_batch is not False:
        return _output(distributed.run(ckd_loss, p, reduction=reduction, global_batch=global_batch, group=group,
                                       tau=tau, anchor=anchor), student)
    loss, _ = _forward(_CKD_LOSS, "ckd_forward", p.student, p.teacher, p.mask, float(tau), anchor, reduction,
                       _grad_needed(p.student, keeps_float32=True))
    loss = _output(loss, student)
    return loss.reshape(p.lead_shape) if reduction == "none" else loss


def kd_loss(student, teacher, *, temperature=4.0, divergence="forward_kl", beta=None, alpha=None, scale_t2=True,
            mask=None, reduction="mean", global_batch=False, group=None):
    """KD: T^2 * D(softmax(t/T), softmax(s/T)) per row (docs/math.md 3), D the `divergence`: "forward_kl" (vanilla
    KD, KL(teacher || student)), "reverse_kl", "jsd" (generalized JSD, teacher weight `beta`, default 0.5),
    "skew_kl" (KL(teacher || alpha teacher + (1 - alpha) student), `alpha` default 0.1) or "tvd"; `scale_t2=False`
    drops the T^2. `global_batch` and `group` are checked and otherwise ignored: KD is row-separable, each rank's
    rows need nothing from the others."""
    p = _validation.prepare_kd("kd_loss", student, teacher, temperature, mask, reduction)
    d = _validation.prepare_divergence("kd_loss", divergence, beta, alpha, scale_t2)
    distributed.check_arguments("kd_loss", global_batch, group)
    loss, _ = _forward(_KD_LOSS, "kd_forward", p.student, p.teacher, p.mask, float(temperature), d.name, d.beta,
                       d.alpha, scale_t2, reduction, _grad_needed(p.student))
    loss = _output(loss, student)
    return loss.reshape(p.lead_shape) if reduction == "none" else loss


def bickd_loss(student, teacher, *, temperature=4.0, tau=0.1, w_sample=1.0, w_class=1.0, symmetric=False,
               mask=None, reduction="mean", global_batch=False, group=None):
    """BicKD loss (this project's definition, docs/math.md). reduction="none" returns the pair
    (per-sample terms (...), per-class terms (C,)), already weighted by w_sample and w_class. `global_batch` True
    or "ring": sample-side candidates and column statistics from the rows of every rank of `group`
    (docs/distributed.md)."""
    with distributed.global_batch_checks(global_batch, group):
        p = _validation.prepare_bickd("bickd_loss", student, teacher, temperature, tau, w_sample, w_class,
                                      symmetric, mask, reduction)
        distributed.check_arguments("bickd_loss", global_batch, group)
    if global_batch is not False:
        out = distributed.run(bickd_loss, p, reduction=reduction, global_batch=global_batch, group=group,
                              temperature=temperature, tau=tau, w_sample=w_sample, w_class=w_class,
                              symmetric=symmetric)
        return tuple(_output(o, student) for o in out) if reduction == "none" else _output(out, student)
    loss, class_terms, _ = _forward(
        _BICKD_LOSS, "bickd_forward", p.student, p.teacher, p.mask, float(temperature), float(tau), float(w_sample),
        float(w_class), bool(symmetric), reduction, _grad_needed(p.student, keeps_float32=True),
    )
    loss = _output(loss, student)
    if reduction == "none":
        return loss.reshape(p.lead_shape), _output(class_terms, student)
    return loss
