// Vanilla KD (docs/math.md section 3): row-separable, one kernel per call.
#include "losses.h"
#include "orchestration/op_call.h"

namespace ckd {
namespace {
// The loss, and the gradient where weight is defined.
template <typename Acc>
void kd_core(const Inputs& in, double temperature, const at::Tensor& weight, at::Tensor& row_loss,
             const at::Tensor& grad) {
  backend_for<Acc>(in.student)
      .kd_rows(as_matrix(in.student), as_matrix(in.teacher), static_cast<Acc>(temperature), in.valid(),
               row_loss.data_ptr<Acc>(), weight.defined() ? weight.const_data_ptr<Acc>() : nullptr,
               weight.defined() ? grad.data_ptr() : nullptr);
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> kd_forward(const at::Tensor& student, const at::Tensor& teacher,
                                              const std::optional<at::Tensor>& mask, double temperature,
                                              std::string_view reduction, bool compute_grad) {
  check_positive("temperature", temperature);
  return run_op("kd_forward", student, teacher, mask, reduction,
                [&](auto tag, const OpCall& call) -> std::tuple<at::Tensor, at::Tensor> {
    using Acc = decltype(tag);
    const Inputs& in = call.in;
    const bool want_grad = compute_grad && call.reduction != Reduction::None;
    at::Tensor row_loss = at::empty({in.rows}, call.acc_options);
    at::Tensor grad = forward_grad(in, want_grad);
    kd_core<Acc>(in, temperature, want_grad ? unit_weights(call, call.count, in.mask, in.rows) : at::Tensor(),
                 row_loss, grad);
    return {reduce_terms(row_loss, call.reduction, call.count), grad};
  });
}

at::Tensor kd_backward(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                       const std::optional<at::Tensor>& mask, double temperature, std::string_view reduction) {
  check_positive("temperature", temperature);
  return run_op("kd_backward", student, teacher, mask, reduction, [&](auto tag, const OpCall& call) {
    using Acc = decltype(tag);
    const Inputs& in = call.in;
    at::Tensor row_loss = at::empty({in.rows}, call.acc_options);
    at::Tensor grad = at::empty_like(in.student);
    kd_core<Acc>(in, temperature,
                 anchor_weights(grad_loss, call.reduction, call.count, in.mask, in.rows, call.acc_options),
                 row_loss, grad);
    return grad;
  });
}

}  // namespace ckd
