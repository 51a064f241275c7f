// The one mapping from a call to its PlanInputs (orchestration/plan.h), for the ops (ckd.cpp, bickd.cpp) and the
// strip_plan test hook alike, so that what the tests plan is what a call runs.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

#include "backends/device_kind.h"
#include "orchestration/gemm.h"
#include "orchestration/plan.h"

namespace ckd {

struct PlanCall {
  int64_t rows = 0, cols = 0;
  at::ScalarType student = at::kFloat, teacher = at::kFloat;
  bool masked = false;
  DeviceKind device = DeviceKind::Cpu;
  bool want_grad = true;
  int64_t workspace = 0;
  // The backward op writes a 16-bit student's gradient in its dtype; a forward that computes the gradient keeps it in
  // the accumulation dtype (op_call.h, forward_grad).
  bool grad_in_input_dtype = false;
};

// CKD's GEMM operands are the inputs themselves when the policy multiplies the inputs' dtype and no row is masked.
PlanInputs ckd_plan_inputs(const PlanCall& call, const Gemm& gemm);
// BicKD's operands are softmax blocks it builds in the policy's operand dtype (16-bit on tensor cores, else acc).
PlanInputs bickd_plan_inputs(const PlanCall& call, const Gemm& gemm);

}  // namespace ckd
