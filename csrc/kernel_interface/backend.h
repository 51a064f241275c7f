// The small kernels the shared orchestration (csrc/ckd.cpp, bickd.cpp, kd.cpp over csrc/orchestration/) is built from. Each backend implements this
// interface once (csrc/backends/: cpu, cuda, and cuda's kernels again under the emulator); everything else, the
// chunked GEMMs included, is shared. Pointers are device pointers; indices are global row / column indices.
#pragma once
#include "types.h"

namespace ckd {

template <typename Acc>
class KernelBackend {
 public:
  virtual ~KernelBackend() = default;

  // inv_norm[i] = 1 / max(||x_i||, eps)
  virtual void row_inv_norms(ConstMatrix x, Acc* inv_norm) = 0;
  // out[i] = <a_i, b_i>
  virtual void row_dots(ConstMatrix a, ConstMatrix b, Acc* out) = 0;
  // A row's softmax statistics, kept as its max and the log of its max-shifted sum instead of one log-sum-exp:
  //   row_max[i]      = max_c x_ic * inv_temp                                  (the product every kernel forms)
  //   row_log_sum[i]  = log sum_c exp(x_ic * inv_temp - row_max[i])           (in [0, log C])
  //   row_log_norm[i] = 0.5 log sum_c exp(2 (x_ic * inv_temp - row_max[i]))   (in [0, 0.5 log C]; when not null)
  // so LSE(x_i * inv_temp) = row_max + row_log_sum and LSE(2 x_i * inv_temp) / 2 = row_max + row_log_norm. Every
  // consumer evaluates (x_ic * inv_temp - row_max[i]) - rest[i] in that order: the first difference is exact for
  // the row's argmax and carries only the element's own rounding elsewhere, and the rest is O(log C), with a
  // rounding of ~1e-7; one float LSE of a row whose softmax arguments are ~5e3 is rounded by up to 2.4e-4, a
  // factor exp(2.4e-4) on every probability of the row. A row that is all -inf has row_max = -inf and rests 0
  // (its softmax is undefined: x * inv_temp - row_max is NaN).
  virtual void softmax_stats(ConstMatrix x, Acc inv_temp, Acc* row_max, Acc* row_log_sum, Acc* row_log_norm) = 0;
  // KD with a divergence D (docs/math.md 3.1) between Q_i = softmax(t_i / T) and P_i = softmax(s_i / T), a few
  // passes over each row: loss[i] = loss_scale * D(Q_i, P_i) (0 where !valid[i]) and, when grad is given, its
  // gradient w.r.t. s_i times weight[i], in the student's dtype.
  virtual void kd_rows(ConstMatrix student, ConstMatrix teacher, Acc temperature, DivergenceParams<Acc> divergence,
                       const bool* valid, Acc* loss, const Acc* weight, void* grad) = 0;
  // out[r][c] = x[row0 + r][c] * row_scale[row0 + r], converted to Acc (row_scale may be null); exactly 0 in rows
  // with !valid[row0 + r], whatever they hold (a masked row's NaN must not reach a GEMM, where 0 * NaN = NaN).
  virtual void load_rows(ConstMatrix x, int64_t row0, int64_t rows, const Acc* row_scale, const bool* valid,
                         Acc* out) = 0;
  // out[r][c] = valid(i) ? exp(((x[i][col0+c] * inv_temp - row_max[i]) - row_rest[i]) - max(col_shift[col0+c],
  // log eps)) : 0 with i = row0 + r, for the block rows x cols, stored row-major with leading dimension `cols`
  // (col_shift may be null: no column term). row_max is softmax_stats' row_max; row_rest its row_log_norm (rows
  // of p = P / |P|) or row_log_sum (P, for columns with col_shift = column_log_norms' log_norm). `out` holds
  // out_dtype: Acc's, or (float accumulation) a 16-bit dtype, the GEMM policy's operands on tensor cores.
  virtual void exp_block(ConstMatrix x, int64_t row0, int64_t rows, int64_t col0, int64_t cols, Acc inv_temp,
                         const Acc* row_max, const Acc* row_rest, const Acc* col_shift, const bool* valid,
                         void* out, DType out_dtype) = 0;
  virtual void contrastive_epilogue(const EpilogueParams<Acc>& p) = 0;
  // In place, a block of raw similarities (anchors p.row0.., candidates p.col0..) whose anchors' full log-sum-exps
  // lse[i] (positive included) a first pass found: the epilogue's coefficients weight[i] pi_ij * scale * row_scale[i]
  // * col_scale[j] for j != i, 0 on the diagonal and in masked rows and columns (the positive's coefficient is the
  // orchestration's, as for symmetric_tile_coefficients). p.loss is not read.
  virtual void contrastive_coefficients(const EpilogueParams<Acc>& p, const Acc* lse) = 0;
  // Merges the tile's max-shifted exp-sums of the negatives (the diagonal excluded) into the running
  // (row_max, row_sum) of every row it touches: rows i over columns j and, for an off-diagonal tile, rows j over
  // columns i.
  virtual void symmetric_tile_lse(const SymmetricTile<Acc>& t, Acc* row_max, Acc* row_sum) = 0;
  // In place: tile_ij = (weight[i] pi_ij + weight[j] pi_ji) * t.scale for i != j (pi_ij = exp(z_ij - lse[i]), lse
  // the full log-sum-exp, positive included), 0 on the diagonal (the positive's coefficient is the orchestration's).
  virtual void symmetric_tile_coefficients(const SymmetricTile<Acc>& t, const Acc* lse, const Acc* weight) = 0;
  // Backward of v = x / max(||x||, eps) for every row, given d_i = dv_i / max(||x_i||, eps) (what the GEMMs on raw
  // rows produce: their coefficients carry the inverse norms), after adding extra_coef[i] * extra_x_i to d_i when
  // extra_coef is given: grad_i = d_i - [unclamped] <d_i, x_i> x_i / ||x_i||^2, written in grad_dtype: x's dtype or
  // Acc's (grad may alias d when it is Acc's). Rows with !valid[i] get 0.
  virtual void normalize_backward(Acc* d, ConstMatrix x, const Acc* extra_coef, ConstMatrix extra_x,
                                  const bool* valid, void* grad, DType grad_dtype) = 0;
  // log_norm[c] = 0.5 * LSE_{valid i} 2 log P_ic with log P_ic = (x_ic * inv_temp - row_max[i]) - row_log_sum[i]
  // (softmax_stats' statistics): the log of the L2 norm of column c of softmax(x * inv_temp), unclamped (-inf for
  // an empty column).
  virtual void column_log_norms(ConstMatrix x, const Acc* row_max, const Acc* row_log_sum, Acc inv_temp,
                                const bool* valid, Acc* log_norm) = 0;
  // out[c] = sum_i a_ic * pbar_ic with pbar_ic = exp(log P_ic - max(log_norm[c], log eps)), log P_ic as above.
  virtual void column_dots(const Acc* a, ConstMatrix x, const Acc* row_max, const Acc* row_log_sum,
                           const Acc* log_norm, Acc inv_temp, const bool* valid, Acc* out) = 0;
  // BicKD's last pass: through the row normalisation (dp, may be null), the column normalisation (dpbar,
  // may be null; col_log_norm as column_log_norms gives it and col_projection = <dpbar_c, pbar_c>, 0 where the
  // norm is clamped) and the softmax, into grad (grad_dtype: x's or Acc's; may alias dp in Acc). P and p are exp(x_i * inv_temp -
  // row_max[i]) over its own sum and norm, pbar is column_dots' pbar_ic (row_log_sum is only read for it): see
  // cpu::bickd_backward_row.
  virtual void bickd_backward_rows(Acc* dp, const Acc* dpbar, ConstMatrix x, const Acc* row_max,
                                   const Acc* row_log_sum, const Acc* col_log_norm, const Acc* col_projection,
                                   Acc inv_temp, const bool* valid, void* grad, DType grad_dtype) = 0;
};

}  // namespace ckd
