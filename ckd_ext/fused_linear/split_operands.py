"""Products on tensor cores more precise than their operands' 16 bits (docs/math.md 8.3, where
benchmarks/precision_forms.py measures them): float32 / float64 values as 16-bit parts whose sum is the value to
about 2^-8 per part, and 16-bit values as int8 slices whose products are exact. Every part product is one of the GEMM
policy's (csrc/orchestration/gemm.h), so it is counted and the emulated backend reproduces it; backends that convert
16-bit operands (the CPU's) never get here."""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

# float16 parts: each row scaled by the power of two that puts its largest entry in [2^13, 2^14), far from both
# ends of float16's range, so that a part's entries keep their 11 bits.
_FLOAT16_TOP = 14
_FLOAT32_TOP = 126


class SplitRows(NamedTuple):
    """Rows whose value is sum_p parts[p] / scales[p] (a scale per row, None for 1)."""

    parts: Tuple[Tensor, ...]
    scales: Tuple[Optional[Tensor], ...]

    def rows(self, start: int, stop: int) -> "SplitRows":
        return SplitRows(tuple(p[start:stop] for p in self.parts),
                         tuple(None if s is None else s[start:stop] for s in self.scales))


def as_they_are(rows: Tensor, scale: Optional[Tensor] = None) -> SplitRows:
    """16-bit rows taken as they are (their value divided by `scale`, per row, where given)."""
    return SplitRows((rows,), (scale,))


def split(values: Tensor, dtype: torch.dtype, parts: int) -> SplitRows:
    """`values` (float32 or float64) as `parts` parts in the 16-bit `dtype`, each the rounding of what the previous
    ones leave (`parts` 2: ~2^-16 of each entry in bfloat16, 3: ~2^-24); float16 parts scaled per row."""
    rest = values.double()
    out, scales = [], []
    for _ in range(parts):
        if dtype == torch.float16:
            largest = rest.abs().amax(dim=1, keepdim=True) if rest.shape[1] else rest.new_zeros(rest.shape[0], 1)
            _, exponent = torch.frexp(largest)
            # capped where a row's remainder is below float32's range: that part is then 0
            scale = torch.ldexp(torch.ones_like(largest), (_FLOAT16_TOP - exponent).clamp_max(_FLOAT32_TOP))
            part = (rest * scale).to(dtype)
            rest = rest - part.double() / scale
            scales.append(scale.squeeze(1).float())
        else:
            part = rest.to(dtype)
            rest = rest - part.double()
            scales.append(None)
        out.append(part)
    return SplitRows(tuple(out), tuple(scales))


def similarity(a: SplitRows, b: SplitRows) -> Tensor:
    """a @ b^T (fp32): the part products with i + j below the larger part count (hi hi, hi lo, lo hi, ...), each
    the GEMM policy's similarity product, summed in fp32."""
    terms = max(len(a.parts), len(b.parts))
    out = None
    for i, (x, x_scale) in enumerate(zip(a.parts, a.scales)):
        for j, (y, y_scale) in enumerate(zip(b.parts, b.scales)):
            if i + j >= terms:
                continue
            term = torch.ops.ckd_ext.gemm_similarity(x, y)
            if x_scale is not None:
                term.div_(x_scale.unsqueeze(1))
            if y_scale is not None:
                term.div_(y_scale.unsqueeze(0))
            out = term if out is None else out.add_(term)
    return out


def product(out: Tensor, coefficients: Tensor, rows: SplitRows, accumulate: bool) -> None:
    """out [+]= coefficients @ rows (fp32), one GEMM policy coefficient product per part (the coefficients rounded
    to the parts' 16-bit dtype, as every coefficient product on tensor cores), a part's row scales folded into the
    coefficients' columns (powers of two: exact)."""
    for index, (part, scale) in enumerate(zip(rows.parts, rows.scales)):
        coef = coefficients if scale is None else coefficients / scale.unsqueeze(0)
        torch.ops.ckd_ext.gemm_product(out, coef, part, accumulate or index > 0)


# Exact Gram matrices of 16-bit heads on int8 tensor cores (docs/math.md 8.3): each column scaled by the power of two
# that brings its largest entry below 1, cut into INT8_SLICES slices of 7 bits (|slice| <= 127), and the products of
# the slices a, b with a + b <= INT8_ORDER: 15 exact int8 GEMMs, the dropped ones and the bits past the fifth slice
# below 2^-35 of each column's largest entry.
INT8_SLICES, INT8_ORDER = 5, 4


def int8_exponents(column_max: Tensor) -> Tensor:
    """e_k with |B_vk| < 2^e_k for the largest |entry| of each column (0 for a zero column), int32."""
    return torch.frexp(column_max)[1]


def int8_slices(chunk: Tensor, exponents: Tensor) -> List[Tensor]:
    """The int8 slices I_a of chunk 2^-e (per column): chunk 2^-e = sum_a I_a 2^(-7(a+1)) + (below 2^-35). 16-bit
    entries have at most 11 significant bits, so every remainder is exact in float32."""
    rest = torch.ldexp(chunk.float(), -exponents.to(chunk.device))
    out = []
    for _ in range(INT8_SLICES):
        rest = rest * 128
        piece = torch.trunc(rest)
        out.append(piece.to(torch.int8))
        rest = rest - piece
    return out


def exact_gram_block(left: List[Tensor], right: List[Tensor]) -> Tensor:
    """sum over a + b <= INT8_ORDER of 2^(-7(a+b+2)) left[a]^T right[b] (chunk rows x columns slices), float64: each
    product one gemm_exact_int8 of the GEMM policy."""
    out = None
    for i, x in enumerate(left):
        for j, y in enumerate(right):
            if i + j <= INT8_ORDER:
                term = torch.ops.ckd_ext.gemm_exact_int8(x.T, y.T).mul_(2.0 ** (-7 * (i + j + 2)))
                out = term if out is None else out.add_(term)
    return out
