#include "losses.h"

#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>

#include "backends/select.h"

namespace ckd {
namespace {

// 64 MiB; ckd_ext/_extension.py applies CKD_EXT_WORKSPACE_MB when it loads the module.
std::atomic<int64_t> g_workspace_bytes{int64_t{64} << 20};

}  // namespace

int64_t workspace_bytes() { return g_workspace_bytes.load(); }

void set_workspace_bytes(int64_t bytes) {
  TORCH_CHECK(bytes > 0, "ckd_ext: the workspace must be > 0 bytes, got ", bytes);
  g_workspace_bytes.store(bytes);
}

namespace {

enum class Reduction { None, Mean, Sum };

Reduction parse_reduction(std::string_view r) {
  if (r == "mean") return Reduction::Mean;
  if (r == "sum") return Reduction::Sum;
  TORCH_CHECK(r == "none", "ckd_ext: reduction must be 'mean', 'sum' or 'none', got '", r, "'");
  return Reduction::None;
}

bool parse_student_anchor(std::string_view a) {
  TORCH_CHECK(a == "student" || a == "teacher", "ckd_ext: anchor must be 'student' or 'teacher', got '", a, "'");
  return a == "student";
}

// The same ranges as ckd_ext/_validation.py: reciprocal and square finite in float32.
void check_positive(const char* name, double v) {
  const double max = std::numeric_limits<float>::max();
  TORCH_CHECK(v >= 1.0 / max && v <= std::sqrt(max), "ckd_ext: ", name,
              " must be a number whose reciprocal and square are finite in float32, got ", v);
}

DType storage_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK(false, "ckd_ext: unsupported dtype ", t.scalar_type());
  }
}

ConstMatrix as_matrix(const at::Tensor& t) { return {t.const_data_ptr(), storage_dtype(t), t.size(0), t.size(1)}; }

template <typename Acc>
constexpr at::ScalarType acc_type() { return std::is_same_v<Acc, double> ? at::kDouble : at::kFloat; }

// fp64 students accumulate in fp64 (gradcheck); everything else in fp32.
template <typename F>
decltype(auto) dispatch_acc(const at::Tensor& student, F&& f) {
  if (student.scalar_type() == at::kDouble) return f(double{});
  return f(float{});
}

struct Inputs {
  at::Tensor student, teacher, mask;  // contiguous; mask undefined when absent
  int64_t rows, cols;
  const bool* valid() const { return mask.defined() ? mask.const_data_ptr<bool>() : nullptr; }
};

// Callers hold a c10::OptionalDeviceGuard on the student's device while they work (CUDA: the right
// device and its current stream).
Inputs check_inputs(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                    const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(student.dim() == 2 && teacher.sizes() == student.sizes(), op,
              ": student and teacher must be 2-D tensors of the same shape, got ", student.sizes(), " and ",
              teacher.sizes());
  TORCH_CHECK(student.size(1) > 0, op, ": the class dimension must be > 0");
  storage_dtype(student);
  storage_dtype(teacher);
  TORCH_CHECK(teacher.device() == student.device(), op, ": student and teacher must be on the same device, got ",
              student.device(), " and ", teacher.device());
  Inputs in{student.contiguous(), teacher.contiguous(), at::Tensor(), student.size(0), student.size(1)};
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 1 && mask->size(0) == in.rows, op,
                ": mask must be a bool tensor of shape (", in.rows, "), got ", mask->scalar_type(), " ", mask->sizes());
    TORCH_CHECK(mask->device() == student.device(), op, ": mask must be on the student's device");
    in.mask = mask->contiguous();
  }
  return in;
}

int64_t count_valid(const Inputs& in) { return in.mask.defined() ? in.mask.sum().item<int64_t>() : in.rows; }

// Upstream weight of each anchor: grad / divisor ("mean"), grad ("sum") or grad[i] ("none"); 0 where masked.
template <typename Acc>
at::Tensor anchor_weights(const at::Tensor& grad, Reduction reduction, int64_t divisor, const at::Tensor& mask,
                          int64_t anchors, const at::TensorOptions& acc_options) {
  at::Tensor w;
  if (reduction == Reduction::None) {
    TORCH_CHECK(grad.numel() == anchors, "ckd_ext: expected ", anchors, " upstream gradients, got ", grad.numel());
    w = grad.reshape({anchors}).to(acc_options, /*non_blocking=*/false, /*copy=*/true);
  } else {
    TORCH_CHECK(grad.numel() == 1, "ckd_ext: expected a scalar upstream gradient, got ", grad.sizes());
    at::Tensor g = grad.reshape({}).to(acc_options);
    if (reduction == Reduction::Mean) g = g / static_cast<double>(std::max<int64_t>(divisor, 1));
    w = g.expand({anchors}).contiguous();
  }
  if (mask.defined()) w.masked_fill_(mask.logical_not(), 0);
  return w;
}

at::Tensor reduce_terms(const at::Tensor& terms, Reduction reduction, int64_t divisor) {
  if (reduction == Reduction::None) return terms;
  at::Tensor s = terms.sum();
  if (reduction == Reduction::Mean) s = divisor > 0 ? s / static_cast<double>(divisor) : s * 0;
  return s;
}

// Rows a block of `row_elems` Acc values per row may have within `bytes`, at least 1 and at most `total`.
template <typename Acc>
int64_t rows_within(int64_t bytes, int64_t row_elems, int64_t total) {
  const int64_t per_row = std::max<int64_t>(row_elems, 1) * static_cast<int64_t>(sizeof(Acc));
  return std::max<int64_t>(1, std::min<int64_t>(total, bytes / per_row));
}

// A reusable Acc work buffer handed out as (rows, cols) views.
template <typename Acc>
class WorkBuffer {
 public:
  explicit WorkBuffer(const at::TensorOptions& options) : options_(options) {}
  at::Tensor view(int64_t rows, int64_t cols) {
    if (storage_.numel() < rows * cols) storage_ = at::empty({rows * cols}, options_);
    return storage_.narrow(0, 0, rows * cols).view({rows, cols});
  }

 private:
  at::TensorOptions options_;
  at::Tensor storage_;
};

// Rows [row0, row0 + rows) of x as a GEMM operand in Acc, scaled per row when row_scale is given, masked rows
// exactly 0 (they take no part in any product, NaN or Inf included): a view of x when nothing needs converting or
// masking, else a chunk-sized copy in `buffer`.
template <typename Acc>
at::Tensor operand_rows(KernelBackend<Acc>& k, WorkBuffer<Acc>& buffer, const Inputs& in, const at::Tensor& x,
                        int64_t row0, int64_t rows, const Acc* row_scale) {
  if (row_scale == nullptr && in.valid() == nullptr && x.scalar_type() == acc_type<Acc>()) {
    return x.narrow(0, row0, rows);
  }
  at::Tensor out = buffer.view(rows, x.size(1));
  k.load_rows(as_matrix(x), row0, rows, row_scale, in.valid(), out.data_ptr<Acc>());
  return out;
}

template <typename Acc>
EpilogueParams<Acc> strip_epilogue(at::Tensor& strip, int64_t row0, int64_t rows, Acc inv_tau, const bool* valid,
                                   at::Tensor& loss, const at::Tensor& weight) {
  EpilogueParams<Acc> p{};
  p.strip = strip.data_ptr<Acc>();
  p.row0 = row0;
  p.rows = rows;
  p.cols = strip.size(1);
  p.scale = inv_tau;
  p.valid = valid;
  p.loss = loss.data_ptr<Acc>();
  p.weight = weight.defined() ? weight.const_data_ptr<Acc>() : nullptr;
  return p;
}

// ---------------------------------------------------------------------------------------------------
// CKD. Anchor rows are loaded normalised (a chunk at a time); no normalised copy of an input exists beyond
// those chunks.

// What both anchor conventions start from: the backend, sizes, 1 / tau and the inverse row norms.
template <typename Acc>
struct CkdSetup {
  CkdSetup(const Inputs& in, double tau)
      : k(backend_for<Acc>(in.student)),
        N(in.rows),
        C(in.cols),
        acc_options(in.student.options().dtype(acc_type<Acc>())),
        inv_tau(static_cast<Acc>(1.0 / tau)),
        inv_s(at::empty({N}, acc_options)),
        inv_t(at::empty({N}, acc_options)) {
    k.row_inv_norms(as_matrix(in.student), inv_s.data_ptr<Acc>());
    k.row_inv_norms(as_matrix(in.teacher), inv_t.data_ptr<Acc>());
  }

  // The positive pair's logit <u_i, v_i> / tau, from a row dot product and the two norms.
  at::Tensor positive_logits(const Inputs& in) {
    at::Tensor positive = at::empty({N}, acc_options);
    k.row_dots(as_matrix(in.teacher), as_matrix(in.student), positive.data_ptr<Acc>());
    return positive.mul_(inv_t).mul_(inv_s).mul_(inv_tau);
  }

  KernelBackend<Acc>& k;
  const int64_t N, C;
  const at::TensorOptions acc_options;
  const Acc inv_tau;
  at::Tensor inv_s, inv_t;
};

// Teacher anchors: z_ij = <u_i, v_j> / tau over the student rows j. Strips of anchor rows against every
// candidate (raw student rows, whose norms are applied in the epilogue); the gradient of candidate j is
// sum_i coef_ij u_i, one GEMM per strip.
template <typename Acc>
void ckd_teacher_anchor(const Inputs& in, double tau, const at::Tensor& weight, at::Tensor& row_loss,
                        const at::Tensor& grad) {
  CkdSetup<Acc> setup(in, tau);
  auto& k = setup.k;
  const int64_t N = setup.N, C = setup.C;
  const auto& acc_options = setup.acc_options;
  const Acc inv_tau = setup.inv_tau;
  const at::Tensor &inv_s = setup.inv_s, &inv_t = setup.inv_t;
  const bool want_grad = grad.defined();

  const int64_t budget = workspace_bytes();
  const int64_t strip_rows = std::min(rows_within<Acc>(budget / 2, N, N), rows_within<Acc>(budget / 4, C, N));
  // Candidates are views of the student when it needs neither converting nor masking, else budget-sized copies.
  const bool candidates_are_views = in.student.scalar_type() == acc_type<Acc>() && in.valid() == nullptr;
  const int64_t block_rows = candidates_are_views ? N : rows_within<Acc>(budget / 4, C, N);
  at::Tensor strip = at::empty({strip_rows, N}, acc_options);
  WorkBuffer<Acc> anchor_buffer(acc_options), candidate_buffer(acc_options);
  // dL/dv for the student rows v = s / |s|, before the normalisation backward.
  at::Tensor dv;
  if (want_grad) dv = grad.scalar_type() == acc_type<Acc>() ? grad.zero_() : at::zeros({N, C}, acc_options);

  for (int64_t r0 = 0; r0 < N; r0 += strip_rows) {
    const int64_t rows = std::min(strip_rows, N - r0);
    const at::Tensor anchors = operand_rows(k, anchor_buffer, in, in.teacher, r0, rows, inv_t.data_ptr<Acc>());
    at::Tensor z = strip.narrow(0, 0, rows);
    for (int64_t j0 = 0; j0 < N; j0 += block_rows) {
      const int64_t kb = std::min(block_rows, N - j0);
      at::Tensor out = z.narrow(1, j0, kb);
      at::mm_out(out, anchors, operand_rows<Acc>(k, candidate_buffer, in, in.student, j0, kb, nullptr).t());
    }
    EpilogueParams<Acc> p =
        strip_epilogue<Acc>(z, r0, rows, inv_tau, in.valid(), row_loss, want_grad ? weight : at::Tensor());
    p.col_scale = inv_s.data_ptr<Acc>();
    k.contrastive_epilogue(p);
    if (want_grad) dv.addmm_(z.t(), anchors);
  }
  if (want_grad) {
    k.normalize_backward(dv.data_ptr<Acc>(), as_matrix(in.student), nullptr, nullptr, as_matrix(in.teacher),
                         in.valid(), grad.data_ptr());
  }
}

// Student anchors: z_ij = <v_i, v_j> / tau for j != i and the positive <u_i, v_i> / tau in place of z_ii.
// That matrix is symmetric, so only tiles on and above the diagonal are computed: one pass of half-size
// GEMMs merges every row's log-sum-exp statistics (a tile serves its rows and, transposed, its columns'),
// and the gradient pass recomputes them and applies the symmetric coefficients (w_i pi_ij + w_j pi_ji) / tau
// to both sides. Work: 2 N^2 C multiply-adds for loss and gradient, as a plain similarity + gradient GEMM.
template <typename Acc>
void ckd_student_anchor(const Inputs& in, double tau, const at::Tensor& weight, at::Tensor& row_loss,
                        const at::Tensor& grad) {
  CkdSetup<Acc> setup(in, tau);
  auto& k = setup.k;
  const int64_t N = setup.N, C = setup.C;
  const auto& acc_options = setup.acc_options;
  const Acc inv_tau = setup.inv_tau;
  const at::Tensor &inv_s = setup.inv_s, &inv_t = setup.inv_t;
  const bool want_grad = grad.defined();
  const at::Tensor positive = setup.positive_logits(in);

  const int64_t budget = workspace_bytes();
  const auto square_side = static_cast<int64_t>(std::sqrt(static_cast<double>(budget / 2 / sizeof(Acc))));
  const int64_t tile_rows = std::max<int64_t>(1, std::min({square_side, rows_within<Acc>(budget / 8, C, N), N}));
  at::Tensor tile = at::empty({tile_rows, tile_rows}, acc_options);
  WorkBuffer<Acc> row_buffer(acc_options), col_buffer(acc_options);

  // f(tile params, normalised rows of the tile's rows, of its columns) for every tile on or above the diagonal.
  // With a single tile (N fits the budget), the second pass finds the tile and its rows still in place from the
  // first (which only reads them) and skips the recompute.
  const bool single_tile = tile_rows >= N;
  bool tile_ready = false;
  auto for_each_tile = [&](auto&& f) {
    for (int64_t i0 = 0; i0 < N; i0 += tile_rows) {
      const int64_t ri = std::min(tile_rows, N - i0);
      const at::Tensor vi = tile_ready ? row_buffer.view(ri, C)
                                       : operand_rows(k, row_buffer, in, in.student, i0, ri, inv_s.data_ptr<Acc>());
      for (int64_t j0 = i0; j0 < N; j0 += tile_rows) {
        const int64_t rj = std::min(tile_rows, N - j0);
        const at::Tensor vj =
            j0 == i0 ? vi : operand_rows(k, col_buffer, in, in.student, j0, rj, inv_s.data_ptr<Acc>());
        at::Tensor z = tile.narrow(0, 0, ri).narrow(1, 0, rj);
        if (!tile_ready) at::mm_out(z, vi, vj.t());
        const SymmetricTile<Acc> t{z.data_ptr<Acc>(), tile_rows, i0, ri, j0, rj, inv_tau, in.valid()};
        f(t, vi, vj, z);
      }
    }
  };

  at::Tensor row_max = at::full({N}, -std::numeric_limits<double>::infinity(), acc_options);
  at::Tensor row_sum = at::zeros({N}, acc_options);
  for_each_tile([&](const SymmetricTile<Acc>& t, const at::Tensor&, const at::Tensor&, const at::Tensor&) {
    k.symmetric_tile_lse(t, row_max.data_ptr<Acc>(), row_sum.data_ptr<Acc>());
  });
  tile_ready = single_tile;
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
  at::Tensor diagonal = at::sigmoid(d).mul_(weight).mul_(-inv_tau);  // w_i (pi_ii - 1) / tau, the positive's
  if (in.mask.defined()) diagonal.masked_fill_(in.mask.logical_not(), 0);
  at::Tensor dv = grad.scalar_type() == acc_type<Acc>() ? grad.zero_() : at::zeros({N, C}, acc_options);
  for_each_tile([&](const SymmetricTile<Acc>& t, const at::Tensor& vi, const at::Tensor& vj, const at::Tensor& z) {
    k.symmetric_tile_coefficients(t, lse.const_data_ptr<Acc>(), weight.const_data_ptr<Acc>());
    dv.narrow(0, t.row0, t.rows).addmm_(z, vj);
    if (t.row0 != t.col0) dv.narrow(0, t.col0, t.cols).addmm_(z.t(), vi);
  });
  // The positive <u_i, v_i> adds diagonal_i * u_i to dv_i.
  k.normalize_backward(dv.data_ptr<Acc>(), as_matrix(in.student), diagonal.data_ptr<Acc>(), inv_t.data_ptr<Acc>(),
                       as_matrix(in.teacher), in.valid(), grad.data_ptr());
}

template <typename Acc>
void ckd_core(const Inputs& in, double tau, bool student_anchor, const at::Tensor& weight, at::Tensor& row_loss,
              const at::Tensor& grad) {
  if (student_anchor) {
    ckd_student_anchor<Acc>(in, tau, weight, row_loss, grad);
  } else {
    ckd_teacher_anchor<Acc>(in, tau, weight, row_loss, grad);
  }
}

// ---------------------------------------------------------------------------------------------------
// BicKD. Normalised probabilities are produced block by block in the log domain (p_ic = exp(s_ic/T -
// LSE(2 s_i/T)/2), pbar_ic = exp(s_ic/T - LSE(s_i/T) - log|P_.c|)), so nothing underflows that float64
// would keep, and only work buffers within the budget ever hold them. Each row's log-sum-exps are kept as
// (row max, log of the max-shifted sum) and applied as (s_ic/T - max) - rest (KernelBackend::softmax_stats):
// one float LSE of ~5e3 would be rounded by 2.4e-4, a factor common to the row's probabilities.

// One input's O(N + C) statistics: its rows' softmax_stats and (once the class side needs them) its columns'
// log-norms.
struct BicKDStats {
  at::Tensor row_max, row_log_sum, row_log_norm, col_log_norm;
};

template <typename Acc>
class BicKDPass {
 public:
  BicKDPass(const Inputs& in, double temperature, double tau, bool symmetric)
      : in_(in),
        k_(backend_for<Acc>(in.student)),
        N_(in.rows),
        C_(in.cols),
        opts_(in.student.options().dtype(acc_type<Acc>())),
        inv_temp_(static_cast<Acc>(1.0 / temperature)),
        inv_tau_(static_cast<Acc>(1.0 / tau)),
        symmetric_(symmetric),
        budget_(workspace_bytes()),
        anchor_buffer_(opts_),
        candidate_buffer_(opts_) {
    for (auto* side : {&s_, &t_}) {
      for (auto* t : {&side->row_max, &side->row_log_sum, &side->row_log_norm}) *t = at::empty({N_}, opts_);
    }
    softmax_stats(in.student, s_);
    softmax_stats(in.teacher, t_);
  }

  // Sample side: anchors are student rows p_i, candidates teacher rows q_k (and the reverse for the twin).
  // Adds each anchor's term, times `half`, to `loss`; accumulates dL/dp into dp when weight is defined.
  void sample_side(const at::Tensor& weight, at::Tensor& loss, const at::Tensor& dp) {
    sample_strips(in_.student, s_, in_.teacher, t_, /*student_anchors=*/true, weight, loss, dp);
    if (symmetric_) sample_strips(in_.teacher, t_, in_.student, s_, false, weight, loss, dp);
  }

  // Class side: anchors are student columns pbar_c, candidates teacher columns qbar_d (and the reverse).
  void class_side(const at::Tensor& weight, at::Tensor& loss, const at::Tensor& dpbar) {
    ensure_column_norms();
    class_strips(in_.student, s_, in_.teacher, t_, true, weight, loss, dpbar);
    if (symmetric_) class_strips(in_.teacher, t_, in_.student, s_, false, weight, loss, dpbar);
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
                           grad.data_ptr());
  }

 private:
  Acc half() const { return symmetric_ ? Acc(0.5) : Acc(1); }

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

  // Normalised rows [row0, row0 + rows) of softmax(x / T): p = exp((x / T - max) - log_norm).
  at::Tensor normalised_rows(WorkBuffer<Acc>& buffer, const at::Tensor& x, const BicKDStats& st, int64_t row0,
                             int64_t rows) {
    at::Tensor out = buffer.view(rows, C_);
    k_.exp_block(as_matrix(x), row0, rows, 0, C_, inv_temp_, st.row_max.data_ptr<Acc>(),
                 st.row_log_norm.data_ptr<Acc>(), nullptr, in_.valid(), out.data_ptr<Acc>());
    return out;
  }

  // Normalised columns [col0, col0 + cols) of softmax(x / T), every row: an (N, cols) block,
  // pbar = exp(((x / T - max) - log_sum) - log|P_.c|).
  at::Tensor normalised_columns(WorkBuffer<Acc>& buffer, const at::Tensor& x, const BicKDStats& st, int64_t col0,
                                int64_t cols) {
    at::Tensor out = buffer.view(N_, cols);
    k_.exp_block(as_matrix(x), 0, N_, col0, cols, inv_temp_, st.row_max.data_ptr<Acc>(),
                 st.row_log_sum.data_ptr<Acc>(), st.col_log_norm.data_ptr<Acc>(), in_.valid(), out.data_ptr<Acc>());
    return out;
  }

  at::Tensor scaled_weight(const at::Tensor& weight) const {
    return weight.defined() && symmetric_ ? weight * 0.5 : weight;
  }

  void add_terms(at::Tensor& loss, const at::Tensor& terms) const { loss.add_(terms, half()); }

  void sample_strips(const at::Tensor& anchor_x, const BicKDStats& anchor_stats, const at::Tensor& cand_x,
                     const BicKDStats& cand_stats, bool student_anchors, const at::Tensor& weight, at::Tensor& loss,
                     const at::Tensor& dp) {
    const int64_t strip_rows = std::min(rows_within<Acc>(budget_ / 2, N_, N_), rows_within<Acc>(budget_ / 4, C_, N_));
    const int64_t block_rows = rows_within<Acc>(budget_ / 4, C_, N_);
    at::Tensor strip = at::empty({strip_rows, N_}, opts_);
    at::Tensor terms = at::zeros({N_}, opts_);
    const at::Tensor w = scaled_weight(weight);
    // All candidates fit in one block: build them once.
    const at::Tensor all_candidates =
        block_rows >= N_ ? normalised_rows(candidate_buffer_, cand_x, cand_stats, 0, N_) : at::Tensor();
    auto candidates = [&](int64_t j0, int64_t kb) {
      return all_candidates.defined() ? all_candidates : normalised_rows(candidate_buffer_, cand_x, cand_stats, j0, kb);
    };
    for (int64_t r0 = 0; r0 < N_; r0 += strip_rows) {
      const int64_t rows = std::min(strip_rows, N_ - r0);
      const at::Tensor anchors = normalised_rows(anchor_buffer_, anchor_x, anchor_stats, r0, rows);
      at::Tensor z = strip.narrow(0, 0, rows);
      for (int64_t j0 = 0; j0 < N_; j0 += block_rows) {
        const int64_t kb = std::min(block_rows, N_ - j0);
        at::Tensor out = z.narrow(1, j0, kb);
        at::mm_out(out, anchors, candidates(j0, kb).t());
      }
      EpilogueParams<Acc> p = strip_epilogue<Acc>(z, r0, rows, inv_tau_, in_.valid(), terms, w);
      k_.contrastive_epilogue(p);
      if (!w.defined()) continue;
      if (student_anchors) {
        at::Tensor dp_rows = dp.narrow(0, r0, rows);
        for (int64_t j0 = 0; j0 < N_; j0 += block_rows) {
          const int64_t kb = std::min(block_rows, N_ - j0);
          dp_rows.addmm_(z.narrow(1, j0, kb), candidates(j0, kb));
        }
      } else {
        dp.addmm_(z.t(), anchors);
      }
    }
    add_terms(loss, terms);
  }

  void class_strips(const at::Tensor& anchor_x, const BicKDStats& anchor_stats, const at::Tensor& cand_x,
                    const BicKDStats& cand_stats, bool student_anchors, const at::Tensor& weight, at::Tensor& loss,
                    const at::Tensor& dpbar) {
    const int64_t strip_cols = std::min(rows_within<Acc>(budget_ / 2, C_, C_), rows_within<Acc>(budget_ / 4, N_, C_));
    const int64_t block_cols = rows_within<Acc>(budget_ / 4, N_, C_);
    at::Tensor strip = at::empty({strip_cols, C_}, opts_);
    at::Tensor terms = at::zeros({C_}, opts_);
    const at::Tensor w = scaled_weight(weight);
    const at::Tensor all_candidates =
        block_cols >= C_ ? normalised_columns(candidate_buffer_, cand_x, cand_stats, 0, C_) : at::Tensor();
    auto candidates = [&](int64_t d0, int64_t kb) {
      return all_candidates.defined() ? all_candidates
                                      : normalised_columns(candidate_buffer_, cand_x, cand_stats, d0, kb);
    };
    for (int64_t c0 = 0; c0 < C_; c0 += strip_cols) {
      const int64_t cols = std::min(strip_cols, C_ - c0);
      const at::Tensor anchors = normalised_columns(anchor_buffer_, anchor_x, anchor_stats, c0, cols);
      at::Tensor z = strip.narrow(0, 0, cols);
      for (int64_t d0 = 0; d0 < C_; d0 += block_cols) {
        const int64_t kb = std::min(block_cols, C_ - d0);
        at::Tensor out = z.narrow(1, d0, kb);
        at::mm_out(out, anchors.t(), candidates(d0, kb));
      }
      EpilogueParams<Acc> p = strip_epilogue<Acc>(z, c0, cols, inv_tau_, nullptr, terms, w);
      k_.contrastive_epilogue(p);
      if (!w.defined()) continue;
      for (int64_t d0 = 0; d0 < C_; d0 += block_cols) {
        const int64_t kb = std::min(block_cols, C_ - d0);
        if (student_anchors) {
          // dpbar_c += sum_d coef_cd qbar_d for the anchor columns c.
          dpbar.narrow(1, c0, cols).addmm_(candidates(d0, kb), z.narrow(1, d0, kb).t());
        } else {
          // Teacher anchors d: every student column c gains coef_dc qbar_d.
          dpbar.narrow(1, d0, kb).addmm_(anchors, z.narrow(1, d0, kb));
        }
      }
    }
    add_terms(loss, terms);
  }

  const Inputs& in_;
  KernelBackend<Acc>& k_;
  const int64_t N_, C_;
  const at::TensorOptions opts_;
  const Acc inv_temp_, inv_tau_;
  const bool symmetric_;
  const int64_t budget_;
  WorkBuffer<Acc> anchor_buffer_, candidate_buffer_;
  BicKDStats s_, t_;  // student's, teacher's
};

struct BicKDConfig {
  double temperature, tau, w_sample, w_class;
  bool symmetric;
};

// Runs BicKD over `in`, filling the unweighted per-sample and per-class terms and, when the weights are
// defined, the student gradient.
template <typename Acc>
void bickd_core(const Inputs& in, int64_t count, const BicKDConfig& cfg, const at::Tensor& sample_weight,
                const at::Tensor& class_weight, at::Tensor& sample_terms, at::Tensor& class_terms,
                const at::Tensor& grad) {
  const bool want_grad = grad.defined();
  const bool sample_side = cfg.w_sample != 0 && count > 0;
  // With no valid row, every column is empty and the class side is defined as 0.
  const bool class_side = cfg.w_class != 0 && count > 0;
  if (!sample_side && !class_side) {
    if (want_grad) grad.zero_();
    return;
  }
  BicKDPass<Acc> pass(in, cfg.temperature, cfg.tau, cfg.symmetric);
  const auto acc_options = in.student.options().dtype(acc_type<Acc>());
  at::Tensor dp, dpbar;
  if (want_grad && sample_side) {
    dp = grad.scalar_type() == acc_type<Acc>() ? grad.zero_() : at::zeros({in.rows, in.cols}, acc_options);
  }
  if (want_grad && class_side) dpbar = at::zeros({in.rows, in.cols}, acc_options);
  if (sample_side) pass.sample_side(want_grad ? sample_weight : at::Tensor(), sample_terms, dp);
  if (class_side) pass.class_side(want_grad ? class_weight : at::Tensor(), class_terms, dpbar);
  if (want_grad) pass.backward(dp, dpbar, grad);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// The ops.

namespace {

// What every op does first, in one place: check the inputs and make them contiguous, make the student's device
// current (CUDA: its current stream), parse the reduction, then run body(Acc{}, call) in the accumulation type.
struct OpCall {
  const Inputs& in;
  Reduction reduction;
  at::TensorOptions acc_options;
  int64_t count;  // valid rows
};

template <typename F>
decltype(auto) run_op(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                      const std::optional<at::Tensor>& mask, std::string_view reduction, F&& body) {
  const Inputs in = check_inputs(op, student, teacher, mask);
  const c10::OptionalDeviceGuard device_guard(at::device_of(student));
  const Reduction red = parse_reduction(reduction);
  return dispatch_acc(in.student, [&](auto tag) {
    using Acc = decltype(tag);
    const OpCall call{in, red, in.student.options().dtype(acc_type<Acc>()), count_valid(in)};
    return body(tag, call);
  });
}

// The forward's gradient, when it computes one (mean / sum), is for an upstream gradient of 1.
template <typename Acc>
at::Tensor unit_weights(const OpCall& call, int64_t divisor, const at::Tensor& mask, int64_t anchors) {
  return anchor_weights<Acc>(at::ones({}, call.acc_options), call.reduction, divisor, mask, anchors, call.acc_options);
}

at::Tensor forward_grad(const Inputs& in, bool want_grad) {
  return want_grad ? at::empty_like(in.student) : at::empty({0}, in.student.options());
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
    at::Tensor grad = forward_grad(in, want_grad);
    const at::Tensor weight = want_grad ? unit_weights<Acc>(call, call.count, in.mask, in.rows) : at::Tensor();
    if (call.count > 0) {
      ckd_core<Acc>(in, tau, student_anchor, weight, row_loss, want_grad ? grad : at::Tensor());
    } else if (want_grad) {
      grad.zero_();
    }
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
    at::Tensor grad = at::empty_like(in.student);
    if (call.count == 0) return grad.zero_();
    const at::Tensor weight =
        anchor_weights<Acc>(grad_loss, call.reduction, call.count, in.mask, in.rows, call.acc_options);
    at::Tensor row_loss = at::empty({in.rows}, call.acc_options);
    ckd_core<Acc>(in, tau, student_anchor, weight, row_loss, grad);
    return grad;
  });
}

namespace {
// KD's one pass per row: the loss, and the gradient where weight is defined.
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
    kd_core<Acc>(in, temperature, want_grad ? unit_weights<Acc>(call, call.count, in.mask, in.rows) : at::Tensor(),
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
                 anchor_weights<Acc>(grad_loss, call.reduction, call.count, in.mask, in.rows, call.acc_options),
                 row_loss, grad);
    return grad;
  });
}

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
    at::Tensor sample_terms = at::zeros({in.rows}, call.acc_options);
    at::Tensor class_terms = at::zeros({in.cols}, call.acc_options);
    at::Tensor grad = forward_grad(in, want_grad);
    at::Tensor sample_weight, class_weight;
    if (want_grad) {
      sample_weight = unit_weights<Acc>(call, call.count, in.mask, in.rows) * cfg.w_sample;
      class_weight = unit_weights<Acc>(call, in.cols, at::Tensor(), in.cols) * cfg.w_class;
    }
    bickd_core<Acc>(in, call.count, cfg, sample_weight, class_weight, sample_terms, class_terms,
                    want_grad ? grad : at::Tensor());
    if (call.reduction == Reduction::None) {
      return {sample_terms * cfg.w_sample, class_terms * cfg.w_class, grad};
    }
    const at::Tensor loss = reduce_terms(sample_terms, call.reduction, call.count) * cfg.w_sample +
                            reduce_terms(class_terms, call.reduction, in.cols) * cfg.w_class;
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
        anchor_weights<Acc>(grad_sample, call.reduction, call.count, in.mask, in.rows, call.acc_options) *
        cfg.w_sample;
    const at::Tensor class_weight =
        anchor_weights<Acc>(upstream_class, call.reduction, in.cols, at::Tensor(), in.cols, call.acc_options) *
        cfg.w_class;
    at::Tensor sample_terms = at::zeros({in.rows}, call.acc_options);
    at::Tensor class_terms = at::zeros({in.cols}, call.acc_options);
    at::Tensor grad = at::empty_like(in.student);
    bickd_core<Acc>(in, call.count, cfg, sample_weight, class_weight, sample_terms, class_terms, grad);
    return grad;
  });
}

}  // namespace ckd
