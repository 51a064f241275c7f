// Runs the sample row-statistics kernel under the emulator for float, c10::Half and c10::BFloat16 and
// compares it with a plain double-precision loop over the same (rounded) inputs.
#include <cmath>
#include <cstdint>
#include <vector>

#include "check.h"
#include "sample_kernels.h"

namespace {

template <typename T>
void check_row_stats(int rows, int cols, const char* type_name) {
  std::vector<T> x(static_cast<size_t>(rows) * cols);
  uint32_t state = 12345u + rows * 7u + cols;
  for (auto& v : x) {  // deterministic values in [-4, 4)
    state = state * 1664525u + 1013904223u;
    v = static_cast<T>(static_cast<float>(state >> 8) / static_cast<float>(1u << 24) * 8.0f - 4.0f);
  }
  std::vector<float> row_max(rows, -1.0f), row_lse(rows, -1.0f), row_sum(rows, -1.0f);
  ckd_sample::launch_row_stats(x.data(), rows, cols, row_max.data(), row_lse.data(), row_sum.data(), nullptr);

  for (int r = 0; r < rows; ++r) {
    double m = -INFINITY, s = 0.0, e = 0.0;
    for (int c = 0; c < cols; ++c) {
      const double v = static_cast<float>(x[static_cast<size_t>(r) * cols + c]);
      m = std::fmax(m, v);
      s += v;
    }
    for (int c = 0; c < cols; ++c) e += std::exp(static_cast<float>(x[static_cast<size_t>(r) * cols + c]) - m);
    const double lse = m + std::log(e);
    // Float accumulation in a different order than the loop: a few ulps per term.
    const double tol = 1e-5 * (1.0 + cols);
    CKD_CHECK(row_max[r] == static_cast<float>(m), "%s %dx%d row %d: max %g vs %g", type_name, rows, cols, r,
              row_max[r], m);
    CKD_CHECK(std::fabs(row_sum[r] - s) <= tol, "%s %dx%d row %d: sum %.8g vs %.8g", type_name, rows, cols, r,
              row_sum[r], s);
    CKD_CHECK(std::fabs(row_lse[r] - lse) <= 1e-5 * (1.0 + std::fabs(lse)), "%s %dx%d row %d: lse %.8g vs %.8g",
              type_name, rows, cols, r, row_lse[r], lse);
  }
}

template <typename T>
void check_type(const char* type_name) {
  // One warp (cols <= 32) and four warps, rows shorter and longer than the block, a partial last stride.
  const int shapes[][2] = {{2, 1}, {1, 32}, {3, 33}, {5, 300}};
  for (const auto& s : shapes) check_row_stats<T>(s[0], s[1], type_name);
}

}  // namespace

int main() {
  check_type<float>("float");
  check_type<c10::Half>("c10::Half");
  check_type<c10::BFloat16>("c10::BFloat16");
  return ckd_check::finish("test_sample_kernels");
}
