"""The strip plans (csrc/orchestration/plan.h): how one call cuts its work into GEMMs and kernel launches.

Two kinds of test. At small shapes, the plan's counts equal what a call issues: GEMMs counted by the GEMM policy
(`_C.gemm_calls`) on the CPU and emulated backends, kernel launches counted by the CUDA emulator
(`_emulated.launch_count`), across the plan's modes (whole coefficient matrix or strips / tiles; inputs as
operands or converted / masked copies; fp32 or 16-bit). At the GPU shapes, which cannot run here, the plan itself is
held to the GPU targets: a few hundred GEMMs and launches per call, every GEMM at least 512 x 512, work buffers
within the workspace.
"""
import math

import pytest
import torch

import ckd_ext
from ckd_ext import testing
from inputs import pair, random_mask

ext = ckd_ext.require_extension() if ckd_ext.is_available() else None
pytestmark = pytest.mark.skipif(ext is None, reason="ckd_ext is not built")

GiB = 1 << 30
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.float64: "float64"}


def assert_issues_the_plan(op, backend, plan):
    """One call of `op` (a forward computing loss and gradient) on `backend`, under the test's workspace, issues the
    plan's GEMMs and, under the emulator, its kernel launches."""
    emulated = backend.name == "emulated"
    gemms, launches = ext.gemm_calls(), testing.emulated_launch_count() if emulated else 0
    op()
    assert ext.gemm_calls() - gemms == plan["gemms"], plan
    if emulated:
        assert testing.emulated_launch_count() - launches == plan["launches"], plan


CASES = [  # (N, C, workspace): whole matrix at 64 KiB and 16 KiB (several operand blocks for fp32 copies), strips
    (40, 24, 64 << 10), (40, 24, 16 << 10), (40, 24, 4 << 10), (37, 20, 3 << 10)]


# Kernel launches are counted by the emulator; on a CUDA device the same orchestration issues the emulated plan's.
ON_CPU_AND_EMULATED = pytest.mark.parametrize("backend", ["cpu", "emulated"], indirect=True)


@ON_CPU_AND_EMULATED
@pytest.mark.parametrize("anchor", ["student", "teacher"])
@pytest.mark.parametrize("dtype,masked", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False),
                                          (torch.float16, True), (torch.float64, False)])
@pytest.mark.parametrize("n,c,budget", CASES)
def test_ckd_plan_counts_what_a_call_issues(backend, workspace, anchor, dtype, masked, n, c, budget):
    student, teacher = pair(n, c, seed=n + c, dtype=dtype)
    mask = random_mask((n,), seed=3) if masked else None
    plan = ext.strip_plan(f"ckd_{anchor}", n, c, DTYPE_NAMES[dtype], backend.name, budget, masked=masked)
    workspace(budget)

    assert_issues_the_plan(
        lambda: torch.ops.ckd_ext.ckd_forward(student, teacher, mask, 0.5, anchor, "mean", True), backend, plan)
    # The backward op writes a 16-bit gradient in its dtype (the forward keeps it in fp32): its own plan, which
    # recomputes where the matrix does not fit.
    backward_plan = ext.strip_plan(f"ckd_{anchor}", n, c, DTYPE_NAMES[dtype], backend.name, budget, masked=masked,
                                   backward=True)
    assert_issues_the_plan(
        lambda: torch.ops.ckd_ext.ckd_backward(torch.tensor(1.0), student.detach(), teacher, mask, 0.5, anchor,
                                               "mean"),
        backend, backward_plan)


# (N, C, workspace, sample side's operands, class side's operands) at N = 40, C = 24, where each side's fp32 operand
# matrix takes 3840 bytes: both matrices whole (64 KiB), the candidates whole beside strips (6 KiB), candidate blocks
# (3 KiB), and a mix (N = 40, C = 100, 38 KiB: both sample matrices, 16000 bytes each, fit beside one strip of all 40
# rows; beside them the class side would have strips of 17 columns, where with its candidates alone it has 40).
BICKD_CASES = [(40, 24, 64 << 10, "whole", "whole"), (40, 24, 6 << 10, "candidates", "candidates"),
               (40, 24, 3 << 10, "blocks", "blocks"), (40, 100, 38 << 10, "whole", "candidates")]


@ON_CPU_AND_EMULATED
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("want_grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,c,budget,sample,cls", BICKD_CASES)
def test_bickd_plan_counts_what_a_call_issues(backend, workspace, symmetric, want_grad, dtype, n, c, budget, sample,
                                              cls):
    """fp32 operand blocks (the modes named), and for a bf16 student on the emulated backend bf16 blocks on tensor
    cores (half the bytes: a mode the same or roomier)."""
    student, teacher = pair(n, c, seed=5, dtype=dtype)
    plan = ext.strip_plan("bickd", n, c, DTYPE_NAMES[dtype], backend.name, budget, want_grad=want_grad,
                          symmetric=symmetric)
    tensor_cores = backend.name == "emulated" and dtype == torch.bfloat16
    assert plan["tensor_cores"] == tensor_cores, plan
    if not tensor_cores:
        assert (plan["sample_operands"], plan["class_operands"]) == (sample, cls), plan
    assert plan["work_bytes"] <= budget, plan
    workspace(budget)

    assert_issues_the_plan(
        lambda: torch.ops.ckd_ext.bickd_forward(student, teacher, None, 4.0, 0.1, 1.0, 1.0, symmetric, "mean",
                                                want_grad),
        backend, plan)


# The GPU benchmark shapes (bf16 token batches) with the CUDA default workspace of an 80 GiB device (4 GiB) and the
# smallest default (1 GiB).
GPU_SHAPES = [(4096, 32000), (16384, 128256), (65536, 150000)]


@pytest.mark.parametrize("workspace", [4 * GiB, 1 * GiB])
@pytest.mark.parametrize("n,c", GPU_SHAPES)
@pytest.mark.parametrize("anchor", ["student", "teacher"])
def test_ckd_plan_at_gpu_shapes(anchor, n, c, workspace):
    plan = ext.strip_plan(f"ckd_{anchor}", n, c, "bfloat16", "cuda", workspace)
    assert plan["tensor_cores"]
    assert plan["gemms"] <= 300, plan
    assert plan["launches"] <= 500, plan
    assert plan["min_gemm_dim"] >= 512, plan
    if plan["whole"]:
        assert plan["transient_bytes"] <= workspace, plan


@pytest.mark.parametrize("workspace", [4 * GiB, 1 * GiB])
@pytest.mark.parametrize("anchor", ["student", "teacher"])
def test_ckd_plan_recomputes_at_the_largest_gpu_shape(anchor, workspace):
    """N = 65536: the 16 GiB matrix does not fit, and a bf16 gradient accumulated in fp32 would need a 39 GB N x C
    buffer. The plan recomputes the similarities per output block instead: every work buffer within the workspace,
    output blocks of thousands of rows (GEMMs with inner dimension N against the bf16 inputs themselves)."""
    plan = ext.strip_plan(f"ckd_{anchor}", 65536, 150000, "bfloat16", "cuda", workspace, backward=True)
    assert plan["recompute"] and not plan["whole"], plan
    assert plan["transient_bytes"] <= workspace, plan
    assert plan["gradient_block"] == 65536 and plan["output_block"] >= 1024, plan
    # The price: the similarities once more, 2 N^2 C on top of the first pass's (N^2 C for the symmetric student
    # tiles, 2 N^2 C for teacher strips) and the product's 2 N^2 C.
    n2c = 2.0 * 65536 ** 2 * 150000
    assert plan["gemm_flops"] <= (2.7 if anchor == "student" else 3.1) * n2c, plan


@pytest.mark.parametrize("n,c", [(4096, 32000), (16384, 128256)])
def test_whole_matrix_at_the_token_shapes(n, c):
    """At 16384 rows the 1 GiB coefficient matrix stays whole under the 4 GiB default: the gradient is a handful of
    GEMMs with inner dimension N, written through the normalisation backward into the bf16 gradient."""
    for anchor in ("student", "teacher"):
        plan = ext.strip_plan(f"ckd_{anchor}", n, c, "bfloat16", "cuda", 4 * GiB)
        assert plan["whole"], plan
        assert plan["operand_block"] == n  # the bf16 inputs are the operands: no conversion buffer


def test_cpu_plan_before_and_after_at_a_32k_vocabulary():
    """2048 x 32000 fp32 under 64 MiB keeps the whole 16 MiB matrix: a handful of GEMMs, none thinner than 1024.
    (Strips sized by `workspace / C` would issue 2080 GEMM calls for student anchors and 272 for teacher anchors
    at this shape.)"""
    for anchor in ("student", "teacher"):
        plan = ext.strip_plan(f"ckd_{anchor}", 2048, 32000, "float32", "cpu", 64 << 20)
        assert plan["whole"] and plan["gemms"] <= 4, plan
        assert plan["min_gemm_dim"] >= 1024, plan


BICKD_GPU_SHAPES = [(4096, 32000), (16384, 32000), (16384, 128256)]


FEW_HUNDRED = 350  # GEMMs per direction


def bickd_gemm_lower_bound(n, c, workspace, directions=1, operand_bytes=2):
    """The fewest GEMMs any BicKD plan with the gradient can issue within `workspace`: each side and direction
    computes every anchor-candidate similarity and multiplies every coefficient into an operand at least once, and
    a GEMM of an a x b block with inner dimension `depth` holds its built operands (bf16 on tensor cores) and its fp32
    output, operand_bytes (a + b) depth + 4 a b bytes, within the workspace (a = b maximises the block)."""
    total = 0
    for count, depth in ((n, c), (c, n)):  # the sample side (rows of depth C), the class side (columns of depth N)
        d = operand_bytes * depth
        a = int((-d + math.sqrt(d ** 2 + 4 * workspace)) / 4)
        a = min(a, count)
        total += 2 * directions * math.ceil(count / a) ** 2
    return total


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("workspace", [4 * GiB, 1 * GiB])
@pytest.mark.parametrize("n,c", BICKD_GPU_SHAPES)
def test_bickd_plan_at_gpu_shapes(n, c, workspace, symmetric):
    """A few hundred GEMMs at most, none thinner than 512, work buffers within the workspace (the N x C fp32
    accumulators dp and dpbar are outside it, like the gradient). The one exception is 16384 x 128256 with a 1 GiB
    workspace, where no plan can stay within a few hundred (test_bickd_plan_at_one_gib_on_the_largest_shape)."""
    plan = ext.strip_plan("bickd", n, c, "bfloat16", "cuda", workspace, symmetric=symmetric)
    assert plan["min_gemm_dim"] >= 512, plan
    assert plan["work_bytes"] <= workspace, plan
    if (n, c, workspace) != (16384, 128256, 1 * GiB):
        assert plan["gemms"] <= FEW_HUNDRED * (2 if symmetric else 1), plan


@pytest.mark.parametrize("symmetric", [False, True])
def test_bickd_plan_at_one_gib_on_the_largest_shape(symmetric):
    """16384 x 128256 under a 1 GiB workspace, which only a user's setting gives this call: the device default is
    an eighth of the free memory at the first call, and the call's own buffers (the fp32 gradient, dp and dpbar,
    25 GB) need more than 8 GiB free. There the class side's operands are bf16 columns of depth 16384 (32 KiB
    each), so no plan computing the gradient can issue fewer than ~470 GEMMs (bickd_gemm_lower_bound); the plan
    issues ~2250, its strips keeping their 128256-wide fp32 similarity rows. An online-softmax walk of the class
    side (no strip rows kept, a recompute for the gradient) would come closer; not done (docs/cuda.md)."""
    directions = 2 if symmetric else 1
    bound = bickd_gemm_lower_bound(16384, 128256, 1 * GiB, directions)
    assert bound > FEW_HUNDRED * directions
    plan = ext.strip_plan("bickd", 16384, 128256, "bfloat16", "cuda", 1 * GiB, symmetric=symmetric)
    assert plan["gemms"] <= 5 * bound, (plan, bound)
    assert ext.cuda_workspace_from_free_memory(25 << 30) > 3 * GiB  # the least free memory the call could run in


def test_bickd_plan_before_and_after_at_the_largest_gpu_shape():
    """16384 x 128256 under 4 GiB issues a few hundred GEMMs at most. (Strips sized by `workspace / C`, with the
    class side's candidate blocks rebuilt for every strip and pass, would issue 624.)"""
    plan = ext.strip_plan("bickd", 16384, 128256, "bfloat16", "cuda", 4 * GiB)
    assert plan["gemms"] <= FEW_HUNDRED, plan


def test_bickd_cpu_plan_at_a_32k_vocabulary():
    """1024 x 32000 fp32 (the scale-classes-32k benchmark): under the shape-sized CPU default both sides keep their
    candidates whole, so each operand is built once per call (4 N x C matrices), where the 64 MiB default rebuilt the
    class side's candidates for each of its 123 strips, twice."""
    n, c = 1024, 32000
    workspace = ext.bickd_cpu_workspace(n, c)
    assert workspace == (64 << 20) + n * c * 4
    plan = ext.strip_plan("bickd", n, c, "float32", "cpu", workspace)
    assert plan["sample_operands"] == plan["class_operands"] == "candidates", plan
    assert plan["built_elements"] == 4 * n * c, plan
    assert plan["work_bytes"] <= workspace, plan
    before = ext.strip_plan("bickd", n, c, "float32", "cpu", 64 << 20)
    assert before["built_elements"] > 50 * n * c, before


def test_bickd_cpu_workspace_is_capped():
    assert ext.bickd_cpu_workspace(64, 100) == (64 << 20) + 64 * 100 * 4
    assert ext.bickd_cpu_workspace(16384, 128256) == 1 * GiB
