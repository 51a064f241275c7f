#include "orchestration/plan_inputs.h"

namespace ckd {
namespace {
PlanInputs common(const PlanCall& call, at::ScalarType acc) {
  PlanInputs p;
  p.rows = call.rows;
  p.cols = call.cols;
  p.acc_bytes = at::elementSize(acc);
  p.grad_in_acc = call.student == acc || !call.grad_in_input_dtype;
  p.want_grad = call.want_grad;
  p.workspace = call.workspace;
  p.device = call.device;
  return p;
}
}  // namespace

PlanInputs ckd_plan_inputs(const PlanCall& call, const Gemm& gemm) {
  PlanInputs p = common(call, gemm.acc_dtype());
  p.operand_bytes = at::elementSize(gemm.operand_dtype());
  p.operands_are_inputs = !call.masked && call.student == gemm.operand_dtype() && call.teacher == gemm.operand_dtype();
  return p;
}

PlanInputs bickd_plan_inputs(const PlanCall& call, const Gemm& gemm) {
  PlanInputs p = common(call, gemm.acc_dtype());
  p.operand_bytes = at::elementSize(gemm.operand_dtype());
  p.operands_are_inputs = false;
  return p;
}

}  // namespace ckd
