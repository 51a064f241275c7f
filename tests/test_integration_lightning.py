"""Lightning DDP with global_batch=True equals one process on the concatenated batch: examples/lightning_digits.py on 2
CPU processes (gloo) logs the losses and reaches the student parameters of the same 3 SGD steps taken in float64 on
one process with ckd_ext.reference on each global batch of 64. Cost: ~30 s (one 2-process Lightning run)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lightning")
pytest.importorskip("sklearn")

import ckd_ext  # noqa: E402
from ckd_ext import reference  # noqa: E402

pytestmark = pytest.mark.skipif(not ckd_ext.is_available(), reason="needs the compiled extension")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lightning_digits.py"
STEPS, BATCH, TEACHER_EPOCHS = 3, 64, 5


def example():
    spec = importlib.util.spec_from_file_location("lightning_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def float64_training(ex, ranks_for_ckd):
    """The losses and student of STEPS SGD steps in float64 on the global batches (the union of the ranks' shares),
    CKD computed over `ranks_for_ckd` separate groups of rows (1: the global batch)."""
    x, y = ex.digits()
    teacher = ex.pretrained_teacher(x, y, TEACHER_EPOCHS).double()
    student = ex.mlp(32, seed=1).double()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # DistributedSampler's, seed 0
    losses = []
    for step in range(STEPS):
        rows = order[step * BATCH:(step + 1) * BATCH]
        s = student(x[rows].double())
        with torch.no_grad():
            t = teacher(x[rows].double())
        parts = [reference.ckd_loss(s[r::ranks_for_ckd], t[r::ranks_for_ckd], tau=1.0, anchor="teacher")
                 for r in range(ranks_for_ckd)]
        loss = F.cross_entropy(s, y[rows]) + 10.0 * sum(parts) / ranks_for_ckd
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, student


def test_ddp_global_batch_equals_one_process_float64(tmp_path):
    """2 gloo processes, 32 rows each, global_batch=True: logged (rank-averaged) losses and final student parameters
    equal float64 single-process training on the 64-row global batches; with CKD per rank instead (the local mode's
    loss) the float64 losses differ, so the comparison discriminates."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--devices", "2", "--global-batch", "true", "--steps", str(STEPS),
         "--batch-size", str(BATCH), "--teacher-epochs", str(TEACHER_EPOCHS), "--out", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es), 3 steps" in result.stdout
    losses = json.loads((tmp_path / "losses.json").read_text())
    state = torch.load(tmp_path / "student.pt")

    ex = example()
    expected_losses, student64 = float64_training(ex, ranks_for_ckd=1)
    for got, want in zip(losses, expected_losses):
        assert abs(got - want) <= 1e-5 * want, (losses, expected_losses)
    for name, q in student64.state_dict().items():
        assert torch.allclose(state[name].double(), q, rtol=1e-4, atol=1e-5 * q.abs().max().item()), name
    local_losses, _ = float64_training(ex, ranks_for_ckd=2)
    assert abs(local_losses[0] - expected_losses[0]) > 1e-3 * expected_losses[0]
