// The same CUDA kernels compiled by the host compiler against the CPU emulator (device/emulator.h):
// ckd_ext.emulated runs them on CPU tensors in tests.
#include "cuda/gpu_backend.cu"
