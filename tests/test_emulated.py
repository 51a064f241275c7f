"""The CUDA kernels, run on CPU tensors by the CUDA emulator (ckd_ext.emulated), against the float64
oracle: every configuration, fp32 / fp16 / bf16, masks, reductions, chunked strips. Small shapes: the
emulator runs each CUDA thread as an OS thread (about a thousand times slower than the CPU kernels)."""
import pytest
import torch

import ckd_ext
import ckd_ext.emulated as emulated
from helpers import CONFIGS, check_against_oracle, loss_and_grad, pair, random_mask

pytestmark = pytest.mark.skipif(
    not emulated.is_available(),
    reason="ckd_ext.emulated not built (CKD_EXT_EMULATED=1 pip install --no-build-isolation -e .)",
)
ALL = list(CONFIGS)


@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(config, dtype):
    student, teacher = pair(19, 37, seed=1)
    check_against_oracle(config, student, teacher, dtype=dtype, module=emulated)


@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("n,c", [(1, 5), (2, 1), (3, 3), (67, 100), (5, 1000)])
def test_shapes(config, n, c):
    student, teacher = pair(n, c, seed=n + c)
    check_against_oracle(config, student, teacher, dtype=torch.float32, module=emulated)


@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_masks_and_reductions(config, reduction):
    student, teacher = pair(2, 7, 23, seed=2)
    mask = random_mask((2, 7), seed=2)
    check_against_oracle(config, student, teacher, dtype=torch.float32, module=emulated, mask=mask,
                         reduction=reduction)


@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("scale", [10.0, 100.0])
def test_large_logits(config, scale):
    student, teacher = pair(12, 30, scale=scale, seed=3)
    check_against_oracle(config, student, teacher, dtype=torch.float32, scale=scale, module=emulated)


@pytest.mark.parametrize("config", ALL)
def test_no_valid_row(config):
    student, teacher = pair(4, 9, seed=4, dtype=torch.float32)
    loss, grad = loss_and_grad(emulated, config, student, teacher, mask=torch.zeros(4, dtype=torch.bool))
    for part in loss if isinstance(loss, tuple) else (loss,):
        assert torch.equal(part, torch.zeros_like(part))
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_strips_and_blocks(config, dtype):
    """A tiny workspace (ckd_ext._emulated has its own budget, separate from ckd_ext._C's) makes the emulated
    kernels run over many strips and converted candidate blocks."""
    emulated_module = ckd_ext._extension.emulated_module.require()
    saved = emulated_module.workspace_bytes()
    emulated_module.set_workspace_bytes(4 * 1024)
    try:
        student, teacher = pair(40, 30, seed=5)
        check_against_oracle(config, student, teacher, dtype=dtype, module=emulated,
                             mask=random_mask(40, seed=5))
    finally:
        emulated_module.set_workspace_bytes(saved)
