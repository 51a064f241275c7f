// Strip plans: how one call cuts its work into GEMMs and kernel launches, as a pure function of the problem
// (N, C, dtype, backend, workspace, mask), so that it can be unit-tested at GPU shapes on a CPU machine. The
// orchestration (ckd.cpp, bickd.cpp) follows the plan; tests compare the plan's counts with what a call issues.
#pragma once
#include <cstdint>

#include "backends/device_kind.h"

namespace ckd {

struct PlanInputs {
  int64_t rows = 0, cols = 0;  // N, C
  int64_t operand_bytes = 4;   // bytes of one GEMM operand element (gemm.h: the input's for tensor cores, else acc)
  int64_t acc_bytes = 4;
  bool operands_are_inputs = true;  // the inputs serve as operands as they are (no conversion, no masked row)
  DeviceKind device = DeviceKind::Cpu;  // runs_cuda_kernels: larger tiles
  bool grad_in_acc = true;          // the student gradient's dtype is the accumulation dtype
  bool want_grad = true;
  int64_t workspace = 0;
};

// CKD, both anchors, in one of three gradient modes:
//   whole      the N x N similarities / coefficients live in the workspace at once, and the gradient is computed by
//              output blocks of rows with GEMMs whose inner dimension is N, written through the normalisation
//              backward straight into the gradient (no N x C accumulator beyond the gradient);
//   recompute  (the matrix does not fit, the gradient is 16-bit) the first pass keeps only each row's log-sum-exp;
//              per output block of gradient rows, the similarities against every operand block are computed again
//              (a third GEMM), turned into coefficients and multiplied into that block's rows, which are written
//              through the normalisation backward: the gradient's only fp32 buffer is one output block;
//   accumulate (the matrix does not fit, the gradient is in acc) strips (teacher anchor) or tiles (student anchor)
//              multiply their coefficients into the gradient itself as they go.
struct CkdPlan {
  bool student_anchor = true;
  bool whole = false;
  bool recompute = false;
  int64_t strip = 0;           // teacher: anchors per strip; student: tile side (the first pass)
  int64_t operand_block = 0;   // rows per operand block of the first pass (N when the inputs are the operands)
  int64_t output_block = 0;    // whole, recompute: gradient rows per output block
  int64_t gradient_block = 0;  // whole, recompute: operand rows per block of an output block's products
  // What one call issues (forward with the gradient computed in it):
  int64_t gemms = 0;
  double gemm_flops = 0;       // 2 m n k summed over the GEMMs (a coefficient product on tensor cores counts twice)
  int64_t launches = 0;        // kernel backend launches (CUDA backend)
  int64_t min_gemm_dim = 0;    // the smallest M or N of any GEMM
  int64_t transient_bytes = 0;  // work buffers beyond inputs, outputs and the gradient
};
CkdPlan plan_ckd(const PlanInputs& in, bool student_anchor);

// BicKD, per side: `count` anchors (student rows p_i or columns pbar_c) against as many candidates (teacher rows or
// columns), normalised probability vectors of `depth` elements built from the logits by exp_block in the GEMM
// policy's operand dtype (operand_bytes: 16-bit on tensor cores, else acc), walked by the strip engine in strips of
// anchors against blocks of candidates. Which operands are built how often:
//   Whole       both inputs' operand matrices (count x depth each) built once per call, shared by both directions;
//               strips are views.
//   Candidates  the candidates built once per direction (one block), each strip's anchors once per strip.
//   Blocks      neither fits: each strip's anchors once, its candidate blocks once for the similarities and, for
//               student anchors with the gradient, again for its products.
// Each side picks the mode and sizes with the fewest GEMMs, plus built elements, within the workspace (see
// plan_bickd); the N x C acc accumulators dp, dpbar of the gradient are not part of the workspace.
enum class BicKDOperands { Whole, Candidates, Blocks };
struct BicKDSide {
  BicKDOperands operands = BicKDOperands::Blocks;
  int64_t strip = 0, block = 0;  // anchors per strip, candidates per block (Whole, Candidates: block = count)
};
struct BicKDPlan {
  BicKDSide sample, cls;  // sample side: rows; class side: columns
  int64_t gemms = 0, launches = 0, min_gemm_dim = 0;
  int64_t built_elements = 0;  // operand elements exp_block writes over the call
  int64_t work_bytes = 0;      // work buffers at their peak (one side's operands and strip), within the workspace
  int64_t transient_bytes = 0;  // work_bytes plus the N x C acc gradient accumulators
  double gemm_flops = 0;
};
BicKDPlan plan_bickd(const PlanInputs& in, bool symmetric, bool sample_side, bool class_side);

// Rows a block of `row_bytes` per row may have within `bytes`, at least 1 and at most `total`.
int64_t rows_within(int64_t bytes, int64_t row_bytes, int64_t total);
inline int64_t blocks_of(int64_t total, int64_t block) { return total == 0 ? 0 : (total + block - 1) / block; }

}  // namespace ckd
