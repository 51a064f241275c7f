"""The fused-linear part of the fuzzer (tests/test_fuzz.py): cases, strategies and the check of one case.

A case draws hidden states and heads (dtype, N, V, H_s, H_t, biases), how the logits' scale is split: the ratio of
the two heads' scales (10^-6 .. 10^6), a factor moved from the student's head into its hidden states, a bias offset;
a mask (masked rows may hold NaN); hyperparameters and reduction; for KD labels with an ignore_index that may be
negative, 0 or past the vocabulary and, sometimes, a label outside the vocabulary (on a valid token: a ValueError
naming labels; on a masked one: ignored); for CKD sometimes a NaN or inf in a head (the loss is NaN).

The fused loss and gradients (hidden, weight, bias) must be as close to the float64 oracle on materialised logits as
the same loss on logits materialised in the inputs' dtype (ckd_loss / kd_loss on F.linear), within FACTOR, plus a
floor for results that both routes get (nearly) exact. Errors are normwise: the largest error over the largest
expected magnitude of each tensor, after the distinct upstream weights of "none" terms are applied.
"""
import contextlib
import dataclasses
import math

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

import ckd_ext
from ckd_ext import reference

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
FACTOR = 8.0
# 16-bit losses and gradients come back rounded once to the inputs' dtype: twice the unit roundoff (helpers.TOLERANCE).
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
BAD_LABELS = (None, "negative", "past_vocab", "masked")


@dataclasses.dataclass(frozen=True)
class FusedLinearCase:
    loss: str                 # "ckd" or "kd"
    n: int
    vocab: int
    student_width: int
    teacher_width: int
    dtype: torch.dtype
    student_bias: bool
    teacher_bias: bool
    log_head_ratio: float     # student head scaled by 10**this (the teacher's by 1)
    log_split: float          # 10**this moved from the student's head into its hidden states (logits unchanged)
    bias_offset: float        # added to the student's bias (in units of the logits' spread)
    masked: bool
    masked_nan: bool
    reduction: str
    hyper: tuple              # (name, value) pairs
    ignore_index: int         # KD
    bad_label: object         # KD: one of BAD_LABELS
    non_finite_head: object   # CKD: None, "nan" or "inf" in one head entry
    seed: int


@st.composite
def fused_linear_cases(draw, loss, dtypes=DTYPES):
    n, vocab = draw(st.integers(1, 48)), draw(st.integers(1, 300))
    dtype = draw(st.sampled_from(dtypes))
    masked = draw(st.booleans())
    if loss == "ckd":
        hyper = (("anchor", draw(st.sampled_from(("student", "teacher")))),
                 ("tau", 10 ** draw(st.floats(-1.5, 1))))
    else:
        hyper = (("temperature", 10 ** draw(st.floats(-0.3, 1.3))), ("ce_weight", draw(st.sampled_from((0.0, 0.5)))))
    ignore_index = draw(st.sampled_from((-100, -1, 0, vocab + 5)))
    return FusedLinearCase(
        loss=loss, n=n, vocab=vocab, student_width=draw(st.integers(1, 24)), teacher_width=draw(st.integers(1, 24)),
        dtype=dtype, student_bias=draw(st.booleans()), teacher_bias=draw(st.booleans()),
        log_head_ratio=draw(st.one_of(st.just(0.0), st.floats(-6, 6))),
        log_split=draw(st.one_of(st.just(0.0), st.floats(-4, 4))),
        bias_offset=draw(st.one_of(st.just(0.0), st.floats(-1e3, 1e3))), masked=masked,
        masked_nan=masked and draw(st.booleans()), reduction=draw(st.sampled_from(("mean", "sum", "none"))),
        hyper=hyper, ignore_index=ignore_index,
        bad_label=draw(st.sampled_from(BAD_LABELS)) if loss == "kd" else None,
        non_finite_head=draw(st.sampled_from((None, None, None, "nan", "inf"))) if loss == "ckd" else None,
        seed=draw(st.integers(0, 2 ** 32 - 1)))


def build(case):
    """(student (hidden, weight, bias), teacher (hidden, weight, bias), mask, labels), rounded to the case's dtype."""
    g = torch.Generator().manual_seed(case.seed)
    n, v, hs_w, ht_w = case.n, case.vocab, case.student_width, case.teacher_width

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    log_ratio, log_split, offset = case.log_head_ratio, case.log_split, case.bias_offset
    if case.dtype == torch.float16:  # float16's range (6.5e4) takes scales within 10^+-2, offsets within 10
        log_ratio, log_split, offset = (max(-2.0, min(2.0, log_ratio)), max(-1.0, min(1.0, log_split)),
                                        max(-10.0, min(10.0, offset)))
    ratio, split = 10.0 ** log_ratio, 10.0 ** log_split
    hs = randn(n, hs_w) * split
    ws = randn(v, hs_w) * hs_w ** -0.5 * ratio / split
    bs = (randn(v) * 0.3 + offset) * ratio if case.student_bias else None
    ht = randn(n, ht_w)
    wt = randn(v, ht_w) * ht_w ** -0.5
    bt = randn(v) * 0.3 if case.teacher_bias else None
    mask = None
    if case.masked:
        mask = torch.rand(n, generator=g) < 0.7
    labels = None
    if case.loss == "kd":
        labels = torch.randint(0, v, (n,), generator=g)
        labels[torch.rand(n, generator=g) < 0.25] = case.ignore_index
        if case.bad_label is not None:
            row = int(torch.randint(n, (), generator=g))
            labels[row] = -7 if case.bad_label == "negative" else v + 11
            if case.ignore_index in (-7, v + 11):
                labels[row] = -8
            if case.bad_label == "masked":  # a label outside the vocabulary under a False mask: never read
                mask = torch.ones(n, dtype=torch.bool) if mask is None else mask.clone()
                mask[row] = False
            elif mask is not None:  # on a token that takes part: an error
                mask = mask.clone()
                mask[row] = True
    student = [x if x is None else x.to(case.dtype) for x in (hs, ws, bs)]
    teacher = [x if x is None else x.to(case.dtype) for x in (ht, wt, bt)]
    if mask is not None and case.masked_nan:
        student[0][~mask] = math.nan
        teacher[0][~mask] = math.nan
    if case.non_finite_head:
        where = int(torch.randint(2, (), generator=g))
        head = (student if where == 0 else teacher)[1]
        head.view(-1)[int(torch.randint(head.numel(), (), generator=g))] = (math.nan if case.non_finite_head == "nan"
                                                                            else math.inf)
    return tuple(student), tuple(teacher), mask, labels


def _valid(mask, labels, ignore_index):
    if labels is None:
        return mask
    labelled = labels != ignore_index
    return labelled if mask is None else mask & labelled


def _oracle_kd(s_logits, t_logits, case, mask, labels):
    kw = dict(case.hyper)
    valid = _valid(mask, labels, case.ignore_index)
    terms = reference.kd_loss(s_logits, t_logits, temperature=kw["temperature"], mask=valid, reduction="none")
    if kw["ce_weight"]:
        ce = F.cross_entropy(s_logits, torch.where(valid, labels, 0), reduction="none")
        terms = terms + kw["ce_weight"] * torch.where(valid, ce, torch.zeros_like(ce))
    if case.reduction == "none":
        return terms
    return terms.sum() if case.reduction == "sum" else terms.sum() / max(int(valid.sum()), 1)


def _run(case, route, student, teacher, mask, labels):
    """The loss by `route`: "fused" (the fused-linear function), "materialised" (ckd_ext on F.linear logits in the
    inputs' dtype) or "oracle" (ckd_ext.reference on float64 logits)."""
    kw = dict(case.hyper)
    if route == "fused":
        common = dict(student_bias=student[2], teacher_bias=teacher[2], mask=mask, reduction=case.reduction)
        if case.loss == "ckd":
            return ckd_ext.fused_linear_ckd_loss(student[0], student[1], teacher[0], teacher[1], **common, **kw)
        return ckd_ext.fused_linear_kd_loss(student[0], student[1], teacher[0], teacher[1], labels=labels,
                                            ignore_index=case.ignore_index, **common, **kw)
    s_logits = student[0] if route == "oracle_logits" else F.linear(*student)
    t_logits = F.linear(*teacher).detach()
    if route in ("oracle", "oracle_logits"):
        if case.loss == "ckd":
            return reference.ckd_loss(s_logits, t_logits, mask=mask, reduction=case.reduction, **kw)
        return _oracle_kd(s_logits, t_logits, case, mask, labels)
    if case.loss == "ckd":
        return ckd_ext.ckd_loss(s_logits, t_logits, mask=mask, reduction=case.reduction, **kw)
    valid = _valid(mask, labels, case.ignore_index)
    terms = ckd_ext.kd_loss(s_logits, t_logits, temperature=kw["temperature"], mask=valid, reduction="none")
    if kw["ce_weight"]:
        ce = F.cross_entropy(s_logits.float(), torch.where(valid, labels, 0), reduction="none")
        terms = terms.float() + kw["ce_weight"] * torch.where(valid, ce, torch.zeros_like(ce))
    if case.reduction != "none":
        terms = terms.sum() if case.reduction == "sum" else terms.sum() / valid.sum().clamp_min(1)
    return terms.to(case.dtype)


def _weighted(out, case):
    """A scalar with distinct weights per "none" term."""
    if case.reduction != "none":
        return out
    g = torch.Generator().manual_seed(case.seed + 1)
    return (out * (torch.rand(out.shape, generator=g, dtype=torch.float64) + 0.5).to(out.dtype)).sum()


def _gradient_scales(case, s64, t64, mask, labels):
    """The size of the terms each gradient sums before they cancel: with G = dL/dS (float64 oracle), |G| |W_s| for the
    hidden states, |G|^T |H_s| for the weight, the column sums of |G| for the bias. A gradient can cancel to 0 (CKD
    of collinear student rows: H_s = 1 without a bias, or V = 1), where its rounding is relative to these, not to
    itself."""
    logits = F.linear(*s64).detach().requires_grad_()
    hidden = s64[0]
    out = _weighted(_run(case, "oracle_logits", (logits,), t64, mask, labels), case)
    (g,) = torch.autograd.grad(out, logits)
    g = g.abs()
    if case.loss == "ckd":
        # CKD's dL/dS is itself a difference, dv / |s| minus its projection on s / |s| (docs/math.md 4.3), which is
        # 0 where every row has one direction (V = 1): its terms are as large as |dL/dv| / |s| <= 2 sum(w) / (tau |s|)
        kw = dict(case.hyper)
        valid = torch.ones(logits.shape[0], dtype=torch.bool) if mask is None else mask
        count = max(int(valid.sum()), 1)
        weight = {"mean": 1.0 / count, "sum": 1.0, "none": 1.5}[case.reduction]
        norms = logits.detach().norm(dim=1).clamp_min(1e-12)
        bound = torch.where(valid, 2 * weight * (count + 1) / (kw["tau"] * norms), 0)
        g = torch.maximum(g, bound.unsqueeze(1))
    return [(g @ s64[1].detach().abs()).max().item(), (g.T @ hidden.detach().abs()).max().item(),
            g.sum(0).max().item()]


def _errors(case, route, student, teacher, mask, labels, expected, expected_grads, scales):
    leaves = tuple(None if x is None else x.detach().requires_grad_() for x in student)
    out = _weighted(_run(case, route, leaves, teacher, mask, labels), case)
    present = [x for x in leaves if x is not None]
    grads = iter(torch.autograd.grad(out, present))
    errors = [_error(out, expected, 0.0)]
    for x, e, scale in zip(leaves, expected_grads, scales):
        if x is not None:
            errors.append(_error(next(grads), e, scale))
    return errors


def _error(actual, expected, scale):
    scale = max(expected.abs().max().item(), scale)
    error = (actual.detach().double() - expected.detach()).abs().max().item()
    return error / scale if scale > 0 else error


def run_fused_linear_case(case, fused_backend=contextlib.nullcontext):
    """`fused_backend()`: the context the fused loss runs in (switches.on_backend(...)); the oracle and the
    materialised route run outside it."""
    student, teacher, mask, labels = build(case)
    if case.bad_label in ("negative", "past_vocab"):
        try:
            with fused_backend():
                _run(case, "fused", student, teacher, mask, labels)
        except ValueError as error:
            assert str(error).startswith("fused_linear_kd_loss: labels must be class indices in [0, V)"), str(error)
            return
        raise AssertionError("a label outside the vocabulary on a valid token was accepted")
    if case.non_finite_head:
        with fused_backend():
            out = _run(case, "fused", student, teacher, mask, labels)
        if mask is None or bool(mask.any()):
            assert torch.isnan(out).any(), f"a {case.non_finite_head} in a head gave {out}"
        return
    def oracle_input(x, rows):  # masked rows are never read; zeroed, their NaN cannot reach dW = dS^T H
        x = x.detach().double()
        return x if mask is None or not rows else torch.where(mask.unsqueeze(1), x, 0)

    s64 = tuple(None if x is None else oracle_input(x, k == 0).requires_grad_() for k, x in enumerate(student))
    t64 = tuple(None if x is None else oracle_input(x, k == 0) for k, x in enumerate(teacher))
    expected = _weighted(_run(case, "oracle", s64, t64, mask, labels), case)
    present = [x for x in s64 if x is not None]
    grads = iter(torch.autograd.grad(expected, present))
    expected_grads = [None if x is None else next(grads) for x in s64]
    scales = _gradient_scales(case, s64, t64, mask, labels)
    with fused_backend():
        fused = _errors(case, "fused", student, teacher, mask, labels, expected.detach(), expected_grads, scales)
    clean = [tuple(None if x is None else oracle_input(x, k == 0).to(case.dtype) for k, x in enumerate(side))
             for side in (student, teacher)]  # the logit route's F.linear would spread masked NaN into dW
    materialised = _errors(case, "materialised", *clean, mask, labels, expected.detach(), expected_grads, scales)
    floor = FLOOR[case.dtype]
    for name, f, m in zip(("loss", "grad hidden", "grad weight", "grad bias"), fused, materialised):
        assert math.isfinite(f) and f <= FACTOR * m + floor, (
            f"{case.loss} {name}: fused error {f:.3g}, materialised {m:.3g} ({case.dtype})")
