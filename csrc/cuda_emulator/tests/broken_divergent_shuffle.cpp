// Planted bug: the two halves of each warp execute different shuffles. The emulator must abort naming both
// sites (the lines marked as planted; CMakeLists.txt reads their numbers).
#include <vector>

#include "cuda_emulator/device.h"

__global__ void divergent_shuffle_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 32 < 16) {
    v += __shfl_xor_sync(CKD_FULL_MASK, v, 1);  // [planted:A]
  } else {
    v += __shfl_xor_sync(CKD_FULL_MASK, v, 2);  // [planted:B]
  }
  out[threadIdx.x] = v;
}

int main() {
  std::vector<float> out(64);
  launch_kernel(divergent_shuffle_kernel, dim3(1), dim3(64), 0, nullptr, out.data());
  return 0;
}
