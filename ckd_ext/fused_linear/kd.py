"""Fused-linear KD (and cross-entropy), token chunk by token chunk (docs/math.md 8.4)."""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _validation, distributed
from .._extension import require_extension
from ..custom_ops import _once_differentiable
from ..losses import _output
from ..rows import accumulation_dtype
from . import sharded_heads, vocab_parallel
from ._common import (_autocast_inputs, _chunk_logits, _chunk_rows, _fold_chunk_gradient, _gemm_operand,
                      _without_autocast)


def _cross_entropy(logits: Tensor, labels: Tensor, valid: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Per-row cross-entropy and its logit gradient, 0 on invalid rows (whose logits may be garbage)."""
    lse = torch.logsumexp(logits, dim=1, keepdim=True)
    # invalid rows' labels (ignore_index, anything under a False mask) need not be classes
    target = labels.unsqueeze(1) if valid is None else torch.where(valid, labels, 0).unsqueeze(1)
    terms = (lse - logits.gather(1, target)).squeeze(1)
    grad = torch.exp(logits - lse).scatter_add_(1, target, torch.full_like(target, -1, dtype=logits.dtype))
    if valid is not None:
        zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
        terms = torch.where(valid, terms, zero)
        grad = torch.where(valid.unsqueeze(1), grad, zero)
    return terms, grad


def _kd_pass(inputs, valid, labels, temperature, divergence, ce_weight, want, row_weights):
    """One walk over the token chunks (`divergence`: kd_forward's (divergence, beta, alpha, scale_t2) arguments). Returns (value, grads): `value` the per-token KD + ce_weight * CE terms (`want`
    = "terms"), their sum ("sum") or None (None); `grads` (hidden, weight, bias) of sum_i row_weights_i * term_i in the
    accumulation dtype, or None when `row_weights` is None (a scalar tensor, or one weight per token)."""
    hs, ws, bs, ht, wt, bt = inputs
    dtype = accumulation_dtype(hs.dtype)
    ws_op, wt_op = _gemm_operand(ws), _gemm_operand(wt)
    tokens, vocab = hs.shape[0], ws.shape[0]
    with_ce = labels is not None and ce_weight != 0
    # per row: both models' logits, the KD gradient and (with CE) its probabilities, in the accumulation dtype
    step = _chunk_rows(vocab * (4 if with_ce else 3) * torch.finfo(dtype).bits // 8, hs.device)
    zero = torch.zeros((), dtype=dtype, device=hs.device)
    value = torch.zeros(tokens, dtype=dtype, device=hs.device) if want == "terms" else zero.clone()
    grads = None
    if row_weights is not None:
        grads = (torch.zeros(tokens, hs.shape[1], dtype=dtype, device=hs.device),
                 torch.zeros_like(ws, dtype=dtype), None if bs is None else torch.zeros_like(bs, dtype=dtype))
    kd_reduction = "none" if want == "terms" else "sum"
    for start in range(0, tokens, step):
        rows = slice(start, min(start + step, tokens))
        chunk_valid = None if valid is None else valid[rows]
        student = _chunk_logits(hs[rows], ws_op, bs, dtype)
        teacher = _chunk_logits(ht[rows], wt_op, bt, dtype)
        kd, grad = torch.ops.ckd_ext.kd_forward(student, teacher, chunk_valid, float(temperature), *divergence,
                                                kd_reduction, grads is not None and kd_reduction == "sum")
        if with_ce:
            ce_terms, ce_grad = _cross_entropy(student, labels[rows], chunk_valid)
            kd = kd + ce_weight * (ce_terms if want == "terms" else ce_terms.sum())
            if grads is not None:
                grad = grad.add_(ce_grad, alpha=ce_weight)
        if want == "terms":
            value[rows] = kd
        elif want == "sum":
            value = value + kd
        del student, teacher
        if grads is None:
            continue
        grad = grad * (row_weights if row_weights.dim() == 0 else row_weights[rows].unsqueeze(1))
        _fold_chunk_gradient(grads, rows, grad, ws_op, hs, chunk_valid)
    return (None if want is None else value), grads


def _vocab_parallel_checks(group):
    """The argument checks of a vocabulary-parallel call run together (distributed.checked_together)."""
    return contextlib.nullcontext() if group is None else distributed.checked_together(group, communicates=True)


def _valid_tokens(mask: Optional[Tensor], labels: Optional[Tensor], ignore_index: int) -> Optional[Tensor]:
    if labels is None:
        return mask
    labelled = labels != ignore_index
    return labelled if mask is None else mask & labelled


class _FusedLinearKD(torch.autograd.Function):
    """For "mean" and "sum" the gradients are finished during the forward (the loss is almost always the last node of
    the graph) and kept in the accumulation dtype, so backward scales them and rounds once; for "none" the upstream
    weights arrive only in backward, which walks the chunks again."""

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, valid, labels, temperature, divergence, ce_weight, reduction,
                compute_grad):
        inputs = (hs, ws, bs, ht, wt, bt)
        dtype = accumulation_dtype(hs.dtype)
        ctx.reduction, ctx.temperature, ctx.divergence, ctx.ce_weight = reduction, temperature, divergence, ce_weight
        ctx.dtypes = (hs.dtype, ws.dtype, None if bs is None else bs.dtype)
        if reduction == "none":
            terms, _ = _kd_pass(inputs, valid, labels, temperature, divergence, ce_weight, "terms", None)
            ctx.save_for_backward(hs, ws, bs, ht, wt, bt, valid, labels)
            return terms
        if reduction == "mean":
            count = torch.tensor(hs.shape[0], device=hs.device) if valid is None else valid.sum()
            scale = 1.0 / count.clamp_min(1).to(dtype)  # a device tensor: no host synchronisation
        else:
            scale = torch.ones((), dtype=dtype, device=hs.device)
        total, grads = _kd_pass(inputs, valid, labels, temperature, divergence, ce_weight, "sum",
                                scale if compute_grad else None)
        ctx.save_for_backward(*(grads or ()))
        return total * scale

    @staticmethod
    @_once_differentiable  # the saved gradients are constants: a second derivative through them would be 0
    def backward(ctx, grad_loss):
        if ctx.reduction == "none":
            hs, ws, bs, ht, wt, bt, valid, labels = ctx.saved_tensors
            sharded_heads.check_not_freed_heads("fused_linear_kd_loss", ws, bs, wt, bt)
            _, grads = _kd_pass((hs, ws, bs, ht, wt, bt), valid, labels, ctx.temperature, ctx.divergence,
                                ctx.ce_weight, None, grad_loss.to(accumulation_dtype(hs.dtype)))
            out = [None if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes)]
        else:
            out = [None if g is None else (g * grad_loss).to(dt) for g, dt in zip(ctx.saved_tensors, ctx.dtypes)]
        return (out[0], out[1], out[2]) + (None,) * 10


def fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, *, student_bias=None,
                         teacher_bias=None, temperature=1.0, divergence="forward_kl", beta=None, alpha=None,
                         scale_t2=True, mask=None, labels=None, ce_weight=0.0, ignore_index=-100, reduction="mean",
                         global_batch=False, group=None, vocab_parallel_group=None):
    """``kd_loss`` (with its `divergence`, `beta`, `alpha`, `scale_t2`) on the logits ``hidden @ weight.T + bias`` of
    both models, plus ``ce_weight * cross_entropy(student
    logits, labels)``, without the N x V logits. A token takes part (in both terms) when its mask is True and its label
    (if labels are given) is not ``ignore_index``; "mean" divides the sum over those tokens by their number.
    `global_batch` and `group` are checked and otherwise ignored, as by ``kd_loss``: both terms are row-local.
    DTensor heads (FSDP2) are taken whole once per call, their gradient averaged back to the shards; with
    `vocab_parallel_group` each rank passes its shard of the vocabulary rows of both heads (docs/distributed.md)."""
    fn = "fused_linear_kd_loss"
    vocab_parallel.check_arguments(fn, vocab_parallel_group, global_batch, student_weight, teacher_weight,
                                   student_bias, teacher_bias)
    student_weight, teacher_weight, student_bias, teacher_bias = map(
        sharded_heads.full_head, (student_weight, teacher_weight, student_bias, teacher_bias))
    student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias = _autocast_inputs(
        student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias)
    with _without_autocast(student_hidden):
        loss = _fused_linear_kd(fn, student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
                                teacher_bias, temperature, (divergence, beta, alpha, scale_t2), mask, labels,
                                ce_weight, ignore_index, reduction, global_batch, group, vocab_parallel_group)
    return _output(loss, student_hidden)  # outside: under autocast the loss stays float32


def _fused_linear_kd(fn, student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
                     temperature, divergence_arguments, mask, labels, ce_weight, ignore_index, reduction, global_batch,
                     group, vocab_parallel_group):
    with _vocab_parallel_checks(vocab_parallel_group):
        p = _validation.prepare_fused_linear_kd(fn, student_hidden, student_weight, teacher_hidden, teacher_weight,
                                                student_bias, teacher_bias, temperature, mask, labels, ce_weight,
                                                ignore_index, reduction, vocab_parallel=vocab_parallel_group is not None)
        d = _validation.prepare_divergence(fn, *divergence_arguments)
        if vocab_parallel_group is not None:
            vocab_parallel.check_divergence(fn, d.name, divergence_arguments[3])
        distributed.check_arguments(fn, global_batch, group)
    require_extension()
    valid = _valid_tokens(p.mask, p.labels, ignore_index)
    if vocab_parallel_group is not None:
        loss = vocab_parallel.kd_loss(fn, p, valid, ignore_index, temperature, ce_weight, reduction,
                                      vocab_parallel_group, d.name)
        return loss.reshape(p.lead_shape) if reduction == "none" else loss
    student = (p.student_hidden, p.student_weight, p.student_bias)
    compute_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in student)
    loss = _FusedLinearKD.apply(*student, p.teacher_hidden, p.teacher_weight, p.teacher_bias, valid, p.labels,
                                float(temperature), (d.name, d.beta, d.alpha, divergence_arguments[3]),
                                float(ce_weight), reduction, compute_grad)
    return loss.reshape(p.lead_shape) if reduction == "none" else loss
