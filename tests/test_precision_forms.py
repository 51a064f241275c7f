"""The factor formulation docs/math.md 8.3 chose for fused-linear CKD on tensor cores, as
`benchmarks/precision_forms.py` reproduces its arithmetic (the emulated backend's: 16-bit operands, fp32
accumulation; int8 products exact): the int8 Gram matrix is the float64 one, and the similarity logits and the
gradients are no worse than the materialised 16-bit route's, against float64, on the study's worst cases (a student
head of condition 1e4, hidden states leaning on its small singular directions, median cancellation ratio ~1350-2250;
and a rank-deficient Gram). Tolerances: the study's measured ratios with a factor ~2 of margin."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))
from benchmarks import precision_forms as forms  # noqa: E402

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


def test_int8_gram_refuses_a_vocabulary_past_int32():
    assert forms.INT32_EXACT_ROWS * 127 ** 2 < 2 ** 31 <= (forms.INT32_EXACT_ROWS + 1) * 127 ** 2
    with pytest.raises(ValueError, match="chunks"):
        forms.int8_gram(torch.zeros(forms.INT32_EXACT_ROWS + 1, 2, dtype=torch.bfloat16))


@pytest.mark.parametrize("shared", [False, True], ids=["heads", "shared-heads"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_factor_similarities_beat_materialised_16_bit(dtype, shared):
    _, errors = forms.case(dtype, 1e4, True, shared=shared)
    # measured: 14-16x (bf16), 1.7-2.8x (fp16) better than materialised 16-bit; the fp32 forms 200-1000x worse
    assert errors["factor, int8 Gram"] <= errors["materialised 16-bit"] / (4 if dtype == torch.bfloat16 else 1.2)
    assert errors["factor, f64 Gram"] == pytest.approx(errors["factor, int8 Gram"], rel=0.05)
    assert errors["fp32 forms"] > 50 * errors["materialised 16-bit"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_factor_gradients_match_the_logit_op(dtype):
    logit_hidden, logit_head, factor_hidden, factor_head = forms.gradient_case(dtype, 1e4, True)
    # measured: hidden 1.0x / 0.82x, head 0.45x / 0.16x of the logit op's error (bf16 / fp16)
    assert factor_hidden <= 1.25 * logit_hidden
    assert factor_head <= 0.8 * logit_head
