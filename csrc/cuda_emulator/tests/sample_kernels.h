// A correct sample kernel in the style ckd_ext's kernels follow (csrc/cuda_emulator/README.md): per-row softmax
// statistics (max, log-sum-exp) and the row sum, one block per row, for float, c10::Half and c10::BFloat16
// inputs with float accumulation. It compiles unchanged with nvcc (nvcc_compile_check.cu) and runs on the CPU
// emulator (test_sample_kernels.cpp).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "cuda_emulator/device.h"

namespace ckd_sample {

struct SumOp {
  static constexpr float kIdentity = 0.0f;
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

struct MaxOp {
  static constexpr float kIdentity = -INFINITY;
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Butterfly reduction: every lane ends with the warp's result.
template <typename Op>
__device__ __forceinline__ float warp_allreduce(float v, Op op) {
  for (int offset = 16; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(CKD_FULL_MASK, v, offset));
  return v;
}

// Reduces one value per thread over the block; every thread gets the result. `partials` is __shared__
// scratch of kBlock / 32 floats, free again when this returns.
template <int kBlock, typename Op>
__device__ __forceinline__ float block_allreduce(float v, Op op, float* partials) {
  static_assert(kBlock % 32 == 0 && kBlock <= 1024, "block size must be a multiple of 32");
  constexpr int kWarps = kBlock / 32;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  v = warp_allreduce(v, op);
  if (lane == 0) partials[warp] = v;
  __syncthreads();
  // Every warp folds the partials (rather than warp 0 then a broadcast through shared memory), with a
  // shift-down tree and a broadcast from lane 0, so the three shuffle kinds are all exercised.
  v = lane < kWarps ? partials[lane] : Op::kIdentity;
  for (int offset = 16; offset > 0; offset /= 2) v = op(v, __shfl_down_sync(CKD_FULL_MASK, v, offset));
  v = __shfl_sync(CKD_FULL_MASK, v, 0);
  __syncthreads();  // all reads of `partials` are done before the caller reuses it
  return v;
}

// Row r of x (rows x cols, row-major) -> row_max[r], row_lse[r] = log(sum(exp(x[r]))), row_sum[r].
// Launch: grid rows, block kBlock, dynamic shared memory cols * sizeof(float).
template <typename T, int kBlock>
__global__ void __launch_bounds__(kBlock)
    row_stats_kernel(const T* __restrict__ x, int cols, float* __restrict__ row_max,
                     float* __restrict__ row_lse, float* __restrict__ row_sum) {
  __shared__ float partials[kBlock / 32];
  CKD_DYNAMIC_SMEM(float, row);  // the row, converted to float once
  const T* xr = x + static_cast<int64_t>(blockIdx.x) * cols;
  float m = MaxOp::kIdentity;
  float s = 0.0f;
  for (int c = threadIdx.x; c < cols; c += kBlock) {
    const float v = static_cast<float>(xr[c]);
    row[c] = v;
    m = fmaxf(m, v);
    s += v;
  }
  m = block_allreduce<kBlock>(m, MaxOp{}, partials);
  s = block_allreduce<kBlock>(s, SumOp{}, partials);
  float e = 0.0f;
  for (int c = threadIdx.x; c < cols; c += kBlock) e += __expf(row[c] - m);
  e = block_allreduce<kBlock>(e, SumOp{}, partials);
  if (threadIdx.x == 0) {
    row_max[blockIdx.x] = m;
    row_lse[blockIdx.x] = m + logf(e);
    row_sum[blockIdx.x] = s;
  }
}

// Torch-free launcher (raw pointers, sizes, a stream), the shape the .cu files instantiate per dtype.
template <typename T>
void launch_row_stats(const T* x, int rows, int cols, float* row_max, float* row_lse, float* row_sum,
                      cudaStream_t stream) {
  if (rows == 0) return;  // CUDA rejects an empty grid
  const size_t smem = static_cast<size_t>(cols) * sizeof(float);
  if (cols <= 32) {
    launch_kernel(row_stats_kernel<T, 32>, dim3(rows), dim3(32), smem, stream, x, cols, row_max, row_lse, row_sum);
  } else {
    launch_kernel(row_stats_kernel<T, 128>, dim3(rows), dim3(128), smem, stream, x, cols, row_max, row_lse,
                  row_sum);
  }
}

}  // namespace ckd_sample
