// C++ unit tests of the torch-free CPU kernels (csrc/backends/cpu/cpu_kernels.h) against plain double loops.
// Run by ctest (CMakeLists.txt); no libtorch needed, only the header-only c10 16-bit types.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "backends/cpu/cpu_kernels.h"

namespace {

int failures = 0;

void expect_near(double actual, double expected, double tol, const char* what) {
  if (!(std::fabs(actual - expected) <= tol * std::max(1.0, std::fabs(expected)))) {
    std::printf("FAIL %s: %.10g vs %.10g\n", what, actual, expected);
    ++failures;
  }
}

std::vector<double> randn(int n, unsigned seed, double scale = 2.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> d(0.0, scale);
  std::vector<double> v(n);
  for (auto& x : v) x = d(gen);
  return v;
}

// One strip row of raw similarities -> loss and coefficients (of the raw rows: times both inverse norms), with a
// masked column.
void test_contrastive_epilogue() {
  const int cols = 37, row = 5;
  std::vector<double> raw = randn(cols, 1);
  std::vector<double> col_scale = randn(cols, 2);
  for (auto& s : col_scale) s = std::fabs(s) + 0.1;
  std::vector<char> valid_storage(cols, 1);
  valid_storage[11] = 0;
  const bool* valid = reinterpret_cast<const bool*>(valid_storage.data());
  const double scale = 1.7, weight = 0.3;
  std::vector<float> row_scale(row + 1, 0.0f);
  row_scale[row] = 0.45f;
  std::vector<float> strip(raw.begin(), raw.end());
  std::vector<float> col(col_scale.begin(), col_scale.end()), loss(row + 1), w(row + 1, weight);
  ckd::EpilogueParams<float> p{};
  p.strip = strip.data();
  p.row0 = row;
  p.rows = 1;
  p.cols = cols;
  p.scale = scale;
  p.row_scale = row_scale.data();
  p.col_scale = col.data();
  p.valid = valid;
  p.loss = loss.data();
  p.weight = w.data();
  ckd::cpu::contrastive_epilogue_row(p, 0);

  std::vector<double> z(cols);
  double m = -INFINITY;
  for (int j = 0; j < cols; ++j) {
    z[j] = valid[j] ? double(float(raw[j])) * scale * double(row_scale[row]) * double(float(col_scale[j])) : -INFINITY;
    m = std::max(m, z[j]);
  }
  double sum = 0;
  for (int j = 0; j < cols; ++j) sum += std::exp(z[j] - m);
  const double lse = m + std::log(sum);
  expect_near(loss[row], lse - z[row], 1e-5, "epilogue loss");
  for (int j = 0; j < cols; ++j) {
    const double raw_factor = double(row_scale[row]) * double(col[j]);
    expect_near(strip[j], weight * scale * (std::exp(z[j] - lse) - (j == row ? 1.0 : 0.0)) * raw_factor, 1e-5,
                "epilogue coefficient");
  }
}

// The log-sum-exp statistics of the negatives merged over two off-diagonal tiles equal one pass over the whole row
// without its diagonal; the transposed half of a tile updates the rows of its columns. The tiles hold raw products
// s_i . s_j and the rows' inverse norms scale them.
void test_symmetric_tiles() {
  const int n = 6;
  std::vector<double> sym = randn(n * n, 9);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < i; ++j) sym[i * n + j] = sym[j * n + i];
  std::vector<char> valid_storage = {1, 1, 0, 1, 1, 1};
  const bool* valid = reinterpret_cast<const bool*>(valid_storage.data());
  const std::vector<float> inv_norm = {0.5f, 2.0f, 1.0f, 0.25f, 1.5f, 0.75f};
  std::vector<float> row_max(n, -INFINITY), row_sum(n, 0.0f);
  // Tiles of 3 rows: (0..2, 0..2), (0..2, 3..5), (3..5, 3..5).
  for (int i0 : {0, 3}) {
    for (int j0 = i0; j0 < n; j0 += 3) {
      std::vector<float> tile(9);
      for (int r = 0; r < 3; ++r)
        for (int c = 0; c < 3; ++c) tile[r * 3 + c] = float(sym[(i0 + r) * n + j0 + c]);
      const ckd::SymmetricTile<float> t{tile.data(), 3, i0, 3, j0, 3, 2.0f, inv_norm.data(), valid};
      for (int r = 0; r < 3; ++r) ckd::cpu::symmetric_tile_lse_row(t, r, row_max.data(), row_sum.data());
      if (i0 != j0) ckd::cpu::symmetric_tile_lse_columns(t, 0, 3, row_max.data(), row_sum.data());
    }
  }
  for (int i = 0; i < n; ++i) {
    if (!valid[i]) continue;
    double m = -INFINITY;
    std::vector<double> z(n, -INFINITY);
    for (int j = 0; j < n; ++j) {
      if (!valid[j] || i == j) continue;
      z[j] = 2.0 * float(sym[i * n + j]) * inv_norm[i] * inv_norm[j];
      m = std::max(m, z[j]);
    }
    double s = 0;
    for (int j = 0; j < n; ++j) s += std::exp(z[j] - m);
    expect_near(row_max[i] + std::log(row_sum[i]), m + std::log(s), 1e-5, "symmetric tile log-sum-exp");
  }
}

template <typename T>
void test_softmax_stats(double tol, const char* what) {
  const int cols = 1000;
  std::vector<double> x = randn(cols, 3, 30.0);
  std::vector<T> xs(x.begin(), x.end());
  float row_max, log_sum, log_norm;
  ckd::cpu::softmax_stats_row<float>(xs.data(), cols, 0.25f, &row_max, &log_sum, &log_norm);
  double m = -INFINITY;
  for (auto v : xs) m = std::max(m, double(float(v)) * 0.25);
  double s1 = 0, s2 = 0;
  for (auto v : xs) {
    s1 += std::exp(double(float(v)) * 0.25 - m);
    s2 += std::exp(2 * (double(float(v)) * 0.25 - m));
  }
  expect_near(row_max, m, 0, what);  // x * 0.25 is exact: so is the max
  expect_near(log_sum, std::log(s1), tol, what);
  expect_near(log_norm, 0.5 * std::log(s2), tol, what);
}

// Softmax arguments of ~5e3 (logits ~1e3, inv_temp 2): row_max is the largest float product, the rests are the logs
// of the max-shifted sums to float accuracy (absolute ~1e-7, where one float LSE ~5e3 would be off by up to
// 2.4e-4), and log P = (x * inv_temp - row_max) - log_sum matches float64 to that accuracy for every element.
void test_softmax_stats_large_logits() {
  const int cols = 300;
  std::vector<double> x = randn(cols, 7, 1000.0);
  std::vector<float> xs(x.begin(), x.end());
  float row_max, log_sum, log_norm;
  ckd::cpu::softmax_stats_row<float>(xs.data(), cols, 2.0f, &row_max, &log_sum, &log_norm);
  double m = -INFINITY;
  for (float v : xs) m = std::max(m, 2.0 * v);
  double s1 = 0, s2 = 0;
  for (float v : xs) {
    s1 += std::exp(2.0 * v - m);
    s2 += std::exp(2 * (2.0 * v - m));
  }
  expect_near(row_max, m, 0, "softmax stats row max at large logits");
  expect_near(log_sum, std::log(s1), 1e-6, "softmax stats log sum at large logits");
  expect_near(log_norm, 0.5 * std::log(s2), 1e-6, "softmax stats log norm at large logits");
  double worst = 0;
  for (float v : xs) {
    const double lp = std::log(s1) - (2.0 * v - m);  // -log P in float64
    const double err = std::fabs(-double(ckd::cpu::log_prob(v, 2.0f, row_max, log_sum)) - lp);
    worst = std::max(worst, err / std::max(1.0, lp));
  }
  expect_near(worst, 0, 1e-6, "log P at large logits");

  std::vector<float> minus_inf(cols, -INFINITY);
  ckd::cpu::softmax_stats_row<float>(minus_inf.data(), cols, 2.0f, &row_max, &log_sum, &log_norm);
  if (row_max != -INFINITY) {
    std::printf("FAIL softmax stats of a -inf row: max %g\n", row_max);
    ++failures;
  }
  expect_near(log_sum, 0, 0, "softmax stats of a -inf row: log sum");
  expect_near(log_norm, 0, 0, "softmax stats of a -inf row: log norm");
}

// grad = (dv - <dv, v> v) / |x| with v = x / |x| from d = dv / |x|, and the clamped branch dv / eps (= d).
void test_normalize_backward() {
  const int cols = 50;
  std::vector<double> x = randn(cols, 4), dv = randn(cols, 5);
  std::vector<float> xf(x.begin(), x.end()), grad(cols);
  double norm = 0, dot = 0;
  for (int j = 0; j < cols; ++j) norm += double(xf[j]) * xf[j];
  norm = std::sqrt(norm);
  std::vector<float> df(cols);
  for (int j = 0; j < cols; ++j) df[j] = float(dv[j] / norm);
  ckd::cpu::normalize_backward_row<float, float, float>(df.data(), xf.data(), cols, 0.0f, nullptr, grad.data());
  for (int j = 0; j < cols; ++j) dot += dv[j] * xf[j] / norm;
  for (int j = 0; j < cols; ++j) expect_near(grad[j], (dv[j] - dot * xf[j] / norm) / norm, 1e-5, "normalize backward");

  std::vector<float> tiny(cols, 1e-15f), grad2(cols), d2(cols);
  for (int j = 0; j < cols; ++j) d2[j] = float(dv[j] / 1e-12);
  ckd::cpu::normalize_backward_row<float, float, float>(d2.data(), tiny.data(), cols, 0.0f, nullptr, grad2.data());
  expect_near(grad2[3], dv[3] / 1e-12, 1e-5, "clamped normalize backward");
}

// fast_exp against the double-precision exp over the arguments the kernels use: <= 2 float ulps of relative
// error from -87 to 30, exactly 0 below -87 (and at -inf).
void test_fast_exp() {
  double worst = 0;
  for (int k = 0; k <= 1170000; ++k) {
    const float x = -87.0f + 1e-4f * static_cast<float>(k);
    const double exact = std::exp(static_cast<double>(x));
    worst = std::max(worst, std::fabs(ckd::cpu::fast_exp(x) - exact) / exact);
  }
  if (!(worst <= 2.4e-7)) {
    std::printf("FAIL fast_exp: worst relative error %.3g\n", worst);
    ++failures;
  }
  expect_near(ckd::cpu::fast_exp(-INFINITY), 0.0, 0, "fast_exp(-inf)");
  expect_near(ckd::cpu::fast_exp(-100.0f), 0.0, 0, "fast_exp(-100)");
  expect_near(ckd::cpu::fast_exp(0.0f), 1.0, 0, "fast_exp(0)");
}

}  // namespace

int main() {
  test_fast_exp();
  test_contrastive_epilogue();
  test_symmetric_tiles();
  test_softmax_stats<float>(1e-6, "softmax stats float");
  test_softmax_stats<c10::Half>(1e-6, "softmax stats half");
  test_softmax_stats<c10::BFloat16>(1e-6, "softmax stats bfloat16");
  test_softmax_stats_large_logits();
  test_normalize_backward();
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("all CPU kernel tests passed\n");
  return 0;
}
