// Prints what the emulator costs (not a test; run by hand): thread start-up, launching a block, a
// __syncthreads(), a warp shuffle. Usage: bench_emulator [threads per block, default 256]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda_emulator/device.h"

namespace {

__global__ void empty_kernel(int* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = 1;
}

__global__ void barrier_kernel(int iterations, int* out) {
  for (int i = 0; i < iterations; ++i) __syncthreads();
  if (threadIdx.x == 0) out[0] = iterations;
}

__global__ void shuffle_kernel(int iterations, float* out) {
  float v = static_cast<float>(threadIdx.x);
  for (int i = 0; i < iterations; ++i) v += __shfl_xor_sync(CKD_FULL_MASK, v, 1 + i % 16);
  out[threadIdx.x] = v;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 256;
  std::vector<int> iout(64);
  std::vector<float> fout(threads);

  auto t0 = std::chrono::steady_clock::now();
  launch_kernel(empty_kernel, dim3(1), dim3(threads), 0, nullptr, iout.data());
  const double first = seconds_since(t0);

  const int blocks = 64;
  t0 = std::chrono::steady_clock::now();
  launch_kernel(empty_kernel, dim3(blocks), dim3(threads), 0, nullptr, iout.data());
  const double per_block = seconds_since(t0) / blocks;

  const int barriers = 200;
  t0 = std::chrono::steady_clock::now();
  launch_kernel(barrier_kernel, dim3(1), dim3(threads), 0, nullptr, barriers, iout.data());
  const double per_barrier = (seconds_since(t0) - per_block) / barriers;

  const int shuffles = 200;
  t0 = std::chrono::steady_clock::now();
  launch_kernel(shuffle_kernel, dim3(1), dim3(threads), 0, nullptr, shuffles, fout.data());
  const double per_shuffle = (seconds_since(t0) - per_block) / shuffles;

  std::printf("block of %d threads:\n", threads);
  std::printf("  first launch (creates the threads): %8.3f ms\n", first * 1e3);
  std::printf("  launching a block (pool warm):      %8.3f ms  (%.2f us per thread)\n", per_block * 1e3,
              per_block * 1e6 / threads);
  std::printf("  __syncthreads():                    %8.3f ms  (%.2f us per thread)\n", per_barrier * 1e3,
              per_barrier * 1e6 / threads);
  std::printf("  __shfl_xor_sync (all warps):        %8.3f ms  (%.2f us per thread)\n", per_shuffle * 1e3,
              per_shuffle * 1e6 / threads);
  return 0;
}
