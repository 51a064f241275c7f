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
                            reduction, vocab_parallel=False) -> FusedLinearPrepared:
    """Validate the arguments of a fused-linear KD (+ CE) loss and flatten its hidden states. With `vocab_parallel`
    the label values are left to the caller, who knows the whole vocabulary (the heads hold a shard of it)."""
    _check_positive(fn, "temperature", temperature)
    _check_ce_arguments(fn, ce_weight, ignore_index)
    _check_choice(fn, "reduction", reduction, REDUCTIONS)
    _check_ce_needs_labels(fn, ce_weight, labels)
    p = _prepare_fused_linear(fn, student_hidden, student_weight, teacher_hidden, teacher_weight,
                              student_bias, teacher_bias, mask, labels)
    if p.labels is not None and not vocab_parallel:
        check_label_values(fn, p.labels, p.mask, ignore_index, p.student_weight.shape[0])
    return p


def check_label_values(fn: str, labels: Tensor, mask: Optional[Tensor], ignore_index: int, vocab: int) -> None:
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


# --------------------------------------------------------------------------------------------------
# Offline top-k teachers: the teacher as (ids, log-probabilities) of its k most likely classes per row
# --------------------------------------------------------------------------------------------------

TAILS = ("bucket", "renormalize", "none")
INDEX_DTYPES = (torch.int64, torch.int32)


class TopKPrepared(NamedTuple):
    """Validated inputs of a top-k KD loss over logits, flattened to rows."""

    student: Tensor                # (N, V), not detached
    teacher_ids: Tensor            # (N, k) int64 or int32; a negative id pads the row
    teacher_logprobs: Tensor       # (N, k), detached
    mask: Optional[Tensor]         # (N,) bool or None
    lead_shape: torch.Size         # student.shape[:-1]


def mass_tolerance(dtype: torch.dtype, k: int) -> float:
    """How far above 1 the top-k mass exp(logsumexp(teacher_logprobs)) may lie: the log-probabilities' own rounding.
    A log-probability l stored with unit roundoff u has exp(l) off by a factor exp(|l| u), so the mass is off by at
    most u sum_c p_c |l_c| <= u (log k + 1) (the entropy of k categories is at most log k); twice that, plus
    float32's rounding of the sum itself."""
    unit_roundoff = torch.finfo(dtype).eps / 2
    return 2.0 * unit_roundoff * (math.log(max(k, 1)) + 1.0) + 1e-6


def _check_topk_teacher(fn: str, teacher_ids, teacher_logprobs, like: Tensor, like_name: str) -> None:
    """Kinds, shapes and devices of a top-k teacher for the rows of `like` (whose last dimension is not a row's)."""
    if not isinstance(teacher_ids, Tensor) or teacher_ids.dtype not in INDEX_DTYPES:
        got = f"dtype {teacher_ids.dtype}" if isinstance(teacher_ids, Tensor) else type(teacher_ids).__name__
        raise TypeError(f"{fn}: teacher_ids must be a torch.Tensor of dtype torch.int64 or torch.int32, got {got}")
    _check_floating_tensor(fn, "teacher_logprobs", teacher_logprobs)
    lead_shape = like.shape[:-1]
    if teacher_ids.dim() != len(lead_shape) + 1 or teacher_ids.shape[:-1] != lead_shape or teacher_ids.shape[-1] == 0:
        expected = "".join(f"{n}, " for n in lead_shape) + "k"
        raise ValueError(f"{fn}: teacher_ids must have shape ({expected}) with k >= 1, the shape of {like_name} "
                         f"without its last dimension and then the k top classes, got {tuple(teacher_ids.shape)}")
    if teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError(f"{fn}: teacher_logprobs must have the shape of teacher_ids {tuple(teacher_ids.shape)}, got "
                         f"{tuple(teacher_logprobs.shape)}")
    for name, value in (("teacher_ids", teacher_ids), ("teacher_logprobs", teacher_logprobs)):
        if value.device != like.device:
            raise ValueError(f"{fn}: {name} must be on the same device as {like_name} ({like.device}), "
                             f"got {value.device}")


def check_topk_values(fn: str, teacher_ids: Tensor, teacher_logprobs: Tensor, valid: Optional[Tensor],
                      vocab: int) -> None:
    """The values of a top-k teacher (N, k) on the rows that take part (`valid`): ids in [0, V) or negative
    (padding), no id twice in a row, log-probabilities <= 0 (NaN is not) and a top-k mass <= 1 within
    mass_tolerance. Padding entries and rows that take no part are never read. One reduction per check and one read
    on the host for all of them (on CUDA one synchronisation per call; the alternative, an index out of range inside
    the chunk loop, is a device-side assert that leaves the CUDA context unusable)."""
    ids = teacher_ids.long()
    real = ids >= 0
    if valid is not None:
        real &= valid.unsqueeze(1)
    ordered = torch.where(real, ids, -1 - torch.arange(ids.shape[1], device=ids.device)).sort(dim=1).values
    tolerance = mass_tolerance(teacher_logprobs.dtype, ids.shape[1])
    logprobs = teacher_logprobs.float()
    mass = torch.where(real, logprobs, -math.inf).logsumexp(1)
    bad_rows = torch.stack([
        (real & (ids >= vocab)).any(1),
        ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any(1),
        (real & ~(logprobs <= math.log1p(tolerance))).any(1),
        mass > math.log1p(tolerance),
    ])
    if torch.compiler.is_compiling():  # a traced graph cannot branch on data: the same checks, as a device assert
        torch._assert_async(~bad_rows.any(), f"{fn}: teacher_ids / teacher_logprobs hold invalid values")
        return
    if not bool(bad_rows.any()):
        return
    check, row = [(c, int(rows.nonzero()[0, 0])) for c, rows in enumerate(bad_rows) if bool(rows.any())][0]
    where = f"at row {row} (of the flattened leading dimensions)"
    if check == 0:
        raise ValueError(f"{fn}: teacher_ids must be class indices in [0, V) = [0, {vocab}), or negative to pad a row "
                         f"with fewer than k entries, got {int(ids[row][real[row]].max())} {where}")
    if check == 1:
        raise ValueError(f"{fn}: teacher_ids must not repeat a class within a row, got {ids[row].tolist()} {where}")
    if check == 2:
        bad = logprobs[row][real[row] & ~(logprobs[row] <= math.log1p(tolerance))][0].item()
        raise ValueError(f"{fn}: teacher_logprobs must be log-probabilities (<= 0, not NaN) on every entry whose id "
                         f"is not negative, got {bad!r} {where}")
    raise ValueError(f"{fn}: teacher_logprobs must have a total probability <= 1 per row (within {tolerance:.2g} for "
                     f"{teacher_logprobs.dtype}), got {math.exp(mass[row].item()):.6g} {where}; they must be the "
                     f"teacher's log-probabilities at the loss's temperature, log_softmax(logits / temperature)")


def _check_topk_options(fn: str, temperature, tail, scale_t2, reduction) -> None:
    _check_positive(fn, "temperature", temperature)
    _check_choice(fn, "tail", tail, TAILS)
    _check_bool(fn, "scale_t2", scale_t2)
    _check_choice(fn, "reduction", reduction, REDUCTIONS)


def prepare_topk_kd(fn, student, teacher_ids, teacher_logprobs, temperature, tail, scale_t2, mask,
                    reduction) -> TopKPrepared:
    """Validate the arguments of a top-k KD loss over logits (values included) and flatten its inputs."""
    _check_topk_options(fn, temperature, tail, scale_t2, reduction)
    _check_floating_tensor(fn, "student", student)
    if student.dim() < 1 or student.shape[-1] == 0:
        raise ValueError(f"{fn}: student must have shape (..., V) with V >= 1, got {tuple(student.shape)}")
    _check_topk_teacher(fn, teacher_ids, teacher_logprobs, student, "student")
    _check_mask(fn, mask, student)
    vocab, k = student.shape[-1], teacher_ids.shape[-1]
    p = TopKPrepared(student=student.reshape(-1, vocab), teacher_ids=teacher_ids.reshape(-1, k),
                     teacher_logprobs=teacher_logprobs.detach().reshape(-1, k),
                     mask=None if mask is None else mask.reshape(-1), lead_shape=student.shape[:-1])
    check_topk_values(fn, p.teacher_ids, p.teacher_logprobs, p.mask, vocab)
    return p


class FusedLinearTopKPrepared(NamedTuple):
    """Validated inputs of a fused-linear top-k KD loss (flattened to token rows)."""

    hidden: Tensor                 # (N, H), not detached
    weight: Tensor                 # (V, H), not detached
    bias: Optional[Tensor]         # (V,) or None
    teacher_ids: Tensor            # (N, k)
    teacher_logprobs: Tensor       # (N, k), detached
    mask: Optional[Tensor]         # (N,) bool or None
    labels: Optional[Tensor]       # (N,) or None
    lead_shape: torch.Size


def _check_ce_arguments(fn, ce_weight, ignore_index) -> None:
    _check_number(fn, "ce_weight", ce_weight)
    if not (0 <= ce_weight <= FLOAT32_MAX):
        raise ValueError(f"{fn}: ce_weight must be a finite number >= 0, got {ce_weight!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, torch.SymInt)):
        raise TypeError(f"{fn}: ignore_index must be a Python int, got {type(ignore_index).__name__}")


def _check_ce_needs_labels(fn, ce_weight, labels) -> None:
    if ce_weight != 0 and labels is None:
        raise ValueError(f"{fn}: ce_weight = {ce_weight!r} needs labels (the cross-entropy targets); pass labels "
                         f"or ce_weight=0")


def prepare_fused_linear_topk_kd(fn, student_hidden, student_weight, teacher_ids, teacher_logprobs, student_bias,
                                 temperature, tail, scale_t2, mask, labels, ce_weight, ignore_index,
                                 reduction) -> FusedLinearTopKPrepared:
    """Validate the arguments of a fused-linear top-k KD (+ CE) loss (values included) and flatten its inputs."""
    _check_topk_options(fn, temperature, tail, scale_t2, reduction)
    _check_ce_arguments(fn, ce_weight, ignore_index)
    _check_ce_needs_labels(fn, ce_weight, labels)
    _check_head(fn, "student", student_hidden, student_weight, student_bias, None)
    for name, value in (("student_weight", student_weight), ("student_bias", student_bias)):
        if value is not None:
            _check_same_device(fn, name, value, student_hidden)
    _check_topk_teacher(fn, teacher_ids, teacher_logprobs, student_hidden, "student_hidden")
    _check_mask(fn, mask, student_hidden, "student_hidden")
    _check_labels(fn, labels, student_hidden)
    if labels is not None:
        _check_same_device(fn, "labels", labels, student_hidden)
    k = teacher_ids.shape[-1]
    p = FusedLinearTopKPrepared(
        hidden=student_hidden.reshape(-1, student_hidden.shape[-1]), weight=student_weight, bias=student_bias,
        teacher_ids=teacher_ids.reshape(-1, k), teacher_logprobs=teacher_logprobs.detach().reshape(-1, k),
        mask=None if mask is None else mask.reshape(-1), labels=None if labels is None else labels.reshape(-1),
        lead_shape=student_hidden.shape[:-1])
    vocab = student_weight.shape[0]
    if p.labels is not None:
        check_label_values(fn, p.labels, p.mask, ignore_index, vocab)
    valid = p.mask
    if p.labels is not None:
        labelled = p.labels != ignore_index
        valid = labelled if valid is None else valid & labelled
    check_topk_values(fn, p.teacher_ids, p.teacher_logprobs, valid, vocab)
    return p


def prepare_teacher_topk(fn, hidden, weight, k, bias, temperature, moments) -> None:
    """Validate the arguments of the top-k producer teacher_topk."""
    _check_floating_tensor(fn, "hidden", hidden)
    _check_floating_tensor(fn, "weight", weight)
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"{fn}: hidden must have shape (..., H) with H >= 1, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"{fn}: weight must have shape (V, H) with V >= 1 and H = {hidden.shape[-1]}, the last "
                         f"dimension of hidden, got {tuple(weight.shape)}")
    if bias is not None:
        _check_floating_tensor(fn, "bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{fn}: bias must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None and value.dtype != hidden.dtype:
            raise TypeError(f"{fn}: {name} must have the dtype of hidden ({hidden.dtype}), got {value.dtype}")
        if value is not None and value.device != hidden.device:
            raise ValueError(f"{fn}: {name} must be on the same device as hidden ({hidden.device}), got {value.device}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= weight.shape[0]:
        raise ValueError(f"{fn}: k must be an int in [1, V] = [1, {weight.shape[0]}], got {k!r}")
    _check_positive(fn, "temperature", temperature)
    _check_bool(fn, "moments", moments)


# --------------------------------------------------------------------------------------------------
# CKD from an offline top-k teacher: the top-k and the moments of teacher_topk(..., moments=True)
# --------------------------------------------------------------------------------------------------

MOMENT_NAMES = ("log_normalizer", "logit_sum", "logit_square_sum")


class TopKMoments(NamedTuple):
    """The teacher's per-row moments, flattened to (N,) and detached."""

    log_normalizer: Tensor    # LSE(teacher logits / temperature)
    logit_sum: Tensor         # sum_v t_v
    logit_square_sum: Tensor  # sum_v t_v^2


class TopKCKDPrepared(NamedTuple):
    """Validated inputs of a top-k CKD loss (logits: `student` is (N, V); fused-linear: (hidden, weight, bias))."""

    student: object               # (N, V) logits, or the tuple (hidden (N, H), weight (V, H), bias (V,) or None)
    teacher_ids: Tensor           # (N, k)
    teacher_logprobs: Tensor      # (N, k), detached
    moments: TopKMoments
    mask: Optional[Tensor]        # (N,) bool or None
    lead_shape: torch.Size


def _check_topk_moments(fn: str, moments, teacher_ids: Tensor, like: Tensor, like_name: str) -> None:
    for name, value in zip(MOMENT_NAMES, moments):
        if not isinstance(value, Tensor) or value.dtype not in FLOATING_DTYPES:
            got = f"dtype {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
            raise TypeError(f"{fn}: {name} must be a floating-point torch.Tensor, the teacher's per-row moment that "
                            f"teacher_topk(..., moments=True) returns, got {got}")
        if value.shape != teacher_ids.shape[:-1]:
            raise ValueError(f"{fn}: {name} must have shape {tuple(teacher_ids.shape[:-1])}, the shape of teacher_ids "
                             f"without its last dimension (one number per row), got {tuple(value.shape)}")
        if value.device != like.device:
            raise ValueError(f"{fn}: {name} must be on the same device as {like_name} ({like.device}), "
                             f"got {value.device}")


def _topk_ckd_teacher(fn, teacher_ids, teacher_logprobs, moments, mask, like, like_name, vocab):
    """The checks of the teacher and mask shared by both forms; the flattened teacher (ids, logprobs, moments)."""
    _check_topk_teacher(fn, teacher_ids, teacher_logprobs, like, like_name)
    _check_topk_moments(fn, moments, teacher_ids, like, like_name)
    _check_mask(fn, mask, like, like_name)
    k = teacher_ids.shape[-1]
    ids, logprobs = teacher_ids.reshape(-1, k), teacher_logprobs.detach().reshape(-1, k)
    flat_mask = None if mask is None else mask.reshape(-1)
    check_topk_values(fn, ids, logprobs, flat_mask, vocab)
    return ids, logprobs, TopKMoments(*(m.detach().reshape(-1) for m in moments)), flat_mask


def prepare_topk_ckd(fn, student, teacher_ids, teacher_logprobs, log_normalizer, logit_sum, logit_square_sum,
                     temperature, tau, mask, reduction) -> TopKCKDPrepared:
    """Validate the arguments of top-k CKD over logits (the teacher's values included) and flatten its inputs."""
    _check_positive(fn, "temperature", temperature)
    _check_positive(fn, "tau", tau)
    _check_choice(fn, "reduction", reduction, REDUCTIONS)
    _check_floating_tensor(fn, "student", student)
    if student.dim() < 1 or student.shape[-1] == 0:
        raise ValueError(f"{fn}: student must have shape (..., V) with V >= 1, got {tuple(student.shape)}")
    vocab = student.shape[-1]
    ids, logprobs, moments, flat_mask = _topk_ckd_teacher(
        fn, teacher_ids, teacher_logprobs, (log_normalizer, logit_sum, logit_square_sum), mask, student, "student",
        vocab)
    return TopKCKDPrepared(student.reshape(-1, vocab), ids, logprobs, moments, flat_mask, student.shape[:-1])


def prepare_fused_linear_topk_ckd(fn, student_hidden, student_weight, teacher_ids, teacher_logprobs, log_normalizer,
                                  logit_sum, logit_square_sum, student_bias, temperature, tau, mask,
                                  reduction) -> TopKCKDPrepared:
    """Validate the arguments of fused-linear top-k CKD (the teacher's values included) and flatten its inputs."""
    _check_positive(fn, "temperature", temperature)
    _check_positive(fn, "tau", tau)
    _check_choice(fn, "reduction", reduction, REDUCTIONS)
    _check_head(fn, "student", student_hidden, student_weight, student_bias, None)
    for name, value in (("student_weight", student_weight), ("student_bias", student_bias)):
        if value is not None:
            _check_same_device(fn, name, value, student_hidden)
    ids, logprobs, moments, flat_mask = _topk_ckd_teacher(
        fn, teacher_ids, teacher_logprobs, (log_normalizer, logit_sum, logit_square_sum), mask, student_hidden,
        "student_hidden", student_weight.shape[0])
    student = (student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, student_bias)
    return TopKCKDPrepared(student, ids, logprobs, moments, flat_mask, student_hidden.shape[:-1])
