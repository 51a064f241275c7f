// Planted bug: 64 threads write a 32-element __shared__ array through a pointer (as when scratch is passed to
// a helper). AddressSanitizer must report the overflow: a __shared__ array is a function-local static in the
// emulator, so it is a "global-buffer-overflow". (Indexing the array itself would be caught first by UBSan's
// bounds check, which knows the array type.)
#include <vector>

#include "cuda_emulator/device.h"

__device__ __forceinline__ void fill(float* scratch) {
  scratch[threadIdx.x] = 1.0f;  // [planted:A]
}

__global__ void oob_shared_kernel(float* out) {
  __shared__ float partials[32];
  fill(partials);
  __syncthreads();
  out[threadIdx.x] = partials[threadIdx.x % 32];
}

int main() {
  std::vector<float> out(64);
  launch_kernel(oob_shared_kernel, dim3(1), dim3(64), 0, nullptr, out.data());
  return 0;
}
