// Schemas of the ckd_ext ops and their CPU (and CUDA) kernels. Autograd and the fake (meta) implementations are
// registered from Python (ckd_ext/custom_ops.py) with torch.library; the _C module's Python functions (settings,
// test hooks) are in python_module.cpp.
#include <torch/library.h>

#include "losses.h"
#include "orchestration/gemm.h"

// One row per op: its name, which is also its entry point in losses.h, and the rest of its schema. Adding an op is a
// row here (docs/adding-a-loss.md).
#define CKD_EXT_OPS(OP)                                                                                               \
  OP(ckd_forward,                                                                                                     \
     "(Tensor student, Tensor teacher, Tensor? mask, float tau, str anchor, str reduction, bool compute_grad) -> "    \
     "(Tensor, Tensor)")                                                                                              \
  OP(ckd_backward,                                                                                                    \
     "(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? mask, float tau, str anchor, str reduction) -> "     \
     "Tensor")                                                                                                        \
  OP(kd_forward,                                                                                                      \
     "(Tensor student, Tensor teacher, Tensor? mask, float temperature, str divergence, float beta, float alpha, "   \
     "bool scale_t2, str reduction, bool compute_grad) -> (Tensor, Tensor)")                                          \
  OP(kd_backward,                                                                                                     \
     "(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? mask, float temperature, str divergence, "           \
     "float beta, float alpha, bool scale_t2, str reduction) -> Tensor")                                              \
  OP(bickd_forward,                                                                                                   \
     "(Tensor student, Tensor teacher, Tensor? mask, float temperature, float tau, float w_sample, float w_class, "   \
     "bool symmetric, str reduction, bool compute_grad) -> (Tensor, Tensor, Tensor)")                                 \
  OP(bickd_backward,                                                                                                  \
     "(Tensor grad_sample, Tensor grad_class, Tensor student, Tensor teacher, Tensor? mask, float temperature, "      \
     "float tau, float w_sample, float w_class, bool symmetric, str reduction) -> Tensor")                           \
  OP(gemm_similarity, "(Tensor a, Tensor b) -> Tensor")                                                               \
  OP(gemm_product, "(Tensor(a!) out, Tensor coef, Tensor rows, bool accumulate) -> ()")                               \
  OP(gemm_exact_int8, "(Tensor a, Tensor b) -> Tensor")

TORCH_LIBRARY(ckd_ext, m) {
#define CKD_EXT_DEFINE(name, signature) m.def(#name signature);
  CKD_EXT_OPS(CKD_EXT_DEFINE)
#undef CKD_EXT_DEFINE
}

// The orchestration is device-generic; each device key maps to the same functions, which pick that
// device's kernel backend (backends/select.h).
namespace {
void register_kernels(torch::Library& m) {
#define CKD_EXT_IMPLEMENT(name, signature) m.impl(#name, &ckd::name);
  CKD_EXT_OPS(CKD_EXT_IMPLEMENT)
#undef CKD_EXT_IMPLEMENT
}
}  // namespace

TORCH_LIBRARY_IMPL(ckd_ext, CPU, m) { register_kernels(m); }
#if defined(CKD_WITH_CUDA)
TORCH_LIBRARY_IMPL(ckd_ext, CUDA, m) { register_kernels(m); }
#endif
