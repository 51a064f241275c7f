"""Row rules every implementation of the losses shares (docs/math.md section 1): the norm clamp, the accumulation
dtype, and how per-valid-row terms return to the input's leading shape."""
import torch
from torch import Tensor

EPS = 1e-12  # lower clamp of every L2 norm, as in F.normalize


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the losses accumulate in, and the dtype of the ops' raw loss: float64 for float64 inputs (gradcheck),
    float32 for everything else (16-bit inputs are converted on load)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softplus_contrast(lse_negatives: Tensor, positives: Tensor) -> Tensor:
    """LSE({pos} U negatives) - pos = log(1 + exp(lse_negatives - pos)) (docs/math.md 6.2): no cancellation where the
    positive dominates, and none of F.softplus's linear cut-off above 20, which drops the exp(-20) ~ 2e-9 a float64
    loss keeps (the fused ops' kernels keep it too). Its derivative is sigmoid(lse_negatives - pos)."""
    x = lse_negatives - positives
    return torch.logaddexp(x, torch.zeros((), dtype=x.dtype, device=x.device))


def scatter_rows(row_terms: Tensor, prepared) -> Tensor:
    """Per-valid-row terms (n,) -> per-row terms of the input's leading shape, 0 for masked rows; `prepared` is the
    loss's validated inputs (ckd_ext._validation.Prepared)."""
    if prepared.mask is None:
        return row_terms.reshape(prepared.lead_shape)
    all_rows = row_terms.new_zeros(prepared.mask.shape[0])
    all_rows[prepared.mask] = row_terms
    return all_rows.reshape(prepared.lead_shape)


def reduce_row_terms(terms: Tensor, prepared, reduction: str) -> Tensor:
    """Per-row terms (0 on masked rows) -> the loss of `reduction`: the terms in the input's leading shape ("none"),
    their sum, or their mean over the valid rows (0 without any), divided by a device tensor: no host
    synchronisation."""
    if reduction == "none":
        return terms.reshape(prepared.lead_shape)
    loss = terms.sum()
    if reduction == "mean":
        count = terms.new_tensor(terms.shape[0]) if prepared.mask is None else prepared.mask.sum().to(terms.dtype)
        loss = loss / count.clamp_min(1)
    return loss
