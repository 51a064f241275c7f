// BicKD (docs/math.md section 4). Normalised probabilities are produced block by block in the log domain
// (p_ic = exp(s_ic/T - LSE(2 s_i/T)/2), pbar_ic = exp(s_ic/T - LSE(s_i/T) - log|P_.c|)), so nothing underflows that
// float64 would keep, and only work buffers within the budget ever hold them. Each row's log-sum-exps are kept as
// (row max, log of the max-shifted sum) and applied as (s_ic/T - max) - rest (KernelBackend::softmax_stats): one
// float LSE of ~5e3 would be rounded by 2.4e-4, a factor common to the row's probabilities. The blocks are built in
// the GEMM policy's operand dtype: for a 16-bit student on tensor cores the student's dtype (each probability
// rounded once, as eager autocast rounds its softmax blocks before the GEMM, whose similarities it also rounds),
// else fp32 (docs/cuda.md, "GEMM policy").
#include <ATen/ATen.h>

#include "losses.h"
#include "orchestration/op_call.h"
#include "orchestration/plan_inputs.h"
#include "orchestration/strips.h"
#include "orchestration/workspace.h"

namespace ckd {
namespace {

// One input's O(N + C) statistics: its rows' softmax_stats and (once the class side needs them) its columns'
// log-norms.
struct BicKDStats {
  at::Tensor row_max, row_log_sum, row_log_norm, col_log_norm;
};

struct BicKDConfig {
  double temperature, tau, w_sample, w_class;
  bool symmetric;
};

template <typename Acc>
class BicKDPass {
 public:
  BicKDPass(const Inputs& in, const BicKDConfig& cfg, bool want_grad, bool grad_in_input_dtype)
      : in_(in),
        k_(backend_for<Acc>(in.student)),
        gemm_(in.student.scalar_type(), acc_type<Acc>(), device_kind(in.student)),
        N_(in.rows),
        C_(in.cols),
        opts_(in.student.options().dtype(acc_type<Acc>())),
        operand_opts_(in.student.options().dtype(gemm_.operand_dtype())),
        inv_temp_(static_cast<Acc>(1.0 / cfg.temperature)),
        inv_tau_(static_cast<Acc>(1.0 / cfg.tau)),
        symmetric_(cfg.symmetric) {
    const PlanInputs p = bickd_plan_inputs({N_, C_, in.student.scalar_type(), in.teacher.scalar_type(),
                                            in.mask.defined(), device_kind(in.student), want_grad,
                                            bickd_workspace_for(in.student, N_, C_, sizeof(Acc)),
                                            grad_in_input_dtype},
                                           gemm_);
    plan_ = plan_bickd(p, cfg.symmetric, cfg.w_sample != 0, cfg.w_class != 0);
    for (auto* side : {&s_, &t_}) {
      for (auto* t : {&side->row_max, &side->row_log_sum, &side->row_log_norm}) *t = at::empty({N_}, opts_);
    }
    softmax_stats(in.student, s_);
    softmax_stats(in.teacher, t_);
  }

  // Sample side: anchors are student rows p_i, candidates teacher rows q_k (and the reverse for the twin).
  // Adds each anchor's term, times `half`, to `loss`; accumulates dL/dp into dp when weight is defined.
  void sample_side(const at::Tensor& weight, at::Tensor& loss, const at::Tensor& dp) {
    side(plan_.sample, N_, in_.valid(), [this](const at::Tensor& x, const BicKDStats& st) { return normalised_rows(x, st); },
         weight, loss, [&](int64_t r0, int64_t n) { return dp.narrow(0, r0, n); });
  }

  // Class side: anchors are student columns pbar_c, candidates teacher columns qbar_d (and the reverse). dpbar is
  // (N, C); its transpose's rows are the columns' gradients.
  void class_side(const at::Tensor& weight, at::Tensor& loss, const at::Tensor& dpbar) {
    ensure_column_norms();
    side(plan_.cls, C_, nullptr, [this](const at::Tensor& x, const BicKDStats& st) { return normalised_columns(x, st); },
         weight, loss, [&](int64_t c0, int64_t n) { return dpbar.t().narrow(0, c0, n); });
  }

  void backward(const at::Tensor& dp, const at::Tensor& dpbar, const at::Tensor& grad) {
    // Per column, once: the projection <dpbar_c, pbar_c>, which a clamped (constant) norm does not have.
    at::Tensor col_projection;
    if (dpbar.defined()) {
      ensure_column_norms();
      col_projection = at::empty({C_}, opts_);
      k_.column_dots(dpbar.const_data_ptr<Acc>(), as_matrix(in_.student), s_.row_max.data_ptr<Acc>(),
                     s_.row_log_sum.data_ptr<Acc>(), s_.col_log_norm.data_ptr<Acc>(), inv_temp_, in_.valid(),
                     col_projection.data_ptr<Acc>());
      col_projection.masked_fill_(s_.col_log_norm < kLogNormEps, 0);
    }
    k_.bickd_backward_rows(dp.defined() ? dp.data_ptr<Acc>() : nullptr,
                           dpbar.defined() ? dpbar.const_data_ptr<Acc>() : nullptr, as_matrix(in_.student),
                           s_.row_max.data_ptr<Acc>(), s_.row_log_sum.data_ptr<Acc>(),
                           dpbar.defined() ? s_.col_log_norm.data_ptr<Acc>() : nullptr,
                           dpbar.defined() ? col_projection.data_ptr<Acc>() : nullptr, inv_temp_, in_.valid(),
                           grad.data_ptr(), storage_dtype(grad));
  }

 private:
  void softmax_stats(const at::Tensor& x, BicKDStats& st) {
    k_.softmax_stats(as_matrix(x), inv_temp_, st.row_max.data_ptr<Acc>(), st.row_log_sum.data_ptr<Acc>(),
                     st.row_log_norm.data_ptr<Acc>());
  }

  void ensure_column_norms() {
    if (s_.col_log_norm.defined()) return;
    column_log_norms(in_.student, s_);
    column_log_norms(in_.teacher, t_);
  }

  void column_log_norms(const at::Tensor& x, BicKDStats& st) {
    st.col_log_norm = at::empty({C_}, opts_);
    k_.column_log_norms(as_matrix(x), st.row_max.data_ptr<Acc>(), st.row_log_sum.data_ptr<Acc>(), inv_temp_,
                        in_.valid(), st.col_log_norm.data_ptr<Acc>());
  }

  // The two builders below write into a work buffer they own: what they return stays valid until their next call.
  // Normalised rows [row0, row0 + rows) of softmax(x / T): p = exp((x / T - max) - log_norm).
  OperandRows normalised_rows(const at::Tensor& x, const BicKDStats& st) {
    return [this, buffer = WorkBuffer(operand_opts_), &x, &st](int64_t row0, int64_t rows) mutable {
      at::Tensor out = buffer.view(rows, C_);
      k_.exp_block(as_matrix(x), row0, rows, 0, C_, inv_temp_, st.row_max.template data_ptr<Acc>(),
                   st.row_log_norm.template data_ptr<Acc>(), nullptr, in_.valid(), out.data_ptr(),
                   storage_dtype(out));
      return out;
    };
  }

  // Normalised columns [col0, col0 + cols) of softmax(x / T) over every row, as (cols, N) operand rows (a
  // transposed view of an (N, cols) block): pbar = exp(((x / T - max) - log_sum) - log|P_.c|).
  OperandRows normalised_columns(const at::Tensor& x, const BicKDStats& st) {
    return [this, buffer = WorkBuffer(operand_opts_), &x, &st](int64_t col0, int64_t cols) mutable {
      at::Tensor out = buffer.view(N_, cols);
      k_.exp_block(as_matrix(x), 0, N_, col0, cols, inv_temp_, st.row_max.template data_ptr<Acc>(),
                   st.row_log_sum.template data_ptr<Acc>(), st.col_log_norm.template data_ptr<Acc>(), in_.valid(),
                   out.data_ptr(), storage_dtype(out));
      return out.t();
    };
  }

  // Every operand row built once: views of them.
  static OperandRows built_once(const OperandRows& build, int64_t count) {
    const at::Tensor all = build(0, count);
    return [all](int64_t r0, int64_t n) { return all.narrow(0, r0, n); };
  }

  at::Tensor scaled_weight(const at::Tensor& weight) const {
    return weight.defined() && symmetric_ ? weight * 0.5 : weight;
  }

  // One side, both directions, as the plan walks it (plan.h: Whole builds both inputs' operands once, the others
  // build them per direction in buffers freed after it). `target(r0, n)`: the gradient rows the student anchors'
  // products go to, or for teacher anchors every candidate's (r0 = 0).
  template <typename MakeBuilder>
  void side(const BicKDSide& plan, int64_t count, const bool* valid, MakeBuilder&& make_builder,
            const at::Tensor& weight, at::Tensor& loss, const std::function<at::Tensor(int64_t, int64_t)>& target) {
    if (plan.operands == BicKDOperands::Whole) {
      const OperandRows student = built_once(make_builder(in_.student, s_), count);
      const OperandRows teacher = built_once(make_builder(in_.teacher, t_), count);
      strips(count, plan, student, teacher, valid, weight, loss, true, target);
      if (symmetric_) strips(count, plan, teacher, student, valid, weight, loss, false, target);
      return;
    }
    strips(count, plan, make_builder(in_.student, s_), make_builder(in_.teacher, t_), valid, weight, loss, true,
           target);
    if (symmetric_) {
      strips(count, plan, make_builder(in_.teacher, t_), make_builder(in_.student, s_), valid, weight, loss, false,
             target);
    }
  }

  // One direction of one side through the strip engine.
  void strips(int64_t anchors, const BicKDSide& plan, const OperandRows& anchor_rows,
              const OperandRows& candidate_rows, const bool* valid, const at::Tensor& weight, at::Tensor& loss,
              bool student_anchors, const std::function<at::Tensor(int64_t, int64_t)>& target) {
    const at::Tensor storage = at::empty({plan.strip, anchors}, opts_);
    at::Tensor terms = at::zeros({anchors}, opts_);
    const at::Tensor w = scaled_weight(weight);
    StripEngine engine(gemm_, StripWalk{anchors, anchors, plan.strip, plan.block}, storage);
    engine.run(
        anchor_rows, candidate_rows,
        [&](at::Tensor& z, int64_t r0, int64_t rows) {
          k_.contrastive_epilogue(strip_epilogue<Acc>(z, r0, rows, inv_tau_, valid, terms,
                                                       w.defined() ? w.const_data_ptr<Acc>() : nullptr));
        },
        !w.defined() ? GradientInto::None : student_anchors ? GradientInto::Anchors : GradientInto::Candidates,
        target);
    loss.add_(terms, symmetric_ ? 0.5 : 1.0);
  }

  const Inputs& in_;
  KernelBackend<Acc>& k_;
  const Gemm gemm_;
  const int64_t N_, C_;
  const at::TensorOptions opts_, operand_opts_;
  const Acc inv_temp_, inv_tau_;
  const bool symmetric_;
  BicKDPlan plan_;
  BicKDStats s_, t_;  // student's, teacher's
};

// Runs BicKD over `in`, filling the unweighted per-sample and per-class terms and, when the weights are defined, the
// student gradient. With no valid row the class side is defined as 0 (every column is empty): `has_rows` (a device
// 0/1 value) multiplies it, so nothing waits on the count.
template <typename Acc>
void bickd_core(const Inputs& in, const at::Tensor& count, const BicKDConfig& cfg, const at::Tensor& sample_weight,
                const at::Tensor& class_weight, at::Tensor& sample_terms, at::Tensor& class_terms,
                const at::Tensor& grad) {
  const bool want_grad = grad.defined();
  const bool sample_side = cfg.w_sample != 0 && in.rows > 0;
  const bool class_side = cfg.w_class != 0 && in.rows > 0;
  if (!sample_side && !class_side) {
    if (want_grad) grad.zero_();
    return;
  }
  BicKDPass<Acc> pass(in, cfg, want_grad, want_grad && grad.scalar_type() != acc_type<Acc>());
  const auto acc_options = in.student.options().dtype(acc_type<Acc>());
  const at::Tensor has_rows = count.gt(0).to(acc_type<Acc>());
  at::Tensor dp, dpbar;
  if (want_grad && sample_side) {
    dp = grad.scalar_type() == acc_type<Acc>() ? grad.zero_() : at::zeros({in.rows, in.cols}, acc_options);
  }
  if (want_grad && class_side) dpbar = at::zeros({in.rows, in.cols}, acc_options);
  if (sample_side) pass.sample_side(want_grad ? sample_weight : at::Tensor(), sample_terms, dp);
  if (class_side) {
    pass.class_side(want_grad ? class_weight * has_rows : at::Tensor(), class_terms, dpbar);
    class_terms.mul_(has_rows);
  }
  if (want_grad) pass.backward(dp, dpbar, grad);
}

BicKDConfig check_bickd(double temperature, double tau, double w_sample, double w_class, bool symmetric) {
  check_positive("temperature", temperature);
  check_positive("tau", tau);
  const double max = std::numeric_limits<float>::max();
  TORCH_CHECK(w_sample >= 0 && w_sample <= max && w_class >= 0 && w_class <= max && (w_sample > 0 || w_class > 0),
              "ckd_ext: w_sample and w_class must be finite in float32, >= 0 and not both 0, got ", w_sample, " and ",
              w_class);
  return {temperature, tau, w_sample, w_class, symmetric};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> bickd_forward(const at::Tensor& student, const at::Tensor& teacher,
                                                             const std::optional<at::Tensor>& mask,
                                                             double temperature, double tau, double w_sample,
                                                             double w_class, bool symmetric,
                                                             std::string_view reduction, bool compute_grad) {
  const BicKDConfig cfg = check_bickd(temperature, tau, w_sample, w_class, symmetric);
  return run_op("bickd_forward", student, teacher, mask, reduction,
                [&](auto tag, const OpCall& call) -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
    using Acc = decltype(tag);
    const Inputs& in = call.in;
    const bool want_grad = compute_grad && call.reduction != Reduction::None;
    const at::Tensor classes = constant_divisor(call, in.cols);
    at::Tensor sample_terms = at::zeros({in.rows}, call.acc_options);
    at::Tensor class_terms = at::zeros({in.cols}, call.acc_options);
    at::Tensor grad = forward_grad(in, want_grad, /*in_acc=*/true);
    at::Tensor sample_weight, class_weight;
    if (want_grad) {
      sample_weight = unit_weights(call, call.count, in.mask, in.rows) * cfg.w_sample;
      class_weight = unit_weights(call, classes, at::Tensor(), in.cols) * cfg.w_class;
    }
    bickd_core<Acc>(in, call.count, cfg, sample_weight, class_weight, sample_terms, class_terms,
                    want_grad ? grad : at::Tensor());
    if (call.reduction == Reduction::None) {
      return {sample_terms * cfg.w_sample, class_terms * cfg.w_class, grad};
    }
    const at::Tensor loss = reduce_terms(sample_terms, call.reduction, call.count) * cfg.w_sample +
                            reduce_terms(class_terms, call.reduction, classes) * cfg.w_class;
    return {loss, at::empty({0}, call.acc_options), grad};
  });
}

at::Tensor bickd_backward(const at::Tensor& grad_sample, const at::Tensor& grad_class, const at::Tensor& student,
                          const at::Tensor& teacher, const std::optional<at::Tensor>& mask, double temperature,
                          double tau, double w_sample, double w_class, bool symmetric, std::string_view reduction) {
  const BicKDConfig cfg = check_bickd(temperature, tau, w_sample, w_class, symmetric);
  return run_op("bickd_backward", student, teacher, mask, reduction, [&](auto tag, const OpCall& call) {
    using Acc = decltype(tag);
    const Inputs& in = call.in;
    // For "mean" and "sum" both sides share the one scalar upstream gradient.
    const at::Tensor& upstream_class = call.reduction == Reduction::None ? grad_class : grad_sample;
    const at::Tensor sample_weight =
        anchor_weights(grad_sample, call.reduction, call.count, in.mask, in.rows, call.acc_options) * cfg.w_sample;
    const at::Tensor class_weight = anchor_weights(upstream_class, call.reduction, constant_divisor(call, in.cols),
                                                   at::Tensor(), in.cols, call.acc_options) *
                                    cfg.w_class;
    at::Tensor sample_terms = at::zeros({in.rows}, call.acc_options);
    at::Tensor class_terms = at::zeros({in.cols}, call.acc_options);
    at::Tensor grad = empty_gradient_like(in.student);
    bickd_core<Acc>(in, call.count, cfg, sample_weight, class_weight, sample_terms, class_terms, grad);
    return grad;
  });
}

}  // namespace ckd
