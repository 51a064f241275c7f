"""Distil an MLP on scikit-learn's digits with torchdistill, naming ckd_ext's losses in its YAML config.

    pip install torchdistill scikit-learn
    python examples/torchdistill_digits.py                        # examples/torchdistill_ckd.yaml: CE + 10 * CKD
    python examples/torchdistill_digits.py --config my.yaml --epochs 3

The teacher (a wider MLP) is trained first with cross-entropy in plain PyTorch; the student is then trained by
torchdistill's DistillationBox built from the config, whose ``dependencies`` import ckd_ext.integrations.torchdistill
(registering ``ckd_ext.CKDLoss``, ``ckd_ext.BicKDLoss``, ``ckd_ext.KDLoss``), with torchdistill's own training loop.
"""
import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torchdistill.common import main_util, yaml_util
from torchdistill.core.distillation import get_distillation_box

CONFIG = Path(__file__).with_name("torchdistill_ckd.yaml")


def mlp(width, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def load_config(path=CONFIG):
    """The YAML config (torchdistill's loader: its !import_get tags), with its dependencies imported."""
    config = yaml_util.load_yaml_file(str(path))
    main_util.import_dependencies(config.get("dependencies"))
    return config


def distillation_box(config, teacher, student, train_dataset):
    return get_distillation_box(teacher, student, {"train": train_dataset}, config["train"], torch.device("cpu"),
                                None, False, 1.0)


def train_epoch(box, epoch, max_steps=None):
    """One epoch of torchdistill's loop (as its example scripts run it); the losses of its steps."""
    box.pre_epoch_process(epoch=epoch)
    losses = []
    for sample_batch, targets, supp_dict in box.train_data_loader:
        loss = box.forward_process(sample_batch, targets, supp_dict)
        box.post_forward_process(loss=loss)
        losses.append(loss.item())
        if max_steps is not None and len(losses) == max_steps:
            break
    box.post_epoch_process()
    return losses


def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    train_index, test_index = train_test_split(range(len(y)), test_size=0.3, random_state=0, stratify=y)
    return (torch.utils.data.TensorDataset(x[train_index], y[train_index]),
            torch.utils.data.TensorDataset(x[test_index], y[test_index]))


def accuracy(model, dataset):
    x, y = dataset.tensors
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--epochs", type=int, default=None, help="override the config's num_epochs")
    p.add_argument("--teacher-epochs", type=int, default=30)
    a = p.parse_args(argv)
    train, test = digits()
    teacher = mlp(256, seed=0)
    optimizer = torch.optim.SGD(teacher.parameters(), lr=0.1, momentum=0.9)
    for _ in range(a.teacher_epochs):
        for x, y in torch.utils.data.DataLoader(train, batch_size=64, shuffle=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(teacher(x), y).backward()
            optimizer.step()
    config = load_config(a.config)
    if a.epochs is not None:
        config["train"]["num_epochs"] = a.epochs
    student = mlp(32, seed=1)
    box = distillation_box(config, teacher.eval(), student, train)
    print(box.criterion)
    for epoch in range(box.num_epochs):
        losses = train_epoch(box, epoch)
        print(f"epoch {epoch}: loss {sum(losses) / len(losses):.4f}, student test accuracy "
              f"{accuracy(student.eval(), test):.3f}")
    print(f"teacher test accuracy {accuracy(teacher, test):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
