// Torch-free vocabulary shared by the orchestration and every kernel backend: raw pointers, sizes and a dtype
// tag; no ATen types cross this boundary.
#pragma once
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace ckd {

enum class DType : int8_t { Float32, Float64, Float16, BFloat16 };

// A row-major, contiguous matrix of logits in its storage dtype.
struct ConstMatrix {
  const void* data;
  DType dtype;
  int64_t rows;
  int64_t cols;
};

// L2 norms are clamped from below by this, as torch.nn.functional.normalize does.
constexpr double kNormEps = 1e-12;
constexpr double kLogNormEps = -27.631021115928547;  // log(kNormEps), for norms kept as logarithms

// Calls f(T{}) with T the C++ type of `dtype`.
template <typename F>
decltype(auto) visit_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::Float64: return f(double{});
    case DType::Float16: return f(c10::Half{});
    case DType::BFloat16: break;
  }
  return f(c10::BFloat16{});
}

// The DType tag of C++ type T.
template <typename T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DType::Float32;
  else if constexpr (std::is_same_v<T, double>) return DType::Float64;
  else if constexpr (std::is_same_v<T, c10::Half>) return DType::Float16;
  else return DType::BFloat16;
}

// Calls f(G{}) with G the C++ type of a gradient stored in `dtype`: the input's own type T, or the accumulation type
// Acc (a 16-bit input's gradient computed in a forward is kept in Acc until the upstream gradient scales it).
template <typename Acc, typename T, typename F>
void visit_gradient_dtype(DType dtype, F&& f) {
  if (dtype == dtype_of<T>()) return f(T{});
  if (dtype == dtype_of<Acc>()) return f(Acc{});
  throw std::logic_error("ckd_ext: a gradient dtype that is neither the input's nor the accumulation dtype");
}

// Calls f(O{}) with O the C++ type of a GEMM operand block stored in `dtype`: Acc, or a 16-bit type where the GEMMs
// run on tensor cores (float accumulation only; BicKD's blocks are built in the student's 16-bit dtype, the teacher's
// too whatever its own dtype).
template <typename Acc, typename F>
void visit_operand_dtype(DType dtype, F&& f) {
  if (dtype == dtype_of<Acc>()) return f(Acc{});
  if constexpr (std::is_same_v<Acc, float>) {
    if (dtype == DType::Float16) return f(c10::Half{});
    if (dtype == DType::BFloat16) return f(c10::BFloat16{});
  }
  throw std::logic_error("ckd_ext: an operand dtype that is neither the accumulation dtype nor a 16-bit one");
}

// Calls f(T{}) with T the C++ type of a student's `dtype` among those accumulation type Acc serves: a float64 student
// accumulates in double and every other in float (orchestration/op_call.h), so a row kernel over (student, teacher)
// pairs is instantiated for 4 + 12 pairs rather than 2 x 16, in every backend and instruction-set variant.
template <typename Acc, typename F>
void visit_student_dtype(DType dtype, F&& f) {
  if constexpr (std::is_same_v<Acc, double>) {
    if (dtype == DType::Float64) return f(double{});
  } else {
    switch (dtype) {
      case DType::Float32: return f(float{});
      case DType::Float16: return f(c10::Half{});
      case DType::BFloat16: return f(c10::BFloat16{});
      case DType::Float64: break;
    }
  }
  throw std::logic_error("ckd_ext: a student dtype the accumulation type does not serve (op_call.h picks it)");
}

// The divergence KD minimises between the teacher's distribution q and the student's p (docs/math.md 3.1), with
// its parameter: `weight` is jsd's beta (the teacher's share of the mixture) or skew_kl's alpha, unused otherwise.
// `loss_scale` multiplies every row's divergence (T^2, or 1 when the T^2 factor is off), and so its gradient.
enum class DivergenceKind : int8_t { ForwardKL, ReverseKL, JSD, SkewKL, TVD };

template <typename Acc>
struct DivergenceParams {
  DivergenceKind kind;
  Acc weight;
  Acc loss_scale;
};

// Parameters of the contrastive epilogue, which turns one strip of raw similarities (rows = anchors
// row0 .. row0+rows-1, columns = every candidate, row-major with leading dimension cols) into per-anchor losses
// and, in place, gradient coefficients. The positive of anchor i sits in column i. The same parameters describe a
// block of candidates col0 .. col0+cols-1 for contrastive_coefficients, whose anchors' log-sum-exps are known.
//   z_ij  = strip_ij * scale * row_scale[i] * col_scale[j]     (-inf where !valid[j])
//   loss_i = LSE_j z_ij - z_ii                   (0 where !valid[i]), as softplus(LSE_{j != i} z_ij - z_ii)
//   coef_ij = weight[i] * (softmax_j(z_i.)_j - delta_ij) * scale * row_scale[i] * col_scale[j], the positive's
//             1 - pi_ii as a sigmoid: dL/d(strip_ij), the coefficient of the raw rows the GEMM multiplied
// The scales are the rows' inverse norms when the GEMM ran on raw (unnormalised, possibly 16-bit) rows; null when
// the operands were already normalised. Anchors and candidates are the same rows of one batch, so one mask serves
// both. Null arrays mean "all ones" / "all valid".
template <typename Acc>
struct EpilogueParams {
  Acc* strip;
  int64_t row0;     // global index of the strip's first anchor
  int64_t rows;
  int64_t cols;     // number of candidates
  int64_t col0;     // global index of the first candidate: 0 for a whole strip (contrastive_epilogue)
  Acc scale;        // 1 / tau
  const Acc* row_scale;  // indexed by global anchor index
  const Acc* col_scale;
  const bool* valid;
  Acc* loss;        // indexed by global anchor index
  const Acc* weight;  // upstream weight per anchor; nullptr means "loss only"
};

// One tile of CKD's student-anchor similarities, whose matrix is symmetric: rows i in [row0, row0 + rows),
// columns j in [col0, col0 + cols), col0 >= row0, holding raw products <s_i, s_j> (inv_norm given) or cosines
// <v_i, v_j> (inv_norm null). z_ij = tile_ij * inv_norm[i] * inv_norm[j] * scale for i != j, the negatives; the
// positive pair <u_i, v_i> / tau, which takes the diagonal's place, is combined with their log-sum-exp by the
// orchestration (softplus_acc). Rows and columns with !valid take no part. An off-diagonal tile (row0 != col0)
// stands for its transpose too.
template <typename Acc>
struct SymmetricTile {
  Acc* tile;
  int64_t ld;
  int64_t row0, rows, col0, cols;
  Acc scale;
  const Acc* inv_norm;  // indexed by global row index
  const bool* valid;
};

}  // namespace ckd
