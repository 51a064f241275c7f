// ckd_ext._emulated: the CUDA backend (cuda_backend.h, cuda_kernels.h) compiled by the host compiler against the
// CPU emulator (cuda_emulator/emulator.h), handed to ckd_ext._C as an EmulatedBackendTable in a PyCapsule. Torch-free
// apart from pybind11; _C runs CPU tensors through it inside ckd_ext.testing.emulated_cuda().
#include <pybind11/pybind11.h>

#include "backends/backends.h"
#include "backends/cuda/cuda_backend.h"
#include "backends/emulated/abi.h"
#include "cuda_emulator/emulator.h"

namespace {

template <typename Acc>
ckd::KernelBackend<Acc>& emulated_backend() {
  return ckd::cuda_backend_on<Acc>(nullptr);  // the emulator ignores streams
}

const ckd::EmulatedBackendTable kTable{ckd::kEmulatedBackendAbi, &emulated_backend<float>,
                                       &emulated_backend<double>};

}  // namespace

PYBIND11_MODULE(_emulated, module) {
  module.doc() = "The CUDA kernels under the CPU emulator, as a kernel backend for ckd_ext._C (tests only)";
  module.def("backend_table", [] {
    return pybind11::capsule(const_cast<ckd::EmulatedBackendTable*>(&kTable), ckd::kEmulatedBackendCapsule);
  });
  module.def("launch_count", &ckd_emu::launch_count, "Kernels the emulator has launched since the process started.");
}
