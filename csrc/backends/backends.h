// The kernel backends, one per device, as the orchestration (csrc/ckd.cpp, bickd.cpp, kd.cpp over csrc/orchestration/) reaches them.
//
//   cpu       csrc/backends/cpu       torch-free row kernels run with at::parallel_for     (in ckd_ext._C)
//   cuda      csrc/backends/cuda      the CUDA kernels, compiled by nvcc                   (in ckd_ext._C)
//   emulated  csrc/backends/emulated  the same CUDA kernels compiled by the host compiler against the CPU
//                                     emulator (csrc/cuda_emulator), in their own module ckd_ext._emulated, which
//                                     hands its backend to _C through EmulatedBackendTable
//
// The emulated backend lives in a separate shared object so that the CUDA kernels' two compilations (nvcc
// for the GPU, the host compiler for the emulator) never are two bodies of one mangled symbol in one
// library: the kernel templates, CudaBackend and launch_kernel instantiate to the same names in both.
#pragma once
#include <cstdint>

#include "kernel_interface/backend.h"

namespace ckd {

template <typename Acc>
KernelBackend<Acc>& cpu_backend();

// `stream` is the cudaStream_t the kernels are queued on.
template <typename Acc>
KernelBackend<Acc>& cuda_backend(void* stream);

// What ckd_ext._emulated exports (in a PyCapsule named kEmulatedBackendCapsule) and _C installs with
// install_emulated_backend. `abi` (backends/emulated/abi.h) guards against a stale _emulated built from another
// KernelBackend.
struct EmulatedBackendTable {
  int64_t abi;
  KernelBackend<float>& (*float_backend)();
  KernelBackend<double>& (*double_backend)();
};
constexpr const char* kEmulatedBackendCapsule = "ckd_ext._emulated.backend_table";

}  // namespace ckd
