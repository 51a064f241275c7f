#include "orchestration/gemm.h"

#include <algorithm>
#include <atomic>

#include "backends/select.h"

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
  // coef rounded to the rows' dtype. fp16's exponent range is too narrow for coefficients (w / n times softmax
  // weights times inverse norms reach 1e-12), so each row is first scaled by a power of two that brings its largest
  // entry into [1, 2), and the output row scaled back: both exact. bf16 has fp32's range and needs no scaling. A
  // row of `rows` that is exactly 0 adds nothing whatever its coefficient, but CKD gives a zero row the coefficient
  // of its clamped inverse norm (1 / eps = 1e12), which would set every coefficient row's scale and flush the other
  // coefficients below fp16's range: such columns are left out (0; a NaN row still gives NaN through the GEMM).
  at::Tensor c = coef;
  at::Tensor row_scale;
  if (operand_dtype_ == at::kHalf) {
    c = at::where(rows.abs().amax(1).gt(0).unsqueeze(0), coef, at::zeros({}, coef.options()));
    const at::Tensor row_max = c.abs().amax(1, /*keepdim=*/true);
    row_scale = at::where(row_max > 0, at::exp2(at::floor(at::log2(row_max))), at::ones_like(row_max));
    c = c / row_scale;
    if (accumulate) out.div_(row_scale);
  }
  mm(out, c.to(operand_dtype_), rows, accumulate);
  if (row_scale.defined()) out.mul_(row_scale);
}

namespace {

// Rows of one converted block of an operand whose rows hold `width` elements: about 4 MiB of fp32.
int64_t block_rows(int64_t width) { return std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(width, 1)); }

void check_matrix(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be 2-D, got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": ", name, " must be floating, got ", x.scalar_type());
}

}  // namespace

at::Tensor gemm_similarity(const at::Tensor& a, const at::Tensor& b) {
  check_matrix(a, "gemm_similarity", "a");
  check_matrix(b, "gemm_similarity", "b");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "gemm_similarity: a and b must share a dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.size(1) == b.size(1), "gemm_similarity: a is ", a.sizes(), ", b ", b.sizes(), " (k must agree)");
  TORCH_CHECK(a.device() == b.device(), "gemm_similarity: a and b must be on one device");
  const at::ScalarType acc = accumulation_type(a.scalar_type());
  const Gemm gemm(a.scalar_type(), acc, device_kind(a));
  at::Tensor out = at::empty({a.size(0), b.size(0)}, a.options().dtype(acc));
  if (a.scalar_type() == gemm.operand_dtype()) {
    gemm.similarity(out, a, b);
    return out;
  }
  // Converted operands: block by block along the longer of b's rows and the shared dimension (the vocabulary of a
  // head, which is b's rows for logits and the shared dimension for a Gram matrix).
  const int64_t m = a.size(0), n = b.size(0), k = a.size(1);
  if (n >= k) {
    const at::Tensor a_op = a.to(gemm.operand_dtype());
    const int64_t step = block_rows(k);
    for (int64_t start = 0; start < n; start += step) {
      const int64_t stop = std::min(start + step, n);
      gemm.similarity(out.narrow(1, start, stop - start), a_op, b.slice(0, start, stop).to(gemm.operand_dtype()));
    }
  } else {
    const int64_t step = block_rows(m + n);
    for (int64_t start = 0; start < k; start += step) {
      const int64_t stop = std::min(start + step, k);
      const at::Tensor a_block = a.slice(1, start, stop).to(gemm.operand_dtype());
      const at::Tensor b_block = b.slice(1, start, stop).to(gemm.operand_dtype());
      if (start == 0) {
        gemm.similarity(out, a_block, b_block);
      } else {
        gemm.product(out, a_block, b_block.t(), /*accumulate=*/true);
      }
    }
  }
  return out;
}

void gemm_product(const at::Tensor& out, const at::Tensor& coef, const at::Tensor& rows, bool accumulate) {
  check_matrix(out, "gemm_product", "out");
  check_matrix(coef, "gemm_product", "coef");
  check_matrix(rows, "gemm_product", "rows");
  const at::ScalarType acc = accumulation_type(rows.scalar_type());
  TORCH_CHECK(coef.scalar_type() == acc && out.scalar_type() == acc, "gemm_product: coef and out must be ", acc,
              " for ", rows.scalar_type(), " rows, got ", coef.scalar_type(), " and ", out.scalar_type());
  TORCH_CHECK(coef.size(1) == rows.size(0) && out.size(0) == coef.size(0) && out.size(1) == rows.size(1),
              "gemm_product: out ", out.sizes(), " = coef ", coef.sizes(), " @ rows ", rows.sizes(), " do not agree");
  TORCH_CHECK(out.device() == coef.device() && out.device() == rows.device(),
              "gemm_product: out, coef and rows must be on one device");
  const Gemm gemm(rows.scalar_type(), acc, device_kind(rows));
  if (rows.scalar_type() == gemm.operand_dtype()) {
    gemm.product(out, coef, rows, accumulate);
    return;
  }
  // Converted rows, block by block along the shared dimension (a head's vocabulary in a hidden-state gradient).
  const int64_t n = rows.size(0);
  const int64_t step = block_rows(rows.size(1));
  for (int64_t start = 0; start < n; start += step) {
    const int64_t stop = std::min(start + step, n);
    gemm.product(out, coef.slice(1, start, stop), rows.slice(0, start, stop).to(gemm.operand_dtype()),
                 accumulate || start > 0);
  }
}

namespace {

// at::_int_mm on CUDA takes a (m x k) with m > 16 and k a multiple of 8, and b^T (k x n) with n a multiple of 8:
// zero rows and columns pad the operands there (they add nothing to the exact sums).
at::Tensor padded(const at::Tensor& x, int64_t rows, int64_t cols) {
  if (x.size(0) == rows && x.size(1) == cols) return x.contiguous();
  at::Tensor out = at::zeros({rows, cols}, x.options());
  out.narrow(0, 0, x.size(0)).narrow(1, 0, x.size(1)).copy_(x);
  return out;
}

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

}  // namespace

at::Tensor gemm_exact_int8(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "gemm_exact_int8: a and b must be 2-D, got ", a.dim(), "-D and ",
              b.dim(), "-D");
  TORCH_CHECK(a.scalar_type() == at::kChar && b.scalar_type() == at::kChar, "gemm_exact_int8: a and b must be int8, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.size(1) == b.size(1), "gemm_exact_int8: a is ", a.sizes(), ", b ", b.sizes(), " (k must agree)");
  TORCH_CHECK(a.device() == b.device(), "gemm_exact_int8: a and b must be on one device");
  const int64_t m = a.size(0), n = b.size(0), k = a.size(1);
  at::Tensor out = at::zeros({m, n}, a.options().dtype(at::kDouble));
  if (m == 0 || n == 0 || k == 0) return out;
  const bool cuda = device_kind(a) == DeviceKind::Cuda;
  for (int64_t start = 0; start < k; start += kInt8ExactDepth) {
    const int64_t depth = std::min(kInt8ExactDepth, k - start);
    const at::Tensor a_block = a.narrow(1, start, depth), b_block = b.narrow(1, start, depth);
    g_gemm_calls.fetch_add(1, std::memory_order_relaxed);
    if (cuda) {
      const int64_t padded_depth = round_up(depth, 8);
      const at::Tensor a_op = padded(a_block, std::max<int64_t>(m, 17), padded_depth);
      const at::Tensor b_op = padded(b_block, round_up(n, 8), padded_depth);
      out.add_(at::_int_mm(a_op, b_op.t()).narrow(0, 0, m).narrow(1, 0, n));
    } else {
      // The same integers: every product and partial sum is an integer below 2^53, exact in float64.
      out.add_(at::mm(a_block.to(at::kDouble), b_block.to(at::kDouble).t()));
    }
  }
  return out;
}

}  // namespace ckd
