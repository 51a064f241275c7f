// Planted bug: half of a warp waits at __syncthreads() while the other half executes a shuffle, so neither
// can ever complete. The emulator must abort naming both sites (at once, or through its deadlock detector).
#include <vector>

#include "cuda_emulator/device.h"

__global__ void warp_split_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 16) {
    __syncthreads();  // [planted:A]
  } else {
    v = __shfl_xor_sync(CKD_FULL_MASK, v, 1);  // [planted:B]
  }
  out[threadIdx.x] = v;
}

int main() {
  std::vector<float> out(32);
  launch_kernel(warp_split_kernel, dim3(1), dim3(32), 0, nullptr, out.data());
  return 0;
}
