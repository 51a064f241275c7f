// Small kernels that exercise each part of the device.h API whose semantics the emulator must get right.
// Compiled by nvcc too (nvcc_compile_check.cu), so they only use what CUDA has.
#pragma once

#include "cuda_emulator/device.h"

namespace ckd_api {

// Each thread of a 3-D grid of 3-D blocks writes its global linear index at that index, plus one.
__global__ void index_kernel(unsigned int* out) {
  const unsigned int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned int thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned int per_block = blockDim.x * blockDim.y * blockDim.z;
  out[block * per_block + thread] = block * per_block + thread + 1;
}

// For each thread, the results of four shuffles of distinct per-lane values (kShuffleResults per thread).
constexpr int kShuffleResults = 5;
__global__ void shuffle_kernel(long long* out, int width) {
  const int tid = threadIdx.x;
  const int v = 1000 * (tid / 32) + tid % 32;  // warp * 1000 + lane
  long long* o = out + kShuffleResults * tid;
  o[0] = __shfl_xor_sync(CKD_FULL_MASK, v, 5, width);
  o[1] = __shfl_down_sync(CKD_FULL_MASK, v, 3, width);
  o[2] = __shfl_sync(CKD_FULL_MASK, v, 20, width);
  o[3] = static_cast<long long>(__shfl_xor_sync(CKD_FULL_MASK, static_cast<double>(v) + 0.5, 1, width) * 2.0);
  o[4] = __shfl_sync(CKD_FULL_MASK, static_cast<long long>(v) << 33, 31 - tid % 32) >> 33;
}

// Atomics from every thread of every block.
struct AtomicsOut {
  int count;
  int max_value;
  int min_value;
  unsigned int ucount;
  unsigned long long ullcount;
  float fsum;
  double dsum;
  int winner;       // set once by atomicCAS
  int winners;      // how many threads won the CAS (must be 1)
  int exchanged;    // atomicExch target
};
__global__ void atomics_kernel(AtomicsOut* out) {
  const int tid = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  atomicAdd(&out->count, 1);
  atomicMax(&out->max_value, (tid * 37) % 101);
  atomicMin(&out->min_value, 1000 - tid);
  atomicAdd(&out->ucount, 2u);
  atomicAdd(&out->ullcount, 3ull);
  atomicAdd(&out->fsum, 0.5f);   // exact in float for these counts
  atomicAdd(&out->dsum, 0.25);
  if (atomicCAS(&out->winner, -1, tid) == -1) atomicAdd(&out->winners, 1);
  atomicExch(&out->exchanged, tid);
}

// Reads dynamic shared memory before writing it (out: what each thread of each block saw), then writes it:
// under the emulator every block must see the poison again, not the previous block's values.
__global__ void poison_kernel(float* out) {
  CKD_DYNAMIC_SMEM(float, buf);
  const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = buf[threadIdx.x];
  buf[threadIdx.x] = 1.0f;
}

// Threads at or past n return at once; the others exchange values through shared memory across warps,
// which needs a __syncthreads() that the returned threads no longer take part in.
__global__ void early_return_kernel(const int* in, int* out, int n) {
  __shared__ int staged[128];
  const int t = threadIdx.x;
  if (t >= n) return;
  staged[t] = in[t];
  __syncthreads();
  out[t] = staged[n - 1 - t];
}

// Warp-synchronous exchange through shared memory ordered by __syncwarp().
__global__ void syncwarp_kernel(int* out) {
  __shared__ int lanes[64];
  const int t = threadIdx.x;
  lanes[t] = t * 3;
  __syncwarp();
  out[t] = lanes[t ^ 1];
}

}  // namespace ckd_api
