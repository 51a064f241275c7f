#pragma once
// The CUDA kernels' backend, as the orchestration sees it: instantiated in cuda/gpu_backend.cu (nvcc) and
// emulated/gpu_backend_emulated.cpp (host compiler + CPU emulator).
#include "kernels/backend.h"

namespace ckd {
template <typename Acc>
KernelBackend<Acc>& gpu_backend(void* stream);
}
