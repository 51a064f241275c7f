// Planted bug: each thread reads an element another warp wrote, with no __syncthreads() between the write
// and the read. Runs "correctly" on the emulator; ThreadSanitizer must report the race with both lines.
#include <vector>

#include "cuda_emulator/device.h"

__global__ void missing_syncthreads_kernel(const float* in, float* out) {
  __shared__ float staged[64];
  staged[threadIdx.x] = in[threadIdx.x];  // [planted:A]
  // BUG: a __syncthreads() belongs here.
  out[threadIdx.x] = staged[63 - threadIdx.x];  // [planted:B]
}

int main() {
  std::vector<float> in(64, 1.0f), out(64);
  launch_kernel(missing_syncthreads_kernel, dim3(1), dim3(64), 0, nullptr, in.data(), out.data());
  return 0;
}
