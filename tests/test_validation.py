"""Bad input gets a clear TypeError / ValueError naming the argument, raised by the shared validation
before any work, identically from the reference and the fused ops."""
import pytest
import torch

import ckd_ext
from ckd_ext import reference

IMPLEMENTATIONS = [pytest.param(reference, id="reference"), pytest.param(ckd_ext, id="fused")]


# --------------------------------------------------------------------------------------------------
# Validation (every error of the conventions)
# --------------------------------------------------------------------------------------------------

GOOD_S = torch.randn(4, 3)
GOOD_T = torch.randn(4, 3)


# The hyperparameters each public loss takes (besides student, teacher, mask and reduction).
OWN_ARGUMENTS = {
    "kd_loss": {"temperature"},
    "ckd_loss": {"tau", "anchor"},
    "bickd_loss": {"temperature", "tau", "w_sample", "w_class", "symmetric"},
}


def losses_taking(arguments):
    """The public losses that take all of ``arguments``."""
    shared = {"student", "teacher", "mask", "reduction"}
    return [name for name, own in OWN_ARGUMENTS.items() if set(arguments) <= own | shared]


INVALID = [
    # (overrides, exception, pattern in the message)
    (dict(student=[[1.0, 2.0]]), TypeError, "student must be a torch.Tensor"),
    (dict(teacher=3.0), TypeError, "teacher must be a torch.Tensor"),
    (dict(student=torch.ones(4, 3, dtype=torch.int64)), TypeError, "student must be a floating"),
    (dict(teacher=torch.ones(4, 3, dtype=torch.int32)), TypeError, "teacher must be a floating"),
    (dict(student=torch.ones(4, 3, dtype=torch.complex64)), TypeError, "student must be a floating"),
    (dict(student=torch.tensor(1.0), teacher=torch.tensor(1.0)), ValueError, "student must have at least 1"),
    (dict(teacher=torch.randn(4, 4)), ValueError, "teacher must have the same shape"),
    (dict(teacher=torch.randn(3, 4, 3)), ValueError, "teacher must have the same shape"),
    (dict(student=torch.randn(4, 0), teacher=torch.randn(4, 0)), ValueError, "student must have at least one class"),
    (dict(teacher=torch.randn(4, 3, device="meta")), ValueError, "teacher must be on the same device"),
    (dict(mask=[True] * 4), TypeError, "mask must be a torch.Tensor"),
    (dict(mask=torch.ones(4)), TypeError, "mask must have dtype torch.bool"),
    (dict(mask=torch.ones(4, 3, dtype=torch.bool)), ValueError, "mask must have the shape"),
    (dict(mask=torch.ones(3, dtype=torch.bool)), ValueError, "mask must have the shape"),
    # The right number of elements (6) in the wrong shape for a (2, 3, C) student: not reshaped, rejected.
    (dict(student=torch.randn(2, 3, 5), teacher=torch.randn(2, 3, 5), mask=torch.ones(3, 2, dtype=torch.bool)),
     ValueError, r"mask must have the shape of student without its last dimension \(2, 3\), got \(3, 2\)"),
    (dict(student=torch.randn(2, 3, 5), teacher=torch.randn(2, 3, 5), mask=torch.ones(6, dtype=torch.bool)),
     ValueError, r"mask must have the shape of student without its last dimension \(2, 3\), got \(6,\)"),
    (dict(mask=torch.ones(4, dtype=torch.bool, device="meta")), ValueError, "mask must be on the same device"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(reduction=None), ValueError, "reduction must be one of"),
    (dict(anchor="both"), ValueError, "anchor must be one of"),
    (dict(tau=0.0), ValueError, "tau must be a finite number > 0"),
    (dict(tau=-1.0), ValueError, r"tau must be a finite number > 0, got -1\.0"),
    (dict(tau=float("inf")), ValueError, "tau must be a finite number > 0"),
    (dict(tau=float("nan")), ValueError, "tau must be a finite number > 0"),
    (dict(tau=True), TypeError, "tau must be a Python number"),
    (dict(tau=torch.tensor(1.0)), TypeError, "tau must be a Python number"),
    (dict(temperature=0), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature=float("-inf")), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature="4"), TypeError, "temperature must be a Python number"),
    (dict(w_sample=-0.5), ValueError, "w_sample must be a finite number >= 0"),
    (dict(w_class=float("nan")), ValueError, "w_class must be a finite number >= 0"),
    (dict(w_class=False), TypeError, "w_class must be a Python number"),
    (dict(w_sample=0.0, w_class=0), ValueError, "w_sample and w_class must not both be 0"),
    (dict(symmetric=1), TypeError, "symmetric must be a bool"),
]


@pytest.mark.parametrize("overrides, error, pattern", INVALID,
                         ids=[f"{i}-{pattern[:30]}" for i, (_, _, pattern) in enumerate(INVALID)])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_validation_errors(impl, overrides, error, pattern):
    kwargs = dict(overrides)
    student, teacher = kwargs.pop("student", GOOD_S), kwargs.pop("teacher", GOOD_T)
    names = losses_taking(overrides)
    assert names, overrides
    for name in names:
        with pytest.raises(error, match=f"^{name}: {pattern}"):
            getattr(impl, name)(student, teacher, **kwargs)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_valid_edge_arguments_are_accepted(impl):
    # ints for hyperparameters, one weight 0, N = 0.
    ref = impl
    ref.kd_loss(GOOD_S, GOOD_T, temperature=2)
    ref.ckd_loss(GOOD_S, GOOD_T, tau=1)
    ref.bickd_loss(GOOD_S, GOOD_T, w_sample=0, w_class=1)
    ref.bickd_loss(GOOD_S, GOOD_T, w_sample=1.0, w_class=0.0)
    ref.ckd_loss(torch.randn(0, 3), torch.randn(0, 3))
