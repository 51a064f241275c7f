"""Chunked execution with partial last strips, tiles and blocks, against the float64 oracle: every configuration,
on the CPU kernels in float32 and float64 and on the CUDA kernels (emulated; on a CUDA device where one exists).

The sizes come from the strip plans (csrc/orchestration/plan.h, `_C.strip_plan`), which cut N rows into balanced
blocks (sizes differing by at most one). With a budget B, CKD keeps the whole N x N matrix when N^2 * sizeof(acc)
<= B / 2 (the gradient then by output blocks); otherwise teacher anchors walk strips of rows_within(B / 2, N) rows
and student anchors tiles of sqrt(B / 2 / sizeof(acc)) rows (on the CPU at most max(1024, N / 8)), both capped by the operand blocks when the inputs are
converted or masked (rows_within(B / 4 or B / 8, C * operand bytes)). BicKD walks each side (rows, columns) by the
cheapest of three operand modes within B: both normalised operand matrices whole, the candidates whole beside strips
of anchors, or candidate blocks rebuilt per strip (plan.h, BicKDOperands). The tests below assert the plan's sizes for their shapes, so a change to the plans cannot silently stop covering a case.
KD works row by row and has no chunks (it is here because every configuration is).
"""
import pytest
import torch

import ckd_ext
from inputs import CONFIGS, pair, random_mask
from switches import on_backend, skip_unless
from tolerances import check_against_oracle

ALL = list(CONFIGS)


def plan(loss, n, c, dtype, backend, workspace, masked=False, backward=False):
    name = str(dtype).removeprefix("torch.")
    return ckd_ext.require_extension().strip_plan(loss, n, c, name, backend, workspace, masked=masked,
                                                  backward=backward)


def test_the_cpu_budget_splits_every_kind_of_chunk():
    """16 KiB, C = 32: strips, tiles and blocks all end in a partial one (N = 151 masked, N = 152 not)."""
    for n, masked in ((151, True), (152, False)):
        for dtype in (torch.float32, torch.float64):
            for anchor in ("student", "teacher"):
                p = plan(f"ckd_{anchor}", n, 32, dtype, "cpu", 16 << 10, masked)
                assert not p["whole"] and p["strip"] < n and n % p["strip"] != 0 or n == 152, p
                if masked:
                    assert p["operand_block"] < n, p
            p = plan("bickd", n, 32, dtype, "cpu", 16 << 10)
            assert p["sample_strip"] < n and p["sample_block"] < n and p["class_strip"] < 32, p


@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("n", [151, 152])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpu_partial_strips_and_tiles(config, n, dtype, reduction, workspace):
    """16 KiB: partial last strips, tiles and blocks (module docstring). "mean" computes the gradient in the
    forward, "none" recomputes it in backward with per-anchor weights. N = 151 is masked (masked candidates are
    copied block by block, and masked rows sit inside partial tiles), N = 152 is not (candidates are views)."""
    student, teacher = pair(n, 32, seed=n)
    mask = random_mask(n, seed=n) if n == 151 else None
    workspace(16 * 1024)
    check_against_oracle(config, student, teacher, dtype=dtype, mask=mask, reduction=reduction)


@skip_unless("emulated")
@pytest.mark.parametrize("config", ALL)
def test_emulated_partial_strips_and_tiles(config, workspace):
    """4 KiB at N = 42: partial last strips, tiles and blocks in the CUDA kernels (module docstring). Masked, with
    per-anchor weights ("none"): the backward recomputes every strip with them."""
    student, teacher = pair(42, 32, seed=42)
    mask = random_mask(42, seed=42)
    workspace(4 * 1024)
    with on_backend("emulated"):
        check_against_oracle(config, student, teacher, dtype=torch.float32, mask=mask, reduction="none")


# BicKD's operand modes (test_strip_plans.BICKD_CASES): (N, C, workspace, sample side's, class side's).
BICKD_MODES = [(40, 24, 64 << 10, "whole", "whole"), (40, 24, 6 << 10, "candidates", "candidates"),
               (40, 24, 3 << 10, "blocks", "blocks"), (40, 100, 38 << 10, "whole", "candidates")]


@pytest.mark.parametrize("config", ["bickd", "bickd_symmetric"])
@pytest.mark.parametrize("n,c,budget,sample,cls", BICKD_MODES)
def test_bickd_operand_modes(backend, workspace, config, n, c, budget, sample, cls):
    """Each of BicKD's operand modes on both sides, masked, with per-anchor weights ("none", recomputed in backward)
    and with the gradient in the forward ("mean")."""
    p = plan("bickd", n, c, torch.float32, backend.name, budget)
    assert (p["sample_operands"], p["class_operands"]) == (sample, cls), p
    student, teacher = pair(n, c, seed=n + c)
    mask = random_mask(n, seed=7)
    workspace(budget)
    for reduction in ("none", "mean"):
        check_against_oracle(config, student.to(backend.device), teacher.to(backend.device), dtype=torch.float32,
                             mask=mask.to(backend.device), reduction=reduction)


WHOLE_BUDGET = 13 << 10  # N = 40, C = 24: the 6400-byte matrix is whole, the output and operand blocks are not


@pytest.mark.parametrize("anchor", ["student", "teacher"])
@pytest.mark.parametrize("dtype,masked", [(torch.bfloat16, False), (torch.float16, True), (torch.float32, True)])
@pytest.mark.parametrize("forward_gradient", [True, False])
def test_whole_matrix_by_output_blocks(anchor, backend, workspace, forward_gradient_bytes, dtype, masked,
                                       forward_gradient):
    """The whole-matrix gradient in output blocks and several operand blocks (converted or masked copies), on both
    backends: on the emulated one the 16-bit GEMMs take the inputs as operands and the coefficients rounded to their
    dtype (orchestration/gemm.h). A 16-bit gradient computed in the forward is kept in acc and written in place;
    recomputed by the backward op (forward_gradient_bytes 0) it is not in acc, so it gets output buffers of several
    blocks."""
    n, c = 40, 24
    recomputed = dtype != torch.float32 and not forward_gradient
    p = plan(f"ckd_{anchor}", n, c, dtype, backend.name, WHOLE_BUDGET, masked, backward=recomputed)
    assert p["whole"], p
    assert (p["output_block"] < n) == recomputed, p
    if backend.name == "cpu" or masked:
        assert p["operand_block"] < n, p
    student, teacher = pair(n, c, seed=11)
    mask = random_mask(n, seed=4).to(backend.device) if masked else None
    workspace(WHOLE_BUDGET)
    forward_gradient_bytes(None if forward_gradient else 0)
    check_against_oracle(f"ckd_{anchor}", student.to(backend.device), teacher.to(backend.device), dtype=dtype,
                         mask=mask)


RECOMPUTE_BUDGET = 6 << 10  # N = 40, C = 24: the 6400-byte matrix is not whole; several output and operand blocks


@pytest.mark.parametrize("anchor", ["student", "teacher"])
@pytest.mark.parametrize("dtype,masked,reduction", [(torch.bfloat16, False, "mean"), (torch.float16, True, "mean"),
                                                    (torch.bfloat16, True, "none")])
def test_recomputed_gradient_by_output_blocks(anchor, backend, workspace, forward_gradient_bytes, dtype, masked,
                                              reduction):
    """16-bit inputs whose N x N matrix does not fit, their gradient recomputed by the backward op (forward_gradient_
    bytes 0, or "none"): the first pass keeps each row's log-sum-exp and the gradient is computed by output blocks,
    their similarities recomputed against every operand block (the plan's "recompute" mode, orchestration/plan.h),
    with no fp32 N x C buffer. "none" recomputes it in backward with per-anchor weights. The tolerance is the
    suite's (tolerances.tolerance): recomputing a similarity rounds it as the first pass did, so the error model is
    that of the other modes."""
    n, c = 40, 24
    p = plan(f"ckd_{anchor}", n, c, dtype, backend.name, RECOMPUTE_BUDGET, masked, backward=True)
    assert p["recompute"] and not p["whole"], p
    assert p["output_block"] < n, p
    assert p["transient_bytes"] <= RECOMPUTE_BUDGET, p
    if backend.name == "cpu" or masked:
        assert p["gradient_block"] < n, p
    student, teacher = pair(n, c, seed=13)
    mask = random_mask(n, seed=5).to(backend.device) if masked else None
    workspace(RECOMPUTE_BUDGET)
    forward_gradient_bytes(0)
    check_against_oracle(f"ckd_{anchor}", student.to(backend.device), teacher.to(backend.device), dtype=dtype,
                         mask=mask, reduction=reduction)


@pytest.mark.parametrize("anchor", ["student", "teacher"])
@pytest.mark.parametrize("dtype,masked", [(torch.bfloat16, False), (torch.float16, True)])
def test_forward_gradient_accumulates_in_fp32(anchor, backend, workspace, dtype, masked):
    """The same 16-bit inputs with the gradient computed in the forward (the default): kept in fp32, the strips'
    or tiles' products accumulate into it (the plan's "accumulate" mode, no recompute), rounded once in backward."""
    n, c = 40, 24
    p = plan(f"ckd_{anchor}", n, c, dtype, backend.name, RECOMPUTE_BUDGET, masked)
    assert not p["recompute"] and not p["whole"], p
    assert p["transient_bytes"] <= RECOMPUTE_BUDGET, p
    student, teacher = pair(n, c, seed=17)
    mask = random_mask(n, seed=6).to(backend.device) if masked else None
    workspace(RECOMPUTE_BUDGET)
    check_against_oracle(f"ckd_{anchor}", student.to(backend.device), teacher.to(backend.device), dtype=dtype,
                         mask=mask)


def test_workspace_none_returns_to_the_device_defaults(workspace):
    ext = ckd_ext.require_extension()
    workspace(4096)
    assert ckd_ext.workspace_bytes() == ckd_ext.workspace_bytes("cpu") == 4096
    ckd_ext.set_workspace_bytes(None)
    assert ext.workspace_setting() == 0
    assert ckd_ext.workspace_bytes() == 64 << 20
    # CUDA's default from free memory: an eighth, clamped to [1 GiB, 4 GiB].
    assert ext.cuda_workspace_from_free_memory(80 << 30) == 4 << 30
    assert ext.cuda_workspace_from_free_memory(16 << 30) == 2 << 30
    assert ext.cuda_workspace_from_free_memory(2 << 30) == 1 << 30
