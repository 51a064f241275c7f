"""Input layouts and execution conditions the other suites do not cover, on the CPU kernels: non-contiguous
(transposed, sliced, offset, stride-0 expanded) students, teachers and masks against the float64 oracle; repeated
calls, 1 vs 2 intra-op threads and concurrent Python threads bitwise identical to a plain sequential run.

Already covered elsewhere (not repeated here): (B, L, C) inputs with (B, L) masks (tests/test_ops.py
test_masks_and_reductions, test_modules.py), a teacher of another dtype than the student (test_ops.py
test_teacher_of_another_dtype)."""
import threading

import pytest
import torch

import ckd_ext
from ckd_ext import reference as ref
from inputs import CONFIGS, logits, random_mask, weighted_total
from tolerances import assert_matches, tolerance

ALL = list(CONFIGS)
N, C = 12, 30


def views(layout, dtype):
    """(s_leaf, student, teacher, mask): `student` a view of the contiguous leaf `s_leaf` (the tensor the gradient is
    taken with respect to), `teacher` and `mask` possibly views too. Values are float64 draws rounded to float32 (then
    to `dtype`), so the oracle, run on float64 copies, sees exactly the fused op's inputs."""

    def leaf(*shape, seed):
        return logits(*shape, seed=seed, dtype=torch.float32).to(dtype)

    mask = None
    if layout == "transposed":  # (N, C) with strides (1, N)
        s_leaf, teacher = leaf(C, N, seed=1), leaf(C, N, seed=2).t()
        student = s_leaf.t()
    elif layout == "column_slice":  # every other column: last-dimension stride 2
        s_leaf, teacher = leaf(N, 2 * C, seed=3), leaf(N, 2 * C, seed=4)[:, 1::2]
        student = s_leaf[:, ::2]
    elif layout == "row_slice_offset":  # every other row from row 1: storage offset, row stride 2C
        s_leaf, teacher = leaf(2 * N + 1, C, seed=5), leaf(2 * N, C, seed=6)[::2]
        student = s_leaf[1::2]
    elif layout == "narrow_offset":  # contiguous rows at a storage offset of 3 rows + 1 element (unaligned)
        s_leaf, teacher = leaf(N * C + 3 * C + 1, seed=7), leaf(N + 2, C, seed=8)[2:]
        student = s_leaf[3 * C + 1:].view(N, C)
    elif layout == "expanded_student":  # (3, 4, C), stride 0 over the batch: rows repeat, gradients accumulate
        s_leaf, teacher = leaf(1, 4, C, seed=9), leaf(3, 4, C, seed=10)
        student = s_leaf.expand(3, 4, C)
    elif layout == "expanded_teacher":  # (3, 4, C) teacher with stride 0 over the batch (4 distinct rows, repeated)
        s_leaf = leaf(3, 4, C, seed=11)
        student = s_leaf[:, :]
        teacher = leaf(1, 4, C, seed=12).expand(3, 4, C)
    elif layout == "permuted_3d_mask":  # (B, L, C) from (L, B, C), with a transposed (B, L) mask
        s_leaf, teacher = leaf(4, 3, C, seed=14), leaf(4, 3, C, seed=15).transpose(0, 1)
        student = s_leaf.transpose(0, 1)
        mask = random_mask((4, 3), seed=14).t()
        assert not mask.is_contiguous()
    else:
        raise AssertionError(layout)
    assert not all(x.is_contiguous() and x.storage_offset() == 0 for x in (student, teacher)), layout
    return s_leaf, student, teacher, mask


LAYOUTS = ["transposed", "column_slice", "row_slice_offset", "narrow_offset", "expanded_student",
           "expanded_teacher", "permuted_3d_mask"]


def run(module, config, leaf, make_student, teacher, **extra):
    """(detached output, d weighted_total / d leaf), the student built from the leaf by `make_student`."""
    name, kwargs = CONFIGS[config]
    leaf = leaf.detach().requires_grad_()
    out = getattr(module, f"{name}_loss")(make_student(leaf), teacher, **kwargs, **extra)
    (grad,) = torch.autograd.grad(weighted_total(out), leaf)
    return (tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()), grad


def bitwise(a, b):
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_against_oracle(config, layout):
    # "none": per-anchor upstream weights, and the (...) output shape of the view. (The layout is dealt with before
    # the reduction matters: the op reads a contiguous (N, C) copy of what it is given.)
    reduction = "none"
    dtype = torch.float32
    s_leaf, student, teacher, mask = views(layout, dtype)
    # The same view of the leaf, re-applied by autograd: as_strided with the view's geometry.
    size, stride, offset = student.shape, student.stride(), student.storage_offset()

    def make(x):
        return x.as_strided(size, stride, offset)

    out, grad = run(ckd_ext, config, s_leaf, make, teacher, mask=mask, reduction=reduction)
    t64 = teacher.double()  # same values (a contiguous copy is fine for the oracle)
    out64, grad64 = run(ref, config, s_leaf.double(), make, t64, mask=mask, reduction=reduction)
    assert_matches(out, out64, dtype, f"{layout} {config} loss", tolerance(dtype))
    assert_matches(grad, grad64, dtype, f"{layout} {config} grad", tolerance(dtype))
    # And bitwise what the op gives on a contiguous copy of the same values: the layout changes nothing.
    dense = student.detach().contiguous().requires_grad_()
    dense_out, dense_grad = run(ckd_ext, config, dense, lambda x: x, teacher.contiguous(),
                                mask=None if mask is None else mask.contiguous(), reduction=reduction)
    assert bitwise(out, dense_out), f"{layout} {config}: loss differs from the contiguous copy's"
    # The leaf's gradient is the view's gradient in place (0 elsewhere), summed over the repeats of a stride-0 view.
    if layout == "expanded_student":
        torch.testing.assert_close(grad, dense_grad.sum(0, keepdim=True), rtol=1e-6, atol=1e-9)
    else:
        assert torch.equal(make(grad), dense_grad)
        outside = torch.ones_like(grad, dtype=torch.bool)
        outside.as_strided(size, stride, offset).fill_(False)
        assert torch.equal(grad[outside], torch.zeros_like(grad[outside]))


# --- determinism: repeated calls, intra-op threads, concurrent Python threads ---------------------------------
# (200, 128): the CPU row loops split rows in grains of 16384 / C = 128 rows (csrc/backends/cpu/cpu_backend.cpp
# row_grain), so 200 rows run on both threads. With a 64 KiB workspace the work is chunked: student-anchor tiles of
# min(90, 8192 / 512) = 16 rows (200 = 12 x 16 + 8), strips of min(32768 / 800, 16384 / 512) = 32 rows (6 x 32 + 8),
# class strips of 16384 / 800 = 20 columns (128 = 6 x 20 + 8).
BIG = (200, 128)


BUDGETS = pytest.mark.parametrize("budget", [None, 64 * 1024], ids=["default_workspace", "64KiB"])


def fused(config, seed, reduction, shape=BIG, mask=True):
    """(output, gradient) of the fused op on seeded float32 inputs, with a mask by default."""
    s = logits(*shape, seed=seed, dtype=torch.float32)
    t = logits(*shape, seed=seed + 500, dtype=torch.float32)
    m = random_mask(shape[0], seed=seed) if mask else None
    return run(ckd_ext, config, s, lambda x: x, t, mask=m, reduction=reduction)


def oracle(config, seed, reduction, shape=BIG, mask=True):
    s = logits(*shape, seed=seed, dtype=torch.float32).double()
    t = logits(*shape, seed=seed + 500, dtype=torch.float32).double()
    m = random_mask(shape[0], seed=seed) if mask else None
    return run(ref, config, s, lambda x: x, t, mask=m, reduction=reduction)


def assert_oracle(result, expected, what):
    assert_matches(result[0], expected[0], torch.float32, f"{what} loss", tolerance(torch.float32))
    assert_matches(result[1], expected[1], torch.float32, f"{what} grad", tolerance(torch.float32))


@pytest.mark.parametrize("config,reduction", [(config, ("mean", "none")[i % 2]) for i, config in enumerate(ALL)])
@BUDGETS
def test_repeated_calls_and_1_vs_2_threads_are_bitwise_identical(workspace, budget, config, reduction):
    """"mean" (gradient computed in the forward) for half the configurations, "none" (recomputed in backward with
    per-anchor weights) for the other half."""
    workspace(budget)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        runs = [fused(config, 50, reduction) for _ in range(3)]
        torch.set_num_threads(1)
        single = fused(config, 50, reduction)
    finally:
        torch.set_num_threads(threads)
    for i, (out, grad) in enumerate(runs[1:]):
        assert bitwise(out, runs[0][0]) and torch.equal(grad, runs[0][1]), f"repeat {i + 1} differs"
    assert bitwise(single[0], runs[0][0]), "loss differs between 1 and 2 threads"
    assert torch.equal(single[1], runs[0][1]), "gradient differs between 1 and 2 threads"
    assert_oracle(runs[0], oracle(config, 50, reduction), config)


@pytest.mark.parametrize("config", [
    # The whole 40 x 40 matrix fits 16 KiB: one 40-row tile (csrc/orchestration/plan.h), no thin GEMM, bitwise.
    "ckd_student",
    # BicKD's sample strips are 10 rows here (rows_within(B / 4, C)): MKL's sgemm (through at::mm / addmm_) may sum
    # such thin products in another order with 2 threads than with 1, depending on the kernel it picks for the CPU
    # (on one machine torch.mm of (5, 5) x (5, 96) float32 differed, on another it does not). Our own kernels are
    # bitwise; the GEMM's order can only move results by a few float32 roundings of the largest term.
    "bickd",
])
def test_1_vs_2_threads_with_thin_tiles(config, workspace):
    threads = torch.get_num_threads()
    workspace(16 * 1024)
    try:
        torch.set_num_threads(2)
        two = fused(config, 52, "mean", shape=(40, 96), mask=False)
        torch.set_num_threads(1)
        one = fused(config, 52, "mean", shape=(40, 96), mask=False)
    finally:
        torch.set_num_threads(threads)
    assert_oracle(one, oracle(config, 52, "mean", shape=(40, 96), mask=False), config)
    assert_oracle(two, oracle(config, 52, "mean", shape=(40, 96), mask=False), config)
    if config == "bickd":
        # ~1e-7 relative was seen where the order differs; 8 float32 ulps of the largest entry bound it.
        for a, b in ((one[0], two[0]), (one[1], two[1])):
            assert (a - b).abs().max() <= 8 * 2.0 ** -24 * a.abs().max(), "1 vs 2 threads beyond the GEMM's order"
        return
    assert bitwise(one[0], two[0]), "loss differs between 1 and 2 threads"
    assert torch.equal(one[1], two[1]), "gradient differs between 1 and 2 threads"


@BUDGETS
def test_concurrent_python_threads_equal_sequential(workspace, budget):
    """4 Python threads, each computing every configuration on its own inputs (2 rounds), give bitwise what one
    thread computes sequentially: no work buffer or statistic is shared between concurrent calls."""
    workspace(budget)
    seeds = (60, 61, 62, 63)
    jobs = [(config, seed, ("mean", "none")[(i + seed) % 2]) for seed in seeds for i, config in enumerate(ALL)]
    sequential = {job: fused(*job) for job in jobs}
    results, errors = {}, []
    barrier = threading.Barrier(len(seeds))

    def worker(seed):
        try:
            barrier.wait()
            for round_ in range(2):
                for job in jobs:
                    if job[1] == seed:
                        results[(job, round_)] = fused(*job)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    pool = [threading.Thread(target=worker, args=(seed,)) for seed in seeds]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors
    assert len(results) == 2 * len(jobs)
    for (job, round_), (out, grad) in results.items():
        assert bitwise(out, sequential[job][0]) and torch.equal(grad, sequential[job][1]), f"{job} round {round_}"
    for job in jobs[:len(ALL)]:  # one seed's results against the oracle, to keep this short
        assert_oracle(sequential[job], oracle(*job), str(job))
