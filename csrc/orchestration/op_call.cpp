#include "orchestration/op_call.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <limits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace ckd {
namespace {
// A fresh allocation's first write takes one page fault per 4 KiB page, which for a KD gradient costs about as much
// as the kernel that writes it (8192 x 1024 float: ~20 ms of faults beside a ~25 ms kernel, one thread, measured in
// docs/benchmarks.md). Advising the allocation's whole 2 MiB pages huge makes that one fault per 2 MiB where the
// system grants transparent huge pages on advice (Linux's default "madvise" mode; "never" ignores the advice), as
// torch does for every allocation under THP_MEM_ALLOC_ENABLE=1. Only pages inside the tensor's own bytes are
// advised, and only from two huge pages up; the advice changes no value, and a refusal (an old kernel) is ignored.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(1) << 21;
  if (!t.device().is_cpu() || t.nbytes() < 2 * kHugePage) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(kHugePage - 1);
  if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}
}  // namespace

Reduction parse_reduction(std::string_view r) {
  if (r == "mean") return Reduction::Mean;
  if (r == "sum") return Reduction::Sum;
  TORCH_CHECK(r == "none", "ckd_ext: reduction must be 'mean', 'sum' or 'none', got '", r, "'");
  return Reduction::None;
}

bool parse_student_anchor(std::string_view a) {
  TORCH_CHECK(a == "student" || a == "teacher", "ckd_ext: anchor must be 'student' or 'teacher', got '", a, "'");
  return a == "student";
}

void check_positive(const char* name, double v) {
  const double max = std::numeric_limits<float>::max();
  TORCH_CHECK(v >= 1.0 / max && v <= std::sqrt(max), "ckd_ext: ", name,
              " must be a number whose reciprocal and square are finite in float32, got ", v);
}

DType storage_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK(false, "ckd_ext: unsupported dtype ", t.scalar_type());
  }
}

ConstMatrix row_block(ConstMatrix x, int64_t row0, int64_t rows) {
  const int64_t elem = visit_dtype(x.dtype, [](auto tag) { return static_cast<int64_t>(sizeof(tag)); });
  return {static_cast<const char*>(x.data) + row0 * x.cols * elem, x.dtype, rows, x.cols};
}

Inputs check_inputs(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                    const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(student.dim() == 2 && teacher.sizes() == student.sizes(), op,
              ": student and teacher must be 2-D tensors of the same shape, got ", student.sizes(), " and ",
              teacher.sizes());
  TORCH_CHECK(student.size(1) > 0, op, ": the class dimension must be > 0");
  storage_dtype(student);
  storage_dtype(teacher);
  TORCH_CHECK(teacher.device() == student.device(), op, ": student and teacher must be on the same device, got ",
              student.device(), " and ", teacher.device());
  Inputs in{student.contiguous(), teacher.contiguous(), at::Tensor(), student.size(0), student.size(1)};
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 1 && mask->size(0) == in.rows, op,
                ": mask must be a bool tensor of shape (", in.rows, "), got ", mask->scalar_type(), " ", mask->sizes());
    TORCH_CHECK(mask->device() == student.device(), op, ": mask must be on the student's device");
    in.mask = mask->contiguous();
  }
  return in;
}

namespace {
// A divisor on the CPU is read where it is, in the accumulation type (what the device arithmetic divides by):
// no synchronisation, and at small shapes a handful of ATen calls fewer. CUDA divisors stay on the device.
std::optional<double> host_divisor(const at::Tensor& divisor) {
  if (!divisor.is_cpu()) return std::nullopt;
  if (divisor.scalar_type() == at::kDouble) return std::max(*divisor.const_data_ptr<double>(), 1.0);
  return static_cast<double>(std::max(*divisor.const_data_ptr<float>(), 1.0f));
}
}  // namespace

at::Tensor anchor_weights(const at::Tensor& grad, Reduction reduction, const at::Tensor& divisor,
                          const at::Tensor& mask, int64_t anchors, const at::TensorOptions& acc_options) {
  at::Tensor w;
  if (reduction == Reduction::None) {
    TORCH_CHECK(grad.numel() == anchors, "ckd_ext: expected ", anchors, " upstream gradients, got ", grad.numel());
    w = grad.reshape({anchors}).to(acc_options, /*non_blocking=*/false, /*copy=*/true);
  } else {
    TORCH_CHECK(grad.numel() == 1, "ckd_ext: expected a scalar upstream gradient, got ", grad.sizes());
    at::Tensor g = grad.reshape({}).to(acc_options);
    if (reduction == Reduction::Mean) {
      const std::optional<double> d = host_divisor(divisor);
      g = d ? g / *d : g / divisor.clamp_min(1);
    }
    w = g.expand({anchors}).contiguous();
  }
  if (mask.defined()) w.masked_fill_(mask.logical_not(), 0);
  return w;
}

at::Tensor unit_weights(const OpCall& call, const at::Tensor& divisor, const at::Tensor& mask, int64_t anchors) {
  const std::optional<double> d = host_divisor(divisor);
  if (!d) return anchor_weights(at::ones({}, call.acc_options), call.reduction, divisor, mask, anchors, call.acc_options);
  // 1 / d rounded once in acc, as the device path computes it.
  const double w = call.reduction != Reduction::Mean ? 1.0
                   : call.acc_options.dtype() == at::kDouble ? 1.0 / *d
                                                             : static_cast<double>(1.0f / static_cast<float>(*d));
  at::Tensor weights = at::full({anchors}, w, call.acc_options);
  if (mask.defined()) weights.masked_fill_(mask.logical_not(), 0);
  return weights;
}

at::Tensor reduce_terms(const at::Tensor& terms, Reduction reduction, const at::Tensor& divisor) {
  if (reduction == Reduction::None) return terms;
  at::Tensor s = terms.sum();
  // Masked terms are 0, so an all-masked batch gives 0 / 1 = 0.
  if (reduction == Reduction::Mean) {
    const std::optional<double> d = host_divisor(divisor);
    s = d ? s.div_(*d) : s / divisor.clamp_min(1);
  }
  return s;
}

at::Tensor constant_divisor(const OpCall& call, int64_t value) {
  return at::full({}, static_cast<double>(value), call.acc_options);
}

at::Tensor empty_gradient_like(const at::Tensor& x, at::ScalarType dtype) {
  at::Tensor out = at::empty_like(x, x.options().dtype(dtype));
  advise_huge_pages(out);
  return out;
}

at::Tensor forward_grad(const Inputs& in, bool want_grad, bool in_acc) {
  if (!want_grad) return at::empty({0}, in.student.options());
  const at::ScalarType student = in.student.scalar_type();
  return empty_gradient_like(in.student, in_acc ? accumulation_type(student) : student);
}

at::Tensor WorkBuffer::view(int64_t rows, int64_t cols) {
  if (storage_.numel() < rows * cols) storage_ = at::empty({rows * cols}, options_);
  return storage_.narrow(0, 0, rows * cols).view({rows, cols});
}

}  // namespace ckd
