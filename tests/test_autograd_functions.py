"""ckd_ext.autograd: the losses' autograd.Function classes (what the public losses call in eager mode) against the
float64 oracle, for every reduction, with the forward's precomputed gradient and without; their gradient output is
not differentiable, a second derivative raises, and torch.compile(fullgraph=True) traces them."""
import pytest
import torch

import ckd_ext
from ckd_ext import reference as ref
from inputs import pair, random_mask
from tolerances import assert_matches

pytestmark = pytest.mark.skipif(not ckd_ext.is_available(), reason="ckd_ext is not built")


def apply(name, s, t, mask, reduction, compute_grad):
    from ckd_ext.autograd import BicKDFunction, CKDFunction, KDFunction
    if name == "ckd":
        return CKDFunction.apply(s, t, mask, 0.5, "student", reduction, compute_grad)[0]
    if name == "ckd_teacher":
        return CKDFunction.apply(s, t, mask, 0.5, "teacher", reduction, compute_grad)[0]
    if name == "kd":
        return KDFunction.apply(s, t, mask, 4.0, "forward_kl", 0.0, 0.0, True, reduction, compute_grad)[0]
    loss, class_terms, _ = BicKDFunction.apply(s, t, mask, 4.0, 0.1, 1.0, 1.0, False, reduction, compute_grad)
    return (loss, class_terms) if reduction == "none" else loss


def oracle(name, s, t, mask, reduction):
    if name.startswith("ckd"):
        return ref.ckd_loss(s, t, tau=0.5, anchor="teacher" if name == "ckd_teacher" else "student", mask=mask,
                            reduction=reduction)
    if name == "kd":
        return ref.kd_loss(s, t, temperature=4.0, mask=mask, reduction=reduction)
    return ref.bickd_loss(s, t, temperature=4.0, tau=0.1, mask=mask, reduction=reduction)


def total(out):
    """A scalar with distinct weights per term, so that "none" gradients are checked term by term."""
    outs = out if isinstance(out, tuple) else (out,)
    return sum((o * torch.linspace(0.5, 1.5, o.numel(), dtype=o.dtype).reshape(o.shape)).sum() for o in outs)


@pytest.mark.parametrize("name", ["ckd", "ckd_teacher", "kd", "bickd"])
@pytest.mark.parametrize("reduction,compute_grad", [("mean", True), ("mean", False), ("sum", True), ("none", False)])
@pytest.mark.parametrize("masked", [False, True])
def test_functions_match_the_oracle(name, reduction, compute_grad, masked):
    # float32 against float64 on O(1) logits (N = 24, C = 40): the suite's float32 tolerance (tolerances.tolerance).
    student, teacher = pair(24, 40, seed=7, dtype=torch.float32)
    mask = random_mask(24, seed=2) if masked else None
    s = student.clone().requires_grad_()
    out = apply(name, s, teacher, mask, reduction, compute_grad)
    (grad,) = torch.autograd.grad(total(out), s)
    s64 = student.double().requires_grad_()
    out64 = oracle(name, s64, teacher.double(), mask, reduction)
    (grad64,) = torch.autograd.grad(total(out64), s64)
    assert_matches(total(out).detach(), total(out64).detach(), torch.float32, f"{name} loss")
    assert_matches(grad, grad64, torch.float32, f"{name} grad")


def test_gradient_output_is_not_differentiable_and_second_derivatives_raise():
    from ckd_ext.autograd import CKDFunction
    student, teacher = pair(8, 12, seed=1, dtype=torch.float32)
    s = student.clone().requires_grad_()
    loss, grad = CKDFunction.apply(s, teacher, None, 1.0, "student", "mean", True)
    assert loss.requires_grad and not grad.requires_grad
    (g,) = torch.autograd.grad(loss, s, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through ckd_ext losses is not supported"):
        g.sum().backward()


def test_compiled_fullgraph_traces_the_functions():
    from ckd_ext.autograd import KDFunction
    student, teacher = pair(16, 20, seed=3, dtype=torch.float32)

    def f(s, t):
        return KDFunction.apply(s, t, None, 4.0, "forward_kl", 0.0, 0.0, True, "mean", True)[0]

    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    eager = f(s1, teacher)
    eager.backward()
    compiled = torch.compile(f, fullgraph=True)(s2, teacher)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    torch.testing.assert_close(s2.grad, s1.grad, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["ckd", "kd", "bickd"])
def test_gradient_output_never_changes_after_backward(name):
    """Invariant: the gradient tensor a Function hands out keeps its value: a backward with an upstream gradient of 3
    ((3 * loss).backward()) and a second backward (retain_graph=True) leave it as it was, and each backward's
    gradient is the right one (3x, then 3x again accumulated)."""
    from ckd_ext.autograd import BicKDFunction, CKDFunction, KDFunction
    student, teacher = pair(12, 16, seed=4, dtype=torch.float32)
    s = student.detach().clone().requires_grad_()
    if name == "ckd":
        loss, grad = CKDFunction.apply(s, teacher, None, 0.5, "student", "mean", True)
    elif name == "kd":
        loss, grad = KDFunction.apply(s, teacher, None, 4.0, "forward_kl", 0.0, 0.0, True, "mean", True)
    else:
        loss, _, grad = BicKDFunction.apply(s, teacher, None, 4.0, 0.1, 1.0, 1.0, False, "mean", True)
    handed_out = grad.clone()
    (3 * loss).backward(retain_graph=True)
    assert torch.equal(grad, handed_out)
    torch.testing.assert_close(s.grad, 3 * handed_out)
    (3 * loss).backward()
    assert torch.equal(grad, handed_out)
    torch.testing.assert_close(s.grad, 6 * handed_out)


def test_public_loss_gradients_are_right_on_every_backward():
    """Invariant: through the public loss (which scales its private gradient in place), a first backward with an
    upstream 3 and a retained second one each add 3x the unit gradient."""
    student, teacher = pair(12, 16, seed=5, dtype=torch.float32)
    unit = student.detach().clone().requires_grad_()
    ckd_ext.ckd_loss(unit, teacher).backward()
    s = student.detach().clone().requires_grad_()
    loss = ckd_ext.ckd_loss(s, teacher)
    (3 * loss).backward(retain_graph=True)
    first = s.grad.clone()
    (3 * loss).backward()
    torch.testing.assert_close(first, 3 * unit.grad)
    torch.testing.assert_close(s.grad, 6 * unit.grad)
