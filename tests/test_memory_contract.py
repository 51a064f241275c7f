"""The memory contract of the fused ops (docs/math.md, "Memory"): what autograd keeps between forward
and backward is the inputs themselves (no copies) or the student gradient, plus O(N + C) floats; never an
N x N or C x C matrix or a normalised / softmaxed copy of an input. Shapes are chosen so that N^2 (CKD)
or C^2 (BicKD) is 64x larger than N * C, so any such matrix would stand out."""
import os

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


def _advised_huge(address: int) -> bool:
    """Whether the mapping holding `address` carries madvise(MADV_HUGEPAGE) ("hg" in /proc/self/smaps' VmFlags)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                begin, end = (int(x, 16) for x in head.split("-"))
                inside = begin <= address < end
            elif inside and head == "VmFlags:":
                return "hg" in line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not (os.path.exists("/proc/self/smaps") and os.path.isdir("/sys/kernel/mm/transparent_hugepage")),
                    reason="needs Linux's /proc/self/smaps and transparent huge pages")
@pytest.mark.parametrize("config", ["kd", "kd_jsd", "ckd_student", "bickd"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpu_gradient_pages_advised_huge(config, reduction):
    """The gradient the CPU kernels write (in the forward for mean, in backward for none) has its whole 2 MiB pages
    advised huge (orchestration/op_call.cpp, empty_gradient_like): one page fault per 2 MiB where the system grants
    them, instead of one per 4 KiB, which cost as much as KD's kernel itself (docs/benchmarks.md)."""
    name, kwargs = CONFIGS[config]
    student, teacher = pair(2048, 1024, dtype=torch.float32, seed=3)  # an 8 MiB gradient
    student.requires_grad_()
    loss = getattr(ckd_ext, f"{name}_loss")(student, teacher, reduction=reduction, **kwargs)
    if reduction == "none":  # BicKD's are (sample terms, class terms)
        loss = sum(part.sum() for part in loss) if isinstance(loss, tuple) else loss.sum()
    loss.backward()
    grad = student.grad
    huge = 1 << 21
    first_whole_page = (grad.data_ptr() + huge - 1) & ~(huge - 1)
    assert first_whole_page + huge <= grad.data_ptr() + grad.nbytes
    assert _advised_huge(first_whole_page)
