"""Tests of the float64 oracle (ckd_ext.reference) against independent formulations.

Everything runs in float64 on small shapes unless a test is about dtypes. The independent
formulations deliberately avoid the reference's helpers: cross entropy / kl_div from torch, explicit
Python loops over rows or columns, cosine_similarity instead of normalize + matmul.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from ckd_ext import reference as ref

DTYPE = torch.float64

# Every loss configuration the reference offers, as (function, keyword arguments).
CONFIGS = {
    "kd": (ref.kd_loss, {"temperature": 2.0}),
    "ckd_student": (ref.ckd_loss, {"tau": 0.5, "anchor": "student"}),
    "ckd_teacher": (ref.ckd_loss, {"tau": 0.5, "anchor": "teacher"}),
    "bickd": (ref.bickd_loss, {"temperature": 2.0, "tau": 0.2, "w_sample": 1.0, "w_class": 0.5}),
    "bickd_symmetric": (ref.bickd_loss, {"temperature": 3.0, "tau": 0.3, "w_sample": 0.7,
                                         "w_class": 1.3, "symmetric": True}),
}
CKD_CONFIGS = ["ckd_student", "ckd_teacher"]
BICKD_CONFIGS = ["bickd", "bickd_symmetric"]


def logits(*shape, scale=3.0, dtype=DTYPE, seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator, dtype=torch.float64) * scale
    return x.to(dtype).requires_grad_(requires_grad)


def pair(*shape, scale=3.0, dtype=DTYPE, seed=0):
    """A student (requires grad) and a teacher of the same shape."""
    return (logits(*shape, scale=scale, dtype=dtype, seed=seed, requires_grad=True),
            logits(*shape, scale=scale, dtype=dtype, seed=seed + 1000))


def total(out):
    """Sum of a loss output; BicKD 'none' returns (sample_terms, class_terms)."""
    if isinstance(out, tuple):
        return out[0].sum() + out[1].sum()
    return out.sum()


def student_grad(fn, kwargs, student, teacher, **extra):
    """(summed loss, gradient of it w.r.t. the student)."""
    loss = total(fn(student, teacher, **kwargs, **extra))
    (grad,) = torch.autograd.grad(loss, student)
    return loss.detach(), grad


def assert_close(actual, expected):
    """float64 agreement up to rounding: the formulations differ only in summation order."""
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Against independent formulations
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 0.1])
def test_ckd_teacher_anchor_is_the_released_cross_entropy(tau):
    student, teacher = pair(7, 11)
    released = F.cross_entropy(F.normalize(teacher, dim=1) @ F.normalize(student, dim=1).T / tau,
                               torch.arange(7))
    ours = ref.ckd_loss(student, teacher, tau=tau, anchor="teacher")
    assert_close(ours, released)
    assert_close(torch.autograd.grad(ours, student)[0], torch.autograd.grad(released, student)[0])


def ckd_student_anchor_loop(student, teacher, tau):
    """ckd_i = log(exp(pos_i) + sum_{j != i} exp(neg_ij)) - pos_i, one row at a time."""
    terms = []
    for i in range(student.shape[0]):
        positive = F.cosine_similarity(teacher[i], student[i], dim=0) / tau
        negatives = [F.cosine_similarity(student[i], student[j], dim=0) / tau
                     for j in range(student.shape[0]) if j != i]
        candidates = torch.stack([positive] + negatives)
        terms.append(torch.log(torch.exp(candidates).sum()) - positive)
    return torch.stack(terms)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_ckd_student_anchor_against_row_loop(tau):
    student, teacher = pair(6, 9)
    expected = ckd_student_anchor_loop(student, teacher, tau)
    ours = ref.ckd_loss(student, teacher, tau=tau, anchor="student", reduction="none")
    assert_close(ours, expected)
    assert_close(torch.autograd.grad(ours.mean(), student)[0],
                 torch.autograd.grad(expected.mean(), student)[0])


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_matches_kl_div_and_its_gradient(temperature):
    student, teacher = pair(8, 10)
    n = student.shape[0]
    common = (F.kl_div(F.log_softmax(student / temperature, 1), F.softmax(teacher / temperature, 1),
                       reduction="none").sum(1).mean() * temperature ** 2)
    ours = ref.kd_loss(student, teacher, temperature=temperature)
    assert_close(ours, common)
    p = F.softmax(student.detach() / temperature, 1)
    q = F.softmax(teacher / temperature, 1)
    assert_close(torch.autograd.grad(ours, student)[0], temperature * (p - q) / n)


def bickd_class_loop(p, q, tau):
    """cls_c = log sum_d exp(G_cd) - G_cc, with G_cd the column cosine / tau, one class at a time."""
    num_classes = p.shape[1]
    terms = []
    for c in range(num_classes):
        g_row = torch.stack([torch.dot(p[:, c], q[:, d]) / (p[:, c].norm() * q[:, d].norm()) / tau
                             for d in range(num_classes)])
        terms.append(torch.log(torch.exp(g_row).sum()) - g_row[c])
    return torch.stack(terms)


def bickd_sample_loop(p, q, tau):
    """smp_i = log sum_k exp(A_ik) - A_ii, with A_ik the row cosine / tau, one sample at a time."""
    terms = []
    for i in range(p.shape[0]):
        a_row = torch.stack([F.cosine_similarity(p[i], q[k], dim=0) / tau for k in range(q.shape[0])])
        terms.append(torch.log(torch.exp(a_row).sum()) - a_row[i])
    return torch.stack(terms)


@pytest.mark.parametrize("symmetric", [False, True])
def test_bickd_against_loops_over_rows_and_columns(symmetric):
    temperature, tau, w_sample, w_class = 2.0, 0.3, 0.7, 1.6
    student, teacher = pair(6, 5)
    p = F.softmax(student / temperature, 1)
    q = F.softmax(teacher / temperature, 1)
    sample_terms, class_terms = bickd_sample_loop(p, q, tau), bickd_class_loop(p, q, tau)
    if symmetric:  # teacher-anchored twins: the same loops with the roles of P and Q swapped
        sample_terms = 0.5 * (sample_terms + bickd_sample_loop(q, p, tau))
        class_terms = 0.5 * (class_terms + bickd_class_loop(q, p, tau))
    kwargs = dict(temperature=temperature, tau=tau, w_sample=w_sample, w_class=w_class,
                  symmetric=symmetric)
    ours_sample, ours_class = ref.bickd_loss(student, teacher, **kwargs, reduction="none")
    assert_close(ours_sample, w_sample * sample_terms)
    assert_close(ours_class, w_class * class_terms)
    expected_mean = w_sample * sample_terms.mean() + w_class * class_terms.mean()
    ours_mean = ref.bickd_loss(student, teacher, **kwargs)
    assert_close(ours_mean, expected_mean)
    assert_close(torch.autograd.grad(ours_mean, student)[0],
                 torch.autograd.grad(expected_mean, student)[0])


# --------------------------------------------------------------------------------------------------
# Masks, reductions, shapes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mask_equals_compacted_batch(name, reduction):
    fn, kwargs = CONFIGS[name]
    student, teacher = pair(7, 6)
    mask = torch.tensor([True, False, True, True, False, False, True])
    loss, grad = student_grad(fn, kwargs, student, teacher, mask=mask, reduction=reduction)
    compact_student = student.detach()[mask].requires_grad_(True)
    compact_loss, compact_grad = student_grad(fn, kwargs, compact_student, teacher[mask],
                                              reduction=reduction)
    assert_close(loss, compact_loss)
    assert_close(grad[mask], compact_grad)
    assert torch.all(grad[~mask] == 0)
    if reduction == "none":  # per-row terms: the compacted ones in place, 0 for masked rows
        out = fn(student, teacher, **kwargs, mask=mask, reduction="none")
        compact_out = fn(compact_student, teacher[mask], **kwargs, reduction="none")
        if isinstance(out, tuple):  # BicKD: the class terms too
            assert_close(out[1], compact_out[1])
            out, compact_out = out[0], compact_out[0]
        assert_close(out[mask], compact_out)
        assert torch.all(out[~mask] == 0)


@pytest.mark.parametrize("name", CONFIGS)
def test_masked_rows_do_not_matter(name):
    """Whatever the masked rows hold (even NaN / inf), neither the loss nor the gradient changes."""
    fn, kwargs = CONFIGS[name]
    student, teacher = pair(5, 4)
    mask = torch.tensor([True, True, False, True, False])
    loss, grad = student_grad(fn, kwargs, student, teacher, mask=mask)
    garbage_student, garbage_teacher = student.detach().clone(), teacher.clone()
    garbage_student[~mask] = float("nan")
    garbage_teacher[~mask] = float("inf")
    garbage_loss, garbage_grad = student_grad(fn, kwargs, garbage_student.requires_grad_(True),
                                              garbage_teacher, mask=mask)
    assert_close(garbage_loss, loss)
    assert_close(garbage_grad, grad)


@pytest.mark.parametrize("name", CONFIGS)
def test_reductions_are_consistent(name):
    fn, kwargs = CONFIGS[name]
    student, teacher = pair(6, 5)
    mask = torch.tensor([True, True, False, True, True, True])
    n, num_classes = int(mask.sum()), student.shape[1]
    mean = fn(student, teacher, **kwargs, mask=mask, reduction="mean")
    summed = fn(student, teacher, **kwargs, mask=mask, reduction="sum")
    none = fn(student, teacher, **kwargs, mask=mask, reduction="none")
    if isinstance(none, tuple):  # BicKD: each side has its own count (n rows, C classes)
        sample_terms, class_terms = none
        assert sample_terms.shape == (6,) and class_terms.shape == (num_classes,)
        assert_close(summed, sample_terms.sum() + class_terms.sum())
        assert_close(mean, sample_terms.sum() / n + class_terms.sum() / num_classes)
    else:
        assert none.shape == (6,)
        assert_close(mean * n, summed)
        assert_close(summed, none.sum())


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_leading_dims_equal_flattened(name, reduction):
    fn, kwargs = CONFIGS[name]
    batch, length, num_classes = 2, 3, 5
    student, teacher = pair(batch, length, num_classes)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    loss, grad = student_grad(fn, kwargs, student, teacher, mask=mask, reduction=reduction)
    flat_student = student.detach().reshape(-1, num_classes).requires_grad_(True)
    flat_loss, flat_grad = student_grad(fn, kwargs, flat_student, teacher.reshape(-1, num_classes),
                                        mask=mask.reshape(-1), reduction=reduction)
    assert_close(loss, flat_loss)
    assert_close(grad.reshape(-1, num_classes), flat_grad)
    if reduction == "none":
        out = fn(student, teacher, **kwargs, mask=mask, reduction="none")
        row_terms = out[0] if isinstance(out, tuple) else out
        assert row_terms.shape == (batch, length)


def test_single_row_input_of_one_dimension():
    """A (C,) input is one row; mask is then a 0-dimensional bool tensor."""
    student, teacher = pair(5)
    assert_close(ref.kd_loss(student, teacher), ref.kd_loss(student[None], teacher[None]))
    assert ref.kd_loss(student, teacher, reduction="none").shape == ()
    assert ref.kd_loss(student, teacher, mask=torch.tensor(False)) == 0


# --------------------------------------------------------------------------------------------------
# Degenerate batches: n = 0, n = 1
# --------------------------------------------------------------------------------------------------


def empty_batches():
    """(student, teacher, mask) with no valid row: N = 0, and N > 0 fully masked."""
    empty = pair(0, 5)
    full = pair(3, 5)
    return [(*empty, None), (*empty, torch.zeros(0, dtype=torch.bool)),
            (*full, torch.zeros(3, dtype=torch.bool))]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_valid_row_gives_zero_loss_and_zero_grad(name, reduction):
    fn, kwargs = CONFIGS[name]
    for student, teacher, mask in empty_batches():
        out = fn(student, teacher, **kwargs, mask=mask, reduction=reduction)
        loss, grad = student_grad(fn, kwargs, student, teacher, mask=mask, reduction=reduction)
        assert loss == 0
        assert grad.shape == student.shape and torch.all(grad == 0)
        if reduction == "none":
            row_terms = out[0] if isinstance(out, tuple) else out
            assert row_terms.shape == student.shape[:-1]
            if isinstance(out, tuple):
                assert torch.all(out[1] == 0) and out[1].shape == (5,)


@pytest.mark.parametrize("name", CKD_CONFIGS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ckd_one_valid_row_gives_zero(name, reduction):
    fn, kwargs = CONFIGS[name]
    for student, teacher, mask in [(*pair(1, 6), None),
                                   (*pair(4, 6), torch.tensor([False, False, True, False]))]:
        loss, grad = student_grad(fn, kwargs, student, teacher, mask=mask, reduction=reduction)
        assert loss == 0
        assert torch.all(grad == 0)


@pytest.mark.parametrize("name", BICKD_CONFIGS)
def test_bickd_one_valid_row_has_zero_sample_side(name):
    fn, kwargs = CONFIGS[name]
    student, teacher = pair(1, 6)
    sample_terms, class_terms = fn(student, teacher, **kwargs, reduction="none")
    assert torch.all(sample_terms == 0)
    # With a single row every column is a positive scalar, normalised to 1: G = 1/tau everywhere.
    assert_close(class_terms, torch.full((6,), kwargs["w_class"] * math.log(6), dtype=DTYPE))


# --------------------------------------------------------------------------------------------------
# gradcheck
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(name, reduction):
    fn, kwargs = CONFIGS[name]
    student, teacher = pair(4, 3, scale=1.5)
    mask = torch.tensor([True, True, False, True])
    assert torch.autograd.gradcheck(
        lambda s: fn(s, teacher, **kwargs, mask=mask, reduction=reduction), (student,))


# --------------------------------------------------------------------------------------------------
# Teacher, dtypes, numerics
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_teacher_gets_no_grad(name):
    fn, kwargs = CONFIGS[name]
    student, teacher = pair(5, 4)
    teacher.requires_grad_(True)
    total(fn(student, teacher, **kwargs)).backward()
    assert teacher.grad is None
    assert student.grad is not None


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_returns_student_dtype(name, dtype):
    fn, kwargs = CONFIGS[name]
    student, teacher = pair(6, 5, dtype=dtype)
    out = fn(student, teacher, **kwargs)
    assert out.dtype == dtype
    out.backward()
    assert student.grad.dtype == dtype
    # Accumulation is in float32, so only the final rounding to the student dtype is lost.
    exact = fn(student.detach().double(), teacher.double(), **kwargs)
    torch.testing.assert_close(out.double(), exact, rtol=1e-2 if dtype != torch.float32 else 1e-5,
                               atol=1e-5)
    none = fn(student, teacher, **kwargs, reduction="none")
    for part in none if isinstance(none, tuple) else (none,):
        assert part.dtype == dtype


def test_teacher_of_another_dtype():
    student, teacher = pair(5, 4, dtype=torch.float32)
    for name, (fn, kwargs) in CONFIGS.items():
        out = fn(student, teacher.to(torch.bfloat16), **kwargs)
        assert out.dtype == torch.float32, name


@pytest.mark.parametrize("name", CONFIGS)
def test_extreme_logits_stay_finite(name):
    """Max-shifted log-sum-exp: large logits and a zero row (clamped norm) give finite values."""
    fn, kwargs = CONFIGS[name]
    student, teacher = pair(5, 6, scale=200.0)
    with torch.no_grad():
        student[2] = 0.0
        teacher[3] = 0.0
    loss, grad = student_grad(fn, kwargs, student, teacher)
    assert torch.isfinite(loss) and torch.all(torch.isfinite(grad))


# --------------------------------------------------------------------------------------------------
# The norm clamp of CKD, x / max(|x|, eps) with eps = 1e-12, against hand-written float64 formulas
# --------------------------------------------------------------------------------------------------

EPS = 1e-12


def ckd_by_hand(student, teacher, tau, anchor, weights):
    """CKD terms and d(sum_i w_i ckd_i)/ds, from docs/math.md sections 1 and 4 in plain Python floats.

    v_i = s_i / max(|s_i|, eps) (likewise u_i); the backward through the normalisation is the projection
    (dv - <dv, v> v) / |s| where |s| > eps and dv / eps where the clamp is active."""
    s, t = student.tolist(), teacher.tolist()
    n, c = len(s), len(s[0])

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    def normalised(rows):
        norms = [math.sqrt(dot(r, r)) for r in rows]
        return [[x / max(norm, EPS) for x in r] for r, norm in zip(rows, norms)], norms

    v, s_norms = normalised(s)
    u, _ = normalised(t)
    if anchor == "teacher":
        logit = [[dot(u[i], v[j]) / tau for j in range(n)] for i in range(n)]
    else:  # the diagonal (self-similarity) replaced by the positive <u_i, v_i> / tau
        logit = [[(dot(u[i], v[i]) if j == i else dot(v[i], v[j])) / tau for j in range(n)] for i in range(n)]
    terms, pi = [], []
    for i in range(n):
        m = max(logit[i])
        lse = m + math.log(sum(math.exp(z - m) for z in logit[i]))
        terms.append(lse - logit[i][i])
        pi.append([math.exp(z - lse) for z in logit[i]])
    dv = [[0.0] * c for _ in range(n)]
    for k in range(n):
        for col in range(c):
            if anchor == "teacher":  # dv_k = (1/tau) sum_i w_i (pi_ik - delta_ik) u_i
                dv[k][col] = sum(weights[i] * (pi[i][k] - (i == k)) * u[i][col] for i in range(n)) / tau
            else:  # dv_k = (1/tau) [w_k (pi_kk - 1) u_k + sum_{j != k} (w_k pi_kj + w_j pi_jk) v_j]
                dv[k][col] = (weights[k] * (pi[k][k] - 1) * u[k][col]
                              + sum((weights[k] * pi[k][j] + weights[j] * pi[j][k]) * v[j][col]
                                    for j in range(n) if j != k)) / tau
    grad = []
    for k in range(n):
        if s_norms[k] > EPS:
            along = dot(dv[k], v[k])
            grad.append([(dv[k][col] - along * v[k][col]) / s_norms[k] for col in range(c)])
        else:
            grad.append([x / EPS for x in dv[k]])
    return (torch.tensor(terms, dtype=DTYPE), torch.tensor(grad, dtype=DTYPE),
            torch.tensor(v, dtype=DTYPE))


def clamp_cases():
    """(student, teacher): rows below, at zero and just above the clamp, and logits of scale 200."""
    base_s, base_t = pair(5, 4, seed=40)
    base_s, base_t = base_s.detach(), base_t.detach()
    zero_student = base_s.clone()
    zero_student[1] = 0.0
    zero_both = base_s.clone()
    zero_both[3] = 0.0
    zero_teacher = base_t.clone()
    zero_teacher[3] = 0.0
    tiny = base_s.clone()
    tiny[2] = torch.tensor([6e-14, -8e-14, 0.0, 0.0], dtype=DTYPE)  # norm 1e-13 < eps: divided by eps
    tiny_teacher = base_t.clone()
    tiny_teacher[0] = torch.tensor([0.0, 3e-14, 0.0, 4e-14], dtype=DTYPE)
    small = base_s.clone()
    small[4] = torch.tensor([0.0, 6e-11, 8e-11, 0.0], dtype=DTYPE)  # norm 1e-10 > eps: divided by its norm
    big_s, big_t = pair(5, 4, seed=41, scale=200.0)
    return {
        "zero_student_row": (zero_student, base_t),
        "zero_student_and_teacher_rows": (zero_both, zero_teacher),
        "tiny_student_row": (tiny, base_t),
        "tiny_teacher_row": (base_s, tiny_teacher),
        "small_row_above_eps": (small, base_t),
        "scale_200": (big_s.detach(), big_t),
    }


CLAMP_CASES = clamp_cases()


@pytest.mark.parametrize("case", CLAMP_CASES)
@pytest.mark.parametrize("anchor", ["student", "teacher"])
def test_ckd_norm_clamp_against_hand_formulas(case, anchor):
    student, teacher = CLAMP_CASES[case]
    tau, weights = 0.5, [1.3, 0.6, 0.9, 1.1, 0.7]
    terms, grad, _ = ckd_by_hand(student, teacher, tau, anchor, weights)
    s = student.clone().requires_grad_(True)
    ours = ref.ckd_loss(s, teacher, tau=tau, anchor=anchor, reduction="none")
    (ours_grad,) = torch.autograd.grad((ours * torch.tensor(weights, dtype=DTYPE)).sum(), s)
    # Terms are O(1 / tau) sums of a few float64 products: agreement to ~1e-15.
    torch.testing.assert_close(ours, terms, rtol=1e-12, atol=1e-12)
    # Gradient rows span 1 (ordinary rows), 1 / 200 (scale 200), 1e10 (norm 1e-10) and 1e12 (clamped rows, dv / eps):
    # each row against its own magnitude, float64 rounding (with the projection's cancellation) well below 1e-10.
    for k in range(student.shape[0]):
        row_scale = grad[k].abs().max().item()
        err = (ours_grad[k] - grad[k]).abs().max().item()
        assert err <= 1e-10 * row_scale + 1e-300, f"row {k}: error {err:.3e}, row magnitude {row_scale:.3e}"


def test_ckd_clamp_values_pinned():
    """The numbers the clamp must give, independent of the hand formula's code: a zero student row normalises to 0,
    so every cosine it is in is 0; a row of norm 1e-13 is divided by 1e-12 (a vector of norm 0.1, not a unit vector)
    and its gradient is dv / eps, with no projection; a row of norm 1e-10 is a unit vector."""
    (zero_student, teacher), (tiny, _) = CLAMP_CASES["zero_student_row"], CLAMP_CASES["tiny_student_row"]
    tau = 0.5
    # Teacher anchor, zero student row 1: z_i1 = <u_i, 0> / tau = 0 for every anchor i, so with the other logits
    # z_ij the term of anchor 1 is LSE_j(z_1j) - 0 and anchor i's LSE holds exp(0) = 1 for candidate 1.
    u = teacher / teacher.norm(dim=1, keepdim=True)
    v = zero_student / zero_student.norm(dim=1, keepdim=True).clamp_min(EPS)
    assert torch.equal(v[1], torch.zeros(4, dtype=DTYPE))
    z = u @ v.T / tau
    assert torch.equal(z[:, 1], torch.zeros(5, dtype=DTYPE))
    expected = torch.logsumexp(z, dim=1) - z.diagonal()
    ours = ref.ckd_loss(zero_student, teacher, tau=tau, anchor="teacher", reduction="none")
    torch.testing.assert_close(ours, expected, rtol=1e-13, atol=1e-13)
    assert abs(ours[1].item() - math.log(sum(math.exp(x) for x in z[1].tolist()))) < 1e-13

    # Tiny row 2 (norm 1e-13): v_2 = s_2 / 1e-12 = (0.06, -0.08, 0, 0).
    _, grad, v_tiny = ckd_by_hand(tiny, teacher, tau, "student", [1.0] * 5)
    torch.testing.assert_close(v_tiny[2], torch.tensor([0.06, -0.08, 0.0, 0.0], dtype=DTYPE), rtol=1e-14, atol=0)
    s = tiny.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(ref.ckd_loss(s, teacher, tau=tau, anchor="student", reduction="sum"), s)
    # Without the projection the gradient of the clamped row keeps a component along v_2; with it (dividing by the
    # norm, not eps) it would be orthogonal to v_2 and 10x larger.
    assert abs(torch.dot(g[2], v_tiny[2]).item()) > 1e-3 * g[2].norm().item() * v_tiny[2].norm().item()
    torch.testing.assert_close(g[2], grad[2], rtol=1e-10, atol=1e-10 * grad[2].abs().max().item())
    assert 1e9 < g[2].abs().max().item() < 1e14  # dv / 1e-12 with dv = O(1 / tau)

    # Small row 4 (norm 1e-10, above eps) is a unit vector: its term equals that of the same direction at norm 1.
    small, _ = CLAMP_CASES["small_row_above_eps"]
    unit = small.clone()
    unit[4] = torch.tensor([0.0, 0.6, 0.8, 0.0], dtype=DTYPE)
    for anchor in ("student", "teacher"):
        torch.testing.assert_close(ref.ckd_loss(small, teacher, tau=tau, anchor=anchor, reduction="none"),
                                   ref.ckd_loss(unit, teacher, tau=tau, anchor=anchor, reduction="none"),
                                   rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("anchor", ["student", "teacher"])
def test_ckd_scale_200_is_scale_invariant(anchor):
    """At logit scale 200 no norm is clamped (nor overflows): the terms are those of the rows divided by 200 and the
    gradient is theirs divided by 200 (v = s / |s| is homogeneous of degree 0)."""
    big_s, big_t = CLAMP_CASES["scale_200"]
    s_big = big_s.clone().requires_grad_(True)
    s_one = (big_s / 200).requires_grad_(True)
    out_big = ref.ckd_loss(s_big, big_t, tau=0.1, anchor=anchor, reduction="sum")
    out_one = ref.ckd_loss(s_one, big_t / 200, tau=0.1, anchor=anchor, reduction="sum")
    torch.testing.assert_close(out_big, out_one, rtol=1e-12, atol=1e-12)
    (g_big,) = torch.autograd.grad(out_big, s_big)
    (g_one,) = torch.autograd.grad(out_one, s_one)
    torch.testing.assert_close(g_big * 200, g_one, rtol=1e-10, atol=1e-12)
