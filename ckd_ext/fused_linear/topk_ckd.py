"""Fused-linear CKD (student anchor) from an offline top-k teacher (docs/math.md 9.6): the negatives through the
student head's Gram matrix G_ss exactly as fused_linear_ckd_loss (8.1), the positive from the k gathered student head
rows per token and the head's column sums; no teacher model, no N x V logits, no N x N matrix."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _validation
from .. import topk_ckd as _topk_ckd
from .._extension import require_extension
from ..custom_ops import _once_differentiable
from ..losses import _output
from ..rows import accumulation_dtype, reduce_row_terms
from . import sharded_heads
from ._common import _autocast_inputs, _chunk_rows, _without_autocast
from .ckd import (FORMS_DTYPE, _downscale, _Grams, _HeadGrams, _TeacherSide, _head_magnitude, _hidden_rows,
                  _strip_dtype, local_terms)


def _gathered_rows(weight: Tensor, bias, ids: Tensor, dtype: torch.dtype) -> Tensor:
    """[W | b] at the ids (R, k) as (R, k, K_s) in `dtype`."""
    rows = weight[ids].to(dtype)
    return rows if bias is None else torch.cat([rows, bias[ids].to(dtype).unsqueeze(-1)], -1)


class _TopKHeadProjection(torch.autograd.Function):
    """P~_i = c_s B_s^T t~_i = c_s (sum_{c in S_i} (t_ic - mu_i) B_s[c] + mu_i colsum(B_s)) (N x K_s, `dtype`), so that
    <t~_i, s'_j> = <P~_i, hs_j> (as pt of 8.1 for a dense teacher), with B_s = [W_s | b_s]. Walked in token chunks
    whose gathered (R, k, K_s) head rows fit a quarter of the workspace budget; backward gathers them again (nothing
    N x k x K_s is kept): dB_s[c] += c_s (t_ic - mu_i) dP~_i at each id, and c_s sum_i mu_i dP~_i on every row."""

    @staticmethod
    def forward(ctx, weight, bias, ids, coefficients, tail_mean, scale, dtype):
        width = weight.shape[1] + (bias is not None)
        step = _chunk_rows(4 * ids.shape[1] * width * torch.finfo(dtype).bits // 8, weight.device)
        column_sums = weight.sum(0, dtype=dtype)
        if bias is not None:
            column_sums = torch.cat([column_sums, bias.sum(0, dtype=dtype).reshape(1)])
        out = tail_mean.to(dtype).unsqueeze(1) * column_sums
        for start in range(0, ids.shape[0], step):
            rows = slice(start, min(start + step, ids.shape[0]))
            gathered = _gathered_rows(weight, bias, ids[rows], dtype)
            out[rows] += torch.bmm(coefficients[rows].to(dtype).unsqueeze(1), gathered).squeeze(1)
        ctx.save_for_backward(weight, bias, ids, coefficients, tail_mean, scale)
        ctx.dtype, ctx.step = dtype, step
        return out * scale

    @staticmethod
    @_once_differentiable
    def backward(ctx, grad_projection):
        weight, bias, ids, coefficients, tail_mean, scale = ctx.saved_tensors
        sharded_heads.check_not_freed_heads("fused_linear_topk_ckd_loss", weight, bias, None, None)
        need_weight, need_bias = ctx.needs_input_grad[:2]
        if not (need_weight or need_bias):
            return (None,) * 7
        accumulation = accumulation_dtype(weight.dtype)
        grad = grad_projection.to(ctx.dtype) * scale
        every_row = tail_mean.to(ctx.dtype) @ grad  # the column sums' gradient reaches every row of the head
        width = weight.shape[1]
        grad_weight = every_row[:width].to(accumulation).expand_as(weight).clone()
        grad_bias = None if bias is None else every_row[width].to(accumulation).expand(bias.shape[0]).clone()
        for start in range(0, ids.shape[0], ctx.step):
            rows = slice(start, min(start + ctx.step, ids.shape[0]))
            flat_ids = ids[rows].reshape(-1)
            contributions = (coefficients[rows].to(ctx.dtype).unsqueeze(2) * grad[rows].unsqueeze(1)).reshape(
                flat_ids.shape[0], -1).to(accumulation)
            grad_weight.index_add_(0, flat_ids, contributions[:, :width])
            if grad_bias is not None:
                grad_bias.index_add_(0, flat_ids, contributions[:, width])
        return ((grad_weight.to(weight.dtype) if need_weight else None),
                (grad_bias.to(bias.dtype) if need_bias and bias is not None else None), None, None, None, None, None)


def fused_linear_topk_ckd_loss(student_hidden, student_weight, teacher_ids, teacher_logprobs, log_normalizer,
                               logit_sum, logit_square_sum, *, student_bias=None, temperature=1.0, tau=1.0, mask=None,
                               reduction="mean"):
    """``topk_ckd_loss`` on the student logits ``hidden @ weight.T + bias`` without the logits (docs/math.md 9.6):
    hidden states (..., H_s), head (V, H_s) as in ``nn.Linear``, bias (V,); the teacher as ``topk_ckd_loss`` takes
    it (``fused_linear_topk_ckd_loss(hidden, weight, *teacher_topk(..., moments=True))``). Work O(V K_s^2 + N k K_s
    + N^2 K_s), memory O(N K_s + K_s^2) beyond the inputs, K_s = H_s (+ 1 with a bias). For "mean" and "sum" every
    gradient is finished during the forward (a gathered head may be freed before backward), as in
    ``fused_linear_ckd_loss``."""
    fn = "fused_linear_topk_ckd_loss"
    student_weight, student_bias = map(sharded_heads.full_head, (student_weight, student_bias))
    student_hidden, student_weight, student_bias = _autocast_inputs(student_hidden, student_weight, student_bias)
    with _without_autocast(student_hidden):
        p = _validation.prepare_fused_linear_topk_ckd(fn, student_hidden, student_weight, teacher_ids,
                                                      teacher_logprobs, log_normalizer, logit_sum, logit_square_sum,
                                                      student_bias, temperature, tau, mask, reduction)
        require_extension()  # the GEMM policy's ops and the workspace budget are the extension's

        def compute(hidden, weight, bias):
            return _fused_linear_topk_ckd(hidden, weight, bias, p, float(temperature), float(tau), reduction)

        inputs = p.student
        loss = compute(*inputs) if reduction == "none" else sharded_heads.finish_in_forward(compute, inputs)
    return _output(loss, student_hidden)


def _fused_linear_topk_ckd(hidden, weight, bias, p, temperature, tau, reduction):
    dtype = accumulation_dtype(hidden.dtype)
    # the student head's scale (8.1, "Scaling"); there is no teacher head (its slot's scale is 1)
    magnitudes = torch.stack([_head_magnitude(weight, bias), torch.zeros((), device=weight.device)]).to(FORMS_DTYPE)
    head_scales = _downscale(magnitudes)
    student_gram, cross, teacher_gram = _HeadGrams.apply(weight, bias, None, None, head_scales, FORMS_DTYPE, None)
    grams = _Grams(student_gram, cross, teacher_gram, head_scales)
    teacher = _topk_ckd.teacher_rows(p.teacher_ids, p.teacher_logprobs, *p.moments, p.mask, temperature,
                                     weight.shape[0])
    projection = _TopKHeadProjection.apply(weight, bias, teacher.ids, teacher.coefficients, teacher.tail_mean,
                                           head_scales[0], FORMS_DTYPE)
    rows = _hidden_rows(hidden, bias is not None, FORMS_DTYPE, p.mask)
    terms = local_terms(rows, _TeacherSide(projection, teacher.norms), grams, tau, "student", p.mask, dtype,
                        _strip_dtype(hidden))
    return reduce_row_terms(terms, p, reduction)
