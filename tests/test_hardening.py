"""Hostile inputs and settings the fused ops must handle as the reference does, on every backend where the case is
not backend-specific: masked rows holding NaN / Inf, -inf logits, fp16 gradients under loss scaling, double backward,
torch.compile with dynamic shapes and symbolic hyperparameters, KD accuracy near convergence, hyperparameters outside
float32's range, and the loss dtype under autocast."""
import pytest
import torch

import ckd_ext
from ckd_ext import reference as ref
from inputs import CONFIGS, loss_and_grad, pair


def relative(actual, expected):
    """Max error of `actual` (on any device) against the float64 CPU `expected`, relative to its largest element."""
    return ((actual.detach().cpu().double() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_masked_rows_take_no_part_whatever_they_hold(backend, config, garbage, side):
    """A masked row full of garbage changes nothing: not the loss, not a single gradient element (a NaN there must
    not reach the CKD gradient of the valid rows)."""
    student, teacher = pair(9, 7, seed=3, dtype=torch.float32)
    student, teacher = student.detach().to(backend.device).requires_grad_(), teacher.to(backend.device)
    mask = torch.tensor([1, 1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool, device=backend.device)
    s, t = student.detach().clone(), teacher.clone()
    (s if side == "student" else t)[mask.logical_not()] = garbage
    loss, grad = loss_and_grad(ckd_ext, config, s.requires_grad_(), t, mask=mask)
    clean_loss, clean_grad = loss_and_grad(ckd_ext, config, student, teacher, mask=mask)
    assert torch.isfinite(grad).all()
    # Masked rows are not read at all, so the result is bitwise the one with clean rows there.
    assert torch.equal(grad, clean_grad)
    for part, clean in zip(loss if isinstance(loss, tuple) else (loss,),
                           clean_loss if isinstance(clean_loss, tuple) else (clean_loss,)):
        assert torch.equal(part, clean)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kd_teacher_minus_inf_takes_no_part(backend, dtype):
    """Teachers mask vocabulary entries with -inf: that class takes no part (0 log 0 = 0), also where the student is
    -inf at the same class (no NaN from -inf - -inf)."""
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(6, 11, generator=g), torch.randn(6, 11, generator=g)
    t[:, 0] = -float("inf")
    t[2, 4] = s[2, 4] = -float("inf")
    s, t = s.to(dtype), t.to(dtype)
    loss, grad = loss_and_grad(ckd_ext, "kd", s.to(backend.device, copy=True).requires_grad_(),
                               t.to(backend.device), reduction="none")
    loss64, grad64 = loss_and_grad(ref, "kd", s.double().requires_grad_(), t.double(), reduction="none")
    assert torch.isfinite(loss64).all() and torch.isfinite(loss).all() and torch.isfinite(grad).all()
    # One rounding of each output element to the 16-bit type, on top of float32 work: see tolerances.TOLERANCE.
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert relative(loss, loss64) < tol and relative(grad, grad64) < tol


def test_kd_student_minus_inf_alone_is_an_infinite_kl_with_a_finite_gradient(backend):
    """Where the teacher has mass and the student's logit is -inf, KL(q || p) is infinite: the loss is +inf (as the
    reference's), its gradient T (p - q) finite."""
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    s[1, 3] = -float("inf")
    loss, grad = loss_and_grad(ckd_ext, "kd", s.to(backend.device, copy=True).requires_grad_(),
                               t.to(backend.device), reduction="none")
    loss = loss.cpu()
    loss64, grad64 = loss_and_grad(ref, "kd", s.double().requires_grad_(), t.double(), reduction="none")
    assert loss[1] == float("inf") and loss64[1] == float("inf")
    assert torch.isfinite(loss[[0, 2]]).all() and torch.isfinite(grad).all()
    assert relative(grad, grad64) < 1e-5


@pytest.mark.parametrize("config", ["bickd", "bickd_symmetric"])
def test_bickd_minus_inf_logits_are_zero_probabilities(backend, config):
    """BicKD works on probabilities: a -inf logit is a probability of 0, nothing undefined."""
    student, teacher = pair(8, 9, seed=7, dtype=torch.float32)
    s, t = student.detach().clone(), teacher.clone()
    s[:, 2] = -float("inf")
    t[3, 5] = t[:, 8] = -float("inf")
    loss, grad = loss_and_grad(ckd_ext, config, s.to(backend.device).requires_grad_(), t.to(backend.device))
    loss64, grad64 = loss_and_grad(ref, config, s.detach().double().requires_grad_(), t.double())
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert relative(loss, loss64) < 1e-5 and relative(grad, grad64) < 1e-5


@pytest.mark.parametrize("anchor", ["student", "teacher"])
def test_ckd_infinite_logit_in_a_valid_row_is_a_documented_nan(anchor):
    """A row with an infinite logit has no direction: its cosines are NaN by definition, in the reference and the
    fused op alike (docs/math.md, non-finite values); masked, the same row is harmless (tested above)."""
    student, teacher = pair(5, 6, seed=8, dtype=torch.float32)
    s = student.detach().clone()
    s[1, 0] = -float("inf")
    assert torch.isnan(ckd_ext.ckd_loss(s, teacher, anchor=anchor))
    assert torch.isnan(ref.ckd_loss(s, teacher, anchor=anchor))


@pytest.mark.parametrize("config", ["kd", "ckd_student", "ckd_teacher", "bickd"])
def test_fp16_gradient_survives_loss_scaling(config):
    """GradScaler multiplies the loss by 2^15..2^16: the fp16 gradient is rounded once, after that scale. (Rounding
    the gradient for an upstream gradient of 1 to fp16 in the forward would flush entries below 2^-24 to 0 before
    the scale: 2-10 % exact zeros and median relative errors of 2e-2 to 9e-2 at 8192 x 256.)"""
    name, kwargs = CONFIGS[config]
    scale = 32768.0
    g = torch.Generator().manual_seed(9)
    s = (torch.randn(2048, 64, generator=g) * 2).half()
    t = (torch.randn(2048, 64, generator=g) * 2).half()
    student = s.clone().requires_grad_()
    (getattr(ckd_ext, f"{name}_loss")(student, t, **kwargs) * scale).backward()
    s64 = s.double().requires_grad_()
    (getattr(ref, f"{name}_loss")(s64, t.double(), **kwargs) * scale).backward()
    ideal = s64.grad.half()  # the float64 gradient, rounded once to fp16
    nonzero = ideal != 0
    assert (student.grad[nonzero] != 0).all(), "entries the ideal rounding keeps were flushed to 0"
    err = (student.grad.double() - s64.grad).abs()
    # fp16's unit roundoff is 4.9e-4: element-wise, the median error is within 2x of one rounding (elements that are
    # differences of nearly equal terms can be off by more relative to themselves, as in any float32 computation);
    # against the largest element, tolerances.TOLERANCE's fp16 bound.
    assert (err / s64.grad.abs())[nonzero].median().item() < 1e-3
    assert err.max().item() < 1e-3 * s64.grad.abs().max().item()


def test_real_gradscaler_step_with_fp16_logits():
    """A GradScaler step on fp16 logits from an fp32 model under autocast (mixed precision as torch documents it):
    the loss comes back in fp32, so GradScaler's 2^16 does not overflow it (an fp16 loss of 1 or more times 2^16
    would, as torch's own losses on fp16 inputs would outside autocast); the step is taken (no inf / NaN found)
    and the unscaled parameter gradient equals the float64 one within fp16 rounding."""
    torch.manual_seed(10)
    model = torch.nn.Linear(16, 32)
    x, teacher = torch.randn(256, 16), torch.randn(256, 32).half()
    scaler = torch.amp.GradScaler("cpu", init_scale=65536.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before, bias = model.weight.detach().clone(), model.bias.detach().clone()
    with torch.autocast("cpu", dtype=torch.float16):
        logits = model(x)
        assert logits.dtype == torch.float16
        loss = ckd_ext.kd_loss(logits, teacher)
    assert loss.dtype == torch.float32 and torch.isfinite(loss * 65536.0)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad = model.weight.grad.clone()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 65536.0, "the scaler found inf/NaN gradients and skipped the step"
    assert not torch.equal(model.weight, before)
    w64 = before.double().requires_grad_()  # the float64 gradient at the pre-step weights, of the same fp16 logits
    exact_logits = x.double() @ w64.T + bias.double()
    rounding = (logits.double() - exact_logits).detach()
    ref.kd_loss(exact_logits + rounding, teacher.double()).backward()
    assert relative(grad, w64.grad) < 2e-3


def test_loss_is_float32_under_autocast(backend):
    """Like torch's cross_entropy / kl_div under autocast: a float32 loss from 16-bit logits (not rounded to 16 bits),
    equal to the float32 value the op accumulates; outside autocast, the student's dtype. Within 1e-5 of float64,
    except BicKD on tensor cores (CUDA, emulated), whose similarities multiply operand blocks rounded to bf16: within
    bf16's unit roundoff 2^-8 (measured 1e-6 to 5e-5 of the loss, docs/cuda.md "GEMM policy")."""
    student, teacher = pair(6, 10, seed=11, dtype=torch.bfloat16)
    on_device = student.detach().to(backend.device).requires_grad_(), teacher.to(backend.device)
    with torch.autocast(backend.device.type, dtype=torch.bfloat16):
        inside = {n: getattr(ckd_ext, f"{n}_loss")(*on_device) for n in ("kd", "ckd", "bickd")}
    outside = {n: getattr(ckd_ext, f"{n}_loss")(*on_device) for n in ("kd", "ckd", "bickd")}
    for n in inside:
        assert inside[n].dtype == torch.float32 and outside[n].dtype == torch.bfloat16
        assert outside[n] == inside[n].to(torch.bfloat16)
        exact = getattr(ref, f"{n}_loss")(student.double(), teacher.double())
        bf16_blocks = n == "bickd" and backend.name != "cpu"
        assert abs(inside[n].item() - exact.item()) <= (2.0 ** -8 if bf16_blocks else 1e-5) * abs(exact.item())


@pytest.mark.parametrize("config", ["kd", "ckd_student", "ckd_teacher", "bickd"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_double_backward_raises(config, reduction):
    """A second derivative through the fused backward would be silently 0; it raises instead, while the first-order
    gradient taken with create_graph=True is still right."""
    name, kwargs = CONFIGS[config]
    student, teacher = pair(5, 7, seed=12, dtype=torch.float64)
    out = getattr(ckd_ext, f"{name}_loss")(student, teacher, reduction=reduction, **kwargs)
    total = sum(o.sum() for o in out) if isinstance(out, tuple) else out.sum()
    (grad,) = torch.autograd.grad(total, student, create_graph=True)
    expected_out = getattr(ref, f"{name}_loss")(student, teacher, reduction=reduction, **kwargs)
    expected_total = sum(o.sum() for o in expected_out) if isinstance(expected_out, tuple) else expected_out.sum()
    (expected,) = torch.autograd.grad(expected_total, student)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="double backward through ckd_ext losses is not supported"):
        grad.pow(2).sum().backward()


class CKDWithAttributes(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tau, self.temperature = 0.5, 2.0

    def forward(self, s, t):
        return ckd_ext.ckd_loss(s, t, tau=self.tau) + ckd_ext.kd_loss(s, t, temperature=self.temperature)


@pytest.mark.parametrize("which", ["defaults", "module attributes"])
def test_compile_fullgraph_dynamic(which):
    """torch.compile(fullgraph=True, dynamic=True) traces the validation of defaults and of float attributes,
    which dynamo turns into symbolic floats (math.isfinite on a SymFloat would break the graph)."""
    fn = CKDWithAttributes() if which == "module attributes" else (
        lambda s, t: ckd_ext.ckd_loss(s, t) + ckd_ext.kd_loss(s, t) + ckd_ext.bickd_loss(s, t))
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for n in (8, 13):
        student, teacher = pair(n, 10, seed=n, dtype=torch.float32)
        (grad,) = torch.autograd.grad(compiled(student, teacher), student)
        (expected,) = torch.autograd.grad(fn(student, teacher), student)
        torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n,c,noise", [(1, 4, 1e-2), (32, 100, 1e-2), (16, 500, 1e-3), (8, 50, 1e-4)])
def test_kd_value_near_convergence(backend, n, c, noise):
    """Near convergence KL is a tiny difference of large terms in the textbook formula (the fp32 reference is off by
    5e-2 to 5e2 relative here); the fused value must be as accurate as its float32 inputs allow: rounding s and t
    gives ~6e-8 relative error in each log-ratio, ~1.2e-7 in their squares, and the sums over C classes add a few
    ulps, so 1e-5 relative holds with a margin of 10x."""
    g = torch.Generator().manual_seed(n + c)
    t = torch.randn(n, c, generator=g) * 3
    s = t + noise * torch.randn(n, c, generator=g)
    loss = ckd_ext.kd_loss(s.to(backend.device), t.to(backend.device), reduction="none").cpu()
    expected = ref.kd_loss(s.double(), t.double(), reduction="none")
    assert ((loss.double() - expected).abs() / expected).max().item() < 1e-5


@pytest.mark.parametrize("fn,argument", [("ckd_loss", "tau"), ("kd_loss", "temperature"), ("bickd_loss", "tau"),
                                          ("bickd_loss", "temperature")])
@pytest.mark.parametrize("value", [10 ** 400, 1e-300, 1e300, 1e-39, 2e19])
@pytest.mark.parametrize("module", [ckd_ext, ref], ids=["fused", "reference"])
def test_hyperparameters_outside_float32_range_are_rejected(fn, argument, value, module):
    """A tau or temperature whose reciprocal or square is not finite in float32 would return inf / NaN (1e-300,
    1e300) or overflow converting to float (10**400): a ValueError that names the argument, before any work."""
    s = torch.randn(3, 4)
    with pytest.raises(ValueError, match=f"^{fn}: {argument} must be a finite number > 0"):
        getattr(module, fn)(s, s, **{argument: value})


@pytest.mark.parametrize("config", ["ckd_student", "ckd_teacher", "bickd"])
def test_dominant_positive_keeps_relative_accuracy(backend, config):
    """A converged student at a small tau: every term is tiny (1e-10 to 1e-2) and is as accurate relative to itself
    as its float32 inputs allow (~1e-5 with the sums of C terms), which takes softplus(LSE_neg - z_ii): LSE - z_ii
    returns a 6e-10 term as 0."""
    loss, kwargs = CONFIGS[config]
    g = torch.Generator().manual_seed(0)
    if loss == "bickd":  # peaked probabilities: logits of scale 10 at T = 1 (a term of 9.08e-5 came back 9.155e-5)
        kwargs = dict(kwargs, temperature=1.0, tau=0.1)
        t = 10 * torch.randn(2, 2, generator=g)
    else:
        kwargs = dict(kwargs, tau=0.05)
        t = torch.randn(4, 8, generator=g)
    s = t.clone()
    out = getattr(ckd_ext, f"{loss}_loss")(s.to(backend.device), t.to(backend.device), reduction="none", **kwargs)
    expected = getattr(ref, f"{loss}_loss")(s.double(), t.double(), reduction="none", **kwargs)
    for actual, exact in zip(out if isinstance(out, tuple) else (out,),
                             expected if isinstance(expected, tuple) else (expected,)):
        assert ((actual.cpu().double() - exact).abs() <= 1e-4 * exact.abs() + 1e-30).all()


@pytest.mark.parametrize("dtype,temperature", [(torch.float32, 1e-9), (torch.float32, 1e-3), (torch.float64, 1e-25)])
def test_kd_at_tiny_temperatures(backend, dtype, temperature):
    """Temperatures down to 1e-38 are accepted, and the loss and gradient are as accurate as the float32 reference's
    even at 1e-9, where the log-sum-exps are ~1e9: log p comes from lse_s itself (rebuilt from its parts, lse_t +
    shift + gap, it rounds to an absolute error of tens, and the loss comes out 6e9 instead of 1.6e-9)."""
    g = torch.Generator().manual_seed(13)
    s, t = torch.randn(4, 3, generator=g, dtype=dtype), torch.randn(4, 3, generator=g, dtype=dtype)
    def kd(module, student, teacher):
        loss = module.kd_loss(student, teacher, temperature=temperature, reduction="none")
        weights = torch.arange(1.0, 5.0, dtype=loss.dtype, device=loss.device)
        (grad,) = torch.autograd.grad((loss * weights).sum(), student)
        return loss.detach().cpu(), grad

    loss, grad = kd(ckd_ext, s.to(backend.device, copy=True).requires_grad_(), t.to(backend.device))
    loss64, grad64 = kd(ref, s.double().requires_grad_(), t.double())
    # Softmax arguments of |x| / T ~ 1e9 carry float32 rounding of ~1e9 * 6e-8 = 60 absolute; the KL, a difference of
    # such arguments times T^2, keeps ~6e-8 relative; 1e-5 leaves room for the sums.
    assert ((loss.double() - loss64).abs() <= 1e-5 * loss64.abs()).all()
    assert relative(grad, grad64) < 1e-5


@pytest.mark.parametrize("anchor", ["student", "teacher"])
def test_ckd_huge_logits_are_right_or_nan(backend, anchor):
    """Invariant: CKD reads only each row's direction, so float32 logits far beyond sqrt(FLT_MAX) = 1.8e19 (where a
    row's squared norm overflows) give the float64 loss of the same directions, or NaN where a similarity product
    itself overflows; never a plausible wrong number (the squared norms' overflow gave a wrong loss at 3e18, 0.0 at
    1e20). At 3e18 with C = 64 the norms' squares overflow but the student anchor's products (off-diagonal, random
    signs) do not: there the loss must be right."""
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(12, 64, generator=g, dtype=torch.float64), torch.randn(12, 64, generator=g,
                                                                                   dtype=torch.float64)
    for scale in (1.0, 3e18, 1e19, 1e20, 1e30):
        s, t = (x * scale for x in directions)
        s, t = s.float(), t.float()
        out = ckd_ext.ckd_loss(s.to(backend.device).requires_grad_(), t.to(backend.device), anchor=anchor,
                               tau=0.5).cpu()
        want = ref.ckd_loss(s.double() / scale, t.double() / scale, anchor=anchor, tau=0.5)
        if scale == 3e18 and anchor == "student":
            assert torch.isfinite(out)
        if torch.isfinite(out):
            assert abs(out.item() - want.item()) <= 1e-5 * want.item(), (scale, out.item(), want.item())
        else:
            assert torch.isnan(out), (scale, out.item())
