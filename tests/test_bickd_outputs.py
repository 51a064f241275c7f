"""BicKD reduction="none" returns two outputs, (sample_terms, class_terms): backpropagating through only one of them
must give the gradient of that side alone, as the float64 oracle computes it (autograd hands the op's backward a
zero gradient, or None, for the unused output; either must mean "no contribution")."""
import pytest
import torch

import ckd_ext
from ckd_ext import reference as ref
from inputs import CONFIGS, pair, random_mask
from tolerances import assert_matches, tolerance

BICKD = [c for c in CONFIGS if CONFIGS[c][0] == "bickd"]


def one_side_grad(module, config, student, teacher, side, mask):
    """d (w . side_terms) / d student, the other output unused; distinct upstream weights per term."""
    _, kwargs = CONFIGS[config]
    sample_terms, class_terms = module.bickd_loss(student, teacher, **kwargs, mask=mask, reduction="none")
    used = {"sample": sample_terms, "class": class_terms}[side]
    weights = torch.rand(used.shape, generator=torch.Generator().manual_seed(31), dtype=torch.float64) + 0.5
    (grad,) = torch.autograd.grad((used * weights.to(used.dtype)).sum(), student)
    return used.detach(), grad


@pytest.mark.parametrize("config", BICKD)
@pytest.mark.parametrize("side", ["sample", "class"])
@pytest.mark.parametrize("dtype,masked", [(torch.float32, False), (torch.float32, True), (torch.float64, True)],
                         ids=["float32", "float32-mask", "float64-mask"])
def test_backward_through_one_output(config, side, dtype, masked):
    student, teacher = pair(3, 8, 13, seed=30)  # (B, L, C)
    mask = random_mask((3, 8), seed=30) if masked else None
    s = student.detach().to(dtype).requires_grad_()
    t = teacher.to(dtype)
    terms, grad = one_side_grad(ckd_ext, config, s, t, side, mask)
    s64 = s.detach().double().requires_grad_()
    terms64, grad64 = one_side_grad(ref, config, s64, t.double(), side, mask)
    assert_matches(terms, terms64, dtype, f"{config} {side} terms", tolerance(dtype))
    assert_matches(grad, grad64, dtype, f"{config} {side}-only grad", tolerance(dtype))

    _, kwargs = CONFIGS[config]
    if kwargs.get(f"w_{side}", 1.0) == 0:
        assert torch.equal(grad, torch.zeros_like(grad)), "a side of weight 0 has no gradient"
        return
    # The one-sided gradient is not the two-sided one (so a backward that used both sides regardless would fail):
    # the other side's own gradient is a sizeable part of the total.
    other = "class" if side == "sample" else "sample"
    other64 = one_side_grad(ref, config, s.detach().double().requires_grad_(), t.double(), other, mask)[1]
    if kwargs.get(f"w_{other}", 1.0) != 0:
        assert other64.abs().max() > 100 * tolerance(dtype) * grad64.abs().max()
