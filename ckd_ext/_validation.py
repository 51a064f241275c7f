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


def _check_mask(fn: str, mask, student: Tensor) -> None:
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
            f"{fn}: mask must have the shape of student without its last dimension "
            f"{tuple(lead_shape)}, got {tuple(mask.shape)}"
        )
    if mask.device != student.device:
        raise ValueError(
            f"{fn}: mask must be on the same device as student ({student.device}), got {mask.device}"
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
    return Prepared(
        student=student.reshape(-1, num_classes),
        teacher=teacher.detach().reshape(-1, num_classes),
        mask=None if mask is None else mask.reshape(-1),
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


def prepare_bickd(fn: str, student, teacher, temperature, tau, w_sample, w_class, symmetric, mask,
                  reduction) -> Prepared:
    """Validate the arguments of a BicKD loss and flatten its inputs."""
    _check_positive(fn, "temperature", temperature)
    _check_positive(fn, "tau", tau)
    _check_weights(fn, w_sample, w_class)
    _check_bool(fn, "symmetric", symmetric)
    _check_choice(fn, "reduction", reduction, REDUCTIONS)
    return _flatten(fn, student, teacher, mask)
