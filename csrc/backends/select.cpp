#include "backends/select.h"

#include <c10/util/Exception.h>

#include <atomic>

#include "backends/emulated/abi.h"

#if defined(CKD_WITH_CUDA)
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs cuSPARSE/cuBLAS headers
#endif

namespace ckd {
namespace {
std::atomic<const EmulatedBackendTable*> g_emulated_table{nullptr};
std::atomic<bool> g_emulated_cuda{false};
}  // namespace

void install_emulated_backend(const EmulatedBackendTable* table) {
  TORCH_CHECK(table != nullptr && table->abi == kEmulatedBackendAbi,
              "ckd_ext: ckd_ext._emulated was built from other sources than ckd_ext._C (backend ABI ",
              table ? table->abi : -1, ", expected ", kEmulatedBackendAbi, "); rebuild both");
  g_emulated_table.store(table);
}

void set_emulated_cuda(bool on) {
  TORCH_CHECK(!on || g_emulated_table.load() != nullptr,
              "ckd_ext: the emulated CUDA backend is not built (build with CKD_EXT_EMULATED=1)");
  g_emulated_cuda.store(on);
}

bool emulated_cuda() { return g_emulated_cuda.load(); }

DeviceKind device_kind(const at::Tensor& x) {
  if (x.device().is_cpu()) return g_emulated_cuda.load() ? DeviceKind::EmulatedCuda : DeviceKind::Cpu;
  return DeviceKind::Cuda;
}

template <typename Acc>
KernelBackend<Acc>& backend_for(const at::Tensor& x) {
  if (x.device().is_cpu()) {
    if (!g_emulated_cuda.load()) return cpu_backend<Acc>();
    const EmulatedBackendTable* table = g_emulated_table.load();
    if constexpr (std::is_same_v<Acc, double>) {
      return table->double_backend();
    } else {
      return table->float_backend();
    }
  }
#if defined(CKD_WITH_CUDA)
  if (x.device().is_cuda()) {
    return cuda_backend<Acc>(c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  }
#endif
  TORCH_CHECK(false, "ckd_ext: this build has no kernels for device ", x.device());
}

template KernelBackend<float>& backend_for<float>(const at::Tensor&);
template KernelBackend<double>& backend_for<double>(const at::Tensor&);

}  // namespace ckd
