// CUDA kernels of the KernelBackend interface (kernels/backend.h), written once against cuda_emulator/device.h: nvcc
// compiles them for the GPU, the host compiler runs them under the CPU emulator in tests. Torch-free;
// inputs are converted to the accumulation type Acc on load; every reduction is a fixed tree inside one
// block, or (the contrastive epilogue's split rows) blocks' partial results merged by a later kernel in a fixed
// order: no float atomics, so results are identical run to run.
#pragma once
#include <cstdint>

#include "cuda_emulator/device.h"
#include "kernel_interface/scalar_math.h"
#include "kernel_interface/types.h"

namespace ckd::cuda {

// One block per row for row reductions: 128 threads (4 warps) let up to 16 blocks share an SM (2048 threads), so
// enough rows are in flight to hide memory latency at the widths we see (C from 100 to 150k), while a row of
// 150k still gives each thread ~1.2k elements to stream; the block reduction stays a 4-entry scratch.
constexpr int kRowThreads = 128;
constexpr int kElementThreads = 256;
constexpr int kColumnThreads = 128;
constexpr int kMaxElementBlocks = 4096;
// The contrastive epilogue splits strip rows into column chunks of at least kEpilogueChunkCols (8 elements per
// thread of a kRowThreads block) until the grid has about kEpilogueBlocks blocks: ~8 per SM on a 132-SM GPU, which
// a strip of 32-65 rows left at one block per row. More blocks would only shrink the chunks.
constexpr int kEpilogueChunkCols = 8 * kRowThreads;
constexpr int kEpilogueBlocks = 1024;

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

// Four elements j = 4q .. 4q+3 of every row, converted to Acc: one vector load per row (a null row reads as 0s).
template <typename Acc, typename T>
__device__ __forceinline__ Pack4<Acc> load_pack(const T* row, int64_t q) {
  Pack4<Acc> out{};
  if (row) {
    const Pack4<T> v = reinterpret_cast<const Pack4<T>*>(row)[q];
    for (int k = 0; k < 4; ++k) out.v[k] = static_cast<Acc>(static_cast<float>(v.v[k]));
  }
  return out;
}

template <typename T>
__device__ __forceinline__ bool pack_aligned(const T* row) {
  return reinterpret_cast<uintptr_t>(row) % sizeof(Pack4<T>) == 0;  // a null row qualifies (it is never read)
}

// Whether rows of `cols` elements at these addresses are read (and written) four elements at a time: when every row
// starts on a pack boundary and cols % 4 == 0 (rows of contiguous (N, C) tensors, C % 4 == 0) and no element is
// wider than 4 bytes (a 16-byte float pack; 8 bytes for fp16 / bf16). The same answer for the whole block.
template <typename... T>
__device__ __forceinline__ bool packed_rows(int64_t cols, const T*... rows) {
  if constexpr (((sizeof(T) <= 4) && ...)) {
    return cols % 4 == 0 && (pack_aligned(rows) && ...);
  } else {
    return false;
  }
}

// Calls f(j, a_j, b_j, ...) for this thread's elements j of rows a, b, ... of `cols` elements (each converted to
// Acc; a null row reads as 0), the block's threads striding over them: four consecutive elements of every row per
// step, each row read with one vector load, where packed_rows allows; otherwise one element at a time. Each path
// visits a thread's elements in a fixed order.
template <typename Acc, typename F, typename... T>
__device__ __forceinline__ void for_rows(int64_t cols, F f, const T*... rows) {
  if constexpr (((sizeof(T) <= 4) && ...)) {
    if (packed_rows(cols, rows...)) {
      for (int64_t q = threadIdx.x; q < cols / 4; q += blockDim.x) {
        [&](const auto&... packs) {
          for (int k = 0; k < 4; ++k) f(4 * q + k, packs.v[k]...);
        }(load_pack<Acc>(rows, q)...);
      }
      return;
    }
  }
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) f(j, (rows ? load<Acc>(rows, j) : Acc(0))...);
}

// out[j] = f(j, a_j, b_j, ...) over a row, as for_rows visits it (stored with one vector store per pack when the
// inputs and out are packed). Each thread writes only the elements it read, so out may alias any input row.
template <typename Acc, typename TO, typename F, typename... T>
__device__ __forceinline__ void map_rows(int64_t cols, TO* out, F f, const T*... rows) {
  if constexpr (sizeof(TO) <= 4 && ((sizeof(T) <= 4) && ...)) {
    if (packed_rows(cols, static_cast<const TO*>(out), rows...)) {
      for (int64_t q = threadIdx.x; q < cols / 4; q += blockDim.x) {
        Pack4<TO> result;
        [&](const auto&... packs) {
          for (int k = 0; k < 4; ++k) result.v[k] = static_cast<TO>(static_cast<float>(f(4 * q + k, packs.v[k]...)));
        }(load_pack<Acc>(rows, q)...);
        reinterpret_cast<Pack4<TO>*>(out)[q] = result;
      }
      return;
    }
  }
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) store(out, j, f(j, (rows ? load<Acc>(rows, j) : Acc(0))...));
}

template <typename Acc, typename TA, typename TB, typename F>
__device__ __forceinline__ void for_row_pair(const TA* a, const TB* b, int64_t cols, F f) {
  for_rows<Acc>(cols, f, a, b);
}

template <typename Acc, typename T, typename F>
__device__ __forceinline__ void for_row(const T* a, int64_t cols, F f) {
  for_rows<Acc>(cols, f, a);
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

struct DeviceLog {
  template <typename Acc>
  __device__ __forceinline__ Acc operator()(Acc x) const { return log_acc(x); }
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

// Log-sum-exp statistics kept online: the max m of the values seen and the sum s of exp(value - m), rescaled when
// the max rises, so that one pass over the values gives both (-inf and 0 before any finite value).
template <typename Acc>
struct OnlineLse {
  Acc max = neg_inf<Acc>();
  Acc sum = 0;

  // Takes v into the max, and into the sum when `counted` (a contrastive row's positive sets the shift but is left
  // out of the negatives' sum). -inf adds nothing; a NaN reaches the sum.
  __device__ __forceinline__ void push(Acc v, bool counted = true) {
    if (v > max) {
      sum = sum * exp_acc(max - v) + (counted ? Acc(1) : Acc(0));
      max = v;
    } else if (counted && v != neg_inf<Acc>()) {
      sum += exp_acc(v - max);
    }
  }
  // Merges another part's statistics. Symmetric in its two operands (the same bits whichever is `this`), so a
  // shuffle butterfly leaves every lane with the same result; fixed trees keep merges deterministic.
  __device__ __forceinline__ void merge(Acc other_max, Acc other_sum) {
    const Acc m = max_acc(max, other_max);
    if (m == neg_inf<Acc>()) return;  // both empty
    sum = sum * exp_acc(max - m) + other_sum * exp_acc(other_max - m);
    max = m;
  }
  __device__ __forceinline__ void warp_merge() {
    for (int offset = 16; offset > 0; offset >>= 1) {
      const Acc other_max = __shfl_xor_sync(CKD_FULL_MASK, max, offset);
      const Acc other_sum = __shfl_xor_sync(CKD_FULL_MASK, sum, offset);
      merge(other_max, other_sum);
    }
  }
  // The whole block's statistics, in every thread; every thread of the block must call it. The scratch arrays
  // hold one value per warp (32 entries each).
  __device__ __forceinline__ void block_merge(Acc* scratch_max, Acc* scratch_sum) {
    warp_merge();
    __syncthreads();  // a previous reduction may still be reading the scratch
    if (threadIdx.x % 32 == 0) {
      scratch_max[threadIdx.x / 32] = max;
      scratch_sum[threadIdx.x / 32] = sum;
    }
    __syncthreads();
    max = scratch_max[0];
    sum = scratch_sum[0];
    for (unsigned w = 1; w < blockDim.x / 32; ++w) merge(scratch_max[w], scratch_sum[w]);
  }
};

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
  Acc norm = sqrt_acc(sq);
  // As the CPU's row_inv_norm: squares that overflow although the norm is representable are summed again scaled by
  // the row's largest |x_j|. The branch is uniform over the block (block_reduce gives every thread the total). A row
  // with an infinite entry keeps its infinite norm (inverse 0, and inf * 0 = NaN in its similarities): max_acc would
  // turn the NaN that scaling gives it into eps.
  if (sq == -neg_inf<Acc>()) {
    Acc m = 0;
    for_row<Acc>(row, cols, [&](int64_t, Acc v) { m = max_acc(m, v < 0 ? -v : v); });
    m = block_reduce(m, MaxOp{}, scratch);
    if (m < -neg_inf<Acc>()) {
      Acc scaled = 0;
      for_row<Acc>(row, cols, [&](int64_t, Acc v) { scaled += (v / m) * (v / m); });
      norm = m * sqrt_acc(block_reduce(scaled, SumOp{}, scratch));
    }
  }
  if (threadIdx.x == 0) inv_norm[blockIdx.x] = Acc(1) / max_acc(norm, static_cast<Acc>(kNormEps));
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
__global__ void kd_rows_kernel(const TS* s, const TT* t, int64_t cols, Acc temperature,
                               DivergenceParams<Acc> divergence, const bool* valid, Acc* loss, const Acc* weight,
                               TS* grad) {
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
  // log p from lse_s itself (see the CPU kernel: lse_t + c + d rounds like its largest part). The divergence's terms and, for all but forward_kl, sum_j p_j g_j, which their gradient needs first.
  Acc total = 0, mean_score = 0;
  for_row_pair<Acc>(s + base, t + base, cols, [&](int64_t, Acc sj, Acc tj) {
    const Acc log_p = sj * inv_temp - lse_s;
    const DivergenceTerm<Acc> r =
        divergence_term(divergence, tj * inv_temp - lse_t, (sj - tj) * inv_temp - c - d, log_p, e, DeviceLog{});
    total += r.term;
    mean_score += prob_of(log_p, e) * r.score;
  });
  total = block_reduce(total, SumOp{}, scratch);
  const bool forward_kl = divergence.kind == DivergenceKind::ForwardKL;  // uniform across the block
  if (!forward_kl && grad) mean_score = block_reduce(mean_score, SumOp{}, scratch);
  if (threadIdx.x == 0) loss[i] = divergence.loss_scale * total;
  if (grad) {
    const Acc g = weight[i] * divergence.loss_scale * inv_temp;
    for_row_pair<Acc>(s + base, t + base, cols, [&](int64_t j, Acc sj, Acc tj) {
      const Acc log_q = tj * inv_temp - lse_t, delta = (sj - tj) * inv_temp - c - d, log_p = sj * inv_temp - lse_s;
      const Acc value =
          forward_kl ? kd_prob_difference(log_q, delta, log_p, e)
                     : prob_of(log_p, e) * (divergence_term(divergence, log_q, delta, log_p, e, DeviceLog{}).score -
                                            mean_score);
      store(grad, base + j, g * value);
    });
  }
}

// Element kernels run on a 2-D grid of 2-D blocks (element_grid in cuda_backend.h): threadIdx.y / blockIdx.y walk
// the rows, threadIdx.x / blockIdx.x the columns, so an element's row and column come without a 64-bit division,
// and a block's row reads its row's values once. Calls row(r), which returns the row's element function, then that
// function for each of this thread's columns c of row r.
template <typename RowF>
__device__ __forceinline__ void for_elements(int64_t rows, int64_t cols, RowF row) {
  const int64_t row_step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  const int64_t col_step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows; r += row_step) {
    auto element = row(r);
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < cols; c += col_step) element(c);
  }
}

template <typename Acc, typename T>
__global__ void load_rows_kernel(const T* x, int64_t cols, int64_t row0, int64_t rows, const Acc* row_scale,
                                 const bool* valid, Acc* out) {
  for_elements(rows, cols, [&](int64_t r) {
    const int64_t i = row0 + r;
    const bool masked = valid && !valid[i];  // exactly 0, whatever a masked row holds
    const Acc f = row_scale ? row_scale[i] : Acc(1);
    return [=](int64_t c) { out[r * cols + c] = masked ? Acc(0) : load<Acc>(x, i * cols + c) * f; };
  });
}

template <typename Acc, typename T, typename TO>
__global__ void exp_block_kernel(const T* x, int64_t ldx, int64_t row0, int64_t rows, int64_t col0, int64_t cols,
                                 Acc inv_temp, const Acc* row_max, const Acc* row_rest, const Acc* col_shift,
                                 const bool* valid, TO* out) {
  for_elements(rows, cols, [&](int64_t r) {
    const int64_t i = row0 + r;
    const bool masked = valid && !valid[i];
    const Acc m = masked ? Acc(0) : row_max[i], rest = masked ? Acc(0) : row_rest[i];
    return [=](int64_t c) {
      if (masked) {
        store(out, r * cols + c, Acc(0));
        return;
      }
      const Acc v = log_prob(load<Acc>(x, i * ldx + col0 + c), inv_temp, m, rest);
      store(out, r * cols + c, exp_acc(col_shift ? v - clamped_log_norm(col_shift[col0 + c]) : v));
    };
  });
}

// The contrastive epilogue (EpilogueParams) in two kernels over a grid of (strip row, column chunk) blocks, so that
// a strip of few rows still fills the GPU: the first reduces each chunk of a row in one online pass, the second
// merges a row's chunk statistics in a fixed order and writes its loss and, per chunk, its coefficients. No float
// atomics: results are identical run to run. The chunks' (max, sum) pairs and each row's z_ii go through
// `partials` (EpilogueSplit::floats() values).
struct EpilogueSplit {
  int64_t rows, chunks, chunk_cols;  // chunk c holds columns [c * chunk_cols, min((c + 1) * chunk_cols, cols))
  __host__ __device__ int64_t floats() const { return rows * (2 * chunks + 1); }
};

// z_ij of the epilogue from the strip's raw value: -inf where column j is masked.
template <typename Acc>
__device__ __forceinline__ Acc epilogue_value(const EpilogueParams<Acc>& p, Acc raw, int64_t i, int64_t j) {
  return p.valid && !p.valid[j] ? neg_inf<Acc>() : raw * p.scale * epilogue_raw_factor(p, i, j);
}

// Block (r, c): the max over chunk c of row r's z_ij (the positive included) and the max-shifted sum of its
// negatives, into partials[2 (r chunks + c) + {0, 1}]; the thread holding column i also stores z_ii after them.
// Reads the strip only.
template <typename Acc>
__global__ void contrastive_epilogue_stats_kernel(EpilogueParams<Acc> p, EpilogueSplit split, Acc* partials) {
  __shared__ Acc scratch_max[32], scratch_sum[32];
  const int64_t r = blockIdx.x, chunk = blockIdx.y;
  const int64_t i = p.row0 + r;
  if (p.valid && !p.valid[i]) return;  // the finishing kernel writes its zeros
  const int64_t c0 = chunk * split.chunk_cols;
  const int64_t n = split.chunk_cols < p.cols - c0 ? split.chunk_cols : p.cols - c0;
  OnlineLse<Acc> lse;
  for_row<Acc>(p.strip + r * p.cols + c0, n, [&](int64_t k, Acc raw) {
    const int64_t j = c0 + k;
    const Acc v = epilogue_value(p, raw, i, j);
    if (j == i) partials[split.rows * split.chunks * 2 + r] = v;
    lse.push(v, j != i);
  });
  lse.block_merge(scratch_max, scratch_sum);
  if (threadIdx.x == 0) {
    partials[2 * (r * split.chunks + chunk)] = lse.max;
    partials[2 * (r * split.chunks + chunk) + 1] = lse.sum;
  }
}

// Block (r, c): row r's statistics from its chunks' partials, merged in the same fixed tree by every warp (no
// barrier); chunk 0's block writes the loss, and with a weight every block turns its chunk into coefficients in
// place, recomputing z_ij from the raw strip (grid (rows, 1) without a weight).
template <typename Acc>
__global__ void contrastive_epilogue_finish_kernel(EpilogueParams<Acc> p, EpilogueSplit split, const Acc* partials) {
  const int64_t r = blockIdx.x, chunk = blockIdx.y;
  const int64_t i = p.row0 + r;
  const int64_t c0 = chunk * split.chunk_cols;
  const int64_t n = split.chunk_cols < p.cols - c0 ? split.chunk_cols : p.cols - c0;
  Acc* z = p.strip + r * p.cols + c0;
  const bool want_grad = p.weight != nullptr;
  if (p.valid && !p.valid[i]) {
    if (chunk == 0 && threadIdx.x == 0) p.loss[i] = 0;
    if (want_grad) zero_row(z, 0, n);
    return;
  }
  OnlineLse<Acc> lse;
  for (int64_t k = threadIdx.x % 32; k < split.chunks; k += 32) {
    lse.merge(partials[2 * (r * split.chunks + k)], partials[2 * (r * split.chunks + k) + 1]);
  }
  lse.warp_merge();
  const Acc zi = partials[split.rows * split.chunks * 2 + r];
  // The term from the negatives' log-sum-exp (kernels/scalar_math.h, softplus_acc): no cancellation where the
  // positive dominates.
  const Acc d = (lse.max - zi) + log_acc(lse.sum);
  const Acc term = softplus_acc(d);
  if (chunk == 0 && threadIdx.x == 0) p.loss[i] = term;
  if (!want_grad) return;
  const Acc full_lse = zi + term;
  const Acc g = p.weight[i] * p.scale;
  map_rows<Acc>(n, z, [&](int64_t k, Acc raw) {
    const int64_t j = c0 + k;
    const Acc coef = j == i ? -g * sigmoid_acc(d) : g * exp_acc(epilogue_value(p, raw, i, j) - full_lse);
    return coef * epilogue_raw_factor(p, i, j);
  }, static_cast<const Acc*>(z));
}

// Symmetric tiles (SymmetricTile) take two passes: this one merges every tile's negatives into its rows' running
// log-sum-exps; the coefficients need each row's final LSE over all tiles, so they are a second pass
// (symmetric_tile_coefficients_kernel) once every tile is merged. Blocks [0, rows): one per tile row i, LSE_j z_ij in
// one online pass. Off-diagonal tiles stand for their transpose too: blocks [rows, rows + ceil(cols / 32)) take 32
// columns j each (coalesced across a warp), the block's warps splitting the tile's rows, merged in warp order, LSE_i
// z_ij into row j. Those rows (col0 .. col0 + cols - 1) lie past the tile's own rows, so no two blocks merge into one
// row; a diagonal tile (rows == columns) runs the row blocks only, which see all of it.
template <typename Acc>
__global__ void symmetric_tile_lse_kernel(SymmetricTile<Acc> t, Acc* row_max, Acc* row_sum) {
  __shared__ Acc scratch_max[kColumnThreads], scratch_sum[kColumnThreads];
  OnlineLse<Acc> lse;
  if (blockIdx.x < t.rows) {
    const int64_t r = blockIdx.x;
    const int64_t i = t.row0 + r;
    if (t.valid && !t.valid[i]) return;
    for (int64_t c = threadIdx.x; c < t.cols; c += blockDim.x) lse.push(symmetric_tile_value(t, r, c));
    lse.block_merge(scratch_max, scratch_sum);
    if (threadIdx.x == 0) merge_lse(row_max[i], row_sum[i], lse.max, lse.sum);
    return;
  }
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) - t.rows) * 32 + lane;
  if (c < t.cols) {
    for (int64_t r = warp; r < t.rows; r += warps) lse.push(symmetric_tile_value(t, r, c));
  }
  scratch_max[threadIdx.x] = lse.max;
  scratch_sum[threadIdx.x] = lse.sum;
  __syncthreads();
  if (warp != 0 || c >= t.cols) return;
  for (unsigned w = 1; w < warps; ++w) lse.merge(scratch_max[w * 32 + lane], scratch_sum[w * 32 + lane]);
  merge_lse(row_max[t.col0 + c], row_sum[t.col0 + c], lse.max, lse.sum);
}

// The second pass over symmetric tiles (see symmetric_tile_lse_kernel), an element kernel.
template <typename Acc>
__global__ void symmetric_tile_coefficients_kernel(SymmetricTile<Acc> t, const Acc* lse, const Acc* weight) {
  for_elements(t.rows, t.cols, [&](int64_t r) {
    const int64_t i = t.row0 + r;
    const Acc wi = weight[i], lse_i = lse[i];
    return [=](int64_t c) {
      const int64_t j = t.col0 + c;
      const Acc z = symmetric_tile_value(t, r, c);
      // 0 where masked and on the diagonal (z = -inf there).
      const Acc coef = z == neg_inf<Acc>() ? Acc(0)
                                           : (wi * exp_acc(z - lse_i) + weight[j] * exp_acc(z - lse[j])) * t.scale *
                                                 symmetric_tile_raw_factor(t, i, j);
      t.tile[r * t.ld + c] = coef;
    };
  });
}

// The coefficients of a block of candidates col0 .. col0 + cols - 1 against anchors whose log-sum-exps are known
// (KernelBackend::contrastive_coefficients), an element kernel: 0 on masked rows and columns and at the positive.
template <typename Acc>
__global__ void contrastive_coefficients_kernel(EpilogueParams<Acc> p, const Acc* lse) {
  for_elements(p.rows, p.cols, [&](int64_t r) {
    const int64_t i = p.row0 + r;
    const bool row_valid = !(p.valid && !p.valid[i]);
    const Acc g = row_valid ? p.weight[i] * p.scale : Acc(0), lse_i = row_valid ? lse[i] : Acc(0);
    Acc* z = p.strip + r * p.cols;
    return [=](int64_t c) {
      const int64_t j = p.col0 + c;
      const Acc f = epilogue_raw_factor(p, i, j);
      const bool negative = row_valid && j != i && !(p.valid && !p.valid[j]);
      z[c] = negative ? g * exp_acc(z[c] * p.scale * f - lse_i) * f : Acc(0);
    };
  });
}

// One block per row, d = dv / max(|x|, eps): grad = d' - [unclamped] <d', x> x / |x|^2 with d' = d + extra (formed
// in each of the two passes, not written back). Each pass reads d, x and extra_x once, four elements per vector load
// where the rows allow (for_rows); each thread writes only the elements it read, so grad may alias d.
template <typename Acc, typename T, typename TE, typename TG>
__global__ void normalize_backward_kernel(const Acc* d, const T* x, int64_t cols, const Acc* extra_coef,
                                          const TE* extra_x, const bool* valid, TG* grad) {
  __shared__ Acc scratch[32];
  const int64_t i = blockIdx.x;
  const int64_t base = i * cols;
  if (valid && !valid[i]) {
    zero_row(grad, base, cols);
    return;
  }
  const Acc f = extra_coef ? extra_coef[i] : Acc(0);
  const TE* extra = extra_coef ? extra_x + base : nullptr;  // a null row reads as 0: d' = d
  Acc sq = 0, dot = 0;
  for_rows<Acc>(cols, [&](int64_t, Acc dj, Acc xj, Acc ej) {
    sq += xj * xj;
    dot += (dj + f * ej) * xj;
  }, d + base, x + base, extra);
  sq = block_reduce(sq, SumOp{}, scratch);
  dot = block_reduce(dot, SumOp{}, scratch);
  const Acc proj = sqrt_acc(sq) < static_cast<Acc>(kNormEps) ? Acc(0) : dot / sq;
  map_rows<Acc>(cols, grad + base, [&](int64_t, Acc dj, Acc xj, Acc ej) { return (dj + f * ej) - proj * xj; },
                d + base, x + base, extra);
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
// softmax), pbar by column_dots' own expression. Three passes (sums, sum(u), grad), each reading x, dp, dpbar and
// the column statistics once with vector loads where the rows allow (for_rows; a null dp / dpbar reads as 0 and is
// not used). Each thread writes only the elements it read, so grad may alias dp.
template <typename Acc, typename T, typename TG>
__global__ void bickd_backward_rows_kernel(const Acc* dp, const Acc* dpbar, const T* x, int64_t cols,
                                           const Acc* row_max, const Acc* row_log_sum, const Acc* col_log_norm,
                                           const Acc* col_projection, Acc inv_temp, const bool* valid, TG* grad) {
  __shared__ Acc scratch[32];
  const int64_t i = blockIdx.x;
  const int64_t base = i * cols;
  if (valid && !valid[i]) {
    zero_row(grad, base, cols);
    return;
  }
  const Acc m = row_max[i], log_sum = row_log_sum[i];
  const Acc* dp_row = dp ? dp + base : nullptr;
  const Acc* dpbar_row = dpbar ? dpbar + base : nullptr;
  const Acc* log_norms = dpbar ? col_log_norm : nullptr;
  const Acc* projections = dpbar ? col_projection : nullptr;
  Acc sum = 0, sq = 0, r = 0;
  for_rows<Acc>(cols, [&](int64_t, Acc xj, Acc dpj) {
    const Acc e = exp_acc(xj * inv_temp - m);
    sum += e;
    if (dp) {
      sq += e * e;
      r += dpj * e;
    }
  }, x + base, dp_row);
  const Acc inv_sum = Acc(1) / block_reduce(sum, SumOp{}, scratch);
  Acc inv_norm = 0;
  if (dp) {  // uniform across the block
    inv_norm = Acc(1) / sqrt_acc(block_reduce(sq, SumOp{}, scratch));
    r = block_reduce(r, SumOp{}, scratch) * inv_norm;
  }
  // u_j = p_j (dp_j - <dp, p> p_j) + pbar_j (dpbar_j - k_j pbar_j).
  auto u = [&](Acc xj, Acc e, Acc dpj, Acc dpbarj, Acc log_norm_j, Acc k_j) {
    Acc v = 0;
    if (dp) {
      const Acc p = e * inv_norm;
      v = p * (dpj - r * p);
    }
    if (dpbar) {
      const Acc pbar = exp_acc(log_prob(xj, inv_temp, m, log_sum) - clamped_log_norm(log_norm_j));
      v += pbar * (dpbarj - k_j * pbar);
    }
    return v;
  };
  Acc total = 0;
  for_rows<Acc>(cols, [&](int64_t, Acc xj, Acc dpj, Acc dpbarj, Acc log_norm_j, Acc k_j) {
    total += u(xj, exp_acc(xj * inv_temp - m), dpj, dpbarj, log_norm_j, k_j);
  }, x + base, dp_row, dpbar_row, log_norms, projections);
  total = block_reduce(total, SumOp{}, scratch);
  map_rows<Acc>(cols, grad + base, [&](int64_t, Acc xj, Acc dpj, Acc dpbarj, Acc log_norm_j, Acc k_j) {
    const Acc e = exp_acc(xj * inv_temp - m);
    return (u(xj, e, dpj, dpbarj, log_norm_j, k_j) - e * inv_sum * total) * inv_temp;
  }, x + base, dp_row, dpbar_row, log_norms, projections);
}

}  // namespace ckd::cuda
