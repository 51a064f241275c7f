// The CUDA backend: the kernels of kernels/gpu_kernels.h for float and double accumulation.
#include "gpu_backend.h"
#include "kernels/gpu_backend.h"

namespace ckd {
template <typename Acc>
KernelBackend<Acc>& gpu_backend(void* stream) {
  return gpu_backend_on<Acc>(stream);
}
template KernelBackend<float>& gpu_backend<float>(void*);
template KernelBackend<double>& gpu_backend<double>(void*);
}  // namespace ckd
