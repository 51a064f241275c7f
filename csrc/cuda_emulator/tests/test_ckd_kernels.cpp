// ckd_ext's own CUDA kernels (csrc/backends/cuda/cuda_kernels.h, through CudaBackend) under the emulator, against
// the torch-free CPU kernels (csrc/backends/cpu/cpu_kernels.h) on the same inputs. Built in every configuration of
// this project, so ThreadSanitizer and AddressSanitizer+UBSan run the real kernels.
#include <cmath>
#include <memory>
#include <random>
#include <vector>

#include "check.h"
#include "backends/cpu/cpu_kernels.h"
#include "backends/cuda/cuda_backend.h"

namespace {

constexpr int kRows = 6;
constexpr int kCols = 300;  // more than one element per thread of a 128-thread row block

std::vector<float> random_values(size_t n, unsigned seed, float scale = 3.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(gen);
  return v;
}

void expect_close(const std::vector<float>& actual, const std::vector<float>& expected, const char* what) {
  CKD_CHECK(actual.size() == expected.size(), "%s: sizes differ", what);
  float scale = 1e-30f;  // the largest finite magnitude (row maxima may be -inf, matched exactly)
  for (float e : expected)
    if (std::isfinite(e)) scale = std::max(scale, std::fabs(e));
  for (size_t k = 0; k < actual.size(); ++k) {
    CKD_CHECK(actual[k] == expected[k] || std::fabs(actual[k] - expected[k]) <= 2e-5f * scale, "%s[%zu]: %.8g vs %.8g", what, k, actual[k],
              expected[k]);
  }
}

ckd::ConstMatrix matrix(const std::vector<float>& v, int rows, int cols) {
  return {v.data(), ckd::DType::Float32, rows, cols};
}

struct Inputs {
  std::vector<float> s = random_values(kRows * kCols, 1), t = random_values(kRows * kCols, 2);
  bool valid[kRows] = {true, true, false, true, true, true};
  std::vector<float> weight = {0.5f, 1.0f, 2.0f, 0.25f, 1.5f, 0.75f};
};

void test_row_statistics(ckd::KernelBackend<float>& gpu, const Inputs& in) {
  std::vector<float> inv(kRows), inv_ref(kRows), dots(kRows), dots_ref(kRows);
  std::vector<float> row_max(kRows), log_sum(kRows), log_norm(kRows), max_ref(kRows), sum_ref(kRows), norm_ref(kRows);
  gpu.row_inv_norms(matrix(in.s, kRows, kCols), inv.data());
  gpu.row_dots(matrix(in.t, kRows, kCols), matrix(in.s, kRows, kCols), dots.data());
  gpu.softmax_stats(matrix(in.s, kRows, kCols), 0.25f, row_max.data(), log_sum.data(), log_norm.data());
  for (int i = 0; i < kRows; ++i) {
    const float* si = in.s.data() + i * kCols;
    ckd::cpu::row_inv_norm<float>(si, kCols, &inv_ref[i]);
    dots_ref[i] = ckd::cpu::row_dot<float>(in.t.data() + i * kCols, si, kCols);
    ckd::cpu::softmax_stats_row<float>(si, kCols, 0.25f, &max_ref[i], &sum_ref[i], &norm_ref[i]);
  }
  expect_close(inv, inv_ref, "row_inv_norms");
  expect_close(dots, dots_ref, "row_dots");
  expect_close(row_max, max_ref, "softmax_stats row_max");
  for (int i = 0; i < kRows; ++i) {  // the same float product x * inv_temp on both sides: bitwise equal
    CKD_CHECK(row_max[i] == max_ref[i], "softmax_stats row_max[%d]: %.8g vs %.8g", i, row_max[i], max_ref[i]);
  }
  expect_close(log_sum, sum_ref, "softmax_stats row_log_sum");
  expect_close(log_norm, norm_ref, "softmax_stats row_log_norm");

  // A row whose softmax arguments are ~5e3 (logits ~1e3 at T = 0.5): the statistics stay O(log C) (a float LSE
  // there would be rounded by up to 2.4e-4), row_max is the largest product x * inv_temp exactly, and a row of -inf
  // has row_max -inf and rests 0.
  std::vector<float> big = random_values(2 * kCols, 21, 1000.0f);
  for (int j = 0; j < kCols; ++j) big[kCols + j] = -INFINITY;
  std::vector<float> bmax(2), bsum(2), bnorm(2), bmax_ref(2), bsum_ref(2), bnorm_ref(2);
  gpu.softmax_stats(matrix(big, 2, kCols), 2.0f, bmax.data(), bsum.data(), bnorm.data());
  for (int i = 0; i < 2; ++i)
    ckd::cpu::softmax_stats_row<float>(big.data() + i * kCols, kCols, 2.0f, &bmax_ref[i], &bsum_ref[i], &bnorm_ref[i]);
  expect_close(bmax, bmax_ref, "softmax_stats row_max at large logits");
  expect_close(bsum, bsum_ref, "softmax_stats row_log_sum at large logits");
  expect_close(bnorm, bnorm_ref, "softmax_stats row_log_norm at large logits");
  double m = -INFINITY, s1 = 0, s2 = 0;
  for (int j = 0; j < kCols; ++j) m = std::max(m, 2.0 * big[j]);
  for (int j = 0; j < kCols; ++j) {
    s1 += std::exp(2.0 * big[j] - m);
    s2 += std::exp(2 * (2.0 * big[j] - m));
  }
  CKD_CHECK(bmax[0] == float(m) && std::fabs(bsum[0] - std::log(s1)) < 1e-6 &&
                std::fabs(bnorm[0] - 0.5 * std::log(s2)) < 1e-6,
            "softmax_stats at large logits: %.9g %.9g %.9g vs %.9g %.9g %.9g", bmax[0], bsum[0], bnorm[0], m,
            std::log(s1), 0.5 * std::log(s2));
  CKD_CHECK(bmax[1] == -INFINITY && bsum[1] == 0.0f && bnorm[1] == 0.0f, "softmax_stats of a -inf row: %g %g %g",
            bmax[1], bsum[1], bnorm[1]);
}

void test_kd_rows(ckd::KernelBackend<float>& gpu, const Inputs& in) {
  using ckd::DivergenceKind;
  for (DivergenceKind kind : {DivergenceKind::ForwardKL, DivergenceKind::ReverseKL, DivergenceKind::JSD,
                              DivergenceKind::SkewKL, DivergenceKind::TVD}) {
    const ckd::DivergenceParams<float> divergence{kind, 0.3f, 4.0f};
    std::vector<float> loss(kRows), grad(kRows * kCols), loss_ref(kRows, 0.0f), grad_ref(kRows * kCols, 0.0f);
    gpu.kd_rows(matrix(in.s, kRows, kCols), matrix(in.t, kRows, kCols), 2.0f, divergence, in.valid, loss.data(),
                in.weight.data(), grad.data());
    for (int i = 0; i < kRows; ++i) {
      if (!in.valid[i]) continue;
      ckd::cpu::kd_row<float>(in.s.data() + i * kCols, in.t.data() + i * kCols, kCols, 2.0f, divergence,
                              &loss_ref[i], in.weight[i], grad_ref.data() + i * kCols);
    }
    expect_close(loss, loss_ref, "kd_rows loss");
    expect_close(grad, grad_ref, "kd_rows grad");
  }
}

void test_contrastive_epilogue(ckd::KernelBackend<float>& gpu, const Inputs& in) {
  std::vector<float> strip = random_values(kRows * kRows, 3), strip_ref = strip;
  std::vector<float> col_scale = random_values(kRows, 4), row_scale = random_values(kRows, 5);
  for (auto& c : col_scale) c = std::fabs(c) + 0.1f;
  for (auto& r : row_scale) r = std::fabs(r) + 0.2f;
  std::vector<float> loss(kRows), loss_ref(kRows);
  auto params = [&](std::vector<float>& z, std::vector<float>& l) {
    ckd::EpilogueParams<float> p{};
    p.strip = z.data();
    p.row0 = 0;
    p.rows = kRows;
    p.cols = kRows;
    p.scale = 2.0f;
    p.row_scale = row_scale.data();
    p.col_scale = col_scale.data();
    p.valid = in.valid;
    p.loss = l.data();
    p.weight = in.weight.data();
    return p;
  };
  gpu.contrastive_epilogue(params(strip, loss));
  const auto p_ref = params(strip_ref, loss_ref);
  for (int r = 0; r < kRows; ++r) ckd::cpu::contrastive_epilogue_row(p_ref, r);
  expect_close(loss, loss_ref, "epilogue loss");
  expect_close(strip, strip_ref, "epilogue coefficients");
}

// Strips of few, long rows, which the epilogue splits into column chunks (cuda_backend.h, epilogue_split: 3 chunks
// of 1100 columns here), the positives in the middle chunk, one anchor and some candidates masked; packed (cols %
// 4 == 0) and element-wise rows, with and without the gradient.
void test_split_contrastive_epilogue(ckd::KernelBackend<float>& gpu) {
  constexpr int kStripRows = 3, kRow0 = 1500;
  for (int cols : {3300, 3299}) {
    std::vector<float> col_scale = random_values(cols, 31), row_scale = random_values(cols, 32);
    for (auto& c : col_scale) c = std::fabs(c) + 0.1f;
    for (auto& r : row_scale) r = std::fabs(r) + 0.2f;
    std::unique_ptr<bool[]> valid(new bool[cols]);
    for (int j = 0; j < cols; ++j) valid[j] = j % 7 != 3 && j != kRow0 + 1;
    std::vector<float> weight(cols, 0.0f);
    for (int r = 0; r < kStripRows; ++r) weight[kRow0 + r] = 0.5f + r;
    for (bool want_grad : {true, false}) {
      std::vector<float> strip = random_values(kStripRows * cols, 33), strip_ref = strip;
      std::vector<float> loss(cols, -1.0f), loss_ref(cols, -1.0f);
      auto params = [&](std::vector<float>& z, std::vector<float>& l) {
        ckd::EpilogueParams<float> p{};
        p.strip = z.data();
        p.row0 = kRow0;
        p.rows = kStripRows;
        p.cols = cols;
        p.scale = 3.0f;
        p.row_scale = row_scale.data();
        p.col_scale = col_scale.data();
        p.valid = valid.get();
        p.loss = l.data();
        p.weight = want_grad ? weight.data() : nullptr;
        return p;
      };
      gpu.contrastive_epilogue(params(strip, loss));
      const auto p_ref = params(strip_ref, loss_ref);
      for (int r = 0; r < kStripRows; ++r) ckd::cpu::contrastive_epilogue_row(p_ref, r);
      expect_close(loss, loss_ref, "split epilogue loss");
      if (want_grad) expect_close(strip, strip_ref, "split epilogue coefficients");
    }
  }
}

// A diagonal and an off-diagonal tile of a symmetric 6 x 6 matrix, 3 rows each: LSE statistics (rows and the
// transposed columns) and the symmetric coefficients, on raw products scaled by the rows' inverse norms.
void test_symmetric_tiles(ckd::KernelBackend<float>& gpu, const Inputs& in) {
  std::vector<float> lse = random_values(kRows, 15, 1.0f);
  for (auto& l : lse) l += 3.0f;
  std::vector<float> inv_norm = random_values(kRows, 17);
  for (auto& v : inv_norm) v = std::fabs(v) + 0.3f;
  for (int j0 : {0, 3}) {
    std::vector<float> tile = random_values(9, 16 + j0), tile_ref = tile;
    const ckd::SymmetricTile<float> t{tile.data(), 3, 0, 3, j0, 3, 2.0f, inv_norm.data(), in.valid};
    const ckd::SymmetricTile<float> t_ref{tile_ref.data(), 3, 0, 3, j0, 3, 2.0f, inv_norm.data(), in.valid};
    std::vector<float> row_max(kRows, -INFINITY), row_sum(kRows, 0.0f), max_ref = row_max, sum_ref = row_sum;
    gpu.symmetric_tile_lse(t, row_max.data(), row_sum.data());
    for (int r = 0; r < 3; ++r) ckd::cpu::symmetric_tile_lse_row(t_ref, r, max_ref.data(), sum_ref.data());
    if (j0 != 0) ckd::cpu::symmetric_tile_lse_columns(t_ref, 0, 3, max_ref.data(), sum_ref.data());
    expect_close(row_max, max_ref, "symmetric_tile_lse max");
    expect_close(row_sum, sum_ref, "symmetric_tile_lse sum");

    gpu.symmetric_tile_coefficients(t, lse.data(), in.weight.data());
    for (int r = 0; r < 3; ++r) ckd::cpu::symmetric_tile_coefficients_row(t_ref, r, lse.data(), in.weight.data());
    expect_close(tile, tile_ref, "symmetric_tile_coefficients");
  }

  // An off-diagonal 70 x 40 tile: each warp of a column block takes a share of the 70 rows, and the second column
  // block is partly past the tile. Rows and columns masked here and there.
  constexpr int kTileRows = 70, kTileCols = 40, kN = kTileRows + kTileCols;
  std::vector<float> big_inv_norm = random_values(kN, 41);
  for (auto& v : big_inv_norm) v = std::fabs(v) + 0.3f;
  bool big_valid[kN];
  for (int k = 0; k < kN; ++k) big_valid[k] = k % 9 != 4;
  std::vector<float> tile = random_values(kTileRows * kTileCols, 42);
  const ckd::SymmetricTile<float> t{tile.data(), kTileCols, 0, kTileRows, kTileRows, kTileCols, 2.0f,
                                    big_inv_norm.data(), big_valid};
  std::vector<float> row_max = random_values(kN, 43), row_sum(kN, 1.0f), max_ref = row_max, sum_ref = row_sum;
  gpu.symmetric_tile_lse(t, row_max.data(), row_sum.data());
  for (int r = 0; r < kTileRows; ++r) ckd::cpu::symmetric_tile_lse_row(t, r, max_ref.data(), sum_ref.data());
  ckd::cpu::symmetric_tile_lse_columns(t, 0, kTileCols, max_ref.data(), sum_ref.data());
  expect_close(row_max, max_ref, "symmetric_tile_lse max (70 x 40)");
  expect_close(row_sum, sum_ref, "symmetric_tile_lse sum (70 x 40)");
}

// Rows of kCols (vector loads) and of kCols - 1 (one element at a time), with and without the extra term.
void test_normalize_backward(ckd::KernelBackend<float>& gpu, const Inputs& in) {
  for (int cols : {kCols, kCols - 1}) {
    for (bool extra : {true, false}) {
      std::vector<float> dv = random_values(kRows * cols, 6), dv_ref = dv, grad(kRows * cols), grad_ref(kRows * cols, 0);
      std::vector<float> extra_coef = random_values(kRows, 7);
      gpu.normalize_backward(dv.data(), matrix(in.s, kRows, cols), extra ? extra_coef.data() : nullptr,
                             matrix(in.t, kRows, cols), in.valid, grad.data(), ckd::DType::Float32);
      for (int i = 0; i < kRows; ++i) {
        if (!in.valid[i]) continue;
        ckd::cpu::normalize_backward_row<float>(dv_ref.data() + i * cols, in.s.data() + i * cols, cols,
                                                extra ? extra_coef[i] : 0.0f, extra ? in.t.data() + i * cols : nullptr,
                                                grad_ref.data() + i * cols);
      }
      expect_close(grad, grad_ref, extra ? "normalize_backward" : "normalize_backward without extra");
    }
  }
}

void test_bickd_kernels(ckd::KernelBackend<float>& gpu, const Inputs& in) {
  const float inv_temp = 0.5f;
  std::vector<float> row_max(kRows), log_sum(kRows), row_log_norm(kRows);
  for (int i = 0; i < kRows; ++i) {
    ckd::cpu::softmax_stats_row<float>(in.s.data() + i * kCols, kCols, inv_temp, &row_max[i], &log_sum[i],
                                       &row_log_norm[i]);
  }
  std::vector<float> log_norm(kCols), log_norm_ref(kCols);
  gpu.column_log_norms(matrix(in.s, kRows, kCols), row_max.data(), log_sum.data(), inv_temp, in.valid, log_norm.data());
  ckd::cpu::column_log_norms_block<float>(in.s.data(), kRows, kCols, 0, kCols, row_max.data(), log_sum.data(),
                                          inv_temp, in.valid, log_norm_ref.data());
  expect_close(log_norm, log_norm_ref, "column_log_norms");

  std::vector<float> dpbar = random_values(kRows * kCols, 8), col_dot(kCols), col_dot_ref(kCols);
  gpu.column_dots(dpbar.data(), matrix(in.s, kRows, kCols), row_max.data(), log_sum.data(), log_norm_ref.data(),
                  inv_temp, in.valid, col_dot.data());
  ckd::cpu::column_dots_block<float>(dpbar.data(), in.s.data(), kRows, kCols, 0, kCols, row_max.data(),
                                     log_sum.data(), log_norm_ref.data(), inv_temp, in.valid, col_dot_ref.data());
  expect_close(col_dot, col_dot_ref, "column_dots");

  std::vector<float> col_projection(kCols);
  for (int c = 0; c < kCols; ++c) col_projection[c] = log_norm_ref[c] < float(ckd::kLogNormEps) ? 0.0f : col_dot_ref[c];
  // Both sides, the sample side only (dpbar null) and the class side only (dp null).
  for (int sides : {3, 1, 2}) {
    const float* dpbar_in = sides & 2 ? dpbar.data() : nullptr;
    std::vector<float> dp = random_values(kRows * kCols, 9), grad(kRows * kCols), grad_ref(kRows * kCols, 0);
    float* dp_in = sides & 1 ? dp.data() : nullptr;
    std::vector<float> scratch(2 * kCols);
    gpu.bickd_backward_rows(dp_in, dpbar_in, matrix(in.s, kRows, kCols), row_max.data(), log_sum.data(),
                            log_norm_ref.data(), col_projection.data(), inv_temp, in.valid, grad.data(),
                            ckd::DType::Float32);
    for (int i = 0; i < kRows; ++i) {
      if (!in.valid[i]) continue;
      ckd::cpu::bickd_backward_row<float>(dp_in ? dp_in + i * kCols : nullptr, dpbar_in ? dpbar_in + i * kCols : nullptr,
                                          in.s.data() + i * kCols, kCols, row_max[i], log_sum[i], log_norm_ref.data(),
                                          col_projection.data(), inv_temp, scratch.data(), grad_ref.data() + i * kCols);
    }
    expect_close(grad, grad_ref, sides == 3 ? "bickd_backward_rows" : sides == 1 ? "bickd_backward_rows (dp only)"
                                                                                 : "bickd_backward_rows (dpbar only)");
  }
}

void test_elementwise(ckd::KernelBackend<float>& gpu, const Inputs& in) {
  std::vector<float> shift = random_values(kRows, 10), rest = random_values(kRows, 12, 1.0f);
  std::vector<float> col_shift = random_values(kCols, 11);
  std::vector<float> block(3 * 40), block_ref(3 * 40);
  for (const float* cs : {static_cast<const float*>(col_shift.data()), static_cast<const float*>(nullptr)}) {
    gpu.exp_block(matrix(in.s, kRows, kCols), 2, 3, 50, 40, 0.5f, shift.data(), rest.data(), cs, in.valid,
                  block.data(), ckd::DType::Float32);
    for (int r = 0; r < 3; ++r)
      for (int c = 0; c < 40; ++c)
        block_ref[r * 40 + c] =
            in.valid[2 + r] ? std::exp((in.s[(2 + r) * kCols + 50 + c] * 0.5f - shift[2 + r]) - rest[2 + r] -
                                       (cs ? std::max(cs[50 + c], float(ckd::kLogNormEps)) : 0.0f))
                            : 0.0f;
    expect_close(block, block_ref, cs ? "exp_block" : "exp_block without col_shift");
  }

  std::vector<float> loaded(4 * kCols, 1.0f), loaded_ref(4 * kCols);
  gpu.load_rows(matrix(in.t, kRows, kCols), 1, 4, shift.data(), in.valid, loaded.data());
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < kCols; ++c)
      loaded_ref[r * kCols + c] = in.valid[1 + r] ? in.t[(1 + r) * kCols + c] * shift[1 + r] : 0.0f;
  expect_close(loaded, loaded_ref, "load_rows");

}

}  // namespace

int main() {
  ckd::KernelBackend<float>& gpu = ckd::cuda_backend_on<float>(nullptr);
  const Inputs in;
  test_row_statistics(gpu, in);
  test_kd_rows(gpu, in);
  test_contrastive_epilogue(gpu, in);
  test_split_contrastive_epilogue(gpu);
  test_symmetric_tiles(gpu, in);
  test_normalize_backward(gpu, in);
  test_bickd_kernels(gpu, in);
  test_elementwise(gpu, in);
  return ckd_check::finish("test_ckd_kernels");
}
