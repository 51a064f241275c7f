"""Distil an MLP on scikit-learn's digits with Lightning and ckd_ext (CE + 10 * CKD), on one process or under DDP.

    pip install lightning scikit-learn
    python examples/lightning_digits.py                                   # one process
    python examples/lightning_digits.py --devices 2 --global-batch true   # 2 CPU processes (gloo), global negatives

With ``--global-batch true`` (or ``ring``) and a per-device batch of ``--batch-size / --devices``, the two processes
train as the single process does on ``--batch-size``: CKD's negatives span both ranks' rows and ckd_ext's scaling
makes DDP's gradient average the single-process gradient (tests/test_integration_lightning.py checks it).
"""
import argparse
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from ckd_ext.integrations.lightning import DistillationModule


def mlp(width, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def digits():
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def pretrained_teacher(x, y, epochs):
    """A wider MLP trained with cross-entropy (full-batch SGD: the same on every rank)."""
    teacher = mlp(128, seed=0)
    optimizer = torch.optim.SGD(teacher.parameters(), lr=0.5, momentum=0.9)
    for _ in range(epochs):
        optimizer.zero_grad()
        nn.functional.cross_entropy(teacher(x), y).backward()
        optimizer.step()
    return teacher.eval()


class Digits(pl.LightningDataModule):
    """Each rank's share of every global batch: a DistributedSampler with the rank and world size the Trainer knows
    (world 1 included), so that one process's batch is the union of the ranks' batches."""

    def __init__(self, x, y, batch_size):
        super().__init__()
        self.dataset = torch.utils.data.TensorDataset(x, y)
        self.batch_size = batch_size

    def train_dataloader(self):
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = torch.utils.data.DistributedSampler(self.dataset, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=0)
        return torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size // world, sampler=sampler)


class StepLosses(pl.Callback):
    """The logged (rank-averaged) train_loss of every step."""

    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(trainer.callback_metrics["train_loss"].item())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64, help="global batch size (split over the devices)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--teacher-epochs", type=int, default=100)
    p.add_argument("--global-batch", choices=["false", "true", "ring"], default="true")
    p.add_argument("--ckd-weight", type=float, default=10.0)
    p.add_argument("--out", help="folder for losses.json and student.pt (written by rank 0)")
    a = p.parse_args(argv)
    global_batch = {"false": False, "true": True, "ring": "ring"}[a.global_batch]
    x, y = digits()
    teacher = pretrained_teacher(x, y, a.teacher_epochs)
    student = mlp(32, seed=1)
    module = DistillationModule(student, teacher, ce_weight=1.0, ckd_weight=a.ckd_weight, tau=1.0, anchor="teacher",
                                global_batch=global_batch, lr=0.05, momentum=0.9)
    losses = StepLosses()
    trainer = pl.Trainer(accelerator="cpu", devices=a.devices, strategy="ddp" if a.devices > 1 else "auto",
                         max_steps=a.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, callbacks=[losses])
    trainer.fit(module, datamodule=Digits(x, y, a.batch_size))
    if trainer.global_rank == 0:
        print(f"{a.devices} process(es), {len(losses.losses)} steps: train_loss {losses.losses[0]:.4f} -> "
              f"{losses.losses[-1]:.4f}")
        if a.out:
            out = Path(a.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "losses.json").write_text(json.dumps(losses.losses))
            torch.save(student.state_dict(), out / "student.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
