// CKD (docs/math.md section 2) over the strip plan (orchestration/plan.h): the GEMMs multiply raw rows (16-bit on
// tensor cores, orchestration/gemm.h) and the kernels apply the rows' inverse norms, so no normalised copy of an
// input exists, and the gradient products give d = dv / |s| (KernelBackend::normalize_backward).
#include <ATen/ATen.h>

#include <limits>

#include "losses.h"
#include "orchestration/op_call.h"
#include "orchestration/plan_inputs.h"
#include "orchestration/strips.h"
#include "orchestration/workspace.h"

namespace ckd {
namespace {

// The dtype the GEMM policy multiplies: the student's, unless teacher anchors make teacher rows of another dtype GEMM
// operands, which the student's 16 bits would round (an fp32 teacher beside a bf16 student): then both are converted
// to the accumulation dtype exactly (student anchors multiply student rows only).
at::ScalarType gemm_input_dtype(const Inputs& in, bool student_anchor) {
  const at::ScalarType student = in.student.scalar_type();
  return student_anchor || in.teacher.scalar_type() == student ? student : accumulation_type(student);
}

template <typename Acc>
struct Ckd {
  Ckd(const Inputs& in, double tau, bool student_anchor, bool want_grad, const at::Tensor& grad)
      : in(in),
        k(backend_for<Acc>(in.student)),
        gemm(gemm_input_dtype(in, student_anchor), acc_type<Acc>(), device_kind(in.student)),
        N(in.rows),
        C(in.cols),
        acc_options(in.student.options().dtype(acc_type<Acc>())),
        operand_options(in.student.options().dtype(gemm.operand_dtype())),
        inv_tau(static_cast<Acc>(1.0 / tau)),
        inv_s(at::empty({N}, acc_options)),
        inv_t(at::empty({N}, acc_options)),
        grad(grad) {
    const PlanInputs p = ckd_plan_inputs({N, C, in.student.scalar_type(), in.teacher.scalar_type(),
                                          in.mask.defined(), device_kind(in.student), want_grad,
                                          workspace_for(in.student),
                                          grad.defined() && grad.scalar_type() != acc_type<Acc>()},
                                         gemm);
    plan = plan_ckd(p, student_anchor);
    operands_are_inputs = p.operands_are_inputs;
    k.row_inv_norms(as_matrix(in.student), inv_s.data_ptr<Acc>());
    k.row_inv_norms(as_matrix(in.teacher), inv_t.data_ptr<Acc>());
  }

  // Rows of x as GEMM operands: views where the inputs are the operands, else copies in the operand dtype with
  // masked rows exactly 0 (their NaN or Inf must not reach a GEMM, where 0 * NaN = NaN).
  OperandRows operand(const at::Tensor& x, WorkBuffer& buffer) {
    return [this, &x, &buffer](int64_t r0, int64_t n) -> at::Tensor {
      if (operands_are_inputs) return x.narrow(0, r0, n);
      at::Tensor out = buffer.view(n, C);
      if (gemm.operand_dtype() == acc_type<Acc>()) {
        k.load_rows(as_matrix(x), r0, n, nullptr, in.valid(), out.template data_ptr<Acc>());
      } else {
        out.copy_(x.narrow(0, r0, n));
        if (in.mask.defined()) out.masked_fill_(in.mask.narrow(0, r0, n).logical_not().unsqueeze(1), 0);
      }
      return out;
    };
  }

  // The gradient of rows [r0, r0 + n) from d (n x C, acc; may be the gradient's own rows).
  void finish_rows(at::Tensor& d, int64_t r0, int64_t n, const at::Tensor& extra_coef) {
    k.normalize_backward(d.template data_ptr<Acc>(), row_block(as_matrix(in.student), r0, n),
                         extra_coef.defined() ? extra_coef.template const_data_ptr<Acc>() + r0 : nullptr,
                         row_block(as_matrix(in.teacher), r0, n), in.valid() ? in.valid() + r0 : nullptr,
                         static_cast<char*>(grad.data_ptr()) + r0 * C * grad.element_size(), storage_dtype(grad));
  }

  // The gradient by output blocks of rows J (whole and recompute plans): d_J = sum over blocks K of the product rows
  // coef(J, K) @ rows_K(x), finished into the gradient. coef_block(o0, n, k0, kb, rows_K) gives the (n x kb)
  // coefficients of output rows [o0, o0 + n) against rows [k0, k0 + kb), whose operand rows it is handed.
  template <typename CoefBlock>
  void gradient_by_output_blocks(const at::Tensor& x, CoefBlock&& coef_block, const at::Tensor& extra_coef) {
    WorkBuffer out_buffer(acc_options), rows_buffer(operand_options);
    const OperandRows rows = operand(x, rows_buffer);
    const bool one_block = plan.gradient_block >= N;
    const at::Tensor all_rows = one_block ? rows(0, N) : at::Tensor();
    for (int64_t o0 = 0; o0 < N; o0 += plan.output_block) {
      const int64_t n = std::min(plan.output_block, N - o0);
      at::Tensor d = grad.scalar_type() == acc_type<Acc>() ? grad.narrow(0, o0, n) : out_buffer.view(n, C);
      for (int64_t k0 = 0; k0 < N; k0 += plan.gradient_block) {
        const int64_t kb = std::min(plan.gradient_block, N - k0);
        const at::Tensor rows_k = one_block ? all_rows : rows(k0, kb);
        gemm.product(d, coef_block(o0, n, k0, kb, rows_k), rows_k, /*accumulate=*/k0 > 0);
      }
      finish_rows(d, o0, n, extra_coef);
    }
  }

  // The student's output rows [o0, o0 + n) as the recomputed similarities' operand, loaded once per output block:
  // part of the product rows when those are the student's, all loaded (one block), else a copy.
  struct OutputRows {
    Ckd& ckd;
    bool from_product_rows;
    WorkBuffer buffer;
    int64_t loaded = -1;
    at::Tensor rows;
    const at::Tensor& get(int64_t o0, int64_t n, const at::Tensor& rows_k) {
      if (from_product_rows) return rows = rows_k.narrow(0, o0, n);
      if (loaded != o0) rows = ckd.operand(ckd.in.student, buffer)(o0, n), loaded = o0;
      return rows;
    }
  };
  OutputRows output_rows(bool student_products) {
    return {*this, student_products && plan.gradient_block >= N, WorkBuffer(operand_options)};
  }

  at::Tensor accumulator() {
    TORCH_INTERNAL_ASSERT(grad.scalar_type() == acc_type<Acc>(), "ckd: only a gradient in acc accumulates");
    return grad.zero_();
  }

  // Teacher anchors: z_ij = <u_i, v_j> / tau over the student rows j (the released code's form).
  void teacher_anchor(const at::Tensor& weight, at::Tensor& row_loss) {
    const bool want_grad = grad.defined();
    const bool accumulate = want_grad && !plan.whole && !plan.recompute;
    at::Tensor storage = at::empty({plan.whole ? N : plan.strip, N}, acc_options);
    at::Tensor d = accumulate ? accumulator() : at::Tensor();
    {
      const StripWalk walk{N, N, plan.strip, plan.operand_block};
      WorkBuffer anchor_buffer(operand_options), candidate_buffer(operand_options);
      StripEngine engine(gemm, walk, storage);
      const bool coefficients = want_grad && !plan.recompute;
      engine.run(
          operand(in.teacher, anchor_buffer), operand(in.student, candidate_buffer),
          [&](at::Tensor& z, int64_t r0, int64_t rows) {
            EpilogueParams<Acc> p = strip_epilogue<Acc>(z, r0, rows, inv_tau, in.valid(), row_loss,
                                                         coefficients ? weight.const_data_ptr<Acc>() : nullptr);
            p.row_scale = inv_t.data_ptr<Acc>();
            p.col_scale = inv_s.data_ptr<Acc>();
            k.contrastive_epilogue(p);
          },
          accumulate ? GradientInto::Candidates : GradientInto::None, [&](int64_t, int64_t) { return d; });
    }
    if (!want_grad) return;
    if (plan.whole) {
      // Output rows J are candidates: their coefficients are the columns J of the anchors' strips.
      gradient_by_output_blocks(
          in.teacher,
          [&](int64_t o0, int64_t n, int64_t k0, int64_t kb, const at::Tensor&) {
            return storage.narrow(0, k0, kb).narrow(1, o0, n).t();
          },
          at::Tensor());
    } else if (plan.recompute) {
      storage = at::Tensor();  // the first pass's strip: the recompute's buffers take its place
      teacher_anchor_recompute(weight, row_loss);
    } else {
      finish_rows(d, 0, N, at::Tensor());
    }
  }

  // Each row's positive similarity <u_i, v_i> / tau.
  at::Tensor positive_similarities() {
    at::Tensor positive = at::empty({N}, acc_options);
    k.row_dots(as_matrix(in.teacher), as_matrix(in.student), positive.data_ptr<Acc>());
    return positive.mul_(inv_t).mul_(inv_s).mul_(inv_tau);
  }

  // From pi_ii - 1 (computed by the caller in the form exact for its anchor): w_i (pi_ii - 1) / tau, the positive's
  // coefficient of u_i in dv_i, times the two inverse norms that make it the coefficient of the raw t_i in
  // d_i = dv_i / |s_i|; 0 on masked rows.
  at::Tensor positive_coefficients(at::Tensor pi_minus_one, const at::Tensor& weight) {
    pi_minus_one.mul_(weight).mul_(inv_tau).mul_(inv_t).mul_(inv_s);
    if (in.mask.defined()) pi_minus_one.masked_fill_(in.mask.logical_not(), 0);
    return pi_minus_one;
  }

  // The recompute plan's gradient for teacher anchors: per output block J of student rows and block K of anchors,
  // z_KJ = u_K v_J^T again, its coefficients from the anchors' log-sum-exps lse_i = z_ii + loss_i; the positive's
  // coefficient w_i (pi_ii - 1) = -w_i sigmoid(d_i) = w_i expm1(-loss_i) (loss_i = softplus(d_i)) goes through the
  // normalisation backward's extra term, as for student anchors.
  void teacher_anchor_recompute(const at::Tensor& weight, const at::Tensor& row_loss) {
    const at::Tensor lse = positive_similarities() + row_loss;
    const at::Tensor positive_coef = positive_coefficients(at::expm1(-row_loss), weight);
    WorkBuffer coef_buffer(acc_options);
    OutputRows outputs = output_rows(/*student_products=*/false);
    gradient_by_output_blocks(
        in.teacher,
        [&](int64_t o0, int64_t n, int64_t k0, int64_t kb, const at::Tensor& rows_k) {
          at::Tensor z = coef_buffer.view(kb, n);
          gemm.similarity(z, rows_k, outputs.get(o0, n, rows_k));
          at::Tensor unused_loss;
          EpilogueParams<Acc> p = strip_epilogue<Acc>(z, k0, kb, inv_tau, in.valid(), unused_loss,
                                                       weight.const_data_ptr<Acc>());
          p.col0 = o0;
          p.row_scale = inv_t.data_ptr<Acc>();
          p.col_scale = inv_s.data_ptr<Acc>();
          k.contrastive_coefficients(p, lse.const_data_ptr<Acc>());
          return z.t();
        },
        positive_coef);
  }

  // Student anchors: z_ij = <v_i, v_j> / tau for j != i and the positive <u_i, v_i> / tau in place of z_ii. That
  // matrix is symmetric: only tiles on and above the diagonal are computed, each serving its rows and, transposed,
  // its columns; the gradient applies the symmetric coefficients (w_i pi_ij + w_j pi_ji) / tau to both sides.
  void student_anchor(const at::Tensor& weight, at::Tensor& row_loss) {
    const bool want_grad = grad.defined();
    const at::Tensor positive = positive_similarities();

    const int64_t t = plan.strip;
    at::Tensor storage = at::empty({plan.whole ? N : t, plan.whole ? N : t}, acc_options);
    WorkBuffer row_buffer(operand_options), col_buffer(operand_options);
    const OperandRows rows_i = operand(in.student, row_buffer), rows_j = operand(in.student, col_buffer);
    const bool single_tile = t >= N;
    bool in_place = false;  // the tiles from the first pass are still in storage
    auto for_each_tile = [&](auto&& f) {
      for (int64_t i0 = 0; i0 < N; i0 += t) {
        const int64_t ri = std::min(t, N - i0);
        const at::Tensor vi = in_place ? at::Tensor() : rows_i(i0, ri);
        for (int64_t j0 = i0; j0 < N; j0 += t) {
          const int64_t rj = std::min(t, N - j0);
          const at::Tensor vj = in_place ? at::Tensor() : (j0 == i0 ? vi : rows_j(j0, rj));
          at::Tensor z = plan.whole ? storage.narrow(0, i0, ri).narrow(1, j0, rj)
                                    : storage.narrow(0, 0, ri).narrow(1, 0, rj);
          if (!in_place) gemm.similarity(z, vi, vj);
          const SymmetricTile<Acc> tile{z.data_ptr<Acc>(), z.stride(0), i0, ri, j0, rj, inv_tau,
                                        inv_s.data_ptr<Acc>(), in.valid()};
          f(tile, vi, vj, z);
        }
      }
    };

    at::Tensor row_max = at::full({N}, -std::numeric_limits<double>::infinity(), acc_options);
    at::Tensor row_sum = at::zeros({N}, acc_options);
    for_each_tile([&](const SymmetricTile<Acc>& tile, const at::Tensor&, const at::Tensor&, const at::Tensor&) {
      k.symmetric_tile_lse(tile, row_max.data_ptr<Acc>(), row_sum.data_ptr<Acc>());
    });
    // The tiles merged the negatives only: the term is softplus(LSE_neg - positive) and the positive's 1 - pi_ii
    // sigmoid of the same (kernels/scalar_math.h), exact where the positive dominates. d = -inf for a row without
    // negatives (one valid row: term 0), NaN only for masked rows, which every pass skips.
    const at::Tensor d = (row_max - positive) + row_sum.log();
    // softplus(d) = max(d, 0) + log1p(e^-|d|), exactly: at::softplus returns d itself beyond its threshold of 20, an
    // error of up to e^-20 that float64 would see.
    at::Tensor terms = d.clamp_min(0).add_(d.abs().neg_().exp_().log1p_());
    if (in.mask.defined()) terms.masked_fill_(in.mask.logical_not(), 0);
    row_loss.copy_(terms);
    if (!want_grad) return;

    const at::Tensor lse = positive + terms;  // the full log-sum-exp, for the negatives' weights pi_ij
    const at::Tensor positive_coef = positive_coefficients(at::sigmoid(d).neg_(), weight);
    if (plan.recompute) {
      storage = at::Tensor();  // the first pass's buffers: the recompute's take their place
      row_buffer.release();
      col_buffer.release();
      WorkBuffer coef_buffer(acc_options);
      OutputRows outputs = output_rows(/*student_products=*/true);
      gradient_by_output_blocks(
          in.student,
          [&](int64_t o0, int64_t n, int64_t k0, int64_t kb, const at::Tensor& rows_k) {
            at::Tensor z = coef_buffer.view(n, kb);
            gemm.similarity(z, outputs.get(o0, n, rows_k), rows_k);
            const SymmetricTile<Acc> tile{z.data_ptr<Acc>(), kb, o0, n, k0, kb, inv_tau, inv_s.data_ptr<Acc>(),
                                          in.valid()};
            k.symmetric_tile_coefficients(tile, lse.const_data_ptr<Acc>(), weight.const_data_ptr<Acc>());
            return z;
          },
          positive_coef);
      return;
    }
    in_place = plan.whole || single_tile;
    if (plan.whole) {
      for_each_tile([&](const SymmetricTile<Acc>& tile, const at::Tensor&, const at::Tensor&, at::Tensor& z) {
        k.symmetric_tile_coefficients(tile, lse.const_data_ptr<Acc>(), weight.const_data_ptr<Acc>());
        // The lower triangle is the upper's transpose: the output blocks read whole rows.
        if (tile.row0 != tile.col0) storage.narrow(0, tile.col0, tile.cols).narrow(1, tile.row0, tile.rows).copy_(z.t());
      });
      gradient_by_output_blocks(
          in.student,
          [&](int64_t o0, int64_t n, int64_t k0, int64_t kb, const at::Tensor&) {
            return storage.narrow(0, o0, n).narrow(1, k0, kb);
          },
          positive_coef);
      return;
    }
    at::Tensor acc = accumulator();
    at::Tensor vi_kept;  // single tile: its rows from the first pass
    if (single_tile) vi_kept = rows_i(0, N);
    for_each_tile([&](const SymmetricTile<Acc>& tile, const at::Tensor& vi_new, const at::Tensor& vj_new,
                      at::Tensor& z) {
      const at::Tensor vi = single_tile ? vi_kept : vi_new, vj = single_tile ? vi_kept : vj_new;
      k.symmetric_tile_coefficients(tile, lse.const_data_ptr<Acc>(), weight.const_data_ptr<Acc>());
      gemm.product(acc.narrow(0, tile.row0, tile.rows), z, vj, /*accumulate=*/true);
      if (tile.row0 != tile.col0) gemm.product(acc.narrow(0, tile.col0, tile.cols), z.t(), vi, /*accumulate=*/true);
    });
    finish_rows(acc, 0, N, positive_coef);
  }

  const Inputs& in;
  KernelBackend<Acc>& k;
  const Gemm gemm;
  const int64_t N, C;
  const at::TensorOptions acc_options, operand_options;
  const Acc inv_tau;
  at::Tensor inv_s, inv_t;
  at::Tensor grad;  // undefined: loss only
  CkdPlan plan;
  bool operands_are_inputs = false;
};

template <typename Acc>
void ckd_core(const Inputs& in, double tau, bool student_anchor, const at::Tensor& weight, at::Tensor& row_loss,
              const at::Tensor& grad) {
  Ckd<Acc> ckd(in, tau, student_anchor, grad.defined(), grad);
  if (student_anchor) {
    ckd.student_anchor(weight, row_loss);
  } else {
    ckd.teacher_anchor(weight, row_loss);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ckd_forward(const at::Tensor& student, const at::Tensor& teacher,
                                               const std::optional<at::Tensor>& mask, double tau,
                                               std::string_view anchor, std::string_view reduction,
                                               bool compute_grad) {
  const bool student_anchor = parse_student_anchor(anchor);
  check_positive("tau", tau);
  return run_op("ckd_forward", student, teacher, mask, reduction,
                [&](auto tag, const OpCall& call) -> std::tuple<at::Tensor, at::Tensor> {
    using Acc = decltype(tag);
    const Inputs& in = call.in;
    const bool want_grad = compute_grad && call.reduction != Reduction::None;
    at::Tensor row_loss = at::zeros({in.rows}, call.acc_options);
    at::Tensor grad = forward_grad(in, want_grad, /*in_acc=*/true);
    const at::Tensor weight = want_grad ? unit_weights(call, call.count, in.mask, in.rows) : at::Tensor();
    if (in.rows > 0) ckd_core<Acc>(in, tau, student_anchor, weight, row_loss, want_grad ? grad : at::Tensor());
    return {reduce_terms(row_loss, call.reduction, call.count), grad};
  });
}

at::Tensor ckd_backward(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                        const std::optional<at::Tensor>& mask, double tau, std::string_view anchor,
                        std::string_view reduction) {
  const bool student_anchor = parse_student_anchor(anchor);
  check_positive("tau", tau);
  return run_op("ckd_backward", student, teacher, mask, reduction, [&](auto tag, const OpCall& call) {
    using Acc = decltype(tag);
    const Inputs& in = call.in;
    at::Tensor grad = empty_gradient_like(in.student);
    if (in.rows == 0) return grad;
    const at::Tensor weight =
        anchor_weights(grad_loss, call.reduction, call.count, in.mask, in.rows, call.acc_options);
    at::Tensor row_loss = at::empty({in.rows}, call.acc_options);
    ckd_core<Acc>(in, tau, student_anchor, weight, row_loss, grad);
    return grad;
  });
}

}  // namespace ckd
