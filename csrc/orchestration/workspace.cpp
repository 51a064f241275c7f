#include "orchestration/workspace.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <atomic>

#include "backends/select.h"

#if defined(CKD_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace ckd {
namespace {
std::atomic<int64_t> g_setting{0};
#if defined(CKD_WITH_CUDA)
constexpr int kMaxDevices = 64;
std::array<std::atomic<int64_t>, kMaxDevices> g_cuda_default{};
#endif
}  // namespace

int64_t workspace_setting() { return g_setting.load(); }

void set_workspace_bytes(int64_t bytes) {
  TORCH_CHECK(bytes > 0, "ckd_ext: the workspace must be > 0 bytes, got ", bytes);
  g_setting.store(bytes);
}

void reset_workspace_bytes() { g_setting.store(0); }

int64_t workspace_for(const at::Tensor& x) {
  if (const int64_t set = g_setting.load(); set > 0) return set;
  return default_workspace_for(x);
}

int64_t bickd_cpu_workspace(int64_t rows, int64_t cols, int64_t acc_bytes) {
  return std::min(kCpuWorkspaceBytes + rows * cols * acc_bytes, kMinCudaWorkspaceBytes);
}

int64_t bickd_workspace_for(const at::Tensor& x, int64_t rows, int64_t cols, int64_t acc_bytes) {
  if (const int64_t set = g_setting.load(); set > 0) return set;
  return has_device_memory(device_kind(x)) ? default_workspace_for(x) : bickd_cpu_workspace(rows, cols, acc_bytes);
}

int64_t cuda_workspace_from_free_memory(int64_t free_bytes) {
  return std::clamp(free_bytes / 8, kMinCudaWorkspaceBytes, kMaxCudaWorkspaceBytes);
}

int64_t default_workspace_for(const at::Tensor& x) {
#if defined(CKD_WITH_CUDA)
  if (has_device_memory(device_kind(x))) {
    const int index = x.device().index();
    TORCH_CHECK(index >= 0 && index < kMaxDevices, "ckd_ext: CUDA device index ", index, " out of range");
    int64_t bytes = g_cuda_default[index].load();
    if (bytes == 0) {
      // Free memory as the driver sees it (the caching allocator's pool is not counted as free): read once per device,
      // outside any stream work, so nothing waits on it later.
      size_t free = 0, total = 0;
      const cudaError_t err = cudaMemGetInfo(&free, &total);
      TORCH_CHECK(err == cudaSuccess, "ckd_ext: cudaMemGetInfo failed: ", cudaGetErrorString(err));
      bytes = cuda_workspace_from_free_memory(static_cast<int64_t>(free));
      g_cuda_default[index].store(bytes);
    }
    return bytes;
  }
#endif
  (void)x;
  return kCpuWorkspaceBytes;
}

}  // namespace ckd
