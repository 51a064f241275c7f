"""Distil a causal LM under Hugging Face's Trainer with ckd_ext's fused-linear losses (no N x V logits held).

    pip install ".[transformers]"
    python examples/hf_trainer_distillation.py                          # tiny random Llamas, a few CPU steps
    python examples/hf_trainer_distillation.py --style subclass         # the same through one's own compute_loss
    python examples/hf_trainer_distillation.py --teacher NAME --student NAME --text FILE   # real checkpoints

By default both models are small random LlamaForCausalLM built from configs and the data are the bytes of this
file, so it runs anywhere without downloads. Two ways to use ckd_ext:

- ``--style trainer``: ckd_ext.integrations.transformers.DistillationTrainer (model=student, teacher_model=...).
- ``--style subclass``: a Trainer subclass of one's own, as TRL's trainers are, whose compute_loss returns
  ``CausalLMDistillationLoss(...)(model, teacher, inputs, num_items_in_batch=...)``: the few lines that swap ckd_ext
  into a TRL-style ``compute_loss`` are those of ``OwnTrainer`` below.
"""
import argparse
import sys
from pathlib import Path

import torch
import transformers

from ckd_ext.integrations.transformers import CausalLMDistillationLoss, DistillationTrainer


class OwnTrainer(transformers.Trainer):
    """A user's (or TRL's) Trainer subclass: ckd_ext enters through compute_loss."""

    def __init__(self, *args, teacher_model, distillation, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher_model = teacher_model.to(self.args.device).eval().requires_grad_(False)
        self.distillation = distillation

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = self.distillation(model, self.teacher_model, inputs, num_items_in_batch=num_items_in_batch)
        # divided by the token count of all accumulated micro-batches when the Trainer passes it: not again by the
        # number of accumulation steps
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # the divisor counted every rank's tokens; DDP averages
        return (loss, {}) if return_outputs else loss


class Windows(torch.utils.data.Dataset):
    """Token windows of `ids`, one sequence each."""

    def __init__(self, ids, context):
        self.windows = [ids[i:i + context] for i in range(0, len(ids) - context, context)]

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def tiny_llama(vocab, hidden, layers, seed):
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--style", choices=["trainer", "subclass"], default="trainer")
    p.add_argument("--teacher", help="a checkpoint name or folder (default: a tiny random Llama)")
    p.add_argument("--student", help="a checkpoint name or folder sharing the teacher's tokenizer")
    p.add_argument("--text", help="a text file to train on (default: this script's own bytes)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--ckd-weight", type=float, default=1.0)
    p.add_argument("--out", default="runs/hf_distillation")
    a = p.parse_args(argv)

    text = Path(a.text or __file__).read_text()
    if a.teacher:
        tokenizer = transformers.AutoTokenizer.from_pretrained(a.teacher)
        teacher = transformers.AutoModelForCausalLM.from_pretrained(a.teacher)
        student = transformers.AutoModelForCausalLM.from_pretrained(a.student)
        ids = torch.tensor(tokenizer(text)["input_ids"])
    else:
        ids = torch.tensor(list(text.encode()))  # bytes as tokens: a vocabulary of 256
        teacher, student = tiny_llama(256, 64, 2, seed=0), tiny_llama(256, 32, 1, seed=1)
    data = Windows(ids, a.context)
    distillation = CausalLMDistillationLoss(ce_weight=1.0, kd_weight=1.0, temperature=1.0, ckd_weight=a.ckd_weight,
                                            tau=1.0)
    args = transformers.TrainingArguments(
        output_dir=a.out, per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=a.accumulation,
        max_steps=a.steps, learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
    trainer_class = DistillationTrainer if a.style == "trainer" else OwnTrainer
    trainer = trainer_class(model=student, teacher_model=teacher, distillation=distillation, args=args,
                            train_dataset=data, data_collator=transformers.default_data_collator)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"{a.style}: {len(losses)} steps, loss " + " -> ".join(f"{x:.3f}" for x in losses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
