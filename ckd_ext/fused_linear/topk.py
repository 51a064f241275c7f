"""Top-k KD from hidden states and a head (the student's logits computed chunk by chunk, never N x V), and the
producer of top-k teachers (docs/math.md 9.4, 9.5)."""
from __future__ import annotations

import torch

from .. import _validation, distributed
from .. import topk as _topk
from ..custom_ops import _once_differentiable
from ..losses import _output
from ..rows import accumulation_dtype
from ..divergences import resolve
from ._common import _autocast_inputs, _chunk_logits, _fold_chunk_gradient, _gemm_operand, _without_autocast
from .kd import _cross_entropy, _valid_tokens


def _walk(inputs, ids, logprobs, valid, labels, options, want, row_weights):
    """One walk over the token chunks, as fused_linear/kd.py's: `value` the per-token terms (`want` = "terms"), their
    sum ("sum") or None; `grads` (hidden, weight, bias) of sum_i row_weights_i term_i in the accumulation dtype, or
    None when `row_weights` is None (a scalar tensor, or one weight per token)."""
    hidden, weight, bias = inputs
    temperature, divergence, tail, scale, ce_weight = options
    dtype = accumulation_dtype(hidden.dtype)
    weight_op, bias_acc = _gemm_operand(weight), None if bias is None else bias.to(dtype)
    tokens, vocab = hidden.shape[0], weight.shape[0]
    with_ce = labels is not None and ce_weight != 0
    # per row: the logits, z, the tail-masked z and its exp, the gradient (+ the softmax of cross-entropy)
    step = _topk.chunk_rows(vocab, dtype, hidden.device, _topk.LOGIT_BUFFERS + 1 + with_ce)
    value = (torch.zeros(tokens, dtype=_topk.CATEGORY_DTYPE, device=hidden.device) if want == "terms"
             else torch.zeros((), dtype=_topk.CATEGORY_DTYPE, device=hidden.device))
    grads = None
    if row_weights is not None:
        grads = (torch.zeros(tokens, hidden.shape[1], dtype=dtype, device=hidden.device),
                 torch.zeros_like(weight, dtype=dtype), None if bias is None else torch.zeros_like(bias_acc))
    for start in range(0, tokens, step):
        rows = slice(start, min(start + step, tokens))
        chunk_valid = None if valid is None else valid[rows]
        weights = None
        if row_weights is not None:
            weights = (row_weights.expand(rows.stop - rows.start) if row_weights.dim() == 0 else row_weights[rows])
        logits = _chunk_logits(hidden[rows], weight_op, bias_acc, dtype)
        teacher = _topk.teacher_chunk(ids[rows], logprobs[rows], chunk_valid, tail)
        terms, grad = _topk.chunk_loss_and_grad(logits, teacher, chunk_valid, temperature, divergence, tail, scale,
                                                weights)
        if with_ce:
            ce_terms, ce_grad = _cross_entropy(logits, labels[rows], chunk_valid)
            terms = terms + ce_weight * ce_terms.to(terms.dtype)
            if grad is not None:
                grad.add_(ce_grad.mul_(weights.to(dtype).unsqueeze(1)), alpha=ce_weight)
        del logits
        if want == "terms":
            value[rows] = terms
        elif want == "sum":
            value = value + terms.sum()
        if grads is None:
            continue
        _fold_chunk_gradient(grads, rows, grad, weight_op, hidden, chunk_valid)
    return (None if want is None else value), grads


class _FusedLinearTopKKD(torch.autograd.Function):
    """As fused_linear/kd.py's _FusedLinearKD: for "mean" and "sum" the gradients are finished during the forward (a
    ZeRO-3 gathered head gets its gradient before the gather context exits) and kept in the accumulation dtype;
    for "none" backward walks the chunks again with the upstream weights."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, logprobs, valid, labels, options, reduction, compute_grad):
        inputs = (hidden, weight, bias)
        ctx.reduction, ctx.options = reduction, options
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        out_dtype = accumulation_dtype(hidden.dtype)
        if reduction == "none":
            terms, _ = _walk(inputs, ids, logprobs, valid, labels, options, "terms", None)
            ctx.save_for_backward(hidden, weight, bias, ids, logprobs, valid, labels)
            return terms.to(out_dtype)
        scale = _topk._mean_scale(valid, hidden.shape[0], reduction, hidden.device)
        total, grads = _walk(inputs, ids, logprobs, valid, labels, options, "sum", scale if compute_grad else None)
        ctx.save_for_backward(*(grads or ()))
        return (total * scale).to(out_dtype)

    @staticmethod
    @_once_differentiable
    def backward(ctx, grad_loss):
        if ctx.reduction == "none":
            hidden, weight, bias, ids, logprobs, valid, labels = ctx.saved_tensors
            _, grads = _walk((hidden, weight, bias), ids, logprobs, valid, labels, ctx.options, None,
                             grad_loss.to(_topk.CATEGORY_DTYPE))
            out = [None if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes)]
        else:
            out = [None if g is None else (g * grad_loss).to(dt) for g, dt in zip(ctx.saved_tensors, ctx.dtypes)]
        return (out[0], out[1], out[2]) + (None,) * 7


def fused_linear_topk_kd_loss(student_hidden, student_weight, teacher_ids, teacher_logprobs, *, student_bias=None,
                              temperature=1.0, divergence="forward_kl", beta=None, alpha=None, tail="bucket",
                              scale_t2=True, mask=None, labels=None, ce_weight=0.0, ignore_index=-100,
                              reduction="mean", global_batch=False, group=None):
    """``topk_kd_loss`` on the student logits ``hidden @ weight.T + bias``, plus ``ce_weight * cross_entropy(student
    logits, labels)``, without the N x V logits: the tokens are walked in chunks whose logits fit the workspace
    budget. A token takes part (in both terms) when its mask is True and its label (if labels are given) is not
    ``ignore_index``; "mean" divides the sum over those tokens by their number. `global_batch` and `group` are
    checked and otherwise ignored: both terms are row-local."""
    fn = "fused_linear_topk_kd_loss"
    chosen = resolve(fn, divergence, beta, alpha)
    student_hidden, student_weight, student_bias = _autocast_inputs(student_hidden, student_weight, student_bias)
    with _without_autocast(student_hidden):
        p = _validation.prepare_fused_linear_topk_kd(fn, student_hidden, student_weight, teacher_ids,
                                                     teacher_logprobs, student_bias, temperature, tail, scale_t2,
                                                     mask, labels, ce_weight, ignore_index, reduction)
        distributed.check_arguments(fn, global_batch, group)
        valid = _valid_tokens(p.mask, p.labels, ignore_index)
        student = (p.hidden, p.weight, p.bias)
        compute_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in student)
        options = (float(temperature), chosen, tail, _topk.term_scale(temperature, scale_t2), float(ce_weight))
        loss = _FusedLinearTopKKD.apply(*student, p.teacher_ids, p.teacher_logprobs, valid, p.labels, options,
                                        reduction, compute_grad)
    loss = _output(loss, student_hidden)
    return loss.reshape(p.lead_shape) if reduction == "none" else loss


@torch.no_grad()
def teacher_topk(hidden, weight, k, *, bias=None, temperature=1.0, moments=False) -> _topk.TeacherTopK:
    """The producer of top-k teachers: for hidden states (..., H) and a head (V, H) (+ bias (V,)), per token the ids
    of the k largest logits (..., k) int64 in descending order and their log-probabilities at `temperature`
    (float32; float64 for float64 inputs) with the exact normaliser over the whole vocabulary; with moments=True
    also the log-normaliser LSE(logits / temperature), the sum and the sum of squares of the raw logits (...).
    Tokens are walked in chunks whose logits fit the workspace budget, never N x V. No gradient."""
    fn = "teacher_topk"
    _validation.prepare_teacher_topk(fn, hidden, weight, k, bias, temperature, moments)
    dtype = accumulation_dtype(hidden.dtype)
    lead_shape, vocab = hidden.shape[:-1], weight.shape[0]
    rows = hidden.reshape(-1, hidden.shape[-1])
    weight_op, bias_acc = _gemm_operand(weight), None if bias is None else bias.to(dtype)
    tokens = rows.shape[0]
    step = _topk.chunk_rows(vocab, dtype, hidden.device, 3)  # the logits, logits / T and logsumexp's exp
    ids = torch.empty(tokens, k, dtype=torch.int64, device=hidden.device)
    logprobs = torch.empty(tokens, k, dtype=dtype, device=hidden.device)
    stats = torch.empty(3, tokens, dtype=dtype, device=hidden.device) if moments else None
    for start in range(0, tokens, step):
        chunk = slice(start, min(start + step, tokens))
        logits = _chunk_logits(rows[chunk], weight_op, bias_acc, dtype)
        lse = torch.logsumexp(logits / temperature, dim=1)
        values, ids[chunk] = logits.topk(k, dim=1)
        logprobs[chunk] = values / temperature - lse.unsqueeze(1)
        if moments:
            stats[0, chunk], stats[1, chunk], stats[2, chunk] = lse, logits.sum(1), logits.square().sum(1)
    shape = (*lead_shape, k)
    if not moments:
        return _topk.TeacherTopK(ids.reshape(shape), logprobs.reshape(shape))
    return _topk.TeacherTopK(ids.reshape(shape), logprobs.reshape(shape), *(s.reshape(lead_shape) for s in stats))
