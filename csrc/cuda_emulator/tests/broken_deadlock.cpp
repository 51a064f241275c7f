// Planted bug: thread 0 spins on a shared flag that no thread sets while the others wait at a barrier. The
// watchdog must abort (the test sets CKD_EMU_WATCHDOG_SECONDS=1) and show where each thread is.
#include <vector>

#include "cuda_emulator/device.h"

__global__ void deadlock_kernel(int* out) {
  __shared__ int flag;
  if (threadIdx.x == 0) {
    while (atomicAdd(&flag, 0) == 0) {  // [planted:A]
    }
  }
  __syncthreads();  // [planted:B]
  out[threadIdx.x] = flag;
}

int main() {
  std::vector<int> out(64);
  launch_kernel(deadlock_kernel, dim3(1), dim3(64), 0, nullptr, out.data());
  return 0;
}
