"""nn.Module wrappers of the fused losses: hyperparameters at construction, tensors at call time."""
from torch import nn

from . import fused_linear, losses, topk, topk_ckd


class _Distributed(nn.Module):
    """global_batch and group (docs/distributed.md), which every loss takes (the row-local KD losses check and
    otherwise ignore them), kept as given and checked at call time like the rest."""

    def __init__(self, global_batch, group):
        super().__init__()
        self.global_batch, self.group = global_batch, group

    def _distributed_repr(self):
        return "" if self.global_batch is False else f", global_batch={self.global_batch!r}"


class CKDLoss(_Distributed):
    def __init__(self, *, tau=1.0, anchor="student", reduction="mean", global_batch=False, group=None):
        super().__init__(global_batch, group)
        self.tau, self.anchor, self.reduction = tau, anchor, reduction

    def forward(self, student, teacher, mask=None):
        return losses.ckd_loss(student, teacher, tau=self.tau, anchor=self.anchor, mask=mask, reduction=self.reduction,
                            global_batch=self.global_batch, group=self.group)

    def extra_repr(self):
        return f"tau={self.tau}, anchor={self.anchor!r}, reduction={self.reduction!r}" + self._distributed_repr()


def _divergence_repr(module) -> str:
    """The divergence arguments that differ from their defaults."""
    parts = [] if module.divergence == "forward_kl" else [f", divergence={module.divergence!r}"]
    parts += [f", {name}={getattr(module, name)}" for name in ("beta", "alpha") if getattr(module, name) is not None]
    return "".join(parts) + ("" if module.scale_t2 is True else f", scale_t2={module.scale_t2!r}")


class KDLoss(_Distributed):
    def __init__(self, *, temperature=4.0, divergence="forward_kl", beta=None, alpha=None, scale_t2=True,
                 reduction="mean", global_batch=False, group=None):
        super().__init__(global_batch, group)
        self.temperature, self.reduction = temperature, reduction
        self.divergence, self.beta, self.alpha, self.scale_t2 = divergence, beta, alpha, scale_t2

    def forward(self, student, teacher, mask=None):
        return losses.kd_loss(student, teacher, temperature=self.temperature, divergence=self.divergence,
                              beta=self.beta, alpha=self.alpha, scale_t2=self.scale_t2, mask=mask,
                              reduction=self.reduction, global_batch=self.global_batch, group=self.group)

    def extra_repr(self):
        return (f"temperature={self.temperature}" + _divergence_repr(self) + f", reduction={self.reduction!r}"
                + self._distributed_repr())


class BicKDLoss(_Distributed):
    def __init__(self, *, temperature=4.0, tau=0.1, w_sample=1.0, w_class=1.0, symmetric=False, reduction="mean",
                 global_batch=False, group=None):
        super().__init__(global_batch, group)
        self.temperature, self.tau = temperature, tau
        self.w_sample, self.w_class, self.symmetric, self.reduction = w_sample, w_class, symmetric, reduction

    def forward(self, student, teacher, mask=None):
        return losses.bickd_loss(
            student, teacher, temperature=self.temperature, tau=self.tau, w_sample=self.w_sample,
            w_class=self.w_class, symmetric=self.symmetric, mask=mask, reduction=self.reduction,
            global_batch=self.global_batch, group=self.group,
        )

    def extra_repr(self):
        return (f"temperature={self.temperature}, tau={self.tau}, w_sample={self.w_sample}, "
                f"w_class={self.w_class}, symmetric={self.symmetric}, reduction={self.reduction!r}"
                + self._distributed_repr())


class _FusedLinear(_Distributed):
    """global_batch and group, and vocab_parallel_group (a vocabulary-parallel head's process group, or None)."""

    def __init__(self, global_batch, group, vocab_parallel_group):
        super().__init__(global_batch, group)
        self.vocab_parallel_group = vocab_parallel_group

    def _distributed_repr(self):
        vocab_parallel = "" if self.vocab_parallel_group is None else ", vocab_parallel_group=<ProcessGroup>"
        return super()._distributed_repr() + vocab_parallel


class FusedLinearCKDLoss(_FusedLinear):
    """CKD on the logits of two linear heads, from hidden states and head weights (``fused_linear_ckd_loss``)."""

    def __init__(self, *, tau=1.0, anchor="student", reduction="mean", global_batch=False, group=None,
                 vocab_parallel_group=None):
        super().__init__(global_batch, group, vocab_parallel_group)
        self.tau, self.anchor, self.reduction = tau, anchor, reduction

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, *, student_bias=None,
                teacher_bias=None, mask=None, teacher_gram=None):
        return fused_linear.fused_linear_ckd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=student_bias,
            teacher_bias=teacher_bias, tau=self.tau, anchor=self.anchor, mask=mask, reduction=self.reduction,
            global_batch=self.global_batch, group=self.group, vocab_parallel_group=self.vocab_parallel_group,
            teacher_gram=teacher_gram)

    def extra_repr(self):
        return f"tau={self.tau}, anchor={self.anchor!r}, reduction={self.reduction!r}" + self._distributed_repr()


class FusedLinearKDLoss(_FusedLinear):
    """KD (+ ce_weight * cross-entropy) on the logits of two linear heads (``fused_linear_kd_loss``)."""

    def __init__(self, *, temperature=1.0, divergence="forward_kl", beta=None, alpha=None, scale_t2=True,
                 ce_weight=0.0, ignore_index=-100, reduction="mean", global_batch=False, group=None,
                 vocab_parallel_group=None):
        super().__init__(global_batch, group, vocab_parallel_group)
        self.temperature, self.ce_weight, self.ignore_index = temperature, ce_weight, ignore_index
        self.divergence, self.beta, self.alpha, self.scale_t2 = divergence, beta, alpha, scale_t2
        self.reduction = reduction

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, *, student_bias=None,
                teacher_bias=None, mask=None, labels=None):
        return fused_linear.fused_linear_kd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=student_bias,
            teacher_bias=teacher_bias, temperature=self.temperature, divergence=self.divergence, beta=self.beta,
            alpha=self.alpha, scale_t2=self.scale_t2, mask=mask, labels=labels, ce_weight=self.ce_weight,
            ignore_index=self.ignore_index, reduction=self.reduction, global_batch=self.global_batch, group=self.group,
            vocab_parallel_group=self.vocab_parallel_group)

    def extra_repr(self):
        return (f"temperature={self.temperature}" + _divergence_repr(self) + f", ce_weight={self.ce_weight}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}" + self._distributed_repr())


class _TopKOptions(_Distributed):
    """The options every top-k KD loss takes (``topk_kd_loss``), kept as given and checked at call time."""

    def __init__(self, temperature, divergence, beta, alpha, tail, scale_t2, reduction, global_batch, group):
        super().__init__(global_batch, group)
        self.temperature, self.divergence, self.beta, self.alpha = temperature, divergence, beta, alpha
        self.tail, self.scale_t2, self.reduction = tail, scale_t2, reduction

    def _options(self):
        return dict(temperature=self.temperature, divergence=self.divergence, beta=self.beta, alpha=self.alpha,
                    tail=self.tail, scale_t2=self.scale_t2, reduction=self.reduction, global_batch=self.global_batch,
                    group=self.group)

    def extra_repr(self):
        chosen = "".join(f", {name}={value}" for name, value in (("beta", self.beta), ("alpha", self.alpha))
                         if value is not None)
        return (f"temperature={self.temperature}, divergence={self.divergence!r}{chosen}, tail={self.tail!r}, "
                f"scale_t2={self.scale_t2}, reduction={self.reduction!r}" + self._distributed_repr())


class TopKKDLoss(_TopKOptions):
    """KD from an offline top-k teacher on student logits (``topk_kd_loss``)."""

    def __init__(self, *, temperature=1.0, divergence="forward_kl", beta=None, alpha=None, tail="bucket",
                 scale_t2=True, reduction="mean", global_batch=False, group=None):
        super().__init__(temperature, divergence, beta, alpha, tail, scale_t2, reduction, global_batch, group)

    def forward(self, student, teacher_ids, teacher_logprobs, mask=None):
        return topk.topk_kd_loss(student, teacher_ids, teacher_logprobs, mask=mask, **self._options())


class FusedLinearTopKKDLoss(_TopKOptions):
    """KD from an offline top-k teacher (+ ce_weight * cross-entropy) on the logits of a linear head
    (``fused_linear_topk_kd_loss``)."""

    def __init__(self, *, temperature=1.0, divergence="forward_kl", beta=None, alpha=None, tail="bucket",
                 scale_t2=True, ce_weight=0.0, ignore_index=-100, reduction="mean", global_batch=False, group=None):
        super().__init__(temperature, divergence, beta, alpha, tail, scale_t2, reduction, global_batch, group)
        self.ce_weight, self.ignore_index = ce_weight, ignore_index

    def forward(self, student_hidden, student_weight, teacher_ids, teacher_logprobs, *, student_bias=None, mask=None,
                labels=None):
        return fused_linear.fused_linear_topk_kd_loss(
            student_hidden, student_weight, teacher_ids, teacher_logprobs, student_bias=student_bias, mask=mask,
            labels=labels, ce_weight=self.ce_weight, ignore_index=self.ignore_index, **self._options())

    def extra_repr(self):
        return super().extra_repr() + f", ce_weight={self.ce_weight}, ignore_index={self.ignore_index}"


class TopKCKDLoss(nn.Module):
    """CKD (student anchor) from an offline top-k teacher with its moments, on student logits (``topk_ckd_loss``)."""

    def __init__(self, *, temperature=1.0, tau=1.0, reduction="mean"):
        super().__init__()
        self.temperature, self.tau, self.reduction = temperature, tau, reduction

    def forward(self, student, teacher_ids, teacher_logprobs, log_normalizer, logit_sum, logit_square_sum, mask=None):
        return topk_ckd.topk_ckd_loss(student, teacher_ids, teacher_logprobs, log_normalizer, logit_sum,
                                      logit_square_sum, temperature=self.temperature, tau=self.tau, mask=mask,
                                      reduction=self.reduction)

    def extra_repr(self):
        return f"temperature={self.temperature}, tau={self.tau}, reduction={self.reduction!r}"


class FusedLinearTopKCKDLoss(TopKCKDLoss):
    """CKD (student anchor) from an offline top-k teacher with its moments, on the logits of a linear head
    (``fused_linear_topk_ckd_loss``)."""

    def forward(self, student_hidden, student_weight, teacher_ids, teacher_logprobs, log_normalizer, logit_sum,
                logit_square_sum, *, student_bias=None, mask=None):
        return fused_linear.fused_linear_topk_ckd_loss(
            student_hidden, student_weight, teacher_ids, teacher_logprobs, log_normalizer, logit_sum, logit_square_sum,
            student_bias=student_bias, temperature=self.temperature, tau=self.tau, mask=mask,
            reduction=self.reduction)
