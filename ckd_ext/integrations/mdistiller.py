"""mdistiller-compatible distillers (CKD, BicKD, KD) over ckd_ext's fused losses.

mdistiller (the framework the CKD authors' released code is built on; not on PyPI, so nothing is imported from it)
builds a distiller as ``distiller_dict[cfg.DISTILLER.TYPE](student, teacher, cfg)``, wraps it in ``nn.DataParallel``,
optimises ``distiller.module.get_learnable_parameters()`` and calls ``distiller(image=..., target=..., epoch=...)``:
in training mode ``forward_train`` returns ``(student logits, {name: loss})``, whose values the trainer sums; in eval
mode ``forward_test(image)`` returns the student's logits. Its models return ``(logits, features)``. The classes here
keep that contract, so a config runs with ckd_ext by registering them in ``distiller_dict``:

    from ckd_ext.integrations.mdistiller import CKD, BicKD, KD
    distiller_dict.update({"CKD": CKD, "BICKD": BicKD, "KD": KD})

Config keys (yacs ``CfgNode`` attributes or nested dicts):

    CKD    CKD.TEMPERATURE (tau, default 1.0), CE_WEIGHT (1.0), CL_WEIGHT (10.0), read from CKD.LOSS.<key> or
           CKD.<key>; CKD.ANCHOR ("teacher", the released code's: teacher rows as anchors)
    BicKD  BICKD.TEMPERATURE (4.0), BICKD.TAU (0.1), BICKD.W_SAMPLE (1.0), BICKD.W_CLASS (1.0), BICKD.SYMMETRIC
           (False), CE_WEIGHT (1.0), BICKD_WEIGHT (1.0) from BICKD.LOSS.<key> or BICKD.<key>
    KD     mdistiller's own: KD.TEMPERATURE (4), KD.LOSS.CE_WEIGHT (0.1), KD.LOSS.KD_WEIGHT (0.9)

The losses are named ``loss_ce`` and ``loss_kd`` (the distillation term, whichever it is), the two names mdistiller's
DOT trainer reads. Losses are means over the batch, as mdistiller's are; CKD's negatives are the batch's other
samples (under ``nn.DataParallel``, each device's share, as in the released runs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import ckd_ext

__all__ = ["CKD", "BicKD", "KD"]

_MISSING = object()


def _get(node, key, default=_MISSING):
    """node.key for a yacs CfgNode or a namespace, node[key] for a dict; `default` when absent (none: KeyError)."""
    if isinstance(node, dict):
        value = node.get(key, _MISSING)
    else:
        value = getattr(node, key, _MISSING)
    if value is _MISSING:
        if default is _MISSING:
            raise KeyError(key)
        return default
    return value


def _loss_key(section, key, default):
    """`key` from section.LOSS when that node has it, else from the section itself (both layouts occur in
    mdistiller's methods: KD.LOSS.CE_WEIGHT, DKD.CE_WEIGHT)."""
    loss_node = _get(section, "LOSS", None)
    if loss_node is not None:
        value = _get(loss_node, key, None)
        if value is not None:
            return value
    return _get(section, key, default)


class _Distiller(nn.Module):
    """mdistiller's Distiller contract: the teacher stays in eval mode and is never trained."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        self.student = student
        self.teacher = teacher

    def train(self, mode: bool = True):
        if not isinstance(mode, bool):
            raise ValueError(f"train: mode must be a bool, got {type(mode).__name__}")
        self.training = mode
        for module in self.children():
            module.train(mode)
        self.teacher.eval()
        return self

    def get_learnable_parameters(self):
        return [p for _, p in self.student.named_parameters()]

    def get_extra_parameters(self):
        return 0

    def forward_test(self, image):
        return self.student(image)[0]

    def forward(self, **kwargs):
        if self.training:
            return self.forward_train(**kwargs)
        return self.forward_test(kwargs["image"])

    def _logits(self, image):
        logits_student, _ = self.student(image)
        with torch.no_grad():
            logits_teacher, _ = self.teacher(image)
        return logits_student, logits_teacher

    def forward_train(self, image, target, **kwargs):
        logits_student, logits_teacher = self._logits(image)
        losses = {
            "loss_ce": self.ce_weight * F.cross_entropy(logits_student, target),
            "loss_kd": self.distill_weight * self.criterion(logits_student, logits_teacher),
        }
        return logits_student, losses


class CKD(_Distiller):
    """CE + CL_WEIGHT * CKD (ckd_ext.ckd_loss with tau = CKD.TEMPERATURE, the released code's teacher anchors)."""

    def __init__(self, student, teacher, cfg):
        super().__init__(student, teacher)
        section = _get(cfg, "CKD")
        self.ce_weight = float(_loss_key(section, "CE_WEIGHT", 1.0))
        self.distill_weight = float(_loss_key(section, "CL_WEIGHT", 10.0))
        self.criterion = ckd_ext.CKDLoss(tau=float(_get(section, "TEMPERATURE", 1.0)),
                                         anchor=str(_get(section, "ANCHOR", "teacher")))


class BicKD(_Distiller):
    """CE + BICKD_WEIGHT * BicKD (ckd_ext.bickd_loss)."""

    def __init__(self, student, teacher, cfg):
        super().__init__(student, teacher)
        section = _get(cfg, "BICKD")
        self.ce_weight = float(_loss_key(section, "CE_WEIGHT", 1.0))
        self.distill_weight = float(_loss_key(section, "BICKD_WEIGHT", 1.0))
        self.criterion = ckd_ext.BicKDLoss(
            temperature=float(_get(section, "TEMPERATURE", 4.0)), tau=float(_get(section, "TAU", 0.1)),
            w_sample=float(_get(section, "W_SAMPLE", 1.0)), w_class=float(_get(section, "W_CLASS", 1.0)),
            symmetric=bool(_get(section, "SYMMETRIC", False)))


class KD(_Distiller):
    """mdistiller's KD (CE_WEIGHT * CE + KD_WEIGHT * T^2 KL) with ckd_ext.kd_loss."""

    def __init__(self, student, teacher, cfg):
        super().__init__(student, teacher)
        section = _get(cfg, "KD")
        self.ce_weight = float(_loss_key(section, "CE_WEIGHT", 0.1))
        self.distill_weight = float(_loss_key(section, "KD_WEIGHT", 0.9))
        self.criterion = ckd_ext.KDLoss(temperature=float(_get(section, "TEMPERATURE", 4.0)))
