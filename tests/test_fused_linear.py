"""fused_linear_ckd_loss / fused_linear_kd_loss against the float64 oracle on materialised logits (hidden @ W.T + b,
then ckd_ext.reference): the loss and the gradients of the student's hidden states, weight and bias, over anchors,
reductions, masks, labels with ignore_index, biases, H_s != H_t, rank-deficient heads and dtypes; gradcheck in
float64; torch.compile(fullgraph=True); the emulated CUDA backend; and a check that nothing N x V or N x N is ever
allocated."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import ckd_ext
from ckd_ext import reference
from inputs import random_mask, saved_by, weighted_total
from switches import on_backend, skip_unless
from tolerances import TOLERANCE, assert_matches

REDUCTIONS = ("mean", "sum", "none")


def heads(tokens=(5, 7), vocab=40, student_width=6, teacher_width=9, dtype=torch.float64, seed=0, bias=True,
          shared=False):
    """Student (hidden, weight, bias) requiring grad and teacher (hidden, weight, bias), as an LM's: hidden states of
    unit scale, head weights of scale 1/sqrt(H) (logits of unit scale). `shared`: the teacher has the student's head
    and hidden states of the student's width (a rank-deficient B = [W, W])."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    if shared:
        teacher_width = student_width
    hs = randn(*tokens, student_width).requires_grad_()
    ws = randn(vocab, student_width, scale=student_width ** -0.5).requires_grad_()
    bs = randn(vocab, scale=0.3).requires_grad_() if bias else None
    ht = randn(*tokens, teacher_width)
    wt = ws.detach().clone() if shared else randn(vocab, teacher_width, scale=2 * teacher_width ** -0.5)
    bt = randn(vocab, scale=0.3) if bias else None
    return (hs, ws, bs), (ht, wt, bt)


def logits_of(hidden, weight, bias):
    """The logits in float64 (the oracle's input)."""
    out = hidden.double() @ weight.double().T
    return out if bias is None else out + bias.double()


def as_oracle(student, teacher):
    """float64 leaf copies of the student (requiring grad) and the teacher."""
    s = tuple(None if x is None else x.detach().double().requires_grad_() for x in student)
    t = tuple(None if x is None else x.detach().double() for x in teacher)
    return s, t


def reference_kd(s_logits, t_logits, *, temperature, mask, labels, ce_weight, ignore_index, reduction):
    """The contract's KD + ce_weight * CE over the valid tokens (mask True, label not ignore_index)."""
    valid = mask
    if labels is not None:
        labelled = labels != ignore_index
        valid = labelled if mask is None else mask & labelled
    lead = s_logits.shape[:-1]
    terms = reference.kd_loss(s_logits, t_logits, temperature=temperature, mask=valid, reduction="none")
    if labels is not None and ce_weight:
        ce = F.cross_entropy(s_logits.reshape(-1, s_logits.shape[-1]), labels.reshape(-1).clamp_min(0),
                             reduction="none").reshape(lead)
        terms = terms + ce_weight * torch.where(valid, ce, torch.zeros_like(ce))
    if reduction == "none":
        return terms
    count = terms.numel() if valid is None else int(valid.sum())
    return terms.sum() if reduction == "sum" else terms.sum() / max(count, 1)


def grads_of(out, inputs, seed=0):
    """Gradients of weighted_total(out) (distinct upstream weights per term) w.r.t. the inputs that are not None."""
    present = [x for x in inputs if x is not None]
    got = iter(torch.autograd.grad(weighted_total(out, seed), present))
    return [None if x is None else next(got) for x in inputs]


def compare(fused_fn, oracle_fn, student, teacher, dtype, tol=None):
    """Runs fused_fn(student, teacher) and oracle_fn on float64 copies of the same (rounded) inputs; compares the
    loss and the gradients of hidden, weight and bias."""
    out = fused_fn(student, teacher)
    grads = grads_of(out, student)
    s64, t64 = as_oracle(student, teacher)
    expected = oracle_fn(logits_of(*s64), logits_of(*t64))
    expected_grads = grads_of(expected, s64)
    assert_matches(out.detach(), expected.detach(), dtype, "loss", tol)
    for name, g, e in zip(("student_hidden", "student_weight", "student_bias"), grads, expected_grads):
        if e is None:
            assert g is None
        else:
            assert_matches(g, e, dtype, f"grad of {name}", tol)
    return out


def ckd_fns(tau=0.5, anchor="student", mask=None, reduction="mean"):
    def fused(student, teacher):
        return ckd_ext.fused_linear_ckd_loss(student[0], student[1], teacher[0], teacher[1], student_bias=student[2],
                                             teacher_bias=teacher[2], tau=tau, anchor=anchor, mask=mask,
                                             reduction=reduction)

    def oracle(s_logits, t_logits):
        return reference.ckd_loss(s_logits, t_logits, tau=tau, anchor=anchor, mask=mask, reduction=reduction)

    return fused, oracle


def kd_fns(temperature=2.0, mask=None, labels=None, ce_weight=0.0, ignore_index=-100, reduction="mean"):
    def fused(student, teacher):
        return ckd_ext.fused_linear_kd_loss(student[0], student[1], teacher[0], teacher[1], student_bias=student[2],
                                            teacher_bias=teacher[2], temperature=temperature, mask=mask,
                                            labels=labels, ce_weight=ce_weight, ignore_index=ignore_index,
                                            reduction=reduction)

    def oracle(s_logits, t_logits):
        return reference_kd(s_logits, t_logits, temperature=temperature, mask=mask, labels=labels,
                            ce_weight=ce_weight, ignore_index=ignore_index, reduction=reduction)

    return fused, oracle


def token_labels(tokens, vocab, seed=0, ignore_index=-100):
    g = torch.Generator().manual_seed(seed + 3)
    labels = torch.randint(0, vocab, tokens, generator=g)
    labels.view(-1)[::4] = ignore_index
    return labels


# --------------------------------------------------------------------------------------------------
# Against the oracle, float32 (and float64)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("anchor,reduction,bias,masked", itertools.product(("student", "teacher"), REDUCTIONS,
                                                                          (True, False), (True, False)))
def test_ckd_matches_oracle(anchor, reduction, bias, masked):
    student, teacher = heads(dtype=torch.float32, bias=bias, seed=1)
    mask = random_mask((5, 7), seed=1) if masked else None
    compare(*ckd_fns(anchor=anchor, mask=mask, reduction=reduction), student, teacher, torch.float32)


@pytest.mark.parametrize("reduction,bias,masked,labelled", itertools.product(REDUCTIONS, (True, False),
                                                                            (True, False), (True, False)))
def test_kd_matches_oracle(reduction, bias, masked, labelled):
    student, teacher = heads(dtype=torch.float32, bias=bias, seed=2)
    mask = random_mask((5, 7), seed=2) if masked else None
    labels = token_labels((5, 7), 40, seed=2) if labelled else None
    compare(*kd_fns(mask=mask, labels=labels, ce_weight=0.7 if labelled else 0.0, reduction=reduction),
            student, teacher, torch.float32)


def test_kd_labels_without_ce_weight_only_select_tokens():
    """labels with ce_weight = 0: no cross-entropy, but the ignored tokens leave the KD term (and its mean)."""
    student, teacher = heads(dtype=torch.float32, seed=3)
    labels = token_labels((5, 7), 40, seed=3, ignore_index=-1)
    compare(*kd_fns(labels=labels, ignore_index=-1), student, teacher, torch.float32)


def test_kd_chunks_of_one_token_agree(workspace):
    """A workspace that holds one row per chunk: every chunk boundary is crossed, the result is the same."""
    student, teacher = heads(dtype=torch.float64, seed=4)
    labels = token_labels((5, 7), 40, seed=4)
    workspace(1)
    compare(*kd_fns(labels=labels, ce_weight=0.5, mask=random_mask((5, 7), seed=4)), student, teacher, torch.float64)
    compare(*ckd_fns(mask=random_mask((5, 7), seed=4)), student, teacher, torch.float64)


def test_ckd_float64():
    """float64: the bilinear forms are exact identities, so everything agrees to float64 rounding (the suite's
    1e-10)."""
    student, teacher = heads(dtype=torch.float64, seed=5, tokens=(33,), vocab=70, student_width=5, teacher_width=11)
    for anchor in ("student", "teacher"):
        compare(*ckd_fns(anchor=anchor, tau=0.2), student, teacher, torch.float64)


@pytest.mark.parametrize("case", ("shared-head", "wider-than-vocab"))
def test_ckd_rank_deficient_heads(case):
    """B = [W_s | b_s | W_t | b_t] without full column rank: the teacher sharing the student's head, and
    H_s + H_t + 2 > V. The bilinear forms need no factorisation, so rank deficiency changes nothing (float32
    tolerance)."""
    if case == "shared-head":
        student, teacher = heads(dtype=torch.float32, seed=6, shared=True)
    else:
        student, teacher = heads(dtype=torch.float32, seed=6, vocab=12, student_width=8, teacher_width=10)
    for anchor in ("student", "teacher"):
        compare(*ckd_fns(anchor=anchor), student, teacher, torch.float32)


def test_ckd_ill_conditioned_head_is_as_accurate_as_float32_logits():
    """A student head whose columns are nearly collinear (condition number ~1e5, the Gram's 1e10): the fused loss
    and gradients (float32 inputs) are no further from the float64 oracle than the same loss computed from float32
    logits by ckd_ext.ckd_loss, within a factor of 4 (the two routes round differently)."""
    g = torch.Generator().manual_seed(7)
    student, teacher = heads(dtype=torch.float32, seed=7, vocab=64, student_width=8, teacher_width=12)
    base = torch.randn(64, 1, generator=g)
    ws = (base + 1e-5 * torch.randn(64, 8, generator=g)).requires_grad_()
    student = (student[0], ws, student[2])
    fused_fn, oracle_fn = ckd_fns(tau=0.5)
    s64, t64 = as_oracle(student, teacher)
    expected = oracle_fn(logits_of(*s64), logits_of(*t64))
    expected_grads = grads_of(expected, s64)

    def errors(out, grads):
        return [((out.double() - expected).abs() / expected.abs()).item()] + [
            ((a.double() - e).abs().max() / e.abs().max()).item() for a, e in zip(grads, expected_grads)]

    out = fused_fn(student, teacher)
    fused = errors(out, grads_of(out, student))

    def via_logits(*student_parts):
        s_logits = F.linear(student_parts[0], student_parts[1], student_parts[2])
        return ckd_ext.ckd_loss(s_logits, F.linear(*teacher), tau=0.5)

    out = via_logits(*student)
    materialised = errors(out, grads_of(out, student))
    for name, f, m in zip(("loss", "hidden", "weight", "bias"), fused, materialised):
        assert f <= 4 * m + 1e-6, f"{name}: fused error {f:.2e}, float32 logits {m:.2e}"


# --------------------------------------------------------------------------------------------------
# 16-bit inputs
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend_name", ("cpu", "emulated"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("loss", ("ckd", "kd"))
def test_half_precision(dtype, loss, backend_name):
    """16-bit hidden states and heads: logits and loss accumulate in float32 (CKD's bilinear forms in float64),
    and the loss and every gradient are rounded once to the input dtype: TOLERANCE's 16-bit entries (twice the unit
    roundoff) hold against the oracle on the same rounded inputs, on the CPU backend (16-bit operands converted to
    fp32) and on the emulated CUDA backend (16-bit operands on tensor cores, the coefficient products' fp32
    coefficients rounded to the 16-bit dtype, as eager autograd's 16-bit logit gradients are). The loss comes back in
    the input dtype."""
    student, teacher = heads(dtype=dtype, seed=8)
    mask = random_mask((5, 7), seed=8)
    with on_backend(backend_name):
        if loss == "ckd":
            out = compare(*ckd_fns(anchor="teacher", mask=mask, reduction="sum"), student, teacher, dtype)
        else:
            labels = token_labels((5, 7), 40, seed=8)
            out = compare(*kd_fns(mask=mask, labels=labels, ce_weight=0.5), student, teacher, dtype)
    assert out.dtype == dtype


class ConvertedTensors(TorchDispatchMode):
    """Records the shapes of the conversions to float32 (aten._to_copy) the Python orchestration makes (the oracle's
    are to float64)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and out.dtype == torch.float32:
            self.shapes.append(tuple(out.shape))
        return out


@skip_unless("emulated")
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_kd_gemms_are_the_policys_on_16_bit_operands(reduction, workspace):
    """bf16 inputs on the emulated CUDA backend: every GEMM of fused-linear KD is one of the GEMM policy's, counted by
    it: per chunk the two logit products (16-bit hidden states and heads as they are, fp32 results) and the two
    gradient products (the fp32 logit gradient rounded to bf16 times 16-bit rows, one GEMM each, as eager autograd
    multiplies a bf16 logit gradient); "none" walks the chunks twice (forward
    for the terms, backward for the gradients). No head is converted: no dtype conversion of V x H elements. The
    loss and gradients hold bf16's TOLERANCE against float64 on the same inputs. (Measured at 64 tokens, V = 300,
    H 32 / 48, CE weight 0.5, seed 19, against float64, one GEMM per product: loss 6.6e-4, gradients of hidden /
    weight / bias 4.5e-3 / 3.9e-3 / 1.5e-3 of their largest entry in bf16, 5.0e-5 and 5.5e-4 / 4.0e-4 / 2.1e-4 in
    fp16; the CPU backend's fp32 GEMMs 6.6e-4, 4.6e-3 / 3.1e-3 / 1.5e-3 and 5.0e-5, 4.0e-4 / 3.0e-4 / 2.1e-4: the
    final rounding to 16 bits, bf16 u = 3.9e-3, dominates the coefficients' rounding.)"""
    tokens, vocab = 35, 40
    rows = 8
    workspace(rows * vocab * 4 * 4)  # both logits, the KD gradient and CE's probabilities: chunks of 8 tokens
    chunks = -(-tokens // rows)
    student, teacher = heads(tokens=(tokens,), vocab=vocab, dtype=torch.bfloat16, seed=19)
    labels = token_labels((tokens,), vocab, seed=19)
    fns = kd_fns(labels=labels, ce_weight=0.5, reduction=reduction)
    ext = ckd_ext.require_extension()
    with on_backend("emulated"), ConvertedTensors() as conversions:
        calls = ext.gemm_calls()
        compare(*fns, student, teacher, torch.bfloat16)
        calls = ext.gemm_calls() - calls
    walks = 2 if reduction == "none" else 1
    assert calls == chunks * (2 * walks + 2), calls
    heads_elements = {vocab * student[1].shape[1], vocab * teacher[1].shape[1]}
    assert not [s for s in conversions.shapes if len(s) == 2 and s[0] * s[1] in heads_elements], conversions.shapes


class PolicyGemms(TorchDispatchMode):
    """Records each GEMM policy call (ckd_ext::gemm_similarity / gemm_product) as (op, operand dtype, output shape):
    a similarity's operands are its two matrices, a product's its rows (the coefficients are rounded to them)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.ckd_ext.gemm_similarity.default:
            self.calls.append(("similarity", args[0].dtype, (args[0].shape[0], args[1].shape[0])))
        elif func is torch.ops.ckd_ext.gemm_product.default:
            self.calls.append(("product", args[2].dtype, tuple(args[0].shape)))
        elif func is torch.ops.ckd_ext.gemm_exact_int8.default:
            self.calls.append(("exact_int8", args[0].dtype, (args[0].shape[0], args[1].shape[0])))
        return out


@skip_unless("emulated")
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_exact_gram_of_16_bit_heads(dtype, workspace):
    """The Gram matrix of 16-bit heads from int8 slices (fused_linear/ckd.py _exact_gram, on the emulated backend's
    int8 products) is the float64 one to within 2^-33 |B_k| |B_l| per entry (the slices keep 35 bits below each
    column's largest entry; measured: 0 in bf16, 2.6e-12 in fp16), with columns whose scales span the dtype's range
    (bf16 10^-39, a subnormal, to 10^30; fp16 10^-7 to 10^4), a zero column and several vocabulary chunks."""
    from ckd_ext.fused_linear.ckd import _exact_gram, _head_columns
    workspace(8 * 4 * 12 * 23)  # vocabulary chunks of 8 rows
    g = torch.Generator().manual_seed(31)
    exponents = (torch.tensor([-39.0, -20.0, -3.0, 0.0, 2.0, 30.0]) if dtype == torch.bfloat16
                 else torch.tensor([-7.0, -4.0, -1.0, 0.0, 2.0, 4.0]))
    student_weight = (torch.randn(50, 6, generator=g, dtype=torch.float64) * 10.0 ** exponents).to(dtype)
    student_weight[:, 1] = 0
    teacher_weight = torch.randn(50, 4, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(50, generator=g, dtype=torch.float64).to(dtype)
    student, teacher = _head_columns(student_weight, bias), _head_columns(teacher_weight, None)
    scales = torch.tensor([0.5, 2.0], dtype=torch.float64)
    with on_backend("emulated"):
        gram = _exact_gram(student, teacher, scales, dtype, True)
    b = torch.cat([student_weight.double() * 0.5, bias.double().unsqueeze(1) * 0.5, teacher_weight.double() * 2.0], 1)
    expected = b.T @ b
    norms = b.norm(dim=0)
    split = 7
    assert gram.dtype == torch.float64
    assert (gram[:split] - expected[:split]).abs().le(2.0 ** -33 * norms[:split, None] * norms[None]).all()
    assert (gram[split:, split:] - expected[split:, split:]).abs().le(
        2.0 ** -33 * norms[split:, None] * norms[None, split:]).all()


@skip_unless("emulated")
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("anchor", ("student", "teacher"))
def test_ckd_strips_and_head_gradient_on_tensor_cores(anchor, dtype):
    """16-bit inputs on the emulated CUDA backend (docs/math.md 8.3): the Gram matrices are 15 exact int8 GEMMs each
    (the student's rows [G_ss | G_st] and the teacher's block, one vocabulary chunk here), the strips' logits three
    GEMMs of the unit rows' two 16-bit parts, their coefficient products four (the student's 16-bit rows as they
    are, the anchors in three parts), the head gradient three (the 16-bit heads as they are against the Gram
    gradients' combination in three parts); no GEMM multiplies fp32 rows, and the float64 ones are the N x K forms
    and their K x K gradients (the O(N K^2) part). Loss and gradients within the
    16-bit TOLERANCE of the float64 oracle; measured (the largest error over the largest entry; student / teacher
    anchor): bf16 loss 6.3e-4 / 7.1e-4, hidden 3.9e-3 / 4.6e-3, weight 3.3e-3 / 3.5e-3, bias 2.9e-3 / 3.1e-3; fp16
    4.8e-4 / 9.1e-5, 4.1e-4 / 4.1e-4, 3.0e-4 / 6.0e-4, 2.7e-4 / 4.9e-4: to two digits the CPU backend's (fp32 strips,
    float64 head gradient), the final rounding to 16 bits dominating. benchmarks/precision_forms.py measures the
    strips' logits where they differ (cancellation ratios up to ~2000)."""
    vocab, n, k_s, k = 40, 35, 7, 17  # heads()' 5 x 7 tokens, H_s 6 and H_t 9 with biases
    student, teacher = heads(vocab=vocab, dtype=dtype, seed=29)
    with on_backend("emulated"), PolicyGemms() as gemms:
        compare(*ckd_fns(anchor=anchor), student, teacher, dtype)
    sixteen_bit = [c for c in gemms.calls if c[1] == dtype]
    assert sorted(sixteen_bit, key=str) == sorted(
        [("similarity", dtype, (n, n))] * 6 + [("product", dtype, (n, k_s))] * 4
        + [("similarity", dtype, (vocab, k_s))] * 3, key=str)
    exact = [c for c in gemms.calls if c[1] == torch.int8]
    assert sorted(exact, key=str) == sorted([("exact_int8", torch.int8, (k_s, k))] * 15
                                            + [("exact_int8", torch.int8, (k - k_s, k - k_s))] * 15, key=str)
    others = [c for c in gemms.calls if c[1] not in (dtype, torch.int8)]
    assert {c[1] for c in others} == {torch.float64}, others
    # the forms N x K_s / N x K_t and their K x K gradients
    assert all(max(shape) <= n and (n, n) != shape for _, _, shape in others), others


def test_kd_gemms_on_the_cpu_backend(workspace):
    """The same walk on the CPU backend, fp32: one GEMM per product (no split), four per chunk, all counted."""
    tokens, vocab, rows = 35, 40, 8
    workspace(rows * vocab * 3 * 4)  # both logits and the KD gradient
    student, teacher = heads(tokens=(tokens,), vocab=vocab, dtype=torch.float32, seed=20)
    ext = ckd_ext.require_extension()
    with on_backend("cpu"):
        calls = ext.gemm_calls()
        compare(*kd_fns(), student, teacher, torch.float32)
        calls = ext.gemm_calls() - calls
    assert calls == -(-tokens // rows) * 4


UPSTREAM = 2.0 ** 15


def test_half_precision_gradient_rounded_after_the_upstream_scale():
    """float16 under a GradScaler-sized upstream gradient (2^15, float16's largest power of two): the gradients are kept in float32 until backward
    scales them, so entries below float16's range at unit scale survive (as with the logit ops). A student head of
    scale 1e-6 makes the hidden states' gradient (dZ W_s) about 1e-8, below float16's smallest subnormal (6e-8)."""
    student, teacher = heads(dtype=torch.float16, seed=9, tokens=(64,), vocab=300)
    weight = (student[1].detach().float() * 1e-6).half().requires_grad_()
    student = (student[0], weight, student[2])
    out = ckd_ext.fused_linear_kd_loss(*student[:2], *teacher[:2], student_bias=student[2], teacher_bias=teacher[2])
    (grad,) = torch.autograd.grad(out.float() * UPSTREAM, student[0])
    s64, t64 = as_oracle(student, teacher)
    expected = reference_kd(logits_of(*s64), logits_of(*t64), temperature=1.0, mask=None, labels=None, ce_weight=0,
                            ignore_index=-100, reduction="mean")
    (expected_grad,) = torch.autograd.grad(expected * UPSTREAM, s64[0])
    assert (expected_grad.abs() < 2.0 ** -25 * UPSTREAM).float().mean() > 0.5  # what unit-scale float16 would flush
    assert_matches(grad, expected_grad, torch.float16, "grad of student_hidden")


# --------------------------------------------------------------------------------------------------
# Properties of the contract
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ("ckd", "kd"))
def test_teacher_gets_no_gradient(loss):
    student, teacher = heads(dtype=torch.float32, seed=10)
    teacher = tuple(x.detach().requires_grad_() for x in teacher)
    fn = ckd_fns()[0] if loss == "ckd" else kd_fns()[0]
    fn(student, teacher).backward()
    assert all(x.grad is None for x in teacher)
    assert all(x.grad is not None for x in student)


@pytest.mark.parametrize("loss", ("ckd", "kd"))
def test_masked_rows_holding_nan_are_harmless(loss):
    student, teacher = heads(dtype=torch.float32, seed=11)
    mask = random_mask((5, 7), seed=11)
    dirty_student = (student[0].detach().masked_fill(~mask.unsqueeze(-1), float("nan")).requires_grad_(),) + student[1:]
    dirty_teacher = (teacher[0].masked_fill(~mask.unsqueeze(-1), float("inf")),) + teacher[1:]
    fn = (ckd_fns if loss == "ckd" else kd_fns)(mask=mask)[0]
    clean_out = fn(student, teacher)
    clean = grads_of(clean_out, student)
    dirty_out = fn(dirty_student, dirty_teacher)
    dirty = grads_of(dirty_out, dirty_student)
    assert torch.equal(clean_out, dirty_out)
    for c, d in zip(clean, dirty):
        assert torch.equal(c, d)


@pytest.mark.parametrize("loss", ("ckd", "kd"))
def test_no_valid_token(loss):
    student, teacher = heads(dtype=torch.float32, seed=12)
    mask = torch.zeros(5, 7, dtype=torch.bool)
    out = (ckd_fns if loss == "ckd" else kd_fns)(mask=mask)[0](student, teacher)
    assert out.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads_of(out, student))


def test_modules_match_functions():
    student, teacher = heads(dtype=torch.float32, seed=13)
    labels = token_labels((5, 7), 40, seed=13)
    ckd = ckd_ext.FusedLinearCKDLoss(tau=0.5, anchor="teacher", reduction="sum")
    kd = ckd_ext.FusedLinearKDLoss(temperature=2.0, ce_weight=0.3, reduction="none")
    common = dict(student_bias=student[2], teacher_bias=teacher[2])
    assert torch.equal(ckd(student[0], student[1], teacher[0], teacher[1], **common),
                       ckd_fns(anchor="teacher", reduction="sum")[0](student, teacher))
    assert torch.equal(kd(student[0], student[1], teacher[0], teacher[1], labels=labels, **common),
                       kd_fns(labels=labels, ce_weight=0.3, reduction="none")[0](student, teacher))
    assert "anchor='teacher'" in repr(ckd) and "ce_weight=0.3" in repr(kd)


SHARED_CHECKS = [  # (overrides, exception, message): the checks the fused-linear losses share with the logit ones
    (dict(student_hidden=[1.0]), TypeError, "student_hidden must be a torch.Tensor, got list"),
    (dict(teacher_weight=torch.ones(40, 9, dtype=torch.int64)), TypeError,
     "teacher_weight must be a floating-point tensor"),
    (dict(reduction="avg"), ValueError, "reduction must be one of 'mean', 'sum', 'none', got 'avg'"),
    (dict(mask=torch.ones(35, dtype=torch.bool)), ValueError,
     r"mask must have the shape of student_hidden without its last dimension \(5, 7\), got \(35,\)"),
    (dict(mask=torch.ones(5, 7)), TypeError, "mask must have dtype torch.bool, got torch.float32"),
    (dict(global_batch="gather"), ValueError, "global_batch must be False, True or 'ring', got 'gather'"),
    (dict(global_batch=True), RuntimeError, "global_batch=True needs an initialised torch.distributed process group"),
    (dict(group="world"), TypeError, "group must be a torch.distributed.ProcessGroup or None, got str"),
]


@pytest.mark.parametrize("loss", ("ckd", "kd"))
@pytest.mark.parametrize("overrides,error,message", SHARED_CHECKS)
def test_shared_argument_checks(loss, overrides, error, message):
    student, teacher = heads(dtype=torch.float32, seed=14)
    args = dict(student_hidden=student[0], student_weight=student[1], teacher_hidden=teacher[0],
                teacher_weight=teacher[1])
    args.update(overrides)
    fn = ckd_ext.fused_linear_ckd_loss if loss == "ckd" else ckd_ext.fused_linear_kd_loss
    with pytest.raises(error, match=f"^fused_linear_{loss}_loss: {message}"):
        fn(args.pop("student_hidden"), args.pop("student_weight"), args.pop("teacher_hidden"),
           args.pop("teacher_weight"), **args)


# --------------------------------------------------------------------------------------------------
# gradcheck, torch.compile, the emulated backend
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss,reduction", [("ckd", "mean"), ("ckd", "none"), ("kd", "mean"), ("kd", "none")])
def test_gradcheck(loss, reduction):
    student, teacher = heads(tokens=(6,), vocab=9, student_width=3, teacher_width=4, seed=15)
    mask = random_mask((6,), seed=15, p=0.8)
    if loss == "ckd":
        fn = ckd_fns(anchor="teacher", mask=mask, reduction=reduction)[0]
    else:
        fn = kd_fns(mask=mask, labels=token_labels((6,), 9, seed=15), ce_weight=0.5, reduction=reduction)[0]
    assert torch.autograd.gradcheck(lambda *s: fn(s, teacher), student, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("loss", ("ckd", "kd"))
def test_torch_compile_fullgraph(loss):
    """The fused-linear losses are autograd.Functions over ATen and the registered ckd_ext ops (the GEMM policy's
    products among them, opchecked in test_gemm_policy.py): torch.compile(fullgraph=True) traces them without a graph
    break and agrees with eager."""
    student, teacher = heads(dtype=torch.float32, seed=16)
    mask = random_mask((5, 7), seed=16)
    labels = token_labels((5, 7), 40, seed=16)
    fn = ckd_fns(mask=mask)[0] if loss == "ckd" else kd_fns(mask=mask, labels=labels, ce_weight=0.5)[0]

    def step(hs, ws, bs):
        return fn((hs, ws, bs), teacher) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    expected = step(*student)
    expected_grads = torch.autograd.grad(expected, student)
    actual = compiled(*student)
    actual_grads = torch.autograd.grad(actual, student)
    torch.testing.assert_close(actual, expected)
    for a, e in zip(actual_grads, expected_grads):
        torch.testing.assert_close(a, e)


def test_float64_terms_past_twenty_keep_their_exponential_tail():
    """A term LSE - pos = softplus(d) with d > 20 (one-dimensional heads: cosines of exactly +-1, tau 1/32) is
    d + log1p(exp(-d)) in float64, not d (F.softplus's linear cut-off, which drops 1.4e-9 at d = 20.4): the loss
    equals the oracle's to float64 rounding (found by the fuzzer: 2.2e-11 off before); the gradients are 0 (the
    cosines of one-dimensional rows do not move), to 1e-12."""
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(4, 1, generator=g, dtype=torch.float64).requires_grad_()
    ws = torch.randn(2, 1, generator=g, dtype=torch.float64).requires_grad_()
    ht, wt = torch.randn(4, 1, generator=g, dtype=torch.float64), torch.randn(2, 1, generator=g, dtype=torch.float64)
    tau = 1 / 32
    fused = ckd_ext.fused_linear_ckd_loss(hs, ws, ht, wt, tau=tau, reduction="none")
    s64, w64 = hs.detach().clone().requires_grad_(), ws.detach().clone().requires_grad_()
    expected = reference.ckd_loss(s64 @ w64.T, ht @ wt.T, tau=tau, reduction="none")
    assert (expected > 20).any()
    torch.testing.assert_close(fused, expected, rtol=1e-14, atol=0)
    grads = torch.autograd.grad(fused.sum(), (hs, ws))
    for got, want in zip(grads, torch.autograd.grad(expected.sum(), (s64, w64))):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@skip_unless("emulated")
@pytest.mark.parametrize("anchor", ("student", "teacher"))
def test_torch_compile_fullgraph_tensor_core_strips(anchor):
    """bf16 on the emulated backend, where the strips and the head gradient take 16-bit parts (StripOperands, a
    NamedTuple of tensors through the strips' autograd.Function): torch.compile(fullgraph=True) traces them and
    agrees with eager."""
    student, teacher = heads(dtype=torch.bfloat16, seed=16)
    fn = ckd_fns(anchor=anchor, mask=random_mask((5, 7), seed=16))[0]

    def step(hs, ws, bs):
        return fn((hs, ws, bs), teacher) * 2.0

    torch._dynamo.reset()
    with on_backend("emulated"):
        expected = step(*student)
        expected_grads = torch.autograd.grad(expected, student)
        actual = torch.compile(step, fullgraph=True, backend="aot_eager")(*student)
        actual_grads = torch.autograd.grad(actual, student)
    torch.testing.assert_close(actual, expected)
    for a, e in zip(actual_grads, expected_grads):
        torch.testing.assert_close(a, e)


@skip_unless("emulated")
@pytest.mark.parametrize("loss", ("ckd", "kd"))
def test_emulated_backend(loss):
    """The same orchestration over the CUDA kernels (under the CPU emulator): a tiny shape, float32 tolerance."""
    student, teacher = heads(tokens=(6,), vocab=16, student_width=3, teacher_width=4, dtype=torch.float32, seed=17)
    mask = random_mask((6,), seed=17)
    fns = ckd_fns(mask=mask) if loss == "ckd" else kd_fns(mask=mask, labels=token_labels((6,), 16), ce_weight=0.5)
    with on_backend("emulated"):
        compare(*fns, student, teacher, torch.float32)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16))
@pytest.mark.parametrize("anchor", ("student", "teacher"))
@pytest.mark.parametrize("bias", (True, False))
def test_teacher_gram_is_the_uncached_loss(dtype, anchor, bias, workspace):
    """fused_linear_teacher_gram, passed back as teacher_gram=: the loss and every gradient equal the float64 oracle
    as the uncached call does, and within the float64 rounding of the cached Gram's own vocabulary chunks of the
    uncached call (1e-12; its chunks hold the teacher columns alone); each vocabulary chunk issues one GEMM less (the
    teacher's diagonal block). Reusable across calls while the teacher is unchanged."""
    vocab, rows = 40, 8
    workspace(rows * 4 * 24 * 8)  # vocabulary chunks of 8 rows for the uncached K = 7 + 10 (fp64): several chunks
    student, teacher = heads(vocab=vocab, dtype=dtype, seed=23, bias=bias)
    mask = random_mask((5, 7), seed=23)
    fused, oracle = ckd_fns(anchor=anchor, mask=mask)
    gram = ckd_ext.fused_linear_teacher_gram(teacher[1], teacher[2])
    ext = ckd_ext.require_extension()

    def cached(s, t):
        return ckd_ext.fused_linear_ckd_loss(s[0], s[1], t[0], t[1], student_bias=s[2], teacher_bias=t[2], tau=0.5,
                                             anchor=anchor, mask=mask, teacher_gram=gram)

    calls = ext.gemm_calls()
    plain = fused(student, teacher)
    plain_grads = grads_of(plain, student)
    calls = ext.gemm_calls() - calls
    compare(cached, oracle, student, teacher, dtype)
    fewer = ext.gemm_calls()  # the same TeacherGram again
    out = cached(student, teacher)
    cached_grads = grads_of(out, student)
    fewer = ext.gemm_calls() - fewer
    chunk_rows = ckd_ext.fused_linear.ckd._chunk_rows(4 * (sum(x.shape[-1] for x in (student[0], teacher[0])) + 2 *
                                                           bias) * 8, student[0].device)
    assert calls - fewer == -(-vocab // min(vocab, chunk_rows)), (calls, fewer)
    torch.testing.assert_close(out.double(), plain.detach().double(), rtol=1e-12 if dtype == torch.float64 else 0,
                               atol=0 if dtype == torch.float64 else 2 * torch.finfo(dtype).eps * abs(plain.item()))
    for got, want in zip(cached_grads, plain_grads):
        if want is not None:
            assert float((got.double() - want.double()).abs().max()) <= (
                1e-12 if dtype == torch.float64 else 2 * torch.finfo(dtype).eps) * float(want.double().abs().max())


def test_teacher_gram_refused_for_another_or_a_changed_head():
    """A TeacherGram is only taken with the head it was made from, unchanged (its version counters): anything else
    raises before any work, naming the argument."""
    student, teacher = heads(seed=24)
    hs, ws, bs = student
    ht, wt, bt = teacher
    gram = ckd_ext.fused_linear_teacher_gram(wt, bt)

    def call(weight=wt, bias=bt, teacher_gram=gram):
        return ckd_ext.fused_linear_ckd_loss(hs, ws, ht, weight, student_bias=bs, teacher_bias=bias,
                                             teacher_gram=teacher_gram)

    with pytest.raises(ValueError, match="teacher_gram was made from another"):
        call(weight=wt.clone())
    with pytest.raises(ValueError, match="teacher_gram was made from another"):
        call(bias=None)
    with pytest.raises(TypeError, match="teacher_gram must be a TeacherGram"):
        call(teacher_gram=gram.gram)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="autocast"):
        call()
    call()  # still fine: nothing changed
    module = ckd_ext.FusedLinearCKDLoss()
    torch.testing.assert_close(module(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, teacher_gram=gram), call(),
                               rtol=0, atol=0)
    with torch.no_grad():
        wt.mul_(2.0)
    with pytest.raises(ValueError, match="teacher_gram is stale"):
        call()
    with pytest.raises(ValueError, match="teacher_weight must have shape"):
        ckd_ext.fused_linear_teacher_gram(wt[0])


# --------------------------------------------------------------------------------------------------
# Memory: nothing N x V or N x N
# --------------------------------------------------------------------------------------------------

class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an ATen op (or a ckd_ext op) returns."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor) and x.numel() > self.largest:
                self.largest, self.op = x.numel(), str(func)
        return out


MEMORY_SHAPE = dict(tokens=(1024,), vocab=4096, student_width=16, teacher_width=24)  # N x V = 4M, N x N = 1M


def _largest_tensor(run):
    with LargestTensor() as mode:
        run()
    return mode


@pytest.mark.parametrize("loss", ("ckd", "kd"))
def test_nothing_n_by_v_or_n_by_n_is_allocated(loss, workspace):
    """Forward and backward at a shape where N x V (4M elements) and N x N (1M) dwarf the inputs (the largest, the
    teacher head, 98k): no tensor of even 1/8 of N x N appears. The same probe sees the N x V tensor of materialised
    logits, so this test can fail. (The ops' own work buffers are bounded by the workspace, 1 MiB here.)"""
    workspace(1 << 20)
    student, teacher = heads(dtype=torch.float32, seed=18, bias=True, **MEMORY_SHAPE)
    tokens, vocab = MEMORY_SHAPE["tokens"][0], MEMORY_SHAPE["vocab"]
    labels = token_labels((tokens,), vocab, seed=18)
    fused = ckd_fns()[0] if loss == "ckd" else kd_fns(labels=labels, ce_weight=0.5)[0]
    limit = tokens * tokens // 8
    mode = _largest_tensor(lambda: fused(student, teacher).backward())
    assert mode.largest < limit, f"{mode.op} returned {mode.largest} elements"

    def materialised():  # the logits alone (the probe's sanity check; the loss on them would only add time)
        F.linear(*student).sum().backward()

    assert _largest_tensor(materialised).largest >= tokens * vocab


@pytest.mark.parametrize("loss", ("ckd", "kd"))
def test_saved_for_backward_is_bounded(loss):
    """What the graph keeps for backward: the student's inputs and, for CKD, N x K rows and products, K x K Gram
    matrices and per-row norms and log-sum-exps;
    for KD the finished gradients (one hidden-, weight- and bias-sized buffer). Never N x V."""
    student, teacher = heads(dtype=torch.float32, seed=19, **MEMORY_SHAPE)
    tokens, vocab = MEMORY_SHAPE["tokens"][0], MEMORY_SHAPE["vocab"]
    fused = ckd_fns()[0] if loss == "ckd" else kd_fns()[0]
    out, saved_tensors = saved_by(fused, student, teacher)
    saved = [x.numel() for x in saved_tensors]
    width = sum(x.shape[-1] for x in (student[0], teacher[0])) + 2
    inputs = sum(x.numel() for x in student + teacher if x is not None)
    assert max(saved) < tokens * vocab // 8
    assert sum(saved) <= 2 * inputs + 2 * tokens * width + 2 * width * width
    out.backward()


@pytest.mark.parametrize("loss", ("ckd", "kd"))
def test_double_backward_raises(loss):
    """First order only, as for the logit losses: differentiating a gradient raises instead of returning 0."""
    student, teacher = heads(dtype=torch.float64, seed=20)
    fn = ckd_fns()[0] if loss == "ckd" else kd_fns()[0]
    (grad,) = torch.autograd.grad(fn(student, teacher), student[0], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate|double backward"):
        grad.pow(2).sum().backward()
