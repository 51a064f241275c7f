"""The similarity strips of fused-linear CKD (docs/math.md 8.1): the log-sum-exp over each anchor's negatives, walked
in anchor strips within a quarter of the workspace budget, and its backward, which recomputes each strip from the
saved log-sum-exp; on tensor cores from StripOperands (docs/math.md 8.3). ckd_ext.topk_ckd walks its rows with the
same functions."""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..custom_ops import _once_differentiable
from ..rows import accumulation_dtype
from . import split_operands
from ._common import _workspace_bytes


class StripOperands(NamedTuple):
    """The strips' rows as tensor cores multiply them (docs/math.md 8.3, "The strips on tensor cores"): the logits
    from the unit rows of the student's logit space in 16-bit parts (`logit_anchors`, `logit_candidates`; the same
    similarities as <a_i, b_j>, computed without the forms' cancellation), the coefficient products with the
    anchors and candidates themselves as 16-bit parts or rows (`anchors`, `candidates`)."""

    logit_anchors: split_operands.SplitRows
    logit_candidates: split_operands.SplitRows
    anchors: split_operands.SplitRows
    candidates: split_operands.SplitRows


def _strip_logits(anchors: Tensor, candidates: Tensor, valid: Optional[Tensor], tau: float, start: int,
                  stop: int, scales: Optional[Tuple[Tensor, Tensor]] = None,
                  operands: Optional[StripOperands] = None) -> Tensor:
    """<a_i, b_j> / tau for the anchors start..stop, times alpha_i beta_j with `scales` = (alpha, beta) (rows given
    raw, their inverse norms as scales: normalisation commutes with the GEMM, docs/math.md 6.1), from `operands`'
    logit rows where given; -inf where j == i or j is not valid."""
    if operands is not None:
        logits = split_operands.similarity(operands.logit_anchors.rows(start, stop), operands.logit_candidates)
    else:
        logits = torch.ops.ckd_ext.gemm_similarity(anchors[start:stop], candidates)
    if scales is not None:
        logits.mul_(scales[0][start:stop, None]).mul_(scales[1][None, :])
    logits.div_(tau)
    if valid is not None:
        logits = logits.masked_fill(~valid.unsqueeze(0), float("-inf"))
    logits.diagonal(offset=start).fill_(float("-inf"))
    return logits


def strip_lse(anchors: Tensor, candidates: Tensor, valid: Optional[Tensor], tau: float,
              scales: Optional[Tuple[Tensor, Tensor]] = None,
              operands: Optional[StripOperands] = None) -> Tuple[Tensor, int]:
    """(lse, strip rows): lse_i = LSE over the valid rows j != i of alpha_i beta_j <a_i, b_j> / tau (-inf without
    any; alpha = beta = 1 without `scales`), in the GEMM's accumulation dtype, walked in anchor strips whose R x N
    logits fit a quarter of the workspace budget."""
    rows = anchors.shape[0]
    dtype = accumulation_dtype(anchors.dtype)
    step = max(1, _workspace_bytes(str(anchors.device)) // max(1, 4 * rows * torch.finfo(dtype).bits // 8))
    lse = torch.empty(rows, dtype=dtype, device=anchors.device)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        lse[start:stop] = torch.logsumexp(_strip_logits(anchors, candidates, valid, tau, start, stop, scales,
                                                        operands), dim=1)
    return lse, step


def strip_lse_backward(anchors: Tensor, candidates: Tensor, valid: Optional[Tensor], tau: float, lse: Tensor,
                       grad_lse: Tensor, step: int, scales: Optional[Tuple[Tensor, Tensor]],
                       grad_anchors: Optional[Tensor], grad_candidates: Optional[Tensor],
                       operands: Optional[StripOperands] = None) -> None:
    """Adds the gradient of sum_i grad_lse_i lse_i (strip_lse's) with respect to the scaled anchors alpha_i a_i into
    `grad_anchors` and with respect to the scaled candidates beta_j b_j into `grad_candidates` (either None; they may
    be one buffer, when anchors and candidates are the same rows): d(alpha a)_i += sum_j W_ij beta_j b_j,
    d(beta b)_j += sum_i W_ij alpha_i a_i, W_ij = grad_lse_i exp(logit_ij - lse_i) / tau, recomputed strip by strip
    (with `operands`, the logits from its logit rows and the products with its anchors and candidates in parts)."""
    # Anchors without a candidate (lse = -inf) have no gradient (not 0 * NaN).
    weight = torch.where(torch.isinf(lse), torch.zeros_like(grad_lse), grad_lse) / tau
    lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    rows = anchors.shape[0]
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        logits = _strip_logits(anchors, candidates, valid, tau, start, stop, scales, operands)
        coefficients = torch.exp(logits - lse[start:stop, None]) * weight[start:stop, None]
        if grad_anchors is not None:
            anchor_coefficients = coefficients if scales is None else coefficients * scales[1][None, :]
            if operands is None:
                torch.ops.ckd_ext.gemm_product(grad_anchors[start:stop], anchor_coefficients, candidates, True)
            else:
                split_operands.product(grad_anchors[start:stop], anchor_coefficients, operands.candidates, True)
        if grad_candidates is not None:
            candidate_coefficients = coefficients if scales is None else coefficients * scales[0][start:stop, None]
            if operands is None:
                torch.ops.ckd_ext.gemm_product(grad_candidates, candidate_coefficients.T, anchors[start:stop], True)
            else:
                split_operands.product(grad_candidates, candidate_coefficients.T.contiguous(),
                                       operands.anchors.rows(start, stop), True)


class _StripLSE(torch.autograd.Function):
    """lse_i = LSE over the valid rows j != i of <a_i, b_j> / tau (-inf without any), anchor strips of bounded size;
    backward recomputes each strip from the saved lse (nothing N x N is ever held)."""

    @staticmethod
    def forward(ctx, anchors, candidates, valid, tau, operands):
        lse, step = strip_lse(anchors, candidates, valid, tau, operands=operands)
        ctx.save_for_backward(anchors, candidates, valid, lse)
        ctx.tau, ctx.step, ctx.operands = tau, step, operands
        return lse

    @staticmethod
    @_once_differentiable
    def backward(ctx, grad_lse):
        anchors, candidates, valid, lse = ctx.saved_tensors
        need_anchors, need_candidates = ctx.needs_input_grad[:2]
        grad_anchors = torch.zeros_like(anchors) if need_anchors else None
        grad_candidates = torch.zeros_like(candidates) if need_candidates else None
        strip_lse_backward(anchors, candidates, valid, ctx.tau, lse, grad_lse, ctx.step, None, grad_anchors,
                           grad_candidates, ctx.operands)
        return grad_anchors, grad_candidates, None, None, None
