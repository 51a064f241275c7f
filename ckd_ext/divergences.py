"""The divergences KD can minimise between the teacher's and the student's distributions (docs/math.md 3.1), and
their plain-PyTorch definition on log-probabilities.

`divergence_terms` is literally the math: it is the float64 oracle of the fused KD kernels, and the implementation
where the categories are few (an offline top-k teacher's k + 1 categories), where autograd through it is cheap.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch
from torch import Tensor

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")
# TRL's GKD default beta and DistiLLM's default skew.
DEFAULT_BETA = 0.5
DEFAULT_ALPHA = 0.1


class Divergence(NamedTuple):
    """A resolved choice: `beta` is jsd's teacher weight in the mixture, `alpha` skew_kl's; 0.0 where unused."""
    name: str = "forward_kl"
    beta: float = 0.0
    alpha: float = 0.0


def resolve(fn: str, divergence, beta: Optional[float], alpha: Optional[float]) -> Divergence:
    """The divergence `fn` was asked for, or a ValueError naming the argument. `beta` belongs to "jsd" and `alpha` to
    "skew_kl" (each in the open interval (0, 1)); giving either to another divergence is an error, not ignored."""
    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        raise ValueError(f"{fn}: divergence must be one of {', '.join(map(repr, DIVERGENCES))}, got {divergence!r}")
    for name, value, owner in (("beta", beta, "jsd"), ("alpha", alpha, "skew_kl")):
        if value is None:
            continue
        if divergence != owner:
            raise ValueError(f"{fn}: {name} applies only to divergence={owner!r}, got {name}={value!r} with "
                             f"divergence={divergence!r}")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) < 1.0:
            raise ValueError(f"{fn}: {name} must be a number in the open interval (0, 1), got {value!r}")
    if divergence == "jsd":
        return Divergence(divergence, beta=float(DEFAULT_BETA if beta is None else beta))
    if divergence == "skew_kl":
        return Divergence(divergence, alpha=float(DEFAULT_ALPHA if alpha is None else alpha))
    return Divergence(divergence)


def _kl(log_p: Tensor, log_m: Tensor) -> Tensor:
    """sum_c p_c (log p_c - log m_c) with 0 log 0 = 0 (a category p gives no mass contributes nothing, even where m
    has none either)."""
    p = log_p.exp()
    mass = p != 0  # NaN (a row without a softmax) stays in, and stays NaN
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    # -inf entries are replaced inside the product too, or autograd's 0 * (-inf) would put NaN in the gradient
    difference = torch.where(mass, log_p, zero) - torch.where(mass, log_m, zero)
    return torch.where(mass, p * difference, zero).sum(-1)


def _log_mixture(weight: float, log_p: Tensor, log_q: Tensor) -> Tensor:
    """log(weight p + (1 - weight) q); -inf where neither has mass, with a zero derivative there (logaddexp's at
    (-inf, -inf) is NaN, and would reach the gradient through the 0 * NaN of the masked product)."""
    empty = (log_p == -math.inf) & (log_q == -math.inf)
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    mixed = torch.logaddexp(torch.where(empty, zero, log_p) + math.log(weight),
                            torch.where(empty, zero, log_q) + math.log1p(-weight))
    return torch.where(empty, torch.full_like(mixed, -math.inf), mixed)


def divergence_terms(teacher_log_probs: Tensor, student_log_probs: Tensor, divergence: Divergence) -> Tensor:
    """The divergence of each row (summed over the last dimension) between the teacher's distribution p_t and the
    student's p_s, from their log-probabilities (-inf for a category without mass):

        forward_kl   KL(p_t || p_s)
        reverse_kl   KL(p_s || p_t)
        jsd          beta KL(p_t || m) + (1 - beta) KL(p_s || m),  m = beta p_t + (1 - beta) p_s
        skew_kl      KL(p_t || m),                                  m = alpha p_t + (1 - alpha) p_s
        tvd          1/2 sum_c |p_t - p_s|
    """
    lt, ls = teacher_log_probs, student_log_probs
    if divergence.name == "forward_kl":
        return _kl(lt, ls)
    if divergence.name == "reverse_kl":
        return _kl(ls, lt)
    if divergence.name == "jsd":
        beta = divergence.beta
        log_m = _log_mixture(beta, lt, ls)
        return beta * _kl(lt, log_m) + (1.0 - beta) * _kl(ls, log_m)
    if divergence.name == "skew_kl":
        return _kl(lt, _log_mixture(divergence.alpha, lt, ls))
    if divergence.name == "tvd":
        return 0.5 * (lt.exp() - ls.exp()).abs().sum(-1)
    raise ValueError(f"divergence_terms: unknown divergence {divergence.name!r}")
