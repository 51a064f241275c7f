"""Vocabulary-parallel heads (Megatron-style, docs/math.md 8.5, docs/distributed.md): each rank of
`vocab_parallel_group` holds a contiguous shard of the vocabulary rows of both heads (in rank order; shares may be
unequal, not empty) and the same hidden states, mask and labels. Every rank returns the same loss, the full
gradient of its hidden states (as the replicated input of a column-parallel linear gets it) and the gradient of its
own head rows.

    KD:  per token chunk, the shard logits; one all-reduce (max) of both models' row maxima and one (sum) of the
         per-shard sums the divergence needs; the logit gradient of a shard needs nothing more. The hidden states'
         gradient is a sum over shards: one all-reduce of N x H_s per call.
    CKD: the heads' Gram matrices are sums over the vocabulary, so one all-reduce of the K x K blocks (and one of the
         two heads' magnitudes, which scale them); the rest is the single-process computation on every rank.

What every rank must agree on travels in the first collective (distributed.gather_layout's signature), so a rank
called differently gets the same ValueError as the others instead of a hang.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _validation, distributed
from ..custom_ops import _once_differentiable
from ..rows import accumulation_dtype
from . import sharded_heads
from ._common import _chunk_logits, _chunk_rows, _fold_chunk_gradient, _gemm_operand, _workspace_bytes

# The divergences the vocabulary-parallel KD computes (a subset of ckd_ext.divergences.DIVERGENCES).
DIVERGENCES = ("forward_kl",)


def check_arguments(fn: str, group, global_batch, *tensors) -> None:
    """`group` is None or a ProcessGroup; not combined with a global batch; the heads are plain local shards, not
    DTensors."""
    if group is None:
        return
    if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(f"{fn}: vocab_parallel_group must be a torch.distributed.ProcessGroup or None, "
                        f"got {type(group).__name__}")
    if global_batch is not False:
        raise ValueError(f"{fn}: vocab_parallel_group cannot be combined with global_batch={global_batch!r} yet; "
                         f"pass global_batch=False")
    if any(sharded_heads.is_dtensor(t) for t in tensors):
        raise ValueError(f"{fn}: with vocab_parallel_group the heads must be this rank's local shards (plain "
                         f"tensors, e.g. weight.to_local()), got a DTensor")


def _checksum(values: Optional[Tensor]) -> int:
    """An int64 fingerprint of an integer or bool tensor (positions weighted, wrapping), -1 for None: ranks holding
    different labels or masks compute different losses."""
    if values is None:
        return -1
    flat = values.reshape(-1).to(torch.int64)
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.int64, device=flat.device) * 2654435761
    return int((flat * weights).sum() ^ flat.numel())


def shard_layout(fn: str, p, group, fields: tuple) -> distributed.Layout:
    """Every rank's vocabulary share (`counts`, rank order), after checking that all ranks agree on `fields` and on
    what the shards must share: the tokens, hidden widths, dtypes, which biases are given and the workspace budget
    (it sizes the chunks, hence the number of collectives). SIGNATURE_SLOTS leaves room for 5 `fields`."""
    hs, ht = p.student_hidden, p.teacher_hidden
    signature = distributed.Signature(fn, why="the vocabulary shards compute one loss", fields=(
        ("the number of tokens N", hs.shape[0]), ("student_hidden's dtype", hs.dtype),
        ("teacher_hidden's dtype", ht.dtype), ("student_hidden's width H_s", hs.shape[1]),
        ("teacher_hidden's width H_t", ht.shape[1]),
        ("student_bias, teacher_bias (given or None)", 2 * (p.student_bias is not None) + (p.teacher_bias is not None)),
        ("the workspace budget (ckd_ext.workspace_bytes())", _workspace_bytes(str(hs.device)))) + fields)
    return distributed.gather_layout(p.student_weight.shape[0], hs.device, group, signature)


class _SumOverShards(torch.autograd.Function):
    """sum over the vocabulary shards of per-shard partial sums (one all-reduce of all of them). Backward: the
    identity, because every rank computes the same loss from the summed values and so already holds the whole
    gradient w.r.t. them (an all-reduce of it would count it `world` times)."""

    @staticmethod
    def forward(ctx, group, *partials):
        flat = distributed.all_reduce(torch.cat([t.reshape(-1) for t in partials]), group)
        return tuple(piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in partials]), partials))

    @staticmethod
    def backward(ctx, *grads):
        return (None,) + grads


def sum_over_shards(partials: Tuple[Tensor, ...], group) -> Tuple[Tensor, ...]:
    return _SumOverShards.apply(group, *partials)


def max_over_shards(values: Tensor, group) -> Tensor:
    """Elementwise max over the ranks, no autograd (the heads' magnitudes that set their power-of-two scales)."""
    return distributed.all_reduce(values.detach().clone(), group, dist.ReduceOp.MAX)


def ckd_layout(fn: str, p, tau, anchor, reduction, group) -> distributed.Layout:
    return shard_layout(fn, p, group, (("tau", float(tau)), ("anchor", anchor), ("reduction", reduction),
                                       ("mask (a checksum)", _checksum(p.mask))))


class ForwardKL:
    """T^2 KL(Q || P) (docs/math.md 3) from shard statistics. Per row, with maxima m_s, m_t of the raw logits over
    the whole vocabulary, the all-reduced sums are
        S_s = sum e^((s - m_s)/T),  S_t = sum e^((t - m_t)/T),  A = sum e^((t - m_t)/T) (t - s)/T
    and kd = T^2 (A / S_t - LSE(t/T) + LSE(s/T)), LSE(x/T) = m/T + log S. The logit gradient T (P - Q) needs only
    the two log-sum-exps. A divergence is a class of this shape: the sums it needs, its terms, its logit gradient."""

    width = 3  # sums per row

    @staticmethod
    def partial_sums(student: Tensor, teacher: Tensor, maxima: Tensor, temperature: float) -> Tensor:
        p = torch.exp((student - maxima[:, :1]) / temperature)
        q = torch.exp((teacher - maxima[:, 1:]) / temperature)
        # 0 * log 0 = 0: a teacher logit of -inf takes no part (its difference would be -inf or NaN)
        gap = torch.where(q > 0, (teacher - student) / temperature, torch.zeros((), dtype=q.dtype, device=q.device))
        return torch.stack([p.sum(1), q.sum(1), (q * gap).sum(1)], dim=1)

    @staticmethod
    def log_normalisers(maxima: Tensor, sums: Tensor, temperature: float) -> Tensor:
        return maxima[:, :2] / temperature + torch.log(sums[:, :2])

    @classmethod
    def terms(cls, maxima: Tensor, sums: Tensor, temperature: float) -> Tensor:
        lse = cls.log_normalisers(maxima, sums, temperature)
        return temperature ** 2 * (sums[:, 2] / sums[:, 1] - lse[:, 1] + lse[:, 0])

    @classmethod
    def logit_gradient(cls, student: Tensor, teacher: Tensor, maxima: Tensor, sums: Tensor,
                       temperature: float) -> Tensor:
        lse = cls.log_normalisers(maxima, sums, temperature)
        return temperature * (torch.exp(student / temperature - lse[:, :1])
                              - torch.exp(teacher / temperature - lse[:, 1:]))


_DIVERGENCE_CLASSES = {"forward_kl": ForwardKL}


def check_divergence(fn: str, name: str, scale_t2: bool) -> None:
    """The divergences (and the T^2 factor) the vocabulary-parallel KD computes."""
    divergence_of(fn, name)
    if scale_t2 is not True:
        raise ValueError(f"{fn}: with vocab_parallel_group scale_t2 must be True (the T^2 factor), got {scale_t2!r}")


def divergence_of(fn: str, name: str):
    if name not in _DIVERGENCE_CLASSES:
        raise ValueError(f"{fn}: with vocab_parallel_group the divergence must be one of "
                         f"{', '.join(map(repr, DIVERGENCES))}, got {name!r}")
    return _DIVERGENCE_CLASSES[name]


def _kd_pass(inputs, valid, labels, layout, group, divergence, temperature, ce_weight, want, row_weights):
    """One walk over the token chunks, every rank in step (the same chunks: the budget and the largest shard are the
    same on every rank). Returns (value, grads) as kd._kd_pass: `value` the per-token terms ("terms"), their sum
    ("sum") or None; `grads` (hidden, weight shard, bias shard) of sum_i row_weights_i * term_i, the hidden
    gradient summed over the shards, or None when `row_weights` is None."""
    hs, ws, bs, ht, wt, bt = inputs
    dtype = accumulation_dtype(hs.dtype)
    ws_op, wt_op = _gemm_operand(ws), _gemm_operand(wt)
    tokens, shard = hs.shape[0], ws.shape[0]
    offset = layout.offset(layout.rank)
    with_ce = labels is not None and ce_weight != 0
    step = _chunk_rows(max(layout.counts) * (4 if with_ce else 3) * torch.finfo(dtype).bits // 8, hs.device)
    zero = torch.zeros((), dtype=dtype, device=hs.device)
    value = torch.zeros(tokens, dtype=dtype, device=hs.device) if want == "terms" else zero.clone()
    grads = None
    if row_weights is not None:
        grads = (torch.zeros(tokens, hs.shape[1], dtype=dtype, device=hs.device),
                 torch.zeros_like(ws, dtype=dtype), None if bs is None else torch.zeros_like(bs, dtype=dtype))
    for start in range(0, tokens, step):
        rows = slice(start, min(start + step, tokens))
        student = _chunk_logits(hs[rows], ws_op, bs, dtype)
        teacher = _chunk_logits(ht[rows], wt_op, bt, dtype)
        maxima = distributed.all_reduce(torch.stack([student.amax(dim=1), teacher.amax(dim=1)], dim=1), group,
                                        dist.ReduceOp.MAX)
        # A row whose maximum is not finite (-inf everywhere: an empty vocabulary; inf; NaN) is shifted by 0
        finite_maxima = torch.where(torch.isfinite(maxima), maxima, zero)
        sums = [divergence.partial_sums(student, teacher, finite_maxima, temperature)]
        if with_ce:
            local = labels[rows] - offset
            owned = (local >= 0) & (local < shard)
            label_logit = student.gather(1, torch.where(owned, local, 0).unsqueeze(1)).squeeze(1)
            sums.append(torch.exp(student - finite_maxima[:, :1]).sum(1, keepdim=True))
            sums.append(torch.where(owned, label_logit, zero).unsqueeze(1))
        sums = distributed.all_reduce(torch.cat(sums, dim=1), group)
        terms = divergence.terms(finite_maxima, sums, temperature)
        if with_ce:
            ce_lse = finite_maxima[:, 0] + torch.log(sums[:, divergence.width])
            terms = terms + ce_weight * (ce_lse - sums[:, divergence.width + 1])
        chunk_valid = None if valid is None else valid[rows]
        if chunk_valid is not None:
            terms = torch.where(chunk_valid, terms, zero)
        if want == "terms":
            value[rows] = terms
        elif want == "sum":
            value = value + terms.sum()
        if grads is None:
            continue
        grad = divergence.logit_gradient(student, teacher, finite_maxima, sums, temperature)
        if with_ce:
            grad = grad.add_(torch.exp(student - ce_lse.unsqueeze(1)), alpha=ce_weight)
            grad.scatter_add_(1, torch.where(owned, local, 0).unsqueeze(1),
                              torch.where(owned, torch.full((), -ce_weight, dtype=dtype, device=grad.device),
                                          zero).unsqueeze(1))
        grad = grad * (row_weights if row_weights.dim() == 0 else row_weights[rows].unsqueeze(1))
        if chunk_valid is not None:  # the gradient's formulas read the masked rows' (garbage) logits
            grad = torch.where(chunk_valid.unsqueeze(1), grad, zero)
        _fold_chunk_gradient(grads, rows, grad, ws_op, hs, chunk_valid)
    if grads is not None:
        grads = (distributed.all_reduce(grads[0], group),) + grads[1:]
    return (None if want is None else value), grads


class _VocabParallelKD(torch.autograd.Function):
    """As kd._FusedLinearKD: for "mean" and "sum" the gradients are finished during the forward; for "none" backward
    walks the chunks again (with their collectives: every rank must run it) with the upstream weights."""

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, valid, labels, layout, group, divergence, temperature, ce_weight,
                reduction, compute_grad):
        inputs = (hs, ws, bs, ht, wt, bt)
        dtype = accumulation_dtype(hs.dtype)
        ctx.args = (layout, group, divergence, temperature, ce_weight)
        ctx.reduction = reduction
        ctx.dtypes = (hs.dtype, ws.dtype, None if bs is None else bs.dtype)
        if reduction == "none":
            terms, _ = _kd_pass(inputs, valid, labels, *ctx.args, "terms", None)
            ctx.save_for_backward(hs, ws, bs, ht, wt, bt, valid, labels)
            return terms
        if reduction == "mean":
            count = torch.tensor(hs.shape[0], device=hs.device) if valid is None else valid.sum()
            scale = 1.0 / count.clamp_min(1).to(dtype)
        else:
            scale = torch.ones((), dtype=dtype, device=hs.device)
        total, grads = _kd_pass(inputs, valid, labels, *ctx.args, "sum", scale if compute_grad else None)
        ctx.save_for_backward(*(grads or ()))
        return total * scale

    @staticmethod
    @_once_differentiable
    def backward(ctx, grad_loss):
        if ctx.reduction == "none":
            hs, ws, bs, ht, wt, bt, valid, labels = ctx.saved_tensors
            sharded_heads.check_not_freed_heads("fused_linear_kd_loss", ws, bs, wt, bt)
            _, grads = _kd_pass((hs, ws, bs, ht, wt, bt), valid, labels, *ctx.args, None,
                                grad_loss.to(accumulation_dtype(hs.dtype)))
            out = [None if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes)]
        else:
            out = [None if g is None else (g * grad_loss).to(dt) for g, dt in zip(ctx.saved_tensors, ctx.dtypes)]
        return (out[0], out[1], out[2]) + (None,) * 12


def _taking_part(valid: Optional[Tensor], labels: Optional[Tensor]) -> Optional[Tensor]:
    """Which tokens take part and their labels, -1 elsewhere (None: every token, no labels)."""
    if labels is None:
        return valid
    return labels if valid is None else torch.where(valid, labels, -1)


def kd_loss(fn, p, valid, ignore_index, temperature, ce_weight, reduction, group, divergence="forward_kl"):
    """The vocabulary-parallel fused-linear KD (+ CE) on validated inputs `p` (labels not yet checked against the
    vocabulary, which only the shards' layout gives)."""
    kind = divergence_of(fn, divergence)
    layout = shard_layout(fn, p, group, (
        ("temperature", float(temperature)), ("ce_weight", float(ce_weight)), ("reduction", reduction),
        ("divergence", divergence),
        ("mask, labels and ignore_index (a checksum of the labels of the tokens that take part)",
         _checksum(_taking_part(valid, p.labels)))))
    if p.labels is not None:
        _validation.check_label_values(fn, p.labels, p.mask, ignore_index, layout.total)
    student = (p.student_hidden, p.student_weight, p.student_bias)
    compute_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in student)
    return _VocabParallelKD.apply(*student, p.teacher_hidden, p.teacher_weight, p.teacher_bias, valid, p.labels,
                                  layout, group, kind, float(temperature), float(ce_weight), reduction, compute_grad)
