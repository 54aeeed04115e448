// Shared helpers of the CUDA kernels: current-stream lookup, launch checks, dtype conversion, monotone
// sort keys, block reductions/scans and a block-wide radix select. Stable-ABI headers only
// (design.md section 4), so `nvcc -c` works against the CPU wheel's headers in CI.
#pragma once

#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>
#include <cstdio>
#include <optional>

#include "concept_ext/checks.h"
#include "concept_ext/dispatch.h"

namespace concept_ext {
namespace cuda {

// Threads per block of the row-parallel kernels; the radix helpers below assume exactly this.
constexpr int kBlock = 256;
constexpr int kWarps = kBlock / 32;

// The stream PyTorch currently uses on `t`'s device. Launching anywhere else breaks CUDA-graph capture
// and torch.compile(mode="reduce-overhead") (pytorch/pytorch#157363). The AOTI shim call exists in every
// torch >= 2.3, unlike Stream::nativeHandle (2.13+), so it works under the 2.10 stable-ABI target.
inline cudaStream_t current_stream(const Tensor& t) {
  void* s = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &s) == AOTI_TORCH_SUCCESS,
                  "concept_ext: could not get the current CUDA stream");
  return static_cast<cudaStream_t>(s);
}

// Raises (as a Python RuntimeError) if the last launch failed; never synchronises.
#define CONCEPT_EXT_CHECK_LAUNCH(NAME)                                                       \
  do {                                                                                       \
    cudaError_t err_ = cudaGetLastError();                                                   \
    STD_TORCH_CHECK(err_ == cudaSuccess, NAME, ": CUDA launch failed: ", cudaGetErrorString(err_)); \
  } while (0)

// Device-side range check of an id that indexes a table of `bound` rows. The Python wrappers check every
// id before a launch, but that check is a host synchronisation, so it is skipped under CUDA-graph capture,
// torch.compile and concept_ext.unchecked(); this guard keeps a bad id there from becoming an invalid
// read or write. The kernel prints what was wrong and traps, so the launch fails (and, as after PyTorch's
// own device-side asserts, the CUDA context is unusable afterwards). One compare per id read.
#ifdef CONCEPT_EXT_EMULATE
#define CONCEPT_EXT_DEVICE_CHECK_INDEX(I, BOUND, WHAT)                                                   \
  do {                                                                                                 \
    const long long i_ = static_cast<long long>(I), b_ = static_cast<long long>(BOUND);               \
    if (!(i_ >= 0 && i_ < b_)) ::emu::device_fail(WHAT, i_, b_);                                       \
  } while (0)
#else
#define CONCEPT_EXT_DEVICE_CHECK_INDEX(I, BOUND, WHAT)                                                   \
  do {                                                                                                 \
    const long long i_ = static_cast<long long>(I), b_ = static_cast<long long>(BOUND);               \
    if (!(i_ >= 0 && i_ < b_)) {                                                                       \
      printf("concept_ext: %s out of range: %lld not in [0, %lld) (block %u, thread %u)\n", WHAT, i_, b_, \
             blockIdx.x, threadIdx.x);                                                                 \
      __trap();                                                                                        \
    }                                                                                                  \
  } while (0)
#endif

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Contiguous view of `t` (a copy only when `t` is strided).
inline Tensor contig(const Tensor& t) { return torch::stable::contiguous(t); }

// `t` converted to dtype `s` (no copy when it already has it).
inline Tensor to_dtype(const Tensor& t, ScalarType s) {
  return torch::stable::to(t, std::optional<ScalarType>(s));
}

inline ScalarType acc_scalar_type(ScalarType s) {
  return s == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

template <typename T>
inline T* ptr(const Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// ---------------------------------------------------------------------------------------------------
// Monotone unsigned keys: a < b (floats, NaN treated as the largest like torch.topk) <=> key(a) < key(b).
// ---------------------------------------------------------------------------------------------------
template <typename A>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
};
template <>
struct KeyOf<double> {
  using type = uint64_t;
};

__device__ __forceinline__ uint32_t float_key(float f) {
  if (f != f) return 0xFFFFFFFFu;
  uint32_t b = __float_as_uint(f);
  if (b == 0x80000000u) b = 0u;  // -0 == +0: one key, so ties are ties
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ uint64_t float_key(double f) {
  if (f != f) return ~0ull;
  uint64_t b = static_cast<uint64_t>(__double_as_longlong(f));
  if (b == 0x8000000000000000ull) b = 0ull;
  return (b & 0x8000000000000000ull) ? ~b : (b | 0x8000000000000000ull);
}

// ---------------------------------------------------------------------------------------------------
// Block reductions and scans (blockDim.x == kBlock).
// ---------------------------------------------------------------------------------------------------
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

// Inclusive prefix sum over the lanes of a warp (lane l gets v[0] + ... + v[l]).
template <typename A>
__device__ __forceinline__ A warp_inclusive_scan(A v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const A y = __shfl_up_sync(0xFFFFFFFFu, v, o);
    if (lane >= o) v += y;
  }
  return v;
}

// Sum over the block; every thread gets the result. `red` is shared scratch of kWarps entries.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // `red` may still be read by a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  A total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += red[w];
  return total;
}

// Exclusive prefix count of a per-thread flag over the block, in thread order. Returns the rank of this
// thread among the flagged ones and writes the block total. `cnt` is shared scratch of kWarps ints.
__device__ __forceinline__ int block_rank(bool flag, int* cnt, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned ballot = __ballot_sync(0xFFFFFFFFu, flag);
  __syncthreads();
  if (lane == 0) cnt[warp] = __popc(ballot);
  __syncthreads();
  int before = 0, all = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    before += (w < warp) ? cnt[w] : 0;
    all += cnt[w];
  }
  *total = all;
  return before + __popc(ballot & ((1u << lane) - 1u));
}

// Exclusive scan of `in[0..n)` into `out[0..n]` (out[n] = total) by one block of kBlock threads, in
// tiles; used for small bucket/row offset arrays (m or N entries), so one block is enough.
template <typename I>
__global__ void exclusive_scan_kernel(const I* __restrict__ in, int64_t* __restrict__ out, int64_t n) {
  __shared__ int64_t warp_tot[kWarps];
  __shared__ int64_t carry;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < n; base += kBlock) {
    const int64_t i = base + threadIdx.x;
    const int64_t v = i < n ? static_cast<int64_t>(in[i]) : 0;
    const int64_t incl = warp_inclusive_scan(v);
    if (lane == 31) warp_tot[warp] = incl;
    __syncthreads();
    int64_t before = carry;
    for (int w = 0; w < warp; ++w) before += warp_tot[w];
    if (i < n) out[i] = before + incl - v;
    __syncthreads();
    if (threadIdx.x == kBlock - 1) carry = before + incl;
    __syncthreads();
  }
  if (threadIdx.x == 0) out[n] = carry;
}

// ---------------------------------------------------------------------------------------------------
// Block-wide stable radix sort.
// ---------------------------------------------------------------------------------------------------
// Stable sort of n (key, id) pairs by key descending, by LSD radix on ~key, by one block; ping-pongs
// between the (ka, ia) and (kb, ib) buffers an even number of times, so the result ends in (ka, ia). The
// buffers may be shared or global memory; ia/ib may be null (keys only). Each warp owns a
// contiguous segment and scatters it in order (__match_any_sync ranks equal digits), which is what
// makes the sort stable.
template <typename Key>
__device__ void block_sort_desc(Key* ka, int32_t* ia, Key* kb, int32_t* ib, int64_t n,
                                unsigned (*whist)[256], unsigned* wtot) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t seg = ceil_div(n, kWarps);
  const int64_t s0 = min(n, warp * seg), s1 = min(n, s0 + seg);
  for (int shift = 0; shift < int(sizeof(Key)) * 8; shift += 8) {
    for (int w = 0; w < kWarps; ++w) whist[w][threadIdx.x] = 0;
    __syncthreads();
    for (int64_t i = s0 + lane; i < s1; i += 32) atomicAdd(&whist[warp][(~ka[i] >> shift) & 0xFF], 1u);
    __syncthreads();
    // Column scan (digit-major, warp-minor), then an exclusive scan of the digit totals.
    unsigned run = 0;
    for (int w = 0; w < kWarps; ++w) {
      const unsigned t = whist[w][threadIdx.x];
      whist[w][threadIdx.x] = run;
      run += t;
    }
    const unsigned incl = warp_inclusive_scan(run);
    if (lane == 31) wtot[warp] = incl;
    __syncthreads();
    unsigned base = incl - run;
    for (int w = 0; w < warp; ++w) base += wtot[w];
    for (int w = 0; w < kWarps; ++w) whist[w][threadIdx.x] += base;
    __syncthreads();
    for (int64_t c0 = s0; c0 < s1; c0 += 32) {
      const int64_t i = c0 + lane;
      const bool live = i < s1;
      const Key key = live ? ka[i] : Key(0);
      const int digit = live ? int((~key >> shift) & 0xFF) : 256;
      const unsigned peers = __match_any_sync(0xFFFFFFFFu, digit);
      const int rank = __popc(peers & ((1u << lane) - 1u));
      if (live) {
        const unsigned dst = whist[warp][digit] + rank;
        kb[dst] = key;
        if (ia) ib[dst] = ia[i];
      }
      __syncwarp();
      if (live && rank == 0) whist[warp][digit] += __popc(peers);
      __syncwarp();
    }
    __syncthreads();
    Key* tk = ka; ka = kb; kb = tk;
    int32_t* ti = ia; ia = ib; ib = ti;
  }
}

// ---------------------------------------------------------------------------------------------------
// Block-wide radix select: the k-th largest (1 <= k <= n) of n keys produced by get_key(i).
// On return *thresh is that key and *need_eq how many keys equal to it belong to the top k (so the top k
// are every key > thresh plus need_eq of the keys == thresh). All threads must call it. `hist` is shared
// scratch of 256 unsigned ints; `bcast` of 2 unsigned long longs. Each pass re-reads the n keys.
// ---------------------------------------------------------------------------------------------------
template <typename KeyT, typename GetKey>
__device__ void block_radix_select(GetKey get_key, int64_t n, int64_t k, unsigned* hist,
                                   unsigned long long* bcast, KeyT* thresh, int64_t* need_eq) {
  KeyT prefix = 0, mask = 0;
  int64_t kk = k;
  for (int shift = int(sizeof(KeyT)) * 8 - 8; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const KeyT key = get_key(i);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xFF], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t cum = 0;
      int b = 255;
      for (; b > 0; --b) {
        if (cum + hist[b] >= kk) break;
        cum += hist[b];
      }
      bcast[0] = static_cast<unsigned long long>(b);
      bcast[1] = static_cast<unsigned long long>(kk - cum);
    }
    __syncthreads();
    prefix |= static_cast<KeyT>(bcast[0]) << shift;
    mask |= static_cast<KeyT>(0xFF) << shift;
    kk = static_cast<int64_t>(bcast[1]);
    __syncthreads();
  }
  *thresh = prefix;
  *need_eq = kk;
}

}  // namespace cuda
}  // namespace concept_ext
