// The CUDA backend of ckd_ext._C: the kernels of cuda_kernels.h, for float and double accumulation.
#include "backends/backends.h"
#include "backends/cuda/cuda_backend.h"

namespace ckd {
template <typename Acc>
KernelBackend<Acc>& cuda_backend(void* stream) {
  return cuda_backend_on<Acc>(stream);
}
template KernelBackend<float>& cuda_backend<float>(void*);
template KernelBackend<double>& cuda_backend<double>(void*);
}  // namespace ckd
