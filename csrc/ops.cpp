// Schemas of the ckd_ext ops, their CPU (and CUDA) kernels and the _C Python module (the workspace budget and
// the test-only emulated CUDA backend). Autograd and the fake (meta) implementations are registered from Python
// (ckd_ext/ops.py) with torch.library.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "backends/select.h"
#include "losses.h"

TORCH_LIBRARY(ckd_ext, m) {
  m.def(
      "ckd_forward(Tensor student, Tensor teacher, Tensor? mask, float tau, str anchor, str reduction, "
      "bool compute_grad) -> (Tensor, Tensor)");
  m.def(
      "ckd_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? mask, float tau, str anchor, "
      "str reduction) -> Tensor");
  m.def(
      "kd_forward(Tensor student, Tensor teacher, Tensor? mask, float temperature, str reduction, "
      "bool compute_grad) -> (Tensor, Tensor)");
  m.def(
      "kd_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? mask, float temperature, "
      "str reduction) -> Tensor");
  m.def(
      "bickd_forward(Tensor student, Tensor teacher, Tensor? mask, float temperature, float tau, float w_sample, "
      "float w_class, bool symmetric, str reduction, bool compute_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "bickd_backward(Tensor grad_sample, Tensor grad_class, Tensor student, Tensor teacher, Tensor? mask, "
      "float temperature, float tau, float w_sample, float w_class, bool symmetric, str reduction) -> Tensor");
}

// The orchestration is device-generic; each device key maps to the same functions, which pick that
// device's kernel backend (backends/select.h).
namespace {
void register_kernels(torch::Library& m) {
  m.impl("ckd_forward", &ckd::ckd_forward);
  m.impl("ckd_backward", &ckd::ckd_backward);
  m.impl("kd_forward", &ckd::kd_forward);
  m.impl("kd_backward", &ckd::kd_backward);
  m.impl("bickd_forward", &ckd::bickd_forward);
  m.impl("bickd_backward", &ckd::bickd_backward);
}
}  // namespace

TORCH_LIBRARY_IMPL(ckd_ext, CPU, m) { register_kernels(m); }
#if defined(CKD_WITH_CUDA)
TORCH_LIBRARY_IMPL(ckd_ext, CUDA, m) { register_kernels(m); }
#endif

PYBIND11_MODULE(_C, module) {
  module.doc() = "ckd_ext compiled ops (registered under torch.ops.ckd_ext)";
  module.def("workspace_bytes", &ckd::workspace_bytes, "Bytes of work buffers one op call may use.");
  module.def("set_workspace_bytes", &ckd::set_workspace_bytes, "Set the bytes of work buffers one op call may use.");
  module.def(
      "install_emulated_backend",
      [](const pybind11::capsule& table) {
        TORCH_CHECK(std::string_view(table.name()) == ckd::kEmulatedBackendCapsule,
                    "ckd_ext: install_emulated_backend expects ckd_ext._emulated.backend_table()");
        ckd::install_emulated_backend(table.get_pointer<const ckd::EmulatedBackendTable>());
      },
      "Installs ckd_ext._emulated's kernels as the emulated CUDA backend (test builds).");
  module.def("set_emulated_cuda", &ckd::set_emulated_cuda,
             "Test-only: run CPU tensors through the emulated CUDA backend (see ckd_ext.testing).");
  module.def("emulated_cuda", &ckd::emulated_cuda, "Whether CPU tensors run through the emulated CUDA backend.");
}
