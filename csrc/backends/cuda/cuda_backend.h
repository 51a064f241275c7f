// KernelBackend over the CUDA kernels of cuda_kernels.h. Torch-free: compiled by nvcc for CUDA tensors
// (cuda_backend.cu, in ckd_ext._C) and by the host compiler against the CPU emulator
// (../emulated/emulated_backend.cpp, in ckd_ext._emulated), from this one source.
#pragma once
#include <algorithm>
#include <stdexcept>
#include <string>

#include <vector>

#if defined(__CUDACC__)
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#endif

#include "kernel_interface/backend.h"
#include "backends/cuda/cuda_kernels.h"

namespace ckd {

// After every launch: c10's check (as csrc/cuda_emulator/README.md asks), which reports the error with torch's device-side
// assertion context and the CUDA_LAUNCH_BLOCKING hint. The emulator runs launches synchronously and reports failures
// itself.
inline void check_launch() {
#if defined(__CUDACC__)
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

template <typename Acc>
class CudaBackend final : public KernelBackend<Acc> {
 public:
  void set_stream(cudaStream_t stream) { stream_ = stream; }

  void row_inv_norms(ConstMatrix x, Acc* inv_norm) override {
    if (x.rows == 0) return;
    visit_dtype(x.dtype, [&](auto tag) {
      using T = decltype(tag);
      launch_kernel(cuda::row_inv_norms_kernel<Acc, T>, rows_grid(x.rows), dim3(cuda::kRowThreads), 0, stream_,
                    static_cast<const T*>(x.data), x.cols, inv_norm);
    });
    check_launch();
  }

  void row_dots(ConstMatrix a, ConstMatrix b, Acc* out) override {
    if (a.rows == 0) return;
    visit_dtype(a.dtype, [&](auto ta) {
      visit_dtype(b.dtype, [&](auto tb) {
        using TA = decltype(ta);
        using TB = decltype(tb);
        launch_kernel(cuda::row_dots_kernel<Acc, TA, TB>, rows_grid(a.rows), dim3(cuda::kRowThreads), 0, stream_,
                      static_cast<const TA*>(a.data), static_cast<const TB*>(b.data), a.cols, out);
      });
    });
    check_launch();
  }

  void softmax_stats(ConstMatrix x, Acc inv_temp, Acc* row_max, Acc* row_log_sum, Acc* row_log_norm) override {
    if (x.rows == 0) return;
    visit_dtype(x.dtype, [&](auto tag) {
      using T = decltype(tag);
      launch_kernel(cuda::softmax_stats_kernel<Acc, T>, rows_grid(x.rows), dim3(cuda::kRowThreads), 0, stream_,
                    static_cast<const T*>(x.data), x.cols, inv_temp, row_max, row_log_sum, row_log_norm);
    });
    check_launch();
  }

  void kd_rows(ConstMatrix s, ConstMatrix t, Acc temperature, DivergenceParams<Acc> divergence, const bool* valid,
               Acc* loss, const Acc* weight, void* grad) override {
    if (s.rows == 0) return;
    visit_student_dtype<Acc>(s.dtype, [&](auto ts) {
      visit_dtype(t.dtype, [&](auto tt) {
        using TS = decltype(ts);
        using TT = decltype(tt);
        launch_kernel(cuda::kd_rows_kernel<Acc, TS, TT>, rows_grid(s.rows), dim3(cuda::kRowThreads), 0, stream_,
                      static_cast<const TS*>(s.data), static_cast<const TT*>(t.data), s.cols, temperature, divergence, valid,
                      loss, weight, static_cast<TS*>(grad));
      });
    });
    check_launch();
  }

  void load_rows(ConstMatrix x, int64_t row0, int64_t rows, const Acc* row_scale, const bool* valid,
                 Acc* out) override {
    if (rows * x.cols == 0) return;
    visit_dtype(x.dtype, [&](auto tag) {
      using T = decltype(tag);
      launch_kernel(cuda::load_rows_kernel<Acc, T>, element_grid(rows, x.cols), element_block(x.cols), 0, stream_, static_cast<const T*>(x.data), x.cols, row0, rows, row_scale, valid, out);
    });
    check_launch();
  }

  void exp_block(ConstMatrix x, int64_t row0, int64_t rows, int64_t col0, int64_t cols, Acc inv_temp,
                 const Acc* row_max, const Acc* row_rest, const Acc* col_shift, const bool* valid,
                 void* out, DType out_dtype) override {
    if (rows * cols == 0) return;
    visit_dtype(x.dtype, [&](auto tag) {
      using T = decltype(tag);
      visit_operand_dtype<Acc>(out_dtype, [&](auto out_tag) {
        using TO = decltype(out_tag);
        launch_kernel(cuda::exp_block_kernel<Acc, T, TO>, element_grid(rows, cols), element_block(cols), 0, stream_,
                      static_cast<const T*>(x.data), x.cols, row0, rows, col0, cols, inv_temp, row_max,
                      row_rest, col_shift, valid, static_cast<TO*>(out));
      });
    });
    check_launch();
  }

  // Two launches (cuda_kernels.h, contrastive_epilogue_stats_kernel); plan.cpp counts them.
  void contrastive_epilogue(const EpilogueParams<Acc>& p) override {
    if (p.rows == 0) return;
    const cuda::EpilogueSplit split = epilogue_split(p.rows, p.cols);
    Scratch partials(split.floats() * static_cast<int64_t>(sizeof(Acc)), stream_, host_scratch_);
    Acc* partial_values = static_cast<Acc*>(partials.data());
    launch_kernel(cuda::contrastive_epilogue_stats_kernel<Acc>, dim3(static_cast<unsigned>(p.rows),
                  static_cast<unsigned>(split.chunks)), dim3(cuda::kRowThreads), 0, stream_, p, split, partial_values);
    check_launch();
    const unsigned finishing_chunks = p.weight ? static_cast<unsigned>(split.chunks) : 1u;  // loss only: one per row
    launch_kernel(cuda::contrastive_epilogue_finish_kernel<Acc>, dim3(static_cast<unsigned>(p.rows), finishing_chunks),
                  dim3(cuda::kRowThreads), 0, stream_, p, split, static_cast<const Acc*>(partial_values));
    check_launch();
  }

  void contrastive_coefficients(const EpilogueParams<Acc>& p, const Acc* lse) override {
    if (p.rows * p.cols == 0) return;
    launch_kernel(cuda::contrastive_coefficients_kernel<Acc>, element_grid(p.rows, p.cols), element_block(p.cols), 0,
                  stream_, p, lse);
    check_launch();
  }

  void symmetric_tile_lse(const SymmetricTile<Acc>& t, Acc* row_max, Acc* row_sum) override {
    if (t.rows * t.cols == 0) return;
    const bool diagonal = t.row0 == t.col0;
    // The kernel's column blocks merge into rows col0.., its row blocks into rows row0..: they must not overlap.
    if (!diagonal && t.col0 < t.row0 + t.rows) {
      throw std::invalid_argument("symmetric_tile_lse: an off-diagonal tile (row0 " + std::to_string(t.row0) +
                                  ", rows " + std::to_string(t.rows) + ", col0 " + std::to_string(t.col0) +
                                  ") must lie wholly above the diagonal");
    }
    const int64_t blocks = t.rows + (diagonal ? 0 : (t.cols + 31) / 32);
    launch_kernel(cuda::symmetric_tile_lse_kernel<Acc>, dim3(static_cast<unsigned>(blocks)), dim3(cuda::kColumnThreads),
                  0, stream_, t, row_max, row_sum);
    check_launch();
  }

  void symmetric_tile_coefficients(const SymmetricTile<Acc>& t, const Acc* lse, const Acc* weight) override {
    if (t.rows * t.cols == 0) return;
    launch_kernel(cuda::symmetric_tile_coefficients_kernel<Acc>, element_grid(t.rows, t.cols), element_block(t.cols),
                  0, stream_, t, lse, weight);
    check_launch();
  }

  void normalize_backward(Acc* d, ConstMatrix x, const Acc* extra_coef, ConstMatrix extra_x, const bool* valid,
                          void* grad, DType grad_dtype) override {
    if (x.rows == 0) return;
    visit_dtype(x.dtype, [&](auto tx) {
      using T = decltype(tx);
      visit_gradient_dtype<Acc, T>(grad_dtype, [&](auto tg) {
        using TG = decltype(tg);
        visit_dtype(extra_x.dtype, [&](auto te) {
          using TE = decltype(te);
          launch_kernel(cuda::normalize_backward_kernel<Acc, T, TE, TG>, rows_grid(x.rows), dim3(cuda::kRowThreads),
                        0, stream_, d, static_cast<const T*>(x.data), x.cols, extra_coef,
                        static_cast<const TE*>(extra_x.data), valid, static_cast<TG*>(grad));
        });
      });
    });
    check_launch();
  }

  void column_log_norms(ConstMatrix x, const Acc* row_max, const Acc* row_log_sum, Acc inv_temp, const bool* valid,
                        Acc* log_norm) override {
    if (x.cols == 0) return;
    visit_dtype(x.dtype, [&](auto tag) {
      using T = decltype(tag);
      launch_kernel(cuda::column_log_norms_kernel<Acc, T>, columns_grid(x.cols), dim3(cuda::kColumnThreads), 0,
                    stream_, static_cast<const T*>(x.data), x.rows, x.cols, row_max, row_log_sum, inv_temp, valid,
                    log_norm);
    });
    check_launch();
  }

  void column_dots(const Acc* a, ConstMatrix x, const Acc* row_max, const Acc* row_log_sum, const Acc* log_norm,
                   Acc inv_temp, const bool* valid, Acc* out) override {
    if (x.cols == 0) return;
    visit_dtype(x.dtype, [&](auto tag) {
      using T = decltype(tag);
      launch_kernel(cuda::column_dots_kernel<Acc, T>, columns_grid(x.cols), dim3(cuda::kColumnThreads), 0, stream_, a,
                    static_cast<const T*>(x.data), x.rows, x.cols, row_max, row_log_sum, log_norm, inv_temp, valid,
                    out);
    });
    check_launch();
  }

  void bickd_backward_rows(Acc* dp, const Acc* dpbar, ConstMatrix x, const Acc* row_max, const Acc* row_log_sum,
                           const Acc* col_log_norm, const Acc* col_projection, Acc inv_temp, const bool* valid,
                           void* grad, DType grad_dtype) override {
    if (x.rows == 0) return;
    visit_dtype(x.dtype, [&](auto tag) {
      using T = decltype(tag);
      visit_gradient_dtype<Acc, T>(grad_dtype, [&](auto tg) {
        using TG = decltype(tg);
        launch_kernel(cuda::bickd_backward_rows_kernel<Acc, T, TG>, rows_grid(x.rows), dim3(cuda::kRowThreads), 0,
                      stream_, static_cast<const Acc*>(dp), dpbar, static_cast<const T*>(x.data), x.cols, row_max,
                      row_log_sum, col_log_norm, col_projection, inv_temp, valid, static_cast<TG*>(grad));
      });
    });
    check_launch();
  }

 private:
  static dim3 rows_grid(int64_t rows) { return dim3(static_cast<unsigned>(rows)); }
  static dim3 columns_grid(int64_t cols) {
    return dim3(static_cast<unsigned>((cols + cuda::kColumnThreads - 1) / cuda::kColumnThreads));
  }
  // Element kernels (cuda::for_elements): blocks of kElementThreads threads, as many columns wide as a row needs up
  // to all of them (32, 64, 128 or 256), the rest of the block on further rows, so that narrow rows keep the
  // block's threads busy. Up to 65535 block rows (CUDA's limit for grid.y); the kernels stride past them.
  static dim3 element_block(int64_t cols) {
    unsigned width = 32;
    while (width < static_cast<unsigned>(cuda::kElementThreads) && width < cols) width *= 2;
    return dim3(width, static_cast<unsigned>(cuda::kElementThreads) / width);
  }
  static dim3 element_grid(int64_t rows, int64_t cols) {
    const dim3 block = element_block(cols);
    const int64_t col_blocks = (cols + block.x - 1) / block.x;
    const int64_t row_blocks = (rows + block.y - 1) / block.y;
    return dim3(static_cast<unsigned>(std::min<int64_t>(col_blocks, cuda::kMaxElementBlocks)),
                static_cast<unsigned>(std::min<int64_t>(row_blocks, 65535)));
  }

  // Chunks per strip row for the epilogue: enough blocks (rows x chunks) to fill the largest GPUs (kEpilogueBlocks)
  // when a strip has few rows, and at least kEpilogueChunkCols columns per chunk (8 elements per thread) so that a
  // block's fixed costs (the merge, its barriers) stay small; chunks are whole packs of 4 for vector loads.
  static cuda::EpilogueSplit epilogue_split(int64_t rows, int64_t cols) {
    const int64_t by_blocks = (cuda::kEpilogueBlocks + rows - 1) / rows;
    const int64_t by_width = std::max<int64_t>(1, cols / cuda::kEpilogueChunkCols);
    const int64_t wanted = std::min(by_blocks, by_width);
    const int64_t chunk_cols = ((cols + wanted - 1) / wanted + 3) / 4 * 4;
    return cuda::EpilogueSplit{rows, (cols + chunk_cols - 1) / chunk_cols, chunk_cols};
  }

  // A work buffer for the duration of one backend call. On the GPU it comes from torch's caching allocator on the
  // call's stream (freed into that stream's pool: later work on the stream reuses it only after these kernels); the
  // emulator runs launches synchronously and reuses one host buffer.
  class Scratch {
   public:
#if defined(__CUDACC__)
    Scratch(int64_t bytes, cudaStream_t stream, std::vector<unsigned char>&)
        : data_(c10::cuda::CUDACachingAllocator::raw_alloc_with_stream(static_cast<size_t>(bytes), stream)) {}
    ~Scratch() { c10::cuda::CUDACachingAllocator::raw_delete(data_); }
#else
    Scratch(int64_t bytes, cudaStream_t, std::vector<unsigned char>& host) {
      if (host.size() < static_cast<size_t>(bytes)) host.resize(static_cast<size_t>(bytes));
      data_ = host.data();
    }
#endif
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    void* data() const { return data_; }

   private:
    void* data_ = nullptr;
  };

  cudaStream_t stream_ = nullptr;
  std::vector<unsigned char> host_scratch_;  // the emulator's Scratch
};

// The backend for the calling thread, bound to `stream` (a cudaStream_t; ignored by the emulator).
template <typename Acc>
KernelBackend<Acc>& cuda_backend_on(void* stream) {
  thread_local CudaBackend<Acc> backend;
  backend.set_stream(static_cast<cudaStream_t>(stream));
  return backend;
}

}  // namespace ckd
