#!/usr/bin/env python3
"""Which products fused-linear CKD's bilinear forms can run in (docs/math.md 8.3): the error of each candidate
formulation's similarity logits `cos(s_i, s_j) / tau` and `cos(t_i, s_j) / tau` against float64, next to the
materialised routes (logits from a GEMM of the inputs with fp32 accumulation, kept in fp32 or rounded to the inputs'
16-bit dtype), for well- and ill-conditioned student heads and hidden states that lean on the head's small singular
directions (large cancellation ratios R_i = |W_s|_2 |h_i| / |W_s h_i|); then the gradients of the factor
formulation against those of the logit op on materialised 16-bit logits.

    python benchmarks/precision_forms.py          # prints the two markdown tables of docs/math.md 8.3

Tensor-core arithmetic is reproduced as the emulated backend does (16-bit operands are exact in fp32, fp32
accumulation): a GEMM of 16-bit operands is an fp32 GEMM of their fp32 copies; an int8 GEMM with int32 accumulation
is exact (checked). Candidates, G = B^T B the heads' Gram matrix, P = H~ G the products the strips read:
    float64 forms      G and P accumulated in float64 (what the package runs)
    TC Gram, f64 P     G from fp32-accumulated GEMMs of the 16-bit head over vocabulary chunks of 4096 rows, the
                       chunks summed in float64; P in float64
    TC Gram, split P   the same G, P = H~ (G_hi + G_lo): G split in two 16-bit parts (two tensor-core
                       GEMMs, more precise than the GEMM policy's one-GEMM product), fp32 accumulation
    fp32 forms         G and P accumulated in fp32
    factor, f64 Gram   G in float64, G = F^T F (Cholesky, float64, K x K), the rows x_i = F h~_i from GEMMs of the
                       16-bit hidden states with F in three 16-bit parts, the unit rows x_i / |x_i| in two 16-bit
                       parts for the strips (hi hi + hi lo + lo hi): every N-sized product on tensor cores
    factor, int8 Gram  the same with G exact from 15 int8 GEMMs of 7-bit slices of the head (docs/math.md 8.3)
"""
from __future__ import annotations

import math

import torch

N, V, H_S, H_T, TAU = 256, 4000, 64, 128, 0.5
VOCAB_CHUNK = 4096
FACTOR_OPERAND_PARTS, FACTOR_STRIP_PARTS = 3, 2
INT8_SLICES, INT8_MAX_ORDER = 5, 4  # slices a, b of 7 bits each, products with a + b <= 4: 15 GEMMs
INT32_EXACT_ROWS = (2 ** 31 - 1) // 127 ** 2  # 133144 products of two int8 slices sum exactly in int32


def _mm(a, b):
    """a @ b with fp32 accumulation of the operands as they are (exact fp32 copies of 16-bit operands)."""
    return a.float() @ b.float()


def split(x, dtype, parts, dim=1):
    """x (fp32 or float64) as `parts` 16-bit tensors and their scales, x ~ sum part / scale. float16 parts are each
    scaled by a power of two per slice along `dim` (per row of a left operand: dim 1; per column of a right one:
    dim 0) that puts the slice's largest entry at 2^14, inside float16's range (bfloat16 has float32's)."""
    out, rest = [], x.double()
    for _ in range(parts):
        if dtype == torch.float16:
            largest = rest.abs().amax(dim, keepdim=True).clamp_min(1e-300)
            scale = torch.pow(2.0, 14 - torch.ceil(torch.log2(largest)))
        else:
            scale = torch.ones((), dtype=torch.float64)
        part = (rest * scale).to(dtype)
        out.append((part, scale))
        rest = rest - part.double() / scale
    return out


def split_mm(a, b, dtype, a_parts, b_parts):
    """a @ b on tensor cores: `a` in a_parts 16-bit parts (0: a is 16-bit and taken as it is), `b` in b_parts; the
    part products i + j < max(a_parts, b_parts) (hi hi, hi lo, lo hi, ...), each fp32-accumulated, summed in fp32."""
    ones = torch.ones((), dtype=torch.float64)
    a_split = split(a, dtype, a_parts, 1) if a_parts else [(a, ones)]
    b_split = split(b, dtype, b_parts, 0) if b_parts else [(b, ones)]
    terms = max(a_parts, b_parts, 1)
    out = 0
    for i, (x, x_scale) in enumerate(a_split):
        for j, (y, y_scale) in enumerate(b_split):
            if i + j < terms:
                out = out + (_mm(x, y).double() / (x_scale * y_scale)).float()
    return out


def _tensor_core_gram(b):
    gram = torch.zeros(b.shape[1], b.shape[1], dtype=torch.float64)
    for start in range(0, b.shape[0], VOCAB_CHUNK):
        chunk = b[start:start + VOCAB_CHUNK]
        gram += _mm(chunk.T, chunk).double()
    return gram


def int8_gram(b, slices=INT8_SLICES, max_order=INT8_MAX_ORDER):
    """G = B^T B of a 16-bit head from int8 GEMMs: each column scaled by a power of two 2^-e_k (|entries| < 1, so
    that no slice reaches 128), cut
    into 7-bit slices I_a (|I_a| <= 127, B = sum_a I_a 2^(-7(a+1)) 2^e_k + a remainder below 2^(-7 slices)), and
    G = sum over a + b <= max_order of I_a^T I_b 2^(-7(a+b+2)), scaled back. Each I_a^T I_b is exact in int32 while
    V 127^2 < 2^31 (V <= 133144: a larger vocabulary is summed in chunks). Returns G (float64) and the GEMM count."""
    b = b.double()
    if b.shape[0] > INT32_EXACT_ROWS:
        raise ValueError(f"int8_gram: sum the vocabulary in chunks of at most {INT32_EXACT_ROWS} rows")
    exponent = torch.floor(torch.log2(b.abs().amax(0).clamp_min(1e-300))) + 1  # |entries| / 2^e < 1, strictly
    rest = b * torch.pow(2.0, -exponent)
    pieces = []
    for _ in range(slices):
        piece = torch.trunc(rest * 128)
        pieces.append(piece.to(torch.int8))
        rest = rest * 128 - piece
    gram = torch.zeros(b.shape[1], b.shape[1], dtype=torch.float64)
    gemms = 0
    for i in range(slices):
        for j in range(slices - i):
            if i + j <= max_order:
                gram += torch._int_mm(pieces[i].T.contiguous(), pieces[j]).double() * 2.0 ** (-7 * (i + j + 2))
                gemms += 1
    scale = torch.pow(2.0, exponent)
    return gram * scale[:, None] * scale[None], gemms


def cholesky_factor(gram):
    """F, upper triangular, F^T F = G + delta I: delta = K 2^-52 max_k G_kk, float64's rounding of the Gram, keeps a
    rank-deficient G (shared heads, K > V) factorable; it moves a similarity by delta |h_i| |h_j|, ~1e-16 K R_i R_j."""
    k = gram.shape[0]
    delta = k * 2.0 ** -52 * gram.diagonal().max()
    return torch.linalg.cholesky(gram + delta * torch.eye(k, dtype=torch.float64)).T


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


def _embedded(hs, ht):
    """The hidden rows in the K = H_s + H_t columns of B = [B_s | B_t]: [h_s, 0] and [0, h_t]."""
    return (torch.cat([hs, hs.new_zeros(hs.shape[0], H_T)], 1), torch.cat([ht.new_zeros(ht.shape[0], H_S), ht], 1))


def _factor_unit_rows(factor, hs, ht, dtype):
    """x = h~ F^T (F in three 16-bit parts, the hidden rows as they are) and the unit rows x / |x| with |x|; the
    student's x has zeros past column H_s (F is upper triangular), the teacher's norm takes all K columns."""
    es, et = _embedded(hs, ht)
    xs = split_mm(es, factor.T, dtype, 0, FACTOR_OPERAND_PARTS)
    xt = split_mm(et, factor.T, dtype, 0, FACTOR_OPERAND_PARTS)
    ns, nt = xs.norm(dim=1, keepdim=True), xt.norm(dim=1, keepdim=True)
    return xs / ns, xt / nt, ns, nt


def _factor_cosines(gram, hs, ht, dtype):
    us, ut, _, _ = _factor_unit_rows(cholesky_factor(gram), hs, ht, dtype)

    def strip(a, c):
        return split_mm(a, c.T, dtype, FACTOR_STRIP_PARTS, FACTOR_STRIP_PARTS).double() / TAU

    return strip(us, us), strip(ut, us)


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
        got["factor, f64 Gram"] = _factor_cosines(g64, hs, ht, dtype)
        got["factor, int8 Gram"] = _factor_cosines(int8_gram(b)[0], hs, ht, dtype)
    g32 = _mm(b.T, b)
    got["fp32 forms"] = _form_cosines(_mm(hs, g32[sl, sl]), _mm(ht, g32[tl, sl]), hs, ht, g32[tl, tl].double())
    errors = {k: max((a - e).abs().max().item() for a, e in zip(v, expected)) for k, v in got.items()}
    return ratio, errors


def _test_loss(s, t, css, cts):
    s, t = s / s.norm(dim=1, keepdim=True), t / t.norm(dim=1, keepdim=True)
    return ((css * (s @ s.T)).sum() + (cts * (t @ s.T)).sum()) / TAU


def gradient_case(dtype, cond, lean, seed=1):
    """Normwise relative errors of (d hidden, d head) of L = sum c_ss cos(s_a, s_b)/tau + sum c_ts cos(t_a, s_b)/tau
    (random coefficients of CKD's size) against float64: the logit op's route on materialised 16-bit logits (its
    GEMM policy: coefficients rounded to 16 bits, one GEMM; the logit gradient rounded to 16 bits, then the F.linear
    backward's 16-bit GEMMs) and the factor formulation's (docs/math.md 8.3)."""
    hs, ws, ht, wt, _ = inputs(dtype, cond, lean, seed)
    g = torch.Generator().manual_seed(seed + 1)
    css = torch.randn(N, N, generator=g, dtype=torch.float64) / N
    cts = torch.randn(N, N, generator=g, dtype=torch.float64) / N
    h64, w64 = hs.double().requires_grad_(), ws.double().requires_grad_()
    _test_loss(h64 @ w64.T, ht.double() @ wt.double().T, css, cts).backward()
    expected = (h64.grad, w64.grad)
    coef_ss, coef_ts = ((css + css.T) / TAU).float(), (cts / TAU).float()

    # the logit op on 16-bit logits: d(unit s) = C (S / |S|), the column scale 1/|s_j| folded into the coefficients,
    # rounded to 16 bits once (row-scaled in float16), the logit rows as they are
    s, t = _mm(hs, ws.T).to(dtype), _mm(ht, wt.T).to(dtype)
    ns, nt = s.float().norm(dim=1, keepdim=True), t.float().norm(dim=1, keepdim=True)
    d_unit = split_mm(coef_ss / ns.T, s, dtype, 1, 0) + split_mm(coef_ts.T / nt.T, t, dtype, 1, 0)
    unit = s.float() / ns
    ds = ((d_unit - unit * (d_unit * unit).sum(1, keepdim=True)) / ns).to(dtype)
    logit_op = (_mm(ds, ws), _mm(ds.T, hs))

    # the factor formulation: the strips' coefficient products take the unit rows in two parts, the coefficients
    # rounded to 16 bits (the GEMM policy's one-GEMM rule); u = F^-1 dL/dx from h-space operands (F^-1 x_j = h~_j),
    # so that dL/dB = B (M + M^T) with M = sum_j u_j h~_j^T needs no inverse
    b = torch.cat([ws, wt], 1)
    factor = cholesky_factor(b.double().T @ b.double())
    us, ut, ns, nt = _factor_unit_rows(factor, hs, ht, dtype)
    es, et = _embedded(hs, ht)

    def coefficient_product(coef, rows, row_parts):
        """coef @ rows, the coefficients rounded to 16 bits once (row-scaled in float16), rows in row_parts."""
        return split_mm(coef, rows, dtype, 1, row_parts)

    parts = FACTOR_STRIP_PARTS
    d_us = coefficient_product(coef_ss, us, parts) + coefficient_product(coef_ts.T, ut, parts)
    d_ut = coefficient_product(coef_ts, us, parts)
    gamma_s, gamma_t = (d_us * us).sum(1, keepdim=True), (d_ut * ut).sum(1, keepdim=True)
    dxs = (d_us - us * gamma_s) / ns
    d_hidden = split_mm(dxs, factor[:, :H_S], dtype, FACTOR_STRIP_PARTS, FACTOR_OPERAND_PARTS)
    # F^-1 of a unit row is h~ / |x|: the 1/|x_j| folded into the coefficients, the hidden rows as they are
    cs, ct = ns.T.double(), nt.T.double()
    u_s = coefficient_product(coef_ss / cs, es, 0) + coefficient_product(coef_ts.T / ct, et, 0)
    u_s = (u_s - es.float() * (gamma_s / ns)) / ns
    u_t = (coefficient_product(coef_ts / cs, es, 0) - et.float() * (gamma_t / nt)) / nt
    m = split_mm(u_s.T, es, dtype, FACTOR_OPERAND_PARTS, 0) + split_mm(u_t.T, et, dtype, FACTOR_OPERAND_PARTS, 0)
    d_head = split_mm(b, ((m + m.T)[:, :H_S] / 2).contiguous(), dtype, 0, FACTOR_OPERAND_PARTS)
    factored = (d_hidden, d_head)

    def error(a, e):
        return ((a.double() - e).norm() / e.norm()).item()

    return [error(a, e) for a, e in zip(logit_op, expected)] + [error(a, e) for a, e in zip(factored, expected)]


CASES = ((1, False), (1e2, False), (1e2, True), (1e4, False), (1e4, True))


def main() -> int:
    torch.set_num_threads(2)
    columns = ["materialised 16-bit", "materialised fp32", "float64 forms", "TC Gram, f64 P", "TC Gram, split P",
               "fp32 forms", "factor, f64 Gram", "factor, int8 Gram"]
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
    print("\nGradients of sum c cos/tau (random c) w.r.t. the student's hidden states and head, normwise relative "
          "error against float64, before the final rounding to the input dtype\n")
    print("| dtype | head cond | hidden | logit op d hidden | logit op d head | factor d hidden | factor d head |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float16):
        for cond, lean in CASES:
            errors = gradient_case(dtype, cond, lean)
            print(f"| {str(dtype).split('.')[1]} | {cond:g} | {'leaning' if lean else 'random'} | "
                  + " | ".join(f"{e:.1e}" for e in errors) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
