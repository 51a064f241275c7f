// The strip engine: anchors walked in strips against blocks of candidates. For each strip, the similarities
// z = anchors @ candidates^T are computed block by block into the strip's rows (Gemm::similarity), the epilogue
// turns them into losses and, in place, coefficients, and the gradient product follows in one of two forms:
// into the anchors' rows (d anchors += z @ candidates, per block) or into every candidate (d candidates +=
// z^T @ anchors). CKD's teacher anchors and both sides of BicKD run through it; CKD's student anchors, whose matrix
// is symmetric, walk tiles instead (ckd.cpp) with the same Gemm.
#pragma once
#include <ATen/ATen.h>

#include <functional>

#include "kernel_interface/types.h"
#include "orchestration/gemm.h"

namespace ckd {

// Rows [r0, r0 + n) of an operand, (n, depth), in the Gemm's operand dtype.
using OperandRows = std::function<at::Tensor(int64_t r0, int64_t n)>;

struct StripWalk {
  int64_t anchors = 0, candidates = 0;
  int64_t strip_rows = 0;  // anchors per strip
  int64_t block_rows = 0;  // candidates per block
};

enum class GradientInto { None, Anchors, Candidates };

// The epilogue of strip z (anchors r0 .. r0 + rows - 1 against every candidate): loss terms into `loss`, and
// coefficients in place where `weight` is given (`loss` may be undefined for contrastive_coefficients, which writes
// none). The row and column scales stay null (operands already normalised) unless the caller sets them.
template <typename Acc>
EpilogueParams<Acc> strip_epilogue(at::Tensor& z, int64_t r0, int64_t rows, Acc scale, const bool* valid,
                                   at::Tensor& loss, const Acc* weight) {
  EpilogueParams<Acc> p{};
  p.strip = z.data_ptr<Acc>();
  p.row0 = r0;
  p.rows = rows;
  p.cols = z.size(1);
  p.scale = scale;
  p.valid = valid;
  p.loss = loss.defined() ? loss.data_ptr<Acc>() : nullptr;
  p.weight = weight;
  return p;
}

class StripEngine {
 public:
  // `storage`: at least (strip_rows, candidates), or (anchors, candidates) to keep every strip (the strips are then
  // its rows, in place).
  StripEngine(const Gemm& gemm, const StripWalk& walk, at::Tensor storage) : gemm_(gemm), walk_(walk), storage_(storage) {}

  // epilogue(z, r0, rows) turns strip z in place. gradient_rows(r0, n): the rows of the gradient target to accumulate
  // into ((n, depth) views, the anchors' for GradientInto::Anchors, else every candidate's with r0 = 0).
  template <typename Epilogue>
  void run(const OperandRows& anchors, const OperandRows& candidates, Epilogue&& epilogue, GradientInto into,
           const std::function<at::Tensor(int64_t, int64_t)>& gradient_rows) {
    const bool keep_all = storage_.size(0) >= walk_.anchors && walk_.strip_rows < walk_.anchors;
    const bool one_block = walk_.block_rows >= walk_.candidates;
    const at::Tensor all_candidates = one_block ? candidates(0, walk_.candidates) : at::Tensor();
    auto block = [&](int64_t j0, int64_t kb) { return one_block ? all_candidates : candidates(j0, kb); };
    for (int64_t r0 = 0; r0 < walk_.anchors; r0 += walk_.strip_rows) {
      const int64_t rows = std::min(walk_.strip_rows, walk_.anchors - r0);
      const at::Tensor a = anchors(r0, rows);
      at::Tensor z = storage_.narrow(0, keep_all ? r0 : 0, rows).narrow(1, 0, walk_.candidates);
      for (int64_t j0 = 0; j0 < walk_.candidates; j0 += walk_.block_rows) {
        const int64_t kb = std::min(walk_.block_rows, walk_.candidates - j0);
        gemm_.similarity(z.narrow(1, j0, kb), a, block(j0, kb));
      }
      epilogue(z, r0, rows);
      if (into == GradientInto::Anchors) {
        at::Tensor out = gradient_rows(r0, rows);
        for (int64_t j0 = 0; j0 < walk_.candidates; j0 += walk_.block_rows) {
          const int64_t kb = std::min(walk_.block_rows, walk_.candidates - j0);
          gemm_.product(out, z.narrow(1, j0, kb), block(j0, kb), /*accumulate=*/true);
        }
      } else if (into == GradientInto::Candidates) {
        gemm_.product(gradient_rows(0, walk_.candidates), z.t(), a, /*accumulate=*/true);
      }
    }
  }

 private:
  const Gemm& gemm_;
  StripWalk walk_;
  at::Tensor storage_;
};

}  // namespace ckd
