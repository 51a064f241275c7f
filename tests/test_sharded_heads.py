"""Heads that are not one plain tensor for the whole call (docs/distributed.md, "Sharded heads"), against the
float64 oracle on materialised logits (ckd_ext.reference), loss and every gradient:

* gathered heads (ZeRO-3): the head exists only inside a context around the forward, which frees it on exit; both
  fused-linear ops finish the head gradient in the forward ("mean", "sum"), and "none" says clearly that it cannot;
* vocabulary-parallel heads on 2 and 3 gloo ranks (unequal shares), KD + CE and CKD, every reduction, every
  gradient (hidden states, head shards, biases), the same loss on every rank, mismatched ranks, bytes sent;
* FSDP2 (`fully_shard`) heads on the same ranks: the student's head a sharded DTensor when the loss reads it, the
  teacher's a `distribute_tensor` DTensor; loss and every gradient against one process.

One spawn per world size runs every multi-rank case (tests/gloo_ranks.py). Tolerances: float64 1e-10 relative to the
largest magnitude of the expected tensor (only the summation order differs: shard sums, all-reduces); float32
TOLERANCE (1e-5, tests/tolerances.py: float32 accumulation over a few dozen terms).
"""
import contextlib
import time

import pytest
import torch
import torch.distributed as dist

import ckd_ext
import gloo_ranks
from ckd_ext import distributed, reference
from test_fused_linear import as_oracle, grads_of, heads, logits_of, reference_kd, token_labels
from inputs import GemmsIssued
from tolerances import TOLERANCE, assert_matches

REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------------------
# Gathered heads (one process)
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def gathered(params, free):
    """ZeRO-3's GatheredParameters in miniature: the full heads exist inside, and are freed on exit, either by
    replacing their data with an empty tensor (what DeepSpeed does) or by resizing their storage to 0 bytes."""
    try:
        yield
    finally:
        for param in params:
            if free == "data":
                param.data = torch.empty(0, dtype=param.dtype)
            else:
                param.untyped_storage().resize_(0)


def _gathered_losses(loss, reduction):
    kwargs = dict(reduction=reduction)
    if loss == "ckd":
        return (lambda s, t: ckd_ext.fused_linear_ckd_loss(s[0], s[1], t[0], t[1], student_bias=s[2],
                                                           teacher_bias=t[2], tau=0.5, **kwargs),
                lambda s, t: reference.ckd_loss(logits_of(*s), logits_of(*t), tau=0.5, **kwargs))
    labels = token_labels((5, 7), 40)
    return (lambda s, t: ckd_ext.fused_linear_kd_loss(s[0], s[1], t[0], t[1], student_bias=s[2], teacher_bias=t[2],
                                                      temperature=2.0, labels=labels, ce_weight=0.5, **kwargs),
            lambda s, t: reference_kd(logits_of(*s), logits_of(*t), temperature=2.0, mask=None, labels=labels,
                                      ce_weight=0.5, ignore_index=-100, **kwargs))


@pytest.mark.parametrize("free", ["data", "storage"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", ["ckd", "kd"])
def test_gathered_head_gradient_survives_the_context(loss, reduction, free):
    """Invariant: with the student's and teacher's heads freed when the gather context exits, after the forward and
    before backward, backward still gives the head (weight, bias) and hidden-state gradients of the float64 oracle,
    in the parameters' .grad."""
    (hs, ws, bs), teacher = heads(dtype=torch.float32)
    ws, bs = torch.nn.Parameter(ws.detach().clone()), torch.nn.Parameter(bs.detach().clone())
    wt, bt = (torch.nn.Parameter(x.clone(), requires_grad=False) for x in teacher[1:])
    s64, t64 = as_oracle((hs, ws, bs), teacher)
    fused, oracle = _gathered_losses(loss, reduction)
    with gathered([ws, bs, wt, bt], free):
        out = fused((hs, ws, bs), (teacher[0], wt, bt))
    assert ws.untyped_storage().nbytes() == 0 and wt.untyped_storage().nbytes() == 0
    if free == "data":
        # PyTorch cannot accumulate a (V, H) gradient into a parameter whose data is now (0,) (ZeRO-3 gives it
        # storage again before its gradient hooks run): NaN-filled storage of the parameter's shape, which would
        # poison every gradient if backward read the head.
        for param, shape in ((ws, s64[1].shape), (bs, s64[2].shape)):
            param.data = torch.full(shape, float("nan"))
    out.backward()
    expected = oracle(s64, t64)
    expected.backward()
    assert_matches(out.detach(), expected.detach(), torch.float32, "loss")
    for name, got, want in (("hidden", hs.grad, s64[0].grad), ("weight", ws.grad, s64[1].grad),
                            ("bias", bs.grad, s64[2].grad)):
        assert_matches(got, want, torch.float32, f"grad of {name}")
    assert wt.grad is None and bt.grad is None  # the teacher's stay untouched


@pytest.mark.parametrize("loss", ["ckd", "kd"])
def test_gathered_head_with_reduction_none_says_why(loss):
    """Invariant: "none" needs the head in backward (its upstream weights arrive there): a head freed before then
    gives a RuntimeError naming it and what to do, not a shape error from deep inside."""
    (hs, ws, bs), teacher = heads(dtype=torch.float32)
    ws = torch.nn.Parameter(ws.detach().clone())
    fused, _ = _gathered_losses(loss, "none")
    with gathered([ws], "data"):
        out = fused((hs, ws, bs), teacher)
    with pytest.raises(RuntimeError, match="student_weight was freed between the forward and the backward.*"
                                           "reduction='mean' or 'sum'"):
        out.sum().backward()


def test_finished_gradients_leave_the_teacher_alone_and_forbid_double_backward():
    """Invariant: finishing CKD's gradients in the forward gives a teacher that requires grad no .grad (not zeros: an
    optimizer's weight decay would move it), and a second derivative raises instead of being silently 0."""
    (hs, ws, bs), (ht, wt, bt) = heads()
    wt.requires_grad_()
    loss = ckd_ext.fused_linear_ckd_loss(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt)
    (grad,) = torch.autograd.grad(loss, hs, create_graph=True)
    with pytest.raises(RuntimeError, match="twice differentiable|double backward|second derivative"):
        grad.sum().backward()
    loss = ckd_ext.fused_linear_ckd_loss(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt)
    loss.backward()
    assert wt.grad is None and ws.grad is not None


# --------------------------------------------------------------------------------------------------
# Multi-rank: vocabulary-parallel heads and FSDP2
# --------------------------------------------------------------------------------------------------

VOCAB, TOKENS, STUDENT_WIDTH, TEACHER_WIDTH = 11, 9, 4, 3
SHARDS = {2: (7, 4), 3: (5, 2, 4)}  # unequal shares of the vocabulary rows, in rank order
KD = dict(temperature=2.0, ce_weight=0.7)
CKD = dict(tau=0.5)
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def problem(dtype, seed=0):
    """Full heads and hidden states (the same on every rank, as a vocabulary-parallel model's), a mask with masked
    tokens holding garbage, and labels on every shard with some ignore_index."""
    (hs, ws, bs), (ht, wt, bt) = heads(tokens=(TOKENS,), vocab=VOCAB, student_width=STUDENT_WIDTH,
                                       teacher_width=TEACHER_WIDTH, dtype=dtype, seed=seed)
    mask = torch.ones(TOKENS, dtype=torch.bool)
    mask[[2, 6]] = False
    hs = hs.detach().clone()
    hs[~mask] = 1e3  # masked tokens take no part: large values there would dominate every sum they entered
    labels = token_labels((TOKENS,), VOCAB, seed=seed)
    return (hs, ws.detach(), bs.detach()), (ht, wt, bt), mask, labels


def _call(loss, student, teacher, mask, labels, reduction, **extra):
    if loss == "kd":
        return ckd_ext.fused_linear_kd_loss(student[0], student[1], teacher[0], teacher[1], student_bias=student[2],
                                            teacher_bias=teacher[2], mask=mask, labels=labels, reduction=reduction,
                                            **KD, **extra)
    return ckd_ext.fused_linear_ckd_loss(student[0], student[1], teacher[0], teacher[1], student_bias=student[2],
                                         teacher_bias=teacher[2], mask=mask, reduction=reduction, anchor=extra.pop(
                                             "anchor"), **CKD, **extra)


def _oracle(loss, student, teacher, mask, labels, reduction, anchor=None):
    s64, t64 = as_oracle(student, teacher)
    if loss == "kd":
        out = reference_kd(logits_of(*s64), logits_of(*t64), mask=mask, labels=labels, ignore_index=-100,
                           reduction=reduction, **KD)
    else:
        out = reference.ckd_loss(logits_of(*s64), logits_of(*t64), mask=mask, reduction=reduction, anchor=anchor,
                                 **CKD)
    return out, grads_of(out, s64)


def relative_error(actual, expected) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / max(float(expected.abs().max()), 1e-300))


def _max_over_ranks(errors: dict, group) -> dict:
    result = torch.tensor(list(errors.values()), dtype=torch.float64)
    dist.all_reduce(result, op=dist.ReduceOp.MAX, group=group)
    return dict(zip(errors, result.tolist()))


def vocab_parallel_case(world, rank, group, loss, dtype_name, reduction, anchor="student"):
    """This rank's shard of both heads; the loss, its spread over ranks, and every gradient against the float64
    oracle on the whole vocabulary's logits (hidden states in full on every rank; the head gradients of this
    rank's rows)."""
    dtype = DTYPES[dtype_name]
    student, teacher, mask, labels = problem(dtype)
    start = sum(SHARDS[world][:rank])
    rows = slice(start, start + SHARDS[world][rank])
    hs = student[0].clone().requires_grad_()
    shard = (hs, student[1][rows].clone().requires_grad_(), student[2][rows].clone().requires_grad_())
    teacher_shard = (teacher[0], teacher[1][rows], teacher[2][rows])
    with GemmsIssued() as gemms:
        out = _call(loss, shard, teacher_shard, mask, labels, reduction, vocab_parallel_group=group,
                    **({} if loss == "kd" else {"anchor": anchor}))
        got = grads_of(out, shard)
    expected, expected_grads = _oracle(loss, student, teacher, mask, labels, reduction, anchor)
    everyone = [torch.empty_like(out) for _ in range(world)]
    dist.all_gather(everyone, out.detach().contiguous(), group=group)
    valid = mask if loss == "ckd" else mask & (labels != -100)
    errors = dict(loss=relative_error(out, expected),
                  same_on_every_rank=max(float((o - everyone[0]).abs().max()) for o in everyone),
                  hidden=relative_error(got[0][valid], expected_grads[0][valid]),
                  masked_hidden=float(got[0][~valid].abs().max()),
                  weight=relative_error(got[1], expected_grads[1][rows]),
                  bias=relative_error(got[2], expected_grads[2][rows]),
                  aten_gemms=float(gemms.aten), no_policy_gemms=float(gemms.policy == 0))  # every rank has a shard
    return _max_over_ranks(errors, group)


def vocab_parallel_module_case(world, rank, group):
    """FusedLinearKDLoss / FusedLinearCKDLoss pass vocab_parallel_group through: bit for bit their functions."""
    student, teacher, mask, labels = problem(torch.float64, seed=1)
    start = sum(SHARDS[world][:rank])
    rows = slice(start, start + SHARDS[world][rank])
    s, t = (student[0], student[1][rows], student[2][rows]), (teacher[0], teacher[1][rows], teacher[2][rows])
    kd_module = ckd_ext.FusedLinearKDLoss(reduction="sum", vocab_parallel_group=group, **KD)
    ckd_module = ckd_ext.FusedLinearCKDLoss(reduction="sum", anchor="teacher", vocab_parallel_group=group, **CKD)
    kwargs = dict(student_bias=s[2], teacher_bias=t[2], mask=mask)
    same = [torch.equal(kd_module(s[0], s[1], t[0], t[1], labels=labels, **kwargs),
                        _call("kd", s, t, mask, labels, "sum", vocab_parallel_group=group)),
            torch.equal(ckd_module(s[0], s[1], t[0], t[1], **kwargs),
                        _call("ckd", s, t, mask, None, "sum", vocab_parallel_group=group, anchor="teacher")),
            "vocab_parallel_group" in repr(kd_module)]
    return all(same)


# What the last rank passes differently (every rank must raise the same ValueError naming it, before any logits
# are computed; a rank computing with other arguments would give another loss, or other chunks and so another
# number of collectives: a hang).
MISMATCHES = {
    "kd-temperature": "temperature must be the same on every rank",
    "kd-labels": "mask, labels and ignore_index (a checksum of the labels of the tokens that take part) must be the "
                 "same on every rank",
    "kd-tokens": "the number of tokens N must be the same on every rank",
    "kd-bias": "student_bias, teacher_bias (given or None) must be the same on every rank",
    "ckd-tau": "tau must be the same on every rank",
    "ckd-mask": "mask (a checksum) must be the same on every rank",
}


def mismatched_rank(world, rank, group, case):
    odd = rank == world - 1
    student, teacher, mask, labels = problem(torch.float64)
    start = sum(SHARDS[world][:rank])
    rows = slice(start, start + SHARDS[world][rank])
    s, t = [student[0], student[1][rows], student[2][rows]], [teacher[0], teacher[1][rows], teacher[2][rows]]
    if odd and case == "kd-labels":
        labels = labels.clone()
        labels[0] = (labels[0] + 1) % VOCAB
    if odd and case == "kd-tokens":
        s[0], t[0], mask, labels = s[0][1:], t[0][1:], mask[1:], labels[1:]
    if odd and case == "kd-bias":
        s[2] = None
    if odd and case == "ckd-mask":
        mask = mask.clone()
        mask[0] = False
    message = None
    try:
        if case.startswith("kd"):
            ckd_ext.fused_linear_kd_loss(s[0], s[1], t[0], t[1], student_bias=s[2], teacher_bias=t[2], mask=mask,
                                         labels=labels, ce_weight=0.5,
                                         temperature=3.0 if odd and case == "kd-temperature" else 1.0,
                                         vocab_parallel_group=group)
        else:
            ckd_ext.fused_linear_ckd_loss(s[0], s[1], t[0], t[1], student_bias=s[2], teacher_bias=t[2], mask=mask,
                                          tau=2.0 if odd and case == "ckd-tau" else 1.0,
                                          vocab_parallel_group=group)
    except ValueError as error:
        message = str(error)
    messages = [None] * world
    dist.all_gather_object(messages, message, group=group)
    alive = torch.ones(1)
    dist.all_reduce(alive, group=group)
    return dict(messages=messages, alive=alive.item() == world)


def bytes_sent(world, rank, group, loss):
    """What this rank sends for one vocabulary-parallel call, forward and backward ("mean", float64)."""
    student, teacher, mask, labels = problem(torch.float64)
    start = sum(SHARDS[world][:rank])
    rows = slice(start, start + SHARDS[world][rank])
    s = (student[0].clone().requires_grad_(), student[1][rows].clone().requires_grad_(), student[2][rows])
    t = (teacher[0], teacher[1][rows], teacher[2][rows])
    with distributed.count_bytes() as counter:
        _call(loss, s, t, mask, labels, "mean", vocab_parallel_group=group,
              **({} if loss == "kd" else {"anchor": "student"})).backward()
    return counter.by_kind


def fsdp_case(world, rank, group):
    """A student whose body and head are sharded by FSDP2 (the head its own unit, whose forward never runs: the loss
    reads model.head.weight, a sharded DTensor) and a teacher head sharded with distribute_tensor, on a CPU mesh.
    Each rank distils its own tokens with KD + CE and CKD; FSDP2 averages the gradients over ranks. Against one
    process: the mean over ranks of the per-rank float64 oracle losses, and its gradients."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    class Student(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(5, STUDENT_WIDTH, dtype=torch.float64)
            self.head = torch.nn.Linear(STUDENT_WIDTH, VOCAB, dtype=torch.float64)

        def forward(self, x):
            return torch.tanh(self.body(x))

    torch.manual_seed(0)  # the same initial model on every rank
    model, reference_model = Student(), Student()
    reference_model.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(3)
    inputs = [torch.randn(6, 5, generator=generator, dtype=torch.float64) for _ in range(world)]
    teacher_hidden = [torch.randn(6, TEACHER_WIDTH, generator=generator, dtype=torch.float64) for _ in range(world)]
    labels = [token_labels((6,), VOCAB, seed=r) for r in range(world)]
    teacher_weight = torch.randn(VOCAB, TEACHER_WIDTH, generator=generator, dtype=torch.float64)
    mesh = DeviceMesh.from_group(group, "cpu")
    fully_shard(model.head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded_teacher = distribute_tensor(teacher_weight, mesh, [Shard(0)])

    def losses(student_model, hidden, weight, bias, teacher, r, fused):
        if fused:
            kd = ckd_ext.fused_linear_kd_loss(hidden, weight, teacher_hidden[r], teacher, student_bias=bias,
                                              labels=labels[r], **KD)
            return kd + ckd_ext.fused_linear_ckd_loss(hidden, weight, teacher_hidden[r], teacher, student_bias=bias,
                                                      **CKD)
        logits, teacher_logits = hidden @ weight.T + bias, teacher_hidden[r] @ teacher.T
        return (reference_kd(logits, teacher_logits, mask=None, labels=labels[r], ignore_index=-100,
                             reduction="mean", **KD)
                + reference.ckd_loss(logits, teacher_logits, **CKD))

    head = model.head
    is_sharded = type(head.weight).__name__ == "DTensor"
    loss = losses(model, model(inputs[rank]), head.weight, head.bias, sharded_teacher, rank, True)
    loss.backward()
    total = sum(losses(reference_model, reference_model(inputs[r]), reference_model.head.weight,
                       reference_model.head.bias, teacher_weight, r, False) for r in range(world)) / world
    total.backward()
    want_loss = losses(reference_model, reference_model(inputs[rank]), reference_model.head.weight,
                       reference_model.head.bias, teacher_weight, rank, False)
    errors = dict(sharded_when_read=float(not is_sharded), loss=relative_error(loss, want_loss))
    for name, param in model.named_parameters():
        want = dict(reference_model.named_parameters())[name].grad
        errors[name] = relative_error(param.grad.full_tensor(), want)
    return _max_over_ranks(errors, group)


VOCAB_PARALLEL_CASES = ([("kd", "float64", r, "student") for r in REDUCTIONS]
                        + [("ckd", "float64", r, a) for r in REDUCTIONS for a in ("student", "teacher")]
                        + [("kd", "float32", "mean", "student"), ("ckd", "float32", "mean", "student")])


def case_name(loss, dtype, reduction, anchor):
    return f"{loss}-{dtype}-{reduction}" + (f"-{anchor}" if loss == "ckd" else "")


def run_cases(world, rank, group):
    """Every multi-rank case on `group` (`world` ranks); rank 0's results."""
    results, seconds = {}, {}
    start = time.perf_counter()
    for loss, dtype, reduction, anchor in VOCAB_PARALLEL_CASES:
        results[case_name(loss, dtype, reduction, anchor)] = vocab_parallel_case(world, rank, group, loss, dtype,
                                                                                   reduction, anchor)
    results["modules"] = vocab_parallel_module_case(world, rank, group)
    for case in MISMATCHES:
        results[f"mismatch-{case}"] = mismatched_rank(world, rank, group, case)
    for loss in ("kd", "ckd"):
        results[f"bytes-{loss}"] = bytes_sent(world, rank, group, loss)
    seconds["vocab_parallel"] = time.perf_counter() - start
    start = time.perf_counter()
    results["fsdp"] = fsdp_case(world, rank, group)
    seconds["fsdp"] = time.perf_counter() - start
    results["seconds"] = seconds  # where the time goes (printed by the fixture, shown with -s; not asserted)
    return results


def worker(rank, world, port, out_dir):
    """One spawn of 3 ranks for both world sizes (a spawn costs seconds): the 3-rank cases on the default group, then
    the 2-rank cases on the group of ranks 0 and 1 while rank 2 waits."""
    gloo_ranks.init(rank, world, port)
    results = {}
    try:
        pair = dist.new_group([0, 1])  # every rank creates every group
        results[3] = run_cases(3, rank, dist.group.WORLD)
        if rank < 2:
            results[2] = run_cases(2, rank, pair)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        gloo_ranks.save(out_dir, results)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    start = time.perf_counter()
    results = gloo_ranks.run(worker, max(SHARDS), tmp_path_factory.mktemp("sharded"))
    print(f"\none spawn of {max(SHARDS)} ranks: {time.perf_counter() - start:.1f} s in all; in the ranks: "
          f"{ {world: r['seconds'] for world, r in results.items()} }")
    return results


@pytest.fixture(params=sorted(SHARDS))
def group_results(request, spawned):
    return request.param, spawned[request.param]


@pytest.mark.parametrize("case", [case_name(*c) for c in VOCAB_PARALLEL_CASES])
def test_vocab_parallel_equals_the_whole_vocabulary(group_results, case):
    """Invariant: with each rank holding an unequal share of both heads' rows, every rank returns the same loss, the
    full gradient of the hidden states (0 on tokens that take no part) and its rows' head gradients, all equal to
    the float64 oracle on the whole vocabulary's logits."""
    world, results = group_results
    errors = results[case]
    tolerance = TOLERANCE[DTYPES[case.split("-")[1]]]
    assert errors.pop("same_on_every_rank") == 0.0, (world, case)
    assert errors.pop("masked_hidden") == 0.0, (world, case)
    # every matrix product through the GEMM policy's ops (counted; none issued by ATen around them)
    assert errors.pop("aten_gemms") == 0.0 and errors.pop("no_policy_gemms") == 0.0, (world, case)
    assert max(errors.values()) <= tolerance, (world, case, errors)


def test_vocab_parallel_modules_pass_the_group(group_results):
    world, results = group_results
    assert results["modules"]


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_vocab_parallel_mismatched_rank_raises_on_every_rank(group_results, case):
    """Invariant: one rank called with another temperature, other labels, mask, token count or bias gets, on every
    rank, the same ValueError naming the argument and the ranks, before any logits; the group keeps working."""
    world, results = group_results
    result = results[f"mismatch-{case}"]
    messages = result["messages"]
    assert all(m == messages[0] for m in messages), messages
    assert messages[0] is not None and MISMATCHES[case] in messages[0], messages[0]
    assert "(the vocabulary shards compute one loss)" in messages[0]
    assert messages[0].endswith(f"on rank {world - 1}"), messages[0]
    assert result["alive"]


def test_vocab_parallel_sends_the_documented_bytes(group_results):
    """docs/distributed.md, "Sharded heads": the signature all-gather, then per call (float64, one token chunk)
    KD: the row maxima (N x 2) and sums (N x 5 with cross-entropy) and the hidden gradient (N x H_s), all-reduced;
    CKD: the heads' magnitudes (2) and the Gram blocks (K_s^2 + K_t K_s + K_t^2), all-reduced. An all-reduce sends
    2 (world - 1) / world of its bytes per rank."""
    world, results = group_results
    ring = 2 * (world - 1) / world
    signature = (world - 1) * 8 * distributed.SIGNATURE_SLOTS
    k_s, k_t = STUDENT_WIDTH + 1, TEACHER_WIDTH + 1
    assert results["bytes-kd"] == {"all_gather": signature,
                                   "all_reduce": sum(int(ring * 8 * TOKENS * n) for n in (2, 5, STUDENT_WIDTH))}
    assert results["bytes-ckd"] == {"all_gather": signature,
                                    "all_reduce": int(ring * 8 * 2) + int(ring * 8 * (k_s * k_s + k_t * k_s
                                                                                       + k_t * k_t))}


def test_fsdp2_sharded_heads_equal_one_process(group_results):
    """Invariant: under FSDP2 the head the loss reads is a sharded DTensor; its full tensor goes into both
    fused-linear losses and its gradient back to the shards averaged over the ranks, as FSDP2 averages every other
    parameter's: loss and every parameter's gradient equal the single-process float64 values."""
    world, results = group_results
    errors = results["fsdp"]
    assert errors.pop("sharded_when_read") == 0.0
    assert max(errors.values()) <= 1e-10, (world, errors)
