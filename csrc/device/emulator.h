// CPU emulator of the CUDA subset that ckd_ext's kernels use (see README.md in this folder).
//
// Include "device/device.h", never this file directly: device.h picks the real CUDA runtime under nvcc.
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
//   * __syncthreads is a mutex/condition variable private to the block barrier: edges between all threads
//     of the block at each barrier, as on a GPU.
//   * warp operations use one mutex per warp: edges only among the lanes of that warp (a GPU gives no
//     memory ordering for shuffles, so intra-warp races separated by a shuffle are not reported: a limit).
//   * bookkeeping that every thread touches (thread states for diagnostics, the watchdog's progress
//     counter) uses relaxed atomics, which create no happens-before edges; a shared mutex there would
//     hide races between warps.
//   * the pool hands a block to its threads and collects them through mutexes, so a block's writes
//     happen-before the next block's reads of the same static shared memory (true on a GPU as well).
#pragma once

#if defined(__CUDACC__)
#error "csrc/device/emulator.h is the host-compiler emulator; include device/device.h instead"
#endif

#include <math.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

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
// Runtime internals
// ---------------------------------------------------------------------------------------------------------

namespace ckd_emu {

constexpr int kWarpSize = 32;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxDynamicSmemBytes = 48 * 1024;  // what a kernel gets without cudaFuncSetAttribute
constexpr unsigned int kFullMask = 0xffffffffu;

// A source location of a synchronising call, captured by the macros at the bottom of this file.
struct Site {
  const char* file;
  int line;
  const char* op;  // "__syncthreads()", "__shfl_xor_sync", ...
};

inline bool same_site(const Site& a, const Site& b) {
  return a.line == b.line && a.op == b.op && (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}

// Orders sites for messages, so that a report names the sites in a stable order whatever thread came first.
inline bool site_before(const Site& a, const Site& b) {
  const int c = std::strcmp(a.file, b.file);
  return c != 0 ? c < 0 : a.line < b.line;
}

inline std::string site_str(const Site& s) {
  return std::string(s.op) + " at " + s.file + ":" + std::to_string(s.line);
}

enum ThreadState : int { kIdle = 0, kRunning, kAtBarrier, kAtWarpOp, kExited };

// Per-thread diagnostics, read by other threads and the watchdog without creating happens-before edges.
// `site` is where the thread waits now, or else the last primitive it passed.
struct alignas(64) ThreadSlot {
  std::atomic<int> state{kIdle};
  std::atomic<const char*> file{nullptr};
  std::atomic<int> line{0};
  std::atomic<const char*> op{nullptr};

  void set(int new_state, const Site& s) {
    file.store(s.file, std::memory_order_relaxed);
    line.store(s.line, std::memory_order_relaxed);
    op.store(s.op, std::memory_order_relaxed);
    state.store(new_state, std::memory_order_relaxed);
  }
  void reset() {
    file.store(nullptr, std::memory_order_relaxed);
    state.store(kRunning, std::memory_order_relaxed);
  }
  int get_state() const { return state.load(std::memory_order_relaxed); }
  bool get_site(Site* s) const {
    s->file = file.load(std::memory_order_relaxed);
    s->line = line.load(std::memory_order_relaxed);
    s->op = op.load(std::memory_order_relaxed);
    return s->file != nullptr && s->op != nullptr;
  }
};

enum class WarpOpKind : int { kShflIdx, kShflDown, kShflXor, kSyncWarp };

// The exchange through which the 32 lanes of a warp meet at a warp operation. Guarded by its own mutex.
struct Warp {
  std::mutex m;
  std::condition_variable cv;
  int arrived = 0;           // lanes waiting at the current operation
  int exited = 0;            // lanes that returned from the kernel
  uint64_t generation = 0;   // completed operations
  Site site{};               // site of the current operation (valid when arrived > 0)
  int first_lane = 0;        // the lane that opened the current operation
  size_t value_size = 0;
  bool lane_arrived[kWarpSize] = {};
  bool lane_exited[kWarpSize] = {};
  int src[kWarpSize] = {};   // lane whose value each lane reads
  uint64_t values[kWarpSize] = {};
  uint64_t results[kWarpSize] = {};

  void reset() {
    arrived = exited = 0;
    std::fill(std::begin(lane_arrived), std::end(lane_arrived), false);
    std::fill(std::begin(lane_exited), std::end(lane_exited), false);
  }
};

// The state of the block being run: its barrier and its warps.
struct Block {
  std::mutex m;  // the barrier's mutex; touched only by __syncthreads and by threads returning
  std::condition_variable cv;
  int live = 0;              // threads that have not returned
  int arrived = 0;           // threads waiting at the current barrier
  uint64_t generation = 0;   // completed barriers
  Site site{};               // site of the current barrier (valid when arrived > 0)
  int first_tid = 0;
  Warp warps[kMaxThreadsPerBlock / kWarpSize];
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

namespace detail {
// CUDA built-in variables, per OS thread.
inline thread_local uint3 t_thread_idx{0, 0, 0};
inline thread_local uint3 t_block_idx{0, 0, 0};
inline thread_local dim3 t_block_dim{};
inline thread_local dim3 t_grid_dim{};
inline thread_local int t_tid = -1;  // linear thread index in the block; -1 outside kernels
}  // namespace detail

class Runtime;
namespace detail {
// The runtime running this thread's kernel (null outside kernels); avoids Runtime::get()'s getpid() per call.
inline thread_local Runtime* t_runtime = nullptr;
}  // namespace detail

inline std::string dim_str(unsigned x, unsigned y, unsigned z) {
  return "(" + std::to_string(x) + "," + std::to_string(y) + "," + std::to_string(z) + ")";
}

// "0-15,17,20-21" for a sorted list of indices.
inline std::string ranges_str(const std::vector<int>& v) {
  std::string out;
  for (size_t i = 0; i < v.size();) {
    size_t j = i;
    while (j + 1 < v.size() && v[j + 1] == v[j] + 1) ++j;
    if (!out.empty()) out += ",";
    out += std::to_string(v[i]);
    if (j > i) out += "-" + std::to_string(v[j]);
    i = j + 1;
  }
  return out;
}

class Runtime {
 public:
  // The process-wide runtime. Never destroyed: pool threads may still be blocked in it at exit. A forked
  // child (whose pool threads do not exist) gets a fresh one.
  static Runtime& get() {
    static std::atomic<Runtime*> instance{nullptr};
    static std::mutex create_mutex;
    Runtime* rt = instance.load(std::memory_order_acquire);
    if (rt != nullptr && rt->pid_ == ::getpid()) return *rt;
    std::lock_guard<std::mutex> lock(create_mutex);
    rt = instance.load(std::memory_order_relaxed);
    if (rt == nullptr || rt->pid_ != ::getpid()) {
      rt = new Runtime();  // the parent's runtime (if any) is leaked on purpose
      instance.store(rt, std::memory_order_release);
    }
    return *rt;
  }

  // Runs `invoke(ctx)` as every thread of every block of the grid. Called by launch_kernel.
  void launch(const LaunchInfo& info, void (*invoke)(void*), void* ctx) {
    if (detail::t_tid >= 0) {
      fail("launch_kernel called from inside a kernel (" + launch_str(info) +
           "): dynamic parallelism is not supported");
    }
    std::lock_guard<std::mutex> launch_lock(launch_mutex_);  // static shared memory: one launch at a time
    validate(info);
    const int nthreads = static_cast<int>(info.block.x * info.block.y * info.block.z);
    ensure_workers(nthreads);
    info_ = info;
    invoke_ = invoke;
    ctx_ = ctx;
    nthreads_ = nthreads;
    allocate_dynamic_smem(info.smem_bytes);
    start_watch();
    for (unsigned bz = 0; bz < info.grid.z; ++bz) {
      for (unsigned by = 0; by < info.grid.y; ++by) {
        for (unsigned bx = 0; bx < info.grid.x; ++bx) run_block(uint3{bx, by, bz});
      }
    }
    stop_watch();
    free_dynamic_smem();
  }

  // ---- called from kernel threads ----

  unsigned char* dynamic_smem() const { return smem_; }

  void syncthreads(const Site& site) {
    const int tid = detail::t_tid;
    check_warp_mates(tid, kAtWarpOp, site);
    std::unique_lock<std::mutex> lock(block_.m);
    if (block_.arrived == 0) {
      block_.site = site;
      block_.first_tid = tid;
    } else if (!same_site(block_.site, site)) {
      fail("divergent __syncthreads() in " + block_str() + ": " +
           two_sites(tid, site, block_.first_tid, block_.site, &Runtime::thread_str) +
           ". All threads of a block that have not returned must reach the same __syncthreads().");
    }
    ++block_.arrived;
    if (block_.arrived == block_.live) {
      release_barrier_locked();
      mark(tid, kRunning, site);
      return;
    }
    mark(tid, kAtBarrier, site);
    const uint64_t gen = block_.generation;
    block_.cv.wait(lock, [&] { return block_.generation != gen; });
  }

  template <typename T>
  T warp_op(const Site& site, WarpOpKind kind, unsigned int mask, T value, int arg, int width) {
    static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value, "bad shuffle type");
    const int tid = detail::t_tid;
    if (mask != kFullMask) {
      fail(site_str(site) + " in " + block_str() + ", " + thread_str(tid) + ": mask " + hex(mask) +
           " is not the full mask 0xffffffff; partial warp masks are not allowed in ckd_ext kernels.");
    }
    if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0) {
      fail(site_str(site) + " in " + block_str() + ", " + thread_str(tid) + ": width " +
           std::to_string(width) + " is not a power of two in [1, 32].");
    }
    check_warp_mates(tid, kAtBarrier, site);
    const int lane = tid % kWarpSize;
    Warp& w = block_.warps[tid / kWarpSize];
    std::unique_lock<std::mutex> lock(w.m);
    if (w.arrived == 0) {
      w.site = site;
      w.first_lane = lane;
      w.value_size = sizeof(T);
    } else if (!same_site(w.site, site) || w.value_size != sizeof(T)) {
      fail("divergent warp operation in " + block_str() + ", warp " + std::to_string(tid / kWarpSize) + ": " +
           two_sites(lane, site, w.first_lane, w.site, &Runtime::lane_str) +
           ". All 32 lanes must execute the same full-mask warp operation.");
    }
    w.src[lane] = source_lane(kind, lane, arg, width);
    std::memcpy(&w.values[lane], &value, sizeof(T));
    w.lane_arrived[lane] = true;
    ++w.arrived;
    if (w.arrived + w.exited == kWarpSize) complete_warp_op_locked(tid / kWarpSize);
    if (w.lane_arrived[lane]) {  // the operation has not completed yet
      mark(tid, kAtWarpOp, site);
      const uint64_t gen = w.generation;
      w.cv.wait(lock, [&] { return w.generation != gen; });
    } else {
      mark(tid, kRunning, site);
    }
    T result;
    std::memcpy(&result, &w.results[lane], sizeof(T));
    return result;
  }

 private:
  struct Worker {
    std::mutex m;
    std::condition_variable cv;
    bool has_job = false;
  };

  Runtime() : pid_(::getpid()), watchdog_seconds_(read_watchdog_seconds()), slots_(kMaxThreadsPerBlock) {
    std::thread(&Runtime::watchdog_loop, this).detach();
  }

  static double read_watchdog_seconds() {
    const char* env = std::getenv("CKD_EMU_WATCHDOG_SECONDS");
    if (env == nullptr || *env == '\0') return 10.0;
    char* end = nullptr;
    const double v = std::strtod(env, &end);
    if (end == env || *end != '\0' || !(v >= 0.0)) {
      std::fprintf(stderr, "ckd_emu: ignoring CKD_EMU_WATCHDOG_SECONDS=%s (want a number >= 0)\n", env);
      return 10.0;
    }
    return v;
  }

  // ---- launching ----

  void validate(const LaunchInfo& info) {
    const dim3 g = info.grid, b = info.block;
    const uint64_t nthreads = uint64_t{b.x} * b.y * b.z;
    std::string why;
    if (g.x == 0 || g.y == 0 || g.z == 0 || b.x == 0 || b.y == 0 || b.z == 0) {
      why = "a grid or block dimension is 0 (CUDA fails such a launch)";
    } else if (g.y > 65535 || g.z > 65535 || g.x > 2147483647u) {
      why = "the grid exceeds CUDA's limits (x < 2^31, y and z <= 65535)";
    } else if (nthreads > kMaxThreadsPerBlock || b.z > 64) {
      why = "the block exceeds CUDA's limits (1024 threads, z <= 64)";
    } else if (nthreads % kWarpSize != 0) {
      why = "the block has " + std::to_string(nthreads) + " threads, not a multiple of 32 (a rule for ckd_ext kernels)";
    } else if (info.smem_bytes > kMaxDynamicSmemBytes) {
      why = std::to_string(info.smem_bytes) + " bytes of dynamic shared memory exceed the 48 KiB a launch gets by default";
    }
    if (!why.empty()) fail("invalid launch configuration for " + launch_str(info) + ": " + why);
  }

  void ensure_workers(int n) {
    while (static_cast<int>(workers_.size()) < n) {
      workers_.emplace_back(new Worker());
      // The thread gets its Worker by pointer: workers_ may reallocate while it starts.
      std::thread(&Runtime::worker_loop, this, workers_.back().get(), static_cast<int>(workers_.size()) - 1)
          .detach();
    }
  }

  void allocate_dynamic_smem(size_t bytes) {
    // Exactly `bytes` (at least 16-byte aligned, as on a GPU), so that AddressSanitizer flags any access
    // past the size the launch asked for.
    smem_bytes_ = bytes;
    smem_ = static_cast<unsigned char*>(::operator new[](bytes, std::align_val_t{16}));
  }

  void free_dynamic_smem() {
    ::operator delete[](smem_, std::align_val_t{16});
    smem_ = nullptr;
  }

  void run_block(uint3 block_idx) {
    block_idx_ = block_idx;
    block_.live = nthreads_;
    block_.arrived = 0;
    for (int w = 0; w < nthreads_ / kWarpSize; ++w) block_.warps[w].reset();
    for (int t = 0; t < nthreads_; ++t) slots_[t].reset();
    // Poison: 0xFF bytes read as NaN floats / -1 integers, so a read before any write shows in the results.
    std::memset(smem_, 0xFF, smem_bytes_);
    watch_block_.store(uint64_t{block_idx.x} | (uint64_t{block_idx.y} << 32), std::memory_order_relaxed);
    watch_block_z_.store(block_idx.z, std::memory_order_relaxed);
    bump_progress();
    {
      std::lock_guard<std::mutex> lock(done_m_);
      remaining_ = nthreads_;
    }
    for (int t = 0; t < nthreads_; ++t) {
      Worker& wk = *workers_[t];
      {
        std::lock_guard<std::mutex> lock(wk.m);
        wk.has_job = true;
      }
      wk.cv.notify_one();
    }
    std::unique_lock<std::mutex> lock(done_m_);
    done_cv_.wait(lock, [&] { return remaining_ == 0; });
  }

  void worker_loop(Worker* worker, int tid) {
    Worker& wk = *worker;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(wk.m);
        wk.cv.wait(lock, [&] { return wk.has_job; });
        wk.has_job = false;
      }
      run_thread(tid);
      std::lock_guard<std::mutex> lock(done_m_);
      if (--remaining_ == 0) done_cv_.notify_one();
    }
  }

  void run_thread(int tid) {
    const dim3 b = info_.block;
    detail::t_thread_idx = uint3{tid % b.x, (tid / b.x) % b.y, tid / (b.x * b.y)};
    detail::t_block_idx = block_idx_;
    detail::t_block_dim = b;
    detail::t_grid_dim = info_.grid;
    detail::t_tid = tid;
    detail::t_runtime = this;
    invoke_(ctx_);
    thread_returned(tid);
    detail::t_tid = -1;
    detail::t_runtime = nullptr;
  }

  // A returning thread drops out of the barrier (possibly completing it) and of its warp's operations.
  void thread_returned(int tid) {
    {
      Warp& w = block_.warps[tid / kWarpSize];
      std::lock_guard<std::mutex> lock(w.m);
      w.lane_exited[tid % kWarpSize] = true;
      ++w.exited;
      if (w.arrived > 0 && w.arrived + w.exited == kWarpSize) complete_warp_op_locked(tid / kWarpSize);
    }
    std::lock_guard<std::mutex> lock(block_.m);
    --block_.live;
    slots_[tid].state.store(kExited, std::memory_order_relaxed);
    if (block_.arrived > 0 && block_.arrived == block_.live) release_barrier_locked();
    bump_progress();
  }

  // ---- barrier and warp exchange ----

  void release_barrier_locked() {
    block_.arrived = 0;
    ++block_.generation;
    // Mark the waiters running before they wake, so that no thread released by this barrier can see a
    // stale "waiting at a barrier" state of a warp-mate (check_warp_mates relies on it).
    for (int t = 0; t < nthreads_; ++t) {
      if (slots_[t].get_state() == kAtBarrier) slots_[t].state.store(kRunning, std::memory_order_relaxed);
    }
    bump_progress();
    block_.cv.notify_all();
  }

  static int source_lane(WarpOpKind kind, int lane, int arg, int width) {
    const int segment = lane & ~(width - 1);  // first lane of this lane's width-segment
    const int last = segment + width - 1;
    int src = lane;
    switch (kind) {
      case WarpOpKind::kShflIdx: src = segment + (arg & (width - 1)); break;
      case WarpOpKind::kShflDown: src = lane + (arg & (kWarpSize - 1)); break;
      case WarpOpKind::kShflXor: src = lane ^ (arg & (kWarpSize - 1)); break;
      case WarpOpKind::kSyncWarp: break;
    }
    return src > last ? lane : src;  // CUDA: a source beyond the segment yields the lane's own value
  }

  // Called when every lane of the warp has arrived or returned. Completes the operation, or aborts if
  // lanes have returned (a full-mask operation needs all 32).
  void complete_warp_op_locked(int warp) {
    Warp& w = block_.warps[warp];
    const int base = warp * kWarpSize;
    if (w.exited > 0) {
      std::vector<int> waiting, gone;
      for (int l = 0; l < kWarpSize; ++l) (w.lane_exited[l] ? gone : waiting).push_back(l);
      for (int l : waiting) {
        if (w.lane_exited[w.src[l]]) {
          fail(site_str(w.site) + " in " + block_str() + ", warp " + std::to_string(warp) + ": lane " +
               std::to_string(l) + " reads lane " + std::to_string(w.src[l]) +
               ", which has returned from the kernel (lanes " + ranges_str(gone) + " have returned).");
        }
      }
      fail(site_str(w.site) + " in " + block_str() + ", warp " + std::to_string(warp) + ": lanes " +
           ranges_str(gone) + " have returned from the kernel while lanes " + ranges_str(waiting) +
           " execute this full-mask warp operation, which needs all 32 lanes.");
    }
    for (int l = 0; l < kWarpSize; ++l) {
      w.results[l] = w.values[w.src[l]];
      w.lane_arrived[l] = false;
      if (slots_[base + l].get_state() == kAtWarpOp) slots_[base + l].state.store(kRunning, std::memory_order_relaxed);
    }
    w.arrived = 0;
    ++w.generation;
    bump_progress();
    w.cv.notify_all();
  }

  // A lane arriving at a warp operation while a warp-mate waits at __syncthreads (or the reverse) can never
  // meet it again: abort now instead of waiting for the deadlock detector. `other` is the state to look for.
  void check_warp_mates(int tid, int other, const Site& site) {
    const int base = tid - tid % kWarpSize;
    for (int t = base; t < base + kWarpSize; ++t) {
      Site theirs;
      if (t == tid || slots_[t].get_state() != other || !slots_[t].get_site(&theirs)) continue;
      fail("divergent warp in " + block_str() + ", warp " + std::to_string(tid / kWarpSize) + ": " +
           two_sites(tid, site, t, theirs, &Runtime::thread_str) +
           ". The lanes of a warp must not split between __syncthreads() and a warp operation.");
    }
  }

  void mark(int tid, int state, const Site& site) { slots_[tid].set(state, site); }

  // ---- watchdog ----

  void bump_progress() { progress_.fetch_add(1, std::memory_order_relaxed); }

  void start_watch() {
    std::lock_guard<std::mutex> lock(watch_m_);
    watch_launch_ = true;
    watch_nthreads_.store(nthreads_, std::memory_order_relaxed);
    watch_cv_.notify_one();
  }

  void stop_watch() {
    std::lock_guard<std::mutex> lock(watch_m_);
    watch_launch_ = false;
  }

  void watchdog_loop() {
    using clock = std::chrono::steady_clock;
    constexpr double kAllBlockedSeconds = 1.0;  // every live thread waits in a primitive: certain deadlock
    uint64_t last_progress = ~uint64_t{0};
    clock::time_point last_change = clock::now();
    std::unique_lock<std::mutex> lock(watch_m_);
    for (;;) {
      watch_cv_.wait_for(lock, std::chrono::milliseconds(50));
      if (!watch_launch_) {
        last_progress = ~uint64_t{0};
        continue;
      }
      const uint64_t p = progress_.load(std::memory_order_relaxed);
      const clock::time_point now = clock::now();
      if (p != last_progress) {
        last_progress = p;
        last_change = now;
        continue;
      }
      const double idle = std::chrono::duration<double>(now - last_change).count();
      if (idle >= kAllBlockedSeconds && all_live_threads_blocked()) {
        fail("deadlock in " + watched_block_str() + ": every thread that has not returned waits in an emulator "
             "primitive and none can proceed.\n" + thread_report());
      }
      if (watchdog_seconds_ > 0 && idle >= watchdog_seconds_) {
        char secs[32];
        std::snprintf(secs, sizeof secs, "%.1f", idle);
        fail("deadlock in " + watched_block_str() + ": no thread made progress for " + secs +
             " s (CKD_EMU_WATCHDOG_SECONDS=" + std::to_string(watchdog_seconds_) +
             "); a thread spinning on a flag that no thread of this block sets?\n" + thread_report());
      }
    }
  }

  bool all_live_threads_blocked() const {
    const int n = watch_nthreads_.load(std::memory_order_relaxed);
    int live = 0;
    for (int t = 0; t < n; ++t) {
      const int s = slots_[t].get_state();
      if (s == kExited) continue;
      ++live;
      if (s != kAtBarrier && s != kAtWarpOp) return false;
    }
    return live > 0;
  }

  // One line per run of consecutive threads in the same state at the same site.
  std::string thread_report() const {
    const int n = watch_nthreads_.load(std::memory_order_relaxed);
    std::string out;
    std::vector<int> run;
    std::string run_desc;
    auto flush = [&] {
      if (run.empty()) return;
      out += std::string(run.size() > 1 ? "  threads " : "  thread ") + ranges_str(run) + ": " + run_desc + "\n";
      run.clear();
    };
    for (int t = 0; t < n; ++t) {
      Site s;
      const bool has_site = slots_[t].get_site(&s);
      std::string desc;
      switch (slots_[t].get_state()) {
        case kAtBarrier:
        case kAtWarpOp: desc = "waiting at " + (has_site ? site_str(s) : std::string("?")); break;
        case kExited: desc = "returned"; break;
        default:
          desc = "running outside emulator primitives (spinning?); last primitive passed: " +
                 (has_site ? site_str(s) : std::string("none"));
      }
      if (desc != run_desc) flush();
      run_desc = desc;
      run.push_back(t);
    }
    flush();
    return out;
  }

  // ---- messages ----

  static std::string hex(unsigned v) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "0x%08x", v);
    return buf;
  }

  static std::string launch_str(const LaunchInfo& info) {
    return "the kernel launched at " + std::string(info.file) + ":" + std::to_string(info.line) +
           " [launch_kernel(" + info.text + ")] with grid " + dim_str(info.grid.x, info.grid.y, info.grid.z) +
           ", block " + dim_str(info.block.x, info.block.y, info.block.z);
  }

  // Only kernel threads and the launching thread call this (they see info_ and block_idx_ through the
  // pool's happens-before edges).
  std::string block_str() const {
    return "block " + dim_str(block_idx_.x, block_idx_.y, block_idx_.z) + " of " + launch_str(info_);
  }

  // The watchdog reads the block index through atomics; info_ does not change while the launch it watches
  // is stuck, and is only read to write the final report.
  std::string watched_block_str() const {
    const uint64_t xy = watch_block_.load(std::memory_order_relaxed);
    return "block " + dim_str(static_cast<unsigned>(xy), static_cast<unsigned>(xy >> 32),
                              watch_block_z_.load(std::memory_order_relaxed)) +
           " of " + launch_str(info_);
  }

  // "<who a> is at <site a> while <who b> is at <site b>", the sites in source order whatever thread came
  // first, so that a report is the same from run to run.
  std::string two_sites(int id1, const Site& s1, int id2, const Site& s2,
                        std::string (Runtime::*who)(int) const) const {
    const bool first = site_before(s1, s2);
    return (this->*who)(first ? id1 : id2) + " is at " + site_str(first ? s1 : s2) + " while " +
           (this->*who)(first ? id2 : id1) + " is at " + site_str(first ? s2 : s1);
  }

  std::string lane_str(int lane) const { return "lane " + std::to_string(lane); }

  std::string thread_str(int tid) const {
    const dim3 b = info_.block;
    return "thread " + dim_str(tid % b.x, (tid / b.x) % b.y, tid / (b.x * b.y)) + " (warp " +
           std::to_string(tid / kWarpSize) + ", lane " + std::to_string(tid % kWarpSize) + ")";
  }

 public:
  // Prints the error and aborts the process. Only the first failing thread reports.
  [[noreturn]] static void fail(const std::string& message) {
    static std::atomic<bool> failing{false};
    if (failing.exchange(true)) {
      for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));  // the first reporter aborts
    }
    std::fprintf(stderr, "\nckd_emu: ERROR: %s\n", message.c_str());
    std::fflush(stderr);
    std::abort();
  }

 private:
  const pid_t pid_;
  const double watchdog_seconds_;

  std::mutex launch_mutex_;
  std::vector<std::unique_ptr<Worker>> workers_;  // grows only, under launch_mutex_
  std::vector<ThreadSlot> slots_;

  // The current launch and block; written by the launching thread before it hands a block to the pool.
  LaunchInfo info_{};
  void (*invoke_)(void*) = nullptr;
  void* ctx_ = nullptr;
  int nthreads_ = 0;
  uint3 block_idx_{0, 0, 0};
  unsigned char* smem_ = nullptr;
  size_t smem_bytes_ = 0;
  Block block_;

  std::mutex done_m_;
  std::condition_variable done_cv_;
  int remaining_ = 0;

  std::atomic<uint64_t> progress_{0};
  std::mutex watch_m_;
  std::condition_variable watch_cv_;
  bool watch_launch_ = false;
  std::atomic<int> watch_nthreads_{0};
  std::atomic<uint64_t> watch_block_{0};
  std::atomic<unsigned> watch_block_z_{0};
};

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
  Runtime::get().launch(LaunchInfo{file, line, text, grid, block, smem_bytes}, invoke, &ctx);
}

// The runtime of the calling kernel thread; aborts when called outside a kernel.
inline Runtime& current(const Site& site) {
  if (detail::t_runtime == nullptr) {
    Runtime::fail(site_str(site) + " called outside a kernel launched with launch_kernel");
  }
  return *detail::t_runtime;
}

inline unsigned char* dynamic_smem(const Site& site) { return current(site).dynamic_smem(); }
inline void syncthreads(const Site& site) { current(site).syncthreads(site); }
inline void syncwarp(const Site& site, unsigned int mask = kFullMask) {
  current(site).warp_op(site, WarpOpKind::kSyncWarp, mask, 0, 0, kWarpSize);
}
inline int warp_size() { return kWarpSize; }  // not constexpr: CUDA's warpSize is not a constant expression

// Shuffles: exactly CUDA's overload set (so that e.g. a c10::Half argument converts to float in both modes).
#define CKD_EMU_SHUFFLE_OVERLOADS(T)                                                                          \
  inline T shfl(const Site& s, unsigned int mask, T var, int src_lane, int width = kWarpSize) {               \
    return current(s).warp_op(s, WarpOpKind::kShflIdx, mask, var, src_lane, width);                       \
  }                                                                                                           \
  inline T shfl_down(const Site& s, unsigned int mask, T var, unsigned int delta, int width = kWarpSize) {    \
    return current(s).warp_op(s, WarpOpKind::kShflDown, mask, var, static_cast<int>(delta), width);       \
  }                                                                                                           \
  inline T shfl_xor(const Site& s, unsigned int mask, T var, int lane_mask, int width = kWarpSize) {          \
    return current(s).warp_op(s, WarpOpKind::kShflXor, mask, var, lane_mask, width);                      \
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
#define __syncwarp(...) ::ckd_emu::syncwarp(CKD_EMU_SITE("__syncwarp"), ##__VA_ARGS__)
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
