#!/usr/bin/env python3
"""Precision of the fused-linear losses against the float64 oracle on materialised logits, next to the logit route
(materialise the logits in the input dtype with F.linear, then ckd_ext.ckd_loss / kd_loss), for random heads and for
student heads with nearly collinear columns (condition number `cond`).

    python benchmarks/precision_lm.py            # prints a markdown table (the one in docs/math.md, section 8.3)

Errors: loss |rel|, and for each gradient max|error| / max|oracle| (normwise relative).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: an installed ckd_ext still wins
import ckd_ext  # noqa: E402
from ckd_ext import reference  # noqa: E402

N, V, H_S, H_T = 512, 4000, 64, 128


def student_head(cond: float, generator) -> torch.Tensor:
    """V x H_s, singular values spread geometrically from 1 to 1/cond (cond = 1: a random Gaussian head)."""
    w = torch.randn(V, H_S, generator=generator, dtype=torch.float64)
    if cond == 1:
        return w * H_S ** -0.5
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    singular = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), H_S, dtype=torch.float64)
    return (u * singular) @ vh * (V / H_S) ** 0.5 * H_S ** -0.5


def errors(loss_fn, materialised_fn, dtype, cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, H_S, generator=g, dtype=torch.float64)
    ws = student_head(cond, g)
    bs = torch.randn(V, generator=g, dtype=torch.float64) * 0.3
    ht = torch.randn(N, H_T, generator=g, dtype=torch.float64)
    wt = torch.randn(V, H_T, generator=g, dtype=torch.float64) * 2 * H_T ** -0.5
    student = [x.to(dtype).requires_grad_() for x in (hs, ws, bs)]
    teacher = [x.to(dtype) for x in (ht, wt)]
    oracle_in = [x.detach().double().requires_grad_() for x in student]
    expected = materialised_fn(reference, F.linear(*oracle_in), F.linear(*[x.double() for x in teacher]))
    expected_grads = torch.autograd.grad(expected, oracle_in)

    def rel(out, grads):
        return [abs(out.item() - expected.item()) / abs(expected.item())] + [
            ((a.double() - e).abs().max() / e.abs().max()).item() for a, e in zip(grads, expected_grads)]

    out = loss_fn(student, teacher)
    fused = rel(out, torch.autograd.grad(out, student))
    out = materialised_fn(ckd_ext, F.linear(*student), F.linear(*teacher))
    materialised = rel(out, torch.autograd.grad(out, student))
    return fused, materialised


def main() -> int:
    torch.set_num_threads(2)
    losses = {
        "ckd": (lambda s, t: ckd_ext.fused_linear_ckd_loss(s[0], s[1], t[0], t[1], student_bias=s[2], tau=0.5),
                lambda m, s, t: m.ckd_loss(s, t, tau=0.5)),
        "kd": (lambda s, t: ckd_ext.fused_linear_kd_loss(s[0], s[1], t[0], t[1], student_bias=s[2]),
               lambda m, s, t: m.kd_loss(s, t, temperature=1.0)),
    }
    print(f"N = {N}, V = {V}, H_s = {H_S}, H_t = {H_T}, student bias; relative errors against float64 logits + "
          "ckd_ext.reference: fused-linear / materialised logits + ckd_ext op\n")
    print("| loss | dtype | student head cond | loss | grad hidden | grad weight | grad bias |")
    print("|---|---|---|---|---|---|---|")
    for name, (fused_fn, materialised_fn) in losses.items():
        for dtype in (torch.float32, torch.bfloat16):
            for cond in (1, 1e2, 1e4, 1e6):
                if name == "kd" and cond > 1e2:
                    continue  # row-separable: no bilinear forms, the chunks compute the logits as the materialised route does
                fused, materialised = errors(fused_fn, materialised_fn, dtype, cond)
                cells = [f"{f:.1e} / {m:.1e}" for f, m in zip(fused, materialised)]
                print(f"| {name} | {str(dtype).split('.')[1]} | {cond:g} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
