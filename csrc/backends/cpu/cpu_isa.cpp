// The dispatcher over the per-instruction-set compilations of cpu_backend.cpp (cpu_isa.h).
#include "backends/cpu/cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <iterator>

#include "backends/backends.h"

namespace ckd {
namespace cpu {
// Each compilation's backend, in the namespace cpu_kernels.h gives it (CKD_CPU_ISA).
inline namespace baseline { template <typename Acc> KernelBackend<Acc>& backend(); }
#if defined(CKD_CPU_MULTI_ISA)
inline namespace avx2 { template <typename Acc> KernelBackend<Acc>& backend(); }
inline namespace avx512 { template <typename Acc> KernelBackend<Acc>& backend(); }
#endif
}  // namespace cpu

namespace {

enum CpuIsa : int { kBaseline, kAvx2, kAvx512, kCpuIsaCount };
static_assert(kCpuIsaCount == std::size(kCpuIsaNames));

// Whether this build has kernels for `isa` and the CPU (and OS) can run them: the features of that set's flags in
// tools/build_config.py. __builtin_cpu_supports also checks that the OS saves the wide registers (XGETBV).
bool runs_here(int isa) {
  if (isa == kBaseline) return true;
#if defined(CKD_CPU_MULTI_ISA)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == kAvx2) return avx2;
  if (isa == kAvx512) {
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
#endif
  return false;
}

int best_isa() {
  int best = kBaseline;
  for (int isa = kBaseline; isa < kCpuIsaCount; ++isa) {
    if (runs_here(isa)) best = isa;
  }
  return best;
}

std::atomic<int>& selected_isa() {
  static std::atomic<int> isa{best_isa()};
  return isa;
}

}  // namespace

std::vector<std::string> available_cpu_isas() {
  std::vector<std::string> names;
  for (int isa = kBaseline; isa < kCpuIsaCount; ++isa) {
    if (runs_here(isa)) names.emplace_back(kCpuIsaNames[isa]);
  }
  return names;
}

std::string cpu_isa() { return kCpuIsaNames[selected_isa().load()]; }

void set_cpu_isa(const std::string& name) {
  for (int isa = kBaseline; isa < kCpuIsaCount; ++isa) {
    if (name == kCpuIsaNames[isa] && runs_here(isa)) {
      selected_isa().store(isa);
      return;
    }
  }
  std::string allowed, all;
  for (const std::string& n : available_cpu_isas()) allowed += (allowed.empty() ? "" : ", ") + n;
  bool known = false;
  for (const char* n : kCpuIsaNames) {
    known = known || name == n;
    all += (all.empty() ? "" : ", ") + std::string(n);
  }
  TORCH_CHECK(false, "ckd_ext: CPU instruction set '", name, "' is ",
              known ? "not supported by this CPU or not built into this ckd_ext" : "unknown",
              "; allowed here: ", allowed, " (of ", all, ")");
}

template <typename Acc>
KernelBackend<Acc>& cpu_backend() {
  switch (selected_isa().load()) {
#if defined(CKD_CPU_MULTI_ISA)
    case kAvx512: return cpu::avx512::backend<Acc>();
    case kAvx2: return cpu::avx2::backend<Acc>();
#endif
    default: return cpu::baseline::backend<Acc>();
  }
}

template KernelBackend<float>& cpu_backend<float>();
template KernelBackend<double>& cpu_backend<double>();

}  // namespace ckd
