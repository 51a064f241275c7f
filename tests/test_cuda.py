"""The fused ops on CUDA tensors against the float64 oracle and against the CPU kernels. Skipped, with the
reason shown, where no GPU is present (CI); the same kernels run on every commit under the emulator
(tests/test_emulated.py)."""
import pytest
import torch

import ckd_ext
from helpers import CONFIGS, check_against_oracle, loss_and_grad, pair, random_mask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
ALL = list(CONFIGS)


@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n,c", [(1, 5), (67, 100), (257, 1000), (64, 4099)])
def test_against_oracle(config, dtype, n, c):
    student, teacher = pair(n, c, seed=n + c)
    check_against_oracle(config, student.cuda(), teacher.cuda(), dtype=dtype)


@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_masks_and_reductions(config, reduction):
    student, teacher = pair(4, 9, 30, seed=5)
    mask = random_mask((4, 9), seed=5).cuda()
    check_against_oracle(config, student.cuda(), teacher.cuda(), dtype=torch.float32, mask=mask, reduction=reduction)


@pytest.mark.parametrize("config", ALL)
def test_matches_cpu_and_is_deterministic(config):
    student, teacher = pair(300, 500, seed=6, dtype=torch.float32)
    loss_cpu, grad_cpu = loss_and_grad(ckd_ext, config, student, teacher)
    s = student.detach().cuda().requires_grad_()
    runs = [loss_and_grad(ckd_ext, config, s, teacher.cuda()) for _ in range(2)]
    assert torch.equal(runs[0][1], runs[1][1]), "two runs on the same inputs differ"
    torch.testing.assert_close(runs[0][1].cpu(), grad_cpu, rtol=1e-4, atol=1e-7)


def test_uses_the_current_stream():
    student, teacher = pair(64, 128, seed=7, dtype=torch.float32)
    s = student.detach().cuda().requires_grad_()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        loss = ckd_ext.ckd_loss(s, teacher.cuda())
        loss.backward()
    stream.synchronize()
    expected = ckd_ext.ckd_loss(student, teacher)
    torch.testing.assert_close(loss.cpu(), expected.detach(), rtol=1e-5, atol=1e-6)
