"""ckd_ext's losses registered in torchdistill: built by torchdistill's own loss builders from config dicts and from
examples/torchdistill_ckd.yaml, they equal ckd_ext.reference in float64, and three steps of torchdistill's
DistillationBox with that config end at the parameters of the same steps taken in float64 with the reference.
Cost: ~5 s."""
import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchdistill")

import ckd_ext  # noqa: E402
from ckd_ext import reference  # noqa: E402

pytestmark = pytest.mark.skipif(not ckd_ext.is_available(), reason="needs the compiled extension")

from torchdistill.losses.registry import MIDDLE_LEVEL_LOSS_DICT, get_high_level_loss, get_mid_level_loss  # noqa: E402

import ckd_ext.integrations.torchdistill  # noqa: E402,F401  (registers the losses)

ROOT = Path(__file__).resolve().parents[1]


def example():
    spec = importlib.util.spec_from_file_location("torchdistill_digits", ROOT / "examples" / "torchdistill_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def io_dicts(student, teacher):
    return {".": {"output": student}}, {".": {"output": teacher}}


@pytest.mark.parametrize("key, kwargs, oracle", [
    ("ckd_ext.CKDLoss", {"tau": 0.5, "anchor": "teacher"},
     lambda s, t: reference.ckd_loss(s, t, tau=0.5, anchor="teacher")),
    ("ckd_ext.BicKDLoss", {"temperature": 2.0, "tau": 0.1, "w_class": 0.5},
     lambda s, t: reference.bickd_loss(s, t, temperature=2.0, tau=0.1, w_class=0.5)),
    ("ckd_ext.KDLoss", {"temperature": 4.0}, lambda s, t: reference.kd_loss(s, t, temperature=4.0)),
])
def test_registered_losses_equal_the_reference(key, kwargs, oracle):
    """Each key is in torchdistill's middle-level registry; the loss get_mid_level_loss builds, read from the I/O
    dicts' model outputs, equals the float64 reference, and so does the student gradient."""
    assert key in MIDDLE_LEVEL_LOSS_DICT
    criterion = get_mid_level_loss({"key": key, "kwargs": kwargs})
    torch.manual_seed(0)
    student = torch.randn(48, 10, requires_grad=True)
    teacher = torch.randn(48, 10) * 2
    loss = criterion(*io_dicts(student, teacher))
    loss.backward()
    s64 = student.detach().double().requires_grad_()
    expected = oracle(s64, teacher.double())
    expected.backward()
    assert abs(loss.item() - expected.item()) <= 1e-5 * abs(expected.item())
    assert torch.allclose(student.grad.double(), s64.grad, rtol=1e-4, atol=1e-6 * s64.grad.abs().max().item())


def test_unknown_keyword_is_refused():
    """A keyword the ckd_ext module does not take fails when torchdistill builds the loss, naming it."""
    with pytest.raises(TypeError, match="temprature"):
        get_mid_level_loss({"key": "ckd_ext.KDLoss", "kwargs": {"temprature": 4.0}})


def test_config_criterion_is_the_weighted_sum():
    """The example config's criterion, built by torchdistill's get_high_level_loss, is CE + 10 * CKD + 0 * KD."""
    config = example().load_config()
    criterion = get_high_level_loss(config["train"]["criterion"])
    torch.manual_seed(1)
    student, teacher, labels = torch.randn(32, 10), torch.randn(32, 10), torch.randint(0, 10, (32,))
    student_io, teacher_io = io_dicts(student, teacher)
    loss = criterion({"student": student_io, "teacher": teacher_io}, {}, labels)
    s, t = student.double(), teacher.double()
    expected = F.cross_entropy(s, labels) + 10 * reference.ckd_loss(s, t, tau=1.0, anchor="teacher")
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()


def test_distillation_box_steps_equal_float64_training():
    """Three steps of torchdistill's DistillationBox (its loop, SGD with momentum, the example config with its KD
    weight set to 0.5) leave the student at the parameters that the same steps reach in float64 with the reference
    losses: CE + 10 * CKD(teacher anchor, tau 1) + 0.5 * KD(T = 4)."""
    ex = example()
    config = ex.load_config()
    train = config["train"]
    train["criterion"]["kwargs"]["sub_terms"]["kd"]["weight"] = 0.5
    train["train_data_loader"]["sampler"]["class_or_func"] = torch.utils.data.SequentialSampler
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(192, 64, generator=g), torch.randint(0, 10, (192,), generator=g)
    teacher, student = ex.mlp(64, seed=0).eval(), ex.mlp(32, seed=1)
    teacher64, student64 = copy.deepcopy(teacher).double(), copy.deepcopy(student).double()

    box = ex.distillation_box(config, teacher, student, torch.utils.data.TensorDataset(x, y))
    losses = ex.train_epoch(box, epoch=0)
    assert len(losses) == 3

    optimizer = torch.optim.SGD(student64.parameters(), lr=0.05, momentum=0.9)
    expected_losses = []
    for step in range(3):
        xb, yb = x[64 * step:64 * (step + 1)].double(), y[64 * step:64 * (step + 1)]
        with torch.no_grad():
            t = teacher64(xb)
        s = student64(xb)
        loss = (F.cross_entropy(s, yb) + 10 * reference.ckd_loss(s, t, tau=1.0, anchor="teacher")
                + 0.5 * reference.kd_loss(s, t, temperature=4.0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        expected_losses.append(loss.item())
    for got, want in zip(losses, expected_losses):
        assert abs(got - want) <= 1e-5 * want, (losses, expected_losses)
    for (name, p), q in zip(student.named_parameters(), student64.parameters()):
        assert torch.allclose(p.double(), q, rtol=1e-4, atol=1e-5 * q.abs().max().item()), name
    assert not torch.equal(student[0].weight, ex.mlp(32, seed=1)[0].weight)  # it trained


def test_example_runs(capsys):
    """examples/torchdistill_digits.py trains with the example config for an epoch through torchdistill's loop."""
    assert example().main(["--epochs", "1", "--teacher-epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "10.0 * CKDLoss(.:output)" in out and "epoch 0: loss " in out
