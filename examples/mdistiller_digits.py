"""ckd_ext's mdistiller distillers (CKD, BicKD, KD), trained the way mdistiller's BaseTrainer trains, on digits.

In an mdistiller checkout (the CKD authors' released code included) the one change is to register the classes:

    # mdistiller/distillers/__init__.py
    from ckd_ext.integrations.mdistiller import CKD, BicKD, KD
    distiller_dict.update({"CKD": CKD, "BICKD": BicKD, "KD": KD})

after which ``python tools/train.py --cfg configs/cifar100/ckd/res32x4_res8x4.yaml`` (a config with DISTILLER.TYPE:
CKD and CKD.TEMPERATURE / CKD.LOSS.CE_WEIGHT / CKD.LOSS.CL_WEIGHT) runs on ckd_ext's fused loss. This script needs no
mdistiller: it reproduces its training step (nn.DataParallel, sum of the loss dict, SGD) on scikit-learn's digits.

    python examples/mdistiller_digits.py --method CKD --epochs 10
"""
import argparse
import sys
from types import SimpleNamespace as Node

import torch
from torch import nn

from ckd_ext.integrations.mdistiller import CKD, KD, BicKD

CONFIGS = {
    "CKD": Node(CKD=Node(TEMPERATURE=1.0, LOSS=Node(CE_WEIGHT=1.0, CL_WEIGHT=10.0))),
    "BICKD": Node(BICKD=Node(TEMPERATURE=4.0, TAU=0.1, LOSS=Node(CE_WEIGHT=1.0, BICKD_WEIGHT=1.0))),
    "KD": Node(KD=Node(TEMPERATURE=4, LOSS=Node(CE_WEIGHT=0.1, KD_WEIGHT=0.9))),
}
DISTILLERS = {"CKD": CKD, "BICKD": BicKD, "KD": KD}


class Net(nn.Module):
    """An MLP with mdistiller's model interface: forward returns (logits, features)."""

    def __init__(self, width, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        feature = self.body(x)
        return self.fc(feature), {"pooled_feat": feature}


def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    a, b = train_test_split(range(len(y)), test_size=0.3, random_state=0, stratify=y)
    return (x[a], y[a]), (x[b], y[b])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=list(DISTILLERS), default="CKD")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--teacher-epochs", type=int, default=30)
    a = p.parse_args(argv)
    (x, y), (x_test, y_test) = digits()
    batches = lambda: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64,  # noqa: E731
                                                  shuffle=True, drop_last=True)
    teacher = Net(256, seed=0)
    optimizer = torch.optim.SGD(teacher.parameters(), lr=0.1, momentum=0.9)
    for _ in range(a.teacher_epochs):
        for image, target in batches():
            optimizer.zero_grad()
            nn.functional.cross_entropy(teacher(image)[0], target).backward()
            optimizer.step()

    distiller = nn.DataParallel(DISTILLERS[a.method](Net(32, seed=1), teacher, CONFIGS[a.method]))
    optimizer = torch.optim.SGD(distiller.module.get_learnable_parameters(), lr=0.05, momentum=0.9,
                                weight_decay=5e-4)
    for epoch in range(1, a.epochs + 1):
        distiller.train()
        total, steps = 0.0, 0
        for image, target in batches():  # mdistiller's BaseTrainer.train_iter
            optimizer.zero_grad()
            _, losses_dict = distiller(image=image, target=target, epoch=epoch)
            loss = sum(value.mean() for value in losses_dict.values())
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
        distiller.eval()
        with torch.no_grad():
            accuracy = (distiller(image=x_test).argmax(1) == y_test).float().mean().item()
        print(f"{a.method} epoch {epoch}: mean train loss {total / steps:.3f}, student test accuracy {accuracy:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
