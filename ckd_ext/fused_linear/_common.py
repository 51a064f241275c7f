"""What both fused-linear losses share: the work-buffer budget their chunks and strips are sized by, the GEMM
policy's operand rule, and the autocast rules (inputs cast as F.linear would take them, the losses' own products outside autocast)."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from .. import _validation
from .._compile import assume_constant_result
from .._extension import require_extension
from ..rows import accumulation_dtype
from ..settings import workspace_bytes


@assume_constant_result
def _workspace_bytes(device: str) -> int:
    # A constant for torch.compile (which cannot trace the pybind11 call): a graph is specialised to the budget.
    return workspace_bytes(device)


@assume_constant_result
def _gemm_converts(dtype: torch.dtype, device: str) -> bool:
    # A constant for torch.compile too (the emulated backend's switch is read when the graph is traced).
    return require_extension().gemm_converts(torch.empty(0, dtype=dtype, device=device))


def _gemm_operand(x: Tensor) -> Tensor:
    """`x` as the GEMM policy's products take it (csrc/orchestration/gemm.h): as it is where the backend multiplies
    its dtype (16-bit on tensor cores, fp32, fp64), else in the accumulation dtype. The losses pass each head through
    this once per call, so that a backend converting 16-bit heads (the CPU's) converts them once, not in every chunk's
    product, and one multiplying them (CUDA) never converts a whole head."""
    return x.to(accumulation_dtype(x.dtype)) if _gemm_converts(x.dtype, str(x.device)) else x


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """hidden @ weight.T + bias for one chunk in the accumulation dtype `dtype`: one similarity product of the GEMM
    policy (16-bit operands as they are on tensor cores, fp32 results), `weight` already a GEMM operand."""
    logits = torch.ops.ckd_ext.gemm_similarity(_gemm_operand(hidden), weight).to(dtype)
    return logits if bias is None else logits.add_(bias)


def _chunk_rows(row_bytes: int, device: torch.device) -> int:
    """Rows of one work buffer whose rows take `row_bytes` each, within the ops' workspace budget on `device`."""
    return max(1, _workspace_bytes(str(device)) // max(row_bytes, 1))


@contextlib.contextmanager
def _without_autocast(first):
    """The losses' own products run in the dtypes chosen here (the inputs were already cast), not autocast's."""
    if not isinstance(first, Tensor) or not torch.is_autocast_enabled(first.device.type):
        yield
        return
    with torch.autocast(first.device.type, enabled=False):
        yield


def _autocast_inputs(*tensors):
    """Under torch.autocast, the hidden states and heads in the autocast dtype, as F.linear would take them (products
    in that dtype, accumulated in float32; the loss stays float32). Anything that is not a floating tensor passes
    through to the argument checks."""
    first = tensors[0]
    if not isinstance(first, Tensor) or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype in _validation.FLOATING_DTYPES else t
                 for t in tensors)


def _fold_chunk_gradient(grads, rows: slice, logit_grad: Tensor, weight: Tensor, hidden: Tensor,
                         valid) -> None:
    """grads (hidden, weight, bias) += what the logit gradient of the token chunk `rows` gives them: dH[rows] =
    dZ W, dW += dZ^T H[rows], db += sum dZ. Both products are coefficient products of the GEMM policy (the fp32 logit
    gradient times the rows as the policy takes them, `weight` already an operand: on tensor cores the gradient
    rounded to the rows' 16-bit dtype, one GEMM), the head gradient accumulated in the accumulation dtype."""
    chunk = _gemm_operand(hidden[rows])
    if valid is not None:  # masked rows may hold NaN or inf: 0 * NaN would reach every weight
        chunk = torch.where(valid.unsqueeze(1), chunk, torch.zeros((), dtype=chunk.dtype, device=chunk.device))
    torch.ops.ckd_ext.gemm_product(grads[0][rows], logit_grad, weight, False)
    torch.ops.ckd_ext.gemm_product(grads[1], logit_grad.T, chunk, True)
    if grads[2] is not None:
        grads[2].add_(logit_grad.sum(0))
