"""The fused ops on CUDA tensors against the float64 oracle and against the CPU kernels. Skipped, with the
reason shown, where no GPU is present (CI); the same kernels run on every commit under the emulator
(tests/test_emulated.py)."""
import pytest
import torch

import ckd_ext
from ckd_ext import reference as ref
from ckd_ext import testing
from inputs import CONFIGS, loss_and_grad, pair, random_mask, weighted_total
from switches import skip_unless
from tolerances import TOLERANCE, assert_matches, check_against_oracle

pytestmark = skip_unless("cuda")
ALL = list(CONFIGS)
# CPU and CUDA results are each within TOLERANCE[float32] of the oracle (relative to the largest magnitude), so
# within twice that of each other.
CPU_VS_CUDA = 2 * TOLERANCE[torch.float32]


def cuda_loss_and_grad(config, student, teacher, mask=None, **extra):
    """inputs.loss_and_grad on CUDA copies of CPU inputs; returns CPU tensors."""
    name, kwargs = CONFIGS[config]
    s = student.detach().cuda().requires_grad_()
    out = getattr(ckd_ext, f"{name}_loss")(s, teacher.cuda(), **kwargs, mask=None if mask is None else mask.cuda(),
                                          **extra)
    (grad,) = torch.autograd.grad(weighted_total(out), s)
    detached = tuple(o.detach().cpu() for o in out) if isinstance(out, tuple) else out.detach().cpu()
    return detached, grad.cpu()


def check_cuda_against_oracle(config, student, teacher, dtype, mask=None, tol=None, **extra):
    """The fused op on CUDA (inputs rounded to dtype) against the float64 oracle on the CPU, loss and gradient."""
    s, t = student.detach().to(dtype), teacher.detach().to(dtype)
    loss, grad = cuda_loss_and_grad(config, s, t, mask=mask, **extra)
    s64 = s.double().requires_grad_()
    loss64, grad64 = loss_and_grad(ref, config, s64, t.double(), mask=mask, **extra)
    assert_matches(loss, loss64, dtype, f"{config} loss", tol)
    assert_matches(grad, grad64, dtype, f"{config} grad", tol)


@pytest.fixture(params=[False, True], ids=["tf32_off", "tf32_on"])
def tf32(request):
    """fp32 GEMMs follow the user's setting (csrc/orchestration/gemm.h): TF32 rounds their operands to 10 mantissa
    bits (u = 2^-11), so with it on fp32 results get float16's tolerance (TOLERANCE: 1e-3, twice fp16's u)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = request.param
    try:
        yield request.param
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


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
@pytest.mark.parametrize("n,nbytes", [(151, 16 * 1024), (152, 16 * 1024), (42, 4 * 1024), (40, 13 * 1024)],
                         ids=["151-16KiB", "152-16KiB", "42-4KiB", "40-13KiB"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_small_workspace_strips_and_tiles(config, n, nbytes, dtype, reduction, tf32, workspace):
    """Several strips, tiles and operand blocks, each kind ending in a partial one (tests/test_chunking.py asserts
    the plans' sizes for these shapes: at 16 and 4 KiB the strips and tiles; at 13 KiB, N = 40, the whole 40 x 40
    matrix with the gradient in several output blocks), masked (operands copied) and with TF32 on and off."""
    if tf32 and dtype != torch.float32:
        pytest.skip("TF32 only changes fp32 GEMMs")
    student, teacher = pair(n, 32, seed=n + 1)
    mask = random_mask(n, seed=n) if n != 40 else None
    tol = TOLERANCE[torch.float16] if tf32 else None
    workspace(nbytes)
    check_cuda_against_oracle(config, student, teacher, dtype, mask=mask, tol=tol, reduction=reduction)


@pytest.mark.parametrize("case", testing.op_cases("sync", ["float32", "bfloat16"]), ids=repr)
def test_no_host_synchronisation(case):
    """Forward and backward of every configuration, dtype, mask and reduction run without a host synchronisation:
    under torch.cuda.set_sync_debug_mode("error") any .item(), host copy or synchronising call inside the ops
    raises (ckd_ext.testing.check_no_sync)."""
    assert testing.check_no_sync(case) == ""


@pytest.mark.parametrize("case", testing.op_cases("graph", ["float32", "bfloat16"]), ids=repr)
def test_captured_in_a_cuda_graph(case):
    """One forward + backward captured in a CUDA graph and replayed on new inputs equals an eager run on them
    (ckd_ext.testing.check_graph_replay: the same kernels, so equal within a few units of roundoff)."""
    assert testing.check_graph_replay(case) == ""


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
        (grad,) = torch.autograd.grad(weighted_total(out), s_base)
    stream.synchronize()
    outs = out if isinstance(out, tuple) else (out,)
    cpu_outs = loss_cpu if isinstance(loss_cpu, tuple) else (loss_cpu,)
    for o, e in zip(outs, cpu_outs):
        assert_matches(o.detach().cpu(), e.double(), torch.float32, f"{config} loss on a side stream", CPU_VS_CUDA)
    assert_matches(grad.cpu(), grad_cpu.double(), torch.float32, f"{config} grad on a side stream", CPU_VS_CUDA)
