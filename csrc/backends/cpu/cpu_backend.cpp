// KernelBackend for CPU tensors: the torch-free row kernels of cpu_kernels.h, run in parallel
// over rows (or column blocks) with at::parallel_for. Compiled once per instruction set (CKD_CPU_ISA, see
// cpu_isa.h); cpu_isa.cpp picks which compilation's backend serves calls.
#include "backends/backends.h"

#include <ATen/Parallel.h>

#include "backends/cpu/cpu_kernels.h"

namespace ckd::cpu {
inline namespace CKD_CPU_ISA {
namespace {

// Enough elements per task that scheduling costs nothing next to the work.
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

template <typename F>
void parallel_rows(int64_t rows, int64_t cols, F&& body) {
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) body(i);
  });
}

// Column reductions walk every row for a block of columns; blocks of 256 columns keep the running
// statistics in L1 while rows stream through.
template <typename F>
void parallel_column_blocks(int64_t cols, F&& body) {
  constexpr int64_t kBlock = 256;
  static_assert(kBlock <= cpu::kRowChunk, "symmetric_tile_lse_columns holds a block in kRowChunk buffers");
  const int64_t blocks = (cols + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) body(b * kBlock, std::min(cols, (b + 1) * kBlock));
  });
}

template <typename T>
const T* rows_of(ConstMatrix x, int64_t i) { return static_cast<const T*>(x.data) + i * x.cols; }

template <typename Acc>
class CpuBackend final : public KernelBackend<Acc> {
 public:
  void row_inv_norms(ConstMatrix x, Acc* inv_norm) override {
    visit_dtype(x.dtype, [&](auto tag) {
      using T = decltype(tag);
      parallel_rows(x.rows, x.cols, [&](int64_t i) { cpu::row_inv_norm<Acc>(rows_of<T>(x, i), x.cols, inv_norm + i); });
    });
  }

  void row_dots(ConstMatrix a, ConstMatrix b, Acc* out) override {
    visit_dtype(a.dtype, [&](auto ta) {
      visit_dtype(b.dtype, [&](auto tb) {
        using TA = decltype(ta);
        using TB = decltype(tb);
        parallel_rows(a.rows, a.cols,
                      [&](int64_t i) { out[i] = cpu::row_dot<Acc>(rows_of<TA>(a, i), rows_of<TB>(b, i), a.cols); });
      });
    });
  }

  void softmax_stats(ConstMatrix x, Acc inv_temp, Acc* row_max, Acc* row_log_sum, Acc* row_log_norm) override {
    visit_dtype(x.dtype, [&](auto tag) {
      using T = decltype(tag);
      parallel_rows(x.rows, x.cols, [&](int64_t i) {
        cpu::softmax_stats_row<Acc>(rows_of<T>(x, i), x.cols, inv_temp, row_max + i, row_log_sum + i,
                                    row_log_norm ? row_log_norm + i : nullptr);
      });
    });
  }

  void kd_rows(ConstMatrix s, ConstMatrix t, Acc temperature, DivergenceParams<Acc> divergence, const bool* valid,
               Acc* loss, const Acc* weight, void* grad) override {
    visit_student_dtype<Acc>(s.dtype, [&](auto ts) {
      visit_dtype(t.dtype, [&](auto tt) {
        using TS = decltype(ts);
        using TT = decltype(tt);
        parallel_rows(s.rows, s.cols, [&](int64_t i) {
          TS* g = grad ? static_cast<TS*>(grad) + i * s.cols : nullptr;
          if (valid && !valid[i]) {
            loss[i] = 0;
            if (g) std::fill(g, g + s.cols, TS(0));
            return;
          }
          cpu::kd_row<Acc>(rows_of<TS>(s, i), rows_of<TT>(t, i), s.cols, temperature, divergence, loss + i,
                           weight ? weight[i] : Acc(0), g);
        });
      });
    });
  }

  void load_rows(ConstMatrix x, int64_t row0, int64_t rows, const Acc* row_scale, const bool* valid,
                 Acc* out) override {
    visit_dtype(x.dtype, [&](auto tag) {
      using T = decltype(tag);
      parallel_rows(rows, x.cols, [&](int64_t r) {
        const T* xi = rows_of<T>(x, row0 + r);
        Acc* o = out + r * x.cols;
        if (valid && !valid[row0 + r]) {
          std::fill(o, o + x.cols, Acc(0));
          return;
        }
        const Acc f = row_scale ? row_scale[row0 + r] : Acc(1);
        for (int64_t j = 0; j < x.cols; ++j) o[j] = static_cast<Acc>(xi[j]) * f;
      });
    });
  }

  void exp_block(ConstMatrix x, int64_t row0, int64_t rows, int64_t col0, int64_t cols, Acc inv_temp,
                 const Acc* row_max, const Acc* row_rest, const Acc* col_shift, const bool* valid,
                 void* out, DType out_dtype) override {
    visit_dtype(x.dtype, [&](auto tag) {
      using T = decltype(tag);
      visit_operand_dtype<Acc>(out_dtype, [&](auto out_tag) {
        using TO = decltype(out_tag);
        parallel_rows(rows, cols, [&](int64_t r) {
          const int64_t i = row0 + r;
          TO* o = static_cast<TO*>(out) + r * cols;
          if (valid && !valid[i]) {
            std::fill(o, o + cols, TO(0));
            return;
          }
          const T* xi = rows_of<T>(x, i) + col0;
          const Acc m = row_max[i], rest = row_rest[i];
          if (col_shift) {
            for (int64_t c = 0; c < cols; ++c) {
              o[c] = static_cast<TO>(
                  cpu::fast_exp(cpu::log_prob(xi[c], inv_temp, m, rest) - clamped_log_norm(col_shift[col0 + c])));
            }
          } else {
            for (int64_t c = 0; c < cols; ++c) {
              o[c] = static_cast<TO>(cpu::fast_exp(cpu::log_prob(xi[c], inv_temp, m, rest)));
            }
          }
        });
      });
    });
  }

  void contrastive_epilogue(const EpilogueParams<Acc>& p) override {
    parallel_rows(p.rows, p.cols, [&](int64_t r) { cpu::contrastive_epilogue_row(p, r); });
  }

  void contrastive_coefficients(const EpilogueParams<Acc>& p, const Acc* lse) override {
    parallel_rows(p.rows, p.cols, [&](int64_t r) { cpu::contrastive_coefficients_row(p, lse, r); });
  }

  void symmetric_tile_lse(const SymmetricTile<Acc>& t, Acc* row_max, Acc* row_sum) override {
    parallel_rows(t.rows, t.cols, [&](int64_t r) { cpu::symmetric_tile_lse_row(t, r, row_max, row_sum); });
    // The transposed half updates other rows (col0 > row0 + rows - 1), so it runs after, not alongside.
    if (t.row0 != t.col0) {
      parallel_column_blocks(t.cols, [&](int64_t c0, int64_t c1) {
        cpu::symmetric_tile_lse_columns(t, c0, c1, row_max, row_sum);
      });
    }
  }

  void symmetric_tile_coefficients(const SymmetricTile<Acc>& t, const Acc* lse, const Acc* weight) override {
    parallel_rows(t.rows, t.cols, [&](int64_t r) {
      cpu::symmetric_tile_coefficients_row(t, r, lse, weight);
    });
  }

  void normalize_backward(Acc* d, ConstMatrix x, const Acc* extra_coef, ConstMatrix extra_x, const bool* valid,
                          void* grad, DType grad_dtype) override {
    visit_dtype(x.dtype, [&](auto tx) {
      using T = decltype(tx);
      visit_gradient_dtype<Acc, T>(grad_dtype, [&](auto tg) {
        visit_dtype(extra_x.dtype, [&](auto te) {
          using TE = decltype(te);
          using TG = decltype(tg);
          parallel_rows(x.rows, x.cols, [&](int64_t i) {
            TG* g = static_cast<TG*>(grad) + i * x.cols;
            if (valid && !valid[i]) {
              std::fill(g, g + x.cols, TG(0));
              return;
            }
            const bool extra = extra_coef != nullptr;
            cpu::normalize_backward_row<Acc>(d + i * x.cols, rows_of<T>(x, i), x.cols, extra ? extra_coef[i] : Acc(0),
                                             extra ? rows_of<TE>(extra_x, i) : nullptr, g);
          });
        });
      });
    });
  }

  void column_log_norms(ConstMatrix x, const Acc* row_max, const Acc* row_log_sum, Acc inv_temp, const bool* valid,
                        Acc* log_norm) override {
    visit_dtype(x.dtype, [&](auto tag) {
      using T = decltype(tag);
      parallel_column_blocks(x.cols, [&](int64_t c0, int64_t c1) {
        cpu::column_log_norms_block<Acc>(static_cast<const T*>(x.data), x.rows, x.cols, c0, c1, row_max, row_log_sum,
                                         inv_temp, valid, log_norm);
      });
    });
  }

  void column_dots(const Acc* a, ConstMatrix x, const Acc* row_max, const Acc* row_log_sum, const Acc* log_norm,
                   Acc inv_temp, const bool* valid, Acc* out) override {
    visit_dtype(x.dtype, [&](auto tag) {
      using T = decltype(tag);
      parallel_column_blocks(x.cols, [&](int64_t c0, int64_t c1) {
        cpu::column_dots_block<Acc>(a, static_cast<const T*>(x.data), x.rows, x.cols, c0, c1, row_max, row_log_sum,
                                    log_norm, inv_temp, valid, out);
      });
    });
  }

  void bickd_backward_rows(Acc* dp, const Acc* dpbar, ConstMatrix x, const Acc* row_max, const Acc* row_log_sum,
                           const Acc* col_log_norm, const Acc* col_projection, Acc inv_temp, const bool* valid,
                           void* grad, DType grad_dtype) override {
    visit_dtype(x.dtype, [&](auto tag) {
      using T = decltype(tag);
      visit_gradient_dtype<Acc, T>(grad_dtype, [&](auto tg) {
        using TG = decltype(tg);
        at::parallel_for(0, x.rows, row_grain(x.cols), [&](int64_t begin, int64_t end) {
          std::vector<Acc> scratch(2 * x.cols);
          for (int64_t i = begin; i < end; ++i) {
            TG* g = static_cast<TG*>(grad) + i * x.cols;
            if (valid && !valid[i]) {
              std::fill(g, g + x.cols, TG(0));
              continue;
            }
            cpu::bickd_backward_row<Acc>(dp ? dp + i * x.cols : nullptr, dpbar ? dpbar + i * x.cols : nullptr,
                                         rows_of<T>(x, i), x.cols, row_max[i], row_log_sum[i], col_log_norm,
                                         col_projection, inv_temp, scratch.data(), g);
          }
        });
      });
    });
  }
};

}  // namespace

template <typename Acc>
KernelBackend<Acc>& backend() {
  static CpuBackend<Acc> instance;
  return instance;
}

template KernelBackend<float>& backend<float>();
template KernelBackend<double>& backend<double>();

}  // namespace CKD_CPU_ISA
}  // namespace ckd::cpu
