// Scalar math every backend's kernels share: host code (CPU kernels), device code under nvcc (CUDA kernels) and
// host code again under the CPU emulator. One definition of each rule (max-shifted merges, the norm clamp, how a
// symmetric tile reads) so that the backends cannot drift apart.
#pragma once
#include <math.h>

#include <cstdint>
#include <limits>

#include "kernels/types.h"

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

// z_ij of a symmetric tile at (r, c): -inf where row or column is masked, the positive on the diagonal, else the
// scaled cosine.
template <typename Acc>
CKD_HOST_DEVICE Acc symmetric_tile_value(const SymmetricTile<Acc>& t, int64_t r, int64_t c) {
  const int64_t i = t.row0 + r, j = t.col0 + c;
  if (t.valid && (!t.valid[i] || !t.valid[j])) return neg_inf<Acc>();
  return i == j ? t.positive[i] : t.tile[r * t.ld + c] * t.scale;
}

}  // namespace ckd
