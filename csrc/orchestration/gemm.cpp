#include "orchestration/gemm.h"

#include <atomic>

namespace ckd {
namespace {
std::atomic<int64_t> g_gemm_calls{0};
}  // namespace

int64_t gemm_calls() { return g_gemm_calls.load(); }

Gemm::Gemm(at::ScalarType input_dtype, at::ScalarType acc_dtype, DeviceKind kind)
    : operand_dtype_(acc_dtype),
      acc_dtype_(acc_dtype),
      tensor_cores_(false),
      emulated_(kind == DeviceKind::EmulatedCuda) {
  const bool sixteen_bit = input_dtype == at::kHalf || input_dtype == at::kBFloat16;
  if (runs_cuda_kernels(kind) && sixteen_bit && acc_dtype == at::kFloat) {
    operand_dtype_ = input_dtype;
    tensor_cores_ = true;
  }
}

void Gemm::mm(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) const {
  g_gemm_calls.fetch_add(1, std::memory_order_relaxed);
  if (!tensor_cores_) {
    if (accumulate) {
      out.addmm_(a, b);
    } else {
      at::mm_out(out, a, b);
    }
  } else if (emulated_) {
    // 16-bit values are exact in fp32, and so are their products: an fp32 GEMM of the converted operands is the
    // tensor core's arithmetic (fp32 accumulation) in another order of summation.
    const at::Tensor a32 = a.to(at::kFloat), b32 = b.to(at::kFloat);
    if (accumulate) {
      out.addmm_(a32, b32);
    } else {
      at::mm_out(out, a32, b32);
    }
  } else if (accumulate) {
    at::addmm_out(out, out, a, b, at::kFloat);
  } else {
    at::mm_out(out, a, b, at::kFloat);
  }
}

void Gemm::similarity(at::Tensor out, const at::Tensor& a, const at::Tensor& b) const {
  mm(out, a, b.t(), /*accumulate=*/false);
}

void Gemm::product(at::Tensor out, const at::Tensor& coef, const at::Tensor& rows, bool accumulate) const {
  if (!tensor_cores_) {
    mm(out, coef, rows, accumulate);
    return;
  }
  // coef = hi + lo in the rows' dtype. fp16's exponent range is too narrow for coefficients (w / n times softmax
  // weights times inverse norms reach 1e-12), so each row is first scaled by a power of two that brings its largest
  // entry into [1, 2), and the output row scaled back: both exact. bf16 has fp32's range and needs no scaling.
  at::Tensor c = coef;
  at::Tensor row_scale;
  if (operand_dtype_ == at::kHalf) {
    const at::Tensor row_max = coef.abs().amax(1, /*keepdim=*/true);
    row_scale = at::where(row_max > 0, at::exp2(at::floor(at::log2(row_max))), at::ones_like(row_max));
    c = coef / row_scale;
    if (accumulate) out.div_(row_scale);
  }
  const at::Tensor hi = c.to(operand_dtype_);
  const at::Tensor lo = (c - hi.to(at::kFloat)).to(operand_dtype_);
  mm(out, hi, rows, accumulate);
  mm(out, lo, rows, /*accumulate=*/true);
  if (row_scale.defined()) out.mul_(row_scale);
}

}  // namespace ckd
