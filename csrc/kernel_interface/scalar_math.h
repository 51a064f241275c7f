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
#else
#define CKD_HOST_DEVICE inline
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

// One class's share of e^(Delta - c) - 1: q_j (e^y_j - 1), or e^(s_j/T - lse_t - c) - q_j where y_j is not small or
// q_j is 0 (a teacher logit of -inf: y_j = +inf, or NaN when the student's is -inf too, and that class adds 0).
template <typename Acc, typename Exp>
CKD_HOST_DEVICE Acc kd_mass_excess(Acc y, Acc log_q, Acc s_minus_lse_t_c, Exp e) {
  return kd_small(y) ? e(log_q) * (y + exp_tail(y)) : e(s_minus_lse_t_c) - e(log_q);
}

// One class's KL term q_j (e^delta_j - 1 - delta_j): by the series where delta_j is small, else as p_j - q_j (1 +
// delta_j) (q_j e^delta_j would overflow where q_j underflows), +inf where q_j > 0 and the student's logit is
// -inf (the KL is then infinite); p_j where q_j = 0 (0 log 0 = 0; 0 too where the student's logit is -inf too).
// A NaN q (a teacher row without a softmax) stays NaN.
template <typename Acc, typename Exp>
CKD_HOST_DEVICE Acc kd_kl_term(Acc log_q, Acc delta, Acc log_p, Exp e) {
  const Acc q = e(log_q);
  if (q == 0) return e(log_p);
  return kd_small(delta) ? q * exp_tail(delta) : e(log_p) - q * (1 + delta);
}

// p_j - q_j, the gradient's factor: q_j (e^delta_j - 1) where delta_j is small, else e(log p_j) - q_j.
template <typename Acc, typename Exp>
CKD_HOST_DEVICE Acc kd_prob_difference(Acc log_q, Acc delta, Acc log_p, Exp e) {
  const Acc q = e(log_q);
  return q > 0 && kd_small(delta) ? q * (delta + exp_tail(delta)) : e(log_p) - q;
}

}  // namespace ckd
