// Which instruction set the CPU backend's kernels run with. cpu_backend.cpp (with cpu_kernels.h) is compiled once
// per set in kCpuIsaNames that the build targets (tools/build_config.py: CPU_ISA_FLAGS; baseline only off x86-64),
// and cpu_backend<Acc>() (backends.h) hands out the compilation chosen here: the highest this CPU runs, unless
// set_cpu_isa (or CKD_EXT_CPU_ISA, read by ckd_ext/_extension.py) chose a lower one. Every set gives the same
// results to the bit (build_config.py says why), so the choice is one of speed only.
#pragma once
#include <string>
#include <vector>

namespace ckd {

// Lowest first; each runs wherever the ones after it do.
inline constexpr const char* kCpuIsaNames[] = {"baseline", "avx2", "avx512"};

// The sets this build has kernels for and this CPU can run, lowest first ("baseline" always).
std::vector<std::string> available_cpu_isas();
// The set cpu_backend() serves now.
std::string cpu_isa();
// Process-wide; an unknown name, or one not in available_cpu_isas(), is an error that lists the allowed values.
void set_cpu_isa(const std::string& name);

}  // namespace ckd
