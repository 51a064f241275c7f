"""The fused ops against the float64 oracle: loss and student gradient, every configuration, shape,
scale, dtype, mask and reduction; plus gradcheck, opcheck, torch.compile and chunked execution."""
import pytest
import torch

import ckd_ext
from ckd_ext import reference as ref
from inputs import (CONFIGS, bickd_large_logit_gradients, logits, loss_and_grad, pair, random_mask,
                    weighted_total)
from tolerances import assert_matches, check_against_oracle

ALL = list(CONFIGS)
BICKD = [c for c in ALL if CONFIGS[c][0] == "bickd"]


# --- shapes ----------------------------------------------------------------------------------------
SHAPES = [(n, c) for n in (1, 2, 3, 67, 257) for c in (1, 2, 3, 100, 1000, 4099)]


def shape_is_slow(config, n, c):
    # The float64 oracle materialises BicKD's C x C matrix; keep the largest such cases to N <= 67.
    return CONFIGS[config][0] == "bickd" and c == 4099 and n > 67


@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("n,c", SHAPES)
def test_shapes_float32(config, n, c):
    if shape_is_slow(config, n, c):
        pytest.skip("oracle too slow at this shape; covered at N=67")
    student, teacher = pair(n, c, seed=n * 31 + c)
    check_against_oracle(config, student, teacher, dtype=torch.float32)


# --- scales and dtypes -----------------------------------------------------------------------------
@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
def test_scales_and_dtypes(config, dtype, scale):
    student, teacher = pair(67, 100, scale=scale, seed=3)
    check_against_oracle(config, student, teacher, dtype=dtype, scale=scale)


@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("student_dtype,teacher_dtype",
                         [(torch.float32, torch.bfloat16), (torch.float16, torch.float32),
                          (torch.bfloat16, torch.float64)])
def test_teacher_of_another_dtype(config, student_dtype, teacher_dtype):
    s = logits(33, 50, seed=1, dtype=student_dtype).requires_grad_()
    t = logits(33, 50, seed=2, dtype=teacher_dtype)
    loss, grad = loss_and_grad(ckd_ext, config, s, t)
    s64 = s.detach().double().requires_grad_()
    loss64, grad64 = loss_and_grad(ref, config, s64, t.double())
    assert_matches(loss, loss64, student_dtype, "loss")
    assert_matches(grad, grad64, student_dtype, "grad")


@pytest.mark.parametrize("symmetric", [False, True])
def test_bickd_per_term_gradient_at_large_logits(symmetric):
    """At softmax arguments near 5e3 (logit scale 1000, T = 0.5), with per-term upstream weights, the gradient is
    within 1e-4 of the largest element (3.4e-5 at most): the elements' own float32 rounding, as in the float32
    reference (1.2e-5 and 7.1e-5 of the largest element here). That takes each row's statistics kept as (max, log of
    the max-shifted sum): a float32 log-sum-exp there is off by up to 2.4e-4, a factor common to the row's
    probabilities, which multiplied by <P, dP> in the backward makes errors of 7e-2 here (1.7e-4 if the forward
    keeps it)."""
    grad, grad64 = bickd_large_logit_gradients((48, 64), 12, symmetric, "none")
    assert_matches(grad, grad64, torch.float32, "grad", tol=1e-4)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_bickd_gradient_at_large_logits_sees_no_lse_rounding(symmetric, reduction):
    """The forward's probabilities at softmax arguments of ~5e3 carry no log-sum-exp rounding: with one float32
    LSE per row (rounded by up to 2.4e-4, a factor common to the row's p, pbar and P) the losses, dp and dpbar of
    this batch make gradient errors of 1.1e-3 / 3.3e-4 ("none", symmetric False / True) and 4.3e-5 / 1.3e-4
    ("mean") of the largest element, where the float32 reference has 4e-6 at most. With (row max, log of the
    max-shifted sum) they are 5e-6 at most: the float32 tolerance's 1e-5 times 2."""
    grad, grad64 = bickd_large_logit_gradients((40, 120), 29, symmetric, reduction)
    assert_matches(grad, grad64, torch.float32, "grad", tol=2e-5)


# --- masks, reductions, leading dimensions ---------------------------------------------------------
@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masks_and_reductions(config, reduction, dtype):
    student, teacher = pair(4, 9, 30, seed=5)  # (B, L, C) token batch
    mask = random_mask((4, 9), seed=5)
    check_against_oracle(config, student, teacher, dtype=dtype, mask=mask, reduction=reduction)


@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_single_valid_row(config, reduction):
    student, teacher = pair(6, 20, seed=6)
    mask = torch.zeros(6, dtype=torch.bool)
    mask[4] = True
    check_against_oracle(config, student, teacher, dtype=torch.float32, mask=mask, reduction=reduction)


@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("rows", [0, 5])
def test_no_valid_row_is_zero_not_nan(config, reduction, rows):
    student, teacher = pair(rows, 20, seed=7, dtype=torch.float32)
    mask = torch.zeros(rows, dtype=torch.bool)
    loss, grad = loss_and_grad(ckd_ext, config, student, teacher, mask=mask, reduction=reduction)
    for part in loss if isinstance(loss, tuple) else (loss,):
        assert torch.equal(part, torch.zeros_like(part))
    assert torch.equal(grad, torch.zeros_like(grad))


# --- chunked execution -----------------------------------------------------------------------------
@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_strips_and_blocks(workspace, config, dtype, reduction):
    """The oracle's results under a budget so small (16 KiB) that every strip holds a few rows and 16-bit candidates
    come in several blocks."""
    workspace(16 * 1024)
    student, teacher = pair(150, 130, seed=8)
    mask = random_mask(150, seed=8)
    check_against_oracle(config, student, teacher, dtype=dtype, mask=mask, reduction=reduction)


# --- the ops themselves ----------------------------------------------------------------------------
@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck(config, reduction):
    name, kwargs = CONFIGS[config]
    student, teacher = pair(5, 4, seed=9)
    mask = torch.tensor([True, True, False, True, True])
    fn = getattr(ckd_ext, f"{name}_loss")
    assert torch.autograd.gradcheck(lambda s: fn(s, teacher, mask=mask, reduction=reduction, **kwargs), (student,))


def op_samples():
    """(op, args) for every op: forward with and without the gradient, backward for each reduction."""
    s, t = pair(7, 5, seed=10, dtype=torch.float32)
    s = s.detach().requires_grad_()
    mask = torch.tensor([True, False, True, True, True, True, False])
    ops = torch.ops.ckd_ext
    for m in (None, mask):
        for red in ("mean", "sum", "none"):
            g = torch.rand(7) if red == "none" else torch.tensor(0.7)
            gc = torch.rand(5) if red == "none" else torch.tensor(0.7)
            for grad_flag in (False, True):
                yield ops.ckd_forward.default, (s, t, m, 0.5, "student", red, grad_flag)
                yield ops.ckd_forward.default, (s, t, m, 0.5, "teacher", red, grad_flag)
                yield ops.kd_forward.default, (s, t, m, 2.0, "forward_kl", 0.0, 0.0, True, red, grad_flag)
                yield ops.kd_forward.default, (s, t, m, 2.0, "jsd", 0.3, 0.0, False, red, grad_flag)
                yield ops.bickd_forward.default, (s, t, m, 2.0, 0.2, 1.0, 0.5, grad_flag, red, grad_flag)
            yield ops.ckd_backward.default, (g, s.detach(), t, m, 0.5, "student", red)
            yield ops.ckd_backward.default, (g, s.detach(), t, m, 0.5, "teacher", red)
            yield ops.kd_backward.default, (g, s.detach(), t, m, 2.0, "forward_kl", 0.0, 0.0, True, red)
            yield ops.kd_backward.default, (g, s.detach(), t, m, 2.0, "skew_kl", 0.0, 0.2, False, red)
            yield ops.bickd_backward.default, (g, gc, s.detach(), t, m, 2.0, 0.2, 1.0, 0.5, True, red)


@pytest.mark.parametrize("op,args", list(op_samples()), ids=lambda x: getattr(x, "__name__", ""))
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backward_op_equals_gradient_from_forward(config, reduction):
    """The recomputing backward ops agree with the gradient the forward computes."""
    name, kwargs = CONFIGS[config]
    student, teacher = pair(20, 16, seed=12, dtype=torch.float32)
    fn = getattr(ckd_ext, f"{name}_loss")
    (grad_forward,) = torch.autograd.grad(fn(student, teacher, **kwargs).sum() * 1.3, student)
    # reduction "mean" forward precomputes; a "none" run with uniform weights 1.3/n recomputes.
    out = fn(student, teacher, reduction="none", **kwargs)
    if name == "bickd":
        total = out[0].sum() * 1.3 / 20 + out[1].sum() * 1.3 / 16
    else:
        total = out.sum() * 1.3 / 20
    (grad_backward,) = torch.autograd.grad(total, student)
    torch.testing.assert_close(grad_backward, grad_forward, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_second_backward_with_retain_graph(config, reduction, dtype):
    """The first backward scales the gradient kept from forward in place (float32 "mean"), so a second backward
    through the same graph recomputes it: both match the oracle, with weights that differ between the two
    backwards (an in-place scaling reused twice would give 1.3 * 0.7 times the gradient)."""
    name, kwargs = CONFIGS[config]
    fn, fn64 = getattr(ckd_ext, f"{name}_loss"), getattr(ref, f"{name}_loss")
    student, teacher = pair(20, 16, seed=17, dtype=dtype)
    out = fn(student, teacher, reduction=reduction, **kwargs)
    s64 = student.detach().double().requires_grad_()
    out64 = fn64(s64, teacher.double(), reduction=reduction, **kwargs)
    for weight in (1.3, 0.7):
        (grad,) = torch.autograd.grad(weighted_sum(out, weight), student, retain_graph=True)
        (grad64,) = torch.autograd.grad(weighted_sum(out64, weight), s64, retain_graph=True)
        assert_matches(grad, grad64, dtype, f"gradient of the backward with weight {weight}")


def weighted_sum(out, weight):
    return weight * (sum(o.sum() for o in out) if isinstance(out, tuple) else out.sum())


@pytest.mark.parametrize("config", ALL)
def test_torch_compile_fullgraph(config):
    name, kwargs = CONFIGS[config]
    fn = getattr(ckd_ext, f"{name}_loss")
    student, teacher = pair(16, 12, seed=13, dtype=torch.float32)
    mask = random_mask(16, seed=13)

    def step(s, t, m):
        return fn(s, t, mask=m, **kwargs) * 2.0

    torch._dynamo.reset()  # each config is a new graph of the same `step` code; keep under the recompile limit
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    expected = step(student, teacher, mask)
    (grad_expected,) = torch.autograd.grad(expected, student)
    actual = compiled(student, teacher, mask)
    (grad_actual,) = torch.autograd.grad(actual, student)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(grad_actual, grad_expected)



@pytest.mark.parametrize("name", ["ckd", "bickd"])
def test_torch_compile_fullgraph_16_bit_student(name):
    """A bfloat16 student's CKD / BicKD under torch.compile(fullgraph=True): the forward's choice to compute the
    gradient (forward_gradient_bytes, a constant of the graph) is traced, and loss and gradient are eager's."""
    fn = getattr(ckd_ext, f"{name}_loss")
    student, teacher = pair(16, 12, seed=17, dtype=torch.bfloat16)

    def step(s, t):
        return fn(s, t) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    expected = step(student, teacher)
    (grad_expected,) = torch.autograd.grad(expected, student)
    actual = compiled(student, teacher)
    (grad_actual,) = torch.autograd.grad(actual, student)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(grad_actual, grad_expected)


def test_assume_constant_result_marks_a_function_as_torch_does():
    """ckd_ext._compile.assume_constant_result stands in for torch.compiler.assume_constant_result (which imports
    torch._dynamo): it must leave a function exactly as torch's decorator does."""
    from ckd_ext._compile import assume_constant_result

    def ours():
        return 1

    def torchs():
        return 1

    assert assume_constant_result(ours) is ours
    assert torch.compiler.assume_constant_result(torchs) is torchs
    assert vars(ours) == vars(torchs) and vars(ours)


def test_importing_ckd_ext_leaves_torch_dynamo_unimported():
    """`import ckd_ext` costs no import of torch._dynamo (about as long as `import torch`)."""
    import subprocess
    import sys
    code = "import sys, ckd_ext; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"

def test_teacher_never_gets_a_gradient():
    student, teacher = pair(8, 6, seed=14, dtype=torch.float32)
    teacher.requires_grad_()
    for config in ALL:
        name, kwargs = CONFIGS[config]
        getattr(ckd_ext, f"{name}_loss")(student, teacher, **kwargs).backward()
        assert teacher.grad is None


def test_modules_match_functions():
    student, teacher = pair(10, 8, seed=15, dtype=torch.float32)
    torch.testing.assert_close(ckd_ext.CKDLoss(tau=0.5, anchor="teacher")(student, teacher),
                               ckd_ext.ckd_loss(student, teacher, tau=0.5, anchor="teacher"))
    torch.testing.assert_close(ckd_ext.KDLoss(temperature=2.0)(student, teacher),
                               ckd_ext.kd_loss(student, teacher, temperature=2.0))
    torch.testing.assert_close(ckd_ext.BicKDLoss(symmetric=True, w_class=0.5)(student, teacher),
                               ckd_ext.bickd_loss(student, teacher, symmetric=True, w_class=0.5))


def test_no_grad_forward_matches():
    student, teacher = pair(10, 8, seed=16, dtype=torch.float32)
    for config in ALL:
        name, kwargs = CONFIGS[config]
        fn = getattr(ckd_ext, f"{name}_loss")
        with torch.no_grad():
            without = fn(student, teacher, **kwargs)
        torch.testing.assert_close(without, fn(student, teacher, **kwargs).detach())
