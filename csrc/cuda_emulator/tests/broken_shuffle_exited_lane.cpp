// Planted bug: the upper half of each warp returns early, then the lower half shuffles down by 16, reading
// the lanes that have returned. The emulator must abort naming the shuffle and the lane read.
#include <vector>

#include "cuda_emulator/device.h"

__global__ void shuffle_exited_lane_kernel(const float* in, float* out) {
  if (threadIdx.x % 32 >= 16) return;
  float v = in[threadIdx.x];
  v += __shfl_down_sync(CKD_FULL_MASK, v, 16);  // [planted:A]
  out[threadIdx.x] = v;
}

int main() {
  std::vector<float> in(64, 1.0f), out(64);
  launch_kernel(shuffle_exited_lane_kernel, dim3(1), dim3(64), 0, nullptr, in.data(), out.data());
  return 0;
}
