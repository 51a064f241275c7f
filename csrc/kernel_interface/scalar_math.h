// Scalar math every backend's kernels share: host code (CPU kernels), device code under nvcc (CUDA kernels) and
// host code again under the CPU emulator. One definition of each rule (max-shifted merges, the norm clamp, how a
// symmetric tile reads) so that the backends cannot drift apart.
#pragma once
#include <math.h>

#include <cstdint>
#include <limits>

#include "kernel_interface/types.h"

#if defined(__CUDACC__)
#define CKD_HOST_DEVICE __host__ __device__ __forceinline__
#define CKD_HOST_DEVICE_FLATTEN CKD_HOST_DEVICE
#else
#define CKD_HOST_DEVICE inline
// Inlined into its caller whatever its size: a function whose switch folds away for a constant argument (the CPU
// kernels call divergence_term with a compile-time kind) is only small once inlined.
#define CKD_HOST_DEVICE_FLATTEN inline __attribute__((always_inline))
#endif
// Fully unrolls the constant-length loop that follows (the series below), which would otherwise stop the CPU kernels'
// loops around them from vectorising.
#if defined(__CUDACC__)
#define CKD_UNROLL _Pragma("unroll")
#else
#define CKD_UNROLL _Pragma("GCC unroll 32")
#endif

namespace ckd {

template <typename Acc>
CKD_HOST_DEVICE constexpr Acc neg_inf() { return -std::numeric_limits<Acc>::infinity(); }

// <math.h>'s functions, which CUDA also declares for the device, by accumulation type.
CKD_HOST_DEVICE float exp_acc(float x) { return expf(x); }
CKD_HOST_DEVICE double exp_acc(double x) { return exp(x); }
CKD_HOST_DEVICE float log_acc(float x) { return logf(x); }
CKD_HOST_DEVICE double log_acc(double x) { return log(x); }
CKD_HOST_DEVICE float log1p_acc(float x) { return log1pf(x); }
CKD_HOST_DEVICE double log1p_acc(double x) { return log1p(x); }
CKD_HOST_DEVICE float sqrt_acc(float x) { return sqrtf(x); }
CKD_HOST_DEVICE double sqrt_acc(double x) { return sqrt(x); }
template <typename Acc>
CKD_HOST_DEVICE Acc max_acc(Acc a, Acc b) { return a > b ? a : b; }

// A column norm kept as its logarithm, clamped from below as every L2 norm is (log kNormEps).
template <typename Acc>
CKD_HOST_DEVICE Acc clamped_log_norm(Acc log_norm) { return max_acc(log_norm, static_cast<Acc>(kLogNormEps)); }

// (m, s) <- the log-sum-exp statistics of both (m, s) and (part_max, part_sum); each sum is relative to its max.
template <typename Acc>
CKD_HOST_DEVICE void merge_lse(Acc& m, Acc& s, Acc part_max, Acc part_sum) {
  if (part_max == neg_inf<Acc>()) return;
  if (part_max > m) {
    s = s * exp_acc(m - part_max) + part_sum;
    m = part_max;
  } else {
    s += part_sum * exp_acc(part_max - m);
  }
}

// A contrastive term from the log-sum-exp of its negatives alone, d = LSE_{j != i} z_ij - z_ii: the term
// LSE_j z_ij - z_ii is softplus(d) and the positive's 1 - pi_ii is sigmoid(d). Neither cancels where the positive
// dominates its row (d << 0: a small tau, a converged student), where LSE - z_ii and pi_ii - 1 are differences of
// numbers of size 1 / tau. d = -inf (no negative) gives 0 and 0.
template <typename Acc>
CKD_HOST_DEVICE Acc softplus_acc(Acc d) { return d > 0 ? d + log1p_acc(exp_acc(-d)) : log1p_acc(exp_acc(d)); }
template <typename Acc>
CKD_HOST_DEVICE Acc sigmoid_acc(Acc d) { return Acc(1) / (Acc(1) + exp_acc(-d)); }

// z_ij of a symmetric tile at (r, c), negatives only: -inf where row or column is masked and on the diagonal (the
// positive's place, handled apart through softplus / sigmoid above), else the scaled cosine. The CPU backend's row
// form (symmetric_tile_row_values, backends/cpu/cpu_kernels.h) computes the same products in the same order and
// applies the masks and the diagonal after them, so that its loops vectorise; a change here is a change there.
template <typename Acc>
CKD_HOST_DEVICE Acc symmetric_tile_value(const SymmetricTile<Acc>& t, int64_t r, int64_t c) {
  const int64_t i = t.row0 + r, j = t.col0 + c;
  if (i == j || (t.valid && (!t.valid[i] || !t.valid[j]))) return neg_inf<Acc>();
  const Acc z = t.tile[r * t.ld + c] * t.scale;
  return t.inv_norm ? z * t.inv_norm[i] * t.inv_norm[j] : z;
}

// The factor symmetric_tile_coefficients applies to a coefficient so that it multiplies the tile's raw rows.
template <typename Acc>
CKD_HOST_DEVICE Acc symmetric_tile_raw_factor(const SymmetricTile<Acc>& t, int64_t i, int64_t j) {
  return t.inv_norm ? t.inv_norm[i] * t.inv_norm[j] : Acc(1);
}

// The factor the contrastive epilogue applies to z_ij's raw similarity (and to its coefficient).
template <typename Acc>
CKD_HOST_DEVICE Acc epilogue_raw_factor(const EpilogueParams<Acc>& p, int64_t i, int64_t j) {
  return (p.row_scale ? p.row_scale[i] : Acc(1)) * (p.col_scale ? p.col_scale[j] : Acc(1));
}

// ---- KD without cancellation (docs/math.md section 3, "Near convergence"). With x_j = (s_j - t_j) / T taken as one
// difference, log q_j = t_j / T - lse_t and Delta = lse_s - lse_t, the log-ratio is delta_j = log p_j - log q_j =
// x_j - Delta, and, with S the classes where q_j > 0,
//   KL(q || p) = sum_{j in S} q_j (e^delta_j - 1 - delta_j) + sum_{j not in S} p_j
// (as sum_{j in S} q_j (e^delta_j - 1) = sum_{j in S} (p_j - q_j) = -sum_{j not in S} p_j), whose terms are all
// >= 0: nothing cancels, unlike sum_j q_j (log q_j - log p_j), whose terms take both signs
// and whose logs carry the rounding of two log-sum-exps (~|lse| * eps each) however close p is to q. Delta itself
// is refined the same way around c = sum_j q_j x_j (over the finite x_j) when Delta - c is small: with y_j = x_j - c,
// e^(Delta - c) - 1 = sum_j (e^(s_j/T - lse_t - c) - q_j) = sum_j q_j (e^y_j - 1), so delta_j = y_j - (Delta - c)
// carries only the rounding of y_j (and is exactly 0 where p = q to the last bit, e.g. for one class).
// Each function takes the exp of its backend (vectorisable on the CPU, expf on the GPU) as `e`.

// x^2/2! + x^3/3! + ... = e^x - 1 - x for |x| <= 1/2, by its Taylor series in nested form: terms shrink by >= 6x,
// so float keeps x^9 (truncation < 2e-9 relative) and double x^18 (< 1e-17).
template <typename Acc>
CKD_HOST_DEVICE Acc exp_tail(Acc x) {
  constexpr int kLast = sizeof(Acc) == 4 ? 9 : 18;
  Acc p = 1;
  CKD_UNROLL
  for (int k = kLast; k >= 3; --k) p = 1 + p * x * (Acc(1) / k);
  return x * x * Acc(0.5) * p;
}

template <typename Acc>
CKD_HOST_DEVICE bool kd_small(Acc x) { return x >= Acc(-0.5) && x <= Acc(0.5); }

// One class's share of c's numerator, w_j x_j with w_j = e^(t_j/T - max): any finite c serves (the identities hold
// for every c), so classes whose x_j is not finite (a logit of -inf on either side) are left out.
template <typename Acc>
CKD_HOST_DEVICE Acc kd_shift_term(Acc w, Acc x) {
  return w > 0 && x > neg_inf<Acc>() && x < -neg_inf<Acc>() ? w * x : Acc(0);
}

// 0 for a subnormal probability v >= 0. Subnormal, w q_j can round to 0 and skew_kl's score (p_j - q_j) / (w q_j +
// (1 - w) p_j) divide by 0 (and subnormal arithmetic is slow on CPUs). Every KD kernel flushes its q_j and p_j, so
// that all backends agree below float's normals: the CPU's (a product of two exponentials, subnormal where one
// exp of the sum would be 0) and the CUDA kernels' (expf keeps subnormals) alike; what is dropped is < 1.2e-38 of a
// row's mass.
template <typename Acc>
CKD_HOST_DEVICE Acc flush_subnormal(Acc v) {
  return v < std::numeric_limits<Acc>::min() ? Acc(0) : v;
}

// A probability from its log, as the forms below take it.
template <typename Acc, typename Exp>
CKD_HOST_DEVICE Acc prob_of(Acc log_x, Exp e) {
  return flush_subnormal(e(log_x));
}

// One class's share of e^(Delta - c) - 1: q_j (e^y_j - 1), or e^(s_j/T - lse_t - c) - q_j where y_j is not small or
// q_j is 0 (a teacher logit of -inf: y_j = +inf, or NaN when the student's is -inf too, and that class adds 0).
// The *_from_probs forms here and below take q_j and p_j (and e^(s_j/T - lse_t - c)) as values, for a kernel that
// holds them already (the CPU's keeps each softmax's exponentials from its first pass, so that no later pass
// exponentiates them again); the forms taking logs exponentiate them and call those.
template <typename Acc>
CKD_HOST_DEVICE Acc kd_mass_excess_from_probs(Acc y, Acc q, Acc shifted_p) {
  return kd_small(y) ? q * (y + exp_tail(y)) : shifted_p - q;
}
template <typename Acc, typename Exp>
CKD_HOST_DEVICE Acc kd_mass_excess(Acc y, Acc log_q, Acc s_minus_lse_t_c, Exp e) {
  return kd_mass_excess_from_probs(y, prob_of(log_q, e), prob_of(s_minus_lse_t_c, e));
}

// One class's KL term q_j (e^delta_j - 1 - delta_j): by the series where delta_j is small, else as p_j - q_j (1 +
// delta_j) (q_j e^delta_j would overflow where q_j underflows), +inf where q_j > 0 and the student's logit is
// -inf (the KL is then infinite); p_j where q_j = 0 (0 log 0 = 0; 0 too where the student's logit is -inf too).
// A NaN q (a teacher row without a softmax) stays NaN.
template <typename Acc>
CKD_HOST_DEVICE Acc kd_kl_term_from_probs(Acc q, Acc delta, Acc p) {
  const Acc term = kd_small(delta) ? q * exp_tail(delta) : p - q * (1 + delta);
  return q == 0 ? p : term;  // one select per statement (see divergence_term)
}
template <typename Acc, typename Exp>
CKD_HOST_DEVICE Acc kd_kl_term(Acc log_q, Acc delta, Acc log_p, Exp e) {
  return kd_kl_term_from_probs(prob_of(log_q, e), delta, prob_of(log_p, e));
}

// p_j - q_j, the gradient's factor: q_j (e^delta_j - 1) where delta_j is small, else p_j - q_j.
template <typename Acc>
CKD_HOST_DEVICE Acc kd_prob_difference_from_probs(Acc q, Acc delta, Acc p) {
  return q > 0 && kd_small(delta) ? q * (delta + exp_tail(delta)) : p - q;
}
template <typename Acc, typename Exp>
CKD_HOST_DEVICE Acc kd_prob_difference(Acc log_q, Acc delta, Acc log_p, Exp e) {
  return kd_prob_difference_from_probs(prob_of(log_q, e), delta, prob_of(log_p, e));
}

template <typename Acc>
CKD_HOST_DEVICE Acc abs_acc(Acc x) { return x < 0 ? -x : x; }

// ---- The divergence family (docs/math.md 3.1) on KD's delta_j = log p_j - log q_j, each class's loss term written
// as a non-negative function of delta_j (0 with a zero derivative at delta_j = 0), evaluated by series where delta_j
// is small, so that no divergence cancels near convergence; and its score g_j, with which the gradient w.r.t. the
// student's logits is p_j (g_j - sum_k p_k g_k) / T (forward_kl's is (p_j - q_j) / T, kd_prob_difference).

// u - log1p(u) for |u| <= 0.65 (u = (1 - w)(e^delta - 1) with |delta| <= 1/2): with v = u / (2 + u), log1p(u) =
// 2 atanh(v) and u - log1p(u) = v^2 ((2 + u) - 2 v (1/3 + v^2/5 + v^4/7 + ...)), whose parts never cancel (|v| <=
// 0.245: the bracket's second part is < 7% of its first) and whose series shrinks by >= 16x a term: float keeps 6
// terms (truncation < 2e-8 relative), double 13 (< 2e-18).
template <typename Acc>
CKD_HOST_DEVICE Acc log1p_tail(Acc u) {
  constexpr int kTerms = sizeof(Acc) == 4 ? 6 : 13;
  const Acc v = u / (2 + u), v2 = v * v;
  Acc series = 0;
  CKD_UNROLL
  for (int k = kTerms - 1; k >= 0; --k) series = Acc(1) / (2 * k + 3) + v2 * series;
  return v2 * ((2 + u) - 2 * v * series);
}

// log(w + (1 - w) e^delta), w in (0, 1), for any delta (+-inf included) without overflow: for delta > 0 as
// delta + log((1 - w) + w e^-delta). One exp and one log either way; the log's argument lies in [min(w, 1 - w), 1].
// Its log term alone, log_mixture_ratio - max(delta, 0): log(1 - w) at delta = +inf, log(w) at -inf.
template <typename Acc, typename Exp, typename Log>
CKD_HOST_DEVICE Acc log_mixture_rest(Acc w, Acc delta, Exp e, Log l) {
  const bool positive = delta > 0;
  const Acc ea = e(positive ? -delta : delta);
  return l(positive ? (1 - w) + w * ea : w + (1 - w) * ea);
}
template <typename Acc, typename Exp, typename Log>
CKD_HOST_DEVICE Acc log_mixture_ratio(Acc w, Acc delta, Exp e, Log l) {
  return (delta > 0 ? delta : Acc(0)) + log_mixture_rest(w, delta, e, l);
}

template <typename Acc>
struct DivergenceTerm {
  Acc term;   // the class's share of the divergence
  Acc score;  // g_j (unused by forward_kl)
};

// One class's term and score from q_j and p_j, `l` the backend's log (only ever of numbers in [min(w, 1 - w),
// 1]). Classes with q_j = 0 (a teacher logit of -inf) take the limits of the definitions: reverse_kl's term is
// +inf where p_j > 0, jsd's and skew_kl's are finite. Each case computes both of its forms (the
// series where |delta_j| <= 1/2, the direct one elsewhere) and selects: no branch, so that the CPU's loops over it
// vectorise; the form not taken may be inf or NaN, and is discarded.
template <typename Acc, typename Exp, typename Log>
CKD_HOST_DEVICE_FLATTEN DivergenceTerm<Acc> divergence_term_from_probs(const DivergenceParams<Acc>& d, Acc q,
                                                                       Acc delta, Acc p, Exp e, Log l) {
  if (d.kind == DivergenceKind::ForwardKL) return {kd_kl_term_from_probs(q, delta, p), Acc(0)};
  const bool small = kd_small(delta);
  const Acc w = d.weight, rest = 1 - d.weight;
  const Acc tail = exp_tail(delta), expm1 = delta + tail;  // e^delta - 1 - delta and e^delta - 1, where small
  switch (d.kind) {
    case DivergenceKind::ForwardKL:
      break;
    case DivergenceKind::ReverseKL: {
      // KL(p || q) = sum_j q_j (delta_j e^delta_j - e^delta_j + 1) = sum_j (p_j delta_j - p_j + q_j)
      const Acc term = small ? q * (delta * expm1 - tail) : p * delta - p + q;
      return {p == 0 ? q : term, p == 0 ? Acc(0) : delta};
    }
    case DivergenceKind::SkewKL: {
      // KL(q || m), m = w q + (1 - w) p, rho_j = m_j / q_j = 1 + u_j: sum_j q_j (u_j - log1p(u_j)), plus
      // (1 - w) p_j where q_j = 0; g_j = (1 - w) (1 - q_j / m_j)
      const Acc u = rest * expm1;
      const Acc term = small ? q * log1p_tail(u) : rest * (p - q) - q * log_mixture_ratio(w, delta, e, l);
      const Acc score = small ? rest * u / (1 + u) : rest * rest * (p - q) / (w * q + rest * p);
      return {q == 0 ? rest * p : term, q == 0 ? rest : score};
    }
    case DivergenceKind::JSD: {
      // w KL(q || m) + (1 - w) KL(p || m), m = w q + (1 - w) p: with nu_j = log(p_j / m_j), the terms
      // w q_j (u_j - log1p(u_j)) + (1 - w) m_j (nu_j e^nu_j - e^nu_j + 1), both >= 0; g_j = (1 - w) nu_j
      const Acc u = rest * expm1, l1 = log1p_tail(u);
      const Acc nu_small = w * delta - rest * tail + l1;  // delta - log1p(u), |nu| <= |delta|
      const Acc nu_tail = exp_tail(nu_small);
      // log_rest: log(1 - w) where q_j = 0 (delta = +inf), log(w) where p_j = 0 (delta = -inf), as the limits need
      // (taken from the element's own log: a constant log here would leave the CPU loop a branch, unvectorised)
      const Acc log_rest = log_mixture_rest(w, delta, e, l);
      const Acc log_rho = (delta > 0 ? delta : Acc(0)) + log_rest;
      const Acc nu = small ? nu_small : delta - log_rho;
      const Acc term = small ? w * q * l1 + rest * q * (1 + u) * (nu * (nu + nu_tail) - nu_tail)
                             : rest * p * nu - w * q * log_rho;
      // one select per statement: nested ones leave the CPU loop a branch and unvectorised
      const Acc term_or_p_0 = p == 0 ? -w * q * log_rest : term;
      const Acc score_or_p_0 = p == 0 ? Acc(0) : rest * nu;
      // where q_j = p_j = 0 (both logits -inf) delta and log_rest are NaN, and the class adds nothing
      const Acc term_where_q_is_0 = p > 0 ? -rest * p * log_rest : Acc(0);
      const Acc score_where_q_is_0 = p > 0 ? -rest * log_rest : Acc(0);
      return {q == 0 ? term_where_q_is_0 : term_or_p_0, q == 0 ? score_where_q_is_0 : score_or_p_0};
    }
    case DivergenceKind::TVD:
      break;
  }
  // 1/2 sum_j |p_j - q_j|, p_j - q_j = q_j (e^delta_j - 1) where small (kd_prob_difference); g_j = sign(p_j - q_j) / 2
  // (0 where equal, as torch's abs')
  const Acc diff = small ? q * expm1 : p - q;
  const Acc up = diff > 0 ? Acc(0.5) : Acc(0);
  const Acc down = diff < 0 ? Acc(0.5) : Acc(0);
  return {up * diff - down * diff, up - down};
}
// The same from log q_j and log p_j.
template <typename Acc, typename Exp, typename Log>
CKD_HOST_DEVICE_FLATTEN DivergenceTerm<Acc> divergence_term(const DivergenceParams<Acc>& d, Acc log_q, Acc delta,
                                                            Acc log_p, Exp e, Log l) {
  return divergence_term_from_probs(d, prob_of(log_q, e), delta, prob_of(log_p, e), e, l);
}

}  // namespace ckd
