"""The memory contract of the fused ops (docs/math.md, "Memory"): what autograd keeps between forward
and backward is the inputs themselves (no copies) or the student gradient, plus O(N + C) floats; never an
N x N or C x C matrix or a normalised / softmaxed copy of an input. Shapes are chosen so that N^2 (CKD)
or C^2 (BicKD) is 64x larger than N * C, so any such matrix would stand out."""
import pytest
import torch

import ckd_ext
from inputs import CONFIGS, pair, saved_by

CASES = [("ckd_student", 4096, 64), ("ckd_teacher", 4096, 64), ("kd", 4096, 64),
         ("bickd", 64, 4096), ("bickd_symmetric", 64, 4096)]


def same_storage(a, b):
    return b is not None and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.parametrize("config,n,c", CASES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("masked", [False, True])
def test_saved_tensors(config, n, c, reduction, masked):
    name, kwargs = CONFIGS[config]
    student, teacher = pair(n, c, dtype=torch.float32, seed=1)
    mask = torch.rand(n, generator=torch.Generator().manual_seed(2)) < 0.8 if masked else None
    out, saved = saved_by(getattr(ckd_ext, f"{name}_loss"), student, teacher, mask=mask, reduction=reduction,
                          **kwargs)
    gradients = 0
    for t in saved:
        if t is None:
            continue
        if any(same_storage(t, x) for x in (student, teacher, mask)):
            continue  # an input itself, not a copy
        if t.shape == (n, c) and reduction != "none":
            gradients += 1  # the student gradient computed in forward
            continue
        assert t.numel() <= 16 * (n + c), f"saved a {tuple(t.shape)} {t.dtype} tensor"
    assert gradients <= 1
    if reduction != "none":
        # The gradient is kept instead of the inputs: nothing else of size N x C.
        assert gradients == 1
    # The kept state still gives the right gradient.
    total = sum(o.sum() for o in out) if isinstance(out, tuple) else out.sum()
    total.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("config", ["kd", "ckd_student", "ckd_teacher", "bickd"])
def test_backward_returns_the_kept_gradient_scaled_in_place(config):
    """Peak memory beyond the inputs is one gradient (and O(N + C)): the first backward scales the gradient kept
    from the forward in place and returns that storage, where `grad * grad_output` would hold a second N x C
    tensor while the first is alive. A second backward (retain_graph) recomputes, and gets the same gradient."""
    name, kwargs = CONFIGS[config]
    student, teacher = pair(32, 48, dtype=torch.float32, seed=3)
    loss, saved = saved_by(getattr(ckd_ext, f"{name}_loss"), student, teacher, **kwargs)
    kept = [t for t in saved if t is not None and t.shape == student.shape and not same_storage(t, student)
            and not same_storage(t, teacher)]
    assert len(kept) == 1
    (first,) = torch.autograd.grad(loss * 3.0, student, retain_graph=True)
    assert same_storage(first, kept[0])
    (second,) = torch.autograd.grad(loss * 3.0, student)
    assert not same_storage(second, kept[0])
    # Two float32 computations of one gradient, in different orders (the kept one scaled after rounding, the
    # recomputed one with the upstream 3 inside its coefficients and sums): they differ by roundings of sums over
    # 32-48 terms, bounded well within 1e-5 of the largest element (about 80 float32 ulps; measured: below 1e-6).
    torch.testing.assert_close(second, first, rtol=0, atol=1e-5 * first.abs().max().item())
