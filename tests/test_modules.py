"""The nn.Module wrappers (CKDLoss, BicKDLoss, KDLoss) against their functions and the float64 oracle: every
reduction, with and without a mask, non-default hyperparameters. A module runs exactly its function's code
path, so loss and gradient must be bitwise equal to the function's; a module that dropped its mask, its
reduction or one of its hyperparameters would differ (each case also asserts that the mask and the reduction
change the result, so that the bitwise comparison cannot pass by coincidence)."""
import pytest
import torch

import ckd_ext
from ckd_ext import reference as ref
from inputs import pair, random_mask, weighted_total
from tolerances import assert_matches, tolerance

# (module class, function name, hyperparameters): none of them the default, so a module that forgot to pass
# one on would compute another loss.
MODULES = {
    "ckd_teacher": (ckd_ext.CKDLoss, "ckd_loss", {"tau": 0.5, "anchor": "teacher"}),
    "ckd_student": (ckd_ext.CKDLoss, "ckd_loss", {"tau": 0.3, "anchor": "student"}),
    "kd": (ckd_ext.KDLoss, "kd_loss", {"temperature": 2.5}),
    "bickd_symmetric": (ckd_ext.BicKDLoss, "bickd_loss",
                        {"temperature": 2.0, "tau": 0.3, "w_sample": 0.7, "w_class": 1.3, "symmetric": True}),
    "bickd": (ckd_ext.BicKDLoss, "bickd_loss", {"temperature": 3.0, "tau": 0.2, "w_sample": 1.2, "w_class": 0.4}),
}
REDUCTIONS = ["mean", "sum", "none"]
SHAPE = (3, 7, 20)  # a (B, L, C) token batch with a (B, L) mask


def output_and_grad(fn, student, teacher, **kwargs):
    """(detached output, d weighted_total / d student): distinct upstream weights per term for "none"."""
    out = fn(student, teacher, **kwargs)
    (grad,) = torch.autograd.grad(weighted_total(out), student)
    return (tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()), grad


def parts(out):
    return out if isinstance(out, tuple) else (out,)


def assert_bitwise(actual, expected, what):
    for a, e in zip(parts(actual), parts(expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what}: {a.dtype}{tuple(a.shape)} vs {e.dtype}{tuple(e.shape)}"
        assert torch.equal(a, e), f"{what}: max difference {(a.double() - e.double()).abs().max().item():.3e}"


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
def test_module_equals_function_and_oracle(name, reduction, masked):
    cls, fn_name, hyper = MODULES[name]
    student, teacher = pair(*SHAPE, seed=21, dtype=torch.float32)
    mask = random_mask(SHAPE[:-1], seed=21) if masked else None
    module = cls(**hyper, reduction=reduction)
    function = getattr(ckd_ext, fn_name)

    # The module with the mask passed positionally, as forward(student, teacher, mask) documents.
    mod_out, mod_grad = output_and_grad(lambda s, t: module(s, t, mask), student, teacher)
    fn_out, fn_grad = output_and_grad(function, student, teacher, **hyper, mask=mask, reduction=reduction)
    assert_bitwise(mod_out, fn_out, f"{name} loss")
    assert_bitwise(mod_grad, fn_grad, f"{name} grad")

    # And both are the float64 oracle's numbers (same rounded inputs), float32 tolerance (tolerances.TOLERANCE).
    s64 = student.detach().double().requires_grad_()
    ref_out, ref_grad = output_and_grad(getattr(ref, fn_name), s64, teacher.double(), **hyper, mask=mask,
                                        reduction=reduction)
    assert_matches(mod_out, ref_out, torch.float32, f"{name} loss vs oracle", tolerance(torch.float32))
    assert_matches(mod_grad, ref_grad, torch.float32, f"{name} grad vs oracle", tolerance(torch.float32))

    # The mask and the reduction matter on these inputs, so a module ignoring either could not match.
    if masked:
        unmasked, _ = output_and_grad(function, student, teacher, **hyper, reduction=reduction)
        assert not all(torch.equal(a, b) for a, b in zip(parts(unmasked), parts(fn_out)))
    other = "sum" if reduction == "mean" else "mean"
    other_out, _ = output_and_grad(function, student, teacher, **hyper, mask=mask, reduction=other)
    if reduction == "none":
        assert isinstance(mod_out, tuple) == (fn_name == "bickd_loss")
        assert parts(mod_out)[0].shape == SHAPE[:-1]
    else:
        assert not torch.equal(other_out, fn_out)


@pytest.mark.parametrize("name", MODULES)
def test_module_hyperparameters_matter(name):
    """Each hyperparameter given to the module reaches the op: changing any one of them changes the loss."""
    cls, fn_name, hyper = MODULES[name]
    student, teacher = pair(12, 9, seed=22, dtype=torch.float32)
    base = cls(**hyper)(student, teacher)
    changed = {"tau": 0.9, "anchor": "student" if hyper.get("anchor") == "teacher" else "teacher",
               "temperature": 1.5, "w_sample": 0.25, "w_class": 2.0, "symmetric": not hyper.get("symmetric")}
    for key in hyper:
        other = cls(**{**hyper, key: changed[key]})(student, teacher)
        expected = getattr(ref, fn_name)(student.detach().double(), teacher.double(),
                                         **{**hyper, key: changed[key]})
        assert_matches(other.detach(), expected, torch.float32, f"{name} with {key}={changed[key]}")
        assert not torch.equal(other, base), f"{name}: {key} had no effect"
