// The fiber scheduler behind cuda_runtime.h (see that file for the execution model and its limits).
#include "cuda_runtime.h"

#include <ucontext.h>

// Under AddressSanitizer (tools/cuda_emulate.py --asan) every stack switch is announced, so that ASan
// tracks which stack is live and checks the kernels' memory accesses without false stack reports.
#if defined(__has_feature)
#if __has_feature(address_sanitizer)  // clang's spelling
#define EMU_ASAN_CLANG 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(EMU_ASAN_CLANG)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif

#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <vector>

// Context switch. On x86-64 a dozen instructions that save the callee-saved registers and the FP control
// words on the old stack and pop them from the new one (glibc's swapcontext also makes a sigprocmask
// system call per switch, which made emulation ~50x slower); elsewhere ucontext.
#if defined(__x86_64__)
extern "C" void emu_swap_stack(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl emu_swap_stack
  .hidden emu_swap_stack
  .type emu_swap_stack,@function
emu_swap_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_swap_stack, .-emu_swap_stack
)");
#define EMU_FAST_SWITCH 1
#endif

namespace emu {
namespace {

// 64 KiB per fiber: the kernels keep a few scalars and small register arrays on their stacks.
constexpr size_t kStackBytes = size_t(64) << 10;

enum class State { Runnable, AtBlock, AtWarp, Done };

struct Fiber {
  ucontext_t ctx;  // the portable path
  void* sp = nullptr;  // the x86-64 path: saved stack pointer
  char* stack = nullptr;
  void* fake_stack = nullptr;  // ASan's bookkeeping while the fiber is switched out
  uint3 tid;
  int lane = 0, warp = 0;
  State state = State::Done;
  const char* op = nullptr;  // the warp collective or __syncthreads site it waits at
  unsigned mask = 0;
};

struct Warp {
  uint64_t slot[32];
};

struct Scheduler {
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<Warp> warps;
  std::vector<int> order;
  ucontext_t main_ctx;
  void* main_sp = nullptr;
  void* main_fake_stack = nullptr;
  const void* main_bottom = nullptr;  // the scheduler's stack, learnt by ASan on the first switch
  size_t main_size = 0;
  Fiber* cur = nullptr;
  uint3 block{0, 0, 0};
  dim3 block_dim, grid_dim;
  void (*body)(void*) = nullptr;
  void* body_ctx = nullptr;
  int mode = 0;  // 0 forward, 1 reverse, 2 seeded shuffle per sweep
  std::mt19937_64 rng{0};
  std::exception_ptr fiber_error;  // the first exception a thread of the running block threw
  uint64_t fp_control = uint64_t(0x1F80) | (uint64_t(0x037F) << 32);  // mxcsr | x87 control word << 32
  std::vector<void*> poisoned;  // __shared__ regions already poisoned in the running block
};

std::mutex g_launch_lock;  // one grid at a time: __shared__ statics and the scheduler are global
Scheduler g;
thread_local cudaError_t g_last_error = cudaSuccess;

// From the running fiber back to the scheduler, and from the scheduler into fiber f.
void to_main(Fiber* f, bool exiting = false) {
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f->fake_stack, g.main_bottom, g.main_size);
#endif
#ifdef EMU_FAST_SWITCH
  emu_swap_stack(&f->sp, g.main_sp);
#else
  swapcontext(&f->ctx, &g.main_ctx);
#endif
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(f->fake_stack, nullptr, nullptr);
#endif
}

void to_fiber(Fiber* f) {
  g.cur = f;
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(&g.main_fake_stack, f->stack, kStackBytes);
#endif
#ifdef EMU_FAST_SWITCH
  emu_swap_stack(&g.main_sp, f->sp);
#else
  swapcontext(&g.main_ctx, &f->ctx);
#endif
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(g.main_fake_stack, nullptr, nullptr);
#endif
}

void fiber_entry() {
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g.main_bottom, &g.main_size);
#endif
  try {
    g.body(g.body_ctx);
  } catch (...) {
    if (!g.fiber_error) g.fiber_error = std::current_exception();
  }
  g.cur->state = State::Done;
  to_main(g.cur, /*exiting=*/true);
  std::abort();  // a finished fiber is never resumed
}

// A fresh fiber's stack: what emu_swap_stack pops (FP control words, six registers) and then `ret`s
// into fiber_entry, with the stack aligned as if fiber_entry had been called.
void init_fiber(Fiber& f, char* stack) {
  f.stack = stack;
  f.fake_stack = nullptr;
#ifdef EMU_ASAN
  // A stack is reused by the next block; frames a fiber left without returning (a thread that threw, a
  // block abandoned on a divergence error) must not leave their red zones behind.
  __asan_unpoison_memory_region(stack, kStackBytes);
#endif
#ifdef EMU_FAST_SWITCH
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + kStackBytes) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                              // fiber_entry's (never used) return address
  *--sp = reinterpret_cast<uint64_t>(&fiber_entry);       // popped by ret
  for (int r = 0; r < 6; ++r) *--sp = 0;                  // rbp rbx r12 r13 r14 r15
  *--sp = g.fp_control;                                   // mxcsr, x87 control word: the launching thread's
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = &g.main_ctx;
  makecontext(&f.ctx, fiber_entry, 0);
#endif
}

void yield(State s) {
  Fiber* f = g.cur;
  f->state = s;
  to_main(f);
}

[[noreturn]] void divergence(const char* kernel, const std::string& what) {
  std::ostringstream os;
  os << "emulated CUDA: kernel " << kernel << ", block (" << g.block.x << ", " << g.block.y << ", "
     << g.block.z << "): " << what;
  throw std::runtime_error(os.str());
}

std::string describe(const Fiber& f) {
  std::ostringstream os;
  os << "thread " << f.tid.x << " (warp " << f.warp << ") ";
  switch (f.state) {
    case State::AtBlock: os << "waits at __syncthreads (" << f.op << ")"; break;
    case State::AtWarp: os << "waits at " << f.op; break;
    case State::Done: os << "has exited"; break;
    default: os << "is runnable"; break;
  }
  return os.str();
}

// Runs one block to completion; throws on a barrier that can never be released.
void run_block(const char* kernel) {
  const int n = static_cast<int>(g.fibers.size());
  for (int i = 0; i < n; ++i) {
    Fiber& f = g.fibers[i];
    init_fiber(f, g.stacks[i].get());
    f.state = State::Runnable;
  }
  const int nwarps = (n + 31) / 32;
  for (;;) {
    if (g.mode == 2) std::shuffle(g.order.begin(), g.order.end(), g.rng);
    for (int i : g.order) {
      Fiber& f = g.fibers[i];
      if (f.state != State::Runnable) continue;
      to_fiber(&f);
      if (g.fiber_error) {
        std::string what = "a thread threw";
        try {
          std::rethrow_exception(g.fiber_error);
        } catch (const std::exception& e) {
          what += std::string(": ") + e.what();
        } catch (...) {
        }
        divergence(kernel, what);
      }
    }
    // Every fiber now waits or has exited. Release complete warp collectives first, then the block.
    bool released = false, live = false;
    for (int w = 0; w < nwarps; ++w) {
      const int l0 = w * 32, l1 = std::min(n, l0 + 32);
      int at_warp = 0, done = 0;
      const Fiber* first = nullptr;
      for (int l = l0; l < l1; ++l) {
        const Fiber& f = g.fibers[l];
        if (f.state == State::AtWarp) {
          ++at_warp;
          if (!first) first = &f;
          else if (std::strcmp(first->op, f.op) != 0)
            divergence(kernel, "lanes of one warp wait at different collectives: " + describe(*first) + "; " +
                                   describe(f));
        }
        done += f.state == State::Done;
      }
      if (done < l1 - l0) live = true;
      if (at_warp == 0) continue;
      if (at_warp + done == l1 - l0) {
        if (done > 0 && first->mask == 0xFFFFFFFFu)
          divergence(kernel, std::string(first->op) + " with a full mask after " + std::to_string(done) +
                                 " lane(s) of warp " + std::to_string(w) + " exited (undefined on a GPU)");
        for (int l = l0; l < l1; ++l)
          if (g.fibers[l].state == State::AtWarp) g.fibers[l].state = State::Runnable;
        released = true;
      }
    }
    if (!live) return;
    if (released) continue;
    bool all_block = true;
    const Fiber* site = nullptr;
    for (const Fiber& f : g.fibers) {
      all_block &= f.state == State::AtBlock || f.state == State::Done;
      if (f.state != State::AtBlock) continue;
      if (!site) site = &f;
      else if (std::strcmp(site->op, f.op) != 0)
        divergence(kernel, "threads wait at different __syncthreads: " + describe(*site) + "; " + describe(f));
    }
    if (all_block) {
      const Fiber* gone = nullptr;
      for (const Fiber& f : g.fibers)
        if (f.state == State::Done && !gone) gone = &f;
      if (gone && site)
        divergence(kernel, "threads exited before a __syncthreads that others wait at (undefined on a GPU): " +
                               describe(*gone) + "; " + describe(*site));
      for (Fiber& f : g.fibers)
        if (f.state == State::AtBlock) f.state = State::Runnable;
      continue;
    }
    // Deadlock: name one waiter of each kind.
    std::string msg = "threads wait at barriers that can never complete: ";
    const Fiber* at_block = nullptr;
    const Fiber* at_warp = nullptr;
    for (const Fiber& f : g.fibers) {
      if (f.state == State::AtBlock && !at_block) at_block = &f;
      if (f.state == State::AtWarp && !at_warp) at_warp = &f;
    }
    if (at_block) msg += describe(*at_block) + "; ";
    if (at_warp) msg += describe(*at_warp);
    divergence(kernel, msg);
  }
}

}  // namespace

const uint3& thread_idx() { return g.cur->tid; }
const uint3& block_idx() { return g.block; }
const dim3& block_dim() { return g.block_dim; }
const dim3& grid_dim() { return g.grid_dim; }
int lane_id() { return g.cur->lane; }

void sync_block(const char* site) {
  g.cur->op = site;
  yield(State::AtBlock);
}

void sync_warp(unsigned mask) {
  if (mask != 0xFFFFFFFFu) throw std::runtime_error("emulated CUDA: __syncwarp: only full masks are emulated");
  g.cur->op = "__syncwarp";
  g.cur->mask = mask;
  yield(State::AtWarp);
}

const uint64_t* warp_exchange(uint64_t mine, unsigned mask, const char* op) {
  if (mask != 0xFFFFFFFFu) throw std::runtime_error(std::string("emulated CUDA: ") + op + ": only full masks are emulated");
  Fiber* f = g.cur;
  g.warps[f->warp].slot[f->lane] = mine;
  f->op = op;
  f->mask = mask;
  yield(State::AtWarp);
  return g.warps[f->warp].slot;
}

void shared_region(void* p, size_t bytes) {
  for (void* q : g.poisoned)
    if (q == p) return;
  g.poisoned.push_back(p);
  std::memset(p, 0xFF, bytes);  // NaN in floats, -1 / the maximum in integers
}

void warp_release() {
  g.cur->op = "(end of a warp collective)";
  yield(State::AtWarp);
}

void run_grid(const char* kernel, dim3 grid, dim3 block, void (*body)(void*), void* ctx) {
  std::lock_guard<std::mutex> lock(g_launch_lock);
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535) {
    g_last_error = cudaErrorInvalidValue;  // what a GPU reports for an invalid configuration
    return;
  }
  const char* m = std::getenv("CONCEPT_EXT_EMU_ORDER");
  const std::string order = m ? m : "forward";
  g.mode = order == "reverse" ? 1 : order == "shuffle" ? 2 : 0;
  const char* seed = std::getenv("CONCEPT_EXT_EMU_SEED");
  g.rng.seed(seed ? std::strtoull(seed, nullptr, 10) : 0);
  const int n = static_cast<int>(threads);
  g.fibers.assign(n, Fiber{});
  while (static_cast<int>(g.stacks.size()) < n) g.stacks.emplace_back(new char[kStackBytes]);
  g.warps.assign((n + 31) / 32, Warp{});
  g.order.resize(n);
  for (int i = 0; i < n; ++i) g.order[i] = g.mode == 1 ? n - 1 - i : i;
  int i = 0;
  for (unsigned z = 0; z < block.z; ++z)
    for (unsigned y = 0; y < block.y; ++y)
      for (unsigned x = 0; x < block.x; ++x, ++i) {
        g.fibers[i].tid = uint3{x, y, z};
        g.fibers[i].lane = i % 32;
        g.fibers[i].warp = i / 32;
      }
  g.body = body;
  g.body_ctx = ctx;
  g.block_dim = block;
  g.grid_dim = grid;
  g.fiber_error = nullptr;
#ifdef EMU_FAST_SWITCH
  {  // fibers start with the launching thread's rounding and flush-to-zero modes
    uint32_t mxcsr = 0;
    uint16_t x87 = 0;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(x87));
    g.fp_control = uint64_t(mxcsr) | (uint64_t(x87) << 32);
  }
#endif
  // Blocks run one at a time, in the order the schedule asks for (forward, reverse, shuffled), so that
  // cross-block atomics (bucket slot claims, say) also arrive in more than one order.
  std::vector<uint3> blocks;
  blocks.reserve(size_t(grid.x) * grid.y * grid.z);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back(uint3{x, y, z});
  if (g.mode == 1) std::reverse(blocks.begin(), blocks.end());
  if (g.mode == 2) std::shuffle(blocks.begin(), blocks.end(), g.rng);
  for (const uint3& blk : blocks) {
    g.block = blk;
    g.poisoned.clear();
    run_block(kernel);
  }
}

void device_fail(const char* what, long long value, long long bound) {
  throw std::runtime_error(std::string("concept_ext: ") + what + " out of range: " + std::to_string(value) +
                           " not in [0, " + std::to_string(bound) + ")");
}

int current_stream_shim(int32_t, void** ret_stream) {
  *ret_stream = nullptr;
  return 0;  // AOTI_TORCH_SUCCESS
}

}  // namespace emu

cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return emu::g_last_error; }
const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument (emulated: bad launch configuration)";
    default: return "unspecified launch failure (emulated)";
  }
}
