"""A LightningModule that distils a classifier with ckd_ext's losses: CE + KD + CKD (or BicKD), teacher frozen.

    from ckd_ext.integrations.lightning import DistillationModule
    module = DistillationModule(student, teacher, ce_weight=1.0, ckd_weight=10.0, tau=1.0, anchor="teacher",
                                global_batch=True)
    lightning.Trainer(accelerator="cpu", devices=2, strategy="ddp").fit(module, loader)

Under a data-parallel strategy (DDP, FSDP), ``global_batch=True`` or ``"ring"`` makes CKD's negatives and BicKD's
column statistics the rows of every rank's batch; the per-rank losses then follow ckd_ext's scaling convention
(docs/distributed.md), under which the strategy's gradient average is the gradient of one process holding the
concatenated batch, and the logged ``train_loss`` (averaged over ranks, ``sync_dist=True``) is that process's loss.
CE and KD are per-rank means, whose average over ranks is the global mean when every rank holds as many rows. On
one process (no process group) the global batch is that process's batch, and the local mode runs.
"""
from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

import ckd_ext

__all__ = ["DistillationModule"]


def _logits(output):
    """A model's logits: the output itself, or the first element of a (logits, features) pair."""
    return output[0] if isinstance(output, (tuple, list)) else output


class DistillationModule(pl.LightningModule):
    """``ce_weight * CE + kd_weight * KD(temperature) + ckd_weight * CKD(tau, anchor) + bickd_weight * BicKD`` of
    `student` against the frozen `teacher` on batches ``(inputs, labels)``, optimised by SGD over the student."""

    def __init__(self, student: nn.Module, teacher: nn.Module, *, ce_weight=1.0, kd_weight=0.0, temperature=4.0,
                 ckd_weight=10.0, tau=1.0, anchor="teacher", bickd_weight=0.0, bickd_kwargs=None,
                 global_batch=False, lr=0.05, momentum=0.9, weight_decay=0.0):
        super().__init__()
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.weights = {"ce": float(ce_weight), "kd": float(kd_weight), "ckd": float(ckd_weight),
                        "bickd": float(bickd_weight)}
        if not any(self.weights.values()):
            raise ValueError("DistillationModule: every loss weight is 0")
        if not any(global_batch is mode for mode in (False, True)) and global_batch != "ring":
            raise ValueError(f"DistillationModule: global_batch must be False, True or 'ring', got {global_batch!r}")
        self.global_batch = global_batch
        self.temperature = temperature
        self.ckd_kwargs = {"tau": tau, "anchor": anchor}
        self.bickd_kwargs = dict(bickd_kwargs or {})
        self.optimizer_kwargs = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # its batch-norm statistics and dropout stay fixed
        return self

    def forward(self, inputs):
        return _logits(self.student(inputs))

    def loss_terms(self, inputs, labels):
        """{name: unweighted term} for the terms whose weight is not 0."""
        student = self(inputs)
        with torch.no_grad():
            teacher = _logits(self.teacher(inputs))
        # One process (no process group) holds the whole global batch: the local mode computes the same loss.
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        mode = self.global_batch if distributed else False
        terms = {}
        if self.weights["ce"]:
            terms["ce"] = F.cross_entropy(student, labels)
        if self.weights["kd"]:
            terms["kd"] = ckd_ext.kd_loss(student, teacher, temperature=self.temperature)
        # the weights are the same on every rank, so every rank makes the same collective calls (global modes)
        if self.weights["ckd"]:
            terms["ckd"] = ckd_ext.ckd_loss(student, teacher, global_batch=mode, **self.ckd_kwargs)
        if self.weights["bickd"]:
            terms["bickd"] = ckd_ext.bickd_loss(student, teacher, global_batch=mode, **self.bickd_kwargs)
        return terms

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        terms = self.loss_terms(inputs, labels)
        loss = sum(self.weights[name] * value for name, value in terms.items())
        self.log("train_loss", loss, on_step=True, on_epoch=False, sync_dist=True, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), **self.optimizer_kwargs)
