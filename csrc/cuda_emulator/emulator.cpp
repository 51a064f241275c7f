// The CPU emulator's runtime: thread pool, block barrier, warp exchange, checks and watchdog. The model, the
// checks and the memory-model reasoning are described at the top of emulator.h.
#include "emulator.h"

#include <unistd.h>
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

namespace ckd_emu {
namespace {

constexpr int kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxDynamicSmemBytes = 48 * 1024;  // what a kernel gets without cudaFuncSetAttribute

bool same_site(const Site& a, const Site& b) {
  return a.line == b.line && a.op == b.op && (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}

// Orders sites for messages, so that a report names the sites in a stable order whatever thread came first.
bool site_before(const Site& a, const Site& b) {
  const int c = std::strcmp(a.file, b.file);
  return c != 0 ? c < 0 : a.line < b.line;
}

std::string site_str(const Site& s) {
  return std::string(s.op) + " at " + s.file + ":" + std::to_string(s.line);
}

// A counter that threads sleep on until it moves past a value they saw: how barrier, warp exchange and pool
// threads wait. advance() is a release operation and the waiters' load an acquire, so everything before
// advance() happens-before everything after the wait (an edge ThreadSanitizer sees). On Linux the sleep is
// a futex, so woken threads do not queue for a mutex one after another as with a condition variable.
class Generation {
 public:
  // Yields before sleeping. With hundreds of threads on a few cores, a barrier's waiters mostly hand the core
  // to the threads still on their way instead of sleeping and being woken one by one (a wake-up across
  // cores cost ~18 us in our VMs): ~1.5-2.5 us per thread per barrier instead of ~7. Few enough that a
  // block where one thread works while the others wait loses little.
  static constexpr int kYieldSpins = 16;
  uint32_t current() const { return value_.load(std::memory_order_acquire); }

  void advance() {
    value_.fetch_add(1, std::memory_order_release);
#if defined(__linux__)
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&value_), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
#endif
  }

  void wait_past(uint32_t seen) {
    for (int i = 0; i < kYieldSpins && value_.load(std::memory_order_acquire) == seen; ++i) {
      std::this_thread::yield();
    }
    while (value_.load(std::memory_order_acquire) == seen) {
#if defined(__linux__)
      // Sleeps only if the value is still `seen` (no lost wake-up); returns early on signals, hence the loop.
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&value_), FUTEX_WAIT_PRIVATE, seen, nullptr, nullptr, 0);
#else
      std::this_thread::yield();
#endif
    }
  }

 private:
  std::atomic<uint32_t> value_{0};
  static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "a futex needs a plain 32-bit word");
};

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

// The exchange through which the 32 lanes of a warp meet at a warp operation. Guarded by its own mutex.
struct Warp {
  std::mutex m;
  Generation completed;      // advanced when an operation completes
  int arrived = 0;           // lanes waiting at the current operation
  int exited = 0;            // lanes that returned from the kernel
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
  Generation released;       // advanced when a barrier completes
  int live = 0;              // threads that have not returned
  int arrived = 0;           // threads waiting at the current barrier
  Site site{};               // site of the current barrier (valid when arrived > 0)
  int first_tid = 0;
  Warp warps[kMaxThreadsPerBlock / kWarpSize];
};

class Runtime;
// The runtime running this thread's kernel (null outside kernels) and the thread's linear index in its block.
thread_local Runtime* t_runtime = nullptr;
thread_local int t_tid = -1;

std::string dim_str(unsigned x, unsigned y, unsigned z) {
  return "(" + std::to_string(x) + "," + std::to_string(y) + "," + std::to_string(z) + ")";
}

// "0-15,17,20-21" for a sorted list of indices.
std::string ranges_str(const std::vector<int>& v) {
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
    if (t_tid >= 0) {
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
    const int tid = t_tid;
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
    const uint32_t seen = block_.released.current();  // under the lock: the release has not happened yet
    lock.unlock();
    block_.released.wait_past(seen);
  }

  uint64_t warp_op(const Site& site, WarpOpKind kind, unsigned int mask, uint64_t bits, size_t size, int arg,
                   int width) {
    const int tid = t_tid;
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
      w.value_size = size;
    } else if (!same_site(w.site, site) || w.value_size != size) {
      fail("divergent warp operation in " + block_str() + ", warp " + std::to_string(tid / kWarpSize) + ": " +
           two_sites(lane, site, w.first_lane, w.site, &Runtime::lane_str) +
           ". All 32 lanes must execute the same full-mask warp operation.");
    }
    w.src[lane] = source_lane(kind, lane, arg, width);
    w.values[lane] = bits;
    w.lane_arrived[lane] = true;
    ++w.arrived;
    if (w.arrived + w.exited == kWarpSize) {
      complete_warp_op_locked(tid / kWarpSize);
      mark(tid, kRunning, site);
      return w.results[lane];
    }
    mark(tid, kAtWarpOp, site);
    const uint32_t seen = w.completed.current();
    lock.unlock();
    w.completed.wait_past(seen);
    // Written before the completion was published; rewritten only after this lane's next arrival.
    return w.results[lane];
  }

 private:
  struct Worker {
    Generation jobs;  // advanced by the launching thread to hand this pool thread a block
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
      why = "the block has " + std::to_string(nthreads) +
            " threads, not a multiple of 32 (a rule for ckd_ext kernels)";
    } else if (info.smem_bytes > kMaxDynamicSmemBytes) {
      why = std::to_string(info.smem_bytes) +
            " bytes of dynamic shared memory exceed the 48 KiB a launch gets by default";
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
    remaining_.store(nthreads_, std::memory_order_relaxed);  // published by the jobs' release below
    const uint32_t seen = block_done_.current();
    for (int t = 0; t < nthreads_; ++t) workers_[t]->jobs.advance();
    block_done_.wait_past(seen);
  }

  void worker_loop(Worker* worker, int tid) {
    // Each job advances `jobs` exactly once and the launcher waits for the job before the next, so the
    // thread counts jobs itself (reading the counter at start-up could miss a job handed out meanwhile).
    for (uint32_t done = 0;; ++done) {
      worker->jobs.wait_past(done);
      run_thread(tid);
      // acq_rel: the last thread's decrement carries every thread's writes to the launcher.
      if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) block_done_.advance();
    }
  }

  void run_thread(int tid) {
    const dim3 b = info_.block;
    detail::t_thread_idx = uint3{tid % b.x, (tid / b.x) % b.y, tid / (b.x * b.y)};
    detail::t_block_idx = block_idx_;
    detail::t_block_dim = b;
    detail::t_grid_dim = info_.grid;
    t_tid = tid;
    t_runtime = this;
    invoke_(ctx_);
    thread_returned(tid);
    t_tid = -1;
    t_runtime = nullptr;
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
    // Mark the waiters running before they wake, so that no thread released by this barrier can see a
    // stale "waiting at a barrier" state of a warp-mate (check_warp_mates relies on it).
    for (int t = 0; t < nthreads_; ++t) {
      if (slots_[t].get_state() == kAtBarrier) slots_[t].state.store(kRunning, std::memory_order_relaxed);
    }
    bump_progress();
    block_.released.advance();
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
      ThreadSlot& slot = slots_[base + l];
      if (slot.get_state() == kAtWarpOp) slot.state.store(kRunning, std::memory_order_relaxed);
    }
    w.arrived = 0;
    bump_progress();
    w.completed.advance();
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
      if (!watch_launch_) {  // between launches: sleep until the next one starts
        watch_cv_.wait(lock, [&] { return watch_launch_; });
        last_progress = ~uint64_t{0};
      }
      watch_cv_.wait_for(lock, std::chrono::milliseconds(50));
      if (!watch_launch_) continue;
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
        char secs[96];
        std::snprintf(secs, sizeof secs, "%.1f s (CKD_EMU_WATCHDOG_SECONDS=%g)", idle, watchdog_seconds_);
        fail("deadlock in " + watched_block_str() + ": no thread made progress for " + secs +
             "; a thread spinning on a flag that no thread of this block sets?\n" + thread_report());
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

  std::atomic<int> remaining_{0};  // threads of the current block still running
  Generation block_done_;          // advanced by the last of them

  std::atomic<uint64_t> progress_{0};
  std::mutex watch_m_;
  std::condition_variable watch_cv_;
  bool watch_launch_ = false;
  std::atomic<int> watch_nthreads_{0};
  std::atomic<uint64_t> watch_block_{0};
  std::atomic<unsigned> watch_block_z_{0};
};

}  // namespace

static std::atomic<uint64_t> g_launches{0};

void launch_grid(const LaunchInfo& info, void (*invoke)(void*), void* ctx) {
  g_launches.fetch_add(1, std::memory_order_relaxed);
  Runtime::get().launch(info, invoke, ctx);
}

uint64_t launch_count() { return g_launches.load(); }

// The runtime of the calling kernel thread; aborts when called outside a kernel.
static Runtime& current(const Site& site) {
  if (t_runtime == nullptr) Runtime::fail(site_str(site) + " called outside a kernel launched with launch_kernel");
  return *t_runtime;
}

void syncthreads(const Site& site) { current(site).syncthreads(site); }

uint64_t warp_op(const Site& site, WarpOpKind kind, unsigned int mask, uint64_t bits, size_t size, int arg,
                 int width) {
  return current(site).warp_op(site, kind, mask, bits, size, arg, width);
}

unsigned char* dynamic_smem(const Site& site) { return current(site).dynamic_smem(); }

}  // namespace ckd_emu
