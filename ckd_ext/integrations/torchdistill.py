"""ckd_ext's losses in torchdistill's loss registry, so that a torchdistill YAML config names them.

Importing this module registers three middle-level losses (torchdistill's ``register_mid_level_loss``):

    ckd_ext.CKDLoss     ckd_ext.CKDLoss(tau, anchor, reduction, global_batch) on (student, teacher) logits
    ckd_ext.BicKDLoss   ckd_ext.BicKDLoss(temperature, tau, w_sample, w_class, symmetric, reduction, global_batch)
    ckd_ext.KDLoss      ckd_ext.KDLoss(temperature, reduction)

Each reads its logits from torchdistill's I/O dicts like torchdistill's own ``KDLoss``: ``student_module_path`` /
``student_module_io`` and ``teacher_module_path`` / ``teacher_module_io`` (default ``'.'`` / ``'output'``: the
models' outputs); every other keyword goes to the ckd_ext module, which rejects unknown ones. A config loads this
module through its ``dependencies`` list and combines the terms with ``WeightedSumLoss``, e.g. the CKD authors'
objective ``CE + 10 * CKD``:

    dependencies:
      - name: 'ckd_ext.integrations.torchdistill'
    train:
      criterion:
        key: 'WeightedSumLoss'
        kwargs:
          sub_terms:
            ce:
              criterion: {key: 'CrossEntropyLoss', kwargs: {reduction: 'mean'}}
              criterion_wrapper:
                key: 'SimpleLossWrapper'
                kwargs: {input: {is_from_teacher: False, module_path: '.', io: 'output'}, target: {uses_label: True}}
              weight: 1.0
            ckd:
              criterion: {key: 'ckd_ext.CKDLoss', kwargs: {tau: 1.0, anchor: 'teacher'}}
              weight: 10.0

(examples/torchdistill_ckd.yaml is a complete config.)
"""
from torch import nn
from torchdistill.losses.registry import register_mid_level_loss

import ckd_ext

__all__ = ["TorchdistillCKDLoss", "TorchdistillBicKDLoss", "TorchdistillKDLoss"]


class _LogitPairLoss(nn.Module):
    """A ckd_ext loss module applied to the logits found at the configured paths of torchdistill's I/O dicts."""
    loss_class = None

    def __init__(self, student_module_path=".", student_module_io="output", teacher_module_path=".",
                 teacher_module_io="output", **loss_kwargs):
        super().__init__()
        self.student_module_path, self.student_module_io = student_module_path, student_module_io
        self.teacher_module_path, self.teacher_module_io = teacher_module_path, teacher_module_io
        self.loss = self.loss_class(**loss_kwargs)

    def forward(self, student_io_dict, teacher_io_dict, targets=None, *args, **kwargs):
        student = student_io_dict[self.student_module_path][self.student_module_io]
        teacher = teacher_io_dict[self.teacher_module_path][self.teacher_module_io]
        return self.loss(student, teacher.detach())

    def __str__(self):  # what WeightedSumLoss logs
        return f"{self.loss_class.__name__}({self.student_module_path}:{self.student_module_io})"


@register_mid_level_loss(key="ckd_ext.CKDLoss")
class TorchdistillCKDLoss(_LogitPairLoss):
    loss_class = ckd_ext.CKDLoss


@register_mid_level_loss(key="ckd_ext.BicKDLoss")
class TorchdistillBicKDLoss(_LogitPairLoss):
    loss_class = ckd_ext.BicKDLoss


@register_mid_level_loss(key="ckd_ext.KDLoss")
class TorchdistillKDLoss(_LogitPairLoss):
    loss_class = ckd_ext.KDLoss
