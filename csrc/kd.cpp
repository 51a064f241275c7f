// KD with a divergence (docs/math.md section 3): row-separable, one kernel per call.
#include "losses.h"
#include "orchestration/op_call.h"

namespace ckd {
namespace {
// The op's divergence arguments as the kernels take them (the Python API has checked them with its own messages,
// ckd_ext/divergences.py; these checks guard direct calls of the op).
DivergenceParams<double> parse_divergence(std::string_view name, double beta, double alpha, bool scale_t2,
                                          double temperature) {
  auto check_open_unit = [](const char* arg, double v) {
    TORCH_CHECK(v > 0.0 && v < 1.0, "ckd_ext: ", arg, " must be in the open interval (0, 1), got ", v);
  };
  DivergenceParams<double> d{DivergenceKind::ForwardKL, 0.0, scale_t2 ? temperature * temperature : 1.0};
  if (name == "reverse_kl") {
    d.kind = DivergenceKind::ReverseKL;
  } else if (name == "jsd") {
    check_open_unit("beta", beta);
    d = {DivergenceKind::JSD, beta, d.loss_scale};
  } else if (name == "skew_kl") {
    check_open_unit("alpha", alpha);
    d = {DivergenceKind::SkewKL, alpha, d.loss_scale};
  } else if (name == "tvd") {
    d.kind = DivergenceKind::TVD;
  } else {
    TORCH_CHECK(name == "forward_kl", "ckd_ext: divergence must be 'forward_kl', 'reverse_kl', 'jsd', 'skew_kl' or ",
                "'tvd', got '", name, "'");
  }
  return d;
}

// The loss, and the gradient where weight is defined.
template <typename Acc>
void kd_core(const Inputs& in, double temperature, const DivergenceParams<double>& divergence,
             const at::Tensor& weight, at::Tensor& row_loss, const at::Tensor& grad) {
  const DivergenceParams<Acc> d{divergence.kind, static_cast<Acc>(divergence.weight),
                                static_cast<Acc>(divergence.loss_scale)};
  backend_for<Acc>(in.student)
      .kd_rows(as_matrix(in.student), as_matrix(in.teacher), static_cast<Acc>(temperature), d, in.valid(),
               row_loss.data_ptr<Acc>(), weight.defined() ? weight.const_data_ptr<Acc>() : nullptr,
               weight.defined() ? grad.data_ptr() : nullptr);
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> kd_forward(const at::Tensor& student, const at::Tensor& teacher,
                                              const std::optional<at::Tensor>& mask, double temperature,
                                              std::string_view divergence, double beta, double alpha, bool scale_t2,
                                              std::string_view reduction, bool compute_grad) {
  check_positive("temperature", temperature);
  const DivergenceParams<double> d = parse_divergence(divergence, beta, alpha, scale_t2, temperature);
  return run_op("kd_forward", student, teacher, mask, reduction,
                [&](auto tag, const OpCall& call) -> std::tuple<at::Tensor, at::Tensor> {
    using Acc = decltype(tag);
    const Inputs& in = call.in;
    const bool want_grad = compute_grad && call.reduction != Reduction::None;
    at::Tensor row_loss = at::empty({in.rows}, call.acc_options);
    at::Tensor grad = forward_grad(in, want_grad);
    kd_core<Acc>(in, temperature, d,
                 want_grad ? unit_weights(call, call.count, in.mask, in.rows) : at::Tensor(), row_loss, grad);
    return {reduce_terms(row_loss, call.reduction, call.count), grad};
  });
}

at::Tensor kd_backward(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                       const std::optional<at::Tensor>& mask, double temperature, std::string_view divergence,
                       double beta, double alpha, bool scale_t2, std::string_view reduction) {
  check_positive("temperature", temperature);
  const DivergenceParams<double> d = parse_divergence(divergence, beta, alpha, scale_t2, temperature);
  return run_op("kd_backward", student, teacher, mask, reduction, [&](auto tag, const OpCall& call) {
    using Acc = decltype(tag);
    const Inputs& in = call.in;
    at::Tensor row_loss = at::empty({in.rows}, call.acc_options);
    at::Tensor grad = empty_gradient_like(in.student);
    kd_core<Acc>(in, temperature, d,
                 anchor_weights(grad_loss, call.reduction, call.count, in.mask, in.rows, call.acc_options),
                 row_loss, grad);
    return grad;
  });
}

}  // namespace ckd
