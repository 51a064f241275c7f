// Planted bug: an off-by-one write past the dynamic shared memory the launch asked for. AddressSanitizer
// must report it (the emulator allocates exactly smem_bytes: a "heap-buffer-overflow").
#include <vector>

#include "cuda_emulator/device.h"

__global__ void oob_dynamic_smem_kernel(float* out) {
  CKD_DYNAMIC_SMEM(float, buf);
  buf[threadIdx.x + 1] = 1.0f;  // [planted:A]
  __syncthreads();
  out[threadIdx.x] = buf[threadIdx.x];
}

int main() {
  std::vector<float> out(64);
  launch_kernel(oob_dynamic_smem_kernel, dim3(1), dim3(64), 64 * sizeof(float), nullptr, out.data());
  return 0;
}
