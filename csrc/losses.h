// The fused losses' op entry points (ckd.cpp, bickd.cpp, kd.cpp over csrc/orchestration/): one orchestration for
// every device (strips of ATen GEMMs, the small kernels through KernelBackend). Inputs are 2-D (N, C); validation
// happens in Python first, these checks only guard direct calls of the ops.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace ckd {

// Forward ops return the loss in the accumulation dtype, float32 (float64 for float64 students), 0-dim for
// "mean"/"sum", per row for "none"; the Python layer rounds it to the student's dtype outside autocast. And,
// when compute_grad is set and the reduction is not "none", the student gradient for an upstream
// gradient of 1 (else an empty tensor): in the accumulation dtype for CKD and BicKD (a 16-bit student's is rounded
// once, after backward's upstream scale), in the student's for KD. Backward ops return it in the student's dtype.
std::tuple<at::Tensor, at::Tensor> ckd_forward(const at::Tensor& student, const at::Tensor& teacher,
                                               const std::optional<at::Tensor>& mask, double tau,
                                               std::string_view anchor, std::string_view reduction,
                                               bool compute_grad);
at::Tensor ckd_backward(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                        const std::optional<at::Tensor>& mask, double tau, std::string_view anchor,
                        std::string_view reduction);

std::tuple<at::Tensor, at::Tensor> kd_forward(const at::Tensor& student, const at::Tensor& teacher,
                                              const std::optional<at::Tensor>& mask, double temperature,
                                              std::string_view divergence, double beta, double alpha, bool scale_t2,
                                              std::string_view reduction, bool compute_grad);
at::Tensor kd_backward(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                       const std::optional<at::Tensor>& mask, double temperature, std::string_view divergence,
                       double beta, double alpha, bool scale_t2, std::string_view reduction);

// Returns (loss or per-sample terms, per-class terms or empty, gradient or empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bickd_forward(const at::Tensor& student, const at::Tensor& teacher,
                                                             const std::optional<at::Tensor>& mask,
                                                             double temperature, double tau, double w_sample,
                                                             double w_class, bool symmetric,
                                                             std::string_view reduction, bool compute_grad);
at::Tensor bickd_backward(const at::Tensor& grad_sample, const at::Tensor& grad_class, const at::Tensor& student,
                          const at::Tensor& teacher, const std::optional<at::Tensor>& mask, double temperature,
                          double tau, double w_sample, double w_class, bool symmetric, std::string_view reduction);

}  // namespace ckd
