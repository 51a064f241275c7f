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
// The default for CUDA from free device memory (a pure function, for tests and the strip-plan tool).
int64_t cuda_workspace_from_free_memory(int64_t free_bytes);

}  // namespace ckd
