// What every op's orchestration shares: checked inputs, reductions and upstream weights kept on the device (no
// host synchronisation anywhere: the valid-row count is a device tensor), work buffers, and run_op, the one
// preamble of the six op entry points.
#pragma once
#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>

#include <optional>
#include <string_view>
#include <type_traits>

#include "backends/select.h"
#include "kernel_interface/types.h"
#include "orchestration/gemm.h"

namespace ckd {

enum class Reduction { None, Mean, Sum };
Reduction parse_reduction(std::string_view r);
bool parse_student_anchor(std::string_view a);
// The same ranges as ckd_ext/_validation.py: reciprocal and square finite in float32.
void check_positive(const char* name, double v);

DType storage_dtype(const at::Tensor& t);
inline ConstMatrix as_matrix(const at::Tensor& t) {
  return {t.const_data_ptr(), storage_dtype(t), t.size(0), t.size(1)};
}
// Rows [row0, row0 + rows) of a row-major matrix.
ConstMatrix row_block(ConstMatrix x, int64_t row0, int64_t rows);

template <typename Acc>
constexpr at::ScalarType acc_type() { return std::is_same_v<Acc, double> ? at::kDouble : at::kFloat; }

struct Inputs {
  at::Tensor student, teacher, mask;  // contiguous; mask undefined when absent
  int64_t rows, cols;
  const bool* valid() const { return mask.defined() ? mask.const_data_ptr<bool>() : nullptr; }
};

// Callers hold a c10::OptionalDeviceGuard on the student's device while they work (CUDA: the right device and its
// current stream).
Inputs check_inputs(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                    const std::optional<at::Tensor>& mask);

// What run_op hands every op body: the inputs, the reduction, the accumulation options and the number of valid
// rows as a 0-dim tensor of the accumulation dtype on the inputs' device.
struct OpCall {
  const Inputs& in;
  Reduction reduction;
  at::TensorOptions acc_options;
  at::Tensor count;
};

// Upstream weight of each anchor: grad / max(divisor, 1) ("mean"), grad ("sum") or grad[i] ("none"); 0 where
// masked. `divisor` is a 0-dim device tensor.
at::Tensor anchor_weights(const at::Tensor& grad, Reduction reduction, const at::Tensor& divisor,
                          const at::Tensor& mask, int64_t anchors, const at::TensorOptions& acc_options);
// The forward's weights (mean / sum) are for an upstream gradient of 1.
at::Tensor unit_weights(const OpCall& call, const at::Tensor& divisor, const at::Tensor& mask, int64_t anchors);
// sum or mean (over max(divisor, 1)) of per-anchor terms, or the terms themselves for "none".
at::Tensor reduce_terms(const at::Tensor& terms, Reduction reduction, const at::Tensor& divisor);
// A 0-dim divisor known on the host (BicKD's class count), as a tensor like call.count.
at::Tensor constant_divisor(const OpCall& call, int64_t value);
// An uninitialised tensor like `x` (in `dtype`, x's by default) for a gradient the kernels write in full, its whole
// 2 MiB pages advised huge on the CPU (advise_huge_pages).
at::Tensor empty_gradient_like(const at::Tensor& x, at::ScalarType dtype);
inline at::Tensor empty_gradient_like(const at::Tensor& x) { return empty_gradient_like(x, x.scalar_type()); }
// Where the forward computes the gradient, an empty one like in.student: in the student's dtype, or (`in_acc`) in
// its accumulation dtype, so that a 16-bit gradient is rounded once, after backward's upstream scale (CKD, BicKD:
// docs/math.md 6.3); else an empty tensor.
at::Tensor forward_grad(const Inputs& in, bool want_grad, bool in_acc = false);

// A reusable work buffer of one dtype handed out as (rows, cols) views.
class WorkBuffer {
 public:
  explicit WorkBuffer(const at::TensorOptions& options) : options_(options) {}
  at::Tensor view(int64_t rows, int64_t cols);
  void release() { storage_ = at::Tensor(); }

 private:
  at::TensorOptions options_;
  at::Tensor storage_;
};

// Checks the inputs, makes the student's device current (CUDA: its current stream), parses the reduction, then runs
// body(Acc{}, call) in the accumulation type: fp64 students accumulate in fp64 (gradcheck), everything else in fp32.
template <typename F>
decltype(auto) run_op(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                      const std::optional<at::Tensor>& mask, std::string_view reduction, F&& body) {
  const Inputs in = check_inputs(op, student, teacher, mask);
  const c10::OptionalDeviceGuard device_guard(at::device_of(student));
  const Reduction red = parse_reduction(reduction);
  auto run = [&](auto tag) {
    using Acc = decltype(tag);
    const at::TensorOptions acc_options = in.student.options().dtype(acc_type<Acc>());
    const at::Tensor count = in.mask.defined() ? in.mask.sum().to(acc_type<Acc>())
                                               : at::full({}, static_cast<double>(in.rows), acc_options);
    const OpCall call{in, red, acc_options, count};
    return body(tag, call);
  };
  if (accumulation_type(in.student.scalar_type()) == at::kDouble) return run(double{});
  return run(float{});
}

}  // namespace ckd
