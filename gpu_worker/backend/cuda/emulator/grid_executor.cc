#include "gpu_worker/backend/cuda/emulator/grid_executor.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/tsan_annotations.h"

#ifdef KVR_TSAN_ENABLED
#include <sanitizer/tsan_interface.h>
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace kvr::cuda_emu {
namespace {

// ---- Fiber contexts ----------------------------------------------------------

#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores the stack
// pointer in *save_sp, switches to load_sp and restores its registers. A new
// context's stack is laid out by InitContext as if it had been switched away
// from at the entry function's first instruction.
extern "C" void KvrEmuSwitch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl KvrEmuSwitch
  .type KvrEmuSwitch, @function
KvrEmuSwitch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size KvrEmuSwitch, .-KvrEmuSwitch
)");

struct Context {
  void* sp = nullptr;
  void* tsan_fiber = nullptr;  // TSan builds: this context's TSan fiber
};

void InitContext(Context* c, std::byte* stack, size_t size, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t{15};
  auto* words = reinterpret_cast<uintptr_t*>(top);
  words[-1] = 0;                                     // entry's (never used) return address
  words[-2] = reinterpret_cast<uintptr_t>(entry);  // popped by KvrEmuSwitch's ret
  for (int i = 3; i <= 8; ++i) words[-i] = 0;        // rbp rbx r12..r15
  c->sp = &words[-8];
}

void Switch(Context* from, Context* to);
#else
struct Context {
  ucontext_t uc;
  void* tsan_fiber = nullptr;  // TSan builds: this context's TSan fiber
};

void InitContext(Context* c, std::byte* stack, size_t size, void (*entry)()) {
  getcontext(&c->uc);
  c->uc.uc_stack.ss_sp = stack;
  c->uc.uc_stack.ss_size = size;
  c->uc.uc_link = nullptr;
  makecontext(&c->uc, entry, 0);
}

#endif

// TSan builds: ThreadSanitizer keeps a shadow call stack per thread, so a
// stack switch it is not told about corrupts it (the TSan kvr_worker died on
// its first emulated kernel). Each fiber context gets a TSan fiber, made
// afresh per block (its previous run never returned), the scheduler context
// is the thread's own, and every switch is announced first
// (__tsan_switch_to_fiber; flag 0: the switch orders the fibers, as the
// scheduler does). No-ops in other builds.
void NewTsanFiber(Context* c) {
#ifdef KVR_TSAN_ENABLED
  if (c->tsan_fiber != nullptr) __tsan_destroy_fiber(c->tsan_fiber);
  c->tsan_fiber = __tsan_create_fiber(0);
#else
  static_cast<void>(c);
#endif
}

void DestroyTsanFiber(Context* c) {
#ifdef KVR_TSAN_ENABLED
  if (c->tsan_fiber != nullptr) __tsan_destroy_fiber(c->tsan_fiber);
  c->tsan_fiber = nullptr;
#else
  static_cast<void>(c);
#endif
}

void AdoptThreadAsTsanFiber(Context* c) {
#ifdef KVR_TSAN_ENABLED
  c->tsan_fiber = __tsan_get_current_fiber();
#else
  static_cast<void>(c);
#endif
}

#if defined(__x86_64__)
void Switch(Context* from, Context* to) {
#ifdef KVR_TSAN_ENABLED
  __tsan_switch_to_fiber(to->tsan_fiber, 0);
#endif
  KvrEmuSwitch(&from->sp, to->sp);
}
#else
void Switch(Context* from, Context* to) {
#ifdef KVR_TSAN_ENABLED
  __tsan_switch_to_fiber(to->tsan_fiber, 0);
#endif
  swapcontext(&from->uc, &to->uc);
}
#endif

// ---- Stacks --------------------------------------------------------------------

constexpr size_t kStackBytes = size_t{64} << 10;
constexpr int kMaxThreads = 1024;

// One stack per possible thread of a block, each below an inaccessible page
// (an overflow faults instead of corrupting its neighbour). Made once.
class StackPool {
 public:
  StackPool() {
    page_ = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    stride_ = kStackBytes + page_;
    void* p = mmap(nullptr, stride_ * kMaxThreads, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "kvr cuda emulator: cannot map fiber stacks\n");
      std::abort();
    }
    base_ = static_cast<std::byte*>(p);
    for (int i = 0; i < kMaxThreads; ++i) mprotect(base_ + i * stride_, page_, PROT_NONE);
  }
  std::byte* Stack(int i) const { return base_ + i * stride_ + page_; }

 private:
  size_t page_ = 0, stride_ = 0;
  std::byte* base_ = nullptr;
};

// ---- One block's threads ---------------------------------------------------------

enum class FiberState : uint8_t { kRunnable, kAtBarrier, kAtShuffle, kDone, kFaulted };

struct Fiber {
  Context ctx;
  uint3 tid{};
  int warp = 0, lane = 0;
  FiberState state = FiberState::kRunnable;
  uint64_t shuffles = 0;  // completed + pending shuffles (selects the slot buffer)
};

struct Warp {
  uint64_t slots[2][32] = {};  // double-buffered: shuffle s uses slots[s & 1]
  int lanes = 0, waiting = 0, done = 0;
};

struct BlockRun {
  const LaunchConfig* config = nullptr;
  const std::function<void()>* body = nullptr;
  uint3 block_idx{};
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<std::byte> shared;
  Context scheduler;
  Fiber* current = nullptr;
  int at_barrier = 0, done = 0;
  std::string fault;
};

thread_local BlockRun* t_run = nullptr;

BlockRun& Run(const char* what) {
  if (t_run == nullptr || t_run->current == nullptr) {
    std::fprintf(stderr, "kvr cuda emulator: %s called outside a kernel\n", what);
    std::abort();
  }
  return *t_run;
}

void FiberMain() {
  BlockRun& r = *t_run;
  (*r.body)();
  Fiber* f = r.current;
  f->state = FiberState::kDone;
  ++r.done;
  ++r.warps[f->warp].done;
  Switch(&f->ctx, &r.scheduler);
  std::abort();  // a finished fiber is never resumed
}

void Block(BlockRun& r, FiberState state) {
  Fiber* f = r.current;
  f->state = state;
  Switch(&f->ctx, &r.scheduler);
}

std::string Where(const BlockRun& r) {
  return absl::StrCat("kernel ", r.config->kernel_name, " block (", r.block_idx.x, ", ",
                      r.block_idx.y, ", ", r.block_idx.z, ")");
}

// Runs every fiber of r until all finished or a fault. Fibers are resumed in
// descending thread order each pass, so a thread that reads what a lower
// thread writes without a barrier in between sees the old value.
void Schedule(BlockRun& r) {
  AdoptThreadAsTsanFiber(&r.scheduler);
  const int n = static_cast<int>(r.fibers.size());
  for (;;) {
    for (int i = n - 1; i >= 0; --i) {
      Fiber& f = r.fibers[i];
      if (f.state != FiberState::kRunnable) continue;
      r.current = &f;
      Switch(&r.scheduler, &f.ctx);
      r.current = nullptr;
      if (!r.fault.empty()) return;
    }
    if (r.done == n) return;
    bool released = false;
    for (size_t w = 0; w < r.warps.size(); ++w) {
      Warp& warp = r.warps[w];
      if (warp.waiting == 0) continue;
      if (warp.lanes != 32) {
        r.fault = absl::StrCat(Where(r), ": warp ", w, " has ", warp.lanes,
                               " threads (block size not a multiple of 32) and shuffles with the "
                               "full mask");
        return;
      }
      if (warp.waiting + warp.done == warp.lanes && warp.done > 0) {
        r.fault = absl::StrCat(Where(r), ": warp ", w, ": ", warp.waiting,
                               " lanes wait in a full-mask shuffle after ", warp.done,
                               " lanes exited");
        return;
      }
      if (warp.waiting != warp.lanes) continue;
      for (int lane = 0; lane < 32; ++lane) r.fibers[w * 32 + lane].state = FiberState::kRunnable;
      warp.waiting = 0;
      released = true;
    }
    if (released) continue;
    // Stricter than some hardware, as the programming guide is: every thread
    // of the block must reach the barrier (exited ones do not count).
    if (r.at_barrier > 0 && r.at_barrier + r.done == n && r.done > 0) {
      r.fault = absl::StrCat(Where(r), ": ", r.at_barrier, " threads wait in __syncthreads after ",
                             r.done, " threads of the block exited");
      return;
    }
    if (r.at_barrier == n) {
      for (Fiber& f : r.fibers) {
        if (f.state == FiberState::kAtBarrier) f.state = FiberState::kRunnable;
      }
      r.at_barrier = 0;
      continue;
    }
    int shuffling = 0;
    for (const Warp& w : r.warps) shuffling += w.waiting;
    r.fault = absl::StrCat(Where(r), ": deadlock: ", r.at_barrier, " threads in __syncthreads, ",
                           shuffling, " in warp shuffles, ", r.done, " of ", n,
                           " finished (a barrier or shuffle not reached by every thread)");
    return;
  }
}

}  // namespace

const uint3& ThreadIndex() { return Run("threadIdx").current->tid; }
const uint3& BlockIndex() { return Run("blockIdx").block_idx; }
const dim3& BlockDim() { return Run("blockDim").config->block; }
const dim3& GridDim() { return Run("gridDim").config->grid; }
int LaneId() { return Run("lane id").current->lane; }

void* DynamicSharedBytes() {
  BlockRun& r = Run("extern __shared__");
  return r.shared.empty() ? nullptr : r.shared.data();
}

void SyncThreads() {
  BlockRun& r = Run("__syncthreads");
  ++r.at_barrier;
  Block(r, FiberState::kAtBarrier);
}

uint64_t ShuffleBits(unsigned mask, uint64_t bits, int src_lane, int width) {
  BlockRun& r = Run("__shfl_sync");
  Fiber* f = r.current;
  if (mask != 0xffffffffu || width != 32) {
    r.fault = absl::StrCat(Where(r), ": shuffle with mask 0x", absl::Hex(mask), " width ", width,
                           " (the emulator supports full-warp shuffles only)");
    Block(r, FiberState::kFaulted);
  }
  Warp& w = r.warps[f->warp];
  const int buf = static_cast<int>(f->shuffles & 1);
  w.slots[buf][f->lane] = bits;
  ++f->shuffles;
  ++w.waiting;
  Block(r, FiberState::kAtShuffle);
  return w.slots[buf][src_lane & 31];
}

std::string RunGrid(const LaunchConfig& config, const std::function<void()>& body) {
  static StackPool* pool = new StackPool();
  const dim3 b = config.block, g = config.grid;
  const int n = static_cast<int>(b.x * b.y * b.z);
  BlockRun r;
  r.config = &config;
  r.body = &body;
  r.fibers.resize(n);
  r.warps.resize((n + 31) / 32);
  for (size_t w = 0; w < r.warps.size(); ++w) {
    r.warps[w].lanes = std::min(32, n - static_cast<int>(w) * 32);
  }
  t_run = &r;
  for (unsigned bz = 0; bz < g.z && r.fault.empty(); ++bz) {
    for (unsigned by = 0; by < g.y && r.fault.empty(); ++by) {
      for (unsigned bx = 0; bx < g.x && r.fault.empty(); ++bx) {
        r.block_idx = {bx, by, bz};
        r.at_barrier = r.done = 0;
        for (Warp& w : r.warps) w.waiting = w.done = 0;
        r.shared.assign(config.shared_bytes, std::byte{0xff});
        for (int i = 0; i < n; ++i) {
          Fiber& f = r.fibers[i];
          f.tid = {static_cast<unsigned>(i) % b.x, (static_cast<unsigned>(i) / b.x) % b.y,
                   static_cast<unsigned>(i) / (b.x * b.y)};
          f.warp = i / 32;
          f.lane = i % 32;
          f.state = FiberState::kRunnable;
          f.shuffles = 0;
          InitContext(&f.ctx, pool->Stack(i), kStackBytes, &FiberMain);
          NewTsanFiber(&f.ctx);
        }
        Schedule(r);
      }
    }
  }
  for (Fiber& f : r.fibers) DestroyTsanFiber(&f.ctx);
  t_run = nullptr;
  return r.fault;
}

}  // namespace kvr::cuda_emu
