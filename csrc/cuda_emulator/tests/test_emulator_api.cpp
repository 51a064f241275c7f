// Checks the emulator's CUDA semantics with the kernels of api_kernels.h: built-in index variables over
// 3-D grids and blocks, the three shuffles (with widths below 32 and 4/8-byte types), atomics, dynamic
// shared memory poisoning per block, barriers with returned threads, __syncwarp, and pool reuse across
// launches of different block sizes. Expected values follow the CUDA programming guide.
#include <cmath>
#include <cstring>
#include <vector>

#include "api_kernels.h"
#include "check.h"

namespace {

void check_indices() {
  const dim3 grid(3, 2, 2), block(8, 2, 4);  // 64 threads per block
  const unsigned int n = 3 * 2 * 2 * 64;
  std::vector<unsigned int> out(n, 0);
  launch_kernel(ckd_api::index_kernel, grid, block, 0, nullptr, out.data());
  for (unsigned int i = 0; i < n; ++i) CKD_CHECK(out[i] == i + 1, "index %u: got %u", i, out[i]);
}

void check_shuffles(int threads, int width) {
  std::vector<long long> out(static_cast<size_t>(threads) * ckd_api::kShuffleResults, -1);
  launch_kernel(ckd_api::shuffle_kernel, dim3(1), dim3(threads), 0, nullptr, out.data(), width);
  for (int t = 0; t < threads; ++t) {
    const int warp = t / 32, lane = t % 32;
    const int segment = lane / width * width;  // first lane of this lane's width-sized segment
    auto value = [&](int l) { return 1000LL * warp + l; };
    const long long* o = &out[static_cast<size_t>(t) * ckd_api::kShuffleResults];
    // xor: the partner if it lies in this or an earlier segment, else the lane's own value.
    const int x = lane ^ 5;
    CKD_CHECK(o[0] == value(x < segment + width ? x : lane), "xor t=%d width=%d: %lld", t, width, o[0]);
    // down: lane + 3 if still inside the segment.
    CKD_CHECK(o[1] == value(lane % width + 3 < width ? lane + 3 : lane), "down t=%d width=%d: %lld", t, width,
              o[1]);
    // idx: source lane taken modulo the width, inside the segment.
    CKD_CHECK(o[2] == value(segment + 20 % width), "idx t=%d width=%d: %lld", t, width, o[2]);
    // double and long long travel whole (8 bytes).
    CKD_CHECK(o[3] == 2 * value((lane ^ 1) < segment + width ? lane ^ 1 : lane) + 1, "double xor t=%d: %lld", t,
              o[3]);
    CKD_CHECK(o[4] == value(31 - lane), "long long idx t=%d: %lld", t, o[4]);
  }
}

void check_atomics() {
  const int blocks = 3, threads = 64, n = blocks * threads;
  ckd_api::AtomicsOut out{};
  out.max_value = -1;
  out.min_value = 1 << 30;
  out.winner = -1;
  out.exchanged = -1;
  launch_kernel(ckd_api::atomics_kernel, dim3(blocks), dim3(threads), 0, nullptr, &out);
  int expect_max = -1;
  for (int t = 0; t < n; ++t) expect_max = std::max(expect_max, (t * 37) % 101);
  CKD_CHECK(out.count == n, "atomicAdd int: %d", out.count);
  CKD_CHECK(out.max_value == expect_max, "atomicMax: %d vs %d", out.max_value, expect_max);
  CKD_CHECK(out.min_value == 1000 - (n - 1), "atomicMin: %d", out.min_value);
  CKD_CHECK(out.ucount == 2u * n, "atomicAdd unsigned: %u", out.ucount);
  CKD_CHECK(out.ullcount == 3ull * n, "atomicAdd unsigned long long: %llu", out.ullcount);
  CKD_CHECK(out.fsum == 0.5f * n, "atomicAdd float: %g", out.fsum);
  CKD_CHECK(out.dsum == 0.25 * n, "atomicAdd double: %g", out.dsum);
  CKD_CHECK(out.winners == 1 && out.winner >= 0 && out.winner < n, "atomicCAS: %d winners, winner %d", out.winners,
            out.winner);
  CKD_CHECK(out.exchanged >= 0 && out.exchanged < n, "atomicExch: %d", out.exchanged);
}

void check_poison() {
  const int blocks = 2, threads = 32;
  std::vector<float> out(blocks * threads, 0.0f);
  launch_kernel(ckd_api::poison_kernel, dim3(blocks), dim3(threads), threads * sizeof(float), nullptr, out.data());
  for (size_t i = 0; i < out.size(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, &out[i], sizeof bits);
    CKD_CHECK(std::isnan(out[i]) && bits == 0xffffffffu, "dynamic shared memory not poisoned at %zu: %g", i,
              out[i]);
  }
}

void check_early_return(int n) {
  std::vector<int> in(128), out(128, -1);
  for (int i = 0; i < 128; ++i) in[i] = 7 * i + 1;
  launch_kernel(ckd_api::early_return_kernel, dim3(1), dim3(128), 0, nullptr, in.data(), out.data(), n);
  for (int t = 0; t < 128; ++t) {
    CKD_CHECK(out[t] == (t < n ? in[n - 1 - t] : -1), "early return n=%d t=%d: %d", n, t, out[t]);
  }
}

void check_syncwarp() {
  std::vector<int> out(64, -1);
  launch_kernel(ckd_api::syncwarp_kernel, dim3(1), dim3(64), 0, nullptr, out.data());
  for (int t = 0; t < 64; ++t) CKD_CHECK(out[t] == 3 * (t ^ 1), "syncwarp t=%d: %d", t, out[t]);
}

}  // namespace

int main() {
  check_indices();
  for (int width : {32, 16, 8, 1}) check_shuffles(64, width);
  check_shuffles(32, 32);  // the pool shrinks in use: fewer threads than the previous launch
  check_atomics();
  check_poison();
  check_early_return(128);
  check_early_return(40);  // a partly returned warp and a fully returned one
  check_early_return(1);
  check_syncwarp();
  return ckd_check::finish("test_emulator_api");
}
