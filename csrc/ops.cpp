// Schemas of the ckd_ext ops, their CPU (and CUDA) kernels and the _C Python module (build information and the
// workspace budget). Autograd and the fake (meta) implementations are registered from Python
// (ckd_ext/ops.py) with torch.library.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "losses.h"

// The same file builds ckd_ext._C (library ckd_ext) and, with CKD_LIBRARY / CKD_MODULE defined by
// emulated/ops_emulated.cpp, ckd_ext._emulated (library ckd_ext_emulated: the CUDA kernels run on CPU
// tensors by the emulator). The indirection lets the macros expand before TORCH_LIBRARY pastes them.
#ifndef CKD_LIBRARY
#define CKD_LIBRARY ckd_ext
#define CKD_MODULE _C
#endif
#define CKD_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define CKD_TORCH_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
#define CKD_PYBIND11_MODULE(name, m) PYBIND11_MODULE(name, m)

#ifndef CKD_TORCH_VERSION
#error "setup.py / CMakeLists.txt define CKD_TORCH_VERSION, the torch version the extension is built against"
#endif

CKD_TORCH_LIBRARY(CKD_LIBRARY, m) {
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
// device's kernel backend.
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

CKD_TORCH_LIBRARY_IMPL(CKD_LIBRARY, CPU, m) { register_kernels(m); }
#if defined(CKD_WITH_CUDA)
CKD_TORCH_LIBRARY_IMPL(CKD_LIBRARY, CUDA, m) { register_kernels(m); }
#endif

CKD_PYBIND11_MODULE(CKD_MODULE, module) {
  module.doc() = "ckd_ext compiled ops (registered under torch.ops.ckd_ext)";
  module.attr("torch_version") = CKD_TORCH_VERSION;
#if defined(CKD_WITH_CUDA)
  module.attr("with_cuda") = true;
#else
  module.attr("with_cuda") = false;
#endif
  module.def("workspace_bytes", &ckd::workspace_bytes, "Bytes of work buffers one op call may use.");
  module.def("set_workspace_bytes", &ckd::set_workspace_bytes, "Set the bytes of work buffers one op call may use.");
}
