// Planted bug: the first two warps wait at one __syncthreads(), the other two at another. The emulator must
// abort naming both barriers.
#include <vector>

#include "cuda_emulator/device.h"

__global__ void divergent_barrier_kernel(float* out) {
  __shared__ float staged[128];
  staged[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 64) {
    __syncthreads();  // [planted:A]
  } else {
    __syncthreads();  // [planted:B]
  }
  out[threadIdx.x] = staged[127 - threadIdx.x];
}

int main() {
  std::vector<float> out(128);
  launch_kernel(divergent_barrier_kernel, dim3(1), dim3(128), 0, nullptr, out.data());
  return 0;
}
