// CUDA kernels of the KernelBackend interface (kernels/backend.h), written once against device/device.h: nvcc
// compiles them for the GPU, the host compiler runs them under the CPU emulator in tests. Torch-free;
// inputs are converted to the accumulation type Acc on load; every reduction is a fixed tree inside one
// block (no float atomics), so results are identical run to run.
#pragma once
#include <cstdint>

#include "device/device.h"
#include "kernels/scalar_math.h"
#include "kernels/types.h"

namespace ckd::gpu {

// One block per row for row reductions: 128 threads (4 warps) let up to 16 blocks share an SM (2048 threads), so
// enough rows are in flight to hide memory latency at the widths we see (C from 100 to 150k), while a row of
// 150k still gives each thread ~1.2k elements to stream; the block reduction stays a 4-entry scratch.
constexpr int kRowThreads = 128;
constexpr int kElementThreads = 256;
constexpr int kColumnThreads = 128;
constexpr int kMaxElementBlocks = 4096;

template <typename Acc, typename T>
__device__ __forceinline__ Acc load(const T* p, int64_t i) { return static_cast<Acc>(static_cast<float>(p[i])); }
template <>
__device__ __forceinline__ double load<double, double>(const double* p, int64_t i) { return p[i]; }
template <>
__device__ __forceinline__ float load<float, double>(const double* p, int64_t i) { return static_cast<float>(p[i]); }

template <typename T, typename Acc>
__device__ __forceinline__ void store(T* p, int64_t i, Acc v) { p[i] = static_cast<T>(static_cast<float>(v)); }
template <>
__device__ __forceinline__ void store<double, double>(double* p, int64_t i, double v) { p[i] = v; }
template <>
__device__ __forceinline__ void store<double, float>(double* p, int64_t i, float v) { p[i] = v; }

// Four consecutive elements, read with one 16-byte (float) or 8-byte (fp16 / bf16) access.
template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

// Calls f(j, a_j, b_j) for this thread's elements of two rows of `cols` elements, the block's threads striding
// over them. When both rows start on a pack boundary and cols % 4 == 0 (rows of a contiguous (N, C) tensor,
// C % 4 == 0), each step reads four consecutive elements of each row with one vector load; otherwise one
// element at a time. Which path runs is the same for the whole block, and each path sums in a fixed order.
template <typename Acc, typename TA, typename TB, typename F>
__device__ __forceinline__ void for_row_pair(const TA* a, const TB* b, int64_t cols, F f) {
  if constexpr (sizeof(TA) <= 4 && sizeof(TB) <= 4) {
    const bool packed = cols % 4 == 0 && reinterpret_cast<uintptr_t>(a) % sizeof(Pack4<TA>) == 0 &&
                        reinterpret_cast<uintptr_t>(b) % sizeof(Pack4<TB>) == 0;
    if (packed) {
      const Pack4<TA>* pa = reinterpret_cast<const Pack4<TA>*>(a);
      const Pack4<TB>* pb = reinterpret_cast<const Pack4<TB>*>(b);
      for (int64_t q = threadIdx.x; q < cols / 4; q += blockDim.x) {
        const Pack4<TA> va = pa[q];
        const Pack4<TB> vb = pb[q];
        for (int k = 0; k < 4; ++k) {
          f(4 * q + k, static_cast<Acc>(static_cast<float>(va.v[k])), static_cast<Acc>(static_cast<float>(vb.v[k])));
        }
      }
      return;
    }
  }
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) f(j, load<Acc>(a, j), load<Acc>(b, j));
}

template <typename Acc, typename T, typename F>
__device__ __forceinline__ void for_row(const T* a, int64_t cols, F f) {
  for_row_pair<Acc>(a, a, cols, [&](int64_t j, Acc x, Acc) { f(j, x); });
}

// Row i's gradient is 0 (a masked row); the whole block calls it and returns.
template <typename T>
__device__ __forceinline__ void zero_row(T* grad, int64_t base, int64_t cols) {
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) grad[base + j] = static_cast<T>(0.0f);
}

struct DeviceExp {
  template <typename Acc>
  __device__ __forceinline__ Acc operator()(Acc x) const { return exp_acc(x); }
};

struct SumOp {
  template <typename Acc>
  __device__ __forceinline__ Acc operator()(Acc a, Acc b) const { return a + b; }
};
struct MaxOp {
  template <typename Acc>
  __device__ __forceinline__ Acc operator()(Acc a, Acc b) const { return a > b ? a : b; }
};

// The block's total of v, returned to every thread; every thread of the block must call it. `scratch`
// holds one value per warp (32 entries).
template <typename Acc, typename Op>
__device__ __forceinline__ Acc block_reduce(Acc v, Op op, Acc* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(CKD_FULL_MASK, v, offset));
  __syncthreads();  // a previous reduction may still be reading scratch
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  Acc total = scratch[0];
  for (unsigned w = 1; w < blockDim.x / 32; ++w) total = op(total, scratch[w]);
  return total;
}

// Max-shifted log-sum-exp of row[j] * scale over the row, computed by the whole block.
template <typename Acc, typename T>
__device__ __forceinline__ Acc block_row_logsumexp(const T* row, int64_t cols, Acc scale, Acc* scratch) {
  Acc m = neg_inf<Acc>();
  for_row<Acc>(row, cols, [&](int64_t, Acc x) { m = max_acc(m, x * scale); });
  m = block_reduce(m, MaxOp{}, scratch);
  if (m == neg_inf<Acc>()) return m;
  Acc s = 0;
  for_row<Acc>(row, cols, [&](int64_t, Acc x) { s += exp_acc(x * scale - m); });
  return m + log_acc(block_reduce(s, SumOp{}, scratch));
}

template <typename Acc, typename T>
__global__ void row_inv_norms_kernel(const T* x, int64_t cols, Acc* inv_norm) {
  __shared__ Acc scratch[32];
  const T* row = x + static_cast<int64_t>(blockIdx.x) * cols;
  Acc sq = 0;
  for_row<Acc>(row, cols, [&](int64_t, Acc v) { sq += v * v; });
  sq = block_reduce(sq, SumOp{}, scratch);
  if (threadIdx.x == 0) inv_norm[blockIdx.x] = Acc(1) / max_acc(sqrt_acc(sq), static_cast<Acc>(kNormEps));
}

template <typename Acc, typename TA, typename TB>
__global__ void row_dots_kernel(const TA* a, const TB* b, int64_t cols, Acc* out) {
  __shared__ Acc scratch[32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * cols;
  Acc s = 0;
  for_row_pair<Acc>(a + base, b + base, cols, [&](int64_t, Acc x, Acc y) { s += x * y; });
  s = block_reduce(s, SumOp{}, scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

// log P_ic from softmax_stats' row statistics, in the order every kernel uses: (x * inv_temp - max) - log_sum.
// (nvcc contracts x * inv_temp - max into one fma here and in softmax_stats alike: the exact product minus the
// row's max, rounded once, the same value in every kernel.)
template <typename Acc>
__device__ __forceinline__ Acc log_prob(Acc x, Acc inv_temp, Acc row_max, Acc row_log_sum) {
  return (x * inv_temp - row_max) - row_log_sum;
}

// The row's max m of x / T and the logs of the L1 and L2 norms of exp(x / T - m): see KernelBackend::softmax_stats.
template <typename Acc, typename T>
__global__ void softmax_stats_kernel(const T* x, int64_t cols, Acc inv_temp, Acc* row_max, Acc* row_log_sum,
                                     Acc* row_log_norm) {
  __shared__ Acc scratch[32];
  const T* row = x + static_cast<int64_t>(blockIdx.x) * cols;
  Acc m = neg_inf<Acc>();
  for_row<Acc>(row, cols, [&](int64_t, Acc x) { m = max_acc(m, x * inv_temp); });
  m = block_reduce(m, MaxOp{}, scratch);
  if (m == neg_inf<Acc>()) {  // every logit -inf (uniform across the block): no softmax
    if (threadIdx.x == 0) {
      row_max[blockIdx.x] = m;
      row_log_sum[blockIdx.x] = 0;
      if (row_log_norm) row_log_norm[blockIdx.x] = 0;
    }
    return;
  }
  // max(2 x / T) = 2 max(x / T): one max serves both sums.
  Acc s1 = 0, s2 = 0;
  for_row<Acc>(row, cols, [&](int64_t, Acc x) {
    const Acc d = x * inv_temp - m;
    s1 += exp_acc(d);
    s2 += exp_acc(2 * d);
  });
  s1 = block_reduce(s1, SumOp{}, scratch);
  if (row_log_norm) s2 = block_reduce(s2, SumOp{}, scratch);
  if (threadIdx.x == 0) {
    row_max[blockIdx.x] = m;
    row_log_sum[blockIdx.x] = log_acc(s1);
    if (row_log_norm) row_log_norm[blockIdx.x] = Acc(0.5) * log_acc(s2);
  }
}

template <typename Acc, typename TS, typename TT>
__global__ void kd_rows_kernel(const TS* s, const TT* t, int64_t cols, Acc temperature, const bool* valid, Acc* loss,
                               const Acc* weight, TS* grad) {
  __shared__ Acc scratch[32];
  const int64_t i = blockIdx.x;
  const int64_t base = i * cols;
  if (valid && !valid[i]) {  // uniform across the block: no barrier is skipped by part of it
    if (threadIdx.x == 0) loss[i] = 0;
    if (grad) zero_row(grad, base, cols);
    return;
  }
  // The cancellation-free form of kernels/scalar_math.h, as in the CPU kernel.
  const DeviceExp e;
  const Acc inv_temp = Acc(1) / temperature;
  Acc max_t = neg_inf<Acc>();
  for_row<Acc>(t + base, cols, [&](int64_t, Acc tj) { max_t = max_acc(max_t, tj * inv_temp); });
  max_t = block_reduce(max_t, MaxOp{}, scratch);
  Acc sum_t = 0, weighted_x = 0;
  for_row_pair<Acc>(s + base, t + base, cols, [&](int64_t, Acc sj, Acc tj) {
    const Acc w = exp_acc(tj * inv_temp - max_t);
    sum_t += w;
    weighted_x += kd_shift_term(w, (sj - tj) * inv_temp);
  });
  sum_t = block_reduce(sum_t, SumOp{}, scratch);
  const Acc c = block_reduce(weighted_x, SumOp{}, scratch) / sum_t;  // the q-mean of x
  const Acc lse_t = max_t + log_acc(sum_t);
  const Acc lse_s = block_row_logsumexp(s + base, cols, inv_temp, scratch);
  Acc d = lse_s - lse_t - c;  // Delta - c
  if (kd_small(d)) {  // the same value in every thread: the whole block takes the branch
    Acc excess = 0;
    for_row_pair<Acc>(s + base, t + base, cols, [&](int64_t, Acc sj, Acc tj) {
      excess += kd_mass_excess((sj - tj) * inv_temp - c, tj * inv_temp - lse_t, sj * inv_temp - lse_t - c, e);
    });
    d = log1p_acc(block_reduce(excess, SumOp{}, scratch));
  }
  // log p from lse_s itself (see the CPU kernel: lse_t + c + d rounds like its largest part).
  Acc kl = 0;
  for_row_pair<Acc>(s + base, t + base, cols, [&](int64_t, Acc sj, Acc tj) {
    kl += kd_kl_term(tj * inv_temp - lse_t, (sj - tj) * inv_temp - c - d, sj * inv_temp - lse_s, e);
  });
  kl = block_reduce(kl, SumOp{}, scratch);
  if (threadIdx.x == 0) loss[i] = temperature * temperature * kl;
  if (grad) {
    const Acc g = weight[i] * temperature;
    for_row_pair<Acc>(s + base, t + base, cols, [&](int64_t j, Acc sj, Acc tj) {
      const Acc delta = (sj - tj) * inv_temp - c - d;
      store(grad, base + j, g * kd_prob_difference(tj * inv_temp - lse_t, delta, sj * inv_temp - lse_s, e));
    });
  }
}

template <typename Acc, typename T>
__global__ void load_rows_kernel(const T* x, int64_t cols, int64_t row0, int64_t rows, const Acc* row_scale,
                                 const bool* valid, Acc* out) {
  const int64_t total = rows * cols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / cols;
    if (valid && !valid[row0 + r]) {  // exactly 0, whatever a masked row holds
      out[e] = 0;
      continue;
    }
    const Acc f = row_scale ? row_scale[row0 + r] : Acc(1);
    out[e] = load<Acc>(x, (row0 + r) * cols + (e - r * cols)) * f;
  }
}

template <typename Acc, typename T>
__global__ void exp_block_kernel(const T* x, int64_t ldx, int64_t row0, int64_t rows, int64_t col0, int64_t cols,
                                 Acc inv_temp, const Acc* row_max, const Acc* row_rest, const Acc* col_shift,
                                 const bool* valid, Acc* out) {
  const int64_t total = rows * cols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / cols, c = e - r * cols;
    const int64_t i = row0 + r;
    if (valid && !valid[i]) {
      out[e] = 0;
      continue;
    }
    const Acc v = log_prob(load<Acc>(x, i * ldx + col0 + c), inv_temp, row_max[i], row_rest[i]);
    out[e] = exp_acc(col_shift ? v - clamped_log_norm(col_shift[col0 + c]) : v);
  }
}

// One block per strip row; see EpilogueParams for what it computes.
template <typename Acc>
__global__ void contrastive_epilogue_kernel(EpilogueParams<Acc> p) {
  __shared__ Acc scratch[32];
  const int64_t r = blockIdx.x;
  const int64_t i = p.row0 + r;
  Acc* z = p.strip + r * p.cols;
  const bool want_grad = p.weight != nullptr;
  if (p.valid && !p.valid[i]) {
    if (threadIdx.x == 0) p.loss[i] = 0;
    if (want_grad)
      for (int64_t j = threadIdx.x; j < p.cols; j += blockDim.x) z[j] = 0;
    return;
  }
  Acc m = neg_inf<Acc>();
  for (int64_t j = threadIdx.x; j < p.cols; j += blockDim.x) {
    Acc v = z[j] * p.scale * epilogue_raw_factor(p, i, j);
    if (p.valid && !p.valid[j]) v = neg_inf<Acc>();
    z[j] = v;
    m = max_acc(m, v);
  }
  m = block_reduce(m, MaxOp{}, scratch);
  // The term from the negatives' log-sum-exp (kernels/scalar_math.h, softplus_acc): no cancellation where the
  // positive dominates.
  Acc s = 0;
  for (int64_t j = threadIdx.x; j < p.cols; j += blockDim.x) s += j == i ? Acc(0) : exp_acc(z[j] - m);
  s = block_reduce(s, SumOp{}, scratch);
  // z[i] was written by some thread before the barriers inside block_reduce; the coefficients below
  // overwrite it, so every read of it must happen before the next barrier.
  const Acc zi = z[i];
  const Acc d = (m - zi) + log_acc(s);
  const Acc term = softplus_acc(d);
  if (threadIdx.x == 0) p.loss[i] = term;
  if (!want_grad) return;
  __syncthreads();
  const Acc lse = zi + term;
  const Acc g = p.weight[i] * p.scale;
  for (int64_t j = threadIdx.x; j < p.cols; j += blockDim.x) {
    z[j] = (j == i ? -g * sigmoid_acc(d) : g * exp_acc(z[j] - lse)) * epilogue_raw_factor(p, i, j);
  }
}

// One block per tile row: LSE_j z_ij merged into row i's statistics.
template <typename Acc>
__global__ void symmetric_tile_lse_rows_kernel(SymmetricTile<Acc> t, Acc* row_max, Acc* row_sum) {
  __shared__ Acc scratch[32];
  const int64_t r = blockIdx.x;
  const int64_t i = t.row0 + r;
  if (t.valid && !t.valid[i]) return;
  Acc m = neg_inf<Acc>();
  for (int64_t c = threadIdx.x; c < t.cols; c += blockDim.x) m = max_acc(m, symmetric_tile_value(t, r, c));
  m = block_reduce(m, MaxOp{}, scratch);
  if (m == neg_inf<Acc>()) return;
  Acc s = 0;
  for (int64_t c = threadIdx.x; c < t.cols; c += blockDim.x) s += exp_acc(symmetric_tile_value(t, r, c) - m);
  s = block_reduce(s, SumOp{}, scratch);
  if (threadIdx.x == 0) merge_lse(row_max[i], row_sum[i], m, s);
}

// One thread per column of an off-diagonal tile: LSE_i z_ij merged into row j's statistics.
template <typename Acc>
__global__ void symmetric_tile_lse_columns_kernel(SymmetricTile<Acc> t, Acc* row_max, Acc* row_sum) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= t.cols) return;
  Acc m = neg_inf<Acc>();
  for (int64_t r = 0; r < t.rows; ++r) m = max_acc(m, symmetric_tile_value(t, r, c));
  if (m == neg_inf<Acc>()) return;
  Acc s = 0;
  for (int64_t r = 0; r < t.rows; ++r) s += exp_acc(symmetric_tile_value(t, r, c) - m);
  merge_lse(row_max[t.col0 + c], row_sum[t.col0 + c], m, s);
}

template <typename Acc>
__global__ void symmetric_tile_coefficients_kernel(SymmetricTile<Acc> t, const Acc* lse, const Acc* weight) {
  const int64_t total = t.rows * t.cols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / t.cols, c = e - r * t.cols;
    const int64_t i = t.row0 + r, j = t.col0 + c;
    const Acc z = symmetric_tile_value(t, r, c);
    // 0 where masked and on the diagonal (z = -inf there).
    const Acc coef = z == neg_inf<Acc>() ? Acc(0)
                                         : (weight[i] * exp_acc(z - lse[i]) + weight[j] * exp_acc(z - lse[j])) *
                                               t.scale * symmetric_tile_raw_factor(t, i, j);
    t.tile[r * t.ld + c] = coef;
  }
}

// Blocks (x) by rows of z, split (y) into column ranges the threads stride over: no per-element division.
template <typename Acc>
__global__ void contrastive_coefficients_kernel(EpilogueParams<Acc> p, const Acc* lse) {
  const int64_t r = blockIdx.x;
  const int64_t i = p.row0 + r;
  Acc* z = p.strip + r * p.cols;
  const bool row_valid = !(p.valid && !p.valid[i]);
  const Acc g = row_valid ? p.weight[i] * p.scale : Acc(0);
  for (int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; c < p.cols;
       c += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    const int64_t j = p.col0 + c;
    const Acc f = epilogue_raw_factor(p, i, j);
    const bool negative = row_valid && j != i && !(p.valid && !p.valid[j]);
    z[c] = negative ? g * exp_acc(z[c] * p.scale * f - lse[i]) * f : Acc(0);
  }
}

// One block per row, d = dv / max(|x|, eps): d += extra, then grad = d - [unclamped] <d, x> x / |x|^2. Each thread
// reads and writes only its own elements, so grad may alias d.
template <typename Acc, typename T, typename TE>
__global__ void normalize_backward_kernel(Acc* d, const T* x, int64_t cols, const Acc* extra_coef, const TE* extra_x,
                                          const bool* valid, T* grad) {
  __shared__ Acc scratch[32];
  const int64_t i = blockIdx.x;
  const int64_t base = i * cols;
  if (valid && !valid[i]) {
    zero_row(grad, base, cols);
    return;
  }
  if (extra_coef) {
    const Acc f = extra_coef[i];
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) d[base + j] += f * load<Acc>(extra_x, base + j);
  }
  Acc sq = 0, dot = 0;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const Acc v = load<Acc>(x, base + j);
    sq += v * v;
    dot += d[base + j] * v;
  }
  sq = block_reduce(sq, SumOp{}, scratch);
  dot = block_reduce(dot, SumOp{}, scratch);
  const Acc proj = sqrt_acc(sq) < static_cast<Acc>(kNormEps) ? Acc(0) : dot / sq;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    store(grad, base + j, d[base + j] - proj * load<Acc>(x, base + j));
  }
}

// One thread per column, walking the rows: coalesced across the warp, deterministic, no barrier.
template <typename Acc, typename T>
__global__ void column_log_norms_kernel(const T* x, int64_t rows, int64_t cols, const Acc* row_max,
                                        const Acc* row_log_sum, Acc inv_temp, const bool* valid, Acc* log_norm) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  Acc m = neg_inf<Acc>();
  for (int64_t i = 0; i < rows; ++i) {
    if (valid && !valid[i]) continue;
    m = max_acc(m, 2 * log_prob(load<Acc>(x, i * cols + c), inv_temp, row_max[i], row_log_sum[i]));
  }
  if (m == neg_inf<Acc>()) {
    log_norm[c] = m;
    return;
  }
  Acc s = 0;
  for (int64_t i = 0; i < rows; ++i) {
    if (valid && !valid[i]) continue;
    s += exp_acc(2 * log_prob(load<Acc>(x, i * cols + c), inv_temp, row_max[i], row_log_sum[i]) - m);
  }
  log_norm[c] = Acc(0.5) * (m + log_acc(s));
}

template <typename Acc, typename T>
__global__ void column_dots_kernel(const Acc* a, const T* x, int64_t rows, int64_t cols, const Acc* row_max,
                                   const Acc* row_log_sum, const Acc* log_norm, Acc inv_temp, const bool* valid,
                                   Acc* out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  const Acc shift = clamped_log_norm(log_norm[c]);
  Acc s = 0;
  for (int64_t i = 0; i < rows; ++i) {
    if (valid && !valid[i]) continue;
    s += a[i * cols + c] * exp_acc(log_prob(load<Acc>(x, i * cols + c), inv_temp, row_max[i], row_log_sum[i]) - shift);
  }
  out[c] = s;
}

// One block per row: through the row normalisation (dp), the column normalisation (dpbar) and the softmax, as
// grad = (u - P sum(u)) / T with u = P dP (cpu::bickd_backward_row has the derivation). P, p, pbar are recomputed
// from x instead of stored: P and p from e = exp(x / T - row_max) over its own sum and norm (the max-shifted
// softmax), pbar by column_dots' own expression. Each thread writes only the elements it read, so grad may alias dp.
template <typename Acc, typename T>
__global__ void bickd_backward_rows_kernel(const Acc* dp, const Acc* dpbar, const T* x, int64_t cols,
                                           const Acc* row_max, const Acc* row_log_sum, const Acc* col_log_norm,
                                           const Acc* col_projection, Acc inv_temp, const bool* valid, T* grad) {
  __shared__ Acc scratch[32];
  const int64_t i = blockIdx.x;
  const int64_t base = i * cols;
  if (valid && !valid[i]) {
    zero_row(grad, base, cols);
    return;
  }
  const Acc m = row_max[i], log_sum = row_log_sum[i];
  Acc sum = 0, sq = 0, r = 0;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const Acc e = exp_acc(load<Acc>(x, base + j) * inv_temp - m);
    sum += e;
    if (dp) {
      sq += e * e;
      r += dp[base + j] * e;
    }
  }
  const Acc inv_sum = Acc(1) / block_reduce(sum, SumOp{}, scratch);
  Acc inv_norm = 0;
  if (dp) {  // uniform across the block
    inv_norm = Acc(1) / sqrt_acc(block_reduce(sq, SumOp{}, scratch));
    r = block_reduce(r, SumOp{}, scratch) * inv_norm;
  }
  // u_j = p_j (dp_j - <dp, p> p_j) + pbar_j (dpbar_j - k_j pbar_j).
  auto u = [&](int64_t j, Acc xj, Acc e) {
    Acc v = 0;
    if (dp) {
      const Acc p = e * inv_norm;
      v = p * (dp[base + j] - r * p);
    }
    if (dpbar) {
      const Acc pbar = exp_acc(log_prob(xj, inv_temp, m, log_sum) - clamped_log_norm(col_log_norm[j]));
      v += pbar * (dpbar[base + j] - col_projection[j] * pbar);
    }
    return v;
  };
  Acc total = 0;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const Acc xj = load<Acc>(x, base + j);
    total += u(j, xj, exp_acc(xj * inv_temp - m));
  }
  total = block_reduce(total, SumOp{}, scratch);
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const Acc xj = load<Acc>(x, base + j);
    const Acc e = exp_acc(xj * inv_temp - m);
    store(grad, base + j, (u(j, xj, e) - e * inv_sum * total) * inv_temp);
  }
}

}  // namespace ckd::gpu
