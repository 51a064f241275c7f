// The small kernels the shared orchestration (csrc/losses.cpp) is built from. Each backend implements this
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
  // lse1[i] = LSE_c(x_ic * inv_temp); lse2[i] = LSE_c(2 * x_ic * inv_temp) when lse2 != nullptr
  virtual void softmax_stats(ConstMatrix x, Acc inv_temp, Acc* lse1, Acc* lse2) = 0;
  // Vanilla KD, one pass per row: loss[i] = T^2 KL(Q_i || P_i) (0 where !valid[i]) and, when grad is
  // given, grad_i = weight[i] * T * (P_i - Q_i) in the student's dtype.
  virtual void kd_rows(ConstMatrix student, ConstMatrix teacher, Acc temperature, const bool* valid,
                       Acc* loss, const Acc* weight, void* grad) = 0;
  // out[r][c] = x[row0 + r][c] * row_scale[row0 + r], converted to Acc (row_scale may be null); exactly 0 in rows
  // with !valid[row0 + r], whatever they hold (a masked row's NaN must not reach a GEMM, where 0 * NaN = NaN).
  virtual void load_rows(ConstMatrix x, int64_t row0, int64_t rows, const Acc* row_scale, const bool* valid,
                         Acc* out) = 0;
  // out[r][c] = valid(row0 + r) ? exp(x[row0+r][col0+c] * inv_temp - row_shift[row0+r] - col_shift[col0+c]) : 0
  // for the block rows x cols, stored row-major with leading dimension `cols` (col_shift may be null).
  virtual void exp_block(ConstMatrix x, int64_t row0, int64_t rows, int64_t col0, int64_t cols, Acc inv_temp,
                         const Acc* row_shift, const Acc* col_shift, const bool* valid, Acc* out) = 0;
  virtual void contrastive_epilogue(const EpilogueParams<Acc>& p) = 0;
  // Merges the tile's max-shifted exp-sums into the running (row_max, row_sum) of every row it touches:
  // rows i over columns j and, for an off-diagonal tile, rows j over columns i.
  virtual void symmetric_tile_lse(const SymmetricTile<Acc>& t, Acc* row_max, Acc* row_sum) = 0;
  // In place: tile_ij = (weight[i] pi_ij + weight[j] pi_ji) * t.scale for i != j (pi_ij = exp(z_ij - lse[i])),
  // 0 on the diagonal, whose coefficient weight[i] (pi_ii - 1) * t.scale goes to diagonal_out[i].
  virtual void symmetric_tile_coefficients(const SymmetricTile<Acc>& t, const Acc* lse, const Acc* weight,
                                           Acc* diagonal_out) = 0;
  // Backward of v = x / max(||x||, eps) for every row, after adding extra_coef[i] * extra_inv[i] * extra_x_i
  // to dv_i when extra_coef is given: grad_i = (dv_i - [unclamped] <dv_i, v_i> v_i) / max(||x_i||, eps),
  // written in x's dtype (grad may alias dv when that dtype is Acc). Rows with !valid[i] get 0.
  virtual void normalize_backward(Acc* dv, ConstMatrix x, const Acc* extra_coef, const Acc* extra_inv,
                                  ConstMatrix extra_x, const bool* valid, void* grad) = 0;
  // log_norm[c] = 0.5 * LSE_{valid i} 2 (x_ic * inv_temp - lse1[i]): the log of the L2 norm of column c of
  // softmax(x * inv_temp), unclamped (-inf for an empty column).
  virtual void column_log_norms(ConstMatrix x, const Acc* lse1, Acc inv_temp, const bool* valid, Acc* log_norm) = 0;
  // out[c] = sum_i a_ic * pbar_ic with pbar_ic = exp(x_ic * inv_temp - lse1[i] - max(log_norm[c], log eps)).
  virtual void column_dots(const Acc* a, ConstMatrix x, const Acc* lse1, const Acc* log_norm, Acc inv_temp,
                           const bool* valid, Acc* out) = 0;
  // BicKD's last pass: through the row normalisation (dp, may be null), the column normalisation (dpbar,
  // may be null; col_log_norm as column_log_norms gives it and col_projection = <dpbar_c, pbar_c>, 0 where the
  // norm is clamped) and the softmax, into grad (x's dtype; may alias dp). P and p are renormalised from
  // exp(x_i * inv_temp - lse1[i]), pbar is column_dots' pbar_ic: see cpu::bickd_backward_row.
  virtual void bickd_backward_rows(Acc* dp, const Acc* dpbar, ConstMatrix x, const Acc* lse1,
                                   const Acc* col_log_norm, const Acc* col_projection, Acc inv_temp,
                                   const bool* valid, void* grad) = 0;
};

}  // namespace ckd
