"""The strips of fused-linear CKD on tensor cores (docs/math.md 8.3), as `benchmarks/precision_forms.py` measures
them: the package's tensor-core operands (ckd_ext.fused_linear.ckd._strip_operands) give similarity logits more
accurate than materialised 16-bit logits, against float64, on the study's worst cases (a student head of condition
1e4, hidden states leaning on its small singular directions, median cancellation ratio ~1350-2250; and a
rank-deficient Gram matrix), and fused_linear_ckd_loss on the emulated backend is as accurate as on the CPU backend;
the int8 Gram matrix is the float64 one. Tolerances: the study's measured ratios with
a factor ~2 of margin."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))
from benchmarks import precision_forms as forms  # noqa: E402
from switches import skip_unless  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_gram_is_the_float64_gram(dtype):
    hs, ws, ht, wt, _ = forms.inputs(dtype, 1e4, True)
    b = torch.cat([ws, wt], 1)
    exact = b.double().T @ b.double()
    gram, gemms = forms.int8_gram(b)
    assert gemms == 15
    # five 7-bit slices hold 35 bits below each column's power-of-two scale: a bf16 (8-bit) entry down to 2^-27 of
    # its column's largest is exact, smaller ones are cut below 2^-35 of it
    assert (gram - exact).abs().max() <= 1e-11 * exact.abs().max()


@pytest.mark.parametrize("shared", [False, True], ids=["heads", "shared-heads"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensor_core_strip_logits_beat_materialised_16_bit(dtype, shared):
    _, errors = forms.case(dtype, 1e4, True, shared=shared)
    # measured: 22x (bf16), 5.9x (fp16) better than materialised 16-bit; the fp32 forms 200-1000x worse
    assert errors["TC strips"] <= errors["materialised 16-bit"] / (8 if dtype == torch.bfloat16 else 3)
    assert errors["TC strips, int8 G"] == pytest.approx(errors["TC strips"], rel=0.05)
    assert errors["fp32 forms"] > 50 * errors["materialised 16-bit"]


@skip_unless("emulated")
@pytest.mark.parametrize("anchor", ["student", "teacher"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensor_core_loss_and_gradients_match_the_cpu_backend(dtype, anchor):
    tensor_cores, cpu, materialised = forms.gradient_case(dtype, 1e4, True, anchor)
    # measured: the loss 1.1e-7 / 1.9e-8 (bf16, student / teacher anchor), 9.7e-8 / 9.0e-8 (fp16), 1-2x the CPU
    # backend's; the gradients within 1.12x of the CPU backend's and at most the materialised route's
    assert tensor_cores[0] <= max(2.5 * cpu[0], 1e-7)
    for got, base, logit_route in zip(tensor_cores[1:], cpu[1:], materialised[1:]):
        assert got <= 1.25 * base
        assert got <= 1.1 * logit_route
