// How every matrix product of the orchestration is computed: the one place that chooses operand dtypes, tensor
// cores and the split of fp32 coefficients (docs/cuda.md, "GEMM policy").
//
//   CPU backend         fp32 GEMMs (16-bit inputs are converted block by block), fp64 for fp64 inputs.
//   CUDA / emulated     fp16 / bf16 inputs are the operands as they are, products accumulated in fp32 (tensor
//                       cores; the emulator converts them to fp32 exactly and runs an fp32 GEMM, which is the same
//                       arithmetic up to the order of the sums). A product of an fp32 coefficient block with 16-bit
//                       rows is one GEMM of the coefficients rounded to the rows' dtype (fp16: each row scaled by a
//                       power of two first), the rows exact: what eager autograd multiplies (a 16-bit gradient of
//                       16-bit logits), and measured as accurate once the gradient is rounded to 16 bits (docs/cuda.md,
//                       "GEMM policy"). fp32 inputs run fp32 GEMMs, which follow torch.backends.cuda.matmul (TF32 only
//                       where the user allowed it); fp64 stays fp64.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

#include "backends/select.h"

namespace ckd {

// What a call on `input` elements accumulates in: fp64 for fp64 inputs (gradcheck), fp32 for everything else (16-bit
// inputs converted on load); ckd_ext/rows.py's accumulation_dtype is the same rule.
inline at::ScalarType accumulation_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

class Gemm {
 public:
  Gemm(at::ScalarType input_dtype, at::ScalarType acc_dtype, DeviceKind kind);

  // The dtype GEMM operands are passed in: the inputs' own dtype where the backend multiplies 16-bit operands,
  // else the accumulation dtype (inputs of another dtype are converted first).
  at::ScalarType operand_dtype() const { return operand_dtype_; }
  at::ScalarType acc_dtype() const { return acc_dtype_; }
  bool tensor_cores() const { return tensor_cores_; }

  // out (m x n, acc) = a (m x k) @ b (n x k)^T, both operands in operand_dtype().
  void similarity(at::Tensor out, const at::Tensor& a, const at::Tensor& b) const;
  // out (m x k, acc) = [out +] coef (m x n, acc) @ rows (n x k, operand_dtype()).
  void product(at::Tensor out, const at::Tensor& coef, const at::Tensor& rows, bool accumulate) const;

 private:
  void mm(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) const;

  at::ScalarType operand_dtype_, acc_dtype_;
  bool tensor_cores_, emulated_;
};

// Matrix products issued by any Gemm since the process started (tests compare it with the strip plans).
int64_t gemm_calls();

// The policy's products as ops (torch.ops.ckd_ext.gemm_similarity / gemm_product), for the Python orchestration of
// the fused-linear losses. Operands in the inputs' dtype (2-D; any strides): where the backend does not multiply
// them as they are (the CPU backend's 16-bit inputs) they are converted block by block, never a whole operand at
// once, so a 16-bit V x H head is never copied whole.
//   gemm_similarity   a (m x k) @ b (n x k)^T, a new m x n tensor in accumulation_type(a's dtype); a, b one dtype.
//   gemm_product      out (m x k) [+]= coef (m x n) @ rows (n x k): coef and out in the accumulation dtype of the
//                     rows' dtype, the rows in theirs (16-bit rows on tensor cores: coef rounded to their dtype).
//   gemm_exact_int8   a (m x k) @ b (n x k)^T of int8 operands, exactly, a new m x n float64 tensor: int8 GEMMs
//                     with int32 accumulation (tensor cores on CUDA) over blocks of kInt8ExactDepth along k, whose
//                     sums cannot leave int32 (127^2 k < 2^31), added in float64 (exact below 2^53). Elsewhere the
//                     same integers from a float64 GEMM. The fused-linear CKD's exact Gram matrices of 16-bit heads
//                     cut into int8 slices (docs/math.md 8.3) are its one user.
at::Tensor gemm_similarity(const at::Tensor& a, const at::Tensor& b);
void gemm_product(const at::Tensor& out, const at::Tensor& coef, const at::Tensor& rows, bool accumulate);
at::Tensor gemm_exact_int8(const at::Tensor& a, const at::Tensor& b);

// The longest k whose int8 products (|x| <= 127) an int32 accumulator sums exactly: 127^2 k < 2^31.
constexpr int64_t kInt8ExactDepth = ((int64_t{1} << 31) - 1) / (127 * 127);

}  // namespace ckd
