#!/usr/bin/env python3
"""Which products fused-linear CKD's bilinear forms can run in (docs/math.md 8.3): the error of each candidate
formulation's similarity logits `cos(s_i, s_j) / tau` and `cos(t_i, s_j) / tau` against float64, next to the
materialised routes (logits from a GEMM of the inputs with fp32 accumulation, kept in fp32 or rounded to the inputs'
16-bit dtype), for well- and ill-conditioned student heads and hidden states that lean on the head's small singular
directions (large cancellation ratios R_i = |W_s|_2 |h_i| / |W_s h_i|).

    python benchmarks/precision_forms.py          # prints the markdown table of docs/math.md 8.3

Tensor-core arithmetic is reproduced as the emulated backend does (16-bit operands are exact in fp32, fp32
accumulation): a GEMM of 16-bit operands is an fp32 GEMM of their fp32 copies. Candidates, G = B^T B the heads' Gram
matrix, P = H~ G the products the strips read:
    float64 forms      G and P accumulated in float64 (what the package runs)
    TC Gram, f64 P     G from fp32-accumulated GEMMs of the 16-bit head over vocabulary chunks of 4096 rows, the
                       chunks summed in float64; P in float64
    TC Gram, split P   the same G, P = H~ (G_hi + G_lo): G split in two 16-bit parts (two tensor-core
                       GEMMs, more precise than the GEMM policy's one-GEMM product), fp32 accumulation
    fp32 forms         G and P accumulated in fp32
"""
from __future__ import annotations

import math

import torch

N, V, H_S, H_T, TAU = 256, 4000, 64, 128, 0.5
VOCAB_CHUNK = 4096


def _mm(a, b):
    """a @ b with fp32 accumulation of the operands as they are (exact fp32 copies of 16-bit operands)."""
    return a.float() @ b.float()


def _split(x, dtype, parts=2):
    out, rest = [], x.double()
    for _ in range(parts):
        part = rest.to(dtype)
        out.append(part)
        rest = rest - part.double()
    return out


def _tensor_core_gram(b):
    gram = torch.zeros(b.shape[1], b.shape[1], dtype=torch.float64)
    for start in range(0, b.shape[0], VOCAB_CHUNK):
        chunk = b[start:start + VOCAB_CHUNK]
        gram += _mm(chunk.T, chunk).double()
    return gram


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


def case(dtype, cond, lean, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, H_S, generator=g, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    ws = (u * torch.logspace(0, -math.log10(cond), H_S, dtype=torch.float64)) @ vh
    wt = torch.randn(V, H_T, generator=g, dtype=torch.float64) * H_T ** -0.5
    hs = torch.randn(N, H_S, generator=g, dtype=torch.float64)
    if lean:  # weights 1/cond .. 1 on the directions of singular values 1 .. 1/cond
        hs = hs @ torch.diag(torch.logspace(-math.log10(cond), 0, H_S, dtype=torch.float64)) @ vh
    ht = torch.randn(N, H_T, generator=g, dtype=torch.float64)
    ws, wt, hs, ht = (x.to(dtype) for x in (ws, wt, hs, ht))
    s64, t64 = hs.double() @ ws.double().T, ht.double() @ wt.double().T
    ratio = torch.linalg.matrix_norm(ws.double(), 2) * hs.double().norm(dim=1) / s64.norm(dim=1)
    expected = _cosines(s64, t64)
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
        ps = sum(_mm(hs, part) for part in _split(gtc[sl, sl].float(), dtype))
        pt = sum(_mm(ht, part) for part in _split(gtc[tl, sl].float(), dtype))
        got["TC Gram, split P"] = _form_cosines(ps, pt, hs, ht, gtc[tl, tl])
    g32 = _mm(b.T, b)
    got["fp32 forms"] = _form_cosines(_mm(hs, g32[sl, sl]), _mm(ht, g32[tl, sl]), hs, ht, g32[tl, tl].double())
    errors = {k: max((a - e).abs().max().item() for a, e in zip(v, expected)) for k, v in got.items()}
    return ratio.median().item(), errors


def main() -> int:
    torch.set_num_threads(2)
    columns = ["materialised 16-bit", "materialised fp32", "float64 forms", "TC Gram, f64 P", "TC Gram, split P",
               "fp32 forms"]
    print(f"N = {N}, V = {V}, H_s = {H_S}, H_t = {H_T}, tau = {TAU}: max |error| of the similarity logits "
          "cos/tau (student-student and teacher-student) against float64\n")
    print("| dtype | head cond | hidden | median R | " + " | ".join(columns) + " |")
    print("|---|---|---|---|" + "---|" * len(columns))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for cond, lean in ((1, False), (1e2, False), (1e2, True), (1e4, False), (1e4, True)):
            ratio, errors = case(dtype, cond, lean)
            cells = [f"{errors[c]:.1e}" if c in errors else "-" for c in columns]
            print(f"| {str(dtype).split('.')[1]} | {cond:g} | {'leaning' if lean else 'random'} | {ratio:.0f} | "
                  + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
