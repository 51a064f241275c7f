#!/usr/bin/env python3
"""Which products fused-linear CKD's bilinear forms and strips can run in (docs/math.md 8.3): the error of each
candidate formulation's similarity logits `cos(s_i, s_j) / tau` and `cos(t_i, s_j) / tau` against float64, next to
the materialised routes (logits from a GEMM of the inputs with fp32 accumulation, kept in fp32 or rounded to the
inputs' 16-bit dtype), for well- and ill-conditioned student heads and hidden states that lean on the head's small
singular directions (large cancellation ratios R_i = |W_s|_2 |h_i| / |W_s h_i|); then the loss and gradients of
fused_linear_ckd_loss itself on the emulated CUDA backend (its tensor-core path) and on the CPU backend, against the
materialised 16-bit route through ckd_loss.

    python benchmarks/precision_forms.py          # prints the two markdown tables of docs/math.md 8.3

Tensor-core arithmetic is the package's own products on the CPU backend, whose GEMM of 16-bit operands is an fp32
GEMM of their exact fp32 copies, the tensor cores' arithmetic (16-bit products exact in fp32, fp32 accumulation) as
the emulated backend reproduces it; an int8 GEMM with int32 accumulation is exact (checked). Candidates, G = B^T B the heads' Gram matrix, P = H~ G the products the strips read:
    float64 forms      G and P accumulated in float64, fp32 strips (the CPU backend's)
    TC Gram, f64 P     G from fp32-accumulated GEMMs of the 16-bit head over vocabulary chunks of 4096 rows, the
                       chunks summed in float64; P in float64
    TC Gram, split P   the same G, P = H~ (G_hi + G_lo): G split in two 16-bit parts (two tensor-core
                       GEMMs, more precise than the GEMM policy's one-GEMM product), fp32 accumulation
    fp32 forms         G and P accumulated in fp32
    TC strips          float64 forms, the strips' logits from the package's own tensor-core operands
                       (ckd_ext.fused_linear.ckd._strip_operands: the unit rows of the student's logit space in two
                       16-bit parts, from G_ss = F^T F): what CUDA runs for 16-bit inputs
    TC strips, int8 G  the same with G exact from 15 int8 GEMMs of 7-bit slices of the heads, as the package
                       computes it for 16-bit heads on tensor cores (split_operands.int8_slices)
"""
from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: an installed ckd_ext still wins
import ckd_ext  # noqa: E402
from ckd_ext import reference, testing  # noqa: E402
from ckd_ext.fused_linear import ckd as fused_ckd  # noqa: E402
from ckd_ext.fused_linear import split_operands  # noqa: E402

N, V, H_S, H_T, TAU = 256, 4000, 64, 128, 0.5
VOCAB_CHUNK = 4096


def _mm(a, b):
    """a @ b with fp32 accumulation of the operands as they are (exact fp32 copies of 16-bit operands)."""
    return a.float() @ b.float()


def split_mm(a, b, dtype, a_parts, b_parts):
    """a @ b on tensor cores: `a` in a_parts 16-bit parts of the package's split (ckd_ext.fused_linear.split_operands;
    0: `a` is 16-bit and taken as it is), `b`'s columns likewise; the part products i + j < max(a_parts, b_parts),
    each fp32-accumulated, summed in fp32 (split_operands.similarity)."""
    a_split = split_operands.split(a, dtype, a_parts) if a_parts else split_operands.as_they_are(a)
    b_split = split_operands.split(b.T, dtype, b_parts) if b_parts else split_operands.as_they_are(b.T)
    return split_operands.similarity(a_split, b_split)


def _tensor_core_gram(b):
    gram = torch.zeros(b.shape[1], b.shape[1], dtype=torch.float64)
    for start in range(0, b.shape[0], VOCAB_CHUNK):
        chunk = b[start:start + VOCAB_CHUNK]
        gram += _mm(chunk.T, chunk).double()
    return gram


def int8_gram(b):
    """G = B^T B of a 16-bit head as fused-linear CKD computes it on tensor cores: the package's int8 slices and exact
    int8 GEMMs (ckd_ext.fused_linear.split_operands), scaled back. Returns G (float64) and the GEMM count."""
    exponents = split_operands.int8_exponents(b.abs().amax(0).float())
    slices = split_operands.int8_slices(b, exponents)
    calls = ckd_ext.require_extension().gemm_calls()
    gram = split_operands.exact_gram_block(slices, slices)
    calls = ckd_ext.require_extension().gemm_calls() - calls
    scale = torch.ldexp(torch.ones(b.shape[1], dtype=torch.float64), exponents)
    return gram * scale[:, None] * scale[None], calls


def _cosines(s, t):
    s, t = s / s.norm(dim=1, keepdim=True), t / t.norm(dim=1, keepdim=True)
    return s @ s.T / TAU, t @ s.T / TAU


def _form_cosines(ps, pt, hs, ht, gram_tt):
    """The similarity logits from P_s = H~_s G_ss, P_t = H~_t G_ts (in float64 from here on: the candidates' own
    error is what is measured)."""
    ps, pt, hs, ht = ps.double(), pt.double(), hs.double(), ht.double()
    ns = (ps * hs).sum(1).clamp_min(0).sqrt()
    nt = ((ht @ gram_tt) * ht).sum(1).sqrt()
    return (ps @ hs.T) / ns[:, None] / ns[None] / TAU, (pt @ hs.T) / nt[:, None] / ns[None] / TAU


def _tensor_core_strip_logits(gram, hs, ht, dtype):
    """The strips' logits from the package's tensor-core operands (fused_ckd._strip_operands) built on the forms of
    `gram` (float64), both anchors: the student's (student-student) and the teacher's (teacher-student)."""
    sl, tl = slice(0, H_S), slice(H_S, H_S + H_T)
    hs64, ht64 = hs.double(), ht.double()
    ps, pt = hs64 @ gram[sl, sl], ht64 @ gram[tl, sl]
    ns, nt = (ps * hs64).sum(1).sqrt(), ((ht64 @ gram[tl, tl]) * ht64).sum(1).sqrt()
    ones = torch.ones(N, dtype=torch.float64)
    out = []
    for anchor in ("student", "teacher"):
        anchors = ps / ns[:, None] if anchor == "student" else pt / nt[:, None]
        operands = fused_ckd._strip_operands(dtype, hs64, ones, ns, anchors, gram[sl, sl],
                                             nt if anchor == "teacher" else None, pt)
        out.append(split_operands.similarity(operands.logit_anchors, operands.logit_candidates).double() / TAU)
    return tuple(out)


def inputs(dtype, cond, lean, seed=1, shared=False):
    """hs, ws, ht, wt in `dtype` and the median cancellation ratio R of the student rows; `shared`: the teacher's
    head is [W_s | W_s] (G of rank H_s out of K, as for heads that share columns)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, H_S, generator=g, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    ws = (u * torch.logspace(0, -math.log10(cond), H_S, dtype=torch.float64)) @ vh
    wt = torch.randn(V, H_T, generator=g, dtype=torch.float64) * H_T ** -0.5
    hs = torch.randn(N, H_S, generator=g, dtype=torch.float64)
    if lean:  # weights 1/cond .. 1 on the directions of singular values 1 .. 1/cond
        hs = hs @ torch.diag(torch.logspace(-math.log10(cond), 0, H_S, dtype=torch.float64)) @ vh
    ht = torch.randn(N, H_T, generator=g, dtype=torch.float64)
    if shared:
        wt = torch.cat([ws] * (H_T // H_S), 1)
    ws, wt, hs, ht = (x.to(dtype) for x in (ws, wt, hs, ht))
    logit_norms = (hs.double() @ ws.double().T).norm(dim=1)
    ratio = torch.linalg.matrix_norm(ws.double(), 2) * hs.double().norm(dim=1) / logit_norms
    return hs, ws, ht, wt, ratio.median().item()


def case(dtype, cond, lean, seed=1, shared=False):
    hs, ws, ht, wt, ratio = inputs(dtype, cond, lean, seed, shared)
    expected = _cosines(hs.double() @ ws.double().T, ht.double() @ wt.double().T)
    s32, t32 = _mm(hs, ws.T), _mm(ht, wt.T)
    got = {"materialised fp32": _cosines(s32.double(), t32.double())}
    if dtype != torch.float32:
        got["materialised 16-bit"] = _cosines(s32.to(dtype).double(), t32.to(dtype).double())
    b = torch.cat([ws, wt], 1)
    g64 = b.double().T @ b.double()
    gtc = _tensor_core_gram(b)
    sl, tl = slice(0, H_S), slice(H_S, H_S + H_T)
    got["float64 forms"] = _form_cosines(hs.double() @ g64[sl, sl], ht.double() @ g64[tl, sl], hs, ht, g64[tl, tl])
    got["TC Gram, f64 P"] = _form_cosines(hs.double() @ gtc[sl, sl], ht.double() @ gtc[tl, sl], hs, ht, gtc[tl, tl])
    if dtype != torch.float32:
        ps = split_mm(hs, gtc[sl, sl].float(), dtype, 0, 2)
        pt = split_mm(ht, gtc[tl, sl].float(), dtype, 0, 2)
        got["TC Gram, split P"] = _form_cosines(ps, pt, hs, ht, gtc[tl, tl])
        got["TC strips"] = _tensor_core_strip_logits(g64, hs, ht, dtype)
        got["TC strips, int8 G"] = _tensor_core_strip_logits(int8_gram(b)[0], hs, ht, dtype)
    g32 = _mm(b.T, b)
    got["fp32 forms"] = _form_cosines(_mm(hs, g32[sl, sl]), _mm(ht, g32[tl, sl]), hs, ht, g32[tl, tl].double())
    errors = {k: max((a - e).abs().max().item() for a, e in zip(v, expected)) for k, v in got.items()}
    return ratio, errors


def _ckd(route, hs, ws, ht, wt, anchor):
    """The CKD loss (tau, mean) and the gradients of the student's hidden states and head by `route`."""
    hs, ws = hs.detach().requires_grad_(), ws.detach().requires_grad_()
    # under autocast a 16-bit route's loss stays float32 (its own error, not the rounding of the result)
    sixteen_bit = hs.dtype in (torch.bfloat16, torch.float16)
    with torch.autocast("cpu", dtype=hs.dtype) if sixteen_bit else contextlib.nullcontext():
        if route == "fused":
            loss = ckd_ext.fused_linear_ckd_loss(hs, ws, ht, wt, tau=TAU, anchor=anchor)
        else:  # "materialised": the 16-bit logits of a 16-bit GEMM, then the logit op; "oracle": float64
            fn = ckd_ext.ckd_loss if route == "materialised" else reference.ckd_loss
            loss = fn(hs @ ws.T, ht @ wt.T, tau=TAU, anchor=anchor)
    loss.backward()
    return loss.detach(), hs.grad, ws.grad


def gradient_case(dtype, cond, lean, anchor, seed=1):
    """Relative errors (loss; d hidden, d head normwise) against float64 of fused_linear_ckd_loss on the emulated
    backend (None where it is not built) and on the CPU backend, and of the materialised 16-bit route (on the CPU
    backend)."""
    hs, ws, ht, wt, _ = inputs(dtype, cond, lean, seed)
    expected = _ckd("oracle", hs.double(), ws.double(), ht.double(), wt.double(), anchor)

    def errors(got):
        return [(abs(got[0].double() - expected[0]) / abs(expected[0])).item()] + [
            ((g.double() - e).norm() / e.norm()).item() for g, e in zip(got[1:], expected[1:])]

    emulated = testing.emulated_cuda() if testing.emulated_available() else None
    with emulated or contextlib.nullcontext():
        tensor_cores = errors(_ckd("fused", hs, ws, ht, wt, anchor)) if emulated else None
    return tensor_cores, errors(_ckd("fused", hs, ws, ht, wt, anchor)), errors(_ckd("materialised", hs, ws, ht, wt,
                                                                                       anchor))


CASES = ((1, False), (1e2, False), (1e2, True), (1e4, False), (1e4, True))


def main() -> int:
    torch.set_num_threads(2)
    columns = ["materialised 16-bit", "materialised fp32", "float64 forms", "TC Gram, f64 P", "TC Gram, split P",
               "fp32 forms", "TC strips", "TC strips, int8 G"]
    print(f"N = {N}, V = {V}, H_s = {H_S}, H_t = {H_T}, tau = {TAU}: max |error| of the similarity logits "
          "cos/tau (student-student and teacher-student) against float64\n")
    print("| dtype | head cond | hidden | median R | " + " | ".join(columns) + " |")
    print("|---|---|---|---|" + "---|" * len(columns))
    rows = [(dtype, cond, lean, False) for dtype in (torch.bfloat16, torch.float16, torch.float32)
            for cond, lean in CASES]
    rows += [(dtype, 1e4, True, True) for dtype in (torch.bfloat16, torch.float16)]
    for dtype, cond, lean, shared in rows:
        ratio, errors = case(dtype, cond, lean, shared=shared)
        cells = [f"{errors[c]:.1e}" if c in errors else "-" for c in columns]
        hidden = ("leaning" if lean else "random") + (", shared heads" if shared else "")
        print(f"| {str(dtype).split('.')[1]} | {cond:g} | {hidden} | {ratio:.0f} | " + " | ".join(cells) + " |")
    print("\nfused_linear_ckd_loss (tau = 0.5, mean, the float32 loss of torch.autocast): relative error of the loss "
          "and normwise of the gradients (16-bit) of the student's hidden states and head against float64; TC: the "
          "emulated CUDA backend (tensor-core operands), CPU: the CPU backend (fp32 strips, float64 head gradient), "
          "materialised: 16-bit logits + ckd_loss\n")
    print("| dtype | head cond | hidden | anchor | TC loss / d hidden / d head | CPU | materialised |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float16):
        for cond, lean in CASES:
            for anchor in ("student", "teacher"):
                cells = [" / ".join(f"{e:.1e}" for e in errs) if errs else "-"
                         for errs in gradient_case(dtype, cond, lean, anchor)]
                print(f"| {str(dtype).split('.')[1]} | {cond:g} | {'leaning' if lean else 'random'} | {anchor} | "
                      + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
