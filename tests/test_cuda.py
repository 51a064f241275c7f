"""The fused ops on CUDA tensors against the float64 oracle and against the CPU kernels. Skipped, with the
reason shown, where no GPU is present (CI); the same kernels run on every commit under the emulator
(tests/test_emulated.py)."""
import pytest
import torch

import ckd_ext
from ckd_ext import reference as ref
from helpers import CONFIGS, TOLERANCE, assert_matches, check_against_oracle, loss_and_grad, pair, random_mask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
ALL = list(CONFIGS)
# CPU and CUDA results are each within TOLERANCE[float32] of the oracle (relative to the largest magnitude), so
# within twice that of each other.
CPU_VS_CUDA = 2 * TOLERANCE[torch.float32]


def weighted_total_on_device(out, seed=0):
    """helpers.weighted_total with the weights on the outputs' device: the same weights (same generator, same draws),
    so results compare with helpers.loss_and_grad on the CPU. (helpers.weighted_total keeps its weights on the CPU,
    which only works for 0-dimensional outputs: a CUDA "none" output times a CPU vector is a device error.)"""
    outs = out if isinstance(out, tuple) else (out,)
    generator = torch.Generator().manual_seed(seed + 11)
    total = 0
    for o in outs:
        w = torch.rand(o.shape, generator=generator, dtype=torch.float64) + 0.5
        total = total + (o * w.to(device=o.device, dtype=o.dtype)).sum()
    return total


def cuda_loss_and_grad(config, student, teacher, mask=None, **extra):
    """helpers.loss_and_grad on CUDA copies of CPU inputs; returns CPU tensors."""
    name, kwargs = CONFIGS[config]
    s = student.detach().cuda().requires_grad_()
    out = getattr(ckd_ext, f"{name}_loss")(s, teacher.cuda(), **kwargs, mask=None if mask is None else mask.cuda(),
                                          **extra)
    (grad,) = torch.autograd.grad(weighted_total_on_device(out), s)
    detached = tuple(o.detach().cpu() for o in out) if isinstance(out, tuple) else out.detach().cpu()
    return detached, grad.cpu()


def check_cuda_against_oracle(config, student, teacher, dtype, mask=None, **extra):
    """The fused op on CUDA (inputs rounded to dtype) against the float64 oracle on the CPU, loss and gradient."""
    s, t = student.detach().to(dtype), teacher.detach().to(dtype)
    loss, grad = cuda_loss_and_grad(config, s, t, mask=mask, **extra)
    s64 = s.double().requires_grad_()
    loss64, grad64 = loss_and_grad(ref, config, s64, t.double(), mask=mask, **extra)
    assert_matches(loss, loss64, dtype, f"{config} loss")
    assert_matches(grad, grad64, dtype, f"{config} grad")


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
    mask = random_mask((4, 9), seed=5)
    check_cuda_against_oracle(config, student, teacher, torch.float32, mask=mask, reduction=reduction)


@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("n,nbytes", [(151, 16 * 1024), (152, 16 * 1024), (42, 4 * 1024)],
                         ids=["151-16KiB", "152-16KiB", "42-4KiB"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_small_workspace_strips_and_tiles(config, n, nbytes, dtype, reduction):
    """Several strips, tiles and converted blocks, each kind ending in a partial one (tests/test_chunking.py has
    the sizes: C = 32 gives float32 strips of 13 rows and student-anchor tiles of 16 at 16 KiB, 8 and 4 at 4 KiB;
    float16 inputs add converted candidate blocks)."""
    student, teacher = pair(n, 32, seed=n + 1)
    mask = random_mask(n, seed=n)
    saved = ckd_ext.workspace_bytes()
    ckd_ext.set_workspace_bytes(nbytes)
    try:
        check_cuda_against_oracle(config, student, teacher, dtype, mask=mask, reduction=reduction)
    finally:
        ckd_ext.set_workspace_bytes(saved)


@pytest.mark.parametrize("config", ALL)
def test_matches_cpu_and_is_deterministic(config):
    student, teacher = pair(300, 500, seed=6, dtype=torch.float32)
    loss_cpu, grad_cpu = loss_and_grad(ckd_ext, config, student, teacher)
    runs = [cuda_loss_and_grad(config, student, teacher) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]), "two runs on the same inputs give different losses"
    assert torch.equal(runs[0][1], runs[1][1]), "two runs on the same inputs give different gradients"
    assert_matches(runs[0][0], loss_cpu.double(), torch.float32, f"{config} CUDA loss vs CPU", CPU_VS_CUDA)
    assert_matches(runs[0][1], grad_cpu.double(), torch.float32, f"{config} CUDA grad vs CPU", CPU_VS_CUDA)


@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_uses_the_current_stream(config, reduction):
    """Forward and backward on a side stream whose inputs are produced after a long sleep on that stream: an op
    that ran on another stream would read them before they exist. Loss and gradient must be the CPU's."""
    name, kwargs = CONFIGS[config]
    student, teacher = pair(64, 128, seed=7, dtype=torch.float32)
    loss_cpu, grad_cpu = loss_and_grad(ckd_ext, config, student, teacher, reduction=reduction)
    s_base = student.detach().cuda().requires_grad_()
    t_base = teacher.cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(100_000_000)  # ~0.1 s of GPU cycles queued before the inputs below
        s = s_base * 1.0
        t = t_base * 1.0
        out = getattr(ckd_ext, f"{name}_loss")(s, t, **kwargs, reduction=reduction)
        (grad,) = torch.autograd.grad(weighted_total_on_device(out), s_base)
    stream.synchronize()
    outs = out if isinstance(out, tuple) else (out,)
    cpu_outs = loss_cpu if isinstance(loss_cpu, tuple) else (loss_cpu,)
    for o, e in zip(outs, cpu_outs):
        assert_matches(o.detach().cpu(), e.double(), torch.float32, f"{config} loss on a side stream", CPU_VS_CUDA)
    assert_matches(grad.cpu(), grad_cpu.double(), torch.float32, f"{config} grad on a side stream", CPU_VS_CUDA)
