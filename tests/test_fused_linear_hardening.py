"""The fused-linear losses on the inputs an adversarial campaign broke them with: heads of very different scales,
labels outside the vocabulary, non-finite heads, autocast, a hidden size of 0; and direct numeric tests of the
keywords (mask, ignore_index, bias flags, global_batch) that only an error message or chance used to exercise.
Each result is held against the float64 oracle on materialised logits (tests/test_fused_linear.py's helpers)."""
import pytest
import torch
import torch.nn.functional as F

import ckd_ext
from ckd_ext import reference
from inputs import random_mask
from test_fused_linear import as_oracle, ckd_fns, grads_of, heads, kd_fns, logits_of, reference_kd, token_labels

RATIOS = (1.0, 1e3, 1e6)


def _relative_errors(out, grads, expected, expected_grads):
    """Loss error relative to the loss; each gradient's largest error relative to its largest entry (normwise)."""
    errors = [((out.double() - expected).abs() / expected.abs()).item()]
    for g, e in zip(grads, expected_grads):
        if e is not None:
            errors.append(((g.double() - e).abs().max() / e.abs().max()).item())
    return errors


def _fused_and_materialised_errors(student, teacher, anchor, tau=0.5):
    """(errors of fused_linear_ckd_loss, errors of ckd_loss on logits materialised in the inputs' dtype), both
    against the float64 oracle on the same rounded inputs."""
    fused_fn, oracle_fn = ckd_fns(tau=tau, anchor=anchor)
    s64, t64 = as_oracle(student, teacher)
    expected = oracle_fn(logits_of(*s64), logits_of(*t64))
    expected_grads = grads_of(expected, s64)
    out = fused_fn(student, teacher)
    fused = _relative_errors(out, grads_of(out, student), expected, expected_grads)
    out = ckd_ext.ckd_loss(F.linear(*student), F.linear(*teacher).detach(), tau=tau, anchor=anchor)
    materialised = _relative_errors(out, grads_of(out, student), expected, expected_grads)
    return fused, materialised


def _rescaled(student, teacher, *, head=1.0, hidden=1.0, bias_offset=0.0, teacher_column=None):
    """The same model pair with the student head scaled by `head` and its hidden states by `hidden` (logits scaled by
    head * hidden, or split differently between head and hidden state), a bias shifted by `bias_offset` (a constant
    shift of a logit row changes CKD, so the oracle sees it too), and optionally one teacher head column scaled by
    `teacher_column`."""
    hs, ws, bs = (x.detach() for x in student)
    ht, wt, bt = teacher
    dtype = hs.dtype
    hs = (hs.double() * hidden).to(dtype).requires_grad_()
    ws = (ws.double() * head).to(dtype).requires_grad_()
    bs = ((bs.double() + bias_offset) * head * hidden).to(dtype).requires_grad_()
    if teacher_column is not None:
        wt = wt.clone()
        wt[:, 0] *= teacher_column
    return (hs, ws, bs), (ht, wt, bt)


# float32: the fused route may lose what materialised float32 logits lose, times a small factor for rounding in other
# places (both are ~1e-7..1e-6 here; the defect gave 1e-4 at r = 1e4 and 30-50 % at r = 1e6). float64: materialised
# logits lose ~1e-15; the forms in float64 a small multiple of that.
SLACK = {torch.float32: (4.0, 1e-6), torch.float64: (16.0, 1e-13)}


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("anchor", ("student", "teacher"))
@pytest.mark.parametrize("ratio", RATIOS)
def test_ckd_accuracy_does_not_depend_on_the_heads_scale_ratio(dtype, anchor, ratio):
    """Invariant: with a student head `ratio` times smaller than the teacher's (a zero- or small-initialised student
    readout against a trained teacher), the fused loss and gradients are as close to the float64 oracle as logits
    materialised in the same dtype, within SLACK; for ratio 1 to 1e6, float32 and float64."""
    student, teacher = heads(dtype=dtype, seed=30, tokens=(48,), vocab=300, student_width=16, teacher_width=24)
    student, teacher = _rescaled(student, teacher, head=1.0 / ratio)
    fused, materialised = _fused_and_materialised_errors(student, teacher, anchor)
    factor, floor = SLACK[dtype]
    for name, f, m in zip(("loss", "hidden", "weight", "bias"), fused, materialised):
        assert f <= factor * m + floor, f"{name}: fused {f:.2e}, materialised {m:.2e} (ratio {ratio:g})"


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("case", ("small-head-large-hidden", "large-bias", "outlier-teacher-column", "collinear"))
def test_ckd_accuracy_does_not_depend_on_how_the_scale_is_split(dtype, case):
    """Invariant: the error does not depend on how the logits' scale is split between head, hidden state and bias:
    the same logits from a head 1e5 times smaller and hidden states 1e5 times larger, a bias 1e4 times the logits'
    spread, one teacher column 1e6 times the others, or nearly collinear student and teacher heads, are as accurate
    as materialised logits in the same dtype (SLACK)."""
    student, teacher = heads(dtype=dtype, seed=31, tokens=(40,), vocab=200, student_width=12, teacher_width=12)
    if case == "small-head-large-hidden":
        student, teacher = _rescaled(student, teacher, head=1e-5, hidden=1e5)
    elif case == "large-bias":
        student, teacher = _rescaled(student, teacher, bias_offset=1e4)
    elif case == "outlier-teacher-column":
        student, teacher = _rescaled(student, teacher, teacher_column=1e6)
    else:
        g = torch.Generator().manual_seed(31)
        wt = student[1].detach() + 1e-6 * torch.randn(student[1].shape, generator=g, dtype=torch.float64).to(dtype)
        teacher = (student[0].detach() + 0.1 * torch.randn(student[0].shape, generator=g,
                                                           dtype=torch.float64).to(dtype), wt, teacher[2])
    for anchor in ("student", "teacher"):
        fused, materialised = _fused_and_materialised_errors(student, teacher, anchor)
        factor, floor = SLACK[dtype]
        for name, f, m in zip(("loss", "hidden", "weight", "bias"), fused, materialised):
            assert f <= factor * m + floor, f"{case}, {anchor}: {name}: fused {f:.2e}, materialised {m:.2e}"


@pytest.mark.parametrize("where", ("student_weight", "teacher_weight", "student_bias", "student_hidden"))
@pytest.mark.parametrize("value", (float("nan"), float("inf")))
def test_ckd_non_finite_input_gives_nan(where, value):
    """Invariant: a NaN or inf in either head (or in a valid hidden row) gives a NaN loss, as the materialised route
    does, never an exception from a factorisation."""
    student, teacher = heads(dtype=torch.float32, seed=32)
    tensors = {"student_hidden": student[0].detach().clone(), "student_weight": student[1].detach().clone(),
               "student_bias": student[2].detach().clone(), "teacher_weight": teacher[1].clone()}
    tensors[where].view(-1)[3] = value
    out = ckd_ext.fused_linear_ckd_loss(tensors["student_hidden"], tensors["student_weight"], teacher[0],
                                        tensors["teacher_weight"], student_bias=tensors["student_bias"],
                                        teacher_bias=teacher[2])
    assert torch.isnan(out)
    materialised = ckd_ext.ckd_loss(F.linear(tensors["student_hidden"], tensors["student_weight"],
                                             tensors["student_bias"]),
                                    F.linear(teacher[0], tensors["teacher_weight"], teacher[2]))
    assert torch.isnan(materialised)


# --------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------

def _kd_oracle(s_logits, t_logits, *, temperature, mask, labels, ce_weight, ignore_index, reduction):
    """The contract's KD + ce_weight * CE over the valid tokens (mask True, label not ignore_index), reading no label of
    an invalid token (they may lie outside the vocabulary)."""
    valid = labels != ignore_index
    if mask is not None:
        valid = valid & mask
    terms = reference.kd_loss(s_logits, t_logits, temperature=temperature, mask=valid, reduction="none")
    flat = s_logits.reshape(-1, s_logits.shape[-1])
    ce = F.cross_entropy(flat, torch.where(valid, labels, 0).reshape(-1), reduction="none").reshape(labels.shape)
    terms = terms + ce_weight * torch.where(valid, ce, torch.zeros_like(ce))
    if reduction == "none":
        return terms
    return terms.sum() if reduction == "sum" else terms.sum() / max(int(valid.sum()), 1)


def _kd_against_oracle(student, teacher, *, labels, ignore_index, mask=None, ce_weight=0.5, reduction="mean",
                       module=False):
    kwargs = dict(temperature=2.0, mask=mask, labels=labels, ce_weight=ce_weight, ignore_index=ignore_index,
                  reduction=reduction)
    if module:
        loss = ckd_ext.FusedLinearKDLoss(temperature=2.0, ce_weight=ce_weight, ignore_index=ignore_index,
                                         reduction=reduction)
        out = loss(student[0], student[1], teacher[0], teacher[1], student_bias=student[2], teacher_bias=teacher[2],
                   mask=mask, labels=labels)
    else:
        out = ckd_ext.fused_linear_kd_loss(student[0], student[1], teacher[0], teacher[1], student_bias=student[2],
                                           teacher_bias=teacher[2], **kwargs)
    s64, t64 = as_oracle(student, teacher)
    expected = _kd_oracle(logits_of(*s64), logits_of(*t64), **kwargs)
    for got, want in zip([out] + grads_of(out, student), [expected] + grads_of(expected, s64)):
        if want is not None:
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", (-1, -2, 40, 1 << 40))
@pytest.mark.parametrize("ce_weight", (0.0, 0.5))
def test_kd_labels_outside_the_vocabulary_raise(bad, ce_weight):
    """Invariant: a label outside [0, V) that is not ignore_index (e.g. -1 under the default -100, which
    F.cross_entropy rejects too) is a ValueError naming labels and the valid range, raised before any work; with
    ce_weight 0 as well (the labels still choose the tokens)."""
    student, teacher = heads(dtype=torch.float32, seed=40)
    labels = token_labels((5, 7), 40, seed=40)
    labels[2, 3] = bad
    with pytest.raises(ValueError, match=r"^fused_linear_kd_loss: labels must be class indices in \[0, V\) = "
                                         rf"\[0, 40\) or ignore_index \(-100\).*got {bad} at token 17"):
        ckd_ext.fused_linear_kd_loss(student[0], student[1], teacher[0], teacher[1], labels=labels,
                                     ce_weight=ce_weight)


def test_kd_labels_of_masked_tokens_and_an_ignore_index_past_the_vocabulary_are_never_read():
    """Invariant: labels under a False mask may be anything, and ignore_index may be a pad id >= V (which
    F.cross_entropy accepts): the loss and gradients equal the oracle's, which never reads those labels."""
    student, teacher = heads(dtype=torch.float32, seed=41)
    mask = random_mask((5, 7), seed=41)
    labels = token_labels((5, 7), 40, seed=41, ignore_index=50_000)
    labels[~mask] = -7
    for reduction in ("mean", "none"):
        _kd_against_oracle(student, teacher, labels=labels, ignore_index=50_000, mask=mask, reduction=reduction)


@pytest.mark.parametrize("module", (False, True), ids=("function", "module"))
def test_kd_non_negative_ignore_index(module):
    """Invariant: a non-negative ignore_index (a pad id of 0) removes exactly the tokens labelled 0 from both terms
    and from the mean's count, for the function and for FusedLinearKDLoss(ignore_index=0)."""
    student, teacher = heads(dtype=torch.float32, seed=42)
    labels = token_labels((5, 7), 40, seed=42, ignore_index=0)
    assert int((labels == 0).sum()) >= 5
    _kd_against_oracle(student, teacher, labels=labels, ignore_index=0, module=module)


# --------------------------------------------------------------------------------------------------
# Shapes, biases, modules
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ("ckd", "kd"))
@pytest.mark.parametrize("side", ("student", "teacher"))
def test_hidden_size_zero_raises(loss, side):
    """Invariant: a hidden size of 0 is a ValueError naming the hidden state, not an internal reshape error."""
    student, teacher = heads(dtype=torch.float32, seed=43)
    hs, ws, ht, wt = student[0], student[1], teacher[0], teacher[1]
    if side == "student":
        hs, ws = torch.zeros(5, 7, 0), torch.zeros(40, 0)
    else:
        ht, wt = torch.zeros(5, 7, 0), torch.zeros(40, 0)
    fn = ckd_ext.fused_linear_ckd_loss if loss == "ckd" else ckd_ext.fused_linear_kd_loss
    with pytest.raises(ValueError, match=rf"^fused_linear_{loss}_loss: {side}_hidden must have a hidden size H > 0"):
        fn(hs, ws, ht, wt)


@pytest.mark.parametrize("loss", ("ckd", "kd"))
@pytest.mark.parametrize("student_bias,teacher_bias", ((True, False), (False, True)))
def test_only_one_model_has_a_bias(loss, student_bias, teacher_bias):
    """Invariant: each bias belongs to its own model: a biased student with an unbiased teacher and the reverse match
    the oracle (float64), so that swapped bias flags cannot pass."""
    student, teacher = heads(dtype=torch.float64, seed=44)
    student = student[:2] + ((student[2] * 5).detach().requires_grad_() if student_bias else None,)
    teacher = teacher[:2] + ((teacher[2] * 5) if teacher_bias else None,)
    mask = random_mask((5, 7), seed=44)
    if loss == "ckd":
        fused_fn, oracle_fn = ckd_fns(anchor="teacher", mask=mask)
    else:
        fused_fn, oracle_fn = kd_fns(mask=mask)
    out = fused_fn(student, teacher)
    s64, t64 = as_oracle(student, teacher)
    expected = oracle_fn(logits_of(*s64), logits_of(*t64))
    for got, want in zip([out] + grads_of(out, student), [expected] + grads_of(expected, s64)):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_modules_match_functions_at_every_keyword():
    """Invariant: each fused-linear module gives its function's numbers bit for bit at non-default values of every
    keyword (constructor and call), masked; and masking changes the number, so a module that dropped the mask (or
    any other keyword) fails."""
    student, teacher = heads(dtype=torch.float32, seed=45)
    mask = random_mask((5, 7), seed=45)
    labels = token_labels((5, 7), 40, seed=45, ignore_index=3)
    common = dict(student_bias=student[2], teacher_bias=teacher[2])
    ckd = ckd_ext.FusedLinearCKDLoss(tau=0.3, anchor="teacher", reduction="sum", global_batch=False, group=None)
    want = ckd_ext.fused_linear_ckd_loss(*student[:2], *teacher[:2], tau=0.3, anchor="teacher", reduction="sum",
                                         mask=mask, **common)
    assert torch.equal(ckd(*student[:2], *teacher[:2], mask=mask, **common), want)
    assert not torch.equal(ckd(*student[:2], *teacher[:2], **common), want)
    kd = ckd_ext.FusedLinearKDLoss(temperature=3.0, ce_weight=0.4, ignore_index=3, reduction="none")
    want = ckd_ext.fused_linear_kd_loss(*student[:2], *teacher[:2], temperature=3.0, ce_weight=0.4, ignore_index=3,
                                        reduction="none", mask=mask, labels=labels, **common)
    assert torch.equal(kd(*student[:2], *teacher[:2], mask=mask, labels=labels, **common), want)
    assert not torch.equal(kd(*student[:2], *teacher[:2], labels=labels, **common), want)


def test_ckd_several_similarity_strips(workspace):
    """Invariant: the anchors' similarity strips (sized by the workspace budget) can cut anywhere: a budget of a few
    rows per strip gives the oracle's numbers, the exclusion of each anchor's own column included."""
    student, teacher = heads(dtype=torch.float64, seed=46, tokens=(37,))
    mask = random_mask((37,), seed=46)
    workspace(4 * 37 * 8 * 5)  # 5 rows per strip
    for anchor in ("student", "teacher"):
        fused_fn, oracle_fn = ckd_fns(anchor=anchor, mask=mask)
        out = fused_fn(student, teacher)
        s64, t64 = as_oracle(student, teacher)
        expected = oracle_fn(logits_of(*s64), logits_of(*t64))
        for got, want in zip([out] + grads_of(out, student), [expected] + grads_of(expected, s64)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Autocast
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ("ckd", "kd"))
def test_autocast_bf16_hidden_with_a_float32_head(loss):
    """Invariant: under torch.autocast(bfloat16), a bf16 hidden state with float32 heads (what a model gives there)
    is taken as F.linear takes it: the products in bfloat16 with float32 accumulation, the loss float32, the head's
    gradient float32. The numbers are the oracle's on the bf16-rounded inputs (bfloat16 tolerance, 8e-3)."""
    student, teacher = heads(dtype=torch.float32, seed=47)
    hidden = student[0].detach().bfloat16().requires_grad_()
    student = (hidden,) + student[1:]
    teacher = (teacher[0].bfloat16(),) + teacher[1:]
    fused_fn, oracle_fn = ckd_fns(mask=random_mask((5, 7), seed=47)) if loss == "ckd" else kd_fns()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_fn(student, teacher)
    assert out.dtype == torch.float32
    grads = grads_of(out, student)
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    rounded_student = tuple(x.detach().bfloat16() for x in student)
    rounded_teacher = tuple(x.bfloat16() for x in teacher)
    s64, t64 = as_oracle(rounded_student, rounded_teacher)
    expected = oracle_fn(logits_of(*s64), logits_of(*t64))
    for got, want in zip([out] + grads, [expected] + grads_of(expected, s64)):
        scale = want.abs().max().item()
        assert (got.double() - want).abs().max().item() <= 8e-3 * scale


def test_gradscaler_step_with_float16_autocast():
    """Invariant: one real GradScaler step under torch.autocast(float16) with float32 parameters updates the student
    head by -lr times the oracle's gradient (on the float16-rounded inputs), within float16 rounding, and the scaler
    finds no inf (the scaled gradient of 2^16 stays finite through the fused ops)."""
    student, teacher = heads(dtype=torch.float32, seed=48)
    head = torch.nn.Linear(6, 40)
    with torch.no_grad():
        head.weight.copy_(student[1])
        head.bias.copy_(student[2])
    labels = token_labels((5, 7), 40, seed=48)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    before = [p.detach().clone() for p in head.parameters()]
    with torch.autocast("cpu", dtype=torch.float16):
        ckd = ckd_ext.fused_linear_ckd_loss(student[0].detach(), head.weight, teacher[0], teacher[1],
                                            student_bias=head.bias, teacher_bias=teacher[2], tau=0.5)
        kd = ckd_ext.fused_linear_kd_loss(student[0].detach(), head.weight, teacher[0], teacher[1],
                                          student_bias=head.bias, teacher_bias=teacher[2], labels=labels,
                                          ce_weight=0.5)
        loss = ckd + kd
    assert loss.dtype == torch.float32
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 16  # no step was skipped for an inf or NaN
    s64 = tuple(x.detach().half().double().requires_grad_() for x in (student[0], before[0], before[1]))
    t64 = tuple(x.half().double() for x in teacher)
    expected = (reference.ckd_loss(logits_of(*s64), logits_of(*t64), tau=0.5)
                + reference_kd(logits_of(*s64), logits_of(*t64), temperature=1.0, mask=None, labels=labels,
                               ce_weight=0.5, ignore_index=-100, reduction="mean"))
    expected_grads = torch.autograd.grad(expected, s64[1:])
    for param, start, want in zip(head.parameters(), before, expected_grads):
        step = (start - param.detach()).double() / 0.1
        assert (step - want).abs().max().item() <= 4e-3 * want.abs().max().item()
