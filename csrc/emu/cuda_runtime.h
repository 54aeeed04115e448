// A CPU emulation of the small part of the CUDA programming model that csrc/cuda uses, so that the real
// CUDA sources (host code and device code, unchanged apart from the launch syntax) can be compiled by
// the host C++ compiler and run on CPU tensors in CI, where no GPU exists. tools/cuda_emulate.py
// translates `kernel<<<grid, block, smem, stream>>>(args)` into `::emu::launch(kernel, {grid, ...}, args)`
// and puts this folder first on the include path, so `#include <cuda_runtime.h>` lands here.
//
// Execution model (runtime.cpp): the blocks of a grid run one after another; the threads of a block are
// cooperative fibers (ucontext) on the calling OS thread. A fiber runs until it reaches a barrier
// (__syncthreads, __syncwarp or a warp collective: shuffle, ballot, match) and the scheduler releases a
// barrier once every live (not yet exited) thread it concerns has arrived. The order in which fibers run
// between barriers is selectable (forward, reverse, seeded shuffle), so code whose result depends on the
// interleaving of unsynchronised threads shows up as a mismatch under another order (the block order
// follows the same setting). Every __shared__ variable starts each block filled with 0xFF bytes. The
// emulator raises instead of hanging when the threads of a block or a warp wait at different barriers,
// when threads exited before a __syncthreads that others wait at, or when a warp collective with a full
// mask misses lanes that have exited (all undefined behaviour on a GPU). Fibers start with the launching
// thread's floating-point control state (rounding, flush-to-zero).
//
// What it cannot show: timing, memory-model effects between blocks (blocks never overlap), bank
// conflicts, register or shared-memory limits (nvcc_check.py covers those), and races inside one
// barrier interval whose outcome happens not to depend on the order tried.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Static storage is shared by every fiber of the running block; blocks run one at a time, and launches
// are serialised by a lock (runtime.cpp), so each block sees its own shared memory.
#define __shared__ static

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) float4 {
  float x, y, z, w;
};

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};

namespace emu {

// The running fiber's coordinates.
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

// Barriers. `sync_block` is __syncthreads at call site `site`; `warp_exchange` deposits `mine` for the fiber's warp, waits
// for all 32 lanes, and returns the 32 deposits (one barrier to publish, one so that nobody overwrites
// a deposit before every lane has read it). `op` names the collective for divergence reports.
void sync_block(const char* site);
void sync_warp(unsigned mask);
const uint64_t* warp_exchange(uint64_t mine, unsigned mask, const char* op);
void warp_release();
int lane_id();

// Called (by the translated source) right after each __shared__ declaration: the first thread of a block
// to get there fills the variable with 0xFF bytes, so a kernel that reads shared memory it never wrote
// sees garbage, as on a GPU, instead of zeros or the previous block's values.
void shared_region(void* p, size_t bytes);

// Runs `body` once per thread of every block of the grid (see the file comment); throws
// std::runtime_error naming `kernel` on a divergent barrier or deadlock.
void run_grid(const char* kernel, dim3 grid, dim3 block, void (*body)(void*), void* ctx);

// Launch configuration as written between <<< and >>>.
struct Config {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  Config(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr) : grid(g), block(b), smem(s), stream(st) {}
};

// The translated form of `kernel<<<cfg>>>(args...)`: arguments are converted to the kernel's parameter
// types once, then every emulated thread calls the kernel with them.
template <typename... P, typename... A>
void launch(const char* name, void (*kernel)(P...), const Config& cfg, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "emulated launch: argument count differs from the kernel's");
  if (cfg.smem != 0) throw std::runtime_error(std::string(name) + ": dynamic shared memory is not emulated");
  struct Ctx {
    void (*k)(P...);
    std::tuple<std::decay_t<P>...> params;
  } ctx{kernel, std::tuple<std::decay_t<P>...>(static_cast<P>(std::forward<A>(args))...)};
  run_grid(name, cfg.grid, cfg.block, [](void* c) {
    auto* x = static_cast<Ctx*>(c);
    std::apply(x->k, x->params);
  }, &ctx);
}

// A device-side check failed (CONCEPT_EXT_DEVICE_CHECK_INDEX): where a GPU traps, the emulated thread
// throws, and the launch fails with this message.
[[noreturn]] void device_fail(const char* what, long long value, long long bound);

// Host-side stand-ins for the CUDA-only parts of the host code (tools/cuda_emulate.py rewrites to these).
struct DeviceGuard {
  explicit DeviceGuard(int) {}
};
int current_stream_shim(int32_t device_index, void** ret_stream);

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "warp collectives move at most 8 bytes per lane");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())
#define EMU_STR2(x) #x
#define EMU_STR(x) EMU_STR2(x)
// Each call site is its own barrier: CUDA requires every thread of the block to reach the same one.
#define __syncthreads() ::emu::sync_block(__FILE__ ":" EMU_STR(__LINE__))

inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) { ::emu::sync_warp(mask); }

namespace emu {
// The shuffles: every lane publishes v, then takes lane src(lane)'s value, or keeps its own where src
// returns -1 (a source outside its segment of `width` lanes).
template <typename T, typename Src>
inline T shuffle(unsigned mask, T v, const char* name, Src src) {
  const uint64_t* all = warp_exchange(to_bits(v), mask, name);
  const int s = src(lane_id());
  const T r = s >= 0 ? from_bits<T>(all[s]) : v;
  warp_release();
  return r;
}
}  // namespace emu

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return ::emu::shuffle(mask, v, "__shfl_sync",
                        [&](int lane) { return (lane & ~(width - 1)) + (src & (width - 1)); });
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::emu::shuffle(mask, v, "__shfl_up_sync", [&](int lane) {
    return (lane & (width - 1)) >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : -1;
  });
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::emu::shuffle(mask, v, "__shfl_down_sync", [&](int lane) {
    return (lane & (width - 1)) + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : -1;
  });
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  // CUDA: a source lane in an earlier segment of `width` lanes is read; one in a later segment is not.
  return ::emu::shuffle(mask, v, "__shfl_xor_sync", [&](int lane) {
    const int src = lane ^ lane_mask;
    return src < ((lane / width) + 1) * width ? src : -1;
  });
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  const uint64_t* all = ::emu::warp_exchange(pred != 0, mask, "__ballot_sync");
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r |= (all[l] != 0 ? 1u : 0u) << l;
  ::emu::warp_release();
  return r;
}
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T v) {
  const uint64_t* all = ::emu::warp_exchange(::emu::to_bits(v), mask, "__match_any_sync");
  const uint64_t mine = all[::emu::lane_id()];
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r |= (all[l] == mine ? 1u : 0u) << l;
  ::emu::warp_release();
  return r;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == 0xFFFFFFFFu; }

// Atomics: fibers never run at the same time, so a plain read-modify-write is atomic.
namespace emu {
template <typename T, typename F>
inline T read_modify_write(T* p, F f) {
  const T old = *p;
  *p = f(old);
  return old;
}
}  // namespace emu
template <typename T, typename U>
inline T atomicAdd(T* p, U v) {
  return ::emu::read_modify_write(p, [&](T old) { return static_cast<T>(old + static_cast<T>(v)); });
}
template <typename T, typename U>
inline T atomicMax(T* p, U v) {
  return ::emu::read_modify_write(p, [&](T old) { return std::max(old, static_cast<T>(v)); });
}
template <typename T, typename U>
inline T atomicMin(T* p, U v) {
  return ::emu::read_modify_write(p, [&](T old) { return std::min(old, static_cast<T>(v)); });
}
template <typename T, typename U>
inline T atomicExch(T* p, U v) {
  return ::emu::read_modify_write(p, [&](T) { return static_cast<T>(v); });
}
template <typename T>
inline T atomicCAS(T* p, T cmp, T v) {
  return ::emu::read_modify_write(p, [&](T old) { return old == cmp ? v : old; });
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(unsigned x) { return x == 0 ? 32 : __builtin_clz(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline unsigned __float_as_uint(float f) { return ::emu::from_bits<unsigned>(::emu::to_bits(f)); }
inline float __uint_as_float(unsigned u) { return ::emu::from_bits<float>(u); }
inline long long __double_as_longlong(double f) { return ::emu::from_bits<long long>(::emu::to_bits(f)); }
inline double __longlong_as_double(long long u) { return ::emu::from_bits<double>(static_cast<uint64_t>(u)); }
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// CUDA's device min/max accept mixed integer widths; the common type reproduces that.
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(a) : static_cast<C>(b);
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

// Host runtime API: memory is host memory, the stream is the calling thread.
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t) {
  std::memset(dst, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
