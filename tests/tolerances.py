"""How far a fused result may be from the float64 oracle: the fixed-case tests' normwise tolerances (TOLERANCE,
assert_matches, check_against_oracle) and the fuzzer's element-wise tolerance model (error_bounds, check_within)."""
import math
from typing import NamedTuple

import torch

from ckd_ext.rows import EPS, accumulation_dtype
from inputs import CONFIGS, loss_and_grad

# Tolerances of the fixed-case tests (test_ops, test_emulated, test_cuda) against the float64 oracle run on the
# same (already rounded) inputs, relative to the largest magnitude of the expected tensor. They are the coarse,
# normwise version of the tolerance model below (UNIT_ROUNDOFF, error_bounds, check_within), for the moderate
# shapes and scales those tests use; the fuzzer (test_fuzz.py) uses the model itself, element by element.
# - float32: every statistic accumulates in float32 over at most a few thousand terms (C <= 4099 or
#   N <= 257), so errors stay near sqrt(terms) * u32 = sqrt(terms) * 6e-8 < 1e-5 (168 u32).
# - float16 / bfloat16: computed in float32, then the loss and each gradient element are rounded once
#   to the 16-bit type (unit roundoff u16 = 4.9e-4 / 3.9e-3); twice that covers the float32 error on top.
# - float64: accumulates in float64; only summation order differs.
# float16 gradients below its smallest normal (6.1e-5) are subnormal, spaced 2^-24 apart: that spacing
# is added as an absolute tolerance (for the other dtypes, their smallest normal).
# Logits of scale 100 put softmax arguments near 300 / T (3 sigma), where float32 rounding of x / T and of
# the log-sum-exp is ~2e-5 absolute; exp() turns that into a relative error of the same size, and BicKD's
# gradient (a difference of such terms through the softmax backward) can lose another factor of ~10 to
# cancellation. float32 results at that scale get 20x the tolerance (2e-4); at scale 10 the 1e-5 holds.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def tolerance(dtype, scale=1.0):
    return TOLERANCE[dtype] * (20 if scale > 10 and dtype == torch.float32 else 1)


def assert_matches(actual, expected, dtype, what, tol=None):
    """actual (any dtype) against the float64 expected, within tol (default TOLERANCE[dtype]) of
    expected's scale."""
    tol = TOLERANCE[dtype] if tol is None else tol
    if isinstance(expected, tuple):
        return max(assert_matches(a, e, dtype, f"{what} ({part})", tol)
                   for a, e, part in zip(actual, expected, ("sample terms", "class terms")))
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    # Below the smallest normal of the output dtype a value cannot be compared relatively (BicKD gradients at
    # logit scale 100 reach 1e-67 in float64, which float32 returns as 0).
    atol = max(2.0 ** -24 if dtype == torch.float16 else 0.0, torch.finfo(dtype).tiny)
    assert err <= tol * scale + atol, f"{what}: max error {err:.3e} > {tol:g} x scale {scale:.3e}"
    return err / scale if scale else 0.0


def check_against_oracle(config, student, teacher, dtype=None, scale=1.0, module=None, **extra):
    """Runs `module`'s op (default: the fused ckd_ext) on (student, teacher) and the oracle on their float64
    copies; compares both the loss and the gradient. Returns the relative errors."""
    import ckd_ext
    from ckd_ext import reference as ref

    module = module or ckd_ext
    dtype = dtype or student.dtype
    tol = tolerance(dtype, scale)
    s = student.detach().to(dtype).requires_grad_()
    t = teacher.detach().to(dtype)
    loss, grad = loss_and_grad(module, config, s, t, **extra)
    s64 = s.detach().double().requires_grad_()
    loss64, grad64 = loss_and_grad(ref, config, s64, t.double(), **extra)
    mask = extra.get("mask")
    one_valid_row = student.shape[0] == 1 or (mask is not None and int(mask.sum()) == 1)
    if CONFIGS[config][0] != "kd" and (student.shape[-1] == 1 or one_valid_row):
        # The exact gradient is 0: with one class, normalised rows are +-1 (CKD) and softmaxes are 1
        # (BicKD); with one valid row, CKD and BicKD's sample side have no negative and BicKD's class
        # columns are all the same unit vector. The float64 oracle returns rounding residue near 1e-17, the
        # float32 op rounding of O(1 / tau) terms that cancel: both must be ~0.
        assert grad64.abs().max().item() <= 1e-12
        assert grad.abs().max().item() <= 1e-6
        grad64, grad = torch.zeros_like(grad64), torch.zeros_like(grad)
    return (assert_matches(loss, loss64, dtype, f"{config} loss", tol),
            assert_matches(grad, grad64, dtype, f"{config} grad", tol))



# ===================================================================================================================
# The tolerance model: how far a fused result may be from the float64 oracle, element by element.
# ===================================================================================================================
# The oracle (ckd_ext.reference in float64) runs on the same, already rounded, inputs as the fused op, so input
# rounding is no error. What separates the two results, for each element (a loss term, a loss, a gradient entry):
#
#   |actual - expected| <= (1 + u_out) E_compute + u_out |expected| + spacing_out / 2 + E_oracle             (*)
#
# * E_compute bounds the rounding error of the fused computation, which accumulates in float32 for float32 and
#   16-bit students and in float64 for float64 students (unit roundoff u = 2^-24 or 2^-53). It is derived for each
#   loss below from what limits it:
#   - the magnitude of the softmax arguments: rounding an argument x (s / T, a cosine / tau) is an absolute error
#     ~|x| u, and exp turns an absolute error of its argument into the same relative error of its result, so every
#     probability carries a relative error ~(max |argument|) u: max|logit| / T for KD and BicKD's softmaxes, 1 / tau
#     for the contrastive (cosine / tau) log-sum-exps;
#   - the length of the sums (acc(n) below);
#   - the conditioning of the result: each loss term is bounded by its sensitivity to those perturbations
#     (sum_j |d term / d argument_j| * error_j), so a term that is small because student and teacher agree (KL near
#     0, a positive that dominates its row) is bounded relative to that agreement, not to 1 / tau or T^2: the
#     rounding of the arguments themselves allows that accuracy, so less is a defect of the algorithm. Gradient
#     entries are bounded by the "absolute-value" backward, the backward formulas of docs/math.md with every
#     coefficient and operand replaced by its magnitude, so cancellations (p - q, the projection of the
#     normalisation, the softmax backward) are bounded relative to the terms that cancel.
# * u_out |expected| + spacing_out / 2 is the single final rounding of the result to the student's dtype (u_out =
#   2^-11 for float16, 2^-8 for bfloat16): relative for normal numbers, and half the subnormal spacing below the
#   smallest normal (float16: 2^-25 = 3e-8), where a rounded value is a multiple of that spacing. Checking each
#   element against this, rather than the error against the largest element, is what catches precision lost on
#   small entries (float16 gradients that are all subnormal, one large entry next to many small ones). The factor
#   (1 + u_out) on E_compute: what is rounded is the fused float32 value, not the exact one.
# * E_oracle is the oracle's own float64 error: the same analysis with u = 2^-53 and the oracle's own algorithm
#   (softmax materialised, log-sum-exp minus positive, autograd), which is not conditioning-aware: its bounds use the
#   plain magnitudes (1 + pi instead of 1 - pi, 1 + sum q |log q - log p| instead of the KD sensitivity).
#
# Constants, each from the operation count of the computation it bounds (docs/math.md section 6 describes it):
# * acc(n) = SUM_LAMBDA sqrt(n): a sum of n rounded terms errs by at most (n - 1) u sum |terms|, but the rounding
#   errors are independent and of mean ~0, so the error exceeds lambda sqrt(n) u sum |terms| with probability at most
#   2 exp(-lambda^2 / 2) (Higham & Mary, SIAM J. Sci. Comput. 2019). lambda = 6 makes that 3e-8 per sum, so that the
#   millions of sums of a fuzzing run stay inside; blocked GEMMs and the CPU kernels' 4-way partial sums only make
#   the effective n smaller.
# * Argument and log-sum-exp errors: see each loss's function; the integers there count roundings.
# * UNDERFLOW: the float32 kernels' exp returns 0 below e^-87 = 1.6e-38 (fast_exp on the CPU clamps there), so a
#   value of that size may come back as 0; 2e-38 covers the clamp (in float64, exp is exact to its subnormals).
UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
                 torch.bfloat16: 2.0 ** -8}
SUBNORMAL_SPACING = {torch.float64: 2.0 ** -1074, torch.float32: 2.0 ** -149, torch.float16: 2.0 ** -24,
                     torch.bfloat16: 2.0 ** -133}
UNDERFLOW = {torch.float32: 2e-38, torch.float64: 1e-300}
SUM_LAMBDA = 6.0
U64 = UNIT_ROUNDOFF[torch.float64]


def compute_for_unit(unit):
    """The accumulation dtype whose unit roundoff is `unit` (for its UNDERFLOW)."""
    return torch.float64 if unit == U64 else torch.float32


def acc(n):
    """Error factor of a sum of n terms, in units of u * sum |terms| (see SUM_LAMBDA)."""
    return SUM_LAMBDA * math.sqrt(max(n, 1))


class Bound(NamedTuple):
    """Element-wise error bounds (broadcastable to the result): of the fused computation and of the oracle."""

    compute: torch.Tensor
    oracle: torch.Tensor


def anchor_weights(reduction, upstream, count):
    """Per-term upstream weights w (docs/math.md section 2): g / count for "mean", g for "sum", g_i for "none"."""
    upstream = upstream.double()
    if reduction == "none":
        return upstream.reshape(-1)
    return upstream.reshape(()) / (max(count, 1) if reduction == "mean" else 1)


def _reduced(terms, bounds, reduction, divisor, u):
    """The bound of a reduced loss from its terms' bounds: sum_i E_i, plus the rounding of the sum (acc(n) u
    sum |terms|) and of the division (2 u |sum|), divided by the divisor for "mean"."""
    if reduction == "none":
        return bounds
    c = 1.0 / max(divisor, 1) if reduction == "mean" else 1.0
    return c * (bounds.sum() + u * (acc(terms.numel()) + 2) * terms.abs().sum())


def _one_minus_diagonal(pi, dim):
    """1 - pi_ii for a softmax pi along `dim`, without cancellation: the sum of the off-diagonal entries (the
    diagonal is zeroed for the sum and put back, to spare a copy of a C x C matrix)."""
    diagonal = pi.diagonal().clone()
    pi.diagonal().zero_()
    off = pi.sum(dim=dim)
    pi.diagonal().copy_(diagonal)
    return off


def _row_finite_max(*xs):
    """max |x| over the finite entries of each row of every x (a -inf teacher logit is no argument of any exp)."""
    m = torch.zeros(xs[0].shape[0], dtype=torch.float64)
    for x in xs:
        m = torch.maximum(m, torch.where(torch.isfinite(x), x.abs(), torch.zeros_like(x)).amax(dim=1))
    return m


def _kd_bounds(s, t, temperature, w, u):
    """KD on valid rows s, t (float64): (term bounds, gradient bounds) for unit roundoff u, and the oracle's.

    With x = s / T, y = t / T, A = max |x|, |y| of the row (finite entries):
    * log p_j = x_j - LSE(x): x_j = s_j * (1/T) rounds twice (2uA); LSE = m + log sum exp(x - m) inherits the error of
      its max m (2uA), rounds once on |LSE| <= A + log C and its sum errs by acc(C) u (relative, so absolute in the log,
      plus u log C for the log); the subtraction rounds on |x_j - LSE| <= 2A + log C. In all u (7A + 2 log C + acc(C)),
      and exp adds 2u (libm / fast_exp, ~1 ulp): eps = u (7A + 2 log C + acc(C) + 2) is the relative error of every
      p_j, q_j and the absolute error of every log-probability.
    * The term T^2 KL has d KL / d x_j = p_j - q_j and d KL / d y_j = q_j (log q_j - log p_j - KL): perturbing the
      arguments by eps moves it by T^2 eps (sum |p - q| + sum q |log q - log p - KL|), which vanishes as p -> q. The
      rounding of LSE(y) is no such perturbation: it shifts every log q_j alike, a common relative error of the q_j
      (whose sum is then not 1), which scales the terms q_j (log q_j - log p_j): eps sum q |log q - log p|, which
      vanishes as p -> q too (that of LSE(x) is one of log p_j - log q_j and is in the first term). On top: the
      rounding of sum_j q_j (log q_j - log p_j) (acc(C) u sum q |log q - log p|), 3 roundings of T^2 KL, and the
      second-order remainder: KL is quadratic in the log-ratios near p = q (sum q (e^d - 1 - d) <= d^2 for |d| <= 1),
      and perturbed log-ratios are off by up to 2 eps, so T^2 (2 eps)^2 / 2 = 2 T^2 eps^2 (a KL that is exactly 0,
      C = 1, comes back as ~eps^2 from an accurate algorithm).
    * The gradient w T (p_j - q_j) errs by w T (p_j + q_j) eps (p and q from independent arguments: nothing cancels
      their errors) + 4u |w T (p - q)| (w / n, w T, the difference, the product) + w T UNDERFLOW (a flushed p or q).
    """
    C = s.shape[1]
    x, y = s / temperature, t / temperature
    lp, lq = torch.log_softmax(x, dim=1), torch.log_softmax(y, dim=1)
    p, q = lp.exp(), lq.exp()
    a = _row_finite_max(x, y)[:, None]
    dlog = torch.where(q > 0, lq - lp, torch.zeros_like(q))  # classes with q = 0 take no part in the KL
    kl = (q * dlog).sum(dim=1, keepdim=True)
    t2 = temperature ** 2
    out = []
    for unit, oracle in ((u, False), (U64, True)):
        eps = unit * (7 * a + 2 * math.log(C) + acc(C) + 2)
        if oracle:  # the oracle sums q (log q - log p) from independently rounded logs: absolute error eps per row
            term = t2 * eps * (1 + (q * dlog.abs()).sum(dim=1, keepdim=True)) + 3 * unit * t2 * kl.abs()
        else:
            mass = (q * dlog.abs()).sum(dim=1, keepdim=True)  # sum q |log q - log p|
            sensitivity = (p - q).abs().sum(dim=1, keepdim=True) + (q * (dlog - kl).abs()).sum(dim=1, keepdim=True)
            term = t2 * (eps * (sensitivity + mass) + unit * acc(C) * mass + 2 * eps ** 2) + 3 * unit * t2 * kl.abs()
        wt = (w.abs() * temperature).reshape(-1, 1) if w.dim() else w.abs() * temperature
        grad = wt * ((p + q) * eps + 4 * unit * (p - q).abs() + UNDERFLOW[compute_for_unit(unit)])
        out.append((term.reshape(-1), grad))
    return t2 * kl.reshape(-1), out


# The fused kernels compute each contrastive term as softplus(LSE_{j != i} z_ij - z_ii) and the positive's 1 - pi_ii
# as sigmoid of the same (kernels/scalar_math.h), so their error is relative to 1 - pi_ii where a positive dominates
# its row; the oracle computes the textbook LSE_i - z_ii and pi_ii - 1, whose error is absolute, eps_pi (1 + |term|).
# (The fuzzer found the textbook form's loss in the kernels: a term of 6e-10 returned as 0 at tau = 0.05.)

def _ckd_bounds(s, t, tau, anchor, w, u, u_operand=0.0, operand_floor=0.0):
    """CKD on valid rows s, t (float64). z are the candidate logits of each anchor row (docs/math.md section 4),
    pi = softmax_row(z), n the valid rows.
    * z_ij = <t_i, s_j> (1/|t_i|) (1/|s_j|) (1/tau): the dot product errs by acc(C) u |t_i| |s_j|, each inverse norm
      by (acc(C) / 2 + 2) u relative (a sum of squares, sqrt, reciprocal), and 3 scalings round: |dz| <= eps_z =
      u (2 acc(C) + 7) / tau (cosines are <= 1). The student anchor's normalised operands give the same count.
    * pi_ij = exp(z_ij - LSE_i): z_ij and LSE_i (its max, +- eps_z) err by eps_z each, the subtraction (|z - LSE| <=
      2 / tau + log n) and LSE = max + log sum (|max| <= 1 / tau, |log sum| <= log n, sum: acc(n)) round, exp adds 2u:
      eps_pi = 2 eps_z + u (3 / tau + 2 log n + acc(n) + 2), relative, also of 1 - pi_ii = sum_{j != i} pi_ij.
    * The term LSE_i - z_ii: d term / d z_ij = pi_ij - delta_ij, so it moves by sum_j |pi_ij - delta_ij| eps_z
      = 2 (1 - pi_ii) eps_z under argument errors, and the log-sum-exp's own roundings are relative to 1 - pi_ii when
      computed as log(1 + sum_{j != i} exp(z_ij - z_ii)): bound (1 - pi_ii) eps_pi + u term.
    * Gradient: dv = sum of coefficients w (pi - delta) / tau times unit rows (docs/math.md 4.3), each coefficient
      with relative error eps_pi (the positive's, w_i (pi_ii - 1) / tau, relative to 1 - pi_ii), the product summing
      n terms (acc(n)) of rows loaded normalised (acc(C) + 2); then ds = (dv - <dv, v> v) / |s| (the dot: acc(C);
      3 more roundings): |d ds_jc| <= eps_g R_jc, eps_g = eps_pi + u (acc(n) + 2 acc(C) + 8), with R the same
      expression on magnitudes: R_jc = (D_jc + (sum_c' D_jc' |v_jc'|) |v_jc|) / |s_j| (D / eps where the norm is
      clamped), D = sum_i |coefficient_ij| |operand_i|. A flushed pi (< UNDERFLOW) adds up to n UNDERFLOW w / tau.
    * Tensor cores (`u_operand`: the 16-bit unit roundoff where the products take 16-bit rows): the product's fp32
      coefficients are rounded to the 16-bit dtype (csrc/orchestration/gemm.h), eps_g + u_operand; in fp16, below
      each coefficient row's power-of-two scale, also by `operand_floor` (half the subnormal spacing) times that
      scale. The GEMM multiplies raw rows x_j (t for teacher anchors, s for student anchors) by coefficients carrying
      their inverse norms, so that scale is max over the nonzero rows j of |coefficient_kj| / |x_j| (zero rows are
      left out), and D_floor = operand_floor (that max) sum_j |x_j| (in the units of D), at most D itself (a
      flushed term is lost, no more), through the same normalisation.
    """
    n, C = s.shape
    rs = s.norm(dim=1).clamp_min(EPS)
    rt = t.norm(dim=1).clamp_min(EPS)
    clamped = (s.norm(dim=1) < EPS)[:, None]
    v, uu = s / rs[:, None], t / rt[:, None]
    if anchor == "teacher":
        z = uu @ v.T / tau
    else:
        z = v @ v.T / tau
        z.diagonal().copy_((uu * v).sum(dim=1) / tau)
    lse = torch.logsumexp(z, dim=1)
    pi = torch.exp(z - lse[:, None])
    one_minus = _one_minus_diagonal(pi, dim=1)
    terms = lse - z.diagonal()
    w = w.expand(n) if w.dim() == 0 else w
    out = []

    def through_normalisation(d):
        return torch.where(clamped, d / EPS, (d + (d * v.abs()).sum(dim=1, keepdim=True) * v.abs()) / rs[:, None])

    for unit, oracle in ((u, False), (U64, True)):
        operand = 0.0 if oracle else u_operand
        eps_z = unit * (2 * acc(C) + 7) / tau
        eps_pi = 2 * eps_z + unit * (3 / tau + 2 * math.log(n) + acc(n) + 2)
        if oracle:  # logsumexp - positive: absolute error eps_pi; autograd's positive coefficient pi_ii - 1
            term = eps_pi * (1 + terms.abs()) + unit * terms.abs()
            diagonal = pi.diagonal() + 1
        else:
            term = one_minus * eps_pi + unit * terms.abs()
            diagonal = one_minus
        coef = pi.clone()
        coef.diagonal().copy_(diagonal)
        coef = coef * w.abs()[:, None] / tau  # |w_i (pi_ij - delta_ij)| / tau, anchor i, candidate j
        if anchor == "teacher":
            products, rows, raw, raw_norms = coef.T, uu.abs(), t, rt
            d = products @ rows
        else:
            diag = coef.diagonal().clone()
            sym = coef.clone()
            sym.diagonal().zero_()
            products, rows, raw, raw_norms = sym + sym.T, v.abs(), s, rs  # (w_k pi_kj + w_j pi_jk) / tau, j != k
            d = products @ rows + diag[:, None] * uu.abs()
        r = through_normalisation(d)
        eps_g = eps_pi + unit * (acc(n) + 2 * acc(C) + 8) + operand
        flush = n * UNDERFLOW[compute_for_unit(unit)] * w.abs().max() / tau / rs[:, None]
        if operand and operand_floor:
            live = (raw.abs().amax(dim=1) > 0)[None, :]
            scale = torch.where(live, products / raw_norms[None, :], torch.zeros_like(products)).amax(dim=1,
                                                                                                  keepdim=True)
            floor = operand_floor * scale * raw.abs().sum(dim=0, keepdim=True)
            flush = flush + through_normalisation(torch.minimum(floor, products @ rows))
        out.append((term, eps_g * r + flush))
    return terms, out


def _contrast_side(z, w, symmetric):
    """One BicKD side on its square logit matrix z (positives on the diagonal), anchors weighted by w. Returns the
    unweighted terms, 1 - pi_ii (averaged with the column twin's for symmetric), the coefficient magnitudes
    |d loss / d z| * tau with the positive's as 1 - pi_ii, and what the oracle's (autograd's pi_ii - 1, as 1 + pi_ii)
    adds on the diagonal."""
    lse_r = torch.logsumexp(z, dim=1)
    pi_r = torch.exp(z - lse_r[:, None])
    om_r = _one_minus_diagonal(pi_r, dim=1)
    terms = lse_r - z.diagonal()
    w = w.abs()
    extra = (pi_r.diagonal() + 1 - om_r) * w
    coef = pi_r.mul_(w[:, None])  # in place: the C x C matrices are the bulk of the work
    coef.diagonal().copy_(om_r * w)
    om = om_r
    if symmetric:
        lse_c = torch.logsumexp(z.T, dim=1)
        pi_c = torch.exp(z - lse_c[None, :])
        om_c = _one_minus_diagonal(pi_c, dim=0)
        terms = 0.5 * (terms + lse_c - z.diagonal())
        extra = 0.5 * (extra + (pi_c.diagonal() + 1 - om_c) * w)
        pi_c.mul_(w[None, :])
        pi_c.diagonal().copy_(om_c * w)
        coef.add_(pi_c).mul_(0.5)
        om = 0.5 * (om_r + om_c)
    return terms, om, coef, extra


def _bickd_bounds(s, t, temperature, tau, w_sample, w_class, symmetric, ws, wc, u, u_operand=0.0,
                  operand_floor=0.0):
    """BicKD on valid rows s, t (float64) (docs/math.md section 5). A = max |logit| / T over the valid rows (the
    columns mix all of them).
    * Row entries (section 6.4): log P_ic = x_ic - LSE1_i errs by u (7A + 2 log C + acc(C)) (as in KD), and p_ic =
      exp(x_ic - LSE2_i / 2) the same (LSE2 of 2x: half of its error on arguments up to 2A): with exp's 2u,
      eps_row = u (7A + 2 log C + acc(C) + 2) is the relative error of every P_ic, p_ic, q_ic.
    * Column entries: pbar_ic = exp(log P_ic - log|P_.c|), log|P_.c| = LSE_i(2 log P_ic) / 2 over the n rows: the
      arguments carry twice log P's error, the LSE rounds on |LSE| <= 2 (2A + log C) + log n and sums n terms, the
      last subtraction rounds on |log P - log|P_.c|| <= 2A + log C: eps_col = u (18A + 6 log C + log n + 2 acc(C) +
      acc(n) + 2) for every pbar_ic, qbar_ic.
    * Cosines of non-negative vectors have no cancellation: A_ik = <p_i, q_k> / tau errs by at most
      (2 eps_row + u (acc(C) + 2)) A_ik <= eps_zA = (2 eps_row + u (acc(C) + 2)) / tau (the sum, the scaling by
      1/tau); G_cd = <pbar_c, qbar_d> / tau likewise with eps_col and acc(n): eps_zG. Their log-sum-exps as in CKD:
      eps_pi = 2 eps_z + u (3 / tau + 2 log m + acc(m) + 2), m = n (sample side) or C (class side); each term is
      bounded by (1 - pi_ii) eps_pi (averaged with the twin's for symmetric) + u term.
    * Gradient: the absolute-value backward of section 5.3: Dp = |coefA| q, DP = (Dp + <Dp, p> p) / |P_i| +
      (Dpbar + <Dpbar, pbar>_c pbar) / |P_.c| (Dpbar / eps where clamped), Ds = P (DP + <P, DP>) / T; the
      coefficients carry eps_pi, the operands q or qbar, p or pbar, and P one entry error each (eps_row + eps_row or
      eps_col + eps_col, and eps_row), the products and dots sum n or C terms (twice each), 10 roundings:
      eps_g = max(eps_piA, eps_piG) + 3 eps_row + 2 eps_col + u (2 acc(n) + 2 acc(C) + 10).
      Where P_ic < UNDERFLOW the float32 kernels may return 0: the whole Ds_ic; a flushed coefficient (pi <
      UNDERFLOW) adds at most (n sqrt(C) max ws + C max wc) UNDERFLOW / (tau T), twice.
    * Tensor cores (`u_operand`, the 16-bit unit roundoff where the GEMMs take 16-bit operands): every p, q, pbar,
      qbar entry is rounded once more before its GEMM (eps_row, eps_col + u_operand in the cosines), and each
      product's fp32 coefficients and 16-bit operand rows carry one rounding each (eps_g + 2 u_operand). fp16's
      subnormals (`operand_floor`, absolute, for entries <= 1) add at most 2 operand_floor sqrt(depth) to a cosine
      of unit vectors, counted as a relative error of the same size.
    """
    n, C = s.shape
    x, y = s / temperature, t / temperature
    a = max(x.abs().max().item(), y.abs().max().item())
    P, Q = torch.softmax(x, dim=1), torch.softmax(y, dim=1)
    p = P / P.norm(dim=1, keepdim=True).clamp_min(EPS)
    q = Q / Q.norm(dim=1, keepdim=True).clamp_min(EPS)
    row_norm = P.norm(dim=1, keepdim=True).clamp_min(EPS)
    col_norm_raw = P.norm(dim=0, keepdim=True)
    col_clamped = col_norm_raw < EPS
    col_norm = col_norm_raw.clamp_min(EPS)
    pbar = P / col_norm
    qbar = Q / Q.norm(dim=0, keepdim=True).clamp_min(EPS)
    za = p @ q.T / tau
    zg = pbar.T @ qbar / tau
    ws = (ws.expand(n) if ws.dim() == 0 else ws) * (w_sample != 0)
    wc = (wc.expand(C) if wc.dim() == 0 else wc) * (w_class != 0)
    smp, om_a, coef_a, extra_a = _contrast_side(za, ws, symmetric)
    cls, om_g, coef_g, extra_g = _contrast_side(zg, wc, symmetric)

    def abs_backward(dp, dpbar):  # Ds from the magnitudes of dL/dp and dL/dpbar (section 5.3, see above)
        dP = (dp + (dp * p).sum(dim=1, keepdim=True) * p) / row_norm
        dP = dP + torch.where(col_clamped, dpbar / EPS,
                              (dpbar + (dpbar * pbar).sum(dim=0, keepdim=True) * pbar) / col_norm)
        return P * (dP + (P * dP).sum(dim=1, keepdim=True)) / temperature

    dp, dpbar = (coef_a / tau) @ q, qbar @ (coef_g / tau).T
    ds = abs_backward(dp, dpbar)
    # The oracle's coefficients differ on the diagonal only: add that part (linear in the diagonal).
    ds_oracle = abs_backward(dp + (extra_a / tau)[:, None] * q, dpbar + qbar * (extra_g / tau)[None, :])
    out = []
    for unit, scale, oracle in ((u, ds, False), (U64, ds_oracle, True)):
        operand = 0.0 if oracle else u_operand
        floor_row, floor_col = ((0.0, 0.0) if oracle or not u_operand else
                                (2 * operand_floor * math.sqrt(C), 2 * operand_floor * math.sqrt(n)))
        eps_row = unit * (7 * a + 2 * math.log(C) + acc(C) + 2)
        eps_col = unit * (18 * a + 6 * math.log(C) + math.log(n) + 2 * acc(C) + acc(n) + 2)
        eps_pi_a = (2 * (2 * (eps_row + operand) + floor_row + unit * (acc(C) + 2)) / tau
                    + unit * (3 / tau + 2 * math.log(n) + acc(n) + 2))
        eps_pi_g = (2 * (2 * (eps_col + operand) + floor_col + unit * (acc(n) + 2)) / tau
                    + unit * (3 / tau + 2 * math.log(C) + acc(C) + 2))
        if oracle:  # logsumexp - positive: absolute error eps_pi
            smp_bound = eps_pi_a * (1 + smp.abs()) + unit * smp.abs()
            cls_bound = eps_pi_g * (1 + cls.abs()) + unit * cls.abs()
        else:
            smp_bound = om_a * eps_pi_a + unit * smp.abs()
            cls_bound = om_g * eps_pi_g + unit * cls.abs()
        eps_g = (max(eps_pi_a, eps_pi_g) + 3 * eps_row + 2 * eps_col + 2 * operand + floor_row + floor_col
                 + unit * (2 * acc(n) + 2 * acc(C) + 10))
        floor = UNDERFLOW[compute_for_unit(unit)]
        flush = 2 * (n * math.sqrt(C) * ws.abs().max() + C * wc.abs().max()) * floor / (tau * temperature)
        grad = eps_g * scale + torch.where(P < floor, scale, torch.zeros_like(scale)) + flush
        out.append((w_sample * smp_bound, w_class * cls_bound, grad))
    return w_sample * smp, w_class * cls, out


def _tensor_core_operand_roundoff(student, tensor_cores):
    """The unit roundoff of the 16-bit operands the GEMMs take on tensor cores (a 16-bit student on a CUDA device or
    the emulated backend, csrc/orchestration/gemm.h: CKD's coefficients, BicKD's blocks and coefficients), else 0.
    `tensor_cores` None: whether the student is on a CUDA device or the emulated backend is on now."""
    import ckd_ext
    if tensor_cores is None:
        tensor_cores = student.device.type == "cuda" or ckd_ext.require_extension().emulated_cuda()
    sixteen_bit = student.dtype in (torch.float16, torch.bfloat16)
    return UNIT_ROUNDOFF[student.dtype] if sixteen_bit and tensor_cores else 0.0


def _operand_floor(student):
    """Half the subnormal spacing of a 16-bit operand dtype (the absolute rounding of values below its smallest
    normal, relative to a row's power-of-two scale where the policy scales: fp16 2^-25, bf16 negligible)."""
    return SUBNORMAL_SPACING[student.dtype] / 2 if student.dtype in (torch.float16, torch.bfloat16) else 0.0


def _error_bounds(loss, student, teacher, *, mask=None, reduction="mean", upstream, hyper, tensor_cores=None):
    """error_bounds without the underflow floor."""
    u_operand = _tensor_core_operand_roundoff(student, tensor_cores)
    cdtype = accumulation_dtype(student.dtype)
    u = UNIT_ROUNDOFF[cdtype]
    s_all = student.detach().cpu().double().reshape(-1, student.shape[-1])
    t_all = teacher.detach().cpu().double().reshape(-1, student.shape[-1])
    rows, C = s_all.shape
    valid = torch.ones(rows, dtype=torch.bool) if mask is None else mask.cpu().reshape(-1)
    s, t = s_all[valid], t_all[valid]
    n = s.shape[0]
    grad = [torch.zeros(rows, C, dtype=torch.float64) for _ in range(2)]

    def rows_of(x):  # per-row upstream weights restricted to the valid rows
        return x[valid] if x.dim() else x

    if loss == "bickd":
        up_s, up_c = upstream if reduction == "none" else (upstream, upstream)
        ws = rows_of(anchor_weights(reduction, up_s, n)) * hyper.get("w_sample", 1.0)
        wc = anchor_weights(reduction, up_c, C) * hyper.get("w_class", 1.0)
        w_sample, w_class = hyper.get("w_sample", 1.0), hyper.get("w_class", 1.0)
        bounds = []
        if n == 0:  # every loss and gradient is exactly 0 (docs/math.md section 2)
            smp, cls = torch.zeros(0, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
            parts = [(smp, cls, grad[0][valid]) for _ in range(2)]
        else:
            smp, cls, parts = _bickd_bounds(s, t, hyper.get("temperature", 4.0), hyper.get("tau", 0.1), w_sample,
                                            w_class, hyper.get("symmetric", False), ws, wc, u, u_operand,
                                            _operand_floor(student))
        for k, (unit, (smp_b, cls_b, g)) in enumerate(zip((u, U64), parts)):
            grad[k][valid] = g
            if reduction == "none":
                full = torch.zeros(rows, dtype=torch.float64)
                full[valid] = smp_b
                bounds.append((full.reshape(student.shape[:-1]), cls_b))
            else:
                b = (_reduced(smp, smp_b, reduction, n, unit) + _reduced(cls, cls_b, reduction, C, unit))
                total = (smp.sum() / (max(n, 1) if reduction == "mean" else 1)
                         + cls.sum() / (C if reduction == "mean" else 1))
                bounds.append(b + 2 * unit * total.abs())
        grad_bound = Bound(grad[0].reshape(student.shape), grad[1].reshape(student.shape))
        if reduction == "none":
            return (Bound(bounds[0][0], bounds[1][0]), Bound(bounds[0][1], bounds[1][1])), grad_bound
        return Bound(bounds[0], bounds[1]), grad_bound

    w = rows_of(anchor_weights(reduction, upstream, n))
    term_bounds = [torch.zeros(0, dtype=torch.float64)] * 2
    terms = torch.zeros(0, dtype=torch.float64)
    if n > 0:
        if loss == "kd":
            terms, parts = _kd_bounds(s, t, hyper.get("temperature", 4.0), w, u)
        else:
            terms, parts = _ckd_bounds(s, t, hyper.get("tau", 1.0), hyper.get("anchor", "student"), w, u,
                                       u_operand, _operand_floor(student))
        term_bounds = []
        for k, (tb, g) in enumerate(parts):
            grad[k][valid] = g
            term_bounds.append(tb)
    loss_bounds = []
    for unit, tb in zip((u, U64), term_bounds):
        if reduction == "none":
            full = torch.zeros(rows, dtype=torch.float64)
            full[valid] = tb
            loss_bounds.append(full.reshape(student.shape[:-1]))
        else:
            loss_bounds.append(_reduced(terms, tb, reduction, n, unit))
    return Bound(*loss_bounds), Bound(grad[0].reshape(student.shape), grad[1].reshape(student.shape))


def error_bounds(loss, student, teacher, *, mask=None, reduction="mean", upstream, hyper, tensor_cores=None):
    """Element-wise bounds (Bound(compute, oracle)) of the loss output(s) and of the student gradient of the fused
    `loss` ("kd", "ckd" or "bickd", keyword arguments `hyper`) against the float64 oracle, for rounded inputs
    `student`, `teacher` (any dtype, any device; rows with mask False may hold anything) and upstream gradient
    `upstream` (a scalar for "mean" and "sum", the per-term weights for "none"; for BicKD "none" the pair (per
    sample, per class)). Returns (loss bound, or a pair of bounds for BicKD "none"; gradient bound (N, C)).

    Every bound derived above is relative (u |value|) per operation, which gradual underflow breaks: an operation whose
    result is below the smallest normal errs by up to half the subnormal spacing, absolutely (BicKD weights of
    5e-324 give subnormal float64 losses). Each computed element depends on at most N + C + 8 operations (a sum over
    the rows or the classes, a few scalings), so that many spacings of the compute (and of the oracle's float64) are
    added; elements that are not computed (masked rows, an empty batch) keep their bound of 0: they must be 0.
    `tensor_cores`: whether the op ran on a tensor-core backend (CUDA, emulated), where 16-bit GEMM operands add
    their rounding; None: as the student's device and the current backend say."""
    loss_bound, grad_bound = _error_bounds(loss, student, teacher, mask=mask, reduction=reduction, upstream=upstream,
                                           hyper=hyper, tensor_cores=tensor_cores)
    rows, C = student.reshape(-1, student.shape[-1]).shape
    valid = torch.ones(rows, dtype=torch.bool) if mask is None else mask.cpu().reshape(-1)
    ops = rows + C + 8
    spacing = (SUBNORMAL_SPACING[accumulation_dtype(student.dtype)] * ops, SUBNORMAL_SPACING[torch.float64] * ops)
    any_valid = float(bool(valid.any()))

    def floored(bound, computed):
        return Bound(bound.compute + spacing[0] * computed, bound.oracle + spacing[1] * computed)

    row_computed = valid.double().reshape(student.shape[:-1])
    grad_bound = floored(grad_bound, row_computed.unsqueeze(-1))
    if isinstance(loss_bound, Bound):
        loss_bound = floored(loss_bound, row_computed if reduction == "none" else any_valid)
    else:  # BicKD "none": (per sample, per class)
        loss_bound = (floored(loss_bound[0], row_computed), floored(loss_bound[1], any_valid))
    return loss_bound, grad_bound


def check_within(actual, expected, bound, dtype, what):
    """Compares `actual` (the fused result, of dtype `dtype`) with the float64 `expected` by (*) above.
    Returns (max of error / allowed, None) or (that, (kind, message)) with kind "oracle" (the oracle itself is not
    finite), "non-finite" (the fused result is NaN or inf where a finite value is expected) or "bound"."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    a = actual.detach().cpu().double()
    e = expected.detach().cpu().double()
    if not torch.isfinite(e).all():
        return math.inf, ("oracle", f"{what}: the float64 oracle is not finite at {_where(~torch.isfinite(e))}")
    u_out = UNIT_ROUNDOFF[dtype]
    compute = torch.as_tensor(bound.compute, dtype=torch.float64).cpu()
    oracle = torch.as_tensor(bound.oracle, dtype=torch.float64).cpu()
    allowed = (1 + u_out) * compute + u_out * e.abs() + SUBNORMAL_SPACING[dtype] / 2 + oracle
    allowed = allowed.expand_as(e)
    err = (a - e).abs()
    # A value beyond the dtype's range rounds to inf (float16 gradients of a clamped zero-norm row, 1 / eps = 1e12
    # times dv): accept +inf (-inf) where the exact value plus (minus) its allowance reaches the overflow threshold
    # (the largest finite value plus half its spacing, max (1 + u_out / 2)).
    overflow = torch.finfo(dtype).max * (1 + u_out / 2)
    inf_ok = ((a == math.inf) & (e + allowed >= overflow)) | ((a == -math.inf) & (e - allowed <= -overflow))
    ok = (err <= allowed) | inf_ok
    ratio = torch.where(inf_ok | (err == 0), torch.zeros_like(err), err / allowed)
    worst = ratio.nan_to_num(math.inf).max().item() if ratio.numel() else 0.0
    if ok.all():
        return worst, None
    bad = ~ok
    kind = "non-finite" if (bad & ~torch.isfinite(a)).any() else "bound"
    flat = torch.where(bad, ratio.nan_to_num(math.inf), torch.full_like(ratio, -1.0)).reshape(-1)
    i = int(flat.argmax())
    index = tuple(int(k) for k in torch.unravel_index(torch.tensor(i), e.shape)) if e.dim() else ()
    msg = (f"{what}: {int(bad.sum())} of {e.numel()} elements outside the bound; worst at {index}: "
           f"actual {a.reshape(-1)[i].item():.6e}, expected {e.reshape(-1)[i].item():.6e}, "
           f"error {err.reshape(-1)[i].item():.3e} > allowed {allowed.reshape(-1)[i].item():.3e} "
           f"(compute {compute.expand_as(e).reshape(-1)[i].item():.3e}, rounding to {dtype} "
           f"{u_out * abs(e.reshape(-1)[i].item()) + SUBNORMAL_SPACING[dtype] / 2:.3e}, "
           f"oracle {oracle.expand_as(e).reshape(-1)[i].item():.3e}); error / allowed = {ratio.reshape(-1)[i].item():.3g}")
    return worst, (kind, msg)


def _where(bad):
    idx = bad.nonzero()
    return f"{len(idx)} elements, first {tuple(idx[0].tolist()) if len(idx) else ()}"


def assert_within(actual, expected, bound, dtype, what):
    """check_within as an assertion; returns the max ratio error / allowed."""
    ratio, failure = check_within(actual, expected, bound, dtype, what)
    assert failure is None, failure[1]
    return ratio
