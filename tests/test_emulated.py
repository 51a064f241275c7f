"""The CUDA kernels, run on CPU tensors by the CUDA emulator (inside ckd_ext.testing.emulated_cuda()), against
the float64 oracle: every configuration, fp32 / fp16 / bf16, masks, reductions, chunked strips. Small shapes:
the emulator runs each CUDA thread as an OS thread (about a thousand times slower than the CPU kernels)."""
import pytest
import torch

import ckd_ext
from inputs import CONFIGS, bickd_large_logit_gradients, loss_and_grad, pair, random_mask
from switches import on_backend, skip_unless
from tolerances import assert_matches, check_against_oracle

pytestmark = skip_unless("emulated")
# KD's other divergences change only the kernel's per-element math, shared with the CPU backend: their emulated
# cases are the few of tests/test_divergences.py (every divergence and dtype, one small shape).
ALL = [c for c in CONFIGS if "divergence" not in CONFIGS[c][1]]


@pytest.fixture(autouse=True)
def emulated_backend():
    """Every test here runs the fused ops through the emulated CUDA backend."""
    with on_backend("emulated"):
        yield


def test_the_switch_changes_the_backend():
    """The CUDA kernels (libm expf, block-tree sums) and the CPU kernels (a polynomial exp, 4-way sums) round
    differently: bitwise-equal gradients over 64 x 1000 elements would mean the switch did nothing."""
    student, teacher = pair(64, 1000, seed=9, dtype=torch.float32)
    _, emulated_grad = loss_and_grad(ckd_ext, "kd", student, teacher)
    module = ckd_ext.require_extension()
    module.set_emulated_cuda(False)
    try:
        _, cpu_grad = loss_and_grad(ckd_ext, "kd", student, teacher)
    finally:
        module.set_emulated_cuda(True)
    torch.testing.assert_close(emulated_grad, cpu_grad, rtol=1e-5, atol=1e-7)
    assert not torch.equal(emulated_grad, cpu_grad)


@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(config, dtype):
    student, teacher = pair(19, 37, seed=1)
    check_against_oracle(config, student, teacher, dtype=dtype)


@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("n,c", [(1, 5), (2, 1), (3, 3), (67, 100), (5, 1000)])
def test_shapes(config, n, c):
    student, teacher = pair(n, c, seed=n + c)
    check_against_oracle(config, student, teacher, dtype=torch.float32)


@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_masks_and_reductions(config, reduction):
    student, teacher = pair(2, 7, 23, seed=2)
    mask = random_mask((2, 7), seed=2)
    check_against_oracle(config, student, teacher, dtype=torch.float32, mask=mask,
                         reduction=reduction)


@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("scale", [10.0, 100.0])
def test_large_logits(config, scale):
    student, teacher = pair(12, 30, scale=scale, seed=3)
    check_against_oracle(config, student, teacher, dtype=torch.float32, scale=scale)


@pytest.mark.parametrize("config", ALL)
def test_no_valid_row(config):
    student, teacher = pair(4, 9, seed=4, dtype=torch.float32)
    loss, grad = loss_and_grad(ckd_ext, config, student, teacher, mask=torch.zeros(4, dtype=torch.bool))
    for part in loss if isinstance(loss, tuple) else (loss,):
        assert torch.equal(part, torch.zeros_like(part))
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_strips_and_blocks(config, dtype, workspace):
    """A tiny workspace makes the emulated kernels run over many strips and converted candidate blocks."""
    workspace(4 * 1024)
    student, teacher = pair(40, 30, seed=5)
    check_against_oracle(config, student, teacher, dtype=dtype, mask=random_mask(40, seed=5))


@pytest.mark.parametrize("symmetric", [False, True])
def test_bickd_gradient_at_large_logits(symmetric):
    """At softmax arguments of ~5e3 the CUDA kernels' gradient is within 2e-5 of the largest element (1.3e-7 at
    most here): they keep each row's softmax statistics as (max, log of the max-shifted sum) too, where one float32
    LSE per row makes gradient errors of 1.1e-3 / 3.3e-4 (symmetric False / True) of the largest element here (as
    test_ops' test_bickd_gradient_at_large_logits_sees_no_lse_rounding finds for the CPU kernels)."""
    grad, grad64 = bickd_large_logit_gradients((40, 120), 29, symmetric, "none")
    assert_matches(grad, grad64, torch.float32, "grad", tol=2e-5)



def test_epilogue_over_split_rows(workspace):
    """CKD's teacher anchors in strips of 16 against 2100 candidates: the CUDA epilogue splits each strip row into 2
    column chunks (cuda_backend.h, epilogue_split), whose statistics a second kernel merges; masked anchors and
    candidates included. (BicKD's class strips run the same two kernels; csrc/cuda_emulator/tests/test_ckd_kernels.cpp checks
    3-chunk rows, element-wise rows and the loss-only path against the CPU kernels. ~1 min emulated: 8k blocks.)"""
    n, c = 2100, 6
    budget = 2 * 16 * n * 4  # half of it holds a strip: 16 rows of n fp32 similarities
    plan = ckd_ext.require_extension().strip_plan("ckd_teacher", n, c, "float32", "emulated", budget, masked=True)
    assert plan["strip"] == 16 and not plan["whole"], plan
    workspace(budget)
    student, teacher = pair(n, c, seed=11)
    check_against_oracle("ckd_teacher", student, teacher, dtype=torch.float32, mask=random_mask(n, seed=11))
