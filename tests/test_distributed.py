"""Global-batch CKD and BicKD on 2 and 3 gloo ranks (CPU), against one process computing the float64 reference on
the concatenated batch.

Each world size is one spawned process group (startup costs seconds) that runs every case and reports its errors;
the tests below then check one case each. The ranks hold uneven, partly masked batches (5 and 9 valid rows, and 0
on the third rank), so that a gradient missing a rank's contribution, or an average where a sum belongs, changes
the numbers. Per case each rank computes its loss with a small linear student, backpropagates, and the parameter
gradients are averaged over ranks (what DDP's all-reduce does); these, the mean of the ranks' losses, the ranks'
"none" terms and the gradient of each rank's logits are compared with the single-process values.

Tolerances, relative to the largest magnitude of the expected tensor: float64 1e-10 (only summation order differs:
the ring merges its log-sum-exp block by block); float32 1e-5 (as tests/tolerances.py's TOLERANCE: float32
accumulation over a few dozen terms, inputs of scale 3).
"""
import pytest
import torch
import torch.distributed as dist

import ckd_ext
import gloo_ranks
from inputs import GemmsIssued
from ckd_ext import distributed, reference

FEATURES, CLASSES = 6, 7
# Rows each rank holds and how many of them are valid (the rest are masked, and hold garbage).
ROWS = {2: ((7, 5), (9, 9)), 3: ((7, 5), (9, 9), (2, 0))}
LOSSES = {
    "ckd_student": ("ckd_loss", dict(tau=0.5, anchor="student")),
    "ckd_teacher": ("ckd_loss", dict(tau=0.5, anchor="teacher")),
    "bickd": ("bickd_loss", dict(temperature=2.0, tau=0.2, w_sample=1.0, w_class=0.5)),
    "bickd_symmetric": ("bickd_loss", dict(temperature=3.0, tau=0.3, w_sample=0.7, w_class=1.3, symmetric=True)),
}
MODES = (True, "ring")
REDUCTIONS = ("mean", "sum", "none")
DTYPES = {"float64": (torch.float64, 1e-10), "float32": (torch.float32, 1e-5)}
IMPLS = {"fused": ckd_ext, "reference": reference}


def global_batch(world, dtype, seed=0):
    """Features, teacher logits and masks of every rank, and a linear student (weight, bias)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for rows, valid in ROWS[world]:
        features = torch.randn(rows, FEATURES, generator=generator, dtype=torch.float64)
        teacher = 3 * torch.randn(rows, CLASSES, generator=generator, dtype=torch.float64)
        mask = torch.zeros(rows, dtype=torch.bool)
        mask[torch.randperm(rows, generator=generator)[:valid]] = True
        # Masked rows take no part at all: large logits there would dominate every LSE they entered. (Finite: the
        # linear student's weight gradient multiplies their zero gradient by their features.)
        features[~mask] *= 1e3
        batches.append((features.to(dtype), teacher.to(dtype), mask))
    weight = torch.randn(CLASSES, FEATURES, generator=generator, dtype=torch.float64).to(dtype)
    bias = torch.randn(CLASSES, generator=generator, dtype=torch.float64).to(dtype)
    return batches, weight, bias


def upstream(world, seed=1):
    """Weights of the "none" terms in the objective: per global row, and per class."""
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.rand(n, generator=generator, dtype=torch.float64) for n, _ in ROWS[world]]
    return rows, torch.rand(CLASSES, generator=generator, dtype=torch.float64)


def objective(out, reduction, row_weights, class_weights, scale):
    """The scalar to backpropagate: the loss, or for "none" a weighted sum of its terms, the row terms scaled by
    `scale` (the world size on a rank, 1 on one process: the documented convention for "none")."""
    if reduction != "none":
        return out
    rows, classes = out if isinstance(out, tuple) else (out, None)
    total = scale * (rows.double() * row_weights).sum()
    return total if classes is None else total + (classes.double() * class_weights).sum()


def single_process(world, dtype, loss, reduction):
    """The float64 reference on the concatenated batch: loss (or terms), parameter gradients, logit gradients."""
    batches, weight, bias = global_batch(world, dtype)
    weight, bias = weight.double().requires_grad_(), bias.double().requires_grad_()
    features = torch.cat([b[0] for b in batches]).double()
    teacher = torch.cat([b[1] for b in batches]).double()
    mask = torch.cat([b[2] for b in batches])
    logits = (features @ weight.T + bias).detach().requires_grad_()
    name, kwargs = LOSSES[loss]
    out = getattr(reference, name)(logits, teacher, mask=mask, reduction=reduction, **kwargs)
    row_weights, class_weights = upstream(world)
    objective(out, reduction, torch.cat(row_weights), class_weights, 1).backward()
    logits_grad = logits.grad.clone()
    (features @ weight.T + bias).backward(logits_grad.masked_fill(~mask[:, None], 0))
    return dict(out=out, weight=weight.grad, bias=bias.grad, logits=logits_grad.split([n for n, _ in ROWS[world]]))


def relative_error(actual, expected, mask=None) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    if mask is not None:
        actual, expected = actual[mask], expected[mask]
    if expected.numel() == 0:
        return float(actual.abs().max()) if actual.numel() else 0.0
    return float((actual - expected).abs().max() / max(float(expected.abs().max()), 1e-300))


def case_id(impl, dtype, loss, mode, reduction):
    return f"{impl}-{dtype}-{loss}-{'gather' if mode is True else mode}-{reduction}"


def run_case(world, rank, impl, dtype_name, loss, mode, reduction):
    """This rank's part of one case: {quantity: error} (the same on every rank after a max-reduction)."""
    dtype, _ = DTYPES[dtype_name]
    batches, weight, bias = global_batch(world, dtype)
    features, teacher, mask = batches[rank]
    weight, bias = weight.requires_grad_(), bias.requires_grad_()
    logits = features @ weight.T + bias
    logits.retain_grad()
    name, kwargs = LOSSES[loss]
    out = getattr(IMPLS[impl], name)(logits, teacher, mask=mask, reduction=reduction, global_batch=mode, **kwargs)
    row_weights, class_weights = upstream(world)
    objective(out, reduction, row_weights[rank], class_weights, world).backward()
    for grad in (weight.grad, bias.grad):  # DDP: all-reduce, then divide by the world size
        dist.all_reduce(grad)
        grad /= world
    expected = single_process(world, dtype, loss, reduction)
    errors = dict(weight=relative_error(weight.grad, expected["weight"]),
                  bias=relative_error(bias.grad, expected["bias"]),
                  # Rank r's logits receive every rank's contribution: world x the single-process gradient.
                  logits=relative_error(logits.grad / world, expected["logits"][rank], mask))
    if reduction == "none":
        terms = out[0] if isinstance(out, tuple) else out
        offset = sum(n for n, _ in ROWS[world][:rank])
        expected_terms = expected["out"][0] if isinstance(out, tuple) else expected["out"]
        errors["terms"] = relative_error(terms, expected_terms[offset:offset + terms.shape[0]])
        if isinstance(out, tuple):
            errors["class_terms"] = relative_error(out[1], expected["out"][1])
    else:
        mean = out.detach().double().clone()
        dist.all_reduce(mean)
        errors["loss"] = relative_error(mean / world, expected["out"])
    result = torch.tensor(list(errors.values()), dtype=torch.float64)
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    return dict(zip(errors, result.tolist())), out


def ring_equals_gather(world, rank, loss, reduction):
    """Each rank's ring loss against its all-gather loss (float64, fused)."""
    dtype = torch.float64
    batches, weight, bias = global_batch(world, dtype)
    features, teacher, mask = batches[rank]
    logits = features @ weight.T + bias
    name, kwargs = LOSSES[loss]
    outs = [getattr(ckd_ext, name)(logits, teacher, mask=mask, reduction=reduction, global_batch=mode, **kwargs)
            for mode in MODES]
    pairs = zip(*outs) if isinstance(outs[0], tuple) else [outs]
    error = max(relative_error(ring, gather, None if ring.shape != mask.shape else mask) for gather, ring in pairs)
    result = torch.tensor([error], dtype=torch.float64)
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    return result.item()


def local_mode(world, rank, loss):
    """global_batch=False on each rank against the reference on that rank's rows alone."""
    batches, weight, bias = global_batch(world, torch.float64)
    features, teacher, mask = batches[rank]
    name, kwargs = LOSSES[loss]
    logits = (features @ weight.T + bias).requires_grad_()
    got = getattr(ckd_ext, name)(logits, teacher, mask=mask, **kwargs)
    (got_grad,) = torch.autograd.grad(got, logits)
    logits = logits.detach().requires_grad_()
    want = getattr(reference, name)(logits, teacher, mask=mask, **kwargs)
    (want_grad,) = torch.autograd.grad(want, logits)
    error = max(relative_error(got, want), relative_error(got_grad, want_grad, mask))
    result = torch.tensor([error], dtype=torch.float64)
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    return result.item()


def no_valid_rows(world, rank, loss, mode):
    """Every rank fully masked: the loss is 0 and the gradient 0, on every rank, without a deadlock."""
    batches, weight, bias = global_batch(world, torch.float64)
    features, teacher, mask = batches[rank]
    logits = torch.randn(features.shape[0], CLASSES, dtype=torch.float64, requires_grad=True)
    name, kwargs = LOSSES[loss]
    out = getattr(ckd_ext, name)(logits, teacher, mask=torch.zeros_like(mask), global_batch=mode, **kwargs)
    (grad,) = torch.autograd.grad(out, logits)
    result = torch.tensor([float(out.detach().abs()), float(grad.abs().max()) if grad.numel() else 0.0], dtype=torch.float64)
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    return result.max().item()


FUSED_LINEAR = dict(vocab=20, student_hidden=4, teacher_hidden=3)


def ring_gemms(world, rank, call):
    """[the most ATen matrix products a rank issued around the GEMM policy's ops, 1 if the policy issued none on any
    rank] in a call's forward and backward (inputs.GemmsIssued; a rank without rows may issue none):
    [0, 0] where every product is the policy's."""
    with GemmsIssued() as gemms:
        call().backward()
    aten = torch.tensor([float(gemms.aten)], dtype=torch.float64)
    policy = torch.tensor([float(gemms.policy)], dtype=torch.float64)
    dist.all_reduce(aten, op=dist.ReduceOp.MAX)
    dist.all_reduce(policy)
    return [aten.item(), float(policy.item() == 0)]


def logit_ring_call(world, rank, loss):
    batches, weight, bias = global_batch(world, torch.float32)
    features, teacher, mask = batches[rank]
    logits = (features @ weight.T + bias).detach().requires_grad_()
    name, kwargs = LOSSES[loss]
    return lambda: getattr(ckd_ext, name)(logits, teacher, mask=mask, global_batch="ring", **kwargs)


def fused_linear_case(world, rank, anchor, mode):
    """fused_linear_ckd_loss with a global batch (float64): the mean of the ranks' losses and the DDP-averaged
    gradients of the student head (weight, bias) and hidden states against the reference on the concatenated
    logits. The rows each rank gathers (or passes around the ring) are K-wide rows [h, 1], not logits."""
    generator = torch.Generator().manual_seed(5)
    V, Hs, Ht = FUSED_LINEAR["vocab"], FUSED_LINEAR["student_hidden"], FUSED_LINEAR["teacher_hidden"]
    weight = torch.randn(V, Hs, generator=generator, dtype=torch.float64)
    bias = torch.randn(V, generator=generator, dtype=torch.float64)
    teacher_weight = torch.randn(V, Ht, generator=generator, dtype=torch.float64)
    hidden, teacher_hidden, masks = [], [], []
    for rows, valid in ROWS[world]:
        hidden.append(torch.randn(rows, Hs, generator=generator, dtype=torch.float64))
        teacher_hidden.append(torch.randn(rows, Ht, generator=generator, dtype=torch.float64))
        mask = torch.zeros(rows, dtype=torch.bool)
        mask[torch.randperm(rows, generator=generator)[:valid]] = True
        masks.append(mask)
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    h = hidden[rank].clone().requires_grad_()
    out = ckd_ext.fused_linear_ckd_loss(h, w, teacher_hidden[rank], teacher_weight, student_bias=b, tau=0.5,
                                        anchor=anchor, mask=masks[rank], global_batch=mode)
    out.backward()
    for grad in (w.grad, b.grad):
        dist.all_reduce(grad)
        grad /= world
    mean = out.detach().clone()
    dist.all_reduce(mean)
    w64, b64 = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    h64 = [x.clone().requires_grad_() for x in hidden]
    logits = torch.cat(h64) @ w64.T + b64
    teacher = torch.cat(teacher_hidden) @ teacher_weight.T
    want = reference.ckd_loss(logits, teacher, tau=0.5, anchor=anchor, mask=torch.cat(masks))
    want.backward()
    errors = [relative_error(mean / world, want), relative_error(w.grad, w64.grad), relative_error(b.grad, b64.grad),
              relative_error(h.grad / world, h64[rank].grad, masks[rank])]
    result = torch.tensor([max(errors)], dtype=torch.float64)
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    return result.item()


# What the last rank passes differently from the others: (call, expected message fragment). Every rank must raise
# the same ValueError, naming the argument and the ranks, before any rows are exchanged (a different width or dtype
# aborted the process inside gloo; a different mode hung until the timeout).
MISMATCHES = {
    "classes": ("the number of classes C must be the same on every rank"),
    "dtype": ("student's dtype must be the same on every rank"),
    "mode": ("global_batch must be the same on every rank"),
    "anchor": ("anchor must be the same on every rank"),
    "tau": ("tau must be the same on every rank"),
    "bickd-symmetric": ("symmetric must be the same on every rank"),
    "bickd-classes-ring": ("the number of classes C must be the same on every rank"),
    "fused-linear-width": ("student_hidden's width H_s must be the same on every rank"),
    "fused-linear-bias": ("student_bias (given or None) must be the same on every rank"),
    "fused-linear-dtype": ("student_hidden's dtype must be the same on every rank"),
}


def every_rank_error(world, call):
    """Runs `call` on this rank; returns every rank's ValueError message (None where a rank raised nothing) and
    whether the group still works afterwards (an all-reduce)."""
    message = None
    try:
        call()
    except ValueError as error:
        message = str(error)
    messages = [None] * world
    dist.all_gather_object(messages, message)
    alive = torch.ones(1)
    dist.all_reduce(alive)
    return dict(messages=messages, alive=alive.item() == world)


def mismatched_rank(world, rank, case):
    """The last rank calls with one argument different; returns every rank's error message (None where a rank raised
    nothing), and whether the group still works afterwards (an all-reduce)."""
    odd = rank == world - 1
    generator = torch.Generator().manual_seed(rank)
    dtype = torch.float64 if odd and case in ("dtype", "fused-linear-dtype") else torch.float32
    classes = CLASSES + 1 if odd and case in ("classes", "bickd-classes-ring") else CLASSES
    student = torch.randn(4, classes, generator=generator, dtype=dtype, requires_grad=True)
    teacher = torch.randn(4, classes, generator=generator, dtype=dtype)

    def call():
        if case.startswith("fused-linear"):
            width = 5 if odd and case == "fused-linear-width" else 4
            bias = torch.randn(20, dtype=dtype) if odd and case == "fused-linear-bias" else None
            ckd_ext.fused_linear_ckd_loss(torch.randn(4, width, dtype=dtype), torch.randn(20, width, dtype=dtype),
                                          torch.randn(4, 3, dtype=dtype), torch.randn(20, 3, dtype=dtype),
                                          student_bias=bias, global_batch="ring")
        elif case.startswith("bickd"):
            mode = "ring" if case.endswith("ring") else True
            ckd_ext.bickd_loss(student, teacher, symmetric=odd and case == "bickd-symmetric", global_batch=mode)
        else:
            ckd_ext.ckd_loss(student, teacher, global_batch="ring" if odd and case == "mode" else True,
                             anchor="teacher" if odd and case == "anchor" else "student",
                             tau=2.0 if odd and case == "tau" else 1.0)

    return every_rank_error(world, call)


# A rank whose own arguments are invalid: its error, and on the other ranks the error naming it.
REJECTIONS = {
    "ckd-tau": "tau must be",
    "bickd-temperature": "temperature must be",
    "fused-linear-mask": "mask",
    "vocab-parallel-ckd-empty-shard": "student_weight",
}


def rejected_rank(world, rank, case):
    """The last rank's call fails its own argument checks; returns every rank's error message and whether the group
    still works afterwards (an all-reduce)."""
    odd = rank == world - 1
    student = torch.randn(4, CLASSES, requires_grad=True)
    teacher = torch.randn(4, CLASSES)

    def call():
        if case == "ckd-tau":
            ckd_ext.ckd_loss(student, teacher, tau=-1.0 if odd else 1.0, global_batch="ring")
        elif case == "bickd-temperature":
            ckd_ext.bickd_loss(student, teacher, temperature=0.0 if odd else 4.0, global_batch=True)
        else:
            vocab = 0 if odd and case == "vocab-parallel-ckd-empty-shard" else 20
            mask = torch.ones(5 if odd and case == "fused-linear-mask" else 4, dtype=torch.bool)
            group = dict(vocab_parallel_group=dist.group.WORLD) if case.startswith("vocab") else dict(global_batch=True)
            ckd_ext.fused_linear_ckd_loss(torch.randn(4, 4), torch.randn(vocab, 4), torch.randn(4, 3),
                                          torch.randn(vocab, 3), mask=mask, **group)

    return every_rank_error(world, call)


def fused_linear_module_case(world, rank, mode):
    """FusedLinearCKDLoss against fused_linear_ckd_loss with a global batch over a group of one rank (each rank its
    own) and over the default group, non-default tau, anchor and reduction, masked: bit for bit equal; and the calls
    that a module dropping `group`, `mask` or `global_batch` would make give other numbers."""
    groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group, in the same order
    generator = torch.Generator().manual_seed(11 + rank)
    hs, ws = torch.randn(9, 4, generator=generator), torch.randn(20, 4, generator=torch.Generator().manual_seed(3))
    ht, wt = torch.randn(9, 3, generator=generator), torch.randn(20, 3, generator=torch.Generator().manual_seed(4))
    mask = torch.rand(9, generator=generator) < 0.7
    kwargs = dict(tau=0.3, anchor="teacher", reduction="sum")
    module = ckd_ext.FusedLinearCKDLoss(global_batch=mode, group=groups[rank], **kwargs)
    got = module(hs, ws, ht, wt, mask=mask)
    want = ckd_ext.fused_linear_ckd_loss(hs, ws, ht, wt, mask=mask, global_batch=mode, group=groups[rank], **kwargs)
    whole_world = ckd_ext.fused_linear_ckd_loss(hs, ws, ht, wt, mask=mask, global_batch=mode, **kwargs)
    unmasked = ckd_ext.fused_linear_ckd_loss(hs, ws, ht, wt, global_batch=mode, group=groups[rank], **kwargs)
    local = ckd_ext.fused_linear_ckd_loss(hs, ws, ht, wt, mask=mask, **kwargs)
    module_world = ckd_ext.FusedLinearCKDLoss(global_batch=mode, **kwargs)(hs, ws, ht, wt, mask=mask)
    result = torch.tensor([float(torch.equal(got, want)), float(not torch.equal(want, whole_world)),
                           float(not torch.equal(want, unmasked)), float(torch.allclose(want, local, rtol=1e-5)),
                           float(torch.equal(module_world, whole_world)),
                           float(not torch.allclose(whole_world, local, rtol=1e-3))])
    dist.all_reduce(result, op=dist.ReduceOp.MIN)
    return result.tolist()


def worker(rank, world, port, out_dir):
    gloo_ranks.init(rank, world, port)
    results = {}
    try:
        for impl in IMPLS:
            for dtype in DTYPES:
                for loss in LOSSES:
                    for mode in MODES:
                        for reduction in REDUCTIONS:
                            results[case_id(impl, dtype, loss, mode, reduction)], _ = run_case(
                                world, rank, impl, dtype, loss, mode, reduction)
        for loss in LOSSES:
            results[f"ring-vs-gather-{loss}"] = {
                reduction: ring_equals_gather(world, rank, loss, reduction) for reduction in REDUCTIONS}
            results[f"local-{loss}"] = local_mode(world, rank, loss)
            results[f"no-valid-rows-{loss}"] = {str(mode): no_valid_rows(world, rank, loss, mode) for mode in MODES}
        for anchor in ("student", "teacher"):
            for mode in MODES:
                results[f"fused-linear-{anchor}-{mode}"] = fused_linear_case(world, rank, anchor, mode)
        for case in MISMATCHES:
            results[f"mismatch-{case}"] = mismatched_rank(world, rank, case)
        for case in REJECTIONS:
            results[f"rejected-{case}"] = rejected_rank(world, rank, case)
        for mode in MODES:
            results[f"fused-linear-module-{mode}"] = fused_linear_module_case(world, rank, mode)
        strip_bytes = distributed.STRIP_BYTES
        distributed.STRIP_BYTES = 1  # one anchor row per strip: every strip boundary and own-column offset is crossed
        try:
            for loss in ("ckd_student", "ckd_teacher", "bickd_symmetric"):
                results[f"ring-strips-{loss}"], _ = run_case(world, rank, "fused", "float64", loss, "ring", "mean")
            for anchor in ("student", "teacher"):
                results[f"ring-strips-fused-linear-{anchor}"] = fused_linear_case(world, rank, anchor, "ring")
        finally:
            distributed.STRIP_BYTES = strip_bytes
        for loss in LOSSES:
            results[f"ring-gemms-{loss}"] = ring_gemms(world, rank, logit_ring_call(world, rank, loss))
        generator = torch.Generator().manual_seed(rank)
        hidden = torch.randn(6, 4, generator=generator, requires_grad=True)
        head = torch.randn(20, 4, generator=generator, requires_grad=True)
        results["ring-gemms-fused-linear"] = ring_gemms(world, rank, lambda: ckd_ext.fused_linear_ckd_loss(
            hidden, head, torch.randn(6, 3, generator=generator), torch.randn(20, 3, generator=generator),
            global_batch="ring"))
        with distributed.count_bytes() as counter:
            batches, weight, bias = global_batch(world, torch.float32)
            features, teacher, mask = batches[rank]
            ckd_ext.ckd_loss((features @ weight.T + bias).detach(), teacher, mask=mask, global_batch=True)
        results["bytes-ckd-gather-forward"] = counter.sent
        with distributed.count_bytes() as counter:
            logits = (features @ weight.T + bias).detach().requires_grad_()
            ckd_ext.ckd_loss(logits, teacher, mask=mask, global_batch="ring").backward()
        results["bytes-ckd-ring-step"] = counter.sent
    finally:
        dist.destroy_process_group()
    if rank == 0:
        gloo_ranks.save(out_dir, results)


@pytest.fixture(scope="module", params=sorted(ROWS))
def group_results(request, tmp_path_factory):
    """Runs every case on one process group of `world` ranks; (world, results)."""
    world = request.param
    return world, gloo_ranks.run(worker, world, tmp_path_factory.mktemp(f"world{world}"))


CASES = [case_id(impl, dtype, loss, mode, reduction) for impl in IMPLS for dtype in DTYPES for loss in LOSSES
         for mode in MODES for reduction in REDUCTIONS]


@pytest.mark.parametrize("anchor", ["student", "teacher"])
@pytest.mark.parametrize("mode", MODES)
def test_fused_linear_ckd_with_a_global_batch(group_results, anchor, mode):
    world, results = group_results
    # float64 throughout: the bilinear forms are exact identities, only the summation order differs.
    assert results[f"fused-linear-{anchor}-{mode}"] <= 1e-10, world


@pytest.mark.parametrize("case", CASES)
def test_global_loss_and_gradients_equal_single_process(group_results, case):
    world, results = group_results
    tolerance = DTYPES[case.split("-")[1]][1]
    errors = results[case]
    assert set(errors) >= {"weight", "bias", "logits"}
    assert max(errors.values()) <= tolerance, f"{world} ranks, {case}: {errors}"


@pytest.mark.parametrize("loss", LOSSES)
def test_ring_equals_all_gather(group_results, loss):
    world, results = group_results
    errors = results[f"ring-vs-gather-{loss}"]
    assert max(errors.values()) <= 1e-10, f"{world} ranks, {loss}: {errors}"


@pytest.mark.parametrize("loss", list(LOSSES) + ["fused-linear"])
def test_ring_products_go_through_the_gemm_policy(group_results, loss):
    """Every matrix product of the ring's forward and backward is one of the GEMM policy's (counted by gemm_calls; no
    ATen product around them), as in the fused ops."""
    world, results = group_results
    assert results[f"ring-gemms-{loss}"] == [0.0, 0.0], (world, loss)


@pytest.mark.parametrize("loss", LOSSES)
def test_local_mode_equals_per_rank_single_process(group_results, loss):
    world, results = group_results
    assert results[f"local-{loss}"] <= 1e-10


@pytest.mark.parametrize("loss", LOSSES)
def test_no_valid_rows_anywhere_gives_zero_without_deadlock(group_results, loss):
    world, results = group_results
    assert results[f"no-valid-rows-{loss}"] == {"True": 0.0, "ring": 0.0}


def test_gather_mode_sends_the_documented_bytes(group_results):
    """All-gather CKD forward, float32: the row counts and call signatures (SIGNATURE_SLOTS int64 per rank), then the student and teacher rows
    padded to the largest count (9), each sent to world - 1 ranks."""
    world, results = group_results
    block = max(valid for _, valid in ROWS[world])
    assert results["bytes-ckd-gather-forward"] == (world - 1) * (8 * distributed.SIGNATURE_SLOTS
                                                                  + 2 * block * CLASSES * 4)


def test_ring_sends_the_documented_bytes(group_results):
    """Ring CKD forward + backward, float32: the row counts and signatures, world - 1 blocks forward, world - 1 blocks and world
    gradient blocks backward, each block padded to the largest count (docs/distributed.md)."""
    world, results = group_results
    block = max(valid for _, valid in ROWS[world])
    assert results["bytes-ckd-ring-step"] == ((world - 1) * 8 * distributed.SIGNATURE_SLOTS
                                              + (3 * world - 2) * block * CLASSES * 4)


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_a_mismatched_rank_raises_the_same_error_on_every_rank(group_results, case):
    """Invariant: one rank calling with a different width, dtype, mode, anchor, hyperparameter or bias gets, on every
    rank, the same ValueError naming the argument and the ranks that differ, before any rows are sent; the process
    group keeps working afterwards (no crash, no hang)."""
    world, results = group_results
    result = results[f"mismatch-{case}"]
    messages = result["messages"]
    assert all(m == messages[0] for m in messages), messages
    assert messages[0] is not None and MISMATCHES[case] in messages[0], messages[0]
    others = "rank 0" if world == 2 else "ranks 0, 1"
    assert messages[0].endswith(f"on {others}; " + messages[0].split("; ")[-1]), messages[0]
    assert messages[0].split("; ")[-1].endswith(f"on rank {world - 1}"), messages[0]
    assert result["alive"]


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_a_rank_rejecting_its_arguments_stops_every_rank(group_results, case):
    """Invariant: a rank whose own argument checks fail raises its error (naming the argument), and the other ranks,
    already waiting in the call's first collective, raise a ValueError naming that rank instead of hanging until the
    process group's timeout; the group keeps working afterwards."""
    world, results = group_results
    result = results[f"rejected-{case}"]
    *others, odd = result["messages"]
    assert odd is not None and REJECTIONS[case] in odd, odd
    assert "rejected" not in odd, odd
    for message in others:
        assert message is not None and f"rank {world - 1} of the process group rejected its arguments" in message, \
            message
    assert result["alive"]


@pytest.mark.parametrize("mode", MODES)
def test_fused_linear_module_matches_its_function_with_a_group(group_results, mode):
    """Invariant: FusedLinearCKDLoss passes global_batch, group and mask through: bit for bit its function's number
    over a one-rank group each (which differs from the default group's and from the unmasked one, and equals the local
    loss) and over the default group (which differs from the local loss)."""
    world, results = group_results
    assert results[f"fused-linear-module-{mode}"] == [1.0] * 6


@pytest.mark.parametrize("loss", ("ckd_student", "ckd_teacher", "bickd_symmetric"))
def test_ring_with_one_anchor_row_per_strip(group_results, loss):
    """Invariant: the ring's anchor strips can cut anywhere (here one row each): the own-column exclusion follows the
    strip's offset, and the loss and gradients equal the single-process float64 reference."""
    world, results = group_results
    assert max(results[f"ring-strips-{loss}"].values()) <= 1e-10


@pytest.mark.parametrize("anchor", ("student", "teacher"))
def test_fused_linear_ring_with_one_anchor_row_per_strip(group_results, anchor):
    world, results = group_results
    assert results[f"ring-strips-fused-linear-{anchor}"] <= 1e-10
