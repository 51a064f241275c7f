"""KD from an offline top-k teacher (topk_kd_loss, fused_linear_topk_kd_loss) and its producer (teacher_topk) against
the float64 oracle of ckd_ext.reference, which materialises the student's log-softmax and builds each row's k + 1
(or k) categories from the teacher's full distribution truncated to its top k by the tail rule: every divergence x
tail x reduction, masks, ignore_index, padded rows, int32 ids, 16-bit inputs, gradcheck, the workspace chunking,
torch.compile, and that nothing N x V is allocated or kept."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import ckd_ext
from ckd_ext import reference
from ckd_ext.divergences import DIVERGENCES, Divergence, divergence_terms
from inputs import logits, random_mask, saved_by, weighted_total
from test_fused_linear import LargestTensor, token_labels
from tolerances import TOLERANCE, assert_matches

TAILS = ("bucket", "renormalize", "none")
REDUCTIONS = ("mean", "sum", "none")
# non-default beta / alpha, so a convention that ignored them would be caught
OPTIONS = {"jsd": dict(beta=0.3), "skew_kl": dict(alpha=0.2)}


def top_k_teacher(teacher_logits, k, temperature, pad_rows=()):
    """The teacher's top-k (ids, log-probabilities at `temperature`) from its materialised logits, as a producer would
    store them; rows in `pad_rows` keep only their first few entries (negative ids after them, at varying places)."""
    log_probs = F.log_softmax(teacher_logits.double() / temperature, dim=-1)
    values, ids = log_probs.topk(k, dim=-1)
    flat_ids, flat_values = ids.reshape(-1, k), values.reshape(-1, k)
    for n, row in enumerate(pad_rows):
        keep = n % k  # 0 (a row without any entry), 1, 2, ...
        flat_ids[row, keep:] = -1 - torch.arange(k - keep)
        flat_values[row, keep:] = float("nan")  # never read
    return ids, values


def loss_and_grads(fn, inputs, **kwargs):
    out = fn(*inputs, **kwargs)
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    grads = torch.autograd.grad(weighted_total(out), leaves)
    return out.detach(), grads


def compare(fused, oracle, inputs, dtype, tol=None, **kwargs):
    """`fused` on `inputs` against `oracle` on their float64 copies: the loss and every gradient."""
    out, grads = loss_and_grads(fused, inputs, **kwargs)
    inputs64 = [x.detach().double().requires_grad_(x.requires_grad)
                if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
    expected, expected_grads = loss_and_grads(oracle, inputs64, **kwargs)
    assert_matches(out, expected, dtype, "loss", tol)
    for n, (g, e) in enumerate(zip(grads, expected_grads)):
        assert_matches(g, e, dtype, f"gradient {n}", tol)


def logit_inputs(rows=(4, 5), vocab=37, k=6, temperature=2.0, dtype=torch.float64, seed=0, pad=True):
    student = logits(*rows, vocab, dtype=dtype, seed=seed, requires_grad=True)
    teacher = logits(*rows, vocab, seed=seed + 1)
    pad_rows = (3, 7, 11) if pad else ()
    ids, values = top_k_teacher(teacher, k, temperature, pad_rows)
    return student, ids, values.to(dtype)


# --------------------------------------------------------------------------------------------------
# Against the oracle
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("divergence,tail,reduction", itertools.product(DIVERGENCES, TAILS, REDUCTIONS))
def test_logits_match_oracle(divergence, tail, reduction):
    student, ids, values = logit_inputs(seed=1)
    mask = random_mask((4, 5), seed=1)
    compare(ckd_ext.topk_kd_loss, reference.topk_kd_loss, (student, ids, values), torch.float64, temperature=2.0,
            divergence=divergence, tail=tail, mask=mask, reduction=reduction, **OPTIONS.get(divergence, {}))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_bucket_with_every_class_is_the_dense_divergence(divergence):
    """k = V: the bucket's tail is empty and the loss is the divergence of the full distributions (the dense rule,
    written independently of the top-k categories), T^2-scaled; for forward_kl that is ckd_ext.reference.kd_loss."""
    student, teacher = logits(6, 11, seed=2, requires_grad=True), logits(6, 11, seed=3)
    ids, values = top_k_teacher(teacher, 11, 1.5)
    chosen = Divergence(divergence, **OPTIONS.get(divergence, {}))
    loss = ckd_ext.topk_kd_loss(student, ids, values, temperature=1.5, divergence=divergence,
                                **OPTIONS.get(divergence, {}))
    dense = 1.5 ** 2 * divergence_terms(F.log_softmax(teacher / 1.5, -1), F.log_softmax(student / 1.5, -1),
                                        chosen).mean()
    torch.testing.assert_close(loss, dense, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.autograd.grad(loss, student)[0], torch.autograd.grad(dense, student)[0],
                               rtol=1e-10, atol=1e-14)
    if divergence == "forward_kl":
        torch.testing.assert_close(loss, reference.kd_loss(student, teacher, temperature=1.5), rtol=1e-12, atol=0)


@pytest.mark.parametrize("divergence,tail", itertools.product(DIVERGENCES, TAILS))
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_fused_linear_matches_oracle(divergence, tail, reduction):
    """Hidden states and head (with bias), a mask, labels with ignore_index and cross-entropy: the loss and the
    gradients of hidden, weight and bias against the oracle on the materialised logits."""
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 7, 5, generator=g, dtype=torch.float64).requires_grad_()
    weight = (torch.randn(29, 5, generator=g, dtype=torch.float64) / 5 ** 0.5 * 3).requires_grad_()
    bias = (torch.randn(29, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    ids, values = top_k_teacher(torch.randn(3, 7, 29, generator=g, dtype=torch.float64) * 3, 4, 1.0, (2, 9, 15))
    kwargs = dict(student_bias=bias, divergence=divergence, tail=tail, mask=random_mask((3, 7), seed=4),
                  labels=token_labels((3, 7), 29, seed=4), ce_weight=0.5, reduction=reduction,
                  **OPTIONS.get(divergence, {}))

    def run(module, hidden, weight, bias, ids, values):
        return module.fused_linear_topk_kd_loss(hidden, weight, ids, values, **{**kwargs, "student_bias": bias})

    compare(lambda *x: run(ckd_ext, *x), lambda *x: run(reference, *x), (hidden, weight, bias, ids, values),
            torch.float64)


def test_fused_linear_equals_logit_form():
    """Without labels the fused-linear loss is the logit form on hidden @ weight.T (float32, one workspace)."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(40, 8, generator=g).requires_grad_()
    weight = torch.randn(300, 8, generator=g).requires_grad_()
    ids, values = top_k_teacher(torch.randn(40, 300, generator=g) * 2, 16, 1.0, (1, 2))
    fused = ckd_ext.fused_linear_topk_kd_loss(hidden, weight, ids, values.float(), divergence="jsd")
    via_logits = ckd_ext.topk_kd_loss(hidden @ weight.T, ids, values.float(), divergence="jsd")
    torch.testing.assert_close(fused, via_logits, rtol=1e-6, atol=0)
    for a, b in zip(torch.autograd.grad(fused, (hidden, weight)), torch.autograd.grad(via_logits, (hidden, weight))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_chunks_of_one_row_agree(workspace):
    """A workspace of one row per chunk gives the numbers of the default budget (one chunk here): the losses, their
    gradients and the producer's outputs."""
    student, ids, values = logit_inputs(seed=6)
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(20, 4, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(37, 4, generator=g, dtype=torch.float64).requires_grad_()
    ids2, values2 = top_k_teacher(hidden.detach() @ weight.detach().T, 6, 1.0, (0,))
    results = []
    for nbytes in (None, 64):
        workspace(nbytes)
        flat = []
        for reduction in ("mean", "none"):
            for fn, inputs in ((ckd_ext.topk_kd_loss, (student, ids, values)),
                               (ckd_ext.fused_linear_topk_kd_loss, (hidden, weight, ids2, values2))):
                out, grads = loss_and_grads(fn, inputs, reduction=reduction, divergence="jsd")
                flat += [out, *grads]
        flat += list(ckd_ext.teacher_topk(hidden.detach(), weight.detach(), 5, moments=True))
        results.append(flat)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------------------
# Inputs as stored: int32 ids, padding, 16-bit, masks
# --------------------------------------------------------------------------------------------------

def test_int32_ids_equal_int64():
    student, ids, values = logit_inputs(seed=7)
    a = loss_and_grads(ckd_ext.topk_kd_loss, (student, ids, values))
    b = loss_and_grads(ckd_ext.topk_kd_loss, (student, ids.int(), values))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("tail", TAILS)
def test_padding_is_the_row_without_those_entries(tail):
    """A row padded with negative ids (anywhere in the row) has the loss and gradient of the same row given only its
    real entries; a row with no entry has loss 0 (bucket: teacher and student both put all mass in the tail)."""
    student, ids, values = logit_inputs(rows=(3,), seed=8, pad=False)
    ids, values = ids.clone(), values.clone()
    ids[0, 1], ids[0, 4], ids[2] = -1, -7, -1
    loss, (grad,) = loss_and_grads(ckd_ext.topk_kd_loss, (student, ids, values), tail=tail, reduction="none")
    keep = torch.tensor([0, 2, 3, 5])
    alone, (alone_grad,) = loss_and_grads(ckd_ext.topk_kd_loss, (student[:1], ids[:1, keep], values[:1, keep]),
                                          tail=tail, reduction="none")
    torch.testing.assert_close(loss[0], alone[0] * 1.0, rtol=1e-12, atol=0)
    assert abs(loss[2].item()) < 1e-14 and grad[2].abs().max().item() < 1e-14
    # weighted_total's upstream weights differ between the two calls: compare the gradients per unit weight
    g = torch.Generator().manual_seed(11)
    w = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    w1 = torch.rand(1, generator=torch.Generator().manual_seed(11), dtype=torch.float64) + 0.5
    torch.testing.assert_close(grad[0] / w[0], alone_grad[0] / w1[0], rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32))
@pytest.mark.parametrize("form", ("logits", "fused_linear"))
def test_low_precision(dtype, form):
    """16-bit and float32 inputs against the float64 oracle on the same rounded inputs. The loss is computed in
    float32 (the category part in float64) and each result rounded once to the input dtype: TOLERANCE (twice the
    16-bit unit roundoff; 1e-5 for float32's sums over V = 300 terms) holds normwise."""
    g = torch.Generator().manual_seed(9)
    if form == "logits":
        student = (torch.randn(24, 300, generator=g) * 3).to(dtype).requires_grad_()
        ids, values = top_k_teacher(torch.randn(24, 300, generator=g) * 3, 16, 1.0, (5,))
        compare(ckd_ext.topk_kd_loss, reference.topk_kd_loss, (student, ids, values.to(dtype)), dtype,
                divergence="reverse_kl", mask=random_mask((24,), seed=9))
        return
    hidden = torch.randn(24, 8, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(300, 8, generator=g).to(dtype).requires_grad_()
    ids, values = top_k_teacher(torch.randn(24, 300, generator=g) * 3, 16, 1.0, (5,))
    compare(ckd_ext.fused_linear_topk_kd_loss, reference.fused_linear_topk_kd_loss,
            (hidden, weight, ids, values.to(dtype)), dtype, labels=token_labels((24,), 300, seed=9), ce_weight=1.0)


def test_masked_rows_holding_nan_are_harmless():
    student, ids, values = logit_inputs(seed=10)
    mask = random_mask((4, 5), seed=10)
    poisoned = student.detach().clone()
    poisoned[~mask] = float("nan")
    bad_ids = ids.clone()
    bad_ids[~mask] = 10 ** 6  # out of range, never read
    a = loss_and_grads(ckd_ext.topk_kd_loss, (student, ids, values), mask=mask)
    b = loss_and_grads(ckd_ext.topk_kd_loss, (poisoned.requires_grad_(), bad_ids, values), mask=mask)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_tail_mass_near_zero_is_exact():
    """A student with 1 - Q ~ 1e-13 (its top-k logits 30 above the rest) in float32: its tail category is the
    log-sum-exp over the classes outside the top k, not log(1 - Q) of a rounded Q (float32 would give log 0 = -inf
    there, and an infinite loss). The loss and gradient agree with the float64 oracle to float32's 1e-5."""
    student = torch.randn(8, 500, generator=torch.Generator().manual_seed(12))
    ids = torch.arange(8).unsqueeze(1) * 40 + torch.arange(4)
    student.scatter_(1, ids, 30.0 + student.gather(1, ids))
    teacher = student.double().clone()
    teacher.scatter_(1, ids, teacher.gather(1, ids) - 25.0)  # the teacher keeps 1e-2 of its mass in the tail
    values = F.log_softmax(teacher, -1).gather(1, ids)
    compare(ckd_ext.topk_kd_loss, reference.topk_kd_loss, (student.requires_grad_(), ids, values.float()),
            torch.float32)


def test_modules_match_functions():
    student, ids, values = logit_inputs(seed=13)
    module = ckd_ext.TopKKDLoss(temperature=2.0, divergence="skew_kl", alpha=0.3, tail="renormalize",
                                reduction="sum")
    torch.testing.assert_close(module(student, ids, values), ckd_ext.topk_kd_loss(
        student, ids, values, temperature=2.0, divergence="skew_kl", alpha=0.3, tail="renormalize", reduction="sum"))
    assert "skew_kl" in repr(module) and "alpha=0.3" in repr(module)
    hidden, weight = torch.randn(4, 5, 3, dtype=torch.float64), torch.randn(37, 3, dtype=torch.float64)
    labels = token_labels((4, 5), 37, seed=13)
    module = ckd_ext.FusedLinearTopKKDLoss(divergence="tvd", scale_t2=False, temperature=3.0, ce_weight=0.5)
    torch.testing.assert_close(module(hidden, weight, ids, values, labels=labels), ckd_ext.fused_linear_topk_kd_loss(
        hidden, weight, ids, values, divergence="tvd", scale_t2=False, temperature=3.0, ce_weight=0.5, labels=labels))


def test_scale_t2():
    student, ids, values = logit_inputs(seed=14)
    scaled = ckd_ext.topk_kd_loss(student, ids, values, temperature=3.0)
    plain = ckd_ext.topk_kd_loss(student, ids, values, temperature=3.0, scale_t2=False)
    torch.testing.assert_close(scaled, 9.0 * plain, rtol=1e-14, atol=0)


# --------------------------------------------------------------------------------------------------
# gradcheck, torch.compile
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("divergence,tail", [("forward_kl", "bucket"), ("jsd", "bucket"), ("reverse_kl", "none"),
                                             ("skew_kl", "renormalize"), ("tvd", "bucket")])
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_gradcheck(divergence, tail, reduction):
    student, ids, values = logit_inputs(rows=(5,), vocab=9, k=3, seed=15, pad=False)
    ids[1, 2] = -1
    kwargs = dict(temperature=1.7, divergence=divergence, tail=tail, reduction=reduction,
                  mask=torch.tensor([True, True, False, True, True]))
    assert torch.autograd.gradcheck(lambda s: ckd_ext.topk_kd_loss(s, ids, values, **kwargs), (student,))
    hidden = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, -100, 4, 0, 8])
    assert torch.autograd.gradcheck(
        lambda h, w, b: ckd_ext.fused_linear_topk_kd_loss(h, w, ids, values, student_bias=b, labels=labels,
                                                          ce_weight=0.3, **kwargs), (hidden, weight, bias))


# --------------------------------------------------------------------------------------------------
# The producer
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16))
def test_teacher_topk_matches_oracle(dtype, workspace):
    """ids equal to torch.topk of the materialised logits, log-probabilities and moments within the accumulation
    dtype's rounding (float32 logits of scale ~10 summed over V = 400: 1e-5 relative); chunks of 3 rows."""
    workspace(3 * 400 * 8)
    g = torch.Generator().manual_seed(16)
    hidden = torch.randn(2, 9, 6, generator=g).to(dtype)
    weight = (torch.randn(400, 6, generator=g) * 3).to(dtype)
    bias = torch.randn(400, generator=g).to(dtype)
    got = ckd_ext.teacher_topk(hidden, weight, 7, bias=bias, temperature=1.5, moments=True)
    expected = reference.teacher_topk(hidden.double(), weight.double(), 7, bias=bias.double(), temperature=1.5,
                                      moments=True)
    assert got.ids.shape == (2, 9, 7) and got.ids.dtype == torch.int64
    assert torch.equal(got.ids, expected.ids)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for name in ("logprobs", "log_normalizer", "logit_sum", "logit_square_sum"):
        a, e = getattr(got, name), getattr(expected, name)
        torch.testing.assert_close(a.double(), e, rtol=tol, atol=tol * e.abs().max().item())
    raw = 1.5 * (got.logprobs + got.log_normalizer.unsqueeze(-1))
    top = (hidden.double() @ weight.double().T + bias.double()).topk(7, dim=-1).values
    torch.testing.assert_close(raw.double(), top, rtol=tol, atol=tol * top.abs().max().item())
    plain = ckd_ext.teacher_topk(hidden, weight, 7, bias=bias, temperature=1.5)
    assert plain.log_normalizer is None and torch.equal(plain.ids, got.ids)


def test_safetensors_round_trip(tmp_path):
    """The producer's output saved with safetensors (int32 ids, bfloat16 log-probabilities, as a file of a real run
    would hold them) and read back gives the loss of the in-memory teacher within bfloat16's rounding."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(17)
    hidden_t, weight_t = torch.randn(4, 16, 8, generator=g), torch.randn(200, 8, generator=g)
    teacher = ckd_ext.teacher_topk(hidden_t, weight_t, 32, temperature=2.0)
    path = tmp_path / "teacher_topk.safetensors"
    save_file({"ids": teacher.ids.int(), "logprobs": teacher.logprobs.bfloat16()}, str(path),
              metadata={"k": "32", "temperature": "2.0"})
    stored = load_file(str(path))
    assert stored["ids"].dtype == torch.int32 and torch.equal(stored["ids"].long(), teacher.ids)
    student = torch.randn(4, 16, 200, generator=g)
    live = ckd_ext.topk_kd_loss(student, teacher.ids, teacher.logprobs, temperature=2.0)
    offline = ckd_ext.topk_kd_loss(student, stored["ids"], stored["logprobs"].float(), temperature=2.0)
    # log-probabilities rounded to bfloat16 (relative 2^-9): p off by |log p| 2^-9, the loss by about as much
    torch.testing.assert_close(offline, live, rtol=2e-2, atol=0)


# --------------------------------------------------------------------------------------------------
# Memory: nothing N x V
# --------------------------------------------------------------------------------------------------

def test_fused_linear_and_producer_allocate_nothing_n_by_v(workspace):
    """Forward and backward of the fused-linear loss (with cross-entropy) and the producer at N x V = 4M: no tensor
    of 1/8 of that appears (chunks of the 1 MiB workspace); the probe sees materialised logits, so it can fail."""
    workspace(1 << 20)
    tokens, vocab, width = 1024, 4096, 16
    g = torch.Generator().manual_seed(18)
    hidden = torch.randn(tokens, width, generator=g, requires_grad=True)
    weight = torch.randn(vocab, width, generator=g, requires_grad=True)
    teacher = ckd_ext.teacher_topk(hidden.detach(), weight.detach() * 1.1, 64, moments=True)
    labels = token_labels((tokens,), vocab, seed=18)
    for run in (lambda: ckd_ext.teacher_topk(hidden.detach(), weight.detach(), 64, moments=True),
                lambda: ckd_ext.fused_linear_topk_kd_loss(hidden, weight, teacher.ids, teacher.logprobs,
                                                          labels=labels, ce_weight=0.5).backward(),
                lambda: ckd_ext.fused_linear_topk_kd_loss(hidden, weight, teacher.ids, teacher.logprobs,
                                                          divergence="jsd", reduction="none").sum().backward()):
        with LargestTensor() as mode:
            run()
        assert mode.largest < tokens * vocab // 8, f"{mode.op} returned {mode.largest} elements"
    with LargestTensor() as mode:
        F.linear(hidden, weight).sum().backward()
    assert mode.largest >= tokens * vocab


@pytest.mark.parametrize("form", ("logits", "fused_linear"))
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_saved_for_backward(form, reduction):
    """What the graph keeps: the inputs themselves (no copies) or the finished gradients (one student-sized tensor
    for the logit form; hidden-, weight- and bias-sized ones for the fused-linear form, never N x V)."""
    g = torch.Generator().manual_seed(19)
    tokens, vocab, width = 256, 2048, 8
    hidden = torch.randn(tokens, width, generator=g, requires_grad=True)
    weight = torch.randn(vocab, width, generator=g, requires_grad=True)
    teacher = ckd_ext.teacher_topk(hidden.detach(), weight.detach(), 32)
    student = (hidden @ weight.T).detach().requires_grad_()
    if form == "logits":
        inputs = (student, teacher.ids, teacher.logprobs)
        out, saved = saved_by(ckd_ext.topk_kd_loss, *inputs, reduction=reduction)
    else:
        inputs = (hidden, weight, teacher.ids, teacher.logprobs)
        out, saved = saved_by(ckd_ext.fused_linear_topk_kd_loss, *inputs, reduction=reduction)
    storages = {x.untyped_storage().data_ptr() for x in inputs}
    copies = [x for x in saved if x is not None and x.untyped_storage().data_ptr() not in storages]
    if reduction == "none":
        assert copies == []
    elif form == "logits":
        assert [tuple(x.shape) for x in copies] == [(tokens, vocab)]  # the gradient, the student's own size
    else:
        assert sorted(x.numel() for x in copies) == sorted((tokens * width, vocab * width))
    out.sum().backward()


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) of the logit and the fused-linear loss agrees with eager."""
    student, ids, values = logit_inputs(dtype=torch.float32, seed=20)
    hidden = torch.randn(4, 5, 3, requires_grad=True)
    weight = torch.randn(37, 3, requires_grad=True)

    def step(s, h, w):
        return (ckd_ext.topk_kd_loss(s, ids, values, divergence="jsd", reduction="sum")
                + ckd_ext.fused_linear_topk_kd_loss(h, w, ids, values, tail="renormalize"))

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    expected = step(student, hidden, weight)
    actual = compiled(student, hidden, weight)
    torch.testing.assert_close(actual, expected)
    for a, e in zip(torch.autograd.grad(actual, (student, hidden, weight)),
                    torch.autograd.grad(expected, (student, hidden, weight))):
        torch.testing.assert_close(a, e)
