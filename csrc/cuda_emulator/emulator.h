// CPU emulator of the CUDA subset that ckd_ext's kernels use (see README.md in this folder).
//
// Include "cuda_emulator/device.h", never this file directly: device.h picks the real CUDA runtime under nvcc.
// Link emulator.cpp (the runtime: thread pool, barrier, warp exchange, watchdog) into the program once.
//
// Model: every CUDA thread of a block runs as an OS thread (taken from a pool that is reused across blocks
// and launches); the blocks of a grid run one after another; a launch returns when its grid is done
// (launches are synchronous and the stream is ignored). `__shared__` becomes `static`, which is correct
// because only one block runs at a time (launches are serialised by a global mutex).
//
// The emulator refuses runs whose result would be silently wrong on a GPU. It aborts, naming the kernel
// source lines involved, on: a divergent warp operation (lanes of one warp at different shuffle sites, or
// some lanes at a shuffle while others wait at __syncthreads), a full-mask shuffle in a warp where some lanes
// have returned (naming the lane that reads a returned lane), a divergent __syncthreads (threads of a block
// waiting at different barrier sites), a partial warp mask, an invalid launch configuration, and a deadlock
// (every live thread waits in an emulator primitive, or no thread made progress for
// CKD_EMU_WATCHDOG_SECONDS seconds, default 10; 0 disables that timer).
//
// Memory model (why the synchronisation looks the way it does): ThreadSanitizer must see exactly the
// happens-before edges a GPU guarantees and no others, so that it stays silent on correct kernels and still
// reports a missing __syncthreads between a shared-memory write and another thread's read:
//   * __syncthreads uses a mutex and a release/acquire counter private to the block barrier: edges between
//     all threads of the block at each barrier, as on a GPU.
//   * warp operations use one mutex and counter per warp: edges only among the lanes of that warp (a GPU
//     gives no memory ordering for shuffles, so intra-warp races separated by a shuffle are not reported:
//     a limit).
//   * bookkeeping that every thread touches (thread states for diagnostics, the watchdog's progress
//     counter) uses relaxed atomics, which create no happens-before edges; a shared mutex there would
//     hide races between warps.
//   * the pool hands a block to its threads and collects them through release/acquire counters, so a
//     block's writes happen-before the next block's reads of the same static shared memory (as on a GPU).
#pragma once

#if defined(__CUDACC__)
#error "csrc/cuda_emulator/emulator.h is the host-compiler emulator; include cuda_emulator/device.h instead"
#endif

#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------------------------
// CUDA types and qualifiers
// ---------------------------------------------------------------------------------------------------------

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}  // NOLINT: implicit, as in CUDA
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

// Vector types for vectorised loads, with CUDA's alignment (a misaligned reinterpret_cast load is then
// also undefined behaviour on the host, which UBSan reports).
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline int2 make_int2(int x, int y) { return int2{x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
inline uint2 make_uint2(unsigned int x, unsigned int y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
  return uint4{x, y, z, w};
}

// Same spelling as the CUDA runtime's typedef, so launcher code declares `cudaStream_t stream` in both modes.
// The emulator never dereferences it (launches are synchronous).
struct CUstream_st;
using cudaStream_t = CUstream_st*;

// Qualifiers. `__device__` and `__global__` expand to nothing, so device functions in headers must be
// templates or `inline`/`__forceinline__` (plain C++ ODR rules; nvcc without -rdc is more lenient).
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// One block runs at a time, so a function-local static is exactly one block's shared memory.
#define __shared__ static

// ---------------------------------------------------------------------------------------------------------
// The runtime's interface (implemented in emulator.cpp)
// ---------------------------------------------------------------------------------------------------------

namespace ckd_emu {

constexpr int kWarpSize = 32;
constexpr unsigned int kFullMask = 0xffffffffu;

// A source location of a synchronising call, captured by the macros at the bottom of this file.
struct Site {
  const char* file;
  int line;
  const char* op;  // "__syncthreads()", "__shfl_xor_sync", ...
};

// What the launch macro records, for messages.
struct LaunchInfo {
  const char* file;
  int line;
  const char* text;  // the launch_kernel(...) arguments as written
  dim3 grid;
  dim3 block;
  size_t smem_bytes;
};

enum class WarpOpKind : int { kShflIdx, kShflDown, kShflXor, kSyncWarp };

namespace detail {
// CUDA's built-in variables, per OS thread; set by the runtime before each thread runs the kernel.
inline thread_local uint3 t_thread_idx{0, 0, 0};
inline thread_local uint3 t_block_idx{0, 0, 0};
inline thread_local dim3 t_block_dim{};
inline thread_local dim3 t_grid_dim{};
}  // namespace detail

// Runs invoke(ctx) as every thread of every block of the grid; returns when the grid is done.
void launch_grid(const LaunchInfo& info, void (*invoke)(void*), void* ctx);
// Kernels launched since the process started (tests compare it with the strip plans' launch counts).
uint64_t launch_count();
// The block barrier.
void syncthreads(const Site& site);
// A warp operation: every lane passes `size` bytes of a value in `bits` and receives its source lane's.
uint64_t warp_op(const Site& site, WarpOpKind kind, unsigned int mask, uint64_t bits, size_t size, int arg,
                 int width);
// The launch's dynamic shared memory (poisoned with 0xFF bytes at each block start).
unsigned char* dynamic_smem(const Site& site);

// launch_kernel's implementation: packs the arguments (converted to the kernel's parameter types, as a CUDA
// launch does) and runs the grid. Each thread receives its own copies of the parameters.
template <typename... Params, typename... Args>
void launch(const char* file, int line, const char* text, void (*kernel)(Params...), dim3 grid, dim3 block,
            size_t smem_bytes, cudaStream_t /*stream: launches are synchronous*/, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "launch_kernel: wrong number of kernel arguments");
  struct Context {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
  } ctx{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
  auto invoke = [](void* p) {
    auto* c = static_cast<Context*>(p);
    std::apply(c->kernel, c->params);
  };
  launch_grid(LaunchInfo{file, line, text, grid, block, smem_bytes}, invoke, &ctx);
}

template <typename T>
inline T warp_exchange(const Site& site, WarpOpKind kind, unsigned int mask, T value, int arg, int width) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value, "bad shuffle type");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = warp_op(site, kind, mask, bits, sizeof(T), arg, width);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// A callable, so that the macro can forward an optional mask: __syncwarp() and __syncwarp(mask).
struct SyncWarpAt {
  Site site;
  void operator()(unsigned int mask = kFullMask) const {
    warp_op(site, WarpOpKind::kSyncWarp, mask, 0, 0, 0, kWarpSize);
  }
};

inline int warp_size() { return kWarpSize; }  // not constexpr: CUDA's warpSize is not a constant expression

// Shuffles: exactly CUDA's overload set (so that e.g. a c10::Half argument converts to float in both modes).
#define CKD_EMU_SHUFFLE_OVERLOADS(T)                                                                       \
  inline T shfl(const Site& s, unsigned int mask, T var, int src_lane, int width = kWarpSize) {            \
    return warp_exchange(s, WarpOpKind::kShflIdx, mask, var, src_lane, width);                             \
  }                                                                                                        \
  inline T shfl_down(const Site& s, unsigned int mask, T var, unsigned int delta, int width = kWarpSize) { \
    return warp_exchange(s, WarpOpKind::kShflDown, mask, var, static_cast<int>(delta), width);             \
  }                                                                                                        \
  inline T shfl_xor(const Site& s, unsigned int mask, T var, int lane_mask, int width = kWarpSize) {       \
    return warp_exchange(s, WarpOpKind::kShflXor, mask, var, lane_mask, width);                            \
  }
CKD_EMU_SHUFFLE_OVERLOADS(int)
CKD_EMU_SHUFFLE_OVERLOADS(unsigned int)
CKD_EMU_SHUFFLE_OVERLOADS(long)
CKD_EMU_SHUFFLE_OVERLOADS(unsigned long)
CKD_EMU_SHUFFLE_OVERLOADS(long long)
CKD_EMU_SHUFFLE_OVERLOADS(unsigned long long)
CKD_EMU_SHUFFLE_OVERLOADS(float)
CKD_EMU_SHUFFLE_OVERLOADS(double)
#undef CKD_EMU_SHUFFLE_OVERLOADS

// Atomics: relaxed, like CUDA's (they order nothing; a kernel needing order needs __syncthreads). The
// generic __atomic builtins work on float and double bit patterns too.
template <typename T, typename F>
inline T atomic_update(T* p, F update) {
  T old;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  T desired = update(old);
  while (!__atomic_compare_exchange(p, &old, &desired, /*weak=*/true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    desired = update(old);
  }
  return old;
}
template <typename T>
inline T atomic_add(T* p, T v) {
  return atomic_update(p, [v](T old) { return old + v; });
}
template <typename T>
inline T atomic_max(T* p, T v) {
  return atomic_update(p, [v](T old) { return old < v ? v : old; });
}
template <typename T>
inline T atomic_min(T* p, T v) {
  return atomic_update(p, [v](T old) { return v < old ? v : old; });
}
template <typename T>
inline T atomic_cas(T* p, T compare, T val) {
  __atomic_compare_exchange(p, &compare, &val, /*weak=*/false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;  // the old value, whether or not it was replaced
}
template <typename T>
inline T atomic_exch(T* p, T v) {
  T old;
  __atomic_exchange(p, &v, &old, __ATOMIC_RELAXED);
  return old;
}

}  // namespace ckd_emu

// ---------------------------------------------------------------------------------------------------------
// What kernels use
// ---------------------------------------------------------------------------------------------------------

#define threadIdx (static_cast<const ::uint3&>(::ckd_emu::detail::t_thread_idx))
#define blockIdx (static_cast<const ::uint3&>(::ckd_emu::detail::t_block_idx))
#define blockDim (static_cast<const ::dim3&>(::ckd_emu::detail::t_block_dim))
#define gridDim (static_cast<const ::dim3&>(::ckd_emu::detail::t_grid_dim))
#define warpSize (::ckd_emu::warp_size())

#define CKD_EMU_SITE(op) (::ckd_emu::Site{__FILE__, __LINE__, op})
#define __syncthreads() ::ckd_emu::syncthreads(CKD_EMU_SITE("__syncthreads()"))
#define __syncwarp(...) (::ckd_emu::SyncWarpAt{CKD_EMU_SITE("__syncwarp")}(__VA_ARGS__))
#define __shfl_sync(...) ::ckd_emu::shfl(CKD_EMU_SITE("__shfl_sync"), __VA_ARGS__)
#define __shfl_down_sync(...) ::ckd_emu::shfl_down(CKD_EMU_SITE("__shfl_down_sync"), __VA_ARGS__)
#define __shfl_xor_sync(...) ::ckd_emu::shfl_xor(CKD_EMU_SITE("__shfl_xor_sync"), __VA_ARGS__)

// The launch site and the argument text are recorded for error messages.
#define launch_kernel(...) ::ckd_emu::launch(__FILE__, __LINE__, #__VA_ARGS__, __VA_ARGS__)

#define CKD_DYNAMIC_SMEM(T, name) \
  T* name = reinterpret_cast<T*>(::ckd_emu::dynamic_smem(CKD_EMU_SITE("CKD_DYNAMIC_SMEM")))

// Atomics CUDA has (sm_80) for the types kernels might use; relaxed ordering, returning the old value.
#define CKD_EMU_ATOMIC(name, impl, T) \
  inline T name(T* p, T v) { return ::ckd_emu::impl(p, v); }
CKD_EMU_ATOMIC(atomicAdd, atomic_add, int)
CKD_EMU_ATOMIC(atomicAdd, atomic_add, unsigned int)
CKD_EMU_ATOMIC(atomicAdd, atomic_add, unsigned long long)
CKD_EMU_ATOMIC(atomicAdd, atomic_add, float)
CKD_EMU_ATOMIC(atomicAdd, atomic_add, double)
CKD_EMU_ATOMIC(atomicMax, atomic_max, int)
CKD_EMU_ATOMIC(atomicMax, atomic_max, unsigned int)
CKD_EMU_ATOMIC(atomicMin, atomic_min, int)
CKD_EMU_ATOMIC(atomicMin, atomic_min, unsigned int)
CKD_EMU_ATOMIC(atomicExch, atomic_exch, int)
CKD_EMU_ATOMIC(atomicExch, atomic_exch, unsigned int)
CKD_EMU_ATOMIC(atomicExch, atomic_exch, float)
#undef CKD_EMU_ATOMIC
inline int atomicCAS(int* p, int compare, int val) { return ::ckd_emu::atomic_cas(p, compare, val); }
inline unsigned int atomicCAS(unsigned int* p, unsigned int compare, unsigned int val) {
  return ::ckd_emu::atomic_cas(p, compare, val);
}
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long compare, unsigned long long val) {
  return ::ckd_emu::atomic_cas(p, compare, val);
}

// Math intrinsics. expf, logf, sqrtf, fmaxf, fminf, fabsf, INFINITY, NAN, isnan, ... come from <math.h>.
// The fast intrinsics are the accurate host functions here, so results differ from a GPU in the last bits.
// glibc declares (but does not export) __expf, __logf and __powf, so these definitions match its declarations.
extern "C" inline float __expf(float x) noexcept { return ::expf(x); }
extern "C" inline float __logf(float x) noexcept { return ::logf(x); }
extern "C" inline float __powf(float x, float y) noexcept { return ::powf(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float rsqrtf(float x) { return 1.0f / ::sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / ::sqrt(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, sizeof i); return i; }
inline unsigned int __float_as_uint(float x) { unsigned int i; std::memcpy(&i, &x, sizeof i); return i; }
inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, sizeof x); return x; }
inline float __uint_as_float(unsigned int i) { float x; std::memcpy(&x, &i, sizeof x); return x; }
// Read-only-cache load: a plain load here.
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
