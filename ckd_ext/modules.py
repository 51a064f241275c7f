"""nn.Module wrappers of the fused losses: hyperparameters at construction, tensors at call time."""
from torch import nn

from . import ops


class CKDLoss(nn.Module):
    def __init__(self, *, tau=1.0, anchor="student", reduction="mean"):
        super().__init__()
        self.tau, self.anchor, self.reduction = tau, anchor, reduction

    def forward(self, student, teacher, mask=None):
        return ops.ckd_loss(student, teacher, tau=self.tau, anchor=self.anchor, mask=mask, reduction=self.reduction)

    def extra_repr(self):
        return f"tau={self.tau}, anchor={self.anchor!r}, reduction={self.reduction!r}"


class KDLoss(nn.Module):
    def __init__(self, *, temperature=4.0, reduction="mean"):
        super().__init__()
        self.temperature, self.reduction = temperature, reduction

    def forward(self, student, teacher, mask=None):
        return ops.kd_loss(student, teacher, temperature=self.temperature, mask=mask, reduction=self.reduction)

    def extra_repr(self):
        return f"temperature={self.temperature}, reduction={self.reduction!r}"


class BicKDLoss(nn.Module):
    def __init__(self, *, temperature=4.0, tau=0.1, w_sample=1.0, w_class=1.0, symmetric=False, reduction="mean"):
        super().__init__()
        self.temperature, self.tau = temperature, tau
        self.w_sample, self.w_class, self.symmetric, self.reduction = w_sample, w_class, symmetric, reduction

    def forward(self, student, teacher, mask=None):
        return ops.bickd_loss(
            student, teacher, temperature=self.temperature, tau=self.tau, w_sample=self.w_sample,
            w_class=self.w_class, symmetric=self.symmetric, mask=mask, reduction=self.reduction,
        )

    def extra_repr(self):
        return (f"temperature={self.temperature}, tau={self.tau}, w_sample={self.w_sample}, "
                f"w_class={self.w_class}, symmetric={self.symmetric}, reduction={self.reduction!r}")
