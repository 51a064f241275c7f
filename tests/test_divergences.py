"""KD's divergences (docs/math.md 3.1) beyond what the CONFIGS suites check (there every divergence runs against the
float64 oracle at every shape, scale, dtype, mask and reduction on the CPU, with gradcheck, opcheck and
torch.compile): the definitions' closed forms, every divergence and dtype on each backend (the emulated one at a small
shape), accuracy near convergence, -inf teacher entries, the T^2 switch, the modules and the fused-linear path."""
import math

import pytest
import torch

import ckd_ext
from ckd_ext import reference as ref
from ckd_ext.divergences import Divergence, divergence_terms, resolve
from inputs import CONFIGS, loss_and_grad, pair, random_mask
from tolerances import TOLERANCE, assert_matches

KD_CONFIGS = [c for c in CONFIGS if CONFIGS[c][0] == "kd"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def test_definitions_closed_forms():
    """divergence_terms, the oracle, on two distributions whose divergences are known in closed form: teacher
    (1/2, 1/2, 0), student (1/4, 1/4, 1/2)."""
    lt = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64).log()
    ls = torch.tensor([[0.25, 0.25, 0.5]], dtype=torch.float64).log()
    expected = {
        Divergence("forward_kl"): math.log(2),
        Divergence("reverse_kl"): math.inf,  # the student has mass where the teacher has none
        Divergence("jsd", beta=0.5): 0.75 * math.log(4 / 3),  # m = (3/8, 3/8, 1/4)
        Divergence("skew_kl", alpha=0.1): math.log(0.5 / 0.275),  # m = (0.275, 0.275, 0.45)
        Divergence("tvd"): 0.5,
    }
    for divergence, value in expected.items():
        assert divergence_terms(lt, ls, divergence).item() == pytest.approx(value, rel=1e-14), divergence


def _on(backend, *tensors):
    return [t.to(backend.device) for t in tensors]


@pytest.mark.parametrize("config", KD_CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_on_each_backend(backend, config, dtype):
    """Loss and gradient against the float64 oracle on the same rounded inputs, masked, per-row terms with weights
    (TOLERANCE: fp32 accumulation over 37 classes, then one rounding to the student's dtype)."""
    student, teacher = pair(6, 37, seed=4, dtype=dtype)
    mask = random_mask(6, seed=4)
    mask[0] = True
    s, t, m = _on(backend, student, teacher, mask)
    loss, grad = loss_and_grad(ckd_ext, config, s.requires_grad_(), t, mask=m, reduction="none")
    s64 = student.detach().double().requires_grad_()
    loss64, grad64 = loss_and_grad(ref, config, s64, teacher.double(), mask=mask, reduction="none")
    assert_matches(loss.cpu(), loss64, dtype, f"{config} loss")
    assert_matches(grad.cpu(), grad64, dtype, f"{config} grad")


def near_convergence(dtype, n=6, c=150, noise=1e-4, seed=0):
    """A teacher of logit scale 3 and the student teacher + noise, rounded to `dtype` (in 16 bits most student
    logits round back to the teacher's: those classes have delta = -Delta exactly, the rest one ulp of difference)."""
    g = torch.Generator().manual_seed(seed)
    t = 3 * torch.randn(n, c, generator=g, dtype=torch.float64)
    s = t + noise * torch.randn(n, c, generator=g, dtype=torch.float64)
    return s.to(dtype), t.to(dtype)


def exact_losses(student, teacher, temperature=4.0, divergence="forward_kl", beta=None, alpha=None, scale_t2=True):
    """kd_loss(..., reduction="none") evaluated with 200-bit floats (mpmath, a dependency of torch's sympy): near
    convergence the float64 oracle's own textbook sums keep only ~7e-7 of the value (measured), too little to check
    a float64 kernel against."""
    mpmath = pytest.importorskip("mpmath")
    d = resolve("test", divergence, beta, alpha)
    with mpmath.workprec(200):
        out = []
        for s_row, t_row in zip(student.tolist(), teacher.tolist()):
            def softmax(row):
                z = [mpmath.mpf(x) / temperature for x in row]
                lse = mpmath.log(mpmath.fsum(mpmath.exp(x) for x in z))
                return [mpmath.exp(x - lse) for x in z]
            p, q = softmax(s_row), softmax(t_row)
            def kl(a, b):
                return mpmath.fsum(x * mpmath.log(x / y) for x, y in zip(a, b) if x > 0)
            def mix(w):  # 1 - w in 200 bits: float64's 1 - w may round (1 - 0.2 does), and w + (1 - w) != 1 then
                return [w * x + (1 - w) * y for x, y in zip(q, p)]
            beta, alpha = mpmath.mpf(d.beta), mpmath.mpf(d.alpha)
            value = {"forward_kl": lambda: kl(q, p), "reverse_kl": lambda: kl(p, q),
                     "jsd": lambda: beta * kl(q, mix(beta)) + (1 - beta) * kl(p, mix(beta)),
                     "skew_kl": lambda: kl(q, mix(alpha)),
                     "tvd": lambda: mpmath.fsum(abs(x - y) for x, y in zip(q, p)) / 2}[d.name]()
            out.append(float(value * (temperature ** 2 if scale_t2 else 1)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("config", KD_CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_no_cancellation_near_convergence(backend, config, dtype):
    """Student = teacher + 1e-4 noise: every row's divergence (~1e-9) and gradient (~1e-4 p) is as accurate as the
    inputs allow. The textbook forms lose it all: sum q (log q - log p) in float32 rounds each log to ~|lse| 6e-8,
    1e-1 to 1e2 times the value here, and exp(log p) - exp(log q) rounds to 1e-7 relative, 1e-3 of p - q.
    Tolerances: float32 1e-5 relative, element by element for the loss (each log-ratio carries ~1e-7 of its own
    rounding, a term its square, the sum a few ulps), against the row's largest entry for the gradient (a class whose
    log-ratio is ~0 is not known relatively); 16-bit: the output's single rounding (TOLERANCE) plus, for float16,
    its subnormal spacing (the losses are ~1e-9, below float16's smallest normal); float64 1e-12 for the loss against
    a 200-bit evaluation (the float64 oracle's is good to ~7e-7 here, which the float32 tolerance covers), 1e-10 for
    the gradient (the oracle's autograd keeps ~1e-12 of it)."""
    name, kwargs = CONFIGS[config]
    student, teacher = near_convergence(dtype)
    s, t = _on(backend, student, teacher)
    s.requires_grad_()
    loss = ckd_ext.kd_loss(s, t, reduction="none", **kwargs)
    (grad,) = torch.autograd.grad(loss.double().sum(), s)
    s64 = student.double().requires_grad_()
    loss64 = ref.kd_loss(s64, teacher.double(), reduction="none", **kwargs)
    (grad64,) = torch.autograd.grad(loss64.sum(), s64)
    # the regime this test is about (tvd is linear in the log-ratios, the others quadratic; in 16 bits a row may round
    # to student = teacher: a loss of exactly 0)
    assert (loss64 < 1e-3).all() and ((loss64 > 0).all() or dtype in (torch.float16, torch.bfloat16))
    tol = 1e-5 if dtype == torch.float32 else TOLERANCE[dtype]
    spacing = 2.0 ** -24 if dtype == torch.float16 else 0.0
    expected = loss64.detach()
    if dtype == torch.float64:
        expected = exact_losses(student, teacher, **kwargs)
        assert ((loss64.detach() - expected).abs() <= 1e-5 * expected).all()  # the oracle agrees, to its accuracy
    loss_error = (loss.detach().cpu().double() - expected).abs()
    loss_tol = 1e-12 if dtype == torch.float64 else tol
    assert (loss_error <= loss_tol * expected.abs() + spacing).all(), (loss_error / expected).max().item()
    grad_error = (grad.cpu().double() - grad64).abs().amax(dim=1)
    scale = grad64.abs().amax(dim=1)
    assert (grad_error <= tol * scale + spacing).all(), (grad_error / scale).max().item()


@pytest.mark.parametrize("config", KD_CONFIGS)
def test_teacher_minus_inf_entries(backend, config):
    """Teacher logits of -inf in a third of the classes (q = 0 there), a student logit of -inf where the teacher has
    mass (row 4) and where it has none (row 5): each divergence takes the limit of its definition. reverse_kl is
    +inf wherever the student has mass the teacher lacks (rows 0-4), forward_kl wherever the teacher has mass the
    student lacks (row 4); everything else is finite and matches the oracle, gradients included."""
    student, teacher = [x.detach().clone() for x in pair(6, 9, seed=5, dtype=torch.float32)]
    teacher[:5, ::3] = -math.inf
    student[4, 1] = -math.inf
    teacher[5, 2] = student[5, 2] = -math.inf
    s, t = _on(backend, student, teacher)
    loss, grad = loss_and_grad(ckd_ext, config, s.requires_grad_(), t, reduction="none")
    s64 = student.double().requires_grad_()
    loss64, grad64 = loss_and_grad(ref, config, s64, teacher.double(), reduction="none")
    loss, grad = loss.cpu(), grad.cpu()
    divergence = CONFIGS[config][1].get("divergence", "forward_kl")
    infinite = {"forward_kl": [4], "reverse_kl": [0, 1, 2, 3, 4]}.get(divergence, [])
    assert torch.isinf(loss64[infinite]).all() and torch.isinf(loss[infinite]).all()
    finite = [i for i in range(6) if i not in infinite]
    assert_matches(loss[finite], loss64[finite], torch.float32, f"{config} loss")
    assert torch.isfinite(grad[finite]).all() and torch.isfinite(grad64[finite]).all()
    assert_matches(grad[finite], grad64[finite], torch.float32, f"{config} grad")


@pytest.mark.parametrize("config", KD_CONFIGS)
def test_nan_logit_before_the_first_finite_one_gives_nan(backend, config):
    """A NaN logit in a 512-class chunk that holds nothing but -inf besides (the CPU kernel's chunk width; the row
    has finite logits later): the row's loss is NaN, as for a NaN anywhere else. The CPU kernel keeps each chunk's
    exponentials from its first pass, and there the chunk's max skips NaNs."""
    student, teacher = [x.detach().clone() for x in pair(3, 1100, seed=8, dtype=torch.float32)]
    teacher[0, :512] = -math.inf
    teacher[0, 5] = math.nan
    student[1, :512] = -math.inf
    student[1, 5] = math.nan
    student[2, 7] = math.nan  # the control: a NaN among finite logits
    s, t = _on(backend, student, teacher)
    loss, _ = loss_and_grad(ckd_ext, config, s.requires_grad_(), t, reduction="none")
    assert torch.isnan(loss.cpu()).all(), loss


@pytest.mark.parametrize("config", KD_CONFIGS)
def test_probability_below_float32s_normals_counts_as_zero(backend, config):
    """Teacher classes whose q_j = e^-102.8 lies below float32's smallest normal, and the student without mass there:
    the loss and gradient are the float64 oracle's. The CPU kernel forms q_j as e^(t_j/T - m) e^(m - lse_t), m the
    running max of the class's 512-class chunk: here e^-50 e^-52.8, a product of two normal numbers that is
    subnormal where one fast_exp of the sum gives 0; the CUDA kernels' single exp of log q_j gives the subnormal
    itself. Unflushed, skew_kl's w q_j + (1 - w) p_j rounded to 0 and its gradient was NaN (scalar_math.h's
    flush_subnormal, which every backend now applies)."""
    student, teacher = [x.detach().clone() for x in pair(2, 1100, seed=9, dtype=torch.float32)]
    teacher[:, :512] = -100.0  # T = 2 (CONFIGS): t_j/T = -50 in the first chunk ...
    teacher[:, 0] = 0.0  # ... whose max is 0
    teacher[:, 600] = 105.6  # lse_t ~ 52.8
    student[:, :512] = -400.0  # p_j = 0 there, in float32 and in float64 alike
    s, t = _on(backend, student, teacher)
    loss, grad = loss_and_grad(ckd_ext, config, s.requires_grad_(), t, reduction="none")
    s64 = student.double().requires_grad_()
    loss64, grad64 = loss_and_grad(ref, config, s64, teacher.double(), reduction="none")
    assert_matches(loss.cpu(), loss64, torch.float32, f"{config} loss")
    assert_matches(grad.cpu(), grad64, torch.float32, f"{config} grad")


@pytest.mark.parametrize("config", KD_CONFIGS)
def test_scale_t2_off_divides_by_t_squared(config):
    """scale_t2=False is the same divergence without the T^2 factor (Liger-Kernel's and TRL's convention)."""
    name, kwargs = CONFIGS[config]
    kwargs = dict(kwargs, temperature=3.0)
    student, teacher = pair(5, 11, seed=6, dtype=torch.float64)
    losses, grads = [], []
    for scale_t2 in (True, False):
        s = student.detach().clone().requires_grad_()
        loss = ckd_ext.kd_loss(s, teacher, **dict(kwargs, scale_t2=scale_t2))
        loss.backward()
        losses.append(loss)
        grads.append(s.grad)
    torch.testing.assert_close(losses[1] * 9.0, losses[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(grads[1] * 9.0, grads[0], rtol=1e-12, atol=0)


def test_defaults_are_trl_and_distillm():
    """beta defaults to 0.5 (TRL's GKD), alpha to 0.1 (DistiLLM)."""
    student, teacher = pair(4, 7, seed=7, dtype=torch.float64)
    torch.testing.assert_close(ckd_ext.kd_loss(student, teacher, divergence="jsd"),
                               ckd_ext.kd_loss(student, teacher, divergence="jsd", beta=0.5))
    torch.testing.assert_close(ckd_ext.kd_loss(student, teacher, divergence="skew_kl"),
                               ckd_ext.kd_loss(student, teacher, divergence="skew_kl", alpha=0.1))


@pytest.mark.parametrize("config", KD_CONFIGS)
def test_modules_match_functions(config):
    name, kwargs = CONFIGS[config]
    student, teacher = pair(6, 9, seed=8, dtype=torch.float32)
    module = ckd_ext.KDLoss(**kwargs)
    torch.testing.assert_close(module(student, teacher), ckd_ext.kd_loss(student, teacher, **kwargs))
    for argument, value in kwargs.items():
        if argument != "temperature":
            assert f"{argument}={value!r}" in repr(module) or f"{argument}={value}" in repr(module)


@pytest.mark.parametrize("config", KD_CONFIGS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear(config, reduction):
    """fused_linear_kd_loss passes the divergence to the kernel: loss and every gradient (hidden states, head, bias)
    against the oracle on materialised float64 logits, in float64 (a plumbing check: the kernel's accuracy is
    tested above)."""
    name, kwargs = CONFIGS[config]
    g = torch.Generator().manual_seed(9)
    hs = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(13, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bs = torch.randn(13, generator=g, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(7, 4, generator=g, dtype=torch.float64)
    wt = torch.randn(13, 4, generator=g, dtype=torch.float64)
    mask = random_mask(7, seed=9)
    upstream = torch.rand(7, generator=g, dtype=torch.float64) if reduction == "none" else torch.tensor(1.3)
    fused = ckd_ext.fused_linear_kd_loss(hs, ws, ht, wt, student_bias=bs, mask=mask, reduction=reduction, **kwargs)
    grads = torch.autograd.grad((fused * upstream).sum(), (hs, ws, bs))
    oracle = ref.kd_loss(hs @ ws.T + bs, ht @ wt.T, mask=mask, reduction=reduction, **kwargs)
    grads64 = torch.autograd.grad((oracle * upstream).sum(), (hs, ws, bs))
    assert_matches(fused.detach(), oracle.detach(), torch.float64, "loss")
    for part, grad, grad64 in zip(("hidden", "weight", "bias"), grads, grads64):
        assert_matches(grad, grad64, torch.float64, part)
