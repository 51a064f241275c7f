"""Distilling a Hugging Face causal LM with the fused-linear losses: no N x V logits of either model are held.

    from ckd_ext.integrations.transformers import CausalLMDistillationLoss, DistillationTrainer

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
                                  train_dataset=..., data_collator=...,
                                  distillation=CausalLMDistillationLoss(ce_weight=1.0, kd_weight=1.0, temperature=1.0,
                                                                        ckd_weight=0.0, tau=1.0))
    trainer.train()

or, in a Trainer subclass of one's own (TRL's trainers included), ``compute_loss`` returns
``loss_fn(model, teacher, inputs, num_items_in_batch=num_items_in_batch)`` (examples/hf_trainer_distillation.py).

What one call does:
- Both models run on the batch without ``labels`` (so neither computes its own loss) and with ``logits_to_keep=1``
  (one logit row per sequence instead of L); a forward hook on the model's base model takes its last hidden state
  (after the final norm), which is what the LM head reads. The teacher runs under ``no_grad``. The student runs
  through the module the Trainer handed over (DDP's wrapper included), so data-parallel gradient hooks see it.
- Targets are shifted as the model's own loss (``ForCausalLMLoss``) shifts them: position i predicts
  ``labels[i + 1]``, the last position nothing; a collator's ``shift_labels`` is used as it is. A position takes part
  when its target is not ``ignore_index``, both it and its target are inside ``attention_mask`` (2-D), and its target
  does not start a new packed sequence (``position_ids`` restarting at 0: DataCollatorWithFlattening's labels say
  the same with -100).
- The loss is ``kd_weight * KD + ce_weight * CE + ckd_weight * CKD`` over those positions: KD and CE through
  ``fused_linear_kd_loss`` (KD is ``T^2 KL(teacher || student)`` per token), CKD through ``fused_linear_ckd_loss``
  with the batch's positions as each other's negatives. Each term is a sum over positions divided by
  ``num_items_in_batch`` when the Trainer passes it (the count of shifted labels that are not -100 over all
  micro-batches of one optimiser step, and over all ranks when ``average_tokens_across_devices``), else by this
  batch's count. So CE and KD are per-token sums with the Trainer's global divisor, and gradient accumulation or data
  parallelism gives the loss and gradient of one big batch. CKD's negatives are the positions of one micro-batch on
  one rank (its per-anchor terms are then normalised the same way): as with any in-batch contrastive loss,
  accumulation changes which negatives an anchor sees.
- The heads must be linear (``nn.Linear``, bias allowed). A scalar scale of the logits (Cohere's ``logit_scale``,
  Granite's ``logits_scaling``) is linear and is applied to the hidden states; logit soft-capping
  (``final_logit_softcapping``) or any other head is refused with a ValueError: compute the logits and call
  ``ckd_ext.kd_loss`` / ``ckd_ext.ckd_loss``. Tied embeddings need nothing: the head weight is the embedding
  Parameter itself, whose gradient autograd sums from both uses.
- The loss runs outside autocast, each model's hidden states and head in the wider of their two dtypes (bf16 hidden
  states with an fp32 head, as ``bf16=True`` gives, are widened to fp32: exact), as the models' own loss upcasts
  its logits to fp32.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import transformers

import ckd_ext

__all__ = ["CausalLMDistillationLoss", "DistillationTrainer", "shifted_targets", "linear_head"]

# Config attributes of heads that are not linear in the hidden state (the logits pass through tanh).
SOFTCAPPING_ATTRIBUTES = ("final_logit_softcapping", "logit_softcapping", "output_logit_softcapping")
# Model inputs that are targets or loss arguments, not arguments of the forward that yields hidden states.
TARGET_KEYS = ("labels", "shift_labels", "num_items_in_batch")


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel-style wrappers (their `.module`)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


@dataclasses.dataclass
class LinearHead:
    """The LM head as ``scale * (hidden @ weight.T + bias)``."""
    weight: Tensor
    bias: Optional[Tensor]
    scale: float


def linear_head(model: nn.Module, argument: str = "model") -> LinearHead:
    """The output head of a causal LM as a linear map, or a ValueError saying why the fused-linear route cannot
    distil it."""
    model = _unwrap(model)
    config = getattr(model, "config", None)
    for name in SOFTCAPPING_ATTRIBUTES:
        if getattr(config, name, None) is not None:
            raise ValueError(f"{argument}: its logits are soft-capped ({type(model).__name__}.config.{name} = "
                             f"{getattr(config, name)}), which is not linear in the hidden states; the fused-linear "
                             f"losses cannot compute it. Compute the logits and call ckd_ext.kd_loss / ckd_loss")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise ValueError(f"{argument}: its output head is {type(head).__name__}, not a plain nn.Linear; the "
                         f"fused-linear losses need logits = hidden @ weight.T + bias. Compute the logits and call "
                         f"ckd_ext.kd_loss / ckd_loss")
    scale = 1.0
    if getattr(model, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= float(model.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        scale /= float(config.logits_scaling)
    return LinearHead(head.weight, head.bias, scale)


def last_hidden_state(model: nn.Module, inputs: Dict[str, Tensor], argument: str = "model") -> Tensor:
    """The last hidden state (after the final norm: what the head reads) of `model` on `inputs`, through the module
    given (so wrappers' forward hooks run), computing one logit row per sequence instead of L."""
    inner = _unwrap(model)
    base = getattr(inner, "base_model", None)
    if base is None or base is inner:
        raise ValueError(f"{argument}: {type(inner).__name__} is not a *ForCausalLM model with a base model (its "
                         f"`base_model` attribute) whose output is the hidden state the head reads")
    captured = []

    def keep_output(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = base.register_forward_hook(keep_output)
    try:
        model(**{k: v for k, v in inputs.items() if k not in TARGET_KEYS}, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"{argument}: its base model ran {len(captured)} times in one forward; expected once")
    return captured[0]


def shifted_targets(labels: Tensor, *, attention_mask: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                    shift_labels: Optional[Tensor] = None, ignore_index: int = -100) -> Tensor:
    """The target of every position, shaped like `labels`: ``labels[..., i + 1]`` (``shift_labels`` as given when
    present), ``ignore_index`` at the last position, where the position or its target lies outside a 2-D
    `attention_mask`, and where the target starts a new packed sequence (`position_ids` back at 0)."""
    if shift_labels is not None:
        if shift_labels.shape != labels.shape:
            raise ValueError(f"shift_labels must have the shape of labels {tuple(labels.shape)}, got "
                             f"{tuple(shift_labels.shape)}")
        targets = shift_labels.clone()
    else:
        targets = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].clone()
    keep = torch.ones_like(targets, dtype=torch.bool)
    if attention_mask is not None and attention_mask.dim() == 2:
        attended = attention_mask.bool()
        keep &= attended & F.pad(attended, (0, 1), value=False)[..., 1:]
    if position_ids is not None and position_ids.shape == labels.shape:
        keep &= F.pad(position_ids, (0, 1), value=0)[..., 1:] != 0
    return targets.masked_fill_(~keep, ignore_index)


def _wider(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


@dataclasses.dataclass
class CausalLMDistillationLoss:
    """``kd_weight * KD + ce_weight * CE + ckd_weight * CKD`` of a causal student LM against a teacher sharing its
    vocabulary, from their last hidden states and LM heads (module docstring: targets, masks, normalisation).

    KD: ``temperature^2 * D(teacher, student)`` of the tokens' softened distributions (ckd_ext.kd_loss), D the
    `divergence` (forward KL by default; `beta` for "jsd", `alpha` for "skew_kl", docs/math.md 3.1); CKD:
    ckd_ext.ckd_loss with `tau` and `anchor` over the positions of the batch."""
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    temperature: float = 1.0
    divergence: str = "forward_kl"
    beta: Optional[float] = None
    alpha: Optional[float] = None
    ckd_weight: float = 0.0
    tau: float = 1.0
    anchor: str = "student"
    ignore_index: int = -100

    def __post_init__(self):
        for name in ("ce_weight", "kd_weight", "ckd_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"CausalLMDistillationLoss: {name} must be a number >= 0, got {value!r}")
        if self.ce_weight == self.kd_weight == self.ckd_weight == 0:
            raise ValueError("CausalLMDistillationLoss: ce_weight, kd_weight and ckd_weight are all 0: no loss")

    def __call__(self, student: nn.Module, teacher: nn.Module, inputs: Dict[str, Tensor], *,
                 num_items_in_batch=None, return_parts: bool = False):
        """The loss of one (micro-)batch `inputs` (input_ids, labels, attention_mask, position_ids, ...); with
        `return_parts`, also {"ce", "kd", "ckd"}: each term's value before its weight, detached."""
        if "labels" not in inputs:
            raise ValueError("inputs must hold 'labels' (the model's own targets, -100 where ignored)")
        student_head = linear_head(student, "student")
        teacher_head = linear_head(teacher, "teacher")
        hidden_student = last_hidden_state(student, inputs, "student")
        with torch.no_grad():
            hidden_teacher = last_hidden_state(teacher, inputs, "teacher")
        targets = shifted_targets(inputs["labels"], attention_mask=inputs.get("attention_mask"),
                                  position_ids=inputs.get("position_ids"), shift_labels=inputs.get("shift_labels"),
                                  ignore_index=self.ignore_index)
        valid = targets != self.ignore_index
        if num_items_in_batch is None:
            divisor = valid.sum().clamp_min(1)
        else:
            # a step whose micro-batches hold no target gives 0, not 0 / 0
            divisor = torch.as_tensor(num_items_in_batch, device=hidden_student.device).clamp_min(1)
        with torch.autocast(hidden_student.device.type, enabled=False):
            hs, ws, bs = _wider(hidden_student * student_head.scale if student_head.scale != 1 else hidden_student,
                                student_head.weight, student_head.bias)
            ht, wt, bt = _wider(hidden_teacher * teacher_head.scale, teacher_head.weight.detach(),
                                None if teacher_head.bias is None else teacher_head.bias.detach())
            parts, loss = {}, hs.new_zeros(())
            if self.kd_weight or self.ce_weight:
                loss = loss + self._kd_and_ce(hs, ws, bs, ht, wt, bt, targets, divisor, parts, return_parts)
            if self.ckd_weight:
                ckd = ckd_ext.fused_linear_ckd_loss(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, tau=self.tau,
                                                    anchor=self.anchor, mask=valid, reduction="sum") / divisor
                parts["ckd"] = ckd.detach()
                loss = loss + self.ckd_weight * ckd
        return (loss, parts) if return_parts else loss

    def _kd_and_ce(self, hs, ws, bs, ht, wt, bt, targets, divisor, parts, return_parts):
        """kd_weight * KD + ce_weight * CE over the valid positions, / divisor. The fused op gives KD + c * CE; for CE
        alone (kd_weight 0) it runs with the student as its own teacher, whose KD term and gradient are 0."""
        if self.kd_weight:
            teacher = (ht, wt, bt)
            ce_ratio = self.ce_weight / self.kd_weight
        else:
            teacher = (hs.detach(), ws.detach(), None if bs is None else bs.detach())
            ce_ratio = 1.0
        combined = ckd_ext.fused_linear_kd_loss(
            hs, ws, teacher[0], teacher[1], student_bias=bs, teacher_bias=teacher[2], temperature=self.temperature,
            divergence=self.divergence, beta=self.beta, alpha=self.alpha, labels=targets, ce_weight=ce_ratio,
            ignore_index=self.ignore_index, reduction="sum") / divisor
        if return_parts:  # the terms apart, for logging: one more pass without gradients
            with torch.no_grad():
                ce = ckd_ext.fused_linear_kd_loss(hs, ws, hs, ws, student_bias=bs, teacher_bias=bs, labels=targets,
                                                  ce_weight=1.0, ignore_index=self.ignore_index,
                                                  reduction="sum") / divisor
            parts["ce"] = ce
            parts["kd"] = (combined.detach() - ce_ratio * ce) if self.kd_weight else torch.zeros_like(ce)
        return (self.kd_weight or self.ce_weight) * combined


class DistillationTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose training loss is `distillation` (a CausalLMDistillationLoss) of `model`
    against `teacher_model`, which is moved to the training device, put in eval mode and frozen.

    The loss is normalised by the Trainer's ``num_items_in_batch`` when it passes one, which the Trainer then uses
    as it is (``loss_is_scaled_for_ga``); otherwise it is this batch's mean and the Trainer divides it by the number
    of accumulation steps. Under data parallelism with ``average_tokens_across_devices`` it is multiplied by the
    number of processes, since the divisor counts every rank's tokens and DDP averages gradients over the ranks."""

    def __init__(self, *args, teacher_model: nn.Module, distillation: Optional[CausalLMDistillationLoss] = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(teacher_model, nn.Module):
            raise TypeError(f"teacher_model must be an nn.Module (a causal LM), got {type(teacher_model).__name__}")
        self.teacher_model = teacher_model.to(self.args.device).eval().requires_grad_(False)
        self.distillation = CausalLMDistillationLoss() if distillation is None else distillation
        if not isinstance(self.distillation, CausalLMDistillationLoss):
            raise TypeError(f"distillation must be a CausalLMDistillationLoss, got {type(distillation).__name__}")
        linear_head(self.model, "model")  # refuse a head the fused-linear losses cannot distil now, not at step 1
        linear_head(self.teacher_model, "teacher_model")
        self._scaled_by_items = None

    @property
    def loss_is_scaled_for_ga(self) -> Optional[bool]:
        """Whether the last compute_loss divided by num_items_in_batch (the Trainer then skips its own division)."""
        return self._scaled_by_items

    @loss_is_scaled_for_ga.setter
    def loss_is_scaled_for_ga(self, value: Optional[bool]) -> None:  # the base class may assign it
        self._scaled_by_items = value

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = self.distillation(model, self.teacher_model, inputs, num_items_in_batch=num_items_in_batch)
        self._scaled_by_items = num_items_in_batch is not None
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes
        return (loss, {"loss": loss.detach()}) if return_outputs else loss
