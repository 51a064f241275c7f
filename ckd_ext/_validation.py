"""Argument validation and flattening shared by the reference and the fused losses.

Every check of the conventions happens here, before any computation, so both implementations reject
exactly the same inputs with exactly the same messages. Messages start with the public name of the
caller (``fn``: "ckd_loss", "CKDLoss", ...), name the offending argument and say what was expected.

Error classes: ``TypeError`` for a wrong kind of object (non-tensor, non-floating dtype, non-bool mask,
non-number hyperparameter, non-bool ``symmetric``); ``ValueError`` for a right kind with a wrong value
(shapes, devices, ranges, unknown option strings).
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .divergences import Divergence
from .divergences import resolve as resolve_divergence

REDUCTIONS = ("mean", "sum", "none")
FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ANCHORS = ("student", "teacher")


class Prepared(NamedTuple):
    """Validated inputs, flattened to rows."""

    student: Tensor  # (N, C) view/reshape of the student: not detached, copied only if reshape must copy
    teacher: Tensor  # (N, C) teacher, detached (it is a constant of the loss)
    mask: Optional[Tensor]  # (N,) bool, or None when every row is valid
    lead_shape: torch.Size  # student.shape[:-1], to give "none" outputs their leading shape back


# --------------------------------------------------------------------------------------------------
# Individual checks
# --------------------------------------------------------------------------------------------------


def _check_floating_tensor(fn: str, name: str, value) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOATING_DTYPES:  # float8 types are floating point too, but not supported
        raise TypeError(
            f"{fn}: {name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {value.dtype}"
        )


def _check_logits_pair(fn: str, student: Tensor, teacher: Tensor) -> None:
    _check_floating_tensor(fn, "student", student)
    _check_floating_tensor(fn, "teacher", teacher)
    if student.dim() < 1:
        raise ValueError(
            f"{fn}: student must have at least 1 dimension (..., C), got a 0-dimensional tensor"
        )
    if teacher.shape != student.shape:
        raise ValueError(
            f"{fn}: teacher must have the same shape as student {tuple(student.shape)}, "
            f"got {tuple(teacher.shape)}"
        )
    if student.shape[-1] == 0:
        raise ValueError(
            f"{fn}: student must have at least one class (last dimension C > 0), "
            f"got shape {tuple(student.shape)}"
        )
    if teacher.device != student.device:
        raise ValueError(
            f"{fn}: teacher must be on the same device as student ({student.device}), "
            f"got {teacher.device}"
        )


def _check_mask(fn: str, mask, student: Tensor, student_name: str = "student") -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"{fn}: mask must be a torch.Tensor of dtype torch.bool or None, "
                        f"got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{fn}: mask must have dtype torch.bool, got {mask.dtype}")
    lead_shape = student.shape[:-1]
    if mask.shape != lead_shape:
        raise ValueError(
            f"{fn}: mask must have the shape of {student_name} without its last dimension "
            f"{tuple(lead_shape)}, got {tuple(mask.shape)}"
        )
    if mask.device != student.device:
        raise ValueError(
            f"{fn}: mask must be on the same device as {student_name} ({student.device}), got {mask.device}"
        )


# Hyperparameters enter the kernels in float32 as their reciprocal (1 / tau, 1 / T) and KD scales by T^2: a value
# whose reciprocal or square is not finite in float32 would return inf or NaN, so it is rejected. The checks are
# comparisons only (no math.isfinite, no float()): they hold for Python ints too large for a float, reject NaN
# (every comparison with it is False), and trace under torch.compile(dynamic=True), where a float attribute
# arrives as a symbolic float.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
POSITIVE_MIN = 1.0 / FLOAT32_MAX      # smallest value whose reciprocal is finite in float32
POSITIVE_MAX = math.sqrt(FLOAT32_MAX)  # largest value whose square is finite in float32


def _check_number(fn: str, name: str, value) -> None:
    # bool is a numbers.Real in Python; a True/False temperature is a bug in the caller.
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"{fn}: {name} must be a Python number (int or float), "
                        f"got {type(value).__name__}")


def _check_positive(fn: str, name: str, value) -> None:
    _check_number(fn, name, value)
    if not (POSITIVE_MIN <= value <= POSITIVE_MAX):
        raise ValueError(f"{fn}: {name} must be a finite number > 0, got {value!r} (accepted: "
                         f"[{POSITIVE_MIN:.3g}, {POSITIVE_MAX:.3g}], where its reciprocal and square are finite in "
                         f"float32)")


def _check_weights(fn: str, w_sample, w_class) -> None:
    for name, value in (("w_sample", w_sample), ("w_class", w_class)):
        _check_number(fn, name, value)
        if not (0 <= value <= FLOAT32_MAX):
            raise ValueError(f"{fn}: {name} must be a finite number >= 0, got {value!r} (accepted: "
                             f"[0, {FLOAT32_MAX:.3g}], finite in float32)")
    if w_sample == 0 and w_class == 0:
        raise ValueError(
            f"{fn}: w_sample and w_class must not both be 0 (the loss would be identically 0)"
        )


def _check_choice(fn: str, name: str, value, choices) -> None:
    if not (isinstance(value, str) and value in choices):
        raise ValueError(f"{fn}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_bool(fn: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be a bool, got {type(value).__name__}")


def _flatten(fn: str, student, teacher, mask) -> Prepared:
    """Check the tensors and flatten (..., C) to (N, C) rows and (...) to (N,)."""
    _check_logits_pair(fn, student, teacher)
    _check_mask(fn, mask, student)
    num_classes = student.shape[-1]
    # (N, C) inputs go to the ops as they are: a reshape would add a view node to the student's autograd graph
    # (and a backward step) for nothing, the per-call cost that matters at small shapes.
    flat = student.dim() == 2
    return Prepared(
        student=student if flat else student.reshape(-1, num_classes),
        teacher=teacher.detach() if flat else teacher.detach().reshape(-1, num_classes),
        mask=mask if mask is None or mask.dim() == 1 else mask.reshape(-1),
        lead_shape=student.shape[:-1],
    )


# --------------------------------------------------------------------------------------------------
# Per-loss entry points
# --------------------------------------------------------------------------------------------------


def prepare_ckd(fn: str, student, teacher, tau, anchor, mask, reduction) -> Prepared:
    """Validate the arguments of a CKD loss and flatten its inputs."""
    _check_positive(fn, "tau", tau)
    _check_choice(fn, "anchor", anchor, ANCHORS)
    _check_choice(fn, "reduction", reduction, REDUCTIONS)
    return _flatten(fn, student, teacher, mask)


def prepare_kd(fn: str, student, teacher, temperature, mask, reduction) -> Prepared:
    """Validate the arguments of a KD loss and flatten its inputs."""
    _check_positive(fn, "temperature", temperature)
    _check_choice(fn, "reduction", reduction, REDUCTIONS)
    return _flatten(fn, student, teacher, mask)


def prepare_divergence(fn: str, divergence, beta, alpha, scale_t2) -> Divergence:
    """Validate a KD loss's divergence arguments (ckd_ext/divergences.py states the rules)."""
    for name, value in (("beta", beta), ("alpha", alpha)):
        if value is not None:
            _check_number(fn, name, value)
    _check_bool(fn, "scale_t2", scale_t2)
    return resolve_divergence(fn, divergence, beta, alpha)


def prepare_bickd(fn: str, student, teacher, temperature, tau, w_sample, w_class, symmetric, mask,
                  reduction) -> Prepared:
    """Validate the arguments of a BicKD loss and flatten its inputs."""
    _check_positive(fn, "temperature", temperature)
    _check_positive(fn, "tau", tau)
    _check_weights(fn, w_sample, w_class)
    _check_bool(fn, "symmetric", symmetric)
    _check_choice(fn, "reduction", reduction, REDUCTIONS)
    return _flatten(fn, student, teacher, mask)


# --------------------------------------------------------------------------------------------------
# Fused-linear losses: hidden states and LM heads instead of logits
# --------------------------------------------------------------------------------------------------


class FusedLinearPrepared(NamedTuple):
    """Validated hidden states (flattened to token rows) and heads of a fused-linear loss."""

    student_hidden: Tensor            # (N, H_s), not detached
    student_weight: Tensor            # (V, H_s), not detached
    student_bias: Optional[Tensor]    # (V,) or None
    teacher_hidden: Tensor            # (N, H_t), detached
    teacher_weight: Tensor            # (V, H_t), detached
    teacher_bias: Optional[Tensor]    # (V,) or None, detached
    mask: Optional[Tensor]            # (N,) bool or None
    labels: Optional[Tensor]          # (N,) integer or None (KD only)
    lead_shape: torch.Size            # student_hidden.shape[:-1]


def _check_same_device(fn: str, name: str, value: Tensor, hidden: Tensor) -> None:
    if value.device != hidden.device:
        raise ValueError(f"{fn}: {name} must be on the same device as student_hidden ({hidden.device}), "
                         f"got {value.device}")


def _check_head(fn: str, side: str, hidden: Tensor, weight, bias, vocab: Optional[int]) -> None:
    """One model's hidden states, weight (V, H) and optional bias (V,): kinds, shapes and dtypes."""
    _check_floating_tensor(fn, f"{side}_hidden", hidden)
    _check_floating_tensor(fn, f"{side}_weight", weight)
    if hidden.dim() < 1:
        raise ValueError(f"{fn}: {side}_hidden must have at least 1 dimension (..., H), got a 0-dimensional tensor")
    if hidden.shape[-1] == 0:
        raise ValueError(f"{fn}: {side}_hidden must have a hidden size H > 0 (its last dimension), "
                         f"got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{fn}: {side}_weight must have shape (V, H) with H = {hidden.shape[-1]}, the last "
                         f"dimension of {side}_hidden, got {tuple(weight.shape)}")
    if vocab is None and weight.shape[0] == 0:
        raise ValueError(f"{fn}: student_weight must have at least one row (vocabulary V > 0), "
                         f"got {tuple(weight.shape)}")
    if vocab is not None and weight.shape[0] != vocab:
        raise ValueError(f"{fn}: teacher_weight must have the vocabulary of student_weight (V = {vocab} rows), "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        _check_floating_tensor(fn, f"{side}_bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{fn}: {side}_bias must have shape (V,) = ({weight.shape[0]},), "
                             f"got {tuple(bias.shape)}")
    for name, value in ((f"{side}_weight", weight), (f"{side}_bias", bias)):
        # nn.Linear computes in one dtype; converting a head here would copy V x H elements on every call.
        if value is not None and value.dtype != hidden.dtype:
            raise TypeError(f"{fn}: {name} must have the dtype of {side}_hidden ({hidden.dtype}), "
                            f"got {value.dtype}")


def _check_labels(fn: str, labels, hidden: Tensor) -> None:
    if labels is None:
        return
    if not isinstance(labels, Tensor) or labels.dtype not in (torch.int64, torch.int32):
        got = f"dtype {labels.dtype}" if isinstance(labels, Tensor) else type(labels).__name__
        raise TypeError(f"{fn}: labels must be a torch.Tensor of dtype torch.int64 or torch.int32, got {got}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"{fn}: labels must have the shape of student_hidden without its last dimension "
                         f"{tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}")


def _prepare_fused_linear(fn, student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
                          teacher_bias, mask, labels=None) -> FusedLinearPrepared:
    _check_head(fn, "student", student_hidden, student_weight, student_bias, None)
    _check_head(fn, "teacher", teacher_hidden, teacher_weight, teacher_bias, student_weight.shape[0])
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(f"{fn}: teacher_hidden must have the leading dimensions of student_hidden "
                         f"{tuple(student_hidden.shape[:-1])}, got {tuple(teacher_hidden.shape)}")
    for name, value in (("student_weight", student_weight), ("student_bias", student_bias),
                        ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                        ("teacher_bias", teacher_bias)):
        if value is not None:
            _check_same_device(fn, name, value, student_hidden)
    _check_mask(fn, mask, student_hidden, "student_hidden")
    _check_labels(fn, labels, student_hidden)
    if labels is not None:
        _check_same_device(fn, "labels", labels, student_hidden)

    def rows(x: Tensor) -> Tensor:
        return x.reshape(-1, x.shape[-1])

    def constant(x: Optional[Tensor]) -> Optional[Tensor]:
        return None if x is None else x.detach()

    return FusedLinearPrepared(
        student_hidden=rows(student_hidden), student_weight=student_weight, student_bias=student_bias,
        teacher_hidden=rows(teacher_hidden.detach()), teacher_weight=teacher_weight.detach(),
        teacher_bias=constant(teacher_bias), mask=None if mask is None else mask.reshape(-1),
        labels=None if labels is None else labels.reshape(-1), lead_shape=student_hidden.shape[:-1])


def prepare_fused_linear_ckd(fn, student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
                             teacher_bias, tau, anchor, mask, reduction) -> FusedLinearPrepared:
    """Validate the arguments of a fused-linear CKD loss and flatten its hidden states."""
    _check_positive(fn, "tau", tau)
    _check_choice(fn, "anchor", anchor, ANCHORS)
    _check_choice(fn, "reduction", reduction, REDUCTIONS)
    return _prepare_fused_linear(fn, student_hidden, student_weight, teacher_hidden, teacher_weight,
                                 student_bias, teacher_bias, mask)


def prepare_fused_linear_kd(fn, student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
                            teacher_bias, temperature, mask, labels, ce_weight, ignore_index,
                            reduction) -> FusedLinearPrepared:
    """Validate the arguments of a fused-linear KD (+ CE) loss and flatten its hidden states."""
    _check_positive(fn, "temperature", temperature)
    _check_number(fn, "ce_weight", ce_weight)
    if not (0 <= ce_weight <= FLOAT32_MAX):
        raise ValueError(f"{fn}: ce_weight must be a finite number >= 0, got {ce_weight!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, torch.SymInt)):
        raise TypeError(f"{fn}: ignore_index must be a Python int, got {type(ignore_index).__name__}")
    _check_choice(fn, "reduction", reduction, REDUCTIONS)
    if ce_weight != 0 and labels is None:
        raise ValueError(f"{fn}: ce_weight = {ce_weight!r} needs labels (the cross-entropy targets); pass labels "
                         f"or ce_weight=0")
    p = _prepare_fused_linear(fn, student_hidden, student_weight, teacher_hidden, teacher_weight,
                              student_bias, teacher_bias, mask, labels)
    if p.labels is not None:
        _check_label_values(fn, p.labels, p.mask, ignore_index, p.student_weight.shape[0])
    return p


def _check_label_values(fn: str, labels: Tensor, mask: Optional[Tensor], ignore_index: int, vocab: int) -> None:
    """Every label of a token that takes part (mask True) is a class in [0, V) or ignore_index; masked and ignored
    tokens' labels are never read. One reduction and one host read (a synchronisation on CUDA, which the
    alternative, a device-side assert inside the chunk loop, would turn into a dead CUDA context)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if mask is not None:
        bad &= mask
    if torch.compiler.is_compiling():  # a traced graph cannot branch on data: the same check, as a device assert
        torch._assert_async(~bad.any(), f"{fn}: labels must be class indices in [0, V) or ignore_index")
        return
    if bool(bad.any()):
        position = int(bad.nonzero()[0, 0])
        raise ValueError(f"{fn}: labels must be class indices in [0, V) = [0, {vocab}) or ignore_index "
                         f"({ignore_index}) on every token that takes part (mask True), got {int(labels[position])} "
                         f"at token {position} (of the flattened leading dimensions)")
