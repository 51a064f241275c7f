// The one header ckd_ext kernels include (rules: README.md in this folder).
//
// Under nvcc it is the CUDA runtime plus two helpers; with a host compiler it is the CPU emulator
// (emulator.h), which provides the same names. Kernel code is written once against this API:
//
//   __global__ __device__ __host__ __forceinline__ __shared__ __launch_bounds__ __align__
//   dim3, uint3, float2/float4/int2/int4/uint2/uint4 (+ make_*), cudaStream_t
//   threadIdx blockIdx blockDim gridDim warpSize
//   __syncthreads()  __syncwarp()  __shfl_sync  __shfl_down_sync  __shfl_xor_sync   (mask 0xffffffff only)
//   atomicAdd (int, unsigned, unsigned long long, float, double), atomicMax/atomicMin (int, unsigned),
//   atomicCAS (int, unsigned, unsigned long long), atomicExch (int, unsigned, float)
//   expf logf sqrtf fmaxf fminf fabsf ... (<math.h>), __expf __logf __powf __fdividef __frcp_rn rsqrtf
//   rsqrt __saturatef __float_as_int __float_as_uint __int_as_float __uint_as_float __ldg INFINITY NAN
//   CKD_DYNAMIC_SMEM(T, name)         declares `T* name` pointing at the launch's dynamic shared memory
//   launch_kernel(kernel, grid, block, smem_bytes, stream, args...)    the only way to launch
//   CKD_FULL_MASK                      0xffffffffu, the only mask warp operations accept
#pragma once

#define CKD_FULL_MASK 0xffffffffu

#if defined(__CUDACC__)

#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

// Dynamic shared memory. One byte array for every kernel (CUDA requires all `extern __shared__` arrays of a
// translation unit to agree), viewed as T. 16-byte alignment, as the emulator guarantees.
#define CKD_DYNAMIC_SMEM(T, name)                                             \
  extern __shared__ __align__(16) unsigned char ckd_dynamic_smem_bytes_[];    \
  T* name = reinterpret_cast<T*>(ckd_dynamic_smem_bytes_)

// kernel<<<grid, block, smem_bytes, stream>>>(args...). Arguments convert to the kernel's parameter types
// as in a direct launch. Errors are left to the caller (e.g. C10_CUDA_KERNEL_LAUNCH_CHECK()).
template <typename... Params, typename... Args>
inline void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                          cudaStream_t stream, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "launch_kernel: wrong number of kernel arguments");
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
}

#else  // host compiler: the CPU emulator

#include "emulator.h"

#endif
