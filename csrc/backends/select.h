// Which kernel backend serves a tensor (the orchestration above it is the same for all of them); what follows from
// the choice is in backends/device_kind.h.
#pragma once
#include <ATen/core/Tensor.h>

#include "backends/backends.h"
#include "backends/device_kind.h"

namespace ckd {

// cpu for CPU tensors, cuda for CUDA tensors (on the current stream of their device); while the emulated CUDA
// backend is switched on, CPU tensors run through it instead.
template <typename Acc>
KernelBackend<Acc>& backend_for(const at::Tensor& x);

// Which of those backend_for picks for x.
DeviceKind device_kind(const at::Tensor& x);

// Called once by ckd_ext's Python layer when ckd_ext._emulated is built (test builds only).
void install_emulated_backend(const EmulatedBackendTable* table);
// The test-only switch behind ckd_ext.testing.emulated_cuda(); process-wide, as autograd may run backward on
// another thread than the forward.
void set_emulated_cuda(bool on);
bool emulated_cuda();

}  // namespace ckd
