#include "orchestration/plan.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace ckd {

int64_t rows_within(int64_t bytes, int64_t row_bytes, int64_t total) {
  return std::max<int64_t>(1, std::min<int64_t>(total, bytes / std::max<int64_t>(row_bytes, 1)));
}

namespace {

// Tiles of at most `side` rows, as even as possible.
int64_t balanced(int64_t total, int64_t side) {
  const int64_t tiles = blocks_of(total, std::max<int64_t>(side, 1));
  return tiles == 0 ? 1 : blocks_of(total, tiles);
}

// Sizes of the blocks in a walk of `total` rows by `block`.
template <typename F>
void for_blocks(int64_t total, int64_t block, F&& f) {
  for (int64_t r0 = 0; r0 < total; r0 += block) f(std::min(block, total - r0));
}

struct Counter {
  int64_t gemms = 0, launches = 0, min_dim = INT64_MAX;
  double flops = 0;
  // `count` GEMMs of m x n outputs over an inner dimension k.
  void gemm(int64_t m, int64_t n, int64_t k, int64_t count = 1) {
    gemms += count;
    flops += 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k) * static_cast<double>(count);
    min_dim = std::min({min_dim, m, n});
  }
};

}  // namespace

CkdPlan plan_ckd(const PlanInputs& in, bool student_anchor) {
  const int64_t N = in.rows, C = in.cols, W = in.workspace;
  CkdPlan plan;
  plan.student_anchor = student_anchor;
  const int64_t matrix_bytes = N * N * in.acc_bytes;
  plan.whole = in.want_grad && matrix_bytes <= W / 2;
  plan.recompute = in.want_grad && !plan.whole && !in.grad_in_acc;
  const bool accumulate = in.want_grad && !plan.whole && !plan.recompute;
  const int64_t rest = plan.whole ? W - matrix_bytes : W;
  const int64_t operand_row = C * in.operand_bytes, acc_row = C * in.acc_bytes;
  Counter n;
  // Setup: both inverse norms (and the positives' dot products for student anchors, or for the recomputed
  // coefficients of teacher anchors).
  n.launches += student_anchor || plan.recompute ? 3 : 2;
  auto copy = [&](int64_t count) {  // an operand block copied: one load_rows launch where acc is the operand dtype
    if (!in.operands_are_inputs && in.operand_bytes == in.acc_bytes) n.launches += count;
  };
  int64_t first_pass_bytes = 0;

  if (!student_anchor) {
    if (in.operands_are_inputs) {
      plan.operand_block = N;
      plan.strip = plan.whole ? N : balanced(N, rows_within(W / 2, N * in.acc_bytes, N));
    } else {
      plan.operand_block = balanced(N, rows_within(plan.whole ? rest / 4 : W / 4, operand_row, N));
      plan.strip = balanced(N, std::min(plan.operand_block, plan.whole ? N : rows_within(W / 2, N * in.acc_bytes, N)));
    }
    const bool cached = plan.operand_block >= N;  // one candidate block, loaded once
    if (cached) copy(1);
    for_blocks(N, plan.strip, [&](int64_t rows) {
      copy(1);
      for_blocks(N, plan.operand_block, [&](int64_t kb) {
        if (!cached) copy(1);
        n.gemm(rows, kb, C);
      });
      n.launches += 2;  // epilogue: chunk statistics, then losses and coefficients
      if (accumulate) n.gemm(N, C, rows);
    });
    first_pass_bytes = (plan.whole ? matrix_bytes : plan.strip * N * in.acc_bytes) +
                       (in.operands_are_inputs ? 0 : (plan.strip + plan.operand_block) * operand_row);
  } else {
    const int64_t side = runs_cuda_kernels(in.device) ? 2048 : 1024;
    if (plan.whole) {
      plan.strip = balanced(N, side);
      if (!in.operands_are_inputs) plan.strip = balanced(N, std::min(plan.strip, rows_within(rest / 4, operand_row, N)));
    } else {
      plan.strip = std::max<int64_t>(
          1, std::min<int64_t>(N, static_cast<int64_t>(std::sqrt(static_cast<double>(W / 2 / in.acc_bytes)))));
      // Each pass computes its diagonal tiles whole, (T + 1) / 2T of N^2 for T tile rows, and the first pass's tiles
      // are computed again for the gradient: on the CPU, tiles of at most max(side, N / 8) rows cut that (at 8192
      // rows, 2.33 N^2 C multiply-adds in 2731-row tiles, 2.13 in 1024-row tiles) while 1024-wide GEMMs keep their
      // rate; past eight tile rows (0.56 of N^2 per pass) smaller tiles would only add GEMMs. A GPU keeps the
      // largest tiles: there the number of launches, not the FLOPs, is what more tiles cost.
      if (!runs_cuda_kernels(in.device)) plan.strip = std::min(plan.strip, std::max(side, N / 8));
      if (!in.operands_are_inputs) plan.strip = std::min(plan.strip, rows_within(W / 8, operand_row, N));
      plan.strip = balanced(N, plan.strip);
    }
    plan.operand_block = in.operands_are_inputs ? N : plan.strip;
    const bool single_tile = plan.strip >= N;
    auto walk_tiles = [&](auto&& f) {
      for (int64_t i0 = 0; i0 < N; i0 += plan.strip) {
        const int64_t ri = std::min(plan.strip, N - i0);
        for (int64_t j0 = i0; j0 < N; j0 += plan.strip) f(ri, std::min(plan.strip, N - j0), i0 == j0);
      }
    };
    // Pass 1: every tile on or above the diagonal, its log-sum-exp merged into its rows (and its columns').
    walk_tiles([&](int64_t ri, int64_t rj, bool diagonal) {
      copy(diagonal ? 1 : 0);
      if (!diagonal) copy(1);
      n.gemm(ri, rj, C);
      n.launches += 1;  // rows and, off the diagonal, columns in one kernel
    });
    if (plan.whole) {
      walk_tiles([&](int64_t, int64_t, bool) { n.launches += 1; });  // coefficients, tiles in place
    } else if (accumulate) {
      walk_tiles([&](int64_t ri, int64_t rj, bool diagonal) {
        if (!single_tile) {  // recomputed
          copy(diagonal ? 1 : 0);
          if (!diagonal) copy(1);
          n.gemm(ri, rj, C);
        }
        n.launches += 1;  // coefficients
        n.gemm(ri, C, rj);
        if (!diagonal) n.gemm(rj, C, ri);
      });
    }
    first_pass_bytes = (plan.whole ? matrix_bytes : plan.strip * plan.strip * in.acc_bytes) +
                       (in.operands_are_inputs ? 0 : 2 * plan.strip * operand_row);
  }

  // The gradient by output blocks (whole, recompute): per output block, its products over the gradient blocks (each
  // recomputed first: similarities, coefficients), then the normalisation backward into the gradient.
  int64_t gradient_bytes = 0;
  if (plan.whole || plan.recompute) {
    const int64_t d_row = in.grad_in_acc ? 0 : acc_row;  // an output block's d, unless the gradient's own rows
    plan.gradient_block = plan.whole ? plan.operand_block
                          : in.operands_are_inputs ? N
                                                   : balanced(N, rows_within(W / 4, operand_row, N));
    const bool one_block = plan.gradient_block >= N;  // the product rows loaded once
    // Recompute: the output rows as the similarities' other operand, a copy unless they are the inputs or, for
    // student anchors, part of the product rows already loaded.
    const bool output_copies = plan.recompute && !in.operands_are_inputs && !(student_anchor && one_block);
    const int64_t block_copy_bytes = in.operands_are_inputs ? 0 : plan.gradient_block * operand_row;
    if (plan.whole) {
      plan.output_block = in.grad_in_acc ? N : balanced(N, rows_within(rest / 2, acc_row, N));
    } else {
      const int64_t per_row = d_row + plan.gradient_block * in.acc_bytes + (output_copies ? operand_row : 0);
      plan.output_block = balanced(N, rows_within(W - block_copy_bytes, per_row, N));
    }
    if (one_block) copy(1);
    for_blocks(N, plan.output_block, [&](int64_t out_rows) {
      if (output_copies) copy(1);
      for_blocks(N, plan.gradient_block, [&](int64_t kb) {
        if (!one_block) copy(1);
        if (plan.recompute) {
          n.gemm(out_rows, kb, C);
          n.launches += 1;  // coefficients
        }
        n.gemm(out_rows, C, kb);
      });
      n.launches += 1;  // normalisation backward
    });
    gradient_bytes = plan.output_block * (d_row + (plan.recompute ? plan.gradient_block * in.acc_bytes : 0) +
                                          (output_copies ? operand_row : 0)) +
                     block_copy_bytes;
    // The whole matrix stays alive through the gradient; the recompute's first-pass buffers are released before it.
    plan.transient_bytes = plan.whole ? first_pass_bytes + gradient_bytes : std::max(first_pass_bytes, gradient_bytes);
  } else {
    if (accumulate) n.launches += 1;  // the normalisation backward of the accumulated gradient
    plan.transient_bytes = first_pass_bytes;
  }
  plan.gemms = n.gemms;
  plan.gemm_flops = n.flops;
  plan.launches = n.launches;
  plan.min_gemm_dim = n.gemms ? n.min_dim : 0;
  return plan;
}

namespace {

// What one BicKD side issues, in closed form (a balanced walk's blocks all have the first one's size but the last).
struct BicKDSideWork {
  int64_t gemms = 0, launches = 0, built = 0, min_dim = 0, work_bytes = 0;
  double flops = 0;
};

int64_t last_block(int64_t total, int64_t block) { return total - (blocks_of(total, block) - 1) * block; }

// `operand`: bytes of a built operand element (the GEMM policy's operand dtype); `acc`: of a similarity.
BicKDSideWork bickd_side_work(const BicKDSide& side, int64_t count, int64_t depth, int64_t operand, int64_t acc,
                              int64_t directions, bool want_grad) {
  BicKDSideWork w;
  const int64_t strips = blocks_of(count, side.strip), blocks = blocks_of(count, side.block);
  const int64_t matrix = count * depth;
  const bool whole = side.operands == BicKDOperands::Whole;
  if (whole) {
    w.launches += 2;
    w.built += 2 * matrix;
  }
  for (int64_t d = 0; d < directions; ++d) {
    const bool into_anchors = d == 0;  // student anchors: products into the anchors' rows, per candidate block
    if (!whole) {
      // The strip engine builds one block once per run, else every block per strip and pass over the candidates.
      const int64_t passes = want_grad && into_anchors ? 2 : 1;
      const int64_t candidate_builds = blocks == 1 ? 1 : strips * blocks * passes;
      w.launches += strips + candidate_builds;
      w.built += matrix + (blocks == 1 ? 1 : strips * passes) * matrix;
    }
    w.gemms += strips * blocks;
    w.launches += 2 * strips;  // epilogues: chunk statistics, then losses and coefficients
    if (want_grad) w.gemms += into_anchors ? strips * blocks : strips;
  }
  w.flops = 2.0 * static_cast<double>(count) * static_cast<double>(count) * static_cast<double>(depth) *
            static_cast<double>(directions * (want_grad ? 2 : 1));
  w.min_dim = std::min(last_block(count, side.strip), last_block(count, side.block));
  if (want_grad) w.min_dim = std::min(w.min_dim, depth);  // the products' outputs are (rows, depth)
  w.work_bytes = (whole ? 2 * count : side.strip + side.block) * depth * operand + side.strip * count * acc;
  return w;
}

// One GEMM call is charged as this many built operand elements. On the CPU, a ~10 us call against ~2.5 ns per exp.
// On a GPU a build is a memory-bound pass next to GEMMs of thousands of flops per element it writes; what more
// GEMMs cost is their launches and partial last waves, ~1 ms on an fp32 GEMM of thousands of rows, about what
// 2^30 elements take to write and read back at ~3.35 TB/s.
double bickd_gemm_cost(DeviceKind device) {
  return runs_cuda_kernels(device) ? double(int64_t{1} << 30) : double(int64_t{1} << 12);
}

// The cheapest walk of one side within the workspace: Whole when both operand matrices fit beside a strip, else
// every strip size (as a number of balanced strips) with the largest candidate blocks beside it.
BicKDSide plan_bickd_side(int64_t count, int64_t depth, const PlanInputs& in, int64_t directions) {
  const int64_t W = in.workspace, acc = in.acc_bytes, operand = in.operand_bytes;
  const double per_gemm = bickd_gemm_cost(in.device);
  BicKDSide best{BicKDOperands::Blocks, 1, 1};  // when nothing fits: one anchor against one candidate at a time
  double best_cost = std::numeric_limits<double>::infinity();
  auto consider = [&](const BicKDSide& side) {
    const BicKDSideWork w = bickd_side_work(side, count, depth, operand, acc, directions, in.want_grad);
    const double cost = static_cast<double>(w.gemms) * per_gemm + static_cast<double>(w.built);
    if (w.work_bytes <= W && cost < best_cost) {
      best = side;
      best_cost = cost;
    }
  };
  const int64_t matrix_bytes = count * depth * operand;
  if (2 * matrix_bytes < W) {
    consider({BicKDOperands::Whole, balanced(count, rows_within(W - 2 * matrix_bytes, count * acc, count)), count});
  }
  for (int64_t strips = 1; strips <= count; ++strips) {
    if (static_cast<double>(strips) * per_gemm >= best_cost) break;  // every strip issues a GEMM
    const int64_t strip = blocks_of(count, strips);
    if (blocks_of(count, strip) != strips) continue;  // the same strips as a smaller count
    const int64_t rest = W - strip * (depth * operand + count * acc);
    if (rest < depth * operand) continue;
    const int64_t block = balanced(count, rows_within(rest, depth * operand, count));
    consider({block >= count ? BicKDOperands::Candidates : BicKDOperands::Blocks, strip, block});
  }
  return best;
}

}  // namespace

BicKDPlan plan_bickd(const PlanInputs& in, bool symmetric, bool sample_side, bool class_side) {
  const int64_t N = in.rows, C = in.cols, acc = in.acc_bytes, directions = symmetric ? 2 : 1;
  BicKDPlan plan;
  plan.launches = 2;  // softmax statistics of both inputs
  int64_t min_dim = INT64_MAX;
  auto side = [&](BicKDSide& out, int64_t count, int64_t depth) {
    out = plan_bickd_side(count, depth, in, directions);
    const BicKDSideWork w = bickd_side_work(out, count, depth, in.operand_bytes, acc, directions, in.want_grad);
    plan.gemms += w.gemms;
    plan.launches += w.launches;
    plan.built_elements += w.built;
    plan.gemm_flops += w.flops;
    plan.work_bytes = std::max(plan.work_bytes, w.work_bytes);  // each side's buffers are freed before the next
    if (w.gemms) min_dim = std::min(min_dim, w.min_dim);
  };
  if (sample_side) side(plan.sample, N, C);
  if (class_side) {
    plan.launches += 2;  // column norms of both inputs
    side(plan.cls, C, N);
  }
  if (in.want_grad) plan.launches += class_side ? 2 : 1;  // column projections, then the last pass
  plan.min_gemm_dim = plan.gemms ? min_dim : 0;
  // dp (sample side, unless the gradient is in acc and doubles as it) and dpbar (class side) are N x C in acc.
  const int64_t accumulators =
      in.want_grad ? ((sample_side && !in.grad_in_acc ? 1 : 0) + (class_side ? 1 : 0)) * N * C * acc : 0;
  plan.transient_bytes = plan.work_bytes + accumulators;
  return plan;
}

}  // namespace ckd
