"""Plain PyTorch reference implementations of the ckd_ext losses.

This module is the oracle of every test (run in float64) and the "eager" benchmark provider. It
follows ``docs/math.md`` literally and favours readability over speed and memory: it materialises
the N x N and C x C similarity matrices, normalises with ``F.normalize(eps=1e-12)`` and uses
``torch.logsumexp`` (max-shifted). Gradients come from autograd.

Common rules (see docs/math.md):

* inputs ``(..., C)`` are flattened to ``N`` rows; masked rows are dropped before anything is computed,
  so they take no part at all (not anchors, not negatives, not in column statistics);
* computation happens in float64 when the student is float64, otherwise in float32 (16-bit inputs are
  upcast); the result is returned in the student's dtype;
* the teacher is detached;
* ``n`` valid rows: ``mean`` divides row terms by ``n`` (class terms by ``C``); with ``n == 0`` every
  loss is 0 and its gradient 0.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import distributed
from ._validation import (Prepared, prepare_bickd, prepare_ckd, prepare_divergence, prepare_fused_linear_topk_ckd,
                          prepare_fused_linear_topk_kd, prepare_kd, prepare_teacher_topk, prepare_topk_ckd,
                          prepare_topk_kd)
from .divergences import Divergence, divergence_terms, resolve
from .rows import EPS, accumulation_dtype, scatter_rows

__all__ = ["kd_loss", "ckd_loss", "bickd_loss", "topk_kd_loss", "fused_linear_topk_kd_loss", "teacher_topk",
           "topk_ckd_loss", "fused_linear_topk_ckd_loss"]


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------


def _valid_rows(prepared: Prepared) -> Tuple[Tensor, Tensor]:
    """Student and teacher rows in the compute dtype, masked rows removed.

    Dropping the masked rows up front is what makes them take no part at all; indexing keeps the
    student in the autograd graph, so masked rows simply receive a zero gradient.
    """
    dtype = accumulation_dtype(prepared.student.dtype)
    student = prepared.student.to(dtype)
    teacher = prepared.teacher.to(dtype)
    if prepared.mask is not None:
        student, teacher = student[prepared.mask], teacher[prepared.mask]
    return student, teacher


def _reduce(terms: Tensor, reduction: str) -> Tensor:
    """``sum`` or ``mean`` of a 1-D tensor of terms; the mean of no term is 0 (not 0/0 = NaN)."""
    total = terms.sum()  # an empty sum is exactly 0 and has an (empty) zero gradient
    if reduction == "sum":
        return total
    return total / max(terms.shape[0], 1)


def _finish_rows(row_terms: Tensor, prepared: Prepared, reduction: str) -> Tensor:
    """Apply ``reduction`` to per-valid-row terms and return in the student's dtype."""
    if reduction == "none":
        out = scatter_rows(row_terms, prepared)
    else:
        out = _reduce(row_terms, reduction)
    return out.to(prepared.student.dtype)


def _diagonal_contrast(logits: Tensor, symmetric: bool = False) -> Tensor:
    """InfoNCE terms of a square logit matrix whose diagonal holds the positives.

        term_i = LSE_k(logits_ik) - logits_ii                       (anchor: row i)

    With ``symmetric`` each term is averaged with its column-anchored twin

        term'_k = LSE_i(logits_ik) - logits_kk                      (anchor: column k)

    For an empty (0 x 0) matrix this returns an empty vector: torch.logsumexp reduces each of the zero
    rows, it never evaluates a log-sum-exp over an empty set.
    """
    positives = logits.diagonal()
    terms = torch.logsumexp(logits, dim=1) - positives
    if symmetric:
        twin_terms = torch.logsumexp(logits, dim=0) - positives
        terms = 0.5 * (terms + twin_terms)
    return terms


# --------------------------------------------------------------------------------------------------
# KD
# --------------------------------------------------------------------------------------------------


def _kd_terms(student: Tensor, teacher: Tensor, temperature: float, divergence: Divergence = Divergence(),
              scale_t2: bool = True) -> Tensor:
    """kd_i = T^2 * D(Q_i, P_i),  P = softmax(s/T), Q = softmax(t/T), D the divergence (ckd_ext/divergences.py).

    A class with Q_ic = 0 (a teacher logit of -inf, or one that underflows) takes the limit of D: forward_kl's term
    is 0 (0 log 0 = 0) even where the student's logit is -inf too; reverse_kl's is +inf where P_ic > 0. A NaN Q (a
    teacher row without a softmax) stays NaN.
    """
    terms = divergence_terms(F.log_softmax(teacher / temperature, dim=1), F.log_softmax(student / temperature, dim=1),
                             divergence)
    return (temperature ** 2 if scale_t2 else 1.0) * terms


def kd_loss(student: Tensor, teacher: Tensor, *, temperature: float = 4.0, divergence: str = "forward_kl",
            beta: Optional[float] = None, alpha: Optional[float] = None, scale_t2: bool = True,
            mask: Optional[Tensor] = None, reduction: str = "mean", global_batch=False, group=None) -> Tensor:
    """Knowledge distillation (Hinton et al. for the default forward_kl): T^2 * D(softmax(t/T), softmax(s/T)) per
    row, D the `divergence` (ckd_ext.kd_loss states the choices); `scale_t2=False` drops the T^2.

    ``mean`` averages over the valid rows; ``none`` returns the per-row terms of shape ``(...)``.
    ``global_batch`` and ``group`` are checked and otherwise ignored (KD is row-separable).
    """
    prepared = prepare_kd("kd_loss", student, teacher, temperature, mask, reduction)
    resolved = prepare_divergence("kd_loss", divergence, beta, alpha, scale_t2)
    distributed.check_arguments("kd_loss", global_batch, group)
    student_rows, teacher_rows = _valid_rows(prepared)
    return _finish_rows(_kd_terms(student_rows, teacher_rows, temperature, resolved, scale_t2), prepared, reduction)


# --------------------------------------------------------------------------------------------------
# CKD
# --------------------------------------------------------------------------------------------------


def _ckd_terms(student: Tensor, teacher: Tensor, tau: float, anchor: str) -> Tensor:
    """Per-anchor CKD terms on L2-normalised logits u_i = t_i/|t_i|, v_i = s_i/|s_i|.

    anchor="teacher" (the authors' released code):  z_ij = <u_i, v_j>/tau,
        ckd_i = LSE_j(z_ij) - z_ii.
    anchor="student" (the paper's statement):  pos_i = <u_i, v_i>/tau, neg_ij = <v_i, v_j>/tau,
        ckd_i = LSE({pos_i} U {neg_ij : j != i}) - pos_i,
    i.e. the same InfoNCE term on the matrix V V^T / tau with its diagonal (the self-similarity,
    which is not a candidate) replaced by pos_i.
    """
    u = F.normalize(teacher, dim=1, eps=EPS)
    v = F.normalize(student, dim=1, eps=EPS)
    if anchor == "teacher":
        return _diagonal_contrast(u @ v.T / tau)
    positives = (u * v).sum(dim=1) / tau
    logits = torch.diagonal_scatter(v @ v.T / tau, positives)
    return _diagonal_contrast(logits)


def ckd_loss(student: Tensor, teacher: Tensor, *, tau: float = 1.0, anchor: str = "student",
             mask: Optional[Tensor] = None, reduction: str = "mean", global_batch=False, group=None) -> Tensor:
    """Contrastive knowledge distillation (sample-wise) on L2-normalised logits.

    Positive pair (t_i, s_i); negatives (s_i, s_j) for ``anchor="student"`` or (t_i, s_j) for
    ``anchor="teacher"``, j ranging over the other valid rows. One valid row gives 0. ``global_batch`` True or
    ``"ring"``: the rows of every rank of ``group`` (docs/distributed.md).
    """
    with distributed.global_batch_checks(global_batch, group):
        prepared = prepare_ckd("ckd_loss", student, teacher, tau, anchor, mask, reduction)
        distributed.check_arguments("ckd_loss", global_batch, group)
    if global_batch is not False:
        return distributed.run(ckd_loss, prepared, reduction=reduction, global_batch=global_batch, group=group,
                               tau=tau, anchor=anchor).to(prepared.student.dtype)
    student_rows, teacher_rows = _valid_rows(prepared)
    return _finish_rows(_ckd_terms(student_rows, teacher_rows, tau, anchor), prepared, reduction)


# --------------------------------------------------------------------------------------------------
# BicKD
# --------------------------------------------------------------------------------------------------


def _bickd_sample_terms(p: Tensor, q: Tensor, tau: float, symmetric: bool) -> Tensor:
    """Sample side, one term per valid row.

    A_ik = <P_i/|P_i|, Q_k/|Q_k|> / tau,   smp_i = LSE_k(A_ik) - A_ii   (student row i as anchor).
    """
    a = F.normalize(p, dim=1, eps=EPS) @ F.normalize(q, dim=1, eps=EPS).T / tau
    return _diagonal_contrast(a, symmetric)


def _bickd_class_terms(p: Tensor, q: Tensor, tau: float, symmetric: bool) -> Tensor:
    """Class side, one term per class, column statistics over the valid rows only.

    G_cd = <P[:, c]/|P[:, c]|, Q[:, d]/|Q[:, d]|> / tau,   cls_c = LSE_d(G_cd) - G_cc.
    """
    if p.shape[0] == 0:
        # No valid row: the class side is 0 by convention (formally every column would be the
        # clamped zero vector and cls_c = log C). Summing the empty P over its rows gives C zeros
        # that stay in the autograd graph, so backward yields a zero gradient.
        return p.sum(dim=0)
    g = F.normalize(p, dim=0, eps=EPS).T @ F.normalize(q, dim=0, eps=EPS) / tau
    return _diagonal_contrast(g, symmetric)


def bickd_loss(student: Tensor, teacher: Tensor, *, temperature: float = 4.0, tau: float = 0.1,
               w_sample: float = 1.0, w_class: float = 1.0, symmetric: bool = False,
               mask: Optional[Tensor] = None, reduction: str = "mean", global_batch=False,
               group=None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Bilateral contrastive KD (this project's definition, see docs/math.md) on P = softmax(s/T),
    Q = softmax(t/T): a row-wise (sample) and a column-wise (class) InfoNCE with diagonal positives.

        BicKD = w_sample * mean_i smp_i + w_class * mean_c cls_c            (reduction "mean")

    ``sum`` sums each side instead; ``none`` returns ``(sample_terms (...), class_terms (C,))``, each
    already multiplied by its weight (masked rows 0). ``symmetric`` averages each term with its
    teacher-anchored twin. ``global_batch`` True or ``"ring"``: the rows of every rank of ``group``
    (docs/distributed.md).
    """
    with distributed.global_batch_checks(global_batch, group):
        prepared = prepare_bickd("bickd_loss", student, teacher, temperature, tau, w_sample, w_class,
                                 symmetric, mask, reduction)
        distributed.check_arguments("bickd_loss", global_batch, group)
    if global_batch is not False:
        out = distributed.run(bickd_loss, prepared, reduction=reduction, global_batch=global_batch, group=group,
                              temperature=temperature, tau=tau, w_sample=w_sample, w_class=w_class,
                              symmetric=symmetric)
        dtype = prepared.student.dtype
        return tuple(o.to(dtype) for o in out) if reduction == "none" else out.to(dtype)
    student_rows, teacher_rows = _valid_rows(prepared)
    p = F.softmax(student_rows / temperature, dim=1)
    q = F.softmax(teacher_rows / temperature, dim=1)
    sample_terms = w_sample * _bickd_sample_terms(p, q, tau, symmetric)
    class_terms = w_class * _bickd_class_terms(p, q, tau, symmetric)
    out_dtype = prepared.student.dtype
    if reduction == "none":
        return scatter_rows(sample_terms, prepared).to(out_dtype), class_terms.to(out_dtype)
    return (_reduce(sample_terms, reduction) + _reduce(class_terms, reduction)).to(out_dtype)


# --------------------------------------------------------------------------------------------------
# KD from an offline top-k teacher (docs/math.md section 9)
# --------------------------------------------------------------------------------------------------


def _topk_row_term(log_q_all: Tensor, ids: Tensor, log_p: Tensor, divergence, tail: str) -> Tensor:
    """One row's divergence between the teacher's categories and the student's, from the student's full
    log-probabilities log_q_all (V,) and the teacher's real entries (ids (k_i,), log_p (k_i,)), padding removed:

        none          the k top classes as they are (truncated sums)
        renormalize   both renormalised over the k top classes
        bucket        the k top classes and one more, the rest of the vocabulary: 1 - P for the teacher,
                      sum over v not in S of q_v for the student (left out when S is the whole vocabulary)
    """
    log_q = log_q_all[ids]
    if tail == "none":
        return divergence_terms(log_p, log_q, divergence)
    if tail == "renormalize":
        if ids.numel() == 0:
            return log_q_all.sum() * 0  # no entry: nothing to match
        return divergence_terms(log_p - torch.logsumexp(log_p, 0), log_q - torch.logsumexp(log_q, 0), divergence)
    outside = torch.ones_like(log_q_all, dtype=torch.bool)
    outside[ids] = False
    if not bool(outside.any()):
        return divergence_terms(log_p, log_q, divergence)
    log_p_tail = torch.log((1 - log_p.exp().sum()).clamp_min(0)).reshape(1)
    log_q_tail = torch.logsumexp(log_q_all[outside], 0).reshape(1)
    return divergence_terms(torch.cat([log_p, log_p_tail]), torch.cat([log_q, log_q_tail]), divergence)


def _topk_terms(logits: Tensor, ids: Tensor, logprobs: Tensor, temperature: float, divergence, tail: str,
                scale_t2: bool) -> Tensor:
    """Per-row top-k KD terms of the rows given (N, V): the student's log-softmax materialised, a loop over rows."""
    log_q_all = F.log_softmax(logits / temperature, dim=1)
    log_p_all = logprobs.to(log_q_all.dtype)
    terms = []
    for i in range(logits.shape[0]):
        real = ids[i] >= 0
        terms.append(_topk_row_term(log_q_all[i], ids[i][real].long(), log_p_all[i][real], divergence, tail))
    scale = temperature ** 2 if scale_t2 else 1.0
    return scale * (torch.stack(terms) if terms else logits.new_zeros(0))


def topk_kd_loss(student: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, *, temperature: float = 1.0,
                 divergence: str = "forward_kl", beta=None, alpha=None, tail: str = "bucket", scale_t2: bool = True,
                 mask: Optional[Tensor] = None, reduction: str = "mean", global_batch=False, group=None) -> Tensor:
    """KD against an offline top-k teacher (ckd_ext.topk_kd_loss), materialised."""
    fn = "topk_kd_loss"
    chosen = resolve(fn, divergence, beta, alpha)
    p = prepare_topk_kd(fn, student, teacher_ids, teacher_logprobs, temperature, tail, scale_t2, mask, reduction)
    distributed.check_arguments(fn, global_batch, group)
    rows = p.student.to(accumulation_dtype(p.student.dtype))
    ids, logprobs = p.teacher_ids, p.teacher_logprobs
    if p.mask is not None:
        rows, ids, logprobs = rows[p.mask], ids[p.mask], logprobs[p.mask]
    terms = _topk_terms(rows, ids, logprobs, temperature, chosen, tail, scale_t2)
    prepared = Prepared(p.student, p.student, p.mask, p.lead_shape)
    return _finish_rows(terms, prepared, reduction)


def fused_linear_topk_kd_loss(student_hidden: Tensor, student_weight: Tensor, teacher_ids: Tensor,
                              teacher_logprobs: Tensor, *, student_bias: Optional[Tensor] = None,
                              temperature: float = 1.0, divergence: str = "forward_kl", beta=None, alpha=None,
                              tail: str = "bucket", scale_t2: bool = True, mask: Optional[Tensor] = None,
                              labels: Optional[Tensor] = None, ce_weight: float = 0.0, ignore_index: int = -100,
                              reduction: str = "mean", global_batch=False, group=None) -> Tensor:
    """ckd_ext.fused_linear_topk_kd_loss on the materialised logits hidden @ weight.T + bias: top-k KD plus
    ce_weight * cross-entropy over the tokens that take part (mask True, label not ignore_index)."""
    fn = "fused_linear_topk_kd_loss"
    chosen = resolve(fn, divergence, beta, alpha)
    p = prepare_fused_linear_topk_kd(fn, student_hidden, student_weight, teacher_ids, teacher_logprobs, student_bias,
                                     temperature, tail, scale_t2, mask, labels, ce_weight, ignore_index, reduction)
    distributed.check_arguments(fn, global_batch, group)
    dtype = accumulation_dtype(p.hidden.dtype)
    logits = F.linear(p.hidden.to(dtype), p.weight.to(dtype), None if p.bias is None else p.bias.to(dtype))
    valid = p.mask
    if p.labels is not None:
        labelled = p.labels != ignore_index
        valid = labelled if valid is None else valid & labelled
    ids, logprobs = p.teacher_ids, p.teacher_logprobs
    if valid is not None:
        logits, ids, logprobs = logits[valid], ids[valid], logprobs[valid]
    terms = _topk_terms(logits, ids, logprobs, temperature, chosen, tail, scale_t2)
    if p.labels is not None and ce_weight != 0:
        targets = p.labels if valid is None else p.labels[valid]
        terms = terms + ce_weight * F.cross_entropy(logits, targets.long(), reduction="none")
    prepared = Prepared(p.hidden, p.hidden, valid, p.lead_shape)
    return _finish_rows(terms, prepared, reduction)


def teacher_topk(hidden: Tensor, weight: Tensor, k: int, *, bias: Optional[Tensor] = None, temperature: float = 1.0,
                 moments: bool = False):
    """ckd_ext.teacher_topk on the materialised logits: (ids, log-probabilities) of the k largest logits per row,
    and with moments=True the log-normaliser LSE(logits / temperature), sum and sum of squares of the logits."""
    from .topk import TeacherTopK

    prepare_teacher_topk("teacher_topk", hidden, weight, k, bias, temperature, moments)
    dtype = accumulation_dtype(hidden.dtype)
    logits = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    log_probs = F.log_softmax(logits / temperature, dim=-1)
    values, ids = log_probs.topk(k, dim=-1)
    if not moments:
        return TeacherTopK(ids, values)
    return TeacherTopK(ids, values, torch.logsumexp(logits / temperature, dim=-1), logits.sum(-1),
                       logits.square().sum(-1))


# --------------------------------------------------------------------------------------------------
# CKD (student anchor) from an offline top-k teacher (docs/math.md 9.6)
# --------------------------------------------------------------------------------------------------


def topk_teacher_logits(ids: Tensor, logprobs: Tensor, log_normalizer: Tensor, logit_sum: Tensor, vocab: int,
                        temperature: float) -> Tensor:
    """The teacher's logit rows as the top-k teacher knows them, t~ (N, V), materialised: its raw logits
    T (l_c + LSE(t / T)) at its top-k ids, and everywhere else the mean of its other logits,
    mu = (sum_v t_v - sum_{c in S} t_c) / (V - |S|). A negative id is padding (not in S)."""
    rows = []
    for i in range(ids.shape[0]):
        real = ids[i] >= 0
        top_ids = ids[i][real].long()
        top = temperature * (logprobs[i][real] + log_normalizer[i])
        rest = vocab - top_ids.numel()
        mean = (logit_sum[i] - top.sum()) / rest if rest > 0 else logit_sum[i] * 0
        row = mean * torch.ones(vocab, dtype=top.dtype, device=top.device)
        row[top_ids] = top
        rows.append(row)
    return torch.stack(rows) if rows else logprobs.new_zeros(0, vocab)


def _topk_ckd_terms(logits: Tensor, teacher: Tensor, teacher_norms: Tensor, tau: float) -> Tensor:
    """CKD's student-anchor terms (section 4.1) with the teacher's unit row u_i replaced by t~_i / |t_i|: the
    positive <t~_i, v_i> / (|t_i| tau), the negatives <v_i, v_j> / tau exact."""
    u = teacher / teacher_norms.clamp_min(EPS).unsqueeze(1)
    v = F.normalize(logits, dim=1, eps=EPS)
    positives = (u * v).sum(dim=1) / tau
    return _diagonal_contrast(torch.diagonal_scatter(v @ v.T / tau, positives))


def _topk_ckd(logits: Tensor, p, temperature: float, tau: float, reduction: str, like: Tensor) -> Tensor:
    """The loss on the materialised student logits (N, V) of a validated top-k CKD call."""
    ids, logprobs, moments = p.teacher_ids, p.teacher_logprobs.to(logits.dtype), [m.to(logits.dtype)
                                                                                   for m in p.moments]
    if p.mask is not None:
        logits, ids, logprobs, moments = logits[p.mask], ids[p.mask], logprobs[p.mask], [m[p.mask] for m in moments]
    teacher = topk_teacher_logits(ids, logprobs, moments[0], moments[1], logits.shape[1], temperature)
    terms = _topk_ckd_terms(logits, teacher, moments[2].sqrt(), tau)
    return _finish_rows(terms, Prepared(like, like, p.mask, p.lead_shape), reduction)


def topk_ckd_loss(student: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, log_normalizer: Tensor,
                  logit_sum: Tensor, logit_square_sum: Tensor, *, temperature: float = 1.0, tau: float = 1.0,
                  mask: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """ckd_ext.topk_ckd_loss, materialised: CKD (student anchor) with the teacher row t~ of topk_teacher_logits and
    its exact norm sqrt(logit_square_sum)."""
    p = prepare_topk_ckd("topk_ckd_loss", student, teacher_ids, teacher_logprobs, log_normalizer, logit_sum,
                         logit_square_sum, temperature, tau, mask, reduction)
    return _topk_ckd(p.student.to(accumulation_dtype(p.student.dtype)), p, temperature, tau, reduction, p.student)


def fused_linear_topk_ckd_loss(student_hidden: Tensor, student_weight: Tensor, teacher_ids: Tensor,
                               teacher_logprobs: Tensor, log_normalizer: Tensor, logit_sum: Tensor,
                               logit_square_sum: Tensor, *, student_bias: Optional[Tensor] = None,
                               temperature: float = 1.0, tau: float = 1.0, mask: Optional[Tensor] = None,
                               reduction: str = "mean") -> Tensor:
    """ckd_ext.fused_linear_topk_ckd_loss on the materialised logits hidden @ weight.T + bias."""
    p = prepare_fused_linear_topk_ckd("fused_linear_topk_ckd_loss", student_hidden, student_weight, teacher_ids,
                                      teacher_logprobs, log_normalizer, logit_sum, logit_square_sum, student_bias,
                                      temperature, tau, mask, reduction)
    hidden, weight, bias = p.student
    dtype = accumulation_dtype(hidden.dtype)
    logits = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    return _topk_ckd(logits, p, temperature, tau, reduction, hidden)
