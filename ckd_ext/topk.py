"""KD from an offline top-k teacher (docs/math.md section 9): the teacher is known only by the ids and
log-probabilities of its k most likely classes per row, as vLLM's `prompt_logprobs`, DistillKit, TRL and verl store
it; the student is known in full (its logits here, its hidden states and head in ``fused_linear_topk_kd_loss``).

The divergence is taken between two distributions over k + 1 categories (``tail="bucket"``: the k top classes and
the rest) or k categories ("renormalize", "none"). Those are few, so the divergence and its derivative with respect
to the student's category log-probabilities come from `divergences.divergence_terms` itself (autograd through it, on
(rows, k + 1) tensors); what is fused here is the part of size V: the student's log-normaliser
and tail mass over the whole vocabulary, and the map of the category gradient back to the V logits
(`_logit_gradient`), walked in chunks of rows, never N x V at once beyond the student's own logits and gradient.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _validation, distributed
from .custom_ops import _once_differentiable
from .divergences import Divergence, divergence_terms, resolve
from .rows import accumulation_dtype

# The category log-probabilities and the divergence are computed in float64 whatever the inputs: they are (rows,
# k + 1) numbers, and the textbook sums of divergence_terms lose digits near convergence in float32.
CATEGORY_DTYPE = torch.float64


class TopKTeacher(NamedTuple):
    """A chunk of rows of the teacher, ready for `chunk_terms`."""

    ids: Tensor        # (R, k) int64, padding and rows that take no part pointed at class 0
    pad: Tensor        # (R, k) bool: slot takes no part (a negative id, or a row that takes no part)
    log_probs: Tensor  # (R, k + 1) for "bucket", else (R, k), CATEGORY_DTYPE, -inf where pad


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0 without cancellation (Maechler 2012): log(-expm1(x)) near 0, log1p(-exp(x)) below
    -log 2. log1mexp(0) = -inf."""
    near_zero = x > -math.log(2.0)
    return torch.where(near_zero, torch.log(-torch.expm1(torch.where(near_zero, x, -1.0))),
                       torch.log1p(-torch.exp(torch.where(near_zero, -1.0, x))))


def teacher_chunk(teacher_ids: Tensor, teacher_logprobs: Tensor, valid: Optional[Tensor], tail: str) -> TopKTeacher:
    """The teacher's categories for one chunk of rows: its log-probabilities on the k ids, and the tail's log-mass
    log(1 - P) = log1mexp(log P) from its top-k log-mass log P (clamped at 0, a mass rounded above 1 leaves no tail)
    for "bucket", or the k log-probabilities renormalised by P for "renormalize"."""
    ids = teacher_ids.long()
    pad = ids < 0
    if valid is not None:
        pad = pad | ~valid.unsqueeze(1)
    log_probs = teacher_logprobs.to(CATEGORY_DTYPE).masked_fill(pad, -math.inf)
    if tail != "none":
        log_mass = log_probs.logsumexp(1, keepdim=True).clamp(max=0.0)
        if tail == "bucket":
            log_probs = torch.cat([log_probs, log1mexp(log_mass)], 1)
        else:  # a row with no entry has no distribution to renormalise: all its categories stay empty
            log_probs = log_probs - torch.where(torch.isfinite(log_mass), log_mass, 0.0)
    if valid is not None:  # a row that takes no part has no category at all, not a tail of mass 1
        log_probs = log_probs.masked_fill(~valid.unsqueeze(1), -math.inf)
    return TopKTeacher(ids.masked_fill(pad, 0), pad, log_probs)


class StudentChunk(NamedTuple):
    """The student's statistics on one chunk of rows that its categories and its logit gradient need."""

    log_probs: Tensor           # (R, k + 1) or (R, k), CATEGORY_DTYPE, -inf where pad (and where the tail is empty)
    log_sum: Optional[Tensor]   # (R, 1) log sum_v exp(z_v - max_v z_v), CATEGORY_DTYPE (None for "renormalize")
    outside: Optional[Tensor]   # (R, V) exp(z_v - max_v z_v) outside S, 0 on S, in z's dtype: q_v times the row's sum


def student_chunk(z: Tensor, teacher: TopKTeacher, tail: str, out: Optional[Tensor] = None) -> StudentChunk:
    """The student's categories from its tempered logits z (R, V) (accumulation dtype), with one exponential per
    element: e_v = exp(z_v - m), m the row's max. A log-probability is (z_c - m) - log sum_v e_v, formed in float64:
    off by the rounding of the sum (a few units of z's precision), not by that of LSE(z) (u |LSE(z)|, 1e-6 in
    float32 at logits of 10). The tail's mass is the sum of e_v over the classes outside the top-k set S: positive
    terms, exact where 1 - Q is tiny (log1mexp(log Q) would carry log Q's rounding, ~u |z|, relative to 1 - Q).
    `out`: where e goes (the buffer that becomes the logit gradient), else a new tensor."""
    top = z.gather(1, teacher.ids).masked_fill(teacher.pad, -math.inf)
    if tail == "renormalize":
        top = top.to(CATEGORY_DTYPE)
        log_norm = top.logsumexp(1, keepdim=True)
        return StudentChunk(top - torch.where(torch.isfinite(log_norm), log_norm, 0.0), None, None)
    shift = z.amax(1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, 0.0)  # a row of -inf: no max to shift by
    exp_shifted = (torch.sub(z, shift) if out is None else torch.sub(z, shift, out=out)).exp_()
    log_sum = exp_shifted.sum(1, keepdim=True).to(CATEGORY_DTYPE).log()
    log_probs = (top - shift).to(CATEGORY_DTYPE) - log_sum
    # 0 at the top-k ids; a padding slot (pointed at class 0) writes +inf under amin, which keeps the value
    fill = torch.where(teacher.pad, math.inf, 0.0).to(z.dtype)
    outside = exp_shifted.scatter_reduce_(1, teacher.ids, fill, reduce="amin")
    if tail == "bucket":
        tail_log_prob = outside.sum(1, keepdim=True).to(CATEGORY_DTYPE).log() - log_sum
        log_probs = torch.cat([log_probs, tail_log_prob], 1)
    return StudentChunk(log_probs, log_sum, outside)


def _same(tensor: Tensor) -> Tensor:
    return tensor


def chunk_terms(teacher: TopKTeacher, student: StudentChunk, divergence: Divergence, weights: Optional[Tensor]):
    """Per-row divergences (R,) and, with per-row `weights`, d(sum_i weights_i D_i) / d(student category log-probs)
    (R, k + 1 or k), by autograd through divergence_terms (the one definition of the divergences), inside the
forward: a graph of (R, k + 1) tensors, freed before the next chunk."""
    # a category neither side gives mass (a padding slot, an empty tail) adds 0 with a zero derivative in every
    # divergence (divergences.py takes 0 log 0 = 0 and log-mixtures of two -inf as -inf)
    empty = torch.isneginf(teacher.log_probs) & torch.isneginf(student.log_probs)
    log_p, log_q = teacher.log_probs, student.log_probs
    if weights is None:
        return divergence_terms(log_p, log_q, divergence), None
    if torch.compiler.is_compiling():  # torch.compile traces torch.func's transforms, not torch.autograd.grad
        terms, vjp = torch.func.vjp(lambda lq: divergence_terms(log_p, lq, divergence), log_q)
        (grad,) = vjp(weights.to(CATEGORY_DTYPE))
        return terms, grad.masked_fill(empty, 0.0)
    # eager: torch.func refuses to run under saved-tensor hooks (activation offloading, checkpointing); identity hooks
    # keep the caller's hooks off this transient graph, which is freed before the chunk ends
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_same, _same):
        log_q = log_q.detach().requires_grad_()
        terms = divergence_terms(log_p, log_q, divergence)
        (grad,) = torch.autograd.grad(terms, log_q, weights.to(CATEGORY_DTYPE))
    return terms.detach(), grad.masked_fill(empty, 0.0)


def logit_gradient(teacher: TopKTeacher, student: StudentChunk, grad: Tensor, tail: str, like: Tensor) -> Tensor:
    """d/dz_v of a function of the student's category log-probabilities, from its gradient g (R, k + 1 or k) with
    respect to them (docs/math.md 9.2): with G = sum_c g_c, q = softmax(z) and 1 - Q the student's tail mass,

        bucket        v = id_c: g_c - G q_v          v not in S: q_v (g_tail / (1 - Q) - G)
        none          v = id_c: g_c - G q_v          v not in S: -G q_v
        renormalize   v = id_c: g_c - G q~_c         v not in S: 0          (q~: q renormalised over S)

    Each coefficient is formed per row in float64 and multiplies q_v once, so nothing cancels in the accumulation
    dtype (g_tail / (1 - Q) and G can both be large where they nearly cancel, e.g. 1 - Q tiny). Returned in the
    dtype of `like` (the chunk's logits), (R, V); overwrites student.outside."""
    k = teacher.ids.shape[1]
    total = grad.sum(1, keepdim=True)
    if tail == "renormalize":
        top = (grad - total * student.log_probs.exp()).masked_fill(teacher.pad, 0.0)
        return torch.zeros_like(like).scatter_add_(1, teacher.ids, top.to(like.dtype))
    top = (grad[:, :k] - total * student.log_probs[:, :k].exp()).masked_fill(teacher.pad, 0.0)
    outside = -total
    if tail == "bucket":  # an empty tail (S = the vocabulary) has g_tail = 0 and no 1 / (1 - Q)
        tail_log_prob = student.log_probs[:, k:]
        outside = outside + torch.where(torch.isfinite(tail_log_prob), grad[:, k:] * torch.exp(-tail_log_prob), 0.0)
    # q_v = e_v / sum: the row's 1 / sum joins the coefficient
    out = student.outside.mul_((outside * torch.exp(-student.log_sum)).to(like.dtype))
    return out.scatter_add_(1, teacher.ids, top.to(like.dtype))


def term_scale(temperature: float, scale_t2: bool) -> float:
    """The factor of every row's divergence: T^2 (the scale of the dense KD) unless scale_t2=False."""
    return float(temperature) ** 2 if scale_t2 else 1.0


def chunk_loss_and_grad(logits: Tensor, teacher: TopKTeacher, valid: Optional[Tensor], temperature: float,
                        divergence: Divergence, tail: str, scale: float, weights: Optional[Tensor],
                        out: Optional[Tensor] = None):
    """One chunk of rows from raw student logits (R, V) (accumulation dtype): per-row terms scale * D_i (R,)
    (CATEGORY_DTYPE, 0 on rows that take no part), and with per-row `weights` the gradient of sum_i weights_i *
    terms_i with respect to the raw logits (R, V), 0 on rows that take no part (their logits may be garbage),
    written into `out` if given (an (R, V) buffer of the logits' dtype)."""
    z = logits if temperature == 1.0 else logits / temperature
    student = student_chunk(z, teacher, tail, out if weights is not None and tail != "renormalize" else None)
    if tail == "bucket":  # S = the whole vocabulary: no tail, whatever rounding left of the teacher's 1 - P
        no_tail = ((~teacher.pad).sum(1, keepdim=True) == logits.shape[1])
        teacher = teacher._replace(log_probs=torch.cat(
            [teacher.log_probs[:, :-1], teacher.log_probs[:, -1:].masked_fill(no_tail, -math.inf)], 1))
    if valid is not None:  # rows that take no part: every category empty on both sides, whatever their logits
        student = student._replace(log_probs=student.log_probs.masked_fill(~valid.unsqueeze(1), -math.inf))
    row_weights = None if weights is None else weights * (scale / temperature)
    terms, grad = chunk_terms(teacher, student, divergence, row_weights)
    terms = terms * scale
    if valid is not None:
        terms = torch.where(valid, terms, 0.0)
    if grad is None:
        return terms, None
    logit_grad = logit_gradient(teacher, student, grad, tail, z)
    if valid is not None:
        logit_grad.masked_fill_(~valid.unsqueeze(1), 0.0)
    if out is not None and tail == "renormalize":  # the other tails built it in `out` (student_chunk)
        out.copy_(logit_grad)
    return terms, logit_grad


def chunk_rows(vocab: int, dtype: torch.dtype, device: torch.device, buffers: int) -> int:
    """Rows per chunk: `buffers` (R, V) buffers of the accumulation dtype within the workspace budget."""
    from .fused_linear._common import _chunk_rows

    return _chunk_rows(vocab * buffers * torch.finfo(dtype).bits // 8, device)


# (R, V) buffers alive at once in a chunk of the logit form: z, its exponential (which becomes the gradient) and
# the temporary of the row sums.
LOGIT_BUFFERS = 3


def _walk_logits(student: Tensor, ids: Tensor, logprobs: Tensor, valid: Optional[Tensor], temperature: float,
                 divergence: Divergence, tail: str, scale: float, weights: Optional[Tensor]):
    """(per-row terms (N,) in CATEGORY_DTYPE, gradient (N, V) in the accumulation dtype or None)."""
    dtype = accumulation_dtype(student.dtype)
    rows_total, vocab = student.shape
    step = chunk_rows(vocab, dtype, student.device, LOGIT_BUFFERS)
    terms = torch.empty(rows_total, dtype=CATEGORY_DTYPE, device=student.device)
    grad = None if weights is None else torch.empty(rows_total, vocab, dtype=dtype, device=student.device)
    for start in range(0, rows_total, step):
        rows = slice(start, min(start + step, rows_total))
        chunk_valid = None if valid is None else valid[rows]
        teacher = teacher_chunk(ids[rows], logprobs[rows], chunk_valid, tail)
        chunk_weights = None if weights is None else (weights if weights.dim() == 0 else weights[rows])
        if chunk_weights is not None and chunk_weights.dim() == 0:
            chunk_weights = chunk_weights.expand(rows.stop - rows.start)
        terms[rows], _ = chunk_loss_and_grad(student[rows].to(dtype), teacher, chunk_valid, temperature, divergence,
                                             tail, scale, chunk_weights, None if grad is None else grad[rows])
    return terms, grad


def _mean_scale(valid: Optional[Tensor], rows: int, reduction: str, device) -> Tensor:
    """1 / (number of rows that take part) for "mean" (a device tensor: no host synchronisation), 1 for "sum"."""
    if reduction == "sum":
        return torch.ones((), dtype=CATEGORY_DTYPE, device=device)
    count = torch.tensor(rows, device=device) if valid is None else valid.sum()
    return 1.0 / count.clamp_min(1).to(CATEGORY_DTYPE)


class _TopKKD(torch.autograd.Function):
    """For "mean" and "sum" with a float32 / float64 student the gradient is computed in the forward and kept (the
    loss is almost always the last node of the graph); otherwise (reduction "none", 16-bit students, as the dense KD
    does for their single rounding) backward walks the chunks again with the upstream weights."""

    @staticmethod
    def forward(ctx, student, ids, logprobs, valid, temperature, divergence, tail, scale, reduction, compute_grad):
        ctx.args = (temperature, divergence, tail, scale, reduction)
        ctx.student_dtype = student.dtype
        if reduction == "none":
            terms, _ = _walk_logits(student, ids, logprobs, valid, temperature, divergence, tail, scale, None)
            ctx.save_for_backward(student, ids, logprobs, valid)
            ctx.recompute = True
            return terms.to(accumulation_dtype(student.dtype))
        row_scale = _mean_scale(valid, student.shape[0], reduction, student.device)
        ctx.recompute = not compute_grad
        terms, grad = _walk_logits(student, ids, logprobs, valid, temperature, divergence, tail, scale,
                                   row_scale if compute_grad else None)
        if compute_grad:
            ctx.save_for_backward(grad)
        else:
            ctx.save_for_backward(student, ids, logprobs, valid)
        return (terms.sum() * row_scale).to(accumulation_dtype(student.dtype))

    @staticmethod
    @_once_differentiable  # the saved gradient is a constant: a second derivative through it would be 0
    def backward(ctx, grad_loss):
        temperature, divergence, tail, scale, reduction = ctx.args
        if not ctx.recompute:
            (grad,) = ctx.saved_tensors
            return (grad * grad_loss.to(grad.dtype)).to(ctx.student_dtype), *(None,) * 9
        student, ids, logprobs, valid = ctx.saved_tensors
        weights = grad_loss.to(CATEGORY_DTYPE)
        if reduction != "none":
            weights = weights * _mean_scale(valid, student.shape[0], reduction, student.device)
        _, grad = _walk_logits(student, ids, logprobs, valid, temperature, divergence, tail, scale, weights)
        return grad.to(ctx.student_dtype), *(None,) * 9


def _output(loss: Tensor, like: Tensor) -> Tensor:
    from .losses import _output as output

    return output(loss, like)


def topk_kd_loss(student, teacher_ids, teacher_logprobs, *, temperature=1.0, divergence="forward_kl", beta=None,
                 alpha=None, tail="bucket", scale_t2=True, mask=None, reduction="mean", global_batch=False,
                 group=None):
    """KD against an offline top-k teacher (docs/math.md section 9). `student`: logits (..., V); `teacher_ids`:
    (..., k) int64 or int32, the teacher's top classes per row (a negative id pads a row with fewer than k);
    `teacher_logprobs`: (..., k), the teacher's log-probabilities of those classes at `temperature`
    (log_softmax(teacher_logits / temperature)); the student's distribution is softmax(student / temperature) over
    the whole vocabulary. `tail`: "bucket" (the mass outside the top k as one more category), "renormalize" (both
    renormalised over the k ids) or "none" (the truncated sum). `divergence`, `beta`, `alpha`: as ``kd_loss``
    (ckd_ext.divergences); each row's divergence is scaled by temperature^2 unless ``scale_t2=False``. Returns a
    scalar, or per-row terms (...) for reduction="none". `global_batch` and `group` are checked and otherwise
    ignored: the loss is row-local."""
    fn = "topk_kd_loss"
    chosen = resolve(fn, divergence, beta, alpha)
    p = _validation.prepare_topk_kd(fn, student, teacher_ids, teacher_logprobs, temperature, tail, scale_t2, mask,
                                    reduction)
    distributed.check_arguments(fn, global_batch, group)
    compute_grad = (torch.is_grad_enabled() and p.student.requires_grad
                    and p.student.dtype not in (torch.float16, torch.bfloat16))
    loss = _TopKKD.apply(p.student, p.teacher_ids, p.teacher_logprobs, p.mask, float(temperature), chosen, tail,
                         term_scale(temperature, scale_t2), reduction, compute_grad)
    loss = _output(loss, student)
    return loss.reshape(p.lead_shape) if reduction == "none" else loss


class TeacherTopK(NamedTuple):
    """What ``teacher_topk`` returns: per row the ids of the k largest logits (descending), their log-probabilities at
    the temperature, and with moments=True the log-normaliser LSE(logits / temperature) (so that the raw top-k
    logits are temperature * (logprobs + log_normalizer)), the sum and the sum of squares of the raw logits."""

    ids: Tensor
    logprobs: Tensor
    log_normalizer: Optional[Tensor] = None
    logit_sum: Optional[Tensor] = None
    logit_square_sum: Optional[Tensor] = None
