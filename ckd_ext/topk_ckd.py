"""CKD (student anchor) from an offline top-k teacher (docs/math.md 9.6): the teacher is known by its top-k ids and
log-probabilities and the moments of ``teacher_topk(..., moments=True)`` (its log-normaliser, the sum and the sum of
squares of its raw logits). CKD's student anchor reads the teacher only through |t_i| (exact, from the sum of squares)
and the positive <t_i, s_i>, which is taken with the teacher's row t~_i: its raw top-k logits on S_i and the mean
mu_i of its other logits everywhere else. The negatives <s_i, s_j> are the student's own.

The logit form walks the student-student similarities in anchor strips of the raw logits (their inverse norms as
per-row scales: no normalised copy, no N x N matrix) and computes its gradient explicitly (docs/math.md 9.6), the one
N x V tensor besides the input.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _validation
from .custom_ops import _once_differentiable
from .rows import EPS, accumulation_dtype, softplus_contrast

# The teacher's row quantities (its top-k logits, mu, the coefficients t_c - mu), the student's row statistics
# (norm, sum, gathered logits) and the positives are O(N k) numbers, formed in float64 whatever the inputs: the
# positive sum_c (t_c - mu) s_c + mu sum_v s_v adds terms of both signs that are much larger than it.
ROW_DTYPE = torch.float64


class TopKTeacherRows(NamedTuple):
    """The teacher's row t~_i = mu_i + sum_{c in S_i} (t_ic - mu_i) e_c and its exact norm, per row."""

    ids: Tensor           # (N, k) int64; padding and rows that take no part point at class 0
    coefficients: Tensor  # (N, k) t_ic - mu_i, ROW_DTYPE; 0 at padding and on rows that take no part
    tail_mean: Tensor     # (N,) mu_i, ROW_DTYPE; 0 where S_i is the whole vocabulary and on rows that take no part
    norms: Tensor         # (N,) max(sqrt(sum_v t_iv^2), eps), ROW_DTYPE


def teacher_rows(ids: Tensor, logprobs: Tensor, log_normalizer: Tensor, logit_sum: Tensor, logit_square_sum: Tensor,
                 valid: Optional[Tensor], temperature: float, vocab: int) -> TopKTeacherRows:
    """The teacher's rows from its top-k and moments: the raw top-k logits t_c = T (l_c + LSE(t / T)), the tail mean
    mu = (sum_v t_v - sum_{S} t_c) / (V - |S|) and the norm sqrt(sum_v t_v^2). Rows that take no part are never read
    into the result (NaN there gives coefficients 0, mu 0, norm 1)."""
    ids = ids.long()
    pad = ids < 0
    if valid is not None:
        pad = pad | ~valid.unsqueeze(1)
    zero = torch.zeros((), dtype=ROW_DTYPE, device=ids.device)

    def row_values(x: Tensor) -> Tensor:
        x = x.to(ROW_DTYPE)
        return x if valid is None else torch.where(valid, x, zero)

    top = (temperature * (logprobs.to(ROW_DTYPE) + row_values(log_normalizer).unsqueeze(1))).masked_fill(pad, 0.0)
    rest = vocab - (~pad).sum(1)
    tail_mean = torch.where(rest > 0, (row_values(logit_sum) - top.sum(1)) / rest.clamp_min(1).to(ROW_DTYPE), zero)
    coefficients = (top - tail_mean.unsqueeze(1)).masked_fill(pad, 0.0)
    squares = row_values(logit_square_sum)
    norms = torch.sqrt(squares).clamp_min(EPS)
    norms = torch.where(torch.isnan(squares), squares, norms)
    return TopKTeacherRows(ids.masked_fill(pad, 0), coefficients, tail_mean, norms)


def _row_chunks(vocab: int, device) -> int:
    """Rows per chunk of the row passes: two (R, V) buffers of ROW_DTYPE within the workspace budget."""
    from .topk import chunk_rows

    return chunk_rows(vocab, ROW_DTYPE, device, 2)


class _StudentStats(NamedTuple):
    norms: Tensor     # (N,) max(|s_i|, eps), ROW_DTYPE
    clamped: Tensor   # (N,) bool: |s_i| <= eps (the norm is the constant eps)
    sums: Tensor      # (N,) sum_v s_iv, ROW_DTYPE
    top: Tensor       # (N, k) s_i at the teacher's ids, ROW_DTYPE


def _student_stats(student: Tensor, ids: Tensor) -> _StudentStats:
    """Row norms, sums and the logits at the teacher's ids, a chunk of rows at a time in ROW_DTYPE. The norm is taken
    of the row scaled by a power of two that brings its largest entry below 1 (exact), so it is right up to the
    dtype's range."""
    from .fused_linear.ckd import _downscale

    rows_total, vocab = student.shape
    step = _row_chunks(vocab, student.device)
    norms = torch.empty(rows_total, dtype=ROW_DTYPE, device=student.device)
    sums, top = torch.empty_like(norms), torch.empty(ids.shape, dtype=ROW_DTYPE, device=student.device)
    for start in range(0, rows_total, step):
        rows = slice(start, min(start + step, rows_total))
        x = student[rows].to(ROW_DTYPE)
        scale = _downscale(x.abs().amax(1))
        norms[rows] = torch.linalg.vector_norm(x * scale.unsqueeze(1), dim=1) / scale
        sums[rows] = x.sum(1)
        top[rows] = x.gather(1, ids[rows])
    clamped = ~(norms > EPS)
    return _StudentStats(torch.where(clamped & ~torch.isnan(norms), EPS, norms), clamped, sums, top)


def positive_numerators(teacher: TopKTeacherRows, sums: Tensor, top: Tensor) -> Tensor:
    """<t~_i, s_i> = sum_{c in S_i} (t_c - mu_i) s_c + mu_i sum_v s_v, from the student's logits at the ids and its
    row sum (ROW_DTYPE)."""
    return (teacher.coefficients * top).sum(1) + teacher.tail_mean * sums


def _anchor_weights(grad: Tensor, valid: Optional[Tensor], rows: int, reduction: str) -> Tensor:
    """w_i of docs/math.md section 2 (ROW_DTYPE): g / n ("mean"), g ("sum"), g_i ("none"); 0 on masked rows."""
    from .topk import _mean_scale

    grad = grad.to(ROW_DTYPE)
    if reduction != "none":
        grad = grad * _mean_scale(valid, rows, reduction, grad.device)
    weights = grad.expand(rows) if grad.dim() == 0 else grad
    return weights if valid is None else torch.where(valid, weights, 0.0)


def _operand(student: Tensor, valid: Optional[Tensor]) -> Tensor:
    """The student's rows as the strip GEMMs take them: 0 on rows that take no part (they may hold NaN or inf, and
    0 * NaN would reach every row through the products), in the GEMM policy's operand dtype."""
    from .fused_linear._common import _gemm_operand

    if valid is not None:
        student = torch.where(valid.unsqueeze(1), student, torch.zeros((), dtype=student.dtype,
                                                                       device=student.device))
    return _gemm_operand(student)


class _TopKCKD(torch.autograd.Function):
    """Forward: per-row terms softplus(LSE_{j != i} <v_i, v_j> / tau - pos_i). Backward (docs/math.md 9.6): the
    negatives' part of dv from the strips (anchors and candidates the same raw rows, their inverse norms as scales),
    the positive's part beta_i t~_i / (|t_i| tau) (a constant and k entries per row), then the normalisation's
    backward ds = (dv - <dv, v> v) / |s|, one N x V buffer throughout."""

    @staticmethod
    def forward(ctx, student, ids, logprobs, log_normalizer, logit_sum, logit_square_sum, valid, temperature, tau,
                reduction):
        from .fused_linear.strips import strip_lse

        operand = _operand(student, valid)
        teacher = teacher_rows(ids, logprobs, log_normalizer, logit_sum, logit_square_sum, valid, temperature,
                               student.shape[1])
        stats = _student_stats(operand, teacher.ids)
        positives = positive_numerators(teacher, stats.sums, stats.top) / (teacher.norms * stats.norms * tau)
        inverse = (1.0 / stats.norms).to(accumulation_dtype(student.dtype))
        lse, step = strip_lse(operand, operand, valid, tau, (inverse, inverse))
        terms = softplus_contrast(lse.to(ROW_DTYPE), positives)
        if valid is not None:
            terms = torch.where(valid, terms, 0.0)
        ctx.save_for_backward(student, ids, logprobs, log_normalizer, logit_sum, logit_square_sum, valid, lse,
                              positives)
        ctx.args = (temperature, tau, reduction, step)
        if reduction == "none":
            return terms.to(accumulation_dtype(student.dtype))
        unit = torch.ones((), dtype=ROW_DTYPE, device=student.device)
        return (terms * _anchor_weights(unit, valid, student.shape[0], reduction)).sum().to(
            accumulation_dtype(student.dtype))

    @staticmethod
    @_once_differentiable
    def backward(ctx, grad_loss):
        from .fused_linear.strips import strip_lse_backward

        student, ids, logprobs, log_normalizer, logit_sum, logit_square_sum, valid, lse, positives = ctx.saved_tensors
        temperature, tau, reduction, step = ctx.args
        rows_total, vocab = student.shape
        dtype = accumulation_dtype(student.dtype)
        operand = _operand(student, valid)
        teacher = teacher_rows(ids, logprobs, log_normalizer, logit_sum, logit_square_sum, valid, temperature, vocab)
        stats = _student_stats(operand, teacher.ids)
        weights = _anchor_weights(grad_loss, valid, rows_total, reduction)
        # d term_i / d lse_i = sigmoid(lse_i - pos_i) = 1 - pi+_i (0 without negatives, lse = -inf), and
        # d term_i / d pos_i = -(1 - pi+_i): no cancellation where the positive dominates (docs/math.md 6.2)
        negatives = weights * torch.sigmoid(lse.to(ROW_DTYPE) - positives)
        inverse = (1.0 / stats.norms).to(dtype)
        grad = torch.zeros(rows_total, vocab, dtype=dtype, device=student.device)  # dv, then ds
        strip_lse_backward(operand, operand, valid, tau, lse, negatives.to(dtype), step, (inverse, inverse), grad,
                           grad)
        positive = -negatives / (teacher.norms * tau)  # d pos_i / d v_i = t~_i / (|t_i| tau)
        grad.add_((positive * teacher.tail_mean).to(dtype).unsqueeze(1))
        grad.scatter_add_(1, teacher.ids, (positive.unsqueeze(1) * teacher.coefficients).to(dtype))
        # v = s / |s|: ds = (dv - <dv, s> s / |s|^2) / |s|; where the clamp is active, ds = dv / eps
        step_rows = _row_chunks(vocab, student.device)
        for start in range(0, rows_total, step_rows):
            rows = slice(start, min(start + step_rows, rows_total))
            x = operand[rows].to(ROW_DTYPE)
            along = (grad[rows].to(ROW_DTYPE) * x).sum(1) / stats.norms[rows].square()
            along = torch.where(stats.clamped[rows], 0.0, along)
            grad[rows] = ((grad[rows].to(ROW_DTYPE) - along.unsqueeze(1) * x)
                          / stats.norms[rows].unsqueeze(1)).to(dtype)
        return grad.to(student.dtype), *(None,) * 9


def topk_ckd_loss(student, teacher_ids, teacher_logprobs, log_normalizer, logit_sum, logit_square_sum, *,
                  temperature=1.0, tau=1.0, mask=None, reduction="mean"):
    """CKD with the student anchor (``ckd_loss(..., anchor="student")``) against an offline top-k teacher
    (docs/math.md 9.6): `student` logits (..., V); the teacher's `teacher_ids` (..., k) (negative ids pad),
    `teacher_logprobs` (..., k) at `temperature`, and its moments (...): `log_normalizer` LSE(logits / temperature),
    `logit_sum` and `logit_square_sum` of its raw logits, in the order ``teacher_topk(..., moments=True)`` returns
    them (``topk_ckd_loss(student, *teacher)``). The negatives <s_i, s_j> are exact; the teacher's norm is exact; the
    positive takes the teacher's logits outside its top k at their mean (exact for k = V or a constant tail).
    Returns a scalar, or the per-row terms (...) for reduction="none"."""
    from .losses import _output

    fn = "topk_ckd_loss"
    p = _validation.prepare_topk_ckd(fn, student, teacher_ids, teacher_logprobs, log_normalizer, logit_sum,
                                     logit_square_sum, temperature, tau, mask, reduction)
    loss = _TopKCKD.apply(p.student, p.teacher_ids, p.teacher_logprobs, *p.moments, p.mask, float(temperature),
                          float(tau), reduction)
    loss = _output(loss, student)
    return loss.reshape(p.lead_shape) if reduction == "none" else loss
