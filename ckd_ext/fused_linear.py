"""Fused-linear CKD and KD: the losses of ``ckd_ext.ckd_loss`` / ``kd_loss`` on the logits ``hidden @ weight.T + bias``
of two language-model heads, without ever holding the N x V logits (nor an N x N matrix).

    fused_linear_ckd_loss   exact through the heads' Gram matrix: CKD depends on the logits only through inner
                            products and norms of their rows, and every logit row lies in the span of the heads'
                            columns, so the rows are expressed in an orthonormal basis of that span (N x K rows,
                            K = H_s + H_t + biases) and handed to the fused ``ckd_loss`` (docs/math.md, section 8).
    fused_linear_kd_loss    row-separable: the tokens are walked in chunks, both models' logits of one chunk are
                            computed into a bounded buffer, the fused KD op (and cross-entropy) gives the chunk's
                            logit gradient, which is folded into the hidden / weight / bias gradients at once.

Both are Python orchestration over ATen GEMMs and the ckd_ext ops, so they run wherever those run (CPU, CUDA, the
emulated CUDA backend). They assume a linear head: with logit soft-capping or any non-linear head, compute the logits
and call ``ckd_loss`` / ``kd_loss``.
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from . import _validation, distributed
from ._extension import require_extension
from .rows import accumulation_dtype
from .settings import workspace_bytes
from .custom_ops import _once_differentiable
from .losses import _output, ckd_loss

__all__ = ["fused_linear_ckd_loss", "fused_linear_kd_loss"]

HALF_DTYPES = (torch.float16, torch.bfloat16)
# The Gram matrix squares the heads' condition number, so it and everything derived from it (its factor, the
# projections' coefficients, the head-gradient product) run in float64; they are K x K or V x K, small next to
# the N x N x K work of the loss, which runs in float32 (float64 for float64 inputs) inside ckd_loss.
GRAM_DTYPE = torch.float64
# Regularisation of the Gram matrix before its Cholesky factorisation, relative to its largest diagonal entry. It
# makes rank-deficient heads (H_s + H_t > V, or a student head shared with the teacher) factorise, and it changes an
# inner product of logits by at most REGULARISATION * max|column|^2 * |h|^2 (docs/math.md 8.3): directions of the
# heads whose squared singular value is below 1e-12 of the largest are left out (a float32 logit carries a rounding
# error of 6e-8 of |h| |w| already). Where the float64 rounding of G exceeds it (Cholesky fails), an
# eigendecomposition with the same threshold takes over.
REGULARISATION = 1e-12


@torch.compiler.assume_constant_result
def _workspace_bytes(device: str) -> int:
    # A constant for torch.compile (which cannot trace the pybind11 call): a graph is specialised to the budget.
    return workspace_bytes(device)


def _chunk_rows(row_bytes: int, device: torch.device) -> int:
    """Rows of one work buffer whose rows take `row_bytes` each, within the ops' workspace budget on `device`."""
    return max(1, _workspace_bytes(str(device)) // max(row_bytes, 1))


# --------------------------------------------------------------------------------------------------
# CKD through the heads' Gram matrix
# --------------------------------------------------------------------------------------------------

def _head_columns(student_weight, student_bias, teacher_weight, teacher_bias) -> List[Tensor]:
    """The columns of B = [W_s | b_s | W_t | b_t] (V x K) as 2-D blocks: a bias is one more hidden column, whose
    hidden value is 1."""
    blocks = [student_weight]
    if student_bias is not None:
        blocks.append(student_bias.unsqueeze(1))
    blocks.append(teacher_weight)
    if teacher_bias is not None:
        blocks.append(teacher_bias.unsqueeze(1))
    return blocks


def _vocabulary_chunks(blocks: List[Tensor]) -> Iterator[Tuple[slice, Tensor]]:
    """(rows, B[rows] in GRAM_DTYPE) over the vocabulary, one reused buffer of a quarter of the workspace budget."""
    vocab, width = blocks[0].shape[0], sum(b.shape[1] for b in blocks)
    step = min(vocab, _chunk_rows(4 * width * torch.finfo(GRAM_DTYPE).bits // 8, blocks[0].device))
    buffer = torch.empty(step, width, dtype=GRAM_DTYPE, device=blocks[0].device)
    for start in range(0, vocab, step):
        rows = slice(start, min(start + step, vocab))
        chunk, column = buffer[:rows.stop - start], 0
        for b in blocks:
            chunk[:, column:column + b.shape[1]].copy_(b[rows])
            column += b.shape[1]
        yield rows, chunk


def _orthonormal_coordinates(blocks: List[Tensor], split: int) -> Tuple[Tensor, Tensor]:
    """(M, X): X (K x K) such that Q = B X has orthonormal columns spanning span(B), and M = B^T Q = G X, the
    coordinates of B's columns in that basis (G = B^T B). X = L^-T for the Cholesky factor L of G + delta I, so that
    M = (L L^T - delta I) L^-T = L - delta X; where that factorisation fails, an eigendecomposition with a threshold."""
    width = sum(b.shape[1] for b in blocks)
    gram = torch.zeros(width, width, dtype=GRAM_DTYPE, device=blocks[0].device)
    for _, chunk in _vocabulary_chunks(blocks):
        # G is symmetric: the rows above `split` (the student's: [B_s^T B_s | B_s^T B_t]) and the diagonal block below
        # it (B_t^T B_t) only, a fifth fewer multiply-adds at H_t = 2 H_s; the rest is mirrored below
        gram[:split].addmm_(chunk[:, :split].T, chunk)
        gram[split:, split:].addmm_(chunk[:, split:].T, chunk[:, split:])
    gram[split:, :split] = gram[:split, split:].T
    delta = REGULARISATION * gram.diagonal().amax().clamp_min(torch.finfo(GRAM_DTYPE).tiny)
    factor, info = torch.linalg.cholesky_ex(gram + delta * torch.eye(width, dtype=GRAM_DTYPE, device=gram.device))
    if torch.compiler.is_compiling() or not bool(info.any()):
        del gram
        basis = torch.linalg.inv_ex(factor)[0].T  # L^-T (L is triangular: no pivoting needed)
        return factor.addcmul_(basis, delta, value=-1.0), basis
    # Only where delta is below the rounding of G (a head far larger than any LM head): the null space by threshold.
    values, vectors = torch.linalg.eigh(gram)
    basis = vectors * torch.where(values > delta, values.clamp_min(delta).rsqrt(), torch.zeros_like(values))
    return gram @ basis, basis


def _project(hidden: Tensor, coefficients: Tensor, with_bias: bool, dtype: torch.dtype) -> Tensor:
    """[hidden, 1] @ coefficients (rows H (+1 for the bias) x K), in `dtype`."""
    c = coefficients.to(dtype)
    h = hidden.to(dtype)
    return torch.addmm(c[-1], h, c[:-1]) if with_bias else h @ c


class _GramProjection(torch.autograd.Function):
    """(S Q, T Q): both models' logit rows in an orthonormal basis Q = B X of span(B) (N x K each).

    Inner products and norms of rows, all that CKD reads, are those of the logits. The gradient is exact with Q held
    constant, because dL/dS is a combination of rows of S and T, which lie in span(Q): dL/dS = g Q^T for the
    gradient g of the projected rows, so dL/dh_s = g (Q^T B_s) and dL/dB_s = Q g^T [h_s, 1] = B (X g^T [h_s, 1])."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                mask):
        blocks = _head_columns(student_weight, student_bias, teacher_weight, teacher_bias)
        student_width = student_weight.shape[1] + (student_bias is not None)
        coefficients, basis = _orthonormal_coordinates(blocks, student_width)  # row k: B's column k in the basis
        student_coefficients = coefficients[:student_width]
        dtype = accumulation_dtype(student_hidden.dtype)
        student_rows = _project(student_hidden, student_coefficients, student_bias is not None, dtype)
        teacher_rows = _project(teacher_hidden, coefficients[student_width:], teacher_bias is not None, dtype)
        ctx.mark_non_differentiable(teacher_rows)
        ctx.with_bias = student_bias is not None
        ctx.save_for_backward(student_hidden, student_weight, student_bias, teacher_weight, teacher_bias, mask,
                              student_coefficients, basis)
        return student_rows, teacher_rows

    @staticmethod
    def backward(ctx, grad_rows, _grad_teacher_rows):
        (student_hidden, student_weight, student_bias, teacher_weight, teacher_bias, mask, student_coefficients,
         basis) = ctx.saved_tensors
        dtype = grad_rows.dtype
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = grad_weight = grad_bias = None
        coefficients = student_coefficients.to(dtype)
        if need_hidden:
            weights = coefficients[:-1] if ctx.with_bias else coefficients
            grad_hidden = (grad_rows @ weights.T).to(student_hidden.dtype)
        if need_weight or need_bias:
            hidden = student_hidden.to(dtype)
            if mask is not None:  # masked rows may hold NaN or inf: 0 * NaN would reach every weight
                hidden = torch.where(mask.unsqueeze(1), hidden, torch.zeros((), dtype=dtype, device=hidden.device))
            # (X g^T [h_s, 1]) in float64: X is as large as 1/sqrt(smallest eigenvalue of G); B X is not.
            combination = basis @ (grad_rows.T @ hidden).to(GRAM_DTYPE)
            if ctx.with_bias:
                combination = torch.cat([combination, basis @ grad_rows.sum(0).to(GRAM_DTYPE).unsqueeze(1)], dim=1)
            width = student_weight.shape[1]
            grad_weight = torch.empty_like(student_weight)
            grad_bias = torch.empty_like(student_bias) if ctx.with_bias else None
            blocks = _head_columns(student_weight, student_bias, teacher_weight, teacher_bias)
            for rows, chunk in _vocabulary_chunks(blocks):
                head_grad = chunk @ combination
                grad_weight[rows] = head_grad[:, :width]
                if grad_bias is not None:
                    grad_bias[rows] = head_grad[:, width]
            grad_weight = grad_weight if need_weight else None
            grad_bias = grad_bias if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def fused_linear_ckd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, *, student_bias=None,
                          teacher_bias=None, tau=1.0, anchor="student", mask=None, reduction="mean",
                          global_batch=False, group=None):
    """``ckd_loss(student_hidden @ student_weight.T + student_bias, teacher_hidden @ teacher_weight.T + teacher_bias)``
    without the logits: loss and gradients (hidden, weight, bias of the student) equal those of the logit loss.

    Hidden states (..., H_s) and (..., H_t) with the same leading dimensions; weights (V, H) as in ``nn.Linear``;
    biases (V,). Work O(V K^2 + N^2 K) for K = H_s + H_t (+ 1 per bias), memory O(N K + K^2) beyond the inputs.
    `global_batch` / `group` as for ``ckd_loss`` (docs/distributed.md): the K-wide rows in the heads' basis are what
    is gathered or passed between ranks (the basis comes from the heads alone, which DDP keeps identical on every
    rank), so a global batch costs N K per rank, not N V."""
    p = _validation.prepare_fused_linear_ckd("fused_linear_ckd_loss", student_hidden, student_weight, teacher_hidden,
                                             teacher_weight, student_bias, teacher_bias, tau, anchor, mask, reduction)
    distributed.check_arguments("fused_linear_ckd_loss", global_batch, group)
    require_extension()  # before the Gram work, not at the ckd_loss call after it
    student_rows, teacher_rows = _GramProjection.apply(p.student_hidden, p.student_weight, p.student_bias,
                                                       p.teacher_hidden, p.teacher_weight, p.teacher_bias, p.mask)
    loss = ckd_loss(student_rows, teacher_rows, tau=tau, anchor=anchor, mask=p.mask, reduction=reduction,
                    global_batch=global_batch, group=group)
    loss = _output(loss, student_hidden)
    return loss.reshape(p.lead_shape) if reduction == "none" else loss


# --------------------------------------------------------------------------------------------------
# KD (and cross-entropy), token chunk by token chunk
# --------------------------------------------------------------------------------------------------

def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """hidden @ weight.T + bias for one chunk, `weight` / `bias` already in the accumulation dtype (a 16-bit CPU
    matmul would round its output to 16 bits)."""
    h = hidden.to(weight.dtype)
    return h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)


def _cross_entropy(logits: Tensor, labels: Tensor, valid: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Per-row cross-entropy and its logit gradient, 0 on invalid rows (whose logits may be garbage)."""
    lse = torch.logsumexp(logits, dim=1, keepdim=True)
    target = labels.clamp_min(0).unsqueeze(1)  # ignored rows' labels (ignore_index < 0) are not valid indices
    terms = (lse - logits.gather(1, target)).squeeze(1)
    grad = torch.exp(logits - lse).scatter_add_(1, target, torch.full_like(target, -1, dtype=logits.dtype))
    if valid is not None:
        zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
        terms = torch.where(valid, terms, zero)
        grad = torch.where(valid.unsqueeze(1), grad, zero)
    return terms, grad


def _kd_pass(inputs, valid, labels, temperature, ce_weight, want, row_weights):
    """One walk over the token chunks. Returns (value, grads): `value` the per-token KD + ce_weight * CE terms (`want`
    = "terms"), their sum ("sum") or None (None); `grads` (hidden, weight, bias) of sum_i row_weights_i * term_i in the
    accumulation dtype, or None when `row_weights` is None (a scalar tensor, or one weight per token)."""
    hs, ws, bs, ht, wt, bt = inputs
    dtype = accumulation_dtype(hs.dtype)
    ws_acc, bs_acc = ws.to(dtype), None if bs is None else bs.to(dtype)
    wt_acc, bt_acc = wt.to(dtype), None if bt is None else bt.to(dtype)
    tokens, vocab = hs.shape[0], ws.shape[0]
    with_ce = labels is not None and ce_weight != 0
    # per row: both models' logits, the KD gradient and (with CE) its probabilities, in the accumulation dtype
    step = _chunk_rows(vocab * (4 if with_ce else 3) * torch.finfo(dtype).bits // 8, hs.device)
    zero = torch.zeros((), dtype=dtype, device=hs.device)
    value = torch.zeros(tokens, dtype=dtype, device=hs.device) if want == "terms" else zero.clone()
    grads = None
    if row_weights is not None:
        grads = (torch.zeros(tokens, hs.shape[1], dtype=dtype, device=hs.device),
                 torch.zeros_like(ws_acc), None if bs is None else torch.zeros_like(bs_acc))
    kd_reduction = "none" if want == "terms" else "sum"
    for start in range(0, tokens, step):
        rows = slice(start, min(start + step, tokens))
        chunk_valid = None if valid is None else valid[rows]
        student = _chunk_logits(hs[rows], ws_acc, bs_acc)
        teacher = _chunk_logits(ht[rows], wt_acc, bt_acc)
        kd, grad = torch.ops.ckd_ext.kd_forward(student, teacher, chunk_valid, float(temperature), kd_reduction,
                                                grads is not None and kd_reduction == "sum")
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
        hidden = hs[rows].to(dtype)
        if chunk_valid is not None:  # masked rows may hold NaN or inf: 0 * NaN would reach every weight
            hidden = torch.where(chunk_valid.unsqueeze(1), hidden, zero)
        grads[0][rows] = grad @ ws_acc
        grads[1].addmm_(grad.T, hidden)
        if grads[2] is not None:
            grads[2].add_(grad.sum(0))
    return (None if want is None else value), grads


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
    def forward(ctx, hs, ws, bs, ht, wt, bt, valid, labels, temperature, ce_weight, reduction, compute_grad):
        inputs = (hs, ws, bs, ht, wt, bt)
        dtype = accumulation_dtype(hs.dtype)
        ctx.reduction, ctx.temperature, ctx.ce_weight = reduction, temperature, ce_weight
        ctx.dtypes = (hs.dtype, ws.dtype, None if bs is None else bs.dtype)
        if reduction == "none":
            terms, _ = _kd_pass(inputs, valid, labels, temperature, ce_weight, "terms", None)
            ctx.save_for_backward(hs, ws, bs, ht, wt, bt, valid, labels)
            return terms
        if reduction == "mean":
            count = torch.tensor(hs.shape[0], device=hs.device) if valid is None else valid.sum()
            scale = 1.0 / count.clamp_min(1).to(dtype)  # a device tensor: no host synchronisation
        else:
            scale = torch.ones((), dtype=dtype, device=hs.device)
        total, grads = _kd_pass(inputs, valid, labels, temperature, ce_weight, "sum",
                                scale if compute_grad else None)
        ctx.save_for_backward(*(grads or ()))
        return total * scale

    @staticmethod
    @_once_differentiable  # the saved gradients are constants: a second derivative through them would be 0
    def backward(ctx, grad_loss):
        if ctx.reduction == "none":
            hs, ws, bs, ht, wt, bt, valid, labels = ctx.saved_tensors
            _, grads = _kd_pass((hs, ws, bs, ht, wt, bt), valid, labels, ctx.temperature, ctx.ce_weight, None,
                                grad_loss.to(accumulation_dtype(hs.dtype)))
            out = [None if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes)]
        else:
            out = [None if g is None else (g * grad_loss).to(dt) for g, dt in zip(ctx.saved_tensors, ctx.dtypes)]
        return (out[0], out[1], out[2]) + (None,) * 9


def fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, *, student_bias=None,
                         teacher_bias=None, temperature=1.0, mask=None, labels=None, ce_weight=0.0, ignore_index=-100,
                         reduction="mean", global_batch=False, group=None):
    """``kd_loss`` on the logits ``hidden @ weight.T + bias`` of both models, plus ``ce_weight * cross_entropy(student
    logits, labels)``, without the N x V logits. A token takes part (in both terms) when its mask is True and its label
    (if labels are given) is not ``ignore_index``; "mean" divides the sum over those tokens by their number.
    `global_batch` and `group` are checked and otherwise ignored, as by ``kd_loss``: both terms are row-local."""
    fn = "fused_linear_kd_loss"
    p = _validation.prepare_fused_linear_kd(fn, student_hidden, student_weight, teacher_hidden, teacher_weight,
                                            student_bias, teacher_bias, temperature, mask, labels, ce_weight,
                                            ignore_index, reduction)
    distributed.check_arguments(fn, global_batch, group)
    require_extension()
    valid = _valid_tokens(p.mask, p.labels, ignore_index)
    student = (p.student_hidden, p.student_weight, p.student_bias)
    compute_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in student)
    loss = _FusedLinearKD.apply(*student, p.teacher_hidden, p.teacher_weight, p.teacher_bias, valid, p.labels,
                                float(temperature), float(ce_weight), reduction, compute_grad)
    loss = _output(loss, student_hidden)
    return loss.reshape(p.lead_shape) if reduction == "none" else loss
