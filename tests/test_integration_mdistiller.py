"""The mdistiller distillers keep mdistiller's Distiller contract, checked against a stand-in of its base class and
trainer step written from that contract (mdistiller is not on PyPI): the same learnable parameters, the teacher in
eval mode, forward_test, and loss dicts equal to mdistiller-style float64 distillers (its KD loss, the CKD authors'
released CKD loss); three stand-in trainer steps under nn.DataParallel equal float64 training. Cost: ~3 s."""
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ckd_ext
from ckd_ext import reference
from ckd_ext.integrations import mdistiller as ours

pytestmark = pytest.mark.skipif(not ckd_ext.is_available(), reason="needs the compiled extension")


# ---- the stand-in: mdistiller's documented contract -------------------------------------------------------------

class StandInDistiller(nn.Module):
    """mdistiller.distillers._base.Distiller as its contract states it."""

    def __init__(self, student, teacher):
        super().__init__()
        self.student, self.teacher = student, teacher

    def train(self, mode=True):
        self.training = mode
        for module in self.children():
            module.train(mode)
        self.teacher.eval()
        return self

    def get_learnable_parameters(self):
        return [v for _, v in self.student.named_parameters()]

    def get_extra_parameters(self):
        return 0

    def forward_test(self, image):
        return self.student(image)[0]

    def forward(self, **kwargs):
        return self.forward_train(**kwargs) if self.training else self.forward_test(kwargs["image"])


def mdistiller_kd_loss(s, t, temperature):
    """mdistiller's KD loss: KL summed over classes, mean over the batch, times T^2."""
    kl = F.kl_div(F.log_softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1), reduction="none")
    return kl.sum(1).mean() * temperature ** 2


def released_ckd_loss(s, t, tau):
    """The CKD authors' released loss: teacher rows as anchors over normalised logits."""
    logits = F.normalize(t, dim=1) @ F.normalize(s, dim=1).T / tau
    return F.cross_entropy(logits, torch.arange(s.shape[0]))


class StandInMethod(StandInDistiller):
    """An mdistiller-style distiller: CE weight, distillation weight and loss as mdistiller's methods write them."""

    def __init__(self, student, teacher, ce_weight, weight, loss):
        super().__init__(student, teacher)
        self.ce_weight, self.weight, self.loss = ce_weight, weight, loss

    def forward_train(self, image, target, **kwargs):
        logits_student, _ = self.student(image)
        with torch.no_grad():
            logits_teacher, _ = self.teacher(image)
        return logits_student, {"loss_ce": self.ce_weight * F.cross_entropy(logits_student, target),
                                "loss_kd": self.weight * self.loss(logits_student, logits_teacher)}


def stand_in_train_iter(distiller, optimizer, image, target, epoch):
    """mdistiller's BaseTrainer.train_iter: the losses summed (each .mean()), one SGD step."""
    optimizer.zero_grad()
    preds, losses_dict = distiller(image=image, target=target, epoch=epoch)
    loss = sum(value.mean() for value in losses_dict.values())
    loss.backward()
    optimizer.step()
    return preds, loss.item()


# ---- models and configs -------------------------------------------------------------------------------------------

class Net(nn.Module):
    """mdistiller's model interface: forward returns (logits, features)."""

    def __init__(self, width, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(20, width), nn.BatchNorm1d(width), nn.ReLU())
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        feature = self.body(x)
        return self.fc(feature), {"pooled_feat": feature}


def node(**entries):
    return SimpleNamespace(**entries)


CASES = {
    # the released CKD config layout: CKD.TEMPERATURE with the weights under CKD.LOSS
    "CKD": (node(CKD=node(TEMPERATURE=2.0, LOSS=node(CE_WEIGHT=1.0, CL_WEIGHT=50.0))),
            lambda: (1.0, 50.0, lambda s, t: released_ckd_loss(s, t, 2.0))),
    # the flat layout (weights on the section itself, as mdistiller's DKD has them)
    "CKD-flat": (node(CKD=node(TEMPERATURE=1.0, CE_WEIGHT=0.5, CL_WEIGHT=10.0)),
                 lambda: (0.5, 10.0, lambda s, t: released_ckd_loss(s, t, 1.0))),
    "KD": (node(KD=node(TEMPERATURE=4, LOSS=node(CE_WEIGHT=0.1, KD_WEIGHT=0.9))),
           lambda: (0.1, 0.9, lambda s, t: mdistiller_kd_loss(s, t, 4.0))),
    "BICKD": (node(BICKD=node(TEMPERATURE=4.0, TAU=0.1, W_CLASS=0.5, LOSS=node(CE_WEIGHT=1.0, BICKD_WEIGHT=2.0))),
              lambda: (1.0, 2.0, lambda s, t: reference.bickd_loss(s, t, temperature=4.0, tau=0.1, w_class=0.5))),
}
CLASSES = {"CKD": ours.CKD, "CKD-flat": ours.CKD, "KD": ours.KD, "BICKD": ours.BicKD}


@pytest.mark.parametrize("case", list(CASES))
def test_contract_matches_the_stand_in(case):
    """The same learnable parameters, no extra parameters, the teacher kept in eval mode by train(), and in eval mode
    forward(image=...) is the student's logits."""
    cfg, _ = CASES[case]
    student, teacher = Net(16, 1), Net(32, 2)
    distiller = CLASSES[case](student, teacher, cfg)
    stand_in = StandInDistiller(student, teacher)
    assert distiller.get_learnable_parameters() == stand_in.get_learnable_parameters()
    assert distiller.get_extra_parameters() == stand_in.get_extra_parameters() == 0
    distiller.train()
    assert distiller.training and student.training and not teacher.training
    distiller.eval()
    x = torch.randn(8, 20)
    assert torch.equal(distiller(image=x), stand_in.eval()(image=x))


@pytest.mark.parametrize("case", list(CASES))
def test_stand_in_trainer_steps_equal_float64_training(case):
    """Three steps of the stand-in trainer (nn.DataParallel, SGD with momentum and weight decay) with the ckd_ext
    distiller reach the parameters, losses and loss-dict keys of the mdistiller-style distiller trained in float64."""
    cfg, expected = CASES[case]
    ce_weight, weight, loss = expected()
    student, teacher = Net(16, 1), Net(32, 2)
    teacher.eval()
    student64, teacher64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    distiller = nn.DataParallel(CLASSES[case](student, teacher, cfg))
    oracle = nn.DataParallel(StandInMethod(student64, teacher64, ce_weight, weight, loss))
    optimizers = [torch.optim.SGD(d.module.get_learnable_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
                  for d in (distiller, oracle)]
    distiller.train()
    oracle.train()
    g = torch.Generator().manual_seed(3)
    for epoch in range(1, 4):
        image, target = torch.randn(32, 20, generator=g), torch.randint(0, 10, (32,), generator=g)
        _, got = stand_in_train_iter(distiller, optimizers[0], image, target, epoch)
        _, want = stand_in_train_iter(oracle, optimizers[1], image.double(), target, epoch)
        assert abs(got - want) <= 1e-5 * abs(want), (epoch, got, want)
    _, losses = distiller.module.forward_train(image=image, target=target)
    assert set(losses) == {"loss_ce", "loss_kd"}
    for (name, p), q in zip(student.named_parameters(), student64.parameters()):
        assert torch.allclose(p.double(), q, rtol=1e-4, atol=1e-5 * q.abs().max().item()), name
    for p, q in zip(teacher.parameters(), teacher64.parameters()):
        assert torch.equal(p.double(), q)  # the teacher never moves


def test_config_accepts_dicts_and_reports_missing_sections():
    """A nested dict config works like a CfgNode; a config without the method's section is a KeyError naming it."""
    distiller = ours.CKD(Net(16, 1), Net(32, 2), {"CKD": {"TEMPERATURE": 2.0, "LOSS": {"CL_WEIGHT": 100.0}}})
    assert distiller.distill_weight == 100.0 and distiller.ce_weight == 1.0 and distiller.criterion.tau == 2.0
    with pytest.raises(KeyError, match="BICKD"):
        ours.BicKD(Net(16, 1), Net(32, 2), {"CKD": {}})


def test_example_runs(capsys):
    """examples/mdistiller_digits.py trains CKD for an epoch and reports a finite loss (the other methods' classes
    are the ones tested above)."""
    import importlib.util
    import math
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "examples" / "mdistiller_digits.py"
    spec = importlib.util.spec_from_file_location("mdistiller_digits", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    for method in ("CKD",):
        assert example.main(["--method", method, "--epochs", "1", "--teacher-epochs", "1"]) == 0
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert line.startswith(f"{method} epoch 1: mean train loss ")
        assert math.isfinite(float(line.split("mean train loss ")[1].split(",")[0]))
