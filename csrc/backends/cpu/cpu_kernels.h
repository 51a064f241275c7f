// Torch-free CPU kernels: each function handles one row (or one block of columns) and is called in
// parallel by cpu_backend.cpp. Inputs are converted to the accumulation type Acc on load.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernel_interface/scalar_math.h"
#include "kernel_interface/types.h"

// This header is compiled once per instruction set the CPU backend is built for (cpu_isa.h), with that set's
// flags and CKD_CPU_ISA naming it; each compilation's kernels live in their own inline namespace, so that the
// linker never merges, say, the AVX-512 kd_row with the baseline one (inline templates are emitted in every
// object that uses them and the linker keeps one copy of each name).
#ifndef CKD_CPU_ISA
#define CKD_CPU_ISA baseline
#endif

namespace ckd::cpu {
inline namespace CKD_CPU_ISA {

// Lanes of the reductions below: independent partial results, as many as an AVX-512 register holds floats, so
// that the compiler turns the loop into vector operations with no dependency chain from one element to the next
// (a single running sum or max waits out the add's or max's latency on every element). The lane count is the
// same for every instruction set, so every ISA's kernels give the same bits (tests/test_cpu_isa.py); more
// partial sums also round less than one long float sum.
constexpr int64_t kLanes = 16;

template <typename Acc, typename F>
inline Acc sum_over(int64_t n, F&& term) {
  Acc s[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) s[l] += term(j + l);
  }
  for (int64_t l = 0; j + l < n; ++l) s[l] += term(j + l);
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) s[l] += s[l + width];
  }
  return s[0];
}

// exp for float, branch-free so that loops over it vectorise (libm's expf is a scalar call): Cody-Waite
// reduction x = k ln2 + r and the Cephes polynomial for exp(r), about 1 ulp. Arguments below -87 give 0
// (true values < 1.6e-38 there), -inf included; the kernels only exponentiate max-shifted values (<= 0) and
// norms' logs (< 28), far below the clamp at 88. NaN gives NaN. The vectorised loops also exponentiate lanes they
// then discard (masked, or the diagonal), where x can be NaN (-inf - -inf), so 2^k is built from the bits of the
// rounding sum in unsigned arithmetic: no float-to-int conversion of a NaN and no shift of a negative number, both
// undefined.
inline float fast_exp(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  // Rounds x / ln2 to the nearest integer: adding 1.5 * 2^23 leaves no fraction bits, and the sum's low bits
  // hold that integer (plus the bits of 1.5 * 2^23, subtracted below).
  const float rounding_sum = xc * 1.44269504088896341f + 12582912.0f;
  const float k = rounding_sum - 12582912.0f;
  float r = xc - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  uint32_t sum_bits;
  std::memcpy(&sum_bits, &rounding_sum, sizeof sum_bits);
  const uint32_t bits = (sum_bits - 0x4B400000u + 127u) << 23;  // 0x4B400000: the bits of 1.5 * 2^23
  float two_k;
  std::memcpy(&two_k, &bits, sizeof two_k);
  return x < -87.0f ? 0.0f : y * two_k;
}
// float64 accumulation (gradcheck) keeps libm's exp.
inline double fast_exp(double x) { return std::exp(x); }

// Chunk width of sum_mapped and the row kernels below: a chunk of each input and its buffer of terms stay in L1
// between the loops that work on it, so that a pass over a row reads each input from memory once.
constexpr int64_t kRowChunk = 512;

// sum_j f(j) for an f worth vectorising (an exp): values are computed a chunk at a time by a loop the
// compiler vectorises, then summed in a fixed order (float addition is not associative, so the sum itself
// stays scalar and results stay deterministic without -ffast-math).
template <typename Acc, typename F>
inline Acc sum_mapped(int64_t n, F&& f) {
  Acc buffer[kRowChunk];
  Acc total = 0;
  for (int64_t j0 = 0; j0 < n; j0 += kRowChunk) {
    const int64_t w = std::min(kRowChunk, n - j0);
    for (int64_t j = 0; j < w; ++j) buffer[j] = f(j0 + j);
    total += sum_over<Acc>(w, [&](int64_t j) { return buffer[j]; });
  }
  return total;
}

// The max of value(j), ignoring NaNs (std::max keeps its first argument when a comparison is false), as a single
// running max would: max is exact, so the lanes change nothing but the speed. The lanes are one value of a vector
// type: as an array of running maxima GCC leaves them scalar (a max that must ignore NaNs is no reduction it knows
// without -ffinite-math-only), the select on vectors it compiles to vector max (or compare and blend); the values come
// a chunk at a time from a buffer that a vectorised loop fills, which the vector loads read whole.
template <typename Acc, typename F>
inline Acc max_over(int64_t n, F&& value) {
  typedef Acc Lanes __attribute__((vector_size(kLanes * sizeof(Acc))));
  Lanes m;
  for (int64_t l = 0; l < kLanes; ++l) m[l] = neg_inf<Acc>();
  Acc buffer[kRowChunk];
  for (int64_t j0 = 0; j0 < n; j0 += kRowChunk) {
    const int64_t w = std::min(kRowChunk, n - j0);
    for (int64_t j = 0; j < w; ++j) buffer[j] = value(j0 + j);
    int64_t j = 0;
    for (; j + kLanes <= w; j += kLanes) {
      Lanes v;
      std::memcpy(&v, buffer + j, sizeof v);
      m = m < v ? v : m;
    }
    for (int64_t l = 0; j + l < w; ++l) m[l] = std::max(m[l], buffer[j + l]);
  }
  Acc lanes[kLanes];
  std::memcpy(lanes, &m, sizeof lanes);
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) lanes[l] = std::max(lanes[l], lanes[l + width]);
  }
  return lanes[0];
}

// Max-shifted LSE of value(j); -inf when every value is -inf.
template <typename Acc, typename F>
inline Acc logsumexp(int64_t n, F&& value) {
  const Acc m = max_over<Acc>(n, value);
  if (m == neg_inf<Acc>()) return m;
  return m + std::log(sum_mapped<Acc>(n, [&](int64_t j) { return fast_exp(value(j) - m); }));
}

// The squares overflow for rows past sqrt(max) (1.8e19 in float32) whose norm is still representable; such a row is
// summed again scaled by its largest |x_j| (exact for CKD, which reads only the row's direction and norm). A NaN
// stays NaN, and so does an infinite entry (inf / inf): such a row has no direction.
template <typename Acc, typename T>
void row_inv_norm(const T* x, int64_t cols, Acc* inv_norm) {
  const Acc sq = sum_over<Acc>(cols, [&](int64_t j) { const Acc v = static_cast<Acc>(x[j]); return v * v; });
  Acc norm = std::sqrt(sq);
  if (sq == std::numeric_limits<Acc>::infinity()) {
    const Acc m = max_over<Acc>(cols, [&](int64_t j) { return std::abs(static_cast<Acc>(x[j])); });
    norm = m * std::sqrt(sum_over<Acc>(cols, [&](int64_t j) { const Acc v = static_cast<Acc>(x[j]) / m; return v * v; }));
  }
  *inv_norm = Acc(1) / std::max(norm, static_cast<Acc>(kNormEps));
}

template <typename Acc, typename TA, typename TB>
Acc row_dot(const TA* a, const TB* b, int64_t cols) {
  return sum_over<Acc>(cols, [&](int64_t j) { return static_cast<Acc>(a[j]) * static_cast<Acc>(b[j]); });
}

// The row's max m of x * inv_temp and the logs of the L1 and L2 norms of exp(x * inv_temp - m) (see
// KernelBackend::softmax_stats); log_norm may be null.
template <typename Acc, typename T>
void softmax_stats_row(const T* x, int64_t cols, Acc inv_temp, Acc* row_max, Acc* log_sum, Acc* log_norm) {
  const Acc m = max_over<Acc>(cols, [&](int64_t j) { return static_cast<Acc>(x[j]) * inv_temp; });
  *row_max = m;
  if (m == neg_inf<Acc>()) {  // every logit -inf: no softmax (x * inv_temp - m is NaN)
    *log_sum = 0;
    if (log_norm) *log_norm = 0;
    return;
  }
  auto d = [&](int64_t j) { return static_cast<Acc>(x[j]) * inv_temp - m; };
  *log_sum = std::log(sum_mapped<Acc>(cols, [&](int64_t j) { return fast_exp(d(j)); }));
  if (log_norm) *log_norm = Acc(0.5) * std::log(sum_mapped<Acc>(cols, [&](int64_t j) { return fast_exp(2 * d(j)); }));
}

struct FastExp {
  template <typename Acc>
  Acc operator()(Acc x) const { return fast_exp(x); }
};

// log for float, branch-free like fast_exp so that the divergences' loops vectorise (libm's logf is a scalar call
// the compiler may not even drop where its result is unused): x = m 2^k with m in [sqrt(1/2), sqrt(2)), and Cephes'
// polynomial for log(m), about 1 ulp, for positive normal x (the kernels take logs of numbers in (0, 1] away from 0
// only, scalar_math.h's log_mixture_ratio); 0 gives -inf, a negative x or NaN gives NaN, +inf gives +inf.
inline float fast_log(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  int32_t k = static_cast<int32_t>((bits >> 23) & 0xffu) - 126;
  const uint32_t mantissa_bits = (bits & 0x007fffffu) | 0x3f000000u;  // the mantissa as a float in [1/2, 1)
  float m;
  std::memcpy(&m, &mantissa_bits, sizeof m);
  const bool low = m < 0.707106781186547524f;
  k = low ? k - 1 : k;
  const float f = low ? m + m - 1.0f : m - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float kf = static_cast<float>(k);
  y = y + kf * -2.12194440e-4f;
  y = y - 0.5f * z;
  const float r = (f + y) + kf * 0.693359375f;
  // one select per statement (nested ones leave a branch, and the loops around unvectorised)
  const float inf = std::numeric_limits<float>::infinity();
  const float infinite = x == inf ? inf : std::numeric_limits<float>::quiet_NaN();
  const float special = x == 0 ? -inf : infinite;
  return x > 0 && x < inf ? r : special;
}
inline double fast_log(double x) { return std::log(x); }

struct FastLog {
  template <typename Acc>
  Acc operator()(Acc x) const { return fast_log(x); }
};

// One softmax's running statistics over a row taken a chunk at a time: the max so far and sum_j w_j relative to it,
// with (optionally) a second sum of terms scaled like w_j (KD's sum_j w_j x_j). A chunk that raises the max rescales
// both sums once, by e^(old max - new max) (0 from an old max of -inf); chunks while the max is still -inf add
// nothing (their terms are 0 against any later finite max, and a row that stays at -inf is handled by the caller).
template <typename Acc>
struct OnlineSoftmax {
  Acc max = neg_inf<Acc>();
  Acc sum = 0;
  Acc weighted = 0;

  // Raises the max to chunk_max; whether the chunk's terms are to be added.
  bool raise(Acc chunk_max) {
    const Acc m = std::max(max, chunk_max);
    if (m == neg_inf<Acc>()) return false;
    if (m > max) {
      const Acc f = fast_exp(max - m);
      sum *= f;
      weighted *= f;
      max = m;
    }
    return true;
  }
};

// v where it is NaN, else 0: a chunk's kept exponentials before the row's first finite logit, where the NaNs that
// max_over skips must still reach the loss (as e^(NaN - lse) does).
template <typename Acc>
inline Acc nan_or_zero(Acc v) {
  return v == v ? Acc(0) : v;
}

// Per-thread scratch of at least `values` Acc for kd_row_of: kept between rows (a row's buffers are a few pages; an
// allocation per row would cost as much as a small row's work).
template <typename Acc>
Acc* kd_row_scratch(int64_t values) {
  thread_local std::vector<Acc> buffer;
  if (static_cast<int64_t>(buffer.size()) < values) buffer.resize(values);
  return buffer.data();
}

// KD for one row in the cancellation-free form of kernels/scalar_math.h, each softmax exponentiated once per element:
// * pass 1, a chunk at a time (online maxima, each chunk read once): lse_t, lse_s, the q-mean c of x, and each
//   softmax's exponentials against the running max of their chunk, kept in a row buffer;
// * where Delta - c is small (<= 1/2, where the refinement cannot overflow), Delta - c refined from the mass excess;
// * pass 2: q_j and p_j as the kept exponential times its chunk's factor e^(max - lse) (one exp per chunk), then the
//   divergence's terms and (forward_kl) the gradient T w (p - q); the other divergences keep p_j and the score g_j
//   in the buffers, and pass 3 writes their gradient p_j (g_j - sum_k p_k g_k) from them, which needs pass 2's sum.
// The row and its buffers stay in cache between the passes. `Kind` is the divergence's kind (the same as
// divergence.kind), a template argument so that the per-element switch folds away and the loops stay branch-free.
template <DivergenceKind Kind, typename Acc, typename TS, typename TT>
void kd_row_of(const TS* s, const TT* t, int64_t cols, Acc temperature, const DivergenceParams<Acc>& divergence,
               Acc* loss, Acc weight, TS* grad) {
  const Acc inv_temp = Acc(1) / temperature;
  const FastExp e;
  auto x = [&](int64_t j) { return (static_cast<Acc>(s[j]) - static_cast<Acc>(t[j])) * inv_temp; };
  auto t_scaled = [&](int64_t j) { return static_cast<Acc>(t[j]) * inv_temp; };
  auto s_scaled = [&](int64_t j) { return static_cast<Acc>(s[j]) * inv_temp; };
  const int64_t chunks = (cols + kRowChunk - 1) / kRowChunk;
  // q and p: e^(t_j/T - m_t) and e^(s_j/T - m_s) (m the running max of j's chunk, kept in q_scale and p_scale), then
  // q_j and p_j; after pass 2, for the divergences other than forward_kl, g_j and p_j.
  Acc* const __restrict q = kd_row_scratch<Acc>(2 * cols + 2 * chunks);
  Acc* const __restrict p = q + cols;
  Acc* const q_scale = p + cols;
  Acc* const p_scale = q_scale + chunks;
  OnlineSoftmax<Acc> q_stats, p_stats;  // q_stats.weighted: c's numerator sum_j w_j x_j
  Acc terms[kRowChunk];
  for (int64_t k = 0; k < chunks; ++k) {
    const int64_t j0 = k * kRowChunk, w = std::min(kRowChunk, cols - j0);
    // the next chunk's lines requested now, so that this chunk's exps hide their latency (the loads of a pass this
    // compute-heavy come too far apart for the hardware prefetcher to run ahead)
    for (int64_t j = j0 + kRowChunk; j < std::min(cols, j0 + 2 * kRowChunk); j += 64 / sizeof(TS)) {
      __builtin_prefetch(s + j);
    }
    for (int64_t j = j0 + kRowChunk; j < std::min(cols, j0 + 2 * kRowChunk); j += 64 / sizeof(TT)) {
      __builtin_prefetch(t + j);
    }
    if (q_stats.raise(max_over<Acc>(w, [&](int64_t j) { return t_scaled(j0 + j); }))) {
      for (int64_t j = 0; j < w; ++j) q[j0 + j] = fast_exp(t_scaled(j0 + j) - q_stats.max);
      q_stats.sum += sum_over<Acc>(w, [&](int64_t j) { return q[j0 + j]; });
      for (int64_t j = 0; j < w; ++j) terms[j] = kd_shift_term(q[j0 + j], x(j0 + j));
      q_stats.weighted += sum_over<Acc>(w, [&](int64_t j) { return terms[j]; });
    } else {  // every logit so far -inf (or NaN, which max_over skips): 0, NaN kept NaN to reach the loss
      for (int64_t j = 0; j < w; ++j) q[j0 + j] = nan_or_zero(t_scaled(j0 + j));
    }
    q_scale[k] = q_stats.max;
    if (p_stats.raise(max_over<Acc>(w, [&](int64_t j) { return s_scaled(j0 + j); }))) {
      for (int64_t j = 0; j < w; ++j) p[j0 + j] = fast_exp(s_scaled(j0 + j) - p_stats.max);
      p_stats.sum += sum_over<Acc>(w, [&](int64_t j) { return p[j0 + j]; });
    } else {
      for (int64_t j = 0; j < w; ++j) p[j0 + j] = nan_or_zero(s_scaled(j0 + j));
    }
    p_scale[k] = p_stats.max;
  }
  // A teacher row of -inf only has no softmax: NaN, as e^(-inf - -inf) gives. A student row of -inf only has
  // lse_s = -inf (and p_j = NaN, as e^(s_j/T - lse_s) gives).
  const Acc sum_t = q_stats.max == neg_inf<Acc>() ? std::numeric_limits<Acc>::quiet_NaN() : q_stats.sum;
  const Acc lse_t = q_stats.max + std::log(sum_t);
  const Acc c = q_stats.weighted / sum_t;
  const Acc lse_s = p_stats.max == neg_inf<Acc>() ? p_stats.max : p_stats.max + std::log(p_stats.sum);
  // p_j from lse_s itself: lse_t + c + d equals it but rounds like its largest part, which at a small temperature
  // (|lse| ~ 1e9) is an absolute error of tens, and exp of it wrong by as many orders of magnitude.
  for (int64_t k = 0; k < chunks; ++k) {
    q_scale[k] = fast_exp(q_scale[k] - lse_t);
    p_scale[k] = fast_exp(p_scale[k] - lse_s);
  }
  // a chunk at a time, so that each chunk's scale is one value in the loop
  auto for_chunks = [&](auto&& body) {
    for (int64_t k = 0; k < chunks; ++k) body(k * kRowChunk, std::min(kRowChunk, cols - k * kRowChunk), k);
  };
  for_chunks([&](int64_t j0, int64_t w, int64_t k) {
    const Acc qs = q_scale[k], ps = p_scale[k];
    for (int64_t j = j0; j < j0 + w; ++j) {
      q[j] = flush_subnormal(q[j] * qs);
      p[j] = flush_subnormal(p[j] * ps);
    }
  });
  Acc d = lse_s - lse_t - c;  // Delta - c
  if (kd_small(d)) {
    const Acc shift = fast_exp(d);  // e^(s_j/T - lse_t - c) = p_j e^(lse_s - lse_t - c)
    d = log1p_acc(sum_mapped<Acc>(
        cols, [&](int64_t j) { return kd_mass_excess_from_probs(x(j) - c, q[j], p[j] * shift); }));
  }
  const DivergenceParams<Acc> params{Kind, divergence.weight, divergence.loss_scale};
  const Acc g = weight * divergence.loss_scale * inv_temp;
  Acc total = 0, mean_score = 0;  // mean_score: sum_j p_j g_j
  Acc weighted_scores[kRowChunk];
  for_chunks([&](int64_t j0, int64_t w, int64_t) {
    if (Kind == DivergenceKind::ForwardKL && grad) {  // one loop for both
      for (int64_t j = j0; j < j0 + w; ++j) {
        const Acc delta = x(j) - c - d;
        terms[j - j0] = kd_kl_term_from_probs(q[j], delta, p[j]);
        grad[j] = static_cast<TS>(g * kd_prob_difference_from_probs(q[j], delta, p[j]));
      }
    } else if (Kind == DivergenceKind::ForwardKL) {
      for (int64_t j = j0; j < j0 + w; ++j) terms[j - j0] = kd_kl_term_from_probs(q[j], x(j) - c - d, p[j]);
    } else {
      for (int64_t j = j0; j < j0 + w; ++j) {
        const DivergenceTerm<Acc> r = divergence_term_from_probs(params, q[j], x(j) - c - d, p[j], e, FastLog{});
        terms[j - j0] = r.term;
        weighted_scores[j - j0] = p[j] * r.score;
        q[j] = r.score;
      }
      mean_score += sum_over<Acc>(w, [&](int64_t j) { return weighted_scores[j]; });
    }
    total += sum_over<Acc>(w, [&](int64_t j) { return terms[j]; });
  });
  if (Kind != DivergenceKind::ForwardKL && grad) {
    for (int64_t j = 0; j < cols; ++j) grad[j] = static_cast<TS>(g * (p[j] * (q[j] - mean_score)));
  }
  *loss = divergence.loss_scale * total;
}

template <typename Acc, typename TS, typename TT>
void kd_row(const TS* s, const TT* t, int64_t cols, Acc temperature, const DivergenceParams<Acc>& divergence,
            Acc* loss, Acc weight, TS* grad) {
  switch (divergence.kind) {
    case DivergenceKind::ForwardKL:
      return kd_row_of<DivergenceKind::ForwardKL>(s, t, cols, temperature, divergence, loss, weight, grad);
    case DivergenceKind::ReverseKL:
      return kd_row_of<DivergenceKind::ReverseKL>(s, t, cols, temperature, divergence, loss, weight, grad);
    case DivergenceKind::JSD:
      return kd_row_of<DivergenceKind::JSD>(s, t, cols, temperature, divergence, loss, weight, grad);
    case DivergenceKind::SkewKL:
      return kd_row_of<DivergenceKind::SkewKL>(s, t, cols, temperature, divergence, loss, weight, grad);
    case DivergenceKind::TVD:
      return kd_row_of<DivergenceKind::TVD>(s, t, cols, temperature, divergence, loss, weight, grad);
  }
}

// A mask as bytes: GCC has no vector type for bool, and leaves a loop that loads bools scalar.
inline const unsigned char* mask_bytes(const bool* valid) { return reinterpret_cast<const unsigned char*>(valid); }

// body(factor) with factor(c) = epilogue_raw_factor(p, i, col0 + c), the same products without the per-element
// pointer tests (a missing scale is a factor of exactly 1), so that body's loop vectorises.
template <typename Acc, typename Body>
inline void with_epilogue_raw_factor(const EpilogueParams<Acc>& p, int64_t i, int64_t col0, Body&& body) {
  const Acc row_factor = p.row_scale ? p.row_scale[i] : Acc(1);
  if (p.col_scale) {
    const Acc* __restrict col_factor = p.col_scale + col0;
    body([=](int64_t c) { return row_factor * col_factor[c]; });
  } else {
    body([=](int64_t) { return row_factor; });
  }
}

// sum_{j != i} e^(z_j - m) over a row. The diagonal is left out by setting z_i to -inf for the sum (its e^(-inf - m)
// is exactly the 0 a test j == i would give) rather than by that test, which, per element, left the loop scalar where
// GCC specialised contrastive_epilogue_row's gradient path (measured: 5-6x slower than the vectorised copy).
template <typename Acc>
inline Acc negatives_exp_sum(Acc* __restrict z, int64_t cols, int64_t i, Acc m) {
  if (!(m > neg_inf<Acc>() && m < -neg_inf<Acc>())) {  // e^(-inf - m) is not 0 there: the test, on a rare row
    return sum_mapped<Acc>(cols, [&](int64_t j) { return j == i ? Acc(0) : fast_exp(z[j] - m); });
  }
  const Acc zi = z[i];
  z[i] = neg_inf<Acc>();
  const Acc* __restrict row = z;
  const Acc sum = sum_mapped<Acc>(cols, [row, m](int64_t j) { return fast_exp(row[j] - m); });
  z[i] = zi;
  return sum;
}

template <typename Acc>
void contrastive_epilogue_row(const EpilogueParams<Acc>& p, int64_t r) {
  const int64_t i = p.row0 + r;
  Acc* __restrict z = p.strip + r * p.cols;
  const bool want_grad = p.weight != nullptr;
  if (p.valid && !p.valid[i]) {
    p.loss[i] = 0;
    if (want_grad) std::fill(z, z + p.cols, Acc(0));
    return;
  }
  const int64_t cols = p.cols;
  const Acc scale = p.scale;
  with_epilogue_raw_factor(p, i, 0, [&](auto&& factor) {
    for (int64_t j = 0; j < cols; ++j) z[j] = z[j] * scale * factor(j);
  });
  if (p.valid) {
    const unsigned char* __restrict valid = mask_bytes(p.valid);
    for (int64_t j = 0; j < cols; ++j) z[j] = valid[j] != 0 ? z[j] : neg_inf<Acc>();
  }
  // The term from the negatives' log-sum-exp (kernels/scalar_math.h, softplus_acc): no cancellation where the
  // positive dominates.
  const Acc zi = z[i];
  const Acc m = max_over<Acc>(cols, [&](int64_t j) { return z[j]; });
  const Acc negatives = negatives_exp_sum(z, cols, i, m);
  const Acc d = (m - zi) + std::log(negatives);
  p.loss[i] = softplus_acc(d);
  if (!want_grad) return;
  const Acc lse = zi + p.loss[i];
  const Acc g = p.weight[i] * scale;
  with_epilogue_raw_factor(p, i, 0, [&](auto&& factor) {
    for (int64_t j = 0; j < cols; ++j) z[j] = g * fast_exp(z[j] - lse) * factor(j);
  });
  z[i] = -g * sigmoid_acc(d) * epilogue_raw_factor(p, i, i);
}

// Row r of a block for contrastive_coefficients (KernelBackend): the epilogue's exponentials against a known lse;
// 0 where masked and on the diagonal.
template <typename Acc>
void contrastive_coefficients_row(const EpilogueParams<Acc>& p, const Acc* lse, int64_t r) {
  const int64_t i = p.row0 + r;
  Acc* __restrict z = p.strip + r * p.cols;
  const int64_t cols = p.cols;
  if (p.valid && !p.valid[i]) {
    std::fill(z, z + cols, Acc(0));
    return;
  }
  const Acc g = p.weight[i] * p.scale, scale = p.scale, lse_i = lse[i];
  with_epilogue_raw_factor(p, i, p.col0, [&](auto&& factor) {
    for (int64_t c = 0; c < cols; ++c) z[c] = g * fast_exp(z[c] * scale * factor(c) - lse_i) * factor(c);
  });
  if (p.valid) {
    const unsigned char* __restrict valid = mask_bytes(p.valid + p.col0);
    for (int64_t c = 0; c < cols; ++c) z[c] = valid[c] != 0 ? z[c] : Acc(0);
  }
  if (i >= p.col0 && i < p.col0 + cols) z[i - p.col0] = 0;
}

// symmetric_tile_value (kernels/scalar_math.h) for columns [c0, c0 + w) of row r, w <= kRowChunk: the same products
// in the same order, with the masks and the diagonal applied after them instead of tested per element, so that the
// loops vectorise (per element, the tests kept them scalar, and at small C the N^2 epilogue outweighs the GEMMs).
template <typename Acc>
void symmetric_tile_row_values(const SymmetricTile<Acc>& t, int64_t r, int64_t c0, int64_t w, Acc* __restrict out) {
  const int64_t i = t.row0 + r, j0 = t.col0 + c0;
  const Acc* __restrict raw = t.tile + r * t.ld + c0;
  const Acc scale = t.scale;
  if (t.inv_norm) {
    const Acc* __restrict inv_norm_j = t.inv_norm + j0;
    const Acc inv_norm_i = t.inv_norm[i];
    for (int64_t c = 0; c < w; ++c) out[c] = raw[c] * scale * inv_norm_i * inv_norm_j[c];
  } else {
    for (int64_t c = 0; c < w; ++c) out[c] = raw[c] * scale;
  }
  if (t.valid) {
    if (!t.valid[i]) {
      std::fill(out, out + w, neg_inf<Acc>());
      return;
    }
    const unsigned char* __restrict valid_j = mask_bytes(t.valid + j0);
    for (int64_t c = 0; c < w; ++c) out[c] = valid_j[c] != 0 ? out[c] : neg_inf<Acc>();
  }
  if (i >= j0 && i < j0 + w) out[i - j0] = neg_inf<Acc>();
}

// Row r of the tile: merges LSE_j z_ij into row i's statistics, a chunk at a time (each chunk's own max and sum,
// merged), so that the tile row is read once.
template <typename Acc>
void symmetric_tile_lse_row(const SymmetricTile<Acc>& t, int64_t r, Acc* row_max, Acc* row_sum) {
  const int64_t i = t.row0 + r;
  if (t.valid && !t.valid[i]) return;
  Acc z[kRowChunk];
  for (int64_t c0 = 0; c0 < t.cols; c0 += kRowChunk) {
    const int64_t w = std::min(kRowChunk, t.cols - c0);
    symmetric_tile_row_values(t, r, c0, w, z);
    const Acc m = max_over<Acc>(w, [&](int64_t c) { return z[c]; });
    if (m == neg_inf<Acc>()) continue;
    for (int64_t c = 0; c < w; ++c) z[c] = fast_exp(z[c] - m);
    merge_lse(row_max[i], row_sum[i], m, sum_over<Acc>(w, [&](int64_t c) { return z[c]; }));
  }
}

// Columns [c0, c1) of an off-diagonal tile, c1 - c0 <= kRowChunk: merges LSE_i z_ij into row j's statistics (the
// transposed tile).
template <typename Acc>
void symmetric_tile_lse_columns(const SymmetricTile<Acc>& t, int64_t c0, int64_t c1, Acc* row_max, Acc* row_sum) {
  const int64_t w = c1 - c0;
  Acc z[kRowChunk], mx[kRowChunk], sum[kRowChunk];
  std::fill(mx, mx + w, neg_inf<Acc>());
  std::fill(sum, sum + w, Acc(0));
  for (int64_t r = 0; r < t.rows; ++r) {
    symmetric_tile_row_values(t, r, c0, w, z);
    for (int64_t c = 0; c < w; ++c) mx[c] = std::max(mx[c], z[c]);
  }
  for (int64_t r = 0; r < t.rows; ++r) {
    symmetric_tile_row_values(t, r, c0, w, z);
    // A column without a finite value (mx = -inf) would exponentiate -inf - -inf: it adds nothing.
    for (int64_t c = 0; c < w; ++c) {
      const Acc e = fast_exp(z[c] - mx[c]);
      sum[c] += mx[c] != neg_inf<Acc>() ? e : Acc(0);
    }
  }
  for (int64_t c = 0; c < w; ++c) merge_lse(row_max[t.col0 + c0 + c], row_sum[t.col0 + c0 + c], mx[c], sum[c]);
}

// Row r of the tile's coefficients (w_i pi_ij + w_j pi_ji) / tau, in place, times the raw factor
// (symmetric_tile_raw_factor) that makes them multiply the tile's raw rows; 0 where masked and on the diagonal.
template <typename Acc>
void symmetric_tile_coefficients_row(const SymmetricTile<Acc>& t, int64_t r, const Acc* lse, const Acc* weight) {
  const int64_t i = t.row0 + r;
  Acc* row = t.tile + r * t.ld;  // not restrict: symmetric_tile_row_values reads the same row
  const Acc scale = t.scale, weight_i = weight[i], lse_i = lse[i];
  const Acc inv_norm_i = t.inv_norm ? t.inv_norm[i] : Acc(1);
  Acc z[kRowChunk];
  for (int64_t c0 = 0; c0 < t.cols; c0 += kRowChunk) {
    const int64_t w = std::min(kRowChunk, t.cols - c0), j0 = t.col0 + c0;
    symmetric_tile_row_values(t, r, c0, w, z);
    const Acc* __restrict weight_j = weight + j0;
    const Acc* __restrict lse_j = lse + j0;
    Acc* out = row + c0;
    auto coefficients = [&](auto&& raw_factor) {
      for (int64_t c = 0; c < w; ++c) {
        const Acc v = (weight_i * fast_exp(z[c] - lse_i) + weight_j[c] * fast_exp(z[c] - lse_j[c])) * scale *
                      raw_factor(c);
        out[c] = z[c] == neg_inf<Acc>() ? Acc(0) : v;  // masked, or the diagonal
      }
    };
    if (t.inv_norm) {
      const Acc* __restrict inv_norm_j = t.inv_norm + j0;
      coefficients([&](int64_t c) { return inv_norm_i * inv_norm_j[c]; });
    } else {
      coefficients([](int64_t) { return Acc(1); });
    }
  }
}

// d = dv / max(|x|, eps) (KernelBackend::normalize_backward): grad = d - <d, x> x / |x|^2, or d itself where the norm
// is clamped (a constant there).
template <typename Acc, typename T, typename TE, typename TG>
void normalize_backward_row(Acc* d, const T* x, int64_t cols, Acc extra_coef, const TE* extra_x, TG* grad) {
  if (extra_x) {
    for (int64_t j = 0; j < cols; ++j) d[j] += extra_coef * static_cast<Acc>(extra_x[j]);
  }
  const Acc sq = sum_over<Acc>(cols, [&](int64_t j) { const Acc v = static_cast<Acc>(x[j]); return v * v; });
  if (std::sqrt(sq) < static_cast<Acc>(kNormEps)) {
    for (int64_t j = 0; j < cols; ++j) grad[j] = static_cast<TG>(d[j]);
    return;
  }
  const Acc proj = row_dot<Acc>(d, x, cols) / sq;
  for (int64_t j = 0; j < cols; ++j) grad[j] = static_cast<TG>(d[j] - proj * static_cast<Acc>(x[j]));
}

// log P_ic from softmax_stats' row statistics, in the order every kernel uses: (x * inv_temp - max) - log_sum.
template <typename Acc, typename T>
inline Acc log_prob(T x, Acc inv_temp, Acc row_max, Acc row_log_sum) {
  return (static_cast<Acc>(x) * inv_temp - row_max) - row_log_sum;
}

// Columns [c0, c1) of log_norm: 0.5 * LSE over valid rows of 2 log P_ic.
template <typename Acc, typename T>
void column_log_norms_block(const T* x, int64_t rows, int64_t cols, int64_t c0, int64_t c1, const Acc* row_max,
                            const Acc* row_log_sum, Acc inv_temp, const bool* valid, Acc* log_norm) {
  const int64_t w = c1 - c0;
  std::vector<Acc> mx(w, neg_inf<Acc>()), sum(w, Acc(0));
  for (int64_t i = 0; i < rows; ++i) {
    if (valid && !valid[i]) continue;
    const T* xi = x + i * cols + c0;
    for (int64_t c = 0; c < w; ++c) mx[c] = std::max(mx[c], 2 * log_prob(xi[c], inv_temp, row_max[i], row_log_sum[i]));
  }
  for (int64_t i = 0; i < rows; ++i) {
    if (valid && !valid[i]) continue;
    const T* xi = x + i * cols + c0;
    for (int64_t c = 0; c < w; ++c) {
      sum[c] += fast_exp(2 * log_prob(xi[c], inv_temp, row_max[i], row_log_sum[i]) - mx[c]);
    }
  }
  for (int64_t c = 0; c < w; ++c) {
    log_norm[c0 + c] = mx[c] == neg_inf<Acc>() ? mx[c] : Acc(0.5) * (mx[c] + std::log(sum[c]));
  }
}

template <typename Acc, typename T>
void column_dots_block(const Acc* a, const T* x, int64_t rows, int64_t cols, int64_t c0, int64_t c1,
                       const Acc* row_max, const Acc* row_log_sum, const Acc* log_norm, Acc inv_temp,
                       const bool* valid, Acc* out) {
  const int64_t w = c1 - c0;
  std::vector<Acc> sum(w, Acc(0)), shift(w);
  for (int64_t c = 0; c < w; ++c) shift[c] = clamped_log_norm(log_norm[c0 + c]);
  for (int64_t i = 0; i < rows; ++i) {
    if (valid && !valid[i]) continue;
    const T* xi = x + i * cols + c0;
    const Acc* ai = a + i * cols + c0;
    for (int64_t c = 0; c < w; ++c) {
      sum[c] += ai[c] * fast_exp(log_prob(xi[c], inv_temp, row_max[i], row_log_sum[i]) - shift[c]);
    }
  }
  for (int64_t c = 0; c < w; ++c) out[c0 + c] = sum[c];
}

// BicKD's last pass for one row: ds = P (dP - <P, dP>) / T with dP = (dp - <dp, p> p) / |P_i| + per column
// (dpbar - k_c pbar) / |P_.c|, evaluated as ds = (u - P sum(u)) / T with u = P dP:
//   u_j = p_j (dp_j - <dp, p> p_j) + pbar_j (dpbar_j - k_j pbar_j),   p = P / |P_i|,  pbar_j = P_j / max(|P_.j|, eps)
// (k_j = col_projection[j], 0 where the norm is clamped). Two choices keep rounding from being amplified:
// * P and p are e = exp(x/T - row_max) divided by its own sum and norm: the max-shifted softmax, whose sum is 1
//   and norm 1 to float rounding. (With a float32 LSE, ~|x|/T and rounded by up to 1.2e-4 at 2.6e3, in place of
//   those, sum(P) = 1 + delta left -delta P <P, dP> in P (dP - <P, dP>), and |p| != 1 a spurious <P, dP> of the row
//   projection; <P, dP> is O(dP) while a nearly one-hot row's gradient is O(P_j (1 - P_j) dP), so either was up to
//   ~1e-2 of the gradient.)
// * pbar is exp(log P - max(log_norm, log eps)) with column_dots' and the forward's log_prob, so a column that is
//   one nonzero entry has pbar = 1 and k = dpbar exactly: its term is 0, as it should be, not dpbar rounding
//   divided by |P_.c| and multiplied back by P.
// `scratch` holds 2 * cols values.
template <typename Acc, typename T, typename TG>
void bickd_backward_row(const Acc* dp, const Acc* dpbar, const T* x, int64_t cols, Acc row_max, Acc row_log_sum,
                        const Acc* col_log_norm, const Acc* col_projection, Acc inv_temp, Acc* scratch, TG* grad) {
  Acc* e = scratch;
  Acc* u = scratch + cols;
  for (int64_t j = 0; j < cols; ++j) e[j] = fast_exp(static_cast<Acc>(x[j]) * inv_temp - row_max);
  const Acc inv_sum = Acc(1) / sum_over<Acc>(cols, [&](int64_t j) { return e[j]; });
  std::fill(u, u + cols, Acc(0));
  if (dp) {
    const Acc inv_norm = Acc(1) / std::sqrt(sum_over<Acc>(cols, [&](int64_t j) { return e[j] * e[j]; }));
    const Acc r = sum_over<Acc>(cols, [&](int64_t j) { return dp[j] * e[j]; }) * inv_norm;
    for (int64_t j = 0; j < cols; ++j) {
      const Acc p = e[j] * inv_norm;
      u[j] = p * (dp[j] - r * p);
    }
  }
  if (dpbar) {
    for (int64_t j = 0; j < cols; ++j) {
      const Acc pbar = fast_exp(log_prob(x[j], inv_temp, row_max, row_log_sum) - clamped_log_norm(col_log_norm[j]));
      u[j] += pbar * (dpbar[j] - col_projection[j] * pbar);
    }
  }
  const Acc total = sum_over<Acc>(cols, [&](int64_t j) { return u[j]; });
  for (int64_t j = 0; j < cols; ++j) grad[j] = static_cast<TG>((u[j] - e[j] * inv_sum * total) * inv_temp);
}

}  // namespace CKD_CPU_ISA
}  // namespace ckd::cpu
