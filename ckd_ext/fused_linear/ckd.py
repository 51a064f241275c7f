"""Fused-linear CKD through the heads' bilinear forms (docs/math.md 8)."""
from __future__ import annotations

import dataclasses
import weakref
from typing import Iterator, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import _validation, distributed
from .._extension import require_extension
from ..custom_ops import _once_differentiable
from ..losses import _output
from ..rows import EPS, accumulation_dtype, reduce_row_terms, scatter_rows, softplus_contrast
from . import sharded_heads, split_operands, vocab_parallel
from ._common import _autocast_inputs, _chunk_rows, _gemm_converts, _without_autocast
from .strips import StripOperands, _StripLSE

# The bilinear forms of fused-linear CKD (the heads' K x K Gram matrices, the N x K products with them, the row norms
# and positives) run in float64 for every input dtype (the Gram matrices of 16-bit heads on tensor cores come exactly
# from int8 GEMMs, _exact_gram): a form [h_i, 1]^T G [h_j, 1] sums terms as large as
# |h_i| |G| |h_j|, and for nearly collinear head columns they cancel to a far smaller inner product, so its rounding
# is the product of both rows' cancellation ratios where materialised logits suffer their sum (measured: float32
# forms gave 10x the float32 logits' gradient error at a head condition number of 1e5, float64 forms the same). They
# are O(V K^2 + N K^2) next to the N^2 K similarity strips, which run in the accumulation dtype, or on tensor cores
# for 16-bit inputs (StripOperands). Tensor-core forms (fp32-accumulated Gram or products, 16-bit splits) were
# measured against float64 and lose u32 R_i R_j: worse than materialised 16-bit logits beyond cancellation ratios
# R ~ 50 (docs/math.md 8.3).
FORMS_DTYPE = torch.float64




def _head_columns(weight: Tensor, bias: Optional[Tensor]) -> List[Tensor]:
    """The columns of one head B = [W | b] (V x (H + 1)) as 2-D blocks: a bias is one more hidden column, whose
    hidden value is 1."""
    return [weight] if bias is None else [weight, bias.unsqueeze(1)]


def _downscale(magnitude: Tensor) -> Tensor:
    """A power of two that brings `magnitude` (>= 0) below 1 where it is 1 or more, else 1; NaN where it is not
    finite. Exact, so scaling a row or a head by it changes no bit beyond the exponent (CKD is invariant to a positive
    scale of a logit row, and of all rows of one model at once)."""
    _, exponent = torch.frexp(magnitude)
    scale = torch.ldexp(torch.ones_like(magnitude), -exponent.clamp_min(0))
    return torch.where(torch.isfinite(magnitude), scale, torch.full_like(magnitude, float("nan")))


def _vocabulary_chunks(student: List[Tensor], teacher: List[Tensor], scales: Optional[Tensor], dtype: torch.dtype,
                       entry_bytes: Optional[int] = None) -> Iterator[Tuple[slice, Tensor]]:
    """(rows, [c_s B_s | c_t B_t][rows] in `dtype`; [B_s | B_t] as they are without `scales`) over the vocabulary,
    one reused buffer of a quarter of the workspace budget (`entry_bytes`: what the caller holds per entry of a
    chunk, its size by default)."""
    blocks = student + teacher
    vocab, width = blocks[0].shape[0], sum(b.shape[1] for b in blocks)
    split = sum(b.shape[1] for b in student)
    entry_bytes = torch.finfo(dtype).bits // 8 if entry_bytes is None else entry_bytes
    step = min(vocab, _chunk_rows(4 * width * entry_bytes, blocks[0].device))
    buffer = torch.empty(step, width, dtype=dtype, device=blocks[0].device)
    for start in range(0, vocab, step):
        rows = slice(start, min(start + step, vocab))
        chunk, column = buffer[:rows.stop - start], 0
        for b in blocks:
            chunk[:, column:column + b.shape[1]].copy_(b[rows])
            column += b.shape[1]
        if scales is not None:
            chunk[:, :split].mul_(scales[0])
            chunk[:, split:].mul_(scales[1])
        yield rows, chunk


class _HeadGrams(torch.autograd.Function):
    """(G_ss, G_ts, G_tt) = (B_s^T B_s, B_t^T B_s, B_t^T B_t) of the scaled heads B_s = c_s [W_s | b_s],
    B_t = c_t [W_t | b_t], accumulated in `dtype` over vocabulary chunks (K x K each, never V x K beyond a chunk;
    16-bit heads on tensor cores: exactly, from int8 GEMMs of their slices, _exact_gram).
    Backward: dB_s = B_s (dG_ss + dG_ss^T) + B_t dG_ts, times c_s, chunk by chunk; the teacher gets nothing.
    Without a teacher head (teacher_weight None: the top-k teacher, docs/math.md 9.6) G_ts and G_tt are empty
    (0 x K_s, 0 x 0) and only G_ss is formed."""

    @staticmethod
    def forward(ctx, student_weight, student_bias, teacher_weight, teacher_bias, scales, dtype, cached_teacher_gram):
        student = _head_columns(student_weight, student_bias)
        teacher = [] if teacher_weight is None else _head_columns(teacher_weight, teacher_bias)
        split = sum(b.shape[1] for b in student)
        width = split + sum(b.shape[1] for b in teacher)
        operand_dtype = _tensor_core_dtype(student + teacher)
        if operand_dtype is not None:  # 16-bit heads on tensor cores: exactly, from int8 slices
            gram = _exact_gram(student, teacher, scales, operand_dtype, cached_teacher_gram is None)
        else:
            gram = torch.zeros(width, width, dtype=dtype, device=student_weight.device)
            for _, chunk in _vocabulary_chunks(student, teacher, scales, dtype):
                # The student's rows [G_ss | G_st] and (unless cached) the teacher's diagonal block; G_ts is G_st^T.
                # Products of the GEMM policy (counted; float64 operands: float64 GEMMs).
                gram[:split].add_(torch.ops.ckd_ext.gemm_similarity(chunk[:, :split].T, chunk.T))
                if teacher and cached_teacher_gram is None:
                    gram[split:, split:].add_(torch.ops.ckd_ext.gemm_similarity(chunk[:, split:].T,
                                                                                chunk[:, split:].T))
        student_gram = gram[:split, :split].clone()
        cross_gram = gram[:split, split:].T.contiguous()
        teacher_gram = gram[split:, split:].clone() if cached_teacher_gram is None else cached_teacher_gram.clone()
        ctx.mark_non_differentiable(teacher_gram)
        ctx.dtype, ctx.split = dtype, split
        ctx.save_for_backward(student_weight, student_bias, teacher_weight, teacher_bias, scales)
        return student_gram, cross_gram, teacher_gram

    @staticmethod
    def backward(ctx, grad_student_gram, grad_cross_gram, _grad_teacher_gram):
        student_weight, student_bias, teacher_weight, teacher_bias, scales = ctx.saved_tensors
        sharded_heads.check_not_freed_heads("fused_linear_ckd_loss", student_weight, student_bias, teacher_weight,
                                            teacher_bias)
        need_weight, need_bias = ctx.needs_input_grad[:2]
        if not (need_weight or need_bias):
            return (None,) * 7
        split = ctx.split
        teacher_width = 0 if teacher_weight is None else teacher_weight.shape[1] + (teacher_bias is not None)
        if grad_student_gram is None:
            grad_student_gram = torch.zeros(split, split, dtype=ctx.dtype, device=student_weight.device)
        if grad_cross_gram is None:
            grad_cross_gram = torch.zeros(teacher_width, split, dtype=ctx.dtype, device=student_weight.device)
        combination = torch.cat([grad_student_gram + grad_student_gram.T, grad_cross_gram]) * scales[0]
        grad_weight = torch.empty_like(student_weight)
        grad_bias = torch.empty_like(student_bias) if student_bias is not None else None
        width = student_weight.shape[1]
        student = _head_columns(student_weight, student_bias)
        teacher = [] if teacher_weight is None else _head_columns(teacher_weight, teacher_bias)
        operand_dtype = _tensor_core_dtype(student + teacher)
        if operand_dtype is not None:
            # The 16-bit heads as they are, the combination (with the heads' scales folded into its rows) in three
            # 16-bit parts: tensor-core GEMMs whose error is fp32's (docs/math.md 8.3), not float64's rate.
            scaled = combination * _column_scales(scales, split, combination.shape[0]).unsqueeze(1)
            parts = split_operands.split(scaled.T, operand_dtype, HEAD_GRADIENT_PARTS)
            chunks = ((rows, split_operands.similarity(split_operands.as_they_are(chunk), parts))
                      for rows, chunk in _vocabulary_chunks(student, teacher, None, operand_dtype))
        else:
            chunks = ((rows, _chunk_product(chunk, combination))
                      for rows, chunk in _vocabulary_chunks(student, teacher, scales, ctx.dtype))
        for rows, head_grad in chunks:
            grad_weight[rows] = head_grad[:, :width]
            if grad_bias is not None:
                grad_bias[rows] = head_grad[:, width]
        return (grad_weight if need_weight else None), (grad_bias if need_bias else None), None, None, None, None, None


# The head gradient's combination of Gram gradients in 16-bit parts on tensor cores: three (2^-24, fp32's unit).
HEAD_GRADIENT_PARTS = 3
# What the exact Gram holds per entry of a vocabulary chunk: the 16-bit copy, the fp32 remainder and its truncation,
# the int8 slices (split_operands.int8_slices).
_EXACT_GRAM_ENTRY_BYTES = 2 + 4 + 4 + split_operands.INT8_SLICES


def _exact_gram(student: List[Tensor], teacher: List[Tensor], scales: Tensor, dtype: torch.dtype,
                teacher_block: bool) -> Tensor:
    """The student's rows [G_ss | G_st] of the scaled heads' Gram matrix and, with `teacher_block`, G_tt (K x K,
    float64) from int8 tensor-core GEMMs of the 16-bit heads' slices (docs/math.md 8.3): exact up to each entry's
    bits past 35 below its column's largest (one scale per column over the whole vocabulary)."""
    blocks = student + teacher
    split = sum(b.shape[1] for b in student)
    width = split + sum(b.shape[1] for b in teacher)
    device = blocks[0].device
    exponents = split_operands.int8_exponents(torch.cat([b.detach().abs().amax(0).float() for b in blocks]))
    gram = torch.zeros(width, width, dtype=torch.float64, device=device)
    for _, chunk in _vocabulary_chunks(student, teacher, None, dtype, _EXACT_GRAM_ENTRY_BYTES):
        slices = split_operands.int8_slices(chunk, exponents)
        gram[:split].add_(split_operands.exact_gram_block([x[:, :split] for x in slices], slices))
        if teacher and teacher_block:
            teacher_slices = [x[:, split:] for x in slices]
            gram[split:, split:].add_(split_operands.exact_gram_block(teacher_slices, teacher_slices))
    column_scale = torch.ldexp(_column_scales(scales, split, width), exponents.to(device))
    return gram * column_scale.unsqueeze(1) * column_scale.unsqueeze(0)


def _column_scales(scales: Tensor, split: int, width: int) -> Tensor:
    """The heads' scales per column of B = [B_s | B_t]: c_s for the first `split`, c_t for the rest."""
    return torch.cat([scales[0].expand(split), scales[1].expand(width - split)])


def _chunk_product(chunk: Tensor, combination: Tensor) -> Tensor:
    head_grad = chunk.new_empty(chunk.shape[0], combination.shape[1])
    torch.ops.ckd_ext.gemm_product(head_grad, chunk, combination, False)
    return head_grad


def _tensor_core_dtype(blocks: List[Tensor]) -> Optional[torch.dtype]:
    """The heads' 16-bit dtype where every block has it and the backend multiplies it as it is, else None."""
    dtypes = {b.dtype for b in blocks}
    if len(dtypes) != 1:
        return None
    (dtype,) = dtypes
    if dtype not in (torch.bfloat16, torch.float16) or _gemm_converts(dtype, str(blocks[0].device)):
        return None
    return dtype


def _hidden_rows(hidden: Tensor, with_bias: bool, dtype: torch.dtype, mask: Optional[Tensor]) -> Tensor:
    """[hidden, 1] in `dtype`, 0 on masked rows (which may hold NaN or inf: they are never read)."""
    rows = hidden.to(dtype)
    if with_bias:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=dtype, device=rows.device)], dim=1)
    if mask is not None:
        rows = torch.where(mask.unsqueeze(1), rows, torch.zeros((), dtype=dtype, device=rows.device))
    return rows


def _clamped_norm(squared: Tensor, eps: Tensor) -> Tensor:
    """max(sqrt(squared), eps), with NaN kept, and neither an infinite derivative (sqrt at 0) nor a negative square
    (the bilinear form's rounding, for a logit row near 0) reaching the result."""
    positive = squared > 0
    root = torch.sqrt(torch.where(positive, squared, torch.ones_like(squared)))
    norm = torch.where(positive & (root > eps), root, eps)
    return torch.where(torch.isnan(squared), squared, norm)


class _Grams(NamedTuple):
    student: Tensor   # G_ss (K_s x K_s)
    cross: Tensor     # G_ts (K_t x K_s)
    teacher: Tensor   # G_tt (K_t x K_t)
    scales: Tensor    # (c_s, c_t)


class _TeacherSide(NamedTuple):
    """What CKD needs of the teacher's rows: products with the student's (scaled) head and the norms."""

    products: Tensor  # pt_i (N x K_s) with <t_i, s'_j> = <pt_i, hs_j>, s' the student's logits as scaled (8.1)
    norms: Tensor     # max(|t_i|, eps) (N,), of the same t_i as `products` (any positive scale of a row cancels)


class _FormProduct(torch.autograd.Function):
    """rows @ gram for the forms (FORMS_DTYPE, N x K by K x K): forward and backward as the GEMM policy's similarity
    products (counted, and the emulated backend's arithmetic), like every other product of the fused-linear ops."""

    @staticmethod
    def forward(ctx, rows, gram):
        ctx.save_for_backward(rows, gram)
        return torch.ops.ckd_ext.gemm_similarity(rows, gram.T)

    @staticmethod
    @_once_differentiable
    def backward(ctx, grad):
        rows, gram = ctx.saved_tensors
        grad_rows = torch.ops.ckd_ext.gemm_similarity(grad, gram) if ctx.needs_input_grad[0] else None
        grad_gram = torch.ops.ckd_ext.gemm_similarity(rows.T, grad.T) if ctx.needs_input_grad[1] else None
        return grad_rows, grad_gram


def _teacher_side(teacher_rows: Tensor, grams: _Grams) -> _TeacherSide:
    """The teacher's side from its rows [h, 1] and the heads' Gram matrices (docs/math.md 8.1), FORMS_DTYPE."""
    eps_floor = torch.finfo(teacher_rows.dtype).tiny
    teacher_scale = _downscale(teacher_rows.detach().abs().amax(dim=1))
    ht = teacher_rows * teacher_scale.unsqueeze(1)
    # scaled by a power of two (no overflow of a square below the dtype's range); so is eps
    teacher_eps = (EPS * grams.scales[1] * teacher_scale).clamp_min(eps_floor)
    return _TeacherSide(_FormProduct.apply(ht, grams.cross),
                        _clamped_norm((_FormProduct.apply(ht, grams.teacher) * ht).sum(dim=1), teacher_eps))


def _ckd_terms(student_rows: Tensor, teacher: _TeacherSide, grams: _Grams, tau: float, anchor: str, dtype, lse_of,
               strip_dtype: Optional[torch.dtype] = None):
    """Per-row CKD terms from the student's rows [h, 1] and the teacher's side (docs/math.md 8.1), in `dtype`: every
    inner product of logits is a bilinear form of the rows (FORMS_DTYPE) in the heads' Gram matrices.
    `lse_of(anchors, candidates, operands)`, on rows in `dtype`, is the log-sum-exp over the negatives (single
    process, or the ring); `operands` (StripOperands or None) are the strips' tensor-core rows where `strip_dtype`
    (the student's 16-bit dtype, where the backend multiplies it as it is) is given."""
    eps_floor = torch.finfo(student_rows.dtype).tiny
    student_scale = _downscale(student_rows.detach().abs().amax(dim=1))
    hs = student_rows * student_scale.unsqueeze(1)
    # The rows and heads were scaled by powers of two (no overflow of a square below the dtype's range); so is eps.
    student_eps = (EPS * grams.scales[0] * student_scale).clamp_min(eps_floor)
    ps = _FormProduct.apply(hs, grams.student)             # <s_i, s_j> = <ps_i, hs_j>
    pt, teacher_norm = teacher                             # <t_i, s_j> = <pt_i, hs_j>
    student_norm = _clamped_norm((ps * hs).sum(dim=1), student_eps)
    candidates = hs / student_norm.unsqueeze(1)
    positives = (pt * candidates).sum(dim=1) / (teacher_norm * tau)
    anchors = pt / teacher_norm.unsqueeze(1) if anchor == "teacher" else ps / student_norm.unsqueeze(1)
    operands = None
    if strip_dtype is not None:
        operands = _strip_operands(strip_dtype, student_rows, student_scale, student_norm, anchors, grams.student,
                                   teacher_norm if anchor == "teacher" else None, pt)
    # LSE over all candidates minus the positive = softplus(LSE over the negatives - positive), without cancellation
    # where the positive dominates (as the fused ops, docs/math.md 6.2); the teacher anchor's negatives are j != i.
    lse = lse_of(anchors.to(dtype), candidates.to(dtype), operands)
    return softplus_contrast(lse.to(positives.dtype), positives).to(dtype)


# The strips on tensor cores (docs/math.md 8.3): the logits from the unit rows x_j / |s_j| of the student's logit
# space, x_j = F hs_j with G_ss = F^T F, in LOGIT_PARTS 16-bit parts (2^-16 of each entry, where materialised
# 16-bit logits lose 2^-9); the coefficient products, the exact gradients of the forms' similarities, with the
# anchors in ANCHOR_PARTS parts and the student's 16-bit rows as they are.
LOGIT_PARTS, ANCHOR_PARTS = 2, 3
# Added to G_ss's diagonal before its Cholesky factorisation, relative to each diagonal entry (plus float64's
# rounding of the largest): a singular or nearly singular G_ss (tied or zero columns, K_s > V) still factors. It
# moves a logit by ~2^-36 R_i R_j (R the rows' cancellation ratios), below the parts' 2^-16 up to R ~ 1000.
FACTOR_JITTER = 2.0 ** -36


def _strip_operands(strip_dtype: torch.dtype, student_rows: Tensor, student_scale: Tensor, student_norm: Tensor,
                    anchors: Tensor, student_gram: Tensor, teacher_norm: Optional[Tensor],
                    teacher_products: Tensor) -> StripOperands:
    """The strips' tensor-core rows (StripOperands) from the forms' values, outside autograd (the coefficient
    products are the gradients of <a_i, b_j>; the logit rows only evaluate it). The teacher anchor's logit rows are
    the coordinates of pt_i in the same basis, F^-T pt_i (a triangular solve). A factorisation that fails (a NaN or
    infinite head) gives NaN logits, hence a NaN loss, without a host synchronisation."""
    with torch.no_grad():
        gram = student_gram.detach()
        diagonal = gram.diagonal()
        floor = gram.shape[0] * 2.0 ** -52 * (diagonal.max() if diagonal.numel() else diagonal.new_zeros(()))
        lower, info = torch.linalg.cholesky_ex(gram + torch.diag(FACTOR_JITTER * diagonal + floor))
        factor = torch.where(info == 0, lower.T, torch.full_like(lower, float("nan")))
        norm = student_norm.detach().unsqueeze(1)
        # x_j / |s_j| of the scaled rows hs_j = c_j [h_j, 1] (c_j a power of two: exact after the product)
        unit = torch.ops.ckd_ext.gemm_similarity(student_rows.detach(), factor)
        unit.mul_(student_scale.unsqueeze(1) / norm)
        if teacher_norm is None:
            logit_anchors = unit
        else:
            logit_anchors = torch.linalg.solve_triangular(factor, teacher_products.detach(), upper=True,
                                                          left=False) / teacher_norm.detach().unsqueeze(1)
        rows = student_rows.detach().to(strip_dtype)  # the 16-bit inputs themselves, [h, 1], 0 where masked: exact
        return StripOperands(split_operands.split(logit_anchors, strip_dtype, LOGIT_PARTS),
                             split_operands.split(unit, strip_dtype, LOGIT_PARTS),
                             split_operands.split(anchors.detach(), strip_dtype, ANCHOR_PARTS),
                             split_operands.as_they_are(rows, (norm.squeeze(1) / student_scale).float()))


def local_terms(student_rows, teacher: _TeacherSide, grams, tau, anchor, valid, dtype, strip_dtype=None):
    """Per-row CKD terms over this process's rows (0 on rows that take no part)."""
    terms = _ckd_terms(student_rows, teacher, grams, tau, anchor, dtype,
                       lambda a, b, operands: _StripLSE.apply(a, b, valid, float(tau), operands), strip_dtype)
    return terms if valid is None else torch.where(valid, terms, torch.zeros((), dtype=terms.dtype,
                                                                                  device=terms.device))


def _local_ckd(student_rows, teacher_rows, grams, tau, anchor, valid, dtype, strip_dtype=None):
    return local_terms(student_rows, _teacher_side(teacher_rows, grams), grams, tau, anchor, valid, dtype,
                       strip_dtype)


def _global_ckd(student_rows, teacher_rows, grams, tau, anchor, prepared, reduction, global_batch, group, signature,
                dtype, strip_dtype):
    """The global batch of all ranks' valid rows (docs/distributed.md): the (K_s + K_t)-wide rows [h, 1] are what is
    gathered or passed (the Gram matrices come from the heads alone, which DDP keeps identical on every rank). The
    ring's blocks are the strips' rows as they are (its GEMMs do not take the tensor-core operands)."""
    mask = prepared.mask
    if mask is not None:
        student_rows, teacher_rows = student_rows[mask], teacher_rows[mask]
    layout = distributed.gather_layout(student_rows.shape[0], student_rows.device, group, signature)
    terms = distributed.own_row_terms(
        student_rows, teacher_rows, layout, group, global_batch,
        lambda s, t, padding: _local_ckd(s, t, grams, tau, anchor, padding, dtype, strip_dtype),
        lambda: _ckd_terms(student_rows, _teacher_side(teacher_rows, grams), grams, tau, anchor, dtype,
                           lambda a, b, _: distributed.ring_lse(a, b, float(tau), layout, group)))
    if reduction != "none":
        return distributed.row_share(terms, layout, reduction)
    return scatter_rows(terms, prepared)


@dataclasses.dataclass(frozen=True, eq=False)
class TeacherGram:
    """A frozen teacher head's own Gram matrix G_tt = c^2 B_t^T B_t (docs/math.md 8.1), for ``fused_linear_ckd_loss(
    ..., teacher_gram=)``: made by ``fused_linear_teacher_gram`` from the head it is then passed with. It holds
    references to that head's tensors (weakly) and their version counters, and the loss refuses it for any other
    head or after an in-place change of it (an optimizer step, ``copy_``): compute it again then. A write through
    ``.data`` bypasses the version counter and is not seen."""
    gram: Tensor            # K_t x K_t, FORMS_DTYPE, of the head scaled by c = _downscale(magnitude)
    magnitude: Tensor       # the head's largest |entry| (0-dim, FORMS_DTYPE)
    operand_dtype: torch.dtype  # the head's dtype as the loss takes it (the autocast dtype under torch.autocast)
    weight: "weakref.ref"
    bias: Optional["weakref.ref"]
    versions: Tuple[int, Optional[int]]


def fused_linear_teacher_gram(teacher_weight: Tensor, teacher_bias: Optional[Tensor] = None) -> TeacherGram:
    """The teacher head's part of fused-linear CKD's Gram matrices, computed once for a teacher that does not change
    between calls: passed as ``teacher_gram=``, each call skips the teacher's ``V K_t^2`` multiply-adds (the largest
    of the three Gram blocks whenever ``H_t > H_s``) and one read of its head. Under ``torch.autocast`` make it
    under the same autocast state as the calls."""
    fn = "fused_linear_teacher_gram"
    _validation._check_floating_tensor(fn, "teacher_weight", teacher_weight)
    if teacher_weight.dim() != 2 or teacher_weight.shape[0] == 0:
        raise ValueError(f"{fn}: teacher_weight must have shape (V, H_t) with V > 0, got {tuple(teacher_weight.shape)}")
    if teacher_bias is not None:
        _validation._check_floating_tensor(fn, "teacher_bias", teacher_bias)
        if tuple(teacher_bias.shape) != (teacher_weight.shape[0],) or teacher_bias.dtype != teacher_weight.dtype:
            raise ValueError(f"{fn}: teacher_bias must have shape (V,) = ({teacher_weight.shape[0]},) and "
                             f"teacher_weight's dtype {teacher_weight.dtype}, got {tuple(teacher_bias.shape)} "
                             f"{teacher_bias.dtype}")
    weight, bias = map(sharded_heads.full_head, (teacher_weight, teacher_bias))
    weight, bias = _autocast_inputs(weight, bias)
    require_extension()
    with _without_autocast(weight), torch.no_grad():
        magnitude = _head_magnitude(weight, bias).to(FORMS_DTYPE)
        scales = torch.stack([_downscale(magnitude), torch.ones_like(magnitude)])
        # the head in _HeadGrams' first slot, alone: its own block is G_tt, over the same vocabulary chunks
        gram, _, _ = _HeadGrams.apply(weight, bias, None, None, scales, FORMS_DTYPE, None)
    return TeacherGram(gram, magnitude, weight.dtype, weakref.ref(teacher_weight),
                       None if teacher_bias is None else weakref.ref(teacher_bias),
                       (teacher_weight._version, None if teacher_bias is None else teacher_bias._version))


def _check_teacher_gram(fn: str, teacher_gram, teacher_weight, teacher_bias, operand_dtype, vocab_parallel_group):
    """The head `teacher_gram` was made from is the one passed, unchanged; before any work."""
    if teacher_gram is None:
        return
    if not isinstance(teacher_gram, TeacherGram):
        raise TypeError(f"{fn}: teacher_gram must be a TeacherGram from ckd_ext.fused_linear_teacher_gram or None, "
                        f"got {type(teacher_gram).__name__}")
    if vocab_parallel_group is not None:
        raise ValueError(f"{fn}: teacher_gram is not supported with vocab_parallel_group (each rank's shard holds part "
                         "of the teacher's Gram matrix)")
    same_bias = (teacher_gram.bias is None) == (teacher_bias is None) and (
        teacher_bias is None or teacher_gram.bias() is teacher_bias)
    if teacher_gram.weight() is not teacher_weight or not same_bias:
        raise ValueError(f"{fn}: teacher_gram was made from another teacher_weight / teacher_bias than the ones "
                         "passed; make it with ckd_ext.fused_linear_teacher_gram(teacher_weight, teacher_bias)")
    versions = (teacher_weight._version, None if teacher_bias is None else teacher_bias._version)
    if versions != teacher_gram.versions:
        raise ValueError(f"{fn}: teacher_gram is stale: teacher_weight / teacher_bias changed in place since it was "
                         f"made (versions {teacher_gram.versions} -> {versions}); make it again")
    if operand_dtype != teacher_gram.operand_dtype:
        raise ValueError(f"{fn}: teacher_gram was made from the head in {teacher_gram.operand_dtype}, but this call "
                         f"takes it in {operand_dtype} (torch.autocast on in one and not the other?)")


def fused_linear_ckd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, *, student_bias=None,
                          teacher_bias=None, tau=1.0, anchor="student", mask=None, reduction="mean",
                          global_batch=False, group=None, vocab_parallel_group=None, teacher_gram=None):
    """``ckd_loss(student_hidden @ student_weight.T + student_bias, teacher_hidden @ teacher_weight.T + teacher_bias)``
    without the logits: loss and gradients (hidden, weight, bias of the student) equal those of the logit loss.

    Hidden states (..., H_s) and (..., H_t) with the same leading dimensions; weights (V, H) as in ``nn.Linear``;
    biases (V,). Work O(V K^2 + N^2 K_s) for K = H_s + H_t (+ 1 per bias), memory O(N K + K^2) beyond the inputs.
    `global_batch` / `group` as for ``ckd_loss`` (docs/distributed.md): the K-wide rows [h, 1] are what is gathered
    or passed between ranks (the heads are identical on every rank under DDP), so a global batch costs N K per rank,
    not N V. DTensor heads (FSDP2) are taken whole once per call, their gradient averaged back to the shards; with
    `vocab_parallel_group` each rank passes its shard of the vocabulary rows of both heads (docs/distributed.md).
    For "mean" and "sum" every gradient is finished during the forward (a gathered head may be freed before
    backward). `teacher_gram` (``fused_linear_teacher_gram(teacher_weight, teacher_bias)``) skips the teacher head's
    own Gram matrix for a teacher that does not change between calls."""
    fn = "fused_linear_ckd_loss"
    vocab_parallel.check_arguments(fn, vocab_parallel_group, global_batch, student_weight, teacher_weight,
                                   student_bias, teacher_bias)
    given_teacher = (teacher_weight, teacher_bias)
    student_weight, teacher_weight, student_bias, teacher_bias = map(
        sharded_heads.full_head, (student_weight, teacher_weight, student_bias, teacher_bias))
    inputs = _autocast_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
                              teacher_bias)

    def compute(*tensors):
        return _fused_linear_ckd(fn, tensors, tau, anchor, mask, reduction, global_batch, group,
                                 vocab_parallel_group, teacher_gram, given_teacher)

    with _without_autocast(inputs[0]):
        loss = compute(*inputs) if reduction == "none" else sharded_heads.finish_in_forward(compute, inputs)
    return _output(loss, inputs[0])  # outside: under autocast the loss stays float32


def _fused_linear_ckd(fn, inputs, tau, anchor, mask, reduction, global_batch, group, vocab_parallel_group,
                      teacher_gram=None, given_teacher=(None, None)):
    if vocab_parallel_group is not None:
        checks = distributed.checked_together(vocab_parallel_group, communicates=True)
    else:
        checks = distributed.global_batch_checks(global_batch, group)
    with checks:
        p = _validation.prepare_fused_linear_ckd(fn, *inputs, tau, anchor, mask, reduction)
        distributed.check_arguments(fn, global_batch, group)
        _check_teacher_gram(fn, teacher_gram, *given_teacher, p.teacher_weight.dtype, vocab_parallel_group)
    require_extension()  # the workspace budget that sizes the strips is the extension's
    dtype = accumulation_dtype(p.student_hidden.dtype)
    strip_dtype = _strip_dtype(p.student_hidden)
    teacher_magnitude = (_head_magnitude(p.teacher_weight, p.teacher_bias) if teacher_gram is None
                         else teacher_gram.magnitude)
    magnitudes = torch.stack([_head_magnitude(p.student_weight, p.student_bias).to(FORMS_DTYPE),
                              teacher_magnitude.to(FORMS_DTYPE)])
    if vocab_parallel_group is not None:  # the Gram matrices are sums over the vocabulary (docs/math.md 8.5)
        vocab_parallel.ckd_layout(fn, p, tau, anchor, reduction, vocab_parallel_group)
        magnitudes = vocab_parallel.max_over_shards(magnitudes, vocab_parallel_group)
    head_scales = _downscale(magnitudes)
    head_grams = _HeadGrams.apply(p.student_weight, p.student_bias, p.teacher_weight, p.teacher_bias, head_scales,
                                  FORMS_DTYPE, None if teacher_gram is None else teacher_gram.gram)
    if vocab_parallel_group is not None:
        head_grams = vocab_parallel.sum_over_shards(head_grams, vocab_parallel_group)
    grams = _Grams(*head_grams, head_scales)
    student_rows = _hidden_rows(p.student_hidden, p.student_bias is not None, FORMS_DTYPE, p.mask)
    teacher_rows = _hidden_rows(p.teacher_hidden, p.teacher_bias is not None, FORMS_DTYPE, p.mask)
    if global_batch is not False:
        signature = distributed.Signature(fn, (
            ("global_batch", str(global_batch)), ("student_hidden's dtype", p.student_hidden.dtype),
            ("teacher_hidden's dtype", p.teacher_hidden.dtype), ("student_hidden's width H_s", p.student_hidden.shape[1]),
            ("teacher_hidden's width H_t", p.teacher_hidden.shape[1]),
            ("student_bias (given or None)", p.student_bias is not None),
            ("teacher_bias (given or None)", p.teacher_bias is not None), ("anchor", anchor), ("tau", float(tau)),
            ("reduction", reduction)))
        return _global_ckd(student_rows, teacher_rows, grams, tau, anchor, p, reduction, global_batch, group,
                           signature, dtype, strip_dtype)
    return reduce_row_terms(_local_ckd(student_rows, teacher_rows, grams, tau, anchor, p.mask, dtype, strip_dtype),
                            p, reduction)


def _strip_dtype(hidden: Tensor) -> Optional[torch.dtype]:
    """The 16-bit dtype the strips' tensor-core operands take (StripOperands), where the backend multiplies the
    student's 16-bit dtype as it is (CUDA, the emulated backend); None where it converts it (the CPU backend: the
    strips multiply fp32 rows) or the student is not 16-bit."""
    return _tensor_core_dtype([hidden])


def _head_magnitude(weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The largest |entry| of [W | b] (NaN if any is NaN: amax propagates it), the base of the head's scale."""
    magnitude = weight.detach().abs().amax()
    return magnitude if bias is None else torch.maximum(magnitude, bias.detach().abs().amax())

