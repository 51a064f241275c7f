"""CKD (student anchor) from an offline top-k teacher with its moments (topk_ckd_loss, fused_linear_topk_ckd_loss,
docs/math.md 9.6) against the float64 oracle of ckd_ext.reference, which materialises the teacher's row t~ (its top-k
logits, the tail's mean elsewhere) and runs CKD's definition on it: loss and every gradient, reductions, masks,
padding ids, 16-bit inputs, exactness against dense CKD where the approximation is exact (k = V, a constant tail),
gradcheck, the workspace chunking, torch.compile, and that nothing N x V (fused-linear form) or N x N is allocated
or kept."""
import pytest
import torch

import ckd_ext
from ckd_ext import reference
from inputs import random_mask, saved_by, weighted_total
from test_fused_linear import LargestTensor
from test_topk import compare, loss_and_grads
from tolerances import TOLERANCE

REDUCTIONS = ("mean", "sum", "none")


def teacher_of(teacher_logits, k, temperature=1.5, pad_rows=()):
    """The producer's output (ids, log-probabilities at `temperature`, LSE, sum, sum of squares) from materialised
    float64 teacher logits (..., V); rows in `pad_rows` keep only their first few ids (negative ids after them)."""
    eye = torch.eye(teacher_logits.shape[-1], dtype=torch.float64)
    top = reference.teacher_topk(teacher_logits.double(), eye, k, temperature=temperature, moments=True)
    ids, logprobs = top.ids.clone(), top.logprobs.clone()
    flat_ids, flat_logprobs = ids.reshape(-1, k), logprobs.reshape(-1, k)
    for n, row in enumerate(pad_rows):
        keep = n % k  # 0 (a row without any entry), 1, 2, ...
        flat_ids[row, keep:] = -1 - torch.arange(k - keep)
        flat_logprobs[row, keep:] = float("nan")  # never read
    return ckd_ext.TeacherTopK(ids, logprobs, top.log_normalizer, top.logit_sum, top.logit_square_sum)


def as_dtype(teacher, dtype):
    return teacher._replace(**{name: getattr(teacher, name).to(dtype) for name in
                               ("logprobs", "log_normalizer", "logit_sum", "logit_square_sum")})


def heads(tokens=(3, 6), vocab=29, width=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*tokens, width, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, width, generator=g, dtype=torch.float64) * 3 / width ** 0.5
    bias = torch.randn(vocab, generator=g, dtype=torch.float64) * 0.3
    return [x.to(dtype).requires_grad_() for x in (hidden, weight, bias)]


def teacher_logits(shape, vocab, seed):
    g = torch.Generator().manual_seed(seed + 100)
    return torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * 3 + 1.0


def logit_call(module):
    def run(student, *teacher, **kwargs):
        return module.topk_ckd_loss(student, *teacher, **kwargs)
    return run


def fused_call(module, **fixed):
    def run(hidden, weight, bias, *teacher, **kwargs):
        return module.fused_linear_topk_ckd_loss(hidden, weight, *teacher, student_bias=bias, **fixed, **kwargs)
    return run


# --------------------------------------------------------------------------------------------------
# Against the oracle
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("k", (1, 6, 37))
def test_logits_match_oracle(reduction, k):
    student = (torch.randn(4, 5, 37, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
               ).requires_grad_()
    teacher = teacher_of(teacher_logits((4, 5), 37, 1), k, pad_rows=(3, 7, 11) if k > 1 else ())
    compare(logit_call(ckd_ext), logit_call(reference), (student, *teacher), torch.float64, temperature=1.5,
            tau=0.7, mask=random_mask((4, 5), seed=1), reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", (True, False))
def test_fused_linear_matches_oracle(reduction, bias):
    """Hidden states, head and bias: the loss and the gradients of all three against the oracle on the materialised
    logits, with a mask and padded rows."""
    hidden, weight, student_bias = heads(seed=2)
    teacher = teacher_of(teacher_logits((3, 6), 29, 2), 4, pad_rows=(2, 9, 15))
    inputs = (hidden, weight, student_bias if bias else None, *teacher)
    compare(fused_call(ckd_ext), fused_call(reference), inputs, torch.float64, temperature=1.5, tau=0.5,
            mask=random_mask((3, 6), seed=2), reduction=reduction)


def dense_pair(form, seed):
    """(student inputs, teacher logits, the student logits as a function of the inputs) for either form."""
    if form == "logits":
        student = (torch.randn(9, 13, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
                   ).requires_grad_()
        return (student,), lambda s: s
    hidden, weight, bias = heads(tokens=(9,), vocab=13, seed=seed)
    return (hidden, weight, bias), lambda h, w, b: h @ w.T + b


def run_form(form, inputs, teacher, **kwargs):
    if form == "logits":
        return ckd_ext.topk_ckd_loss(*inputs, *teacher, **kwargs)
    return fused_call(ckd_ext)(*inputs, *teacher, **kwargs)


@pytest.mark.parametrize("form", ("logits", "fused_linear"))
@pytest.mark.parametrize("case", ("every class", "constant tail"))
def test_exact_where_the_tail_is_known(form, case):
    """k = V (no tail), or a teacher whose logits outside its top k are all equal: the loss and its gradients are
    dense CKD's (ckd_loss, anchor="student", on the teacher's full logits), with a mask."""
    inputs, logits_of = dense_pair(form, seed=3)
    teacher = teacher_logits((9,), 13, 3)
    k = 13 if case == "every class" else 4
    if case == "constant tail":
        top = teacher.topk(4, dim=1).indices
        tail = torch.ones_like(teacher, dtype=torch.bool).scatter_(1, top, False)
        teacher = torch.where(tail, teacher.gather(1, top).min(1, keepdim=True).values - 2.0, teacher)
    mask = random_mask((9,), seed=3)
    approx = run_form(form, inputs, teacher_of(teacher, k, temperature=2.0), temperature=2.0, tau=0.6, mask=mask,
                      reduction="none")
    dense = ckd_ext.ckd_loss(logits_of(*inputs), teacher, tau=0.6, anchor="student", mask=mask, reduction="none")
    torch.testing.assert_close(approx, dense, rtol=1e-12, atol=1e-14)
    w = torch.rand(9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for a, e in zip(torch.autograd.grad((approx * w).sum(), inputs), torch.autograd.grad((dense * w).sum(), inputs)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-13)


def test_inexact_tail_is_the_dropped_covariance():
    """Below k = V the positive differs from the dense one by exactly e_i / (|t_i| |s_i| tau), e_i the tail's
    sum_v (t_v - mu)(s_v): checked on single-row losses' difference through the positive (with n = 1 there is no
    negative, so the row's term is 0; two rows, one the copy of the other with a shifted teacher, keep the
    negative fixed)."""
    g = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(2, 20, generator=g, dtype=torch.float64), teacher_logits((2,), 20, 4)
    k, tau = 5, 0.8
    top = teacher_of(teacher, k, temperature=1.0)
    t_tilde = reference.topk_teacher_logits(top.ids, top.logprobs, top.log_normalizer, top.logit_sum, 20, 1.0)
    e = ((teacher - t_tilde) * student).sum(1)
    positive_error = e / (teacher.norm(dim=1) * student.norm(dim=1) * tau)
    # term = softplus(lse_neg - pos): d term / d pos = -sigmoid(lse_neg - pos); compare the terms' inverse maps
    approx = ckd_ext.topk_ckd_loss(student, *top, tau=tau, reduction="none")
    dense = ckd_ext.ckd_loss(student, teacher, tau=tau, anchor="student", reduction="none")
    neg = (torch.nn.functional.normalize(student, dim=1) @ torch.nn.functional.normalize(student, dim=1).T)[0, 1] / tau
    # softplus^-1(term) = neg - pos
    pos_approx = neg - torch.log(torch.expm1(approx))
    pos_dense = neg - torch.log(torch.expm1(dense))
    torch.testing.assert_close(pos_dense - pos_approx, positive_error, rtol=1e-9, atol=1e-12)
    assert positive_error.abs().min() > 1e-3  # the case is not trivially exact


# --------------------------------------------------------------------------------------------------
# Inputs as stored: padding, 16-bit, masks, chunks
# --------------------------------------------------------------------------------------------------

def test_padding_is_the_row_without_those_entries():
    """Rows whose ids are padded (negative ids, at different places and values) have the loss and gradient of the
    same rows given only their real entries: the padding slots are not in S, they join the tail's mean."""
    student = (torch.randn(5, 17, generator=torch.Generator().manual_seed(5), dtype=torch.float64)).requires_grad_()
    teacher = teacher_of(teacher_logits((5,), 17, 5), 6)
    ids, logprobs = teacher.ids.clone(), teacher.logprobs.clone()
    ids[:, 1], ids[:, 4], logprobs[:, 1], logprobs[:, 4] = -1, -7, float("nan"), float("nan")
    keep = torch.tensor([0, 2, 3, 5])
    padded = teacher._replace(ids=ids, logprobs=logprobs)
    short = teacher._replace(ids=teacher.ids[:, keep], logprobs=teacher.logprobs[:, keep])
    a = loss_and_grads(logit_call(ckd_ext), (student, *padded), reduction="none")
    b = loss_and_grads(logit_call(ckd_ext), (student, *short), reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("form", ("logits", "fused_linear"))
def test_masked_rows_holding_nan_are_harmless(form):
    mask = random_mask((3, 6), seed=6)
    teacher = teacher_of(teacher_logits((3, 6), 29, 6), 4)
    bad = teacher._replace(ids=teacher.ids.masked_fill(~mask.unsqueeze(-1), 10 ** 6),
                           logit_square_sum=teacher.logit_square_sum.masked_fill(~mask, float("nan")),
                           log_normalizer=teacher.log_normalizer.masked_fill(~mask, float("nan")))
    if form == "logits":
        student = torch.randn(3, 6, 29, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        poisoned = student.masked_fill(~mask.unsqueeze(-1), float("nan"))
        a = loss_and_grads(logit_call(ckd_ext), (student.requires_grad_(), *teacher), mask=mask)
        b = loss_and_grads(logit_call(ckd_ext), (poisoned.requires_grad_(), *bad), mask=mask)
    else:
        hidden, weight, bias = heads(seed=6)
        poisoned = hidden.detach().masked_fill(~mask.unsqueeze(-1), float("nan")).requires_grad_()
        a = loss_and_grads(fused_call(ckd_ext), (hidden, weight, bias, *teacher), mask=mask)
        b = loss_and_grads(fused_call(ckd_ext), (poisoned, weight, bias, *bad), mask=mask)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32))
@pytest.mark.parametrize("form", ("logits", "fused_linear"))
def test_low_precision(dtype, form):
    """16-bit and float32 inputs against the float64 oracle on the same rounded inputs (teacher moments in float32,
    as teacher_topk gives them). The row statistics and positives are float64, the strips float32 and each result
    rounded once to the input dtype: TOLERANCE (twice the 16-bit unit roundoff; 1e-5 for float32) holds normwise.
    The fused-linear head's gradient is the sum of two parts (the Gram matrix's and the positive's), each rounded to
    the input dtype before autograd adds them: three roundings, 3/2 of TOLERANCE for 16-bit."""
    g = torch.Generator().manual_seed(7)
    mask = random_mask((24,), seed=7)
    teacher = as_dtype(teacher_of(torch.randn(24, 300, generator=g, dtype=torch.float64) * 3, 16, pad_rows=(5,)),
                       torch.float32)
    if form == "logits":
        student = (torch.randn(24, 300, generator=g) * 3).to(dtype).requires_grad_()
        compare(logit_call(ckd_ext), logit_call(reference), (student, *teacher), dtype, tau=0.5, mask=mask)
        return
    hidden = torch.randn(24, 8, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(300, 8, generator=g).to(dtype).requires_grad_()
    bias = (torch.randn(300, generator=g) * 0.3).to(dtype).requires_grad_()
    tol = TOLERANCE[dtype] * (1.5 if dtype != torch.float32 else 1.0)
    compare(fused_call(ckd_ext), fused_call(reference), (hidden, weight, bias, *teacher), dtype, tol=tol, tau=0.5,
            mask=mask)


def test_chunks_of_one_row_agree(workspace):
    """A workspace of a few bytes (one row per chunk and strip) gives the numbers of the default budget."""
    student = (torch.randn(11, 37, generator=torch.Generator().manual_seed(8), dtype=torch.float64)).requires_grad_()
    teacher = teacher_of(teacher_logits((11,), 37, 8), 5, pad_rows=(2,))
    hidden, weight, bias = heads(tokens=(11,), vocab=37, seed=8)
    results = []
    for nbytes in (None, 64):
        workspace(nbytes)
        flat = []
        for reduction in ("mean", "none"):
            out, grads = loss_and_grads(logit_call(ckd_ext), (student, *teacher), reduction=reduction)
            flat += [out, *grads]
            out, grads = loss_and_grads(fused_call(ckd_ext), (hidden, weight, bias, *teacher), reduction=reduction)
            flat += [out, *grads]
        results.append(flat)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_modules_match_functions():
    student = torch.randn(4, 5, 37, dtype=torch.float64)
    teacher = teacher_of(teacher_logits((4, 5), 37, 9), 6)
    mask = random_mask((4, 5), seed=9)
    module = ckd_ext.TopKCKDLoss(temperature=1.5, tau=0.3, reduction="sum")
    torch.testing.assert_close(module(student, *teacher, mask=mask), ckd_ext.topk_ckd_loss(
        student, *teacher, temperature=1.5, tau=0.3, reduction="sum", mask=mask))
    assert "tau=0.3" in repr(module)
    hidden, weight, bias = heads(tokens=(4, 5), vocab=37, seed=9)
    module = ckd_ext.FusedLinearTopKCKDLoss(temperature=1.5, tau=0.3)
    torch.testing.assert_close(module(hidden, weight, *teacher, student_bias=bias, mask=mask),
                               ckd_ext.fused_linear_topk_ckd_loss(hidden, weight, *teacher, student_bias=bias,
                                                                  temperature=1.5, tau=0.3, mask=mask))


# --------------------------------------------------------------------------------------------------
# gradcheck, torch.compile
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_gradcheck(reduction):
    g = torch.Generator().manual_seed(10)
    student = torch.randn(5, 9, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = teacher_of(teacher_logits((5,), 9, 10), 3)
    teacher.ids[1, 2] = -1
    kwargs = dict(temperature=1.7, tau=0.6, reduction=reduction, mask=torch.tensor([True, True, False, True, True]))
    assert torch.autograd.gradcheck(lambda s: ckd_ext.topk_ckd_loss(s, *teacher, **kwargs), (student,))
    hidden, weight, bias = heads(tokens=(5,), vocab=9, width=3, seed=10)
    assert torch.autograd.gradcheck(lambda h, w, b: fused_call(ckd_ext)(h, w, b, *teacher, **kwargs),
                                    (hidden, weight, bias))


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) of both forms agrees with eager."""
    student = torch.randn(4, 5, 37, generator=torch.Generator().manual_seed(11), requires_grad=True)
    teacher = as_dtype(teacher_of(teacher_logits((4, 5), 37, 11), 6), torch.float32)
    hidden, weight, bias = (x.detach().float().requires_grad_() for x in heads(tokens=(4, 5), vocab=37, seed=11))
    mask = random_mask((4, 5), seed=11)

    def step(s, h, w, b):
        return (ckd_ext.topk_ckd_loss(s, *teacher, tau=0.5, mask=mask, reduction="sum")
                + ckd_ext.fused_linear_topk_ckd_loss(h, w, *teacher, student_bias=b, mask=mask))

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    expected = step(student, hidden, weight, bias)
    actual = compiled(student, hidden, weight, bias)
    torch.testing.assert_close(actual, expected)
    leaves = (student, hidden, weight, bias)
    for a, e in zip(torch.autograd.grad(actual, leaves), torch.autograd.grad(expected, leaves)):
        torch.testing.assert_close(a, e)


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_fused_linear_allocates_nothing_n_by_v(workspace, reduction):
    """Forward and backward of the fused-linear form at N x V = 4M, N x N = 1M, N x k x H = 1M: no tensor of 1/8 of
    N x N appears (chunks and strips of the 1 MiB workspace); the probe sees materialised logits, so it can fail."""
    workspace(1 << 20)
    tokens, vocab, width, k = 1024, 4096, 16, 64
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(tokens, width, generator=g, requires_grad=True)
    weight = torch.randn(vocab, width, generator=g, requires_grad=True)
    teacher = ckd_ext.teacher_topk(torch.randn(tokens, width, generator=g), weight.detach() * 1.1, k, moments=True)
    with LargestTensor() as mode:
        loss = ckd_ext.fused_linear_topk_ckd_loss(hidden, weight, *teacher, reduction=reduction)
        loss.sum().backward()
    assert mode.largest < tokens * tokens // 8, f"{mode.op} returned {mode.largest} elements"
    with LargestTensor() as mode:
        torch.nn.functional.linear(hidden, weight).sum().backward()
    assert mode.largest >= tokens * vocab


@pytest.mark.parametrize("form", ("logits", "fused_linear"))
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_saved_for_backward(form, reduction):
    """What the graph keeps beyond the inputs themselves: per-row numbers and (fused-linear) N x K rows, the
    teacher's N x k coefficients and K x K matrices, or the finished gradients ("mean": hidden- and head-sized);
    never N x V, N x N or N x k x K."""
    g = torch.Generator().manual_seed(13)
    tokens, vocab, width, k = 256, 2048, 8, 32
    hidden = torch.randn(tokens, width, generator=g, requires_grad=True)
    weight = torch.randn(vocab, width, generator=g, requires_grad=True)
    teacher = ckd_ext.teacher_topk(torch.randn(tokens, width, generator=g), weight.detach(), k, moments=True)
    student = (hidden @ weight.T).detach().requires_grad_()
    if form == "logits":
        inputs = (student, *teacher)
        out, saved = saved_by(ckd_ext.topk_ckd_loss, *inputs, reduction=reduction)
    else:
        inputs = (hidden, weight, *teacher)
        out, saved = saved_by(ckd_ext.fused_linear_topk_ckd_loss, *inputs, reduction=reduction)
    storages = {x.untyped_storage().data_ptr() for x in inputs}
    copies = [x for x in saved if x is not None and x.untyped_storage().data_ptr() not in storages]
    limit = vocab * width if form == "fused_linear" else tokens
    assert all(x.numel() <= max(limit, tokens * k) for x in copies), sorted(x.shape for x in copies)
    if form == "logits":
        assert all(x.numel() == tokens for x in copies)  # lse and the positives
    out.sum().backward()
