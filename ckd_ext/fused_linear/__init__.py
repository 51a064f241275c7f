"""Fused-linear CKD and KD: the losses of ``ckd_ext.ckd_loss`` / ``kd_loss`` on the logits ``hidden @ weight.T + bias``
of two language-model heads, without ever holding the N x V logits (nor an N x N matrix).

    fused_linear_ckd_loss   exact through the heads' bilinear forms: CKD depends on the logits only through inner
                            products and norms of their rows, <s_i, s_j> = [h_i, 1]^T (B_s^T B_s) [h_j, 1] and
                            likewise with B_t^T B_s and B_t^T B_t (K x K Gram matrices, K = H + bias), so the
                            similarities are GEMMs of N x K rows, walked in bounded anchor strips (docs/math.md 8).
    fused_linear_topk_kd_loss / teacher_topk
                            KD from an offline top-k teacher, and the producer of such teachers: chunked like
                            fused_linear_kd_loss (ckd_ext/topk.py, docs/math.md section 9).
    fused_linear_topk_ckd_loss
                            CKD (student anchor) from a top-k teacher with its moments: the negatives through
                            B_s^T B_s as above, the positive from k gathered head rows per token (docs/math.md 9.6).
    fused_linear_kd_loss    row-separable: the tokens are walked in chunks, both models' logits of one chunk are
                            computed into a bounded buffer, the fused KD op (and cross-entropy) gives the chunk's
                            logit gradient, which is folded into the hidden / weight / bias gradients at once.

Both are Python orchestration over ATen GEMMs and the ckd_ext ops, so they run wherever those run (CPU, CUDA, the
emulated CUDA backend). They assume a linear head: with logit soft-capping or any non-linear head, compute the logits
and call ``ckd_loss`` / ``kd_loss``.
"""
from .ckd import TeacherGram, fused_linear_ckd_loss, fused_linear_teacher_gram
from .kd import fused_linear_kd_loss
from .topk import fused_linear_topk_kd_loss, teacher_topk
from .topk_ckd import fused_linear_topk_ckd_loss

__all__ = ["fused_linear_ckd_loss", "fused_linear_teacher_gram", "TeacherGram", "fused_linear_kd_loss",
           "fused_linear_topk_kd_loss", "teacher_topk",
           "fused_linear_topk_ckd_loss"]
