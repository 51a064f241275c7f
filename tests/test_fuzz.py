"""Property-based fuzzing of the fused losses against the float64 oracle, with hypothesis.

Each example draws a loss configuration (shape, dtypes, logit scale, special rows, mask, NaN or +-inf in masked rows,
-inf teacher classes for KD, hyperparameters, reduction, upstream gradient, work-buffer budget), runs the fused op and the float64 reference
on the same (already rounded) inputs, and checks the loss and the student gradient element by element against the
tolerance model of tests/tolerances.py (error_bounds, check_within), on every backend: the CPU kernels always, the
emulated CUDA backend on small draws, CUDA tensors where a GPU is present.

Profiles (tests/conftest.py): "ci" (default; fixed seed, 300 examples per loss) and "thorough" (nightly:
``pytest tests/test_fuzz.py --hypothesis-profile=thorough``). A failure prints the falsifying Case; rerun it with

    from test_fuzz import Case, run_case        # from tests/
    run_case(Case(...))                         # raises the same assertion
"""
import dataclasses
import functools
import math

import pytest
import torch
from hypothesis import event, given, note, settings, target
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st

import ckd_ext
from ckd_ext import reference
from switches import on_backend, skip_unless, workspace_budget
from tolerances import Bound, check_within, error_bounds

LOSSES = ("kd", "ckd", "bickd")
# First entries are what hypothesis shrinks towards: float32, no special rows, no mask, "mean".
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ROW_KINDS = ("one_hot", "identical", "zero", "near")
MASKS = (None, "random", "all_false", "single_true")
MASKED_FILLS = (None, "nan", "inf")  # what the masked rows hold: their random logits, NaN, or +-inf
REDUCTIONS = ("mean", "sum", "none")
NEAR_NOISE = 1e-2  # a near-converged student: teacher + NEAR_NOISE * randn
# Work-buffer budgets (ckd_ext.set_workspace_bytes): the default, or one that splits the strips, symmetric tiles and
# converted blocks of docs/math.md section 6 into about this many (the last one partial). A budget fixed in bytes
# would give a 300 x 2000 CKD 1-row tiles: 90000 GEMMs, a minute per example.
WORKSPACE_SPLITS = (None, 2, 3, 8)

# The float64 oracle materialises N x N (CKD, BicKD sample side) and C x C (BicKD class side) matrices, and the
# tolerance model as many again: N * C is capped so that an example takes well under a second, and BicKD's C x C
# work (N C^2) as well. The emulated CUDA backend runs each CUDA thread as an OS thread, ~1000x slower than the CPU
# kernels: its draws stay at N * C <= 600.
MAX_ELEMENTS = 200_000
MAX_BICKD_WORK = 10_000_000  # N * C * (N + C)
EMULATED_MAX_N, EMULATED_MAX_C, EMULATED_MAX_ELEMENTS = 12, 60, 600


@dataclasses.dataclass(frozen=True)
class Case:
    """One fuzzing example; `run_case(case)` replays it."""

    loss: str
    n: int
    c: int
    dtype: torch.dtype
    teacher_dtype: torch.dtype
    log_scale: float          # logits are randn * 10**log_scale
    row_kinds: tuple          # special rows among ROW_KINDS
    coverage: str             # how many rows are special: "one", "some", "all"
    mask: object              # one of MASKS
    masked_fill: object       # None, or "nan" / "inf" (+-inf) written into the masked rows of student and teacher
    neg_inf: object           # KD: None, "teacher" (-inf teacher classes) or "both" (student -inf there too)
    reduction: str
    log_upstream: float       # upstream gradients are (0.5 + rand) * 10**log_upstream, one per output term
    hyper: tuple              # (name, value) pairs of the loss's keyword arguments
    workspace_splits: object  # None (the default budget) or into how many strips / tiles / blocks to split the work
    seed: int

    @property
    def kwargs(self):
        return dict(self.hyper)


# --- strategies ----------------------------------------------------------------------------------------------------
def _size(hi):
    """1..hi: a third of the draws <= 8 (fast, and where degenerate cases live), a third >= hi / 8."""
    return st.one_of(st.integers(1, min(8, hi)), st.integers(1, hi), st.integers(max(1, hi // 8), hi))


def _log_uniform(lo, hi):
    return st.floats(math.log10(lo), math.log10(hi), allow_nan=False, allow_infinity=False)


def _log_scale():
    """log10 of the logit scale over [-3, 3], with extra draws at both ends (tiny logits: nearly uniform softmaxes;
    huge ones: one-hot softmaxes and softmax arguments up to ~10^4)."""
    return st.one_of(st.floats(-3, 3), st.floats(1.5, 3), st.floats(-3, -1.5))


def _log_tau():
    """log10 tau over [0.01, 100], half of the draws below 0.1: small tau is where the contrastive log-sum-exps have
    large arguments (1 / tau) and the positive dominates."""
    return st.one_of(_log_uniform(0.01, 0.1), _log_uniform(0.01, 100))


@st.composite
def hyperparameters(draw, loss):
    if loss == "kd":
        return (("temperature", 10 ** draw(_log_uniform(0.5, 20))),)
    if loss == "ckd":
        return (("anchor", draw(st.sampled_from(("student", "teacher")))), ("tau", 10 ** draw(_log_tau())))
    weight = st.one_of(st.just(1.0), st.just(0.0), st.floats(0.0, 2.0))
    w_sample, w_class = draw(weight), draw(weight)
    if w_sample == 0 and w_class == 0:  # rejected by the op (the loss would be identically 0)
        w_class = 1.0
    return (("symmetric", draw(st.booleans())), ("tau", 10 ** draw(_log_tau())),
            ("temperature", 10 ** draw(_log_uniform(0.5, 20))), ("w_class", w_class), ("w_sample", w_sample))


@st.composite
def cases(draw, loss, max_n=300, max_c=2000, max_elements=MAX_ELEMENTS):
    n, c = draw(_size(max_n)), draw(_size(max_c))
    c = max(1, min(c, max_elements // n))
    if loss == "bickd":
        while c > 1 and n * c * (n + c) > MAX_BICKD_WORK:
            c = max(1, c // 2)
    dtype = draw(st.sampled_from(DTYPES))
    teacher_dtype = draw(st.one_of(st.just(dtype), st.sampled_from(DTYPES)))
    row_kinds = tuple(draw(st.lists(st.sampled_from(ROW_KINDS), max_size=3, unique=True)))
    coverage = draw(st.sampled_from(("one", "some", "all"))) if row_kinds else "one"
    mask = draw(st.sampled_from(MASKS))
    masked_fill = draw(st.sampled_from(MASKED_FILLS)) if mask is not None else None
    neg_inf = draw(st.sampled_from((None, "teacher", "both"))) if loss == "kd" and c > 1 else None
    return Case(loss=loss, n=n, c=c, dtype=dtype, teacher_dtype=teacher_dtype,
                log_scale=draw(_log_scale()), row_kinds=row_kinds, coverage=coverage, mask=mask,
                masked_fill=masked_fill, neg_inf=neg_inf, reduction=draw(st.sampled_from(REDUCTIONS)),
                log_upstream=draw(st.floats(-3, 3, allow_nan=False)), hyper=draw(hyperparameters(loss)),
                workspace_splits=draw(st.sampled_from(WORKSPACE_SPLITS)), seed=draw(st.integers(0, 2 ** 32 - 1)))


# --- building and running a case -----------------------------------------------------------------------------------
def build(case):
    """(student, teacher, mask) on the CPU, rounded to their dtypes; the student is a leaf without grad."""
    g = torch.Generator().manual_seed(case.seed)
    n, c, scale = case.n, case.c, 10.0 ** case.log_scale

    def randint(hi):
        return int(torch.randint(hi, (), generator=g))

    t = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    s = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    if case.row_kinds:
        if case.coverage == "one":
            rows = [randint(n)]
        elif case.coverage == "some":
            rows = torch.randperm(n, generator=g)[: max(1, n // 3)].tolist()
        else:
            rows = list(range(n))
        for r in rows:
            kind = case.row_kinds[randint(len(case.row_kinds))]
            if kind == "one_hot":  # both rows one-hot at scale, at the same class or not
                k = randint(c)
                t[r], s[r] = 0, 0
                t[r, k] = scale
                s[r, k if randint(2) else randint(c)] = scale
            elif kind == "identical":
                s[r] = t[r]
            elif kind == "zero":
                which = randint(3)
                if which != 1:
                    s[r] = 0
                if which != 0:
                    t[r] = 0
            else:  # near-converged
                s[r] = t[r] + NEAR_NOISE * torch.randn(c, generator=g, dtype=torch.float64)
    if case.neg_inf:  # teachers mask vocabulary with -inf; at least one class of each row stays finite
        for r in torch.randperm(n, generator=g)[: max(1, randint(n + 1))].tolist():
            classes = torch.randperm(c, generator=g)[: 1 + randint(c - 1)]
            t[r, classes] = -math.inf
            if case.neg_inf == "both":
                s[r, classes] = -math.inf
    mask = None
    if case.mask == "random":
        mask = torch.rand(n, generator=g) < 0.2 + 0.7 * torch.rand((), generator=g)
    elif case.mask == "all_false":
        mask = torch.zeros(n, dtype=torch.bool)
    elif case.mask == "single_true":
        mask = torch.zeros(n, dtype=torch.bool)
        mask[randint(n)] = True
    s, t = s.to(case.dtype), t.to(case.teacher_dtype)
    if mask is not None and case.masked_fill == "nan":
        s[~mask] = math.nan
        t[~mask] = math.nan
    elif mask is not None and case.masked_fill == "inf":  # +inf and -inf in alternate classes
        signs = torch.where(torch.arange(c) % 2 == 0, math.inf, -math.inf)
        s[~mask] = signs.to(s.dtype)
        t[~mask] = -signs.to(t.dtype)
    return s, t, mask


def workspace_bytes(case):
    """A budget under which each strip, tile or block holds at least ceil(N / splits) rows (or columns): the strips
    of the kernels need (in float32) 2 N or 4 C bytes per row, their tiles and blocks 8 C (docs/math.md section 6),
    so 4 r max(2N, 8C) bytes give every pass at least r rows, and at most about `splits` strips per dimension."""
    rows = -(-case.n // case.workspace_splits)
    return 4 * rows * max(2 * case.n, 8 * case.c)


def upstream_gradients(case, outputs):
    """One upstream gradient per output term, distinct (so that a "none" backward that ignores them is caught),
    (0.5 + rand) * 10**log_upstream, rounded to the output's dtype (the oracle gets the same values in float64)."""
    g = torch.Generator().manual_seed(case.seed + 1)
    scale = 10.0 ** case.log_upstream
    return tuple(((torch.rand(o.shape, generator=g, dtype=torch.float64) + 0.5) * scale).to(o.device, o.dtype)
                 for o in outputs)


def _outputs(module, case, s, t, mask):
    out = getattr(module, f"{case.loss}_loss")(s, t, mask=mask, reduction=case.reduction, **case.kwargs)
    outputs = out if isinstance(out, tuple) else (out,)
    return outputs


def _grad(outputs, s, upstream):
    (grad,) = torch.autograd.grad(outputs, s, grad_outputs=upstream, allow_unused=True)
    return torch.zeros_like(s) if grad is None else grad


def run_case(case, device="cpu"):
    """Runs the fused op on `device` ("cpu", "emulated" or "cuda") and the oracle; asserts the model's bounds.
    Returns the max error / allowed ratios of the loss and of the gradient."""
    s, t, mask = build(case)
    in_hypothesis = currently_in_test_context()  # run_case also replays a Case outside hypothesis
    if in_hypothesis:
        note(f"student {tuple(s.shape)} {s.dtype}, scale 10^{case.log_scale:.3g}, kwargs {case.kwargs}")
    budget = workspace_bytes(case) if case.workspace_splits else None  # None: the device's default
    with on_backend(device) as backend, workspace_budget(budget):
        s_dev = s.to(backend.device).requires_grad_()
        t_dev, m_dev = t.to(backend.device), None if mask is None else mask.to(backend.device)
        outputs = _outputs(ckd_ext, case, s_dev, t_dev, m_dev)
        upstream = upstream_gradients(case, outputs)
        grad = _grad(outputs, s_dev, upstream)

    s64 = s.double().requires_grad_()
    expected = _outputs(reference, case, s64, t.double(), mask)
    grad64 = _grad(expected, s64, tuple(u.cpu().double() for u in upstream))

    up = upstream if case.reduction == "none" and case.loss == "bickd" else upstream[0]
    loss_bound, grad_bound = error_bounds(case.loss, s, t, mask=mask, reduction=case.reduction,
                                          upstream=tuple(u.cpu() for u in up) if isinstance(up, tuple) else up.cpu(),
                                          hyper=case.kwargs, tensor_cores=device != "cpu")
    loss_bounds = (loss_bound,) if isinstance(loss_bound, Bound) else loss_bound
    parts = ("sample terms", "class terms") if len(outputs) == 2 else ("loss",)
    loss_checks = [check_within(a, e.detach(), b, case.dtype, f"{case.loss} {part}")
                   for a, e, b, part in zip(outputs, expected, loss_bounds, parts)]
    grad_ratio, grad_failure = check_within(grad, grad64, grad_bound, case.dtype, f"{case.loss} grad")
    loss_ratio = max(r for r, _ in loss_checks)
    loss_failures = [f for _, f in loss_checks if f is not None]
    loss_failure = loss_failures[0] if loss_failures else None

    for label, ratio in (("loss", loss_ratio), ("grad", grad_ratio)):
        if in_hypothesis and math.isfinite(ratio):
            target(ratio, label=f"{label} error / allowed")  # steer the search towards the largest errors
    _assert_no_failure(loss_failure, grad_failure)
    return loss_ratio, grad_ratio


def _assert_no_failure(loss, grad):
    """Each kind of failure on its own line, so that hypothesis reports (and shrinks) distinct ones separately."""
    loss_kind, grad_kind = loss and loss[0], grad and grad[0]
    assert loss_kind != "oracle", loss[1]
    assert grad_kind != "oracle", grad[1]
    assert loss_kind != "non-finite", loss[1]
    assert grad_kind != "non-finite", grad[1]
    assert loss_kind != "bound", loss[1]
    assert grad_kind != "bound", grad[1]


def _events(case):
    event(f"dtype {str(case.dtype).replace('torch.', '')}")
    event(f"reduction {case.reduction}")
    event(f"mask {case.mask}{' + ' + case.masked_fill if case.masked_fill else ''}")
    for kind in case.row_kinds:
        event(f"rows {kind}")
    if case.neg_inf:
        event(f"-inf {case.neg_inf}")
    event(f"workspace split {case.workspace_splits}")


# --- the tests -----------------------------------------------------------------------------------------------------
# Examples per test come from the hypothesis profile (tests/conftest.py): "ci" 300, "thorough" more. The emulated
# backend, ~1000x slower, gets a third of them (for all three losses together), on small draws.
_EXAMPLES = settings.default.max_examples


@given(case=cases("kd"))
def test_kd_cpu(case):
    _events(case)
    run_case(case)


@given(case=cases("ckd"))
def test_ckd_cpu(case):
    _events(case)
    run_case(case)


@given(case=cases("bickd"))
def test_bickd_cpu(case):
    _events(case)
    run_case(case)


@skip_unless("emulated")
@settings(max_examples=max(30, _EXAMPLES // 3))
@given(data=st.data())
def test_emulated(data):
    loss = data.draw(st.sampled_from(LOSSES), label="loss")
    case = data.draw(cases(loss, max_n=EMULATED_MAX_N, max_c=EMULATED_MAX_C, max_elements=EMULATED_MAX_ELEMENTS),
                     label="case")
    _events(case)
    run_case(case, device="emulated")


@skip_unless("cuda")
@pytest.mark.parametrize("loss", LOSSES)
@given(data=st.data())
def test_cuda(loss, data):
    case = data.draw(cases(loss), label="case")
    _events(case)
    run_case(case, device="cuda")


# --- the fused-linear losses (tests/fuzz_fused_linear.py) ----------------------------------------------------------
from fuzz_fused_linear import fused_linear_cases, run_fused_linear_case  # noqa: E402


@settings(max_examples=max(30, _EXAMPLES // 3))
@given(case=fused_linear_cases("ckd"))
def test_fused_linear_ckd_cpu(case):
    event(f"dtype {str(case.dtype).replace('torch.', '')}")
    event(f"head ratio 10^{round(case.log_head_ratio)}")
    run_fused_linear_case(case)


@skip_unless("emulated")
@settings(max_examples=max(30, _EXAMPLES // 3))
@given(case=fused_linear_cases("ckd", dtypes=(torch.bfloat16, torch.float16)))
def test_fused_linear_ckd_emulated_16_bit(case):
    """16-bit fused-linear CKD on the emulated backend, where the strips and the head gradient take tensor-core
    operands (16-bit parts, docs/math.md 8.3), against the same bounds (the materialised route on the CPU)."""
    event(f"dtype {str(case.dtype).replace('torch.', '')}")
    event(f"head ratio 10^{round(case.log_head_ratio)}")
    run_fused_linear_case(case, fused_backend=functools.partial(on_backend, "emulated"))


@settings(max_examples=max(30, _EXAMPLES // 3))
@given(case=fused_linear_cases("kd"))
def test_fused_linear_kd_cpu(case):
    event(f"dtype {str(case.dtype).replace('torch.', '')}")
    event(f"bad label {case.bad_label}")
    run_fused_linear_case(case)
