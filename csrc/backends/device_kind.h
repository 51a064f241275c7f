// Which kernel backend a call runs on, and every rule that follows from it: the one place that decides what
// differs between devices (backends/select.h maps a tensor to its kind; everything above asks these rules).
#pragma once
#include <stdexcept>
#include <string>
#include <string_view>

namespace ckd {

//   Cpu           the CPU backend, on CPU tensors
//   Cuda          the CUDA kernels on a GPU, on CUDA tensors
//   EmulatedCuda  the same CUDA kernels under the CPU emulator, on CPU tensors (test builds)
enum class DeviceKind { Cpu, Cuda, EmulatedCuda };

// The CUDA kernels run (on a GPU or emulated): 16-bit GEMM operands on tensor cores (orchestration/gemm.h) and the
// strip plans' GPU tile sizes, so that the emulator reproduces a GPU's arithmetic and plans.
constexpr bool runs_cuda_kernels(DeviceKind kind) { return kind != DeviceKind::Cpu; }

// Work buffers live in GPU memory: the default workspace comes from the device's free memory
// (orchestration/workspace.h); emulated calls use host memory and the CPU's defaults.
constexpr bool has_device_memory(DeviceKind kind) { return kind == DeviceKind::Cuda; }

// "cpu", "cuda" or "emulated": the names the test hooks and tools use.
inline DeviceKind parse_device_kind(std::string_view name) {
  if (name == "cpu") return DeviceKind::Cpu;
  if (name == "cuda") return DeviceKind::Cuda;
  if (name == "emulated") return DeviceKind::EmulatedCuda;
  throw std::invalid_argument("unknown device kind '" + std::string(name) + "' (expected cpu, cuda or emulated)");
}

}  // namespace ckd
