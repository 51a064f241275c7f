// The work-buffer budget of one op call. A user setting (ckd_ext.set_workspace_bytes, CKD_EXT_WORKSPACE_MB)
// applies to every device; without one, CPU calls get 64 MiB and CUDA calls an eighth of the device's free memory at
// its first call, clamped to [1 GiB, 4 GiB] (a 16384-row CKD keeps its 1 GiB coefficient matrix whole at 2 GiB).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace ckd {

constexpr int64_t kCpuWorkspaceBytes = int64_t{64} << 20;
constexpr int64_t kMinCudaWorkspaceBytes = int64_t{1} << 30;
constexpr int64_t kMaxCudaWorkspaceBytes = int64_t{4} << 30;

// The user's setting, or 0 when there is none (reset_workspace_bytes).
int64_t workspace_setting();
void set_workspace_bytes(int64_t bytes);
void reset_workspace_bytes();
// The budget of a call on x's device: the setting, else that device's default.
int64_t workspace_for(const at::Tensor& x);
int64_t default_workspace_for(const at::Tensor& x);
// BicKD's budget on x's device for an N x C call accumulating in `acc_bytes`: the setting, else on the CPU
// bickd_cpu_workspace and on CUDA its default.
int64_t bickd_workspace_for(const at::Tensor& x, int64_t rows, int64_t cols, int64_t acc_bytes);
// The CPU default plus one N x C acc matrix, at most kMinCudaWorkspaceBytes: room to keep one side's candidates whole
// (built once instead of once per strip and pass; the class side's dpbar accumulator is that size already) beside
// strips of the default's size. A pure function, for tests and the strip-plan tool.
int64_t bickd_cpu_workspace(int64_t rows, int64_t cols, int64_t acc_bytes);
// The default for CUDA from free device memory (a pure function, for tests and the strip-plan tool).
int64_t cuda_workspace_from_free_memory(int64_t free_bytes);

}  // namespace ckd
