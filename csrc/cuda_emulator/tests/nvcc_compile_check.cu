// Compiled by nvcc only (ctest emulator.nvcc_compile): the kernels the emulator self-tests run must be
// valid CUDA too, and launch_kernel's nvcc path must compile. Instantiates every kernel and launcher.
#include "api_kernels.h"
#include "sample_kernels.h"

template void ckd_sample::launch_row_stats<float>(const float*, int, int, float*, float*, float*, cudaStream_t);
template void ckd_sample::launch_row_stats<c10::Half>(const c10::Half*, int, int, float*, float*, float*,
                                                      cudaStream_t);
template void ckd_sample::launch_row_stats<c10::BFloat16>(const c10::BFloat16*, int, int, float*, float*, float*,
                                                          cudaStream_t);

void launch_api_kernels(unsigned int* u, long long* ll, ckd_api::AtomicsOut* a, float* f, const int* in, int* out,
                        cudaStream_t stream) {
  launch_kernel(ckd_api::index_kernel, dim3(3, 2, 2), dim3(8, 2, 4), 0, stream, u);
  launch_kernel(ckd_api::shuffle_kernel, dim3(1), dim3(64), 0, stream, ll, 16);
  launch_kernel(ckd_api::atomics_kernel, dim3(3), dim3(64), 0, stream, a);
  launch_kernel(ckd_api::poison_kernel, dim3(2), dim3(32), 32 * sizeof(float), stream, f);
  launch_kernel(ckd_api::early_return_kernel, dim3(1), dim3(128), 0, stream, in, out, 40);
  launch_kernel(ckd_api::syncwarp_kernel, dim3(1), dim3(64), 0, stream, out);
}
